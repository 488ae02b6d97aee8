"""Flax NNX layers for factorized convolutions, and whole-model factorization.

Each layer holds its factors as `nnx.Param`s named after the format's fields
(a tuple field's entries as `{field}_{i}`, e.g. `spatial_0`), exposes them as
a format value (`layer.factors`) and calls `jaxfactor.conv(x, factors) + bias`.
Arguments follow `flax.nnx.Conv`.

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> import jaxfactor
>>> import jaxfactor.nnx
>>> layer = jaxfactor.nnx.TuckerConv(
...     64, 128, (3, 3), rank=jaxfactor.Budget(params=0.25), rngs=nnx.Rngs(0))
>>> layer(jnp.ones((2, 16, 16, 64))).shape
(2, 16, 16, 128)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxfactor import _formats as formats
from jaxfactor import _layers
from jaxfactor import _ranks
from jaxfactor import _surgery
from jaxfactor import _validation
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
  "factorize",
  "from_factors",
  "restore_structure",
)

Initializer = _layers.Initializer
_bias_init = _layers.default_bias_init
_kernel_init = _layers.default_kernel_init


class _FactorizedConv(nnx.Module):
  """What the factorized layers share (see the public subclasses)."""

  format: ClassVar[type[formats.Format]]

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int],
    *,
    rank: Any,
    padding: Any,
    kernel_dilation: int | Sequence[int],
    use_bias: bool,
    dtype: Any,
    param_dtype: Any,
    precision: Any,
    preferred_element_type: Any,
    implementation: str,
    kernel_init: Initializer | None,
    bias_init: Initializer,
    initializers: Mapping[str, Initializer | None],
    rngs: nnx.Rngs,
  ):
    layer = type(self).__name__
    cls = self.format
    window = _layers.kernel_size_tuple(layer, kernel_size)
    _layers.check_features(layer, "in_features", in_features)
    _layers.check_features(layer, "out_features", out_features)
    _layers.check_geometry(layer, window, strides, padding, kernel_dilation)
    _layers.check_options(
      layer, implementation, preferred_element_type, bias_init
    )
    kernel_shape = (*window, in_features, out_features)
    _ranks.check_kernel_shape(layer, kernel_shape, cls)
    self.rank = _layers.resolve_rank(layer, cls, kernel_shape, rank)
    inits = _layers.factor_initializers(layer, cls, initializers, kernel_init)
    values = _layers.init_factors(
      layer,
      cls,
      rngs.params(),
      kernel_shape,
      self.rank,
      param_dtype,
      inits,
      kernel_init,
    )
    self.param_names = tuple(values)
    for name, value in values.items():
      setattr(self, name, nnx.Param(value))
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = nnx.Param(
        bias_init(rngs.params(), (out_features,), param_dtype)
      )
    else:
      self.bias = nnx.data(None)
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = window
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.preferred_element_type = preferred_element_type
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
    """Applies the layer to `x [*batch, *spatial, in_features]`."""
    _layers.check_input_channels(
      type(self).__name__, x, self.in_features, self.kernel_size
    )
    return _layers.apply(
      x,
      self.factors,
      None if self.bias is None else self.bias[...],
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

  `in_features`, `out_features`, `kernel_size`, `strides`, `padding`,
  `kernel_dilation`, `use_bias`, `dtype`, `param_dtype`, `precision`,
  `preferred_element_type`, `bias_init` and `rngs` are `nnx.Conv`'s.

  Args:
    rank: an int, or `jaxfactor.Budget(params=f)`: the largest rank whose
      parameters are at most the fraction `f` of the dense conv's.
    implementation: "auto", "factorized" or "reconstructed", as in
      `jaxfactor.conv`.
    kernel_init: None, or a dense-kernel initializer: the factors are then
      the decomposition of a kernel drawn from it (spectral initialization,
      Khodak et al., ICLR 2021, https://arxiv.org/abs/2105.01029). Excludes
      the factor initializers.
    spatial_init: the `spatial` factor's initializer.
    pointwise_init: the `pointwise` factor's initializer.

  Factor initializers default to Flax's lecun_normal, which gives the
  reconstructed kernel the variance of a dense lecun_normal kernel. Shard a
  factor the Flax way, e.g. `pointwise_init=nnx.with_partitioning(init, names)`.
  """

  format = formats.LowRank

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    *,
    rank: int | Budget,
    padding: Any = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    preferred_element_type: Any = None,
    implementation: str = "auto",
    kernel_init: Initializer | None = None,
    spatial_init: Initializer | None = None,
    pointwise_init: Initializer | None = None,
    bias_init: Initializer = _bias_init,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      rank=rank,
      padding=padding,
      kernel_dilation=kernel_dilation,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      preferred_element_type=preferred_element_type,
      implementation=implementation,
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
      initializers=dict(
        spatial_init=spatial_init, pointwise_init=pointwise_init
      ),
    )


class TuckerConv(_FactorizedConv):
  """1x1 conv, k x k core conv, 1x1 conv (`Tucker`, Tucker-2).

  `in_features`, `out_features`, `kernel_size`, `strides`, `padding`,
  `kernel_dilation`, `use_bias`, `dtype`, `param_dtype`, `precision`,
  `preferred_element_type`, `bias_init` and `rngs` are `nnx.Conv`'s.

  Args:
    rank: an int (both ranks), a pair `(R_in, R_out)`, or
      `jaxfactor.Budget(params=f)`.
    implementation: "auto", "factorized" or "reconstructed", as in
      `jaxfactor.conv`.
    kernel_init: None, or a dense-kernel initializer: the factors are then
      the decomposition of a kernel drawn from it (spectral initialization,
      Khodak et al., ICLR 2021, https://arxiv.org/abs/2105.01029). Excludes
      the factor initializers.
    in_proj_init: the `in_proj` factor's initializer.
    core_init: the `core` factor's initializer.
    out_proj_init: the `out_proj` factor's initializer.

  Factor initializers default to Flax's lecun_normal, which gives the
  reconstructed kernel the variance of a dense lecun_normal kernel. Shard a
  factor the Flax way, e.g. `out_proj_init=nnx.with_partitioning(init, names)`.
  """

  format = formats.Tucker

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    *,
    rank: int | tuple[int, int] | Budget,
    padding: Any = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    preferred_element_type: Any = None,
    implementation: str = "auto",
    kernel_init: Initializer | None = None,
    in_proj_init: Initializer | None = None,
    core_init: Initializer | None = None,
    out_proj_init: Initializer | None = None,
    bias_init: Initializer = _bias_init,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      rank=rank,
      padding=padding,
      kernel_dilation=kernel_dilation,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      preferred_element_type=preferred_element_type,
      implementation=implementation,
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
      initializers=dict(
        in_proj_init=in_proj_init,
        core_init=core_init,
        out_proj_init=out_proj_init,
      ),
    )


class CPConv(_FactorizedConv):
  """1x1 conv, one depthwise 1-D conv per axis, 1x1 conv (`CP`).

  `in_features`, `out_features`, `kernel_size`, `strides`, `padding`,
  `kernel_dilation`, `use_bias`, `dtype`, `param_dtype`, `precision`,
  `preferred_element_type`, `bias_init` and `rngs` are `nnx.Conv`'s.

  Args:
    rank: an int, or `jaxfactor.Budget(params=f)`: the largest rank whose
      parameters are at most the fraction `f` of the dense conv's.
    implementation: "auto", "factorized" or "reconstructed", as in
      `jaxfactor.conv`.
    kernel_init: None, or a dense-kernel initializer: the factors are then
      the decomposition of a kernel drawn from it (spectral initialization,
      Khodak et al., ICLR 2021, https://arxiv.org/abs/2105.01029). Excludes
      the factor initializers.
    in_proj_init: the `in_proj` factor's initializer.
    spatial_init: the `spatial` factor's initializer (every axis).
    out_proj_init: the `out_proj` factor's initializer.

  Factor initializers default to Flax's lecun_normal, which gives the
  reconstructed kernel the variance of a dense lecun_normal kernel. Shard a
  factor the Flax way, e.g. `out_proj_init=nnx.with_partitioning(init, names)`.
  """

  format = formats.CP

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    *,
    rank: int | Budget,
    padding: Any = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    preferred_element_type: Any = None,
    implementation: str = "auto",
    kernel_init: Initializer | None = None,
    in_proj_init: Initializer | None = None,
    spatial_init: Initializer | None = None,
    out_proj_init: Initializer | None = None,
    bias_init: Initializer = _bias_init,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      rank=rank,
      padding=padding,
      kernel_dilation=kernel_dilation,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      preferred_element_type=preferred_element_type,
      implementation=implementation,
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
      initializers=dict(
        in_proj_init=in_proj_init,
        spatial_init=spatial_init,
        out_proj_init=out_proj_init,
      ),
    )


class SpatiallySeparableConv(_FactorizedConv):
  """One 1-D conv per spatial axis (`SpatiallySeparable`): k x 1, then 1 x k.

  `in_features`, `out_features`, `kernel_size`, `strides`, `padding`,
  `kernel_dilation`, `use_bias`, `dtype`, `param_dtype`, `precision`,
  `preferred_element_type`, `bias_init` and `rngs` are `nnx.Conv`'s.

  Args:
    rank: an int (every split), one inner rank per split, or
      `jaxfactor.Budget(params=f)`.
    implementation: "auto", "factorized" or "reconstructed", as in
      `jaxfactor.conv`.
    kernel_init: None, or a dense-kernel initializer: the factors are then
      the decomposition of a kernel drawn from it (spectral initialization,
      Khodak et al., ICLR 2021, https://arxiv.org/abs/2105.01029). Excludes
      the factor initializers.
    factors_init: every factor's initializer.

  Factor initializers default to Flax's lecun_normal, which gives the
  reconstructed kernel the variance of a dense lecun_normal kernel. Shard a
  factor the Flax way, e.g. `factors_init=nnx.with_partitioning(init, names)`.
  """

  format = formats.SpatiallySeparable

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    *,
    rank: int | tuple[int, ...] | Budget,
    padding: Any = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    preferred_element_type: Any = None,
    implementation: str = "auto",
    kernel_init: Initializer | None = None,
    factors_init: Initializer | None = None,
    bias_init: Initializer = _bias_init,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      rank=rank,
      padding=padding,
      kernel_dilation=kernel_dilation,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      preferred_element_type=preferred_element_type,
      implementation=implementation,
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
      initializers=dict(factors_init=factors_init),
    )


class DepthwiseSeparableConv(_FactorizedConv):
  """A depthwise conv, then a pointwise conv (`DepthwiseSeparable`).

  `in_features`, `out_features`, `kernel_size`, `strides`, `padding`,
  `kernel_dilation`, `use_bias`, `dtype`, `param_dtype`, `precision`,
  `preferred_element_type`, `bias_init` and `rngs` are `nnx.Conv`'s.

  Args:
    channel_multiplier: m, an int (the depthwise stage has C*m channels),
      or `jaxfactor.Budget(params=f)`.
    implementation: "auto", "factorized" or "reconstructed", as in
      `jaxfactor.conv`.
    kernel_init: None, or a dense-kernel initializer: the factors are then
      the decomposition of a kernel drawn from it (spectral initialization,
      Khodak et al., ICLR 2021, https://arxiv.org/abs/2105.01029). Excludes
      the factor initializers.
    depthwise_init: the `depthwise` factor's initializer.
    pointwise_init: the `pointwise` factor's initializer.

  Factor initializers default to Flax's lecun_normal, which gives the
  reconstructed kernel the variance of a dense lecun_normal kernel. Shard a
  factor the Flax way, e.g. `pointwise_init=nnx.with_partitioning(init, names)`.
  """

  format = formats.DepthwiseSeparable

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    *,
    channel_multiplier: int | Budget = 1,
    padding: Any = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    preferred_element_type: Any = None,
    implementation: str = "auto",
    kernel_init: Initializer | None = None,
    depthwise_init: Initializer | None = None,
    pointwise_init: Initializer | None = None,
    bias_init: Initializer = _bias_init,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      rank=channel_multiplier,
      padding=padding,
      kernel_dilation=kernel_dilation,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      preferred_element_type=preferred_element_type,
      implementation=implementation,
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
      initializers=dict(
        depthwise_init=depthwise_init, pointwise_init=pointwise_init
      ),
    )

  def _static(self):
    return {"channel_multiplier": self.rank}


class TensorTrainConv(_FactorizedConv):
  """A depthwise conv into `R_0` ranks, then one 1x1 contraction per TT core
  (`TensorTrain`, Garipov et al. 2016).

  `in_features`, `out_features`, `kernel_size`, `strides`, `padding`,
  `kernel_dilation`, `use_bias`, `dtype`, `param_dtype`, `precision`,
  `preferred_element_type`, `bias_init` and `rngs` are `nnx.Conv`'s. The
  channels are split into modes by default (`jaxfactor.decompose`'s
  `in_modes`); a train with other modes comes from `from_factors`.

  Args:
    rank: an int (every TT rank, clipped to its maximum: two cores), one
      rank per core `(R_0, ..., R_{d-1})` (d cores), or
      `jaxfactor.Budget(params=f)`.
    implementation: "auto", "factorized" or "reconstructed", as in
      `jaxfactor.conv`.
    kernel_init: None, or a dense-kernel initializer: the factors are then
      the decomposition of a kernel drawn from it (spectral initialization,
      Khodak et al., ICLR 2021, https://arxiv.org/abs/2105.01029). Excludes
      the factor initializers.
    spatial_init: the `spatial` factor's initializer (default lecun_normal).
    cores_init: every core's initializer (default lecun_normal with fan-in
      `R_in * c_i`).

  The default initializers give the reconstructed kernel the variance of a
  dense lecun_normal kernel.
  """

  format = formats.TensorTrain

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    *,
    rank: int | tuple[int, ...] | Budget,
    padding: Any = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    preferred_element_type: Any = None,
    implementation: str = "auto",
    kernel_init: Initializer | None = None,
    spatial_init: Initializer | None = None,
    cores_init: Initializer | None = None,
    bias_init: Initializer = _bias_init,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      in_features,
      out_features,
      kernel_size,
      strides,
      rank=rank,
      padding=padding,
      kernel_dilation=kernel_dilation,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      preferred_element_type=preferred_element_type,
      implementation=implementation,
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
      initializers=dict(spatial_init=spatial_init, cores_init=cores_init),
    )


class DepthwiseConv(nnx.Module):
  """A depthwise convolution, `kernel [*window, 1, C*m]` named `depthwise`.

  Output channel `c*m + j` filters input channel `c`, as Flax's
  `nnx.Conv(feature_group_count=C)`; runs `jaxfactor.depthwise_conv`.

  `in_features`, `kernel_size`, `strides`, `padding`, `kernel_dilation`,
  `use_bias`, `dtype`, `param_dtype`, `precision`, `preferred_element_type`,
  `bias_init` and `rngs` are `nnx.Conv`'s.

  Args:
    channel_multiplier: m, the filters per input channel.
    depthwise_init: the kernel's initializer (Flax's lecun_normal).
  """

  def __init__(
    self,
    in_features: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int] = 1,
    *,
    channel_multiplier: int = 1,
    padding: Any = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    preferred_element_type: Any = None,
    depthwise_init: Initializer = _kernel_init,
    bias_init: Initializer = _bias_init,
    rngs: nnx.Rngs,
  ):
    layer = type(self).__name__
    window = _layers.kernel_size_tuple(layer, kernel_size)
    _layers.check_features(layer, "in_features", in_features)
    _layers.check_features(layer, "channel_multiplier", channel_multiplier)
    _layers.check_geometry(layer, window, strides, padding, kernel_dilation)
    _layers.check_options(layer, "auto", preferred_element_type, bias_init)
    out = in_features * channel_multiplier
    self.depthwise = nnx.Param(
      depthwise_init(rngs.params(), (*window, 1, out), param_dtype)
    )
    self.bias = (
      nnx.Param(bias_init(rngs.params(), (out,), param_dtype))
      if use_bias
      else nnx.data(None)
    )
    self.in_features, self.kernel_size = in_features, window
    self.channel_multiplier = channel_multiplier
    self.strides, self.padding = strides, padding
    self.kernel_dilation = kernel_dilation
    self.use_bias, self.dtype, self.param_dtype = use_bias, dtype, param_dtype
    self.precision = precision
    self.preferred_element_type = preferred_element_type

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer to `x [*batch, *spatial, in_features]`."""
    _layers.check_input_channels(
      type(self).__name__, x, self.in_features, self.kernel_size
    )
    return _layers.apply(
      x,
      self.depthwise[...],
      None if self.bias is None else self.bias[...],
      dtype=self.dtype,
      strides=self.strides,
      padding=self.padding,
      kernel_dilation=self.kernel_dilation,
      precision=self.precision,
      preferred_element_type=self.preferred_element_type,
      kind="depthwise",
    )


class PointwiseConv(nnx.Module):
  """A 1x1 convolution, `kernel [C, F]` named `pointwise`, as a contraction.

  `in_features`, `out_features`, `use_bias`, `dtype`, `param_dtype`,
  `precision`, `preferred_element_type`, `bias_init` and `rngs` are
  `nnx.Conv`'s.

  Args:
    pointwise_init: the kernel's initializer (Flax's lecun_normal).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: Any = None,
    preferred_element_type: Any = None,
    pointwise_init: Initializer = _kernel_init,
    bias_init: Initializer = _bias_init,
    rngs: nnx.Rngs,
  ):
    layer = type(self).__name__
    _layers.check_features(layer, "in_features", in_features)
    _layers.check_features(layer, "out_features", out_features)
    _layers.check_options(layer, "auto", preferred_element_type, bias_init)
    self.pointwise = nnx.Param(
      pointwise_init(rngs.params(), (in_features, out_features), param_dtype)
    )
    self.bias = (
      nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
      if use_bias
      else nnx.data(None)
    )
    self.in_features, self.out_features = in_features, out_features
    self.use_bias, self.dtype, self.param_dtype = use_bias, dtype, param_dtype
    self.precision = precision
    self.preferred_element_type = preferred_element_type

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer to `x [..., in_features]`."""
    _layers.check_input_channels(type(self).__name__, x, self.in_features, ())
    return _layers.apply(
      x,
      self.pointwise[...],
      None if self.bias is None else self.bias[...],
      dtype=self.dtype,
      strides=1,
      padding="SAME",
      kernel_dilation=1,
      precision=self.precision,
      preferred_element_type=self.preferred_element_type,
      kind="pointwise",
    )


_LAYERS: dict[type[formats.Format], type[_FactorizedConv]] = {
  formats.LowRank: LowRankConv,
  formats.Tucker: TuckerConv,
  formats.CP: CPConv,
  formats.SpatiallySeparable: SpatiallySeparableConv,
  formats.DepthwiseSeparable: DepthwiseSeparableConv,
  formats.TensorTrain: TensorTrainConv,
}


# --- factorizing a trained model ---------------------------------------------


def _default_filter(path, conv) -> bool:
  del path
  return math.prod(conv.kernel_size) > 1


def _unsupported(conv: nnx.Conv) -> str | None:
  if conv.kernel.ndim != len(conv.kernel_size) + 2:
    return (
      f"kernel of shape {tuple(conv.kernel.shape)} for a"
      f" {len(conv.kernel_size)}-D window (stacked by nnx.vmap/scan?)"
    )
  if conv.feature_group_count != 1:
    return f"feature_group_count={conv.feature_group_count} (grouped conv)"
  if conv.input_dilation not in (None, 1) and any(
    d != 1 for d in np.atleast_1d(conv.input_dilation)
  ):
    return f"input_dilation={conv.input_dilation} (transposed conv)"
  if conv.mask is not None:
    return "masked kernel"
  if not callable(conv.conv_general_dilated) or (
    conv.conv_general_dilated is not jax.lax.conv_general_dilated
  ):
    return "custom conv_general_dilated"
  padding = conv.padding
  if isinstance(padding, str) and padding not in (
    "SAME",
    "VALID",
    "CIRCULAR",
    "REFLECT",
    "CAUSAL",
  ):
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
  store: dict[tuple[Any, ...], jax.Array] = {}
  convs = {path: _get(model, path) for path in paths}
  try:
    for path, conv in convs.items():
      _set(model, path, _Recorder(conv, store, path))
    model(inputs)
  finally:
    for path, conv in convs.items():
      _set(model, path, conv)
  return store


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
  allow_larger: bool = False,
  progress: bool = False,
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
    rank: one rank for every layer: an int/tuple, or
      `jaxfactor.Budget(params=f)` (each layer at that fraction of its dense
      parameters), as in `decompose`.
    energy: instead, per layer, the smallest rank keeping that fraction of
      the squared singular values.
    budget: instead, `Budget(flops=f)` or `Budget(params=f)`: a target
      fraction of the selected layers' total dense FLOPs or parameters,
      spread over the layers by greedy marginal analysis on each layer's
      singular-value spectra (minimising the summed relative error; a layer
      can be kept dense). A FLOP budget needs `inputs`.
    inputs: a sample batch for `model(inputs)`: records each layer's input
      (for FLOP counts in the report and FLOP budgets, and for `data_aware`).
    filter: `filter(path, conv) -> bool` selects the layers; default: every
      conv whose window is larger than 1x1.
    data_aware: decompose against each layer's recorded inputs (`LowRank`,
      `Tucker`; see `decompose(inputs=...)`).
    implementation: the new layers' `implementation`. The default,
      "factorized", runs the factors, so the FLOPs a budget buys are the
      FLOPs that run; "auto" lets each layer pick the faster of factorized
      and reconstructed (see `jaxfactor.conv`), and FLOPs are then counted
      for what it picks on the default backend.
    allow_larger: factorize a layer even where its factorization has more
      parameters than the dense kernel, or more FLOPs on the recorded input
      (by default such a layer stays dense and the report says why).
    progress: print one line per layer to stderr as it is decomposed.
    **decompose_kwargs: passed to `decompose` (e.g. `iterations`, `key`).

  Returns:
    A `FactorizationReport`: per layer the path, shapes, rank, params and
    FLOPs before and after and the relative error; a layer that cannot be
    factorized (groups > 1, input dilation, a mask, ...) is listed with the
    reason and left as it is.

  Raises:
    ValueError: not exactly one of `rank`, `energy` and `budget`; a budget
      below the cheapest factorization; `data_aware` or a FLOP budget
      without `inputs`.
    TypeError: a float `rank`, a `budget` that is not a `Budget`, a bare
      `nnx.Conv` as `model`.
  """
  fn = "factorize"
  cls = _ranks.format_class(fn, format)
  _surgery.check_choice(fn, rank, energy, budget, inputs, data_aware)
  if isinstance(model, nnx.Conv):
    raise TypeError(
      f"{fn}: `model` is a bare nnx.Conv; factorize works in"
      " place on the model that holds it."
    )
  select = filter or _default_filter
  skipped, targets = [], []
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
      skipped.append(LayerReport(path=path, kernel_shape=shape, skipped=reason))
    else:
      targets.append(path)
  # Record on a copy: the forward pass must not touch the model's state
  # (BatchNorm statistics, RNG counters).
  recorded = (
    _record_inputs(nnx.clone(model), targets, inputs)
    if inputs is not None
    else {}
  )
  sites = []
  for path in targets:
    conv = _get(model, path)
    if isinstance(conv.kernel.get_value(), jax.ShapeDtypeStruct):
      raise ValueError(
        f"{fn}: the model is abstract (from nnx.eval_shape?): its kernels"
        " have no values to decompose. To rebuild a factorized model's"
        " structure for a checkpoint, use"
        " jaxfactor.nnx.restore_structure."
      )
    sites.append(
      _surgery.Site(
        path=path,
        kernel=conv.kernel[...],
        strides=conv.strides,
        padding=conv.padding,
        kernel_dilation=conv.kernel_dilation,
        inputs=recorded.get(path),
      )
    )
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
  for path, value in factors.items():
    _set(
      model,
      path,
      _replacement(
        cls,
        _get(model, path),
        _ranks.rank_of(value),
        {
          name: param.astype(_get(model, path).param_dtype)
          for name, param in value.params().items()
        },
        implementation,
      ),
    )
  order = [path for path, _ in nnx.iter_modules(model)]
  return _surgery.ordered(cls.__name__, [*skipped, *reports], order)


def _layer(
  cls,
  rank,
  values: Mapping[str, Any],
  bias: Any,
  *,
  in_features: int,
  out_features: int,
  kernel_size,
  strides,
  padding,
  kernel_dilation,
  dtype,
  param_dtype,
  precision,
  preferred_element_type,
  implementation,
) -> _FactorizedConv:
  """A jaxfactor layer of `rank` holding `values` (arrays or abstract) and
  `bias` (an `nnx.Param`, or None), built without initializing anything."""
  if cls is formats.DepthwiseSeparable:
    rank_arg = {"channel_multiplier": rank}
  elif cls is formats.TensorTrain:
    # A train of any modes: built with the default ones, then given the
    # values' (rank 1 is valid whatever the modes).
    rank_arg = {"rank": 1}
  else:
    rank_arg = {"rank": rank}
  layer = nnx.eval_shape(
    lambda: _LAYERS[cls](
      in_features,
      out_features,
      kernel_size,
      strides,
      padding=padding,
      kernel_dilation=kernel_dilation,
      use_bias=bias is not None,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      preferred_element_type=preferred_element_type,
      implementation=implementation,
      rngs=nnx.Rngs(0),
      **rank_arg,
    )
  )
  for name in set(layer.param_names) - set(values):
    delattr(layer, name)
  for name, value in values.items():
    setattr(layer, name, nnx.Param(value))
  layer.param_names, layer.rank = tuple(values), rank
  # The bias Param itself, metadata (e.g. sharding) included.
  layer.bias = bias
  if bias is None:
    layer.bias = nnx.data(None)
  return layer


def _replacement(
  cls, conv: nnx.Conv, rank, values: Mapping[str, Any], implementation: str
) -> _FactorizedConv:
  """The jaxfactor layer standing in for `conv`: its bias and settings."""
  return _layer(
    cls,
    rank,
    values,
    conv.bias,
    in_features=conv.in_features,
    out_features=conv.out_features,
    kernel_size=conv.kernel_size,
    strides=conv.strides or 1,
    padding=conv.padding,
    kernel_dilation=conv.kernel_dilation or 1,
    dtype=conv.dtype,
    param_dtype=conv.param_dtype,
    precision=conv.precision,
    preferred_element_type=conv.preferred_element_type,
    implementation=implementation,
  )


def from_factors(
  factors: formats.Format,
  strides: int | Sequence[int] = 1,
  *,
  bias: jax.typing.ArrayLike | None = None,
  padding: Any = "SAME",
  kernel_dilation: int | Sequence[int] = 1,
  dtype: Any = None,
  precision: Any = None,
  preferred_element_type: Any = None,
  implementation: str = "auto",
) -> _FactorizedConv:
  """The nnx layer of a format value: `LowRankConv` for a `LowRank`, etc.

  The layer holds `factors` (and `bias`, when given) as its parameters, in
  the factors' dtype (its `param_dtype`); nothing is initialized or
  decomposed.

  Args:
    factors: a format value, e.g. from `jaxfactor.decompose`.
    strides: as `nnx.Conv`.
    bias: `[F]`, or None for a layer without bias.
    padding: as `nnx.Conv`.
    kernel_dilation: as `nnx.Conv`.
    dtype: as `nnx.Conv`.
    precision: as `nnx.Conv`.
    preferred_element_type: as `nnx.Conv`.
    implementation: as in `jaxfactor.conv`.

  Returns:
    A `LowRankConv`, `TuckerConv`, `CPConv`, `SpatiallySeparableConv`,
    `DepthwiseSeparableConv` or `TensorTrainConv` whose `factors` equal
    `factors`.

  >>> import jax.numpy as jnp
  >>> import jaxfactor, jaxfactor.nnx
  >>> f = jaxfactor.LowRank(jnp.ones((3, 3, 4, 2)), jnp.ones((2, 8)))
  >>> layer = jaxfactor.nnx.from_factors(f, bias=jnp.zeros(8))
  >>> type(layer).__name__, layer(jnp.ones((1, 5, 5, 4))).shape
  ('LowRankConv', (1, 5, 5, 8))
  """
  fn = "from_factors"
  if not isinstance(factors, formats.Format):
    raise TypeError(
      f"{fn}: `factors` must be a jaxfactor format, got"
      f" {type(factors).__name__}."
    )
  factors.check(fn)
  if bias is not None:
    bias = _validation.check_array(fn, "bias", bias)
    if tuple(bias.shape) != (factors.out_features,):
      raise ValueError(
        f"{fn}: `bias` must have shape ({factors.out_features},) for"
        f" factors with {factors.out_features} output features, got"
        f" {tuple(bias.shape)}."
      )
  cls = type(factors)
  return _layer(
    cls,
    _ranks.rank_of(factors),
    factors.params(),
    None if bias is None else nnx.Param(jnp.asarray(bias, factors.dtype)),
    in_features=factors.in_features,
    out_features=factors.out_features,
    kernel_size=factors.window,
    strides=strides,
    padding=padding,
    kernel_dilation=kernel_dilation,
    dtype=dtype,
    param_dtype=factors.dtype,
    precision=precision,
    preferred_element_type=preferred_element_type,
    implementation=implementation,
  )


def restore_structure(
  model: nnx.Module,
  format: Any,
  ranks: Mapping[str, Any],
  *,
  implementation: str = "factorized",
) -> None:
  """Rebuilds, in place, a factorized model's structure, decomposing nothing.

  Replaces each `nnx.Conv` named in `ranks` by the jaxfactor layer of that
  rank, with placeholder factors: zeros, or abstract where the model is
  abstract (`nnx.eval_shape`). A checkpoint's values then fill them. With
  orbax:

      abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
      jaxfactor.nnx.restore_structure(abstract, "tucker", ranks)
      graphdef, abstract_state = nnx.split(abstract)
      state = checkpointer.restore(path, abstract_state)
      model = nnx.merge(graphdef, state)

  Args:
    model: the dense model (concrete or abstract), modified in place.
    format: the format `factorize` used.
    ranks: `{"path/to/conv": rank}`: `FactorizationReport.ranks`, e.g.
      saved as JSON next to the checkpoint (lists are read as tuples).
    implementation: the layers' `implementation`, as in `factorize`.

  Raises:
    ValueError: a path that names no `nnx.Conv` of `model`, or a rank out
      of range for its kernel.
  """
  fn = "restore_structure"
  cls = _ranks.format_class(fn, format)
  _surgery.check_ranks(fn, ranks)
  convs = {
    "/".join(map(str, path)): path
    for path, module in nnx.iter_modules(model)
    if isinstance(module, nnx.Conv)
  }
  unknown = sorted(set(ranks) - set(convs))
  if unknown:
    raise ValueError(
      f"{fn}: `ranks` names {unknown}, which are not nnx.Conv"
      f" layers of the model; its convs are {sorted(convs)}."
    )
  for name, rank in ranks.items():
    path = convs[name]
    conv = _get(model, path)
    rank, values = _surgery.placeholders(
      fn,
      cls,
      tuple(conv.kernel.shape),
      conv.param_dtype,
      rank,
      abstract=isinstance(conv.kernel.get_value(), jax.ShapeDtypeStruct),
    )
    _set(model, path, _replacement(cls, conv, rank, values, implementation))
