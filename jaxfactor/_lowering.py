"""How a chain of stages runs on each platform: the one place that decides.

`plan(stages, in_shape, geometry, platform)` turns a format's stages into
steps, each a stage and the kind of computation that runs it there:

* `CONTRACTION`: a `Pointwise` stage, `lax.dot_general` over the channels.
* `CORE_CONTRACTION`: a `CoreContraction` stage (a tensor-train core),
  `lax.dot_general` over two modes of the channels.
* `STRIDED_CONTRACTION`: a dense 1x1 `SpatialConv` without padding: a strided
  slice, then a contraction (~3x faster than a 1x1 convolution on CPU).
* `DEPTHWISE`: the depthwise primitives (`jaxfactor._depthwise`), which pick
  the native kernel, the shift-add or XLA's grouped convolution when the
  program is lowered. On GPU and TPU consecutive per-axis depthwise stages
  (CP's) are first merged into one (`_stages.merge_depthwise_stages`).
* `TAP_MATMUL`: a dense spatial stage on CPU where XLA's convolution is slow
  (`jaxfactor._tap_matmul.applies`).
* `CONV`: XLA's convolution.

`run` executes steps, `flops` counts them and `seconds` prices them with a
`Machine`: all three read the same plan, so what is counted is what runs.
`per_platform` stages out one branch per distinct plan with
`lax.platform_dependent`, so the choice is made when the program is lowered
for a platform, not from the default backend at trace time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxfactor import _depthwise
from jaxfactor import _geometry
from jaxfactor import _stages
from jaxfactor import _tap_matmul

PLATFORMS = ("cpu", "gpu", "tpu")

CONTRACTION = "contraction"
CORE_CONTRACTION = "core_contraction"
STRIDED_CONTRACTION = "strided_contraction"
DEPTHWISE = "depthwise"
TAP_MATMUL = "tap_matmul"
CONV = "conv"


class Step(NamedTuple):
  """One stage and the kind of computation that runs it."""

  stage: _stages.Stage
  kind: str


class Plan(NamedTuple):
  """The steps of a chain on one platform, and the FLOPs of merging filters."""

  steps: tuple[Step, ...]
  merge_flops: int

  def signature(self) -> Hashable:
    """What distinguishes two plans' programs (kinds and kernel shapes)."""
    return tuple(
      (step.kind, tuple(step.stage.kernel.shape)) for step in self.steps
    )


_forced_tap_matmul: list[bool | None] = [None]


@contextlib.contextmanager
def forced(*, depthwise: str | None = None, tap_matmul: bool | None = None):
  """Forces a lowering on CPU, for tests and benchmarks (not public API).

  `depthwise`: "native", "shift_add" or "grouped" for every depthwise step;
  `tap_matmul`: True or False for every dense spatial step with more than
  one tap. Caches are cleared on entry and exit, since a compiled program
  does not record the lowering it was compiled with.
  """
  if depthwise not in (None, "native", "shift_add", "grouped"):
    raise ValueError(f"unknown depthwise lowering {depthwise!r}")
  saved = _depthwise.forced_cpu[0], _forced_tap_matmul[0]
  jax.clear_caches()
  _depthwise.forced_cpu[0], _forced_tap_matmul[0] = depthwise, tap_matmul
  try:
    yield
  finally:
    _depthwise.forced_cpu[0], _forced_tap_matmul[0] = saved
    jax.clear_caches()


def _kind(
  stage: _stages.Stage,
  in_shape: Sequence[Any],
  geometry: _geometry.Geometry,
  platform: str,
) -> str:
  if isinstance(stage, _stages.Pointwise):
    return CONTRACTION
  if isinstance(stage, _stages.CoreContraction):
    return CORE_CONTRACTION
  if _stages.is_strided_pointwise(stage, geometry):
    return STRIDED_CONTRACTION
  if _stages.is_depthwise(stage):
    return DEPTHWISE
  if platform == "cpu":
    force = _forced_tap_matmul[0]
    if force is None and _tap_matmul.applies(stage, in_shape, geometry):
      return TAP_MATMUL
    if (
      force
      and isinstance(stage, _stages.SpatialConv)
      and stage.groups == 1
      and math.prod(stage.kernel.shape[:-2]) > 1
    ):
      return TAP_MATMUL
  return CONV


def plan(
  stages: Sequence[_stages.Stage],
  in_shape: Sequence[Any],
  geometry: _geometry.Geometry,
  platform: str,
) -> Plan:
  """The steps that run `stages` on a `[B, *spatial, C]` input there."""
  merge_flops = 0
  if platform != "cpu":
    stages, merge_flops = _stages.merge_depthwise_stages(stages)
  steps, shape = [], tuple(in_shape)
  for stage in stages:
    steps.append(Step(stage, _kind(stage, shape, geometry, platform)))
    shape = output_shape(stage, shape, geometry)
  return Plan(tuple(steps), merge_flops)


def output_shape(
  stage: _stages.Stage, in_shape: Sequence[Any], geometry: _geometry.Geometry
) -> tuple[Any, ...]:
  """A stage's output shape on a `[B, *spatial, C]` input."""
  batch, *spatial, _ = in_shape
  features = stage.kernel.shape[-1]
  if isinstance(stage, _stages.Pointwise):
    return (batch, *spatial, features)
  if isinstance(stage, _stages.CoreContraction):
    r_in, c, f, r_out = stage.kernel.shape[-4:]
    return (batch, *spatial, in_shape[-1] // (c * r_in) * f * r_out)
  out = list(spatial)
  for j, axis in enumerate(stage.axes):
    out[axis] = _geometry.output_size(
      spatial[axis],
      stage.kernel.shape[j],
      geometry.strides[axis],
      geometry.dilation[axis],
      geometry.padding[axis],
    )
  return (batch, *out, features)


# --- running ----------------------------------------------------------------


def run(
  x: jax.Array,
  steps: Sequence[Step],
  geometry: _geometry.Geometry,
  *,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """Applies `steps` in order to `x [B, *spatial, C]`."""
  preferred = preferred_element_type
  if preferred is not None:
    wide = jnp.dtype(preferred)
    if wide.itemsize > max(4, x.dtype.itemsize):
      # A float64 result from float32 operands: computed in float64 from the
      # start. XLA:GPU runs a float32 `dot_general` in float32 (TF32 at the
      # default precision) even when asked for a float64 result; with
      # float64 operands every backend computes in float64. Narrower cases
      # (bfloat16 -> float32) keep their mixed-precision path.
      x = x.astype(wide)
  for stage, kind in steps:
    kernel = stage.kernel
    if kernel.dtype != x.dtype:
      # Only after a stage returned `preferred_element_type`: later stages
      # then compute at that (wider) precision too.
      kernel = kernel.astype(x.dtype)
    if kind == CONTRACTION:
      x = lax.dot_general(
        x,
        kernel,
        (((x.ndim - 1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred,
      )
    elif kind == CORE_CONTRACTION:
      x = _stages.core_contraction(
        x, kernel, stage.groups, precision, preferred
      )
    elif kind == STRIDED_CONTRACTION:
      x = _stages.strided_pointwise(
        x, kernel, stage.axes, geometry, precision, preferred
      )
    elif kind == DEPTHWISE:
      x = _depthwise.stage(x, kernel, stage.axes, geometry, preferred)
    elif kind == TAP_MATMUL:
      x = _tap_matmul.tap_matmul(
        x, kernel, stage.axes, geometry, precision, preferred
      )
    else:
      x = _stages.spatial_conv(
        x, kernel, stage.axes, stage.groups, geometry, precision, preferred
      )
  return x


def per_platform(
  decide: Callable[[str], Hashable],
  branch: Callable[[str], Callable[..., Any]],
  *args: Any,
) -> Any:
  """`branch(platform)(*args)` for the platform the program is lowered for.

  `decide(platform)` summarises what that platform's branch would run; where
  every platform agrees, the one branch is traced alone. Otherwise each
  distinct branch is staged out under `lax.platform_dependent`, which keeps
  only the lowering platform's branch (a multi-platform `jax.export` keeps
  them all, selected when the program is compiled).
  """
  decisions = {platform: decide(platform) for platform in PLATFORMS}
  if len(set(decisions.values())) == 1:
    return branch("cpu")(*args)
  branches: dict[Hashable, Callable[..., Any]] = {}
  for platform, decision in decisions.items():
    branches.setdefault(decision, branch(platform))
  cpu, gpu, tpu = (branches[decisions[p]] for p in PLATFORMS)
  return lax.platform_dependent(
    *args, cpu=cpu, cuda=gpu, rocm=gpu, tpu=tpu, default=gpu
  )


# --- counting ---------------------------------------------------------------


def step_flops(
  step: Step, in_shape: Sequence[int], geometry: _geometry.Geometry
) -> int:
  """FLOPs of one step, as XLA's `HloCostAnalysis` counts its computation.

  A multiply-add is 2. A convolution (depthwise included) multiplies only the
  taps that read real input: a tap in zero padding does no arithmetic. A
  tap-matmul step multiplies every (padded) input position by the k' taps'
  weights and adds `k' - 1` terms per output position and feature.
  """
  stage, kind = step
  batch, *spatial, _ = in_shape
  if kind == CONTRACTION:
    c, f = stage.kernel.shape
    return 2 * batch * math.prod(spatial) * c * f
  if kind == CORE_CONTRACTION:
    # Every input channel meets `f * R_out` weights (of its group's core).
    f, r_out = stage.kernel.shape[-2:]
    return 2 * batch * math.prod(spatial) * in_shape[-1] * f * r_out
  if geometry.fill != "constant":  # the stage's axes padded with data
    spatial = [
      size + sum(geometry.padding[axis]) if axis in stage.axes else size
      for axis, size in enumerate(spatial)
    ]
    geometry = dataclasses.replace(
      geometry, padding=tuple((0, 0) for _ in geometry.padding), fill="constant"
    )
  c_per_group, f = stage.kernel.shape[-2:]
  if kind == TAP_MATMUL:
    taps = _tap_matmul.taps(
      stage.kernel.shape[:-2], stage.axes, geometry, spatial
    )
    out = output_shape(stage, (batch, *spatial, c_per_group), geometry)
    return (
      2 * batch * math.prod(spatial) * c_per_group * taps * f
      + max(taps - 1, 0) * batch * math.prod(out[1:-1]) * f
    )
  pairs = 1
  for axis, size in enumerate(spatial):
    if axis in stage.axes:
      k = stage.kernel.shape[stage.axes.index(axis)]
      pairs *= _geometry.valid_taps(
        size,
        k,
        geometry.strides[axis],
        geometry.dilation[axis],
        geometry.padding[axis],
      )
    else:
      pairs *= size
  return 2 * batch * pairs * c_per_group * f


def flops(
  chain: Plan, in_shape: Sequence[int], geometry: _geometry.Geometry
) -> int:
  """FLOPs of a plan on a `[B, *spatial, C]` input."""
  total, shape = chain.merge_flops, tuple(in_shape)
  for step in chain.steps:
    total += step_flops(step, shape, geometry)
    shape = output_shape(step.stage, shape, geometry)
  return total


class Machine(NamedTuple):
  """A roofline model of one platform, for `implementation="auto"`.

  A step takes `max(FLOPs / rate, bytes / bandwidth) + overhead` seconds.
  The rate of a contraction is `matmul_flops * min(1, (F / 16)**2)` for `F`
  output features per group: GEMMs with few output columns use a fraction of
  the vector units (on the CPU below a 3x3 conv to 4 features runs at ~10
  GFLOP/s, to 8 at ~40, to 16 or more at ~100-190). A convolution with `t`
  taps runs at `matmul_flops * min(1, (F / 16)**2, (t / 9)**taps_exponent)`:
  on the CPU below, at 56x56, 3x1 and 1x3 convs with 64-256 features ran at
  ~85-95 GFLOP/s and the stride-2 3x3 conv at ~150, hence exponent 0.5. A
  tap-matmul step runs at the contraction rate for its `k * F` columns, a
  depthwise step at `depthwise_flops`. Bytes are the step's input, output
  and kernel, each read or written once. Only the forward pass is priced.
  """

  matmul_flops: float
  depthwise_flops: float
  bandwidth: float
  overhead: float
  taps_exponent: float = 0.0


# CPU: calibrated on a 2-core x86-64 machine (`benchmarks/conv.py`):
# float32 convs ~100-190 GFLOP/s, the depthwise kernel ~20-36, ~20 GB/s
# effective. GPU and TPU: nominal datasheet-order figures (H100 / TPU v4
# class), not fitted; on an H200 (benchmarks/results/conv_gpu.md) they chose
# within 10% of the faster implementation in 44 of 48 cells. Depthwise steps
# there are XLA's grouped convolution.
MACHINES = {
  "cpu": Machine(
    matmul_flops=120e9,
    depthwise_flops=20e9,
    bandwidth=20e9,
    overhead=5e-6,
    taps_exponent=0.5,
  ),
  "gpu": Machine(
    matmul_flops=50e12, depthwise_flops=2e12, bandwidth=2e12, overhead=5e-6
  ),
  "tpu": Machine(
    matmul_flops=100e12, depthwise_flops=1e12, bandwidth=1e12, overhead=5e-6
  ),
}


def seconds(
  chain: Plan,
  in_shape: Sequence[int],
  geometry: _geometry.Geometry,
  machine: Machine,
  itemsize: int,
) -> float:
  """The roofline time of a plan (see `Machine`)."""
  total, shape = chain.merge_flops / machine.matmul_flops, tuple(in_shape)
  for step in chain.steps:
    out = output_shape(step.stage, shape, geometry)
    kernel = step.stage.kernel.shape
    nbytes = itemsize * (math.prod(shape) + math.prod(out) + math.prod(kernel))
    if step.kind == TAP_MATMUL:
      # One matmul to ~k * F columns (the shift-add is in cache).
      columns = math.prod(kernel[:-2]) * kernel[-1]
      rate = machine.matmul_flops * min(1.0, (columns / 16) ** 2)
    elif step.kind == DEPTHWISE:
      rate = machine.depthwise_flops
    elif step.kind == CORE_CONTRACTION:
      columns = kernel[-2] * kernel[-1]  # f * R_out per row of the matmul
      rate = machine.matmul_flops * min(1.0, (columns / 16) ** 2)
    else:
      efficiency = min(1.0, (kernel[-1] / 16) ** 2)
      if step.kind == CONV:
        taps = math.prod(kernel[:-2])
        efficiency = min(
          efficiency, min(1.0, taps / 9) ** machine.taps_exponent
        )
      rate = machine.matmul_flops * efficiency
    total += (
      max(step_flops(step, shape, geometry) / rate, nbytes / machine.bandwidth)
      + machine.overhead
    )
    shape = out
  return total
