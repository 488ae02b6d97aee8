"""Decomposition quality and speed: jaxfactor against TensorLy at equal ranks.

For Tucker-2 (`tensorly.decomposition.partial_tucker` over the two channel
modes) and CP (`tensorly.decomposition.parafac`), both with TensorLy's numpy
backend, "svd" starts and the same iteration counts (`tol=0`, so every
iteration runs), prints the relative error `||K - K_hat|| / ||K||` of each
and the median wall time of each call, on

* kernels with decaying spectra along every mode (`decay*`), and
* the 3x3 kernels of a small CNN trained for a few epochs on scikit-learn's
  handwritten digits (`digits/conv*`).

jaxfactor runs jitted (compile time excluded and reported separately), float32
unless `--float64`. jaxfactor's CP runs 5 starts side by side (its default);
TensorLy's `parafac` is shown for one start (seed 0) and as the best of 5
seeds, for a like-for-like multi-start comparison (its time is then x5).

Run: `python benchmarks/decompose.py` (needs the `benchmarks` extra:
`pip install -e ".[benchmarks]"`). Writes `benchmarks/results/decompose.md`
and `.json`.
"""

import argparse
import json
import pathlib
import platform
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jaxfactor


def decaying_kernel(shape, rate, seed=0):
  rng = np.random.default_rng(seed)
  kernel = rng.standard_normal(shape)
  for mode, size in enumerate(shape):
    kernel = np.moveaxis(
      np.moveaxis(kernel, mode, -1) * rate ** np.arange(size), -1, mode
    )
  return kernel


def trained_kernels(epochs, seed=0):
  """3x3 kernels of a small CNN trained on scikit-learn's digits."""
  import optax
  from flax import nnx
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = (digits.images[..., None] / 16.0).astype(np.float32)
  labels = digits.target

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
      self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
      self.conv3 = nnx.Conv(64, 64, (3, 3), rngs=rngs)
      self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.conv1(x))
      x = nnx.relu(self.conv2(x))
      x = nnx.avg_pool(x, (2, 2), (2, 2))
      x = nnx.relu(self.conv3(x))
      return self.head(x.mean(axis=(1, 2)))

  model = Net(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(images))
    for i in range(0, len(order) - 63, 64):
      batch = order[i : i + 64]
      step(
        model, optimizer, jnp.asarray(images[batch]), jnp.asarray(labels[batch])
      )
  accuracy = float(
    np.mean(np.asarray(model(jnp.asarray(images))).argmax(-1) == labels)
  )
  return {
    "digits/conv2 (3x3x32x64)": np.asarray(model.conv2.kernel[...], np.float64),
    "digits/conv3 (3x3x64x64)": np.asarray(model.conv3.kernel[...], np.float64),
  }, accuracy


def timed(fn, repeats):
  times = []
  result = None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    jax.block_until_ready(result) if not isinstance(result, tuple) else None
    times.append(time.perf_counter() - start)
  return result, statistics.median(times)


def rel_error(approx, kernel):
  return float(np.linalg.norm(approx - kernel) / np.linalg.norm(kernel))


def run_ours(kernel, dtype, repeats, **decompose_kwargs):
  """jaxfactor's jitted decompose: its error, median time, compile time."""
  k = jnp.asarray(kernel, dtype)
  fn = jax.jit(lambda k: jaxfactor.decompose(k, **decompose_kwargs))
  start = time.perf_counter()
  jax.block_until_ready(fn(k))
  compile_s = time.perf_counter() - start
  ours, ours_s = timed(lambda: fn(k), repeats)
  error = rel_error(np.asarray(ours.to_dense(), np.float64), kernel)
  return error, ours_s, compile_s


def bench_tucker(kernel, ranks, iterations, dtype, repeats):
  from tensorly.decomposition import partial_tucker

  ours_err, ours_s, compile_s = run_ours(
    kernel, dtype, repeats, format="tucker", rank=ranks, iterations=iterations
  )

  def theirs():
    (core, (u, v)), _ = partial_tucker(
      kernel,
      rank=list(ranks),
      modes=[2, 3],
      n_iter_max=iterations,
      init="svd",
      tol=0,
    )
    return np.einsum("hwab,ca,fb->hwcf", core, u, v)

  approx, theirs_s = timed(theirs, repeats)
  return dict(
    ours=ours_err,
    theirs=rel_error(approx, kernel),
    ours_s=ours_s,
    theirs_s=theirs_s,
    compile_s=compile_s,
  )


def bench_cp(kernel, rank, iterations, dtype, repeats, seeds=5):
  import tensorly as tl
  from tensorly.decomposition import parafac

  ours_err, ours_s, compile_s = run_ours(
    kernel, dtype, repeats, format="cp", rank=rank, iterations=iterations
  )

  def theirs(seed):
    cp = parafac(
      kernel,
      rank=rank,
      n_iter_max=iterations,
      init="svd",
      tol=0,
      random_state=seed,
    )
    return tl.cp_to_tensor(cp)

  approx, theirs_s = timed(lambda: theirs(0), max(1, repeats // 2))
  errors = [rel_error(approx, kernel)]
  errors += [rel_error(theirs(s), kernel) for s in range(1, seeds)]
  return dict(
    ours=ours_err,
    theirs=errors[0],
    theirs_best=min(errors),
    ours_s=ours_s,
    theirs_s=theirs_s,
    compile_s=compile_s,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="small kernels, few repeats (a smoke run)",
  )
  parser.add_argument(
    "--float64",
    action="store_true",
    help="run jaxfactor in float64 (TensorLy always is)",
  )
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--kernels",
    nargs="+",
    choices=("decay", "digits"),
    default=["decay", "digits"],
    help="the kernels: decaying spectra, and those of a"
    " CNN trained on digits (default: both)",
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent / "results",
  )
  args = parser.parse_args()
  if args.float64:
    jax.config.update("jax_enable_x64", True)
  dtype = jnp.float64 if args.float64 else jnp.float32
  repeats = 1 if args.quick else args.repeats
  warnings.filterwarnings("ignore", module="tensorly")

  kernels = {}
  accuracy = None
  if "decay" in args.kernels:
    shapes = (
      [(3, 3, 16, 16)] if args.quick else [(3, 3, 64, 64), (3, 3, 128, 128)]
    )
    for shape in shapes:
      name = f"decay0.9 {'x'.join(map(str, shape))}"
      kernels[name] = decaying_kernel(shape, 0.9)
  if "digits" in args.kernels:
    trained, accuracy = trained_kernels(epochs=1 if args.quick else 8)
    kernels.update(trained)

  rows = []
  for name, kernel in kernels.items():
    c, f = kernel.shape[-2:]
    for frac in (4, 2):
      ranks = (max(1, c // frac), max(1, f // frac))
      r = bench_tucker(kernel, ranks, 10, dtype, repeats)
      rows.append(
        dict(
          kernel=name,
          method="Tucker-2 HOOI",
          rank=str(ranks),
          iterations=10,
          **r,
        )
      )
    for rank, iterations in ((max(2, f // 4), 50), (max(2, f // 2), 50)):
      r = bench_cp(kernel, rank, iterations, dtype, repeats)
      rows.append(
        dict(
          kernel=name,
          method="CP ALS",
          rank=str(rank),
          iterations=iterations,
          **r,
        )
      )

  header = (
    "| kernel | method | rank | iters | jaxfactor error |"
    " TensorLy error | TensorLy best of 5 seeds | jaxfactor ms |"
    " TensorLy ms | time ratio (TensorLy / jaxfactor) |"
    " jaxfactor compile s |"
  )
  lines = [header, "|" + "---|" * 11]
  for r in rows:
    best = f"{r['theirs_best']:.4f}" if "theirs_best" in r else "-"
    lines.append(
      f"| {r['kernel']} | {r['method']} | {r['rank']} | {r['iterations']} |"
      f" {r['ours']:.4f} | {r['theirs']:.4f} | {best} |"
      f" {1e3 * r['ours_s']:.1f} | {1e3 * r['theirs_s']:.1f} |"
      f" {r['theirs_s'] / r['ours_s']:.2f} | {r['compile_s']:.1f} |"
    )
  import tensorly

  machine = (
    f"{platform.processor() or platform.machine()}, "
    f"{jax.device_count()} {jax.default_backend()} device(s), "
    f"jax {jax.__version__}, tensorly {tensorly.__version__}, "
    f"jaxfactor dtype {jnp.dtype(dtype).name}"
  )
  if accuracy is not None:
    machine += f"; trained net accuracy on digits (train set) {accuracy:.3f}"
  table = "\n".join(lines)
  print(machine)
  print(table)
  args.out.mkdir(parents=True, exist_ok=True)
  suffix = "_quick" if args.quick else ""
  (args.out / f"decompose{suffix}.md").write_text(
    machine + "\n\n" + table + "\n"
  )
  (args.out / f"decompose{suffix}.json").write_text(
    json.dumps(dict(machine=machine, rows=rows), indent=1)
  )


if __name__ == "__main__":
  main()
