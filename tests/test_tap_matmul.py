"""The tap matmul: a dense spatial stage as one matmul to every tap's output
and a shift-add, equal to XLA's convolution.

On the CPU `forced(tap_matmul=True)` runs every dense spatial stage with more
than one tap as a tap matmul; by itself the CPU does so where
`_tap_matmul.applies` (large layers), other platforms never.
"""

import functools
import math

import jax
import jax.numpy as jnp
import pytest
import reference
from jax import export
from jax import lax
from jax.test_util import check_grads
from reference import BATCHES
from reference import PADDINGS
from reference import STRIDES
from reference import WINDOWS
from reference import case_id
from reference import flax_conv
from reference import random_input
from reference import relative_error
from reference import rtol

import jaxfactor
from jaxfactor import _geometry
from jaxfactor import _shift_add
from jaxfactor import _stages
from jaxfactor import _tap_matmul
from jaxfactor._lowering import forced

F64 = jnp.float64
# The kernels with dense spatial stages ("dense": one stage).
SPATIAL = ("spatially_separable", "low_rank", "tucker", "dense")


def _uses_loop(fn, *args):
  jaxpr = str(jax.make_jaxpr(fn)(*args))
  return "while[" in jaxpr or "scan[" in jaxpr  # fori_loop lowers to scan


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it."""
  for equation in jaxpr.eqns:
    yield equation
    for param in equation.params.values():
      for value in param if isinstance(param, tuple) else (param,):
        inner = getattr(value, "jaxpr", value)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _equations(inner)


@pytest.fixture
def one_image_per_step(monkeypatch):
  """Every batch of >= 2 images takes the loop, one image per step."""
  monkeypatch.setattr(_tap_matmul, "CHUNK_BYTES", 1)


def _possible(case):
  return case.get("padding") != "CAUSAL" or case.get("n", 1) == 1


TAP_CASES = reference.all_pairs(
  {
    "kernel": SPATIAL,
    "padding": PADDINGS,
    "n": (1, 2, 3),
    "strides": STRIDES,
    "dilation": STRIDES,
    "batch": BATCHES,
  },
  _possible,
)


@pytest.mark.parametrize("case", TAP_CASES, ids=case_id)
def test_equals_flax_conv(one_image_per_step, case):
  """Every geometry: strides (the matmul then computes positions no output
  reads), dilation, every padding form, N = 1, 2, 3, batch axes."""
  n = case["n"]
  kernel = reference.random_kernel(case["kernel"], WINDOWS[n], 3, 5)
  x = random_input(
    reference.spatial_input_shape(WINDOWS[n], batch=case["batch"], extra=5)
  )
  kwargs = reference.geometry(case, n)
  fn = functools.partial(jaxfactor.conv, implementation="factorized", **kwargs)
  with forced(tap_matmul=True):
    actual = jax.jit(fn)(x, kernel)
    loop = _uses_loop(fn, x, kernel)
  expected = flax_conv(x, reference.dense(kernel), **kwargs)
  assert relative_error(actual, expected) < rtol(F64)
  assert loop == (math.prod(case["batch"]) >= 2)


@pytest.mark.parametrize("batch,chunk", [(2, 2), (6, 3), (7, 3)])
def test_batch_loop_and_remainder(monkeypatch, batch, chunk):
  """Steps of 3 images (one image's tap outputs are 7*6*9*4*8 bytes): one
  pass for 2 images, 2 steps for 6, 2 steps and a remainder of 1 for 7."""
  x = random_input((batch, 7, 6, 3))
  kernel = random_input((3, 3, 3, 4), seed=2)
  per_image = 7 * 6 * 9 * 4 * 8
  monkeypatch.setattr(_tap_matmul, "CHUNK_BYTES", 3 * per_image)
  assert _shift_add.chunk_size(batch, per_image, 1, 3 * per_image) == chunk
  with forced(tap_matmul=True):
    loop = _uses_loop(jaxfactor.conv, x, kernel)
    actual = jax.jit(jaxfactor.conv)(x, kernel)
  assert loop == (batch >= 2 * chunk)
  assert relative_error(actual, flax_conv(x, kernel)) < rtol(F64)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_check_grads(one_image_per_step, n):
  """Forward and reverse mode to order 2 (the JVP is the convolution's), in
  `x` and in the kernel: linear in each, so `eps=1` is exact."""
  window = WINDOWS[n]
  x = random_input(reference.spatial_input_shape(window, extra=2))
  kernel = random_input((*window, 3, 2), seed=2)
  conv = functools.partial(jaxfactor.conv, padding="SAME", dilation=2)
  tol = reference.GRAD_TOL[jnp.dtype(F64)]
  check = functools.partial(
    check_grads, order=2, modes=("fwd", "rev"), eps=1.0, atol=tol, rtol=tol
  )
  with forced(tap_matmul=True):
    assert _uses_loop(conv, x, kernel)
    check(jax.jit(lambda x: conv(x, kernel)), (x,))
    check(jax.jit(lambda kernel: conv(x, kernel)), (kernel,))


def test_jvp_in_one_argument_runs_one_convolution():
  """Zero tangents stay symbolic: no convolution of zeros."""
  x = random_input((2, 6, 5, 4))
  kernel = random_input((3, 3, 4, 2), seed=2)
  geometry = _geometry.resolve(
    "test", (6, 5), (3, 3), strides=1, padding="SAME", dilation=1
  )
  fn = functools.partial(
    _tap_matmul.tap_matmul,
    axes=(0, 1),
    geometry=geometry,
    precision=None,
    preferred=None,
  )
  for partial, primal in (
    (lambda x: fn(x, kernel), x),
    (lambda k: fn(x, k), kernel),
  ):
    jaxpr = jax.make_jaxpr(
      lambda p, partial=partial: jax.jvp(partial, (p,), (p,))
    )(primal)
    names = [e.primitive.name for e in _equations(jaxpr.jaxpr)]
    assert names.count("conv_general_dilated") == 1
  _, dy = jax.jvp(fn, (x, kernel), (x, kernel))
  # Bilinear: the derivative at (x, k) in direction (x, k) is 2 * (x * k).
  assert relative_error(dy, 2 * flax_conv(x, kernel)) < rtol(F64)


def test_vmap(one_image_per_step):
  x = random_input((3, 2, 6, 5, 4))
  kernel = random_input((3, 3, 4, 2), seed=2)
  fn = jax.jit(lambda x: jaxfactor.conv(x, kernel))
  with forced(tap_matmul=True):
    mapped = jax.jit(jax.vmap(fn))(x)
    flat = fn(x.reshape(6, 6, 5, 4))
  assert relative_error(mapped, flat.reshape(3, 2, 6, 5, 2)) < rtol(F64)


@pytest.mark.parametrize("preferred", [None, jnp.float32])
def test_bfloat16_sums_in_float32(preferred):
  """Tap outputs are summed in float32 and rounded once, as the convolution
  rounds its float32 accumulator once: against float64 on the same bfloat16
  values, one bfloat16 rounding of the output when it is kept in bfloat16,
  float32's error otherwise."""
  x = random_input((2, 8, 8, 16), dtype=jnp.bfloat16)
  kernel = reference.cast(
    random_input((3, 3, 16, 8), seed=2) / 12, jnp.bfloat16
  )
  expected = flax_conv(*reference.cast((x, kernel), F64))
  fn = functools.partial(jaxfactor.conv, preferred_element_type=preferred)
  with forced(tap_matmul=True):
    low = jax.jit(fn)(x, kernel)
  assert low.dtype == (preferred or jnp.bfloat16)
  bound = (
    reference.ROUNDED_ONCE[jnp.dtype(jnp.bfloat16)]
    if preferred is None
    else rtol(jnp.float32)
  )
  assert relative_error(low, expected) < bound


def test_precision_reaches_every_contraction():
  x = random_input((2, 6, 6, 8), dtype=jnp.float32)
  kernel = random_input((3, 3, 8, 4), seed=2, dtype=jnp.float32)
  fn = functools.partial(jaxfactor.conv, precision=lax.Precision.HIGHEST)
  with forced(tap_matmul=True):
    jaxpr = jax.make_jaxpr(fn)(x, kernel)
  contractions = [
    e
    for e in _equations(jaxpr.jaxpr)
    if e.primitive.name in ("dot_general", "conv_general_dilated")
  ]
  names = {e.primitive.name for e in contractions}
  assert names == {"dot_general", "conv_general_dilated"}  # CPU and GPU
  for equation in contractions:
    assert equation.params["precision"] == (lax.Precision.HIGHEST,) * 2


def test_every_tap_in_padding():
  """No tap reads input (all in the padding): zeros, as the conv."""
  x = random_input((2, 2, 2, 3))
  kernel = random_input((3, 3, 3, 2), seed=2)
  kwargs = dict(padding=((4, 4), (4, 4)), strides=20)
  with forced(tap_matmul=True):
    actual = jax.jit(functools.partial(jaxfactor.conv, **kwargs))(x, kernel)
  assert actual.shape == (2, 1, 1, 2)
  assert relative_error(actual, flax_conv(x, kernel, **kwargs)) == 0


def test_exports_with_a_symbolic_batch(one_image_per_step):
  """A symbolic batch takes one pass (no loop over an unknown batch)."""
  kernel = random_input((3, 3, 4, 2), seed=2)
  fn = jax.jit(lambda x: jaxfactor.conv(x, kernel))
  (b,) = export.symbolic_shape("b")
  with forced(tap_matmul=True):
    exported = export.export(fn)(
      jax.ShapeDtypeStruct((b, 6, 5, 4), jnp.float64)
    )
  text = exported.mlir_module()
  assert "stablehlo.while" not in text
  assert "stablehlo.convolution" not in text  # the tap matmul, not the conv
  x = random_input((3, 6, 5, 4))
  assert relative_error(exported.call(x), flax_conv(x, kernel)) < rtol(F64)


def _applies(shape, window, features, strides=1, dtype=jnp.float32):
  stage = _stages.SpatialConv(
    jax.ShapeDtypeStruct((*window, shape[-1], features), dtype),
    tuple(range(len(window))),
  )
  geometry = _geometry.resolve(
    "test", shape[1:-1], window, strides=strides, padding="SAME", dilation=1
  )
  return _tap_matmul.applies(stage, shape, geometry)


def test_where_the_cpu_picks_it():
  """Where `benchmarks/spatial.py` measured the tap matmul faster on CPU."""
  assert _applies((32, 56, 56, 128), (3, 3), 32)  # LowRank mb56's k x k stage
  assert _applies((32, 28, 28, 256), (3, 3), 64)
  assert _applies((32, 56, 56, 128), (3, 1), 64)  # SpatiallySeparable mb56
  assert _applies((32, 56, 56, 64), (1, 3), 128)  # <= 3 taps: wide is fine
  assert _applies((1, 28, 28, 128), (3, 3), 64)  # any batch
  assert not _applies((32, 56, 56, 128), (3, 3), 128)  # XLA's conv is fast
  assert not _applies((32, 28, 28, 128), (3, 3), 128)
  assert not _applies((32, 56, 56, 128), (3, 3), 32, strides=2)
  assert not _applies((32, 56, 56, 32), (3, 3), 32)  # too few channels
  assert not _applies((32, 28, 28, 64), (3, 3), 64)  # Tucker mb28's core
  assert _applies((32, 28, 28, 64), (1, 3), 64)  # 1-D: 64 channels suffice
  assert not _applies((32, 14, 14, 512), (3, 3), 64)  # small images
  assert not _applies((32, 56, 56, 128), (5, 5), 32)  # 10 MB of tap outputs
  assert not _applies((32, 56, 56, 128), (5, 5), 32, dtype=jnp.bfloat16)
  # Depthwise and 1x1 stages are never tap matmuls.
  geometry = _geometry.resolve(
    "test", (56, 56), (3, 3), strides=1, padding="SAME", dilation=1
  )
  depthwise = _stages.SpatialConv(jnp.ones((3, 3, 1, 64)), (0, 1), 64)
  pointwise = _stages.SpatialConv(jnp.ones((1, 1, 64, 8)), (0, 1))
  for stage in (depthwise, pointwise):
    assert not _tap_matmul.applies(stage, (2, 56, 56, 64), geometry)


def test_lowers_to_the_tap_matmul_on_cpu_only():
  """One jitted function: the CPU lowering runs the tap matmul where it
  applies, GPU and TPU lowerings XLA's convolution."""
  x = jnp.ones((2, 28, 28, 128), jnp.float32)
  kernel = jnp.ones((3, 3, 128, 16), jnp.float32)
  traced = jax.jit(jaxfactor.conv).trace(x, kernel)
  for platform, convolutions in (("cpu", 0), ("cuda", 1), ("tpu", 1)):
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert text.count("stablehlo.convolution") == convolutions, platform
