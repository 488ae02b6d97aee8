"""The depthwise conv inside a graph: what XLA:CPU fuses around it.

`conv.py` times each op with its output returned, so nothing can fuse into
it. In a model the output feeds other ops, and XLA:CPU's fusion passes decide
how a depthwise conv runs with them. This script times
`jaxfactor.depthwise_conv` compiled with each of its CPU lowerings (forced
with the private hook `jaxfactor._lowering.forced`): "shift_add" (k strided
slices times weights, summed, which XLA can fuse with its consumers),
"grouped" (XLA's grouped convolution, what Flax builds) and "native" (the
compiled kernel, the CPU default, where it builds: a custom call, into which
XLA fuses nothing), under three consumers:

* `out`: the output returned (as in `conv.py`);
* `mean`: followed by a mean over batch and space (a batch norm's statistics);
* `bn_block`: value and gradients of batch norm + ReLU + a random-cotangent
  loss over `depthwise(bn_relu(x))`, the shape of a MobileNet block's
  training step.

jit, 2 warm-ups, `--rounds` rounds, each running every program once in a
random order (`conv._interleaved`); medians (and minima), ms.

Run: `python benchmarks/fusion.py` (the two default shapes, batch H W C:
32 56 56 128 and 32 14 14 512; `--shapes B H W C ...` for others). Writes
`benchmarks/results/fusion.md` (`--out` for another folder). CPU only.
"""

import argparse
import pathlib
import platform
import statistics

import conv  # this folder's benchmark: its interleaved timing loop
import jax
import jax.numpy as jnp
from jax import lax

import jaxfactor
from jaxfactor import _native

CONSUMERS = ("out", "mean", "bn_block")
# The native kernel (the CPU default) where it builds.
LOWERINGS = (
  "shift_add",
  "grouped",
  *(("native",) if _native.available() else ()),
)


def _bn_relu(y):
  mean = y.mean(axis=(0, 1, 2), keepdims=True)
  var = y.var(axis=(0, 1, 2), keepdims=True)
  return jax.nn.relu((y - mean) * lax.rsqrt(var + 1e-5))


def _block_loss(x, kernel, t):
  return jnp.vdot(_bn_relu(jaxfactor.depthwise_conv(_bn_relu(x), kernel)), t)


def programs(x, kernel, cotangent):
  """`{(lowering, consumer): compiled}`, each called as `f(x, kernel, t)`."""
  fns = {
    "out": lambda x, k, t: jaxfactor.depthwise_conv(x, k),
    "mean": lambda x, k, t: jaxfactor.depthwise_conv(x, k).mean(axis=(0, 1, 2)),
    "bn_block": jax.value_and_grad(_block_loss, (0, 1)),
  }
  out = {}
  for lowering in LOWERINGS:
    compiled = conv.compile_for(
      fns, (x, kernel, cotangent), dict(depthwise=lowering)
    )
    out.update({(lowering, consumer): c for consumer, c in compiled.items()})
  return out


def time_shape(shape, rounds, seed=0):
  """`{(lowering, consumer): [ms per call]}` for one input shape."""
  x, kernel, cotangent = conv.depthwise_operands(shape, shape, seed)
  return conv.time_compiled(
    programs(x, kernel, cotangent), (x, kernel, cotangent), rounds
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--shapes",
    type=int,
    nargs="+",
    default=[32, 56, 56, 128, 32, 14, 14, 512],
    help="B H W C, repeated for several shapes",
  )
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent / "results",
  )
  args = parser.parse_args()
  if len(args.shapes) % 4:
    parser.error(f"--shapes takes B H W C per shape, got {args.shapes}")
  if jax.default_backend() != "cpu":
    parser.error(
      "compares the CPU's depthwise lowerings: needs the CPU"
      " backend (e.g. JAX_PLATFORMS=cpu)"
    )
  shapes = [
    tuple(args.shapes[i : i + 4]) for i in range(0, len(args.shapes), 4)
  ]
  lines = [
    f"{platform.machine()}, jax {jax.__version__},"
    f" {jax.default_backend()}, 3x3 depthwise, float32, {args.rounds}"
    " rounds in random order, ms median (min)",
    "",
  ]
  for shape in shapes:
    times = time_shape(shape, args.rounds)
    first = len(lines)
    lines += [
      f"input {shape}:",
      "",
      "| consumer | shift_add (jaxfactor) | grouped (Flax) |"
      + (" native (jaxfactor) |" if "native" in LOWERINGS else ""),
      "|---|---|---|" + ("---|" if "native" in LOWERINGS else ""),
    ]
    for consumer in CONSUMERS:
      cells = [
        f"{statistics.median(times[low, consumer]):.1f}"
        f" ({min(times[low, consumer]):.1f})"
        for low in LOWERINGS
      ]
      lines.append(f"| {consumer} | {' | '.join(cells)} |")
    lines.append("")
    print("\n".join(lines[first:]), flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "fusion.md").write_text("\n".join(lines))


if __name__ == "__main__":
  main()
