"""Grouped factorized layers (`feature_group_count`) and grouped convs in
model factorization.

Oracles: Flax's own `nnx.Conv` / `nn.Conv(feature_group_count=G)` with the
grouped dense kernel built from each group's factors (`Grouped.to_dense`
is checked against an independent formula in test_grouped.py), the dense
model itself at full rank, and `jaxfactor.cost` of each group's format on
its share of the channels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax import serialization

import jaxfactor
import jaxfactor.linen as jlinen
import jaxfactor.nnx as jnnx

F64 = jnp.float64
G = 2
# (linen class, nnx class, rank arguments); ranks per group of a
# [3, 3, 2, 3] group kernel (C = 4, F = 6).
LAYERS = {
  "low_rank": (jlinen.LowRankConv, jnnx.LowRankConv, dict(rank=2)),
  "tucker": (jlinen.TuckerConv, jnnx.TuckerConv, dict(rank=(2, 3))),
  "cp": (jlinen.CPConv, jnnx.CPConv, dict(rank=3)),
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
    dict(rank=(3, 1)),
  ),
}
C, F = 4, 6
# One geometry per format, cycling through strides, dilation and the
# padding forms (every form is swept against Flax, ungrouped, elsewhere).
GEOMETRIES = [
  dict(strides=2, padding="SAME"),
  dict(kernel_dilation=2, padding="VALID"),
  dict(strides=(1, 2), padding=((1, 0), (2, 1))),
]


def _x(channels=C, seed=1, shape=(2, 7, 6)):
  return jax.random.normal(jax.random.key(seed), (*shape, channels), F64)


def _nnx_layer(name, **kwargs):
  _, cls, rank = LAYERS[name]
  return cls(
    C,
    F,
    (3, 3),
    feature_group_count=G,
    param_dtype=F64,
    implementation="factorized",
    rngs=nnx.Rngs(0),
    **{**rank, **kwargs},
  )


@pytest.mark.parametrize(
  "name, geometry",
  [(n, GEOMETRIES[i % 3]) for i, n in enumerate(LAYERS)],
  ids=list(LAYERS),
)
def test_layers_equal_flax_grouped_conv_of_their_kernel(name, geometry):
  """nnx and linen layers == Flax's grouped conv of the reconstructed
  kernel, and linen == nnx on the same params."""
  layer = _nnx_layer(name, **geometry)
  factors = layer.factors
  assert isinstance(factors, jaxfactor.Grouped) and factors.groups == G
  assert factors.shape == (3, 3, C // G, F)
  # Random biases, so that the bias layout is checked too.
  layer.bias[...] = jax.random.normal(jax.random.key(5), (F,), F64)
  x = _x()
  flax_conv = nnx.Conv(
    C,
    F,
    (3, 3),
    feature_group_count=G,
    param_dtype=F64,
    precision=jax.lax.Precision.HIGHEST,
    rngs=nnx.Rngs(0),
    **geometry,
  )
  flax_conv.kernel[...] = factors.to_dense()
  flax_conv.bias[...] = layer.bias[...]
  expected = flax_conv(x)
  y = layer(x)
  np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)

  linen_cls, _, rank = LAYERS[name]
  linen_layer = linen_cls(
    features=F,
    kernel_size=(3, 3),
    feature_group_count=G,
    param_dtype=F64,
    implementation="factorized",
    **rank,
    **geometry,
  )
  variables = linen_layer.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables["params"]) == {
    k: v.shape for k, v in nnx.to_pure_dict(nnx.state(layer)).items()
  }
  params = {k: v for k, v in nnx.to_pure_dict(nnx.state(layer)).items()}
  np.testing.assert_array_equal(linen_layer.apply({"params": params}, x), y)
  reference = nn.Conv(
    F, (3, 3), feature_group_count=G, precision="highest", **geometry
  ).apply({"params": {"kernel": factors.to_dense(), "bias": params["bias"]}}, x)
  np.testing.assert_allclose(y, reference, rtol=1e-12, atol=1e-12)


def test_each_group_is_initialized_as_one_ungrouped_layer():
  """Factor initializers see one group's shape (so one group's fan-in),
  once per group, with different keys; `kernel_init` decomposes the grouped
  kernel Flax's grouped conv would draw."""
  calls = []

  def init(key, shape, dtype):
    calls.append(tuple(shape))
    return jax.random.normal(key, shape, dtype)

  layer = _nnx_layer("tucker", in_proj_init=init, core_init=init)
  ungrouped = jnnx.TuckerConv(
    C // G, F // G, (3, 3), rank=(2, 3), rngs=nnx.Rngs(0)
  )
  assert calls == [ungrouped.in_proj.shape] * G + [ungrouped.core.shape] * G
  for name in layer.param_names:
    value = getattr(layer, name)[...]
    assert value.shape == (G, *getattr(ungrouped, name).shape)
    assert not np.allclose(value[0], value[1]), name
  calls.clear()
  jlinen.TuckerConv(
    F,
    (3, 3),
    feature_group_count=G,
    rank=(2, 3),
    param_dtype=F64,
    core_init=init,
  ).init(jax.random.key(0), _x())
  assert calls == [ungrouped.core.shape] * G

  dense = nnx.initializers.lecun_normal()
  with pytest.warns(UserWarning, match="larger than what it replaces"):
    full = jnnx.LowRankConv(
      C,
      F,
      (3, 3),
      rank=3,
      feature_group_count=G,
      kernel_init=dense,
      param_dtype=F64,
      rngs=nnx.Rngs(0),
    )
  # Full rank per group: the factors are exactly the drawn grouped kernel.
  expected = dense(nnx.Rngs(0).params(), (3, 3, C // G, F), F64)
  np.testing.assert_allclose(
    full.factors.to_dense(), expected, rtol=1e-10, atol=1e-12
  )


def test_sharding_metadata_gets_an_unsharded_groups_axis():
  names = (None, "model")
  mesh = jax.make_mesh(
    (1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  with jax.set_mesh(mesh):
    nnx_layer = _nnx_layer(
      "low_rank",
      pointwise_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), names
      ),
    )
  assert nnx_layer.pointwise.get_metadata()["out_sharding"] == (None, *names)
  assert nnx_layer.pointwise[...].sharding.spec == jax.sharding.PartitionSpec(
    None, *names
  )
  variables = jlinen.LowRankConv(
    F,
    (3, 3),
    feature_group_count=G,
    rank=2,
    param_dtype=F64,
    pointwise_init=nn.with_partitioning(nn.initializers.lecun_normal(), names),
  ).init(jax.random.key(0), _x())
  box = variables["params"]["pointwise"]
  assert isinstance(box, nn.Partitioned)
  assert box.names == (None, *names)
  assert box.value.shape == (G, 2, F // G)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(feature_group_count=3), r"`in_features` \(=4\) must be divisible"),
    (dict(out_features=5), r"`out_features` \(=5\) must be divisible"),
    (dict(feature_group_count=0), r"`feature_group_count` must be a pos"),
  ],
)
def test_bad_groups_are_rejected(kwargs, message):
  args = {
    **dict(in_features=C, out_features=F, feature_group_count=G),
    **kwargs,
  }
  with pytest.raises(ValueError, match=f"LowRankConv: {message}"):
    jnnx.LowRankConv(kernel_size=(3, 3), rank=1, rngs=nnx.Rngs(0), **args)
  layer = jlinen.LowRankConv(
    args["out_features"],
    (3, 3),
    rank=1,
    feature_group_count=args["feature_group_count"],
  )
  with pytest.raises(ValueError, match=f"LowRankConv: {message}"):
    layer.init(jax.random.key(0), _x())


# --- model factorization ------------------------------------------------------


class NnxNet(nnx.Module):
  """A grouped conv (G = 2), then a depthwise conv."""

  def __init__(self, rngs):
    options = dict(param_dtype=F64, precision="highest", rngs=rngs)
    self.grouped = nnx.Conv(
      8, 16, (3, 3), strides=2, feature_group_count=G, **options
    )
    self.depthwise = nnx.Conv(16, 16, (3, 3), feature_group_count=16, **options)

  def __call__(self, x):
    return self.depthwise(self.grouped(x))


class LinenNet(nn.Module):
  conv: type = nn.Conv

  @nn.compact
  def __call__(self, x):
    options = dict(param_dtype=F64, precision="highest")
    x = self.conv(
      16, (3, 3), strides=2, feature_group_count=G, name="grouped", **options
    )(x)
    return nn.Conv(
      16, (3, 3), feature_group_count=16, name="depthwise", **options
    )(x)


def _only_grouped(path, conv):
  del conv
  return path == ("grouped",)


def _input():
  return _x(channels=8)


def test_factorize_at_full_rank_is_exact_and_depthwise_is_skipped():
  model = NnxNet(nnx.Rngs(0))
  x = _input()
  expected = model(x)
  report = jnnx.factorize(
    model, "tucker", rank=(4, 8), inputs=x, allow_larger=True, iterations=1
  )
  assert isinstance(model.grouped, jnnx.TuckerConv)
  assert model.grouped.feature_group_count == G
  assert isinstance(model.depthwise, nnx.Conv)
  (grouped,) = [r for r in report.layers if r.path == ("grouped",)]
  assert (grouped.rank, grouped.groups) == ((4, 8), G)
  assert grouped.params_before == 3 * 3 * 4 * 16
  assert grouped.params_after == model.grouped.factors.num_params
  (skipped,) = [r for r in report.layers if r.path == ("depthwise",)]
  assert "depthwise conv (feature_group_count=16" in skipped.skipped
  assert report.groups == {"grouped": G}
  np.testing.assert_allclose(model(x), expected, rtol=1e-10, atol=1e-10)


def test_reduced_rank_flops_and_params_are_the_groups_sum():
  model = NnxNet(nnx.Rngs(0))
  x = _input()
  report = jnnx.factorize(
    model, "low_rank", rank=2, inputs=x, filter=_only_grouped
  )
  (layer,) = report.factorized
  factors = model.grouped.factors
  group_input = (*x.shape[:-1], 8 // G)  # the grouped conv's input: 8 channels
  per_group = [
    jaxfactor.cost(
      jax.tree.map(lambda a, g=g: a[g], factors.inner),
      group_input,
      strides=2,
      implementation="factorized",
    )
    for g in range(G)
  ]
  assert layer.flops_after == sum(c.flops for c in per_group)
  assert layer.params_after == sum(c.params for c in per_group)
  dense_group = jax.ShapeDtypeStruct((3, 3, 4, 8), F64)
  assert layer.flops_before == G * (
    jaxfactor.cost(dense_group, group_input, strides=2).flops
  )
  expected_error = jaxfactor.relative_error(
    factors, NnxNet(nnx.Rngs(0)).grouped.kernel[...]
  )
  assert layer.relative_error == pytest.approx(float(expected_error))


def test_energy_and_budget_choose_per_group_ranks():
  model = NnxNet(nnx.Rngs(0))
  kernel = model.grouped.kernel[...]
  report = jnnx.factorize(model, "low_rank", energy=0.6, filter=_only_grouped)
  groups = jaxfactor.decompose(
    kernel, "low_rank", energy=0.6, feature_group_count=G
  )
  largest = groups.inner.spatial.shape[-1]  # the largest any group needs
  assert report.factorized[0].rank == largest == model.grouped.rank
  budget = jnnx.factorize(
    NnxNet(nnx.Rngs(0)),
    "tucker",
    budget=jaxfactor.Budget(params=0.5),
    filter=_only_grouped,
  )
  (layer,) = budget.factorized
  assert layer.params_after <= 0.5 * layer.params_before
  data_aware = jnnx.factorize(
    NnxNet(nnx.Rngs(0)),
    "tucker",
    rank=2,
    inputs=_input(),
    data_aware=True,
    filter=_only_grouped,
  )
  assert "a grouped conv (feature_group_count=2)" in (
    data_aware.layers[1].skipped
  )


def test_restore_structure_and_linen_parity():
  """nnx and linen factorize a grouped conv alike; the structure rebuilt
  from the report restores a checkpoint in both APIs."""
  x = _input()
  model = NnxNet(nnx.Rngs(0))
  report = jnnx.factorize(
    model, "low_rank", rank=3, inputs=x, filter=_only_grouped
  )
  expected = model(x)
  saved = serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
  abstract = nnx.eval_shape(lambda: NnxNet(nnx.Rngs(1)))
  jnnx.restore_structure(abstract, "low_rank", report.ranks)
  graphdef, state = nnx.split(abstract)
  pure = serialization.from_bytes(nnx.to_pure_dict(state), saved)
  restored = nnx.merge(graphdef, pure)
  np.testing.assert_array_equal(restored(x), expected)

  dense_vars = {
    "params": {
      name: {
        "kernel": getattr(NnxNet(nnx.Rngs(0)), name).kernel[...],
        "bias": getattr(NnxNet(nnx.Rngs(0)), name).bias[...],
      }
      for name in ("grouped", "depthwise")
    }
  }
  variables, linen_report = jlinen.factorize_variables(
    dense_vars,
    "low_rank",
    rank=3,
    model=LinenNet(),
    inputs=x,
    filter=_only_grouped,
  )
  assert linen_report.ranks == report.ranks
  assert linen_report.groups == report.groups == {"grouped": G}
  y = LinenNet(conv=jlinen.LowRankConv).apply(variables, x)
  np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
  target = jlinen.restore_structure(
    jax.eval_shape(LinenNet().init, jax.random.key(0), x),
    "low_rank",
    linen_report.ranks,
    groups=linen_report.groups,
  )
  assert jax.tree.map(jnp.shape, target) == jax.tree.map(jnp.shape, variables)
  loaded = serialization.from_bytes(target, serialization.to_bytes(variables))
  np.testing.assert_array_equal(
    LinenNet(conv=jlinen.LowRankConv).apply(loaded, x), y
  )
  with pytest.raises(ValueError, match=r"`groups` names \['nope'\]"):
    jlinen.restore_structure(
      dense_vars, "low_rank", {"grouped": 3}, groups={"nope": 2}
    )
  with pytest.raises(ValueError, match=r"`groups\['grouped'\]` must be a pos"):
    jlinen.restore_structure(
      dense_vars, "low_rank", {"grouped": 3}, groups={"grouped": 0}
    )


def test_from_factors_and_merging_an_adapter_keep_the_groups():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 6), F64)
  factors = jaxfactor.decompose(
    kernel, "low_rank", rank=2, feature_group_count=G
  )
  layer = jnnx.from_factors(factors, implementation="factorized")
  assert (type(layer), layer.feature_group_count) == (jnnx.LowRankConv, G)
  x = _x()
  np.testing.assert_allclose(
    layer(x), jaxfactor.conv(x, factors), rtol=1e-12, atol=1e-12
  )
  adapter = jnnx.Adapter(layer, "low_rank", rank=1, rngs=nnx.Rngs(1))
  adapter.adapter_pointwise[...] = jax.random.normal(
    jax.random.key(2), adapter.adapter_pointwise.shape, F64
  )
  merged = jnnx.merge(adapter)
  assert (merged.rank, merged.feature_group_count) == (3, G)
  np.testing.assert_allclose(merged(x), adapter(x), rtol=1e-10, atol=1e-10)
  unmerged = jnnx.unmerge(merged, adapter)
  np.testing.assert_allclose(unmerged(x), layer(x), rtol=1e-12, atol=1e-12)
