"""The public convolutions: `conv` (dense or any format), depthwise and
pointwise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxfactor import _cost
from jaxfactor import _formats as formats
from jaxfactor import _lowering
from jaxfactor import _stages
from jaxfactor import _validation


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
) -> jax.Array:
  """Convolves `x` with a dense kernel or a factorized format.

  For any format `f`, `conv(x, f, ...)` equals
  `conv(x, f.to_dense(), ...)`, i.e. Flax's `nn.Conv` (no bias) with kernel
  `f.to_dense()`, for every strides, padding and dilation.

  Args:
    x: `[*batch, *spatial, C]`: N spatial axes (N = the kernel's), channels
      last, any number of leading batch axes (none for an unbatched input).
    kernel: a dense HWIO kernel `[*window, C, F]`, or a `DepthwiseSeparable`,
      `SpatiallySeparable`, `LowRank`, `Tucker`, `CP` or `TensorTrain`.
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
      runs one convolution, and "auto" picks whichever a roofline model of
      the platform expects to be faster for these static shapes (see
      `cost`). Ignored for dense kernels. How each stage is lowered (XLA's
      convolution, a compiled depthwise kernel on CPU, ...) is decided when
      the program is lowered, for the platform it is lowered for; the
      result is the same up to summation order.

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
  window, in_features = _validation.check_kernel(fn, kernel)
  x = _validation.check_input(fn, x, window, in_features)
  _validation.check_same_dtype(fn, [("x", x), ("kernel", kernel)])
  preferred = _validation.check_preferred_element_type(
    fn, x.dtype, preferred_element_type
  )
  x, batch_shape, geometry = _stages.prepare(
    fn, x, window, strides=strides, padding=padding, dilation=dilation
  )

  def chosen(platform):
    return _cost.choose_implementation(
      kernel, x.shape, geometry, implementation, platform
    )

  def decide(platform):
    implementation = chosen(platform)
    plan = _cost.plans(kernel, x.shape, geometry, platform)[implementation]
    return implementation, plan.signature()

  def branch(platform):
    def run(x, kernel):
      if chosen(platform) == "factorized":
        stages = kernel.stages()
      else:
        if not isinstance(kernel, formats.Format):
          dense = jnp.asarray(kernel)
        elif preferred is not None:
          # The dense kernel at the precision the result is asked for.
          dense = jax.tree.map(lambda a: a.astype(preferred), kernel).to_dense()
        else:
          dense = kernel.to_dense()
        stages = [
          _stages.SpatialConv(
            dense, tuple(range(len(window))), _cost.groups(kernel)
          )
        ]
      plan = _lowering.plan(stages, x.shape, geometry, platform)
      return _lowering.run(
        x,
        plan.steps,
        geometry,
        precision=precision,
        preferred_element_type=preferred,
      )

    return run

  y = _lowering.per_platform(decide, branch, x, kernel)
  return _stages.restore_batch(y, batch_shape)


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
  kernel = _validation.check_array(fn, "kernel", kernel)
  _validation.check_floating(fn, "kernel", kernel)
  _validation.check_ndim(fn, "kernel", kernel, 2, "[C, F]")
  _validation.check_positive_dims(fn, "kernel", kernel.shape)
  x = _validation.check_array(fn, "x", x)
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
) -> jax.Array:
  """A depthwise convolution: one filter per input channel, times `m`.

  Output channel `c * m + j` is input channel `c` convolved with filter
  `kernel[..., 0, c * m + j]` (lax's and Flax's layout, so a Flax
  `nn.Conv(feature_group_count=C)` kernel works unchanged). Costs
  `2 * k * C * m` FLOPs per output pixel, for `k = prod(window)`, fewer
  where taps fall in zero padding. On CPU it runs as a compiled kernel (or a
  shift-add of its taps where that cannot be built), elsewhere as XLA's
  grouped convolution: decided when the program is lowered. 16-bit inputs
  are accumulated in float32 on every lowering.

  Non-finite values: on CPU, products with zero padding are skipped, not
  computed, so a NaN or inf weight does not reach an output all of whose
  reads of it fall in the padding (a convolution may compute `0 * inf =
  NaN` there). Every output that reads it with real input is non-finite on
  every lowering, so a corrupted weight still shows in the result.

  Args:
    x: `[*batch, *spatial, C]`; any number of batch axes, or none.
    kernel: `[*window, 1, C * m]` for a channel multiplier `m >= 1`.
    strides: an int or one per spatial axis.
    padding: "SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL" (1-D only), an
      int, or one int or `(low, high)` pair per spatial axis, as in Flax.
    dilation: kernel dilation, an int or one per spatial axis.
    precision: passed to `lax.conv_general_dilated`.
    preferred_element_type: accumulation and output dtype; None keeps `x`'s.
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
  kernel = _validation.check_array(fn, "kernel", kernel)
  _validation.check_floating(fn, "kernel", kernel)
  if kernel.ndim < 3 or kernel.shape[-2] != 1:
    raise ValueError(
      f"{fn}: `kernel` must have shape [*window, 1, C*m], got shape"
      f" {tuple(kernel.shape)}."
    )
  _validation.check_positive_dims(fn, "kernel", kernel.shape)
  window = kernel.shape[:-2]
  x = _validation.check_input(fn, x, window, in_features=None)
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
  x, batch_shape, geometry = _stages.prepare(
    fn, x, window, strides=strides, padding=padding, dilation=dilation
  )
  stage = _stages.SpatialConv(
    jnp.asarray(kernel), tuple(range(len(window))), groups=channels
  )
  # One depthwise step on every platform (its primitives pick their own
  # lowering).
  y = _lowering.run(
    x,
    [_lowering.Step(stage, _lowering.DEPTHWISE)],
    geometry,
    precision=precision,
    preferred_element_type=preferred,
  )
  return _stages.restore_batch(y, batch_shape)
