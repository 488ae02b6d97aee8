"""Formats as values: shapes, `to_dense`, pytree and serialization behaviour."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import jaxfactor
from reference import FORMATS, WINDOWS, dense_from_formula, random_format


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_to_dense_matches_the_design_formula(name, n):
  fmt = random_format(name, WINDOWS[n], 3, 5)
  dense = fmt.to_dense()
  assert dense.shape == (*WINDOWS[n], 3, 5) == fmt.shape
  assert dense.dtype == fmt.dtype == jnp.float64
  np.testing.assert_allclose(dense, dense_from_formula(fmt), rtol=1e-12,
                             atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_properties(n):
  window = WINDOWS[n]
  k = int(np.prod(window))
  c, f = 3, 5
  dws = random_format("depthwise_separable", window, c, f, ranks=2)
  assert (dws.window, dws.in_features, dws.out_features) == (window, c, f)
  assert dws.channel_multiplier == 2
  assert dws.num_params == k * c * 2 + c * 2 * f
  ss = random_format("spatially_separable", window, c, f)
  assert ss.ranks == tuple(range(4, 4 + n - 1))
  assert ss.num_spatial_dims == n
  lr = random_format("low_rank", window, c, f, ranks=2)
  assert lr.rank == 2 and lr.num_params == k * c * 2 + 2 * f
  tk = random_format("tucker", window, c, f, ranks=(2, 4))
  assert (tk.in_rank, tk.out_rank, tk.ranks) == (2, 4, (2, 4))
  assert tk.num_params == c * 2 + k * 2 * 4 + 4 * f
  cp = random_format("cp", window, c, f, ranks=3)
  assert cp.rank == 3 and cp.num_params == (c + sum(window) + f) * 3


@pytest.mark.parametrize("name", FORMATS)
def test_pytree_roundtrip_and_key_paths(name):
  fmt = random_format(name, (3, 2), 3, 5)
  leaves, treedef = jax.tree.flatten(fmt)
  rebuilt = treedef.unflatten(leaves)
  assert type(rebuilt) is type(fmt)
  for a, b in zip(jax.tree.leaves(rebuilt), leaves):
    assert a is b
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(fmt)]
  assert all(p.startswith(".") for p in paths), paths
  assert paths[0].split(".")[1].split("[")[0] == type(fmt)._fields[0]


@pytest.mark.parametrize("name", FORMATS)
def test_tree_map_jit_grad(name):
  fmt = random_format(name, (3, 2), 3, 5)
  doubled = jax.tree.map(lambda a: 2 * a, fmt)
  assert isinstance(doubled, type(fmt))
  # The dense kernel is multilinear in the factors.
  np.testing.assert_allclose(
      doubled.to_dense(), 2 ** len(jax.tree.leaves(fmt)) * fmt.to_dense(),
      rtol=1e-12)
  passed = jax.jit(lambda f: f)(fmt)
  assert isinstance(passed, type(fmt)) and passed.shape == fmt.shape
  grads = jax.grad(lambda f: jnp.sum(f.to_dense() ** 2))(fmt)
  assert jax.tree.structure(grads) == jax.tree.structure(fmt)


def test_static_metadata_is_part_of_the_structure():
  a = random_format("depthwise_separable", (3, 3), 4, 4, ranks=1)
  b = jaxfactor.DepthwiseSeparable(a.depthwise, a.pointwise,
                                   channel_multiplier=2)
  assert a.in_features == 4 and b.in_features == 2
  assert jax.tree.structure(a) != jax.tree.structure(b)


@pytest.mark.parametrize("name", FORMATS)
def test_flax_serialization_roundtrip(name):
  fmt = random_format(name, (3, 2), 3, 5)
  target = jax.tree.map(jnp.zeros_like, fmt)
  restored = serialization.from_bytes(target, serialization.to_bytes(fmt))
  assert type(restored) is type(fmt)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fmt)):
    np.testing.assert_array_equal(a, b)
  state = serialization.to_state_dict(fmt)
  assert set(state) == set(type(fmt)._fields)


@pytest.mark.parametrize("name", FORMATS)
def test_immutable_with_validating_replace(name):
  fmt = random_format(name, (3, 2), 3, 5)
  field = type(fmt)._fields[-1]
  with pytest.raises(AttributeError, match="immutable.*replace"):
    setattr(fmt, field, None)
  same = fmt.replace()
  assert same is not fmt and same.shape == fmt.shape
  with pytest.raises(TypeError, match="unknown fields"):
    fmt.replace(kernel=1)


def test_replace_validates():
  fmt = random_format("low_rank", (3, 3), 4, 6, ranks=2)
  with pytest.raises(ValueError, match="do not chain"):
    fmt.replace(pointwise=jnp.zeros((3, 6)))


def test_repr_shows_shapes():
  fmt = random_format("cp", (3, 2), 4, 6, ranks=3)
  assert repr(fmt) == ("CP(in_proj=float64[4, 3], spatial=(float64[3, 3],"
                       " float64[2, 3]), out_proj=float64[3, 6])")


def test_numpy_factors_become_jax_arrays():
  fmt = jaxfactor.LowRank(np.ones((3, 3, 2, 1)), np.ones((1, 4)))
  assert all(isinstance(l, jax.Array) for l in jax.tree.leaves(fmt))


def test_formats_compare_by_identity():
  # Elementwise array equality has no single truth value.
  fmt = random_format("low_rank", (3, 3), 2, 2)
  assert fmt == fmt and fmt != fmt.replace()
  assert not dataclasses.is_dataclass(fmt)
