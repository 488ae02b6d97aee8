"""Flax layers: linen <-> nnx parity, Flax's own conv as the oracle, init."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax import serialization
from flax.core import meta
from jax import lax
from reference import relative_error
from sweeps import ids
from sweeps import pairwise

import jaxfactor
import jaxfactor.linen as jlinen
import jaxfactor.nnx as jnnx
from jaxfactor import _ranks

C, F = 4, 6
# (linen class, nnx class, rank arguments)
LAYERS = {
  "low_rank": (jlinen.LowRankConv, jnnx.LowRankConv, dict(rank=3)),
  "tucker": (jlinen.TuckerConv, jnnx.TuckerConv, dict(rank=(2, 4))),
  "cp": (jlinen.CPConv, jnnx.CPConv, dict(rank=4)),
  "spatially_separable": (
    jlinen.SpatiallySeparableConv,
    jnnx.SpatiallySeparableConv,
    dict(rank=4),
  ),
  "depthwise_separable": (
    jlinen.DepthwiseSeparableConv,
    jnnx.DepthwiseSeparableConv,
    dict(channel_multiplier=2),
  ),
  "tensor_train": (
    jlinen.TensorTrainConv,
    jnnx.TensorTrainConv,
    dict(rank=(3, 4)),
  ),
}
# Each factor initializer argument, and the params it sets.
INITIALIZERS = {
  "low_rank": {"spatial_init": ["spatial"], "pointwise_init": ["pointwise"]},
  "tucker": {
    "in_proj_init": ["in_proj"],
    "core_init": ["core"],
    "out_proj_init": ["out_proj"],
  },
  "cp": {
    "in_proj_init": ["in_proj"],
    "spatial_init": ["spatial_0", "spatial_1"],
    "out_proj_init": ["out_proj"],
  },
  "spatially_separable": {"factors_init": ["factors_0", "factors_1"]},
  "depthwise_separable": {
    "depthwise_init": ["depthwise"],
    "pointwise_init": ["pointwise"],
  },
  "tensor_train": {
    "spatial_init": ["spatial"],
    "cores_init": ["cores_0", "cores_1"],
  },
}
FORMAT_NAMES = {
  "low_rank": "low_rank",
  "tucker": "tucker",
  "cp": "cp",
  "spatially_separable": "spatially_separable",
  "depthwise_separable": "depthwise_separable",
  "tensor_train": "tensor_train",
}


@pytest.fixture(autouse=True)
def float32_arithmetic():
  """Comparisons to float32 rounding need float32 arithmetic: on GPUs, JAX's
  default precision runs float32 convs and matmuls in TF32."""
  with jax.default_matmul_precision("float32"):
    yield


def _x(shape=(2, 9, 8, C), dtype=jnp.float32, seed=1):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


# Biases as trained ones, not Flax's zeros, so that a lost bias shows.
BIAS_INIT = jax.nn.initializers.normal(1.0)


def _nnx_layer(name, strides=1, **kwargs):
  _, cls, rank = LAYERS[name]
  return cls(
    C,
    F,
    (3, 3),
    strides,
    rngs=nnx.Rngs(0),
    **{**rank, "bias_init": BIAS_INIT, **kwargs},
  )


def _linen_layer(name, **kwargs):
  cls, _, rank = LAYERS[name]
  return cls(
    features=F, kernel_size=(3, 3), **{**rank, "bias_init": BIAS_INIT, **kwargs}
  )


def _copy_into(params, layer):
  """Linen's params dict into an nnx layer, the Flax parity idiom."""
  for key, value in params.items():
    getattr(layer, key)[...] = value


def _call(layer, x):
  return nnx.jit(lambda m, x: m(x))(layer, x)


def _flax_nnx_conv(kernel, bias, x, **kwargs):
  """Flax's nnx.Conv holding a given dense kernel (and bias): the oracle."""
  conv = nnx.Conv(
    x.shape[-1],
    kernel.shape[-1],
    kernel.shape[:-2],
    use_bias=bias is not None,
    precision=lax.Precision.HIGHEST,
    rngs=nnx.Rngs(0),
    **kwargs,
  )
  conv.kernel[...] = kernel.astype(conv.kernel.dtype)
  if bias is not None:
    conv.bias[...] = bias
  return conv(x)


# --- parity and the Flax oracle -----------------------------------------------

SWEEP = pairwise(
  dict(
    layer=list(LAYERS),
    strides=[1, (2, 1)],
    padding=["SAME", "CIRCULAR", ((1, 0), (2, 1))],
    kernel_dilation=[1, (1, 2)],
    implementation=["factorized", "reconstructed", "auto"],
    use_bias=[True, False],
  )
)


@pytest.mark.parametrize("case", SWEEP, ids=ids(SWEEP))
def test_linen_equals_nnx_equals_flax_conv_on_to_dense(case):
  name = case["layer"]
  geometry = dict(
    strides=case["strides"],
    padding=case["padding"],
    kernel_dilation=case["kernel_dilation"],
  )
  options = dict(
    use_bias=case["use_bias"], implementation=case["implementation"]
  )
  x = _x()
  linen_layer = _linen_layer(name, **geometry, **options)
  variables = linen_layer.init(jax.random.key(0), x)
  nnx_layer = _nnx_layer(name, geometry.pop("strides"), **geometry, **options)
  assert set(variables["params"]) == set(nnx.state(nnx_layer, nnx.Param))
  _copy_into(variables["params"], nnx_layer)
  y = _call(nnx_layer, x)
  np.testing.assert_array_equal(jax.jit(linen_layer.apply)(variables, x), y)

  factors = nnx_layer.factors
  assert type(linen_layer.factors(variables["params"], C)) is type(factors)
  bias = nnx_layer.bias[...] if case["use_bias"] else None
  expected = jaxfactor.conv(
    x,
    factors,
    strides=case["strides"],
    padding=case["padding"],
    dilation=case["kernel_dilation"],
    implementation=case["implementation"],
  )
  if bias is not None:
    expected = expected + bias.reshape(1, 1, 1, F)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  flax_y = _flax_nnx_conv(
    factors.to_dense(),
    bias,
    x,
    strides=case["strides"],
    padding=case["padding"],
    kernel_dilation=case["kernel_dilation"],
  )
  assert relative_error(y, flax_y) < 1e-5
  flax_params = {"kernel": factors.to_dense()}
  if bias is not None:
    flax_params["bias"] = bias
  linen_flax_y = nn.Conv(
    F,
    (3, 3),
    strides=case["strides"],
    padding=case["padding"],
    kernel_dilation=case["kernel_dilation"],
    use_bias=case["use_bias"],
    precision=lax.Precision.HIGHEST,
  ).apply({"params": flax_params}, x)
  assert relative_error(y, linen_flax_y) < 1e-5


DEPTHWISE_SWEEP = pairwise(
  dict(
    strides=[1, (1, 2)],
    padding=["SAME", "REFLECT", 1],
    kernel_dilation=[1, (2, 1)],
    channel_multiplier=[1, 2],
  )
)


@pytest.mark.parametrize("case", DEPTHWISE_SWEEP, ids=ids(DEPTHWISE_SWEEP))
def test_depthwise_conv_linen_nnx_and_grouped_flax_conv(case):
  x, m = _x(), case["channel_multiplier"]
  geometry = dict(
    strides=case["strides"],
    padding=case["padding"],
    kernel_dilation=case["kernel_dilation"],
  )
  linen_layer = jlinen.DepthwiseConv(
    (3, 3), channel_multiplier=m, bias_init=BIAS_INIT, **geometry
  )
  variables = linen_layer.init(jax.random.key(0), x)
  nnx_layer = jnnx.DepthwiseConv(
    C, (3, 3), channel_multiplier=m, rngs=nnx.Rngs(0), **geometry
  )
  _copy_into(variables["params"], nnx_layer)
  y = _call(nnx_layer, x)
  np.testing.assert_array_equal(jax.jit(linen_layer.apply)(variables, x), y)
  flax_y = _flax_nnx_conv(
    nnx_layer.depthwise[...],
    nnx_layer.bias[...],
    x,
    feature_group_count=C,
    **geometry,
  )
  assert relative_error(y, flax_y) < 1e-5


def test_pointwise_conv_linen_nnx_and_a_1x1_flax_conv():
  x = _x((2, 3, 5, 7, C))  # two batch axes, 2-D spatial
  linen_layer = jlinen.PointwiseConv(features=F, bias_init=BIAS_INIT)
  variables = linen_layer.init(jax.random.key(0), x)
  nnx_layer = jnnx.PointwiseConv(C, F, rngs=nnx.Rngs(0))
  _copy_into(variables["params"], nnx_layer)
  y = _call(nnx_layer, x)
  np.testing.assert_array_equal(jax.jit(linen_layer.apply)(variables, x), y)
  flax_y = _flax_nnx_conv(
    nnx_layer.pointwise[...].reshape(1, 1, C, F),
    nnx_layer.bias[...],
    x.reshape(6, 5, 7, C),
  )
  assert relative_error(y, flax_y.reshape(y.shape)) < 1e-5


@pytest.mark.parametrize("name", LAYERS)
def test_linen_and_nnx_gradients_agree(name):
  x = _x()
  linen_layer = _linen_layer(name)
  variables = linen_layer.init(jax.random.key(0), x)
  nnx_layer = _nnx_layer(name)
  _copy_into(variables["params"], nnx_layer)
  linen_grads = jax.jit(
    jax.grad(lambda v: jnp.mean(linen_layer.apply(v, x) ** 2))
  )(variables)["params"]
  nnx_grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(nnx_layer)
  nnx_grads = nnx.to_pure_dict(nnx.state(nnx_grads, nnx.Param))
  assert set(nnx_grads) == set(linen_grads)
  for key, grad in linen_grads.items():
    assert bool(jnp.any(grad != 0)), key  # every factor is used
    np.testing.assert_allclose(nnx_grads[key], grad, rtol=1e-6, atol=1e-7)


def test_batch_axes_are_flattened_and_restored():
  layer = _nnx_layer("tucker")
  x = _x((2, 3, 9, 8, C))
  y = _call(layer, x)
  assert y.shape == (2, 3, 9, 8, F)
  np.testing.assert_allclose(
    _call(layer, x[1, 2]), y[1, 2], rtol=1e-6, atol=1e-6
  )


# --- dtypes -------------------------------------------------------------------

DTYPE_SWEEP = pairwise(
  dict(
    layer=["low_rank", "cp"],
    dtype=[None, jnp.bfloat16],
    param_dtype=[jnp.float32, jnp.bfloat16],
    x=[jnp.float32, jnp.bfloat16],
  )
)


@pytest.mark.parametrize("case", DTYPE_SWEEP, ids=ids(DTYPE_SWEEP))
def test_dtype_and_param_dtype_promote_as_flax_conv(case):
  # Users run with JAX's standard promotion, which Flax relies on.
  with jax.numpy_dtype_promotion("standard"):
    layer = _nnx_layer(
      case["layer"], dtype=case["dtype"], param_dtype=case["param_dtype"]
    )
    assert layer.factors.dtype == case["param_dtype"]
    x = _x(dtype=case["x"])
    y = layer(x)
    flax_y = _flax_nnx_conv(
      layer.factors.to_dense(),
      layer.bias[...],
      x,
      dtype=case["dtype"],
      param_dtype=case["param_dtype"],
    )
  assert y.dtype == flax_y.dtype
  assert relative_error(y, flax_y) < 2e-2  # bfloat16 rounding


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_preferred_element_type_is_the_output_dtype(framework):
  x = _x(dtype=jnp.bfloat16)
  options = dict(param_dtype=jnp.bfloat16, preferred_element_type=jnp.float32)
  if framework == "nnx":
    layer = _nnx_layer("tucker", **options)
    y, factors, bias = layer(x), layer.factors, layer.bias[...]
  else:
    layer = _linen_layer("tucker", **options)
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)
    factors = layer.factors(variables["params"])
    bias = variables["params"]["bias"]
  assert y.dtype == jnp.float32
  expected = jaxfactor.conv(x, factors, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(
    y, expected + bias.astype(jnp.float32).reshape(1, 1, 1, F), rtol=1e-6
  )
  with jax.numpy_dtype_promotion("standard"):  # Flax adds a bfloat16 bias
    flax_y = _flax_nnx_conv(
      factors.to_dense(),
      bias,
      x,
      param_dtype=jnp.bfloat16,
      preferred_element_type=jnp.float32,
    )
  assert flax_y.dtype == jnp.float32 and relative_error(y, flax_y) < 1e-2


# --- initialization -----------------------------------------------------------

FIXED = jax.random.normal(jax.random.key(7), (3, 3, C, F), jnp.float32)


@pytest.mark.parametrize("name", LAYERS)
def test_kernel_init_gives_the_decomposition_of_its_draw(name):
  seen = []

  def kernel_init(key, shape, dtype):
    seen.append((tuple(shape), dtype))
    return FIXED.astype(dtype)

  _, _, rank = LAYERS[name]
  expected = jaxfactor.decompose(
    FIXED, FORMAT_NAMES[name], rank=next(iter(rank.values()))
  ).to_dense()
  nnx_layer = _nnx_layer(name, kernel_init=kernel_init)
  linen_layer = _linen_layer(name, kernel_init=kernel_init)
  variables = linen_layer.init(jax.random.key(0), _x())
  assert seen == [((3, 3, C, F), jnp.float32)] * 2
  for factors in (
    nnx_layer.factors,
    linen_layer.factors(variables["params"], C),
  ):
    np.testing.assert_allclose(
      factors.to_dense(), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", LAYERS)
def test_each_initializer_sets_its_own_factors(name):
  constants = {
    arg: nnx.initializers.constant(float(i + 2))
    for i, arg in enumerate(INITIALIZERS[name])
  }
  bias_init = nnx.initializers.constant(-1.0)
  nnx_params = nnx.to_pure_dict(
    nnx.state(_nnx_layer(name, bias_init=bias_init, **constants), nnx.Param)
  )
  linen_params = _linen_layer(name, bias_init=bias_init, **constants).init(
    jax.random.key(0), _x()
  )["params"]
  for params in (nnx_params, linen_params):
    assert set(params) == {
      "bias",
      *(p for ps in INITIALIZERS[name].values() for p in ps),
    }
    np.testing.assert_array_equal(params["bias"], -1.0)
    for i, arg in enumerate(INITIALIZERS[name]):
      for param in INITIALIZERS[name][arg]:
        np.testing.assert_array_equal(params[param], float(i + 2))


def test_primitive_layers_initializers():
  constant = nnx.initializers.constant
  depthwise = jnnx.DepthwiseConv(
    C,
    (3, 3),
    depthwise_init=constant(2.0),
    bias_init=constant(3.0),
    rngs=nnx.Rngs(0),
  )
  pointwise = jnnx.PointwiseConv(
    C, F, pointwise_init=constant(4.0), use_bias=False, rngs=nnx.Rngs(0)
  )
  np.testing.assert_array_equal(depthwise.depthwise[...], 2.0)
  np.testing.assert_array_equal(depthwise.bias[...], 3.0)
  np.testing.assert_array_equal(pointwise.pointwise[...], 4.0)
  assert pointwise.bias is None
  params = jlinen.DepthwiseConv((3, 3), depthwise_init=constant(5.0)).init(
    jax.random.key(0), _x()
  )["params"]
  np.testing.assert_array_equal(params["depthwise"], 5.0)


@pytest.mark.parametrize("name", LAYERS)
def test_default_init_has_the_variance_of_a_dense_lecun_kernel(name):
  """Var(to_dense()) is within 15% of 1 / (k * C), the variance of Flax's
  default dense conv of the same shape (lecun_normal), averaged over four
  draws: a tensor train's entries share its small spatial core, so one
  draw's variance spreads by ~13% (measured over 16 seeds)."""
  _, cls, _ = LAYERS[name]
  rank = jaxfactor.Budget(params=0.5)
  rank_arg = (
    {"channel_multiplier": 4}
    if name == "depthwise_separable"
    else {"rank": rank}
  )
  variance = np.mean(
    [
      jnp.var(
        cls(
          128, 128, (3, 3), rngs=nnx.Rngs(seed), **rank_arg
        ).factors.to_dense()
      )
      for seed in range(4)
    ]
  )
  assert abs(variance * 9 * 128 - 1) < 0.15


@pytest.mark.parametrize("name", LAYERS)
def test_budget_rank_is_the_one_decompose_picks(name):
  budget = jaxfactor.Budget(params=0.4)
  _, cls, rank = LAYERS[name]
  arg = next(iter(rank))
  layer = _nnx_layer(name, **{arg: budget})
  expected = _ranks.rank_of(
    jax.eval_shape(
      lambda k: jaxfactor.decompose(
        k, FORMAT_NAMES[name], rank=budget, iterations=1, restarts=0
      ),
      jax.ShapeDtypeStruct((3, 3, C, F), jnp.float32),
    )
  )
  assert _ranks.rank_of(layer.factors) == expected
  assert layer.factors.num_params <= 0.4 * 9 * C * F
  params = _linen_layer(name, **{arg: budget}).init(jax.random.key(0), _x())[
    "params"
  ]
  assert {k: v.shape for k, v in params.items()} == {
    k: v.shape for k, v in nnx.to_pure_dict(nnx.state(layer, nnx.Param)).items()
  }


# --- sharding metadata --------------------------------------------------------


def _names(shape):
  """A partitioning for a factor: the last axis on "model"."""
  return (None,) * (len(shape) - 1) + ("model",)


@pytest.mark.parametrize("name", LAYERS)
def test_with_partitioning_reaches_the_params(name):
  default = _nnx_layer(name)
  partitioning = {
    arg: _names(getattr(default, params[0]).shape)
    for arg, params in INITIALIZERS[name].items()
  }
  mesh = jax.make_mesh(
    (1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  with jax.set_mesh(mesh):
    layer = _nnx_layer(
      name,
      **{
        arg: nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
        for arg, names in partitioning.items()
      },
    )
  params = {k: getattr(layer, k) for k in layer.param_names}
  for key, param in params.items():
    names = _names(param.shape)
    assert param.get_metadata()["out_sharding"] == names, key
    assert param[...].sharding.spec == jax.sharding.PartitionSpec(*names)
  linen_layer = _linen_layer(
    name,
    **{
      arg: nn.with_partitioning(nn.initializers.lecun_normal(), names)
      for arg, names in partitioning.items()
    },
  )
  variables = linen_layer.init(jax.random.key(0), _x())
  for key in params:
    box = variables["params"][key]
    assert isinstance(box, nn.Partitioned), key
    assert box.names == _names(box.value.shape)
  factors = linen_layer.factors(variables["params"], C)
  y = linen_layer.apply(variables, _x())
  expected = jaxfactor.conv(_x(), factors) + meta.unbox(
    variables["params"]["bias"]
  ).reshape(1, 1, 1, F)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


# --- state --------------------------------------------------------------------


def test_checkpoint_round_trip():
  model = _nnx_layer("cp")
  saved = serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
  fresh = jnnx.CPConv(C, F, (3, 3), rank=4, rngs=nnx.Rngs(1))
  state = nnx.state(fresh)
  nnx.replace_by_pure_dict(
    state, serialization.from_bytes(nnx.to_pure_dict(state), saved)
  )
  nnx.update(fresh, state)
  np.testing.assert_array_equal(_call(fresh, _x()), _call(model, _x()))


def test_param_counts_match_cost():
  for name in LAYERS:
    layer = _nnx_layer(name, use_bias=False)
    params = nnx.state(layer, nnx.Param)
    count = sum(math.prod(v.shape) for v in jax.tree.leaves(params))
    assert (
      count
      == layer.factors.num_params
      == jaxfactor.cost(layer.factors, (1, 8, 8, C)).params
    )


def test_tensor_train_layers_hold_a_train_of_any_modes():
  """Layers made with the default modes also hold a train of other modes:
  linen reads the shapes of stored params, nnx's `from_factors` keeps them."""
  kernel = jax.random.normal(jax.random.key(2), (3, 3, C, F), jnp.float32)
  factors = jaxfactor.decompose(
    kernel,
    "tensor_train",
    rank=(2, 3, 2),
    in_modes=(1, 2, 2),
    out_modes=(3, 1, 2),
  )
  x = _x()
  expected = _flax_nnx_conv(factors.to_dense(), None, x)
  params = {"params": dict(factors.params())}
  linen_y = jax.jit(
    jlinen.TensorTrainConv(features=F, kernel_size=(3, 3), use_bias=False).apply
  )(params, x)
  nnx_y = _call(jnnx.from_factors(factors), x)
  assert relative_error(linen_y, expected) < 1e-5
  assert relative_error(nnx_y, expected) < 1e-5
