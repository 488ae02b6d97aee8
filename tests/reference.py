"""Shared test helpers: random formats and the independent Flax oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

import jaxfactor

FORMATS = ("depthwise_separable", "spatially_separable", "low_rank", "tucker", "cp")

# Non-square windows, so that a transposed axis cannot go unnoticed.
WINDOWS = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}

# Relative-error tolerances for `conv` against the dense reference, by dtype:
# float64 rounding over a few hundred terms is ~1e-15 relative; float32 with
# Precision.HIGHEST ~1e-7 (the bound is 1e-5).
RTOL = {jnp.float64: 1e-12, jnp.float32: 1e-5}


def xla_flops(fn, *args):
  """XLA:CPU's FLOP count of `jax.jit(fn)(*args)`, on any default backend.

  The oracle for `jaxfactor.cost` is XLA:CPU's `cost_analysis()`: XLA:GPU
  hands convolutions to cuDNN custom calls, which it does not count (it
  reports -1). So `args` (arrays or `jax.ShapeDtypeStruct`s) are placed on
  the CPU and the program is compiled there. The library's trace-time
  choices still follow the default backend, as `cost`'s do.
  """
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

  def place(a):
    if isinstance(a, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu)
    return jax.device_put(a, cpu)

  analysis = jax.jit(fn).lower(*jax.tree.map(place, args)).compile(
      ).cost_analysis()
  if isinstance(analysis, list):  # older JAX returned one dict per device
    analysis = analysis[0]
  return analysis.get("flops", 0.0)


def random_format(name, window, in_features, out_features, *, seed=0,
                  dtype=jnp.float64, ranks=None):
  """A format with standard-normal factors, given window and channels."""
  rng = np.random.default_rng(seed)
  n, c, f = len(window), in_features, out_features

  def r(*shape):
    return jnp.asarray(rng.standard_normal(shape), dtype=dtype)

  if name == "depthwise_separable":
    m = ranks or 2
    return jaxfactor.DepthwiseSeparable(
        r(*window, 1, c * m), r(c * m, f), channel_multiplier=m
    )
  if name == "spatially_separable":
    inner = ranks or tuple(range(4, 4 + n - 1))
    chain = (c, *inner, f)
    return jaxfactor.SpatiallySeparable(
        tuple(r(k, chain[i], chain[i + 1]) for i, k in enumerate(window))
    )
  if name == "low_rank":
    rank = ranks or 2
    return jaxfactor.LowRank(r(*window, c, rank), r(rank, f))
  if name == "tucker":
    a, b = ranks or (2, 3)
    return jaxfactor.Tucker(r(c, a), r(*window, a, b), r(b, f))
  if name == "cp":
    rank = ranks or 3
    return jaxfactor.CP(r(c, rank), tuple(r(k, rank) for k in window),
                        r(rank, f))
  raise ValueError(name)


def dense_from_formula(fmt):
  """The dense kernel from DESIGN.md's formulas, in numpy (independent)."""
  leaves = [np.asarray(v, np.float64) for v in jax.tree.leaves(fmt)]
  if isinstance(fmt, jaxfactor.DepthwiseSeparable):
    d, p = leaves
    m = fmt.channel_multiplier
    window, c = d.shape[:-2], d.shape[-1] // m
    kernel = np.zeros((*window, c, p.shape[1]))
    for ch in range(c):
      for j in range(m):
        kernel[..., ch, :] += d[..., 0, ch * m + j, None] * p[ch * m + j]
    return kernel
  if isinstance(fmt, jaxfactor.SpatiallySeparable):
    kernel = leaves[0]  # [k_0, C, R_1]
    for factor in leaves[1:]:
      kernel = np.tensordot(kernel, factor, axes=([-1], [1]))  # [..., C, k, R]
      kernel = np.moveaxis(kernel, -2, -3)
    return kernel
  if isinstance(fmt, jaxfactor.LowRank):
    s, p = leaves
    return np.tensordot(s, p, axes=1)
  if isinstance(fmt, jaxfactor.Tucker):
    u, g, v = leaves
    return np.einsum("ca,...ab,bf->...cf", u, g, v)
  if isinstance(fmt, jaxfactor.CP):
    u, *spatial, v = leaves
    taps = spatial[0]
    for a in spatial[1:]:
      taps = np.einsum("...r,kr->...kr", taps, a)
    return np.einsum("cr,...r,rf->...cf", u, taps, v)
  raise TypeError(type(fmt))


def flax_conv(x, dense_kernel, *, strides=1, padding="SAME", dilation=1):
  """Flax's own `nn.Conv` (no bias) with a given dense kernel: the oracle."""
  window = dense_kernel.shape[:-2]
  layer = nn.Conv(
      features=dense_kernel.shape[-1],
      kernel_size=window,
      strides=strides,
      padding=padding,
      kernel_dilation=dilation,
      use_bias=False,
      precision=lax.Precision.HIGHEST,
  )
  return layer.apply({"params": {"kernel": dense_kernel}}, x)


def relative_error(actual, expected):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300)


def random_input(shape, *, seed=1, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape), dtype=dtype)


def spatial_input_shape(window, batch=(2,), channels=3, extra=4):
  """Spatial sizes a few taps larger than the window (odd and even)."""
  return (*batch, *(k + extra + i for i, k in enumerate(window)), channels)


def num_params(fmt):
  return sum(math.prod(l.shape) for l in jax.tree.leaves(fmt))
