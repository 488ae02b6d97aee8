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

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta

from jaxfactor import _formats as formats
from jaxfactor import _layers
from jaxfactor import _ranks
from jaxfactor import _surgery
from jaxfactor._ranks import Budget
from jaxfactor._surgery import FactorizationReport
from jaxfactor._surgery import LayerReport

__all__ = (
  "CPConv",
  "DepthwiseConv",
  "DepthwiseSeparableConv",
  "FactorizationReport",
  "LayerReport",
  "LowRankConv",
  "PointwiseConv",
  "SpatiallySeparableConv",
  "TensorTrainConv",
  "TuckerConv",
  "factorize_variables",
  "restore_structure",
)


Initializer = _layers.Initializer
_bias_init = _layers.default_bias_init
_kernel_init = _layers.default_kernel_init


class _FactorizedConv(nn.Module):
  """What the factorized layers share (see the public subclasses).

  `rank=None` is allowed when the variables already exist (e.g. from
  `factorize_variables`, with a rank per layer): the rank is then read from
  the parameters' shapes.
  """

  format: ClassVar[type[formats.Format]]

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  kernel_dilation: int | Sequence[int] = 1
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
    """This layer's kernel as a format value, from its params dict.

    Args:
      params: the layer's parameters, e.g.
        `variables["params"]["TuckerConv_0"]` (boxed or not).
      in_features: the input channels; needed only for a
        `DepthwiseSeparableConv` whose `channel_multiplier` is not an int.
    """
    params = {k: v for k, v in meta.unbox(params).items() if k != "bias"}
    return self.format.from_params(
      params, **self._static_from_params(params, in_features)
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
    kernel_shape = (*window, x.shape[-1], self.features)
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
    shapes = cls.param_shapes(kernel_shape, rank)
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
      )
    params = {}
    for name, shape in shapes.items():
      init = initializers[cls.field_of(name)]
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
      cls.from_params(params, **self._static(rank)),
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
  `strides`, `padding`, `kernel_dilation`, `use_bias`, `dtype`,
  `param_dtype`, `precision`, `preferred_element_type`, `bias_init`):
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
      reason = None
      if module.feature_group_count != 1:
        reason = f"feature_group_count={module.feature_group_count}"
      elif module.input_dilation not in (None, 1):
        reason = f"input_dilation={module.input_dilation}"
      elif module.mask is not None:
        reason = "masked kernel"
      scope = module.scope
      path = () if scope is None else tuple(scope.path)
      found[path] = dict(
        reason=reason,
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        inputs=args[0],
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
  **decompose_kwargs: Any,
) -> tuple[dict[str, Any], FactorizationReport]:
  """Turns a dense model's variables into the factorized model's.

  Every selected `{"kernel": K, "bias": b}` params dict of a conv becomes
  the factor params of `decompose(K, format, ...)` plus the same bias, with
  the names the jaxfactor linen layers use. The model applies them when its
  conv layers are the matching jaxfactor class with `rank=None` (each
  layer's rank is read from its params) or the same ranks.

  Which kernels are convs: with `model` and `inputs`, exactly those of the
  `nn.Conv` layers that `model.apply(variables, inputs)` calls (grouped,
  input-dilated and masked convs are left dense and reported as skipped),
  and each one's input is recorded (FLOP counts, FLOP budgets,
  `data_aware`). Without them, every kernel of rank >= 3 with a window
  larger than 1x1: pass `model` and `inputs` (or a `filter`) when the model
  has other such kernels (e.g. `DenseGeneral`, `ConvTranspose`).

  Args:
    variables: the dense model's variables (`{"params": ..., ...}`).
    format: a format class or name.
    rank: one rank for every layer, as in `jaxfactor.nnx.factorize`.
    energy: instead, per layer, the smallest rank keeping that fraction of
      the squared singular values.
    budget: instead, a `jaxfactor.Budget` spread over the layers, as in
      `jaxfactor.nnx.factorize` (a FLOP budget needs `model` and `inputs`).
    model: the dense model, to find its convs and record their inputs.
    inputs: a sample input for `model.apply(variables, inputs)`.
    filter: optional `filter(path, kernel) -> bool` selecting the layers.
    data_aware: decompose against each layer's recorded inputs.
    implementation: the implementation the factorized layers will run,
      for the FLOP counts of the report and of a FLOP budget.
    allow_larger: as in `jaxfactor.nnx.factorize`.
    progress: print one line per layer to stderr as it is decomposed.
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
            for k in ("strides", "padding", "kernel_dilation", "inputs")
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
  return new, _surgery.ordered(cls.__name__, [*skipped, *reports], order)


def restore_structure(
  variables: Mapping[str, Any],
  format: Any,
  ranks: Mapping[str, Any],
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

  Returns:
    The factorized model's variables.

  Raises:
    ValueError: a path that names no params dict with a kernel, or a rank
      out of range for its kernel.
  """
  fn = "restore_structure"
  cls = _ranks.format_class(fn, format)
  _surgery.check_ranks(fn, ranks)
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
