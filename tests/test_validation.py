"""Every error message: function, argument, value seen and value expected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfactor
from reference import random_format, random_input

X = random_input((2, 8, 8, 4))
LOW_RANK = random_format("low_rank", (3, 3), 4, 6, ranks=2)


def _raises(exc, match, fn, *args, **kwargs):
  with pytest.raises(exc, match=match):
    fn(*args, **kwargs)


# --- x and kernel --------------------------------------------------------------

def test_x_of_the_wrong_rank():
  _raises(ValueError,
          r"conv: `x` must have shape \[\*batch, \*spatial, C\] with 2 spatial"
          r" axes \(rank >= 3\) for a kernel with window \(3, 3\), got shape"
          r" \(8, 4\)",
          jaxfactor.conv, X[0, 0], LOW_RANK)


def test_channel_mismatch():
  _raises(ValueError,
          r"conv: `x` has 3 channels \(shape \(2, 8, 8, 3\)\) but the kernel"
          r" expects in_features=4",
          jaxfactor.conv, X[..., :3], LOW_RANK)


def test_x_not_an_array():
  _raises(TypeError, r"conv: `x` must be a jax or numpy array, got list",
          jaxfactor.conv, X.tolist(), LOW_RANK)


def test_integer_x():
  _raises(TypeError, r"conv: `x` must have a floating dtype, got int32",
          jaxfactor.conv, jnp.ones((1, 5, 5, 4), jnp.int32), LOW_RANK)


def test_empty_spatial_axis():
  _raises(ValueError, r"conv: every spatial and channel axis of `x` must have"
          r" size >= 1, got shape \(1, 0, 5, 4\)", jaxfactor.conv, jnp.ones((1, 0, 5, 4)), LOW_RANK)


def test_kernel_not_array_or_format():
  _raises(TypeError,
          r"conv: `kernel` must be a dense HWIO array or a jaxfactor format"
          r" .*got dict", jaxfactor.conv, X, {"kernel": 1})


def test_dense_kernel_of_the_wrong_rank():
  _raises(ValueError,
          r"conv: a dense `kernel` must have shape \[\*window, C, F\] with at"
          r" least one spatial axis \(rank >= 3\), got shape \(4, 6\)",
          jaxfactor.conv, X, jnp.ones((4, 6)))


def test_dense_kernel_with_an_empty_axis():
  _raises(ValueError, r"conv: every axis of `kernel` must have size >= 1",
          jaxfactor.conv, X, jnp.ones((3, 0, 4, 6)))


# --- dtypes ----------------------------------------------------------------------

def test_mixed_dtypes_are_not_promoted():
  _raises(TypeError,
          r"conv: `kernel` has dtype float32 but `x` has dtype float64;"
          r" jaxfactor does not promote dtypes silently",
          jaxfactor.conv, X,
          jax.tree.map(lambda a: a.astype(jnp.float32), LOW_RANK))


def test_mixed_dtypes_inside_a_format():
  fmt = jax.tree.map(lambda a: a, LOW_RANK)
  leaves, treedef = jax.tree.flatten(fmt)
  mixed = treedef.unflatten([leaves[0], leaves[1].astype(jnp.float32)])
  _raises(TypeError, r"conv: `pointwise` has dtype float32 but `spatial` has"
          r" dtype float64", jaxfactor.conv, X, mixed)
  _raises(TypeError, r"LowRank: `pointwise` has dtype float32",
          jaxfactor.LowRank, leaves[0], leaves[1].astype(jnp.float32))


def test_preferred_element_type_narrower_than_inputs():
  _raises(TypeError,
          r"conv: `preferred_element_type` must be the inputs' dtype float64"
          r" or a wider float32/float64, got float32",
          jaxfactor.conv, X, LOW_RANK, preferred_element_type=jnp.float32)
  _raises(TypeError, r"got int32", jaxfactor.pointwise_conv, X,
          jnp.ones((4, 2)), preferred_element_type=jnp.int32)


def test_preferred_element_type_never_swaps_16_bit_types():
  x16 = jnp.ones((1, 5, 5, 4), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 4, 4), jnp.bfloat16)
  _raises(TypeError, r"conv: `preferred_element_type` must be the inputs'"
          r" dtype bfloat16 or a wider float32/float64, got float16",
          jaxfactor.conv, x16, kernel, preferred_element_type=jnp.float16)
  _raises(TypeError, r"conv: `preferred_element_type` must be a dtype, got"
          r" 'foo'", jaxfactor.conv, x16, kernel, preferred_element_type="foo")
  assert jaxfactor.conv(x16, kernel, preferred_element_type=jnp.float32
                        ).dtype == jnp.float32
  with jax.enable_x64(False):
    _raises(ValueError, r"`preferred_element_type`=float64 needs 64-bit mode",
            jaxfactor.conv, x16, kernel, preferred_element_type=jnp.float64)


def test_numpy_float64_is_float32_without_x64():
  """As in Flax: with 64-bit mode off, numpy float64 arrays are float32."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(False):
    x = jnp.ones((1, 6, 6, 4))
    dense = rng.standard_normal((3, 3, 4, 2))
    assert jaxfactor.conv(x, dense).dtype == jnp.float32
    fmt = jaxfactor.LowRank(rng.standard_normal((3, 3, 4, 2)),
                            rng.standard_normal((2, 5)))
    y = jaxfactor.conv(rng.standard_normal((1, 6, 6, 4)), fmt)
    assert y.dtype == jnp.float32


def test_traced_geometry_must_be_static():
  _raises(TypeError, r"conv: `strides` must be a static Python int, got a"
          r" traced value", jax.jit(lambda x, s: jaxfactor.conv(
              x, LOW_RANK, strides=s)), X, 2)


def test_flax_geometry_spellings_are_accepted():
  reference = jaxfactor.conv(X, LOW_RANK, strides=1, padding="SAME")
  np.testing.assert_array_equal(
      jaxfactor.conv(X, LOW_RANK, strides=None, padding="same"), reference)
  np.testing.assert_array_equal(
      jaxfactor.conv(X, LOW_RANK, strides=np.array([2, 1])),
      jaxfactor.conv(X, LOW_RANK, strides=(2, 1)))


def test_integer_factor():
  _raises(TypeError, r"LowRank: `LowRank.pointwise` must have a floating"
          r" dtype, got int32", jaxfactor.LowRank, jnp.ones((3, 3, 4, 2)),
          jnp.ones((2, 6), jnp.int32))


# --- formats ---------------------------------------------------------------------

def test_non_array_leaves():
  _raises(TypeError, r"LowRank: `spatial` must be a jax or numpy array, got"
          r" list", jaxfactor.LowRank, [[1.0]], jnp.ones((1, 2)))
  _raises(TypeError, r"Tucker: `core` must be a jax or numpy array, got"
          r" NoneType", jaxfactor.Tucker, jnp.ones((4, 2)), None,
          jnp.ones((2, 3)))
  broken = jax.tree.map(lambda a: "oops", LOW_RANK)
  _raises(TypeError, r"conv: `LowRank.spatial` must be a jax or numpy array,"
          r" got str", jaxfactor.conv, X, broken)


def test_low_rank_ranks_do_not_chain():
  _raises(ValueError,
          r"LowRank: factors do not chain: `spatial` has shape"
          r" \(3, 3, 4, 3\) and `pointwise` has shape \(2, 6\);"
          r" spatial.shape\[-1\] \(3\) must equal pointwise.shape\[0\] \(2\)",
          jaxfactor.LowRank, jnp.ones((3, 3, 4, 3)), jnp.ones((2, 6)))


def test_factors_that_stopped_chaining_after_tree_map():
  leaves, treedef = jax.tree.flatten(LOW_RANK)
  broken = treedef.unflatten([leaves[0], jnp.ones((5, 6))])
  _raises(ValueError, r"conv: LowRank factors do not chain", jaxfactor.conv, X,
          broken)
  _raises(ValueError, r"to_dense: LowRank factors do not chain",
          broken.to_dense)


def test_low_rank_spatial_rank():
  _raises(ValueError, r"LowRank: `spatial` must have shape"
          r" \[\*window, C, R\] \(rank >= 3\), got shape \(4, 2\)",
          jaxfactor.LowRank, jnp.ones((4, 2)), jnp.ones((2, 6)))
  _raises(ValueError, r"LowRank: `pointwise` must have shape \[R, F\] \(rank"
          r" 2\), got shape \(1, 2, 6\) \(rank 3\)", jaxfactor.LowRank,
          jnp.ones((3, 4, 2)), jnp.ones((1, 2, 6)))


def test_depthwise_separable_shapes():
  _raises(ValueError,
          r"DepthwiseSeparable: `depthwise` must have shape"
          r" \[\*window, 1, C\*m\] with channel_multiplier m=1, got shape"
          r" \(3, 3, 4, 4\)", jaxfactor.DepthwiseSeparable,
          jnp.ones((3, 3, 4, 4)), jnp.ones((4, 6)))
  _raises(ValueError, r"with channel_multiplier m=3, got shape \(3, 3, 1, 8\)",
          jaxfactor.DepthwiseSeparable, jnp.ones((3, 3, 1, 8)),
          jnp.ones((8, 6)), channel_multiplier=3)
  _raises(ValueError, r"depthwise.shape\[-1\] \(8\) must equal"
          r" pointwise.shape\[0\] \(4\)", jaxfactor.DepthwiseSeparable,
          jnp.ones((3, 3, 1, 8)), jnp.ones((4, 6)), channel_multiplier=2)
  _raises(ValueError, r"`channel_multiplier` must be a positive int, got 0",
          jaxfactor.DepthwiseSeparable, jnp.ones((3, 3, 1, 8)),
          jnp.ones((8, 6)), channel_multiplier=0)


def test_spatially_separable_shapes():
  _raises(TypeError, r"SpatiallySeparable: `factors` must be a non-empty tuple"
          r" of arrays \(one per spatial axis\), got ArrayImpl",
          jaxfactor.SpatiallySeparable, jnp.ones((3, 4, 5)))
  _raises(ValueError, r"factors\[1\].shape\[1\] \(6\)",
          jaxfactor.SpatiallySeparable,
          (jnp.ones((3, 4, 5)), jnp.ones((3, 6, 2))))
  _raises(ValueError, r"`factors\[0\]` must have shape \[k_i, R_in, R_out\]"
          r" \(rank 3\), got shape \(3, 4\)", jaxfactor.SpatiallySeparable,
          (jnp.ones((3, 4)),))


def test_tucker_shapes():
  _raises(ValueError, r"core.shape\[-1\] \(3\) must equal out_proj.shape\[0\]"
          r" \(2\)", jaxfactor.Tucker, jnp.ones((4, 2)),
          jnp.ones((3, 3, 2, 3)), jnp.ones((2, 6)))
  _raises(ValueError, r"in_proj.shape\[1\] \(2\) must equal core.shape\[-2\]"
          r" \(5\)", jaxfactor.Tucker, jnp.ones((4, 2)),
          jnp.ones((3, 3, 5, 3)), jnp.ones((3, 6)))
  _raises(ValueError, r"Tucker: `core` must have shape \[\*window, R_in,"
          r" R_out\] \(rank >= 3\), got shape \(2, 3\)", jaxfactor.Tucker,
          jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.ones((3, 6)))


def test_cp_shapes():
  _raises(TypeError, r"CP: `spatial` must be a non-empty tuple of arrays",
          jaxfactor.CP, jnp.ones((4, 2)), (), jnp.ones((2, 6)))
  _raises(ValueError, r"in_proj.shape\[1\] \(2\) must equal"
          r" spatial\[1\].shape\[1\] \(3\)", jaxfactor.CP, jnp.ones((4, 2)),
          (jnp.ones((3, 2)), jnp.ones((3, 3))), jnp.ones((2, 6)))
  _raises(ValueError, r"in_proj.shape\[1\] \(2\) must equal"
          r" out_proj.shape\[0\] \(3\)", jaxfactor.CP, jnp.ones((4, 2)),
          (jnp.ones((3, 2)),), jnp.ones((3, 6)))
  _raises(ValueError, r"`spatial\[0\]` must have shape \[k_i, R\]",
          jaxfactor.CP, jnp.ones((4, 2)), (jnp.ones((3, 1, 2)),),
          jnp.ones((2, 6)))


def test_tuple_field_replaced_by_an_array():
  fmt = random_format("cp", (3, 3), 4, 6)
  # A tree.map that collapses the `spatial` tuple to one array.
  broken = jax.tree.map(lambda v: v[0] if isinstance(v, tuple) else v, fmt,
                        is_leaf=lambda v: isinstance(v, tuple))
  _raises(TypeError, r"conv: `CP.spatial` must be a tuple of arrays, got"
          r" ArrayImpl", jaxfactor.conv, X, broken)


def test_empty_factor_axis():
  _raises(ValueError, r"LowRank: every axis of `LowRank.spatial` must have size"
          r" >= 1, got shape \(3, 3, 4, 0\)", jaxfactor.LowRank,
          jnp.ones((3, 3, 4, 0)), jnp.ones((0, 6)))


# --- geometry --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["strides", "dilation"])
def test_non_positive_strides_and_dilation(name):
  _raises(ValueError, rf"conv: `{name}` must be positive on every axis, got"
          r" \(1, 0\)", jaxfactor.conv, X, LOW_RANK, **{name: (1, 0)})
  _raises(ValueError, rf"conv: `{name}` must be positive on every axis, got"
          r" -1", jaxfactor.conv, X, LOW_RANK, **{name: -1})
  _raises(ValueError, rf"conv: `{name}` must be an int or a sequence of 2"
          r" ints \(one per spatial axis\), got \(1, 1, 1\) of length 3",
          jaxfactor.conv, X, LOW_RANK, **{name: (1, 1, 1)})
  _raises(TypeError, rf"conv: `{name}` must be an int, got float 1.5",
          jaxfactor.conv, X, LOW_RANK, **{name: 1.5})
  _raises(TypeError, rf"conv: `{name}` must be an int, got bool True",
          jaxfactor.conv, X, LOW_RANK, **{name: True})


def test_padding_of_the_wrong_length():
  _raises(ValueError, r"conv: `padding` must have one int or \(low, high\) pair"
          r" per spatial axis \(2\), got \(\(1, 1\),\) of length 1",
          jaxfactor.conv, X, LOW_RANK, padding=((1, 1),))
  _raises(ValueError, r"conv: each `padding` entry must be an int or a"
          r" \(low, high\) pair, got \(1, 2, 3\)", jaxfactor.conv, X, LOW_RANK,
          padding=((1, 2, 3), 1))


def test_unknown_or_negative_padding():
  _raises(ValueError, r"conv: `padding` must be one of \('SAME', 'SAME_LOWER',"
          r" 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL'\), an int, or one int or"
          r" \(low, high\) pair per spatial axis, got 'FULL'",
          jaxfactor.conv, X, LOW_RANK, padding="full")
  _raises(ValueError, r"conv: `padding` must be non-negative, got -1",
          jaxfactor.conv, X, LOW_RANK, padding=-1)
  _raises(TypeError, r"conv: `padding` must be an int, got NoneType None",
          jaxfactor.conv, X, LOW_RANK, padding=None)


def test_causal_needs_one_spatial_axis():
  _raises(ValueError, r"conv: `padding`='CAUSAL' needs exactly 1 spatial axis,"
          r" got a kernel with 2 spatial axes", jaxfactor.conv, X, LOW_RANK,
          padding="CAUSAL")


def test_empty_output():
  _raises(ValueError, r"conv: spatial axis 1 of `x` has size 4, padded to 4 by"
          r" padding \(0, 0\), which is smaller than the dilated window 5"
          r" \(window 3, dilation 2\); the output would be empty",
          jaxfactor.conv, jnp.ones((1, 8, 4, 4)), LOW_RANK, padding="VALID",
          dilation=2)


def test_unknown_implementation():
  _raises(ValueError, r"conv: `implementation` must be one of \('auto',"
          r" 'factorized', 'reconstructed'\), got 'fast'", jaxfactor.conv, X,
          LOW_RANK, implementation="fast")
  _raises(ValueError, r"cost: `implementation` must be one of",
          jaxfactor.cost, LOW_RANK, X.shape, implementation="fast")


# --- primitives and cost ---------------------------------------------------------

def test_depthwise_kernel_layout():
  _raises(ValueError, r"depthwise_conv: `kernel` must have shape \[\*window,"
          r" 1, C\*m\], got shape \(3, 3, 4, 4\)", jaxfactor.depthwise_conv, X,
          jnp.ones((3, 3, 4, 4)))
  _raises(ValueError, r"depthwise_conv: `kernel` has shape \(3, 3, 1, 6\), but"
          r" its last axis \(6\) must be C\*m, a multiple of the C=4 channels"
          r" of `x` \(shape \(2, 8, 8, 4\)\)", jaxfactor.depthwise_conv, X,
          jnp.ones((3, 3, 1, 6)))
  _raises(ValueError, r"depthwise_conv: `x` must have shape \[\*batch,"
          r" \*spatial, C\] with 2 spatial axes", jaxfactor.depthwise_conv,
          X[0, 0], jnp.ones((3, 3, 1, 4)))


def test_pointwise_shapes():
  _raises(ValueError, r"pointwise_conv: `kernel` must have shape \[C, F\]"
          r" \(rank 2\), got shape \(1, 1, 4, 2\)", jaxfactor.pointwise_conv,
          X, jnp.ones((1, 1, 4, 2)))
  _raises(ValueError, r"pointwise_conv: `x` must have shape \[..., C\] with C"
          r" = kernel.shape\[0\] = 3, got shape \(2, 8, 8, 4\)",
          jaxfactor.pointwise_conv, X, jnp.ones((3, 2)))


def test_cost_input_shape():
  _raises(TypeError, r"cost: `input_shape` must be a sequence of ints, got"
          r" ArrayImpl", jaxfactor.cost, LOW_RANK, X)
  _raises(TypeError, r"cost: `input_shape` must be a sequence of ints, got"
          r" \(2, 8.0, 8, 4\)", jaxfactor.cost, LOW_RANK, (2, 8.0, 8, 4))
  _raises(ValueError, r"cost: `x` has 3 channels", jaxfactor.cost, LOW_RANK,
          (2, 8, 8, 3))


def test_errors_fire_at_trace_time_under_jit():
  leaves, treedef = jax.tree.flatten(LOW_RANK)
  broken = treedef.unflatten([jnp.ones((3, 3, 4, 3)), leaves[1]])
  with pytest.raises(ValueError, match="conv: LowRank factors do not chain"):
    jax.jit(jaxfactor.conv)(X, broken)


def test_numpy_inputs_are_accepted():
  y = jaxfactor.conv(np.asarray(X), jax.tree.map(np.asarray, LOW_RANK))
  assert y.shape == (2, 8, 8, 6)


def test_dtype_of_a_format_without_leaves():
  empty = jax.tree.map(lambda a: None, LOW_RANK)
  with pytest.raises(ValueError, match=r"LowRank.dtype: the format has no"
                     r" array leaves"):
    empty.dtype  # noqa: B018
