"""`cost` against XLA's own `cost_analysis()` of the jitted `conv`."""

import math

import jax
import jax.numpy as jnp
import pytest

import jaxfactor
from jaxfactor import _geometry
from jaxfactor import cost_model
from jaxfactor import _native
from jaxfactor import primitives
import reference
from reference import FORMATS, WINDOWS, random_format

PADDINGS = ("SAME", "VALID", "CIRCULAR", ((2, 0), (0, 1), (1, 3)))
# Windows with a 1 (a one-tap stage, which XLA may simplify) and without.
COST_WINDOWS = {1: [(3,), (1,)], 2: [(3, 2), (1, 3)], 3: [(2, 3, 2), (1, 1, 2)]}


def xla_flops(kernel, input_shape, dtype, **kwargs):
  """FLOPs XLA counts for the compiled `conv`; factors are *arguments*, so
  XLA cannot constant-fold `to_dense` away."""
  return reference.xla_flops(lambda x, k: jaxfactor.conv(x, k, **kwargs),
                             jax.ShapeDtypeStruct(input_shape, dtype), kernel)


def _cases():
  for name in (*FORMATS, "dense"):
    for n in (1, 2, 3):
      for padding in PADDINGS:
        for window in COST_WINDOWS[n]:
          yield name, window, padding


def _recompute_bound(fmt, shape, **kwargs):
  """FLOPs XLA may add by fusing one shift-add depthwise stage into the k
  shifted slices of the next one (it recomputes the producer per slice)."""
  n = fmt.num_spatial_dims
  geometry = _geometry.resolve("test", shape[-n - 1:-1], fmt.window, **kwargs)
  depthwise, in_shape = [], shape
  for stage in fmt.stages():
    flops, in_shape = cost_model.stage_flops(stage, in_shape, geometry,
                                             "shift_add")
    if primitives.is_depthwise(stage):
      depthwise.append((stage, flops))
  return sum((stage.kernel.shape[0] - 1) * previous_flops
             for (_, previous_flops), (stage, _) in zip(depthwise,
                                                        depthwise[1:]))


@pytest.mark.parametrize("lowering", ["grouped", "shift_add"])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed", "auto"])
@pytest.mark.parametrize("name,window,padding", list(_cases()))
def test_flops_equal_xla_cost_analysis_float32(name, window, padding,
                                               implementation, lowering):
  n = len(window)
  fmt = random_format("low_rank" if name == "dense" else name, window, 3, 5,
                      dtype=jnp.float32)
  kernel = fmt.to_dense() if name == "dense" else fmt
  if isinstance(padding, tuple):
    padding = padding[:n]
  kwargs = dict(strides=(2, 1, 3)[:n], dilation=(1, 2, 1)[:n], padding=padding)
  shape = (2, *(k + 5 + i for i, k in enumerate(window)), 3)
  ours = jaxfactor.cost(kernel, shape, implementation=implementation,
                        depthwise_lowering=lowering, **kwargs).flops
  xla = xla_flops(kernel, shape, jnp.float32, implementation=implementation,
                  depthwise_lowering=lowering, **kwargs)
  if lowering == "shift_add" and name == "cp" and n > 1 and ours != xla:
    # Consecutive shift-add stages: XLA may recompute the first inside the
    # second's slices. `cost` counts the algorithm; bound XLA's extra work.
    slack = _recompute_bound(kernel, shape, **kwargs)
    assert ours < xla <= ours + slack
  else:
    assert ours == xla


@pytest.mark.parametrize("name", ["depthwise_separable", "cp"])
def test_float64_grouped_conv_documented_difference(name):
  """XLA:CPU has no float64 grouped-convolution kernel: it rewrites a conv
  with `feature_group_count=G` as a dense conv over a block-diagonal kernel
  built with a mask (ConvolutionGroupConverter). `cost` counts the
  algorithm's arithmetic, so in float64 XLA reports, per grouped stage, G
  times our count plus 2 FLOPs (compare, select) per expanded kernel entry.
  float32 has a native grouped kernel, and the counts agree exactly."""
  fmt = random_format(name, (3, 2), 3, 5)
  shape = (2, 9, 8, 3)
  ours = jaxfactor.cost(fmt, shape, implementation="factorized",
                        depthwise_lowering="grouped").flops
  geometry = _geometry.resolve("test", shape[1:-1], fmt.window, strides=1,
                               padding="SAME", dilation=1)
  extra, in_shape = 0, shape
  # CP's per-axis depthwise stages run as one under "grouped".
  stages, _ = primitives.merge_depthwise_stages(fmt.stages(), "grouped")
  for stage in stages:
    flops, in_shape = cost_model.stage_flops(stage, in_shape, geometry)
    groups = getattr(stage, "groups", 1)
    if groups > 1:
      window_size = math.prod(stage.kernel.shape[:-2])
      extra += (groups - 1) * flops + 2 * window_size * groups * stage.kernel.shape[-1]
  assert extra > 0
  assert xla_flops(fmt, shape, jnp.float64, implementation="factorized",
                   depthwise_lowering="grouped") == ours + extra
  fmt32 = jax.tree.map(lambda a: a.astype(jnp.float32), fmt)
  assert xla_flops(fmt32, shape, jnp.float32, implementation="factorized",
                   depthwise_lowering="grouped") == ours


@pytest.mark.parametrize("name", FORMATS)
def test_params_are_the_factor_sizes(name):
  fmt = random_format(name, (3, 3), 4, 6)
  expected = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(fmt))
  assert fmt.num_params == expected
  assert jaxfactor.cost(fmt, (1, 8, 8, 4)).params == expected


def test_closed_form_counts_for_a_realistic_layer():
  """Counts written out by hand for 3x3, 128 -> 128, 28x28, VALID, batch 1."""
  c = f = 128
  pixels = 26 * 26
  dense = jnp.zeros((3, 3, c, f), jnp.float32)
  assert jaxfactor.cost(dense, (1, 28, 28, c), padding="VALID") == (
      jaxfactor.Cost(params=9 * c * f, flops=2 * pixels * 9 * c * f))
  separable = jaxfactor.DepthwiseSeparable(
      jnp.zeros((3, 3, 1, c), jnp.float32), jnp.zeros((c, f), jnp.float32))
  assert jaxfactor.cost(separable, (1, 28, 28, c), padding="VALID",
                        implementation="factorized",
                        depthwise_lowering="grouped") == (
      jaxfactor.Cost(params=9 * c + c * f,
                     flops=2 * pixels * 9 * c + 2 * pixels * c * f))
  # Shift-add: a multiply per in-range tap (per axis, the edge taps reach 27
  # of the 28 outputs, the centre tap all 28), 8 adds per output, and the
  # fusion fence's scalar predicate.
  same = jaxfactor.cost(separable, (1, 28, 28, c), padding="SAME",
                        implementation="factorized",
                        depthwise_lowering="shift_add")
  assert same.flops == ((82 * 82 + 8 * 28 * 28) * c + 2 * 28 * 28 * c * f
                        + primitives.FENCE_FLOPS)
  # Native (a custom call XLA's `cost_analysis()` does not see into): a
  # multiply-add per in-range tap, no fence.
  if _native.available():
    native = jaxfactor.cost(separable, (1, 28, 28, c), padding="SAME",
                            implementation="factorized",
                            depthwise_lowering="native")
    assert native.flops == 2 * 82 * 82 * c + 2 * 28 * 28 * c * f


def test_abstract_formats_from_eval_shape():
  fmt = random_format("tucker", (3, 3), 4, 6, dtype=jnp.float32)
  abstract = jax.eval_shape(lambda f: f, fmt)
  assert isinstance(jax.tree.leaves(abstract)[0], jax.ShapeDtypeStruct)
  assert jaxfactor.cost(abstract, (2, 8, 8, 4)) == jaxfactor.cost(
      fmt, (2, 8, 8, 4))


@pytest.mark.parametrize("lowering", ["grouped", "shift_add"])
@pytest.mark.parametrize("padding", ["REFLECT", "SAME_LOWER", 2, "CAUSAL"])
@pytest.mark.parametrize("strides,dilation", [(1, 1), (2, 2), (3, 1)])
def test_more_paddings_and_geometries(padding, strides, dilation, lowering):
  window = (3,) if padding == "CAUSAL" else (3, 1)
  for name in FORMATS:
    if name == "spatially_separable" and len(window) == 1:
      continue
    fmt = random_format(name, window, 3, 4, dtype=jnp.float32)
    shape = (2, *(9 + i for i in range(len(window))), 3)
    kwargs = dict(strides=strides, dilation=dilation, padding=padding,
                  depthwise_lowering=lowering)
    for implementation in ("factorized", "reconstructed"):
      assert jaxfactor.cost(fmt, shape, implementation=implementation,
                            **kwargs).flops == xla_flops(
          fmt, shape, jnp.float32, implementation=implementation, **kwargs)


def test_empty_batch_costs_nothing():
  fmt = random_format("tucker", (3, 3), 3, 4)
  assert jaxfactor.cost(fmt, (0, 6, 6, 3),
                        implementation="reconstructed").flops == 0


def test_batch_axes_multiply_flops():
  fmt = random_format("cp", (3, 3), 4, 6)
  count = lambda shape: jaxfactor.cost(fmt, shape,
                                       implementation="factorized").flops
  # Affine in the batch: a shift-add stage's fence is one per call.
  one, two = count((8, 8, 4)), count((2, 8, 8, 4))
  assert two > one
  assert count((2, 3, 8, 8, 4)) - one == 5 * (two - one)
