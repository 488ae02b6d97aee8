"""Flax linen layers for factorized convolutions, and variable conversion.

Each layer declares its factors as params named after the format's fields (a
tuple field's entries as `{field}_{i}`), exactly as the `jaxfactor.nnx`
layers name them, and calls `jaxfactor.conv(x, factors) + bias`. Attributes
follow `flax.linen.Conv`.

The linen idiom for factorizing a trained model: write the model with its
conv class as an attribute (and explicit layer names), and convert the dense
model's variables with `factorize_variables`:

>>> import functools
>>> import jax, jax.numpy as jnp
>>> from flax import linen as nn
>>> import jaxfactor.linen
>>> class Net(nn.Module):
...   conv: type = nn.Conv
...   @nn.compact
...   def __call__(self, x):
...     # An explicit name: linen's automatic names follow the class.
...     return self.conv(features=8, kernel_size=(3, 3), name="conv")(x)
>>> x = jnp.ones((1, 8, 8, 4))
>>> dense_vars = Net().init(jax.random.key(0), x)
>>> tucker_vars, report = jaxfactor.linen.factorize_variables(
...     dense_vars, "tucker", rank=(2, 4), model=Net(), inputs=x)
>>> Net(conv=jaxfactor.linen.TuckerConv).apply(tucker_vars, x).shape
(1, 8, 8, 8)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta
from flax.linen import dtypes as flax_dtypes

from jaxfactor import _adapters
from jaxfactor import _allocate
from jaxfactor import _formats as formats
from jaxfactor import _layers
from jaxfactor import _learned
from jaxfactor import _ranks
from jaxfactor import _surgery
from jaxfactor import _validation
from jaxfactor._learned import PruningLayerReport
from jaxfactor._learned import PruningReport
from jaxfactor._ranks import Budget
from jaxfactor._surgery import AdaptationReport
from jaxfactor._surgery import AdapterLayerReport
from jaxfactor._surgery import FactorizationReport
from jaxfactor._surgery import LayerReport

__all__ = (
  "AdaptationReport",
  "AdaptedConv",
  "AdapterLayerReport",
  "CPConv",
  "DepthwiseConv",
  "DepthwiseSeparableConv",
  "FactorizationReport",
  "LayerReport",
  "LowRankConv",
  "PointwiseConv",
  "PruningLayerReport",
  "PruningReport",
  "SpatiallySeparableConv",
  "TensorTrainConv",
  "TuckerConv",
  "adapt_variables",
  "adapted",
  "extract_variables",
  "factorize_variables",
  "merge_variables",
  "prune_ranks_variables",
  "rank_penalty",
  "restore_structure",
  "unmerge_variables",
)


Initializer = _layers.Initializer
_bias_init = _layers.default_bias_init
_kernel_init = _layers.default_kernel_init


class _FactorizedConv(nn.Module):
  """What the factorized layers share (see the public subclasses).

  `rank=None` is allowed when the variables already exist (e.g. from
  `factorize_variables`, with a rank per layer): the rank is then read from
  the parameters' shapes. With `feature_group_count = G` every group has its
  own factors (of one group's kernel `[*window, C/G, F/G]`, `rank` per
  group), stacked on a leading axis of size G as in `jaxfactor.Grouped`.
  """

  format: ClassVar[type[formats.Format]]

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  preferred_element_type: Any = None
  implementation: str = "auto"
  kernel_init: Initializer | None = None
  bias_init: Initializer = _bias_init

  def _rank_argument(self) -> Any:
    return getattr(self, "rank")  # noqa: B009 (each subclass declares it)

  def _static(self, rank) -> dict[str, Any]:
    del rank
    return {}

  def _given_initializers(self) -> dict[str, Initializer | None]:
    return {
      arg: getattr(self, arg) for arg in _layers.INIT_ARGS[self.format].values()
    }

  def factors(
    self, params: Mapping[str, Any], in_features: int | None = None
  ) -> formats.Format:
    """This layer's kernel as a format value, from its params dict (a
    `jaxfactor.Grouped` one when `feature_group_count > 1`).

    Args:
      params: the layer's parameters, e.g.
        `variables["params"]["TuckerConv_0"]` (boxed or not).
      in_features: the input channels; needed only for a
        `DepthwiseSeparableConv` whose `channel_multiplier` is not an int.
    """
    params = {k: v for k, v in meta.unbox(params).items() if k != "bias"}
    groups = self.feature_group_count
    if in_features is not None and groups > 1:
      in_features //= groups
    return _layers.factors_value(
      self.format,
      params,
      self._static_from_params(params, in_features),
      groups,
    )

  def _static_from_params(self, params, in_features):
    del params, in_features
    return {}

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer to `x [*batch, *spatial, C]`."""
    layer = type(self).__name__
    cls = self.format
    window = _layers.kernel_size_tuple(layer, self.kernel_size)
    _layers.check_features(layer, "features", self.features)
    _layers.check_geometry(
      layer, window, self.strides, self.padding, self.kernel_dilation
    )
    _layers.check_options(
      layer, self.implementation, self.preferred_element_type, self.bias_init
    )
    initializers = _layers.factor_initializers(
      layer, cls, self._given_initializers(), self.kernel_init
    )
    if not hasattr(x, "shape") or len(x.shape) < len(window) + 1:
      _layers.check_input_channels(layer, x, 0, window)
    groups = _layers.check_groups(
      layer, self.feature_group_count, x.shape[-1], self.features
    )
    kernel_shape = _layers.group_kernel_shape(
      window, x.shape[-1], self.features, groups
    )
    _ranks.check_kernel_shape(layer, kernel_shape, cls)
    stored_params = set(self.variables.get("params", {})) - {"bias"}
    if stored_params:
      stored = self.factors(self.variables["params"], x.shape[-1])
      _layers.check_input_channels(layer, x, stored.in_features, window)
      rank = _ranks.rank_of(stored)
    elif self._rank_argument() is None:
      raise ValueError(f"{layer}: `rank` is required to initialize the layer.")
    else:
      rank = _layers.resolve_rank(
        layer, cls, kernel_shape, self._rank_argument()
      )
    shapes = {
      name: ((groups,) if groups > 1 else ()) + shape
      for name, shape in cls.param_shapes(kernel_shape, rank).items()
    }
    if stored_params:  # their own shapes (a TensorTrain's modes, say)
      shapes = {name: tuple(v.shape) for name, v in stored.params().items()}
    spectral = None
    if self.kernel_init is not None and self.is_initializing():
      spectral = _layers.init_factors(
        layer,
        cls,
        self.make_rng("params"),
        kernel_shape,
        rank,
        self.param_dtype,
        initializers,
        self.kernel_init,
        groups,
      )
    params = {}
    for name, shape in shapes.items():
      init = initializers[cls.field_of(name)]
      if groups > 1:
        init = _layers.grouped_initializer(init, groups)
      if spectral is not None:
        init = lambda key, shape, dtype, value=spectral[name]: value
      params[name] = self.param(name, init, shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param(
        "bias", self.bias_init, (self.features,), self.param_dtype
      )
    return _layers.apply(
      x,
      _layers.factors_value(cls, params, self._static(rank), groups),
      bias,
      dtype=self.dtype,
      strides=self.strides,
      padding=self.padding,
      kernel_dilation=self.kernel_dilation,
      precision=self.precision,
      preferred_element_type=self.preferred_element_type,
      implementation=self.implementation,
    )


class LowRankConv(_FactorizedConv):
  """A k x k conv into `rank` channels, then a 1x1 conv (`LowRank`).

  Attributes besides `flax.linen.Conv`'s (`features`, `kernel_size`,
  `strides`, `padding`, `kernel_dilation`, `feature_group_count`,
  `use_bias`, `dtype`, `param_dtype`, `precision`, `preferred_element_type`,
  `bias_init`; with `feature_group_count = G` the rank is per group and
  every factor has a leading groups axis, as in `jaxfactor.Grouped`):
    rank: an int, or `jaxfactor.Budget(params=f)`: the largest rank whose
      parameters are at most the fraction `f` of the dense conv's. None
      reads it from existing params.
    implementation: "auto", "factorized" or "reconstructed", as in
      `jaxfactor.conv`.
    kernel_init: None, or a dense-kernel initializer whose draw is
      decomposed into the initial factors (spectral initialization, Khodak
      et al., ICLR 2021). Excludes the factor initializers.
    spatial_init, pointwise_init: the factors' initializers (default: Flax's
      lecun_normal). Shard a factor the Flax way, e.g.
      `pointwise_init=nn.with_partitioning(init, names)`.
  """

  format = formats.LowRank
  rank: int | Budget | None = None
  spatial_init: Initializer | None = None
  pointwise_init: Initializer | None = None


class TuckerConv(_FactorizedConv):
  """1x1 conv, k x k core conv, 1x1 conv (`Tucker`, Tucker-2).

  As `LowRankConv`, with `rank` an int, a pair `(R_in, R_out)` or a
  `jaxfactor.Budget(params=f)`, and initializers `in_proj_init`,
  `core_init`, `out_proj_init`.
  """

  format = formats.Tucker
  rank: int | tuple[int, int] | Budget | None = None
  in_proj_init: Initializer | None = None
  core_init: Initializer | None = None
  out_proj_init: Initializer | None = None


class CPConv(_FactorizedConv):
  """1x1 conv, one depthwise 1-D conv per axis, 1x1 conv (`CP`).

  As `LowRankConv`, with initializers `in_proj_init`, `spatial_init` (every
  axis), `out_proj_init`.
  """

  format = formats.CP
  rank: int | Budget | None = None
  in_proj_init: Initializer | None = None
  spatial_init: Initializer | None = None
  out_proj_init: Initializer | None = None


class SpatiallySeparableConv(_FactorizedConv):
  """One 1-D conv per spatial axis (`SpatiallySeparable`).

  As `LowRankConv`, with `rank` an int, one inner rank per split or a
  `jaxfactor.Budget(params=f)`, and `factors_init` for every factor.
  """

  format = formats.SpatiallySeparable
  rank: int | tuple[int, ...] | Budget | None = None
  factors_init: Initializer | None = None


class TensorTrainConv(_FactorizedConv):
  """A depthwise conv into `R_0` ranks, then one 1x1 contraction per TT core
  (`TensorTrain`, Garipov et al. 2016).

  As `LowRankConv`, with `rank` an int (every TT rank, clipped to its
  maximum: two cores), one rank per core `(R_0, ..., R_{d-1})` or a
  `jaxfactor.Budget(params=f)`, and initializers `spatial_init` and
  `cores_init` (every core; default lecun_normal with fan-in `R_in * c_i`).
  New layers split the channels into modes by default; stored params may
  hold any modes.
  """

  format = formats.TensorTrain
  rank: int | tuple[int, ...] | Budget | None = None
  spatial_init: Initializer | None = None
  cores_init: Initializer | None = None


class DepthwiseSeparableConv(_FactorizedConv):
  """A depthwise conv, then a pointwise conv (`DepthwiseSeparable`).

  As `LowRankConv`, with `channel_multiplier` (an int, or a
  `jaxfactor.Budget(params=f)`) instead of `rank`, and initializers
  `depthwise_init`, `pointwise_init`.
  """

  format = formats.DepthwiseSeparable
  channel_multiplier: int | Budget = 1
  depthwise_init: Initializer | None = None
  pointwise_init: Initializer | None = None

  def _rank_argument(self):
    return self.channel_multiplier

  def _static(self, rank):
    return {"channel_multiplier": rank}

  def _static_from_params(self, params, in_features):
    channels = params["depthwise"].shape[-1]  # C * m
    if in_features is not None and channels % in_features == 0:
      return {"channel_multiplier": channels // in_features}
    if isinstance(self.channel_multiplier, int):
      return {"channel_multiplier": self.channel_multiplier}
    raise ValueError(
      f"{type(self).__name__}.factors: pass `in_features` to tell C from m"
      f" in the depthwise kernel's C*m = {channels} channels."
    )


class DepthwiseConv(nn.Module):
  """A depthwise convolution, kernel `[*window, 1, C*m]` named `depthwise`.

  Output channel `c*m + j` filters input channel `c`, as Flax's
  `nn.Conv(feature_group_count=C)`; runs `jaxfactor.depthwise_conv`.
  Attributes as `flax.linen.Conv`'s, with `channel_multiplier` (m) and
  `depthwise_init` (the kernel's initializer).
  """

  kernel_size: int | Sequence[int]
  channel_multiplier: int = 1
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  kernel_dilation: int | Sequence[int] = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  preferred_element_type: Any = None
  depthwise_init: Initializer = _kernel_init
  bias_init: Initializer = _bias_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer to `x [*batch, *spatial, C]`."""
    layer = type(self).__name__
    window = _layers.kernel_size_tuple(layer, self.kernel_size)
    _layers.check_features(layer, "channel_multiplier", self.channel_multiplier)
    _layers.check_geometry(
      layer, window, self.strides, self.padding, self.kernel_dilation
    )
    _layers.check_options(
      layer, "auto", self.preferred_element_type, self.bias_init
    )
    _layers.check_input_channels(
      layer, x, getattr(x, "shape", (0,))[-1], window
    )
    out = x.shape[-1] * self.channel_multiplier
    kernel = self.param(
      "depthwise", self.depthwise_init, (*window, 1, out), self.param_dtype
    )
    if meta.unbox(kernel).shape[-1] != out:
      _layers.check_input_channels(
        layer,
        x,
        meta.unbox(kernel).shape[-1] // self.channel_multiplier,
        window,
      )
    bias = (
      self.param("bias", self.bias_init, (out,), self.param_dtype)
      if self.use_bias
      else None
    )
    return _layers.apply(
      x,
      kernel,
      bias,
      dtype=self.dtype,
      strides=self.strides,
      padding=self.padding,
      kernel_dilation=self.kernel_dilation,
      precision=self.precision,
      preferred_element_type=self.preferred_element_type,
      kind="depthwise",
    )


class PointwiseConv(nn.Module):
  """A 1x1 convolution, kernel `[C, F]` named `pointwise`, as a contraction.

  Attributes as `flax.linen.Dense`'s, with `pointwise_init` (the kernel's
  initializer).
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  preferred_element_type: Any = None
  pointwise_init: Initializer = _kernel_init
  bias_init: Initializer = _bias_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer to `x [..., C]`."""
    layer = type(self).__name__
    _layers.check_features(layer, "features", self.features)
    _layers.check_options(
      layer, "auto", self.preferred_element_type, self.bias_init
    )
    _layers.check_input_channels(layer, x, getattr(x, "shape", (0,))[-1], ())
    if self.has_variable("params", "pointwise"):
      stored = self.variables["params"]["pointwise"]
      _layers.check_input_channels(layer, x, meta.unbox(stored).shape[0], ())
    kernel = self.param(
      "pointwise",
      self.pointwise_init,
      (x.shape[-1], self.features),
      self.param_dtype,
    )
    bias = (
      self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    return _layers.apply(
      x,
      kernel,
      bias,
      dtype=self.dtype,
      strides=1,
      padding="SAME",
      kernel_dilation=1,
      precision=self.precision,
      preferred_element_type=self.preferred_element_type,
      kind="pointwise",
    )


def _dense_convs(model: nn.Module, variables, inputs):
  """The `nn.Conv` layers `model.apply(variables, inputs)` calls, by param
  path: each with the reason it cannot be factorized (None when it can),
  its geometry and its input."""
  found: dict[tuple[str, ...], dict[str, Any]] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Conv):
      groups = module.feature_group_count
      reason = None
      if module.input_dilation not in (None, 1):
        reason = f"input_dilation={module.input_dilation}"
      elif module.mask is not None:
        reason = "masked kernel"
      else:
        reason = _surgery.depthwise(args[0].shape[-1] // groups, groups)
      scope = module.scope
      path = () if scope is None else tuple(scope.path)
      found[path] = dict(
        reason=reason,
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        inputs=args[0],
        groups=groups,
      )
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, inputs, mutable=True)
  return found


def factorize_variables(
  variables: Mapping[str, Any],
  format: Any,
  *,
  rank: Any = None,
  energy: float | None = None,
  budget: Budget | None = None,
  model: nn.Module | None = None,
  inputs: Any = None,
  filter: Callable[[tuple, Any], bool] | None = None,
  data_aware: bool = False,
  implementation: str = "factorized",
  allow_larger: bool = False,
  progress: bool = False,
  criterion: str = "spectral",
  loss_fn: Callable[[Mapping[str, Any], Any], jax.Array] | None = None,
  calibration: Any = None,
  **decompose_kwargs: Any,
) -> tuple[dict[str, Any], FactorizationReport]:
  """Turns a dense model's variables into the factorized model's.

  Every selected `{"kernel": K, "bias": b}` params dict of a conv becomes
  the factor params of `decompose(K, format, ...)` plus the same bias, with
  the names the jaxfactor linen layers use. The model applies them when its
  conv layers are the matching jaxfactor class with `rank=None` (each
  layer's rank is read from its params) or the same ranks.

  Which kernels are convs: with `model` and `inputs`, exactly those of the
  `nn.Conv` layers that `model.apply(variables, inputs)` calls (depthwise,
  input-dilated and masked convs are left dense and reported as skipped),
  and each one's input is recorded (FLOP counts, FLOP budgets,
  `data_aware`). Without them, every kernel of rank >= 3 with a window
  larger than 1x1: pass `model` and `inputs` (or a `filter`) when the model
  has other such kernels (e.g. `DenseGeneral`, `ConvTranspose`).

  A grouped conv (`feature_group_count = G`, found through `model` and
  `inputs`: its kernel alone does not tell G) is factorized group by group,
  as `jaxfactor.nnx.factorize` does; its factor params have a leading axis
  of size G, for the jaxfactor layer with the same `feature_group_count`.

  Args:
    variables: the dense model's variables (`{"params": ..., ...}`).
    format: a format class or name.
    rank: one rank for every layer, as in `jaxfactor.nnx.factorize`.
    energy: instead, per layer, the smallest rank keeping that fraction of
      the squared singular values.
    budget: instead, a `jaxfactor.Budget` spread over the layers, as in
      `jaxfactor.nnx.factorize` (a FLOP or latency budget needs `model` and
      `inputs`).
    model: the dense model, to find its convs and record their inputs.
    inputs: a sample input for `model.apply(variables, inputs)`.
    filter: optional `filter(path, kernel) -> bool` selecting the layers.
    data_aware: decompose against each layer's recorded inputs.
    implementation: the implementation the factorized layers will run,
      for the FLOP counts of the report and of a FLOP budget.
    allow_larger: as in `jaxfactor.nnx.factorize`.
    progress: print one line per layer to stderr as it is decomposed.
    criterion: how a `budget` scores each layer's ranks, "spectral" or
      "loss", as in `jaxfactor.nnx.factorize`.
    loss_fn: for `criterion="loss"`, `loss_fn(variables, batch) -> scalar`
      (e.g. `lambda v, b: cross_entropy(model.apply(v, b[0]), b[1])`), run
      under `jax.jit` and `jax.vmap` with one conv's kernel replaced.
    calibration: for `criterion="loss"`, the batch passed to `loss_fn`.
    **decompose_kwargs: passed to `jaxfactor.decompose`.

  Returns:
    `(new_variables, report)`, the report a `FactorizationReport`.

  Raises:
    ValueError, TypeError: as `jaxfactor.nnx.factorize`; `model` without
      `inputs` or the reverse.
  """
  fn = "factorize_variables"
  cls = _ranks.format_class(fn, format)
  if (model is None) != (inputs is None):
    raise ValueError(f"{fn}: give both `model` and `inputs`, or neither.")
  _surgery.check_choice(fn, rank, energy, budget, inputs, data_aware)
  _allocate.check_criterion(fn, criterion, loss_fn, calibration, budget)
  convs = _dense_convs(model, variables, inputs) if model is not None else None
  skipped: list[LayerReport] = []
  sites: list[_surgery.Site] = []
  order: list[tuple[Any, ...]] = []

  def visit(path, tree):
    if not isinstance(tree, Mapping):
      return
    kernel = meta.unbox(tree.get("kernel"))  # nn.Partitioned or an array
    if kernel is not None and hasattr(kernel, "ndim") and kernel.ndim >= 3:
      order.append(path)
      shape = tuple(kernel.shape)
      found = None if convs is None else convs.get(path)
      reason = None
      if convs is not None and found is None:
        reason = "not an nn.Conv"
      elif found is not None and found["reason"] is not None:
        reason = found["reason"]
      elif math.prod(shape[:-2]) == 1:
        reason = "1x1 kernel"
      elif filter is not None and not filter(path, kernel):
        reason = "not selected by the filter"
      elif cls is formats.SpatiallySeparable and len(shape) < 4:
        reason = "1-D kernel: nothing to separate"
      if reason is not None:
        skipped.append(
          LayerReport(path=path, kernel_shape=shape, skipped=reason)
        )
      else:
        geometry = (
          {}
          if found is None
          else {
            k: found[k]
            for k in (
              "strides",
              "padding",
              "kernel_dilation",
              "inputs",
              "groups",
            )
          }
        )
        sites.append(_surgery.Site(path=path, kernel=kernel, **geometry))
      return
    for key, value in tree.items():
      visit((*path, key), value)

  params = variables.get("params", {})
  visit((), params)
  factors, reports = _surgery.factorize_sites(
    fn,
    sites,
    cls,
    rank=rank,
    energy=energy,
    budget=budget,
    data_aware=data_aware,
    implementation=implementation,
    allow_larger=allow_larger,
    progress=progress,
    criterion=criterion,
    losses=(
      _kernel_losses(variables, loss_fn, calibration)
      if criterion == "loss"
      else None
    ),
    **decompose_kwargs,
  )

  def convert(path, tree):
    if not isinstance(tree, Mapping):
      return tree
    if path in factors:
      out = {k: v for k, v in tree.items() if k != "kernel"}
      out.update(factors[path].params())
      return out
    return {k: convert((*path, k), v) for k, v in tree.items()}

  new = {
    k: (convert((), v) if k == "params" else v) for k, v in variables.items()
  }
  return new, _surgery.ordered(
    cls.__name__,
    [*skipped, *reports],
    order,
    criterion=None if budget is None else criterion,
  )


def _kernel_losses(variables, loss_fn, calibration):
  """`losses(path, kernels)`: `loss_fn(variables, calibration)` with each
  kernel of the stack `[n, *window, C, F]` as the params at `path`'s kernel,
  as one vmap."""

  def replaced(tree, keys, kernel):
    if not keys:
      return {**tree, "kernel": kernel}
    return {**tree, keys[0]: replaced(tree[keys[0]], keys[1:], kernel)}

  @functools.partial(jax.jit, static_argnums=0)
  def losses(path, variables, calibration, kernels):
    def one(kernel):
      new = replaced(variables, ("params", *path), kernel)
      return loss_fn(new, calibration)

    return jax.vmap(one)(kernels)

  return lambda path, kernels: losses(path, variables, calibration, kernels)


def restore_structure(
  variables: Mapping[str, Any],
  format: Any,
  ranks: Mapping[str, Any],
  *,
  groups: Mapping[str, int] | None = None,
) -> dict[str, Any]:
  """A factorized model's variables with placeholder factors, decomposing
  nothing.

  Each params dict named in `ranks` has its `kernel` replaced by the factor
  params of that rank: zeros, or `jax.ShapeDtypeStruct`s where `variables`
  are abstract (`jax.eval_shape(model.init, ...)`), so a checkpoint can be
  restored into them. With orbax:

      abstract = jax.eval_shape(DenseNet().init, jax.random.key(0), x)
      target = jaxfactor.linen.restore_structure(abstract, "tucker", ranks)
      variables = checkpointer.restore(path, target)

  Args:
    variables: the dense model's variables (concrete or abstract).
    format: the format `factorize_variables` used.
    ranks: `{"path/to/conv": rank}`, the params paths joined by "/":
      `FactorizationReport.ranks`, e.g. saved as JSON (lists are read as
      tuples).
    groups: `{"path/to/conv": G}` for the grouped convs among them
      (`FactorizationReport.groups`): their kernels `[*window, C/G, F]` do
      not tell G. The rank of a grouped conv is per group.

  Returns:
    The factorized model's variables.

  Raises:
    ValueError: a path that names no params dict with a kernel, or a rank
      out of range for its kernel; `groups` naming a path not in `ranks`,
      or not a positive int.
  """
  fn = "restore_structure"
  cls = _ranks.format_class(fn, format)
  _surgery.check_ranks(fn, ranks)
  groups = _surgery.check_groups(fn, groups, ranks)
  found: list[str] = []

  def convert(path, tree):
    if not isinstance(tree, Mapping):
      return tree
    name = "/".join(path)
    if "kernel" in tree and not isinstance(tree["kernel"], Mapping):
      found.append(name)
      if name in ranks:
        kernel = meta.unbox(tree["kernel"])
        _, values = _surgery.placeholders(
          fn,
          cls,
          tuple(kernel.shape),
          kernel.dtype,
          ranks[name],
          abstract=isinstance(kernel, jax.ShapeDtypeStruct),
          groups=groups.get(name, 1),
        )
        return {**{k: v for k, v in tree.items() if k != "kernel"}, **values}
    return {k: convert((*path, k), v) for k, v in tree.items()}

  new = {
    k: (convert((), v) if k == "params" else v) for k, v in variables.items()
  }
  unknown = sorted(set(ranks) - set(found))
  if unknown:
    raise ValueError(
      f"{fn}: `ranks` names {unknown}, which hold no kernel;"
      f" the kernels are at {sorted(found)}."
    )
  return new


# --- adapters -----------------------------------------------------------------

# The variable collection holding each adapted layer's `scale`.
ADAPTER_COLLECTION = "adapter"


def _adapter_call(
  module: Any, x: Any, y: jax.Array, deterministic: bool | None
) -> jax.Array:
  """`y + scale * conv(x, dW)`: the adapter branch of an adapted layer."""
  layer = type(module).__name__
  cls = _adapters.adapter_format(layer, module.adapter_format)
  _validation.check_implementation(layer, module.adapter_implementation)
  rank_rate = _adapters.check_rate(layer, "rank_dropout", module.rank_dropout)
  module_rate = _adapters.check_rate(
    layer, "module_dropout", module.module_dropout
  )
  groups = getattr(module, "feature_group_count", 1)
  window = _layers.kernel_size_tuple(layer, module.kernel_size)
  kernel_shape = (*window, x.shape[-1] // groups, module.features)
  _ranks.check_kernel_shape(layer, kernel_shape, cls)
  # The param names (they depend on the window only, not the rank).
  shapes = cls.param_shapes(
    _adapters.group_shape(layer, kernel_shape, groups),
    _adapters.resolve_rank(layer, cls, kernel_shape, 1, groups),
  )
  stored = {
    name: meta.unbox(module.get_variable("params", f"adapter_{name}"))
    for name in shapes
    if module.has_variable("params", f"adapter_{name}")
  }
  if stored:
    value = _adapters.update_value(cls, stored, groups)
    rank = _adapters.rank_of(value)
  elif not module.is_initializing():
    raise ValueError(
      f"{layer}: the variables hold no adapter params for this layer; build"
      " them with jaxfactor.linen.adapt_variables (or init the model)."
    )
  elif module.adapter_rank is None:
    raise ValueError(
      f"{layer}: `adapter_rank` is required to initialize the adapter."
    )
  else:
    rank = _adapters.resolve_rank(
      layer, cls, kernel_shape, module.adapter_rank, groups
    )
  values = None
  if not stored:
    values = _adapters.init(
      module.make_rng("params"),
      cls,
      kernel_shape,
      rank,
      groups,
      module.param_dtype,
    )
  params = {}
  for name, shape in cls.param_shapes(
    _adapters.group_shape(layer, kernel_shape, groups), rank
  ).items():
    full = ((groups,) if groups > 1 else ()) + shape
    init = (
      (lambda key, shape, dtype, value=values[name]: value)
      if values is not None
      else jax.nn.initializers.zeros
    )
    params[name] = module.param(
      f"adapter_{name}", init, full, module.param_dtype
    )
  scale = module.variable(
    ADAPTER_COLLECTION,
    "scale",
    lambda: jnp.asarray(
      _adapters.scale(layer, cls, rank, module.adapter_alpha), jnp.float32
    ),
  ).value
  key = None
  if rank_rate or module_rate:
    deterministic = nn.merge_param(
      "deterministic", module.deterministic, deterministic
    )
    if not deterministic:
      key = module.make_rng("dropout")
  promoted = flax_dtypes.promote_dtype(x, *params.values(), dtype=module.dtype)
  update = _adapters.branch(
    promoted[0],
    cls,
    dict(zip(params, promoted[1:])),
    scale=scale,
    groups=groups,
    rank_dropout_rate=rank_rate,
    module_dropout_rate=module_rate,
    key=key,
    strides=module.strides or 1,
    padding=module.padding,
    dilation=module.kernel_dilation or 1,
    precision=module.precision,
    # Flax's nn.Conv has none: it accumulates in the inputs' dtype.
    preferred_element_type=getattr(module, "preferred_element_type", None),
    implementation=module.adapter_implementation,
  )
  return y + update.astype(y.dtype)


class AdaptedConv(nn.Conv):
  """`flax.linen.Conv` plus a trained factorized update.

  Computes `nn.Conv`'s output plus `scale * conv(x, dW)`
  (`jaxfactor.adapter_conv`) with the conv's own strides, padding, dilation,
  `feature_group_count`, dtype and precision: the conv with kernel `W +
  scale * dW.to_dense()`. Its params are `nn.Conv`'s (`kernel`, `bias`) plus
  the update's, `adapter_{name}` (`name` as in `Format.params()`; stacked
  over the groups of a grouped conv), and `scale = alpha / rank` is a
  variable of the "adapter" collection. The update's last factor starts at
  zero, so an adapted model starts as exactly the base model. Build its
  variables from a trained model's with `adapt_variables`.

  Attributes besides `nn.Conv`'s:
    adapter_format: "low_rank", "tucker", "cp" or "spatially_separable".
    adapter_rank: the update's rank per group, needed to initialize (None
      reads it from existing params).
    adapter_alpha: `scale = alpha / rank` at initialization (None: scale 1);
      see `jaxfactor.nnx.Adapter` for which rank.
    rank_dropout: while training, each rank's drop probability.
    module_dropout: while training, the probability of skipping the update.
    deterministic: no dropout when True; or pass it to `__call__`
      (dropout draws from the "dropout" RNG stream).
    adapter_implementation: as `implementation` in `jaxfactor.conv`.

  >>> import jax, jax.numpy as jnp
  >>> import jaxfactor.linen
  >>> layer = jaxfactor.linen.AdaptedConv(16, (3, 3), adapter_rank=2)
  >>> x = jnp.ones((1, 9, 9, 8))
  >>> params = layer.init(jax.random.key(0), x)["params"]
  >>> params["adapter_pointwise"].shape
  (2, 16)
  """

  adapter_format: Any = "low_rank"
  adapter_rank: Any = None
  adapter_alpha: float | None = None
  rank_dropout: float = 0.0
  module_dropout: float = 0.0
  deterministic: bool | None = None
  adapter_implementation: str = "auto"

  @nn.compact
  def __call__(self, inputs, deterministic: bool | None = None):
    """`nn.Conv`'s output plus the update's, for `inputs [*batch, *spatial,
    C]`; `deterministic` (or the attribute) turns dropout off."""
    _check_adaptable(self)
    return _adapter_call(self, inputs, super().__call__(inputs), deterministic)


def _check_adaptable(module: Any) -> None:
  if getattr(module, "input_dilation", 1) not in (None, 1) or (
    getattr(module, "mask", None) is not None
  ):
    raise ValueError(
      f"{type(module).__name__}: an adapter needs input_dilation=1 and no mask."
    )


_ADAPTED: dict[type, type] = {nn.Conv: AdaptedConv}


def adapted(conv_class: type) -> type:
  """The adapted version of a conv class: `nn.Conv` or a jaxfactor layer.

  The class computes `conv_class`'s output plus `scale * conv(x, dW)`, with
  `conv_class`'s attributes and params plus the adapter's, as
  `AdaptedConv` (which is `adapted(nn.Conv)`) does for `nn.Conv`: write
  the model with its conv class as an attribute and pass, e.g.,
  `adapted(jaxfactor.linen.LowRankConv)` to adapt factorized layers.

  Args:
    conv_class: `flax.linen.Conv`, or `LowRankConv`, `TuckerConv`,
      `CPConv`, `SpatiallySeparableConv` or `DepthwiseSeparableConv`.

  Returns:
    A subclass of `conv_class`, `Adapted{name}`, the same class each call.
  """
  if conv_class in _ADAPTED:
    return _ADAPTED[conv_class]
  if not (
    isinstance(conv_class, type) and issubclass(conv_class, _FactorizedConv)
  ):
    raise TypeError(
      "adapted: `conv_class` must be flax.linen.Conv or a jaxfactor linen"
      f" factorized layer class, got {conv_class!r}."
    )

  class Adapted(conv_class):
    adapter_format: Any = "low_rank"
    adapter_rank: Any = None
    adapter_alpha: float | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    deterministic: bool | None = None
    adapter_implementation: str = "auto"

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None):
      y = super().__call__(inputs)
      return _adapter_call(self, inputs, y, deterministic)

  Adapted.__name__ = Adapted.__qualname__ = f"Adapted{conv_class.__name__}"
  Adapted.__module__ = __name__
  Adapted.__doc__ = (
    f"`{conv_class.__name__}` plus a trained factorized update (see"
    " `jaxfactor.linen.AdaptedConv`)."
  )
  _ADAPTED[conv_class] = Adapted
  return Adapted


def _adaptable_convs(model: nn.Module, variables, inputs):
  """The convs `model.apply(variables, inputs)` calls, by param path: the
  module and its input."""
  found: dict[tuple[str, ...], dict[str, Any]] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(
      module, (nn.Conv, _FactorizedConv)
    ):
      scope = module.scope
      path = () if scope is None else tuple(scope.path)
      found[path] = dict(module=module, inputs=args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, inputs, mutable=True)
  return found


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _unfrozen(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _unfrozen(v) for k, v in tree.items()}
  return tree


def adapt_variables(
  variables: Mapping[str, Any],
  format: Any,
  *,
  rank: Any,
  alpha: Any = None,
  model: nn.Module | None = None,
  inputs: Any = None,
  filter: Callable[[tuple, Any], bool] | None = None,
  implementation: str = "auto",
  allow_larger: bool = False,
  key: jax.Array | None = None,
) -> tuple[dict[str, Any], AdaptationReport, Any]:
  """Adds adapters to a trained model's variables.

  Every selected conv's params dict gains the update's params
  (`adapter_{name}`, the last factor zero) and the "adapter" collection
  its `scale`; the base params are unchanged. The adapted model is the
  same model with `AdaptedConv` (for `nn.Conv`) or `adapted(cls)` (for a
  jaxfactor layer) as those layers' class, `adapter_format=format`:

      variables, report, mask = jaxfactor.linen.adapt_variables(
          variables, "low_rank", rank=4, model=Net(), inputs=x)
      tx = optax.multi_transform(
          {"adapter": optax.adam(1e-3), "frozen": optax.set_to_zero()},
          jax.tree.map(lambda m: "adapter" if m else "frozen", mask))
      Net(conv=jaxfactor.linen.AdaptedConv).apply(variables, x)

  (`optax.masked(tx, mask)` alone would pass the frozen params' gradients
  through unchanged: zero them, as above.)

  Args:
    variables: the trained model's variables (`{"params": ...}`).
    format: "low_rank", "tucker", "cp" or "spatially_separable".
    rank: the rank per group, or a `{pattern: rank}` mapping over the
      "/"-joined params paths, as in `jaxfactor.nnx.adapt`.
    alpha: `scale = alpha / rank`: a number or a `{pattern: alpha}` mapping;
      None: scale 1.
    model: the base model, to find its convs (`nn.Conv`, grouped ones
      included, and jaxfactor layers) and record their inputs (extra FLOPs
      in the report). Without it, every `kernel` of rank >= 3 is taken for
      an ungrouped conv.
    inputs: a sample input for `model.apply(variables, inputs)`.
    filter: `filter(path, params) -> bool` selects the layers.
    implementation: the update's implementation, for the FLOP counts.
    allow_larger: as in `jaxfactor.nnx.adapt`.
    key: PRNG key of the non-zero initial factors (default
      `jax.random.key(0)`).

  Returns:
    `(new_variables, report, mask)`: the report an `AdaptationReport`, the
    mask a pytree of bools over `new_variables["params"]`, True at the
    adapter params.

  Raises:
    ValueError: a format that is not an adapter format; `model` without
      `inputs` or the reverse.
  """
  fn = "adapt_variables"
  cls = _adapters.adapter_format(fn, format)
  _validation.check_implementation(fn, implementation)
  if (model is None) != (inputs is None):
    raise ValueError(f"{fn}: give both `model` and `inputs`, or neither.")
  key = jax.random.key(0) if key is None else key
  _validation.check_key(fn, key)
  convs = (
    _adaptable_convs(model, variables, inputs) if model is not None else None
  )
  params = _unfrozen(variables.get("params", {}))
  scales: dict[str, Any] = {}
  reports: list[AdapterLayerReport] = []

  def layers(path, tree):
    if not isinstance(tree, Mapping):
      return
    if convs is not None:
      if path in convs:
        yield path, tree
        return
    else:
      kernel = meta.unbox(tree.get("kernel"))
      if kernel is not None and getattr(kernel, "ndim", 0) >= 3:
        yield path, tree
        return
    for name, value in tree.items():
      yield from layers((*path, name), value)

  for number, (path, tree) in enumerate(list(layers((), params))):
    found = None if convs is None else convs[path]
    module = None if found is None else found["module"]
    groups = getattr(module, "feature_group_count", 1)
    if found is not None and isinstance(module, _FactorizedConv):
      base = module.factors(tree, found["inputs"].shape[-1])
      shape = base.shape
      base_name = type(base).__name__
    else:
      base = None
      shape = tuple(meta.unbox(tree["kernel"]).shape)
      base_name = "dense"
    frozen = sum(math.prod(v.shape) for v in jax.tree.leaves(meta.unbox(tree)))
    reason = None
    if module is not None and (
      getattr(module, "input_dilation", 1) not in (None, 1)
      or getattr(module, "mask", None) is not None
    ):
      reason = "input dilation or mask"
    if reason is None and filter is not None and not filter(path, tree):
      reason = "not selected by the filter"
    layer_rank, layer_alpha, skipped = _surgery.choose_adapter(
      fn,
      cls,
      path,
      shape,
      groups,
      base_name,
      reason,
      rank=rank,
      alpha=alpha,
      allow_larger=allow_larger,
    )
    if skipped is not None:
      reports.append(skipped)
      continue
    dtype = base.dtype if base is not None else meta.unbox(tree["kernel"]).dtype
    values = _adapters.init(
      jax.random.fold_in(key, number), cls, shape, layer_rank, groups, dtype
    )
    for param, value in values.items():
      tree[f"adapter_{param}"] = value
    factor = _adapters.scale(fn, cls, layer_rank, layer_alpha)
    _set_path(scales, path, {"scale": jnp.asarray(factor, jnp.float32)})
    update = _adapters.update_value(cls, values, groups)
    site = _surgery.Site(
      path=path,
      kernel=jax.ShapeDtypeStruct(shape, dtype),
      strides=getattr(module, "strides", 1),
      padding=getattr(module, "padding", "SAME"),
      kernel_dilation=getattr(module, "kernel_dilation", 1),
      inputs=None if found is None else found["inputs"],
    )
    reports.append(
      AdapterLayerReport(
        path=path,
        kernel_shape=shape,
        groups=groups,
        base=base_name,
        input_shape=site.input_shape,
        rank=layer_rank,
        scale=factor,
        trainable=update.num_params,
        frozen=frozen,
        extra_flops=_surgery.adapter_flops(site, update, implementation),
      )
    )
  new = {k: v for k, v in variables.items() if k != "params"}
  new["params"] = params
  new[ADAPTER_COLLECTION] = {
    **_unfrozen(variables.get(ADAPTER_COLLECTION, {})),
    **scales,
  }
  mask = _adapter_mask(params)
  trainable = sum(
    math.prod(leaf.shape)
    for leaf, selected in zip(
      jax.tree.leaves(meta.unbox(params)), jax.tree.leaves(mask)
    )
    if selected
  )
  total = sum(
    math.prod(leaf.shape) for leaf in jax.tree.leaves(meta.unbox(params))
  )
  report = AdaptationReport(
    format=cls.__name__,
    layers=tuple(reports),
    trainable=trainable,
    frozen=total - trainable,
  )
  return new, report, mask


def _adapter_mask(params: Any) -> Any:
  """True at every `adapter_*` param, False elsewhere."""

  def mark(name, tree):
    if isinstance(tree, Mapping):
      return {k: mark(k, v) for k, v in tree.items()}
    return str(name).startswith("adapter_")

  return mark("", params)


def _adapted_params(fn: str, variables) -> list[tuple[tuple, Any, Any]]:
  """`(path, params dict, scale)` of every adapted layer."""
  out = []
  scales = variables.get(ADAPTER_COLLECTION, {})

  def visit(path, tree):
    if not isinstance(tree, Mapping):
      return
    if any(str(k).startswith("adapter_") for k in tree):
      node = scales
      for k in path:
        node = node.get(k, {}) if isinstance(node, Mapping) else {}
      if not isinstance(node, Mapping) or "scale" not in node:
        raise ValueError(
          f"{fn}: the adapter at {'/'.join(path)} has no scale in the"
          f" {ADAPTER_COLLECTION!r} collection: pass every collection of"
          " the adapted variables."
        )
      out.append((path, tree, node["scale"]))
      return
    for k, v in tree.items():
      visit((*path, k), v)

  visit((), _unfrozen(variables.get("params", {})))
  return out


def _split_update(cls, tree) -> tuple[dict, dict, int]:
  """A layer's params as (base params, update params, groups)."""
  update = {
    k[len("adapter_") :]: meta.unbox(v)
    for k, v in tree.items()
    if k.startswith("adapter_")
  }
  base = {k: v for k, v in tree.items() if not k.startswith("adapter_")}
  return base, update, _adapters.groups_of(cls, update)


def merge_variables(
  variables: Mapping[str, Any], format: Any
) -> dict[str, Any]:
  """The plain model's variables, every adapter folded into its base.

  A dense `kernel` becomes `kernel + scale * dW.to_dense()`; the factor
  params of a jaxfactor layer stay that layer's format, the update written
  in it and concatenated along the rank (exact; see
  `jaxfactor.merge_update` for the pairs that merge and the ranks they
  give). The adapter params and the "adapter" collection are dropped:
  apply the result with the base model (`nn.Conv`, or the jaxfactor layer
  with `rank=None`, or the merged rank).

  Args:
    variables: adapted variables (`adapt_variables`, then trained).
    format: the adapters' format.

  Returns:
    The merged variables.

  Raises:
    ValueError: an adapter whose update does not merge into its base's
      format (the message says which pairs do), or without its scale.
  """
  fn = "merge_variables"
  cls = _adapters.adapter_format(fn, format)
  params = _unfrozen(variables.get("params", {}))
  for path, tree, scale in _adapted_params(fn, variables):
    base, update, groups = _split_update(cls, tree)
    value = _adapters.update_value(cls, update, groups)
    where = f"{fn}: the adapter at {'/'.join(path)}"
    if "kernel" in base:
      kernel = meta.unbox(base["kernel"])
      base["kernel"] = _adapters.merge_dense(where, kernel, value, scale)
    else:
      factors = _base_factors(where, base, value)
      if not _adapters.merges_into(cls, type(factors)):
        raise ValueError(_adapters.merge_error(where, cls, type(factors)))
      base.update(_adapters.concatenate(factors, value, scale).params())
    _set_path(params, path, base)
  new = {
    k: v
    for k, v in variables.items()
    if k not in ("params", ADAPTER_COLLECTION)
  }
  new["params"] = params
  return new


def _base_factors(where: str, params: Mapping[str, Any], update: Any):
  """The format value a factorized layer's params hold (`update` gives
  its input channels)."""
  factors = _adapters.factors_of(meta.unbox(params), update.in_features)
  if factors is None or update.groups != 1:
    raise ValueError(
      f"{where} is a {_adapters.describe(update)} update on params"
      f" {sorted(params)}: neither a dense kernel nor a jaxfactor layer's"
      " factors."
    )
  return factors


def unmerge_variables(
  variables: Mapping[str, Any], adapted: Mapping[str, Any], format: Any
) -> dict[str, Any]:
  """Takes `adapted`'s adapters back out of merged variables.

  Each dense `kernel` gets `kernel - scale * dW.to_dense()` (exact to float
  rounding); factor params drop the update's factors (the base factors,
  exactly), as `jaxfactor.nnx.unmerge` does.

  Args:
    variables: merged variables (`merge_variables(adapted, format)`, maybe
      trained further).
    adapted: the adapted variables whose adapters were merged.
    format: the adapters' format.

  Returns:
    The variables with the adapters subtracted.

  Raises:
    ValueError: `variables` has no kernel or factors where `adapted` has an
      adapter.
  """
  fn = "unmerge_variables"
  cls = _adapters.adapter_format(fn, format)
  params = _unfrozen(variables.get("params", {}))
  for path, tree, scale in _adapted_params(fn, adapted):
    base, update, groups = _split_update(cls, tree)
    value = _adapters.update_value(cls, update, groups)
    node: Any = params
    for key in path:
      node = node.get(key) if isinstance(node, Mapping) else None
    name = "/".join(path)
    if not isinstance(node, Mapping):
      raise ValueError(f"{fn}: `variables` has no params at {name}.")
    layer = dict(node)
    where = f"{fn}: the adapter at {name}"
    if "kernel" in base and "kernel" in layer:
      kernel = meta.unbox(layer["kernel"])
      delta = value.to_dense().astype(kernel.dtype)
      layer["kernel"] = kernel - delta * jnp.asarray(scale, kernel.dtype)
    else:
      factors = None if "kernel" in base else _base_factors(where, base, value)
      merged = _adapters.factors_of(meta.unbox(layer), value.in_features)
      if factors is None or merged is None or type(merged) is not type(factors):
        raise ValueError(
          f"{fn}: `variables` has params {sorted(layer)} at {name}, where"
          f" `adapted` has an adapter on params {sorted(base)}."
        )
      rank = _ranks.rank_of(factors)
      layer.update(_adapters.split(merged, rank).params())
    _set_path(params, path, layer)
  new = {k: v for k, v in variables.items() if k != "params"}
  new["params"] = params
  return new


def extract_variables(
  base_variables: Mapping[str, Any],
  tuned_variables: Mapping[str, Any],
  format: Any,
  *,
  rank: Any = None,
  energy: float | None = None,
  alpha: Any = None,
  model: nn.Module | None = None,
  inputs: Any = None,
  filter: Callable[[tuple, Any], bool] | None = None,
) -> tuple[dict[str, Any], AdaptationReport, Any]:
  """Adapters that turn one dense model's conv kernels into another's.

  As `jaxfactor.nnx.extract`, on variables: every dense `kernel` that
  differs gets the `format` decomposition of `(K_tuned - K_base) / scale`,
  per group (for `LowRank` the Eckart-Young optimum). Everything else is
  `base_variables`'.

  Args:
    base_variables: the variables the adapters go on.
    tuned_variables: the same model's variables with other kernels.
    format: "low_rank", "tucker", "cp" or "spatially_separable".
    rank: the rank (per group), or a `{pattern: rank}` mapping.
    energy: instead, per layer, the smallest rank keeping that fraction of
      the squared singular values of the difference.
    alpha: `scale = alpha / rank`, a number or a pattern mapping.
    model: the model, to find grouped convs (with `inputs`); without it
      every kernel of rank >= 3 is taken for an ungrouped conv.
    inputs: a sample input for `model.apply(base_variables, inputs)`.
    filter: `filter(path, params) -> bool` selects the layers.

  Returns:
    `(adapted_variables, report, mask)`, as `adapt_variables`.

  Raises:
    ValueError: not exactly one of `rank` and `energy`; a kernel missing or
      of another shape in `tuned_variables`.
  """
  fn = "extract_variables"
  cls = _adapters.adapter_format(fn, format)
  if (rank is None) == (energy is None):
    raise ValueError(f"{fn}: give exactly one of `rank` and `energy`.")
  if (model is None) != (inputs is None):
    raise ValueError(f"{fn}: give both `model` and `inputs`, or neither.")
  convs = (
    _adaptable_convs(model, base_variables, inputs)
    if model is not None
    else None
  )
  params = _unfrozen(base_variables.get("params", {}))
  tuned = _unfrozen(tuned_variables.get("params", {}))
  scales: dict[str, Any] = {}
  reports: list[AdapterLayerReport] = []

  def kernels(path, tree):
    if not isinstance(tree, Mapping):
      return
    kernel = meta.unbox(tree.get("kernel"))
    if kernel is not None and getattr(kernel, "ndim", 0) >= 3:
      if convs is None or path in convs:
        yield path, tree
      return
    for key, value in tree.items():
      yield from kernels((*path, key), value)

  for path, tree in list(kernels((), params)):
    name = "/".join(path)
    module = None if convs is None else convs[path]["module"]
    groups = getattr(module, "feature_group_count", 1)
    kernel = meta.unbox(tree["kernel"])
    other: Any = tuned
    for key in path:
      other = other.get(key, {}) if isinstance(other, Mapping) else {}
    other = meta.unbox(
      other.get("kernel") if isinstance(other, Mapping) else None
    )
    if other is None or tuple(other.shape) != tuple(kernel.shape):
      raise ValueError(
        f"{fn}: `tuned_variables` has no kernel of shape"
        f" {tuple(kernel.shape)} at {name}."
      )
    shape = tuple(kernel.shape)
    delta = jnp.asarray(other) - jnp.asarray(kernel)
    layer_rank = (
      None if rank is None else _adapters.pattern_value(fn, "rank", rank, name)
    )
    reason = None
    if filter is not None and not filter(path, tree):
      reason = "not selected by the filter"
    elif rank is not None and layer_rank is None:
      reason = "no rank pattern matches its path"
    elif not bool(jnp.any(delta != 0)):
      reason = "unchanged: the kernels are equal"
    if reason is not None:
      reports.append(
        AdapterLayerReport(
          path=path, kernel_shape=shape, groups=groups, skipped=reason
        )
      )
      continue
    layer_alpha = _adapters.pattern_value(fn, "alpha", alpha, name)
    layer_rank, factor, values = _adapters.extract(
      fn,
      delta,
      cls,
      groups,
      rank=layer_rank,
      energy=energy,
      alpha=layer_alpha,
    )
    for key, value in values.items():
      tree[f"adapter_{key}"] = value.astype(kernel.dtype)
    _set_path(scales, path, {"scale": jnp.asarray(factor, jnp.float32)})
    reports.append(
      AdapterLayerReport(
        path=path,
        kernel_shape=shape,
        groups=groups,
        rank=layer_rank,
        scale=factor,
        trainable=sum(math.prod(v.shape) for v in values.values()),
        frozen=sum(
          math.prod(v.shape)
          for k, v in tree.items()
          if not k.startswith("adapter_")
        ),
      )
    )
  new = {k: v for k, v in base_variables.items() if k != "params"}
  new["params"] = params
  new[ADAPTER_COLLECTION] = scales
  mask = _adapter_mask(params)
  leaves = jax.tree.leaves(meta.unbox(params))
  trainable = sum(
    math.prod(leaf.shape)
    for leaf, selected in zip(leaves, jax.tree.leaves(mask))
    if selected
  )
  report = AdaptationReport(
    format=cls.__name__,
    layers=tuple(reports),
    trainable=trainable,
    frozen=sum(math.prod(leaf.shape) for leaf in leaves) - trainable,
  )
  return new, report, mask


# --- learned ranks ------------------------------------------------------------


def rank_penalty(*, strength: float, learning_rate: Any) -> Any:
  """A group-lasso penalty on the rank components of factorized layers, as
  a proximal optax step over a params tree: chain it after the optimizer.

  `jaxfactor.nnx.rank_penalty` explains the groups, the step and the
  choice of groups. Here the factorized layers are found in the params
  tree that optax is given, by their parameter names: each dict whose
  keys, `bias` aside, are exactly a `LowRankConv`'s, `TuckerConv`'s,
  `CPConv`'s, `SpatiallySeparableConv`'s or `TensorTrainConv`'s factor
  names. Other parameters pass through unchanged.

  Args:
    strength: the penalty's weight `lambda >= 0`.
    learning_rate: the optimizer's learning rate (a number or an optax
      schedule of the step count): the threshold is `learning_rate *
      strength`.

  Returns:
    An `optax.GradientTransformation` that needs `params` in `update`:
    `tx = optax.chain(optax.adam(lr), rank_penalty(strength=1e-3,
    learning_rate=lr))`, then `updates, state = tx.update(grads, state,
    params)`.

  Raises:
    ValueError: a negative `strength`, a non-positive `learning_rate`, or
      (at `init`/`update`) parameters without any factorized layer, or
      `update` without `params`.

  >>> import jax, jax.numpy as jnp, optax
  >>> import jaxfactor.linen
  >>> layer = jaxfactor.linen.LowRankConv(8, (3, 3), rank=4)
  >>> params = layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 4)))["params"]
  >>> tx = optax.chain(optax.sgd(0.1), jaxfactor.linen.rank_penalty(
  ...     strength=100.0, learning_rate=0.1))
  >>> state = tx.init(params)
  >>> grads = jax.tree.map(jnp.zeros_like, params)
  >>> updates, state = tx.update(grads, state, params)
  >>> params = optax.apply_updates(params, updates)
  >>> float(jnp.abs(params["pointwise"]).max())  # every component is zero
  0.0
  """
  return _learned.rank_penalty(
    "rank_penalty", None, strength=strength, learning_rate=learning_rate
  )


def _factorized_convs(model: nn.Module, variables, inputs):
  """The jaxfactor layers `model.apply(variables, inputs)` calls, by param
  path: each one's geometry, implementation and input shape."""
  found: dict[tuple[str, ...], dict[str, Any]] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(
      module, _FactorizedConv
    ):
      scope = module.scope
      path = () if scope is None else tuple(scope.path)
      found[path] = dict(
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        implementation=module.implementation,
        input_shape=tuple(args[0].shape),
      )
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, inputs, mutable=True)
  return found


def prune_ranks_variables(
  variables: Mapping[str, Any],
  *,
  tolerance: float = 0.0,
  budget: Budget | None = None,
  model: nn.Module | None = None,
  inputs: Any = None,
) -> tuple[dict[str, Any], PruningReport]:
  """A factorized model's variables without the rank components that
  contribute nothing.

  As `jaxfactor.nnx.prune_ranks`, on variables: the factorized layers'
  params dicts are found by their parameter names (as in
  `rank_penalty`), and each pruned one gets its factors sliced, its bias
  and every other variable kept. The jaxfactor linen layers read their
  rank from existing params, so the same model applies the result.

  Args:
    variables: the model's variables (`{"params": ..., ...}`).
    tolerance: the largest relative contribution `||K_r|| / ||K||`
      removed, `>= 0`; at 0 the components that are exactly zero, which
      leaves the outputs unchanged.
    budget: `jaxfactor.Budget(params=f)` or `Budget(flops=f)`, or None: then
      also remove the least contributing components, across all layers,
      until the layers' total is at most that fraction of their dense total.
    model: the model, to record each layer's geometry and input shape (FLOP
      counts in the report, FLOP budgets).
    inputs: a sample input for `model.apply(variables, inputs)`.

  Returns:
    `(new_variables, report)`, the report a `PruningReport`.

  Raises:
    ValueError, TypeError: as `jaxfactor.nnx.prune_ranks`; `model` without
      `inputs` or the reverse.
  """
  fn = "prune_ranks_variables"
  if (model is None) != (inputs is None):
    raise ValueError(f"{fn}: give both `model` and `inputs`, or neither.")
  found = (
    _factorized_convs(model, variables, inputs) if model is not None else {}
  )
  params = variables.get("params", {})
  layers = []
  for path, cls, names in _learned.layers_by_name(params):
    tree = params
    for key in path:
      tree = tree[key]
    values = {name: meta.unbox(tree[name]) for name in names}
    if cls is formats.DepthwiseSeparable:
      # Only reported as skipped: its multiplier does not matter.
      factors = cls._unflatten((1,), cls._children(values))
    else:
      factors = cls.from_params(values)
    layers.append(
      _learned.Layer(
        path=tuple(path), factors=factors, **found.get(tuple(path), {})
      )
    )
  new, report = _learned.prune_layers(
    fn, layers, tolerance=tolerance, budget=budget
  )

  def convert(path, tree):
    if not isinstance(tree, Mapping):
      return tree
    if path in new:  # the same names, of the new shapes
      return {**tree, **new[path].params()}
    return {k: convert((*path, k), v) for k, v in tree.items()}

  out = {
    k: (convert((), v) if k == "params" else v) for k, v in variables.items()
  }
  return out, report
