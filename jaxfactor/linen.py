"""Flax linen layers for factorized convolutions, and variable conversion.

Each layer declares its factors as params named after the format's fields (a
tuple field's entries as `{field}_{i}`), exactly as the `jaxfactor.nnx`
layers name them, and calls `jaxfactor.conv(x, factors) + bias`. Arguments
mirror `flax.linen.Conv`.

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
...     dense_vars, "tucker", rank=(2, 4))
>>> Net(conv=jaxfactor.linen.TuckerConv).apply(tucker_vars, x).shape
(1, 8, 8, 8)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta

from jaxfactor import _layers
from jaxfactor import _decompose as decomposition
from jaxfactor import _formats as formats
from jaxfactor import _ranks as ranks_lib

__all__ = (
    "CPConv",
    "DepthwiseConv",
    "DepthwiseSeparableConv",
    "LowRankConv",
    "PointwiseConv",
    "SpatiallySeparableConv",
    "TuckerConv",
    "factorize_variables",
)


def _with_partitioning(init, partitioning, name):
  names = _layers.partition_names(partitioning, name)
  return init if names is None else nn.with_partitioning(init, names)


class _FactorizedConv(nn.Module):
  """Shared machinery of the factorized layers (see the subclasses).

  `rank=None` is allowed when the variables already exist (e.g. from
  `factorize_variables`, with a rank per layer): the rank is then read from
  the parameters' shapes.
  """

  format: ClassVar[type[formats.Format]]

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  dilation: int | Sequence[int] = 1
  # Flax's name for `dilation`, so a jaxfactor layer can stand in for
  # `nn.Conv` in models that pass it; it wins when given.
  kernel_dilation: int | Sequence[int] | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  implementation: str = "auto"
  # `init` in the nnx layers; linen reserves `Module.init`.
  initialization: str = "default"
  kernel_init: _layers.Initializer = _layers.default_kernel_init
  bias_init: _layers.Initializer = _layers.default_bias_init
  partitioning: Mapping[str, Sequence[str | None]] | None = None

  def _rank_argument(self) -> Any:
    return self.rank

  def _static(self, rank) -> dict[str, Any]:
    del rank
    return {}

  def _initializers(self) -> dict[str, _layers.Initializer]:
    return {field: getattr(self, arg)
            for field, arg in _layers.INIT_ARGS[self.format].items()}

  def factors(self, params: Mapping[str, Any],
              in_features: int | None = None) -> formats.Format:
    """This layer's kernel as a format value, from its params dict.

    Args:
      params: the layer's parameters, e.g.
        `variables["params"]["TuckerConv_0"]` (boxed or not).
      in_features: the input channels; needed only for a
        `DepthwiseSeparableConv` whose `channel_multiplier` is not an int.
    """
    params = {k: v for k, v in meta.unbox(params).items() if k != "bias"}
    return self.format.from_params(
        params, **self._static_from_params(params, in_features))

  def _static_from_params(self, params, in_features):
    del params, in_features
    return {}

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layer = type(self).__name__
    cls = self.format
    window = _layers.kernel_size_tuple(layer, self.kernel_size)
    _layers.check_features(layer, "features", self.features)
    dilation = (self.dilation if self.kernel_dilation is None
                else self.kernel_dilation)
    _layers.check_geometry(layer, window, self.strides, self.padding,
                           dilation)
    if not hasattr(x, "shape") or len(x.shape) < len(window) + 1:
      _layers.check_input_channels(layer, x, 0, window)
    kernel_shape = (*window, x.shape[-1], self.features)
    ranks_lib.check_kernel_shape(layer, kernel_shape, cls)
    first = cls._fields[0] + ("_0" if cls._fields[0] in cls._tuple_fields
                              else "")
    if self.has_variable("params", first):
      stored = self.factors(self.variables["params"], x.shape[-1])
      _layers.check_input_channels(layer, x, stored.in_features, window)
      rank = ranks_lib.rank_of(stored)
    elif self._rank_argument() is None:
      raise ValueError(f"{layer}: `rank` is required to initialize the layer.")
    else:
      rank = _layers.resolve_rank(layer, cls, kernel_shape,
                                  self._rank_argument())
    shapes = cls.param_shapes(kernel_shape, rank)
    initializers = self._initializers()
    spectral = None
    if self.initialization == "spectral" and self.is_initializing():
      spectral = _layers.init_factors(
          layer, cls, self.make_rng("params"), kernel_shape, rank,
          self.param_dtype, initializers, "spectral", self.kernel_init)
    elif self.initialization not in ("default", "spectral"):
      raise ValueError(
          f"{layer}: `initialization` must be 'default' or 'spectral', got"
          f" {self.initialization!r}.")
    params = {}
    for name, shape in shapes.items():
      init = initializers[cls.field_of(name)]
      if spectral is not None:
        init = lambda key, shape, dtype, value=spectral[name]: value
      init = _with_partitioning(init, self.partitioning, name)
      params[name] = self.param(name, init, shape, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param(
          "bias", _with_partitioning(self.bias_init, self.partitioning, "bias"),
          (self.features,), self.param_dtype)
    return _layers.apply(
        x, cls.from_params(params, **self._static(rank)), bias,
        dtype=self.dtype, strides=self.strides, padding=self.padding,
        dilation=dilation, precision=self.precision,
        implementation=self.implementation,
    )


class LowRankConv(_FactorizedConv):
  """A k x k conv into `rank` channels, then a 1x1 conv (`LowRank`).

  Attributes (besides `flax.linen.Conv`'s `features`, `kernel_size`,
  `strides`, `padding`, `use_bias`, `dtype`, `param_dtype`, `precision`,
  `bias_init`; `dilation` is its `kernel_dilation`):
    rank: an int, or a float in (0, 1]: the largest rank whose parameters are
      at most that fraction of the dense conv's.
    implementation: passed to `jaxfactor.conv`.
    initialization: "default" or "spectral" (decompose a dense
      `kernel_init` draw); the nnx layers' `init` (linen reserves `init`).
    spatial_init, pointwise_init: factor initializers.
    partitioning: optional mesh-axis names per parameter (or per field),
      applied with `nn.with_partitioning`.
  """

  format = formats.LowRank
  rank: Any = None
  spatial_init: _layers.Initializer = _layers.default_kernel_init
  pointwise_init: _layers.Initializer = _layers.default_kernel_init


class TuckerConv(_FactorizedConv):
  """Tucker-2: 1x1, k x k core, 1x1 (`Tucker`); `rank` int, pair or fraction."""

  format = formats.Tucker
  rank: Any = None
  in_proj_init: _layers.Initializer = _layers.default_kernel_init
  core_init: _layers.Initializer = _layers.default_kernel_init
  out_proj_init: _layers.Initializer = _layers.default_kernel_init


class CPConv(_FactorizedConv):
  """1x1, one depthwise 1-D conv per axis, 1x1 (`CP`)."""

  format = formats.CP
  rank: Any = None
  in_proj_init: _layers.Initializer = _layers.default_kernel_init
  spatial_init: _layers.Initializer = _layers.default_kernel_init
  out_proj_init: _layers.Initializer = _layers.default_kernel_init


class SpatiallySeparableConv(_FactorizedConv):
  """One 1-D conv per spatial axis (`SpatiallySeparable`)."""

  format = formats.SpatiallySeparable
  rank: Any = None
  factors_init: _layers.Initializer = _layers.default_kernel_init


class DepthwiseSeparableConv(_FactorizedConv):
  """A depthwise conv then a pointwise conv (`DepthwiseSeparable`)."""

  format = formats.DepthwiseSeparable
  channel_multiplier: Any = 1
  depthwise_init: _layers.Initializer = _layers.default_kernel_init
  pointwise_init: _layers.Initializer = _layers.default_kernel_init

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
  """A depthwise convolution, kernel `[*window, 1, C*m]` named `depthwise`."""

  kernel_size: int | Sequence[int]
  channel_multiplier: int = 1
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  dilation: int | Sequence[int] = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  depthwise_init: _layers.Initializer = _layers.default_kernel_init
  bias_init: _layers.Initializer = _layers.default_bias_init
  partitioning: Mapping[str, Sequence[str | None]] | None = None

  @nn.compact
  def __call__(self, x):
    layer = type(self).__name__
    window = _layers.kernel_size_tuple(layer, self.kernel_size)
    _layers.check_features(layer, "channel_multiplier", self.channel_multiplier)
    _layers.check_geometry(layer, window, self.strides, self.padding,
                           self.dilation)
    _layers.check_input_channels(layer, x, getattr(x, "shape", (0,))[-1],
                                 window)
    out = x.shape[-1] * self.channel_multiplier
    kernel = self.param("depthwise", _with_partitioning(
        self.depthwise_init, self.partitioning, "depthwise"),
        (*window, 1, out), self.param_dtype)
    if kernel.shape[-1] != out:
      _layers.check_input_channels(
          layer, x, kernel.shape[-1] // self.channel_multiplier, window)
    bias = self.param("bias", _with_partitioning(
        self.bias_init, self.partitioning, "bias"), (out,),
        self.param_dtype) if self.use_bias else None
    return _layers.apply(
        x, kernel, bias, dtype=self.dtype, strides=self.strides,
        padding=self.padding, dilation=self.dilation,
        precision=self.precision, implementation="auto", kind="depthwise")


class PointwiseConv(nn.Module):
  """A 1x1 convolution, kernel `[C, F]` named `pointwise`."""

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  pointwise_init: _layers.Initializer = _layers.default_kernel_init
  bias_init: _layers.Initializer = _layers.default_bias_init
  partitioning: Mapping[str, Sequence[str | None]] | None = None

  @nn.compact
  def __call__(self, x):
    layer = type(self).__name__
    _layers.check_features(layer, "features", self.features)
    _layers.check_input_channels(layer, x, getattr(x, "shape", (0,))[-1], ())
    if self.has_variable("params", "pointwise"):
      stored = self.variables["params"]["pointwise"]
      _layers.check_input_channels(layer, x, meta.unbox(stored).shape[0], ())
    kernel = self.param("pointwise", _with_partitioning(
        self.pointwise_init, self.partitioning, "pointwise"),
        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", _with_partitioning(
        self.bias_init, self.partitioning, "bias"), (self.features,),
        self.param_dtype) if self.use_bias else None
    return _layers.apply(
        x, kernel, bias, dtype=self.dtype, strides=1, padding="SAME",
        dilation=1, precision=self.precision, implementation="auto",
        kind="pointwise")


def _dense_convs(model: nn.Module, variables, inputs) -> dict[tuple, str | None]:
  """Param paths of the `nn.Conv` layers `model` calls, each with the reason
  it cannot be factorized (None when it can)."""
  found = {}

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
      found[tuple(module.scope.path)] = reason
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
    filter=None,
    model: nn.Module | None = None,
    inputs: Any = None,
    **decompose_kwargs: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Turns a dense model's variables into the factorized model's.

  Every `{"kernel": K, "bias": b}` params dict with a conv kernel (window
  larger than 1x1, and `filter(path, kernel)` true when given) becomes the
  factor params of `decompose(K, format, ...)` plus the same bias, with the
  names the jaxfactor linen layers use. Which kernels are conv kernels: with
  `model` and `inputs`, exactly those of the `nn.Conv` layers that
  `model.apply(variables, inputs)` calls (grouped, input-dilated and masked
  convs are left dense and reported as skipped); without them, every kernel
  of rank >= 3 -- pass `model` and `inputs` (or a `filter`) when the model
  has other such kernels (e.g. `DenseGeneral`, `ConvTranspose`). The model applies them when its
  conv layers are the matching jaxfactor class with the same ranks (or with
  `rank=None`, which reads each layer's rank from its params).

  Args:
    variables: the dense model's variables (`{"params": ..., ...}`).
    format: a format class or name.
    rank, energy, **decompose_kwargs: as in `jaxfactor.decompose`.
    filter: optional `filter(path, kernel) -> bool`.
    model, inputs: the dense model and a sample input, to find its convs.

  Returns:
    `(new_variables, report)`; the report lists per converted layer its
    path, kernel shape, rank, params before/after and relative error.
  """
  cls = ranks_lib.format_class("factorize_variables", format)
  report = []
  convs = None
  if (model is None) != (inputs is None):
    raise ValueError("factorize_variables: give both `model` and `inputs`,"
                     " or neither.")
  if model is not None:
    convs = _dense_convs(model, variables, inputs)

  def convert(path, tree):
    if not isinstance(tree, Mapping):
      return tree
    kernel = meta.unbox(tree.get("kernel"))  # nn.Partitioned or an array
    if kernel is not None and hasattr(kernel, "ndim"):
      window = kernel.shape[:-2]
      if (convs is not None and kernel.ndim >= 3
          and convs.get(path, "not an nn.Conv") is not None):
        report.append(dict(path=path, kernel_shape=tuple(kernel.shape),
                           skipped=convs.get(path, "not an nn.Conv")))
        return dict(tree)
      if (kernel.ndim >= 3 and math.prod(window) > 1 and
          (filter is None or filter(path, kernel)) and not (
              cls is formats.SpatiallySeparable and kernel.ndim < 4)):
        factors = decomposition.decompose(
            kernel, cls, rank=rank, energy=energy, **decompose_kwargs)
        out = {k: v for k, v in tree.items() if k != "kernel"}
        out.update(factors.params())
        report.append(dict(
            path=path, kernel_shape=tuple(kernel.shape),
            rank=ranks_lib.rank_of(factors),
            params_before=math.prod(kernel.shape),
            params_after=factors.num_params,
            relative_error=float(decomposition.relative_error(factors, kernel)),
        ))
        return out
    return {k: convert((*path, k), v) for k, v in tree.items()}

  new = {k: (convert((), v) if k == "params" else v) for k, v in variables.items()}
  return new, report
