"""`conv` equals Flax's dense `nn.Conv` with `to_dense()`, for every geometry."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

import jaxfactor
from jaxfactor import _geometry
from jaxfactor import _native
from jaxfactor import cost_model
from jaxfactor import primitives
from reference import (FORMATS, RTOL, WINDOWS, flax_conv, random_format,
                       random_input, relative_error, spatial_input_shape,
                       xla_flops)

PADDINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL", 1, "pairs")
# (strides, dilation) per case; per-axis values differ to catch axis mix-ups.
GEOMETRIES = {
    "unit": lambda n: (1, 1),
    "strided_dilated": lambda n: ((2, 1, 3)[:n], (1, 2, 1)[:n]),
    "both": lambda n: (2, (2, 2, 3)[:n]),
}
BATCHES = ((), (2,), (2, 1))
needs_native = pytest.mark.skipif(
    not _native.available(),
    reason=f"native kernel unavailable: {_native.error()}")
# Every depthwise lowering that can run here.
HERE = ("shift_add", "shift_add_autodiff", "grouped",
        *(("native",) if _native.available() else ()))
LOWERINGS = ["shift_add", "shift_add_autodiff", "grouped",
             pytest.param("native", marks=needs_native)]


def _padding(padding, n):
  if padding == "pairs":
    return ((2, 0), (0, 1), (1, 3))[:n]
  return padding


def _cases(names=FORMATS):
  for name in names:
    for n in (1, 2, 3):
      for padding in PADDINGS:
        if padding == "CAUSAL" and n != 1:
          continue
        for geometry in GEOMETRIES:
          yield name, n, padding, geometry


@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
@pytest.mark.parametrize("name,n,padding,geometry", list(_cases()))
def test_equals_flax_dense_conv(name, n, padding, geometry, implementation):
  window = WINDOWS[n]
  fmt = random_format(name, window, 3, 5)
  strides, dilation = GEOMETRIES[geometry](n)
  padding = _padding(padding, n)
  batch = BATCHES[(len(name) + n) % len(BATCHES)]
  x = random_input(spatial_input_shape(window, batch=batch, extra=5))
  kwargs = dict(strides=strides, padding=padding, dilation=dilation)

  actual = jax.jit(
      lambda x, f: jaxfactor.conv(
          x, f, implementation=implementation, **kwargs
      )
  )(x, fmt)
  expected = flax_conv(x, fmt.to_dense(), **kwargs)
  assert relative_error(actual, expected) < RTOL[jnp.float64]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_float32_matches_float64_reference(name, n):
  window = WINDOWS[n]
  fmt64 = random_format(name, window, 4, 6)
  fmt32 = jax.tree.map(lambda a: a.astype(jnp.float32), fmt64)
  x64 = random_input(spatial_input_shape(window, channels=4))
  for implementation in ("factorized", "reconstructed"):
    actual = jaxfactor.conv(
        x64.astype(jnp.float32), fmt32, strides=2,
        precision=lax.Precision.HIGHEST, implementation=implementation,
    )
    assert actual.dtype == jnp.float32
    expected = flax_conv(x64, fmt64.to_dense(), strides=2)
    assert relative_error(actual, expected) < RTOL[jnp.float32]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_dense_kernel_equals_flax(n):
  kernel = random_input((*WINDOWS[n], 3, 4), seed=3)
  x = random_input(spatial_input_shape(WINDOWS[n]))
  for padding in ("SAME", "VALID", "CIRCULAR"):
    actual = jaxfactor.conv(x, kernel, strides=2, dilation=2, padding=padding)
    expected = flax_conv(x, kernel, strides=2, dilation=2, padding=padding)
    assert relative_error(actual, expected) < RTOL[jnp.float64]


def test_dense_kernel_equals_raw_lax():
  """Flax is the oracle above; check it against a hand-written lax call."""
  kernel = random_input((3, 2, 3, 4), seed=3)
  x = random_input((2, 9, 8, 3))
  actual = jaxfactor.conv(x, kernel, strides=(2, 1), padding=((1, 2), (0, 1)),
                          dilation=(1, 2))
  expected = lax.conv_general_dilated(
      x, kernel, (2, 1), ((1, 2), (0, 1)), rhs_dilation=(1, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)
  assert relative_error(actual, expected) < RTOL[jnp.float64]


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("multiplier", [1, 3])
@pytest.mark.parametrize("padding", ["SAME", "VALID", "CIRCULAR", 2])
def test_depthwise_conv_equals_flax_grouped_conv(n, multiplier, padding,
                                                 lowering):
  channels = 3
  kernel = random_input((*WINDOWS[n], 1, channels * multiplier), seed=4)
  x = random_input(spatial_input_shape(WINDOWS[n], channels=channels))
  actual = jaxfactor.depthwise_conv(x, kernel, strides=2, dilation=(2, 1, 1)[:n],
                                    padding=padding,
                                    depthwise_lowering=lowering)
  expected = nn.Conv(
      channels * multiplier, WINDOWS[n], strides=2, padding=padding,
      kernel_dilation=(2, 1, 1)[:n], feature_group_count=channels,
      use_bias=False, precision=lax.Precision.HIGHEST,
  ).apply({"params": {"kernel": kernel}}, x)
  assert relative_error(actual, expected) < RTOL[jnp.float64]


def test_pointwise_conv_equals_1x1_conv():
  x = random_input((2, 5, 4, 3))
  kernel = random_input((3, 6), seed=2)
  actual = jaxfactor.pointwise_conv(x, kernel)
  expected = flax_conv(x, kernel.reshape(1, 1, 3, 6))
  assert relative_error(actual, expected) < RTOL[jnp.float64]
  # Any leading axes: unbatched, or several batch axes.
  assert jaxfactor.pointwise_conv(x[0, 0], kernel).shape == (4, 6)


def _xla_flops(x, kernel, **kwargs):
  # XLA's count of the convolution run as one `lax` call per stage (a tap
  # matmul's batch loop would be counted once: see
  # `test_tap_matmul.test_flops_match_xla_and_scale_with_the_batch`).
  kwargs = {"spatial_lowering": "conv", **kwargs}
  return xla_flops(lambda x, k: jaxfactor.conv(
      x, k, depthwise_lowering="grouped", **kwargs), x, kernel)


def _implementation_run_by_auto(x, fmt):
  """Which implementation `conv(..., implementation="auto")` compiles to,
  told apart by XLA's own FLOP count of the compiled program (float32), and
  which one the roofline model expects to be faster."""
  counts = {impl: jaxfactor.cost(fmt, x.shape, implementation=impl,
                                 depthwise_lowering="grouped",
                                 spatial_lowering="conv").flops
            for impl in ("factorized", "reconstructed")}
  assert counts["factorized"] != counts["reconstructed"]
  ran = _xla_flops(x, fmt)
  assert ran in counts.values()
  geometry = _geometry.resolve("test", x.shape[1:-1], fmt.window,
                               strides=1, padding="SAME", dilation=1)
  preferred, _ = cost_model.choose_implementation(
      fmt, x.shape, geometry, "auto", "grouped")
  return preferred, next(
      impl for impl, flops in counts.items() if flops == ran)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("shape", [(1, 7, 7, 3), (8, 16, 16, 3)])
def test_auto_runs_the_implementation_the_model_prefers(name, shape):
  fmt = random_format(name, (3, 3), 3, 5, dtype=jnp.float32)
  x = random_input(shape, dtype=jnp.float32)
  preferred, ran = _implementation_run_by_auto(x, fmt)
  assert ran == preferred
  expected = flax_conv(x, fmt.to_dense())
  assert relative_error(jaxfactor.conv(x, fmt), expected) < RTOL[jnp.float32]


def test_auto_counts_bytes_and_narrow_gemms_not_just_flops():
  """Measured on the CPU (`cost_model.MACHINES`): rank-4 LowRank on a
  56x56x8 batch has 0.56x the dense FLOPs, but its first stage is a GEMM with
  4 output columns and runs ~2x slower than the dense conv; a
  depthwise-separable layer there is memory-bound yet still faster."""
  cpu = cost_model.MACHINES["cpu"]
  shape = (32, 56, 56, 8)
  geometry = _geometry.resolve("test", shape[1:-1], (3, 3), strides=1,
                               padding="SAME", dilation=1)
  low_rank = jaxfactor.LowRank(jnp.ones((3, 3, 8, 4)), jnp.ones((4, 8)))
  separable = jaxfactor.DepthwiseSeparable(jnp.ones((3, 3, 1, 8)),
                                           jnp.ones((8, 8)))
  flops = {impl: cost_model.choose_implementation(
      low_rank, shape, geometry, impl, "shift_add")[1]
           for impl in ("factorized", "reconstructed")}
  assert flops["factorized"] < 0.6 * flops["reconstructed"]
  choose = lambda fmt, lowering: cost_model.choose_implementation(
      fmt, shape, geometry, "auto", lowering, model=cpu)[0]
  assert choose(low_rank, "shift_add") == "reconstructed"
  assert choose(separable, "shift_add") == "factorized"
  # XLA:CPU's grouped depthwise conv runs at ~0.6 GFLOP/s: slower than dense.
  assert choose(separable, "grouped") == "reconstructed"


def test_auto_prices_one_dimensional_convs_below_square_ones():
  """Measured on the CPU: 3x1 and 1x3 convs run at ~0.6x the rate of 3x3
  convs, so a stride-2 SpatiallySeparable layer with 2/3 of the dense FLOPs
  is slower factorized (benchmark shape s2_56: 1.6x forward), while at
  stride 1 with 1/3 of the FLOPs it is faster (mb56: ~1.25x)."""
  cpu = cost_model.MACHINES["cpu"]
  shape = (32, 56, 56, 128)

  def choose(features, rank, stride):
    fmt = jaxfactor.SpatiallySeparable((jnp.ones((3, 128, rank)),
                                        jnp.ones((3, rank, features))))
    geometry = _geometry.resolve("test", shape[1:-1], (3, 3), strides=stride,
                                 padding="SAME", dilation=1)
    return cost_model.choose_implementation(fmt, shape, geometry, "auto",
                                            "shift_add", model=cpu)[0]

  assert choose(256, 128, 2) == "reconstructed"
  assert choose(128, 64, 1) == "factorized"
  # The GPU and TPU models (not measured) have no taps term.
  assert cost_model.MACHINES["gpu"].taps_exponent == 0


def _compute_seconds(stage, padding, model):
  """A stage's roofline seconds on a 32x56x56x128 batch, less the overhead."""
  shape = (32, 56, 56, 128)
  geometry = _geometry.resolve("test", shape[1:-1], (3, 3), strides=1,
                               padding=padding, dilation=1)
  return cost_model.stage_seconds(stage, shape, geometry, "shift_add",
                                  model)[0] - model.overhead


def test_roofline_taps_term():
  """Per FLOP, a t-tap convolution costs (9 / t)**0.5 times a 3x3 one on the
  CPU model; a stage that runs as a contraction (a 1x1 kernel without
  padding) pays no taps term, a padded 1x1 conv (a real convolution) does."""
  cpu = cost_model.MACHINES["cpu"]

  def ones(*shape):
    return jnp.ones(shape, jnp.float32)

  # CIRCULAR padding: every tap reads data, so FLOPs are exactly 3x apart.
  square = _compute_seconds(primitives.SpatialConv(ones(3, 3, 128, 128),
                                                   (0, 1)), "CIRCULAR", cpu)
  column = _compute_seconds(primitives.SpatialConv(ones(3, 128, 128), (0,)),
                            "CIRCULAR", cpu)
  assert column * 3 == pytest.approx(square * 3 ** 0.5, rel=1e-9)
  contraction = _compute_seconds(primitives.Pointwise(ones(128, 128)),
                                 "VALID", cpu)
  unpadded = _compute_seconds(
      primitives.SpatialConv(ones(1, 1, 128, 128), (0, 1)), "VALID", cpu)
  padded = _compute_seconds(
      primitives.SpatialConv(ones(1, 1, 128, 128), (0, 1)), 1, cpu)
  assert unpadded == pytest.approx(contraction, rel=1e-12)
  # A padded 1x1 conv does the same FLOPs (padding taps are skipped) at a
  # third of the rate.
  assert padded == pytest.approx(3 * contraction, rel=1e-12)


def test_auto_switches_with_input_size(monkeypatch):
  """Full-rank Tucker: reconstructing costs a fixed ~2*k*C*R*(R+F), then each
  pixel is cheaper than the three-stage chain; so small inputs run
  factorized and large inputs reconstructed."""
  fmt = random_format("tucker", (3, 3), 64, 64, ranks=(64, 64),
                      dtype=jnp.float32)
  tiny = jnp.ones((1, 3, 3, 64), jnp.float32)
  large = jnp.ones((8, 32, 32, 64), jnp.float32)
  # On the CPU's model ("auto" reads the default backend at trace time).
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert _implementation_run_by_auto(tiny, fmt) == ("factorized",) * 2
  assert _implementation_run_by_auto(large, fmt) == ("reconstructed",) * 2


def test_same_lower_padding_equals_flax():
  fmt = random_format("cp", (2, 4), 3, 5)
  x = random_input((2, 7, 8, 3))
  actual = jaxfactor.conv(x, fmt, padding="SAME_LOWER", strides=(2, 1))
  expected = flax_conv(x, fmt.to_dense(), padding="SAME_LOWER", strides=(2, 1))
  assert relative_error(actual, expected) < RTOL[jnp.float64]


@pytest.mark.parametrize("batch", [(), (3,), (2, 3), (0,)])
def test_batch_dims_are_flattened_and_restored(batch):
  fmt = random_format("tucker", (3, 3), 3, 5)
  x = random_input((*batch, 6, 7, 3))
  y = jaxfactor.conv(x, fmt, strides=2)
  assert y.shape == (*batch, 3, 4, 5)
  if int(np.prod(batch)):
    flat = jaxfactor.conv(x.reshape(-1, 6, 7, 3), fmt, strides=2)
    np.testing.assert_array_equal(y.reshape(-1, 3, 4, 5), flat)


@pytest.mark.parametrize("name", FORMATS)
def test_jit_equals_eager(name):
  fmt = random_format(name, (3, 2), 3, 5)
  x = random_input((2, 7, 6, 3))
  eager = jaxfactor.conv(x, fmt, strides=(1, 2), padding="CIRCULAR")
  jitted = jax.jit(
      lambda x, f: jaxfactor.conv(x, f, strides=(1, 2), padding="CIRCULAR")
  )(x, fmt)
  np.testing.assert_allclose(jitted, eager, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", FORMATS)
def test_vmap_over_inputs_and_factors_equals_loop(name):
  stack = [random_format(name, (3, 2), 3, 5, seed=s) for s in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *stack)
  xs = random_input((3, 2, 6, 5, 3))
  vmapped = jax.vmap(lambda x, f: jaxfactor.conv(x, f, strides=2))(xs, stacked)
  looped = jnp.stack(
      [jaxfactor.conv(x, f, strides=2) for x, f in zip(xs, stack)]
  )
  np.testing.assert_allclose(vmapped, looped, rtol=1e-12, atol=1e-12)
  # vmap over an extra (non-leading) axis of x only.
  fmt = stack[0]
  xs_axis2 = jnp.moveaxis(xs, 0, 2)  # [2, 6, 3, 5, 3]
  vmapped = jax.vmap(lambda x: jaxfactor.conv(x, fmt), in_axes=2)(xs_axis2)
  looped = jnp.stack([jaxfactor.conv(x, fmt) for x in xs])
  np.testing.assert_allclose(vmapped, looped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FORMATS)
def test_grad_of_vmap_equals_sum_of_grads(name):
  fmt = random_format(name, (3, 2), 3, 5)
  xs = random_input((4, 1, 6, 5, 3))

  def loss(f, x):
    return jnp.sum(jnp.sin(jaxfactor.conv(x, f, strides=(2, 1))))

  batched = jax.grad(lambda f: jnp.sum(jax.vmap(lambda x: loss(f, x))(xs)))(fmt)
  summed = jax.tree.map(
      lambda *g: sum(g), *[jax.grad(loss)(fmt, x) for x in xs]
  )
  assert isinstance(batched, type(fmt))
  chex.assert_trees_all_close(batched, summed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FORMATS)
def test_bfloat16_forward_within_1e2_of_float32(name):
  fmt32 = random_format(name, (3, 3), 8, 8, dtype=jnp.float32)
  fmt16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), fmt32)
  x32 = random_input((2, 9, 9, 8), dtype=jnp.float32)
  reference = jaxfactor.conv(x32, fmt32)
  for preferred in (None, jnp.float32):
    y = jaxfactor.conv(x32.astype(jnp.bfloat16), fmt16,
                       preferred_element_type=preferred)
    assert y.dtype == (preferred or jnp.bfloat16)
    # bfloat16 has an 8-bit mantissa: rounding of inputs, factors and (for
    # chains) intermediates gives ~0.4% each; 1e-2 bounds the sum.
    assert relative_error(y, reference) < 1e-2


@pytest.mark.parametrize("name", FORMATS)
def test_preferred_element_type_widens_every_stage(name):
  """float32 factors with float64 accumulation equal the float64 computation
  to float64 precision only if *every* stage of the chain runs in float64."""
  fmt64 = random_format(name, (3, 3), 4, 4)
  x64 = random_input((1, 6, 6, 4))
  fmt32 = jax.tree.map(lambda a: a.astype(jnp.float32), fmt64)
  x32 = x64.astype(jnp.float32)
  y = jaxfactor.conv(x32, fmt32, preferred_element_type=jnp.float64,
                     implementation="factorized")
  assert y.dtype == jnp.float64
  exact = jaxfactor.conv(
      x32.astype(jnp.float64),
      jax.tree.map(lambda a: a.astype(jnp.float64), fmt32),
      implementation="factorized")
  assert relative_error(y, exact) < 1e-13


@pytest.mark.parametrize("name", FORMATS)
def test_no_retracing_on_same_shapes(name):
  fmt = random_format(name, (3, 3), 3, 4)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def apply(x, f):
    return jaxfactor.conv(x, f, strides=2)

  apply(random_input((2, 8, 8, 3), seed=1), fmt)
  apply(random_input((2, 8, 8, 3), seed=2),
        jax.tree.map(lambda a: a + 1.0, fmt))


@pytest.mark.parametrize("name", ["depthwise_separable", "cp"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("padding", ["SAME", "VALID", "REFLECT", "pairs"])
def test_both_depthwise_lowerings_equal_flax(name, n, padding):
  window = WINDOWS[n]
  fmt = random_format(name, window, 3, 5)
  strides, dilation = GEOMETRIES["both"](n)
  kwargs = dict(strides=strides, dilation=dilation,
                padding=_padding(padding, n))
  x = random_input(spatial_input_shape(window, extra=5))
  expected = flax_conv(x, fmt.to_dense(), **kwargs)
  for lowering in HERE:
    actual = jaxfactor.conv(x, fmt, implementation="factorized",
                            depthwise_lowering=lowering, **kwargs)
    assert relative_error(actual, expected) < RTOL[jnp.float64]


@pytest.mark.parametrize("name,n,padding,geometry",
                         [c for c in _cases(["cp"]) if c[1] > 1])
def test_cp_grouped_runs_one_depthwise_conv(name, n, padding, geometry):
  """Under "grouped", CP's per-axis depthwise filters run as one k x k
  filter (their outer product per channel), on every geometry."""
  window = WINDOWS[n]
  fmt = random_format(name, window, 3, 5)
  strides, dilation = GEOMETRIES[geometry](n)
  kwargs = dict(strides=strides, dilation=dilation,
                padding=_padding(padding, n))
  x = random_input(spatial_input_shape(window, extra=5))
  fn = lambda x, f: jaxfactor.conv(x, f, implementation="factorized",
                                   depthwise_lowering="grouped", **kwargs)
  convs = [e for e in jax.make_jaxpr(fn)(x, fmt).eqns
           if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 1
  assert convs[0].params["feature_group_count"] == fmt.rank
  assert convs[0].invars[1].aval.shape == (*window, 1, fmt.rank)
  expected = flax_conv(x, fmt.to_dense(), **kwargs)
  assert relative_error(fn(x, fmt), expected) < RTOL[jnp.float64]


def test_only_depthwise_stages_over_disjoint_axes_merge():
  a = primitives.SpatialConv(jnp.ones((3, 1, 4)), (0,), 4)
  b = primitives.SpatialConv(jnp.full((2, 1, 4), 2.0), (1,), 4)
  merged, flops = primitives.merge_depthwise_stages([a, b], "grouped")
  assert len(merged) == 1 and merged[0].axes == (0, 1)
  assert flops == 3 * 2 * 4
  chex.assert_trees_all_equal(merged[0].kernel, jnp.full((3, 2, 1, 4), 2.0))
  # The axes come out in order, whichever stage runs first.
  (ba,), _ = primitives.merge_depthwise_stages([b, a], "grouped")
  chex.assert_trees_all_equal(ba.kernel, merged[0].kernel)
  for stages in ([a, a],  # the same axis twice
                 [a, primitives.SpatialConv(jnp.ones((2, 1, 8)), (1,), 4)],
                 [a, primitives.Pointwise(jnp.ones((4, 4))), b],
                 [a, primitives.SpatialConv(jnp.ones((2, 4, 4)), (1,))]):
    assert primitives.merge_depthwise_stages(stages, "grouped") == (
        list(stages), 0)
  for lowering in ("shift_add", "shift_add_autodiff"):
    assert primitives.merge_depthwise_stages([a, b], lowering) == ([a, b], 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_shift_add_fence_keeps_every_channel(bad):
  """The fence's predicate reads one weight: a NaN or inf there changes
  only the channels that weight reaches, as in the grouped conv."""
  kernel = random_input((3, 3, 1, 3), seed=1).at[0, 0, 0, 0].set(bad)
  x = random_input((2, 5, 6, 3))
  expected = jaxfactor.depthwise_conv(x, kernel, depthwise_lowering="grouped")
  for lowering in ("shift_add", "shift_add_autodiff"):
    actual = jaxfactor.depthwise_conv(x, kernel, depthwise_lowering=lowering)
    assert not np.isfinite(actual[..., 0]).all()
    assert relative_error(actual[..., 1:], expected[..., 1:]) < RTOL[
        jnp.float64]
    dx = jax.grad(lambda x: jaxfactor.depthwise_conv(
        x, kernel, depthwise_lowering=lowering)[..., 1:].sum())(x)
    assert np.isfinite(dx[..., 1:]).all()


def test_shift_add_output_is_computed_once():
  """The k-tap sums (forward and input gradient) run inside a conditional,
  which XLA keeps (it does not fold the predicate): their consumers read
  one buffer instead of each recomputing the sum (`_materialized`)."""
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  kernel = jnp.ones((3, 3, 1, 4), jnp.float32)
  fn = lambda x, k: jaxfactor.depthwise_conv(
      x, k, depthwise_lowering="shift_add").mean(axis=(0, 1, 2)).sum()
  for compiled in (jax.jit(fn).lower(x, kernel).compile(),
                   jax.jit(jax.grad(fn)).lower(x, kernel).compile()):
    assert " conditional(" in compiled.as_text()
  jaxpr = str(jax.make_jaxpr(jax.grad(fn))(x, kernel))
  assert jaxpr.count("cond[") == 2  # forward and input gradient


def test_auto_depthwise_lowering_on_each_backend():
  expected = "grouped"
  if jax.default_backend() == "cpu":
    expected = ("native"
                if _native.available() and jax.device_count() == 1
                else "shift_add")
  assert primitives.resolve_depthwise_lowering("t", "auto") == expected
  with pytest.raises(ValueError, match=r"conv: `depthwise_lowering` must be"
                     r" one of \('auto', 'native', 'shift_add',"
                     r" 'shift_add_autodiff', 'grouped'\), got 'fast'"):
    jaxfactor.conv(random_input((1, 5, 5, 3)),
                   random_format("cp", (3, 3), 3, 4), depthwise_lowering="fast")


def test_native_kernel_builds_here():
  """CI has a C++ compiler: the kernel must build there, or every "native"
  test below would silently skip. `JAXFACTOR_NATIVE=0` opts out."""
  if os.environ.get("JAXFACTOR_NATIVE", "1") == "0":
    assert not _native.available()
    assert "JAXFACTOR_NATIVE=0" in _native.error()
  else:
    assert _native.available(), _native.error()
    assert os.path.exists(_native.library_path())


@needs_native
def test_native_runs_one_custom_call_per_pass():
  """XLA compiles no kernel for the native conv: forward, input gradient
  and weight gradient are one custom call each, and no loop or
  conditional."""
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  kernel = jnp.ones((3, 3, 1, 4), jnp.float32)
  fn = lambda x, k: jnp.sum(jaxfactor.depthwise_conv(
      x, k, depthwise_lowering="native") ** 2)
  text = jax.jit(jax.grad(fn, (0, 1))).lower(x, kernel).compile().as_text()
  assert text.count("custom-call(") == 3
  assert " while(" not in text and " conditional(" not in text


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_native_is_deterministic_and_matches_shift_add(dtype):
  """Each output is summed by one thread in a fixed order, the weight
  gradient's partial sums in a fixed order: bitwise repeatable. Per dtype,
  within the shift-add's result by RTOL (same products, another order)."""
  x = random_input((4, 9, 7, 5)).astype(dtype)
  kernel = random_input((3, 3, 1, 5), seed=2).astype(dtype)
  fn = jax.jit(jax.value_and_grad(
      lambda x, k, lowering: jnp.sum(jnp.sin(jaxfactor.depthwise_conv(
          x, k, strides=(2, 1), dilation=(1, 2),
          depthwise_lowering=lowering))), (0, 1)), static_argnums=2)
  first, second = fn(x, kernel, "native"), fn(x, kernel, "native")
  chex.assert_trees_all_equal(first, second)
  for a, b in zip(jax.tree.leaves(first),
                  jax.tree.leaves(fn(x, kernel, "shift_add"))):
    assert relative_error(a, b) < RTOL[dtype]


# Channel counts that take each of the native kernel's code paths, per
# dtype (16 float32 / 8 float64 lanes per vector): scalar channels, a flat
# row with the weights repeated to 1, 3, 5 or 7 vectors, vector tiles with
# a scalar tail, whole vectors, and wide blocks with leftovers.
NATIVE_CHANNELS = (1, 3, 5, 7, 8, 9, 16, 24, 40, 64, 72, 144, 200)
# (width, window, stride, dilation, padding) on the last axis, where the
# kernel's row code runs: rows with an interior, strided rows, dilated, odd
# explicit padding, a row shorter than the window, a one-tap window.
NATIVE_ROWS = ((19, 3, 1, 1, (1, 1)), (13, 3, 2, 1, (1, 1)),
               (11, 5, 1, 2, (0, 0)), (12, 3, 3, 1, (2, 3)),
               (2, 3, 1, 1, (1, 1)), (9, 1, 1, 1, (0, 0)))


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("row", NATIVE_ROWS, ids=str)
def test_native_code_paths_equal_grouped_conv(row, dtype):
  """Forward pass, input and weight gradient against autodiff of lax's
  grouped conv, for every channel count in NATIVE_CHANNELS (RTOL per
  dtype: the same products summed in another order)."""
  width, window, stride, dilation, pad = row
  for channels in NATIVE_CHANNELS:
    x = random_input((2, 5, width, channels)).astype(dtype)
    kernel = random_input((3, window, 1, channels), seed=2).astype(dtype)
    cotangent = None

    def conv(lowering, x, k):
      return jaxfactor.depthwise_conv(
          x, k, strides=(1, stride), dilation=(1, dilation),
          padding=((1, 1), pad), depthwise_lowering=lowering)

    want, vjp = jax.vjp(lambda x, k: lax.conv_general_dilated(
        x, k, (1, stride), ((1, 1), pad), rhs_dilation=(1, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels, precision="highest"), x, kernel)
    got, native_vjp = jax.vjp(lambda x, k: conv("native", x, k), x, kernel)
    cotangent = random_input(want.shape, seed=3).astype(dtype)
    for a, b in zip((got, *native_vjp(cotangent)),
                    (want, *vjp(cotangent))):
      assert relative_error(a, b) < RTOL[dtype], channels


@needs_native
def test_native_falls_back_where_it_does_not_apply():
  """bfloat16 (the kernel takes float32 and float64) and more than 3
  spatial axes run as "shift_add", with the same result."""
  x = random_input((2, 6, 5, 4)).astype(jnp.bfloat16)
  kernel = random_input((3, 3, 1, 4), seed=2).astype(jnp.bfloat16)
  native = jax.jit(lambda x, k: jaxfactor.depthwise_conv(
      x, k, depthwise_lowering="native"))
  assert "ffi" not in str(jax.make_jaxpr(native)(x, kernel))
  chex.assert_trees_all_equal(native(x, kernel), jaxfactor.depthwise_conv(
      x, kernel, depthwise_lowering="shift_add"))
  x4 = random_input((1, 4, 3, 3, 3, 2))
  k4 = random_input((2, 2, 1, 2, 1, 2), seed=3)
  assert relative_error(
      jaxfactor.depthwise_conv(x4, k4, depthwise_lowering="native"),
      jaxfactor.depthwise_conv(x4, k4, depthwise_lowering="grouped")
  ) < RTOL[jnp.float64]


@needs_native
def test_native_under_vmap():
  """A mapped activation joins the batch axis; mapped weights run one call
  per element. Both equal the loop."""
  xs = random_input((3, 2, 6, 5, 4))
  ks = random_input((3, 3, 3, 1, 4), seed=2)
  f = lambda x, k: jaxfactor.depthwise_conv(x, k, depthwise_lowering="native")
  for in_axes in ((0, None), (0, 0), (None, 0)):
    got = jax.vmap(f, in_axes)(xs if in_axes[0] == 0 else xs[0],
                               ks if in_axes[1] == 0 else ks[0])
    want = jnp.stack([f(xs[i] if in_axes[0] == 0 else xs[0],
                        ks[i] if in_axes[1] == 0 else ks[0])
                      for i in range(3)])
    assert relative_error(got, want) < RTOL[jnp.float64]


@needs_native
@pytest.mark.parametrize("channels", [3, 16, 128])
def test_auto_runs_native_on_every_stage(channels):
  """"auto" on a one-device CPU: the native kernel for narrow and wide
  stages alike (one custom call, no XLA loop); `cost` counts what runs."""
  x = jnp.ones((1, 6, 6, channels), jnp.float32)
  kernel = jnp.ones((3, 3, 1, channels), jnp.float32)
  fn = lambda x, k: jaxfactor.depthwise_conv(x, k)
  assert "custom-call(" in jax.jit(fn).lower(x, kernel).compile().as_text()
  separable = jaxfactor.DepthwiseSeparable(kernel,
                                           jnp.ones((channels, 4), jnp.float32))
  count = lambda lowering: jaxfactor.cost(
      separable, x.shape, implementation="factorized",
      depthwise_lowering=lowering).flops
  assert count("auto") == count("native") != count("shift_add")


@needs_native
def test_native_exports_as_the_grouped_conv():
  """`jax.export` serializes no custom call without compatibility
  guarantees: exported, the native primitives lower to `lax`'s grouped
  convolution (and its transposes), with the same result and gradients."""
  x = random_input((2, 7, 6, 3))
  kernel = random_input((3, 2, 1, 6), seed=2)
  fn = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(
      jaxfactor.depthwise_conv(x, k, strides=(2, 1), dilation=(1, 2),
                               depthwise_lowering="native"))), (0, 1)))
  exported = jax.export.export(fn)(x, kernel)
  assert "jaxfactor_depthwise" not in exported.mlir_module()
  for a, b in zip(jax.tree.leaves(exported.call(x, kernel)),
                  jax.tree.leaves(fn(x, kernel))):
    assert relative_error(a, b) < RTOL[jnp.float64]


def test_native_errors():
  x, kernel = random_input((1, 5, 5, 2)), random_input((3, 3, 1, 2), seed=2)
  if jax.default_backend() != "cpu":
    with pytest.raises(ValueError, match="CPU only"):
      jaxfactor.depthwise_conv(x, kernel, depthwise_lowering="native")
  elif not _native.available():
    with pytest.raises(RuntimeError, match="not available here"):
      jaxfactor.depthwise_conv(x, kernel, depthwise_lowering="native")


@pytest.mark.parametrize("strides", [1, 2, (3, 1)])
@pytest.mark.parametrize("padding", ["SAME", "VALID", 1, "CIRCULAR"])
def test_dense_1x1_kernel_equals_flax(strides, padding):
  """Unpadded 1x1 kernels run as a strided slice and `dot_general`."""
  x = random_input((2, 9, 8, 5))
  kernel = random_input((1, 1, 5, 7), seed=2)
  actual = jaxfactor.conv(x, kernel, strides=strides, padding=padding)
  expected = flax_conv(x, kernel, strides=strides, padding=padding)
  assert relative_error(actual, expected) < RTOL[jnp.float64]
  assert jaxfactor.cost(kernel.astype(jnp.float32), x.shape, strides=strides,
                        padding=padding).flops == _xla_flops(
      x.astype(jnp.float32), kernel.astype(jnp.float32), strides=strides,
      padding=padding)
