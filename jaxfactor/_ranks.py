"""Ranks: their limits, the parameters they cost, and choosing them.

A format's rank fixes the shapes of its factors, so it is static under
`jax.jit`. The selection rules that look at the kernel's *values* (`energy`,
`"vbmf"`) run on the host, in numpy float64, on concrete kernels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxfactor import _formats as formats

FORMAT_NAMES: dict[str, type[formats.Format]] = {
  "depthwise_separable": formats.DepthwiseSeparable,
  "spatially_separable": formats.SpatiallySeparable,
  "low_rank": formats.LowRank,
  "tucker": formats.Tucker,
  "cp": formats.CP,
  "tensor_train": formats.TensorTrain,
}

Rank = int | tuple[int, ...]
# Channel modes of a TensorTrain: `(in_modes, out_modes)`.
Modes = tuple[tuple[int, ...], tuple[int, ...]]

# Cores of a TensorTrain when neither its rank nor its modes say.
DEFAULT_TT_CORES = 2


@dataclasses.dataclass(frozen=True)
class Budget:
  """A target size for a whole model: a fraction of its dense cost.

  Exactly one of the three is given, as a fraction in (0, 1] of the dense
  layers' total.

  Attributes:
    flops: fraction of their FLOPs (`jaxfactor.cost` of what runs).
    params: fraction of their parameters.
    latency: fraction of their estimated time: seconds by the roofline
      model `implementation="auto"` uses, for JAX's default backend (the
      forward pass of each layer on its recorded input; an estimate, not a
      measurement).

  >>> import jaxfactor
  >>> jaxfactor.Budget(flops=0.4)
  Budget(flops=0.4, params=None, latency=None)
  """

  flops: float | None = None
  params: float | None = None
  latency: float | None = None

  def __post_init__(self):
    values = {
      "flops": self.flops,
      "params": self.params,
      "latency": self.latency,
    }
    given = [name for name, v in values.items() if v is not None]
    if len(given) != 1:
      raise ValueError(
        "Budget: give exactly one of `flops`, `params` and `latency`, got"
        f" {', '.join(f'{n}={values[n]!r}' for n in given) or 'none'}."
      )
    (name,) = given
    value = values[name]
    if (
      isinstance(value, bool)
      or not isinstance(value, (int, float))
      or not 0 < value <= 1
    ):
      raise ValueError(
        f"Budget: `{name}` must be a fraction in (0, 1] of the dense total,"
        f" got {value!r}."
      )


def format_class(fn: str, format: Any) -> type[formats.Format]:
  """A format class from a class or its snake_case name."""
  if isinstance(format, str) and format in FORMAT_NAMES:
    return FORMAT_NAMES[format]
  if (
    isinstance(format, type)
    and issubclass(format, formats.Format)
    and (format in FORMAT_NAMES.values())
  ):
    return format
  raise ValueError(
    f"{fn}: `format` must be one of {tuple(FORMAT_NAMES)} or the matching"
    f" class, got {format!r}."
  )


def check_kernel_shape(fn: str, kernel_shape: Sequence[int], cls) -> None:
  if len(kernel_shape) < 3 or any(d < 1 for d in kernel_shape):
    raise ValueError(
      f"{fn}: the kernel must have shape [*window, C, F] with at least one"
      f" spatial axis and no empty axis, got shape {tuple(kernel_shape)}."
    )
  if cls is formats.SpatiallySeparable and len(kernel_shape) < 4:
    raise ValueError(
      f"{fn}: SpatiallySeparable needs at least 2 spatial axes to separate;"
      f" a 1-D kernel (shape {tuple(kernel_shape)}) is already one 1-D"
      " convolution."
    )


def max_rank(kernel_shape: Sequence[int], format: Any) -> Rank:
  """The largest rank of `format` for a dense kernel of `kernel_shape`.

  At this rank `decompose` reconstructs the kernel exactly.

  * `LowRank`: `min(k*C, F)`, the rank of the `(k*C) x F` filter matrix.
  * `DepthwiseSeparable` (channel multiplier): `min(k, F)`.
  * `SpatiallySeparable`: one inner rank per split, `R_i = min(C * k_1 ...
    k_i, k_{i+1} ... k_N * F)` (the ranks of the kernel's unfoldings).
  * `Tucker`: `(min(C, k*F), min(F, k*C))`.
  * `CP`: `k * min(C, F)`: one rank-1 term per tap and singular value.
  * `TensorTrain` (two cores, default modes): one TT rank per bond, `R_i =
    min(k n_1 ... n_i, n_{i+1} ... n_d)` for `n_i = c_i f_i` (the ranks of
    the unfoldings of the train's tensor `[w, (c_1 f_1), ..., (c_d f_d)]`).

  Args:
    kernel_shape: `(*window, C, F)`.
    format: a format class or its name ("low_rank", "tucker", ...).

  Returns:
    An int, or a tuple for `Tucker`, `SpatiallySeparable` and
    `TensorTrain`.

  >>> import jaxfactor
  >>> jaxfactor.max_rank((3, 3, 64, 128), "tucker")
  (64, 128)
  """
  fn = "max_rank"
  cls = format_class(fn, format)
  kernel_shape = tuple(int(d) for d in kernel_shape)
  check_kernel_shape(fn, kernel_shape, cls)
  return limits(kernel_shape, cls)


def tt_modes(
  kernel_shape: Sequence[int], d: int, modes: Modes | None = None
) -> Modes:
  """The given TT modes, or each channel count's default split in `d`."""
  if modes is not None:
    return modes
  c, f = kernel_shape[-2:]
  return formats.tt_modes(c, d), formats.tt_modes(f, d)


def limits(kernel_shape, cls, modes: Modes | None = None) -> Rank:
  """`max_rank` (no checks), for a TensorTrain with these modes."""
  *window, c, f = kernel_shape
  k = math.prod(window)
  if cls is formats.TensorTrain:
    in_modes, out_modes = tt_modes(kernel_shape, DEFAULT_TT_CORES, modes)
    sizes = [a * b for a, b in zip(in_modes, out_modes)]
    return tuple(
      min(k * math.prod(sizes[:i]), math.prod(sizes[i:]))
      for i in range(len(sizes))
    )
  if cls is formats.LowRank:
    return min(k * c, f)
  if cls is formats.DepthwiseSeparable:
    return min(k, f)
  if cls is formats.Tucker:
    return (min(c, k * f), min(f, k * c))
  if cls is formats.CP:
    return k * min(c, f)
  return tuple(
    min(c * math.prod(window[: i + 1]), math.prod(window[i + 1 :]) * f)
    for i in range(len(window) - 1)
  )


def num_params(
  kernel_shape: Sequence[int], cls, rank: Any, modes: Modes | None = None
) -> int:
  """Parameters of `cls` at `rank` for a kernel of `kernel_shape`."""
  *window, c, f = kernel_shape
  k = math.prod(window)
  if cls is formats.TensorTrain:
    in_modes, out_modes = tt_modes(kernel_shape, len(rank), modes)
    chain = (*rank, 1)
    return k * rank[0] + sum(
      chain[i] * a * b * chain[i + 1]
      for i, (a, b) in enumerate(zip(in_modes, out_modes))
    )
  if cls is formats.LowRank:
    return k * c * rank + rank * f
  if cls is formats.DepthwiseSeparable:
    return k * c * rank + c * rank * f
  if cls is formats.Tucker:
    a, b = rank
    return c * a + k * a * b + b * f
  if cls is formats.CP:
    return (c + sum(window) + f) * rank
  chain = (c, *rank, f)
  return sum(w * chain[i] * chain[i + 1] for i, w in enumerate(window))


def rank_of(factors: formats.Format) -> Rank:
  """The rank of a format value, as `max_rank` and `decompose` take it (for
  a `Grouped` one, its groups' common rank)."""
  if isinstance(factors, formats.Grouped):
    factors = factors._group()
  if isinstance(factors, formats.DepthwiseSeparable):
    return factors.channel_multiplier
  if isinstance(
    factors, (formats.Tucker, formats.SpatiallySeparable, formats.TensorTrain)
  ):
    return factors.ranks
  if isinstance(factors, (formats.LowRank, formats.CP)):
    return factors.rank
  raise TypeError(f"rank_of: not a jaxfactor format: {type(factors).__name__}")


def canonicalize_rank(
  fn: str, kernel_shape, cls, rank: Any, modes: Modes | None = None
) -> Rank:
  """Checks an explicit int/tuple rank against `max_rank`; returns it.

  A TensorTrain has one core per entry of a tuple rank (and per mode given
  in `modes`); an int rank gives every bond that rank, clipped to its limit.
  """
  limit = limits(kernel_shape, cls, modes)
  if cls is formats.TensorTrain:
    if modes is None and isinstance(rank, (tuple, list)) and rank:
      modes = tt_modes(kernel_shape, len(rank))
      limit = limits(kernel_shape, cls, modes)
    if (
      isinstance(rank, (int, np.integer))
      and not isinstance(rank, bool)
      and rank >= 1
      and isinstance(limit, tuple)
    ):
      rank = tuple(min(int(rank), m) for m in limit)
  if isinstance(limit, tuple):
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
      rank = (int(rank),) * len(limit)
    if not (
      isinstance(rank, (tuple, list))
      and len(rank) == len(limit)
      and all(
        isinstance(r, (int, np.integer)) and not isinstance(r, bool)
        for r in rank
      )
    ):
      raise TypeError(
        f"{fn}: `rank` for {cls.__name__} must be an int or a tuple of"
        f" {len(limit)} ints, got {rank!r}."
      )
    rank = tuple(int(r) for r in rank)
    if any(r < 1 for r in rank) or any(r > m for r, m in zip(rank, limit)):
      raise ValueError(
        f"{fn}: `rank` {rank} is out of range for {cls.__name__} and kernel"
        f" shape {tuple(kernel_shape)}: each must be >= 1 and at most"
        f" max_rank = {limit}."
      )
    if cls is formats.SpatiallySeparable:
      # Factor i maps R_{i-1} channels through k_i taps: R_i <= R_{i-1} k_i.
      window = kernel_shape[:-2]
      chain = (kernel_shape[-2], *rank)
      for i in range(1, len(rank)):
        if rank[i] > chain[i] * window[i]:
          raise ValueError(
            f"{fn}: `rank` {rank} does not chain for SpatiallySeparable and"
            f" kernel shape {tuple(kernel_shape)}: rank[{i}] = {rank[i]}"
            f" exceeds rank[{i - 1}] * window[{i}] ="
            f" {chain[i] * window[i]}."
          )
    if cls is formats.TensorTrain:
      # Core i maps R_{i-1} ranks and c_i f_i modes to R_i.
      in_modes, out_modes = tt_modes(kernel_shape, len(rank), modes)
      for i in range(1, len(rank)):
        size = in_modes[i - 1] * out_modes[i - 1]
        if rank[i] > rank[i - 1] * size:
          raise ValueError(
            f"{fn}: `rank` {rank} does not chain for TensorTrain with modes"
            f" {in_modes} x {out_modes}: rank[{i}] = {rank[i]} exceeds"
            f" rank[{i - 1}] * c_{i} * f_{i} = {rank[i - 1] * size}."
          )
    return rank
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise TypeError(
      f"{fn}: `rank` for {cls.__name__} must be an int, got {rank!r}."
    )
  rank = int(rank)
  if not 1 <= rank <= limit:
    raise ValueError(
      f"{fn}: `rank` {rank} is out of range for {cls.__name__} and kernel"
      f" shape {tuple(kernel_shape)}: it must be >= 1 and at most"
      f" max_rank = {limit}."
    )
  return rank


def candidates(kernel_shape, cls, modes: Modes | None = None) -> list[Rank]:
  """Ranks in increasing size, along the path a budget fraction scales.

  Tucker and SpatiallySeparable use one rank `r` for every mode or split,
  each clipped to its maximum: `(min(r, R_in max), min(r, R_out max))`. (A
  path keeping `R_in / R_out = C / F` starves the smaller side: on a 3x3,
  256 -> 16 kernel it reaches (13, 1) where (8, 8) costs less.)
  """
  limit = limits(kernel_shape, cls, modes)
  if isinstance(limit, tuple):
    # For a TensorTrain the clipped ranks chain: R_i <= R_{i-1} c_i f_i.
    return [tuple(min(r, m) for m in limit) for r in range(1, max(limit) + 1)]
  return list(range(1, limit + 1))


def check_modes(
  fn: str, kernel_shape, cls, rank: Any, in_modes: Any, out_modes: Any
) -> Modes | None:
  """The TensorTrain channel modes `decompose` was given, completed.

  None for other formats (which take no modes). A missing side is split by
  default into as many modes as the other side has, or as `rank` has
  entries, or `DEFAULT_TT_CORES`.
  """
  if cls is not formats.TensorTrain:
    if in_modes is not None or out_modes is not None:
      raise ValueError(
        f"{fn}: `in_modes` and `out_modes` are TensorTrain's channel modes;"
        f" {cls.__name__} takes none, got in_modes={in_modes!r},"
        f" out_modes={out_modes!r}."
      )
    return None
  given = [m for m in (in_modes, out_modes) if m is not None]
  for name, value in (("in_modes", in_modes), ("out_modes", out_modes)):
    if value is not None and not (
      isinstance(value, (tuple, list))
      and value
      and all(
        isinstance(m, (int, np.integer)) and not isinstance(m, bool)
        for m in value
      )
    ):
      raise TypeError(
        f"{fn}: `{name}` must be a non-empty tuple of ints, got {value!r}."
      )
  if given:
    d = len(given[0])
  elif isinstance(rank, (tuple, list)) and rank:
    d = len(rank)
  else:
    d = DEFAULT_TT_CORES
  c, f = kernel_shape[-2:]
  modes = []
  for name, value, size in (
    ("in_modes", in_modes, c),
    ("out_modes", out_modes, f),
  ):
    value = formats.tt_modes(size, d) if value is None else tuple(value)
    value = tuple(int(m) for m in value)
    if len(value) != d or any(m < 1 for m in value) or math.prod(value) != size:
      raise ValueError(
        f"{fn}: `{name}` must be {d} positive ints whose product is the"
        f" kernel's {size} {'input' if name == 'in_modes' else 'output'}"
        f" channels (kernel shape {tuple(kernel_shape)}), got {value}."
      )
    modes.append(value)
  return modes[0], modes[1]


def check_rank_type(fn: str, rank: Any, *, allow_vbmf: bool = False) -> None:
  """Rejects a float `rank` (a rank is never a fraction) and other types."""
  if isinstance(rank, (float, np.floating)):
    raise TypeError(
      f"{fn}: `rank`={rank!r} is a float, but a rank is an int (a tuple"
      " for Tucker, SpatiallySeparable and TensorTrain). For a fraction of"
      " the dense kernel's parameters write"
      f" `rank=jaxfactor.Budget(params={rank!r})`."
    )
  if isinstance(rank, str) and not (allow_vbmf and rank == "vbmf"):
    vbmf = " or 'vbmf'" if allow_vbmf else ""
    raise ValueError(
      f"{fn}: `rank` must be an int, a tuple of ints or a"
      f" jaxfactor.Budget(params=...){vbmf}, got {rank!r}."
    )


def resolve_rank(
  fn: str, cls, kernel_shape, rank: Any, modes: Modes | None = None
) -> Rank:
  """A static rank from an int/tuple, or a `Budget(params=f)`: the largest
  rank with at most that fraction of the dense kernel's parameters."""
  check_rank_type(fn, rank)
  if isinstance(rank, Budget):
    if rank.params is None:
      raise ValueError(
        f"{fn}: a `rank` given as a Budget must be Budget(params=...): a"
        " FLOP or latency fraction depends on the input, so use factorize(...,"
        f" budget={rank!r}, inputs=...) for it."
      )
    return rank_for_fraction(fn, kernel_shape, cls, rank.params, modes)
  return canonicalize_rank(fn, kernel_shape, cls, rank, modes)


def rank_for_fraction(
  fn: str, kernel_shape, cls, fraction: float, modes: Modes | None = None
) -> Rank:
  """The largest rank whose parameters are at most `fraction` of dense."""
  budget = fraction * math.prod(kernel_shape)
  fitting = [
    r
    for r in candidates(kernel_shape, cls, modes)
    if num_params(kernel_shape, cls, r, modes) <= budget
  ]
  if not fitting:
    smallest = candidates(kernel_shape, cls, modes)[0]
    raise ValueError(
      f"{fn}: Budget(params={fraction}) leaves no rank: the smallest"
      f" {cls.__name__} (rank {smallest}) has"
      f" {num_params(kernel_shape, cls, smallest, modes)} parameters, more"
      f" than {fraction} of the dense kernel's {math.prod(kernel_shape)}."
    )
  return fitting[-1]


def energy_curve(singular_values: np.ndarray) -> np.ndarray:
  """Fraction of squared singular values kept at rank 1, 2, ... (descending).

  `singular_values` is 1-D for one matrix; for a batch `[B, r]` (e.g.
  depthwise-separable's per-channel slices, truncated to one shared rank) the
  squares are summed over the batch at each rank.
  """
  squares = np.asarray(singular_values, np.float64) ** 2
  squares = np.sort(squares, axis=-1)[..., ::-1]
  if squares.ndim > 1:
    squares = squares.reshape(-1, squares.shape[-1]).sum(axis=0)
  kept = np.cumsum(squares)
  return kept / kept[-1]


def rank_for_energy(curve: np.ndarray, energy: float) -> int:
  """Smallest rank whose kept fraction (see `energy_curve`) is >= `energy`."""
  # A relative slack absorbs rounding when `energy` is exactly reachable.
  return int(np.searchsorted(curve, energy * (1 - 1e-12)) + 1)


# --- Empirical variational Bayesian matrix factorization --------------------


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
  return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_free_energy(sigma2, l, m, s, residual, x_bar):
  h = len(s)
  alpha = l / m
  x = s**2 / (m * sigma2)
  z1, z2 = x[x > x_bar], x[x <= x_bar]
  tau_z1 = _tau(z1, alpha)
  return (
    np.sum(z2 - np.log(z2))
    + np.sum(z1 - tau_z1)
    + np.sum(np.log((tau_z1 + 1) / z1))
    + alpha * np.sum(np.log(tau_z1 / alpha + 1))
    + residual / (m * sigma2)
    + (l - h) * np.log(sigma2)
  )


def _minimize_bounded(f, lo: float, hi: float) -> float:
  """Global-ish 1-D minimum: a log-spaced grid, then golden-section."""
  grid = np.geomspace(lo, hi, 400)
  values = [f(g) for g in grid]
  i = int(np.argmin(values))
  a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
  ratio = (math.sqrt(5) - 1) / 2
  for _ in range(100):
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    if f(c) < f(d):
      b = d
    else:
      a = c
  return (a + b) / 2


def vbmf_rank(matrix: np.ndarray) -> int:
  """Rank kept by analytic empirical VBMF, with the noise variance estimated.

  Global analytic solution of empirical variational Bayesian matrix
  factorization: the noise variance minimises the free energy over its
  analytic bounds, then singular values above the resulting threshold are
  kept. Returns at least 1.

  References:
    Nakajima, Tomioka, Sugiyama, Babacan, 2013, Global analytic solution of
    fully-observed variational Bayesian matrix factorization, JMLR 14.
  """
  y = np.asarray(matrix, np.float64)
  if y.shape[0] > y.shape[1]:
    y = y.T
  l, m = y.shape
  s = np.linalg.svd(y, compute_uv=False)
  if l == 1 or not np.any(s > 0):
    return 1
  alpha = l / m
  tau_bar = 2.5129 * math.sqrt(alpha)
  x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
  residual = 0.0  # all L singular values are used (H = L)
  upper = (np.sum(s**2) + residual) / (l * m)
  bound_index = min(math.ceil(l / (1 + alpha)) - 1, l) - 1
  tail = s[bound_index + 1 :]
  lower = max(
    s[bound_index + 1] ** 2 / (m * x_bar) if bound_index + 1 < l else 0.0,
    np.mean(tail**2) / m if tail.size else 0.0,
  )
  lower = max(lower, upper * 1e-12)
  if lower >= upper:
    sigma2 = upper
  else:
    sigma2 = _minimize_bounded(
      lambda v: _evb_free_energy(v, l, m, s, residual, x_bar), lower, upper
    )
  threshold = math.sqrt(m * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
  return max(1, int(np.sum(s > threshold)))
