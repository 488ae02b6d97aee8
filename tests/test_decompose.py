"""`decompose`: optimal where theory allows, checked against independent SVDs."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfactor
from reference import FORMATS

# Relative-error tolerances against a closed-form optimum, by dtype: the SVDs
# agree to ~1e2 ulps of the kernel norm.
OPT_TOL = {jnp.float64: 1e-12, jnp.float32: 1e-6}


def decaying_kernel(shape, *, rate=0.8, seed=0, dtype=jnp.float64):
  """A kernel whose spectra decay along every mode (like trained kernels)."""
  rng = np.random.default_rng(seed)
  kernel = rng.standard_normal(shape)
  for mode, size in enumerate(shape):
    kernel = np.moveaxis(np.moveaxis(kernel, mode, -1) * rate ** np.arange(size),
                         -1, mode)
  return jnp.asarray(kernel, dtype)


def tail_norm(singular_values, rank):
  return np.sqrt(np.sum(np.asarray(singular_values, np.float64)[rank:] ** 2))


def error(factors, kernel):
  return float(jaxfactor.relative_error(factors, kernel))


# --- optimality ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("shape", [(3, 4, 6), (3, 3, 4, 6), (2, 3, 2, 3, 5)])
@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_is_eckart_young_optimal(dtype, shape, rank):
  kernel = decaying_kernel(shape, dtype=dtype)
  f = jaxfactor.decompose(kernel, "low_rank", rank=rank)
  assert f.rank == rank and f.spatial.dtype == dtype
  matrix = np.asarray(kernel, np.float64).reshape(-1, shape[-1])
  s = np.linalg.svd(matrix, compute_uv=False)
  optimum = tail_norm(s, rank) / np.linalg.norm(s)
  assert abs(error(f, kernel) - optimum) < OPT_TOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_spatially_separable_2d_is_optimal(dtype, rank):
  kernel = decaying_kernel((3, 5, 4, 6), dtype=dtype)
  f = jaxfactor.decompose(kernel, "spatially_separable", rank=rank)
  assert f.ranks == (rank,)
  # Jaderberg et al. scheme 2: SVD of the (k_h*C) x (k_w*F) rearrangement.
  k = np.asarray(kernel, np.float64)
  rearranged = k.transpose(0, 2, 1, 3).reshape(3 * 4, 5 * 6)
  s = np.linalg.svd(rearranged, compute_uv=False)
  assert abs(error(f, kernel) - tail_norm(s, rank) / np.linalg.norm(s)) < (
      OPT_TOL[dtype])


@pytest.mark.parametrize("ranks", [(2, 2), (4, 7), (1, 3), (5, 8)])
def test_spatially_separable_3d_tt_svd_bounds(ranks):
  """TT-SVD: max_i d_i <= error <= sqrt(sum_i d_i^2), d_i the best error of
  unfolding i [C k_1..k_i] x [k_{i+1}..k_N F] at rank R_i (Oseledets 2011)."""
  shape = (2, 3, 2, 4, 5)
  kernel = decaying_kernel(shape)
  f = jaxfactor.decompose(kernel, "spatially_separable", rank=ranks)
  k = np.moveaxis(np.asarray(kernel), -2, 0)  # [C, k1, k2, k3, F]
  norm = np.linalg.norm(k)
  bests = []
  for i, r in enumerate(ranks):
    rows = 4 * math.prod(shape[: i + 1])
    s = np.linalg.svd(k.reshape(rows, -1), compute_uv=False)
    bests.append(tail_norm(s, r) / norm)
  e = error(f, kernel)
  assert max(bests) - 1e-12 <= e <= math.sqrt(sum(b**2 for b in bests)) + 1e-12


def test_spatially_separable_1d_is_an_error():
  with pytest.raises(ValueError, match="SpatiallySeparable needs at least 2"
                     r" spatial axes to separate; a 1-D kernel \(shape"
                     r" \(3, 4, 5\)\)"):
    jaxfactor.decompose(jnp.ones((3, 4, 5)), "spatially_separable", rank=1)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("multiplier", [1, 2, 3])
def test_depthwise_separable_is_optimal_per_channel(dtype, multiplier):
  kernel = decaying_kernel((3, 3, 5, 7), dtype=dtype)
  f = jaxfactor.decompose(kernel, "depthwise_separable", rank=multiplier)
  assert f.channel_multiplier == multiplier and f.in_features == 5
  k = np.asarray(kernel, np.float64).reshape(9, 5, 7)
  tails = [tail_norm(np.linalg.svd(k[:, c], compute_uv=False), multiplier)
           for c in range(5)]
  optimum = math.sqrt(sum(t**2 for t in tails)) / np.linalg.norm(k)
  assert abs(error(f, kernel) - optimum) < OPT_TOL[dtype]


def _numpy_hosvd_error(kernel, r_in, r_out):
  k = np.asarray(kernel, np.float64)
  c, f = k.shape[-2:]
  u = np.linalg.svd(np.moveaxis(k, -2, 0).reshape(c, -1))[0][:, :r_in]
  v = np.linalg.svd(np.moveaxis(k, -1, 0).reshape(f, -1))[0][:, :r_out]
  approx = np.einsum("ca,...cf,fb,da,eb->...de", u, k, v, u, v)
  return np.linalg.norm(approx - k) / np.linalg.norm(k)


@pytest.mark.parametrize("ranks", [(2, 3), (5, 2), (6, 8)])
def test_tucker_hooi_never_worse_than_hosvd(ranks):
  kernel = decaying_kernel((3, 3, 6, 8), rate=0.9)
  with warnings.catch_warnings():  # (6, 8) is full rank: larger than dense
    warnings.simplefilter("ignore")
    hosvd = error(jaxfactor.decompose(kernel, "tucker", rank=ranks,
                                      iterations=0), kernel)
  assert abs(hosvd - _numpy_hosvd_error(kernel, *ranks)) < 1e-12
  previous = hosvd
  for iterations in (1, 3, 10):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      e = error(jaxfactor.decompose(kernel, "tucker", rank=ranks,
                                    iterations=iterations), kernel)
    assert e <= previous + 1e-12  # HOOI is monotone
    previous = e
  if ranks != (6, 8):
    assert previous < hosvd - 1e-6  # and it does improve on HOSVD here


def test_tucker_in_rank_beyond_columns_of_the_projection():
  """R_in > k * R_out: the in-basis needs more vectors than the projected
  unfolding has columns; full SVD still gives an orthonormal basis."""
  kernel = decaying_kernel((1, 1, 6, 8))
  with pytest.warns(UserWarning, match="more than the dense kernel"):
    f = jaxfactor.decompose(kernel, "tucker", rank=(5, 2), iterations=3)
  u = np.asarray(f.in_proj)
  np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-12)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (2, 3, 4, 3), (2, 2, 2, 3, 2)])
def test_full_rank_reconstructs_exactly(name, shape):
  kernel = decaying_kernel(shape)
  rank = jaxfactor.max_rank(shape, name)
  with pytest.warns(UserWarning, match="more than the dense kernel") if (
      _params(name, shape, rank) > math.prod(shape)) else _no_warning():
    f = jaxfactor.decompose(kernel, name, rank=rank)
  assert f.shape == shape
  assert error(f, kernel) < 1e-12


def _params(name, shape, rank):
  from jaxfactor import ranks
  return ranks.num_params(shape, ranks.format_class("test", name), rank)


class _no_warning:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def test_cp_als_improves_and_restarts_never_hurt():
  kernel = decaying_kernel((3, 3, 6, 8))
  errors = [error(jaxfactor.decompose(kernel, "cp", rank=6, iterations=i),
                  kernel) for i in (0, 5, 50)]
  assert errors[0] > errors[1] > errors[2]  # ALS decreases the error
  key = jax.random.key(3)
  few = error(jaxfactor.decompose(kernel, "cp", rank=6, key=key, restarts=0,
                                  iterations=20), kernel)
  many = error(jaxfactor.decompose(kernel, "cp", rank=6, key=key, restarts=6,
                                   iterations=20), kernel)
  assert many <= few + 1e-12
  f = jaxfactor.decompose(kernel, "cp", rank=6)
  assert f.rank == 6 and len(f.spatial) == 2


def test_cp_recovers_an_exact_low_rank_kernel():
  rng = np.random.default_rng(0)
  u, a, b, v = (rng.standard_normal((n, 3)) for n in (5, 3, 3, 6))
  kernel = jnp.asarray(np.einsum("cr,hr,wr,fr->hwcf", u, a, b, v))
  f = jaxfactor.decompose(kernel, "cp", rank=3, iterations=200)
  assert error(f, kernel) < 1e-6


# --- dtypes, jit and vmap -----------------------------------------------------------

@pytest.mark.parametrize("name", FORMATS)
def test_factor_dtype_follows_the_kernel(name):
  kernel = decaying_kernel((3, 3, 4, 5), dtype=jnp.float32)
  f = jaxfactor.decompose(kernel, name, rank=0.5)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(f))
  precise = jaxfactor.decompose(kernel, name, rank=0.5,
                                compute_dtype=jnp.float64)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(precise))
  assert abs(error(precise, kernel) - error(f, kernel)) < 1e-4
  low = jaxfactor.decompose(kernel.astype(jnp.bfloat16), name, rank=0.5)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(low))


RANKS = {"depthwise_separable": 2, "spatially_separable": 4, "low_rank": 3,
         "tucker": (2, 3), "cp": 4}


@pytest.mark.parametrize("name", FORMATS)
def test_jit_vmap_over_a_stack_of_16_kernels(name):
  stack = jnp.stack([decaying_kernel((3, 3, 4, 5), seed=s) for s in range(16)])
  batched = jax.jit(jax.vmap(
      lambda k: jaxfactor.decompose(k, name, rank=RANKS[name],
                                    iterations=5)))(stack)
  assert jax.tree.leaves(batched)[0].shape[0] == 16
  for i in (0, 7, 15):
    single = jaxfactor.decompose(stack[i], name, rank=RANKS[name],
                                 iterations=5)
    one = jax.tree.map(lambda a: a[i], batched)
    np.testing.assert_allclose(one.to_dense(), single.to_dense(), rtol=1e-9,
                               atol=1e-9)


# --- rank selection -------------------------------------------------------------------

@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_fraction_is_the_largest_rank_within_budget(name, fraction):
  from jaxfactor import ranks
  shape = (3, 3, 8, 12)
  cls = ranks.format_class("test", name)
  budget = fraction * math.prod(shape)
  path = ranks._candidates(shape, cls)
  if ranks.num_params(shape, cls, path[0]) > budget:
    with pytest.raises(ValueError, match="leaves no rank"):
      jaxfactor.decompose(decaying_kernel(shape), name, rank=fraction)
    return
  f = jaxfactor.decompose(decaying_kernel(shape), name, rank=fraction)
  assert f.num_params <= budget
  rank = (f.ranks if name in ("tucker", "spatially_separable") else
          f.channel_multiplier if name == "depthwise_separable" else f.rank)
  following = path[path.index(rank) + 1:] if rank in path else []
  assert all(ranks.num_params(shape, cls, r) > budget for r in following[:1])


def test_fraction_too_small_for_any_rank():
  with pytest.raises(ValueError, match=r"`rank`=0.001 leaves no rank: the"
                     r" smallest Tucker \(rank \(1, 1\)\) has 27 parameters,"
                     r" more than 0.001 of the dense kernel's 720"):
    jaxfactor.decompose(decaying_kernel((3, 3, 8, 10)), "tucker", rank=0.001)


# High energies can cost more parameters than the dense kernel.
@pytest.mark.filterwarnings("ignore:decompose.*more than the dense kernel")
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_keeps_that_fraction_with_the_smallest_rank(name, energy):
  kernel = decaying_kernel((3, 3, 6, 8))
  f = jaxfactor.decompose(kernel, name, energy=energy)
  if name in ("low_rank", "spatially_separable", "depthwise_separable"):
    # Optimal truncations: kept energy = 1 - error^2, and one rank less
    # would keep less than asked.
    assert 1 - error(f, kernel) ** 2 >= energy - 1e-12
    smaller = _smaller(f, name)
    if smaller is not None:
      g = jaxfactor.decompose(kernel, name, rank=smaller)
      assert 1 - error(g, kernel) ** 2 < energy
  elif name == "tucker":
    k = np.asarray(kernel)
    for mode, r in zip((-2, -1), f.ranks):
      s = np.linalg.svd(np.moveaxis(k, mode, 0).reshape(k.shape[mode], -1),
                        compute_uv=False) ** 2
      assert s[:r].sum() >= energy * s.sum() * (1 - 1e-12)
      assert r == 1 or s[: r - 1].sum() < energy * s.sum()
  else:  # CP: ALS only improves on its start, which keeps `energy`.
    assert 1 - error(f, kernel) ** 2 >= energy - 1e-9


def _smaller(f, name):
  if name == "depthwise_separable":
    return f.channel_multiplier - 1 or None
  if name == "spatially_separable":
    return (f.ranks[0] - 1,) if f.ranks[0] > 1 else None
  return f.rank - 1 or None


def test_vbmf_recovers_planted_ranks():
  rng = np.random.default_rng(0)
  # LowRank: a rank-5 (k*C) x F matrix plus noise.
  signal = rng.standard_normal((9 * 16, 5)) @ rng.standard_normal((5, 24))
  kernel = jnp.asarray((3 * signal + 0.1 * rng.standard_normal(signal.shape))
                       .reshape(3, 3, 16, 24))
  assert jaxfactor.decompose(kernel, "low_rank", rank="vbmf").rank == 5
  # Tucker: multilinear ranks (4, 6) plus noise, as Kim et al. select them.
  core = rng.standard_normal((3, 3, 4, 6))
  u, v = rng.standard_normal((16, 4)), rng.standard_normal((6, 24))
  tucker = np.einsum("ca,hwab,bf->hwcf", u, core, v)
  tucker += 0.01 * rng.standard_normal(tucker.shape)
  f = jaxfactor.decompose(jnp.asarray(tucker), "tucker", rank="vbmf")
  assert f.ranks == (4, 6)


@pytest.mark.filterwarnings("ignore:decompose.*more than the dense kernel")
def test_value_based_3d_ranks_always_chain():
  """Per-split energy/VBMF ranks are clipped to R_i <= R_{i-1} k_i."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal(3), rng.standard_normal((3, 3, 16))
  kernel = np.einsum("h,wdf->hwdf", a, b)[:, :, :, None, :]
  kernel = jnp.asarray(kernel + 1e-3 * rng.standard_normal(kernel.shape))
  for kwargs in (dict(energy=0.99), dict(energy=1.0), dict(rank="vbmf")):
    f = jaxfactor.decompose(kernel, "spatially_separable", **kwargs)
    assert f.ranks[1] <= f.ranks[0] * 3
    assert f.shape == kernel.shape


def test_vbmf_on_pure_noise_keeps_one():
  from jaxfactor import ranks
  rng = np.random.default_rng(1)
  for shape in ((40, 60), (60, 40), (9, 64)):
    assert ranks.vbmf_rank(rng.standard_normal(shape)) == 1


@pytest.mark.parametrize("name", FORMATS)
def test_vbmf_runs_for_every_format(name):
  kernel = decaying_kernel((3, 3, 6, 8), rate=0.5)
  f = jaxfactor.decompose(kernel, name, rank="vbmf")
  assert f.shape == kernel.shape and error(f, kernel) < 1


def test_oversized_rank_warns():
  with pytest.warns(UserWarning, match=r"decompose: LowRank of rank 8 has 640"
                    r" parameters, more than the dense kernel's 576"):
    jaxfactor.decompose(decaying_kernel((3, 3, 8, 8)), "low_rank", rank=8)


# --- data-aware -------------------------------------------------------------------------

def correlated_inputs(channels, *, seed=0):
  """Inputs whose channels are strongly correlated: one fixed rank-2 mixing
  of independent latents (drawn from `seed`), plus a little noise."""
  mixing = np.random.default_rng(100).standard_normal((2, channels))
  rng = np.random.default_rng(seed)
  latent = rng.standard_normal((64, 10, 10, 2))
  x = latent @ mixing + 0.05 * rng.standard_normal((64, 10, 10, channels))
  return jnp.asarray(x)


@pytest.mark.parametrize("name,rank", [("low_rank", 4), ("tucker", (2, 4))])
def test_data_aware_beats_weight_only_on_correlated_inputs(name, rank):
  kernel = decaying_kernel((3, 3, 8, 8), rate=0.95)
  x = correlated_inputs(8)
  held_out = correlated_inputs(8, seed=1)
  reference = jaxfactor.conv(held_out, kernel, padding="VALID")

  def output_error(f):
    y = jaxfactor.conv(held_out, f, padding="VALID")
    return float(jnp.linalg.norm(y - reference) / jnp.linalg.norm(reference))

  weight_only = jaxfactor.decompose(kernel, name, rank=rank)
  data_aware = jaxfactor.decompose(kernel, name, rank=rank, inputs=x)
  # Measured: LowRank 0.44 vs 0.66, Tucker 0.44 vs 0.94 (held-out inputs).
  assert output_error(data_aware) < 0.8 * output_error(weight_only)
  # ... at the price of a larger weight error, as it should.
  assert error(data_aware, kernel) > error(weight_only, kernel)


def test_data_aware_low_rank_is_the_whitened_optimum():
  """With damping 0, the output error over the sample's patches equals the
  Eckart-Young optimum of the whitened matrix."""
  kernel = decaying_kernel((3, 3, 4, 6), rate=0.9)
  x = correlated_inputs(4)[:8]
  f = jaxfactor.decompose(kernel, "low_rank", rank=2, inputs=x, damping=0.0)
  patches = np.asarray(
      jax.lax.conv_general_dilated_patches(
          x, (3, 3), (1, 1), "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC")))  # [.., C*k] (C major)
  patches = patches.reshape(-1, 4, 9).transpose(0, 2, 1).reshape(-1, 36)
  k = np.asarray(kernel).reshape(36, 6)
  residual = patches @ (k - np.asarray(f.to_dense()).reshape(36, 6))
  chol = np.linalg.cholesky(patches.T @ patches / len(patches))
  s = np.linalg.svd(chol.T @ k, compute_uv=False)
  optimum = tail_norm(s, 2) * math.sqrt(len(patches))
  assert abs(np.linalg.norm(residual) - optimum) < 1e-8 * optimum


# --- bad input --------------------------------------------------------------------------

def _raises(exc, match, *args, **kwargs):
  with pytest.raises(exc, match=match):
    jaxfactor.decompose(*args, **kwargs)


def test_non_finite_kernel():
  kernel = jnp.ones((3, 3, 4, 4)).at[1, 1, 0, 0].set(jnp.nan)
  _raises(ValueError, r"decompose: `kernel` \(shape \(3, 3, 4, 4\)\) has"
          r" non-finite values \(NaN or inf\)", kernel, "low_rank", rank=1)
  # Under jit the values are unknown: NaN propagates to the factors.
  f = jax.jit(lambda k: jaxfactor.decompose(k, "low_rank", rank=1))(kernel)
  assert not np.isfinite(np.asarray(f.to_dense())).all()


def test_rank_out_of_range_names_the_maximum():
  kernel = jnp.ones((3, 3, 4, 8))
  _raises(ValueError, r"decompose: `rank` 37 is out of range for LowRank and"
          r" kernel shape \(3, 3, 4, 8\): it must be >= 1 and at most"
          r" max_rank = 8", kernel, "low_rank", rank=37)
  _raises(ValueError, r"`rank` 0 is out of range", kernel, "cp", rank=0)
  _raises(ValueError, r"decompose: `rank` \(5, 9\) is out of range for Tucker"
          r" and kernel shape \(3, 3, 4, 8\): each must be >= 1 and at most"
          r" max_rank = \(4, 8\)", kernel, "tucker", rank=(5, 9))
  _raises(TypeError, r"`rank` for Tucker must be an int or a tuple of 2 ints,"
          r" got \(1, 2, 3\)", kernel, "tucker", rank=(1, 2, 3))
  _raises(TypeError, r"`rank` for LowRank must be an int, got \(1, 2\)",
          kernel, "low_rank", rank=(1, 2))
  _raises(ValueError, r"decompose: `rank` \(1, 5\) does not chain for"
          r" SpatiallySeparable and kernel shape \(2, 3, 2, 4, 5\): rank\[1\]"
          r" = 5 exceeds rank\[0\] \* window\[1\] = 3",
          jnp.ones((2, 3, 2, 4, 5)), "spatially_separable", rank=(1, 5))


def test_bad_rank_and_energy_arguments():
  kernel = jnp.ones((3, 3, 4, 8))
  _raises(ValueError, r"give exactly one of `rank` and `energy`, got"
          r" rank=None, energy=None", kernel, "low_rank")
  _raises(ValueError, r"give exactly one of `rank` and `energy`", kernel,
          "low_rank", rank=2, energy=0.5)
  for bad in (0.0, 1.5, -0.1):
    _raises(ValueError, rf"`energy` must be a number in \(0, 1\], got {bad}",
            kernel, "low_rank", energy=bad)
  _raises(ValueError, r"a float `rank` is a fraction of the dense kernel's"
          r" parameters and must be in \(0, 1\], got 2.5", kernel, "low_rank",
          rank=2.5)
  _raises(ValueError, r"`rank` must be an int, a tuple of ints, a float in"
          r" \(0, 1\] or 'vbmf', got 'auto'", kernel, "low_rank", rank="auto")


def test_value_based_rank_under_jit():
  with pytest.raises(ValueError, match=r"decompose: vbmf rank selection reads"
                     r" the kernel's values to choose a shape, which is"
                     r" impossible under jit/vmap"):
    jax.jit(lambda k: jaxfactor.decompose(k, "tucker", rank="vbmf"))(
        jnp.ones((3, 3, 4, 4)))
  with pytest.raises(ValueError, match=r"energy rank selection"):
    jax.vmap(lambda k: jaxfactor.decompose(k, "cp", energy=0.9))(
        jnp.ones((2, 3, 3, 4, 4)))


def test_bad_kernel_and_format():
  _raises(ValueError, r"decompose: the kernel must have shape \[\*window, C,"
          r" F\] with at least one spatial axis and no empty axis, got shape"
          r" \(4, 8\)", jnp.ones((4, 8)), "low_rank", rank=1)
  _raises(ValueError, r"decompose: `format` must be one of"
          r" \('depthwise_separable', 'spatially_separable', 'low_rank',"
          r" 'tucker', 'cp'\) or the matching class, got 'svd'",
          jnp.ones((3, 3, 4, 8)), "svd", rank=1)
  _raises(TypeError, r"decompose: `kernel` must be a jax or numpy array, got"
          r" list", [[[[1.0]]]], "low_rank", rank=1)
  _raises(TypeError, r"decompose: `kernel` must have a floating dtype, got"
          r" int32", jnp.ones((3, 3, 4, 8), jnp.int32), "low_rank", rank=1)
  f = jaxfactor.decompose(jnp.ones((3, 3, 4, 8)), jaxfactor.LowRank, rank=1)
  assert isinstance(f, jaxfactor.LowRank)


def test_bad_inputs():
  kernel = decaying_kernel((3, 3, 4, 8))
  _raises(ValueError, r"decompose: `inputs` must have shape \[\*batch,"
          r" \*spatial, C\] with C = 4, 2 spatial axes and each spatial size"
          r" >= the dilated window \(3, 3\), got shape \(2, 8, 8, 3\)", kernel,
          "low_rank", rank=2, inputs=jnp.ones((2, 8, 8, 3)))
  _raises(ValueError, r"got shape \(2, 2, 8, 4\)", kernel, "low_rank",
          rank=2, inputs=jnp.ones((2, 2, 8, 4)))
  _raises(ValueError, r"decompose: `inputs` \(data-aware decomposition\) is"
          r" supported for LowRank and Tucker, not CP", kernel, "cp", rank=2,
          inputs=jnp.ones((2, 8, 8, 4)))
  _raises(ValueError, r"`damping` must be >= 0, got -1", kernel, "tucker",
          rank=2, inputs=jnp.ones((2, 8, 8, 4)), damping=-1)


def test_bad_iterations_restarts_and_compute_dtype():
  kernel = decaying_kernel((3, 3, 4, 8))
  _raises(ValueError, r"`iterations` must be a non-negative int, got -1",
          kernel, "tucker", rank=2, iterations=-1)
  _raises(ValueError, r"`restarts` must be a non-negative int, got 1.5",
          kernel, "cp", rank=2, restarts=1.5)
  _raises(ValueError, r"`compute_dtype` must be float32 or float64, got"
          r" float16", kernel, "cp", rank=2, compute_dtype=jnp.float16)
  with jax.enable_x64(False):
    _raises(ValueError, r"`compute_dtype`=float64 needs 64-bit mode",
            jnp.ones((3, 3, 4, 8), jnp.float32), "low_rank", rank=2,
            compute_dtype=jnp.float64)


def test_relative_error_arguments():
  f = jaxfactor.decompose(jnp.ones((3, 3, 4, 8)), "low_rank", rank=1)
  with pytest.raises(TypeError, match=r"relative_error: `factors` must be a"
                     r" jaxfactor format, got ArrayImpl"):
    jaxfactor.relative_error(jnp.ones((3, 3, 4, 8)), jnp.ones((3, 3, 4, 8)))
  with pytest.raises(ValueError, match=r"relative_error: `kernel` has shape"
                     r" \(3, 3, 4, 4\) but the factors stand for a kernel of"
                     r" shape \(3, 3, 4, 8\)"):
    jaxfactor.relative_error(f, jnp.ones((3, 3, 4, 4)))


def test_max_rank_values():
  shape = (3, 3, 16, 32)
  assert jaxfactor.max_rank(shape, "low_rank") == 32
  assert jaxfactor.max_rank(shape, "depthwise_separable") == 9
  assert jaxfactor.max_rank(shape, "spatially_separable") == (48,)
  assert jaxfactor.max_rank(shape, jaxfactor.Tucker) == (16, 32)
  assert jaxfactor.max_rank(shape, "cp") == 144
  assert jaxfactor.max_rank((2, 3, 2, 4, 5), "spatially_separable") == (8, 10)
  assert jaxfactor.max_rank((1, 1, 64, 4), "tucker") == (4, 4)


def test_fraction_path_does_not_starve_the_smaller_tucker_mode():
  kernel = decaying_kernel((3, 3, 64, 8), rate=0.97)
  f = jaxfactor.decompose(kernel, "tucker", rank=0.1)
  assert min(f.ranks) > 1
  stem = jaxfactor.decompose(decaying_kernel((3, 3, 3, 16)), "tucker",
                             rank=0.5)
  assert stem.num_params <= 0.5 * 3 * 3 * 3 * 16
