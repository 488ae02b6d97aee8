"""`conv`: one entry point for dense kernels and every factorized format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxfactor import _validation
from jaxfactor import cost_model
from jaxfactor import formats
from jaxfactor import primitives


def conv(
    x: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike | formats.Format,
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    dilation: int | Sequence[int] = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    implementation: str = "auto",
    depthwise_lowering: str = "auto",
    spatial_lowering: str = "auto",
) -> jax.Array:
  """Convolves `x` with a dense kernel or a factorized format.

  For any format `f`, `conv(x, f, ...)` equals
  `conv(x, f.to_dense(), ...)`, i.e. Flax's `nn.Conv` (no bias) with kernel
  `f.to_dense()`, for every strides, padding and dilation.

  Args:
    x: `[*batch, *spatial, C]`: N spatial axes (N = the kernel's), channels
      last, any number of leading batch axes (none for an unbatched input).
    kernel: a dense HWIO kernel `[*window, C, F]`, or a `DepthwiseSeparable`,
      `SpatiallySeparable`, `LowRank`, `Tucker` or `CP`.
    strides: an int or one per spatial axis.
    padding: "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL" (N = 1 only),
      an int, or one int or `(low, high)` pair per spatial axis; the same
      meanings as Flax's `nn.Conv`.
    dilation: kernel dilation, an int or one per spatial axis.
    precision: passed to every `lax` call.
    preferred_element_type: accumulation and output dtype (e.g. float32 for
      bfloat16 inputs); None keeps `x`'s dtype. Intermediate stages of a
      factorized chain are kept at this dtype too.
    implementation: for a format, "factorized" runs the chain of factor
      stages (strides, padding and dilation on the spatial stages only, 1x1
      stages as channel contractions), "reconstructed" builds `to_dense()` and
      runs one convolution, and "auto" picks whichever a roofline model of the
      default backend (FLOPs and bytes, `cost_model.Machine`) expects to be
      faster for these static shapes. Ignored for dense kernels.
    depthwise_lowering: how depthwise stages (DepthwiseSeparable's first
      stage, CP's per-axis stages) run, as in `depthwise_conv`: "auto"
      (on CPU native on one device where it builds, shift_add otherwise;
      grouped elsewhere), "native" (CPU only), "shift_add"
      (reverse-mode differentiation only), "shift_add_autodiff" or
      "grouped".
    spatial_lowering: how dense spatial stages (a dense kernel, LowRank's
      and Tucker's k x k stage, SpatiallySeparable's two stages) run: "conv"
      (`lax.conv_general_dilated`), "tap_matmul" (one matmul from the input
      to every tap's output, then a shift-add of those outputs, in a loop
      over batch chunks; its derivatives are the convolution's) or "auto":
      on CPU, "tap_matmul" where XLA's convolution was measured slow (stride
      1, >= 784 positions per image, >= 128 input channels (64 for <= 3
      taps), <= 64 output features or <= 3 taps, one image's tap outputs
      within 8 MiB: e.g. a 3x3 conv from 128 to 32 features at 56x56 runs
      ~2.1-2.2x faster), "conv" elsewhere and on GPU/TPU. Same result up to
      summation order.

  Returns:
    `[*batch, *out_spatial, F]`.

  Raises:
    TypeError: non-array inputs or factors, non-floating or mixed dtypes.
    ValueError: `x` of the wrong rank or channel count, factors that do not
      chain, bad strides/dilation/padding, or an empty output.

  >>> import jax, jax.numpy as jnp
  >>> import jaxfactor
  >>> f = jaxfactor.LowRank(jnp.ones((3, 3, 16, 4)), jnp.ones((4, 32)))
  >>> x = jnp.ones((2, 28, 28, 16))
  >>> jaxfactor.conv(x, f, strides=2).shape
  (2, 14, 14, 32)
  """
  fn = "conv"
  _validation.check_implementation(fn, implementation)
  lowering = primitives.resolve_depthwise_lowering(fn, depthwise_lowering)
  spatial = primitives.resolve_spatial_lowering(fn, spatial_lowering)
  window, in_features = cost_model.check_kernel(fn, kernel)
  _validation.check_input(fn, x, window, in_features)
  _validation.check_same_dtype(fn, [("x", x), ("kernel", kernel)])
  preferred = _validation.check_preferred_element_type(
      fn, x.dtype, preferred_element_type
  )
  x, batch_shape, geometry = primitives.prepare(
      fn, x, window, strides=strides, padding=padding, dilation=dilation
  )
  chosen, _ = cost_model.choose_implementation(
      kernel, x.shape, geometry, implementation, lowering,
      spatial_lowering=spatial,
  )
  if chosen == "factorized":
    stages = kernel.stages()
  else:
    if isinstance(kernel, formats.Format):
      dense = kernel.to_dense()
    else:
      dense = jnp.asarray(kernel)
    stages = [primitives.SpatialConv(dense, tuple(range(len(window))))]
  y = primitives.run_stages(
      x, stages, geometry, precision=precision,
      preferred_element_type=preferred, depthwise_lowering=lowering,
      spatial_lowering=spatial,
  )
  return primitives.restore_batch(y, batch_shape)
