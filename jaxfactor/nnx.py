"""Flax NNX layers for factorized convolutions, and whole-model factorization.

Each layer holds its factors as `nnx.Param`s named after the format's fields
(a tuple field's entries as `{field}_{i}`, e.g. `spatial_0`), exposes them as
a format value (`layer.factors`) and calls `jaxfactor.conv(x, factors) + bias`.
Arguments mirror `flax.nnx.Conv`.

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> import jaxfactor.nnx
>>> layer = jaxfactor.nnx.TuckerConv(64, 128, (3, 3), rank=0.25,
...                                   rngs=nnx.Rngs(0))
>>> layer(jnp.ones((2, 16, 16, 64))).shape
(2, 16, 16, 128)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxfactor import _layers
from jaxfactor import _cost as cost_model
from jaxfactor import _decompose as decomposition
from jaxfactor import _formats as formats
from jaxfactor import _ranks as ranks_lib
from jaxfactor._ranks import Budget

__all__ = (
    "CPConv",
    "DepthwiseConv",
    "DepthwiseSeparableConv",
    "FactorizationReport",
    "LayerReport",
    "LowRankConv",
    "PointwiseConv",
    "SpatiallySeparableConv",
    "TuckerConv",
    "factorize",
)


def _param(value, partitioning, name):
  names = _layers.partition_names(partitioning, name)
  return nnx.Param(value) if names is None else nnx.Param(
      value, out_sharding=names)


class _FactorizedConv(nnx.Module):
  """Shared machinery of the factorized layers (see the subclasses)."""

  format: ClassVar[type[formats.Format]]

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | Sequence[int],
      strides: int | Sequence[int] = 1,
      *,
      rank: Any,
      padding: Any = "SAME",
      dilation: int | Sequence[int] = 1,
      use_bias: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      precision: Any = None,
      implementation: str = "auto",
      init: str = "default",
      kernel_init: _layers.Initializer = _layers.default_kernel_init,
      bias_init: _layers.Initializer = _layers.default_bias_init,
      partitioning: Mapping[str, Sequence[str | None]] | None = None,
      rngs: nnx.Rngs,
      **initializers: _layers.Initializer,
  ):
    layer = type(self).__name__
    cls = self.format
    unknown = set(initializers) - set(_layers.INIT_ARGS[cls].values())
    if unknown:
      raise TypeError(
          f"{layer}: unexpected arguments {sorted(unknown)}; the factor"
          f" initializers are {sorted(_layers.INIT_ARGS[cls].values())}."
      )
    window = _layers.kernel_size_tuple(layer, kernel_size)
    _layers.check_features(layer, "in_features", in_features)
    _layers.check_features(layer, "out_features", out_features)
    _layers.check_geometry(layer, window, strides, padding, dilation)
    kernel_shape = (*window, in_features, out_features)
    ranks_lib.check_kernel_shape(layer, kernel_shape, cls)
    self.rank = _layers.resolve_rank(layer, cls, kernel_shape, rank)
    inits = {
        field: initializers.get(arg, _layers.default_kernel_init)
        for field, arg in _layers.INIT_ARGS[cls].items()
    }
    values = _layers.init_factors(
        layer, cls, rngs.params(), kernel_shape, self.rank, param_dtype,
        inits, init, kernel_init,
    )
    self.param_names = tuple(values)
    for name, value in values.items():
      setattr(self, name, _param(value, partitioning, name))
    if use_bias:
      self.bias = _param(
          bias_init(rngs.params(), (out_features,), param_dtype),
          partitioning, "bias",
      )
    else:
      self.bias = nnx.data(None)
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = window
    self.strides = strides
    self.padding = padding
    self.dilation = dilation
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.implementation = implementation

  def _static(self) -> dict[str, Any]:
    return {}

  @property
  def factors(self) -> formats.Format:
    """The layer's kernel as a format value (its current parameters)."""
    return self.format.from_params(
        {name: getattr(self, name)[...] for name in self.param_names},
        **self._static(),
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    _layers.check_input_channels(
        type(self).__name__, x, self.in_features, self.kernel_size)
    return _layers.apply(
        x, self.factors, None if self.bias is None else self.bias[...],
        dtype=self.dtype, strides=self.strides, padding=self.padding,
        dilation=self.dilation, precision=self.precision,
        implementation=self.implementation,
    )


class LowRankConv(_FactorizedConv):
  """A k x k conv into `rank` channels, then a 1x1 conv (`LowRank`).

  Args:
    in_features, out_features, kernel_size, strides: as `nnx.Conv`.
    rank: an int, or a float in (0, 1]: the largest rank whose parameters
      are at most that fraction of the dense conv's.
    padding, dilation, use_bias, dtype, param_dtype, precision, bias_init,
      rngs: as `nnx.Conv` (`dilation` is its `kernel_dilation`).
    implementation: passed to `jaxfactor.conv`.
    init: "default" (each factor from its initializer; with the default
      lecun_normal the dense kernel has the dense layer's variance) or
      "spectral" (decompose a dense kernel drawn from `kernel_init`).
    spatial_init, pointwise_init: factor initializers.
    partitioning: optional mesh-axis names per parameter (or per field),
      e.g. `{"pointwise": (None, "model")}`, stored as `out_sharding`.
  """

  format = formats.LowRank


class TuckerConv(_FactorizedConv):
  """1x1 conv, k x k core conv, 1x1 conv (`Tucker`, Tucker-2).

  As `LowRankConv`, with `rank` an int, a pair `(R_in, R_out)` or a float
  fraction, and initializers `in_proj_init`, `core_init`, `out_proj_init`.
  """

  format = formats.Tucker


class CPConv(_FactorizedConv):
  """1x1 conv, one depthwise 1-D conv per axis, 1x1 conv (`CP`).

  As `LowRankConv`, with initializers `in_proj_init`, `spatial_init` (every
  axis), `out_proj_init`.
  """

  format = formats.CP


class SpatiallySeparableConv(_FactorizedConv):
  """One 1-D conv per spatial axis (`SpatiallySeparable`, e.g. 3x1 then 1x3).

  As `LowRankConv`, with `rank` an int, one inner rank per split, or a float
  fraction, and `factors_init` for every factor.
  """

  format = formats.SpatiallySeparable


class DepthwiseSeparableConv(_FactorizedConv):
  """A depthwise conv then a pointwise conv (`DepthwiseSeparable`).

  As `LowRankConv`, with `channel_multiplier` instead of `rank` (an int, or a
  float fraction of the dense parameters) and initializers `depthwise_init`,
  `pointwise_init`.
  """

  format = formats.DepthwiseSeparable

  def __init__(self, in_features, out_features, kernel_size, strides=1, *,
               channel_multiplier: Any = 1, rngs: nnx.Rngs, **kwargs):
    super().__init__(in_features, out_features, kernel_size, strides,
                     rank=channel_multiplier, rngs=rngs, **kwargs)

  def _static(self):
    return {"channel_multiplier": self.rank}


class DepthwiseConv(nnx.Module):
  """A depthwise convolution, `kernel [*window, 1, C*m]` named `depthwise`.

  Output channel `c*m + j` filters input channel `c`, as Flax's
  `nnx.Conv(feature_group_count=C)`; runs `jaxfactor.depthwise_conv`.
  """

  def __init__(self, in_features: int, kernel_size, strides=1, *,
               channel_multiplier: int = 1, padding: Any = "SAME",
               dilation=1, use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32, precision=None,
               depthwise_init=_layers.default_kernel_init,
               bias_init=_layers.default_bias_init,
               partitioning=None, rngs: nnx.Rngs):
    layer = type(self).__name__
    window = _layers.kernel_size_tuple(layer, kernel_size)
    _layers.check_features(layer, "in_features", in_features)
    _layers.check_features(layer, "channel_multiplier", channel_multiplier)
    _layers.check_geometry(layer, window, strides, padding, dilation)
    out = in_features * channel_multiplier
    self.depthwise = _param(
        depthwise_init(rngs.params(), (*window, 1, out), param_dtype),
        partitioning, "depthwise")
    self.bias = _param(bias_init(rngs.params(), (out,), param_dtype),
                       partitioning, "bias") if use_bias else nnx.data(None)
    self.in_features, self.kernel_size = in_features, window
    self.channel_multiplier = channel_multiplier
    self.strides, self.padding, self.dilation = strides, padding, dilation
    self.dtype, self.precision = dtype, precision

  def __call__(self, x):
    _layers.check_input_channels(type(self).__name__, x, self.in_features,
                                 self.kernel_size)
    return _layers.apply(
        x, self.depthwise[...], None if self.bias is None else self.bias[...],
        dtype=self.dtype, strides=self.strides, padding=self.padding,
        dilation=self.dilation, precision=self.precision,
        implementation="auto", kind="depthwise")


class PointwiseConv(nnx.Module):
  """A 1x1 convolution, `kernel [C, F]` named `pointwise`, as a contraction."""

  def __init__(self, in_features: int, out_features: int, *,
               use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
               precision=None, pointwise_init=_layers.default_kernel_init,
               bias_init=_layers.default_bias_init, partitioning=None,
               rngs: nnx.Rngs):
    layer = type(self).__name__
    _layers.check_features(layer, "in_features", in_features)
    _layers.check_features(layer, "out_features", out_features)
    self.pointwise = _param(
        pointwise_init(rngs.params(), (in_features, out_features), param_dtype),
        partitioning, "pointwise")
    self.bias = _param(bias_init(rngs.params(), (out_features,), param_dtype),
                       partitioning, "bias") if use_bias else nnx.data(None)
    self.in_features, self.out_features = in_features, out_features
    self.dtype, self.precision = dtype, precision

  def __call__(self, x):
    _layers.check_input_channels(type(self).__name__, x, self.in_features, ())
    return _layers.apply(
        x, self.pointwise[...], None if self.bias is None else self.bias[...],
        dtype=self.dtype, strides=1, padding="SAME", dilation=1,
        precision=self.precision, implementation="auto", kind="pointwise")


LAYERS = {
    formats.LowRank: LowRankConv,
    formats.Tucker: TuckerConv,
    formats.CP: CPConv,
    formats.SpatiallySeparable: SpatiallySeparableConv,
    formats.DepthwiseSeparable: DepthwiseSeparableConv,
}


# --- factorizing a trained model ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """What `factorize` did to one `nnx.Conv`.

  Attributes:
    path: the layer's path in the model (as `nnx.iter_modules` gives it).
    kernel_shape: the dense kernel's shape.
    input_shape: the layer's input shape, when `inputs` were given.
    rank: the rank chosen (None when skipped).
    params_before, params_after: kernel parameters (bias excluded).
    flops_before, flops_after: FLOPs of one call on `input_shape` (None
      without `inputs`).
    relative_error: `||to_dense() - kernel|| / ||kernel||`.
    skipped: the reason the layer was left dense, or None.
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


@dataclasses.dataclass(frozen=True)
class FactorizationReport:
  """Per-layer reports and totals over the factorized layers."""

  format: str
  layers: tuple[LayerReport, ...]

  @property
  def factorized(self) -> tuple[LayerReport, ...]:
    return tuple(l for l in self.layers if l.skipped is None)

  @property
  def params_before(self) -> int:
    return sum(l.params_before for l in self.factorized)

  @property
  def params_after(self) -> int:
    return sum(l.params_after for l in self.factorized)

  @property
  def flops_before(self) -> int | None:
    values = [l.flops_before for l in self.factorized]
    return None if None in values else sum(values)

  @property
  def flops_after(self) -> int | None:
    values = [l.flops_after for l in self.factorized]
    return None if None in values else sum(values)

  def __str__(self) -> str:
    rows = [f"{'layer':<24} {'kernel':<18} {'rank':<10} {'params':>17}"
            f" {'MFLOPs':>17} {'rel.err':>8}"]
    for l in self.layers:
      name = "/".join(map(str, l.path))
      if l.skipped:
        rows.append(f"{name:<24} {str(l.kernel_shape):<18} skipped: {l.skipped}")
        continue
      flops = ("-" if l.flops_before is None else
               f"{l.flops_before / 1e6:.2f}->{l.flops_after / 1e6:.2f}")
      rows.append(
          f"{name:<24} {str(l.kernel_shape):<18} {str(l.rank):<10}"
          f" {f'{l.params_before}->{l.params_after}':>17} {flops:>17}"
          f" {l.relative_error:>8.4f}")
    return "\n".join(rows)


def _default_filter(path, conv) -> bool:
  del path
  return math.prod(conv.kernel_size) > 1


def _unsupported(conv: nnx.Conv) -> str | None:
  if conv.kernel.ndim != len(conv.kernel_size) + 2:
    return (f"kernel of shape {tuple(conv.kernel.shape)} for a"
            f" {len(conv.kernel_size)}-D window (stacked by nnx.vmap/scan?)")
  if conv.feature_group_count != 1:
    return f"feature_group_count={conv.feature_group_count} (grouped conv)"
  if conv.input_dilation not in (None, 1) and any(
      d != 1 for d in np.atleast_1d(conv.input_dilation)):
    return f"input_dilation={conv.input_dilation} (transposed conv)"
  if conv.mask is not None:
    return "masked kernel"
  if not callable(conv.conv_general_dilated) or (
      conv.conv_general_dilated is not jax.lax.conv_general_dilated):
    return "custom conv_general_dilated"
  padding = conv.padding
  if isinstance(padding, str) and padding not in (
      "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL"):
    return f"padding={padding!r}"
  return None


def _get(model, path):
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _set(model, path, value):
  parent = _get(model, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


class _Recorder:
  """Stands in for a conv during one forward pass and keeps its input."""

  def __init__(self, conv, store, key):
    self.conv, self.store, self.key = conv, store, key

  def __call__(self, x, *args, **kwargs):
    self.store[self.key] = x
    return self.conv(x, *args, **kwargs)


def _record_inputs(model, paths, inputs):
  store = {}
  convs = {path: _get(model, path) for path in paths}
  try:
    for path, conv in convs.items():
      _set(model, path, _Recorder(conv, store, path))
    model(inputs)
  finally:
    for path, conv in convs.items():
      _set(model, path, conv)
  return store


def _layer_cost(kernel, input_shape, conv, implementation="auto"):
  """FLOPs of `conv`'s geometry with `kernel`, run by `implementation`."""
  if input_shape is None:
    return None
  return cost_model.cost(
      kernel, input_shape, strides=conv.strides or 1, padding=conv.padding,
      dilation=conv.kernel_dilation or 1,
      implementation=implementation).flops


def _error_curve(cls, kernel, candidates):
  """Estimated relative error of each candidate rank, from the spectra."""
  spectra = decomposition._spectra(cls, np.asarray(kernel, np.float64), None)
  curves = [ranks_lib.energy_curve(s) for s, _ in spectra]

  def tail(curve, r):
    return min(1.0, max(0.0, 1.0 - curve[min(r, len(curve)) - 1]))

  out = []
  for rank in candidates:
    ranks = rank if isinstance(rank, tuple) else (rank,)
    # One spectrum: its exact tail. Tucker's two modes (or a TT chain): the
    # energy kept by projecting on every mode, estimated as the product of
    # the kept fractions (it lies below the HOSVD bound, the sum of tails).
    kept = math.prod(1.0 - tail(c, r) for c, r in zip(curves, ranks))
    out.append(math.sqrt(max(0.0, 1.0 - kept)))
  return out


def allocate_budget(layers, fraction):
  """Greedy rank allocation under a total cost budget.

  `layers` is a list of `(costs, errors, dense_cost)`: for each layer the
  cost and estimated relative error of its candidate ranks (increasing
  cost), and its dense cost. Keeping a layer dense (error 0) is always a
  candidate, and factorizations that cost at least as much as dense are not.
  Every layer starts at its cheapest candidate; then the move that buys the
  largest decrease of the summed relative error per unit of cost, among
  those that keep the total within `fraction` of the dense total, is taken
  until none fits (marginal analysis). Returns, per layer, an index into its
  candidates or None for "keep dense".
  """
  options = []
  for costs, errors, dense in layers:
    kept = [(c, e, i) for i, (c, e) in enumerate(zip(costs, errors))
            if c < dense]
    options.append(kept + [(dense, 0.0, None)])
  budget = fraction * sum(dense for *_, dense in layers)
  choice = [0] * len(layers)
  total = sum(opts[0][0] for opts in options)
  if total > budget:
    raise ValueError(
        f"factorize: the budget ({fraction} of the dense total, {budget:.0f})"
        f" is below the cheapest factorization's total ({total})."
    )
  while True:
    best, best_gain = None, 0.0
    for i, opts in enumerate(options):
      cost_now, error_now, _ = opts[choice[i]]
      for k in range(choice[i] + 1, len(opts)):
        extra = opts[k][0] - cost_now
        if total + extra > budget:
          break
        gain = (error_now - opts[k][1]) / max(extra, 1)
        if gain > best_gain:
          best, best_gain = (i, k), gain
    if best is None:
      return [opts[c][2] for opts, c in zip(options, choice)]
    i, k = best
    total += options[i][k][0] - options[i][choice[i]][0]
    choice[i] = k


def factorize(
    model: nnx.Module,
    format: Any,
    *,
    rank: Any = None,
    energy: float | None = None,
    budget: Budget | None = None,
    inputs: jax.Array | None = None,
    filter: Callable[[tuple, nnx.Conv], bool] | None = None,
    data_aware: bool = False,
    implementation: str = "factorized",
    **decompose_kwargs: Any,
) -> FactorizationReport:
  """Replaces, in place, a trained model's convs by factorized layers.

  Walks `model` and replaces every selected `nnx.Conv` by the matching
  jaxfactor layer (`LowRankConv`, `TuckerConv`, ...), its factors from
  `jaxfactor.decompose` of the trained kernel, keeping the bias, strides,
  padding, dilation, dtypes and precision. Fine-tune the result as any nnx
  model.

  Args:
    model: an nnx model, modified in place.
    format: a format class or name ("tucker", "low_rank", ...).
    rank: one rank for every layer: an int/tuple, or a float fraction of each
      layer's dense parameters (as in `decompose`).
    energy: instead, per layer, the smallest rank keeping that fraction of
      the squared singular values.
    budget: instead, `Budget(flops=f)` or `Budget(params=p)`: a target
      fraction of the selected layers' total dense FLOPs or parameters,
      distributed by `allocate_budget` (greedy marginal analysis on each
      layer's singular-value spectra, minimising the summed relative error).
      A FLOP budget needs `inputs`.
    inputs: a sample batch for `model(inputs)`: records each layer's input
      (for FLOP counts in the report and FLOP budgets, and for `data_aware`).
    filter: `filter(path, conv) -> bool` selects the layers; default: every
      conv whose window is larger than 1x1.
    data_aware: decompose against each layer's recorded inputs (`LowRank`,
      `Tucker`; see `decompose(inputs=...)`).
    implementation: the new layers' `implementation`. The default,
      "factorized", runs the factors, so the FLOPs a budget buys are the
      FLOPs that run; "auto" lets each layer pick the faster of factorized
      and reconstructed on the current backend (see `jaxfactor.conv`), and
      FLOPs are then counted for what it picks.
    **decompose_kwargs: passed to `decompose` (e.g. `iterations`, `key`).

  Returns:
    A `FactorizationReport`: per layer the path, shapes, rank, params and
    FLOPs before and after and the relative error; a layer that cannot be
    factorized (groups > 1, input dilation, a mask, ...) is listed with the
    reason and left as it is.
  """
  fn = "factorize"
  cls = ranks_lib.format_class(fn, format)
  given = [name for name, v in (("rank", rank), ("energy", energy),
                                ("budget", budget)) if v is not None]
  if len(given) != 1:
    raise ValueError(
        f"{fn}: give exactly one of `rank`, `energy` and `budget`, got"
        f" {given or 'none'}."
    )
  if budget is not None:
    if not isinstance(budget, Budget):
      raise TypeError(f"{fn}: `budget` must be a jaxfactor.Budget, got"
                      f" {type(budget).__name__}.")
    if budget.flops is not None and inputs is None:
      raise ValueError(f"{fn}: a FLOP budget needs `inputs` to know each"
                       " layer's input shape.")
  if rank is not None and not isinstance(rank, (str, float)) and any(
      isinstance(r, int) and r < 1 for r in np.atleast_1d(rank).tolist()):
    raise ValueError(f"{fn}: `rank` must be >= 1, got {rank!r}.")
  if energy is not None and not (isinstance(energy, (int, float))
                                 and 0 < energy <= 1):
    raise ValueError(
        f"{fn}: `energy` must be a number in (0, 1], got {energy!r}.")
  if data_aware and inputs is None:
    raise ValueError(f"{fn}: `data_aware=True` needs `inputs`.")
  if isinstance(model, nnx.Conv):
    raise TypeError(f"{fn}: `model` is a bare nnx.Conv; factorize works in"
                    " place on the model that holds it.")
  select = filter or _default_filter
  reports, targets = [], []
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, nnx.Conv):
      continue
    shape = tuple(module.kernel.shape)
    reason = _unsupported(module)
    if reason is None and not select(path, module):
      reason = "not selected by the filter"
    if reason is None and cls is formats.SpatiallySeparable and len(shape) < 4:
      reason = "1-D kernel: nothing to separate"
    if reason is not None:
      reports.append(LayerReport(path=path, kernel_shape=shape, skipped=reason))
    else:
      targets.append(path)
  # Record on a copy: the forward pass must not touch the model's state
  # (BatchNorm statistics, RNG counters).
  recorded = (_record_inputs(nnx.clone(model), targets, inputs)
              if inputs is not None else {})

  plans = {}
  for path in targets:
    conv = _get(model, path)
    kernel = conv.kernel[...]
    shape = tuple(kernel.shape)
    x = recorded.get(path)
    plans[path] = dict(conv=conv, kernel=kernel, shape=shape,
                       input_shape=None if x is None else tuple(x.shape),
                       inputs=x if data_aware else None)
  if budget is not None:
    use_flops = budget.flops is not None
    fraction = budget.flops if use_flops else budget.params
    layers, candidates = [], []
    for plan in plans.values():
      ranks = ranks_lib._candidates(plan["shape"], cls)
      dtype = plan["kernel"].dtype
      if use_flops:
        # Each candidate as the new layer will run it.
        costs = [_layer_cost(cls.abstract(plan["shape"], r, dtype),
                             plan["input_shape"], plan["conv"],
                             implementation) for r in ranks]
        dense = _layer_cost(plan["kernel"], plan["input_shape"], plan["conv"])
      else:
        costs = [ranks_lib.num_params(plan["shape"], cls, r) for r in ranks]
        dense = math.prod(plan["shape"])
      layers.append((costs, _error_curve(cls, plan["kernel"], ranks), dense))
      candidates.append(ranks)
    for (path, plan), ranks, index in zip(
        list(plans.items()), candidates, allocate_budget(layers, fraction)):
      if index is None:
        del plans[path]
        reports.append(LayerReport(
            path=path, kernel_shape=plan["shape"],
            input_shape=plan["input_shape"],
            skipped="kept dense: the budget is better spent elsewhere"))
      else:
        plan["rank"] = ranks[index]
  for path, plan in plans.items():
    conv, kernel = plan["conv"], plan["kernel"]
    if budget is not None:
      chosen = dict(rank=plan["rank"])
    elif energy is not None:
      chosen = dict(energy=energy)
    else:
      chosen = dict(rank=rank)
    if rank is not None and not isinstance(rank, str):
      try:  # a rank that does not exist for this layer skips it
        _layers.resolve_rank(fn, cls, plan["shape"], rank)
      except ValueError as error:
        reports.append(LayerReport(path=path, kernel_shape=plan["shape"],
                                   input_shape=plan["input_shape"],
                                   skipped=str(error)))
        continue
    factors = decomposition.decompose(
        kernel, cls, inputs=plan["inputs"],
        dilation=conv.kernel_dilation or 1, **chosen, **decompose_kwargs)
    new = _replacement(cls, conv, factors, implementation)
    _set(model, path, new)
    reports.append(LayerReport(
        path=path, kernel_shape=plan["shape"], input_shape=plan["input_shape"],
        rank=new.rank, params_before=math.prod(plan["shape"]),
        params_after=factors.num_params,
        flops_before=_layer_cost(kernel, plan["input_shape"], conv),
        flops_after=_layer_cost(factors, plan["input_shape"], conv,
                                implementation),
        relative_error=float(decomposition.relative_error(factors, kernel)),
    ))
  order = {path: i for i, (path, _) in enumerate(nnx.iter_modules(model))}
  reports.sort(key=lambda r: order.get(r.path, -1))
  return FactorizationReport(format=cls.__name__, layers=tuple(reports))


def _replacement(cls, conv: nnx.Conv, factors: formats.Format, implementation):
  """A jaxfactor layer holding `factors` and `conv`'s bias and settings."""
  rank = ranks_lib.rank_of(factors)
  rank_arg = ({"channel_multiplier": rank} if cls is formats.DepthwiseSeparable
              else {"rank": rank})
  layer = nnx.eval_shape(lambda: LAYERS[cls](
      conv.in_features, conv.out_features, conv.kernel_size,
      conv.strides or 1, padding=conv.padding,
      dilation=conv.kernel_dilation or 1, use_bias=conv.bias is not None,
      dtype=conv.dtype, param_dtype=conv.param_dtype,
      precision=conv.precision, implementation=implementation,
      rngs=nnx.Rngs(0), **rank_arg))
  for name, value in factors.params().items():
    setattr(layer, name, nnx.Param(value.astype(conv.param_dtype)))
  # The bias Param itself, metadata (e.g. sharding) included.
  layer.bias = conv.bias if conv.bias is not None else nnx.data(None)
  return layer
