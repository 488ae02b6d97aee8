"""Exact parameter and FLOP counts, and the choice of implementation.

FLOPs are counted the way XLA's `HloCostAnalysis` counts them, so that
`cost(...).flops` matches `jax.jit(f).lower(x).compile().cost_analysis()`:

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

from jaxfactor import _geometry
from jaxfactor import _validation
from jaxfactor import formats
from jaxfactor import primitives


class Cost(NamedTuple):
  """Parameters stored and FLOPs spent by one convolution.

  Attributes:
    params: number of kernel parameters (the sum of the factors' sizes).
    flops: floating-point operations for one call, multiply-add = 2.
  """

  params: int
  flops: int


def check_kernel(
    fn: str, kernel: Any, *, abstract: bool = False
) -> tuple[tuple[int, ...], int]:
  """Validates a dense HWIO kernel or a format; returns `(window, C)`."""
  if isinstance(kernel, formats.Format):
    kernel.check(fn, abstract=abstract)
    return kernel.window, kernel.in_features
  if not (abstract and hasattr(kernel, "shape") and hasattr(kernel, "dtype")):
    if not _validation.is_array(kernel):
      raise TypeError(
          f"{fn}: `kernel` must be a dense HWIO array or a jaxfactor format"
          f" (DepthwiseSeparable, SpatiallySeparable, LowRank, Tucker, CP),"
          f" got {type(kernel).__name__}."
      )
  _validation.check_floating(fn, "kernel", kernel)
  if kernel.ndim < 3:
    raise ValueError(
        f"{fn}: a dense `kernel` must have shape [*window, C, F] with at"
        f" least one spatial axis (rank >= 3), got shape"
        f" {tuple(kernel.shape)}."
    )
  _validation.check_positive_dims(fn, "kernel", kernel.shape)
  return tuple(kernel.shape[:-2]), kernel.shape[-2]


def stage_flops(
    stage: primitives.Stage,
    in_shape: Sequence[int],
    geometry: _geometry.Geometry,
    depthwise_lowering: str = "grouped",
    spatial_lowering: str = "conv",
) -> tuple[int, tuple[int, ...]]:
  """FLOPs of one stage on a `[B, *spatial, C]` input, and its output shape.

  A shift-add depthwise stage multiplies each tap's in-range positions only
  (a zero-padded tap costs nothing) and adds the k' taps that reach any
  output: `k' - 1` adds per output element, plus the scalar predicate of the
  conditional that computes it once (`primitives.FENCE_FLOPS`). A native one
  (`primitives._native_depthwise`) does a multiply-add per in-range product
  (XLA's `cost_analysis()` does not see into its custom call). A tap-matmul
  stage
  (`primitives.uses_tap_matmul`) multiplies every (padded) input position by
  the k' taps' weights and adds `k' - 1` terms per output position and
  feature. The rest as `lax`'s convolutions.
  """
  batch, *spatial, _ = in_shape
  kernel_shape = stage.kernel.shape
  if isinstance(stage, primitives.Pointwise):
    c, f = kernel_shape
    return 2 * batch * math.prod(spatial) * c * f, (batch, *spatial, f)
  if primitives.uses_tap_matmul(stage, in_shape, geometry, spatial_lowering):
    plan = primitives.shift_add_plan(kernel_shape[:-2], stage.axes, geometry,
                                     spatial)
    if geometry.fill != "constant":  # the stage's axes padded with data
      spatial = [size + sum(geometry.padding[axis]) if axis in stage.axes
                 else size for axis, size in enumerate(spatial)]
    c, f = kernel_shape[-2:]
    taps = len(plan.taps)
    flops = (2 * batch * math.prod(spatial) * c * taps * f
             + max(taps - 1, 0) * batch * math.prod(plan.out) * f)
    return flops, (batch, *plan.out, f)
  if depthwise_lowering == "native":
    # What `_native_depthwise` runs for this stage.
    depthwise_lowering = ("native" if primitives.native_applies(
        in_shape, stage.kernel.dtype) else "shift_add")
  out_spatial, pairs = [], 1
  for axis, size in enumerate(spatial):
    if axis in stage.axes:
      k = kernel_shape[stage.axes.index(axis)]
      stride, dilation = geometry.strides[axis], geometry.dilation[axis]
      pad = geometry.padding[axis]
      if geometry.fill != "constant":  # padded with data: every tap is real
        size, pad = size + pad[0] + pad[1], (0, 0)
      out = _geometry.output_size(size, k, stride, dilation, pad)
      pairs *= _geometry.valid_taps(size, k, stride, dilation, pad)
    else:
      out = size
      pairs *= size
    out_spatial.append(out)
  c_per_group, f = kernel_shape[-2:]
  out_shape = (batch, *out_spatial, f)
  if (depthwise_lowering in ("native", "shift_add", "shift_add_autodiff")
      and primitives.is_depthwise(stage)):
    plan = primitives.shift_add_plan(kernel_shape[:-2], stage.axes, geometry,
                                     spatial)
    products = sum(math.prod(hi - lo for lo, hi, _ in ranges)
                   for _, ranges in plan.taps)
    if depthwise_lowering == "native":
      # A multiply-add per in-range product, into a zeroed accumulator.
      return 2 * batch * f * products, out_shape
    adds = max(len(plan.taps) - 1, 0) * math.prod(out_shape[1:-1])
    fence = primitives.FENCE_FLOPS if plan.taps else 0
    return batch * f * (products + adds) + fence, out_shape
  one_tap = math.prod(kernel_shape[:-2]) == 1 and all(
      geometry.strides[a] == 1 and geometry.padding[a] == (0, 0)
      for a in stage.axes)
  if one_tap and c_per_group == 1 and f == stage.groups > 1:
    # XLA simplifies a one-tap depthwise conv (multiplier 1, no stride, no
    # padding) into an elementwise multiply: one FLOP per output element.
    return math.prod(out_shape), out_shape
  return 2 * batch * pairs * c_per_group * f, out_shape


def chain_flops(
    stages: Sequence[primitives.Stage],
    in_shape: Sequence[int],
    geometry: _geometry.Geometry,
    depthwise_lowering: str = "grouped",
    spatial_lowering: str = "conv",
) -> int:
  stages, total = primitives.merge_depthwise_stages(stages, depthwise_lowering)
  shape = tuple(in_shape)
  for stage in stages:
    flops, shape = stage_flops(stage, shape, geometry, depthwise_lowering,
                               spatial_lowering)
    total += flops
  return total


def _dense_stage(kernel: Any) -> primitives.SpatialConv:
  shape = kernel.shape
  return primitives.SpatialConv(
      jax.ShapeDtypeStruct(shape, kernel.dtype), tuple(range(len(shape) - 2))
  )


class Machine(NamedTuple):
  """A roofline model of one backend, for `implementation="auto"`.

  A stage takes `max(FLOPs / rate, bytes / bandwidth) + overhead` seconds.
  The rate of a contraction (a 1x1 stage) is
  `matmul_flops * min(1, (F / 16)**2)` for `F` output features per group:
  GEMMs with few output columns use a fraction of the vector units (measured
  on the CPU below: a 3x3 conv to 4 features runs at ~10 GFLOP/s, to 8 at
  ~40, to 16 or more at ~100-190). A convolution with `t` taps (any stage
  not run as a contraction) runs at
  `matmul_flops * min(1, (F / 16)**2, (t / 9)**taps_exponent)`: on the CPU
  below, at 56x56, 3x1 and 1x3 convs with 64-256 features ran at
  ~85-95 GFLOP/s and the stride-2 3x3 conv at ~150, hence exponent 0.5
  (`sqrt(3 / 9) = 0.58`); 0 (no penalty) on the unmeasured GPU and TPU
  models. A tap-matmul stage (`primitives.uses_tap_matmul`) runs at the
  contraction rate for its `k * F` columns (k taps, F features). Depthwise
  stages run at `depthwise_flops` (shift-add or native) or `grouped_flops`
  (`feature_group_count`). Bytes are the stage's input,
  output and kernel, each read or written once. Only the forward pass is
  priced.
  """

  matmul_flops: float
  depthwise_flops: float
  grouped_flops: float
  bandwidth: float
  overhead: float
  taps_exponent: float = 0.0


# CPU: calibrated on this project's 2-core x86-64 benchmark machine
# (`benchmarks/conv.py`, `perf-baseline.md`, and small-channel layers measured
# for this model): float32 convs ~100-190 GFLOP/s, shift-add depthwise
# ~20-36, XLA's grouped depthwise conv ~0.6, and ~20 GB/s effective (4-7 GB/s
# for fresh 256 MiB buffers, 36+ in cache). GPU and TPU: nominal
# datasheet-order figures (H100 / TPU v4 class), not fitted: on an H200
# (README, "Results on a GPU") they chose within 10% in 44 of the 48 non-CP
# cells, and that run's measured rates (352 TFLOP/s, 2.7 TB/s) chose worse,
# the factors winning there by their backward pass, which is not priced.
MACHINES = {
    "cpu": Machine(matmul_flops=120e9, depthwise_flops=20e9,
                   grouped_flops=0.6e9, bandwidth=20e9, overhead=5e-6,
                   taps_exponent=0.5),
    "gpu": Machine(matmul_flops=50e12, depthwise_flops=2e12,
                   grouped_flops=2e12, bandwidth=2e12, overhead=5e-6),
    "tpu": Machine(matmul_flops=100e12, depthwise_flops=1e12,
                   grouped_flops=1e12, bandwidth=1e12, overhead=5e-6),
}


def machine(backend: str | None = None) -> Machine:
  """The model for `backend` (default: JAX's default backend)."""
  backend = backend or jax.default_backend()
  return MACHINES.get(backend, MACHINES["gpu"])


def stage_seconds(
    stage: primitives.Stage,
    in_shape: Sequence[int],
    geometry: _geometry.Geometry,
    depthwise_lowering: str,
    model: Machine,
    itemsize: int = 4,
    spatial_lowering: str = "conv",
) -> tuple[float, tuple[int, ...]]:
  """The roofline time of one stage (see `Machine`), and its output shape."""
  flops, out_shape = stage_flops(stage, in_shape, geometry, depthwise_lowering,
                                 spatial_lowering)
  kernel = stage.kernel.shape
  nbytes = itemsize * (math.prod(in_shape) + math.prod(out_shape)
                       + math.prod(kernel))
  if primitives.uses_tap_matmul(stage, in_shape, geometry, spatial_lowering):
    # One matmul to ~k * F columns (the shift-add is in cache).
    columns = math.prod(kernel[:-2]) * kernel[-1]
    rate = model.matmul_flops * min(1.0, (columns / 16) ** 2)
  elif primitives.is_depthwise(stage):
    rate = (model.grouped_flops if depthwise_lowering == "grouped"
            else model.depthwise_flops)
  else:
    efficiency = min(1.0, (kernel[-1] / 16) ** 2)
    if (isinstance(stage, primitives.SpatialConv)
        and not primitives.is_strided_pointwise(stage, geometry)):
      # A convolution with fewer than 9 taps (a k x 1 stage) runs slower.
      taps = math.prod(kernel[:-2])
      efficiency = min(efficiency,
                       min(1.0, taps / 9) ** model.taps_exponent)
    rate = model.matmul_flops * efficiency
  seconds = max(flops / rate, nbytes / model.bandwidth) + model.overhead
  return seconds, out_shape


def chain_seconds(stages, in_shape, geometry, depthwise_lowering, model,
                  itemsize=4, spatial_lowering="conv") -> float:
  stages, flops = primitives.merge_depthwise_stages(stages,
                                                   depthwise_lowering)
  total, shape = flops / model.matmul_flops, tuple(in_shape)
  for stage in stages:
    seconds, shape = stage_seconds(stage, shape, geometry, depthwise_lowering,
                                   model, itemsize, spatial_lowering)
    total += seconds
  return total


def choose_implementation(
    kernel: Any,
    in_shape: Sequence[int],
    geometry: _geometry.Geometry,
    implementation: str,
    depthwise_lowering: str = "grouped",
    model: Machine | None = None,
    spatial_lowering: str = "conv",
) -> tuple[str, int]:
  """Resolves `implementation` for these static shapes; returns it and FLOPs.

  "auto" picks whichever of "factorized" and "reconstructed" the roofline
  model of the default backend (`Machine`) expects to run faster, FLOPs and
  bytes moved both counted (ties go to "factorized"); reconstruction pays
  `to_dense()` at the matmul rate. A dense kernel is always "reconstructed":
  it is its own dense kernel.
  """
  if not isinstance(kernel, formats.Format):
    return "reconstructed", chain_flops([_dense_stage(kernel)], in_shape,
                                        geometry,
                                        spatial_lowering=spatial_lowering)
  factorized = chain_flops(kernel.stages(), in_shape, geometry,
                           depthwise_lowering, spatial_lowering)
  dense_stage = _dense_stage(kernel)
  reconstructed = kernel.to_dense_flops() + chain_flops(
      [dense_stage], in_shape, geometry, spatial_lowering=spatial_lowering)
  if implementation == "factorized":
    return "factorized", factorized
  if implementation == "reconstructed":
    return "reconstructed", reconstructed
  model = model or machine()
  itemsize = jax.numpy.dtype(kernel.dtype).itemsize
  t_factorized = chain_seconds(kernel.stages(), in_shape, geometry,
                               depthwise_lowering, model, itemsize,
                               spatial_lowering)
  t_reconstructed = (
      kernel.to_dense_flops() / model.matmul_flops + model.overhead
      + chain_seconds([dense_stage], in_shape, geometry, depthwise_lowering,
                      model, itemsize, spatial_lowering))
  if t_factorized <= t_reconstructed:
    return "factorized", factorized
  return "reconstructed", reconstructed


def cost(
    kernel: Any,
    input_shape: Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    dilation: int | Sequence[int] = 1,
    implementation: str = "auto",
    depthwise_lowering: str = "auto",
    spatial_lowering: str = "auto",
) -> Cost:
  """Counts the parameters and FLOPs of `conv(x, kernel, ...)`, exactly.

  The count is of the computation `conv` runs for these arguments, stage by
  stage. For float32 it equals XLA:CPU's own `cost_analysis()["flops"]` of
  the jitted call (tested), but for the "native" depthwise lowering (the
  CPU default where it builds), a custom call XLA does
  not count into: its count is a multiply-add per in-range product. XLA:CPU
  adds conversion FLOPs for 16-bit types and expands float64 grouped
  convolutions, which `cost` does not count, and counts a loop's body once:
  where a tap-matmul stage loops over batch chunks, `cost` counts every
  chunk.
  Leaves may be abstract (`jax.ShapeDtypeStruct`), so a format from
  `jax.eval_shape` can be costed without allocating it.

  Args:
    kernel: a dense HWIO kernel `[*window, C, F]` or any format.
    input_shape: the shape of `x`, `[*batch, *spatial, C]`.
    strides: as in `conv`.
    padding: as in `conv`.
    dilation: as in `conv`.
    implementation: as in `conv`: "auto", "factorized" or "reconstructed".
    depthwise_lowering: as in `conv` ("auto" resolves on the default
      backend, as `conv` does).
    spatial_lowering: as in `conv`.

  Returns:
    `Cost(params, flops)`, Python ints.

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
  lowering = primitives.resolve_depthwise_lowering(fn, depthwise_lowering)
  spatial = primitives.resolve_spatial_lowering(fn, spatial_lowering)
  window, in_features = check_kernel(fn, kernel, abstract=True)
  if isinstance(input_shape, (str, bytes)) or not isinstance(
      input_shape, Sequence
  ):
    raise TypeError(
        f"{fn}: `input_shape` must be a sequence of ints, got"
        f" {type(input_shape).__name__}."
    )
  try:
    input_shape = tuple(operator.index(d) for d in input_shape)
  except TypeError:
    raise TypeError(
        f"{fn}: `input_shape` must be a sequence of ints, got"
        f" {input_shape!r}."
    ) from None
  _validation.check_input(
      fn, jax.ShapeDtypeStruct(input_shape, kernel.dtype), window, in_features,
      abstract=True,
  )
  n = len(window)
  geometry = _geometry.resolve(
      fn, input_shape[-n - 1 : -1], window,
      strides=strides, padding=padding, dilation=dilation,
  )
  flat = (math.prod(input_shape[: -n - 1]), *input_shape[-n - 1 :])
  _, flops = choose_implementation(kernel, flat, geometry, implementation,
                                  lowering, spatial_lowering=spatial)
  if flat[0] == 0:
    flops = 0  # an empty batch: XLA computes nothing, not even to_dense
  params = (
      kernel.num_params
      if isinstance(kernel, formats.Format)
      else math.prod(kernel.shape)
  )
  return Cost(params=params, flops=flops)
