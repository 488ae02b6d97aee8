"""Every error message: the function, the argument, what was seen and expected.

Each test matches the whole message (or its distinctive part), so a message
that loses its values, names the wrong argument or prints a tuple by
accident fails here.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax import serialization
from reference import random_format
from reference import random_input

import jaxfactor
import jaxfactor.linen as jlinen
import jaxfactor.nnx as jnnx

X = random_input((2, 8, 8, 4))
X32 = X.astype(jnp.float32)  # the layers' default param_dtype
LOW_RANK = random_format("low_rank", (3, 3), 4, 6, ranks=2)
KERNEL = jnp.ones((3, 3, 4, 8))


def _raises(exc, match, fn, *args, **kwargs):
  with pytest.raises(exc, match=match):
    fn(*args, **kwargs)


# --- conv: x and kernel -------------------------------------------------------


def test_x_of_the_wrong_rank():
  _raises(
    ValueError,
    r"conv: `x` must have shape \[\*batch, \*spatial, C\] with 2 spatial"
    r" axes \(rank >= 3\) for a kernel with window \(3, 3\), got shape"
    r" \(8, 4\)",
    jaxfactor.conv,
    X[0, 0],
    LOW_RANK,
  )


def test_channel_mismatch():
  _raises(
    ValueError,
    r"conv: `x` has 3 channels \(shape \(2, 8, 8, 3\)\) but the kernel"
    r" expects in_features=4",
    jaxfactor.conv,
    X[..., :3],
    LOW_RANK,
  )


def test_x_not_a_floating_array():
  _raises(
    TypeError,
    r"conv: `x` must be a jax or numpy array, got list",
    jaxfactor.conv,
    X.tolist(),
    LOW_RANK,
  )
  _raises(
    TypeError,
    r"conv: `x` must have a floating dtype, got int32",
    jaxfactor.conv,
    jnp.ones((1, 5, 5, 4), jnp.int32),
    LOW_RANK,
  )


def test_empty_spatial_axis():
  _raises(
    ValueError,
    r"conv: every spatial and channel axis of `x` must have"
    r" size >= 1, got shape \(1, 0, 5, 4\)",
    jaxfactor.conv,
    jnp.ones((1, 0, 5, 4)),
    LOW_RANK,
  )


def test_kernel_not_an_array_or_a_format():
  _raises(
    TypeError,
    r"conv: `kernel` must be a dense HWIO array or a jaxfactor format"
    r" \(DepthwiseSeparable, SpatiallySeparable, LowRank, Tucker, CP,"
    r" TensorTrain\),"
    r" got dict",
    jaxfactor.conv,
    X,
    {"kernel": 1},
  )


def test_dense_kernel_shapes():
  _raises(
    ValueError,
    r"conv: a dense `kernel` must have shape \[\*window, C, F\] with at"
    r" least one spatial axis \(rank >= 3\), got shape \(4, 6\)",
    jaxfactor.conv,
    X,
    jnp.ones((4, 6)),
  )
  _raises(
    ValueError,
    r"conv: every axis of `kernel` must have size >= 1, got"
    r" shape \(3, 0, 4, 6\)",
    jaxfactor.conv,
    X,
    jnp.ones((3, 0, 4, 6)),
  )


# --- dtypes -------------------------------------------------------------------


def test_mixed_dtypes_are_not_promoted():
  _raises(
    TypeError,
    r"conv: `kernel` has dtype float32 but `x` has dtype float64;"
    r" jaxfactor does not promote dtypes silently, cast one of them"
    r" explicitly",
    jaxfactor.conv,
    X,
    jax.tree.map(lambda a: a.astype(jnp.float32), LOW_RANK),
  )
  leaves, treedef = jax.tree.flatten(LOW_RANK)
  mixed = treedef.unflatten([leaves[0], leaves[1].astype(jnp.float32)])
  _raises(
    TypeError,
    r"conv: `pointwise` has dtype float32 but `spatial` has"
    r" dtype float64",
    jaxfactor.conv,
    X,
    mixed,
  )
  _raises(
    TypeError,
    r"LowRank: `pointwise` has dtype float32 but `spatial`"
    r" has dtype float64",
    jaxfactor.LowRank,
    leaves[0],
    leaves[1].astype(jnp.float32),
  )


def test_preferred_element_type():
  _raises(
    TypeError,
    r"conv: `preferred_element_type` must be the inputs' dtype float64"
    r" or a wider float32/float64, got float32",
    jaxfactor.conv,
    X,
    LOW_RANK,
    preferred_element_type=jnp.float32,
  )
  _raises(
    TypeError,
    r"pointwise_conv: `preferred_element_type` must be the"
    r" inputs' dtype float64 or a wider float32/float64, got int32",
    jaxfactor.pointwise_conv,
    X,
    jnp.ones((4, 2)),
    preferred_element_type=jnp.int32,
  )
  x16 = jnp.ones((1, 5, 5, 4), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 4, 4), jnp.bfloat16)
  # A swap between 16-bit types would lose range or precision silently.
  _raises(
    TypeError,
    r"conv: `preferred_element_type` must be the inputs'"
    r" dtype bfloat16 or a wider float32/float64, got float16",
    jaxfactor.conv,
    x16,
    kernel,
    preferred_element_type=jnp.float16,
  )
  _raises(
    TypeError,
    r"conv: `preferred_element_type` must be a dtype, got"
    r" 'foo'",
    jaxfactor.conv,
    x16,
    kernel,
    preferred_element_type="foo",
  )
  with jax.enable_x64(False):
    _raises(
      ValueError,
      r"conv: `preferred_element_type`=float64 needs 64-bit"
      r" mode: set jax.config.update\('jax_enable_x64', True\) first",
      jaxfactor.conv,
      x16,
      kernel,
      preferred_element_type=jnp.float64,
    )


def test_non_floating_or_non_array_factors():
  _raises(
    TypeError,
    r"LowRank: `LowRank.pointwise` must have a floating"
    r" dtype, got int32",
    jaxfactor.LowRank,
    jnp.ones((3, 3, 4, 2)),
    jnp.ones((2, 6), jnp.int32),
  )
  _raises(
    TypeError,
    r"LowRank: `spatial` must be a jax or numpy array, got"
    r" list",
    jaxfactor.LowRank,
    [[1.0]],
    jnp.ones((1, 2)),
  )
  _raises(
    TypeError,
    r"Tucker: `core` must be a jax or numpy array, got"
    r" NoneType",
    jaxfactor.Tucker,
    jnp.ones((4, 2)),
    None,
    jnp.ones((2, 3)),
  )
  broken = jax.tree.map(lambda a: "oops", LOW_RANK)
  _raises(
    TypeError,
    r"conv: `LowRank.spatial` must be a jax or numpy array,"
    r" got str",
    jaxfactor.conv,
    X,
    broken,
  )


# --- formats ------------------------------------------------------------------


def test_factors_that_do_not_chain():
  _raises(
    ValueError,
    r"LowRank: factors do not chain: `spatial` has shape"
    r" \(3, 3, 4, 3\) and `pointwise` has shape \(2, 6\);"
    r" spatial.shape\[-1\] \(3\) must equal pointwise.shape\[0\] \(2\)",
    jaxfactor.LowRank,
    jnp.ones((3, 3, 4, 3)),
    jnp.ones((2, 6)),
  )
  leaves, treedef = jax.tree.flatten(LOW_RANK)
  broken = treedef.unflatten([leaves[0], jnp.ones((5, 6))])
  # Unflattening does not validate; every consumer does, at trace time.
  _raises(
    ValueError, r"conv: LowRank factors do not chain", jaxfactor.conv, X, broken
  )
  _raises(
    ValueError,
    r"conv: LowRank factors do not chain",
    jax.jit(jaxfactor.conv),
    X,
    broken,
  )
  _raises(
    ValueError, r"to_dense: LowRank factors do not chain", broken.to_dense
  )
  _raises(
    ValueError,
    r"LowRank: factors do not chain",
    LOW_RANK.replace,
    pointwise=jnp.ones((3, 6)),
  )


def test_low_rank_shapes():
  _raises(
    ValueError,
    r"LowRank: `spatial` must have shape"
    r" \[\*window, C, R\] \(rank >= 3\), got shape \(4, 2\)",
    jaxfactor.LowRank,
    jnp.ones((4, 2)),
    jnp.ones((2, 6)),
  )
  _raises(
    ValueError,
    r"LowRank: `pointwise` must have shape \[R, F\] \(rank"
    r" 2\), got shape \(1, 2, 6\) \(rank 3\)",
    jaxfactor.LowRank,
    jnp.ones((3, 4, 2)),
    jnp.ones((1, 2, 6)),
  )
  _raises(
    ValueError,
    r"LowRank: every axis of `LowRank.spatial` must have"
    r" size >= 1, got shape \(3, 3, 4, 0\)",
    jaxfactor.LowRank,
    jnp.ones((3, 3, 4, 0)),
    jnp.ones((0, 6)),
  )


def test_depthwise_separable_shapes():
  _raises(
    ValueError,
    r"DepthwiseSeparable: `depthwise` must have shape"
    r" \[\*window, 1, C\*m\] with channel_multiplier m=1, got shape"
    r" \(3, 3, 4, 4\)",
    jaxfactor.DepthwiseSeparable,
    jnp.ones((3, 3, 4, 4)),
    jnp.ones((4, 6)),
  )
  _raises(
    ValueError,
    r"with channel_multiplier m=3, got shape \(3, 3, 1, 8\)",
    jaxfactor.DepthwiseSeparable,
    jnp.ones((3, 3, 1, 8)),
    jnp.ones((8, 6)),
    channel_multiplier=3,
  )
  _raises(
    ValueError,
    r"DepthwiseSeparable: factors do not chain: .*"
    r" depthwise.shape\[-1\] \(8\) must equal pointwise.shape\[0\] \(4\)",
    jaxfactor.DepthwiseSeparable,
    jnp.ones((3, 3, 1, 8)),
    jnp.ones((4, 6)),
    channel_multiplier=2,
  )
  _raises(
    ValueError,
    r"DepthwiseSeparable: `channel_multiplier` must be a"
    r" positive int, got 0",
    jaxfactor.DepthwiseSeparable,
    jnp.ones((3, 3, 1, 8)),
    jnp.ones((8, 6)),
    channel_multiplier=0,
  )
  _raises(
    TypeError,
    r"DepthwiseSeparable: `channel_multiplier` must be an"
    r" int, got float 2.0",
    jaxfactor.DepthwiseSeparable,
    jnp.ones((3, 3, 1, 8)),
    jnp.ones((8, 6)),
    channel_multiplier=2.0,
  )


def test_spatially_separable_shapes():
  _raises(
    TypeError,
    r"SpatiallySeparable: `factors` must be a non-empty tuple"
    r" of arrays \(one per spatial axis\), got ArrayImpl",
    jaxfactor.SpatiallySeparable,
    jnp.ones((3, 4, 5)),
  )
  _raises(
    ValueError,
    r"SpatiallySeparable: factors do not chain:"
    r" `factors\[0\]` has shape \(3, 4, 5\) and `factors\[1\]` has"
    r" shape \(3, 6, 2\);"
    r" factors\[0\].shape\[2\] \(5\) must equal factors\[1\].shape\[1\]"
    r" \(6\)",
    jaxfactor.SpatiallySeparable,
    (jnp.ones((3, 4, 5)), jnp.ones((3, 6, 2))),
  )
  _raises(
    ValueError,
    r"SpatiallySeparable: `factors\[0\]` must have shape"
    r" \[k_i, R_in, R_out\] \(rank 3\), got shape \(3, 4\) \(rank 2\)",
    jaxfactor.SpatiallySeparable,
    (jnp.ones((3, 4)),),
  )


def test_tucker_shapes():
  _raises(
    ValueError,
    r"Tucker: factors do not chain: `core` has shape"
    r" \(3, 3, 2, 3\) and `out_proj` has shape \(2, 6\);"
    r" core.shape\[-1\] \(3\) must equal out_proj.shape\[0\] \(2\)",
    jaxfactor.Tucker,
    jnp.ones((4, 2)),
    jnp.ones((3, 3, 2, 3)),
    jnp.ones((2, 6)),
  )
  _raises(
    ValueError,
    r"in_proj.shape\[1\] \(2\) must equal core.shape\[-2\]"
    r" \(5\)",
    jaxfactor.Tucker,
    jnp.ones((4, 2)),
    jnp.ones((3, 3, 5, 3)),
    jnp.ones((3, 6)),
  )
  _raises(
    ValueError,
    r"Tucker: `core` must have shape \[\*window, R_in,"
    r" R_out\] \(rank >= 3\), got shape \(2, 3\)",
    jaxfactor.Tucker,
    jnp.ones((4, 2)),
    jnp.ones((2, 3)),
    jnp.ones((3, 6)),
  )
  _raises(
    ValueError,
    r"Tucker: `in_proj` must have shape \[C, R_in\] \(rank"
    r" 2\), got shape \(4,\) \(rank 1\)",
    jaxfactor.Tucker,
    jnp.ones((4,)),
    jnp.ones((3, 3, 2, 3)),
    jnp.ones((3, 6)),
  )


def test_cp_shapes():
  _raises(
    TypeError,
    r"CP: `spatial` must be a non-empty tuple of arrays \(one"
    r" per spatial axis\), got tuple",
    jaxfactor.CP,
    jnp.ones((4, 2)),
    (),
    jnp.ones((2, 6)),
  )
  _raises(
    ValueError,
    r"CP: factors do not chain: .* in_proj.shape\[1\] \(2\)"
    r" must equal spatial\[1\].shape\[1\] \(3\)",
    jaxfactor.CP,
    jnp.ones((4, 2)),
    (jnp.ones((3, 2)), jnp.ones((3, 3))),
    jnp.ones((2, 6)),
  )
  _raises(
    ValueError,
    r"in_proj.shape\[1\] \(2\) must equal"
    r" out_proj.shape\[0\] \(3\)",
    jaxfactor.CP,
    jnp.ones((4, 2)),
    (jnp.ones((3, 2)),),
    jnp.ones((3, 6)),
  )
  _raises(
    ValueError,
    r"CP: `spatial\[0\]` must have shape \[k_i, R\] \(rank"
    r" 2\), got shape \(3, 1, 2\) \(rank 3\)",
    jaxfactor.CP,
    jnp.ones((4, 2)),
    (jnp.ones((3, 1, 2)),),
    jnp.ones((2, 6)),
  )


def test_tensor_train_shapes():
  spatial = jnp.ones((3, 3, 2))
  cores = (jnp.ones((2, 4, 2, 3)), jnp.ones((3, 2, 4, 1)))
  _raises(
    TypeError,
    r"TensorTrain: `cores` must be a non-empty tuple of arrays \(one per"
    r" channel-mode pair\), got ndarray",
    jaxfactor.TensorTrain,
    spatial,
    np.ones((2, 4, 2, 1)),
  )
  _raises(
    ValueError,
    r"TensorTrain: `spatial` must have shape \[\*window, R_0\] \(rank"
    r" >= 2\), got shape \(2,\)",
    jaxfactor.TensorTrain,
    jnp.ones((2,)),
    cores,
  )
  _raises(
    ValueError,
    r"TensorTrain: `cores\[1\]` must have shape \[R_in, c_i, f_i, R_out\]"
    r" \(rank 4\), got shape \(3, 8, 1\) \(rank 3\)",
    jaxfactor.TensorTrain,
    spatial,
    (cores[0], jnp.ones((3, 8, 1))),
  )
  _raises(
    ValueError,
    r"TensorTrain: factors do not chain: `spatial` has shape \(3, 3, 5\)"
    r" and `cores\[0\]` has shape \(2, 4, 2, 3\); spatial.shape\[-1\]"
    r" \(5\) must equal cores\[0\].shape\[0\] \(2\)",
    jaxfactor.TensorTrain,
    jnp.ones((3, 3, 5)),
    cores,
  )
  _raises(
    ValueError,
    r"cores\[0\].shape\[3\] \(3\) must equal cores\[1\].shape\[0\]"
    r" \(4\)",
    jaxfactor.TensorTrain,
    spatial,
    (cores[0], jnp.ones((4, 2, 4, 1))),
  )
  _raises(
    ValueError,
    r"TensorTrain: the last core `cores\[1\]` must end the train with rank"
    r" 1 \(shape \[R_in, c_d, f_d, 1\]\), got shape \(3, 2, 4, 2\)",
    jaxfactor.TensorTrain,
    spatial,
    (cores[0], jnp.ones((3, 2, 4, 2))),
  )


def test_tensor_train_modes_and_ranks():
  kernel = jnp.ones((3, 3, 12, 8))
  _raises(
    ValueError,
    r"decompose: `in_modes` and `out_modes` are TensorTrain's channel"
    r" modes; Tucker takes none, got in_modes=\(2, 2\), out_modes=None",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=2,
    in_modes=(2, 2),
  )
  _raises(
    TypeError,
    r"decompose: `out_modes` must be a non-empty tuple of ints, got 8",
    jaxfactor.decompose,
    kernel,
    "tensor_train",
    rank=2,
    out_modes=8,
  )
  _raises(
    ValueError,
    r"decompose: `in_modes` must be 2 positive ints whose product is the"
    r" kernel's 12 input channels \(kernel shape \(3, 3, 12, 8\)\), got"
    r" \(3, 3\)",
    jaxfactor.decompose,
    kernel,
    "tensor_train",
    rank=2,
    in_modes=(3, 3),
  )
  _raises(
    ValueError,
    r"decompose: `out_modes` must be 3 positive ints whose product is the"
    r" kernel's 8 output channels \(kernel shape \(3, 3, 12, 8\)\), got"
    r" \(4, 2\)",
    jaxfactor.decompose,
    kernel,
    "tensor_train",
    rank=2,
    in_modes=(3, 2, 2),
    out_modes=(4, 2),
  )
  _raises(
    TypeError,
    r"decompose: `rank` for TensorTrain must be an int or a tuple of 3"
    r" ints, got \(2, 2\)",
    jaxfactor.decompose,
    kernel,
    "tensor_train",
    rank=(2, 2),
    in_modes=(3, 2, 2),
  )
  _raises(
    ValueError,
    r"decompose: `rank` \(9, 17\) is out of range for TensorTrain and"
    r" kernel shape \(3, 3, 12, 8\): each must be >= 1 and at most"
    r" max_rank = \(9, 6\)",
    jaxfactor.decompose,
    kernel,
    "tensor_train",
    rank=(9, 17),
  )
  _raises(
    ValueError,
    r"decompose: `rank` \(1, 7\) does not chain for TensorTrain with modes"
    r" \(3, 4\) x \(2, 4\): rank\[1\] = 7 exceeds rank\[0\] \* c_1 \*"
    r" f_1 = 6",
    jaxfactor.decompose,
    kernel,
    "tensor_train",
    rank=(1, 7),
    in_modes=(3, 4),
    out_modes=(2, 4),
  )


def test_tuple_field_replaced_by_an_array():
  fmt = random_format("cp", (3, 3), 4, 6)
  broken = jax.tree.map(
    lambda v: v[0] if isinstance(v, tuple) else v,
    fmt,
    is_leaf=lambda v: isinstance(v, tuple),
  )
  _raises(
    TypeError,
    r"conv: `CP.spatial` must be a tuple of arrays, got"
    r" ArrayImpl",
    jaxfactor.conv,
    X,
    broken,
  )


def test_immutability_replace_and_missing_leaves():
  _raises(
    AttributeError,
    r"LowRank is immutable; use .replace\(rank=...\) to"
    r" get a modified copy",
    setattr,
    LOW_RANK,
    "rank",
    3,
  )
  _raises(
    TypeError,
    r"LowRank.replace: unknown fields \['kernel'\]; the"
    r" fields are \('spatial', 'pointwise'\)",
    LOW_RANK.replace,
    kernel=1,
  )
  empty = jax.tree.map(lambda a: None, LOW_RANK)
  with pytest.raises(
    ValueError,
    match=r"LowRank.dtype: the format has no"
    r" array leaves \(were they mapped to None\?\)",
  ):
    empty.dtype  # noqa: B018


def test_restoring_factors_that_do_not_chain():
  state = serialization.to_state_dict(LOW_RANK)
  state["pointwise"] = np.zeros((3, 6))
  _raises(
    ValueError,
    r"from_state_dict: LowRank factors do not chain:"
    r" `spatial` has shape \(3, 3, 4, 2\) and `pointwise` has shape"
    r" \(3, 6\)",
    serialization.from_state_dict,
    LOW_RANK,
    state,
  )


# --- geometry -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["strides", "dilation"])
def test_strides_and_dilation(name):
  _raises(
    ValueError,
    rf"conv: `{name}` must be positive on every axis, got"
    r" \(1, 0\)",
    jaxfactor.conv,
    X,
    LOW_RANK,
    **{name: (1, 0)},
  )
  _raises(
    ValueError,
    rf"conv: `{name}` must be an int or a sequence of 2"
    r" ints \(one per spatial axis\), got \(1, 1, 1\) of length 3",
    jaxfactor.conv,
    X,
    LOW_RANK,
    **{name: (1, 1, 1)},
  )
  _raises(
    TypeError,
    rf"conv: `{name}` must be an int, got float 1.5",
    jaxfactor.conv,
    X,
    LOW_RANK,
    **{name: 1.5},
  )
  _raises(
    TypeError,
    rf"conv: `{name}` must be an int, got bool True",
    jaxfactor.conv,
    X,
    LOW_RANK,
    **{name: True},
  )
  _raises(
    TypeError,
    rf"conv: `{name}` must be a static Python int, got a"
    r" traced value; mark it static",
    jax.jit(lambda x, s: jaxfactor.conv(x, LOW_RANK, **{name: s})),
    X,
    2,
  )


def test_padding():
  _raises(
    ValueError,
    r"conv: `padding` must have one int or \(low, high\) pair"
    r" per spatial axis \(2\), got \(\(1, 1\),\) of length 1",
    jaxfactor.conv,
    X,
    LOW_RANK,
    padding=((1, 1),),
  )
  _raises(
    ValueError,
    r"conv: each `padding` entry must be an int or a"
    r" \(low, high\) pair, got \(1, 2, 3\) in \(\(1, 2, 3\), 1\)",
    jaxfactor.conv,
    X,
    LOW_RANK,
    padding=((1, 2, 3), 1),
  )
  _raises(
    ValueError,
    r"conv: `padding` must be one of \('SAME', 'SAME_LOWER',"
    r" 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL'\), an int, or one int or"
    r" \(low, high\) pair per spatial axis, got 'FULL'",
    jaxfactor.conv,
    X,
    LOW_RANK,
    padding="full",
  )
  _raises(
    ValueError,
    r"conv: `padding` must be non-negative, got -1",
    jaxfactor.conv,
    X,
    LOW_RANK,
    padding=-1,
  )
  _raises(
    TypeError,
    r"conv: `padding` must be an int, got NoneType None",
    jaxfactor.conv,
    X,
    LOW_RANK,
    padding=None,
  )
  _raises(
    ValueError,
    r"conv: `padding`='CAUSAL' needs exactly 1 spatial axis,"
    r" got a kernel with 2 spatial axes",
    jaxfactor.conv,
    X,
    LOW_RANK,
    padding="CAUSAL",
  )


def test_empty_output():
  _raises(
    ValueError,
    r"conv: spatial axis 1 of `x` has size 4, padded to 4 by"
    r" padding \(0, 0\), which is smaller than the dilated window 5"
    r" \(window 3, dilation 2\); the output would be empty",
    jaxfactor.conv,
    jnp.ones((1, 8, 4, 4)),
    LOW_RANK,
    padding="VALID",
    dilation=2,
  )


def test_implementation_and_platform():
  _raises(
    ValueError,
    r"conv: `implementation` must be one of \('auto',"
    r" 'factorized', 'reconstructed'\), got 'fast'",
    jaxfactor.conv,
    X,
    LOW_RANK,
    implementation="fast",
  )
  _raises(
    ValueError,
    r"cost: `implementation` must be one of \('auto',"
    r" 'factorized', 'reconstructed'\), got 'fast'",
    jaxfactor.cost,
    LOW_RANK,
    X.shape,
    implementation="fast",
  )
  _raises(
    ValueError,
    r"cost: `platform` must be one of \('cpu', 'gpu',"
    r" 'tpu'\) or None \(JAX's default backend\), got 'cuda'",
    jaxfactor.cost,
    LOW_RANK,
    X.shape,
    platform="cuda",
  )


def test_what_flax_accepts_is_accepted():
  reference = jaxfactor.conv(X, LOW_RANK, strides=1, padding="SAME")
  np.testing.assert_array_equal(
    jaxfactor.conv(X, LOW_RANK, strides=None, padding="same"), reference
  )
  np.testing.assert_array_equal(
    jaxfactor.conv(X, LOW_RANK, strides=np.array([2, 1])),
    jaxfactor.conv(X, LOW_RANK, strides=(2, 1)),
  )
  np.testing.assert_array_equal(
    jaxfactor.conv(np.asarray(X), jax.tree.map(np.asarray, LOW_RANK)), reference
  )
  # With 64-bit mode off, numpy float64 arrays are float32, as in Flax.
  rng = np.random.default_rng(0)
  with jax.enable_x64(False):
    fmt = jaxfactor.LowRank(
      rng.standard_normal((3, 3, 4, 2)), rng.standard_normal((2, 5))
    )
    y = jaxfactor.conv(rng.standard_normal((1, 6, 6, 4)), fmt)
    assert y.dtype == jnp.float32


# --- depthwise_conv, pointwise_conv, cost -------------------------------------


def test_depthwise_kernel_layout():
  _raises(
    ValueError,
    r"depthwise_conv: `kernel` must have shape \[\*window,"
    r" 1, C\*m\], got shape \(3, 3, 4, 4\)",
    jaxfactor.depthwise_conv,
    X,
    jnp.ones((3, 3, 4, 4)),
  )
  _raises(
    ValueError,
    r"depthwise_conv: `kernel` has shape \(3, 3, 1, 6\), but"
    r" its last axis \(6\) must be C\*m, a multiple of the C=4 channels"
    r" of `x` \(shape \(2, 8, 8, 4\)\)",
    jaxfactor.depthwise_conv,
    X,
    jnp.ones((3, 3, 1, 6)),
  )
  _raises(
    ValueError,
    r"depthwise_conv: `x` must have shape \[\*batch,"
    r" \*spatial, C\] with 2 spatial axes \(rank >= 3\)",
    jaxfactor.depthwise_conv,
    X[0, 0],
    jnp.ones((3, 3, 1, 4)),
  )


def test_pointwise_shapes():
  _raises(
    ValueError,
    r"pointwise_conv: `kernel` must have shape \[C, F\]"
    r" \(rank 2\), got shape \(1, 1, 4, 2\) \(rank 4\)",
    jaxfactor.pointwise_conv,
    X,
    jnp.ones((1, 1, 4, 2)),
  )
  _raises(
    ValueError,
    r"pointwise_conv: `x` must have shape \[..., C\] with C"
    r" = kernel.shape\[0\] = 3, got shape \(2, 8, 8, 4\)",
    jaxfactor.pointwise_conv,
    X,
    jnp.ones((3, 2)),
  )


def test_cost_input_shape():
  _raises(
    TypeError,
    r"cost: `input_shape` must be a sequence of ints, got"
    r" ArrayImpl",
    jaxfactor.cost,
    LOW_RANK,
    X,
  )
  _raises(
    TypeError,
    r"cost: `input_shape` must be a sequence of ints, got"
    r" \(2, 8.0, 8, 4\)",
    jaxfactor.cost,
    LOW_RANK,
    (2, 8.0, 8, 4),
  )
  _raises(
    ValueError,
    r"cost: `x` has 3 channels \(shape \(2, 8, 8, 3\)\) but"
    r" the kernel expects in_features=4",
    jaxfactor.cost,
    LOW_RANK,
    (2, 8, 8, 3),
  )
  (channels,) = jax.export.symbolic_shape("c")
  _raises(
    ValueError,
    r"cost: the channel size of `input_shape` must be static \(it is the"
    r" kernel's 4 input features\), got \(2, 8, 8, c\); batch and spatial"
    r" sizes may be symbolic",
    jaxfactor.cost,
    LOW_RANK,
    (2, 8, 8, channels),
  )


# --- decompose, relative_error, max_rank, Budget ------------------------------


def test_decompose_kernel_and_format():
  _raises(
    ValueError,
    r"decompose: the kernel must have shape \[\*window, C,"
    r" F\] with at least one spatial axis and no empty axis, got shape"
    r" \(4, 8\)",
    jaxfactor.decompose,
    jnp.ones((4, 8)),
    "low_rank",
    rank=1,
  )
  _raises(
    ValueError,
    r"decompose: `format` must be one of"
    r" \('depthwise_separable', 'spatially_separable', 'low_rank',"
    r" 'tucker', 'cp', 'tensor_train'\) or the matching class, got 'svd'",
    jaxfactor.decompose,
    KERNEL,
    "svd",
    rank=1,
  )
  _raises(
    TypeError,
    r"decompose: `kernel` must be a jax or numpy array, got"
    r" list",
    jaxfactor.decompose,
    [[[[1.0]]]],
    "low_rank",
    rank=1,
  )
  _raises(
    TypeError,
    r"decompose: `kernel` must have a floating dtype, got"
    r" int32",
    jaxfactor.decompose,
    jnp.ones((3, 3, 4, 8), jnp.int32),
    "low_rank",
    rank=1,
  )
  _raises(
    ValueError,
    r"decompose: SpatiallySeparable needs at least 2 spatial"
    r" axes to separate; a 1-D kernel \(shape \(3, 4, 5\)\) is already"
    r" one 1-D convolution",
    jaxfactor.decompose,
    jnp.ones((3, 4, 5)),
    "spatially_separable",
    rank=1,
  )
  _raises(
    ValueError,
    r"decompose: `kernel` \(shape \(3, 3, 4, 8\)\) has"
    r" non-finite values \(NaN or inf\)",
    jaxfactor.decompose,
    KERNEL.at[1, 1, 0, 0].set(jnp.nan),
    "low_rank",
    rank=1,
  )


def test_rank_out_of_range_names_the_maximum():
  _raises(
    ValueError,
    r"decompose: `rank` 37 is out of range for LowRank and"
    r" kernel shape \(3, 3, 4, 8\): it must be >= 1 and at most"
    r" max_rank = 8",
    jaxfactor.decompose,
    KERNEL,
    "low_rank",
    rank=37,
  )
  _raises(
    ValueError,
    r"decompose: `rank` 0 is out of range for CP",
    jaxfactor.decompose,
    KERNEL,
    "cp",
    rank=0,
  )
  _raises(
    ValueError,
    r"decompose: `rank` \(5, 9\) is out of range for Tucker"
    r" and kernel shape \(3, 3, 4, 8\): each must be >= 1 and at most"
    r" max_rank = \(4, 8\)",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=(5, 9),
  )
  _raises(
    ValueError,
    r"decompose: `rank` \(1, 5\) does not chain for"
    r" SpatiallySeparable and kernel shape \(2, 3, 2, 4, 5\): rank\[1\]"
    r" = 5 exceeds rank\[0\] \* window\[1\] = 3",
    jaxfactor.decompose,
    jnp.ones((2, 3, 2, 4, 5)),
    "spatially_separable",
    rank=(1, 5),
  )


def test_rank_of_the_wrong_type():
  _raises(
    TypeError,
    r"decompose: `rank` for Tucker must be an int or a tuple"
    r" of 2 ints, got \(1, 2, 3\)",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=(1, 2, 3),
  )
  _raises(
    TypeError,
    r"decompose: `rank` for LowRank must be an int, got"
    r" \(1, 2\)",
    jaxfactor.decompose,
    KERNEL,
    "low_rank",
    rank=(1, 2),
  )
  _raises(
    ValueError,
    r"decompose: `rank` must be an int, a tuple of ints or"
    r" a jaxfactor.Budget\(params=...\) or 'vbmf', got 'auto'",
    jaxfactor.decompose,
    KERNEL,
    "low_rank",
    rank="auto",
  )


def test_float_rank_points_at_budget():
  message = (
    r"`rank`=0.25 is a float, but a rank is an int \(a tuple for"
    r" Tucker, SpatiallySeparable and TensorTrain\). For a fraction of"
    r" the dense"
    r" kernel's parameters write"
    r" `rank=jaxfactor.Budget\(params=0.25\)`"
  )
  _raises(
    TypeError,
    "decompose: " + message,
    jaxfactor.decompose,
    KERNEL,
    "low_rank",
    rank=0.25,
  )
  _raises(
    TypeError,
    "TuckerConv: " + message,
    jnnx.TuckerConv,
    4,
    8,
    (3, 3),
    rank=0.25,
    rngs=nnx.Rngs(0),
  )
  _raises(
    TypeError,
    "CPConv: " + message,
    jlinen.CPConv(features=8, kernel_size=(3, 3), rank=0.25).init,
    jax.random.key(0),
    X32,
  )
  _raises(
    TypeError,
    "factorize: " + message,
    jnnx.factorize,
    _NnxNet(),
    "tucker",
    rank=0.25,
  )
  _raises(
    TypeError,
    "factorize_variables: " + message,
    jlinen.factorize_variables,
    {"params": {}},
    "tucker",
    rank=0.25,
  )


def test_budget_as_a_rank():
  _raises(
    ValueError,
    r"decompose: a `rank` given as a Budget must be"
    r" Budget\(params=...\): a FLOP or latency fraction depends on the"
    r" input, so use factorize\(...,"
    r" budget=Budget\(flops=0.5, params=None, latency=None\),"
    r" inputs=...\) for it",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=jaxfactor.Budget(flops=0.5),
  )
  _raises(
    ValueError,
    r"decompose: Budget\(params=0.001\) leaves no rank: the"
    r" smallest Tucker \(rank \(1, 1\)\) has 21 parameters, more than"
    r" 0.001 of the dense kernel's 288",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=jaxfactor.Budget(params=0.001),
  )
  for bad, shown in (
    (dict(), "none"),
    (dict(flops=0.5, params=0.5), "flops=0.5, params=0.5"),
    (dict(params=0.5, latency=0.1), "params=0.5, latency=0.1"),
  ):
    _raises(
      ValueError,
      r"Budget: give exactly one of `flops`, `params` and `latency`, got "
      + re.escape(shown),
      jaxfactor.Budget,
      **bad,
    )
  for name, value in (("flops", 1.5), ("params", True), ("latency", 0.0)):
    _raises(
      ValueError,
      rf"Budget: `{name}` must be a fraction in \(0, 1\] of the dense"
      rf" total, got {value!r}",
      jaxfactor.Budget,
      **{name: value},
    )


def test_rank_and_energy():
  _raises(
    ValueError,
    r"decompose: give exactly one of `rank` and `energy`,"
    r" got rank=None, energy=None",
    jaxfactor.decompose,
    KERNEL,
    "low_rank",
  )
  _raises(
    ValueError,
    r"decompose: give exactly one of `rank` and `energy`,"
    r" got rank=2, energy=0.5",
    jaxfactor.decompose,
    KERNEL,
    "low_rank",
    rank=2,
    energy=0.5,
  )
  for bad in (0.0, 1.5, -0.1, True):
    _raises(
      ValueError,
      rf"decompose: `energy` must be a number in \(0, 1\],"
      rf" got {bad}",
      jaxfactor.decompose,
      KERNEL,
      "low_rank",
      energy=bad,
    )


def test_value_based_rank_under_jit():
  _raises(
    ValueError,
    r"decompose: vbmf rank selection reads the kernel's"
    r" values to choose a shape, which is impossible under jit/vmap;"
    r" choose the rank eagerly \(or pass an int rank\)",
    jax.jit(lambda k: jaxfactor.decompose(k, "tucker", rank="vbmf")),
    KERNEL,
  )
  _raises(
    ValueError,
    r"decompose: energy rank selection reads the kernel's"
    r" values",
    jax.vmap(lambda k: jaxfactor.decompose(k, "cp", energy=0.9)),
    jnp.ones((2, 3, 3, 4, 4)),
  )


def test_data_aware_inputs():
  _raises(
    ValueError,
    r"decompose: `inputs` must have shape \[\*batch,"
    r" \*spatial, C\] with C = 4, 2 spatial axes and each spatial size"
    r" >= the dilated window \(3, 3\), got shape \(2, 8, 8, 3\)",
    jaxfactor.decompose,
    KERNEL,
    "low_rank",
    rank=2,
    inputs=jnp.ones((2, 8, 8, 3)),
  )
  _raises(
    ValueError,
    r"the dilated window \(5, 5\), got shape \(2, 8, 4, 4\)",
    jaxfactor.decompose,
    KERNEL,
    "low_rank",
    rank=2,
    inputs=jnp.ones((2, 8, 4, 4)),
    dilation=2,
  )
  _raises(
    ValueError,
    r"decompose: `inputs` \(data-aware decomposition\) is"
    r" supported for LowRank and Tucker, not CP",
    jaxfactor.decompose,
    KERNEL,
    "cp",
    rank=2,
    inputs=X,
  )
  _raises(
    ValueError,
    r"decompose: `damping` must be >= 0, got -1",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=2,
    inputs=X,
    damping=-1,
  )
  _raises(
    TypeError,
    r"decompose: `inputs` must have a floating dtype, got"
    r" int32",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=2,
    inputs=jnp.ones((2, 8, 8, 4), jnp.int32),
  )
  _raises(
    ValueError,
    r"decompose: `inputs` \(shape \(2, 8, 8, 4\)\) has"
    r" non-finite values \(NaN or inf\)",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=2,
    inputs=X.at[0, 0, 0, 0].set(jnp.inf),
  )
  # Two equal input channels: their covariance has no inverse.
  _raises(
    ValueError,
    r"decompose: the covariance of `inputs` \(4 x 4, from"
    r" 128 samples\) is singular: with damping=0.0 it has no Cholesky"
    r" factor. Pass `damping` > 0 \(e.g. the default 1e-3\) or more"
    r" samples",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=2,
    inputs=X.at[..., 1].set(X[..., 0]),
    damping=0.0,
  )


def test_iterations_restarts_key_and_compute_dtype():
  _raises(
    ValueError,
    r"decompose: `iterations` must be a non-negative int,"
    r" got -1",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=2,
    iterations=-1,
  )
  _raises(
    ValueError,
    r"decompose: `restarts` must be a non-negative int, got"
    r" 1.5",
    jaxfactor.decompose,
    KERNEL,
    "cp",
    rank=2,
    restarts=1.5,
  )
  _raises(
    TypeError,
    r"decompose: `key` must be a PRNG key \(e.g."
    r" jax.random.key\(0\)\), got int",
    jaxfactor.decompose,
    KERNEL,
    "cp",
    rank=2,
    key=0,
  )
  _raises(
    ValueError,
    r"decompose: `key` must be a single PRNG key, got an"
    r" array of \(2,\) keys",
    jaxfactor.decompose,
    KERNEL,
    "cp",
    rank=2,
    key=jax.random.split(jax.random.key(0)),
  )
  _raises(
    ValueError,
    r"decompose: `compute_dtype` must be float32 or float64,"
    r" got float16",
    jaxfactor.decompose,
    KERNEL,
    "cp",
    rank=2,
    compute_dtype=jnp.float16,
  )
  with jax.enable_x64(False):
    _raises(
      ValueError,
      r"decompose: `compute_dtype`=float64 needs 64-bit"
      r" mode: set jax.config.update\('jax_enable_x64', True\) first",
      jaxfactor.decompose,
      jnp.ones((3, 3, 4, 8), jnp.float32),
      "low_rank",
      rank=2,
      compute_dtype=jnp.float64,
    )


def test_norm_bound_and_cp_degeneracy_arguments():
  _raises(
    ValueError,
    r"decompose: `norm_bound` must be a positive finite number \(the bound"
    r" on the CP components' norms relative to the kernel's\), got 0.0",
    jaxfactor.decompose,
    KERNEL,
    "cp",
    rank=2,
    norm_bound=0.0,
  )
  _raises(
    TypeError,
    r"decompose: `norm_bound` must be a number or None, got bool",
    jaxfactor.decompose,
    KERNEL,
    "cp",
    rank=2,
    norm_bound=True,
  )
  _raises(
    ValueError,
    r"decompose: `norm_bound` \(norm-constrained ALS\) is for CP, not"
    r" Tucker; pass norm_bound=None",
    jaxfactor.decompose,
    KERNEL,
    "tucker",
    rank=2,
    norm_bound=1.0,
  )
  _raises(
    TypeError,
    r"cp_degeneracy: `cp` must be a jaxfactor.CP, got LowRank",
    jaxfactor.cp_degeneracy,
    LOW_RANK,
    jnp.ones((3, 3, 4, 6)),
  )
  cp = jaxfactor.CP(jnp.ones((4, 2)), (jnp.ones((3, 2)),) * 2, jnp.ones((2, 8)))
  _raises(
    ValueError,
    r"cp_degeneracy: `kernel` has shape \(3, 3, 4, 4\) but `cp` stands for"
    r" a kernel of shape \(3, 3, 4, 8\)",
    jaxfactor.cp_degeneracy,
    cp,
    jnp.ones((3, 3, 4, 4)),
  )


def test_relative_error_and_max_rank_arguments():
  _raises(
    TypeError,
    r"relative_error: `factors` must be a jaxfactor format,"
    r" got ArrayImpl",
    jaxfactor.relative_error,
    KERNEL,
    KERNEL,
  )
  _raises(
    ValueError,
    r"relative_error: `kernel` has shape \(3, 3, 4, 4\) but"
    r" the factors stand for a kernel of shape \(3, 3, 4, 6\)",
    jaxfactor.relative_error,
    LOW_RANK,
    jnp.ones((3, 3, 4, 4)),
  )
  _raises(
    ValueError,
    r"max_rank: `format` must be one of",
    jaxfactor.max_rank,
    (3, 3, 4, 8),
    "svd",
  )
  _raises(
    ValueError,
    r"max_rank: the kernel must have shape \[\*window, C,"
    r" F\] with at least one spatial axis and no empty axis, got shape"
    r" \(3, 0, 4, 8\)",
    jaxfactor.max_rank,
    (3, 0, 4, 8),
    "tucker",
  )


def test_warnings_point_at_the_callers_line():
  with pytest.warns(
    UserWarning,
    match=r"decompose: LowRank of rank 8 has 352"
    r" parameters, more than the dense kernel's 288 \(shape"
    r" \(3, 3, 4, 8\)\): the factorization is larger than"
    r" what it replaces",
  ) as record:
    jaxfactor.decompose(KERNEL, "low_rank", rank=8)
  assert record[0].filename == __file__
  with pytest.warns(
    RuntimeWarning,
    match=r"decompose: CP of rank 200 for a"
    r" kernel of shape \(3, 3, 64, 64\) is a long"
    r" decomposition: ~1.9e\+11 FLOPs \(100 ALS sweeps from 5"
    r" starts\); the rank exceeds the kernel's largest mode"
    r" \(64\), where ALS converges slowly. Lower `rank`,"
    r" `iterations` or `restarts`",
  ) as record:
    jax.eval_shape(
      lambda k: jaxfactor.decompose(k, "cp", rank=200),
      jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32),
    )
  assert record[0].filename == __file__
  # Raised while JAX traces jaxfactor directly (no frame of this file
  # between): past JAX's frames, at the line that called the transform.
  with pytest.warns(
    UserWarning, match=r"larger than what it replaces"
  ) as record:
    jax.jit(jaxfactor.decompose, static_argnames=("format", "rank"))(
      KERNEL, format="low_rank", rank=8
    )
  assert record[0].filename == __file__


# --- layers -------------------------------------------------------------------


def _nnx(cls=jnnx.LowRankConv, *args, **kwargs):
  args = args or (4, 6, (3, 3))
  kwargs.setdefault(
    "channel_multiplier" if cls is jnnx.DepthwiseSeparableConv else "rank", 2
  )
  return cls(*args, rngs=nnx.Rngs(0), **kwargs)


def _linen(cls=jlinen.LowRankConv, x=X32, **kwargs):
  kwargs.setdefault("features", 6)
  kwargs.setdefault("kernel_size", (3, 3))
  kwargs.setdefault(
    "channel_multiplier" if cls is jlinen.DepthwiseSeparableConv else "rank", 2
  )
  layer = cls(**kwargs)
  return layer, layer.init(jax.random.key(0), x)


def test_layer_rank_out_of_range():
  _raises(
    ValueError,
    r"TuckerConv: `rank` \(7, 9\) is out of range for"
    r" Tucker and kernel shape \(3, 3, 4, 6\): each must be >= 1 and at"
    r" most max_rank = \(4, 6\)",
    _nnx,
    jnnx.TuckerConv,
    rank=(7, 9),
  )
  _raises(
    ValueError,
    r"LowRankConv: `rank` 99 is out of range for LowRank"
    r" and kernel shape \(3, 3, 4, 6\): it must be >= 1 and at most"
    r" max_rank = 6",
    _linen,
    rank=99,
  )


def test_layer_geometry_is_checked_at_construction():
  _raises(
    ValueError,
    r"CPConv: `strides` must be an int or a sequence of 2"
    r" ints \(one per spatial axis\), got \(1, 1, 1\) of length 3",
    _nnx,
    jnnx.CPConv,
    4,
    6,
    (3, 3),
    (1, 1, 1),
  )
  _raises(
    ValueError,
    r"TuckerConv: `kernel_dilation` must be positive on"
    r" every axis, got \(1, 0\)",
    _nnx,
    jnnx.TuckerConv,
    kernel_dilation=(1, 0),
  )
  _raises(
    ValueError,
    r"DepthwiseConv: `padding` must be non-negative, got"
    r" -1",
    jnnx.DepthwiseConv,
    4,
    (3, 3),
    padding=-1,
    rngs=nnx.Rngs(0),
  )
  _raises(
    ValueError,
    r"LowRankConv: `kernel_size` must be a positive int or"
    r" a non-empty sequence of positive ints, got \(3, 0\)",
    _nnx,
    jnnx.LowRankConv,
    4,
    6,
    (3, 0),
  )
  _raises(
    ValueError,
    r"SpatiallySeparableConv: SpatiallySeparable needs at"
    r" least 2 spatial axes to separate; a 1-D kernel \(shape \(3, 4,"
    r" 6\)\)",
    _nnx,
    jnnx.SpatiallySeparableConv,
    4,
    6,
    3,
  )
  _raises(
    ValueError,
    r"LowRankConv: `kernel_dilation` must be an int or a"
    r" sequence of 2 ints",
    _linen,
    kernel_dilation=(1, 1, 1),
  )


def test_layer_features():
  _raises(
    ValueError,
    r"LowRankConv: `in_features` must be a positive int,"
    r" got 0",
    _nnx,
    jnnx.LowRankConv,
    0,
    6,
    (3, 3),
  )
  _raises(
    ValueError,
    r"PointwiseConv: `out_features` must be a positive int,"
    r" got 2.5",
    jnnx.PointwiseConv,
    4,
    2.5,
    rngs=nnx.Rngs(0),
  )
  _raises(
    ValueError,
    r"TuckerConv: `features` must be a positive int, got"
    r" True",
    _linen,
    jlinen.TuckerConv,
    features=True,
  )
  _raises(
    ValueError,
    r"DepthwiseConv: `channel_multiplier` must be a"
    r" positive int, got 0",
    jnnx.DepthwiseConv,
    4,
    (3, 3),
    channel_multiplier=0,
    rngs=nnx.Rngs(0),
  )


def test_layer_options():
  _raises(
    ValueError,
    r"CPConv: `implementation` must be one of \('auto',"
    r" 'factorized', 'reconstructed'\), got 'fast'",
    _nnx,
    jnnx.CPConv,
    implementation="fast",
  )
  _raises(
    TypeError,
    r"TuckerConv: `preferred_element_type` must be a dtype"
    r" or None, got 'wide'",
    _nnx,
    jnnx.TuckerConv,
    preferred_element_type="wide",
  )
  _raises(
    TypeError,
    r"DepthwiseConv: `preferred_element_type` must be a"
    r" dtype or None, got 'wide'",
    jlinen.DepthwiseConv((3, 3), preferred_element_type="wide").init,
    jax.random.key(0),
    X32,
  )
  _raises(
    TypeError,
    r"LowRankConv: `bias_init` must be an initializer, got"
    r" float",
    _nnx,
    bias_init=0.0,
  )


def test_layer_initializers():
  _raises(
    TypeError,
    r"TuckerConv: `core_init` must be an initializer, got"
    r" int",
    _nnx,
    jnnx.TuckerConv,
    core_init=1,
  )
  _raises(
    TypeError,
    r"CPConv: `kernel_init` must be an initializer, got"
    r" str",
    _linen,
    jlinen.CPConv,
    kernel_init="spectral",
  )
  _raises(
    ValueError,
    r"LowRankConv: give either `kernel_init` \(the factors"
    r" decompose a dense kernel drawn from it\) or factor initializers,"
    r" not both; got kernel_init and pointwise_init, spatial_init",
    _nnx,
    kernel_init=nnx.initializers.lecun_normal(),
    spatial_init=nnx.initializers.zeros,
    pointwise_init=nnx.initializers.zeros,
  )
  _raises(
    ValueError,
    r"DepthwiseSeparableConv: give either `kernel_init`"
    r" .* got kernel_init and depthwise_init",
    _linen,
    jlinen.DepthwiseSeparableConv,
    kernel_init=nn.initializers.lecun_normal(),
    depthwise_init=nn.initializers.zeros,
  )
  boxed = nnx.with_partitioning(
    nnx.initializers.lecun_normal(), (None, None, None, "model")
  )
  _raises(
    TypeError,
    r"LowRankConv: `kernel_init` must return an array, got"
    r" VariableMetadata; put sharding metadata on the factor"
    r" initializers instead",
    _nnx,
    kernel_init=boxed,
  )
  _raises(
    ValueError,
    r"TuckerConv: `rank` is required to initialize the"
    r" layer",
    _linen,
    jlinen.TuckerConv,
    rank=None,
  )


def test_layer_input_shape():
  layer = _nnx()
  _raises(
    ValueError,
    r"LowRankConv: the input has 5 channels \(shape"
    r" \(2, 8, 8, 5\)\) but the layer has in_features=4",
    layer,
    jnp.ones((2, 8, 8, 5), jnp.float32),
  )
  _raises(
    ValueError,
    r"LowRankConv: the input must have shape \[\*batch,"
    r" \*spatial, C\] with 2 spatial axes \(kernel_size \(3, 3\)\), got"
    r" shape \(8, 4\)",
    layer,
    jnp.ones((8, 4), jnp.float32),
  )
  linen_layer, variables = _linen(jlinen.TuckerConv)
  _raises(
    ValueError,
    r"TuckerConv: the input has 5 channels \(shape"
    r" \(2, 8, 8, 5\)\) but the layer has in_features=4",
    linen_layer.apply,
    variables,
    jnp.ones((2, 8, 8, 5), jnp.float32),
  )
  pointwise = jnnx.PointwiseConv(4, 2, rngs=nnx.Rngs(0))
  _raises(
    ValueError,
    r"PointwiseConv: the input has 3 channels \(shape"
    r" \(2, 3\)\) but the layer has in_features=4",
    pointwise,
    jnp.ones((2, 3), jnp.float32),
  )


def test_linen_depthwise_separable_factors_need_in_features():
  layer = jlinen.DepthwiseSeparableConv(
    features=6,
    kernel_size=(3, 3),
    channel_multiplier=jaxfactor.Budget(params=0.5),
  )
  variables = layer.init(jax.random.key(0), X32)
  channels = variables["params"]["depthwise"].shape[-1]
  _raises(
    ValueError,
    rf"DepthwiseSeparableConv.factors: pass `in_features`"
    rf" to tell C from m in the depthwise kernel's C\*m = {channels}"
    r" channels",
    layer.factors,
    variables["params"],
  )


# --- factorize, factorize_variables -------------------------------------------


class _NnxNet(nnx.Module):
  def __init__(self):
    self.conv = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.conv(x)


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(6, (3, 3), name="conv")(x)


LINEN_VARIABLES = {
  "params": {"conv": {"kernel": jnp.ones((3, 3, 4, 6)), "bias": jnp.zeros(6)}}
}


@pytest.mark.parametrize("fn", ["factorize", "factorize_variables"])
def test_model_factorization_arguments(fn):
  if fn == "factorize":
    call = lambda **kw: jnnx.factorize(_NnxNet(), "tucker", **kw)
  else:
    call = lambda **kw: jlinen.factorize_variables(
      LINEN_VARIABLES, "tucker", **kw
    )
  _raises(
    ValueError,
    rf"{fn}: give exactly one of `rank`, `energy` and"
    r" `budget`, got rank, energy",
    call,
    rank=2,
    energy=0.5,
  )
  _raises(
    ValueError,
    rf"{fn}: give exactly one of `rank`, `energy` and"
    r" `budget`, got none",
    call,
  )
  _raises(
    TypeError,
    rf"{fn}: `budget` must be a jaxfactor.Budget, got float",
    call,
    budget=0.5,
  )
  _raises(
    ValueError,
    rf"{fn}: a FLOP budget needs `inputs` to know each"
    r" layer's input shape",
    call,
    budget=jaxfactor.Budget(flops=0.5),
  )
  _raises(
    ValueError,
    rf"{fn}: `energy` must be a number in \(0, 1\], got"
    r" 1.5",
    call,
    energy=1.5,
  )
  _raises(
    ValueError,
    rf"{fn}: `data_aware=True` needs `inputs`",
    call,
    rank=2,
    data_aware=True,
  )
  _raises(
    ValueError,
    rf"{fn}: `format` must be one of .* got 'svd'",
    lambda: (
      jnnx.factorize(_NnxNet(), "svd", rank=2)
      if fn == "factorize"
      else jlinen.factorize_variables(LINEN_VARIABLES, "svd", rank=2)
    ),
  )
  _raises(
    ValueError,
    rf"{fn}: the budget \(0.001 of the dense total, 0.216\) is"
    r" below the cheapest factorization's total \(19\)",
    call,
    budget=jaxfactor.Budget(params=0.001),
  )
  _raises(
    ValueError,
    r"decompose: `iterations` must be a non-negative int",
    call,
    rank=2,
    iterations=-1,
  )


def test_factorize_specific_arguments():
  _raises(
    TypeError,
    r"factorize: `model` is a bare nnx.Conv; factorize works"
    r" in place on the model that holds it",
    jnnx.factorize,
    nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
    "cp",
    rank=2,
  )
  abstract = nnx.eval_shape(_NnxNet)
  _raises(
    ValueError,
    r"factorize: the model is abstract \(from"
    r" nnx.eval_shape\?\): its kernels have no values to decompose. To"
    r" rebuild a factorized model's structure for a checkpoint, use"
    r" jaxfactor.nnx.restore_structure",
    jnnx.factorize,
    abstract,
    "tucker",
    rank=2,
  )
  _raises(
    ValueError,
    r"factorize_variables: give both `model` and `inputs`,"
    r" or neither",
    jlinen.factorize_variables,
    LINEN_VARIABLES,
    "tucker",
    rank=2,
    model=_LinenNet(),
  )


def test_restore_structure_and_from_factors_arguments():
  _raises(
    TypeError,
    r"restore_structure: `ranks` must be a mapping from"
    r" layer paths to ranks \(FactorizationReport.ranks\), got list",
    jnnx.restore_structure,
    _NnxNet(),
    "tucker",
    [2],
  )
  _raises(
    ValueError,
    r"restore_structure: `ranks` names \['conv2'\], which"
    r" are not nnx.Conv layers of the model; its convs are \['conv'\]",
    jnnx.restore_structure,
    _NnxNet(),
    "tucker",
    {"conv2": 2},
  )
  _raises(
    ValueError,
    r"restore_structure: `rank` \(9, 9\) is out of range"
    r" for Tucker",
    jnnx.restore_structure,
    _NnxNet(),
    "tucker",
    {"conv": [9, 9]},
  )
  _raises(
    TypeError,
    r"restore_structure: `ranks` must be a mapping",
    jlinen.restore_structure,
    LINEN_VARIABLES,
    "tucker",
    2,
  )
  _raises(
    ValueError,
    r"restore_structure: `ranks` names \['head'\], which"
    r" hold no kernel; the kernels are at \['conv'\]",
    jlinen.restore_structure,
    LINEN_VARIABLES,
    "tucker",
    {"head": 2},
  )
  _raises(
    TypeError,
    r"from_factors: `factors` must be a jaxfactor format, got"
    r" ArrayImpl",
    jnnx.from_factors,
    KERNEL,
  )
  _raises(
    ValueError,
    r"from_factors: `bias` must have shape \(6,\) for"
    r" factors with 6 output features, got \(4,\)",
    jnnx.from_factors,
    LOW_RANK,
    bias=jnp.zeros(4),
  )
