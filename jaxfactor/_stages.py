"""Stages: the steps of a convolution chain, and what they share.

Every convolution jaxfactor runs is a chain of stages (a format's `stages()`,
or one `SpatialConv` for a dense kernel):

* `Pointwise(kernel [C, F])`: a contraction over the channel axis.
* `CoreContraction(kernel [R_in, c, f, R_out])`: a tensor-train core
  contracted with two modes of the channel axis (`jaxfactor.TensorTrain`).
* `SpatialConv(kernel, axes, groups)`: a convolution over the spatial `axes`
  only (window 1 elsewhere) with `groups` channel groups: a dense conv, a
  depthwise conv (one input channel per group) or a 1-D conv along one axis.

Strides, padding and dilation act on a stage's own axes; 1x1 stages and the
other axes see none of them. How each stage is lowered on each platform is
decided in `jaxfactor._lowering`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxfactor import _geometry


class Pointwise(NamedTuple):
  """A 1x1 convolution: `kernel [C, F]` contracted with the channel axis.

  It convolves over no spatial axis, in one group.
  """

  kernel: Any
  axes: tuple[int, ...] = ()
  groups: int = 1


class SpatialConv(NamedTuple):
  """A convolution over the spatial `axes` with `groups` channel groups.

  `kernel` is `[*window over axes, C // groups, F]`.
  """

  kernel: Any
  axes: tuple[int, ...]
  groups: int = 1


class CoreContraction(NamedTuple):
  """A tensor-train core applied to the channel axis, a 1x1 stage.

  The channel axis is read as `[c, M, R_in]` (row-major): the core
  `kernel [R_in, c, f, R_out]` contracts its leading mode `c` and its
  trailing rank `R_in`, and the output channels are `[M, f, R_out]`. A chain
  of them takes the channels `(c_1, ..., c_d, R_0)` to `(f_1, ..., f_d)`
  one core at a time, without forming the `C x F` matrix. With `groups = G`
  the kernel is `[G, R_in, c, f, R_out]`, one core per channel group: the
  channels `[G, c, M, R_in]` become `[G, M, f, R_out]`.
  """

  kernel: Any
  axes: tuple[int, ...] = ()
  groups: int = 1


Stage = Pointwise | SpatialConv | CoreContraction


def core_contraction(x, kernel, groups, precision, preferred):
  """`x [..., G * c * M * R_in]` through a `CoreContraction` kernel."""
  r_in, c, f, r_out = kernel.shape[-4:]
  lead, n = x.shape[:-1], x.ndim - 1
  m = x.shape[-1] // (groups * c * r_in)
  dimensions: Any
  if groups == 1:
    x = x.reshape((*lead, c, m, r_in))
    dimensions = (((n, n + 2), (1, 0)), ((), ()))
  else:  # the groups as a batch axis of the contraction
    x = x.reshape((*lead, groups, c, m, r_in))
    dimensions = (((n + 1, n + 3), (2, 1)), ((n,), (0,)))
  y = lax.dot_general(
    x,
    kernel,
    dimensions,
    precision=precision,
    preferred_element_type=preferred,
  )  # [..., M, f, R_out], or [G, ..., M, f, R_out]
  if groups > 1:
    y = jnp.moveaxis(y, 0, n)
  return y.reshape((*lead, groups * m * f * r_out))


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


def restore_batch(y: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  return y.reshape((*batch_shape, *y.shape[1:]))


def is_depthwise(stage: Stage) -> bool:
  """A grouped stage with one input channel per group (any multiplier)."""
  return (
    isinstance(stage, SpatialConv)
    and stage.groups > 1
    and stage.kernel.shape[-2] == 1
  )


def is_strided_pointwise(stage: Stage, geometry: _geometry.Geometry) -> bool:
  """A dense 1x1 conv without padding: a strided slice and a contraction."""
  return (
    isinstance(stage, SpatialConv)
    and stage.groups == 1
    and all(k == 1 for k in stage.kernel.shape[:-2])
    and all(geometry.padding[a] == (0, 0) for a in stage.axes)
  )


def strided_pointwise(x, kernel, axes, geometry, precision, preferred):
  """A 1x1 conv as `lax.dot_general` (~3x faster than a 1x1 conv on CPU)."""
  strides = [1] * x.ndim
  for axis in axes:
    strides[axis + 1] = geometry.strides[axis]
  if any(s > 1 for s in strides):
    x = lax.slice(x, [0] * x.ndim, x.shape, strides)
  return lax.dot_general(
    x,
    kernel.reshape(kernel.shape[-2:]),
    (((x.ndim - 1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred,
  )


def _merges_with(stage: Stage, previous: Stage) -> bool:
  """Two depthwise stages (multiplier 1) over disjoint axes, same channels."""
  return (
    is_depthwise(previous)
    and is_depthwise(stage)
    and previous.kernel.shape[-1] == previous.groups
    and stage.kernel.shape[-1] == stage.groups == previous.groups
    and not set(stage.axes) & set(previous.axes)
  )


def merge_depthwise_stages(
  stages: Sequence[Stage],
) -> tuple[list[Stage], int]:
  """Consecutive depthwise stages over disjoint axes as one depthwise stage.

  CP's per-axis depthwise filters `A_0 [k_0, R]`, `A_1 [k_1, R]` make one
  depthwise `k_0 x k_1` filter `A_0[i, r] * A_1[j, r]`: one grouped conv
  instead of one per axis. The same function (a separable filter, each axis
  with its own padding, stride and dilation), at `prod(k_i)` instead of
  `sum(k_i)` multiply-adds per position, in one pass over the activations
  instead of N. Measured on an H200 (`benchmarks/cp_lowering.py`, batch 256,
  MobileNet shapes at R = F/2): CP's forward 3.3-4.3x faster at stride 1,
  forward+backward 3.1-5.5x; XLA:GPU's grouped 1-D convs ran at ~10x their
  memory-bound time. `jaxfactor._lowering` merges where depthwise stages run
  as XLA's grouped convolution (GPU, TPU); on CPU each per-axis stage is one
  pass of `k_i` taps of the compiled kernel or the shift-add, cheaper than
  the `prod(k_i)` taps of the merged filter.

  Returns the stages and the FLOPs of building the merged filters (one
  multiply per element of each partial outer product).
  """
  merged: list[Stage] = []
  flops = 0
  for stage in stages:
    if merged and _merges_with(stage, merged[-1]):
      previous = merged.pop()
      axes = tuple(sorted(previous.axes + stage.axes))

      def lifted(kernel, own_axes, axes=axes):
        # [*window over own_axes, 1, R] -> [*window over `axes`, 1, R].
        shape = [1] * len(axes) + list(kernel.shape[-2:])
        for axis, k in zip(own_axes, kernel.shape[:-2]):
          shape[axes.index(axis)] = k
        return shape

      a, b = previous.kernel, stage.kernel
      shape_a, shape_b = lifted(a, previous.axes), lifted(b, stage.axes)
      if isinstance(a, jax.ShapeDtypeStruct) or isinstance(
        b, jax.ShapeDtypeStruct
      ):  # abstract leaves, for `cost`
        kernel = jax.ShapeDtypeStruct(
          jnp.broadcast_shapes(tuple(shape_a), tuple(shape_b)), a.dtype
        )
      else:
        kernel = a.reshape(shape_a) * b.reshape(shape_b)
      flops += math.prod(kernel.shape)
      merged.append(SpatialConv(kernel, axes, stage.groups))
    else:
      merged.append(stage)
  return merged, flops


def stage_geometry(kernel_window, axes, geometry, n):
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


def spatial_conv(x, kernel, axes, groups, geometry, precision, preferred):
  """A stage as `lax.conv_general_dilated` (XLA's own convolution)."""
  window, strides, dilation, pads = stage_geometry(
    kernel.shape[:-2], axes, geometry, x.ndim - 2
  )
  x, pads = pad_fill(x, pads, geometry)
  if groups == 1:  # XLA does not swap a grouped convolution's operands.
    x, pads = pad_swap_prone_axes(x, window, strides, dilation, pads)
  return lax.conv_general_dilated(
    x,
    kernel.reshape((*window, *kernel.shape[-2:])),
    window_strides=strides,
    padding=pads,
    rhs_dilation=dilation,
    dimension_numbers=dimension_numbers(x.ndim - 2),
    feature_group_count=groups,
    precision=precision,
    preferred_element_type=preferred,
  )


def pad_swap_prone_axes(x, window, strides, dilation, pads):
  """`x` zero-padded along the axes whose input gradient XLA:CPU aborts on.

  Along an axis with window 2, stride 2, dilation 1 and padding (1, 1) or
  (1, 2) on an even size, the strided windows read exactly one zero at
  each end, and the input gradient is a convolution with window 2, base
  dilation 2, stride 1 and no padding there. XLA's algebraic simplifier
  (jaxlib 0.10.2) takes such an axis for a "group" axis when it swaps an
  ungrouped convolution's operands, which it does when the other axes'
  windows hold more taps than their outputs hold positions, and keeps its
  window, which then no longer fits unless the output size there is 2:
  `Check failed ... Window dimensions do not match RHS shape` aborts the
  process (docs/known-issues.md). Padding those axes here and not in the
  convolution computes the same thing, and the input gradient's padding
  there is then 1, which the simplifier does not take for a group axis.
  Only where XLA would swap: padding costs a copy of `x` forward and a
  slice backward (convs on 32x56x56x64 ran 1.2-1.6x slower so).

  Returns `(x, pads)`: the padding left for the convolution to apply.
  """
  sizes = x.shape[1:-1]
  static = [isinstance(size, int) for size in sizes]  # else jax.export's
  group = [
    a
    for a, (k, s, d, (lo, hi)) in enumerate(
      zip(window, strides, dilation, pads)
    )
    if (k, s, d, lo) == (2, 2, 1, 1)
    and hi in (1, 2)
    and (not static[a] or sizes[a] % 2 == 0)
  ]
  prone = [a for a in group if not static[a] or sizes[a] > 2]
  others = [a for a in range(len(sizes)) if a not in group]
  if prone and all(static[a] for a in others):
    # XLA's test counts one tap for a size-1 output in some cases; counting
    # the output positions only can swap more often, never less.
    taps = math.prod(window[a] for a in others)
    positions = math.prod(
      _geometry.output_size(
        sizes[a], window[a], strides[a], dilation[a], pads[a]
      )
      for a in others
    )
    if taps <= positions:
      prone = []
  if not prone:
    return x, pads
  config = [(0, 0, 0)] * x.ndim
  for a in prone:
    config[a + 1] = (*pads[a], 0)
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  return x, [(0, 0) if a in prone else p for a, p in enumerate(pads)]


def pad_fill(x, axes_pads, geometry):
  """`x` with non-zero fills ("wrap", "reflect") padded in; zero pads kept.

  Symbolic zero pads (`jax.export` with "SAME" and a stride) are padded in
  too: lax's convolutions take static padding only.

  Returns `(x, pads)`: the padding left for the stage to apply (all zero
  when it was materialised).
  """
  if geometry.fill == "constant":
    if all(isinstance(v, int) for pair in axes_pads for v in pair):
      return x, axes_pads
    config = [(0, 0, 0), *((lo, hi, 0) for lo, hi in axes_pads), (0, 0, 0)]
    return (
      lax.pad(x, jnp.zeros((), x.dtype), config),
      [(0, 0)] * len(axes_pads),
    )
  if all(isinstance(d, int) for d in x.shape[1:-1]):
    x = jnp.pad(x, [(0, 0), *axes_pads, (0, 0)], mode=geometry.fill)
  else:
    # `jnp.pad` cannot decide how often a symbolic size wraps (jax.export).
    for axis, (lo, hi) in enumerate(axes_pads, 1):
      x = _pad_axis(x, axis, lo, hi, geometry.fill)
  return x, [(0, 0)] * len(axes_pads)


def _pad_axis(x, axis, lo, hi, mode):
  """`x` padded by `(lo, hi)` along `axis` as `jnp.pad`'s "wrap" or
  "reflect" modes, as a gather: valid for a symbolic size."""
  if lo == hi == 0:
    return x
  size = x.shape[axis]
  index = jnp.arange(-lo, size + hi)
  if mode == "wrap":
    index = index % size
  else:  # "reflect": the edge itself is not repeated
    period = jnp.maximum(2 * size - 2, 1)
    index = index % period
    index = jnp.where(index < size, index, period - index)
  return jnp.take(x, index, axis=axis)
