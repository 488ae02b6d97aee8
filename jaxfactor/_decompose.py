"""Dense kernel -> factors: the best factorization of a given rank.

Every algorithm is a pure JAX function of the kernel with static ranks and
iteration counts, so `decompose` runs under `jax.jit` and `jax.vmap` (a stack
of same-shaped kernels in one call). The rank rules that read the kernel's
values (`energy`, `rank="vbmf"`) choose a shape, so they need a concrete
kernel.
"""

from __future__ import annotations

import math
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular

from jaxfactor import _formats as formats
from jaxfactor import _ranks
from jaxfactor import _validation

_HIGHEST = lax.Precision.HIGHEST
DEFAULT_ITERATIONS = {formats.Tucker: 10, formats.CP: 100}
_CLIPPED_BY_CHAIN = (formats.SpatiallySeparable, formats.TensorTrain)


def relative_error(
  factors: formats.Format, kernel: jax.typing.ArrayLike
) -> jax.Array:
  """`||factors.to_dense() - kernel||_F / ||kernel||_F`.

  Args:
    factors: any format.
    kernel: the dense HWIO kernel `[*window, C, F]` it approximates.

  Returns:
    A scalar array in the kernel's dtype.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> kernel = jnp.ones((3, 3, 4, 8))
  >>> f = jaxfactor.decompose(kernel, "low_rank", rank=1)
  >>> float(jaxfactor.relative_error(f, kernel)) < 1e-6
  True
  """
  fn = "relative_error"
  if not isinstance(factors, formats.Format):
    raise TypeError(
      f"{fn}: `factors` must be a jaxfactor format, got"
      f" {type(factors).__name__}."
    )
  kernel = _validation.check_array(fn, "kernel", kernel)
  if tuple(kernel.shape) != factors.shape:
    raise ValueError(
      f"{fn}: `kernel` has shape {tuple(kernel.shape)} but the factors"
      f" stand for a kernel of shape {factors.shape}."
    )
  kernel = jnp.asarray(kernel)
  dense = factors.to_dense().astype(kernel.dtype)
  # Scaled to max |K| = 1, so that squares neither overflow nor underflow.
  scale = jnp.max(jnp.abs(kernel))
  scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  return jnp.linalg.norm(((dense - kernel) / scale).ravel()) / jnp.linalg.norm(
    (kernel / scale).ravel()
  )


def cp_degeneracy(cp: formats.CP, kernel: jax.typing.ArrayLike) -> jax.Array:
  """The largest rank-1 term of a CP over the kernel: `max_r ||T_r|| / ||K||`.

  `T_r = U[:, r] o A_1[:, r] o ... o A_N[:, r] o V[r, :]` is the `r`-th
  rank-1 term of `cp` (its Frobenius norm is the product of the columns'
  norms) and `K` the dense kernel it approximates. A CP fit whose terms
  cancel each other (degenerate ALS: terms with huge norms whose sum is
  small) has a large value; a least-squares fit of orthogonal terms has one
  at most 1. `decompose(..., "cp", norm_bound=b)` keeps it at most `b`.

  Args:
    cp: a `jaxfactor.CP`.
    kernel: the dense HWIO kernel `[*window, C, F]` it approximates.

  Returns:
    A scalar array in the kernel's dtype.

  References:
    Lebedev et al., 2015, Speeding-up Convolutional Neural Networks Using
    Fine-tuned CP-Decomposition, https://arxiv.org/abs/1412.6553.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> cp = jaxfactor.CP(
  ...     jnp.ones((2, 1)), (jnp.ones((3, 1)),), 2 * jnp.ones((1, 2)))
  >>> float(jaxfactor.cp_degeneracy(cp, cp.to_dense()))
  1.0
  """
  fn = "cp_degeneracy"
  if not isinstance(cp, formats.CP):
    raise TypeError(
      f"{fn}: `cp` must be a jaxfactor.CP, got {type(cp).__name__}."
    )
  kernel = _validation.check_array(fn, "kernel", kernel)
  _validation.check_floating(fn, "kernel", kernel)
  if tuple(kernel.shape) != cp.shape:
    raise ValueError(
      f"{fn}: `kernel` has shape {tuple(kernel.shape)} but `cp` stands for a"
      f" kernel of shape {cp.shape}."
    )
  kernel = jnp.asarray(kernel)
  columns = [cp.in_proj, *cp.spatial, cp.out_proj.T]
  # Scaled to max |K| = 1, as in `relative_error`.
  scale = jnp.max(jnp.abs(kernel))
  scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  share = scale ** (1 / len(columns))
  weights = jnp.ones((cp.rank,), kernel.dtype)
  norms = _component_norms(
    weights, [(c.astype(kernel.dtype) / share) for c in columns]
  )
  return jnp.max(norms) / jnp.linalg.norm((kernel / scale).ravel())


def decompose(
  kernel: jax.typing.ArrayLike,
  format: Any,
  *,
  rank: Any = None,
  energy: float | None = None,
  inputs: jax.typing.ArrayLike | None = None,
  iterations: int | None = None,
  key: jax.Array | None = None,
  restarts: int = 3,
  norm_bound: float | None = None,
  damping: float = 1e-3,
  dilation: int | tuple[int, ...] = 1,
  compute_dtype: Any = None,
  in_modes: tuple[int, ...] | None = None,
  out_modes: tuple[int, ...] | None = None,
  feature_group_count: int = 1,
) -> formats.Format:
  """Factorizes a dense HWIO kernel into `format`, optimally where possible.

  Algorithms (all jit-able and vmap-able at a static rank):

  * `LowRank`: truncated SVD of the `(k*C) x F` filter matrix; optimal
    (Eckart-Young). Singular values are split evenly between the factors.
  * `SpatiallySeparable`: sequential truncated SVDs of the kernel's unfoldings
    (TT-SVD). For N = 2 this is one SVD of the `(k_h*C) x (k_w*F)`
    rearrangement, optimal (Jaderberg et al. 2014, scheme 2). For N >= 3 the
    squared error is at most the sum over splits of the best squared errors of
    the unfoldings `[C k_1..k_i] x [k_{i+1}..k_N F]` (Oseledets 2011, Thm 2.2),
    and at least their maximum.
  * `DepthwiseSeparable`: per input channel, the rank-m SVD of its `k x F`
    slice; optimal for channel multiplier `m`.
  * `Tucker` (Tucker-2 over the channel modes): HOSVD, then `iterations`
    HOOI sweeps (Kim et al. 2016); never worse than HOSVD, exact at full rank.
  * `CP`: ALS for `iterations` sweeps with normalised columns, from
    SVD-based starts run side by side (vmapped): the pooled per-tap SVD (exact
    at full rank) and `1 + restarts` HOSVD starts (leading singular vectors of
    each mode unfolding, filled with uniform random columns from `key` where
    a mode is smaller than the rank, as TensorLy's "svd" start); the best fit
    is kept (Lebedev et al. 2015). With `norm_bound`, norm-constrained ALS:
    each update is the least-squares one subject to
    `sqrt(sum_r ||T_r||^2) <= norm_bound * ||K||` over the rank-1 terms
    `T_r`, a trust-region subproblem whose Tikhonov damping is solved for
    (More and Sorensen 1983). The bounded problem always has a minimiser, so
    the fit cannot degenerate into large cancelling terms; the error still
    never increases after the first update.
  * `TensorTrain`: TT-SVD (Oseledets 2011) of the kernel read as the tensor
    `[w, (c_1 f_1), ..., (c_d f_d)]`: sequential truncated SVDs, left to
    right. Exact at `max_rank`; otherwise quasi-optimal,
    `||K - K_TT||_F <= sqrt(sum_i eps_i^2)` for `eps_i` the best error of
    the `i`-th unfolding `[k n_1..n_i] x [n_{i+1}..n_d]` at rank `R_i`
    (Oseledets 2011, Thm 2.2).

  Args:
    kernel: dense `[*window, C, F]`, e.g. a trained Flax `nn.Conv` kernel.
    format: a format class or its name: "depthwise_separable",
      "spatially_separable", "low_rank", "tucker", "cp", "tensor_train".
    rank: an int (for `Tucker` an int or `(R_in, R_out)`; for
      `SpatiallySeparable` an int or one inner rank per split; for
      `TensorTrain` an int (every TT rank, clipped to its maximum) or one
      rank per core `(R_0, ..., R_{d-1})`; for
      `DepthwiseSeparable` the channel multiplier); a
      `jaxfactor.Budget(params=f)`: the largest rank whose parameters are at
      most the fraction `f` of the dense kernel's; or "vbmf": analytic
      empirical VBMF (Nakajima et al. 2013) on the matrices the algorithm
      truncates, as Kim et al. 2016 pick Tucker-2 ranks. A float is a
      `TypeError`: it would read as a rank.
    energy: instead of `rank`, a fraction in (0, 1]: the smallest rank keeping
      that fraction of the squared singular values of the matrices truncated
      (per mode for `Tucker`; per unfolding for `SpatiallySeparable` and
      `TensorTrain`; for `CP`, of the pooled per-tap SVD start).
    inputs: optional sample of the layer's inputs `[*batch, *spatial, C]`
      (`LowRank` and `Tucker` only). The *output* error on these inputs is
      minimised instead of the weight error, in closed form: whiten with the
      Cholesky factor of the damped covariance of the input patches
      (`LowRank`: the `k*C` patch covariance; `Tucker`: the `C x C` channel
      covariance), truncate, un-whiten.
    iterations: HOOI sweeps (`Tucker`, default 10) or ALS sweeps (`CP`,
      default 100).
    key: PRNG key for the `CP` starts' random fill (default
      `jax.random.key(0)`).
    restarts: number of extra `CP` HOSVD starts with other random fills
      (default 3; the cost grows linearly with it).
    norm_bound: `CP` only: `None` (default) for plain ALS, or a positive
      number `b` for stable, norm-constrained ALS, whose result has
      `cp_degeneracy(result, kernel) <= b` (it bounds the root-sum-square of
      the rank-1 terms' norms, relative to `||K||`). Fits whose terms are
      orthogonal are unaffected by `b >= 1`; `b = 2` is a good start (the
      decomposition guide has measurements).
    damping: ridge added to the input covariance, relative to its mean
      eigenvalue.
    dilation: the layer's kernel dilation, for the patches of `inputs`.
    compute_dtype: dtype of the computation; default: the kernel's (float32
      for lower-precision kernels). float64 requires `jax_enable_x64`.
    in_modes: `TensorTrain` only: the input channels as `(c_1, ..., c_d)`,
      product `C`. Default: `C` split as evenly as its prime factors allow
      into as many modes as `out_modes` or a tuple `rank` has, else 2.
    out_modes: `TensorTrain` only: `(f_1, ..., f_d)`, product `F`; the same
      default.
    feature_group_count: `G` for the kernel of a grouped convolution
      (Flax's `nn.Conv(feature_group_count=G)`, `kernel [*window, C/G, F]`):
      each group's `[*window, C/G, F/G]` kernel is decomposed on its own, at
      the same rank (with `energy` or "vbmf", the largest any group needs),
      into a `jaxfactor.Grouped`. Not with `inputs`.

  Returns:
    A format of the kernel's dtype, `to_dense()` of shape `kernel.shape`
    (a `Grouped` one when `feature_group_count > 1`).

  Raises:
    ValueError: non-finite kernel or `inputs` values, or a singular input
      covariance (with `damping=0`), checked when they are concrete: under
      `jit` each gives NaN factors instead; a rank out of range
      (the message names `max_rank`), both or neither of `rank` and `energy`,
      `energy` outside (0, 1], `inputs` of the wrong shape, a kernel of the
      wrong rank, a `norm_bound` that is not positive or not for `CP`.
    TypeError: non-array or non-floating arguments, a `norm_bound` that is
      not a number.

  >>> import jax
  >>> import jaxfactor
  >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 64, 64))
  >>> f = jaxfactor.decompose(kernel, "tucker", rank=(16, 16))
  >>> f.core.shape
  (3, 3, 16, 16)
  """
  fn = "decompose"
  options = dict(
    iterations=iterations,
    key=key,
    restarts=restarts,
    norm_bound=norm_bound,
    compute_dtype=compute_dtype,
    in_modes=in_modes,
    out_modes=out_modes,
  )
  groups = _validation.check_positive_int(
    fn, "feature_group_count", feature_group_count
  )
  if groups == 1:
    return _decompose(
      fn,
      kernel,
      format,
      rank=rank,
      energy=energy,
      inputs=inputs,
      damping=damping,
      dilation=dilation,
      **options,
    )
  if inputs is not None:
    raise ValueError(
      f"{fn}: data-aware decomposition (`inputs`) of a grouped kernel"
      f" (feature_group_count={groups}) is not supported; decompose it"
      " without `inputs`."
    )
  stack = _split_groups(fn, kernel, groups)
  value_based = energy is not None or (isinstance(rank, str) and rank == "vbmf")
  if value_based:
    # Each group's rank from its values (eagerly), then the largest.
    ranks = [
      _ranks.rank_of(
        _decompose(fn, group, format, rank=rank, energy=energy, **options)
      )
      for group in stack
    ]
    rank = jax.tree.map(lambda *r: max(r), *ranks)
  inner = jax.vmap(
    lambda group: _decompose(fn, group, format, rank=rank, **options)
  )(stack)
  return formats.Grouped(inner)


def _split_groups(fn: str, kernel: Any, groups: int) -> jax.Array:
  """A grouped kernel `[*window, C/G, F]` as `[G, *window, C/G, F/G]`."""
  _validation.check_array(fn, "kernel", kernel)
  _validation.check_floating(fn, "kernel", kernel)
  kernel = jnp.asarray(kernel)
  if kernel.ndim < 3 or kernel.shape[-1] % groups:
    raise ValueError(
      f"{fn}: a grouped `kernel` must have shape [*window, C/G, F] with F a"
      f" multiple of feature_group_count={groups}, got shape"
      f" {tuple(kernel.shape)}."
    )
  _reject_non_finite(fn, kernel)
  *window, c, f = kernel.shape
  split = kernel.reshape(*window, c, groups, f // groups)
  return jnp.moveaxis(split, -2, 0)


def _reject_non_finite(fn: str, kernel: jax.Array) -> bool:
  """Raises on a concrete kernel with NaN or inf; returns whether the kernel
  is concrete (under `jit` it is not, and gives NaN factors instead)."""
  concrete = not isinstance(kernel, jax.core.Tracer)
  if concrete and not bool(jnp.all(jnp.isfinite(kernel))):
    raise ValueError(
      f"{fn}: `kernel` (shape {tuple(kernel.shape)}) has non-finite values"
      " (NaN or inf)."
    )
  return concrete


def _decompose(
  fn,
  kernel,
  format,
  *,
  rank,
  energy=None,
  inputs=None,
  iterations,
  key,
  restarts,
  norm_bound=None,
  damping=1e-3,
  dilation=1,
  compute_dtype,
  in_modes=None,
  out_modes=None,
):
  """`decompose` of one (ungrouped) kernel."""
  p = _prepare(fn, kernel, format, inputs, damping, dilation, compute_dtype)
  cls, kernel, work, whitening = p.cls, p.kernel, p.work, p.whitening
  concrete, finite, scale = p.concrete, p.finite, p.scale
  modes = _ranks.check_modes(fn, kernel.shape, cls, rank, in_modes, out_modes)
  rank = _select_rank(fn, work, cls, rank, energy, whitening, concrete, modes)
  if iterations is None:
    iterations = DEFAULT_ITERATIONS.get(cls, 0)
  if (
    isinstance(iterations, bool)
    or not isinstance(iterations, int)
    or (iterations < 0)
  ):
    raise ValueError(
      f"{fn}: `iterations` must be a non-negative int, got {iterations!r}."
    )
  if norm_bound is not None:
    _check_norm_bound(fn, cls, norm_bound)
  if cls is formats.LowRank:
    result = _low_rank(work, rank, whitening)
  elif cls is formats.SpatiallySeparable:
    result = _spatially_separable(work, rank)
  elif cls is formats.DepthwiseSeparable:
    result = _depthwise_separable(work, rank)
  elif cls is formats.Tucker:
    result = _tucker(work, rank, iterations, whitening)
  elif cls is formats.TensorTrain:
    result = _tensor_train(work, rank, modes)
  else:
    if (
      isinstance(restarts, bool)
      or not isinstance(restarts, int)
      or (restarts < 0)
    ):
      raise ValueError(
        f"{fn}: `restarts` must be a non-negative int, got {restarts!r}."
      )
    if key is None:
      key = jax.random.key(0)
    _validation.check_key(fn, key)
    _warn_if_long(fn, tuple(kernel.shape), rank, iterations, restarts + 2)
    result = _cp(work, rank, iterations, key, restarts, norm_bound)
  share = scale ** (1 / len(jax.tree.leaves(result)))

  def restore(a):
    a = a * share
    if not concrete:
      a = jnp.where(finite, a, jnp.full_like(a, jnp.nan))
    return a.astype(kernel.dtype)

  return jax.tree.map(restore, result)


class _Prepared(NamedTuple):
  cls: Any
  kernel: jax.Array
  work: jax.Array
  scale: jax.Array
  finite: jax.Array
  whitening: jax.Array | None
  concrete: bool


def _prepare(
  fn, kernel, format, inputs, damping, dilation, compute_dtype
) -> _Prepared:
  """Checks the arguments; the kernel as the algorithms see it."""
  cls = _ranks.format_class(fn, format)
  _validation.check_array(fn, "kernel", kernel)
  _validation.check_floating(fn, "kernel", kernel)
  kernel = jnp.asarray(kernel)
  _ranks.check_kernel_shape(fn, kernel.shape, cls)
  concrete = _reject_non_finite(fn, kernel)
  dtype = _compute_dtype(fn, kernel.dtype, compute_dtype)
  work = kernel.astype(dtype)
  # Under jit a non-finite kernel gives NaN factors: the algorithms run on
  # zeros instead (LAPACK's SVD does not return on an inf).
  finite = jnp.all(jnp.isfinite(work))
  if not concrete:
    work = jnp.where(finite, work, jnp.zeros_like(work))
  # Every algorithm is scale-equivariant: run it on the kernel scaled to
  # max |K| = 1 (ALS loses the fit for float32 kernels far from 1), then
  # give each factor an equal share of the scale.
  scale = jnp.max(jnp.abs(work))
  scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  work = work / scale
  whitening = None
  if inputs is not None:
    whitening = _whitening(
      fn, cls, inputs, kernel.shape, damping, dtype, dilation, concrete
    )
    if not concrete:
      finite = finite & jnp.all(jnp.isfinite(whitening))
      whitening = jnp.where(
        finite, whitening, jnp.eye(whitening.shape[0], dtype=dtype)
      )
  return _Prepared(cls, kernel, work, scale, finite, whitening, concrete)


def choose_rank(
  kernel: jax.typing.ArrayLike,
  format: Any,
  *,
  rank: Any = None,
  energy: float | None = None,
  inputs: jax.typing.ArrayLike | None = None,
  damping: float = 1e-3,
  dilation: int | tuple[int, ...] = 1,
  in_modes: tuple[int, ...] | None = None,
  out_modes: tuple[int, ...] | None = None,
) -> Any:
  """The static rank `decompose` would use for these arguments."""
  fn = "decompose"
  p = _prepare(fn, kernel, format, inputs, damping, dilation, None)
  modes = _ranks.check_modes(
    fn, p.kernel.shape, p.cls, rank, in_modes, out_modes
  )
  return _select_rank(
    fn, p.work, p.cls, rank, energy, p.whitening, p.concrete, modes
  )


# --- arguments ---------------------------------------------------------------


def _compute_dtype(fn, kernel_dtype, compute_dtype):
  if compute_dtype is None:
    if jnp.finfo(kernel_dtype).bits < 32:
      return jnp.dtype(jnp.float32)  # LAPACK has no 16-bit SVD
    return jnp.dtype(kernel_dtype)
  compute_dtype = jnp.dtype(compute_dtype)
  if compute_dtype not in (jnp.float32, jnp.float64):
    raise ValueError(
      f"{fn}: `compute_dtype` must be float32 or float64, got {compute_dtype}."
    )
  if (
    compute_dtype == jnp.float64
    and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64
  ):
    raise ValueError(
      f"{fn}: `compute_dtype`=float64 needs 64-bit mode: set"
      " jax.config.update('jax_enable_x64', True) first."
    )
  return compute_dtype


def _check_norm_bound(fn, cls, norm_bound):
  if cls is not formats.CP:
    raise ValueError(
      f"{fn}: `norm_bound` (norm-constrained ALS) is for CP, not"
      f" {cls.__name__}; pass norm_bound=None."
    )
  if isinstance(norm_bound, bool) or not isinstance(
    norm_bound, (int, float, np.floating, np.integer)
  ):
    raise TypeError(
      f"{fn}: `norm_bound` must be a number or None, got"
      f" {type(norm_bound).__name__}."
    )
  if not 0 < norm_bound < math.inf:
    raise ValueError(
      f"{fn}: `norm_bound` must be a positive finite number (the bound on the"
      f" CP components' norms relative to the kernel's), got {norm_bound!r}."
    )


def _select_rank(
  fn, kernel, cls, rank, energy, whitening, concrete, modes=None
):
  if (rank is None) == (energy is None):
    raise ValueError(
      f"{fn}: give exactly one of `rank` and `energy`, got rank={rank!r},"
      f" energy={energy!r}."
    )
  shape = tuple(kernel.shape)
  if energy is not None:
    if (
      isinstance(energy, bool)
      or not isinstance(energy, (int, float, np.floating))
      or not 0 < energy <= 1
    ):
      raise ValueError(
        f"{fn}: `energy` must be a number in (0, 1], got {energy!r}."
      )
    mode = "energy"
  elif isinstance(rank, str):
    _ranks.check_rank_type(fn, rank, allow_vbmf=True)
    mode = "vbmf"
  else:
    return _warn_if_larger(
      fn, shape, cls, _ranks.resolve_rank(fn, cls, shape, rank, modes), modes
    )
  if not concrete:
    raise ValueError(
      f"{fn}: {mode} rank selection reads the kernel's values to choose a"
      " shape, which is impossible under jit/vmap; choose the rank eagerly"
      " (or pass an int rank)."
    )
  values = spectra(cls, np.asarray(kernel, np.float64), whitening, modes)
  limit = _ranks.limits(shape, cls, modes)
  if mode == "energy":
    chosen = [
      _ranks.rank_for_energy(_ranks.energy_curve(s), energy) for s, _ in values
    ]
  else:
    chosen = [rule(matrices) for _, (rule, matrices) in values]
  if isinstance(limit, tuple):
    clipped = [min(r, m) for r, m in zip(chosen, limit)]
    if cls in _CLIPPED_BY_CHAIN:
      # Factor i maps R_{i-1} channels through k_i taps (SpatiallySeparable)
      # or core i through c_i f_i modes (TensorTrain): R_i <= R_{i-1} k_i.
      sizes = (
        shape if cls is formats.SpatiallySeparable else (0, *_sizes(modes))
      )
      for i in range(1, len(clipped)):
        clipped[i] = min(clipped[i], clipped[i - 1] * sizes[i])
    return _warn_if_larger(fn, shape, cls, tuple(clipped), modes)
  return _warn_if_larger(fn, shape, cls, min(chosen[0], limit))


def _sizes(modes):
  """`(c_1 f_1, ..., c_d f_d)` of TensorTrain modes."""
  return tuple(a * b for a, b in zip(*modes))


def _warn_if_larger(fn, shape, cls, rank, modes=None):
  params = _ranks.num_params(shape, cls, rank, modes)
  if params > math.prod(shape):
    _validation.warn(
      f"{fn}: {cls.__name__} of rank {rank} has {params} parameters, more"
      f" than the dense kernel's {math.prod(shape)} (shape {shape}): the"
      " factorization is larger than what it replaces."
    )
  return rank


# Above this many estimated FLOPs (minutes on a laptop CPU) a CP
# decomposition warns before it starts.
CP_WARN_FLOPS = 1e11


def _cp_flops(shape, rank, iterations, starts) -> float:
  """ALS work: per sweep and mode, an MTTKRP and a rank x rank pseudo-inverse
  (~10 rank^3), for every start."""
  per_mode = 2 * math.prod(shape) * rank + 10 * rank**3
  return float(starts * iterations * len(shape) * per_mode)


def _warn_if_long(fn, shape, rank, iterations, starts):
  flops = _cp_flops(shape, rank, iterations, starts)
  if flops > CP_WARN_FLOPS:
    largest = max(shape)
    why = (
      f"; the rank exceeds the kernel's largest mode ({largest}), where"
      " ALS converges slowly"
      if rank > largest
      else ""
    )
    _validation.warn(
      f"{fn}: CP of rank {rank} for a kernel of shape {shape} is a long"
      f" decomposition: ~{flops:.1e} FLOPs ({iterations} ALS sweeps from"
      f" {starts} starts){why}. Lower `rank`, `iterations` or `restarts`.",
      RuntimeWarning,
    )


def spectra(cls, kernel, whitening, modes=None):
  """Per truncated matrix: its singular values and its VBMF rule."""
  *window, c, f = kernel.shape
  k = math.prod(window)

  def single(matrix):
    return (np.linalg.svd(matrix, compute_uv=False), (_ranks.vbmf_rank, matrix))

  if cls is formats.TensorTrain:
    modes = _ranks.tt_modes(kernel.shape, _ranks.DEFAULT_TT_CORES, modes)
    train = _train_tensor(kernel, modes)
    return [
      single(train.reshape(k * math.prod(_sizes(modes)[:i]), -1))
      for i in range(len(modes[0]))
    ]

  if cls is formats.LowRank:
    matrix = kernel.reshape(k * c, f)
    if whitening is not None:
      matrix = np.asarray(whitening, np.float64).T @ matrix
    return [single(matrix)]
  if cls is formats.Tucker:
    if whitening is not None:
      kernel = np.einsum(
        "...cf,cd->...df", kernel, np.asarray(whitening, np.float64)
      )
    by_in = np.moveaxis(kernel, -2, 0).reshape(c, -1)
    by_out = np.moveaxis(kernel, -1, 0).reshape(f, -1)
    return [single(by_in), single(by_out)]
  if cls is formats.SpatiallySeparable:
    tensor = np.moveaxis(kernel, -2, 0)  # [C, *window, F]
    return [
      single(tensor.reshape(c * math.prod(window[: i + 1]), -1))
      for i in range(len(window) - 1)
    ]
  per_tap = kernel.reshape(k, c, f)
  if cls is formats.DepthwiseSeparable:
    slices = np.moveaxis(kernel.reshape(k, c, f), 1, 0)  # [C, k, F]
    values = np.linalg.svd(slices, compute_uv=False)  # [C, min(k, F)]
    return [(values, (lambda ms: max(_ranks.vbmf_rank(m) for m in ms), slices))]
  # CP: the per-tap spectra, pooled, as the SVD-based start pools them.
  values = np.linalg.svd(per_tap, compute_uv=False).ravel()
  return [(values, (lambda ms: sum(_ranks.vbmf_rank(m) for m in ms), per_tap))]


def _whitening(
  fn, cls, inputs, kernel_shape, damping, dtype, dilation, concrete
):
  """Lower Cholesky factor `L` of the damped input covariance, `S = L L^T`."""
  if cls not in (formats.LowRank, formats.Tucker):
    raise ValueError(
      f"{fn}: `inputs` (data-aware decomposition) is supported for LowRank"
      f" and Tucker, not {cls.__name__}."
    )
  _validation.check_array(fn, "inputs", inputs)
  _validation.check_floating(fn, "inputs", inputs)
  *window, c, _ = kernel_shape
  n = len(window)
  dilation = _validation.canonicalize_positive_ints(fn, "dilation", dilation, n)
  dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
  if (
    inputs.ndim < n + 1
    or inputs.shape[-1] != c
    or any(size < k for size, k in zip(inputs.shape[-n - 1 : -1], dilated))
  ):
    raise ValueError(
      f"{fn}: `inputs` must have shape [*batch, *spatial, C] with C = {c},"
      f" {n} spatial axes and each spatial size >= the dilated window"
      f" {dilated}, got shape {tuple(inputs.shape)}."
    )
  if not (isinstance(damping, (int, float)) and damping >= 0):
    raise ValueError(f"{fn}: `damping` must be >= 0, got {damping!r}.")
  x = jnp.asarray(inputs).astype(dtype)
  eager = concrete and not isinstance(x, jax.core.Tracer)
  if eager and not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError(
      f"{fn}: `inputs` (shape {tuple(inputs.shape)}) has non-finite values"
      " (NaN or inf)."
    )
  x = x.reshape((-1, *x.shape[-n - 1 :]))
  if cls is formats.Tucker:
    rows = x.reshape(-1, c)
  else:
    rows = _patches(x, tuple(window), dilation)
  cov = jnp.matmul(rows.T, rows, precision=_HIGHEST) / rows.shape[0]
  ridge = damping * jnp.trace(cov) / cov.shape[0]
  ridge = jnp.maximum(ridge, jnp.finfo(dtype).tiny)
  factor = jnp.linalg.cholesky(cov + ridge * jnp.eye(cov.shape[0], dtype=dtype))
  if damping == 0:
    # Undamped, a (numerically) singular covariance can still factor, with
    # a vanishing pivot, and whitening then blows the factors up: treated as
    # no factor at all.
    pivots = jnp.diagonal(factor)
    tiny = jnp.sqrt(jnp.finfo(dtype).eps) * jnp.max(pivots)
    factor = jnp.where(jnp.min(pivots) > tiny, factor, jnp.nan)
  if eager and not bool(jnp.all(jnp.isfinite(factor))):
    raise ValueError(
      f"{fn}: the covariance of `inputs` ({cov.shape[0]} x {cov.shape[0]},"
      f" from {rows.shape[0]} samples) is singular: with damping={damping}"
      " it has no Cholesky factor. Pass `damping` > 0 (e.g. the default"
      " 1e-3) or more samples."
    )
  return factor


def _patches(x, window, dilation):
  """Stride-1 "VALID" patches of `x [B, *spatial, C]`, `[P, k*C]`.

  Column `w*C + c` matches row `w*C + c` of `kernel.reshape(k*C, F)`.
  """
  spatial = x.shape[1:-1]
  out = [s - (k - 1) * d for s, k, d in zip(spatial, window, dilation)]
  taps = []
  for offset in np.ndindex(*window):
    index = tuple(
      slice(o * d, o * d + m) for o, d, m in zip(offset, dilation, out)
    )
    taps.append(x[(slice(None), *index, slice(None))])
  stacked = jnp.stack(taps, axis=-2)  # [B, *out, k, C]
  return stacked.reshape(-1, math.prod(window) * x.shape[-1])


# --- algorithms --------------------------------------------------------------


def _truncated_svd(matrix, rank):
  u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
  return u[..., :rank], s[..., :rank], vt[..., :rank, :]


def _leading_left_vectors(matrix, rank):
  """The `rank` leading left singular vectors, even if `rank > columns`."""
  full = matrix.shape[-2] > matrix.shape[-1]
  u, _, _ = jnp.linalg.svd(matrix, full_matrices=full)
  return u[..., :rank]


def _low_rank(kernel, rank, whitening):
  *window, c, f = kernel.shape
  matrix = kernel.reshape(-1, f)
  if whitening is not None:
    matrix = jnp.matmul(whitening.T, matrix, precision=_HIGHEST)
  u, s, vt = _truncated_svd(matrix, rank)
  root = jnp.sqrt(s)
  left = u * root[None, :]
  if whitening is not None:
    left = solve_triangular(whitening.T, left, lower=False)
  return formats.LowRank(left.reshape(*window, c, rank), root[:, None] * vt)


def _depthwise_separable(kernel, multiplier):
  *window, c, f = kernel.shape
  k = math.prod(window)
  slices = jnp.moveaxis(kernel.reshape(k, c, f), 1, 0)  # [C, k, F]
  u, s, vt = _truncated_svd(slices, multiplier)  # [C,k,m], [C,m], [C,m,F]
  root = jnp.sqrt(s)
  depthwise = jnp.moveaxis(u * root[:, None, :], 0, 1)  # [k, C, m]
  pointwise = root[..., None] * vt  # [C, m, F]
  return formats.DepthwiseSeparable(
    depthwise.reshape(*window, 1, c * multiplier),
    pointwise.reshape(c * multiplier, f),
    channel_multiplier=multiplier,
  )


def _spatially_separable(kernel, ranks):
  *window, c, f = kernel.shape
  rest = jnp.moveaxis(kernel, -2, 0)  # [C, *window, F]
  factors, r_prev = [], c
  for i, (k, r) in enumerate(zip(window[:-1], ranks)):
    u, s, vt = _truncated_svd(rest.reshape(r_prev * k, -1), r)
    if i == len(ranks) - 1:  # the last split: balance the two last factors
      root = jnp.sqrt(s)
      u, rest = u * root[None, :], root[:, None] * vt
    else:
      rest = s[:, None] * vt
    factors.append(jnp.moveaxis(u.reshape(r_prev, k, r), 1, 0))
    r_prev = r
  factors.append(jnp.moveaxis(rest.reshape(r_prev, window[-1], f), 1, 0))
  return formats.SpatiallySeparable(tuple(factors))


def _train_tensor(kernel, modes):
  """`[*window, C, F]` -> `[k, c_1, f_1, ..., c_d, f_d]` (numpy or jax)."""
  in_modes, out_modes = modes
  d = len(in_modes)
  k = math.prod(kernel.shape[:-2])
  tensor = kernel.reshape(k, *in_modes, *out_modes)
  pairs = [axis for i in range(d) for axis in (1 + i, 1 + d + i)]
  return tensor.transpose(0, *pairs)


def _tensor_train(kernel, ranks, modes):
  """TT-SVD, left to right; the last two cores share the last singular
  values' square roots (the others are orthonormal)."""
  *window, _, _ = kernel.shape
  k = math.prod(window)
  sizes = _sizes(modes)
  chain = (*ranks, 1)
  u, s, vt = _truncated_svd(
    _train_tensor(kernel, modes).reshape(k, -1), chain[0]
  )
  spatial, rest = u, s[:, None] * vt
  if len(ranks) == 1:
    root = jnp.sqrt(s)
    spatial, rest = u * root[None, :], root[:, None] * vt
  cores = []
  for i in range(len(ranks) - 1):
    u, s, vt = _truncated_svd(
      rest.reshape(chain[i] * sizes[i], -1), chain[i + 1]
    )
    if i == len(ranks) - 2:
      root = jnp.sqrt(s)
      u, rest = u * root[None, :], root[:, None] * vt
    else:
      rest = s[:, None] * vt
    cores.append(u)
  cores.append(rest)
  return formats.TensorTrain(
    spatial.reshape(*window, chain[0]),
    tuple(
      core.reshape(chain[i], a, b, chain[i + 1])
      for i, (core, a, b) in enumerate(zip(cores, *modes))
    ),
  )


def _tucker(kernel, ranks, iterations, whitening):
  *window, c, f = kernel.shape
  r_in, r_out = ranks
  if whitening is not None:
    kernel = jnp.einsum(
      "...cf,cd->...df", kernel, whitening, precision=_HIGHEST
    )

  def in_basis(v):  # top R_in left vectors of the C-unfolding of K x_F V^T
    projected = jnp.einsum("...cf,fb->c...b", kernel, v, precision=_HIGHEST)
    return _leading_left_vectors(projected.reshape(c, -1), r_in)

  def out_basis(u):
    projected = jnp.einsum("...cf,ca->f...a", kernel, u, precision=_HIGHEST)
    return _leading_left_vectors(projected.reshape(f, -1), r_out)

  # HOSVD: each basis from the unprojected unfolding.
  u = _leading_left_vectors(jnp.moveaxis(kernel, -2, 0).reshape(c, -1), r_in)
  v = _leading_left_vectors(jnp.moveaxis(kernel, -1, 0).reshape(f, -1), r_out)

  def sweep(_, bases):
    u, v = bases
    u = in_basis(v)
    return u, out_basis(u)

  u, v = lax.fori_loop(0, iterations, sweep, (u, v))
  core = jnp.einsum("ca,...cf,fb->...ab", u, kernel, v, precision=_HIGHEST)
  if whitening is not None:
    u = solve_triangular(whitening.T, u, lower=False)
  return formats.Tucker(u, core, v.T)


def _cp_reconstruct(weights, factors, letters):
  operands = []
  for factor, letter in zip(factors, letters):
    operands += [factor, [letter, "z"]]
  return jnp.einsum(weights, ["z"], *operands, letters, precision=_HIGHEST)


def _cp_tap_svd_start(kernel, rank):
  """Top-`rank` rank-1 terms of the per-tap SVDs: exact at `k*min(C, F)`."""
  *window, c, f = kernel.shape
  k = math.prod(window)
  u, s, vt = jnp.linalg.svd(kernel.reshape(k, c, f), full_matrices=False)
  values, chosen = lax.top_k(s.reshape(-1), rank)
  tap, component = jnp.divmod(chosen, s.shape[1])
  in_factor = u[tap, :, component].T  # [C, R]
  out_factor = vt[tap, component, :].T  # [F, R]
  taps = jnp.unravel_index(tap, tuple(window))
  spatial = [
    jax.nn.one_hot(t, w, dtype=kernel.dtype).T for t, w in zip(taps, window)
  ]
  return values, [*spatial, in_factor, out_factor]


def _cp_hosvd_start(kernel, rank, key):
  """Leading left singular vectors of each unfolding, random beyond them."""
  factors = []
  for mode, size in enumerate(kernel.shape):
    unfolding = jnp.moveaxis(kernel, mode, 0).reshape(size, -1)
    basis = _leading_left_vectors(unfolding, min(rank, size))
    if rank > size:
      # Uniform [0, 1) beyond the basis, as TensorLy's "svd" start fills.
      key, sub = jax.random.split(key)
      extra = jax.random.uniform(sub, (size, rank - size), kernel.dtype)
      basis = jnp.concatenate([basis, extra], axis=1)
    factors.append(basis)
  return jnp.ones((rank,), kernel.dtype), factors


def _component_norms(weights, factors):
  """`|w_r| prod_n ||a_r^(n)||`: the Frobenius norms of the rank-1 terms."""
  norms = jnp.abs(weights)
  for factor in factors:
    norms = norms * jnp.linalg.norm(factor, axis=0)
  return norms


def _bounded_update(mttkrp, gram, bound):
  """The least-squares update of one CP factor under a norm bound.

  Minimises `||X_(n) - A W^T||^2` over the factor `A` (`mttkrp = X_(n) W`,
  `gram = W^T W`) subject to `sum_r lambda_r^2 <= bound^2`, where
  `lambda_r = ||a_r|| sqrt(gram[r, r])` is the norm of rank-1 term `r`. In the
  columns scaled by `sqrt(diag(gram))` this is the trust-region subproblem:
  `A = M (G + mu I)^-1`, with the Tikhonov damping `mu = 0` when the
  unconstrained update is within the bound, else the root of the secular
  equation `||A(mu)|| = bound`. Newton's method on `1 / ||A(mu)||`, which is
  concave and increasing in `mu`, converges to it monotonically from
  `mu = 0` (More and Sorensen 1983).
  """
  diagonal = jnp.diagonal(gram)
  inv_root = jnp.where(
    diagonal > 0, lax.rsqrt(jnp.where(diagonal > 0, diagonal, 1)), 0
  )
  scaled_gram = gram * inv_root[:, None] * inv_root[None, :]
  values, vectors = jnp.linalg.eigh(scaled_gram)
  values = jnp.maximum(values, 0)
  projected = jnp.matmul(
    mttkrp * inv_root[None, :], vectors, precision=_HIGHEST
  )
  energy = jnp.sum(projected**2, axis=0)
  # As `pinv`: directions the other factors leave (numerically) unspanned
  # get no weight at mu = 0.
  cutoff = values.shape[0] * jnp.finfo(values.dtype).eps * jnp.max(values)

  def inverse(mu):
    shifted = values + mu
    kept = shifted > cutoff
    return jnp.where(kept, 1 / jnp.where(kept, shifted, 1), 0)

  def newton(_, mu):
    inv = inverse(mu)
    squared = jnp.sum(energy * inv**2)  # ||A(mu)||^2
    slope = jnp.sum(energy * inv**3)  # -d/dmu ||A(mu)||^2 / 2
    step = squared * (jnp.sqrt(squared) / bound - 1)
    step = jnp.where(slope > 0, step / jnp.where(slope > 0, slope, 1), 0)
    return jnp.maximum(mu + step, 0)

  mu = lax.fori_loop(0, _SECULAR_STEPS, newton, jnp.zeros((), values.dtype))
  solved = jnp.matmul(
    projected * inverse(mu)[None, :], vectors.T, precision=_HIGHEST
  )
  # Newton stops a rounding error short of the bound, on the far side.
  total = jnp.linalg.norm(solved.ravel())
  solved = solved * jnp.minimum(1, bound / jnp.where(total > 0, total, 1))
  return solved * inv_root[None, :]


# Newton steps on the secular equation per bounded update: it converges
# quadratically once near the root, and each step is O(rank) work.
_SECULAR_STEPS = 30


def _cp_als(kernel, weights, factors, iterations, bound=None):
  """ALS sweeps with normalised columns; returns (error, weights, factors).

  With `bound`, each update is `_bounded_update`: the root-sum-square of the
  rank-1 terms' norms stays at most `bound`, and the error never increases.
  """
  letters = string.ascii_lowercase[: kernel.ndim]
  if bound is not None:
    # A feasible start, for `iterations=0`; the first update restores
    # feasibility on its own.
    total = jnp.linalg.norm(_component_norms(weights, factors))
    weights = weights * jnp.minimum(1, bound / jnp.where(total > 0, total, 1))

  def update(mode, state):
    _, factors = state
    operands = [kernel, list(letters)]
    gram = jnp.ones((weights.shape[0],) * 2, kernel.dtype)
    for m, factor in enumerate(factors):
      if m != mode:
        operands += [factor, [letters[m], "z"]]
        gram = gram * jnp.matmul(factor.T, factor, precision=_HIGHEST)
    mttkrp = jnp.einsum(*operands, [letters[mode], "z"], precision=_HIGHEST)
    # The least-squares update of this mode given the others (the weights
    # are absorbed), then its column norms become the weights.
    if bound is None:
      solved = jnp.matmul(
        mttkrp, jnp.linalg.pinv(gram, hermitian=True), precision=_HIGHEST
      )
    else:
      solved = _bounded_update(mttkrp, gram, bound)
    norms = jnp.linalg.norm(solved, axis=0)
    solved = solved / jnp.where(norms > 0, norms, 1)[None, :]
    return norms, [*factors[:mode], solved, *factors[mode + 1 :]]

  def sweep(_, state):
    for mode in range(kernel.ndim):
      state = update(mode, state)
    return state

  weights, factors = lax.fori_loop(0, iterations, sweep, (weights, factors))
  error = jnp.linalg.norm(
    (_cp_reconstruct(weights, factors, letters) - kernel).ravel()
  )
  return error, weights, factors


def _cp(kernel, rank, iterations, key, restarts, norm_bound=None):
  starts = [_cp_tap_svd_start(kernel, rank)]
  # fold_in, not split: start i is the same whatever `restarts` is, so more
  # restarts can only improve the fit.
  for i in range(1 + restarts):
    starts.append(_cp_hosvd_start(kernel, rank, jax.random.fold_in(key, i)))
  weights = jnp.stack([w for w, _ in starts])
  factors = [jnp.stack(fs) for fs in zip(*(f for _, f in starts))]
  bound = None
  if norm_bound is not None:
    bound = norm_bound * jnp.linalg.norm(kernel.ravel())
  errors, weights, factors = jax.vmap(
    lambda w, fs: _cp_als(kernel, w, fs, iterations, bound)
  )(weights, factors)
  best = jnp.argmin(errors)
  weights = weights[best]
  factors = [f[best] for f in factors]
  # Spread the weights evenly over the factors (balanced for fine-tuning).
  scale = (weights ** (1 / len(factors)))[None, :]
  factors = [f * scale for f in factors]
  *spatial, in_factor, out_factor = factors
  return formats.CP(in_factor, tuple(spatial), out_factor.T)
