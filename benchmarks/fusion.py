"""The depthwise conv inside a graph: what XLA:CPU fuses around it.

`conv.py` times each op with its output returned, so nothing can fuse into
it. In a model the output feeds other ops, and XLA:CPU's fusion passes decide
how the shift-add depthwise conv (k strided slices times weights, summed)
runs with them. This script times, for one layer shape, `jaxfactor`'s
depthwise conv ("shift_add") and the grouped conv Flax builds ("grouped")
under three consumers:

* `out`: the output returned (as in `conv.py`);
* `mean`: followed by a mean over batch and space (a batch norm's statistics);
* `bn_block`: value and gradients of batch norm + ReLU + a random-cotangent
  loss over `depthwise(bn_relu(x))`, the shape of a MobileNet block's
  training step.

jit, 2 warm-ups, `--rounds` interleaved rounds, medians (and minima), ms.

Run: `python benchmarks/fusion.py --shape 32 56 56 128` (batch, H, W, C).
"""

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxfactor


def _bn_relu(y):
  mean = y.mean(axis=(0, 1, 2), keepdims=True)
  var = y.var(axis=(0, 1, 2), keepdims=True)
  return jax.nn.relu((y - mean) * lax.rsqrt(var + 1e-5))


def programs(x, kernel, cotangent):
  out = {}
  for lowering in ("shift_add", "grouped"):
    def conv(x, kernel, lowering=lowering):
      return jaxfactor.depthwise_conv(x, kernel, depthwise_lowering=lowering)

    def block_loss(x, kernel, conv=conv):
      return jnp.vdot(_bn_relu(conv(_bn_relu(x), kernel)), cotangent)

    out[lowering, "out"] = conv
    out[lowering, "mean"] = lambda x, k, conv=conv: conv(x, k).mean((0, 1, 2))
    out[lowering, "bn_block"] = jax.value_and_grad(block_loss, (0, 1))
  return {key: jax.jit(fn).lower(x, kernel).compile()
          for key, fn in out.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=int, nargs=4, default=(32, 56, 56, 128))
  parser.add_argument("--rounds", type=int, default=9)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(args.shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 1, args.shape[-1])),
                       jnp.float32) / 3
  cotangent = jnp.asarray(rng.standard_normal(args.shape), jnp.float32)
  compiled = programs(x, kernel, cotangent)
  for fn in compiled.values():
    for _ in range(2):
      jax.block_until_ready(fn(x, kernel))
  times = {key: [] for key in compiled}
  for _ in range(args.rounds):
    for key, fn in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x, kernel))
      times[key].append(1e3 * (time.perf_counter() - start))
  print(f"{platform.machine()}, jax {jax.__version__},"
        f" {jax.default_backend()}, input {tuple(args.shape)}, 3x3 depthwise,"
        f" float32, {args.rounds} interleaved rounds, ms median (min)\n")
  print("| consumer | shift_add (jaxfactor) | grouped (Flax) |")
  print("|---|---|---|")
  for consumer in ("out", "mean", "bn_block"):
    cells = [f"{statistics.median(times[low, consumer]):.1f}"
             f" ({min(times[low, consumer]):.1f})"
             for low in ("shift_add", "grouped")]
    print(f"| {consumer} | {' | '.join(cells)} |")


if __name__ == "__main__":
  main()
