"""One realistic layer, every format: parameters, FLOPs, and agreement.

For a 3x3 convolution from 128 to 128 channels on a 28x28 feature map, builds
each jaxfactor format with random factors and prints its parameters and FLOPs
(`jaxfactor.cost`, next to XLA's own `cost_analysis()`), the ratio to
the dense conv, which implementation "auto" runs, and the relative difference
between `conv(x, f)` and the dense convolution with `f.to_dense()`.

Run: `python examples/layer_costs.py` (`--help` for the flags).
"""

import argparse

import jax
import jax.numpy as jnp
from jax import lax

import jaxfactor


def xla_flops(kernel, x):
  """XLA's FLOP count of `jaxfactor.conv(x, kernel)`.

  On CPU, depthwise stages run as a compiled kernel, a custom call whose
  arithmetic `cost_analysis()` cannot see. A program serialized with
  `jax.export` runs them as XLA's grouped convolution instead (the rest of
  the program is the same), which XLA counts as `jaxfactor.cost` counts the
  compiled kernel: a multiply-add per product of a weight and real input.
  """
  exported = jax.export.export(jax.jit(jaxfactor.conv))(x, kernel)
  compiled = jax.jit(exported.call).lower(x, kernel).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return int(analysis.get("flops", 0))


def build_formats(key, channels, features, window):
  keys = iter(jax.random.split(key, 16))

  def normal(*shape):
    return jax.random.normal(next(keys), shape, jnp.float32) / shape[0] ** 0.5

  c, f, (kh, kw) = channels, features, window
  return {
    "DepthwiseSeparable(m=1)": jaxfactor.DepthwiseSeparable(
      normal(kh, kw, 1, c), normal(c, f)
    ),
    f"SpatiallySeparable(R={f // 2})": jaxfactor.SpatiallySeparable(
      (normal(kh, c, f // 2), normal(kw, f // 2, f))
    ),
    f"LowRank(R={f // 4})": jaxfactor.LowRank(
      normal(kh, kw, c, f // 4), normal(f // 4, f)
    ),
    f"Tucker(R={c // 4},{f // 4})": jaxfactor.Tucker(
      normal(c, c // 4), normal(kh, kw, c // 4, f // 4), normal(f // 4, f)
    ),
    f"CP(R={f // 2})": jaxfactor.CP(
      normal(c, f // 2),
      (normal(kh, f // 2), normal(kw, f // 2)),
      normal(f // 2, f),
    ),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--channels", type=int, default=128)
  parser.add_argument("--features", type=int, default=128)
  parser.add_argument("--size", type=int, default=28, help="height = width")
  parser.add_argument("--batch", type=int, default=1)
  args = parser.parse_args()
  if min(args.channels, args.features) < 4:
    parser.error(
      "--channels and --features must be at least 4 (the"
      " formats' ranks are a quarter of them)"
    )

  key_x, key_k, key_f = jax.random.split(jax.random.key(0), 3)
  shape = (args.batch, args.size, args.size, args.channels)
  x = jax.random.normal(key_x, shape, jnp.float32)
  dense = jax.random.normal(
    key_k, (3, 3, args.channels, args.features), jnp.float32
  )
  base = jaxfactor.cost(dense, shape)
  print(
    f"3x3 conv, {args.channels} -> {args.features} channels, input"
    f" {shape}, padding SAME, float32, backend {jax.default_backend()}\n"
  )
  header = (
    f"{'kernel':<26} {'params':>9} {'x fewer':>8} {'MFLOPs':>9}"
    f" {'x fewer':>8} {'XLA/cost':>8} {'auto runs':>14}"
    f" {'rel. diff':>10}"
  )
  print(header)
  print("-" * len(header))
  print(
    f"{'dense':<26} {base.params:>9,} {1:>8.2f} {base.flops / 1e6:>9.1f}"
    f" {1:>8.2f} {xla_flops(dense, x) / base.flops:>8.3f}"
    f" {'-':>14} {'-':>10}"
  )
  exact_conv = jax.jit(
    lambda x, kernel: jaxfactor.conv(x, kernel, precision=lax.Precision.HIGHEST)
  )
  worst = 0.0
  for name, fmt in build_formats(
    key_f, args.channels, args.features, (3, 3)
  ).items():
    c = jaxfactor.cost(fmt, shape)
    factorized = jaxfactor.cost(fmt, shape, implementation="factorized")
    chosen = "factorized" if c.flops == factorized.flops else "reconstructed"
    y = exact_conv(x, fmt)
    reference = exact_conv(x, fmt.to_dense())
    diff = float(jnp.linalg.norm(y - reference) / jnp.linalg.norm(reference))
    worst = max(worst, diff)
    print(
      f"{name:<26} {c.params:>9,} {base.params / c.params:>8.2f}"
      f" {c.flops / 1e6:>9.1f} {base.flops / c.flops:>8.2f}"
      f" {xla_flops(fmt, x) / c.flops:>8.3f} {chosen:>14}"
      f" {diff:>10.1e}"
    )
  print(
    "\n'rel. diff': ||conv(x, f) - conv(x, f.to_dense())|| / ||...||;"
    " 'XLA/cost': XLA's cost_analysis() FLOPs of the jitted conv over"
    " jaxfactor.cost (XLA counts the program exported with jax.export,"
    " whose depthwise stages are grouped convolutions: it cannot count"
    " into the compiled CPU depthwise kernel's custom call)."
  )
  if worst > 1e-5:
    raise SystemExit(f"outputs disagree: worst relative difference {worst:.1e}")
  print(f"All formats agree with their dense kernels (worst {worst:.1e}).")


if __name__ == "__main__":
  main()
