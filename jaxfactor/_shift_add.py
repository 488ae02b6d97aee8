"""Depthwise convolution as a shift-add: a sum over taps of slices times
weights.

The pure-JAX depthwise lowering (any platform, any dtype, any number of
spatial axes): tap `t` of a `[*window, C]` filter contributes
`x[strided slice t] * w[t]` to the outputs it reaches. Products with zero
padding are skipped, not computed: each tap reads only the input positions
its outputs see. `forward`, `input_grad` and `weight_grad` are the three maps
of the depthwise primitives (`jaxfactor._depthwise`), each written for speed
on CPU: the k-tap sums are computed once behind a fusion fence
(`materialized`), and the weight gradient loops over cache-sized batch chunks.

All three take operands already prepared by `jaxfactor._depthwise`: zero
padding only (other fills are padded into the input first) and channel
multiplier 1 (each input channel repeated `m` times).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Taps(NamedTuple):
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
    out = tuple(
      (n + lo + hi - (k - 1) * d - 1) // s + 1
      for n, k, d, s, (lo, hi) in zip(sizes, window, dilation, strides, pads)
    )
    taps = []
    for tap in np.ndindex(*window):
      ranges = []
      for t, n, o, d, s, (lo, _) in zip(
        tap, sizes, out, dilation, strides, pads
      ):
        offset = t * d - lo  # output i reads input i * s + offset
        out_lo = -(offset // s) if offset < 0 else 0  # ceil(-offset / s)
        out_hi = min(o, (n - 1 - offset) // s + 1)
        if out_hi <= out_lo:
          break
        ranges.append((out_lo, out_hi, out_lo * s + offset))
      else:
        taps.append((tap, tuple(ranges)))
    return cls(
      out,
      tuple(strides),
      tuple(dilation),
      tuple(tuple(p) for p in pads),
      tuple(window),
      tuple(taps),
    )

  def input_slice(self, x, ranges):
    """The input positions one tap reads, `[B, *(out_hi - out_lo), C]`."""
    start = [0, *(st for _, _, st in ranges), 0]
    limit = [
      x.shape[0],
      *(
        st + (hi - lo - 1) * s + 1
        for (lo, hi, st), s in zip(ranges, self.strides)
      ),
      x.shape[-1],
    ]
    return lax.slice(x, start, limit, [1, *self.strides, 1])

  def output_slice(self, y, ranges):
    """The outputs one tap reaches."""
    return lax.slice(
      y,
      [0, *(lo for lo, _, _ in ranges), 0],
      [y.shape[0], *(hi for _, hi, _ in ranges), y.shape[-1]],
    )

  def pad_to_output(self, term, ranges):
    zero = jnp.zeros((), term.dtype)
    return lax.pad(
      term,
      zero,
      [
        (0, 0, 0),
        *((lo, o - hi, 0) for (lo, hi, _), o in zip(ranges, self.out)),
        (0, 0, 0),
      ],
    )

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


def per_channel(weight, ndim):
  """`[C]` weights broadcastable against `[B, *spatial, C]` (explicitly)."""
  return weight.reshape((1,) * (ndim - 1) + weight.shape)


def materialized(fn, weights, *args):
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
  return lax.cond(
    (w == w) | (w != w),
    fn,
    lambda *_: jnp.zeros(out.shape, out.dtype),
    weights,
    *args,
  )


def _forward(plan: Taps, x, weights):
  """`sum over taps of (input slice * weight)`, each padded to the output."""
  if not plan.taps:  # every tap reads only padding
    return jnp.zeros((x.shape[0], *plan.out, x.shape[-1]), x.dtype)
  return materialized(
    lambda weights, x: plan.sum_to_output(
      lambda t, ranges: (
        plan.input_slice(x, ranges)
        * per_channel(weights[plan.taps[t][0]], x.ndim)
      )
    ),
    weights,
    x,
  )


# Bytes of input each step of the weight-gradient loop reduces: small enough
# to stay in cache across the k taps (measured on the 2-core benchmark machine:
# 1 image of 56x56x128 per step is 6x faster than one pass over the batch).
CHUNK_BYTES = 1 << 20


def chunk_size(
  batch, per_item: int, devices: int, target_bytes: int | None = None
) -> int:
  """Images per step of a batch loop: ~`target_bytes` per device.

  `target_bytes` defaults to `CHUNK_BYTES`, the weight gradient's.

  A multiple of `devices` that divides `batch` where one of at least half
  the target size does: then `[chunk, steps, ...]` is a free reshape of the
  batch, while a remainder costs a copy of the input and of the gradient
  (XLA copies the `x[:steps * chunk]` slice) and one more pass.
  """
  target = max(1, (target_bytes or CHUNK_BYTES) // per_item)
  if isinstance(batch, int):
    largest = min(target, max(1, batch // devices))
    for per_device in range(largest, (target + 1) // 2 - 1, -1):
      if batch % (devices * per_device) == 0:
        return devices * per_device
  return devices * target


def _weight_grad(plan: Taps, x, g):
  """`d weights`: per tap, `sum(input slice * output-gradient slice)`.

  A loop over batch chunks of ~`CHUNK_BYTES` per device, so each chunk's k
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
  offsets = np.array(
    [[t * d for t, d in zip(tap, plan.dilation)] for tap, _ in plan.taps],
    np.int32,
  ).reshape(len(plan.taps), len(plan.window))

  def partial_sums(xc, gc):
    # Padded, every tap's slice has the output's shape. The taps are a loop
    # (`lax.map`): one slice-and-reduce kernel for XLA to compile instead of
    # one per tap (k of them, and XLA:CPU's compile time grows with the
    # kernel count: a 3x3 layer's weight gradient compiled 4x faster, its
    # run time unchanged). Each step reads a slice of the chunk, in cache.
    xc = lax.pad(
      xc,
      jnp.zeros((), xc.dtype),
      [(0, 0, 0), *((lo, hi, 0) for lo, hi in plan.pads), (0, 0, 0)],
    )
    size = [
      xc.shape[0],
      *((o - 1) * s + 1 for o, s in zip(plan.out, plan.strides)),
      channels,
    ]

    def tap_sum(offset):
      zero = jnp.zeros((), offset.dtype)
      piece = lax.dynamic_slice(
        xc, [zero, *(offset[i] for i in range(len(plan.window))), zero], size
      )
      piece = lax.slice(piece, [0] * xc.ndim, size, [1, *plan.strides, 1])
      return jnp.sum(piece * gc, axis=tuple(range(xc.ndim - 1)), dtype=acc)

    return lax.map(tap_sum, jnp.asarray(offsets))

  chunk = chunk_size(batch, per_item, jax.device_count())
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
        lax.dynamic_index_in_dim(gc, j, axis=1, keepdims=False),
      )

    sums = lax.fori_loop(
      0, steps, step, jnp.zeros((len(plan.taps), channels), acc)
    )
    if main < batch:
      sums = sums + partial_sums(x[main:], g[main:])
  sums = sums.astype(x.dtype)
  if len(plan.taps) == math.prod(plan.window):  # every tap reads input
    return sums.reshape(*plan.window, channels)
  index = tuple(
    np.array([tap[i] for tap, _ in plan.taps], np.int32)
    for i in range(len(plan.window))
  )
  return jnp.zeros((*plan.window, channels), x.dtype).at[index].set(sums)


def plan(
  spatial: Sequence[int], window: Sequence[int], strides, dilation, pads
) -> Taps:
  """The taps of a depthwise conv on `spatial` input sizes (zero padding)."""
  return Taps.make(spatial, window, strides, dilation, pads)


def forward(x, weights, strides, dilation, pads):
  """`y [B, *out, C]` of `x [B, *spatial, C]` and `weights [*window, C]`."""
  taps = plan(x.shape[1:-1], weights.shape[:-1], strides, dilation, pads)
  return _forward(taps, x, weights)


def input_grad(g, weights, in_shape, strides, dilation, pads):
  """The transpose of `forward` in `x` (of shape `in_shape`), applied to `g`."""
  taps = plan(in_shape[1:-1], weights.shape[:-1], strides, dilation, pads)
  if not taps.taps:
    return jnp.zeros(in_shape, g.dtype)

  def grad(weights, g):
    dx = None
    for tap, ranges in taps.taps:
      term = taps.pad_to_input(
        taps.output_slice(g, ranges) * per_channel(weights[tap], g.ndim),
        ranges,
        in_shape[1:-1],
      )
      dx = term if dx is None else dx + term
    return dx

  return materialized(grad, weights, g)  # a k-term sum too


def weight_grad(x, g, window, strides, dilation, pads):
  """The transpose of `forward` in `weights` (`[*window, C]`), at `g`."""
  taps = plan(x.shape[1:-1], window, strides, dilation, pads)
  return _weight_grad(taps, x, g)
