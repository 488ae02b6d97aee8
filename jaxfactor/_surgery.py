"""Model surgery that works for any framework: ranks per layer, the report.

`jaxfactor.nnx.factorize` and `jaxfactor.linen.factorize_variables` find a
model's convolutions their own way (nnx modules, linen variables) and record
each one's input where a sample batch is given. Everything else is here, on
plain `Site`s: choosing each layer's rank (one rank, an energy, or a budget
spread over the layers), decomposing its kernel, and the report.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfactor import _adapters
from jaxfactor import _allocate
from jaxfactor import _cost
from jaxfactor import _decompose
from jaxfactor import _formats as formats
from jaxfactor import _ranks


def total(values: Sequence[int | None]) -> int | None:
  """The sum of per-layer counts; None if any is unknown (a layer without
  a recorded input has no FLOP count)."""
  if any(v is None for v in values):
    return None
  return sum(v for v in values if v is not None)


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """What model-level factorization did to one convolution.

  Attributes:
    path: the layer's path in the model (nnx: as `nnx.iter_modules` gives
      it; linen: the path of its params dict).
    kernel_shape: the dense kernel's shape.
    input_shape: the layer's input shape, when `inputs` were given.
    rank: the rank chosen (None when skipped).
    params_before, params_after: kernel parameters (bias excluded).
    flops_before, flops_after: FLOPs of one call on `input_shape` (None
      without `inputs`).
    relative_error: `||to_dense() - kernel|| / ||kernel||`.
    skipped: the reason the layer was left as it is, or None.
    groups: the conv's `feature_group_count` (its rank is per group).
    loss_increase: with a budget allocated by `criterion="loss"`, the
      increase of the loss on the calibration batch measured with this
      layer alone factorized at `rank`; otherwise None.
  """

  path: tuple[Any, ...]
  kernel_shape: tuple[int, ...]
  input_shape: tuple[int, ...] | None = None
  rank: Any = None
  params_before: int = 0
  params_after: int = 0
  flops_before: int | None = None
  flops_after: int | None = None
  relative_error: float | None = None
  skipped: str | None = None
  groups: int = 1
  loss_increase: float | None = None


@dataclasses.dataclass(frozen=True)
class FactorizationReport:
  """Per-layer reports and totals over the factorized layers.

  `str(report)` is a table: per layer the rank, params and MFLOPs before and
  after, and the relative error of the kernel (and, with
  `criterion="loss"`, the measured loss increase).

  Attributes:
    format: the format's class name.
    layers: one `LayerReport` per convolution seen, in model order.
    criterion: how a `budget` scored the ranks it spread ("spectral" or
      "loss"); None when no budget was given.
  """

  format: str
  layers: tuple[LayerReport, ...]
  criterion: str | None = None

  @property
  def factorized(self) -> tuple[LayerReport, ...]:
    """The layers that were factorized (not skipped)."""
    return tuple(layer for layer in self.layers if layer.skipped is None)

  @property
  def params_before(self) -> int:
    return sum(layer.params_before for layer in self.factorized)

  @property
  def params_after(self) -> int:
    return sum(layer.params_after for layer in self.factorized)

  @property
  def flops_before(self) -> int | None:
    return total([layer.flops_before for layer in self.factorized])

  @property
  def flops_after(self) -> int | None:
    return total([layer.flops_after for layer in self.factorized])

  @property
  def ranks(self) -> dict[str, Any]:
    """`{"/".join(path): rank}` of the factorized layers (JSON-ready)."""
    return {
      "/".join(map(str, layer.path)): layer.rank for layer in self.factorized
    }

  @property
  def groups(self) -> dict[str, int]:
    """`{"/".join(path): feature_group_count}` of the factorized grouped
    convs (JSON-ready; `jaxfactor.linen.restore_structure` needs it)."""
    return {
      "/".join(map(str, layer.path)): layer.groups
      for layer in self.factorized
      if layer.groups > 1
    }

  def __str__(self) -> str:
    loss = self.criterion == "loss"
    rows = [
      f"{'layer':<24} {'kernel':<18} {'rank':<10} {'params':>17}"
      f" {'MFLOPs':>17} {'rel.err':>8}" + (f" {'d.loss':>9}" if loss else "")
    ]
    for layer in self.layers:
      name = "/".join(map(str, layer.path))
      shape = str(layer.kernel_shape)
      if layer.skipped:
        rows.append(f"{name:<24} {shape:<18} skipped: {layer.skipped}")
        continue
      before, after = layer.flops_before, layer.flops_after
      flops = (
        "-"
        if before is None or after is None
        else f"{before / 1e6:.2f}->{after / 1e6:.2f}"
      )
      params = f"{layer.params_before}->{layer.params_after}"
      rows.append(
        f"{name:<24} {shape:<18} {str(layer.rank):<10} {params:>17}"
        f" {flops:>17} {layer.relative_error:>8.4f}"
        + (f" {layer.loss_increase:>9.4f}" if loss else "")
      )
    return "\n".join(rows)


@dataclasses.dataclass
class Site:
  """One convolution of a model, as the surgery sees it.

  Attributes:
    path: where it is in the model.
    kernel: its dense HWIO kernel `[*window, C, F]`.
    strides, padding, kernel_dilation: its geometry (Flax's forms).
    inputs: a recorded input batch `[*batch, *spatial, C]`, or None.
    groups: its `feature_group_count` G; `kernel` is then `[*window, C/G,
      F]`, factorized group by group at one rank per group.
  """

  path: tuple[Any, ...]
  kernel: Any
  strides: Any = 1
  padding: Any = "SAME"
  kernel_dilation: Any = 1
  inputs: Any = None
  groups: int = 1

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.kernel.shape)

  @property
  def group_shape(self) -> tuple[int, ...]:
    """One group's kernel shape `[*window, C/G, F/G]`: what ranks are of."""
    *window, c, f = self.shape
    return (*window, c, f // self.groups)

  def group_kernels(self) -> list[Any]:
    """The groups' kernels `[*window, C/G, F/G]`."""
    *window, c, f = self.shape
    split = np.reshape(self.kernel, (*window, c, self.groups, f // self.groups))
    return [split[..., g, :] for g in range(self.groups)]

  def abstract(self, cls, rank: Any) -> formats.Format:
    """The abstract factors of `rank` (per group) for this site."""
    value = cls.abstract(self.group_shape, rank, self.kernel.dtype)
    if self.groups == 1:
      return value
    inner = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((self.groups, *a.shape), a.dtype), value
    )
    return formats.Grouped._unflatten((), [inner])

  def num_params(self, cls, rank: Any) -> int:
    return self.groups * _ranks.num_params(self.group_shape, cls, rank)

  @property
  def input_shape(self) -> tuple[int, ...] | None:
    return None if self.inputs is None else tuple(self.inputs.shape)

  def flops(self, kernel: Any, implementation: str = "auto") -> int | None:
    """FLOPs of this site's geometry with `kernel`, run by `implementation`."""
    shape = self.input_shape
    if shape is None:
      return None
    groups = 1
    if self.groups > 1 and not isinstance(kernel, formats.Format):
      # A dense grouped conv: G convs of one group's kernel and channels.
      groups = self.groups
      kernel = jax.ShapeDtypeStruct(self.group_shape, kernel.dtype)
      shape = (*shape[:-1], shape[-1] // groups)
    return (
      groups
      * _cost.cost(
        kernel,
        shape,
        strides=self.strides or 1,
        padding=self.padding,
        dilation=self.kernel_dilation or 1,
        implementation=implementation,
      ).flops
    )


def check_ranks(fn: str, ranks: Any) -> None:
  """`ranks` must map layer paths to ranks (`FactorizationReport.ranks`)."""
  if not isinstance(ranks, Mapping):
    raise TypeError(
      f"{fn}: `ranks` must be a mapping from layer paths to"
      f" ranks (FactorizationReport.ranks), got"
      f" {type(ranks).__name__}."
    )


def check_groups(
  fn: str, groups: Any, ranks: Mapping[str, Any]
) -> dict[str, int]:
  """`groups` must map paths of `ranks` to positive ints
  (`FactorizationReport.groups`); None is no grouped conv."""
  if groups is None:
    return {}
  if not isinstance(groups, Mapping):
    raise TypeError(
      f"{fn}: `groups` must be a mapping from layer paths to"
      f" feature_group_count (FactorizationReport.groups), got"
      f" {type(groups).__name__}."
    )
  unknown = sorted(set(groups) - set(ranks))
  if unknown:
    raise ValueError(f"{fn}: `groups` names {unknown}, which `ranks` does not.")
  for name, value in groups.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(
        f"{fn}: `groups[{name!r}]` must be a positive int, got {value!r}."
      )
  return dict(groups)


def placeholders(
  fn: str,
  cls,
  kernel_shape,
  dtype,
  rank: Any,
  *,
  abstract: bool,
  groups: int = 1,
) -> tuple[Any, dict[str, Any]]:
  """A saved rank (JSON lists read as tuples), checked, and factor params of
  that rank for a checkpoint to fill: zeros, or abstract. With `groups > 1`
  (a grouped kernel `[*window, C/G, F]`) the rank is per group and each
  param has a leading groups axis."""
  rank = tuple(rank) if isinstance(rank, list) else rank
  if kernel_shape[-1] % groups:
    raise ValueError(
      f"{fn}: a kernel of shape {tuple(kernel_shape)} has"
      f" {kernel_shape[-1]} output features, not a multiple of"
      f" feature_group_count={groups}."
    )
  site = Site(
    path=(), kernel=jax.ShapeDtypeStruct(kernel_shape, dtype), groups=groups
  )
  rank = _ranks.resolve_rank(fn, cls, site.group_shape, rank)
  shapes = {
    name: ((groups,) if groups > 1 else ()) + shape
    for name, shape in cls.param_shapes(site.group_shape, rank).items()
  }
  return rank, {
    name: jax.ShapeDtypeStruct(shape, dtype)
    if abstract
    else jnp.zeros(shape, dtype)
    for name, shape in shapes.items()
  }


def check_choice(
  fn: str, rank: Any, energy: Any, budget: Any, inputs: Any, data_aware: bool
) -> None:
  """Exactly one of `rank`, `energy`, `budget`, each well-formed."""
  given = [
    name
    for name, v in (("rank", rank), ("energy", energy), ("budget", budget))
    if v is not None
  ]
  if len(given) != 1:
    raise ValueError(
      f"{fn}: give exactly one of `rank`, `energy` and `budget`, got"
      f" {', '.join(given) if given else 'none'}."
    )
  if budget is not None:
    if not isinstance(budget, _ranks.Budget):
      raise TypeError(
        f"{fn}: `budget` must be a jaxfactor.Budget, got"
        f" {type(budget).__name__}."
      )
    if budget.flops is not None and inputs is None:
      raise ValueError(
        f"{fn}: a FLOP budget needs `inputs` to know each layer's input shape."
      )
    if budget.latency is not None and inputs is None:
      raise ValueError(
        f"{fn}: a latency budget needs `inputs` to know each layer's input"
        " shape."
      )
  if rank is not None:
    _ranks.check_rank_type(fn, rank, allow_vbmf=True)
  if energy is not None and (
    isinstance(energy, bool)
    or not isinstance(energy, (int, float))
    or not 0 < energy <= 1
  ):
    raise ValueError(
      f"{fn}: `energy` must be a number in (0, 1], got {energy!r}."
    )
  if data_aware and inputs is None:
    raise ValueError(f"{fn}: `data_aware=True` needs `inputs`.")


def factorize_sites(
  fn: str,
  sites: Sequence[Site],
  cls: type[formats.Format],
  *,
  rank: Any = None,
  energy: float | None = None,
  budget: _ranks.Budget | None = None,
  data_aware: bool = False,
  implementation: str = "factorized",
  allow_larger: bool = False,
  progress: bool = False,
  criterion: str = "spectral",
  losses: Any = None,
  **decompose_kwargs: Any,
) -> tuple[dict[tuple[Any, ...], formats.Format], list[LayerReport]]:
  """Decomposes each site's kernel at its chosen rank.

  A budget's ranks are chosen by `_allocate.choose`; with `criterion="loss"`
  it scores them with `losses(path, kernels)`, the model's loss with each
  kernel of the stack put in the layer at `path`.

  A factorization with more parameters than the dense kernel, or more FLOPs
  on the recorded input, is not used (the layer stays dense, reported with
  the reason) unless `allow_larger`. With `progress`, one line per layer
  goes to stderr as it is decomposed.

  Returns the factors of the factorized sites by path, and a report per
  site (factorized, or skipped with the reason).
  """
  reports: list[LayerReport] = []
  chosen: dict[tuple[Any, ...], Any] = {}
  loss_increase: dict[tuple[Any, ...], float | None] = {}
  if budget is not None:
    ranks, increases = _allocate.choose(
      fn,
      sites,
      cls,
      budget,
      implementation=implementation,
      criterion=criterion,
      losses=losses,
      decompose=lambda site, r: _decompose_site(
        site, cls, r, data_aware, decompose_kwargs
      ),
      exact=data_aware,
    )
    for site, chosen_rank, increase in zip(sites, ranks, increases):
      if chosen_rank is None:
        reports.append(
          LayerReport(
            path=site.path,
            kernel_shape=site.shape,
            input_shape=site.input_shape,
            skipped="kept dense: the budget is better spent elsewhere",
          )
        )
      else:
        chosen[site.path] = dict(rank=chosen_rank)
        loss_increase[site.path] = increase
  else:
    for site in sites:
      if rank is not None and not isinstance(rank, str):
        try:  # a rank that does not exist for this layer skips it
          _ranks.resolve_rank(fn, cls, site.group_shape, rank)
        except ValueError as error:
          reports.append(
            LayerReport(
              path=site.path,
              kernel_shape=site.shape,
              input_shape=site.input_shape,
              skipped=str(error),
            )
          )
          continue
      chosen[site.path] = (
        dict(energy=energy) if energy is not None else dict(rank=rank)
      )
  factors_by_path = {}
  todo = [site for site in sites if site.path in chosen]
  for number, site in enumerate(todo, 1):
    start = time.perf_counter()
    inputs = site.inputs if data_aware else None
    short = (_grouped(site) or _too_short(site)) if data_aware else None
    if short:
      reports.append(
        LayerReport(
          path=site.path,
          kernel_shape=site.shape,
          input_shape=site.input_shape,
          skipped=short,
        )
      )
      continue
    with warnings.catch_warnings():
      # Said in the report instead: the layer is kept dense.
      warnings.filterwarnings("ignore", message=_LARGER_WARNING)
      static_rank = _site_rank(
        site,
        cls,
        inputs=inputs,
        dilation=site.kernel_dilation or 1,
        damping=decompose_kwargs.get("damping", 1e-3),
        **chosen[site.path],
      )
    abstract = site.abstract(cls, static_rank)
    larger = _larger(
      abstract.num_params,
      math.prod(site.shape),
      site.flops(abstract, implementation),
      site.flops(site.kernel),
    )
    if larger and not allow_larger:
      report = LayerReport(
        path=site.path,
        kernel_shape=site.shape,
        input_shape=site.input_shape,
        skipped=f"kept dense: rank {static_rank} {larger} (pass"
        " allow_larger=True to factorize it anyway)",
      )
    else:
      factors = _decompose_site(
        site, cls, static_rank, data_aware, decompose_kwargs
      )
      factors_by_path[site.path] = factors
      report = LayerReport(
        path=site.path,
        kernel_shape=site.shape,
        input_shape=site.input_shape,
        rank=static_rank,
        params_before=math.prod(site.shape),
        params_after=factors.num_params,
        flops_before=site.flops(site.kernel),
        flops_after=site.flops(factors, implementation),
        relative_error=float(_decompose.relative_error(factors, site.kernel)),
        groups=site.groups,
        loss_increase=loss_increase.get(site.path),
      )
    reports.append(report)
    if progress:
      name = "/".join(map(str, site.path))
      outcome = (
        report.skipped
        if report.skipped
        else f"rank {report.rank}, relative error {report.relative_error:.4f}"
      )
      print(
        f"{fn}: {number}/{len(todo)} {name} {site.shape}: {outcome}"
        f" ({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
        flush=True,
      )
  return factors_by_path, reports


_LARGER_WARNING = ".*larger than what it replaces"


def _site_rank(site: Site, cls, **choice: Any) -> Any:
  """The static rank (per group) `decompose` would use for the site; for a
  grouped conv, the largest any group needs, as `decompose` chooses it."""
  if site.groups == 1:
    return _decompose.choose_rank(site.kernel, cls, **choice)
  ranks = [
    _decompose.choose_rank(kernel, cls, **choice)
    for kernel in site.group_kernels()
  ]
  return jax.tree.map(lambda *r: max(r), *ranks)


def depthwise(group_in_features: int, groups: int) -> str | None:
  """Why a grouped conv with one input channel per group is left as it is."""
  if groups > 1 and group_in_features == 1:
    return (
      f"depthwise conv (feature_group_count={groups}, one input channel per"
      " group): no channels to factorize"
    )
  return None


def _grouped(site: Site) -> str | None:
  if site.groups > 1:
    return (
      f"data-aware: a grouped conv (feature_group_count={site.groups}) is"
      " decomposed from its weights only; factorize it without data_aware"
    )
  return None


def _decompose_site(
  site: Site,
  cls: type[formats.Format],
  rank: Any,
  data_aware: bool,
  decompose_kwargs: Mapping[str, Any],
) -> formats.Format:
  """The site's kernel decomposed at `rank` (per group for a grouped conv),
  against its recorded input where `data_aware` (an ungrouped conv whose
  input has patches)."""
  inputs = (
    site.inputs
    if data_aware and site.groups == 1 and not _too_short(site)
    else None
  )
  with warnings.catch_warnings():
    # Said in the report instead: the layer is kept dense.
    warnings.filterwarnings("ignore", message=_LARGER_WARNING)
    return _decompose.decompose(
      site.kernel,
      cls,
      inputs=inputs,
      dilation=site.kernel_dilation or 1,
      rank=rank,
      feature_group_count=site.groups,
      **decompose_kwargs,
    )


def _too_short(site: Site) -> str | None:
  """Why a site's recorded input has no patches for data-aware decomposition
  (an axis shorter than the dilated window), or None."""
  window = site.shape[:-2]
  n = len(window)
  dilation = site.kernel_dilation or 1
  dilation = (dilation,) * n if isinstance(dilation, int) else tuple(dilation)
  dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
  spatial = tuple(site.inputs.shape[-n - 1 : -1])
  if all(s >= k for s, k in zip(spatial, dilated)):
    return None
  return (
    f"data-aware: its input {spatial} is smaller than the dilated window"
    f" {dilated}, so it has no patches to decompose against"
  )


def _larger(
  params: int, dense_params: int, flops: int | None, dense_flops: int | None
) -> str | None:
  """Why a factorization is larger or slower than the dense layer, or None."""
  if params > dense_params:
    return (
      f"has {params} parameters, more than the dense kernel's {dense_params}"
    )
  if flops is not None and dense_flops is not None and flops > dense_flops:
    return f"costs {flops} FLOPs, more than the dense conv's {dense_flops}"
  return None


def ordered(
  fmt: str,
  reports: Sequence[LayerReport],
  order: Sequence[tuple[Any, ...]],
  criterion: str | None = None,
) -> FactorizationReport:
  """The report, its layers in the model's order."""
  index = {path: i for i, path in enumerate(order)}
  return FactorizationReport(
    format=fmt,
    layers=tuple(sorted(reports, key=lambda r: index.get(r.path, -1))),
    criterion=criterion,
  )


@dataclasses.dataclass(frozen=True)
class AdapterLayerReport:
  """What `adapt` (or `extract`) did to one convolution.

  Attributes:
    path: the layer's path (nnx: as `nnx.iter_modules` gives it; linen: the
      path of its params dict).
    kernel_shape: the base kernel's dense shape (`[*window, C/G, F]`).
    groups: the base conv's `feature_group_count`.
    base: the base layer's kind: "dense" or its format's name.
    input_shape: the layer's input shape, when `inputs` were given.
    rank: the update's rank per group (None when skipped).
    scale: `alpha / rank`.
    trainable: the update's parameters.
    frozen: the base layer's parameters (kernel or factors, and bias).
    extra_flops: FLOPs the adapter branch adds to one call on
      `input_shape` (`jaxfactor.cost` of the update's convolution; None
      without `inputs`).
    skipped: the reason the layer has no adapter, or None.
  """

  path: tuple[Any, ...]
  kernel_shape: tuple[int, ...]
  groups: int = 1
  base: str = "dense"
  input_shape: tuple[int, ...] | None = None
  rank: Any = None
  scale: float | None = None
  trainable: int = 0
  frozen: int = 0
  extra_flops: int | None = None
  skipped: str | None = None


@dataclasses.dataclass(frozen=True)
class AdaptationReport:
  """Per-layer adapter reports, and the model's trainable and frozen totals.

  `str(report)` is a table: per layer the base, rank, scale, trainable and
  frozen parameters and the extra MFLOPs, then the totals.

  Attributes:
    format: the update's format name.
    layers: one `AdapterLayerReport` per convolution seen, in model order.
    trainable: the adapters' parameters (what an optimizer with the adapter
      filter or mask trains).
    frozen: every other parameter of the model.
  """

  format: str
  layers: tuple[AdapterLayerReport, ...]
  trainable: int
  frozen: int

  @property
  def adapted(self) -> tuple[AdapterLayerReport, ...]:
    """The layers that got an adapter (not skipped)."""
    return tuple(layer for layer in self.layers if layer.skipped is None)

  @property
  def extra_flops(self) -> int | None:
    return total([layer.extra_flops for layer in self.adapted])

  @property
  def ranks(self) -> dict[str, Any]:
    """`{"/".join(path): rank}` of the adapted layers (JSON-ready): pass it
    back as `rank` to rebuild the same adapters."""
    return {
      "/".join(map(str, layer.path)): layer.rank for layer in self.adapted
    }

  def __str__(self) -> str:
    rows = [
      f"{'layer':<24} {'base':<18} {'rank':<8} {'scale':>7} {'trainable':>10}"
      f" {'frozen':>10} {'+MFLOPs':>8}"
    ]
    for layer in self.layers:
      name = "/".join(map(str, layer.path))
      if layer.skipped:
        rows.append(f"{name:<24} skipped: {layer.skipped}")
        continue
      base = f"{layer.base}{list(layer.kernel_shape)}"
      if layer.groups > 1:
        base += f"/{layer.groups}"
      flops = (
        "-" if layer.extra_flops is None else f"{layer.extra_flops / 1e6:.2f}"
      )
      rows.append(
        f"{name:<24} {base:<18} {str(layer.rank):<8} {layer.scale:>7.3g}"
        f" {layer.trainable:>10} {layer.frozen:>10} {flops:>8}"
      )
    total = self.trainable + self.frozen
    share = self.trainable / total if total else 0.0
    rows.append(
      f"trainable {self.trainable} of {total} parameters ({share:.2%}),"
      f" frozen {self.frozen}"
    )
    return "\n".join(rows)


def choose_adapter(
  fn: str,
  cls: type[formats.Format],
  path: tuple[Any, ...],
  kernel_shape: tuple[int, ...],
  groups: int,
  base: str,
  reason: str | None,
  *,
  rank: Any,
  alpha: Any,
  allow_larger: bool,
) -> tuple[Any, Any, AdapterLayerReport | None]:
  """One conv's adapter rank and alpha (`_adapters.choose`), unless
  `reason` (or the choice) skips it: then `(None, None, report)`, the
  report saying why. nnx's `adapt` and linen's `adapt_variables` share it."""
  layer_rank = layer_alpha = None
  if reason is None:
    layer_rank, layer_alpha, reason = _adapters.choose(
      fn,
      cls,
      "/".join(map(str, path)),
      kernel_shape,
      groups,
      rank=rank,
      alpha=alpha,
      allow_larger=allow_larger,
    )
  if reason is None:
    return layer_rank, layer_alpha, None
  return (
    None,
    None,
    AdapterLayerReport(
      path=path,
      kernel_shape=kernel_shape,
      groups=groups,
      base=base,
      skipped=reason,
    ),
  )


def adapter_flops(site: Site, update: Any, implementation: str) -> int | None:
  """FLOPs of the adapter branch (a `Grouped` update for a grouped base) on
  the site's recorded input shape."""
  shape = site.input_shape
  if shape is None:
    return None
  return _cost.cost(
    update,
    shape,
    strides=site.strides or 1,
    padding=site.padding,
    dilation=site.kernel_dilation or 1,
    implementation=implementation,
  ).flops
