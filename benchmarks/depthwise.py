"""The depthwise conv alone, narrow and wide: native kernel against shift-add.

`conv.py` times MobileNet layers of 128-1024 channels and one of 16. This
script times the CPU's two depthwise lowerings side by side on the narrow
layers of small networks (3-64 channels) and a few wide ones:
`jaxfactor.depthwise_conv` compiled with its "native" lowering (the compiled
kernel, the CPU default) and with its "shift_add" lowering (forced with the
private hook `jaxfactor._lowering.forced`), forward (output returned) and
forward+backward (output plus the gradients w.r.t. the input and the weights
against a random cotangent, `conv._forward_backward`). 3x3, "SAME",
float32.

jit, 2 warm-ups, `--rounds` rounds, each running every program once in a
random order (`conv._interleaved`); medians and minima, ms. On a shared
machine the minima are the steadier figure for ops of a few milliseconds.

Run: `python benchmarks/depthwise.py` (`--shapes B H W C S ...` for
others). Writes `benchmarks/results/depthwise.md` (`--out` for another
folder). CPU only: the native kernel is CPU-only.
"""

import argparse
import functools
import pathlib
import platform
import statistics

import conv  # this folder's benchmark: its timing loop and fwd+bwd
import jax
import jax.numpy as jnp

import jaxfactor
from jaxfactor import _native

LOWERINGS = ("native", "shift_add")
# B H W C stride: the narrow layers of small networks, then wide ones.
SHAPES = (
  32,
  32,
  32,
  3,
  1,
  32,
  56,
  56,
  16,
  1,
  32,
  56,
  56,
  24,
  1,
  32,
  56,
  56,
  32,
  1,
  32,
  56,
  56,
  64,
  1,
  32,
  112,
  112,
  32,
  1,
  32,
  56,
  56,
  128,
  1,
  32,
  28,
  28,
  256,
  1,
  32,
  56,
  56,
  128,
  2,
)


def programs(x, kernel, cotangent, stride):
  """`{(lowering, pass): compiled}`, each called as `f(x, kernel, t)`."""
  fn = functools.partial(jaxfactor.depthwise_conv, strides=stride)
  fns = {
    "fwd": lambda x, k, t: fn(x, k),
    "fwd+bwd": functools.partial(conv._forward_backward, fn),
  }
  out = {}
  for lowering in LOWERINGS:
    compiled = conv.compile_for(
      fns, (x, kernel, cotangent), dict(depthwise=lowering)
    )
    out.update({(lowering, p): c for p, c in compiled.items()})
  return out


def time_shape(shape, rounds, seed=0):
  """`{(lowering, pass): [ms per call]}` for one (B, H, W, C, stride)."""
  *x_shape, stride = shape
  out_shape = jax.eval_shape(
    lambda x, k: jaxfactor.depthwise_conv(x, k, strides=stride),
    jax.ShapeDtypeStruct(x_shape, jnp.float32),
    jax.ShapeDtypeStruct((3, 3, 1, x_shape[-1]), jnp.float32),
  ).shape
  x, kernel, cotangent = conv.depthwise_operands(x_shape, out_shape, seed)
  return conv.time_compiled(
    programs(x, kernel, cotangent, stride), (x, kernel, cotangent), rounds
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--shapes",
    type=int,
    nargs="+",
    default=list(SHAPES),
    help="B H W C stride, repeated for several shapes",
  )
  parser.add_argument("--rounds", type=int, default=40)
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent / "results",
  )
  args = parser.parse_args()
  if len(args.shapes) % 5:
    parser.error(f"--shapes takes B H W C stride per shape, got {args.shapes}")
  if jax.default_backend() != "cpu" or not _native.available():
    parser.error(
      "needs the native kernel: a CPU backend and a C++ compiler"
      f" ({_native.error()})"
    )
  shapes = [
    tuple(args.shapes[i : i + 5]) for i in range(0, len(args.shapes), 5)
  ]
  lines = [
    f"{platform.machine()}, jax {jax.__version__}, 3x3 depthwise,"
    f' "SAME", float32, {args.rounds} rounds in random order,'
    " ms median (min)",
    "",
    "| B H W C, stride | fwd: native | fwd: shift_add |"
    " fwd+bwd: native | fwd+bwd: shift_add |",
    "|---|---|---|---|---|",
  ]
  print("\n".join(lines), flush=True)
  for shape in shapes:
    times = time_shape(shape, args.rounds)
    cells = [
      f"{statistics.median(times[low, p]):.2f} ({min(times[low, p]):.2f})"
      for p in ("fwd", "fwd+bwd")
      for low in LOWERINGS
    ]
    lines.append(
      f"| {' '.join(map(str, shape[:4]))}, {shape[4]} | {' | '.join(cells)} |"
    )
    print(lines[-1], flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "depthwise.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
