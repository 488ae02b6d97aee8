"""How to run CP's depthwise stages: one 1-D conv per axis, or one k x k conv.

CP is `1x1 (C -> R)`, a depthwise `k_i`-tap conv along each axis, `1x1
(R -> F)`. This times, at the MobileNet shapes of `conv.py` (CP at R = F/2):

* `per_axis_grouped`: one grouped 1-D conv per axis, written out with `lax`
  here (what `jaxfactor.conv` ran under "grouped" before it merged them);
* `merged_grouped`: `jaxfactor.conv(..., depthwise_lowering="grouped")`, the
  per-axis filters multiplied into one k x k depthwise filter per channel
  (`A_0[i, r] * A_1[j, r]`), one grouped conv instead of two: 3 more
  multiply-adds per position and channel, one pass over the R-channel
  activations fewer (`primitives.merge_depthwise_stages`);
* `per_axis_shift_add_autodiff` and `per_axis_shift_add`: the per-axis
  stages as shifted multiply-adds, under autodiff or the hand-written VJP;
* `reconstructed`: the dense conv of `to_dense()`.

Forward and forward+backward (as `conv.py`), medians of `--repeats`
interleaved runs. Run: `python benchmarks/cp_lowering.py [--batch N]`;
prints a markdown table. (`results/cp_lowering_gpu.md` ran before the
merge was the library's: its `per_axis` row is `per_axis_grouped`, its
`merged` row `merged_grouped`.)
"""

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxfactor
from conv import SHAPES, _forward_backward, _interleaved

DN = ("NHWC", "HWIO", "NHWC")


def per_axis_grouped(x, cp, stride):
  """CP with one grouped 1-D conv per axis (2-D input, SAME padding)."""
  r = cp.rank
  y = x @ cp.in_proj
  for axis, a in enumerate(cp.spatial):
    k = a.shape[0]
    window = a.reshape((k, 1, 1, r) if axis == 0 else (1, k, 1, r))
    strides = (stride, 1) if axis == 0 else (1, stride)
    y = lax.conv_general_dilated(y, window, strides, "SAME",
                                 dimension_numbers=DN, feature_group_count=r)
  return y @ cp.out_proj


def variants(stride):
  conv = lambda **kw: (lambda x, cp: jaxfactor.conv(
      x, cp, strides=stride, implementation="factorized", **kw))
  return {
      "per_axis_grouped": lambda x, cp: per_axis_grouped(x, cp, stride),
      "merged_grouped": conv(depthwise_lowering="grouped"),
      "per_axis_shift_add_autodiff": conv(
          depthwise_lowering="shift_add_autodiff"),
      "per_axis_shift_add": conv(depthwise_lowering="shift_add"),
      "reconstructed": lambda x, cp: jaxfactor.conv(
          x, cp, strides=stride, implementation="reconstructed"),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--shapes", nargs="*", default=["mb56", "mb28",
                                                      "s2_56"])
  args = parser.parse_args()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch"
        f" {args.batch}, float32, {args.repeats} interleaved runs, medians")
  print("\n| shape | lowering | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
  for name in args.shapes:
    size, c, f, stride = SHAPES[name]
    keys = iter(jax.random.split(jax.random.key(0), 6))
    normal = lambda shape, fan: jax.random.normal(next(keys), shape) / np.sqrt(
        fan)
    r = f // 2
    cp = jaxfactor.CP(normal((c, r), c), (normal((3, r), 3),
                                          normal((3, r), 3)),
                      normal((r, f), r))
    x = normal((args.batch, size, size, c), 1)
    out = -(-size // stride)
    t = normal((args.batch, out, out, f), 1)
    calls = {}
    for label, fn in variants(stride).items():
      fwd = jax.jit(fn)
      grad = jax.jit(functools.partial(_forward_backward, fn))
      calls[label, "fwd"] = lambda fwd=fwd: jax.block_until_ready(fwd(x, cp))
      calls[label, "fwdbwd"] = lambda g=grad: jax.block_until_ready(
          g(x, cp, t))
    times = _interleaved(calls, args.repeats)
    for label in variants(stride):
      fwd = 1e3 * statistics.median(times[label, "fwd"])
      fb = 1e3 * statistics.median(times[label, "fwdbwd"])
      print(f"| {name} | {label} | {fwd:.3g} | {fb:.3g} |", flush=True)


if __name__ == "__main__":
  main()
