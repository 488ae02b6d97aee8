"""How to run CP's depthwise stages: one 1-D conv per axis, or one k x k conv.

CP is `1x1 (C -> R)`, a depthwise `k_i`-tap conv along each axis, `1x1
(R -> F)`. This times, at the MobileNet shapes of `conv.py` (CP at R = F/2):

* `per_axis_grouped`: one grouped 1-D conv per axis, written out with `lax`;
* `merged_grouped`: the per-axis filters multiplied into one k x k depthwise
  filter per channel (`A_0[i, r] * A_1[j, r]`), one grouped conv instead of
  two, written out with `lax`: 3 more multiply-adds per position and
  channel, one pass over the R-channel activations fewer. What
  `jaxfactor.conv` runs on GPU and TPU (`_stages.merge_depthwise_stages`);
* `factorized`: `jaxfactor.conv(..., implementation="factorized")`, lowered
  as it is on this platform (on CPU: the compiled depthwise kernel per axis,
  where it builds; on GPU and TPU: `merged_grouped`);
* `per_axis_shift_add` (CPU only): the same, its per-axis stages lowered as
  shifted multiply-adds (`jaxfactor._lowering.forced(depthwise="shift_add")`);
* `reconstructed`: the dense conv of `to_dense()`.

Forward and forward+backward (as `conv.py`), medians of `--repeats`
interleaved runs. Run: `python benchmarks/cp_lowering.py [--batch N]`;
prints a markdown table.
"""

import argparse
import functools
import statistics

import jax
import numpy as np
from conv import QUICK
from conv import SHAPES
from conv import _forward_backward
from conv import _interleaved
from conv import compile_for
from jax import lax

import jaxfactor

DN = ("NHWC", "HWIO", "NHWC")


def per_axis_grouped(x, cp, stride):
  """CP with one grouped 1-D conv per axis (2-D input, SAME padding)."""
  r = cp.rank
  y = x @ cp.in_proj
  for axis, a in enumerate(cp.spatial):
    k = a.shape[0]
    window = a.reshape((k, 1, 1, r) if axis == 0 else (1, k, 1, r))
    strides = (stride, 1) if axis == 0 else (1, stride)
    y = lax.conv_general_dilated(
      y, window, strides, "SAME", dimension_numbers=DN, feature_group_count=r
    )
  return y @ cp.out_proj


def merged_grouped(x, cp, stride):
  """CP with its per-axis filters merged into one grouped k x k conv."""
  a0, a1 = cp.spatial
  window = (a0[:, None, :] * a1[None, :, :])[:, :, None, :]
  y = lax.conv_general_dilated(
    x @ cp.in_proj,
    window,
    (stride, stride),
    "SAME",
    dimension_numbers=DN,
    feature_group_count=cp.rank,
  )
  return y @ cp.out_proj


def variants(stride):
  """`{label: (fn(x, cp), lowering)}`: `lowering`, if not None, is what to
  compile `fn` under (`conv.compile_for`)."""
  factorized = functools.partial(
    jaxfactor.conv, strides=stride, implementation="factorized"
  )
  out = {
    "per_axis_grouped": (
      functools.partial(per_axis_grouped, stride=stride),
      None,
    ),
    "merged_grouped": (functools.partial(merged_grouped, stride=stride), None),
    "factorized": (factorized, None),
  }
  if jax.default_backend() == "cpu":
    out["per_axis_shift_add"] = (factorized, dict(depthwise="shift_add"))
  out["reconstructed"] = (
    functools.partial(
      jaxfactor.conv, strides=stride, implementation="reconstructed"
    ),
    None,
  )
  return out


def programs(x, cp, cotangent, stride):
  """`{(label, pass): compiled}`, each called as `f(x, cp, t)`."""
  out = {}
  for label, (fn, lowering) in variants(stride).items():
    compiled = compile_for(
      {
        "fwd": lambda x, cp, t, fn=fn: fn(x, cp),
        "fwdbwd": functools.partial(_forward_backward, fn),
      },
      (x, cp, cotangent),
      lowering,
    )
    out.update({(label, p): c for p, c in compiled.items()})
  return out


def operands(size, c, f, stride, batch, seed=0):
  """Random float32 `(x, CP at rank F/2, cotangent)` for one layer."""
  keys = iter(jax.random.split(jax.random.key(seed), 6))

  def normal(shape, fan_in):
    return jax.random.normal(next(keys), shape) / np.sqrt(fan_in)

  r = f // 2
  cp = jaxfactor.CP(
    normal((c, r), c), (normal((3, r), 3), normal((3, r), 3)), normal((r, f), r)
  )
  x = normal((batch, size, size, c), 1)
  out = -(-size // stride)
  return x, cp, normal((batch, out, out, f), 1)


def _block(fn, args):
  return jax.block_until_ready(fn(*args))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument(
    "--shapes",
    nargs="*",
    default=["mb56", "mb28", "s2_56"],
    help=f"any of {', '.join({**SHAPES, **QUICK})} (conv.py's)",
  )
  args = parser.parse_args()
  print(
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch"
    f" {args.batch}, float32, {args.repeats} interleaved runs, medians"
  )
  print("\n| shape | lowering | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
  for name in args.shapes:
    size, c, f, stride = {**SHAPES, **QUICK}[name]
    operands_ = operands(size, c, f, stride, args.batch)
    calls = {
      key: functools.partial(_block, fn, operands_)
      for key, fn in programs(*operands_, stride).items()
    }
    times = _interleaved(calls, args.repeats)
    for label in variants(stride):
      fwd = 1e3 * statistics.median(times[label, "fwd"])
      fb = 1e3 * statistics.median(times[label, "fwdbwd"])
      print(f"| {name} | {label} | {fwd:.3g} | {fb:.3g} |", flush=True)


if __name__ == "__main__":
  main()
