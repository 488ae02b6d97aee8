"""`spatial_lowering="tap_matmul"`: dense spatial stages as one matmul to
every tap's output and a shift-add, equal to XLA's convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax import lax
from jax.test_util import check_grads

import jaxfactor
from jaxfactor import _geometry
from jaxfactor import primitives
from reference import (RTOL, WINDOWS, flax_conv, random_format, random_input,
                       relative_error, spatial_input_shape, xla_flops)
from test_conv import BATCHES, GEOMETRIES, _cases, _padding

# The formats with dense spatial stages; "dense" is a format's `to_dense()`,
# run as one dense stage ("reconstructed").
SPATIAL = ("spatially_separable", "low_rank", "tucker", "dense")


def _uses_loop(fn, *args):
  jaxpr = str(jax.make_jaxpr(fn)(*args))
  return "while" in jaxpr or "scan" in jaxpr  # fori_loop lowers to scan


@pytest.fixture
def one_image_per_step(monkeypatch):
  """Every batch of >= 2 images takes the loop, one image per step."""
  monkeypatch.setattr(primitives, "_TAP_CHUNK_BYTES", 1)


@pytest.mark.parametrize("name,n,padding,geometry", list(_cases(SPATIAL)))
def test_equals_flax_dense_conv(one_image_per_step, name, n, padding,
                                geometry):
  """Every geometry: strides (the matmul then computes positions no output
  reads), dilation, every padding mode, N = 1, 2, 3, leading batch axes."""
  window = WINDOWS[n]
  fmt = random_format("low_rank" if name == "dense" else name, window, 3, 5)
  strides, dilation = GEOMETRIES[geometry](n)
  kwargs = dict(strides=strides, padding=_padding(padding, n),
                dilation=dilation)
  batch = BATCHES[(len(name) + n) % len(BATCHES)]
  x = random_input(spatial_input_shape(window, batch=batch, extra=5))
  implementation = "reconstructed" if name == "dense" else "factorized"

  def fn(x, f):
    return jaxfactor.conv(x, f, implementation=implementation,
                          spatial_lowering="tap_matmul", **kwargs)

  actual = jax.jit(fn)(x, fmt)
  expected = flax_conv(x, fmt.to_dense(), **kwargs)
  assert relative_error(actual, expected) < RTOL[jnp.float64]
  assert _uses_loop(fn, x, fmt) == (int(np.prod(batch)) >= 2)


@pytest.mark.parametrize("batch,chunk", [(2, 2), (6, 3), (7, 3)])
def test_batch_loop_and_remainder(monkeypatch, batch, chunk):
  """Steps of 3 images (one image's tap outputs are 7*6*9*4*8 bytes): one
  pass for 2 images, 2 steps for 6, 2 steps and a remainder of 1 for 7."""
  x = random_input((batch, 7, 6, 3))
  kernel = random_input((3, 3, 3, 4), seed=2)
  per_image = 7 * 6 * 9 * 4 * 8
  monkeypatch.setattr(primitives, "_TAP_CHUNK_BYTES", 3 * per_image)
  assert primitives._chunk_size(batch, per_image, 1, 3 * per_image) == chunk

  def fn(x, k):
    return jaxfactor.conv(x, k, spatial_lowering="tap_matmul")

  assert _uses_loop(fn, x, kernel) == (batch >= 2 * chunk)
  assert relative_error(fn(x, kernel), flax_conv(x, kernel)) < RTOL[
      jnp.float64]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_grads(one_image_per_step, n):
  """Forward and reverse mode to order 2 (the JVP is the convolution's)."""
  window = WINDOWS[n]
  x = random_input(spatial_input_shape(window, batch=(2,), extra=2))
  kernel = random_input((*window, 3, 2), seed=2)
  fn = lambda x, k: jaxfactor.conv(x, k, padding="SAME", dilation=2,
                                   spatial_lowering="tap_matmul")
  assert _uses_loop(fn, x, kernel)
  check_grads(fn, (x, kernel), order=2, modes=("fwd", "rev"))


def test_jvp_wrt_one_argument_runs_one_convolution():
  """Zero tangents stay symbolic: no convolution of zeros."""
  x = random_input((2, 6, 5, 4))
  kernel = random_input((3, 3, 4, 2), seed=2)
  fn = lambda x, k: jaxfactor.conv(x, k, spatial_lowering="tap_matmul")
  for partial, primal in ((lambda x: fn(x, kernel), x),
                          (lambda k: fn(x, k), kernel)):
    jaxpr = str(jax.make_jaxpr(
        lambda p, partial=partial: jax.jvp(partial, (p,), (p,)))(primal))
    assert jaxpr.count("conv_general_dilated") == 1
  _, dy = jax.jvp(fn, (x, kernel), (x, kernel))
  # Linear in each argument: d(x * k) in direction (x, k) is 2 * (x * k).
  assert relative_error(dy, 2 * flax_conv(x, kernel)) < RTOL[jnp.float64]


def test_grads_equal_the_convolutions(one_image_per_step):
  x = random_input((3, 6, 5, 4))
  fmt = random_format("low_rank", (3, 3), 4, 6)
  cot = random_input((3, 6, 5, 6), seed=3)

  def grads(lowering):
    fn = lambda x, f: jaxfactor.conv(x, f, implementation="factorized",
                                     spatial_lowering=lowering)
    return jax.vjp(fn, x, fmt)[1](cot)

  for actual, expected in zip(jax.tree.leaves(grads("tap_matmul")),
                              jax.tree.leaves(grads("conv"))):
    assert relative_error(actual, expected) < RTOL[jnp.float64]


def test_vmap(one_image_per_step):
  x = random_input((3, 2, 6, 5, 4))
  kernel = random_input((3, 3, 4, 2), seed=2)
  fn = lambda x: jaxfactor.conv(x, kernel, spatial_lowering="tap_matmul")
  assert relative_error(jax.vmap(fn)(x), fn(x.reshape(6, 6, 5, 4)).reshape(
      3, 2, 6, 5, 2)) < RTOL[jnp.float64]


@pytest.mark.parametrize("preferred", [None, jnp.float32])
def test_bfloat16_accumulates_in_float32(preferred):
  """Tap outputs are summed in float32 and rounded once, as the convolution
  rounds its float32 accumulator once: against the float64 conv of the same
  bfloat16 values, only float32 summation error (~1e-7) remains, and one
  bfloat16 rounding of the output (2**-9) when it is kept in bfloat16."""
  x = random_input((2, 8, 8, 16)).astype(jnp.bfloat16)
  kernel = (random_input((3, 3, 16, 8), seed=2) / 12).astype(jnp.bfloat16)
  expected = flax_conv(x.astype(jnp.float64), kernel.astype(jnp.float64))
  fn = lambda x, k: jaxfactor.conv(x, k, spatial_lowering="tap_matmul",
                                   preferred_element_type=preferred)
  low = fn(x, kernel)
  assert low.dtype == (preferred or jnp.bfloat16)
  tolerance = 4e-3 if preferred is None else 1e-5
  assert relative_error(low.astype(jnp.float64), expected) < tolerance
  assert "preferred_element_type=float32" in str(jax.make_jaxpr(fn)(x, kernel))


def test_flops_match_xla_and_scale_with_the_batch(one_image_per_step):
  """A single pass is counted as XLA counts it; XLA counts a loop's body
  once, `cost` every step."""
  kernel = jnp.ones((3, 2, 4, 5), jnp.float32)
  one = jnp.ones((1, 7, 6, 4), jnp.float32)
  count = lambda shape: jaxfactor.cost(kernel, shape, padding=1,
                                       spatial_lowering="tap_matmul").flops
  assert count(one.shape) == xla_flops(lambda x: jaxfactor.conv(
      x, kernel, padding=1, spatial_lowering="tap_matmul"), one)
  # 2 * 7 * 6 positions * 4 * 6 taps * 5 + 5 adds per output element.
  taps = 6
  out = 7 * 7  # (7 + 2 - 3 + 1) x (6 + 2 - 2 + 1)
  assert count(one.shape) == 2 * 42 * 4 * taps * 5 + (taps - 1) * out * 5
  assert count((3, 7, 6, 4)) == 3 * count(one.shape)


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT", 1])
def test_flops_of_one_dimensional_stages_match_xla(padding):
  """SpatiallySeparable's stages pad (with data) only their own axis."""
  fmt = jax.tree.map(lambda a: a.astype(jnp.float32),
                     random_format("spatially_separable", (3, 3), 4, 5))
  x = jnp.ones((1, 7, 6, 4), jnp.float32)
  kwargs = dict(padding=padding, implementation="factorized",
                spatial_lowering="tap_matmul")
  assert jaxfactor.cost(fmt, x.shape, **kwargs).flops == xla_flops(
      lambda x: jaxfactor.conv(x, fmt, **kwargs), x)


def _auto(shape, window, features, strides=1, dtype=jnp.float32):
  stage = primitives.SpatialConv(
      jax.ShapeDtypeStruct((*window, shape[-1], features), dtype),
      tuple(range(len(window))))
  geometry = _geometry.resolve("test", shape[1:-1], window, strides=strides,
                               padding="SAME", dilation=1)
  return primitives.uses_tap_matmul(stage, shape, geometry, "auto")


def test_auto_rule():
  """Where `benchmarks/spatial.py` measured the tap matmul faster on CPU."""
  assert _auto((32, 56, 56, 128), (3, 3), 32)  # LowRank mb56's k x k stage
  assert _auto((32, 28, 28, 256), (3, 3), 64)
  assert _auto((32, 56, 56, 128), (3, 1), 64)  # SpatiallySeparable mb56
  assert _auto((32, 56, 56, 64), (1, 3), 128)  # <= 3 taps: wide is fine
  assert _auto((1, 28, 28, 128), (3, 3), 64)  # any batch
  assert not _auto((32, 56, 56, 128), (3, 3), 128)  # XLA's conv is fast
  assert not _auto((32, 28, 28, 128), (3, 3), 128)
  assert not _auto((32, 56, 56, 128), (3, 3), 32, strides=2)
  assert not _auto((32, 56, 56, 32), (3, 3), 32)  # too few channels
  assert not _auto((32, 28, 28, 64), (3, 3), 64)  # Tucker mb28's core
  assert _auto((32, 28, 28, 64), (1, 3), 64)  # 1-D: 64 channels suffice
  assert not _auto((32, 14, 14, 512), (3, 3), 64)  # small images
  assert not _auto((32, 56, 56, 128), (5, 5), 32)  # 10 MB of tap outputs
  assert not _auto((32, 56, 56, 128), (5, 5), 32, dtype=jnp.bfloat16)
  # Depthwise and 1x1 stages are never tap matmuls.
  depthwise = primitives.SpatialConv(jnp.ones((3, 3, 1, 64)), (0, 1), 64)
  geometry = _geometry.resolve("test", (56, 56), (3, 3), strides=1,
                               padding="SAME", dilation=1)
  assert not primitives.uses_tap_matmul(depthwise, (2, 56, 56, 64), geometry,
                                        "tap_matmul")
  pointwise = primitives.SpatialConv(jnp.ones((1, 1, 64, 8)), (0, 1))
  assert not primitives.uses_tap_matmul(pointwise, (2, 56, 56, 64), geometry,
                                        "tap_matmul")


def test_auto_runs_the_tap_matmul_on_cpu_only(monkeypatch):
  x = jnp.ones((2, 28, 28, 128), jnp.float32)
  kernel = jnp.ones((3, 3, 128, 16), jnp.float32)

  def lowered(lowering):
    return str(jax.make_jaxpr(lambda x: jaxfactor.conv(
        x, kernel, spatial_lowering=lowering))(x))

  # The rule follows `jax.default_backend()` at trace time.
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert "conv_general_dilated" not in lowered("auto")
  assert "conv_general_dilated" in lowered("conv")
  assert jaxfactor.cost(kernel, x.shape).flops == jaxfactor.cost(
      kernel, x.shape, spatial_lowering="tap_matmul").flops
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert primitives.resolve_spatial_lowering("t", "auto") == "conv"
  assert "conv_general_dilated" in lowered("auto")


def test_exports_with_a_symbolic_batch(one_image_per_step):
  """A symbolic batch takes one pass (no loop over an unknown batch)."""
  kernel = random_input((3, 3, 4, 2), seed=2)
  fn = lambda x: jaxfactor.conv(x, kernel, spatial_lowering="tap_matmul")
  (b,) = export.symbolic_shape("b")
  exported = export.export(jax.jit(fn))(
      jax.ShapeDtypeStruct((b, 6, 5, 4), jnp.float64))
  assert "while" not in exported.mlir_module()
  x = random_input((3, 6, 5, 4))
  assert relative_error(exported.call(x), flax_conv(x, kernel)) < RTOL[
      jnp.float64]


def test_every_tap_in_padding():
  """No tap reads input (all in the padding): zeros, as the conv."""
  x = random_input((2, 2, 2, 3))
  kernel = random_input((3, 3, 3, 2), seed=2)
  kwargs = dict(padding=((4, 4), (4, 4)), strides=20)
  actual = jaxfactor.conv(x, kernel, spatial_lowering="tap_matmul", **kwargs)
  np.testing.assert_array_equal(actual, flax_conv(x, kernel, **kwargs))


@pytest.mark.parametrize("fn", ["conv", "cost"])
def test_bad_spatial_lowering(fn):
  kernel = jnp.ones((3, 3, 2, 4))
  call = {"conv": lambda: jaxfactor.conv(jnp.ones((1, 5, 5, 2)), kernel,
                                         spatial_lowering="im2col"),
          "cost": lambda: jaxfactor.cost(kernel, (1, 5, 5, 2),
                                         spatial_lowering="im2col")}[fn]
  with pytest.raises(ValueError, match=rf"{fn}: `spatial_lowering` must be"
                     r" one of \('auto', 'conv', 'tap_matmul'\), got"
                     r" 'im2col'"):
    call()


def test_lax_precision_is_passed_on():
  """`precision` reaches the matmul."""
  x = random_input((2, 6, 6, 8)).astype(jnp.float32)
  kernel = random_input((3, 3, 8, 4), seed=2).astype(jnp.float32)
  fn = lambda x, k: jaxfactor.conv(x, k, spatial_lowering="tap_matmul",
                                   precision=lax.Precision.HIGHEST)
  assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in str(
      jax.make_jaxpr(fn)(x, kernel))
  assert relative_error(fn(x, kernel), flax_conv(x, kernel)) < RTOL[
      jnp.float32]
