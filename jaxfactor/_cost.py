"""Exact parameter and FLOP counts, and the choice of implementation.

FLOPs are counted the way XLA's `HloCostAnalysis` counts the computation
`conv` runs on a platform (`jaxfactor._lowering` plans it, stage by stage):

* a multiply-add is 2 FLOPs;
* a convolution counts only the taps that read real input: a tap that lands in
  zero padding does no arithmetic (so "SAME" costs less than
  `2 * out_pixels * k * C * F`);
* a 1x1 stage (`dot_general`) costs `2 * B * pixels * C * F`;
* explicit padding (`jnp.pad` for "CIRCULAR"/"REFLECT"), reshapes and casts
  cost nothing; in `to_dense`, an elementwise product costs 1 per element.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from jaxfactor import _formats as formats
from jaxfactor import _geometry
from jaxfactor import _lowering
from jaxfactor import _stages
from jaxfactor import _validation


class Cost(NamedTuple):
  """Parameters stored and FLOPs spent by one convolution.

  Attributes:
    params: number of kernel parameters (the sum of the factors' sizes).
    flops: floating-point operations for one call, multiply-add = 2.
  """

  params: int
  flops: int


def groups(kernel: Any) -> int:
  """The kernel's channel groups: a format's `groups`, 1 for a dense one."""
  return kernel.groups if isinstance(kernel, formats.Format) else 1


def _dense_stage(kernel: Any) -> _stages.SpatialConv:
  """The one stage of `kernel`'s dense (or reconstructed) convolution."""
  shape = kernel.shape
  return _stages.SpatialConv(
    jax.ShapeDtypeStruct(shape, kernel.dtype),
    tuple(range(len(shape) - 2)),
    groups(kernel),
  )


def _static(shape: Sequence[Any]) -> bool:
  return all(isinstance(d, int) for d in shape)


def _dimension(fn: str, d: Any, shape: Sequence[Any]) -> Any:
  """An int, or a symbolic dimension (`jax.export`) as it is."""
  if jax.export.is_symbolic_dim(d):
    return d
  try:
    return operator.index(d)
  except TypeError:
    raise TypeError(
      f"{fn}: `input_shape` must be a sequence of ints, got {tuple(shape)!r}."
    ) from None


def plans(
  kernel: Any,
  in_shape: Sequence[Any],
  geometry: _geometry.Geometry,
  platform: str,
) -> dict[str, _lowering.Plan]:
  """The plans of "factorized" and "reconstructed" for `kernel` there."""
  dense = _lowering.plan([_dense_stage(kernel)], in_shape, geometry, platform)
  if not isinstance(kernel, formats.Format):
    return {"reconstructed": dense}
  return {
    "factorized": _lowering.plan(kernel.stages(), in_shape, geometry, platform),
    "reconstructed": dense,
  }


def choose_implementation(
  kernel: Any,
  in_shape: Sequence[Any],
  geometry: _geometry.Geometry,
  implementation: str,
  platform: str,
) -> str:
  """Resolves `implementation` on a platform for these static shapes.

  "auto" picks whichever of "factorized" and "reconstructed" the roofline
  model of the platform (`_lowering.Machine`) expects to run faster, FLOPs
  and bytes moved both counted (ties go to "factorized"); reconstruction
  pays `to_dense()` at the matmul rate. With symbolic shapes (`jax.export`)
  "auto" is "factorized". A dense kernel is always "reconstructed": it is
  its own dense kernel.
  """
  if not isinstance(kernel, formats.Format):
    return "reconstructed"
  if implementation != "auto":
    return implementation
  if not _static(in_shape):
    return "factorized"
  machine = _lowering.MACHINES[platform]
  itemsize = jax.numpy.dtype(kernel.dtype).itemsize
  chains = plans(kernel, in_shape, geometry, platform)
  t_factorized = _lowering.seconds(
    chains["factorized"], in_shape, geometry, machine, itemsize
  )
  t_reconstructed = (
    kernel.to_dense_flops() / machine.matmul_flops
    + machine.overhead
    + _lowering.seconds(
      chains["reconstructed"], in_shape, geometry, machine, itemsize
    )
  )
  return "factorized" if t_factorized <= t_reconstructed else "reconstructed"


def count_flops(
  kernel: Any,
  in_shape: Sequence[int],
  geometry: _geometry.Geometry,
  implementation: str,
  platform: str,
) -> int:
  """FLOPs of `conv` with `kernel` on a `[B, *spatial, C]` input there."""
  chosen = choose_implementation(
    kernel, in_shape, geometry, implementation, platform
  )
  chain = plans(kernel, in_shape, geometry, platform)[chosen]
  flops = _lowering.flops(chain, in_shape, geometry)
  if chosen == "reconstructed" and isinstance(kernel, formats.Format):
    flops += kernel.to_dense_flops()
  return flops


def cost(
  kernel: Any,
  input_shape: Sequence[int],
  *,
  strides: int | Sequence[int] = 1,
  padding: Any = "SAME",
  dilation: int | Sequence[int] = 1,
  implementation: str = "auto",
  platform: str | None = None,
) -> Cost:
  """Counts the parameters and FLOPs of `conv(x, kernel, ...)`, exactly.

  The count is of the computation `conv` runs for these arguments on
  `platform`, stage by stage, as XLA's cost analysis counts it: a
  multiply-add is 2 FLOPs and a convolution multiplies only the taps that
  read real input. On CPU, depthwise stages run as a compiled kernel (a
  custom call XLA does not count into), counted the same way: a
  multiply-add per in-range product. Leaves may be abstract
  (`jax.ShapeDtypeStruct`), so a format from `jax.eval_shape` can be costed
  without allocating it.

  Args:
    kernel: a dense HWIO kernel `[*window, C, F]` or any format.
    input_shape: the shape of `x`, `[*batch, *spatial, C]`.
    strides: as in `conv`.
    padding: as in `conv`.
    dilation: as in `conv`.
    implementation: as in `conv`: "auto", "factorized" or "reconstructed".
    platform: "cpu", "gpu" or "tpu": whose choice of implementation and of
      lowering to count; default: JAX's default backend.

  Returns:
    `Cost(params, flops)`, Python ints; with symbolic batch or spatial
    sizes (`input_shape` from inside `jax.export`) the FLOPs are a symbolic
    expression in them, exact for every size they take.

  Raises:
    TypeError, ValueError: the same checks as `conv`.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> dense = jnp.ones((3, 3, 128, 128))
  >>> jaxfactor.cost(dense, (1, 28, 28, 128), padding="VALID")
  Cost(params=147456, flops=199360512)
  """
  fn = "cost"
  _validation.check_implementation(fn, implementation)
  platform = _validation.check_platform(fn, platform)
  window, in_features = _validation.check_kernel(fn, kernel, abstract=True)
  if isinstance(input_shape, (str, bytes)) or not isinstance(
    input_shape, Sequence
  ):
    raise TypeError(
      f"{fn}: `input_shape` must be a sequence of ints, got"
      f" {type(input_shape).__name__}."
    )
  input_shape = tuple(_dimension(fn, d, input_shape) for d in input_shape)
  n = len(window)
  if not isinstance(input_shape[-1], int):
    raise ValueError(
      f"{fn}: the channel size of `input_shape` must be static (it is the"
      f" kernel's {in_features} input features), got {input_shape}; batch"
      " and spatial sizes may be symbolic."
    )
  # Checked with symbolic sizes read as 1 (a size too small for the window
  # is then the caller's to avoid, as with `conv` under `jax.export`).
  _validation.check_input(
    fn,
    jax.ShapeDtypeStruct(
      tuple(d if isinstance(d, int) else 1 for d in input_shape), kernel.dtype
    ),
    window,
    in_features,
    abstract=True,
  )
  spatial = input_shape[-n - 1 :]
  geometry = _geometry.resolve(
    fn,
    spatial[:-1],
    window,
    strides=strides,
    padding=padding,
    dilation=dilation,
  )
  batch = math.prod(input_shape[: -n - 1])
  if _static([batch]):
    flops = (
      0
      if batch == 0
      else count_flops(
        kernel, (batch, *spatial), geometry, implementation, platform
      )
    )
  else:
    # A symbolic batch (inside `jax.export`): the FLOPs of one image times
    # the batch. "auto" then decides as `conv` does for symbolic shapes.
    if implementation == "auto":
      implementation = choose_implementation(
        kernel, (batch, *spatial), geometry, implementation, platform
      )
    per_image = count_flops(
      kernel, (1, *spatial), geometry, implementation, platform
    )
    to_dense = (
      kernel.to_dense_flops()
      if implementation == "reconstructed"
      and isinstance(kernel, formats.Format)
      else 0
    )
    flops = batch * (per_image - to_dense) + to_dense
  params = (
    kernel.num_params
    if isinstance(kernel, formats.Format)
    else math.prod(kernel.shape)
  )
  return Cost(params=params, flops=flops)
