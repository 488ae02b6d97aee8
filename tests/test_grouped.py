"""`jaxfactor.Grouped`: grouped convolutions whose groups are factorized.

The oracle is Flax's `nn.Conv(feature_group_count=G)` with the grouped dense
kernel built independently of `Grouped.to_dense`: each group's kernel from
its format's formula (`reference.dense`), the groups' output features
concatenated in order.
"""

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax import export
from jax.test_util import check_grads
from reference import DEPTHWISE_LOWERINGS
from reference import FORMATS
from reference import STRIDES
from reference import WINDOWS
from reference import case_id
from reference import flax_conv
from reference import random_format
from reference import random_input
from reference import relative_error
from reference import rtol

import jaxfactor
from jaxfactor._lowering import forced

F64 = jnp.float64
C, F = 2, 3  # per group


def _groups(name, window, groups, *, seed=0, dtype=F64):
  """One random format per group (different values, same ranks)."""
  return [
    random_format(name, window, C, F, seed=seed + g, dtype=dtype)
    for g in range(groups)
  ]


def _dense(per_group):
  """The grouped HWIO kernel `[*window, C, G * F]`, from each group's
  formula."""
  return jnp.concatenate([reference.dense(f) for f in per_group], axis=-1)


# Padding acts on the spatial axes only, the same for every group (every
# form is swept against Flax in test_conv.py): a zero, a data and an
# explicit form here.
CASES = reference.all_pairs(
  {
    "kernel": FORMATS,
    "groups": (2, 3),
    "padding": ("SAME", "REFLECT", "pairs"),
    "n": (1, 2, 3),
    "strides": STRIDES,
    "dilation": STRIDES,
    "implementation": ("factorized", "reconstructed"),
    "depthwise": DEPTHWISE_LOWERINGS,
  },
)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv_equals_flax_grouped_conv(case):
  reference.skip_unless_available(case["depthwise"])
  n, groups = case["n"], case["groups"]
  per_group = _groups(case["kernel"], WINDOWS[n], groups)
  grouped = jaxfactor.Grouped.stack(per_group)
  x = random_input(
    reference.spatial_input_shape(WINDOWS[n], channels=C * groups, extra=5)
  )
  kwargs = reference.geometry(case, n)
  fn = jax.jit(
    functools.partial(
      jaxfactor.conv, implementation=case["implementation"], **kwargs
    )
  )
  with forced(depthwise=case["depthwise"]):
    actual = fn(x, grouped)
  expected = flax_conv(
    x, _dense(per_group), feature_group_count=groups, **kwargs
  )
  assert actual.shape == expected.shape
  assert relative_error(actual, expected) < rtol(F64)


@pytest.mark.parametrize("name", FORMATS)
def test_properties_and_to_dense(name):
  per_group = _groups(name, (3, 2), 4)
  grouped = jaxfactor.Grouped.stack(per_group)
  assert grouped.groups == 4
  assert grouped.window == (3, 2)
  assert grouped.in_features == 4 * C
  assert grouped.out_features == 4 * F
  assert grouped.shape == (3, 2, C, 4 * F)
  assert grouped.num_params == sum(f.num_params for f in per_group)
  assert grouped.to_dense_flops() == 4 * per_group[0].to_dense_flops()
  np.testing.assert_allclose(
    grouped.to_dense(), _dense(per_group), rtol=1e-13, atol=1e-13
  )
  assert per_group[0].groups == 1


@pytest.mark.parametrize("name", FORMATS)
def test_flops_are_the_groups_sum(name):
  """Each stage runs once over all groups: the FLOPs of G separate convs
  (each counted by the closed forms test_cost.py checks), and for
  "reconstructed" those of the grouped dense conv plus `to_dense`."""
  per_group = _groups(name, (3, 3), 3)
  grouped = jaxfactor.Grouped.stack(per_group)
  geometry = dict(strides=2, padding="SAME")
  factorized = jaxfactor.cost(
    grouped, (2, 9, 8, 3 * C), implementation="factorized", **geometry
  )
  assert factorized.flops == sum(
    jaxfactor.cost(
      f, (2, 9, 8, C), implementation="factorized", **geometry
    ).flops
    for f in per_group
  )
  assert factorized.params == grouped.num_params
  # 5 x 4 outputs, SAME with stride 2 on 9 x 8: each output reads 3 x 3 taps
  # but the rows and columns the padding covers.
  dense_pairs = reference.in_range_pairs(
    9, 3, 2, 1, (1, 1)
  ) * reference.in_range_pairs(8, 3, 2, 1, (0, 1))
  reconstructed = jaxfactor.cost(
    grouped, (2, 9, 8, 3 * C), implementation="reconstructed", **geometry
  )
  assert (
    reconstructed.flops
    == 2 * 2 * dense_pairs * C * 3 * F + grouped.to_dense_flops()
  )


# Full rank is larger than the dense kernel for some formats: exact, though.
# The grouping (a vmap over the groups) is the same for every format: one
# with a static field, two without.
@pytest.mark.filterwarnings("ignore:.*than what it replaces")
@pytest.mark.parametrize("name", ["low_rank", "tucker", "depthwise_separable"])
def test_decompose_factorizes_each_group(name):
  """`decompose(..., feature_group_count=G)`: group g's factors are the
  decomposition of group g's kernel, at the same rank."""
  kernel = random_input((3, 3, C, 3 * 4), seed=5)
  rank = jaxfactor.max_rank((3, 3, C, 4), name)
  grouped = jaxfactor.decompose(kernel, name, rank=rank, feature_group_count=3)
  assert isinstance(grouped, jaxfactor.Grouped)
  assert grouped.groups == 3 and grouped.shape == kernel.shape
  for g in range(3):
    alone = jaxfactor.decompose(
      kernel[..., 4 * g : 4 * (g + 1)], name, rank=rank
    )
    ours = jax.tree.map(lambda a, g=g: a[g], grouped.inner)
    np.testing.assert_allclose(
      ours.to_dense(), alone.to_dense(), rtol=1e-9, atol=1e-9
    )
  # At full rank every group is exact.
  assert float(jaxfactor.relative_error(grouped, kernel)) < 1e-9


def test_decompose_with_energy_keeps_the_largest_group_rank():
  """Group 0 has rank 1, group 1 rank 3: all the energy needs rank 3 in
  both."""
  rng = np.random.default_rng(0)
  rank_one = np.einsum(
    "hwc,f->hwcf", rng.standard_normal((3, 3, C)), [1.0, 2.0, 3.0, 4.0]
  )
  rank_three = rng.standard_normal((3, 3, C, 3)) @ rng.standard_normal((3, 4))
  kernel = jnp.asarray(np.concatenate([rank_one, rank_three], axis=-1))
  grouped = jaxfactor.decompose(
    kernel, "low_rank", energy=1.0 - 1e-9, feature_group_count=2
  )
  assert grouped.inner.spatial.shape == (2, 3, 3, C, 3)  # [G, *w, C, R]
  assert float(jaxfactor.relative_error(grouped, kernel)) < 1e-9
  # Rank 1 alone leaves group 1's error.
  assert (
    float(
      jaxfactor.relative_error(
        jaxfactor.decompose(kernel, "low_rank", rank=1, feature_group_count=2),
        kernel,
      )
    )
    > 0.1
  )


def test_decompose_under_jit_and_its_optimum():
  """LowRank per group is each group's truncated SVD (Eckart-Young): the
  squared error is the sum over groups of their tail singular values."""
  kernel = random_input((3, 3, 4, 12), seed=7)
  grouped = jax.jit(
    lambda k: jaxfactor.decompose(k, "low_rank", rank=2, feature_group_count=3)
  )(kernel)
  tail = sum(
    float(
      np.sum(
        np.linalg.svd(
          np.asarray(kernel[..., 4 * g : 4 * (g + 1)]).reshape(36, 4),
          compute_uv=False,
        )[2:]
        ** 2
      )
    )
    for g in range(3)
  )
  error = np.sum((np.asarray(grouped.to_dense()) - np.asarray(kernel)) ** 2)
  np.testing.assert_allclose(error, tail, rtol=1e-9)


@pytest.mark.parametrize("name", ["tucker"])
def test_check_grads_of_each_factor(name):
  grouped = jaxfactor.Grouped.stack(_groups(name, (3, 2), 2))
  x = random_input((1, 5, 4, 2 * C))
  leaves, treedef = jax.tree.flatten(grouped)
  for i in range(len(leaves)):

    def fn(leaf, i=i):
      replaced = leaves[:i] + [leaf] + leaves[i + 1 :]
      return jaxfactor.conv(
        x, treedef.unflatten(replaced), strides=(2, 1), padding="CIRCULAR"
      )

    check_grads(
      jax.jit(fn),
      (leaves[i],),
      order=2,
      modes=("fwd", "rev"),
      eps=1.0,
      atol=reference.GRAD_TOL[jnp.dtype(F64)],
      rtol=reference.GRAD_TOL[jnp.dtype(F64)],
    )


def test_pytree_serialization_and_export():
  grouped = jaxfactor.Grouped.stack(
    _groups("tucker", (3, 3), 2, dtype=jnp.float32)
  )
  restored = flax.serialization.from_bytes(
    grouped, flax.serialization.to_bytes(grouped)
  )
  assert isinstance(restored, jaxfactor.Grouped)
  np.testing.assert_array_equal(restored.to_dense(), grouped.to_dense())
  x = random_input((2, 6, 6, 2 * C), dtype=jnp.float32)
  (b,) = export.symbolic_shape("b")
  exported = export.export(jax.jit(jaxfactor.conv))(
    jax.ShapeDtypeStruct((b, 6, 6, 2 * C), jnp.float32), grouped
  )
  again = export.deserialize(exported.serialize())
  np.testing.assert_allclose(
    again.call(x, grouped), jaxfactor.conv(x, grouped), rtol=1e-6, atol=1e-6
  )
  abstract = jax.eval_shape(lambda: grouped)
  assert jaxfactor.cost(abstract, x.shape) == jaxfactor.cost(grouped, x.shape)


def test_errors():
  lr = random_format("low_rank", (3, 3), C, F)
  with pytest.raises(TypeError, match=r"Grouped: `Grouped.inner` must be a"):
    jaxfactor.Grouped(jnp.ones((2, 3, 3)))
  with pytest.raises(ValueError, match=r"the same leading groups axis"):
    jaxfactor.Grouped(lr)  # factors without one groups axis
  with pytest.raises(ValueError, match=r"the same type, rank and shapes"):
    jaxfactor.Grouped.stack(
      [lr, random_format("low_rank", (3, 3), C, F, ranks=1)]
    )
  with pytest.raises(TypeError, match=r"non-empty sequence of formats"):
    jaxfactor.Grouped.stack([])
  grouped = jaxfactor.Grouped.stack([lr, lr])
  with pytest.raises(
    ValueError, match=r"conv: `x` has 2 channels .* in_features=4"
  ):
    jaxfactor.conv(random_input((1, 5, 5, 2)), grouped)
  kernel = random_input((3, 3, 2, 5))
  with pytest.raises(
    ValueError, match=r"F a multiple of feature_group_count=2, got shape"
  ):
    jaxfactor.decompose(kernel, "low_rank", rank=1, feature_group_count=2)
  with pytest.raises(ValueError, match=r"`feature_group_count` must be >= 1"):
    jaxfactor.decompose(kernel, "low_rank", rank=1, feature_group_count=0)
  with pytest.raises(ValueError, match=r"\(`inputs`\) of a grouped kernel"):
    jaxfactor.decompose(
      random_input((3, 3, 2, 6)),
      "low_rank",
      rank=1,
      feature_group_count=2,
      inputs=random_input((1, 5, 5, 4)),
    )
