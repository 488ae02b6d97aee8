"""Convolution geometry: strides, padding and dilation resolved per axis.

Every padding form Flax accepts is resolved here, once, into explicit
`(low, high)` pairs plus a fill mode. The pairs are exactly what Flax's
`nn.Conv` would use (lax's own rule for "SAME"/"VALID", Flax's for
"CIRCULAR", "REFLECT" and "CAUSAL"). Because padding along one axis commutes
with convolution along another axis and with 1x1 channel mixing, the same pairs
serve every stage of a factorized chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jax import core
from jax import lax

from jaxfactor import _validation

# Flax pads these modes with `jnp.pad` and then runs a "VALID" convolution.
_FILL_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Resolved geometry of one convolution over N spatial axes.

  Attributes:
    strides: one stride per spatial axis.
    dilation: one kernel dilation per spatial axis.
    padding: one `(low, high)` pair per spatial axis.
    fill: `"constant"` (zeros, handled by lax), `"wrap"` or `"reflect"`
      (materialised with `jnp.pad` before the convolution).
  """

  strides: tuple[int, ...]
  dilation: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  fill: str


def resolve(
  fn: str,
  spatial_shape: Sequence[int],
  window: Sequence[int],
  *,
  strides: Any,
  padding: Any,
  dilation: Any,
) -> Geometry:
  """Checks the geometry arguments and resolves them for these shapes."""
  n = len(window)
  strides = _validation.canonicalize_positive_ints(fn, "strides", strides, n)
  dilation = _validation.canonicalize_positive_ints(fn, "dilation", dilation, n)
  padding = _validation.canonicalize_padding(fn, padding, n)
  dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
  fill = "constant"
  pads: Sequence[tuple[Any, Any]]
  if padding in ("SAME", "SAME_LOWER", "VALID"):
    pads = lax.padtype_to_pads(spatial_shape, dilated, strides, padding)
  elif padding in _FILL_MODES:
    pads = [((k - 1) // 2, k // 2) for k in dilated]
    fill = _FILL_MODES[padding]
  elif padding == "CAUSAL":
    pads = [(dilated[0] - 1, 0)]
  else:
    pads = padding
  pads = tuple((_static(lo), _static(hi)) for lo, hi in pads)
  for axis, (size, k, (lo, hi)) in enumerate(zip(spatial_shape, dilated, pads)):
    # With symbolic sizes (jax.export) the check is left to the call.
    if all(isinstance(v, int) for v in (size, lo, hi)) and size + lo + hi < k:
      raise ValueError(
        f"{fn}: spatial axis {axis} of `x` has size {size}, padded to"
        f" {size + lo + hi} by padding ({lo}, {hi}), which is smaller than"
        f" the dilated window {k} (window {window[axis]}, dilation"
        f" {dilation[axis]}); the output would be empty."
      )
  return Geometry(strides, dilation, tuple(pads), fill)


def _static(value: Any) -> Any:
  """An int where the value is one; a symbolic dimension stays symbolic."""
  try:
    return int(value)
  except Exception:  # pylint: disable=broad-except
    return value  # a symbolic pad (jax.export), e.g. "SAME" with a stride


def output_size(size: int, k: int, stride: int, dilation: int, pad) -> int:
  """Output length along one axis (lax's formula)."""
  dilated = (k - 1) * dilation + 1
  return (size + pad[0] + pad[1] - dilated) // stride + 1


def valid_taps(size: Any, k: int, stride: int, dilation: int, pad) -> Any:
  """Number of (output, tap) pairs along one axis that read real input.

  A tap that lands in zero padding does no arithmetic, and XLA's cost model
  does not count it either. With a symbolic size or padding (`jax.export`)
  the count is a symbolic expression, exact for every size it takes.
  """
  out = output_size(size, k, stride, dilation, pad)
  count = 0
  for tap in range(k):
    offset = tap * dilation - pad[0]
    # Outputs o with 0 <= o * stride + offset < size.
    first = core.max_dim(0, -(offset // stride))
    last = core.min_dim(out - 1, (size - 1 - offset) // stride)
    count += core.max_dim(0, last - first + 1)
  return count
