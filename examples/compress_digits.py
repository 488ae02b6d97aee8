"""Compress a CNN trained on real data: every format at several FLOP budgets.

Trains a small dense CNN (three 3x3 convs) on scikit-learn's handwritten
digits (1,797 real 8x8 images shipped with the package: no download), on a
fixed train/test split with fixed seeds. Then, for every format and budget,
factorizes a copy with `jaxfactor.nnx.factorize(model, format,
budget=jaxfactor.Budget(flops=b), inputs=...)`, measures test accuracy right
after factorizing and after a short fine-tune, and reports parameters, conv
FLOPs per image (`jaxfactor.cost`, layer by layer) and the measured inference
time per batch, the dense model included. The factorized layers run their
factor chains (`implementation="factorized"`), so the FLOPs counted, budgets
included, are those of the chains, whatever the backend.

Training runs Adam with a cosine-decayed learning rate for a fixed number of
epochs, which converges on this data, and keeps the *last* model: no
checkpoint is picked by its test accuracy (the dense model's best per-epoch
test accuracy is printed next to its final one). A budget below a format's
cheapest factorization (e.g. DepthwiseSeparable, whose cost is fixed by its
channel multiplier) makes `factorize` raise; the row then holds the cheapest
factorization (rank 1 in every layer), its FLOP fraction shows by how much it
misses, and its note says so.

Prints one table and writes `compress_digits.csv` and `compress_digits.png`
(test accuracy against conv FLOPs, one line per format) to `--out`.

Run: `make demo` (or `python examples/compress_digits.py --help`).
"""

import argparse
import csv
import pathlib
import statistics
import time

import jax
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxfactor
import jaxfactor.nnx

matplotlib.use("Agg")  # Files only: no display needed.
import matplotlib.pyplot as plt
import matplotlib.ticker

FORMATS = {
  cls.__name__: cls
  for cls in (
    jaxfactor.DepthwiseSeparable,
    jaxfactor.SpatiallySeparable,
    jaxfactor.LowRank,
    jaxfactor.Tucker,
    jaxfactor.CP,
  )
}
# The data-aware decomposition (output error on recorded activations instead
# of weight error) exists for these two.
DATA_AWARE = (jaxfactor.LowRank, jaxfactor.Tucker)
SPLIT_SEED = 0  # The train/test split never changes, whatever `--seed` is.
COLUMNS = (
  "format",
  "budget",
  "params",
  "conv_flops",
  "flop_fraction",
  "acc_factorized",
  "acc_finetuned",
  "infer_ms",
  "ranks",
  "note",
)


class Net(nnx.Module):
  """Three 3x3 convs and a linear head, for 8x8 single-channel images."""

  # Each conv's input shape for one image: what `jaxfactor.cost` counts.
  CONV_INPUT_SHAPES = {
    "conv1": (1, 8, 8, 1),
    "conv2": (1, 8, 8, 32),
    "conv3": (1, 4, 4, 64),
  }

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.conv3 = nnx.Conv(64, 64, (3, 3), rngs=rngs)
    self.head = nnx.Linear(2 * 2 * 64, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(x))  # [B, 8, 8, 32]
    x = nnx.relu(self.conv2(x))  # [B, 8, 8, 64]
    x = nnx.avg_pool(x, (2, 2), (2, 2))  # [B, 4, 4, 64]
    x = nnx.relu(self.conv3(x))  # [B, 4, 4, 64]
    x = nnx.avg_pool(x, (2, 2), (2, 2))  # [B, 2, 2, 64]
    return self.head(x.reshape(x.shape[0], -1))  # [B, 10]


def load_data(train_size=None):
  """Digits as `[N, 8, 8, 1]` float32 in [0, 1]; a fixed, stratified split."""
  digits = load_digits()
  images = (digits.images[..., None] / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=0.25, random_state=SPLIT_SEED, stratify=labels
  )
  if train_size is not None:
    x_train, y_train = x_train[:train_size], y_train[:train_size]
  return x_train, y_train, x_test, y_test


def conv_cost(model) -> jaxfactor.Cost:
  """Parameters and FLOPs per image of the model's convs, dense or not (the
  convs and their input shapes: `model.CONV_INPUT_SHAPES`)."""
  params = flops = 0
  for name, shape in model.CONV_INPUT_SHAPES.items():
    layer = getattr(model, name)
    if isinstance(layer, nnx.Conv):
      kernel, implementation = layer.kernel[...], "auto"
    else:
      kernel, implementation = layer.factors, layer.implementation
    c = jaxfactor.cost(
      kernel, shape, padding=layer.padding, implementation=implementation
    )
    params, flops = params + c.params, flops + c.flops
  return jaxfactor.Cost(params=params, flops=flops)


def num_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def layer_ranks(model) -> str:
  """Each conv's rank, e.g. "- 9 24" ("-": still dense; "8x16": Tucker), in
  the order of `model.CONV_INPUT_SHAPES`."""
  out = []
  for name in model.CONV_INPUT_SHAPES:
    layer = getattr(model, name)
    rank = "-" if isinstance(layer, nnx.Conv) else layer.rank
    out.append(
      "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)
    )
  return " ".join(out)


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def predict(model, x):
  return model(x).argmax(-1)


def accuracy(model, images, labels) -> float:
  return float(np.mean(np.asarray(predict(model, images)) == labels))


def train(
  model,
  data,
  *,
  epochs,
  learning_rate,
  batch_size,
  seed,
  desc,
  progress,
  evaluate=accuracy,
):
  """Adam with a cosine-decayed learning rate.

  Every epoch visits the training set in a new order (from `seed`), in full
  batches only so the step compiles once, then scores the test set with
  `evaluate(model, images, labels)`. Returns the per-epoch test accuracies and
  the optimizer.
  """
  x_train, y_train, x_test, y_test = data
  steps = len(x_train) // batch_size
  if steps == 0:
    raise SystemExit(
      f"--batch-size {batch_size} exceeds the {len(x_train)} training images."
    )
  schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps)
  optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  history = []
  bar = tqdm(
    range(epochs), desc=desc, disable=not progress, leave=False, unit="epoch"
  )
  for _ in bar:
    order = rng.permutation(len(x_train))
    for i in range(steps):
      batch = order[i * batch_size : (i + 1) * batch_size]
      loss = train_step(model, optimizer, x_train[batch], y_train[batch])
    history.append(evaluate(model, x_test, y_test))
    bar.set_postfix(loss=f"{float(loss):.4f}", test_acc=f"{history[-1]:.4f}")
  return history, optimizer


def compiled_forward(model, batch):
  """The jitted forward pass on `batch`, compiled and warmed up."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  for _ in range(3):
    jax.block_until_ready(forward(state, batch))
  return lambda: jax.block_until_ready(forward(state, batch))


def median_ms(forwards, runs):
  """Median wall time of each forward pass, in ms, over interleaved rounds.

  Each round runs every model once, so a load that changes during the
  measurement (another job on the machine) hits all of them alike.
  """
  times = [[] for _ in forwards]
  for _ in range(runs):
    for forward, t in zip(forwards, times):
      start = time.perf_counter()
      forward()
      t.append(time.perf_counter() - start)
  return [1e3 * statistics.median(t) for t in times]


def factorize(model, cls, budget, sample, data_aware, implementation):
  """`jaxfactor.nnx.factorize` at a FLOP budget; the cheapest if out of reach.

  Returns:
    A note: empty, or why the budget was not met.
  """
  kwargs = dict(
    inputs=sample,
    data_aware=data_aware and cls in DATA_AWARE,
    implementation=implementation,
  )
  try:
    jaxfactor.nnx.factorize(
      model, cls, budget=jaxfactor.Budget(flops=budget), **kwargs
    )
    return ""
  except ValueError as error:
    if "below the cheapest factorization" not in str(error):
      raise
  jaxfactor.nnx.factorize(model, cls, rank=1, **kwargs)
  return "budget out of reach: rank 1 everywhere"


def write_plot(rows, path, budgets):
  """Accuracy after fine-tuning (left) and right after factorizing (right).

  A hollow marker is a row whose budget was out of reach (see the notes).
  """
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
  dense = rows[0]
  dense_mflops = dense["conv_flops"] / 1e6
  for ax, key, title in (
    (axes[0], "acc_finetuned", "after fine-tuning"),
    (axes[1], "acc_factorized", "right after factorize"),
  ):
    for i, name in enumerate(FORMATS):
      points = sorted(
        (r["conv_flops"] / 1e6, r[key], bool(r["note"]))
        for r in rows[1:]
        if r["format"] == name
      )
      if not points:
        continue
      x, y, _ = zip(*points)
      ax.plot(x, y, color=f"C{i}", label=name)
      for xi, yi, m in points:
        ax.plot(
          xi,
          yi,
          marker="o",
          color=f"C{i}",
          markerfacecolor="white" if m else f"C{i}",
        )
    ax.plot(
      dense_mflops,
      dense["acc_finetuned"],
      marker="*",
      markersize=14,
      color="black",
      linestyle="none",
      label="dense",
    )
    ax.axhline(
      dense["acc_finetuned"], color="black", linewidth=0.6, linestyle=":"
    )
    ax.set_xscale("log")
    ticks = sorted({1.0, *budgets})
    ax.set_xticks(
      [dense_mflops * t for t in ticks],
      [f"{dense_mflops * t:.2f}\n{t:.0%}" for t in ticks],
    )
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("conv MFLOPs per image (and fraction of dense)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Digits CNN: test accuracy {title}")
    ax.grid(True, linewidth=0.3)
  axes[0].legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_csv(rows, columns, path):
  """`rows` (dicts) as CSV: floats to 4 decimals, None as empty."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow(
        {
          k: (
            ""
            if r[k] is None
            else f"{r[k]:.4f}"
            if isinstance(r[k], float)
            else r[k]
          )
          for k in columns
        }
      )


def print_table(rows):
  header = (
    f"{'format':<19} {'budget':>6} {'params':>7} {'MFLOPs':>7}"
    f" {'FLOP frac':>9} {'acc fact.':>9} {'acc tuned':>9}"
    f" {'infer ms':>8}  ranks (conv1 conv2 conv3)"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    budget = "-" if r["budget"] is None else f"{r['budget']:.2f}"
    acc_factorized = (
      "-" if r["acc_factorized"] is None else f"{r['acc_factorized']:.4f}"
    )
    note = "  *" if r["note"] else ""
    print(
      f"{r['format']:<19} {budget:>6} {r['params']:>7,}"
      f" {r['conv_flops'] / 1e6:>7.3f} {r['flop_fraction']:>9.3f}"
      f" {acc_factorized:>9} {r['acc_finetuned']:>9.4f}"
      f" {r['infer_ms']:>8.2f}  {r['ranks']}{note}"
    )
  if any(r["note"] for r in rows):
    print(
      "* the budget is below the cheapest factorization: the row holds"
      " rank 1 in every layer, at the FLOP fraction shown."
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = " (default: %(default)s)"
  parser.add_argument(
    "--budgets",
    type=float,
    nargs="+",
    default=[0.5, 0.25, 0.1],
    help="fractions of the dense conv FLOPs" + default,
  )
  parser.add_argument(
    "--formats",
    nargs="+",
    choices=list(FORMATS),
    default=list(FORMATS),
    metavar="FORMAT",
    help=f"any of {', '.join(FORMATS)} (default: all)",
  )
  parser.add_argument(
    "--epochs", type=int, default=30, help="dense training epochs" + default
  )
  parser.add_argument(
    "--finetune-epochs",
    type=int,
    default=5,
    help="fine-tuning epochs per factorized model" + default,
  )
  parser.add_argument(
    "--learning-rate",
    type=float,
    default=3e-3,
    help="dense training, peak of the cosine schedule" + default,
  )
  parser.add_argument(
    "--finetune-learning-rate",
    type=float,
    default=1e-3,
    help="fine-tuning, peak of the cosine schedule" + default,
  )
  parser.add_argument(
    "--batch-size", type=int, default=64, help="training batch" + default
  )
  parser.add_argument(
    "--train-size",
    type=int,
    default=None,
    help="use only the first N training images (smoke runs)",
  )
  parser.add_argument(
    "--weight-only",
    action="store_true",
    help="decompose LowRank and Tucker against the weights"
    " only, not the recorded activations",
  )
  parser.add_argument(
    "--implementation",
    default="factorized",
    choices=("factorized", "auto"),
    help="how the factorized layers run (jaxfactor.conv);"
    " FLOPs and budgets count what runs" + default,
  )
  parser.add_argument(
    "--timing-runs",
    type=int,
    default=50,
    help="timed inference rounds, every model once per"
    " round; the median is reported" + default,
  )
  parser.add_argument(
    "--timing-batch",
    type=int,
    default=256,
    help="images per timed inference batch" + default,
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="model initialization and data order" + default,
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent / "results",
    help="directory for compress_digits.csv and .png"
    " (default: examples/results)",
  )
  parser.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="no progress bars",
  )
  args = parser.parse_args()
  if not all(0 < b <= 1 for b in args.budgets):
    parser.error(f"--budgets must be fractions in (0, 1], got {args.budgets}")

  start = time.perf_counter()
  data = load_data(args.train_size)
  x_train, y_train, x_test, y_test = data
  print(
    f"digits: {len(x_train)} training and {len(x_test)} test images,"
    f" 8x8; backend {jax.default_backend()}, seed {args.seed}"
  )
  timing_batch = np.resize(x_test, (args.timing_batch, *x_test.shape[1:]))
  train_args = dict(
    batch_size=args.batch_size, seed=args.seed, progress=args.progress
  )

  dense = Net(nnx.Rngs(args.seed))
  history, _ = train(
    dense,
    data,
    epochs=args.epochs,
    learning_rate=args.learning_rate,
    desc="dense",
    **train_args,
  )
  dense_cost = conv_cost(dense)
  print(
    f"dense CNN after {args.epochs} epochs: test accuracy"
    f" {history[-1]:.4f} (best epoch {max(history):.4f}),"
    f" {num_params(dense):,} params, {dense_cost.flops / 1e6:.3f} conv"
    f" MFLOPs per image"
  )
  forwards = [compiled_forward(dense, timing_batch)]
  rows = [
    dict(
      format="dense",
      budget=None,
      params=num_params(dense),
      conv_flops=dense_cost.flops,
      flop_fraction=1.0,
      acc_factorized=None,
      acc_finetuned=history[-1],
      infer_ms=None,
      ranks=layer_ranks(dense),
      note="",
    )
  ]

  # The recorded inputs give each conv's input shape (for FLOP budgets) and
  # its activations (for the data-aware decomposition).
  sample = x_train[:256]
  runs = [(name, b) for name in args.formats for b in args.budgets]
  for name, budget in tqdm(
    runs, desc="factorize + fine-tune", disable=not args.progress, unit="model"
  ):
    model = nnx.clone(dense)
    note = factorize(
      model,
      FORMATS[name],
      budget,
      sample,
      not args.weight_only,
      args.implementation,
    )
    acc_factorized = accuracy(model, x_test, y_test)
    tuned = (
      train(
        model,
        data,
        epochs=args.finetune_epochs,
        learning_rate=args.finetune_learning_rate,
        desc=f"{name} {budget}",
        **train_args,
      )[0]
      if args.finetune_epochs
      else []
    )
    cost = conv_cost(model)
    rows.append(
      dict(
        format=name,
        budget=budget,
        params=num_params(model),
        conv_flops=cost.flops,
        flop_fraction=cost.flops / dense_cost.flops,
        acc_factorized=acc_factorized,
        acc_finetuned=tuned[-1] if tuned else acc_factorized,
        infer_ms=None,
        ranks=layer_ranks(model),
        note=note,
      )
    )
    forwards.append(compiled_forward(model, timing_batch))
  for row, ms in zip(rows, median_ms(forwards, args.timing_runs)):
    row["infer_ms"] = ms

  print(
    f"\nconv FLOPs per 8x8 image (jaxfactor.cost, implementation"
    f" {args.implementation!r}); inference: median of {args.timing_runs}"
    f" jitted forward passes on {args.timing_batch} images, the models"
    f" taking turns; fine-tune: {args.finetune_epochs} epochs\n"
  )
  print_table(rows)
  args.out.mkdir(parents=True, exist_ok=True)
  write_csv(rows, COLUMNS, args.out / "compress_digits.csv")
  write_plot(rows, args.out / "compress_digits.png", args.budgets)
  print(
    f"\nwrote {args.out / 'compress_digits.csv'} and"
    f" {args.out / 'compress_digits.png'}"
    f" ({time.perf_counter() - start:.0f} s)"
  )


if __name__ == "__main__":
  main()
