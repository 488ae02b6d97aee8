"""Adapters: `conv(x, W) + scale * conv(x, dW)` against independent oracles.

The adapter branch equals Flax's own (grouped) `nn.Conv` on `W + scale *
dW.to_dense()`, the dense update built by each format's formula in numpy,
on a pairwise sweep of every geometry option, groups and N = 1-3. Then:
gradients (`check_grads`), exact equality with the base model at the
start, no gradient or update to the base weights (nnx filter, optax mask),
linen <-> nnx parity, merge/unmerge, extract against Eckart-Young, dropout,
per-layer patterns, saving and loading only the adapters, the report, and
every error message.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import linen as nn
from flax import nnx
from flax import serialization
from flax import traverse_util
from jax.test_util import check_grads
from reference import PADDINGS
from reference import STRIDES
from reference import WINDOWS
from reference import case_id
from reference import flax_conv
from reference import random_format
from reference import random_input
from reference import relative_error
from sweeps import ids
from sweeps import pairwise

import jaxfactor
import jaxfactor.linen as jlinen
import jaxfactor.nnx as jnnx
from jaxfactor import _adapters

F64 = jnp.float64
ADAPTER_FORMATS = ("low_rank", "tucker", "cp", "spatially_separable")
CLASSES = {
  "low_rank": jaxfactor.LowRank,
  "tucker": jaxfactor.Tucker,
  "cp": jaxfactor.CP,
  "spatially_separable": jaxfactor.SpatiallySeparable,
}


def _random_update(name, window, c, f, groups, seed=0):
  """One random update per group ([*window, C/G, F/G] each), a Grouped of
  them for G > 1."""
  ranks = {"spatially_separable": (2,) * (len(window) - 1)}.get(name, 2)
  if name == "tucker":
    ranks = (2, 3)
  per_group = [
    random_format(name, window, c, f, seed=seed + g, ranks=ranks)
    for g in range(groups)
  ]
  if groups == 1:
    return per_group[0], per_group
  return jaxfactor.Grouped.stack(per_group), per_group


def _dense_update(per_group):
  """The block-diagonal dense update in the grouped kernel's layout, from
  each format's formula in numpy."""
  return np.concatenate(
    [reference.dense_from_formula(f) for f in per_group], axis=-1
  )


# --- the adapter branch against Flax ------------------------------------------


def _possible(case):
  """CAUSAL padding is 1-D only; SpatiallySeparable needs 2 axes or more."""
  causal = case.get("padding") == "CAUSAL"
  separable = case.get("format") == "spatially_separable"
  return (
    not (causal and separable)
    and (not causal or case.get("n", 1) == 1)
    and (not separable or case.get("n", 2) >= 2)
  )


SWEEP = reference.all_pairs(
  {
    "format": ADAPTER_FORMATS,
    "padding": PADDINGS,
    "n": (1, 2, 3),
    "strides": STRIDES,
    "dilation": STRIDES,
    "groups": (1, 2),
    "implementation": ("factorized", "reconstructed"),
  },
  _possible,
)


@pytest.mark.parametrize("case", SWEEP, ids=case_id)
def test_adapted_conv_equals_flax_conv_of_the_merged_kernel(case):
  n, groups = case["n"], case["groups"]
  window = WINDOWS[n]
  c, f = 2, 3  # per group
  update, per_group = _random_update(case["format"], window, c, f, groups)
  kernel = random_input((*window, c, f * groups), seed=7)
  x = random_input(
    reference.spatial_input_shape(window, channels=c * groups, extra=5)
  )
  kwargs = reference.geometry(case, n)
  scale = 0.75
  branch = jax.jit(
    functools.partial(
      jaxfactor.adapter_conv,
      scale=scale,
      implementation=case["implementation"],
      **kwargs,
    )
  )(x, update)
  base = flax_conv(x, kernel, feature_group_count=groups, **kwargs)
  merged = kernel + scale * _dense_update(per_group)
  expected = flax_conv(x, merged, feature_group_count=groups, **kwargs)
  assert relative_error(base + branch, expected) < reference.rtol(F64)


@pytest.mark.parametrize("name", ADAPTER_FORMATS)
def test_merge_update_of_a_grouped_dense_kernel_is_block_diagonal(name):
  update, per_group = _random_update(name, (3, 2), 2, 3, 2)
  kernel = random_input((3, 2, 2, 6), seed=7)
  np.testing.assert_allclose(
    jax.jit(functools.partial(jaxfactor.merge_update, scale=0.75))(
      kernel, update
    ),
    kernel + 0.75 * _dense_update(per_group),
    rtol=1e-13,
    atol=1e-13,
  )


# --- gradients ----------------------------------------------------------------

TOL = reference.GRAD_TOL[jnp.dtype(F64)]


@pytest.mark.parametrize(
  "name,groups,factor",
  [
    ("low_rank", 1, 0),
    ("tucker", 2, 1),
    ("cp", 1, 2),
    ("cp", 2, 3),
    ("spatially_separable", 1, 1),
  ],
)
def test_check_grads_of_adapter_factors(name, groups, factor):
  """One factor per case, every format, a first, inner and last factor
  among them, grouped and not (the update is linear in each factor, so
  `eps=1.0` central differences are exact to rounding)."""
  update, _ = _random_update(name, (3, 2), 2, 3, groups)
  x = random_input((1, 6, 5, 2 * groups))
  leaves, treedef = jax.tree.flatten(update)
  conv = functools.partial(
    jaxfactor.adapter_conv,
    scale=0.5,
    strides=(2, 1),
    dilation=(1, 2),
    padding="CIRCULAR",
  )

  def fn(leaf):
    return conv(
      x, treedef.unflatten(leaves[:factor] + [leaf] + leaves[factor + 1 :])
    )

  check_grads(
    jax.jit(fn),
    (leaves[factor],),
    order=2,
    modes=("fwd", "rev"),
    eps=1.0,
    atol=TOL,
    rtol=TOL,
  )


# --- models -------------------------------------------------------------------


class Net(nnx.Module):
  """A dense conv, a grouped conv, a LowRank conv, a depthwise conv."""

  def __init__(self, rngs, dtype=jnp.float32):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(2, 4, (3, 3), padding="CIRCULAR", **kw)
    self.grouped = nnx.Conv(
      4, 6, (3, 2), feature_group_count=2, kernel_dilation=(1, 2), **kw
    )
    self.factorized = jnnx.LowRankConv(6, 4, (3, 3), strides=2, rank=2, **kw)
    self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, **kw)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.grouped(x))
    x = nnx.relu(self.factorized(x))
    return self.depthwise(x).mean((1, 2))


@nnx.jit
def _call(model, x):
  return model(x)


def _x(dtype=jnp.float32, seed=3):
  return random_input((2, 7, 6, 2), seed=seed, dtype=dtype)


def _randomize(model, seed=5):
  """Random values in every adapter param (as after training)."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, jnnx.AdapterParam)
  pure = jax.tree.map(
    lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype)),
    nnx.to_pure_dict(state),
  )
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def test_adapt_starts_as_exactly_the_base_model_and_reports():
  model = Net(nnx.Rngs(0))
  x = _x()
  before = _call(model, x)
  report = jnnx.adapt(
    model, "low_rank", rank={"depthwise": 1, ".*": 2}, inputs=x
  )
  np.testing.assert_array_equal(_call(model, x), before)
  layers = {"/".join(map(str, r.path)): r for r in report.layers}
  assert set(report.ranks) == {"conv1", "grouped", "factorized"}
  assert isinstance(model.conv1, jnnx.Adapter)
  assert isinstance(model.factorized.base, jnnx.LowRankConv)
  # The depthwise conv: an update would outgrow it.
  assert re.search("at least the kernel's 36", layers["depthwise"].skipped)
  # One update per group: a Grouped, factors on a leading axis of 2.
  grouped = model.grouped
  assert grouped.groups == 2 and grouped.update.groups == 2
  assert isinstance(grouped.update, jaxfactor.Grouped)
  assert grouped.adapter_pointwise.shape == (2, 2, 3)
  assert grouped.adapter_spatial.shape == (2, 3, 2, 2, 2)
  trainable = sum(
    a.size for a in jax.tree.leaves(nnx.state(model, jnnx.AdapterParam))
  )
  total = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert report.trainable == trainable
  assert report.frozen == total - trainable
  assert sum(r.trainable for r in report.adapted) == trainable
  # Extra FLOPs: jaxfactor.cost of the update on the recorded input.
  expected = jaxfactor.cost(
    model.conv1.update, (2, 7, 6, 2), padding="CIRCULAR"
  ).flops
  assert layers["conv1"].extra_flops == expected
  assert layers["grouped"].extra_flops == 2 * (
    jaxfactor.cost(
      jax.tree.map(lambda a: a[0], model.grouped.update.inner),
      (2, 7, 6, 2),
      dilation=(1, 2),
    ).flops
  )
  assert "trainable" in str(report)


def test_allow_larger_adapts_a_depthwise_conv_one_update_per_channel():
  class Depthwise(nnx.Module):
    def __init__(self):
      self.conv = nnx.Conv(
        3, 6, (3, 3), feature_group_count=3, rngs=nnx.Rngs(0)
      )

  model, x = Depthwise(), _x(seed=4)[..., :1].repeat(3, -1)
  report = jnnx.adapt(model, "low_rank", rank=1, allow_larger=True)
  (layer,) = report.adapted
  assert (layer.groups, layer.trainable, layer.frozen) == (3, 3 * 11, 54 + 6)
  assert model.conv.adapter_pointwise.shape == (3, 1, 2)
  _randomize(model)
  merged = jnnx.merge(model)
  assert relative_error(merged.conv(x), model.conv(x)) < 1e-5


# The layers pass their geometry to `adapter_conv` (swept in full above):
# a mode and explicit pairs, strides and dilation off and per axis, groups.
LAYER_SWEEP = pairwise(
  dict(
    format=list(ADAPTER_FORMATS),
    padding=["REFLECT", ((1, 0), (2, 1))],
    strides_dilation=[(1, 1), ((2, 1), (1, 2))],
    groups=[1, 2],
  )
)


@pytest.mark.parametrize("case", LAYER_SWEEP, ids=ids(LAYER_SWEEP))
def test_nnx_and_linen_adapters_equal_flax_conv_of_the_adapted_kernel(case):
  groups = case["groups"]
  strides, dilation = case["strides_dilation"]
  geometry = dict(
    strides=strides, padding=case["padding"], kernel_dilation=dilation
  )
  normal = jax.nn.initializers.normal(1.0)
  conv = nnx.Conv(
    4,
    6,
    (3, 3),
    feature_group_count=groups,
    bias_init=normal,  # trained biases, not zeros: a lost bias shows
    param_dtype=F64,
    rngs=nnx.Rngs(0),
    **geometry,
  )
  adapter = jnnx.Adapter(
    conv, case["format"], rank=2, alpha=3.0, rngs=nnx.Rngs(1)
  )
  _randomize(adapter)
  x = random_input((2, 9, 8, 4))
  y = _call(adapter, x)
  update = adapter.update
  per_group = [
    jax.tree.map(lambda a, g=g: a[g], update.inner) if groups > 1 else update
    for g in range(groups)
  ]
  kernel = conv.kernel[...] + adapter.scale * _dense_update(per_group)
  expected = flax_conv(
    x,
    kernel,
    strides=strides,
    padding=case["padding"],
    dilation=dilation,
    feature_group_count=groups,
  ) + conv.bias[...].reshape(1, 1, 1, 6)
  assert relative_error(y, expected) < 1e-12
  # linen: the same numbers give the same outputs.
  params = {"kernel": conv.kernel[...], "bias": conv.bias[...]}
  params.update(
    {
      f"adapter_{k}": getattr(adapter, f"adapter_{k}")[...]
      for k in adapter.param_names
    }
  )
  layer = jlinen.AdaptedConv(
    6,
    (3, 3),
    feature_group_count=groups,
    adapter_format=case["format"],
    param_dtype=F64,
    **geometry,
  )
  variables = {"params": params, "adapter": {"scale": jnp.float32(1.5)}}
  linen_y = jax.jit(layer.apply)(variables, x)
  assert adapter.scale == 1.5
  assert relative_error(linen_y, y) < 1e-12


def test_only_the_adapters_get_gradients_and_updates():
  model = Net(nnx.Rngs(0))
  x, labels = _x(), jnp.array([0, 1])
  jnnx.adapt(model, "tucker", rank=(1, 2))
  _randomize(model)

  def pure(wrt):
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, wrt)))

  base, adapters = pure(nnx.Not(jnnx.AdapterParam)), pure(jnnx.AdapterParam)

  def loss(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels
    ).mean()

  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=jnnx.AdapterParam)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, jnnx.AdapterParam))(model)
    optimizer.update(model, grads)
    return grads

  grads = step(model, optimizer)
  paths = {p for p, _ in jax.tree_util.tree_leaves_with_path(grads)}
  assert paths and all("adapter_" in jax.tree_util.keystr(p) for p in paths)
  jax.tree.map(
    np.testing.assert_array_equal, pure(nnx.Not(jnnx.AdapterParam)), base
  )
  changed = jax.tree.map(
    lambda a, b: bool(np.any(a != b)), pure(jnnx.AdapterParam), adapters
  )
  assert all(jax.tree.leaves(changed))
  # nnx.LoRAParam selects them too.
  assert issubclass(jnnx.AdapterParam, nnx.LoRAParam)


BASE_FORMATS = (*ADAPTER_FORMATS, "depthwise_separable", "tensor_train")
BASE_RANKS = {"low_rank": 3, "cp": 3, "spatially_separable": (3,)}
UPDATE_RANKS = {
  "low_rank": 2,
  "tucker": (2, 3),
  "cp": 2,
  "spatially_separable": (2,),
}
# (update, base) -> the merged rank, for a [3, 2, 4, 6] kernel (C = 4) and
# the ranks above (Tucker base (2, 3), DepthwiseSeparable base m = 2). The
# pairs not listed raise.
MERGED_RANK = {
  ("low_rank", "low_rank"): 5,
  ("low_rank", "tucker"): (2 + 4, 3 + 2),  # an identity in-projection
  ("low_rank", "depthwise_separable"): 4,
  ("tucker", "low_rank"): 3 + 3,  # the in-projection folded in
  ("tucker", "tucker"): (4, 6),
  ("tucker", "depthwise_separable"): 2 + 3,
  ("cp", "low_rank"): 5,
  ("cp", "tucker"): (4, 5),  # a diagonal core
  ("cp", "cp"): 5,
  ("cp", "spatially_separable"): (5,),
  ("cp", "depthwise_separable"): 4,
  ("spatially_separable", "spatially_separable"): (5,),
}
PAIRS = [(u, b) for u in ADAPTER_FORMATS for b in BASE_FORMATS]


@pytest.mark.parametrize("update_name,base_name", PAIRS)
def test_merge_update_of_every_pair_is_exact_or_raises(update_name, base_name):
  """Every (update, base) pair: the merged format equals Flax's conv of the
  dense sum (each dense kernel from its formula), holds the base's own
  factors first (bit for bit), at the summed ranks; or it raises, saying
  which pairs merge. float32 and float64, alternately."""
  pair = (update_name, base_name)
  dtype = (F64, jnp.float32)[PAIRS.index(pair) % 2]
  kernel = dict(window=(3, 2), in_features=4, out_features=6, dtype=dtype)
  base = random_format(
    base_name, **kernel, seed=1, ranks=BASE_RANKS.get(base_name)
  )
  update = random_format(
    update_name, **kernel, seed=2, ranks=UPDATE_RANKS[update_name]
  )
  merge = jax.jit(functools.partial(jaxfactor.merge_update, scale=0.25))
  if pair not in MERGED_RANK:
    with pytest.raises(
      ValueError,
      match=rf"merge_update: a {type(update).__name__} update has no exact"
      rf" {type(base).__name__} form of a sensible size .* merges into a"
      r" dense kernel or a .* base\. For this layer, .*, or merge into its"
      r" dense kernel",
    ):
      merge(base, update)
    return
  merged = merge(base, update)
  assert type(merged) is type(base)
  assert _adapters.rank_of(merged) == MERGED_RANK[pair]
  x = random_input((2, 7, 6, 4), dtype=dtype)
  dense = reference.dense_from_formula(
    base
  ) + 0.25 * reference.dense_from_formula(update)
  expected = flax_conv(x, jnp.asarray(dense, dtype))
  assert relative_error(jaxfactor.conv(x, merged), expected) < reference.rtol(
    dtype
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    _adapters.split(merged, _adapters.rank_of(base)),
    base,
  )


def test_merge_update_merges_a_grouped_base_group_by_group():
  """A Grouped LowRank base (decompose of a grouped kernel) and a Grouped
  CP update: a Grouped LowRank equal to Flax's grouped conv of the sum."""
  kernel = random_input((3, 2, 2, 6), seed=4)
  base = jaxfactor.decompose(kernel, "low_rank", rank=2, feature_group_count=2)
  update, per_group = _random_update("cp", (3, 2), 2, 3, 2)
  merged = jax.jit(functools.partial(jaxfactor.merge_update, scale=0.5))(
    base, update
  )
  assert isinstance(merged, jaxfactor.Grouped) and merged.groups == 2
  assert isinstance(merged.inner, jaxfactor.LowRank)
  assert _adapters.rank_of(merged) == 2 + 2
  x = random_input((2, 7, 6, 4))
  dense = base.to_dense() + 0.5 * _dense_update(per_group)
  expected = flax_conv(x, dense, feature_group_count=2)
  assert relative_error(jaxfactor.conv(x, merged), expected) < 1e-12


def test_merge_and_unmerge_round_trip():
  model = Net(nnx.Rngs(0), dtype=F64)
  base = nnx.clone(model)
  x = _x(F64)
  jnnx.adapt(model, "low_rank", rank=1, alpha=3.0)
  _randomize(model)
  merged = jnnx.merge(model)
  assert type(merged.conv1) is nnx.Conv
  assert type(merged.grouped) is nnx.Conv
  assert type(merged.factorized) is jnnx.LowRankConv
  assert merged.factorized.rank == 3  # 2 + 1
  assert not any(
    isinstance(m, jnnx.Adapter) for _, m in nnx.iter_modules(merged)
  )
  assert relative_error(_call(merged, x), _call(model, x)) < 1e-13
  restored = jnnx.unmerge(merged, model)
  np.testing.assert_allclose(
    restored.conv1.kernel[...], base.conv1.kernel[...], rtol=0, atol=1e-14
  )
  np.testing.assert_allclose(
    restored.grouped.kernel[...], base.grouped.kernel[...], rtol=0, atol=1e-14
  )
  # Factorized: the base's own factors, bit for bit.
  for key in ("spatial", "pointwise", "bias"):
    np.testing.assert_array_equal(
      getattr(restored.factorized, key)[...],
      getattr(base.factorized, key)[...],
    )


@pytest.mark.parametrize(
  "base_name,update_name,rank",
  [
    ("tucker", "tucker", (3, 4)),
    ("spatially_separable", "spatially_separable", (5,)),
    ("tucker", "low_rank", (2 + 3, 3 + 1)),
    ("low_rank", "tucker", 2 + 1),
    ("depthwise_separable", "cp", 2 + 1),
    ("spatially_separable", "cp", (5,)),
  ],
)
def test_merge_and_unmerge_a_bare_adapter_on_a_factorized_layer(
  base_name, update_name, rank
):
  base = jnnx.from_factors(random_format(base_name, (3, 2), 3, 4), bias=None)
  adapter = jnnx.Adapter(base, update_name, rank=1, alpha=2.0, rngs=nnx.Rngs(1))
  _randomize(adapter)
  x = random_input((1, 6, 5, 3))
  merged = jnnx.merge(adapter)
  assert type(merged) is type(base)
  assert merged.rank == rank  # the ranks added up
  assert relative_error(_call(merged, x), _call(adapter, x)) < 1e-13
  restored = jnnx.unmerge(merged, adapter)
  assert restored.rank == base.rank
  jax.tree.map(np.testing.assert_array_equal, restored.factors, base.factors)


def test_concatenate_refuses_what_does_not_add_up():
  """The internal sum behind every merge: a clear TypeError, never a wrong
  format, past the public functions' own checks."""
  with pytest.raises(
    TypeError, match=r"merge: a LowRank update has no exact CP form"
  ):
    _adapters.concatenate(
      random_format("cp", (3, 3), 4, 4),
      random_format("low_rank", (3, 3), 4, 4),
      1.0,
    )


def test_merge_refuses_an_update_that_has_no_exact_form_in_the_base():
  model = Net(nnx.Rngs(0))
  jnnx.adapt(model, "spatially_separable", rank=1)
  with pytest.raises(
    ValueError,
    match=r"merge: the adapter at factorized: a SpatiallySeparable update"
    r" has no exact LowRank form of a sensible size .* a SpatiallySeparable"
    r" update merges into a dense kernel or a SpatiallySeparable base\. For"
    r" this layer, adapt it with a LowRank, Tucker or CP update \(they merge"
    r" into LowRank\), or merge into its dense kernel",
  ):
    jnnx.merge(model)


class Dense(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 5, (3, 2), param_dtype=F64, rngs=rngs)
    self.grouped = nnx.Conv(
      4, 6, (2, 2), feature_group_count=2, param_dtype=F64, rngs=rngs
    )


def _tail(matrix, rank):
  s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
  return np.sqrt(np.sum(s[rank:] ** 2))


def test_extract_low_rank_is_the_eckart_young_optimum():
  base, tuned = Dense(nnx.Rngs(0)), Dense(nnx.Rngs(1))
  adapted, report = jnnx.extract(base, tuned, "low_rank", rank=2, alpha=4.0)
  assert report.ranks == {"conv": 2, "grouped": 2}
  merged = jnnx.merge(adapted)
  delta = tuned.conv.kernel[...] - base.conv.kernel[...]
  error = np.linalg.norm(merged.conv.kernel[...] - tuned.conv.kernel[...])
  np.testing.assert_allclose(error, _tail(delta.reshape(-1, 5), 2), rtol=1e-10)
  # Per group: each group's own optimum.
  delta = tuned.grouped.kernel[...] - base.grouped.kernel[...]
  residual = merged.grouped.kernel[...] - tuned.grouped.kernel[...]
  for g in range(2):
    part = slice(3 * g, 3 * g + 3)
    np.testing.assert_allclose(
      np.linalg.norm(residual[..., part]),
      _tail(delta[..., part].reshape(-1, 3), 2),
      rtol=1e-10,
    )
  # The base model is left as it is; the adapted copy has the base's kernel.
  np.testing.assert_array_equal(
    adapted.conv.base.kernel[...], base.conv.kernel[...]
  )


def test_extract_spatially_separable_is_the_optimum_of_the_rearrangement():
  base, tuned = Dense(nnx.Rngs(0)), Dense(nnx.Rngs(1))
  adapted, _ = jnnx.extract(
    base,
    tuned,
    "spatially_separable",
    rank=2,
    filter=lambda path, conv: path == ("conv",),
  )
  merged = jnnx.merge(adapted)
  delta = np.asarray(tuned.conv.kernel[...] - base.conv.kernel[...])
  # [k_h, k_w, C, F] -> (k_h C) x (k_w F)
  rearranged = delta.transpose(2, 0, 1, 3).reshape(3 * 3, 2 * 5)
  error = np.linalg.norm(merged.conv.kernel[...] - tuned.conv.kernel[...])
  np.testing.assert_allclose(error, _tail(rearranged, 2), rtol=1e-10)


def test_extract_by_energy_keeps_that_energy():
  base, tuned = Dense(nnx.Rngs(0)), Dense(nnx.Rngs(1))
  _, report = jnnx.extract(
    base,
    tuned,
    "low_rank",
    energy=0.9,
    filter=lambda path, conv: path == ("conv",),
  )
  delta = np.asarray(tuned.conv.kernel[...] - base.conv.kernel[...])
  s = np.linalg.svd(delta.reshape(-1, 5), compute_uv=False)
  kept = np.cumsum(s**2) / np.sum(s**2)
  assert report.ranks == {"conv": int(np.argmax(kept >= 0.9)) + 1}


def test_rank_and_alpha_patterns():
  model = Net(nnx.Rngs(0))
  report = jnnx.adapt(
    model, "cp", rank={"conv1": 3, "grouped": 1}, alpha={"conv1": 6.0}
  )
  assert report.ranks == {"conv1": 3, "grouped": 1}
  assert model.conv1.scale == 2.0 and model.grouped.scale == 1.0
  skipped = {r.path: r.skipped for r in report.layers if r.skipped}
  assert skipped[("factorized",)] == "no rank pattern matches its path"


def test_save_and_load_only_the_adapters():
  model = Net(nnx.Rngs(0))
  x = _x()
  report = jnnx.adapt(model, "tucker", rank=(1, 2))
  _randomize(model)
  saved = serialization.msgpack_serialize(
    nnx.to_pure_dict(nnx.state(model, jnnx.AdapterParam))
  )
  base = Net(nnx.Rngs(0))  # the same base weights
  jnnx.adapt(base, "tucker", rank=report.ranks, rngs=nnx.Rngs(9))
  state = nnx.state(base, jnnx.AdapterParam)
  nnx.replace_by_pure_dict(state, serialization.msgpack_restore(saved))
  nnx.update(base, state)
  np.testing.assert_array_equal(_call(base, x), _call(model, x))


def test_dropout_is_a_no_op_in_eval_and_masks_ranks_in_training():
  conv = nnx.Conv(2, 3, (3, 3), param_dtype=F64, rngs=nnx.Rngs(0))
  adapter = jnnx.Adapter(
    conv, "low_rank", rank=2, rank_dropout=0.5, rngs=nnx.Rngs(1)
  )
  _randomize(adapter)
  x = _x(F64)
  adapter.eval()
  clean = _call(adapter, x)
  np.testing.assert_array_equal(_call(adapter, x), clean)
  base = _call(conv, x)
  update = adapter.update
  # Every way of dropping ranks (kept ones doubled).
  candidates = []
  for keep in ((0, 0), (0, 1), (1, 0), (1, 1)):
    mask = 2.0 * jnp.asarray(keep, F64).reshape(2, 1)
    masked = update.replace(pointwise=update.pointwise * mask)
    candidates.append(base + jaxfactor.adapter_conv(x, masked))
  adapter.train()
  for _ in range(6):
    y = _call(adapter, x)
    assert min(relative_error(y, c) for c in candidates) < 1e-13


def test_module_dropout_skips_the_whole_update():
  conv = nnx.Conv(2, 3, (3, 3), param_dtype=F64, rngs=nnx.Rngs(0))
  adapter = jnnx.Adapter(
    conv, "cp", rank=2, module_dropout=0.5, rngs=nnx.Rngs(1)
  )
  _randomize(adapter)
  x = _x(F64)
  adapter.eval()
  full, base = _call(adapter, x), _call(conv, x)
  adapter.train()
  seen = set()
  for _ in range(8):
    y = _call(adapter, x)
    if np.array_equal(y, base):
      seen.add("skipped")
    else:
      np.testing.assert_array_equal(y, full)
      seen.add("kept")
  assert seen == {"skipped", "kept"}


# --- linen --------------------------------------------------------------------


class LinenNet(nn.Module):
  conv: type = nn.Conv

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.conv(4, (3, 3), padding="CIRCULAR", name="conv1")(x))
    x = self.conv(
      6, (3, 2), feature_group_count=2, kernel_dilation=(1, 2), name="grouped"
    )(x)
    return x.mean((1, 2))


def _adapted_linen(format="low_rank"):
  return LinenNet(
    conv=functools.partial(jlinen.AdaptedConv, adapter_format=format)
  )


def test_linen_adapt_variables_starts_as_the_base_and_matches_nnx():
  x = _x()
  variables = LinenNet().init(jax.random.key(0), x)
  adapted, report, mask = jlinen.adapt_variables(
    variables, "tucker", rank=(1, 2), alpha=4.0, model=LinenNet(), inputs=x
  )
  assert report.ranks == {"conv1": (1, 2), "grouped": (1, 2)}
  model = _adapted_linen("tucker")
  np.testing.assert_array_equal(
    model.apply(adapted, x), LinenNet().apply(variables, x)
  )
  assert mask["conv1"]["adapter_core"] and not mask["conv1"]["kernel"]
  assert adapted["adapter"]["grouped"]["scale"] == 2.0
  # Parity: the same numbers in nnx give the same outputs.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype)),
    adapted["params"],
  )
  adapted = {**adapted, "params": params}
  net = Net(nnx.Rngs(0))
  jnnx.adapt(
    net,
    "tucker",
    rank=(1, 2),
    alpha=4.0,
    filter=lambda path, m: path in (("conv1",), ("grouped",)),
  )
  for name in ("conv1", "grouped"):
    layer = getattr(net, name)
    for key, value in params[name].items():
      target = layer if key.startswith("adapter_") else layer.base
      getattr(target, key)[...] = value
  y = net.grouped(nnx.relu(net.conv1(x))).mean((1, 2))
  np.testing.assert_allclose(
    _adapted_linen("tucker").apply(adapted, x), y, rtol=1e-6, atol=1e-6
  )


def test_linen_mask_leaves_the_base_bit_identical():
  x, labels = _x(), jnp.array([0, 1])
  variables = LinenNet().init(jax.random.key(0), x)
  adapted, _, mask = jlinen.adapt_variables(
    variables, "low_rank", rank=1, model=LinenNet(), inputs=x
  )
  model = _adapted_linen()
  tx = optax.multi_transform(
    {"adapter": optax.sgd(0.1), "frozen": optax.set_to_zero()},
    jax.tree.map(lambda m: "adapter" if m else "frozen", mask),
  )
  params = adapted["params"]
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    def loss(params):
      logits = model.apply({**adapted, "params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
      ).mean()

    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  new, _ = step(params, state)
  for name in ("conv1", "grouped"):
    for key in ("kernel", "bias"):
      np.testing.assert_array_equal(new[name][key], params[name][key])
    assert bool(jnp.any(new[name]["adapter_pointwise"] != 0))


def test_linen_merge_variables_equals_the_adapted_model():
  x = _x(F64)
  base = LinenNet(conv=functools.partial(nn.Conv, param_dtype=F64))
  variables = base.init(jax.random.key(0), x)
  adapted, _, _ = jlinen.adapt_variables(
    variables, "cp", rank=2, alpha=1.0, model=base, inputs=x
  )
  rng = np.random.default_rng(1)
  adapted = {
    **adapted,
    "params": jax.tree.map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype)),
      adapted["params"],
    ),
  }
  model = LinenNet(
    conv=functools.partial(
      jlinen.AdaptedConv, adapter_format="cp", param_dtype=F64
    )
  )
  merged = jlinen.merge_variables(adapted, "cp")
  assert set(merged) == {"params"}
  assert set(merged["params"]["conv1"]) == {"kernel", "bias"}
  assert relative_error(base.apply(merged, x), model.apply(adapted, x)) < 1e-13


@pytest.mark.parametrize(
  "format,update_rank,rank", [("low_rank", 1, 2 + 1), ("tucker", (1, 2), 2 + 2)]
)
def test_linen_adapted_factorized_layer_merges_into_a_higher_rank(
  format, update_rank, rank
):
  """A LowRankConv with a LowRank update, or a Tucker one (its
  in-projection folded into the core): a LowRankConv of the summed rank,
  and unmerge_variables gives the base's factors back."""
  x = _x(F64)

  class Small(nn.Module):
    conv: type = jlinen.LowRankConv

    @nn.compact
    def __call__(self, x):
      return self.conv(
        features=3, kernel_size=(3, 3), rank=2, param_dtype=F64, name="c"
      )(x)

  variables = Small().init(jax.random.key(0), x)
  adapted, report, _ = jlinen.adapt_variables(
    variables, format, rank=update_rank, model=Small(), inputs=x
  )
  assert report.layers[0].base == "LowRank"
  cls = jlinen.adapted(jlinen.LowRankConv)
  assert cls is jlinen.adapted(jlinen.LowRankConv)
  model = Small(conv=functools.partial(cls, adapter_format=format))
  np.testing.assert_array_equal(
    model.apply(adapted, x), Small().apply(variables, x)
  )
  rng = np.random.default_rng(2)
  adapted["params"]["c"] = {
    k: jnp.asarray(rng.standard_normal(v.shape)) if "adapter_" in k else v
    for k, v in adapted["params"]["c"].items()
  }
  merged = jlinen.merge_variables(adapted, format)
  assert set(merged["params"]["c"]) == {"spatial", "pointwise", "bias"}
  assert merged["params"]["c"]["pointwise"].shape == (rank, 3)
  assert (
    relative_error(
      Small(conv=jlinen.LowRankConv).apply(merged, x), model.apply(adapted, x)
    )
    < 1e-13
  )
  restored = jlinen.unmerge_variables(merged, adapted, format)
  jax.tree.map(
    np.testing.assert_array_equal, restored["params"], variables["params"]
  )


def test_linen_dropout_is_off_when_deterministic():
  x = _x()
  layer = jlinen.AdaptedConv(3, (3, 3), adapter_rank=1, rank_dropout=0.5)
  variables = layer.init(jax.random.key(0), x, deterministic=True)
  variables["params"]["adapter_pointwise"] = jnp.ones((1, 3), jnp.float32)
  plain = jlinen.AdaptedConv(3, (3, 3), adapter_rank=1)
  clean = plain.apply(variables, x)
  np.testing.assert_array_equal(
    layer.apply(variables, x, deterministic=True), clean
  )
  noisy = [
    layer.apply(
      variables, x, deterministic=False, rngs={"dropout": jax.random.key(k)}
    )
    for k in range(4)
  ]
  assert any(not np.array_equal(y, clean) for y in noisy)
  with pytest.raises(ValueError, match="deterministic"):
    layer.apply(variables, x)


def test_linen_extract_unmerge_and_eckart_young():
  x = _x(F64)
  base = LinenNet(conv=functools.partial(nn.Conv, param_dtype=F64))
  variables = base.init(jax.random.key(0), x)
  tuned = base.init(jax.random.key(1), x)
  adapted, report, mask = jlinen.extract_variables(
    variables, tuned, "low_rank", rank=2, alpha=4.0, model=base, inputs=x
  )
  assert report.ranks == {"conv1": 2, "grouped": 2}
  assert mask["grouped"]["adapter_spatial"] and not mask["grouped"]["bias"]
  merged = jlinen.merge_variables(adapted, "low_rank")
  kernel = {
    name: (
      tuned["params"][name]["kernel"],
      variables["params"][name]["kernel"],
      merged["params"][name]["kernel"],
    )
    for name in ("conv1", "grouped")
  }
  tuned_k, base_k, merged_k = kernel["conv1"]
  np.testing.assert_allclose(
    np.linalg.norm(merged_k - tuned_k),
    _tail((tuned_k - base_k).reshape(-1, 4), 2),
    rtol=1e-10,
  )
  tuned_k, base_k, merged_k = kernel["grouped"]
  for g in range(2):
    part = slice(3 * g, 3 * g + 3)
    np.testing.assert_allclose(
      np.linalg.norm(merged_k[..., part] - tuned_k[..., part]),
      _tail((tuned_k - base_k)[..., part].reshape(-1, 3), 2),
      rtol=1e-10,
    )
  model = LinenNet(
    conv=functools.partial(
      jlinen.AdaptedConv, adapter_format="low_rank", param_dtype=F64
    )
  )
  assert relative_error(model.apply(adapted, x), base.apply(merged, x)) < 1e-13
  restored = jlinen.unmerge_variables(merged, adapted, "low_rank")
  for name in ("conv1", "grouped"):
    np.testing.assert_allclose(
      restored["params"][name]["kernel"],
      variables["params"][name]["kernel"],
      rtol=0,
      atol=1e-14,
    )


def test_linen_save_and_load_only_the_adapters():
  x = _x()
  variables = LinenNet().init(jax.random.key(0), x)
  adapted, report, _ = jlinen.adapt_variables(
    variables, "cp", rank=2, alpha=1.0, model=LinenNet(), inputs=x
  )
  flat = traverse_util.flatten_dict(adapted["params"], sep="/")
  rng = np.random.default_rng(0)
  saved = {
    k: rng.standard_normal(v.shape).astype(np.float32)
    for k, v in flat.items()
    if k.rsplit("/", 1)[-1].startswith("adapter_")
  }
  flat.update(saved)
  adapted["params"] = traverse_util.unflatten_dict(flat, sep="/")
  blob = serialization.msgpack_serialize(
    {"params": saved, "adapter": adapted["adapter"]}
  )
  # Onto the base variables: the same adapters, then the saved values.
  loaded, _, _ = jlinen.adapt_variables(
    variables, "cp", rank=report.ranks, model=LinenNet(), inputs=x
  )
  restored = serialization.msgpack_restore(blob)
  flat = traverse_util.flatten_dict(loaded["params"], sep="/")
  flat.update(restored["params"])
  loaded["params"] = traverse_util.unflatten_dict(flat, sep="/")
  loaded["adapter"] = restored["adapter"]
  model = _adapted_linen("cp")
  np.testing.assert_array_equal(model.apply(loaded, x), model.apply(adapted, x))


# --- errors -------------------------------------------------------------------


def test_error_messages():
  conv = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError, match=r"Adapter: `format` DepthwiseSeparable is not an"
  ):
    jnnx.Adapter(conv, "depthwise_separable", rank=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"Adapter: `alpha` must be a positive"):
    jnnx.Adapter(conv, "low_rank", rank=1, alpha=-1.0, rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError, match=r"Adapter: `rank_dropout` must be in \[0, 1\), got 1.0"
  ):
    jnnx.Adapter(conv, "low_rank", rank=1, rank_dropout=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"Adapter: `base` must be an nnx.Conv"):
    jnnx.Adapter(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "cp", rank=1, rngs=None)
  update = random_format("low_rank", (3, 3), 2, 3)
  with pytest.raises(TypeError, match=r"adapter_conv: `update` must be a"):
    jaxfactor.adapter_conv(random_input((1, 5, 5, 2)), jnp.ones((3, 3, 2, 3)))
  with pytest.raises(
    TypeError,
    match=r"adapter_conv: `update` must be a LowRank, Tucker, CP or"
    r" SpatiallySeparable \(or a jaxfactor.Grouped of one, for a grouped"
    r" base\), got Grouped\(DepthwiseSeparable\)",
  ):
    jaxfactor.adapter_conv(
      random_input((1, 5, 5, 4)),
      jaxfactor.Grouped.stack(
        [random_format("depthwise_separable", (3, 3), 2, 3)] * 2
      ),
    )
  grouped = jaxfactor.Grouped.stack([update, update])
  with pytest.raises(
    ValueError,
    match=r"merge_update: a Grouped\(LowRank\) update with 2 group\(s\) does"
    r" not fit a LowRank kernel with 1: a grouped kernel takes",
  ):
    jaxfactor.merge_update(update, grouped)
  with pytest.raises(
    ValueError,
    match=r"merge_update: `kernel` has shape \(3, 3, 2, 3\) but `update`"
    r" \(Grouped\(LowRank\), 2 group\(s\)\) stands for \(3, 3, 2, 6\)",
  ):
    jaxfactor.merge_update(jnp.ones((3, 3, 2, 3)), grouped)
  with pytest.raises(
    ValueError, match=r"extract: give exactly one of `rank` and `energy`"
  ):
    jnnx.extract(Dense(nnx.Rngs(0)), Dense(nnx.Rngs(1)), "low_rank")
  with pytest.raises(TypeError, match=r"adapt: `model` is a bare Conv"):
    jnnx.adapt(conv, "low_rank", rank=1)
  with pytest.raises(
    ValueError,
    match=r"adapt_variables: give both `model` and `inputs`, or neither",
  ):
    jlinen.adapt_variables({}, "low_rank", rank=1, model=LinenNet())
  with pytest.raises(
    ValueError, match=r"AdaptedConv: `adapter_rank` is required"
  ):
    jlinen.AdaptedConv(3, (3, 3)).init(jax.random.key(0), _x())
  with pytest.raises(
    ValueError, match=r"merge_variables: the adapter at c has no scale"
  ):
    jlinen.merge_variables(
      {
        "params": {
          "c": {
            "kernel": jnp.ones((3, 3, 2, 3)),
            "adapter_pointwise": jnp.ones((1, 3)),
          }
        }
      },
      "low_rank",
    )
  with pytest.raises(
    ValueError, match=r"extract_variables: give exactly one of `rank`"
  ):
    jlinen.extract_variables({}, {}, "tucker", rank=1, energy=0.5)
  x = _x()
  variables = LinenNet().init(jax.random.key(0), x)
  with pytest.raises(
    ValueError,
    match=r"AdaptedConv: the variables hold no adapter params for this"
    r" layer; build them with jaxfactor.linen.adapt_variables",
  ):
    _adapted_linen().apply(variables, x)
  adapted, _, _ = jlinen.adapt_variables(
    variables, "low_rank", rank=1, model=LinenNet(), inputs=x
  )
  with pytest.raises(
    ValueError, match=r"unmerge_variables: `variables` has no params at conv1"
  ):
    jlinen.unmerge_variables({"params": {}}, adapted, "low_rank")
