"""`conv`, `depthwise_conv` and `pointwise_conv` against independent oracles.

Every format and dense kernels equal Flax's `nn.Conv` (or
`lax.conv_general_dilated`) with `to_dense()`, on every geometry option,
both implementations, every CPU depthwise lowering and the tap matmul on
and off: a pairwise sweep (`reference.all_pairs`) holds every pair of those
options in some case. Then the transformations (jit, vmap, grad of vmap, no
retracing), 16-bit dtypes, the native kernel's code paths, and how each
platform's lowering is chosen when the program is lowered.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax import export
from jax import lax
from reference import BATCHES
from reference import DEPTHWISE_LOWERINGS
from reference import FORMATS
from reference import KERNELS
from reference import PADDINGS
from reference import STRIDES
from reference import WINDOWS
from reference import case_id
from reference import flax_conv
from reference import needs_native
from reference import random_format
from reference import random_input
from reference import random_kernel
from reference import relative_error
from reference import rtol
from reference import spatial_input_shape

import jaxfactor
from jaxfactor import _lowering
from jaxfactor import _native
from jaxfactor import _stages
from jaxfactor._lowering import forced

F64 = jnp.float64
# (format, CPU depthwise lowering): every lowering for the formats with
# depthwise stages, the default for the others.
FORMAT_LOWERINGS = [
  (name, lowering)
  for name in FORMATS
  for lowering in (
    DEPTHWISE_LOWERINGS
    if name in ("depthwise_separable", "cp", "tensor_train")
    else (None,)
  )
]


def _possible(case):
  """CAUSAL padding is 1-D only, a channel multiplier DepthwiseSeparable's."""
  return (case.get("padding") != "CAUSAL" or case.get("n", 1) == 1) and (
    case.get("multiplier", 1) == 1
    or case.get("kernel", "depthwise_separable") == "depthwise_separable"
  )


def _skip_native(lowering):
  reference.skip_unless_available(lowering)


def _lowered(fn, *args, platform="cpu"):
  """The StableHLO text of `jax.jit(fn)(*args)` lowered for one platform."""
  return (
    jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  )


# --- the pairwise helper ------------------------------------------------------


def test_all_pairs_holds_every_possible_pair_in_few_cases():
  options = {
    "kernel": KERNELS,
    "n": (1, 2, 3),
    "padding": PADDINGS,
    "strides": STRIDES,
    "multiplier": (1, 3),
  }
  cases = reference.all_pairs(options, _possible)
  for case in cases:
    assert set(case) == set(options) and _possible(case), case
  names = list(options)
  for i, a in enumerate(names):
    for b in names[i + 1 :]:
      for u in options[a]:
        for v in options[b]:
          held = any(case[a] == u and case[b] == v for case in cases)
          assert held == _possible({a: u, b: v}), (a, u, b, v)
  # The product is 7 * 3 * 8 * 3 * 2 = 1008; the largest pair set is 56.
  assert len(cases) <= 60


# --- every option against Flax ------------------------------------------------

CONV_CASES = reference.all_pairs(
  {
    "kernel": KERNELS,
    "padding": PADDINGS,
    "n": (1, 2, 3),
    "strides": STRIDES,
    "dilation": STRIDES,
    "batch": BATCHES,
    "implementation": ("factorized", "reconstructed", "auto"),
    "depthwise": DEPTHWISE_LOWERINGS,
    "tap_matmul": (False, True),
    "multiplier": (1, 3),
  },
  _possible,
)


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_equals_flax_conv_of_the_dense_kernel(case):
  _skip_native(case["depthwise"])
  n = case["n"]
  window = WINDOWS[n]
  separable = case["kernel"] == "depthwise_separable"
  ranks = case["multiplier"] if separable else None
  kernel = random_kernel(case["kernel"], window, 3, 5, ranks=ranks)
  x = random_input(spatial_input_shape(window, batch=case["batch"], extra=5))
  kwargs = reference.geometry(case, n)
  fn = jax.jit(
    functools.partial(
      jaxfactor.conv, implementation=case["implementation"], **kwargs
    )
  )
  with forced(depthwise=case["depthwise"], tap_matmul=case["tap_matmul"]):
    actual = fn(x, kernel)
  expected = flax_conv(x, reference.dense(kernel), **kwargs)
  assert actual.shape == expected.shape
  assert relative_error(actual, expected) < rtol(F64)


def test_dense_kernel_equals_a_hand_written_lax_call():
  """Flax is the oracle above; this one is `lax` alone, explicit pads."""
  kernel = random_input((3, 2, 3, 4), seed=3)
  x = random_input((2, 9, 8, 3))
  actual = jax.jit(
    functools.partial(
      jaxfactor.conv, strides=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2)
    )
  )(x, kernel)
  expected = lax.conv_general_dilated(
    x,
    kernel,
    (2, 1),
    ((1, 2), (0, 1)),
    rhs_dilation=(1, 2),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=lax.Precision.HIGHEST,
  )
  assert relative_error(actual, expected) < rtol(F64)


@pytest.mark.parametrize("strides", [1, (3, 2)])
@pytest.mark.parametrize("padding", ["VALID", 1, "CIRCULAR"])
def test_one_by_one_dense_kernel_equals_flax(strides, padding):
  """Unpadded 1x1 kernels run as a strided slice and a contraction."""
  x = random_input((2, 9, 8, 5))
  kernel = random_input((1, 1, 5, 7), seed=2)
  fn = jax.jit(
    functools.partial(jaxfactor.conv, strides=strides, padding=padding)
  )
  expected = flax_conv(x, kernel, strides=strides, padding=padding)
  assert relative_error(fn(x, kernel), expected) < rtol(F64)


DEPTHWISE_CASES = reference.all_pairs(
  {
    "padding": PADDINGS,
    "n": (1, 2, 3),
    "multiplier": (1, 3),
    "strides": STRIDES,
    "dilation": STRIDES,
    "depthwise": DEPTHWISE_LOWERINGS,
    "batch": BATCHES,
  },
  _possible,
)


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=case_id)
def test_depthwise_conv_equals_flax_grouped_conv(case):
  _skip_native(case["depthwise"])
  n, channels = case["n"], 3
  kernel = random_input((*WINDOWS[n], 1, channels * case["multiplier"]), seed=4)
  x = random_input(
    spatial_input_shape(WINDOWS[n], batch=case["batch"], extra=5)
  )
  kwargs = reference.geometry(case, n)
  fn = jax.jit(functools.partial(jaxfactor.depthwise_conv, **kwargs))
  with forced(depthwise=case["depthwise"]):
    actual = fn(x, kernel)
  expected = flax_conv(x, kernel, feature_group_count=channels, **kwargs)
  assert actual.shape == expected.shape
  assert relative_error(actual, expected) < rtol(F64)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3), (0,)])
def test_pointwise_conv_equals_a_one_by_one_conv(batch):
  x = random_input((*batch, 5, 4, 3))
  kernel = random_input((3, 6), seed=2)
  actual = jax.jit(jaxfactor.pointwise_conv)(x, kernel)
  expected = flax_conv(x, kernel.reshape(1, 1, 3, 6))
  assert actual.shape == expected.shape
  assert relative_error(actual, expected) < rtol(F64)


# --- transformations ----------------------------------------------------------


@pytest.mark.parametrize("name,lowering", FORMAT_LOWERINGS)
def test_jit_equals_eager(name, lowering):
  _skip_native(lowering)
  fmt = random_format(name, (3, 2), 3, 5)
  x = random_input((2, 7, 6, 3))
  conv = functools.partial(
    jaxfactor.conv,
    strides=(1, 2),
    padding="CIRCULAR",
    implementation="factorized",
  )
  with forced(depthwise=lowering):
    eager = conv(x, fmt)
    jitted = jax.jit(conv)(x, fmt)
  np.testing.assert_allclose(jitted, eager, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name,lowering", FORMAT_LOWERINGS)
def test_vmap_over_inputs_and_factors_equals_a_loop(name, lowering):
  _skip_native(lowering)
  stack = [random_format(name, (3, 2), 3, 5, seed=s) for s in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *stack)
  xs = random_input((3, 2, 6, 5, 3))
  conv = jax.jit(
    functools.partial(jaxfactor.conv, strides=2, implementation="factorized")
  )
  with forced(depthwise=lowering):
    both = jax.jit(jax.vmap(conv))(xs, stacked)
    # A mapped input axis that is not the leading one, shared factors.
    inputs = jax.jit(jax.vmap(conv, in_axes=(2, None)))(
      jnp.moveaxis(xs, 0, 2), stack[0]
    )
    factors = jax.jit(jax.vmap(conv, in_axes=(None, 0)))(xs[0], stacked)
    loop = [conv(x, f) for x, f in zip(xs, stack)]
    loop_x = [conv(x, stack[0]) for x in xs]
    loop_f = [conv(xs[0], f) for f in stack]
  chex.assert_trees_all_close(both, jnp.stack(loop), rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(inputs, jnp.stack(loop_x), rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(
    factors, jnp.stack(loop_f), rtol=1e-12, atol=1e-12
  )


@pytest.mark.parametrize("name,lowering", FORMAT_LOWERINGS)
def test_grad_of_vmap_equals_the_sum_of_grads(name, lowering):
  _skip_native(lowering)
  fmt = random_format(name, (3, 2), 3, 5)
  xs = random_input((4, 1, 6, 5, 3))

  def loss(f, x):
    return jnp.sum(
      jnp.sin(jaxfactor.conv(x, f, strides=(2, 1), implementation="factorized"))
    )

  with forced(depthwise=lowering):
    batched = jax.jit(
      jax.grad(lambda f: jnp.sum(jax.vmap(lambda x: loss(f, x))(xs)))
    )(fmt)
    grad = jax.jit(jax.grad(loss))
    summed = jax.tree.map(lambda *g: sum(g), *[grad(fmt, x) for x in xs])
  assert isinstance(batched, type(fmt))
  chex.assert_trees_all_close(batched, summed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", KERNELS)
def test_no_retracing_on_new_values_of_the_same_shapes(name):
  kernel = random_kernel(name, (3, 3), 3, 4)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def apply(x, kernel):
    return jaxfactor.conv(x, kernel, strides=2)

  apply(random_input((2, 8, 8, 3), seed=1), kernel)
  apply(
    random_input((2, 8, 8, 3), seed=2), jax.tree.map(lambda a: a + 1.0, kernel)
  )


# --- dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("lowering", DEPTHWISE_LOWERINGS)
def test_16_bit_depthwise_is_computed_in_float32_and_rounded_once(
  lowering, dtype
):
  """64 taps: summed in 16 bits, the error would be ~2x `ROUNDED_ONCE`.
  Forward, input and weight gradient, against float64 on the same 16-bit
  operands."""
  _skip_native(lowering)
  x = random_input((2, 90, 4), dtype=dtype)
  kernel = random_input((64, 1, 4), seed=2, dtype=dtype)
  cotangent = random_input((2, 90, 4), seed=3, dtype=dtype)
  wide = reference.cast((x, kernel, cotangent), F64)

  def results(conv, x, kernel, cotangent):
    y, pullback = jax.vjp(conv, x, kernel)
    return (y, *pullback(cotangent))

  with forced(depthwise=lowering):
    low = jax.jit(functools.partial(results, jaxfactor.depthwise_conv))(
      x, kernel, cotangent
    )
  exact = results(lambda x, k: flax_conv(x, k, feature_group_count=4), *wide)
  for got, want in zip(low, exact):
    assert got.dtype == dtype
    assert relative_error(got, want) < reference.ROUNDED_ONCE[jnp.dtype(dtype)]


LOW_PRECISION_CASES = reference.all_pairs(
  {
    "kernel": FORMATS,
    "depthwise": DEPTHWISE_LOWERINGS,
    "dtype": ("bfloat16", "float16"),
    "preferred": (None, "float32"),
  }
)


@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=case_id)
def test_16_bit_formats_within_tolerance_of_float64(case):
  """Against float64 on the same 16-bit operands: the inputs of each stage
  are rounded (`RTOL`); with float32 accumulation they are not, and the
  result is within float32's tolerance."""
  _skip_native(case["depthwise"])
  dtype, preferred = jnp.dtype(case["dtype"]), case["preferred"]
  fmt = reference.cast(random_format(case["kernel"], (3, 3), 8, 8), dtype)
  x = random_input((2, 9, 9, 8), dtype=dtype)
  fn = jax.jit(
    functools.partial(
      jaxfactor.conv,
      implementation="factorized",
      preferred_element_type=preferred,
    )
  )
  with forced(depthwise=case["depthwise"]):
    y = fn(x, fmt)
  assert y.dtype == (preferred or dtype)
  expected = flax_conv(
    reference.cast(x, F64), reference.dense(reference.cast(fmt, F64))
  )
  bound = rtol(dtype) if preferred is None else rtol(jnp.float32)
  assert relative_error(y, expected) < bound


WIDENING_CASES = reference.all_pairs(
  {
    "kernel": KERNELS,
    "depthwise": DEPTHWISE_LOWERINGS,
    "implementation": ("factorized", "reconstructed"),
  }
)


@pytest.mark.parametrize("case", WIDENING_CASES, ids=case_id)
def test_preferred_element_type_widens_every_stage(case):
  """float32 operands with a float64 result equal the float64 computation
  to float64 precision only if *every* stage of the chain runs in float64."""
  _skip_native(case["depthwise"])
  kernel32 = reference.cast(
    random_kernel(case["kernel"], (3, 3), 4, 4), jnp.float32
  )
  x32 = random_input((1, 6, 6, 4), dtype=jnp.float32)
  conv = functools.partial(
    jaxfactor.conv, implementation=case["implementation"]
  )
  with forced(depthwise=case["depthwise"]):
    y = jax.jit(functools.partial(conv, preferred_element_type=F64))(
      x32, kernel32
    )
    exact = jax.jit(conv)(*reference.cast((x32, kernel32), F64))
  assert y.dtype == F64
  assert relative_error(y, exact) < rtol(F64)


# --- the native CPU kernel ----------------------------------------------------

# Channel counts that take each of the native kernel's code paths, per
# dtype (16 float32 / 8 float64 lanes per vector): scalar channels, a flat
# row with the weights repeated to 1, 3, 5 or 7 vectors, vector tiles with
# a scalar tail, whole vectors, and wide blocks with leftovers.
NATIVE_CHANNELS = (1, 3, 5, 7, 8, 9, 16, 24, 40, 64, 72, 144, 200)
# (width, window, stride, dilation, padding) on the last axis, where the
# kernel's row code runs: rows with an interior, strided rows, dilated, odd
# explicit padding, a row shorter than the window, a one-tap window.
NATIVE_ROWS = (
  (19, 3, 1, 1, (1, 1)),
  (13, 3, 2, 1, (1, 1)),
  (11, 5, 1, 2, (0, 0)),
  (12, 3, 3, 1, (2, 3)),
  (2, 3, 1, 1, (1, 1)),
  (9, 1, 1, 1, (0, 0)),
)


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=str)
@pytest.mark.parametrize("row", NATIVE_ROWS, ids=str)
def test_native_code_paths_equal_the_definition(row, dtype):
  """Forward pass, input and weight gradient against the definition
  (`reference.numpy_depthwise`), for every channel count in NATIVE_CHANNELS
  (RTOL per dtype: the same products summed in another order)."""
  width, window, stride, dilation, pad = row
  geometry = dict(
    strides=(1, stride), dilation=(1, dilation), padding=((1, 1), pad)
  )
  conv = functools.partial(jaxfactor.depthwise_conv, **geometry)

  @jax.jit
  def passes(operands):  # one program for every channel count
    results = []
    for x, kernel, cotangent in operands:
      y, pullback = jax.vjp(conv, x, kernel)
      results.append((y, *pullback(cotangent)))
    return results

  operands = []
  for channels in NATIVE_CHANNELS:
    x = random_input((2, 5, width, channels), dtype=dtype)
    kernel = random_input((3, window, 1, channels), seed=2, dtype=dtype)
    out = jax.eval_shape(conv, x, kernel).shape
    operands.append((x, kernel, random_input(out, seed=3, dtype=dtype)))
  with forced(depthwise="native"):
    results = passes(operands)
  for channels, (x, kernel, cotangent), got in zip(
    NATIVE_CHANNELS, operands, results
  ):
    want = reference.numpy_depthwise(
      x,
      kernel[:, :, 0],
      cotangent,
      strides=(1, stride),
      pads=((1, 1), pad),
      dilation=(1, dilation),
    )
    for a, b in zip(got, (want[0], want[1], want[2][:, :, None])):
      assert relative_error(a, b) < rtol(dtype), channels


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=str)
def test_native_is_deterministic(dtype):
  """Each output is summed by one thread in a fixed order, the weight
  gradient's partial sums in a fixed order: bitwise repeatable."""
  x = random_input((4, 9, 7, 64), dtype=dtype)
  kernel = random_input((3, 3, 1, 64), seed=2, dtype=dtype)
  fn = jax.jit(
    jax.value_and_grad(
      lambda x, k: jnp.sum(
        jnp.sin(jaxfactor.depthwise_conv(x, k, strides=(2, 1), dilation=(1, 2)))
      ),
      (0, 1),
    )
  )
  with forced(depthwise="native"):
    first, second = fn(x, kernel), fn(x, kernel)
  chex.assert_trees_all_equal(first, second)


@needs_native
def test_native_runs_one_custom_call_per_pass():
  """Forward, input gradient and weight gradient are one custom call each,
  and nothing else of XLA's (no loop, no conditional)."""
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  kernel = jnp.ones((3, 3, 1, 4), jnp.float32)
  fn = jax.grad(
    lambda x, k: jnp.sum(jaxfactor.depthwise_conv(x, k) ** 2), (0, 1)
  )
  with forced(depthwise="native"):
    text = _lowered(fn, x, kernel)
  for name in ("forward", "input_grad", "weight_grad"):
    assert text.count(f"@jaxfactor_depthwise_{name}(") == 1, name
  assert text.count("stablehlo.custom_call") == 3
  assert "stablehlo.while" not in text and "stablehlo.case" not in text


@needs_native
def test_16_bit_operands_run_the_native_kernel_in_float32():
  x = random_input((2, 6, 5, 4), dtype=jnp.bfloat16)
  kernel = random_input((3, 3, 1, 4), seed=2, dtype=jnp.bfloat16)
  fn = jaxfactor.depthwise_conv
  with forced(depthwise="native"):
    text = _lowered(fn, x, kernel)
    low = jax.jit(fn)(x, kernel)
    wide = jax.jit(fn)(*reference.cast((x, kernel), jnp.float32))
  assert "@jaxfactor_depthwise_forward(" in text
  assert "tensor<2x1x6x5x4xf32>" in text  # [B, 1, *spatial, C] in float32
  chex.assert_trees_all_equal(low, reference.cast(wide, jnp.bfloat16))


def test_more_than_three_spatial_axes_run_the_shift_add():
  """The native kernel takes at most 3 spatial axes: a 4-D depthwise conv
  runs the shift-add by default on CPU."""
  x = random_input((1, 4, 3, 3, 5, 2))
  kernel = random_input((2, 2, 1, 3, 1, 2), seed=3)
  text = _lowered(jaxfactor.depthwise_conv, x, kernel)
  assert "custom_call" not in text
  expected = lax.conv_general_dilated(
    x,
    kernel,
    (1,) * 4,
    "SAME",
    feature_group_count=2,
    dimension_numbers=("NWXYZC", "WXYZIO", "NWXYZC"),
    precision=lax.Precision.HIGHEST,
  )
  actual = jax.jit(jaxfactor.depthwise_conv)(x, kernel)
  assert relative_error(actual, expected) < rtol(F64)


def test_cpu_without_the_native_kernel_runs_the_shift_add(monkeypatch):
  """Where the kernel cannot be built (no compiler, `JAXFACTOR_NATIVE=0`)."""
  monkeypatch.setattr(_native, "available", lambda: False)
  x = random_input((2, 6, 5, 4))
  kernel = random_input((3, 3, 1, 4), seed=2)
  jax.clear_caches()
  text = _lowered(jaxfactor.depthwise_conv, x, kernel)
  actual = jax.jit(jaxfactor.depthwise_conv)(x, kernel)
  jax.clear_caches()
  assert "custom_call" not in text
  assert "stablehlo.convolution" not in text  # not the grouped conv either
  expected = flax_conv(x, kernel, feature_group_count=4)
  assert relative_error(actual, expected) < rtol(F64)


@needs_native
def test_native_under_vmap():
  """A mapped activation joins the batch axis; mapped weights run one call
  per element. Both equal the loop."""
  xs = random_input((3, 2, 6, 5, 4))
  ks = random_input((3, 3, 3, 1, 4), seed=2)
  conv = jax.jit(jaxfactor.depthwise_conv)
  with forced(depthwise="native"):
    for in_axes in ((0, None), (0, 0), (None, 0)):
      args = [a if axis == 0 else a[0] for a, axis in zip((xs, ks), in_axes)]
      got = jax.jit(jax.vmap(conv, in_axes))(*args)
      want = jnp.stack(
        [
          conv(*(a[i] if axis == 0 else a for a, axis in zip(args, in_axes)))
          for i in range(3)
        ]
      )
      assert relative_error(got, want) < rtol(F64), in_axes


# --- the shift-add ------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_shift_add_fence_keeps_every_channel(bad):
  """The fence's predicate reads one weight: a NaN or inf there changes
  only the channels that weight reaches, as in the grouped conv."""
  kernel = random_input((3, 3, 1, 3), seed=1).at[0, 0, 0, 0].set(bad)
  x = random_input((2, 5, 6, 3))
  expected = flax_conv(x, kernel, feature_group_count=3)
  conv = jax.jit(jaxfactor.depthwise_conv)
  input_grad = jax.jit(
    jax.grad(lambda x, k: jaxfactor.depthwise_conv(x, k)[..., 1:].sum())
  )
  with forced(depthwise="shift_add"):
    actual = conv(x, kernel)
    dx = input_grad(x, kernel)
  assert not np.isfinite(actual[..., 0]).all()
  assert relative_error(actual[..., 1:], expected[..., 1:]) < rtol(F64)
  assert np.isfinite(dx[..., 1:]).all()


def test_shift_add_output_is_computed_once():
  """A canary of XLA's fusion choices: the k-tap sums (forward and input
  gradient) run inside a conditional, which XLA keeps (it does not fold the
  predicate), so that their consumers read one buffer instead of each
  recomputing the sum (`_shift_add.materialized`)."""
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  kernel = jnp.ones((3, 3, 1, 4), jnp.float32)
  fn = lambda x, k: jaxfactor.depthwise_conv(x, k).mean(axis=(0, 1, 2)).sum()
  with forced(depthwise="shift_add"):
    for program in (fn, jax.grad(fn)):
      compiled = jax.jit(program).lower(x, kernel).compile().as_text()
      assert " conditional(" in compiled


# --- lowering per platform ----------------------------------------------------


@needs_native
def test_depthwise_lowers_to_the_native_kernel_on_cpu_only():
  """One jitted function: the CPU lowering calls the native kernel, the
  GPU and TPU lowerings XLA's grouped convolution."""
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  kernel = jnp.ones((3, 3, 1, 8), jnp.float32)
  fn = jax.grad(
    lambda x, k: jnp.sum(jaxfactor.depthwise_conv(x, k) ** 2), (0, 1)
  )
  assert _lowered(fn, x, kernel).count("@jaxfactor_depthwise_") == 3
  for platform in ("cuda", "tpu"):
    text = _lowered(fn, x, kernel, platform=platform)
    assert "custom_call" not in text
    # Channel multiplier 2: the input channels repeated, 8 groups.
    assert "feature_group_count = 8" in text


def test_cp_merges_its_depthwise_stages_on_gpu_and_tpu_only():
  fmt = random_format("cp", (3, 2), 4, 5, dtype=jnp.float32)  # rank 3
  x = jnp.ones((2, 9, 8, 4), jnp.float32)
  fn = functools.partial(jaxfactor.conv, implementation="factorized")
  for platform in ("cuda", "tpu"):
    text = _lowered(fn, x, fmt, platform=platform)
    assert text.count("stablehlo.convolution") == 1
    assert "feature_group_count = 3" in text
    assert "tensor<3x2x1x3xf32>" in text  # the merged 3x2 filter
  cpu = _lowered(fn, x, fmt)
  assert "stablehlo.convolution" not in cpu  # two per-axis depthwise steps
  assert cpu.count("jaxfactor_depthwise_forward") == (
    2 if _native.available() else 0
  )


MERGED_CASES = reference.all_pairs(
  {
    "padding": tuple(p for p in PADDINGS if p != "CAUSAL"),
    "n": (2, 3),
    "strides": STRIDES,
    "dilation": STRIDES,
    "batch": BATCHES[:3],
  }
)


@pytest.mark.parametrize("case", MERGED_CASES, ids=case_id)
def test_cp_merged_plan_equals_flax(case):
  """The GPU/TPU plan of CP (its per-axis depthwise filters as one filter),
  run here on the CPU, on every geometry."""
  n = case["n"]
  fmt = random_format("cp", WINDOWS[n], 3, 5)
  x = random_input(
    spatial_input_shape(WINDOWS[n], batch=case["batch"], extra=5)
  )
  kwargs = reference.geometry(case, n)

  @jax.jit
  def gpu_plan(x, fmt):
    flat, batch, geometry = _stages.prepare("test", x, fmt.window, **kwargs)
    plan = _lowering.plan(fmt.stages(), flat.shape, geometry, "gpu")
    assert len(plan.steps) == 3  # in_proj, the merged filter, out_proj
    y = _lowering.run(flat, plan.steps, geometry)
    return _stages.restore_batch(y, batch)

  expected = flax_conv(x, reference.dense(fmt), **kwargs)
  assert relative_error(gpu_plan(x, fmt), expected) < rtol(F64)


def test_only_depthwise_stages_over_disjoint_axes_merge():
  a = _stages.SpatialConv(jnp.ones((3, 1, 4)), (0,), 4)
  b = _stages.SpatialConv(jnp.full((2, 1, 4), 2.0), (1,), 4)
  merged, flops = _stages.merge_depthwise_stages([a, b])
  assert len(merged) == 1 and merged[0].axes == (0, 1)
  assert flops == 3 * 2 * 4
  chex.assert_trees_all_equal(merged[0].kernel, jnp.full((3, 2, 1, 4), 2.0))
  # The axes come out in order, whichever stage runs first.
  (ba,), _ = _stages.merge_depthwise_stages([b, a])
  chex.assert_trees_all_equal(ba.kernel, merged[0].kernel)
  for stages in (
    [a, a],  # the same axis twice
    [a, _stages.SpatialConv(jnp.ones((2, 1, 8)), (1,), 4)],
    [a, _stages.Pointwise(jnp.ones((4, 4))), b],
    [a, _stages.SpatialConv(jnp.ones((2, 4, 4)), (1,))],
  ):
    assert _stages.merge_depthwise_stages(stages) == (list(stages), 0)


@needs_native
def test_no_conditional_left_after_lowering_for_one_platform():
  """CP's CPU and GPU plans differ, so `conv` stages out both under
  `lax.platform_dependent`; compiled for the CPU, only its branch remains
  (the native kernel forced, so that no shift-add fence adds its own)."""
  fmt = random_format("cp", (3, 3), 4, 5, dtype=jnp.float32)
  x = jnp.ones((2, 8, 8, 4), jnp.float32)
  fn = functools.partial(jaxfactor.conv, implementation="factorized")
  assert "platform_index" in str(jax.make_jaxpr(fn)(x, fmt))
  with forced(depthwise="native"):
    compiled = jax.jit(fn).lower(x, fmt).compile().as_text()
  assert " conditional(" not in compiled


@pytest.mark.parametrize("name", [*KERNELS, "depthwise_conv"])
def test_export_for_every_platform_equals_the_original_on_cpu(name):
  """One exported program holds each platform's lowering (the CPU's is the
  grouped conv: an exported program may hold no custom call without
  compatibility guarantees)."""
  x = random_input((2, 9, 8, 3))
  if name == "depthwise_conv":
    kernel = random_input((3, 2, 1, 6), seed=2)
    fn = jax.jit(
      functools.partial(
        jaxfactor.depthwise_conv, strides=(2, 1), padding="CIRCULAR"
      )
    )
  else:
    kernel = random_kernel(name, (3, 2), 3, 5)
    fn = jax.jit(
      functools.partial(jaxfactor.conv, strides=(2, 1), padding="CIRCULAR")
    )
  exported = export.export(fn, platforms=("cpu", "cuda", "tpu"))(x, kernel)
  assert exported.platforms == ("cpu", "cuda", "tpu")
  assert "custom_call" not in exported.mlir_module()
  assert relative_error(exported.call(x, kernel), fn(x, kernel)) < rtol(F64)


@pytest.mark.parametrize("name", [*KERNELS, "depthwise_conv"])
def test_export_with_a_symbolic_batch_serializes_and_runs(name):
  """A format is an argument of the exported function: its pytree node
  serializes with it."""
  if name == "depthwise_conv":
    kernel = random_input((3, 2, 1, 6), seed=2)
    conv = jaxfactor.depthwise_conv
  else:
    kernel = random_kernel(name, (3, 2), 3, 5)
    conv = jaxfactor.conv
  fn = jax.jit(functools.partial(conv, strides=(2, 1), dilation=(1, 2)))
  (b,) = export.symbolic_shape("b")
  exported = export.export(fn)(jax.ShapeDtypeStruct((b, 9, 8, 3), F64), kernel)
  restored = export.deserialize(exported.serialize())
  for batch in (1, 3):
    x = random_input((batch, 9, 8, 3), seed=batch)
    assert relative_error(restored.call(x, kernel), fn(x, kernel)) < rtol(F64)


def test_unknown_forced_lowering_is_rejected():
  with (
    pytest.raises(ValueError, match="unknown depthwise lowering 'fast'"),
    forced(depthwise="fast"),
  ):
    pass
