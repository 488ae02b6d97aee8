"""A dense spatial stage as one matmul to every tap's output, then a shift-add.

XLA:CPU's convolution runs well below the matmul rate for some shapes (stride
1, many input channels, few output features). There `tap_matmul` is faster:
`z = x @ W` gives, at every input position, every tap's contribution, and the
output adds up, per tap, the contribution at the position that tap reads. Its
derivatives are XLA's convolution's (`jax.custom_jvp`). `jaxfactor._lowering`
takes it on CPU where `applies` says so (`benchmarks/spatial.py` measures it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxfactor import _geometry
from jaxfactor import _shift_add
from jaxfactor import _stages

# Bytes of one step's tap outputs in `tap_matmul`'s loop over the batch,
# and the most one image's may take (see `applies`).
CHUNK_BYTES = 4 << 20
MAX_BYTES = 8 << 20

# Where XLA:CPU's convolution was measured slower than the tap matmul
# (`benchmarks/spatial.py`, results/spatial.md): stride 1 and at least
# MIN_POSITIONS positions per image (28x28) ...
MIN_POSITIONS = 784
# ... at least this many input channels (FEW_TAPS_MIN_CHANNELS for a stage
# of at most FEW_TAPS taps, e.g. 3x1) ...
MIN_CHANNELS = 128
FEW_TAPS = 3
FEW_TAPS_MIN_CHANNELS = 64
# ... and at most MAX_FEATURES output features unless the stage has at most
# FEW_TAPS taps: XLA:CPU runs wider 3x3 convs near the matmul rate (128 ->
# 128 at 28x28 ran 1.25-1.8x slower as a tap matmul).
MAX_FEATURES = 64


def applies(
  stage: _stages.Stage, in_shape: Sequence[Any], geometry: _geometry.Geometry
) -> bool:
  """Whether a stage on a `[B, *spatial, C]` CPU input runs as `tap_matmul`.

  Only dense (`groups == 1`) stages with more than one tap, static spatial
  sizes, stride 1, and one image's tap outputs within `MAX_BYTES` (a
  cache-sized step), where the thresholds above say XLA:CPU's convolution
  is slow. (With 64 inputs and 9 taps a stage alone ran 1.0-2.5x faster,
  but Tucker's 64 -> 64 core at 28x28 gained nothing inside its chain
  forward and lost 17-36% forward+backward: hence MIN_CHANNELS.)
  """
  if (
    not isinstance(stage, _stages.SpatialConv)
    or stage.groups != 1
    or math.prod(stage.kernel.shape[:-2]) == 1
  ):
    return False
  _, *spatial, channels = in_shape
  if not all(isinstance(d, int) for d in (*spatial, channels)):
    return False  # symbolic sizes (jax.export): XLA's convolution
  taps, features = math.prod(stage.kernel.shape[:-2]), stage.kernel.shape[-1]
  itemsize = max(jnp.dtype(stage.kernel.dtype).itemsize, 4)  # see `acc`
  few_taps = taps <= FEW_TAPS
  return (
    all(geometry.strides[a] == 1 for a in stage.axes)
    and channels >= (FEW_TAPS_MIN_CHANNELS if few_taps else MIN_CHANNELS)
    and math.prod(spatial) >= MIN_POSITIONS
    and (features <= MAX_FEATURES or few_taps)
    and math.prod(spatial) * taps * features * itemsize <= MAX_BYTES
  )


def _plan(kernel_window, axes, geometry, spatial) -> _shift_add.Taps:
  """The taps of a stage on `spatial` input sizes (a shift-add plan).

  With constant (zero) padding the input is not padded: each tap reads only
  the input positions its outputs see, and its term is padded to the output.
  Other fills are padded into the input first (`_forward`), so every tap
  sees data.
  """
  n = len(spatial)
  window, strides, dilation, pads = _stages.stage_geometry(
    kernel_window, axes, geometry, n
  )
  if geometry.fill != "constant":
    spatial = [size + lo + hi for size, (lo, hi) in zip(spatial, pads)]
    pads = [(0, 0)] * n
  return _shift_add.Taps.make(spatial, window, strides, dilation, pads)


def taps(kernel_window, axes, geometry, spatial) -> int:
  """How many taps of a stage read input (`k'`), for FLOP counts."""
  return len(_plan(kernel_window, axes, geometry, spatial).taps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def tap_matmul(x, kernel, axes, geometry, precision, preferred):
  """A dense spatial conv as one matmul to every tap's output, then a shift-add.

  `z = x @ W`, `W [C, k' * F]` for the k' taps that reach an output, gives at
  every input position each tap's contribution; output `o` adds up, per tap,
  the contribution at the input position that tap reads (a
  `_shift_add.Taps` plan, applied to `z`). Equal to the convolution up to
  summation order, at `2 * B * prod(spatial) * C * k' * F` FLOPs for the
  matmul (a stride computes positions it skips) plus `(k' - 1) * F` adds per
  output.

  A loop over batch chunks keeps each chunk's `z` (~`CHUNK_BYTES`) in
  cache. The JVP (`jax.custom_jvp`) is XLA's convolution of the tangents, so
  forward and reverse mode, and every gradient, are the convolution's.
  """
  return _forward(x, kernel, axes, geometry, precision, preferred)


def _forward(x, kernel, axes, geometry, precision, preferred):
  plan = _plan(kernel.shape[:-2], axes, geometry, x.shape[1:-1])
  _, _, _, pads = _stages.stage_geometry(
    kernel.shape[:-2], axes, geometry, x.ndim - 2
  )
  x, _ = _stages.pad_fill(x, pads, geometry)
  out_dtype = jnp.dtype(preferred or x.dtype)
  # Tap outputs are summed in at least float32, as a convolution accumulates.
  acc = jnp.float32 if out_dtype.itemsize < 4 else out_dtype
  channels, features = kernel.shape[-2:]
  batch, out_spatial = x.shape[0], plan.out
  if not plan.taps:  # every tap reads only padding
    return jnp.zeros((batch, *out_spatial, features), out_dtype)
  index = np.array(
    [np.ravel_multi_index(tap, plan.window) for tap, _ in plan.taps]
  )
  w = kernel.reshape(-1, channels, features)[index]  # [k', C, F]
  w = jnp.moveaxis(w, 0, 1).reshape(channels, len(index) * features)

  def chunk_out(xc):
    z = lax.dot_general(
      xc,
      w,
      (((xc.ndim - 1,), (0,)), ((), ())),
      precision=precision,
      preferred_element_type=acc,
    )
    z = z.reshape(*z.shape[:-1], len(index), features)
    return plan.sum_to_output(
      lambda t, ranges: plan.input_slice(z[..., t, :], ranges)
    ).astype(out_dtype)

  per_item = max(
    1,
    math.prod(x.shape[1:-1]) * len(index) * features * jnp.dtype(acc).itemsize,
  )
  chunk = _shift_add.chunk_size(
    batch, per_item, jax.device_count(), CHUNK_BYTES
  )
  if not isinstance(batch, int) or batch < 2 * chunk:
    return chunk_out(x)  # a symbolic (exported) batch, or one chunk
  # Step `j` takes images `j, j + steps, ...`, as in the shift-add's weight
  # gradient.
  steps = batch // chunk
  main = steps * chunk
  xs = x if main == batch else x[:main]

  def step(j, y):
    xc = xs.reshape(chunk, steps, *x.shape[1:])
    return lax.dynamic_update_index_in_dim(
      y,
      chunk_out(lax.dynamic_index_in_dim(xc, j, axis=1, keepdims=False)),
      j,
      axis=1,
    )

  y = lax.fori_loop(
    0, steps, step, jnp.zeros((chunk, steps, *out_spatial, features), out_dtype)
  )
  y = y.reshape(main, *out_spatial, features)
  if main < batch:
    y = jnp.concatenate([y, chunk_out(x[main:])])
  return y


def _tangent(axes, geometry, precision, preferred, primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  y = tap_matmul(x, kernel, axes, geometry, precision, preferred)
  # Symbolic zeros: a tangent w.r.t. one argument only runs one conv.
  zero = jax.custom_derivatives.SymbolicZero
  terms = []
  if not isinstance(dx, zero):
    terms.append(
      _stages.spatial_conv(dx, kernel, axes, 1, geometry, precision, preferred)
    )
  if not isinstance(dkernel, zero):
    terms.append(
      _stages.spatial_conv(x, dkernel, axes, 1, geometry, precision, preferred)
    )
  return y, functools.reduce(lax.add, terms) if terms else jnp.zeros_like(y)


tap_matmul.defjvp(_tangent, symbolic_zeros=True)
