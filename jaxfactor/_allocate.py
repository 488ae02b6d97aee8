"""Spreading a model-wide budget over layers: what each rank costs, what it
loses, and the allocation.

Each layer offers candidate ranks, each with a cost (FLOPs, parameters or
estimated seconds) and a penalty, and keeping the layer dense (penalty 0).
The penalty is spectral, `-log(1 - e**2)` for the relative error `e`
estimated from the kernel's spectra, or measured: the increase of a loss on
a calibration batch with that layer alone factorized. The allocation starts
from the uniform split (every layer the same fraction of its dense cost) and
only takes moves that lower the summed penalty within the budget, so it is
never worse than the uniform split on its own objective.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfactor import _cost
from jaxfactor import _decompose
from jaxfactor import _formats as formats
from jaxfactor import _geometry
from jaxfactor import _lowering
from jaxfactor import _ranks
from jaxfactor import _validation

CRITERIA = ("spectral", "loss")
# Ranks measured per layer by the loss criterion: each one is a forward pass
# of the whole model on the calibration batch.
LOSS_CANDIDATES = 12
# Floor of a kept energy fraction, so that a rank keeping nothing has a
# large, finite penalty.
_MIN_KEPT = 1e-12


def check_criterion(
  fn: str, criterion: Any, loss_fn: Any, calibration: Any, budget: Any
) -> None:
  """`criterion` is "spectral" or "loss"; "loss" needs its two arguments and
  a budget, and they mean nothing without it."""
  if criterion not in CRITERIA:
    raise ValueError(
      f"{fn}: `criterion` must be one of {CRITERIA}, got {criterion!r}."
    )
  if criterion == "spectral":
    given = [
      name
      for name, value in (("loss_fn", loss_fn), ("calibration", calibration))
      if value is not None
    ]
    if given:
      raise ValueError(
        f"{fn}: {' and '.join(f'`{name}`' for name in given)} only serve"
        ' criterion="loss"; the criterion is "spectral".'
      )
    return
  if budget is None:
    raise ValueError(
      f'{fn}: criterion="loss" scores the ranks a `budget` chooses from;'
      " give `budget=jaxfactor.Budget(...)`."
    )
  if not callable(loss_fn):
    raise TypeError(
      f'{fn}: criterion="loss" needs `loss_fn`, a callable returning a'
      f" scalar loss, got {type(loss_fn).__name__}."
    )
  if calibration is None:
    raise ValueError(
      f'{fn}: criterion="loss" needs `calibration`, the batch `loss_fn`'
      " is evaluated on."
    )


def spectral_penalty(errors: Sequence[float]) -> list[float]:
  """`-log(1 - e**2)` per relative error `e`: minus the log of the energy
  kept. Summed over layers it is minus the log of the product of the kept
  energies, the fraction of a signal that passes through all of them."""
  return [-math.log(max(1.0 - e * e, _MIN_KEPT)) for e in errors]


def estimated_seconds(
  kernel: Any,
  input_shape: Sequence[int],
  *,
  strides: Any,
  padding: Any,
  dilation: Any,
  implementation: str,
  platform: str | None = None,
) -> float:
  """Roofline time of `conv(x, kernel)` (`_lowering.Machine`) on `platform`.

  Priced like `cost` counts: the implementation `conv` would choose, its
  plan, and for "reconstructed" the `to_dense()` product too.
  """
  fn = "estimated_seconds"
  platform = _validation.check_platform(fn, platform)
  window = tuple(kernel.shape[:-2])
  n = len(window)
  spatial = tuple(input_shape[-n - 1 :])
  geometry = _geometry.resolve(
    fn,
    spatial[:-1],
    window,
    strides=strides,
    padding=padding,
    dilation=dilation,
  )
  shape = (math.prod(input_shape[: -n - 1]), *spatial)
  chosen = _cost.choose_implementation(
    kernel, shape, geometry, implementation, platform
  )
  machine = _lowering.MACHINES[platform]
  plan = _cost.plans(kernel, shape, geometry, platform)[chosen]
  itemsize = jnp.dtype(kernel.dtype).itemsize
  total = _lowering.seconds(plan, shape, geometry, machine, itemsize)
  if chosen == "reconstructed" and isinstance(kernel, formats.Format):
    total += kernel.to_dense_flops() / machine.matmul_flops + machine.overhead
  return total


def subsample(costs: Sequence[float], dense: float, count: int) -> list[int]:
  """Indices of at most `count` candidates cheaper than dense, spread
  evenly in log cost from the cheapest to the dearest (both kept)."""
  cheaper = [i for i, c in enumerate(costs) if c < dense]
  if len(cheaper) <= count:
    return cheaper
  logs = np.log([max(costs[i], 1e-30) for i in cheaper])
  targets = np.linspace(logs[0], logs[-1], count)
  picked = sorted({int(np.argmin(np.abs(logs - t))) for t in targets})
  return [cheaper[i] for i in picked]


def reconstructions(
  cls: type[formats.Format],
  kernel: Any,
  ranks: Sequence[Any],
  decompose: Callable[[Any], formats.Format] | None,
) -> list[Any]:
  """The dense kernel of each rank's factorization.

  With `decompose=None`, `LowRank` and `Tucker` are truncated on the host
  from one SVD per mode (the truncated SVD, and the HOSVD that Tucker's
  HOOI starts from), so each rank costs a matrix product, not a
  decomposition compiled for its shapes. Otherwise, and for the other
  formats, `decompose(rank).to_dense()`.
  """
  if decompose is not None:
    return [np.asarray(decompose(r).to_dense()) for r in ranks]
  k = np.asarray(kernel, np.float64)
  *window, c, f = k.shape
  if cls is formats.LowRank:
    u, s, vt = np.linalg.svd(k.reshape(-1, f), full_matrices=False)
    return [((u[:, :r] * s[:r]) @ vt[:r]).reshape(k.shape) for r in ranks]
  by_in = np.linalg.svd(
    np.moveaxis(k, -2, 0).reshape(c, -1), full_matrices=False
  )[0]
  by_out = np.linalg.svd(
    np.moveaxis(k, -1, 0).reshape(f, -1), full_matrices=False
  )[0]
  out = []
  for a, b in ranks:
    p_in = by_in[:, :a] @ by_in[:, :a].T
    p_out = by_out[:, :b] @ by_out[:, :b].T
    out.append(np.einsum("...cf,cd,fg->...dg", k, p_in, p_out))
  return out


def loss_increases(
  site: Any,
  cls: type[formats.Format],
  ranks: Sequence[Any],
  losses: Callable[[Any, jax.Array], Any],
  decompose: Callable[[Any], formats.Format] | None,
) -> list[float]:
  """The loss increase of each rank, the layer factorized alone.

  Each rank's kernel comes from `reconstructions`. `losses(path, kernels)`
  evaluates the model's loss once per kernel of the
  stack `kernels` `[n, *window, C, F]` put in the layer at `path` (the
  others dense): a vmap over the stack, one compiled call per layer. The
  dense kernel is row 0, so each increase is measured against the same
  compiled computation.
  """
  stack = jnp.stack(
    [jnp.asarray(site.kernel)]
    + [
      jnp.asarray(k, site.kernel.dtype)
      for k in reconstructions(cls, site.kernel, ranks, decompose)
    ]
  )
  values = np.asarray(losses(site.path, stack), np.float64)
  if values.shape != (len(ranks) + 1,):
    raise ValueError(
      "loss_fn must return a scalar loss, got one of shape"
      f" {values.shape[1:]} per kernel."
    )
  if not np.all(np.isfinite(values)):
    raise ValueError(
      f"loss_fn returned a non-finite loss for layer {site.path} at some of"
      f" the ranks {list(ranks)}: {values[1:].tolist()} (dense:"
      f" {values[0]})."
    )
  return [float(v - values[0]) for v in values[1:]]


def _pareto(costs, penalties, dense: float) -> list[tuple[float, float, Any]]:
  """`(cost, penalty, index)` of the options no cheaper one beats, by
  increasing cost; the dense option (index None) last if it survives."""
  options = sorted(
    [(c, p, i) for i, (c, p) in enumerate(zip(costs, penalties)) if c < dense]
    + [(dense, 0.0, None)],
    key=lambda o: (o[0], o[1]),
  )
  front: list[tuple[float, float, Any]] = []
  for option in options:
    if not front or option[1] < front[-1][1]:
      front.append(option)
  return front


def allocate(fn: str, layers, fraction: float) -> list[Any]:
  """Chooses one option per layer within `fraction` of the dense total.

  `layers` is a list of `(costs, penalties, dense_cost)`: per layer, the
  cost and penalty of each candidate rank, and its dense cost. Options
  costing at least the dense cost are dropped, and so is any option that a
  cheaper one matches in penalty; keeping the layer dense (penalty 0) is an
  option.

  The start is the uniform split: each layer at its dearest option within
  `fraction` of its own dense cost (the cheapest where none is). From
  there, two kinds of moves, each lowering the summed penalty and keeping
  the total within budget: raising one layer's option, the largest penalty
  drop per unit of cost first (marginal analysis), and where none fits, the
  exchange of one layer's raise for another's cut with the largest net
  drop. A cut never takes a layer's penalty above the largest penalty of
  the start, so no layer ends worse off than the uniform split leaves its
  worst layer. Returns, per layer, an index into its candidates, or None
  for "keep dense".
  """
  options = [_pareto(c, p, d) for c, p, d in layers]
  budget = fraction * sum(dense for *_, dense in layers)
  cheapest = sum(opts[0][0] for opts in options)
  if cheapest > budget:
    raise ValueError(
      f"{fn}: the budget ({fraction} of the dense total, {budget:.4g})"
      f" is below the cheapest factorization's total ({cheapest:.4g})."
    )
  choice = []
  for opts, (*_, dense) in zip(options, layers):
    fits = [k for k, o in enumerate(opts) if o[0] <= fraction * dense]
    choice.append(fits[-1] if fits else 0)
  if sum(opts[k][0] for opts, k in zip(options, choice)) > budget:
    choice = [0] * len(options)
  cap = max(opts[k][1] for opts, k in zip(options, choice))
  costs = [np.array([o[0] for o in opts]) for opts in options]
  penalties = [np.array([o[1] for o in opts]) for opts in options]
  # Slack for rounding in the sums of float costs.
  tolerance = 1e-9 * max(abs(budget), 1e-30)
  while True:
    total = sum(c[k] for c, k in zip(costs, choice))
    left = budget - total
    moves, best_gain = None, 0.0
    for i, k in enumerate(choice):
      extra = costs[i][k + 1 :] - costs[i][k]
      gain = penalties[i][k] - penalties[i][k + 1 :]
      ratio = np.where(extra <= left + tolerance, gain / extra, -np.inf)
      if ratio.size and ratio.max() > best_gain:
        moves, best_gain = [(i, k + 1 + int(ratio.argmax()))], ratio.max()
    if moves is None:
      moves = _best_exchange(costs, penalties, choice, left, cap, tolerance)
    if moves is None:
      return [opts[k][2] for opts, k in zip(options, choice)]
    for i, k in moves:
      choice[i] = k


def _best_exchange(costs, penalties, choice, left, cap, tolerance):
  """The raise of one layer paid by a cut of another with the largest net
  penalty drop, as `[(i, k), (j, l)]`, or None if none lowers it."""
  best, best_gain = None, 1e-12
  for i, k in enumerate(choice):
    if k + 1 == len(costs[i]):
      continue
    extra = costs[i][k + 1 :] - costs[i][k]
    gain = penalties[i][k] - penalties[i][k + 1 :]
    for j, l in enumerate(choice):
      if j == i or l == 0:
        continue
      # Cut j to its dearest option that frees enough: the smallest loss.
      allowed = costs[j][:l]
      afford = costs[j][l] - (extra - left - tolerance)
      cut = np.searchsorted(allowed, afford, side="right") - 1
      valid = cut >= 0
      cut = np.maximum(cut, 0)
      valid &= penalties[j][cut] <= cap
      net = np.where(valid, gain - (penalties[j][cut] - penalties[j][l]), 0.0)
      m = int(net.argmax())
      if net[m] > best_gain:
        best, best_gain = [(i, k + 1 + m), (j, int(cut[m]))], net[m]
  return best


def choose(
  fn: str,
  sites: Sequence[Any],
  cls: type[formats.Format],
  budget: _ranks.Budget,
  *,
  implementation: str,
  criterion: str,
  losses: Callable[[Any, jax.Array], Any] | None,
  decompose: Callable[[Any, Any], formats.Format],
  exact: bool = False,
) -> tuple[list[Any], list[float | None]]:
  """Per site, the rank a budget gives it (None: keep dense) and, for the
  loss criterion, the measured loss increase at that rank.

  `decompose(site, rank)` is the factorization the layer would get; the
  loss criterion scores it only where `exact` (e.g. data-aware) or for
  formats `reconstructions` cannot truncate on the host.
  """
  kind, fraction = next(
    (name, float(value))
    for name, value in (
      ("flops", budget.flops),
      ("params", budget.params),
      ("latency", budget.latency),
    )
    if value is not None
  )
  layers, candidates, increases = [], [], []
  for site in sites:
    # A grouped conv's rank is per group, and its costs the groups' sum.
    ranks: list[Any] = _ranks.candidates(site.group_shape, cls)
    costs: list[float]
    dense: float
    measured: list[float | None]
    if kind == "params":
      costs = [site.num_params(cls, r) for r in ranks]
      dense = math.prod(site.shape)
    else:
      # Each candidate as the new layer will run it.
      abstract = [site.abstract(cls, r) for r in ranks]
      if kind == "flops":
        costs = [site.flops(a, implementation) for a in abstract]
        dense = site.flops(site.kernel)
      else:
        costs = [_site_seconds(site, a, implementation) for a in abstract]
        dense = _site_seconds(site, site.kernel, "reconstructed")
    if criterion == "loss":
      keep = subsample(costs, dense, LOSS_CANDIDATES)
      ranks, costs = [ranks[i] for i in keep], [costs[i] for i in keep]
      if losses is None:
        raise ValueError(f'{fn}: criterion="loss" needs a `loss_fn`.')
      penalties = loss_increases(
        site,
        cls,
        ranks,
        losses,
        functools.partial(decompose, site)
        if exact
        or site.groups > 1
        or cls not in (formats.LowRank, formats.Tucker)
        else None,
      )
      measured = list(penalties)
    else:
      errors = _site_errors(site, cls, ranks)
      penalties = spectral_penalty(errors)
      measured = [None] * len(ranks)
    layers.append((costs, penalties, dense))
    candidates.append(ranks)
    increases.append(measured)
  chosen, measured_at = [], []
  for ranks, measured, index in zip(
    candidates, increases, allocate(fn, layers, fraction)
  ):
    chosen.append(None if index is None else ranks[index])
    measured_at.append(None if index is None else measured[index])
  return chosen, measured_at


def _site_seconds(site: Any, kernel: Any, implementation: str) -> float:
  """`estimated_seconds` of `kernel` at the site; a dense grouped kernel as
  its G convs of one group's kernel and channels."""
  geometry = dict(
    strides=site.strides or 1,
    padding=site.padding,
    dilation=site.kernel_dilation or 1,
  )
  shape = site.input_shape
  if site.groups > 1 and not isinstance(kernel, formats.Format):
    one = jax.ShapeDtypeStruct(site.group_shape, kernel.dtype)
    return site.groups * estimated_seconds(
      one,
      (*shape[:-1], shape[-1] // site.groups),
      implementation=implementation,
      **geometry,
    )
  return estimated_seconds(
    kernel, shape, implementation=implementation, **geometry
  )


def _site_errors(site: Any, cls, ranks) -> list[float]:
  """`_spectral_errors` of the site's kernel; a grouped kernel's are its
  groups' errors combined, each weighted by the group's share of
  `||kernel||^2`."""
  if site.groups == 1:
    return _spectral_errors(cls, site.kernel, ranks)
  kernels = site.group_kernels()
  weights = np.array([np.sum(np.square(k)) for k in kernels])
  weights = weights / max(float(np.sum(weights)), np.finfo(np.float64).tiny)
  errors = np.array([_spectral_errors(cls, k, ranks) for k in kernels])
  return [float(e) for e in np.sqrt(weights @ np.square(errors))]


def _spectral_errors(cls, kernel, ranks) -> list[float]:
  """Estimated relative error of each rank, from the kernel's spectra.

  One spectrum: its exact tail. Tucker's two modes (or a chain): the energy
  kept by projecting on every mode, estimated as the product of the kept
  fractions (it lies below the HOSVD bound, the sum of tails).
  """
  spectra = _decompose.spectra(cls, np.asarray(kernel, np.float64), None)
  curves = [_ranks.energy_curve(s) for s, _ in spectra]
  out = []
  for rank in ranks:
    per_mode = rank if isinstance(rank, tuple) else (rank,)
    kept = math.prod(
      float(c[min(r, len(c)) - 1]) for c, r in zip(curves, per_mode)
    )
    out.append(math.sqrt(min(1.0, max(0.0, 1.0 - kept))))
  return out
