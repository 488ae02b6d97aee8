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

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
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
  "Adapter",
  "AdapterLayerReport",
  "AdapterParam",
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
  "adapt",
  "extract",
  "factorize",
  "from_factors",
  "merge",
  "prune_ranks",
  "rank_penalty",
  "restore_structure",
  "unmerge",
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
    feature_group_count: int,
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
    groups = _layers.check_groups(
      layer, feature_group_count, in_features, out_features
    )
    kernel_shape = _layers.group_kernel_shape(
      window, in_features, out_features, groups
    )
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
      groups,
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
    self.feature_group_count = groups
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
    """The layer's kernel as a format value (its current parameters): a
    `jaxfactor.Grouped` one when `feature_group_count > 1`."""
    return _layers.factors_value(
      self.format,
      {name: getattr(self, name)[...] for name in self.param_names},
      self._static(),
      self.feature_group_count,
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
  `kernel_dilation`, `feature_group_count`, `use_bias`, `dtype`,
  `param_dtype`, `precision`, `preferred_element_type`, `bias_init` and
  `rngs` are `nnx.Conv`'s. With `feature_group_count = G` every group has
  its own factors (of one group's kernel `[*window, C/G, F/G]`, `rank` per
  group), stacked on a leading axis of size G as in `jaxfactor.Grouped`.

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
    feature_group_count: int = 1,
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
      feature_group_count=feature_group_count,
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
  `kernel_dilation`, `feature_group_count`, `use_bias`, `dtype`,
  `param_dtype`, `precision`, `preferred_element_type`, `bias_init` and
  `rngs` are `nnx.Conv`'s. With `feature_group_count = G` every group has
  its own factors (of one group's kernel `[*window, C/G, F/G]`, `rank` per
  group), stacked on a leading axis of size G as in `jaxfactor.Grouped`.

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
    feature_group_count: int = 1,
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
      feature_group_count=feature_group_count,
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
  `kernel_dilation`, `feature_group_count`, `use_bias`, `dtype`,
  `param_dtype`, `precision`, `preferred_element_type`, `bias_init` and
  `rngs` are `nnx.Conv`'s. With `feature_group_count = G` every group has
  its own factors (of one group's kernel `[*window, C/G, F/G]`, `rank` per
  group), stacked on a leading axis of size G as in `jaxfactor.Grouped`.

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
    feature_group_count: int = 1,
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
      feature_group_count=feature_group_count,
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
  `kernel_dilation`, `feature_group_count`, `use_bias`, `dtype`,
  `param_dtype`, `precision`, `preferred_element_type`, `bias_init` and
  `rngs` are `nnx.Conv`'s. With `feature_group_count = G` every group has
  its own factors (of one group's kernel `[*window, C/G, F/G]`, `rank` per
  group), stacked on a leading axis of size G as in `jaxfactor.Grouped`.

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
    feature_group_count: int = 1,
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
      feature_group_count=feature_group_count,
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
  `kernel_dilation`, `feature_group_count`, `use_bias`, `dtype`,
  `param_dtype`, `precision`, `preferred_element_type`, `bias_init` and
  `rngs` are `nnx.Conv`'s. With `feature_group_count = G` every group has
  its own factors (of one group's kernel `[*window, C/G, F/G]`, `rank` per
  group), stacked on a leading axis of size G as in `jaxfactor.Grouped`.

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
    feature_group_count: int = 1,
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
      feature_group_count=feature_group_count,
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
  `kernel_dilation`, `feature_group_count`, `use_bias`, `dtype`,
  `param_dtype`, `precision`, `preferred_element_type`, `bias_init` and
  `rngs` are `nnx.Conv`'s. With `feature_group_count = G` every group has
  its own factors (of one group's kernel `[*window, C/G, F/G]`, `rank` per
  group), stacked on a leading axis of size G as in `jaxfactor.Grouped`. The
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
    feature_group_count: int = 1,
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
      feature_group_count=feature_group_count,
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
  """Why `conv` cannot be factorized or adapted."""
  if conv.kernel.ndim != len(conv.kernel_size) + 2:
    return (
      f"kernel of shape {tuple(conv.kernel.shape)} for a"
      f" {len(conv.kernel_size)}-D window (stacked by nnx.vmap/scan?)"
    )
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
  criterion: str = "spectral",
  loss_fn: Callable[[nnx.Module, Any], jax.Array] | None = None,
  calibration: Any = None,
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
    budget: instead, `Budget(flops=f)`, `Budget(params=f)` or
      `Budget(latency=f)`: a target fraction of the selected layers' total
      dense FLOPs, parameters or estimated seconds, spread over the layers
      by `criterion` (a layer can be kept dense). Starting from the uniform
      split (every layer at the fraction of its own cost), ranks move
      between layers only where that lowers the criterion's total. A FLOP
      or latency budget needs `inputs`.
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
    criterion: how a `budget` scores each layer's ranks. "spectral" (the
      default): `-log(1 - e**2)` for the relative error `e` estimated from
      the kernel's singular values, summed over layers (minus the log of
      the product of the energies kept). "loss": the increase of
      `loss_fn(model, calibration)` with that layer alone factorized at
      that rank (a subsample of its ranks, evaluated as one `jax.vmap` over
      the reconstructed kernels per layer), summed over layers.
    loss_fn: for `criterion="loss"`, `loss_fn(model, batch) -> scalar`. It
      runs under `jax.jit` and `jax.vmap` on a copy of the model; put the
      model in evaluation mode first (`model.eval()`) so that dropout and
      batch statistics do not blur the comparison.
    calibration: for `criterion="loss"`, the batch passed to `loss_fn`.
    **decompose_kwargs: passed to `decompose` (e.g. `iterations`, `key`).

  Returns:
    A `FactorizationReport`: per layer the path, shapes, rank, params and
    FLOPs before and after, the relative error, and with `criterion="loss"`
    the measured loss increase; a layer that cannot be factorized (a
    depthwise conv, input dilation, a mask, ...) is listed with the reason
    and left as it is. A grouped conv (`feature_group_count = G`) is
    factorized group by group (`decompose(..., feature_group_count=G)`): its
    rank is per group, its params and FLOPs are the groups' sum.

  Raises:
    ValueError: not exactly one of `rank`, `energy` and `budget`; a budget
      below the cheapest factorization; `data_aware`, a FLOP or a latency
      budget without `inputs`; an unknown `criterion`, `criterion="loss"`
      without a budget or `calibration`, or `loss_fn`/`calibration` without
      it; a loss that is not a finite scalar.
    TypeError: a float `rank`, a `budget` that is not a `Budget`, a bare
      `nnx.Conv` as `model`, a `loss_fn` that is not callable.
  """
  fn = "factorize"
  cls = _ranks.format_class(fn, format)
  _surgery.check_choice(fn, rank, energy, budget, inputs, data_aware)
  _allocate.check_criterion(fn, criterion, loss_fn, calibration, budget)
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
    reason = _unsupported(module) or _surgery.depthwise(
      shape[-2], module.feature_group_count
    )
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
        groups=conv.feature_group_count,
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
    criterion=criterion,
    losses=(
      _kernel_losses(model, loss_fn, calibration)
      if criterion == "loss"
      else None
    ),
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
  return _surgery.ordered(
    cls.__name__,
    [*skipped, *reports],
    order,
    criterion=None if budget is None else criterion,
  )


def _kernel_losses(model, loss_fn, calibration):
  """`losses(path, kernels)`: `loss_fn(model, calibration)` with each kernel
  of the stack `[n, *window, C, F]` in the conv at `path`, as one vmap."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnums=0)
  def losses(path, state, calibration, kernels):
    def one(kernel):
      # Replaced in the state, not in a merged model: nnx refuses to set a
      # variable from inside the vmap that did not create it.
      flat = [
        (key, value.replace(kernel) if key == (*path, "kernel") else value)
        for key, value in nnx.to_flat_state(state)
      ]
      return loss_fn(
        nnx.merge(graphdef, nnx.from_flat_state(flat)), calibration
      )

    return jax.vmap(one)(kernels)

  return lambda path, kernels: losses(path, state, calibration, kernels)


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
  feature_group_count: int = 1,
) -> _FactorizedConv:
  """A jaxfactor layer of `rank` holding `values` (arrays or abstract) and
  `bias` (an `nnx.Param`, or None), built without initializing anything.
  With `feature_group_count > 1`, `rank` is one group's and each value has
  a leading groups axis."""
  if cls is formats.DepthwiseSeparable:
    rank_arg = {"channel_multiplier": rank}
  else:
    # Built at rank 1, then given the values: a train of any modes, or a
    # merged adapter's summed rank, which may exceed `max_rank` (rank 1 is
    # valid whatever the shapes, and the parameter names do not depend on
    # the rank).
    rank_arg = {"rank": 1}
  layer = nnx.eval_shape(
    lambda: _LAYERS[cls](
      in_features,
      out_features,
      kernel_size,
      strides,
      padding=padding,
      kernel_dilation=kernel_dilation,
      feature_group_count=feature_group_count,
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
    feature_group_count=conv.feature_group_count,
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
    `factors` (for a `jaxfactor.Grouped`, the layer of its inner format
    with `feature_group_count` its groups).

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
  groups = 1
  inner = factors
  if isinstance(factors, formats.Grouped):
    groups, inner = factors.groups, factors.inner
  return _layer(
    type(inner),
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
    feature_group_count=groups,
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
      groups=conv.feature_group_count,
    )
    _set(model, path, _replacement(cls, conv, rank, values, implementation))


# --- adapters -----------------------------------------------------------------


class AdapterParam(nnx.LoRAParam):
  """The type of every adapter parameter: train only the adapters with
  `nnx.Optimizer(model, tx, wrt=AdapterParam)`.

  A subclass of Flax's `nnx.LoRAParam` (itself an `nnx.Param`): a filter on
  `nnx.LoRAParam` trains these together with Flax's own `nnx.LoRA` layers,
  and `nnx.Param` still selects every parameter (full fine-tuning).
  """


def _base_kernel_shape(base: Any) -> tuple[int, ...]:
  """The base conv's dense kernel shape `[*window, C/G, F]`."""
  groups = getattr(base, "feature_group_count", 1)
  return (
    *base.kernel_size,
    base.in_features // groups,
    base.out_features,
  )


def _param_count(module: nnx.Module) -> int:
  return sum(
    math.prod(leaf.shape)
    for leaf in jax.tree.leaves(nnx.state(module, nnx.Param))
  )


class Adapter(nnx.Module):
  """A frozen conv plus a trained factorized update: LoRA for convolutions.

  Computes `base(x) + scale * conv(x, dW)` (`jaxfactor.adapter_conv`), the
  update with the base's own strides, padding, dilation, groups, dtype and
  precision, so it equals the base conv with kernel `W + scale *
  dW.to_dense()` (bias included). `dW` is a `LowRank` (LoCon), `Tucker`
  (LyCORIS's Tucker-LoCon), `CP` or `SpatiallySeparable` whose last factor
  starts at zero: at first the adapter computes exactly `base(x)`. A
  grouped base (`feature_group_count = G`) gets one update per group, a
  `jaxfactor.Grouped` (each factor with a leading axis of size G),
  block-diagonal as the base. The update's parameters are `AdapterParam`s named
  `adapter_{name}` (`name` as in `Format.params()`); the base keeps its own
  `nnx.Param`s, under `base`.

  Args:
    base: the frozen layer: an `nnx.Conv` (any groups; no input dilation or
      mask) or a jaxfactor factorized layer (`LowRankConv`, ...).
    format: the update's format, a class or name: "low_rank", "tucker",
      "cp" or "spatially_separable".
    rank: the update's rank per group, as in `jaxfactor.decompose` (an int;
      for `Tucker` also `(R_in, R_out)`, for `SpatiallySeparable` one inner
      rank per split).
    alpha: `scale = alpha / rank`, `rank` being the size of the axis the
      last factor sums over (`R_out` for `Tucker`, the last inner rank for
      `SpatiallySeparable`); None means `alpha = rank` (scale 1).
    rank_dropout: while training, the probability of dropping each rank of
      the update (one mask per call; kept ranks scaled by `1 / (1 - p)`).
    module_dropout: while training, the probability of skipping the whole
      update for a call.
    deterministic: no dropout when True; `model.eval()` sets it, and
      `model.train()` clears it, as for `nnx.Dropout`.
    implementation: how the update runs, as in `jaxfactor.conv`.
    param_dtype: the update's dtype; default: the base's `param_dtype`.
    kernel_init: the initializer of the update's non-zero factors (Flax's
      lecun_normal).
    rngs: for the initial factors (`params` stream), and for dropout
      (`dropout` stream, forked).

  References:
    Hu et al., 2021, LoRA, https://arxiv.org/abs/2106.09685; Yeh et al.,
    2024, LyCORIS, https://arxiv.org/abs/2309.14859.

  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> import jaxfactor.nnx
  >>> conv = nnx.Conv(8, 16, (3, 3), rngs=nnx.Rngs(0))
  >>> adapted = jaxfactor.nnx.Adapter(
  ...     conv, "low_rank", rank=2, rngs=nnx.Rngs(1))
  >>> x = jnp.ones((1, 9, 9, 8))
  >>> bool((adapted(x) == conv(x)).all()), adapted.update.rank
  (True, 2)
  """

  def __init__(
    self,
    base: nnx.Module,
    format: Any,
    *,
    rank: Any,
    alpha: float | None = None,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
    deterministic: bool = False,
    implementation: str = "auto",
    param_dtype: Any = None,
    kernel_init: Initializer = _adapters.default_init,
    rngs: nnx.Rngs,
  ):
    layer = type(self).__name__
    if not isinstance(base, (nnx.Conv, _FactorizedConv)):
      raise TypeError(
        f"{layer}: `base` must be an nnx.Conv or a jaxfactor factorized"
        f" layer, got {type(base).__name__}."
      )
    if isinstance(base, nnx.Conv):
      reason = _unsupported(base)
      if reason is not None:
        raise ValueError(f"{layer}: cannot adapt this nnx.Conv: {reason}.")
    cls = _adapters.adapter_format(layer, format)
    _validation.check_implementation(layer, implementation)
    kernel_shape = _base_kernel_shape(base)
    _ranks.check_kernel_shape(layer, kernel_shape, cls)
    self.groups = getattr(base, "feature_group_count", 1)
    self.rank = _adapters.resolve_rank(
      layer, cls, kernel_shape, rank, self.groups
    )
    self.scale = _adapters.scale(layer, cls, self.rank, alpha)
    self.alpha = alpha
    self.rank_dropout = _adapters.check_rate(
      layer, "rank_dropout", rank_dropout
    )
    self.module_dropout = _adapters.check_rate(
      layer, "module_dropout", module_dropout
    )
    self.deterministic = deterministic
    self.implementation = implementation
    self.format = cls
    values = _adapters.init(
      rngs.params(),
      cls,
      kernel_shape,
      self.rank,
      self.groups,
      param_dtype or base.param_dtype,
      kernel_init,
    )
    self.param_names = tuple(values)
    for name, value in values.items():
      setattr(self, f"adapter_{name}", AdapterParam(value))
    self.base = base
    self.rngs = (
      rngs["dropout"].fork()
      if self.rank_dropout or self.module_dropout
      else nnx.data(None)
    )

  @property
  def update(self) -> formats.Format:
    """The update `dW` as a format value (a `jaxfactor.Grouped` of one per
    group, for a grouped base)."""
    return _adapters.update_value(self.format, self._params(), self.groups)

  def _params(self) -> dict[str, jax.Array]:
    return {
      name: getattr(self, f"adapter_{name}")[...] for name in self.param_names
    }

  def set_view(self, deterministic: bool | None = None):
    """For `nnx.view`: `deterministic=True` turns dropout off."""
    if deterministic is not None:
      self.deterministic = deterministic

  def __call__(self, x: jax.Array) -> jax.Array:
    """`base(x) + scale * conv(x, dW)`, for `x [*batch, *spatial, C]`."""
    y = self.base(x)
    names = list(self.param_names)
    promoted = flax_dtypes.promote_dtype(
      x, *self._params().values(), dtype=self.base.dtype
    )
    key = None
    if not self.deterministic and (self.rank_dropout or self.module_dropout):
      if self.rngs is None:
        raise ValueError(
          f"{type(self).__name__}: dropout needs `rngs`; pass them to the"
          " constructor or to `adapt`."
        )
      key = self.rngs()
    update = _adapters.branch(
      promoted[0],
      self.format,
      dict(zip(names, promoted[1:])),
      scale=self.scale,
      groups=self.groups,
      rank_dropout_rate=self.rank_dropout,
      module_dropout_rate=self.module_dropout,
      key=key,
      strides=self.base.strides or 1,
      padding=self.base.padding,
      dilation=self.base.kernel_dilation or 1,
      precision=self.base.precision,
      preferred_element_type=self.base.preferred_element_type,
      implementation=self.implementation,
    )
    return y + update.astype(y.dtype)


def _adaptable(path, module) -> bool:
  del path
  return isinstance(module, (nnx.Conv, _FactorizedConv))


def _base_name(module: nnx.Module) -> str:
  if isinstance(module, _FactorizedConv):
    return module.format.__name__
  return "dense"


def adapt(
  model: nnx.Module,
  format: Any,
  *,
  rank: Any,
  alpha: Any = None,
  filter: Callable[[tuple, nnx.Module], bool] | None = None,
  inputs: jax.Array | None = None,
  rank_dropout: float = 0.0,
  module_dropout: float = 0.0,
  implementation: str = "auto",
  allow_larger: bool = False,
  rngs: nnx.Rngs | None = None,
) -> AdaptationReport:
  """Puts adapters, in place, on a trained model's convolutions.

  Every selected `nnx.Conv` (grouped ones included) and jaxfactor
  factorized layer (`LowRankConv`, `TuckerConv`, ...) is replaced by an
  `Adapter` holding it as its frozen `base`. The model then computes
  exactly what it did, until the adapters are trained:

      report = jaxfactor.nnx.adapt(model, "low_rank", rank=4)
      optimizer = nnx.Optimizer(model, optax.adam(1e-3),
                                wrt=jaxfactor.nnx.AdapterParam)

  Save only the adapters with `nnx.state(model, AdapterParam)`; load them
  onto the base model by adapting it the same way (`rank=report.ranks`)
  and `nnx.update(model, state)`.

  Args:
    model: an nnx model, modified in place.
    format: "low_rank", "tucker", "cp" or "spatially_separable" (or the
      class).
    rank: the update's rank (per group), as in `Adapter`; or a mapping from
      regular expressions to ranks: each layer takes the first whose
      pattern matches its whole "/"-joined path (`report.ranks` is one); a
      layer that no pattern matches gets no adapter.
    alpha: `scale = alpha / rank`, a number or a `{pattern: alpha}`
      mapping as `rank`; None (or no match): `alpha = rank`.
    filter: `filter(path, module) -> bool` selects the layers; default:
      every `nnx.Conv` and jaxfactor factorized layer.
    inputs: a sample batch for `model(inputs)`: records each layer's input
      shape for the extra FLOPs in the report.
    rank_dropout: as in `Adapter`.
    module_dropout: as in `Adapter`.
    implementation: as in `Adapter`.
    allow_larger: adapt a layer even where the update has at least as many
      parameters as the layer's kernel (a depthwise conv, say); by default
      such a layer is left as it is (fine-tune it instead) and the report
      says why.
    rngs: for the initial factors and dropout; default `nnx.Rngs(0)`.

  Returns:
    An `AdaptationReport`: per layer the rank, scale, trainable and frozen
    parameters and extra FLOPs, or why it was skipped; the model's
    trainable and frozen totals.

  Raises:
    ValueError: a format that is not an adapter format; bad `alpha` or
      dropout rates.
    TypeError: a bare conv as `model`.
  """
  fn = "adapt"
  cls = _adapters.adapter_format(fn, format)
  _validation.check_implementation(fn, implementation)
  if isinstance(model, (nnx.Conv, _FactorizedConv, Adapter)):
    raise TypeError(
      f"{fn}: `model` is a bare {type(model).__name__}; adapt works in"
      " place on the model that holds it (or use jaxfactor.nnx.Adapter)."
    )
  _adapters.check_rate(fn, "rank_dropout", rank_dropout)
  _adapters.check_rate(fn, "module_dropout", module_dropout)
  rngs = nnx.Rngs(0) if rngs is None else rngs
  select = filter or _adaptable
  skipped: list[AdapterLayerReport] = []
  targets: dict[tuple[Any, ...], tuple[Any, float | None]] = {}
  adapters = [p for p, m in nnx.iter_modules(model) if isinstance(m, Adapter)]
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, (nnx.Conv, _FactorizedConv)):
      continue
    if any(path[: len(a) + 1] == (*a, "base") for a in adapters):
      continue
    shape = _base_kernel_shape(module)
    groups = getattr(module, "feature_group_count", 1)
    reason = _unsupported(module) if isinstance(module, nnx.Conv) else None
    if reason is None and not select(path, module):
      reason = "not selected by the filter"
    layer_rank, layer_alpha, report = _surgery.choose_adapter(
      fn,
      cls,
      path,
      shape,
      groups,
      _base_name(module),
      reason,
      rank=rank,
      alpha=alpha,
      allow_larger=allow_larger,
    )
    if report is not None:
      skipped.append(report)
      continue
    targets[path] = (layer_rank, layer_alpha)
  recorded = (
    _record_inputs(nnx.clone(model), list(targets), inputs)
    if inputs is not None
    else {}
  )
  reports = []
  for path, (layer_rank, layer_alpha) in targets.items():
    base = _get(model, path)
    adapter = Adapter(
      base,
      cls,
      rank=layer_rank,
      alpha=layer_alpha,
      rank_dropout=rank_dropout,
      module_dropout=module_dropout,
      implementation=implementation,
      rngs=rngs,
    )
    _set(model, path, adapter)
    reports.append(_adapter_report(path, adapter, recorded.get(path)))
  return _adaptation_report(model, cls, [*skipped, *reports])


def _adapter_report(path, adapter: Adapter, inputs) -> AdapterLayerReport:
  base = adapter.base
  site = _surgery.Site(
    path=path,
    kernel=jax.ShapeDtypeStruct(_base_kernel_shape(base), base.param_dtype),
    strides=base.strides,
    padding=base.padding,
    kernel_dilation=base.kernel_dilation,
    inputs=inputs,
  )
  update = adapter.update
  return AdapterLayerReport(
    path=path,
    kernel_shape=site.shape,
    groups=adapter.groups,
    base=_base_name(base),
    input_shape=site.input_shape,
    rank=adapter.rank,
    scale=adapter.scale,
    trainable=update.num_params,
    frozen=_param_count(base),
    extra_flops=_surgery.adapter_flops(site, update, adapter.implementation),
  )


def _adaptation_report(model, cls, layers) -> AdaptationReport:
  order = {path: i for i, (path, _) in enumerate(nnx.iter_modules(model))}
  trainable = sum(
    math.prod(leaf.shape)
    for leaf in jax.tree.leaves(nnx.state(model, AdapterParam))
  )
  return AdaptationReport(
    format=cls.__name__,
    layers=tuple(sorted(layers, key=lambda r: order.get(r.path, -1))),
    trainable=trainable,
    frozen=_param_count(model) - trainable,
  )


def _adapters_of(model: nnx.Module) -> list[tuple[tuple[Any, ...], Adapter]]:
  return [
    (path, module)
    for path, module in nnx.iter_modules(model)
    if isinstance(module, Adapter)
  ]


def _per_group(fn: Callable[..., formats.Format], value, *args):
  """`fn(value, *args)`; group by group for a `Grouped` value."""
  if not isinstance(value, formats.Grouped):
    return fn(value, *args)
  return formats.Grouped(jax.vmap(lambda v: fn(v, *args))(value.inner))


def _with_factors(base: _FactorizedConv, value: formats.Format):
  """A layer like `base` (bias and settings) holding `value`'s factors."""
  inner = value.inner if isinstance(value, formats.Grouped) else value
  return _layer(
    type(inner),
    _ranks.rank_of(value),
    value.params(),
    base.bias,
    in_features=base.in_features,
    out_features=base.out_features,
    kernel_size=base.kernel_size,
    strides=base.strides,
    padding=base.padding,
    kernel_dilation=base.kernel_dilation,
    dtype=base.dtype,
    param_dtype=base.param_dtype,
    precision=base.precision,
    preferred_element_type=base.preferred_element_type,
    implementation=base.implementation,
    feature_group_count=base.feature_group_count,
  )


def _replaced(model: nnx.Module, path, layer: nnx.Module) -> nnx.Module:
  """`model` with `layer` at `path` (the layer itself at the root)."""
  if not path:
    return layer
  _set(model, path, layer)
  return model


def merge(model: nnx.Module) -> nnx.Module:
  """A plain model with every adapter folded into its base kernel.

  Each `Adapter` becomes its base layer holding `W + scale * dW`: a dense
  `nnx.Conv` gets `kernel + scale * dW.to_dense()` (block-diagonal per
  group), exact to float rounding; a factorized layer stays a layer of its
  format, exactly: the update is written in the base's format and the two
  factorizations are concatenated along the rank (a rank-`r` `LowRankConv`
  and a rank-`s` `LowRank` or `CP` update give a rank-`r + s`
  `LowRankConv`; see `jaxfactor.merge_update` for every pair that merges).
  `model` itself is left as it is.

  Args:
    model: an adapted model (see `adapt`), or an `Adapter`.

  Returns:
    A new model without adapters, computing what `model` computes with
    dropout off.

  Raises:
    ValueError: an adapter whose update has no exact form of a sensible
      size in its factorized base's format (say, a `SpatiallySeparable`
      update on a `LowRankConv`); the message says which pairs merge.
  """
  fn = "merge"
  merged = nnx.clone(model)
  for path, adapter in _adapters_of(merged):
    base = adapter.base
    update, scale = adapter.update, adapter.scale
    if isinstance(base, nnx.Conv):
      kernel = base.kernel[...]
      base.kernel[...] = _adapters.merge_dense(fn, kernel, update, scale)
      merged = _replaced(merged, path, base)
      continue
    if not _adapters.merges_into(adapter.format, base.format):
      where = f"{fn}: the adapter at {'/'.join(map(str, path)) or '(root)'}"
      raise ValueError(
        _adapters.merge_error(where, adapter.format, base.format)
      )
    value = _adapters.concatenate(base.factors, update, scale)
    merged = _replaced(merged, path, _with_factors(base, value))
  return merged


def unmerge(model: nnx.Module, adapted: nnx.Module) -> nnx.Module:
  """Takes `adapted`'s adapters back out of a model `merge` made from it.

  Dense kernels get `kernel - scale * dW.to_dense()` (exact to float
  rounding); factorized layers drop the update's factors, whatever the
  update's format was (exactly the base factors). `model` is left as it is.

  Args:
    model: a merged model, `merge(adapted)`.
    adapted: the adapted model whose adapters were merged.

  Returns:
    A new model: the base model.

  Raises:
    ValueError: `model` has no layer of the merged kind where `adapted` has
      an adapter.
  """
  fn = "unmerge"
  base_model = nnx.clone(model)
  for path, adapter in _adapters_of(adapted):
    name = "/".join(map(str, path))
    try:
      layer = _get(base_model, path)
    except (AttributeError, IndexError, KeyError):
      layer = None
    update, scale = adapter.update, adapter.scale
    if isinstance(adapter.base, nnx.Conv) and isinstance(layer, nnx.Conv):
      kernel = layer.kernel[...]
      delta = update.to_dense()
      layer.kernel[...] = kernel - (
        delta.astype(kernel.dtype) * jnp.asarray(scale, kernel.dtype)
      )
    elif (
      isinstance(adapter.base, _FactorizedConv)
      and isinstance(layer, _FactorizedConv)
      and layer.format is adapter.base.format
    ):
      value = _per_group(_adapters.split, layer.factors, adapter.base.rank)
      base_model = _replaced(base_model, path, _with_factors(layer, value))
    else:
      raise ValueError(
        f"{fn}: `model` has {type(layer).__name__} at {name}, where"
        f" `adapted` has an adapter on a {type(adapter.base).__name__}:"
        " is `model` merge(adapted)?"
      )
  return base_model


def extract(
  base_model: nnx.Module,
  tuned_model: nnx.Module,
  format: Any,
  *,
  rank: Any = None,
  energy: float | None = None,
  alpha: Any = None,
  filter: Callable[[tuple, nnx.Module], bool] | None = None,
) -> tuple[nnx.Module, AdaptationReport]:
  """Adapters that turn one dense model's convs into another's.

  For every `nnx.Conv` of `base_model` whose kernel differs in
  `tuned_model`, the update is the `format` decomposition of
  `(W_tuned - W_base) / scale` (`jaxfactor.decompose`, per group): for
  `LowRank` the truncated SVD of the `(k*C) x F` unfolding, so `W_base +
  scale * dW` is the closest rank-`r` correction to `W_tuned` (Eckart-Young;
  likewise a 2-D `SpatiallySeparable`); `Tucker` by HOOI, `CP` by ALS.
  Only conv kernels are extracted: everything else (biases, other layers)
  is `base_model`'s.

  Args:
    base_model: the model the adapters go on (not modified).
    tuned_model: the same architecture with other conv kernels.
    format: "low_rank", "tucker", "cp" or "spatially_separable".
    rank: the rank (per group), or a `{pattern: rank}` mapping as in
      `adapt`.
    energy: instead, per layer, the smallest rank keeping that fraction of
      the squared singular values of the difference.
    alpha: as in `adapt`.
    filter: `filter(path, conv) -> bool` selects the layers.

  Returns:
    `(adapted, report)`: a copy of `base_model` with `Adapter`s, and an
    `AdaptationReport`.

  Raises:
    ValueError: not exactly one of `rank` and `energy`; models whose convs
      do not match.
  """
  fn = "extract"
  cls = _adapters.adapter_format(fn, format)
  if (rank is None) == (energy is None):
    raise ValueError(f"{fn}: give exactly one of `rank` and `energy`.")
  if energy is not None:
    _surgery.check_choice(fn, None, energy, None, None, False)
  elif not isinstance(rank, Mapping):
    _ranks.check_rank_type(fn, rank)
  adapted = nnx.clone(base_model)
  select = filter or _adaptable
  reports: list[AdapterLayerReport] = []
  for path, conv in list(nnx.iter_modules(adapted)):
    if not isinstance(conv, nnx.Conv):
      continue
    name = "/".join(map(str, path))
    shape = _base_kernel_shape(conv)
    groups = conv.feature_group_count
    try:
      tuned = _get(tuned_model, path)
    except (AttributeError, IndexError, KeyError):
      tuned = None
    if (
      not isinstance(tuned, nnx.Conv) or tuned.kernel.shape != conv.kernel.shape
    ):
      raise ValueError(
        f"{fn}: `tuned_model` has {type(tuned).__name__} at {name} where"
        f" `base_model` has an nnx.Conv with kernel {tuple(conv.kernel.shape)}."
      )
    delta = tuned.kernel[...] - conv.kernel[...]
    reason = _unsupported(conv)
    layer_rank = (
      None if rank is None else _adapters.pattern_value(fn, "rank", rank, name)
    )
    if reason is None and not select(path, conv):
      reason = "not selected by the filter"
    if reason is None and rank is not None and layer_rank is None:
      reason = "no rank pattern matches its path"
    if reason is None and not bool(jnp.any(delta != 0)):
      reason = "unchanged: the kernels are equal"
    if reason is not None:
      reports.append(
        AdapterLayerReport(
          path=path, kernel_shape=shape, groups=groups, skipped=reason
        )
      )
      continue
    layer_rank, _, values = _adapters.extract(
      fn,
      delta,
      cls,
      groups,
      rank=layer_rank,
      energy=energy,
      alpha=_adapters.pattern_value(fn, "alpha", alpha, name),
    )
    adapter = Adapter(
      conv,
      cls,
      rank=layer_rank,
      alpha=_adapters.pattern_value(fn, "alpha", alpha, name),
      rngs=nnx.Rngs(0),
    )
    for key, value in values.items():
      getattr(adapter, f"adapter_{key}")[...] = value.astype(
        getattr(adapter, f"adapter_{key}")[...].dtype
      )
    _set(adapted, path, adapter)
    reports.append(_adapter_report(path, adapter, None))
  return adapted, _adaptation_report(adapted, cls, reports)


# --- learned ranks ------------------------------------------------------------


def rank_penalty(
  model: nnx.Module,
  *,
  strength: float,
  learning_rate: Any,
) -> Any:
  """A group-lasso penalty on the rank components of a model's factorized
  layers, as a proximal optax step: chain it after the optimizer.

  Every rank component of every `LowRankConv`, `TuckerConv`, `CPConv`,
  `SpatiallySeparableConv` and `TensorTrainConv` is one group: the slices
  of all the factors that carry it (`LowRank`'s column `r` of `spatial` and
  row `r` of `pointwise`; a Tucker in-rank in `in_proj` and `core`, an
  out-rank in `core` and `out_proj`; a CP component in every factor; a
  `SpatiallySeparable` or `TensorTrain` bond in the two factors it links).
  The step applies group soft-thresholding to `params + updates`:
  `g <- g * max(0, 1 - t / ||g||)`, `t = learning_rate * strength`, the
  exact proximal operator of `strength * sum ||g||` for that step size, so
  a component whose group norm falls under `t` becomes exactly zero (then
  `prune_ranks` removes it). Where two bonds share a factor (Tucker's core,
  the inner factors of a `SpatiallySeparable` or cores of a
  `TensorTrain`), the bonds are thresholded one after the other.

  The groups span every factor of a component, rather than one factor per
  bond: the product of the factors is unchanged when one factor's slice is
  scaled up and another's down, so a penalty on one factor alone could be
  evaded by that rescaling. On the whole group, the least penalty over
  rescalings is reached with the slices balanced and grows with the
  component's size in the kernel. The factors are not rebalanced during
  training (that would change the optimizer's parametrization between
  steps); `prune_ranks` judges components by their contribution to the
  kernel, which does not depend on how the factors are scaled.

  Other parameters (biases, dense layers, `DepthwiseSeparableConv`) pass
  through unchanged.

  Args:
    model: the nnx model whose factorized layers to penalize (read once,
      for the layers' paths).
    strength: the penalty's weight `lambda >= 0`.
    learning_rate: the optimizer's learning rate (a number or an optax
      schedule of the step count): the threshold is `learning_rate *
      strength`.

  Returns:
    An `optax.GradientTransformation` that needs `params` in `update`, as
    `nnx.Optimizer` gives them: e.g. `nnx.Optimizer(model,
    optax.chain(optax.adam(lr), rank_penalty(model, strength=1e-3,
    learning_rate=lr)), wrt=nnx.Param)`.

  Raises:
    ValueError: a negative `strength`, a non-positive `learning_rate`, or
      (at `init`/`update`) parameters without any factorized layer, or
      `update` without `params`.

  References:
    Yuan and Lin, 2006, Model selection and estimation in regression with
    grouped variables, J. R. Stat. Soc. B 68(1); Idelbayev and
    Carreira-Perpinan, 2020, Low-rank compression of neural nets: learning
    the rank of each layer, CVPR.

  >>> import jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import jaxfactor.nnx
  >>> model = jaxfactor.nnx.LowRankConv(4, 8, (3, 3), rank=4, rngs=nnx.Rngs(0))
  >>> tx = optax.chain(optax.sgd(0.1), jaxfactor.nnx.rank_penalty(
  ...     model, strength=100.0, learning_rate=0.1))
  >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  >>> loss = lambda m: jnp.mean(m(jnp.ones((1, 5, 5, 4))) ** 2)
  >>> grads = nnx.grad(loss)(model)
  >>> _ = optimizer.update(model, grads)
  >>> float(jnp.abs(model.pointwise[...]).max())  # every component is zero
  0.0
  """
  layers = [
    (path, module.format, module.param_names)
    for path, module in nnx.iter_modules(model)
    if isinstance(module, _FactorizedConv)
    and module.format in _learned.SUPPORTED
  ]
  return _learned.rank_penalty(
    "rank_penalty", layers, strength=strength, learning_rate=learning_rate
  )


def prune_ranks(
  model: nnx.Module,
  *,
  tolerance: float = 0.0,
  budget: Budget | None = None,
  inputs: jax.Array | None = None,
) -> PruningReport:
  """Removes, in place, the rank components that contribute nothing.

  Each rank component of each factorized layer (see `rank_penalty`) is
  scored by its relative contribution `||K_r|| / ||K||`: the Frobenius
  norm of the part of the dense kernel `K` it makes, over `K`'s. Scores are
  exact (the kernel is linear in each factor slice) and do not depend on
  how the factors are scaled. Components scoring at most `tolerance` are
  sliced out of the factors and the layer's rank shrinks to match; at the
  default `tolerance=0` those are the components that are exactly zero
  (e.g. after `rank_penalty`), and the model's outputs do not change. A
  bond keeps at least one component.

  With a `budget`, components are then removed in increasing score, across
  all layers at once, until the layers' total meets it: a fraction of the
  total parameters or FLOPs of the same layers as dense convolutions (as
  `Budget` means in `factorize`). This changes the outputs; fine-tune
  afterwards.

  Args:
    model: an nnx model, modified in place.
    tolerance: the largest relative contribution removed, `>= 0`.
    budget: `jaxfactor.Budget(params=f)` or `Budget(flops=f)`, or None.
    inputs: a sample batch for `model(inputs)`, to record each layer's
      input shape (FLOP counts in the report, FLOP budgets).

  Returns:
    A `PruningReport`: per layer the ranks, params and FLOPs (as the layer
    runs them, by its `implementation`) before and after, and the relative
    change of its kernel. `DepthwiseSeparableConv` layers are listed as
    skipped: their channel multiplier is not a sum of components.

  Raises:
    ValueError: a negative `tolerance`; a FLOP budget without `inputs`; a
      budget below rank 1 on every bond.
    TypeError: a `budget` that is not a `Budget`; a bare layer as `model`.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import jaxfactor.nnx
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.conv = jaxfactor.nnx.LowRankConv(4, 8, (3, 3), rank=4, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.conv(x)
  >>> net = Net(nnx.Rngs(0))
  >>> net.conv.pointwise[...] = net.conv.pointwise[...].at[1:3].set(0.0)
  >>> report = jaxfactor.nnx.prune_ranks(net)
  >>> report.ranks, net.conv.pointwise.shape
  ({'conv': 2}, (2, 8))
  """
  fn = "prune_ranks"
  if isinstance(model, _FactorizedConv):
    raise TypeError(
      f"{fn}: `model` is a bare {type(model).__name__}; prune_ranks works in"
      " place on the model that holds it."
    )
  paths = [
    path
    for path, module in nnx.iter_modules(model)
    if isinstance(module, _FactorizedConv)
  ]
  recorded = (
    _record_inputs(nnx.clone(model), paths, inputs)
    if inputs is not None
    else {}
  )
  layers = []
  for path in paths:
    module = _get(model, path)
    layers.append(
      _learned.Layer(
        path=path,
        factors=module.factors,
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        implementation=module.implementation,
        input_shape=(tuple(recorded[path].shape) if path in recorded else None),
      )
    )
  new, report = _learned.prune_layers(
    fn, layers, tolerance=tolerance, budget=budget
  )
  for path, value in new.items():
    _set(model, path, _with_factors(_get(model, path), value))
  return report
