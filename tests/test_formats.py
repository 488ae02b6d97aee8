"""Formats as values: `to_dense`, shapes, pytrees, `replace`, serialization."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from reference import FORMATS
from reference import WINDOWS
from reference import dense_from_formula
from reference import random_format

import jaxfactor

# The ranks `random_format` gives each format by default.
RANKS = {
  "depthwise_separable": 2,
  "spatially_separable": (4,),
  "low_rank": 2,
  "tucker": (2, 3),
  "cp": 3,
  "tensor_train": (2, 3),
}
# Key paths of the leaves (2-D window), in the order of the fields.
KEY_PATHS = {
  "depthwise_separable": [".depthwise", ".pointwise"],
  "spatially_separable": [".factors[0]", ".factors[1]"],
  "low_rank": [".spatial", ".pointwise"],
  "tucker": [".in_proj", ".core", ".out_proj"],
  "cp": [".in_proj", ".spatial[0]", ".spatial[1]", ".out_proj"],
  "tensor_train": [".spatial", ".cores[0]", ".cores[1]"],
}
# `params()` names, as the Flax layers name their parameters.
PARAM_NAMES = {
  "depthwise_separable": {"depthwise", "pointwise"},
  "spatially_separable": {"factors_0", "factors_1"},
  "low_rank": {"spatial", "pointwise"},
  "tucker": {"in_proj", "core", "out_proj"},
  "cp": {"in_proj", "spatial_0", "spatial_1", "out_proj"},
  "tensor_train": {"spatial", "cores_0", "cores_1"},
}


def _static(fmt):
  if isinstance(fmt, jaxfactor.DepthwiseSeparable):
    return {"channel_multiplier": fmt.channel_multiplier}
  return {}


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_to_dense_is_the_formula(name, n):
  fmt = random_format(name, WINDOWS[n], 3, 5)
  dense = jax.jit(lambda f: f.to_dense())(fmt)
  assert dense.shape == (*WINDOWS[n], 3, 5) == fmt.shape
  assert dense.dtype == fmt.dtype == jnp.float64
  np.testing.assert_allclose(
    dense, dense_from_formula(fmt), rtol=1e-12, atol=1e-12
  )


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shape_properties_and_parameter_counts(n):
  window, c, f = WINDOWS[n], 3, 5
  k = math.prod(window)
  dws = random_format("depthwise_separable", window, c, f, ranks=2)
  assert (dws.window, dws.in_features, dws.out_features) == (window, c, f)
  assert dws.channel_multiplier == 2 and dws.num_spatial_dims == n
  assert dws.num_params == k * c * 2 + c * 2 * f
  ss = random_format("spatially_separable", window, c, f)
  assert ss.ranks == tuple(range(4, 4 + n - 1))
  chain = (c, *ss.ranks, f)
  assert ss.num_params == sum(
    w * chain[i] * chain[i + 1] for i, w in enumerate(window)
  )
  lr = random_format("low_rank", window, c, f, ranks=2)
  assert lr.rank == 2 and lr.num_params == k * c * 2 + 2 * f
  tk = random_format("tucker", window, c, f, ranks=(2, 4))
  assert (tk.in_rank, tk.out_rank, tk.ranks) == (2, 4, (2, 4))
  assert tk.num_params == c * 2 + k * 2 * 4 + 4 * f
  cp = random_format("cp", window, c, f, ranks=3)
  assert cp.rank == 3 and cp.num_params == (c + sum(window) + f) * 3
  tt = random_format("tensor_train", window, 6, 10, ranks=(2, 4))
  assert (tt.ranks, tt.in_modes, tt.out_modes) == ((2, 4), (3, 2), (5, 2))
  assert (tt.window, tt.in_features, tt.out_features) == (window, 6, 10)
  assert tt.num_params == k * 2 + 2 * 3 * 5 * 4 + 4 * 2 * 2 * 1
  assert tt.shape == (*window, 6, 10)
  for fmt in (dws, ss, lr, tk, cp):
    assert fmt.shape == (*window, c, f)


# --- pytrees ------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_pytree_leaves_are_the_factors_in_field_order(name):
  fmt = random_format(name, (3, 2), 3, 5)
  leaves, treedef = jax.tree.flatten(fmt)
  rebuilt = treedef.unflatten(leaves)
  assert type(rebuilt) is type(fmt)
  assert all(a is b for a, b in zip(jax.tree.leaves(rebuilt), leaves))
  paths = [
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_leaves_with_path(fmt)
  ]
  assert paths == KEY_PATHS[name]


@pytest.mark.parametrize("name", FORMATS)
def test_tree_map_jit_vmap_and_grad(name):
  fmt = random_format(name, (3, 2), 3, 5)
  doubled = jax.tree.map(lambda a: 2 * a, fmt)
  assert type(doubled) is type(fmt)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), fmt, doubled)
  dense = jax.jit(jax.vmap(lambda f: f.to_dense()))(stacked)
  # The dense kernel is linear in each factor: every leaf doubles it.
  np.testing.assert_allclose(dense[0], dense_from_formula(fmt), rtol=1e-12)
  np.testing.assert_allclose(
    dense[1], 2 ** len(jax.tree.leaves(fmt)) * dense[0], rtol=1e-12
  )
  # The gradient is the directional derivative along any direction.
  loss = jax.jit(lambda f: jnp.sum(f.to_dense() ** 2))
  grads = jax.jit(jax.grad(loss))(fmt)
  assert jax.tree.structure(grads) == jax.tree.structure(fmt)
  direction = random_format(name, (3, 2), 3, 5, seed=1)
  eps = 1e-7
  moved = jax.tree.map(lambda a, d: a + eps * d, fmt, direction)
  numeric = (float(loss(moved)) - float(loss(fmt))) / eps
  analytic = sum(
    float(np.vdot(g, d))
    for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
  )
  assert abs(numeric - analytic) < 1e-4 * abs(analytic)


def test_static_metadata_is_part_of_the_structure():
  a = random_format("depthwise_separable", (3, 3), 4, 4, ranks=1)
  b = jaxfactor.DepthwiseSeparable(
    a.depthwise, a.pointwise, channel_multiplier=2
  )
  assert (a.in_features, b.in_features) == (4, 2)
  assert jax.tree.structure(a) != jax.tree.structure(b)
  rebuilt = jax.tree.unflatten(jax.tree.structure(b), jax.tree.leaves(a))
  assert rebuilt.channel_multiplier == 2


# --- immutability and replace -------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_immutable_and_replace_changes_one_field(name):
  fmt = random_format(name, (3, 2), 3, 5)
  field = type(fmt)._fields[-1]
  before = getattr(fmt, field)
  with pytest.raises(
    AttributeError,
    match=rf"{type(fmt).__name__} is"
    rf" immutable; use .replace\({field}=...\)",
  ):
    setattr(fmt, field, None)
  assert getattr(fmt, field) is before
  scaled = jax.tree.map(lambda a: 3 * a, before)
  new = fmt.replace(**{field: scaled})
  assert type(new) is type(fmt) and getattr(fmt, field) is before
  np.testing.assert_allclose(
    new.to_dense(),
    3 ** len(jax.tree.leaves(before)) * fmt.to_dense(),
    rtol=1e-12,
  )
  others = [f for f in type(fmt)._fields if f != field]
  assert all(
    a is b
    for f in others
    for a, b in zip(
      jax.tree.leaves(getattr(new, f)), jax.tree.leaves(getattr(fmt, f))
    )
  )


def test_replace_a_static_field_revalidates():
  fmt = random_format("depthwise_separable", (3, 3), 4, 6, ranks=2)
  halved = fmt.replace(channel_multiplier=4)
  assert (halved.in_features, halved.channel_multiplier) == (2, 4)
  with pytest.raises(
    ValueError,
    match=r"channel_multiplier m=3, got shape"
    r" \(3, 3, 1, 8\)",
  ):
    fmt.replace(channel_multiplier=3)


def test_repr_shows_dtypes_and_shapes():
  fmt = random_format("cp", (3, 2), 4, 6, ranks=3)
  assert repr(fmt) == (
    "CP(in_proj=float64[4, 3], spatial=(float64[3, 3],"
    " float64[2, 3]), out_proj=float64[3, 6])"
  )
  dws = random_format("depthwise_separable", (3,), 2, 5, ranks=2)
  assert repr(dws) == (
    "DepthwiseSeparable(depthwise=float64[3, 1, 4],"
    " pointwise=float64[4, 5], channel_multiplier=2)"
  )


def test_numpy_factors_become_jax_arrays():
  fmt = jaxfactor.LowRank(np.ones((3, 3, 2, 1)), np.ones((1, 4)))
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(fmt))


def test_formats_compare_by_identity():
  # Elementwise array equality has no single truth value.
  fmt = random_format("low_rank", (3, 3), 2, 2)
  assert fmt == fmt and fmt != fmt.replace()


# --- params, abstract, serialization ------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_params_from_params_and_param_shapes(name):
  fmt = random_format(name, (3, 2), 3, 5)
  cls = type(fmt)
  params = fmt.params()
  assert set(params) == PARAM_NAMES[name]
  assert {k: tuple(v.shape) for k, v in params.items()} == cls.param_shapes(
    fmt.shape, RANKS[name]
  )
  rebuilt = cls.from_params(params, **_static(fmt))
  assert all(
    a is b for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(fmt))
  )
  assert {cls.field_of(k) for k in params} == set(cls._fields)


@pytest.mark.parametrize("name", FORMATS)
def test_abstract_has_the_structure_shapes_and_cost_of_the_real_one(name):
  fmt = random_format(name, (3, 2), 3, 5, dtype=jnp.float32)
  abstract = type(fmt).abstract(fmt.shape, RANKS[name], jnp.float32)
  assert jax.tree.structure(abstract) == jax.tree.structure(fmt)
  assert all(
    isinstance(a, jax.ShapeDtypeStruct)
    and a.shape == b.shape
    and a.dtype == b.dtype
    for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(fmt))
  )
  assert jaxfactor.cost(abstract, (2, 7, 6, 3)) == jaxfactor.cost(
    fmt, (2, 7, 6, 3)
  )


@pytest.mark.parametrize("name", FORMATS)
def test_flax_serialization_round_trip(name):
  fmt = random_format(name, (3, 2), 3, 5)
  target = jax.tree.map(jnp.zeros_like, fmt)
  restored = serialization.from_bytes(target, serialization.to_bytes(fmt))
  assert type(restored) is type(fmt)
  assert jax.tree.structure(restored) == jax.tree.structure(fmt)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fmt)):
    np.testing.assert_array_equal(a, b)
  state = serialization.to_state_dict(fmt)
  assert set(state) == set(type(fmt)._fields)


def test_exported_function_of_a_format_round_trips():
  fmt = random_format("depthwise_separable", (3, 2), 3, 5)
  exported = jax.export.export(jax.jit(lambda f: f.to_dense()))(fmt)
  restored = jax.export.deserialize(exported.serialize())
  np.testing.assert_array_equal(restored.call(fmt), fmt.to_dense())
