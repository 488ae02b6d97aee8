"""Shared test helpers: random operands, independent oracles, tolerances.

The oracles here do not use jaxfactor's code: Flax's `nn.Conv` and
`lax.conv_general_dilated` on a dense kernel, a padding resolver written
from Flax's definitions, the dense kernel from each format's formula in
numpy, and brute-force counts of the (output, tap) pairs that read input.
"""

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

import jaxfactor
from jaxfactor import _native

FORMATS = (
  "depthwise_separable",
  "spatially_separable",
  "low_rank",
  "tucker",
  "cp",
  "tensor_train",
)
# Every kind of kernel `conv` takes: the formats and a dense HWIO kernel.
KERNELS = (*FORMATS, "dense")

# Non-square windows, so that a transposed axis cannot go unnoticed.
WINDOWS = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}

# Every padding form `conv` takes ("pairs": one int or (low, high) per axis).
PADDINGS = (
  "SAME",
  "SAME_LOWER",
  "VALID",
  "CIRCULAR",
  "REFLECT",
  "CAUSAL",
  2,
  "pairs",
)
# Strides and dilation: 1, the same on every axis, or one per axis (values
# differ between axes to catch an axis mix-up).
STRIDES = ("1", "2", "per_axis")
BATCHES = ((), (3,), (2, 3), (0,))
DEPTHWISE_LOWERINGS = ("native", "shift_add", "grouped")

# Tolerances, in one place (the jax test suite's own tables).
#
# Forward: the relative error of a result against an oracle computed in
# float64 from the same (rounded) operands. A convolution sums up to a few
# hundred products per output over a chain of up to four stages:
# * float64: unit roundoff 1.1e-16, so ~1e-14 at worst; 1e-12.
# * float32: unit roundoff 6e-8, ~1e-6 over the chain; 1e-5.
# * float16: unit roundoff 2**-11 = 4.9e-4, stage outputs rounded; 5e-3.
# * bfloat16: unit roundoff 2**-8 = 3.9e-3, the inputs of each stage
#   rounded (up to four times in a chain); 2e-2.
RTOL = {
  jnp.dtype(jnp.float64): 1e-12,
  jnp.dtype(jnp.float32): 1e-5,
  jnp.dtype(jnp.float16): 5e-3,
  jnp.dtype(jnp.bfloat16): 2e-2,
}
# A 16-bit result computed in float32 and rounded once is within the unit
# roundoff u = 2**-p of the exact result of its 16-bit operands, element by
# element (p = 11 significant bits for float16, 8 for bfloat16), so within u
# norm-wise; the float32 sums add ~1e-7. Measured: one rounding ~0.45 u,
# while summing 64 products in 16 bits gives ~2.1 u.
ROUNDED_ONCE = {
  jnp.dtype(jnp.float16): 2.0**-11,
  jnp.dtype(jnp.bfloat16): 2.0**-8,
}
# Gradients (`jax.test_util.check_grads`): f32 2e-3, f64 1e-5.
GRAD_TOL = {jnp.dtype(jnp.float64): 1e-5, jnp.dtype(jnp.float32): 2e-3}


def rtol(dtype):
  return RTOL[jnp.dtype(dtype)]


needs_native = pytest.mark.skipif(
  not _native.available(),
  reason=f"native depthwise kernel unavailable: {_native.error()}",
)


def skip_unless_available(lowering):
  """Skips a case that forces the native kernel where it did not build."""
  if lowering == "native" and not _native.available():
    pytest.skip(f"native depthwise kernel unavailable: {_native.error()}")


# --- random operands ----------------------------------------------------------


# Operands are made and cast in numpy: an eager cast is one more compiled
# program per shape, and `forced` clears JAX's caches.


def random_input(shape, *, seed=1, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape).astype(jnp.dtype(dtype)))


def random_format(
  name,
  window,
  in_features,
  out_features,
  *,
  seed=0,
  dtype=jnp.float64,
  ranks=None,
):
  """A format with standard-normal factors, given window and channels.

  `ranks`: the channel multiplier (DepthwiseSeparable), the inner ranks
  (SpatiallySeparable), the rank (LowRank, CP), `(in_rank, out_rank)`
  (Tucker) or the TT ranks `(R_0, R_1)` (TensorTrain, two cores over the
  modes `split(C)` and `split(F)`).
  """
  rng = np.random.default_rng(seed)
  n, c, f = len(window), in_features, out_features

  def r(*shape):
    return jnp.asarray(rng.standard_normal(shape).astype(jnp.dtype(dtype)))

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
    return jaxfactor.CP(
      r(c, rank), tuple(r(k, rank) for k in window), r(rank, f)
    )
  if name == "tensor_train":
    r0, r1 = ranks or (2, 3)
    (c1, c2), (f1, f2) = split(c), split(f)
    return jaxfactor.TensorTrain(
      r(*window, r0), (r(r0, c1, f1, r1), r(r1, c2, f2, 1))
    )
  raise ValueError(name)


def split(n):
  """`n` as two modes `(n / p, p)` for its smallest prime factor `p` (a
  prime `n` as `(n, 1)`)."""
  p = next((p for p in range(2, n) if n % p == 0), n)
  return (n // p, p) if p < n else (n, 1)


def random_kernel(name, window, in_features, out_features, **kwargs):
  """`random_format`, or a dense `[*window, C, F]` kernel for "dense"."""
  if name == "dense":
    return random_input(
      (*window, in_features, out_features),
      seed=kwargs.get("seed", 0),
      dtype=kwargs.get("dtype", jnp.float64),
    )
  return random_format(name, window, in_features, out_features, **kwargs)


def dense(kernel):
  """The dense kernel of a format (a dense kernel is its own)."""
  if isinstance(kernel, jaxfactor.Format):
    return jax.jit(lambda kernel: kernel.to_dense())(kernel)
  return kernel


def cast(tree, dtype):
  return jax.tree.map(
    lambda a: jnp.asarray(np.asarray(a).astype(jnp.dtype(dtype))), tree
  )


def spatial_input_shape(window, batch=(2,), channels=3, extra=4):
  """Spatial sizes a few taps larger than the window (odd and even)."""
  return (*batch, *(k + extra + i for i, k in enumerate(window)), channels)


def geometry(case, n):
  """`strides`, `dilation` and `padding` keywords for a sweep case."""
  per_axis = {"strides": (2, 1, 3), "dilation": (1, 2, 1)}
  kwargs = {}
  for name in ("strides", "dilation"):
    value = case.get(name, "1")
    kwargs[name] = {"1": 1, "2": 2, "per_axis": per_axis[name][:n]}[value]
  padding = case.get("padding", "SAME")
  if padding == "pairs":  # a pair, an int and a pair
    padding = ((2, 0), 1, (1, 3))[:n]
  kwargs["padding"] = padding
  return kwargs


# --- oracles ------------------------------------------------------------------


def flax_conv(
  x,
  dense_kernel,
  *,
  strides=1,
  padding="SAME",
  dilation=1,
  feature_group_count=1,
):
  """Flax's own `nn.Conv` (no bias) with a given dense kernel, jitted."""
  window = dense_kernel.shape[:-2]
  layer = nn.Conv(
    features=dense_kernel.shape[-1],
    kernel_size=window,
    strides=strides,
    padding=padding,
    kernel_dilation=dilation,
    feature_group_count=feature_group_count,
    use_bias=False,
    precision=lax.Precision.HIGHEST,
  )
  return jax.jit(layer.apply)({"params": {"kernel": dense_kernel}}, x)


def explicit_padding(padding, spatial, window, strides, dilation):
  """`(pads, mode)`: one `(low, high)` per axis and a `np.pad` mode.

  Written from the definitions Flax's `nn.Conv` documents: "SAME" pads so
  that `out = ceil(n / s)`, the odd element at the end ("SAME_LOWER": at the
  start); "CIRCULAR" and "REFLECT" pad `((k-1)//2, k//2)` (dilated window)
  with data; "CAUSAL" pads `k - 1` in front.
  """
  n = len(window)

  def per_axis(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n

  strides, dilation = per_axis(strides), per_axis(dilation)
  dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
  if padding in ("SAME", "SAME_LOWER"):
    pads = []
    for size, k, s in zip(spatial, dilated, strides):
      total = max((-(-size // s) - 1) * s + k - size, 0)
      small, large = total // 2, total - total // 2
      pads.append((small, large) if padding == "SAME" else (large, small))
    return pads, "constant"
  if padding == "VALID":
    return [(0, 0)] * n, "constant"
  if padding in ("CIRCULAR", "REFLECT"):
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    return [((k - 1) // 2, k // 2) for k in dilated], mode
  if padding == "CAUSAL":
    return [(dilated[0] - 1, 0)], "constant"
  if isinstance(padding, int):
    return [(padding, padding)] * n, "constant"
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding], (
    "constant"
  )


def lax_conv(x, dense_kernel, *, strides=1, padding="SAME", dilation=1):
  """`lax.conv_general_dilated` on `x` padded by `explicit_padding`.

  `x` has one batch axis. Runs under `jax.jit` too (the padding is static).
  """
  n = dense_kernel.ndim - 2
  pads, mode = explicit_padding(
    padding, x.shape[1:-1], dense_kernel.shape[:-2], strides, dilation
  )
  if mode != "constant":
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=mode)
    pads = [(0, 0)] * n
  strides = strides if isinstance(strides, tuple) else (strides,) * n
  dilation = dilation if isinstance(dilation, tuple) else (dilation,) * n
  return lax.conv_general_dilated(
    x,
    dense_kernel,
    strides,
    pads,
    rhs_dilation=dilation,
    dimension_numbers=lax.conv_dimension_numbers(
      x.shape,
      dense_kernel.shape,
      ("N" + "DHW"[-n:] + "C", "DHW"[-n:] + "IO", "N" + "DHW"[-n:] + "C"),
    ),
    precision=lax.Precision.HIGHEST,
  )


def numpy_depthwise(x, w, cotangent, *, strides, pads, dilation):
  """A depthwise conv (multiplier 1, zero padding) and its two gradients.

  `x [B, *spatial, C]`, `w [*window, C]`; returns `(y, dx, dw)` in float64
  numpy, tap by tap: `y` sums `w[tap] * x[the positions tap reads]`, and
  the gradients are that sum's transposes at `cotangent`. A negative pad
  crops, as in `lax`.
  """
  x, w, cotangent = (np.asarray(a, np.float64) for a in (x, w, cotangent))
  n = x.ndim - 2
  grown = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
  padded = np.pad(x, [(0, 0), *grown, (0, 0)])
  dx = np.zeros_like(padded)
  crop = (
    slice(None),
    *(
      slice(max(-lo, 0), size - max(-hi, 0))
      for (lo, hi), size in zip(pads, padded.shape[1:-1])
    ),
  )
  padded, dx_view = padded[crop], dx[crop]  # views: dx_view writes into dx
  out = [
    (padded.shape[i + 1] - (w.shape[i] - 1) * dilation[i] - 1) // strides[i] + 1
    for i in range(n)
  ]
  y = np.zeros((x.shape[0], *out, x.shape[-1]))
  dw = np.zeros_like(w)
  for tap in np.ndindex(*w.shape[:-1]):
    read = (
      slice(None),
      *(
        slice(t * d, t * d + (o - 1) * s + 1, s)
        for t, d, o, s in zip(tap, dilation, out, strides)
      ),
    )
    y += padded[read] * w[tap]
    dx_view[read] += cotangent * w[tap]
    dw[tap] = np.sum(padded[read] * cotangent, axis=tuple(range(n + 1)))
  inside = (
    slice(None),
    *(slice(lo, lo + size) for (lo, _), size in zip(grown, x.shape[1:-1])),
  )
  return y, dx[inside], dw


def dense_from_formula(fmt):
  """The dense kernel from each format's formula, in numpy (independent)."""
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
  if isinstance(fmt, jaxfactor.TensorTrain):
    # K[w, c_1..c_d, f_1..f_d] = S[w, r_0] G_1[r_0, c_1, f_1, r_1] ...;
    # einsum labels: w 0, r_i 1 + i, c_i 2 + d + i, f_i 2 + 2d + i.
    s, *cores = leaves
    d, window = len(cores), s.shape[:-1]
    operands = [s.reshape(-1, s.shape[-1]), [0, 1]]
    for i, core in enumerate(cores):
      operands += [core, [1 + i, 2 + d + i, 2 + 2 * d + i, 2 + i]]
    out = [0, *range(2 + d, 2 + 3 * d), 1 + d]
    kernel = np.einsum(*operands, out)
    c = math.prod(core.shape[1] for core in cores)
    return kernel.reshape(*window, c, -1)
  raise TypeError(type(fmt))


def relative_error(actual, expected):
  """`|actual - expected| / |expected|` (Frobenius norms), in float64."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return np.linalg.norm(actual - expected) / max(
    np.linalg.norm(expected), 1e-300
  )


# --- counting -----------------------------------------------------------------


def output_size(size, k, stride, dilation, pad):
  return (size + pad[0] + pad[1] - (k - 1) * dilation - 1) // stride + 1


def in_range_pairs(size, k, stride, dilation, pad):
  """(output, tap) pairs along one axis whose input position is real input.

  By brute force: every output position against every tap.
  """
  out = np.arange(output_size(size, k, stride, dilation, pad))[:, None]
  position = out * stride + np.arange(k)[None, :] * dilation - pad[0]
  return int(np.count_nonzero((position >= 0) & (position < size)))


def reading_taps(size, k, stride, dilation, pad):
  """Taps along one axis that read real input for at least one output."""
  out = np.arange(output_size(size, k, stride, dilation, pad))[:, None]
  position = out * stride + np.arange(k)[None, :] * dilation - pad[0]
  return int(np.count_nonzero(((position >= 0) & (position < size)).any(0)))


def subprocess_env(*, fast_compile=False):
  """The environment for a Python subprocess run as a user runs it: XLA_FLAGS
  without a simulated device count, which a script sets itself, and without
  the suite's compile-time flags (conftest.py: a script runs its programs
  more than it compiles them, and runs them faster without), unless
  `fast_compile` (the two-process example, which spends its time compiling:
  14 s with them against 43 s without, measured on a warm cache); and the
  suite's persistent compilation cache."""
  from conftest import FAST_COMPILE_FLAGS  # pylint: disable=g-import-not-at-top

  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
    flag
    for flag in env.get("XLA_FLAGS", "").split()
    if (fast_compile or flag not in FAST_COMPILE_FLAGS)
    and not flag.startswith("--xla_force_host_platform_device_count")
  )
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env.update(
      JAX_COMPILATION_CACHE_DIR=cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return env


def xla_flops(fn, *args):
  """XLA:CPU's own FLOP count (`cost_analysis()`) of `jax.jit(fn)(*args)`.

  Only the canaries in test_cost.py use it: it tracks what jaxlib's cost
  model counts, which a jaxlib upgrade may change.
  """
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):  # older JAX returned one dict per device
    analysis = analysis[0]
  return analysis.get("flops", 0.0)


# --- pairwise cases -----------------------------------------------------------


def all_pairs(options, valid=lambda case: True):
  """Cases that hold every pair of values of any two options (greedy).

  `options` maps each option to its values. `valid(case)` says whether a
  partial case (a dict of some of the options) can occur; it must stay
  False once False (adding options cannot make a case possible again). Pairs
  that no valid case holds are not required. Deterministic.
  """
  names = list(options)
  indices = {name: range(len(values)) for name, values in options.items()}

  def values(case):
    return {name: options[name][i] for name, i in case.items()}

  def pairs(case):
    return {
      ((a, case[a]), (b, case[b]))
      for a, b in itertools.combinations(names, 2)
      if a in case and b in case
    }

  uncovered = {
    ((a, i), (b, j))
    for a, b in itertools.combinations(names, 2)
    for i in indices[a]
    for j in indices[b]
    if valid(values({a: i, b: j}))
  }
  cases = []
  while uncovered:
    (a, i), (b, j) = min(
      uncovered, key=lambda p: (names.index(p[0][0]), names.index(p[1][0]), p)
    )
    case = {a: i, b: j}
    for name in names:
      if name not in case:
        choices = [v for v in indices[name] if valid(values({**case, name: v}))]
        case[name] = max(
          choices, key=lambda v: len(pairs({**case, name: v}) & uncovered)
        )
    uncovered -= pairs(case)
    cases.append(values(case))
  return cases


def case_id(case):
  """A short test id: the values in option order."""
  return "-".join(str(v).replace(" ", "") for v in case.values())
