"""`cost` against closed-form FLOP counts, and what "auto" runs.

The formulas are written out here, stage by stage: a multiply-add is 2 FLOPs
and a convolution multiplies only the (output, tap) pairs that read real
input, counted by brute force (`reference.in_range_pairs`), so "SAME" costs
less than `2 * out_pixels * k * C * F`. A handful of canaries compare with
XLA's own `cost_analysis()`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import given
from hypothesis import strategies as st
from jax import export
from reference import BATCHES
from reference import FORMATS
from reference import KERNELS
from reference import PADDINGS
from reference import STRIDES
from reference import WINDOWS
from reference import case_id
from reference import random_format
from reference import random_kernel

import jaxfactor
from jaxfactor._lowering import forced

PLATFORMS = ("cpu", "gpu", "tpu")


# --- the closed forms ---------------------------------------------------------


def _per_axis(value, n):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _conv_flops(spatial, window, axes, geometry, batch, c, f, tap_matmul):
  """FLOPs and output sizes of a convolution over `axes`, `c -> f` channels
  per group: 2 per (output, tap) pair reading input, per channel pair.

  As a tap matmul: `2 * B * positions * c * k' * f` for the matmul (every
  input position, padded with data for "CIRCULAR"/"REFLECT", times the k'
  taps that read input) plus `(k' - 1) * f` adds per output position.
  """
  strides, dilation, pads, mode = geometry
  pairs, taps, positions, out = 1, 1, 1, list(spatial)
  for axis, size in enumerate(spatial):
    if axis not in axes:
      pairs, positions = pairs * size, positions * size
      continue
    k, pad = window[axes.index(axis)], pads[axis]
    if mode != "constant":  # padded with data: every tap reads input
      size, pad = size + sum(pad), (0, 0)
    args = (size, k, strides[axis], dilation[axis], pad)
    pairs *= reference.in_range_pairs(*args)
    taps *= reference.reading_taps(*args)
    positions *= size
    out[axis] = reference.output_size(*args)
  if tap_matmul and math.prod(window) > 1:
    flops = (
      2 * batch * positions * c * taps * f
      + max(taps - 1, 0) * batch * math.prod(out) * f
    )
  else:
    flops = 2 * batch * pairs * c * f
  return flops, out


def _to_dense_flops(fmt):
  """`to_dense()`'s FLOPs: a multiply-add 2, an elementwise product 1."""
  k, c, f = math.prod(fmt.window), fmt.in_features, fmt.out_features
  if isinstance(fmt, jaxfactor.DepthwiseSeparable):
    return 2 * k * c * f * fmt.channel_multiplier
  if isinstance(fmt, jaxfactor.LowRank):
    return 2 * k * c * fmt.rank * f
  if isinstance(fmt, jaxfactor.Tucker):  # the cheaper contraction order
    a, b = fmt.ranks
    return min(
      2 * k * a * b * f + 2 * k * c * a * f,
      2 * c * a * k * b + 2 * k * c * b * f,
    )
  if isinstance(fmt, jaxfactor.SpatiallySeparable):
    flops, taps = 0, fmt.window[0]
    for factor in fmt.factors[1:]:
      k_i, r_in, r_out = factor.shape
      flops += 2 * taps * c * r_in * k_i * r_out
      taps *= k_i
    return flops
  if isinstance(fmt, jaxfactor.TensorTrain):  # left to right along the train
    flops, prefix = 0, 1
    for core in fmt.cores:
      r_in, c_i, f_i, r_out = core.shape
      flops += 2 * k * prefix * r_in * c_i * f_i * r_out
      prefix *= c_i * f_i
    return flops
  # CP: the outer products of the per-axis filters, times in_proj, then
  # the contraction with out_proj.
  outer = sum(
    math.prod(fmt.window[: i + 1]) * fmt.rank for i in range(1, len(fmt.window))
  )
  return outer + k * c * fmt.rank + 2 * k * c * fmt.rank * f


def expected_flops(
  kernel, input_shape, kwargs, implementation, platform, tap_matmul=False
):
  """The closed-form count of `conv(x, kernel, **kwargs)` on `platform`.

  `implementation` is "factorized" or "reconstructed"; `tap_matmul` says
  whether dense spatial stages run as tap matmuls on the CPU (forced: the
  shapes tested are below the sizes where the CPU picks it itself).
  """
  window = tuple(kernel.shape[:-2])
  n, c, f = len(window), kernel.shape[-2], kernel.shape[-1]
  batch = math.prod(input_shape[: -n - 1])
  spatial = list(input_shape[-n - 1 : -1])
  if batch == 0:
    return 0
  strides = _per_axis(kwargs.get("strides", 1), n)
  dilation = _per_axis(kwargs.get("dilation", 1), n)
  pads, mode = reference.explicit_padding(
    kwargs.get("padding", "SAME"), spatial, window, strides, dilation
  )
  geometry = (strides, dilation, pads, mode)
  tap_matmul = tap_matmul and platform == "cpu"
  every_axis = tuple(range(n))

  def conv(spatial, window, axes, c, f, dense=True):
    return _conv_flops(
      spatial, window, axes, geometry, batch, c, f, tap_matmul and dense
    )

  def pointwise(spatial, c, f):
    return 2 * batch * math.prod(spatial) * c * f

  if implementation == "reconstructed" or not isinstance(
    kernel, jaxfactor.Format
  ):
    flops, _ = conv(spatial, window, every_axis, c, f)
    if isinstance(kernel, jaxfactor.Format):
      flops += _to_dense_flops(kernel)
    return flops
  if isinstance(kernel, jaxfactor.DepthwiseSeparable):
    width = c * kernel.channel_multiplier
    flops, out = conv(spatial, window, every_axis, 1, width, dense=False)
    return flops + pointwise(out, width, f)
  if isinstance(kernel, jaxfactor.SpatiallySeparable):
    flops, sizes = 0, spatial
    for axis, factor in enumerate(kernel.factors):
      k, r_in, r_out = factor.shape
      stage, sizes = conv(sizes, (k,), (axis,), r_in, r_out)
      flops += stage
    return flops
  if isinstance(kernel, jaxfactor.LowRank):
    flops, out = conv(spatial, window, every_axis, c, kernel.rank)
    return flops + pointwise(out, kernel.rank, f)
  if isinstance(kernel, jaxfactor.Tucker):
    a, b = kernel.ranks
    flops, out = conv(spatial, window, every_axis, a, b)
    return pointwise(spatial, c, a) + flops + pointwise(out, b, f)
  if isinstance(kernel, jaxfactor.TensorTrain):
    # The window's R_0 filters on every channel (a depthwise conv, dense
    # when C = 1), then each core: every channel meets its f_i * R_i weights.
    width = c * kernel.ranks[0]
    flops, out = conv(spatial, window, every_axis, 1, width, dense=c == 1)
    for core in kernel.cores:
      r_in, c_i, f_i, r_out = core.shape
      flops += pointwise(out, width, f_i * r_out)
      width = width // (c_i * r_in) * f_i * r_out
    return flops
  # CP: per-axis depthwise stages on the CPU; merged into one depthwise
  # stage on GPU and TPU, whose filter costs one multiply per element of
  # each partial outer product.
  r = kernel.rank
  flops = pointwise(spatial, c, r)
  if platform == "cpu" or n == 1:
    sizes = spatial
    for axis, k in enumerate(window):
      stage, sizes = conv(sizes, (k,), (axis,), 1, r, dense=False)
      flops += stage
  else:
    stage, sizes = conv(spatial, window, every_axis, 1, r, dense=False)
    flops += stage + sum(math.prod(window[: i + 1]) * r for i in range(1, n))
  return flops + pointwise(sizes, r, f)


def _possible(case):
  return (case.get("padding") != "CAUSAL" or case.get("n", 1) == 1) and (
    case.get("multiplier", 1) == 1
    or case.get("kernel", "depthwise_separable") == "depthwise_separable"
  )


# --- cost against the closed forms --------------------------------------------


def test_closed_forms_for_a_realistic_layer():
  """3x3, 128 -> 128, 28x28, batch 1, written out by hand."""
  c = f = 128
  dense = jax.ShapeDtypeStruct((3, 3, c, f), jnp.float32)
  assert jaxfactor.cost(dense, (1, 28, 28, c), padding="VALID") == (
    jaxfactor.Cost(params=9 * c * f, flops=2 * 26 * 26 * 9 * c * f)
  )
  separable = jaxfactor.DepthwiseSeparable(
    jnp.zeros((3, 3, 1, c), jnp.float32), jnp.zeros((c, f), jnp.float32)
  )
  for platform in PLATFORMS:
    valid = jaxfactor.cost(
      separable,
      (1, 28, 28, c),
      padding="VALID",
      implementation="factorized",
      platform=platform,
    )
    assert valid == jaxfactor.Cost(
      params=9 * c + c * f, flops=2 * 26 * 26 * 9 * c + 2 * 26 * 26 * c * f
    )
    # "SAME": along each axis the two edge taps reach 27 of the 28 outputs,
    # the centre tap all 28: 82 in-range pairs per axis.
    same = jaxfactor.cost(
      separable,
      (1, 28, 28, c),
      padding="SAME",
      implementation="factorized",
      platform=platform,
    )
    assert same.flops == 2 * 82 * 82 * c + 2 * 28 * 28 * c * f


def test_in_range_pairs_by_hand():
  assert reference.in_range_pairs(28, 3, 1, 1, (1, 1)) == 82
  # 3 outputs reading positions (-1, 0, 1), (1, 2, 3), (3, 4, 5) of 0..4.
  assert reference.in_range_pairs(5, 3, 2, 1, (1, 1)) == 2 + 3 + 2
  # 4 outputs o reading o - 3 and o.
  assert reference.in_range_pairs(4, 2, 1, 3, (3, 0)) == 1 + 1 + 1 + 2
  # 2 outputs reading -2..2 and -1..3 of 0..1: taps 1, 2 and 3 read input.
  assert reference.reading_taps(2, 5, 1, 1, (2, 2)) == 3


COST_CASES = reference.all_pairs(
  {
    "kernel": KERNELS,
    "padding": PADDINGS,
    "n": (1, 2, 3),
    "strides": STRIDES,
    "dilation": STRIDES,
    "batch": BATCHES,
    "implementation": ("factorized", "reconstructed"),
    "platform": PLATFORMS,
    "tap_matmul": (False, True),
    "multiplier": (1, 3),
  },
  _possible,
)


@pytest.mark.parametrize("case", COST_CASES, ids=case_id)
def test_flops_equal_the_closed_form(case):
  n = case["n"]
  separable = case["kernel"] == "depthwise_separable"
  ranks = case["multiplier"] if separable else None
  kernel = random_kernel(case["kernel"], WINDOWS[n], 3, 5, ranks=ranks)
  shape = reference.spatial_input_shape(
    WINDOWS[n], batch=case["batch"], extra=5
  )
  kwargs = reference.geometry(case, n)
  with forced(tap_matmul=case["tap_matmul"]):
    flops = jaxfactor.cost(
      kernel,
      shape,
      implementation=case["implementation"],
      platform=case["platform"],
      **kwargs,
    ).flops
  assert flops == expected_flops(
    kernel,
    shape,
    kwargs,
    case["implementation"],
    case["platform"],
    case["tap_matmul"],
  )


@st.composite
def cost_cases(draw):
  name = draw(st.sampled_from(KERNELS))
  n = draw(st.integers(1, 3))
  window = tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
  c, f = draw(st.integers(1, 5)), draw(st.integers(1, 5))
  ranks = {
    "depthwise_separable": draw(st.integers(1, 3)),
    "spatially_separable": tuple(
      draw(st.lists(st.integers(1, 4), min_size=n - 1, max_size=n - 1))
    ),
    "low_rank": draw(st.integers(1, 4)),
    "tucker": (draw(st.integers(1, 4)), draw(st.integers(1, 4))),
    "cp": draw(st.integers(1, 4)),
    "tensor_train": (draw(st.integers(1, 4)), draw(st.integers(1, 4))),
    "dense": None,
  }[name]
  per_axis = st.lists(st.integers(1, 3), min_size=n, max_size=n).map(tuple)
  pair = st.tuples(st.integers(0, 3), st.integers(0, 3))
  modes = ["SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT"] + (
    ["CAUSAL"] if n == 1 else []
  )
  kwargs = dict(
    strides=draw(st.integers(1, 3) | per_axis),
    dilation=draw(st.integers(1, 3) | per_axis),
    padding=draw(
      st.sampled_from(modes)
      | st.integers(0, 3)
      | st.lists(st.integers(0, 3) | pair, min_size=n, max_size=n).map(tuple)
    ),
  )
  batch = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
  spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=n, max_size=n)))
  return dict(
    name=name,
    window=window,
    c=c,
    f=f,
    ranks=ranks,
    kwargs=kwargs,
    shape=(*batch, *spatial, c),
    implementation=draw(st.sampled_from(["factorized", "reconstructed"])),
    platform=draw(st.sampled_from(PLATFORMS)),
    tap_matmul=draw(st.booleans()),
  )


@given(cost_cases())
def test_flops_equal_the_closed_form_on_random_layers(case):
  kernel = random_kernel(
    case["name"], case["window"], case["c"], case["f"], ranks=case["ranks"]
  )
  kwargs, shape, n = case["kwargs"], case["shape"], len(case["window"])
  spatial = shape[-n - 1 : -1]
  strides = _per_axis(kwargs["strides"], n)
  dilation = _per_axis(kwargs["dilation"], n)
  pads, _ = reference.explicit_padding(
    kwargs["padding"], spatial, case["window"], strides, dilation
  )
  empty = any(
    reference.output_size(*args) < 1
    for args in zip(spatial, case["window"], strides, dilation, pads)
  )
  with forced(tap_matmul=case["tap_matmul"]):
    count = functools.partial(
      jaxfactor.cost,
      kernel,
      shape,
      implementation=case["implementation"],
      platform=case["platform"],
      **kwargs,
    )
    if empty:
      with pytest.raises(ValueError, match="the output would be empty"):
        count()
      return
    flops = count().flops
  assert flops == expected_flops(
    kernel,
    shape,
    kwargs,
    case["implementation"],
    case["platform"],
    case["tap_matmul"],
  )


def test_the_cpu_picks_tap_matmuls_itself_on_large_layers():
  """On a 28x28x128 input a 3x3 conv to 16 features runs as a tap matmul on
  the CPU (`_tap_matmul.applies`), as XLA's convolution elsewhere."""
  kernel = jax.ShapeDtypeStruct((3, 3, 128, 16), jnp.float32)
  shape = (2, 28, 28, 128)
  for platform, tap_matmul in (("cpu", True), ("gpu", False), ("tpu", False)):
    assert jaxfactor.cost(kernel, shape, platform=platform).flops == (
      expected_flops(kernel, shape, {}, "reconstructed", "cpu", tap_matmul)
    )


def test_cp_counts_its_merged_filter_on_gpu_and_tpu():
  fmt = random_format("cp", (3, 2, 2), 4, 6, ranks=5)
  shape = (2, 9, 8, 7, 4)
  count = lambda platform: (
    jaxfactor.cost(
      fmt, shape, implementation="factorized", platform=platform
    ).flops
  )
  # The merged filter: 3*2*5 + 3*2*2*5 multiplies, then a 12-tap depthwise
  # conv instead of three 2- and 3-tap ones.
  assert (
    count("gpu")
    == count("tpu")
    == expected_flops(fmt, shape, {}, "factorized", "gpu")
  )
  assert count("cpu") == expected_flops(fmt, shape, {}, "factorized", "cpu")
  assert count("cpu") < count("gpu")


def test_params_are_the_factor_sizes():
  for name in KERNELS:
    kernel = random_kernel(name, (3, 3), 4, 6)
    expected = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(kernel))
    assert jaxfactor.cost(kernel, (1, 8, 8, 4)).params == expected, name


@pytest.mark.parametrize(
  "name,platform",
  [(name, platform) for name in FORMATS for platform in PLATFORMS],
)
def test_abstract_formats_cost_the_same(name, platform):
  fmt = random_format(name, (3, 3), 4, 6, dtype=jnp.float32)
  abstract = jax.eval_shape(lambda: fmt)
  assert isinstance(jax.tree.leaves(abstract)[0], jax.ShapeDtypeStruct)
  for implementation in ("auto", "factorized", "reconstructed"):
    assert jaxfactor.cost(
      abstract, (2, 8, 8, 4), platform=platform, implementation=implementation
    ) == jaxfactor.cost(
      fmt, (2, 8, 8, 4), platform=platform, implementation=implementation
    )


# --- "auto" -------------------------------------------------------------------

# Factors scaled by 2**+-110 and inputs by 2**30: every factorized chain
# overflows float32 in its first stage (~2**140), while the dense kernel,
# where the scales cancel, and the reconstructed convolution stay finite. So
# a finite output says that "reconstructed" ran.
_UP, _DOWN = 2.0**110, 2.0**-110


def _overflowing(fmt):
  leaves = jax.tree.leaves(fmt)
  leaves[0], leaves[-1] = leaves[0] * _UP, leaves[-1] * _DOWN
  return jax.tree.unflatten(jax.tree.structure(fmt), leaves)


def _ran(fn, x, fmt):
  """Which implementation `fn(x, fmt)` ran, from the overflow."""
  y = np.asarray(jax.jit(fn)(x * 2.0**30, _overflowing(fmt)))
  return "reconstructed" if np.isfinite(y).all() else "factorized"


AUTO_CASES = [  # (format, channels, ranks, input shape)
  ("depthwise_separable", 8, 1, (8, 16, 16)),
  ("low_rank", 8, 4, (8, 16, 16)),
  ("tucker", 64, (64, 64), (1, 6, 6)),
  ("tucker", 64, (64, 64), (8, 16, 16)),
  ("cp", 16, 8, (1, 6, 6)),
  ("cp", 16, 8, (8, 16, 16)),
]


@pytest.mark.parametrize("name", FORMATS)
def test_overflow_tells_the_implementations_apart(name):
  fmt = random_format(name, (3, 3), 4, 4, dtype=jnp.float32)
  x = reference.random_input((1, 6, 6, 4), dtype=jnp.float32)
  for implementation in ("factorized", "reconstructed"):
    fn = functools.partial(jaxfactor.conv, implementation=implementation)
    assert _ran(fn, x, fmt) == implementation


@pytest.mark.parametrize("name,channels,ranks,spatial", AUTO_CASES)
def test_auto_runs_what_cost_counts_on_cpu(name, channels, ranks, spatial):
  fmt = random_format(
    name, (3, 3), channels, channels, ranks=ranks, dtype=jnp.float32
  )
  x = reference.random_input((*spatial, channels), dtype=jnp.float32)
  counts = {
    implementation: jaxfactor.cost(
      fmt, x.shape, implementation=implementation, platform="cpu"
    ).flops
    for implementation in ("factorized", "reconstructed")
  }
  assert counts["factorized"] != counts["reconstructed"]
  ran = _ran(jaxfactor.conv, x, fmt)
  assert jaxfactor.cost(fmt, x.shape, platform="cpu").flops == counts[ran]


def test_auto_cases_run_both_implementations():
  """The cases above are not all one implementation's: the choice follows
  the shapes (full-rank Tucker: reconstruction's fixed cost pays off on
  larger inputs; CP rank 8: its chain pays off on larger inputs)."""
  choices = {}
  for name, channels, ranks, spatial in AUTO_CASES:
    fmt = jax.eval_shape(
      functools.partial(
        random_format,
        name,
        (3, 3),
        channels,
        channels,
        ranks=ranks,
        dtype=jnp.float32,
      )
    )
    shape = (*spatial, channels)
    auto = jaxfactor.cost(fmt, shape, platform="cpu").flops
    factorized = jaxfactor.cost(
      fmt, shape, platform="cpu", implementation="factorized"
    ).flops
    choices[name, spatial] = auto == factorized
  assert choices["tucker", (1, 6, 6)] and not choices["tucker", (8, 16, 16)]
  assert not choices["cp", (1, 6, 6)] and choices["cp", (8, 16, 16)]


def test_auto_may_choose_differently_per_platform():
  """A depthwise-separable 8 -> 8 layer: the CPU's depthwise kernel runs at
  1/6 of its matmul rate, factorized wins; on GPU and TPU the grouped conv
  runs at 1/25-1/100 of the matmul rate and one dense conv wins. One jitted
  function lowers to each."""
  fmt = random_format(
    "depthwise_separable", (3, 3), 8, 8, ranks=1, dtype=jnp.float32
  )
  x = jnp.ones((8, 16, 16, 8), jnp.float32)
  for platform, chosen in (
    ("cpu", "factorized"),
    ("gpu", "reconstructed"),
    ("tpu", "reconstructed"),
  ):
    count = functools.partial(jaxfactor.cost, fmt, x.shape, platform=platform)
    assert count().flops == count(implementation=chosen).flops, platform
  traced = jax.jit(jaxfactor.conv).trace(x, fmt)
  for platform, groups in (("cuda", 1), ("tpu", 1), ("cpu", None)):
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    if groups is None:  # the native kernel or the shift-add, no conv
      assert "stablehlo.convolution" not in text
    else:  # one dense convolution
      assert text.count("stablehlo.convolution") == 1
      assert "feature_group_count = 8" not in text


def test_auto_is_factorized_with_a_symbolic_batch():
  """`jax.export` with a symbolic batch: no static shape to price."""
  fmt = random_format(
    "tucker", (3, 3), 64, 64, ranks=(64, 64), dtype=jnp.float32
  )
  assert jaxfactor.cost(fmt, (8, 16, 16, 64), platform="cpu").flops == (
    jaxfactor.cost(
      fmt, (8, 16, 16, 64), platform="cpu", implementation="reconstructed"
    ).flops
  )
  (b,) = export.symbolic_shape("b")
  exported = export.export(jax.jit(jaxfactor.conv))(
    jax.ShapeDtypeStruct((b, 16, 16, 64), jnp.float32),
    jax.eval_shape(lambda: fmt),
  )
  x = reference.random_input((8, 16, 16, 64), dtype=jnp.float32)
  assert _ran(exported.call, x, fmt) == "factorized"


def test_auto_prices_bytes_and_narrow_gemms_not_just_flops():
  """Measured on the CPU (`benchmarks/conv.py`): rank-4 LowRank on a
  32x56x56x8 batch has 0.56x the dense FLOPs, but its first stage is a GEMM
  with 4 output columns and runs ~2x slower than the dense conv; a
  depthwise-separable layer there is memory-bound yet still faster."""
  shape = (32, 56, 56, 8)
  low_rank = jaxfactor.LowRank(jnp.ones((3, 3, 8, 4)), jnp.ones((4, 8)))
  separable = jaxfactor.DepthwiseSeparable(
    jnp.ones((3, 3, 1, 8)), jnp.ones((8, 8))
  )
  count = lambda fmt, implementation: (
    jaxfactor.cost(
      fmt, shape, platform="cpu", implementation=implementation
    ).flops
  )
  assert count(low_rank, "factorized") < 0.6 * count(low_rank, "reconstructed")
  assert count(low_rank, "auto") == count(low_rank, "reconstructed")
  assert count(separable, "auto") == count(separable, "factorized")


def test_auto_prices_one_dimensional_convs_below_square_ones():
  """Measured on the CPU: 3x1 and 1x3 convs run at ~0.6x the rate of 3x3
  convs, so a stride-2 SpatiallySeparable layer with 2/3 of the dense FLOPs
  is slower factorized (benchmark shape s2_56: 1.6x forward), while at
  stride 1 with 1/3 of the FLOPs it is faster (mb56: ~1.25x)."""
  shape = (32, 56, 56, 128)

  def choice(features, rank, stride):
    fmt = jaxfactor.SpatiallySeparable(
      (jnp.ones((3, 128, rank)), jnp.ones((3, rank, features)))
    )
    count = functools.partial(
      jaxfactor.cost, fmt, shape, strides=stride, platform="cpu"
    )
    flops = {
      i: count(implementation=i).flops for i in ("factorized", "reconstructed")
    }
    return next(i for i, f in flops.items() if f == count().flops), flops

  chosen, flops = choice(256, 128, 2)
  assert flops["factorized"] < 0.7 * flops["reconstructed"]
  assert chosen == "reconstructed"
  assert choice(128, 64, 1)[0] == "factorized"


# --- canaries: XLA's own count ------------------------------------------------
#
# Canaries against jaxlib changes, not specifications: XLA:CPU's
# `cost_analysis()` of the compiled program, with every stage visible to
# XLA (depthwise stages forced to the grouped convolution, no tap matmul),
# float32 (XLA:CPU rewrites float64 grouped convolutions as dense ones).
# If one fails after a jaxlib upgrade, XLA's cost model changed: check the
# closed forms above, which are the specification.

CANARIES = {
  "dense_same_strided": ("dense", dict(strides=2)),
  "low_rank": ("low_rank", dict(padding="VALID", dilation=(1, 2))),
  "tucker": ("tucker", dict(padding=((2, 0), (1, 1)))),
  "depthwise_separable": ("depthwise_separable", dict(strides=(2, 1))),
  "cp": ("cp", dict(padding="CIRCULAR")),
  "tensor_train": ("tensor_train", dict(strides=(1, 2), padding="VALID")),
}


@pytest.mark.parametrize("canary", CANARIES)
def test_canary_xla_counts_the_same(canary):
  name, kwargs = CANARIES[canary]
  kernel = random_kernel(name, (3, 2), 3, 5, dtype=jnp.float32)
  x = jax.ShapeDtypeStruct((2, 9, 8, 3), jnp.float32)
  fn = functools.partial(jaxfactor.conv, implementation="factorized", **kwargs)
  with forced(depthwise="grouped", tap_matmul=False):
    xla = reference.xla_flops(fn, x, kernel)
    ours = jaxfactor.cost(
      kernel, x.shape, implementation="factorized", platform="cpu", **kwargs
    ).flops
  assert ours == xla


def test_canary_xla_counts_a_tap_matmul_the_same():
  kernel = jnp.ones((3, 2, 4, 5), jnp.float32)
  x = jax.ShapeDtypeStruct((1, 7, 6, 4), jnp.float32)
  fn = functools.partial(jaxfactor.conv, padding=1)
  with forced(tap_matmul=True):
    xla = reference.xla_flops(fn, x, kernel)
    ours = jaxfactor.cost(kernel, x.shape, padding=1, platform="cpu").flops
  assert ours == xla
