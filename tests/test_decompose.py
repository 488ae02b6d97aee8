"""`decompose`: the closed-form optimum where one exists, checked in numpy."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import FORMATS
from reference import flax_conv
from reference import random_input
from sweeps import ids
from sweeps import pairwise

import jaxfactor
from jaxfactor import _decompose
from jaxfactor import _ranks

# Tolerances against a closed-form optimum, relative to the kernel's norm:
# the SVDs agree to ~1e2 ulps.
TOL = {jnp.float64: 1e-12, jnp.float32: 2e-6}
DTYPES = [jnp.float64, jnp.float32]
SHAPES = {1: (3, 4, 6), 2: (3, 3, 4, 6), 3: (2, 3, 2, 3, 5)}

# The function under test, jitted: the rank and the sweep counts are static.
decompose = jax.jit(
  jaxfactor.decompose,
  static_argnames=(
    "format",
    "rank",
    "iterations",
    "restarts",
    "norm_bound",
    "compute_dtype",
  ),
)


def decaying_kernel(shape, *, rate=0.8, seed=0, dtype=jnp.float64):
  """A kernel whose spectra decay along every mode, as trained kernels'
  do, so that every truncation has a unique optimum."""
  rng = np.random.default_rng(seed)
  kernel = rng.standard_normal(shape)
  for mode, size in enumerate(shape):
    kernel = np.moveaxis(
      np.moveaxis(kernel, mode, -1) * rate ** np.arange(size), -1, mode
    )
  return jnp.asarray(kernel, dtype)


def truncate(matrix, rank):
  """The best rank-`rank` approximation (Eckart-Young), in float64."""
  u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
  return (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]


def error(factors, kernel):
  return float(jaxfactor.relative_error(factors, kernel))


def assert_close_to(factors, expected, kernel, dtype):
  """`factors.to_dense()` equals `expected` up to `TOL`, relative to |K|."""
  dense = np.asarray(factors.to_dense(), np.float64)
  norm = np.linalg.norm(np.asarray(kernel, np.float64))
  assert np.linalg.norm(dense - expected) < TOL[dtype] * norm


def quiet(fn, *args, **kwargs):
  """Calls `fn`, ignoring the warnings of a factorization larger than dense
  or a CP rank above the largest mode (full-rank tests ask for those)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fn(*args, **kwargs)


# --- closed-form optima -------------------------------------------------------

LOW_RANK_CASES = pairwise(dict(dtype=DTYPES, n=[1, 2, 3], rank=[1, 3]))


@pytest.mark.parametrize("case", LOW_RANK_CASES, ids=ids(LOW_RANK_CASES))
def test_low_rank_is_the_truncated_svd(case):
  shape, dtype, rank = SHAPES[case["n"]], case["dtype"], case["rank"]
  kernel = decaying_kernel(shape, dtype=dtype)
  f = decompose(kernel, "low_rank", rank=rank)
  assert f.rank == rank and f.dtype == dtype
  matrix = np.asarray(kernel, np.float64).reshape(-1, shape[-1])
  assert_close_to(f, truncate(matrix, rank).reshape(shape), kernel, dtype)
  # The singular values are split evenly: column r of the spatial factor
  # and row r of the pointwise factor both have norm sqrt(s_r).
  s = np.linalg.svd(matrix, compute_uv=False)[:rank]
  spatial = np.asarray(f.spatial, np.float64).reshape(-1, rank)
  np.testing.assert_allclose(
    np.linalg.norm(spatial, axis=0), np.sqrt(s), rtol=100 * TOL[dtype]
  )
  np.testing.assert_allclose(
    np.linalg.norm(np.asarray(f.pointwise, np.float64), axis=1),
    np.sqrt(s),
    rtol=100 * TOL[dtype],
  )


@pytest.mark.parametrize(
  "case",
  pairwise(dict(dtype=DTYPES, rank=[1, 5])),
  ids=ids(pairwise(dict(dtype=DTYPES, rank=[1, 5]))),
)
def test_spatially_separable_2d_is_the_svd_of_the_rearrangement(case):
  dtype, rank = case["dtype"], case["rank"]
  kernel = decaying_kernel((3, 5, 4, 6), dtype=dtype)
  f = decompose(kernel, "spatially_separable", rank=rank)
  assert f.ranks == (rank,)
  # Jaderberg et al. scheme 2: the (k_h*C) x (k_w*F) rearrangement.
  k = np.asarray(kernel, np.float64).transpose(0, 2, 1, 3).reshape(12, 30)
  expected = truncate(k, rank).reshape(3, 4, 5, 6).transpose(0, 2, 1, 3)
  assert_close_to(f, expected, kernel, dtype)


@pytest.mark.parametrize("ranks", [(2, 2), (4, 7)])
def test_spatially_separable_3d_is_within_the_tt_svd_bounds(ranks):
  """TT-SVD: max_i d_i <= error <= sqrt(sum_i d_i^2), d_i the best error of
  unfolding i [C k_1..k_i] x [k_{i+1}..k_N F] at rank R_i (Oseledets 2011)."""
  shape = (2, 3, 2, 4, 5)
  kernel = decaying_kernel(shape)
  f = decompose(kernel, "spatially_separable", rank=ranks)
  tensor = np.moveaxis(np.asarray(kernel), -2, 0)  # [C, k1, k2, k3, F]
  bests = []
  for i, r in enumerate(ranks):
    unfolding = tensor.reshape(4 * math.prod(shape[: i + 1]), -1)
    bests.append(
      np.linalg.norm(unfolding - truncate(unfolding, r))
      / np.linalg.norm(tensor)
    )
  e = error(f, kernel)
  assert max(bests) - 1e-12 <= e <= math.sqrt(sum(b**2 for b in bests)) + 1e-12


def train_unfoldings(kernel, in_modes, out_modes):
  """The unfoldings `[k n_1..n_i] x [n_{i+1}..n_d]`, `n_i = c_i f_i`, of the
  kernel read as the tensor `[w, (c_1, f_1), ..., (c_d, f_d)]`."""
  k = np.asarray(kernel, np.float64)
  d, taps = len(in_modes), math.prod(k.shape[:-2])
  tensor = k.reshape(taps, *in_modes, *out_modes)
  tensor = tensor.transpose(
    0, *(a for i in range(d) for a in (1 + i, 1 + d + i))
  )
  sizes = [c * f for c, f in zip(in_modes, out_modes)]
  return [tensor.reshape(taps * math.prod(sizes[:i]), -1) for i in range(d)]


TT_CASES = [  # (kernel shape, ranks, in_modes, out_modes)
  ((3, 3, 12, 8), (3, 5, 2), (3, 2, 2), (2, 2, 2)),
  ((3, 3, 12, 8), (4, 6), None, None),  # default modes (4, 3) x (4, 2)
  ((2, 3, 2, 6, 4), (5, 3), (2, 3), (4, 1)),
]


@pytest.mark.parametrize("case", TT_CASES, ids=str)
def test_tensor_train_is_within_the_tt_svd_bounds(case):
  """TT-SVD: max_i d_i <= error <= sqrt(sum_i d_i^2), d_i the best error of
  unfolding i at rank R_i (Oseledets 2011, Thm 2.2); exact at max ranks."""
  shape, ranks, in_modes, out_modes = case
  kernel = decaying_kernel(shape, rate=0.9)
  modes = dict(in_modes=in_modes, out_modes=out_modes)
  f = jaxfactor.decompose(kernel, "tensor_train", rank=ranks, **modes)
  in_modes = in_modes or (4, 3)
  out_modes = out_modes or (4, 2)
  assert (f.ranks, f.in_modes, f.out_modes) == (ranks, in_modes, out_modes)
  unfoldings = train_unfoldings(kernel, in_modes, out_modes)
  bests = [
    np.linalg.norm(u - truncate(u, r)) / np.linalg.norm(u)
    for u, r in zip(unfoldings, ranks)
  ]
  e = error(f, kernel)
  assert max(bests) > 1e-3  # a truncation that loses something
  assert max(bests) - 1e-12 <= e <= math.sqrt(sum(b**2 for b in bests)) + 1e-12
  full = tuple(min(u.shape) for u in unfoldings)
  exact = quiet(jaxfactor.decompose, kernel, "tensor_train", rank=full, **modes)
  assert error(exact, kernel) < TOL[jnp.float64]


DEPTHWISE_CASES = pairwise(dict(dtype=DTYPES, multiplier=[1, 3]))


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=ids(DEPTHWISE_CASES))
def test_depthwise_separable_is_the_svd_of_each_channel(case):
  dtype, m = case["dtype"], case["multiplier"]
  kernel = decaying_kernel((3, 3, 5, 7), dtype=dtype)
  f = decompose(kernel, "depthwise_separable", rank=m)
  assert (f.channel_multiplier, f.in_features) == (m, 5)
  slices = np.moveaxis(np.asarray(kernel, np.float64).reshape(9, 5, 7), 1, 0)
  expected = np.moveaxis(truncate(slices, m), 0, 1).reshape(3, 3, 5, 7)
  assert_close_to(f, expected, kernel, dtype)


def numpy_hosvd(kernel, r_in, r_out):
  """HOSVD of the two channel modes: project on the leading singular
  vectors of each unfolding."""
  k = np.asarray(kernel, np.float64)
  c, f = k.shape[-2:]
  u = np.linalg.svd(np.moveaxis(k, -2, 0).reshape(c, -1))[0][:, :r_in]
  v = np.linalg.svd(np.moveaxis(k, -1, 0).reshape(f, -1))[0][:, :r_out]
  return np.einsum("ca,...cf,fb,da,eb->...de", u, k, v, u, v)


def test_tucker_starts_at_hosvd_and_hooi_only_improves():
  ranks = (2, 3)
  kernel = decaying_kernel((3, 3, 6, 8), rate=0.9)
  hosvd = decompose(kernel, "tucker", rank=ranks, iterations=0)
  assert_close_to(hosvd, numpy_hosvd(kernel, *ranks), kernel, jnp.float64)
  errors = [error(hosvd, kernel)]
  for iterations in (2, 8):
    f = decompose(kernel, "tucker", rank=ranks, iterations=iterations)
    errors.append(error(f, kernel))
  assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))  # monotone
  assert errors[-1] < errors[0] - 1e-6  # and better than HOSVD here


def test_tucker_in_rank_beyond_the_projected_columns():
  """R_in > k * R_out: the in-basis needs more vectors than the projected
  unfolding has columns; the full SVD still gives orthogonal columns (of
  one norm: the factors share the kernel's scale)."""
  kernel = decaying_kernel((1, 1, 6, 8))
  f = quiet(jaxfactor.decompose, kernel, "tucker", rank=(5, 2), iterations=3)
  gram = np.asarray(f.in_proj).T @ np.asarray(f.in_proj)
  np.testing.assert_allclose(gram, gram[0, 0] * np.eye(5), atol=1e-12)


FULL_RANK_CASES = pairwise(
  dict(name=FORMATS, n=[1, 2, 3], dtype=DTYPES),
  valid=lambda c: c["name"] != "spatially_separable" or c["n"] > 1,
)


@pytest.mark.parametrize("case", FULL_RANK_CASES, ids=ids(FULL_RANK_CASES))
def test_full_rank_is_exact(case):
  name, dtype = case["name"], case["dtype"]
  shape = {1: (3, 2, 3), 2: (2, 3, 2, 3), 3: (2, 2, 2, 2, 3)}[case["n"]]
  kernel = decaying_kernel(shape, dtype=dtype)
  rank = jaxfactor.max_rank(shape, name)
  # CP: the per-tap SVD start alone is exact at full rank.
  f = quiet(decompose, kernel, name, rank=rank, iterations=0, restarts=0)
  assert f.shape == shape and f.dtype == dtype
  assert error(f, kernel) < 10 * TOL[dtype]


CP_SHAPE = (3, 3, 4, 5)


def test_cp_als_converges_to_an_exact_cp_kernel_and_restarts_never_hurt():
  rng = np.random.default_rng(0)
  u, a, b, v = (rng.standard_normal((n, 3)) for n in (4, 3, 3, 5))
  kernel = jnp.asarray(np.einsum("cr,hr,wr,fr->hwcf", u, a, b, v))
  errors = [
    error(decompose(kernel, "cp", rank=3, iterations=i, restarts=0), kernel)
    for i in (0, 16, 100)
  ]
  assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8
  # Start i is the same whatever `restarts` is: more can only help.
  key = jax.random.key(3)
  few = decompose(kernel, "cp", rank=3, key=key, restarts=0, iterations=16)
  more = decompose(kernel, "cp", rank=3, key=key, restarts=2, iterations=16)
  assert error(more, kernel) <= error(few, kernel) + 1e-12


def term_norms(cp, kernel):
  """`||T_r|| / ||K||` for each rank-1 term, each built densely in numpy."""
  norms = []
  for r in range(cp.rank):
    columns = [np.asarray(a)[:, r] for a in (cp.in_proj, *cp.spatial)]
    columns.append(np.asarray(cp.out_proj)[r])
    term = columns[0]
    for column in columns[1:]:
      term = np.multiply.outer(term, column)
    norms.append(np.linalg.norm(term))
  return np.array(norms) / np.linalg.norm(np.asarray(kernel))


def test_stable_cp_recovers_an_exact_cp_kernel_and_convolves_as_flax():
  rng = np.random.default_rng(0)
  u, a, b, v = (rng.standard_normal((n, 3)) for n in (4, 3, 3, 5))
  kernel = jnp.asarray(np.einsum("cr,hr,wr,fr->hwcf", u, a, b, v))
  planted = np.linalg.norm(u, axis=0) * np.linalg.norm(a, axis=0)
  planted *= np.linalg.norm(b, axis=0) * np.linalg.norm(v, axis=0)
  bound = 1.5
  # The planted terms are within the bound, so the bound does not bias them.
  assert np.linalg.norm(planted) < bound * np.linalg.norm(kernel)
  f = decompose(kernel, "cp", rank=3, restarts=0, norm_bound=bound)
  assert error(f, kernel) < 1e-8
  norms = term_norms(f, kernel)
  degeneracy = float(jaxfactor.cp_degeneracy(f, kernel))
  assert abs(degeneracy - norms.max()) < 1e-12
  np.testing.assert_allclose(
    np.sort(norms), np.sort(planted) / np.linalg.norm(kernel), rtol=1e-6
  )
  x = random_input((2, 6, 7, 4))
  expected = flax_conv(x, f.to_dense(), padding="SAME")
  actual = jax.jit(jaxfactor.conv)(x, f)
  assert np.linalg.norm(actual - expected) < 1e-12 * np.linalg.norm(expected)


def degenerate_kernel():
  """`a o a o b + a o b o a + b o a o a`: rank 3, but rank-2 CPs come
  arbitrarily close, with two terms of norm ~1/error that cancel; no best
  rank-2 approximation exists (De Silva and Lim 2008)."""
  a, b = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 2)))[0].T
  terms = [(a, a, b), (a, b, a), (b, a, a)]
  return jnp.asarray(sum(np.einsum("i,j,k->ijk", *t) for t in terms))


def test_stable_cp_stays_bounded_where_als_degenerates():
  kernel = degenerate_kernel()  # a 1-D kernel [3, C=3, F=3]
  short, long = (
    decompose(kernel, "cp", rank=2, iterations=i) for i in (100, 2000)
  )
  # Plain ALS buys its error with ever larger, cancelling terms.
  assert error(long, kernel) < error(short, kernel) / 3
  assert jaxfactor.cp_degeneracy(long, kernel) > 1.5 * jaxfactor.cp_degeneracy(
    short, kernel
  )
  assert jaxfactor.cp_degeneracy(long, kernel) > 3
  bound = 2.0
  stable = decompose(kernel, "cp", rank=2, iterations=2000, norm_bound=bound)
  norms = term_norms(stable, kernel)
  assert np.linalg.norm(norms) <= bound * (1 + 1e-12)
  assert jaxfactor.cp_degeneracy(stable, kernel) <= bound
  # Bounded terms cost a little accuracy: the fit within the bound is about
  # as good as plain ALS after 100 sweeps (whose terms are larger).
  assert error(stable, kernel) < error(short, kernel) + 0.01


def constrained_least_squares(mttkrp, gram, bound):
  """`A = M (G + mu D)^-1`, `D = diag(G)`, with `mu >= 0` found by
  bisection such that `sum_r ||a_r||^2 D_r <= bound^2` (KKT of a convex
  problem, so the global optimum)."""
  diagonal = np.diag(np.diag(gram))

  def solve(mu):
    a = np.linalg.solve(gram + mu * diagonal, mttkrp.T).T
    return a, np.sqrt(np.sum(a**2 * np.diag(gram)))

  a, total = solve(0.0)
  if total <= bound:
    return a
  low, high = 0.0, 1.0
  while solve(high)[1] > bound:
    high *= 2
  for _ in range(200):
    mid = (low + high) / 2
    low, high = (mid, high) if solve(mid)[1] > bound else (low, mid)
  return solve(high)[0]


@pytest.mark.parametrize("bound", [0.3, 100.0])
def test_bounded_update_is_the_constrained_least_squares_optimum(bound):
  rng = np.random.default_rng(1)
  # Nearly collinear columns of unequal norms, as in a degenerating fit.
  w = rng.standard_normal((12, 1)) + 0.05 * rng.standard_normal((12, 4))
  w *= np.array([0.5, 1.0, 2.0, 3.0])
  target = rng.standard_normal((5, 12))
  mttkrp, gram = target @ w, w.T @ w
  got = jax.jit(_decompose._bounded_update)(
    jnp.asarray(mttkrp), jnp.asarray(gram), jnp.asarray(bound)
  )
  expected = constrained_least_squares(mttkrp, gram, bound)
  np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9)


# --- jit, vmap and dtypes -----------------------------------------------------

RANKS = {
  "depthwise_separable": 2,
  "spatially_separable": 4,
  "low_rank": 3,
  "tucker": (2, 3),
  "cp": 4,
  "tensor_train": (3, 2),
}


@pytest.mark.parametrize("name", FORMATS)
def test_vmap_over_a_stack_of_kernels_equals_one_at_a_time(name):
  stack = jnp.stack([decaying_kernel(CP_SHAPE, seed=s) for s in range(3)])
  batched = jax.jit(
    jax.vmap(
      lambda k: jaxfactor.decompose(
        k, name, rank=RANKS[name], iterations=4, restarts=0
      )
    )
  )(stack)
  assert jax.tree.leaves(batched)[0].shape[0] == 3
  for i in range(3):
    single = decompose(
      stack[i], name, rank=RANKS[name], iterations=4, restarts=0
    )
    np.testing.assert_allclose(
      jax.tree.map(lambda a, i=i: a[i], batched).to_dense(),
      single.to_dense(),
      rtol=1e-9,
      atol=1e-9,
    )


@pytest.mark.parametrize("name", FORMATS)
def test_factor_dtype_is_the_kernel_dtype(name):
  shape = (3, 3, 4, 5)
  for dtype in (jnp.float32, jnp.bfloat16):
    f = jax.eval_shape(
      lambda k: jaxfactor.decompose(
        k, name, rank=RANKS[name], iterations=1, restarts=0
      ),
      jax.ShapeDtypeStruct(shape, dtype),
    )
    assert {leaf.dtype for leaf in jax.tree.leaves(f)} == {jnp.dtype(dtype)}


def test_compute_dtype_float64_computes_in_float64():
  kernel = decaying_kernel((3, 3, 4, 5), dtype=jnp.float32, rate=0.97)
  double = decompose(kernel, "tucker", rank=2, compute_dtype=jnp.float64)
  assert double.dtype == jnp.float32
  expected = decompose(kernel.astype(jnp.float64), "tucker", rank=2)
  for a, b in zip(jax.tree.leaves(double), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b.astype(jnp.float32))
  single = decompose(kernel, "tucker", rank=2)
  assert any(
    bool(jnp.any(a != b))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(double))
  )


def test_non_finite_kernel_under_jit_gives_nan_factors():
  kernel = decaying_kernel((3, 3, 4, 4)).at[1, 1, 0, 0].set(jnp.inf)
  f = decompose(kernel, "low_rank", rank=1)
  assert all(bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree.leaves(f))


def test_scaled_kernels_decompose_as_well():
  # float32 kernels far from unit scale: the fit does not depend on it.
  kernel = decaying_kernel(CP_SHAPE, dtype=jnp.float32)
  base = decompose(kernel, "cp", rank=4, iterations=4, restarts=0)
  for scale in (1e-25, 1e25):  # squares beyond float32's range
    f = decompose(kernel * scale, "cp", rank=4, iterations=4, restarts=0)
    assert bool(jnp.all(jnp.isfinite(f.to_dense())))
    assert abs(error(f, kernel * scale) - error(base, kernel)) < 1e-4


# --- rank selection -----------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_budget_rank_is_the_largest_within_the_fraction(name):
  shape = (3, 3, 8, 12)
  cls = _ranks.format_class("test", name)
  path = _ranks.candidates(shape, cls)
  for fraction in (0.2, 0.4, 1.0):
    f = quiet(
      jax.eval_shape,
      lambda k, fraction=fraction: jaxfactor.decompose(
        k,
        name,
        rank=jaxfactor.Budget(params=fraction),
        iterations=1,
        restarts=0,
      ),
      jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    rank = _ranks.rank_of(f)
    assert f.num_params <= fraction * math.prod(shape)
    following = path[path.index(rank) + 1 :]
    if following:
      assert _ranks.num_params(shape, cls, following[0]) > (
        fraction * math.prod(shape)
      )


def test_budget_path_does_not_starve_the_smaller_tucker_mode():
  f = jax.eval_shape(
    lambda k: jaxfactor.decompose(
      k, "tucker", rank=jaxfactor.Budget(params=0.1)
    ),
    jax.ShapeDtypeStruct((3, 3, 64, 8), jnp.float32),
  )
  # One rank for both modes, clipped to each mode's maximum: a path keeping
  # R_in / R_out = C / F would end at (k, 1) here.
  assert f.ranks == (4, 4)


ENERGIES = dict(zip(FORMATS, (0.5, 0.9, 0.99, 0.8, 0.95, 0.9)))


def squared_spectra(name, kernel):
  """The squared singular values `decompose` truncates, per matrix."""
  k = np.asarray(kernel, np.float64)
  *window, c, f = k.shape
  if name == "low_rank":
    return [np.linalg.svd(k.reshape(-1, f), compute_uv=False) ** 2]
  if name == "spatially_separable":
    rearranged = np.moveaxis(k, -2, 1).reshape(window[0] * c, -1)
    return [np.linalg.svd(rearranged, compute_uv=False) ** 2]
  if name == "depthwise_separable":  # per channel, summed at each rank
    slices = np.moveaxis(k.reshape(-1, c, f), 1, 0)
    return [(np.linalg.svd(slices, compute_uv=False) ** 2).sum(axis=0)]
  if name == "tensor_train":  # the default modes of 6 x 8: (3, 2) x (4, 2)
    return [
      np.linalg.svd(u, compute_uv=False) ** 2
      for u in train_unfoldings(k, (3, 2), (4, 2))
    ]
  return [
    np.linalg.svd(
      np.moveaxis(k, mode, 0).reshape(k.shape[mode], -1), compute_uv=False
    )
    ** 2
    for mode in (-2, -1)
  ]


def smallest_rank(squares, energy):
  kept = np.cumsum(squares) / np.sum(squares)
  return int(np.argmax(kept >= energy * (1 - 1e-12))) + 1


@pytest.mark.parametrize("name", FORMATS)
def test_energy_is_the_smallest_rank_keeping_that_fraction(name):
  energy = ENERGIES[name]
  kernel = decaying_kernel((3, 3, 6, 8))
  f = quiet(
    jaxfactor.decompose, kernel, name, energy=energy, iterations=4, restarts=0
  )
  if name not in ("tucker", "tensor_train"):  # per mode, per unfolding
    # CP's ALS only improves on its start, which keeps `energy`.
    assert 1 - error(f, kernel) ** 2 >= energy - 1e-9
  if name == "cp":
    return
  rank = np.atleast_1d(_ranks.rank_of(f))
  expected = [smallest_rank(s, energy) for s in squared_spectra(name, kernel)]
  assert list(rank) == expected
  if name not in ("tucker", "tensor_train"):  # one optimal truncation:
    # it keeps exactly that energy
    squares = squared_spectra(name, kernel)[0]
    kept = squares[: rank[0]].sum() / squares.sum()
    assert abs(1 - error(f, kernel) ** 2 - kept) < 1e-10


def planted(name, rng):
  """A kernel of a known rank of `name`, plus 1% noise."""
  normal = rng.standard_normal
  if name == "low_rank":
    kernel, rank = (normal((3, 3, 16, 5)) @ normal((5, 24))), 5
  elif name == "tucker":
    kernel = np.einsum(
      "ca,hwab,bf->hwcf", normal((16, 4)), normal((3, 3, 4, 6)), normal((6, 24))
    )
    rank = (4, 6)
  elif name == "spatially_separable":
    kernel = np.einsum("hcr,wrf->hwcf", normal((3, 8, 3)), normal((3, 3, 12)))
    rank = (3,)
  elif name == "tensor_train":  # default modes (4, 4) x (6, 4)
    kernel = np.einsum(
      "ka,aibx,xjc->kijbc",
      normal((9, 2)),
      normal((2, 4, 6, 3)),
      normal((3, 4, 4)),
    ).reshape(3, 3, 16, 24)
    rank = (2, 3)
  else:
    kernel = np.einsum(
      "hwcj,cjf->hwcf", normal((3, 3, 8, 2)), normal((8, 2, 24))
    )
    rank = 2
  kernel += 0.01 * np.std(kernel) * normal(kernel.shape)
  return jnp.asarray(kernel), rank


@pytest.mark.parametrize("name", [n for n in FORMATS if n != "cp"])
def test_vbmf_finds_a_planted_rank(name):
  kernel, rank = planted(name, np.random.default_rng(0))
  f = jaxfactor.decompose(kernel, name, rank="vbmf")
  assert _ranks.rank_of(f) == rank


def test_vbmf_for_cp_pools_the_per_tap_ranks():
  rng = np.random.default_rng(0)
  # Every tap's 4 x 5 slice has rank 2: the pooled start needs 9 * 2 terms.
  kernel = np.einsum(
    "hwcr,hwrf->hwcf",
    rng.standard_normal((3, 3, 4, 2)),
    rng.standard_normal((3, 3, 2, 5)),
  )
  kernel += 1e-3 * rng.standard_normal(kernel.shape)
  f = quiet(
    jaxfactor.decompose,
    jnp.asarray(kernel),
    "cp",
    rank="vbmf",
    iterations=1,
    restarts=0,
  )
  assert f.rank == 9 * 2


def test_vbmf_on_pure_noise_keeps_one():
  rng = np.random.default_rng(1)
  for shape in ((40, 60), (60, 40), (9, 64)):
    assert _ranks.vbmf_rank(rng.standard_normal(shape)) == 1


def test_value_based_3d_ranks_always_chain():
  """Per-split energy/VBMF ranks are clipped to R_i <= R_{i-1} k_i."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal(3), rng.standard_normal((3, 3, 16))
  kernel = np.einsum("h,wdf->hwdf", a, b)[:, :, :, None, :]
  kernel = jnp.asarray(kernel + 1e-3 * rng.standard_normal(kernel.shape))
  for kwargs in (dict(energy=0.99), dict(energy=1.0), dict(rank="vbmf")):
    f = quiet(jaxfactor.decompose, kernel, "spatially_separable", **kwargs)
    assert f.ranks[1] <= f.ranks[0] * 3 and f.shape == kernel.shape


def test_max_rank():
  shape = (3, 3, 16, 32)
  assert jaxfactor.max_rank(shape, "low_rank") == 32
  assert jaxfactor.max_rank(shape, "depthwise_separable") == 9
  assert jaxfactor.max_rank(shape, "spatially_separable") == (48,)
  assert jaxfactor.max_rank(shape, jaxfactor.Tucker) == (16, 32)
  assert jaxfactor.max_rank(shape, "cp") == 144
  assert jaxfactor.max_rank((2, 3, 2, 4, 5), "spatially_separable") == (8, 10)
  assert jaxfactor.max_rank((1, 1, 64, 4), "tucker") == (4, 4)
  # Modes (4, 4) x (8, 4): min(k, C F), min(k c_1 f_1, c_2 f_2).
  assert jaxfactor.max_rank(shape, "tensor_train") == (9, 16)


# --- data-aware ---------------------------------------------------------------


def correlated_inputs(channels, *, batch=16, seed=0):
  """Inputs whose channels are strongly correlated: a fixed rank-2 mixing
  of independent latents, plus a little noise."""
  mixing = np.random.default_rng(100).standard_normal((2, channels))
  rng = np.random.default_rng(seed)
  latent = rng.standard_normal((batch, 8, 8, 2))
  return jnp.asarray(
    latent @ mixing + 0.05 * rng.standard_normal((batch, 8, 8, channels))
  )


@pytest.mark.parametrize("name,rank", [("low_rank", 4), ("tucker", (2, 4))])
def test_data_aware_has_the_lower_output_error_on_the_sample(name, rank):
  kernel = decaying_kernel((3, 3, 8, 8), rate=0.95)
  x = correlated_inputs(8)
  reference = jaxfactor.conv(x, kernel, padding="VALID")

  def output_error(f):
    y = jaxfactor.conv(x, f, padding="VALID")
    return float(jnp.linalg.norm(y - reference) / jnp.linalg.norm(reference))

  weight_only = jaxfactor.decompose(kernel, name, rank=rank)
  data_aware = jaxfactor.decompose(kernel, name, rank=rank, inputs=x)
  assert output_error(data_aware) < 0.8 * output_error(weight_only)
  # ... at the price of a larger weight error, as it should.
  assert error(data_aware, kernel) > error(weight_only, kernel)


def test_data_aware_low_rank_is_the_whitened_optimum():
  """With damping 0 the output error over the sample's (dilated) patches is
  the Eckart-Young optimum of the whitened filter matrix."""
  kernel = decaying_kernel((3, 3, 4, 6), rate=0.9)
  x = correlated_inputs(4, batch=4)
  f = jaxfactor.decompose(
    kernel, "low_rank", rank=2, inputs=x, damping=0.0, dilation=2
  )
  patches = np.asarray(
    jax.lax.conv_general_dilated_patches(
      x,
      (3, 3),
      (1, 1),
      "VALID",
      rhs_dilation=(2, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
  )  # [..., C*k], C major
  patches = patches.reshape(-1, 4, 9).transpose(0, 2, 1).reshape(-1, 36)
  k = np.asarray(kernel).reshape(36, 6)
  residual = patches @ (k - np.asarray(f.to_dense()).reshape(36, 6))
  chol = np.linalg.cholesky(patches.T @ patches / len(patches))
  whitened = chol.T @ k
  optimum = np.linalg.norm(whitened - truncate(whitened, 2))
  optimum *= math.sqrt(len(patches))
  assert abs(np.linalg.norm(residual) - optimum) < 1e-8 * optimum


# --- relative_error -----------------------------------------------------------


def test_relative_error_is_the_frobenius_ratio():
  kernel = decaying_kernel((3, 3, 4, 6), seed=1)
  f = decompose(decaying_kernel((3, 3, 4, 6), seed=2), "tucker", rank=2)
  k = np.asarray(kernel)
  expected = np.linalg.norm(np.asarray(f.to_dense()) - k) / np.linalg.norm(k)
  value = jaxfactor.relative_error(f, kernel)
  assert value.dtype == jnp.float64 and value.shape == ()
  assert abs(float(value) - expected) < 1e-12 * expected
  tiny = (kernel * 1e-30).astype(jnp.float32)
  tiny_f = jax.tree.map(lambda a: (a * 1e-10).astype(jnp.float32), f)
  assert abs(float(jaxfactor.relative_error(tiny_f, tiny)) - expected) < 1e-5
