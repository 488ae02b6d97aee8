"""The lax calls: pointwise (1x1) and depthwise convolutions, and stage chains.

Every convolution jaxfactor runs is a chain of *stages*:

* `Pointwise(kernel [C, F])`: a contraction over the channel axis
  (`lax.dot_general`), the cheapest lowering of a 1x1 convolution; a dense
  1x1 `SpatialConv` without padding runs the same way, after a strided slice.
* `SpatialConv(kernel, axes, groups)`: a convolution over the spatial `axes`
  only (window 1 elsewhere), with `groups` channel groups
  (`feature_group_count`), e.g. a dense conv, a depthwise conv or a 1-D conv
  along one axis. On CPU a depthwise stage runs as a shift-add of its taps
  (`_shift_add`) and a dense one, where that is faster, as one matmul to
  every tap's output and a shift-add of those (`_tap_matmul`).

Strides, padding and dilation act on a stage's own axes; 1x1 stages and the
other axes see none of them. `cost_model.py` counts the FLOPs of the same stages.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxfactor import _geometry
from jaxfactor import _native
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


DEPTHWISE_LOWERINGS = ("auto", "native", "shift_add", "shift_add_autodiff",
                       "grouped")


def resolve_depthwise_lowering(fn: str, lowering: str) -> str:
  """"auto": "native" on a one-device CPU where the compiled kernel builds,
  "shift_add" on other CPUs, XLA's grouped conv ("grouped") elsewhere.

  XLA:CPU's grouped convolution is slow for depthwise kernels (measured in
  `perf-baseline.md`: slower than the dense conv it replaces). "native"
  (`jaxfactor._native`, CPU only) is a compiled depthwise conv called as an
  XLA FFI custom call: XLA compiles nothing for it, and its gradients read
  the activations once where the shift-add's read them once per tap. Where
  it cannot be built (no C++ compiler, `JAXFACTOR_NATIVE=0`), "auto" takes
  "shift_add": k shifted slices times per-channel weights, fused into one
  loop by XLA. GPU and TPU have fast grouped-convolution kernels.

  "native" is three bilinear primitives, each the others' transpose: both
  modes of differentiation, any order (inputs it does not take run as
  "shift_add", see `native_applies`). "shift_add" has a hand-written VJP
  (`jax.custom_vjp`) and so supports reverse mode only (`grad`, `vjp`, grad
  of grad, forward-over-reverse such as `hessian`); "shift_add_autodiff" is
  its forward pass under plain autodiff, for forward mode over it (`jvp`,
  `jacfwd`).
  """
  if lowering not in DEPTHWISE_LOWERINGS:
    raise ValueError(
        f"{fn}: `depthwise_lowering` must be one of {DEPTHWISE_LOWERINGS},"
        f" got {lowering!r}."
    )
  cpu = jax.default_backend() == "cpu"
  if lowering == "auto":
    if not cpu:
      return "grouped"
    # With several CPU devices (which exist only when asked for: a simulated
    # mesh, several processes) the batch is likely sharded, and XLA's
    # partitioner cannot split a custom call: it would gather the operands.
    # The shift-add stays sharded.
    if jax.device_count() == 1 and _native.available():
      return "native"
    return "shift_add"
  if lowering == "native":
    if not cpu:
      raise ValueError(
          f"{fn}: depthwise_lowering='native' runs on CPU only; the default"
          f" backend is {jax.default_backend()!r} (use 'auto' or 'grouped').")
    if not _native.available():
      raise RuntimeError(
          f"{fn}: depthwise_lowering='native' is not available here:"
          f" {_native.error()}")
  return lowering


SPATIAL_LOWERINGS = ("auto", "conv", "tap_matmul")


def resolve_spatial_lowering(fn: str, lowering: str) -> str:
  """"auto": `uses_tap_matmul`'s rule on CPU, XLA's convolution elsewhere."""
  if lowering not in SPATIAL_LOWERINGS:
    raise ValueError(
        f"{fn}: `spatial_lowering` must be one of {SPATIAL_LOWERINGS},"
        f" got {lowering!r}."
    )
  if lowering == "auto" and jax.default_backend() != "cpu":
    return "conv"
  return lowering


# Bytes of one step's tap outputs in `_tap_matmul`'s loop over the batch,
# and the most one image's may take under "auto" (see `uses_tap_matmul`).
_TAP_CHUNK_BYTES = 4 << 20
_TAP_MAX_BYTES = 8 << 20


def uses_tap_matmul(stage: Stage, in_shape: Sequence[int],
                    geometry: _geometry.Geometry,
                    spatial_lowering: str) -> bool:
  """Whether a stage on a `[B, *spatial, C]` input runs as `_tap_matmul`.

  Only dense (`groups == 1`) stages with more than one tap that are not run
  as contractions. "tap_matmul" forces it for those; "auto" (CPU only, see
  `resolve_spatial_lowering`) takes it where XLA:CPU's convolution was
  measured slow and the tap matmul faster (`benchmarks/spatial.py`): stride
  1, at least 28x28 = 784 positions per image, at least 128 input channels
  (64 for a stage of at most 3 taps), at most 64 output features or at most
  3 taps (XLA:CPU runs wider 3x3 convs near the matmul rate: 128 -> 128 at
  28x28 ran 1.25-1.8x slower as a tap matmul), and one image's tap outputs
  within 8 MiB (a cache-sized step). With 64 inputs and 9 taps a stage
  alone ran 1.0-2.5x faster, but Tucker's 64 -> 64 core at 28x28 gained
  nothing forward inside its chain and lost 17-36% forward+backward.
  """
  if (spatial_lowering == "conv" or not isinstance(stage, SpatialConv)
      or stage.groups != 1 or math.prod(stage.kernel.shape[:-2]) == 1):
    return False
  if spatial_lowering == "tap_matmul":
    return True
  _, *spatial, channels = in_shape
  taps, features = math.prod(stage.kernel.shape[:-2]), stage.kernel.shape[-1]
  itemsize = max(jnp.dtype(stage.kernel.dtype).itemsize, 4)  # see `acc`
  return (all(geometry.strides[a] == 1 for a in stage.axes)
          and channels >= (64 if taps <= 3 else 128)
          and math.prod(spatial) >= 784
          and (features <= 64 or taps <= 3)
          and math.prod(spatial) * taps * features * itemsize
          <= _TAP_MAX_BYTES)


def is_depthwise(stage: Stage) -> bool:
  """A grouped stage with one input channel per group (any multiplier)."""
  return (isinstance(stage, SpatialConv) and stage.groups > 1
          and stage.kernel.shape[-2] == 1)


def _merges_with(stage: Stage, previous: Stage) -> bool:
  """Two depthwise stages (multiplier 1) over disjoint axes, same channels."""
  return (is_depthwise(previous) and is_depthwise(stage)
          and previous.kernel.shape[-1] == previous.groups
          and stage.kernel.shape[-1] == stage.groups == previous.groups
          and not set(stage.axes) & set(previous.axes))


def merge_depthwise_stages(
    stages: Sequence[Stage], depthwise_lowering: str
) -> tuple[list[Stage], int]:
  """Consecutive depthwise stages over disjoint axes as one, for "grouped".

  CP's per-axis depthwise filters `A_0 [k_0, R]`, `A_1 [k_1, R]` make one
  depthwise `k_0 x k_1` filter `A_0[i, r] * A_1[j, r]`: one grouped conv
  instead of one per axis. The same function (a separable filter, each axis
  with its own padding, stride and dilation), at `prod(k_i)` instead of
  `sum(k_i)` multiply-adds per position, in one pass over the activations
  instead of N. Measured on an H200 (`benchmarks/cp_lowering.py`, batch 256,
  MobileNet shapes at R = F/2): CP's forward 3.3-4.3x faster at stride 1,
  forward+backward 3.1-5.5x; XLA:GPU's grouped 1-D convs ran at ~10x their
  memory-bound time; on the 2-core CPU with "grouped" forced, CP's forward
  1.5-2.0x faster. Shift-add stages ("shift_add", "shift_add_autodiff")
  are left per axis: there each is one fused loop of `k_i` taps.

  Returns the stages and the FLOPs of building the merged filters (one
  multiply per element of each partial outer product).
  """
  if depthwise_lowering != "grouped":
    return list(stages), 0
  merged, flops = [], 0
  for stage in stages:
    if merged and _merges_with(stage, merged[-1]):
      previous = merged.pop()
      axes = tuple(sorted(previous.axes + stage.axes))

      def lift(kernel, own_axes):
        # [*window over own_axes, 1, R] -> [*window over `axes`, 1, R].
        shape = [1] * len(axes) + list(kernel.shape[-2:])
        for axis, k in zip(own_axes, kernel.shape[:-2]):
          shape[axes.index(axis)] = k
        return kernel.reshape(shape)

      kernel = lift(previous.kernel, previous.axes) * lift(stage.kernel,
                                                           stage.axes)
      flops += math.prod(kernel.shape)
      merged.append(SpatialConv(kernel, axes, stage.groups))
    else:
      merged.append(stage)
  return merged, flops


def run_stages(
    x: jax.Array,
    stages: Sequence[Stage],
    geometry: _geometry.Geometry,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
    depthwise_lowering: str = "grouped",
    spatial_lowering: str = "conv",
) -> jax.Array:
  """Applies `stages` in order to `x [B, *spatial, C]`.

  `depthwise_lowering` ("native", "shift_add", "shift_add_autodiff" or
  "grouped", already resolved) picks how depthwise stages run,
  `spatial_lowering` ("conv", "tap_matmul" or, on CPU, "auto"; see
  `uses_tap_matmul`) how dense spatial stages run.
  """
  if preferred_element_type is not None:
    wide = jnp.dtype(preferred_element_type)
    if wide.itemsize > max(4, x.dtype.itemsize):
      # A float64 result from float32 operands: computed in float64 from the
      # start. XLA:GPU runs a float32 `dot_general` in float32 (TF32 at the
      # default precision) even when asked for a float64 result; with
      # float64 operands every backend computes in float64. Narrower cases
      # (bfloat16 -> float32) keep their mixed-precision path, exact in
      # float32 on every backend.
      x = x.astype(wide)
  stages, _ = merge_depthwise_stages(stages, depthwise_lowering)
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
    elif is_strided_pointwise(stage, geometry):
      x = _strided_pointwise(x, kernel, stage.axes, geometry, precision,
                             preferred_element_type)
    elif is_depthwise(stage) and depthwise_lowering == "native":
      x = _native_depthwise(x, kernel, stage.axes, geometry,
                            preferred_element_type)
    elif is_depthwise(stage) and depthwise_lowering.startswith("shift_add"):
      x = _shift_add(x, kernel, stage.axes, geometry, preferred_element_type,
                     custom_vjp=depthwise_lowering == "shift_add")
    elif uses_tap_matmul(stage, x.shape, geometry, spatial_lowering):
      x = _tap_matmul(x, kernel, stage.axes, geometry, precision,
                      preferred_element_type)
    else:
      x = _spatial_conv(
          x, kernel, stage.axes, stage.groups, geometry, precision,
          preferred_element_type,
      )
  return x


def is_strided_pointwise(stage: Stage, geometry: _geometry.Geometry) -> bool:
  """A dense 1x1 conv without padding: a strided slice and a contraction."""
  return (isinstance(stage, SpatialConv) and stage.groups == 1
          and all(k == 1 for k in stage.kernel.shape[:-2])
          and all(geometry.padding[a] == (0, 0) for a in stage.axes))


def _strided_pointwise(x, kernel, axes, geometry, precision, preferred):
  """A 1x1 conv as `lax.dot_general` (~3x faster than a 1x1 conv on CPU)."""
  strides = [1] * x.ndim
  for axis in axes:
    strides[axis + 1] = geometry.strides[axis]
  if any(s > 1 for s in strides):
    x = lax.slice(x, [0] * x.ndim, x.shape, strides)
  return lax.dot_general(
      x, kernel.reshape(kernel.shape[-2:]), (((x.ndim - 1,), (0,)), ((), ())),
      precision=precision, preferred_element_type=preferred)


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


class _Taps(NamedTuple):
  """The static plan of a shift-add depthwise stage over unpadded input.

  For each tap with at least one output inside the input (zero padding
  contributes nothing): `(tap, ranges)`, one `(out_lo, out_hi, start)` per
  spatial axis: outputs `out_lo:out_hi` read input positions
  `start, start + s, ...`.
  """

  out: tuple[int, ...]
  strides: tuple[int, ...]
  dilation: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]
  window: tuple[int, ...]
  taps: tuple[tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]], ...]

  @classmethod
  def make(cls, sizes, window, strides, dilation, pads):
    out = tuple((n + lo + hi - (k - 1) * d - 1) // s + 1 for n, k, d, s, (lo, hi)
                in zip(sizes, window, dilation, strides, pads))
    taps = []
    for tap in np.ndindex(*window):
      ranges = []
      for t, n, o, d, s, (lo, _) in zip(tap, sizes, out, dilation, strides,
                                         pads):
        offset = t * d - lo  # output i reads input i * s + offset
        out_lo = -(offset // s) if offset < 0 else 0  # ceil(-offset / s)
        out_hi = min(o, (n - 1 - offset) // s + 1)
        if out_hi <= out_lo:
          break
        ranges.append((out_lo, out_hi, out_lo * s + offset))
      else:
        taps.append((tap, tuple(ranges)))
    return cls(out, tuple(strides), tuple(dilation),
               tuple(tuple(p) for p in pads), tuple(window), tuple(taps))

  def input_slice(self, x, ranges):
    """The input positions one tap reads, `[B, *(out_hi - out_lo), C]`."""
    start = [0, *(st for _, _, st in ranges), 0]
    limit = [x.shape[0],
             *(st + (hi - lo - 1) * s + 1
               for (lo, hi, st), s in zip(ranges, self.strides)),
             x.shape[-1]]
    return lax.slice(x, start, limit, [1, *self.strides, 1])

  def output_slice(self, y, ranges):
    """The outputs one tap reaches."""
    return lax.slice(y, [0, *(lo for lo, _, _ in ranges), 0],
                     [y.shape[0], *(hi for _, hi, _ in ranges), y.shape[-1]])

  def pad_to_output(self, term, ranges):
    zero = jnp.zeros((), term.dtype)
    return lax.pad(term, zero, [(0, 0, 0),
                                *((lo, o - hi, 0) for (lo, hi, _), o
                                  in zip(ranges, self.out)),
                                (0, 0, 0)])

  def sum_to_output(self, term):
    """`sum over taps t of term(t, ranges)`, each padded to the output.

    `term(t, ranges)` is tap `t`'s contribution to the outputs `ranges` it
    reaches (e.g. from `input_slice(..., ranges)`); None when no tap reads
    input.
    """
    y = None
    for t, (_, ranges) in enumerate(self.taps):
      padded = self.pad_to_output(term(t, ranges), ranges)
      y = padded if y is None else y + padded
    return y

  def pad_to_input(self, term, ranges, sizes):
    zero = jnp.zeros((), term.dtype)
    config = [(0, 0, 0)]
    for (lo, hi, st), s, n in zip(ranges, self.strides, sizes):
      limit = st + (hi - lo - 1) * s + 1
      config.append((st, n - limit, s - 1))
    return lax.pad(term, zero, [*config, (0, 0, 0)])


def _per_channel(weight, ndim):
  """`[C]` weights broadcastable against `[B, *spatial, C]` (explicitly)."""
  return weight.reshape((1,) * (ndim - 1) + weight.shape)


# What XLA counts for `_materialized`'s predicate: two comparisons, an `or`
# and the conditional's branch selection.
FENCE_FLOPS = 4


def _materialized(fn, weights, *args):
  """`fn(weights, *args)`, computed once into a buffer of its own.

  XLA:CPU duplicates a cheap elementwise producer, such as a k-tap sum of
  shifted slices, into every consumer fusion: inside a model a depthwise
  conv's output feeds a batch norm's mean, variance and normalization and
  their gradients, and each of those kernels recomputed the k-tap sum,
  reading k materialized products (XLA would not duplicate their pads);
  a reduction right after it was absorbed into a YNNPACK fusion that reads a
  materialized slice per tap. A conditional is a fusion boundary: its
  result is computed by its branch alone, into its own buffer. The
  predicate, `w == w or w != w` for one weight `w`, is true for every value,
  NaN included, but XLA does not fold it; the other branch returns zeros.
  Measured with `benchmarks/fusion.py`'s programs at 32x56x56x128, before
  and after in one process: a mean right after the depthwise conv 7x faster
  (231 -> 30 ms), a batch-norm block's forward and backward 1.4x (256 ->
  185 ms; 1.2x between two runs of the script), the conv alone unchanged.
  """
  out = jax.eval_shape(fn, weights, *args)
  w = weights.ravel()[0]
  return lax.cond((w == w) | (w != w), fn,
                  lambda *_: jnp.zeros(out.shape, out.dtype), weights, *args)


def _taps_forward(plan: _Taps, x, weights):
  """`sum over taps of (input slice * weight)`, each padded to the output."""
  if not plan.taps:  # every tap reads only padding
    return jnp.zeros((x.shape[0], *plan.out, x.shape[-1]), x.dtype)
  return _materialized(
      lambda weights, x: plan.sum_to_output(
          lambda t, ranges: plan.input_slice(x, ranges)
          * _per_channel(weights[plan.taps[t][0]], x.ndim)),
      weights, x)


# Bytes of input each step of the weight-gradient loop reduces: small enough
# to stay in cache across the k taps (measured on the 2-core benchmark machine:
# 1 image of 56x56x128 per step is 6x faster than one pass over the batch).
_CHUNK_BYTES = 1 << 20


def _chunk_size(batch, per_item: int, devices: int,
                target_bytes: int | None = None) -> int:
  """Images per step of a batch loop: ~`target_bytes` per device.

  `target_bytes` defaults to `_CHUNK_BYTES`, `_weight_grad`'s.

  A multiple of `devices` that divides `batch` where one of at least half
  the target size does: then `[chunk, steps, ...]` is a free reshape of the
  batch, while a remainder costs a copy of the input and of the gradient
  (XLA copies the `x[:steps * chunk]` slice) and one more pass.
  """
  target = max(1, (target_bytes or _CHUNK_BYTES) // per_item)
  if isinstance(batch, int):
    largest = min(target, max(1, batch // devices))
    for per_device in range(largest, (target + 1) // 2 - 1, -1):
      if batch % (devices * per_device) == 0:
        return devices * per_device
  return devices * target


def _weight_grad(plan: _Taps, x, g):
  """`d weights`: per tap, `sum(input slice * output-gradient slice)`.

  A loop over batch chunks of ~`_CHUNK_BYTES` per device, so each chunk's k
  products are reduced while it is in cache; one pass over the whole batch
  per tap (what autodiff gives) is memory-bound and several times slower on
  CPU. Step `j` takes images `j, j + steps, ...`: the loop runs over the
  second axis of `[chunk, steps, ...]`, so a batch sharded over the devices
  along its first axis stays where it is (the chunk is a multiple of the
  device count). Sums are accumulated in at least float32.
  """
  batch, channels = x.shape[0], x.shape[-1]
  acc = jnp.float32 if x.dtype.itemsize < 4 else x.dtype
  per_item = max(1, math.prod(x.shape[1:]) * x.dtype.itemsize)

  # Tap `t` reads the padded chunk from `offsets[t]` on (stride 1), then
  # every `stride`-th position.
  offsets = np.array([[t * d for t, d in zip(tap, plan.dilation)]
                      for tap, _ in plan.taps], np.int32).reshape(
                          len(plan.taps), len(plan.window))

  def partial_sums(xc, gc):
    # Padded, every tap's slice has the output's shape. The taps are a loop
    # (`lax.map`): one slice-and-reduce kernel for XLA to compile instead of
    # one per tap (k of them, and XLA:CPU's compile time grows with the
    # kernel count: a 3x3 layer's weight gradient compiled 4x faster, its
    # run time unchanged). Each step reads a slice of the chunk, in cache.
    xc = lax.pad(
        xc, jnp.zeros((), xc.dtype),
        [(0, 0, 0), *((lo, hi, 0) for lo, hi in plan.pads), (0, 0, 0)])
    size = [xc.shape[0],
            *((o - 1) * s + 1 for o, s in zip(plan.out, plan.strides)),
            channels]

    def tap_sum(offset):
      zero = jnp.zeros((), offset.dtype)
      piece = lax.dynamic_slice(
          xc, [zero, *(offset[i] for i in range(len(plan.window))), zero],
          size)
      piece = lax.slice(piece, [0] * xc.ndim, size, [1, *plan.strides, 1])
      return jnp.sum(piece * gc, axis=tuple(range(xc.ndim - 1)), dtype=acc)

    return lax.map(tap_sum, jnp.asarray(offsets))

  chunk = _chunk_size(batch, per_item, jax.device_count())
  if not plan.taps or (isinstance(batch, int) and batch == 0):
    sums = jnp.zeros((len(plan.taps), channels), acc)
  elif not isinstance(batch, int) or batch < 2 * chunk:
    # A symbolic (exported) batch, or too small to need the loop.
    sums = partial_sums(x, g)
  else:
    steps = batch // chunk
    main = steps * chunk
    # The `[chunk, steps, ...]` view is taken inside the loop, where it is
    # free. Taken outside, it is one more consumer of `x` and `g`, and XLA
    # then recomputes a fused producer (e.g. a shift-add's sum of taps) once
    # per consumer, its taps materialized (measured: CP forward+backward
    # 1.2-1.5x slower). A remainder (`main < batch`, where no chunk size
    # near the target divides the batch) still makes two consumers.
    xs, gs = (x, g) if main == batch else (x[:main], g[:main])

    def step(j, total):
      xc = xs.reshape(chunk, steps, *x.shape[1:])
      gc = gs.reshape(chunk, steps, *g.shape[1:])
      return total + partial_sums(
          lax.dynamic_index_in_dim(xc, j, axis=1, keepdims=False),
          lax.dynamic_index_in_dim(gc, j, axis=1, keepdims=False))

    sums = lax.fori_loop(0, steps, step,
                         jnp.zeros((len(plan.taps), channels), acc))
    if main < batch:
      sums = sums + partial_sums(x[main:], g[main:])
  sums = sums.astype(x.dtype)
  if len(plan.taps) == math.prod(plan.window):  # every tap reads input
    return sums.reshape(*plan.window, channels)
  index = tuple(np.array([tap[i] for tap, _ in plan.taps], np.int32)
                for i in range(len(plan.window)))
  return jnp.zeros((*plan.window, channels), x.dtype).at[index].set(sums)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _taps_custom_vjp(plan: _Taps, x, weights):
  return _taps_forward(plan, x, weights)


def _taps_fwd(plan, x, weights):
  return _taps_forward(plan, x, weights), (x, weights)


def _taps_bwd(plan, residuals, g):
  x, weights = residuals

  def input_grad(weights, g):
    dx = None
    for tap, ranges in plan.taps:
      term = plan.pad_to_input(
          plan.output_slice(g, ranges) * _per_channel(weights[tap], g.ndim),
          ranges, x.shape[1:-1])
      dx = term if dx is None else dx + term
    return dx

  if plan.taps:  # a k-term sum too: computed once (see `_materialized`)
    dx = _materialized(input_grad, weights, g)
  else:
    dx = jnp.zeros_like(x)
  return dx, _weight_grad(plan, x, g)


_taps_custom_vjp.defvjp(_taps_fwd, _taps_bwd)


def shift_add_plan(kernel_window, axes, geometry, spatial) -> "_Taps":
  """The taps of a shift-add depthwise stage on `spatial` input sizes.

  With constant (zero) padding the input is not padded: each tap reads only
  the input positions its outputs see, and its term is padded to the output.
  Other fills are padded into the input first (`_shift_add`), so every tap
  sees data.
  """
  n = len(spatial)
  window, strides, dilation, pads = _stage_geometry(kernel_window, axes,
                                                    geometry, n)
  if geometry.fill != "constant":
    spatial = [size + lo + hi for size, (lo, hi) in zip(spatial, pads)]
    pads = [(0, 0)] * n
  return _Taps.make(spatial, window, strides, dilation, pads)


def _shift_add(x, kernel, axes, geometry, preferred, custom_vjp):
  """Depthwise conv as a sum over taps of strided slices times weights.

  `kernel` is `[*window over axes, 1, C*m]`; output channel `c*m + j` reads
  input channel `c`. Exactly the grouped convolution's arithmetic but for
  the products with padding zeros, which are skipped. `custom_vjp` picks the
  hand-written backward pass (`_taps_bwd`) over autodiff's.
  """
  x, weights, strides, dilation, pads = _depthwise_operands(
      x, kernel, axes, geometry, preferred or x.dtype)
  plan = _Taps.make(x.shape[1:-1], weights.shape[:-1], strides, dilation,
                    pads)
  taps = _taps_custom_vjp if custom_vjp else _taps_forward
  return taps(plan, x, weights)


def _depthwise_operands(x, kernel, axes, geometry, dtype):
  """A depthwise stage's input and `[*window, C*m]` weights, in `dtype`.

  Other fills than zeros are padded into the input (the returned padding is
  then zero), and each input channel is repeated `m` times (the channel
  multiplier), so output channel `c*m + j` reads input channel `c` in place.
  Also returns the stage's strides, dilation and padding over all N axes.
  """
  n = x.ndim - 2
  window, strides, dilation, pads = _stage_geometry(kernel.shape[:-2], axes,
                                                    geometry, n)
  if geometry.fill != "constant":
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=geometry.fill)
    pads = [(0, 0)] * n
  channels, out_channels = x.shape[-1], kernel.shape[-1]
  if out_channels != channels:
    x = jnp.repeat(x, out_channels // channels, axis=-1)
  weights = kernel.reshape(*window, out_channels).astype(dtype)
  return x.astype(dtype), weights, strides, dilation, pads


def native_applies(x_shape, dtype) -> bool:
  """Whether `_native_depthwise` runs the compiled kernel for this input.

  Up to 3 spatial axes, float32 or float64 (after `preferred_element_type`),
  static shapes. Other stages run as "shift_add".
  """
  return (len(x_shape) - 2 <= 3
          and jnp.dtype(dtype) in (jnp.dtype(jnp.float32),
                                   jnp.dtype(jnp.float64))
          and all(isinstance(d, int) for d in x_shape))


def _native_depthwise(x, kernel, axes, geometry, preferred):
  """Depthwise conv as the compiled kernel (`jaxfactor._native`).

  Same arithmetic as `_shift_add` (products with padding zeros skipped),
  summed per output in tap order. Stages it does not take
  (`native_applies`) run as "shift_add".
  """
  dtype = preferred or x.dtype
  if not native_applies(x.shape, dtype):
    return _shift_add(x, kernel, axes, geometry, preferred, custom_vjp=True)
  n = x.ndim - 2
  x, weights, strides, dilation, pads = _depthwise_operands(
      x, kernel, axes, geometry, dtype)
  # The kernel's 3 spatial axes, missing ones as size-1 axes in front: it
  # walks rows of the last axis, which must be a real one to be long.
  extra = 3 - n
  native_geometry = _native.Geometry(
      (1,) * extra + tuple(strides), (1,) * extra + tuple(dilation),
      ((0, 0),) * extra + tuple(tuple(p) for p in pads))
  batch, *spatial, out_channels = x.shape
  x5 = x.reshape(batch, *(1,) * extra, *spatial, out_channels)
  w4 = weights.reshape(*(1,) * extra, *weights.shape[:-1], out_channels)
  y = _native.forward(native_geometry, x5, w4)
  return y.reshape(batch, *y.shape[1 + extra:-1], out_channels)


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


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _tap_matmul(x, kernel, axes, geometry, precision, preferred):
  """A dense spatial conv as one matmul to every tap's output, then a shift-add.

  `z = x @ W`, `W [C, k' * F]` for the k' taps that reach an output, gives at
  every input position each tap's contribution; output `o` adds up, per tap,
  the contribution at the input position that tap reads (the `_Taps` plan of
  `_shift_add`, applied to `z`). Equal to the convolution up to summation
  order, at `2 * B * prod(spatial) * C * k' * F` FLOPs for the matmul (a
  stride computes positions it skips) plus `(k' - 1) * F` adds per output.

  A loop over batch chunks keeps each chunk's `z` (~`_TAP_CHUNK_BYTES`) in
  cache. The JVP (`jax.custom_jvp`) is XLA's convolution of the tangents, so
  forward and reverse mode, and every gradient, are the convolution's.
  """
  return _tap_matmul_forward(x, kernel, axes, geometry, precision, preferred)


def _tap_matmul_forward(x, kernel, axes, geometry, precision, preferred):
  plan = shift_add_plan(kernel.shape[:-2], axes, geometry, x.shape[1:-1])
  if geometry.fill != "constant":
    _, _, _, pads = _stage_geometry(kernel.shape[:-2], axes, geometry,
                                    x.ndim - 2)
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=geometry.fill)
  out_dtype = jnp.dtype(preferred or x.dtype)
  # Tap outputs are summed in at least float32, as a convolution accumulates.
  acc = jnp.float32 if out_dtype.itemsize < 4 else out_dtype
  channels, features = kernel.shape[-2:]
  batch, out_spatial = x.shape[0], plan.out
  if not plan.taps:  # every tap reads only padding
    return jnp.zeros((batch, *out_spatial, features), out_dtype)
  index = np.array([np.ravel_multi_index(tap, plan.window)
                    for tap, _ in plan.taps])
  w = kernel.reshape(-1, channels, features)[index]  # [k', C, F]
  w = jnp.moveaxis(w, 0, 1).reshape(channels, len(index) * features)

  def chunk_out(xc):
    z = lax.dot_general(xc, w, (((xc.ndim - 1,), (0,)), ((), ())),
                        precision=precision, preferred_element_type=acc)
    z = z.reshape(*z.shape[:-1], len(index), features)
    return plan.sum_to_output(
        lambda t, ranges: plan.input_slice(z[..., t, :], ranges)
    ).astype(out_dtype)

  per_item = max(1, math.prod(x.shape[1:-1]) * len(index) * features
                 * jnp.dtype(acc).itemsize)
  chunk = _chunk_size(batch, per_item, jax.device_count(), _TAP_CHUNK_BYTES)
  if not isinstance(batch, int) or batch < 2 * chunk:
    return chunk_out(x)  # a symbolic (exported) batch, or one chunk
  # Step `j` takes images `j, j + steps, ...`, as in `_weight_grad`.
  steps = batch // chunk
  main = steps * chunk
  xs = x if main == batch else x[:main]

  def step(j, y):
    xc = xs.reshape(chunk, steps, *x.shape[1:])
    return lax.dynamic_update_index_in_dim(
        y, chunk_out(lax.dynamic_index_in_dim(xc, j, axis=1, keepdims=False)),
        j, axis=1)

  y = lax.fori_loop(
      0, steps, step,
      jnp.zeros((chunk, steps, *out_spatial, features), out_dtype))
  y = y.reshape(main, *out_spatial, features)
  if main < batch:
    y = jnp.concatenate([y, chunk_out(x[main:])])
  return y


def _tap_matmul_tangent(axes, geometry, precision, preferred, primals,
                        tangents):
  x, kernel = primals
  dx, dkernel = tangents
  y = _tap_matmul(x, kernel, axes, geometry, precision, preferred)
  # Symbolic zeros: a tangent w.r.t. one argument only runs one conv.
  zero = jax.custom_derivatives.SymbolicZero
  terms = []
  if not isinstance(dx, zero):
    terms.append(_spatial_conv(dx, kernel, axes, 1, geometry, precision,
                               preferred))
  if not isinstance(dkernel, zero):
    terms.append(_spatial_conv(x, dkernel, axes, 1, geometry, precision,
                               preferred))
  return y, functools.reduce(lax.add, terms) if terms else jnp.zeros_like(y)


_tap_matmul.defjvp(_tap_matmul_tangent, symbolic_zeros=True)


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
  `2 * k * C * m` FLOPs per output pixel, for `k = prod(window)` (fewer
  with "native" and "shift_add", which skip products with zero padding).

  Args:
    x: `[*batch, *spatial, C]`; any number of batch axes, or none.
    kernel: `[*window, 1, C * m]` for a channel multiplier `m >= 1`.
    strides: an int or one per spatial axis.
    padding: "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL" (1-D only), an
      int, or one int or `(low, high)` pair per spatial axis, as in Flax.
    dilation: kernel dilation, an int or one per spatial axis.
    precision: passed to `lax.conv_general_dilated`.
    preferred_element_type: accumulation and output dtype; None keeps `x`'s.
    depthwise_lowering: "native" (CPU only: a compiled kernel XLA calls
      as a custom call, built on first use; see `jaxfactor._native`),
      "shift_add" (a sum over taps of strided slices times per-channel
      weights, with a hand-written VJP: reverse-mode differentiation only),
      "shift_add_autodiff" (the same under autodiff: forward mode too,
      slower gradients), "grouped" (`lax.conv_general_dilated` with
      `feature_group_count=C`) or "auto": on CPU, where XLA's grouped
      convolution is slow, native (on one device, where it builds) or else
      shift_add; grouped elsewhere.
      Same result either way.

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
