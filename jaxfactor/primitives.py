"""The lax calls: pointwise (1x1) and depthwise convolutions, and stage chains.

Every convolution jaxfactor runs is a chain of *stages*, each one `lax` call:

* `Pointwise(kernel [C, F])`: a contraction over the channel axis
  (`lax.dot_general`), the cheapest lowering of a 1x1 convolution.
* `SpatialConv(kernel, axes, groups)`: a convolution over the spatial `axes`
  only (window 1 elsewhere), with `groups` channel groups
  (`feature_group_count`), e.g. a dense conv, a depthwise conv or a 1-D conv
  along one axis.

Strides, padding and dilation act on a stage's own axes; 1x1 stages and the
other axes see none of them. `cost_model.py` counts the FLOPs of the same stages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxfactor import _geometry
from jaxfactor import _validation


class Pointwise(NamedTuple):
  """A 1x1 convolution: `kernel [C, F]` contracted with the channel axis."""

  kernel: Any


class SpatialConv(NamedTuple):
  """A convolution over the spatial `axes` with `groups` channel groups.

  `kernel` is `[*window over axes, C // groups, F]`.
  """

  kernel: Any
  axes: tuple[int, ...]
  groups: int = 1


Stage = Pointwise | SpatialConv


def dimension_numbers(num_spatial: int) -> lax.ConvDimensionNumbers:
  """Channels-last input/output and HWIO kernels, for any N."""
  n = num_spatial
  channels_last = (0, n + 1, *range(1, n + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=channels_last,
      rhs_spec=(n + 1, n, *range(n)),
      out_spec=channels_last,
  )


def prepare(
    fn: str,
    x: Any,
    window: Sequence[int],
    *,
    strides: Any,
    padding: Any,
    dilation: Any,
) -> tuple[jax.Array, tuple[int, ...], _geometry.Geometry]:
  """Flattens `x`'s batch dims to one and resolves the geometry.

  Returns `(x [B, *spatial, C], batch_shape, geometry)`; `batch_shape` is ()
  for an unbatched input.
  """
  n = len(window)
  x = jnp.asarray(x)
  batch_shape = tuple(x.shape[: x.ndim - n - 1])
  geometry = _geometry.resolve(
      fn,
      x.shape[x.ndim - n - 1 : -1],
      window,
      strides=strides,
      padding=padding,
      dilation=dilation,
  )
  x = x.reshape((math.prod(batch_shape), *x.shape[x.ndim - n - 1 :]))
  return x, batch_shape, geometry


DEPTHWISE_LOWERINGS = ("auto", "shift_add", "grouped")


def resolve_depthwise_lowering(fn: str, lowering: str) -> str:
  """"auto": shifted multiply-adds on CPU, XLA's grouped conv elsewhere.

  XLA:CPU's grouped convolution is slow for depthwise kernels (measured in
  `perf-baseline.md`: slower than the dense conv it replaces); k shifted
  slices times per-channel weights fuse into one loop there. GPU and TPU have
  fast grouped-convolution kernels.
  """
  if lowering not in DEPTHWISE_LOWERINGS:
    raise ValueError(
        f"{fn}: `depthwise_lowering` must be one of {DEPTHWISE_LOWERINGS},"
        f" got {lowering!r}."
    )
  if lowering == "auto":
    return "shift_add" if jax.default_backend() == "cpu" else "grouped"
  return lowering


def is_depthwise(stage: Stage) -> bool:
  """A grouped stage with one input channel per group (any multiplier)."""
  return (isinstance(stage, SpatialConv) and stage.groups > 1
          and stage.kernel.shape[-2] == 1)


def run_stages(
    x: jax.Array,
    stages: Sequence[Stage],
    geometry: _geometry.Geometry,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
    depthwise_lowering: str = "grouped",
) -> jax.Array:
  """Applies `stages` in order to `x [B, *spatial, C]`.

  `depthwise_lowering` ("shift_add" or "grouped", already resolved) picks how
  depthwise stages run.
  """
  for stage in stages:
    kernel = stage.kernel
    if kernel.dtype != x.dtype:
      # Only after a stage returned `preferred_element_type`: later stages
      # then compute at that (wider) precision too.
      kernel = kernel.astype(x.dtype)
    if isinstance(stage, Pointwise):
      x = lax.dot_general(
          x,
          kernel,
          (((x.ndim - 1,), (0,)), ((), ())),
          precision=precision,
          preferred_element_type=preferred_element_type,
      )
    elif is_depthwise(stage) and depthwise_lowering == "shift_add":
      x = _shift_add(x, kernel, stage.axes, geometry, preferred_element_type)
    else:
      x = _spatial_conv(
          x, kernel, stage.axes, stage.groups, geometry, precision,
          preferred_element_type,
      )
  return x


def _stage_geometry(kernel_window, axes, geometry, n):
  """Window, strides, dilation and padding over all N axes for one stage."""
  window, strides, dilation = [1] * n, [1] * n, [1] * n
  pads = [(0, 0)] * n
  for j, axis in enumerate(axes):
    window[axis] = kernel_window[j]
    strides[axis] = geometry.strides[axis]
    # Dilating a one-tap window changes nothing; leaving it at 1 lets XLA
    # simplify one-tap stages.
    dilation[axis] = geometry.dilation[axis] if kernel_window[j] > 1 else 1
    pads[axis] = geometry.padding[axis]
  return window, strides, dilation, pads


def _shift_add(x, kernel, axes, geometry, preferred):
  """Depthwise conv as a sum over taps of strided slices times weights.

  `kernel` is `[*window over axes, 1, C*m]`; output channel `c*m + j` reads
  input channel `c`. Exactly the grouped convolution's arithmetic (each
  output is the same sum of products, in tap order).
  """
  n = x.ndim - 2
  window, strides, dilation, pads = _stage_geometry(
      kernel.shape[:-2], axes, geometry, n)
  if any(p != (0, 0) for p in pads):
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=geometry.fill)
  channels, out_channels = x.shape[-1], kernel.shape[-1]
  if out_channels != channels:
    x = jnp.repeat(x, out_channels // channels, axis=-1)
  dtype = preferred or x.dtype
  out = [(size - (k - 1) * d - 1) // s + 1
         for size, k, d, s in zip(x.shape[1:-1], window, dilation, strides)]
  weights = kernel.reshape(*window, out_channels).astype(dtype)
  y = None
  for tap in np.ndindex(*window):
    start = [0, *(t * d for t, d in zip(tap, dilation)), 0]
    limit = [x.shape[0],
             *(b + (o - 1) * s + 1 for b, o, s in zip(start[1:-1], out,
                                                      strides)),
             x.shape[-1]]
    piece = lax.slice(x, start, limit, [1, *strides, 1]).astype(dtype)
    term = piece * weights[tap].reshape((1,) * (n + 1) + (out_channels,))
    y = term if y is None else y + term
  return y


def _spatial_conv(x, kernel, axes, groups, geometry, precision, preferred):
  n = x.ndim - 2
  window, strides, dilation, pads = _stage_geometry(
      kernel.shape[:-2], axes, geometry, n)
  if geometry.fill != "constant":
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=geometry.fill)
    pads = [(0, 0)] * n
  return lax.conv_general_dilated(
      x,
      kernel.reshape((*window, *kernel.shape[-2:])),
      window_strides=strides,
      padding=pads,
      rhs_dilation=dilation,
      dimension_numbers=dimension_numbers(n),
      feature_group_count=groups,
      precision=precision,
      preferred_element_type=preferred,
  )


def restore_batch(y: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  return y.reshape((*batch_shape, *y.shape[1:]))


def pointwise_conv(
    x: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    *,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
) -> jax.Array:
  """A 1x1 convolution, run as a contraction over the channel axis.

  Equal to `lax.conv_general_dilated` with a `[1, ..., 1, C, F]` kernel for
  any number of spatial axes, at `2 * B * prod(spatial) * C * F` FLOPs.

  Args:
    x: `[..., C]`: any leading axes (batch and spatial), channels last.
    kernel: `[C, F]`.
    precision: passed to `lax.dot_general`.
    preferred_element_type: accumulation and output dtype; None keeps `x`'s.

  Returns:
    `[..., F]`.

  Raises:
    TypeError: non-array or non-floating arguments, or mixed dtypes.
    ValueError: `kernel` not 2-D, or its `C` differs from `x`'s channels.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> y = jaxfactor.pointwise_conv(jnp.ones((2, 5, 5, 4)), jnp.ones((4, 8)))
  >>> y.shape
  (2, 5, 5, 8)
  """
  fn = "pointwise_conv"
  _validation.check_array(fn, "kernel", kernel)
  _validation.check_floating(fn, "kernel", kernel)
  _validation.check_ndim(fn, "kernel", kernel, 2, "[C, F]")
  _validation.check_positive_dims(fn, "kernel", kernel.shape)
  _validation.check_array(fn, "x", x)
  _validation.check_floating(fn, "x", x)
  if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(
        f"{fn}: `x` must have shape [..., C] with C = kernel.shape[0] ="
        f" {kernel.shape[0]}, got shape {tuple(x.shape)}."
    )
  _validation.check_same_dtype(fn, [("x", x), ("kernel", kernel)])
  preferred = _validation.check_preferred_element_type(
      fn, x.dtype, preferred_element_type
  )
  return lax.dot_general(
      jnp.asarray(x),
      jnp.asarray(kernel),
      (((x.ndim - 1,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=preferred,
  )


def depthwise_conv(
    x: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    dilation: int | Sequence[int] = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    depthwise_lowering: str = "auto",
) -> jax.Array:
  """A depthwise convolution: one filter per input channel, times `m`.

  Output channel `c * m + j` is input channel `c` convolved with filter
  `kernel[..., 0, c * m + j]` (lax's and Flax's layout, so a Flax
  `nn.Conv(feature_group_count=C)` kernel works unchanged). Costs
  `2 * k * C * m` FLOPs per output pixel, for `k = prod(window)`.

  Args:
    x: `[*batch, *spatial, C]`; any number of batch axes, or none.
    kernel: `[*window, 1, C * m]` for a channel multiplier `m >= 1`.
    strides: an int or one per spatial axis.
    padding: "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL" (1-D only), an
      int, or one int or `(low, high)` pair per spatial axis, as in Flax.
    dilation: kernel dilation, an int or one per spatial axis.
    precision: passed to `lax.conv_general_dilated`.
    preferred_element_type: accumulation and output dtype; None keeps `x`'s.
    depthwise_lowering: "shift_add" (a sum over taps of strided slices times
      per-channel weights), "grouped" (`lax.conv_general_dilated` with
      `feature_group_count=C`) or "auto": shift_add on CPU, where XLA's
      grouped convolution is slow, grouped elsewhere. Same result either way.

  Returns:
    `[*batch, *out_spatial, C * m]`.

  Raises:
    TypeError: non-array or non-floating arguments, or mixed dtypes.
    ValueError: a kernel not `[*window, 1, C * m]`, or bad geometry.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> kernel = jnp.ones((3, 3, 1, 8))  # C = 4 channels, multiplier 2
  >>> jaxfactor.depthwise_conv(jnp.ones((2, 9, 9, 4)), kernel).shape
  (2, 9, 9, 8)
  """
  fn = "depthwise_conv"
  _validation.check_array(fn, "kernel", kernel)
  _validation.check_floating(fn, "kernel", kernel)
  if kernel.ndim < 3 or kernel.shape[-2] != 1:
    raise ValueError(
        f"{fn}: `kernel` must have shape [*window, 1, C*m], got shape"
        f" {tuple(kernel.shape)}."
    )
  _validation.check_positive_dims(fn, "kernel", kernel.shape)
  window = kernel.shape[:-2]
  _validation.check_input(fn, x, window, in_features=None)
  channels = x.shape[-1]
  if kernel.shape[-1] % channels:
    raise ValueError(
        f"{fn}: `kernel` has shape {tuple(kernel.shape)}, but its last axis"
        f" ({kernel.shape[-1]}) must be C*m, a multiple of the C={channels}"
        f" channels of `x` (shape {tuple(x.shape)})."
    )
  _validation.check_same_dtype(fn, [("x", x), ("kernel", kernel)])
  preferred = _validation.check_preferred_element_type(
      fn, x.dtype, preferred_element_type
  )
  lowering = resolve_depthwise_lowering(fn, depthwise_lowering)
  x, batch_shape, geometry = prepare(
      fn, x, window, strides=strides, padding=padding, dilation=dilation
  )
  stage = SpatialConv(
      jnp.asarray(kernel), tuple(range(len(window))), groups=channels
  )
  y = run_stages(
      x, [stage], geometry, precision=precision,
      preferred_element_type=preferred, depthwise_lowering=lowering,
  )
  return restore_batch(y, batch_shape)
