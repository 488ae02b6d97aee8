"""Depthwise convolution as three JAX primitives, lowered per platform.

`forward(x, w)`, `input_grad(dy, w)` and `weight_grad(x, dy)` are the maps of
a depthwise convolution with channel multiplier 1 and zero padding
(`x [B, *spatial, C]`, `w [*window, C]`). Each is bilinear and its transposes
are the other two, so JAX differentiates them in both modes and to any order.

How they run is decided when XLA lowers the program, for the platform it
lowers for, so one jitted or exported function is right everywhere:

* CPU: the compiled kernel (`jaxfactor._native`, an XLA FFI custom call)
  where it is available, for float32/float64 operands with at most 3 spatial
  axes, in a program that is not partitioned over several devices (XLA cannot
  partition a custom call: it would gather the operands). Otherwise the
  shift-add (`jaxfactor._shift_add`): XLA:CPU's grouped convolution is slow
  for depthwise kernels (slower than the dense conv it replaces, measured in
  `benchmarks/conv.py`). 16-bit operands are computed in float32 and
  rounded once, as XLA's convolutions accumulate.
* Every other platform, and programs serialized with `jax.export` (which
  keeps only custom calls with compatibility guarantees): XLA's grouped
  convolution (`feature_group_count = C`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

from jaxfactor import _geometry
from jaxfactor import _native
from jaxfactor import _shift_add
from jaxfactor import _stages


class Geometry(NamedTuple):
  """Static geometry over the N spatial axes: zero padding only."""

  strides: tuple[int, ...]
  dilation: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]

  def output_shape(self, in_shape, window):
    """`[B, *out, C]` for input `[B, *in, C]` and `window`."""
    batch, *spatial, channels = in_shape
    out = [
      _geometry.output_size(n, k, s, d, pad)
      for n, k, s, d, pad in zip(
        spatial, window, self.strides, self.dilation, self.pads
      )
    ]
    return (batch, *out, channels)


def stage(x, kernel, axes, geometry: _geometry.Geometry, preferred):
  """A depthwise stage `kernel [*window over axes, 1, C*m]` on `x`.

  Other fills than zeros are padded into the input, and each input channel
  is repeated `m` times (the channel multiplier), so output channel
  `c*m + j` reads input channel `c` in place; then `forward`.
  """
  dtype = preferred or x.dtype
  n = x.ndim - 2
  window, strides, dilation, pads = _stages.stage_geometry(
    kernel.shape[:-2], axes, geometry, n
  )
  x, pads = _stages.pad_fill(x, pads, geometry)
  channels, out_channels = x.shape[-1], kernel.shape[-1]
  if out_channels != channels:
    x = jnp.repeat(x, out_channels // channels, axis=-1)
  weights = kernel.reshape(*window, out_channels).astype(dtype)
  stage_geometry = Geometry(
    tuple(strides), tuple(dilation), tuple(tuple(p) for p in pads)
  )
  return forward(x.astype(dtype), weights, stage_geometry)


def forward(x, w, geometry: Geometry):
  """`y [B, *out, C]`: `x [B, *spatial, C]` convolved with `w [*window, C]`."""
  return _PRIMITIVES["forward"].bind(x, w, geometry=geometry)


# --- the three maps on each platform ----------------------------------------


def _grouped_forward(x, w, *, geometry):
  return lax.conv_general_dilated(
    x,
    w[..., None, :],
    geometry.strides,
    geometry.pads,
    rhs_dilation=geometry.dilation,
    dimension_numbers=_stages.dimension_numbers(x.ndim - 2),
    feature_group_count=x.shape[-1],
    precision=lax.Precision.HIGHEST,
  )


def _grouped_input_grad(dy, w, *, geometry, in_shape):
  _, pullback = jax.vjp(
    lambda x: _grouped_forward(x, w, geometry=geometry),
    jnp.zeros(in_shape, dy.dtype),
  )
  return pullback(dy)[0]


def _grouped_weight_grad(x, dy, *, geometry, window):
  _, pullback = jax.vjp(
    lambda w: _grouped_forward(x, w, geometry=geometry),
    jnp.zeros((*window, x.shape[-1]), x.dtype),
  )
  return pullback(dy)[0]


_GROUPED: dict[str, Callable[..., Any]] = {
  "forward": _grouped_forward,
  "input_grad": _grouped_input_grad,
  "weight_grad": _grouped_weight_grad,
}


def _shift_add_forward(x, w, *, geometry):
  return _shift_add.forward(x, w, *geometry)


def _shift_add_input_grad(dy, w, *, geometry, in_shape):
  return _shift_add.input_grad(dy, w, in_shape, *geometry)


def _shift_add_weight_grad(x, dy, *, geometry, window):
  return _shift_add.weight_grad(x, dy, window, *geometry)


_SHIFT_ADD: dict[str, Callable[..., Any]] = {
  "forward": _shift_add_forward,
  "input_grad": _shift_add_input_grad,
  "weight_grad": _shift_add_weight_grad,
}

# The native kernel works on 3 spatial axes: fewer come as size-1 axes in
# front (it walks rows of the last axis, which must be a real one to be long).
_NATIVE_AXES = 3


def _native_call(name, a, b, out_shape, geometry):
  extra = _NATIVE_AXES - len(geometry.strides)

  def lift(array, leading):  # [lead, *spatial, C] -> [lead, 1.., *spatial, C]
    shape = array.shape
    return array.reshape(*shape[:leading], *(1,) * extra, *shape[leading:])

  lead = {"forward": (1, 0), "input_grad": (1, 0), "weight_grad": (1, 1)}
  a, b = lift(a, lead[name][0]), lift(b, lead[name][1])
  if name == "weight_grad":
    shape5 = (*(1,) * extra, *out_shape)
  else:
    shape5 = (out_shape[0], *(1,) * extra, *out_shape[1:])
  y = jax.ffi.ffi_call(
    f"jaxfactor_depthwise_{name}", jax.ShapeDtypeStruct(shape5, a.dtype)
  )(
    a,
    b,
    stride=np.array((1,) * extra + geometry.strides, np.int64),
    dilation=np.array((1,) * extra + geometry.dilation, np.int64),
    pad=np.array((0,) * extra + tuple(lo for lo, _ in geometry.pads), np.int64),
  )
  return y.reshape(out_shape)


def _native_forward(x, w, *, geometry):
  out_shape = geometry.output_shape(x.shape, w.shape[:-1])
  return _native_call("forward", x, w, out_shape, geometry)


def _native_input_grad(dy, w, *, geometry, in_shape):
  return _native_call("input_grad", dy, w, tuple(in_shape), geometry)


def _native_weight_grad(x, dy, *, geometry, window):
  return _native_call("weight_grad", x, dy, (*window, x.shape[-1]), geometry)


_NATIVE: dict[str, Callable[..., Any]] = {
  "forward": _native_forward,
  "input_grad": _native_input_grad,
  "weight_grad": _native_weight_grad,
}


def _partitioned(ctx) -> bool:
  """Whether the program being lowered is split over several devices."""
  axis_context = ctx.module_context.axis_context
  if getattr(axis_context, "num_devices", 1) > 1:
    return True  # jit over a sharded mesh
  mesh = getattr(axis_context, "mesh", None)
  manual = getattr(axis_context, "manual_axes", None)
  # Inside shard_map every mesh axis is manual: the program is per device.
  return mesh is not None and set(manual or ()) != set(mesh.axis_names)


def _cpu_implementation(ctx, num_spatial: int) -> dict[str, Callable[..., Any]]:
  """The maps a CPU program runs: the native kernel or the shift-add."""
  if (
    num_spatial <= _NATIVE_AXES
    and not _partitioned(ctx)
    and _native.available()
  ):
    return _NATIVE
  return _SHIFT_ADD


def _computed_in_float32(fn):
  """`fn` on 16-bit operands computed in float32, its result rounded once."""

  def wrapped(a, b, **params):
    dtype = a.dtype
    if jnp.dtype(dtype).itemsize >= 4:
      return fn(a, b, **params)
    return fn(a.astype(jnp.float32), b.astype(jnp.float32), **params).astype(
      dtype
    )

  return wrapped


def _exporting(ctx) -> bool:
  parameters = getattr(ctx.module_context, "lowering_parameters", None)
  return bool(getattr(parameters, "for_export", False))


# Tests and benchmarks force one CPU implementation with
# `jaxfactor._lowering.forced(depthwise=...)`: "native", "shift_add" or
# "grouped".
forced_cpu: list[str | None] = [None]


def _cpu_lowering(name):
  grouped = mlir.lower_fun(_GROUPED[name], multiple_results=False)

  def lowering(ctx, a, b, **params):
    if _exporting(ctx) or forced_cpu[0] == "grouped":
      return grouped(ctx, a, b, **params)
    if forced_cpu[0] == "native" and not _native.available():
      raise RuntimeError(
        f"the native depthwise kernel is not available: {_native.error()}"
      )
    num_spatial = len(ctx.avals_in[0].shape) - 2
    if forced_cpu[0] == "shift_add" or (
      forced_cpu[0] == "native" and num_spatial > _NATIVE_AXES
    ):
      maps = _SHIFT_ADD  # the kernel takes at most 3 spatial axes
    elif forced_cpu[0] == "native":
      maps = _NATIVE
    else:
      maps = _cpu_implementation(ctx, num_spatial)
    fn = _computed_in_float32(maps[name])
    return mlir.lower_fun(fn, multiple_results=False)(ctx, a, b, **params)

  return lowering


# --- the primitives ---------------------------------------------------------


def _out_shape(name, a, b, params):
  geometry = params["geometry"]
  if name == "forward":  # forward(x, w)
    return geometry.output_shape(a.shape, b.shape[:-1])
  if name == "input_grad":  # input_grad(dy, w): x's shape
    return tuple(params["in_shape"])
  return (*params["window"], a.shape[-1])  # weight_grad(x, dy): w's shape


def _make_primitive(name):
  primitive = Primitive(f"jaxfactor_depthwise_{name}")

  @functools.cache
  def jitted(params):
    return jax.jit(functools.partial(primitive.bind, **dict(params)))

  def impl(a, b, **params):  # outside `jit`: compiled once per geometry
    return jitted(tuple(sorted(params.items())))(a, b)

  def abstract_eval(a, b, **params):
    if a.dtype != b.dtype:
      raise TypeError(
        f"jaxfactor depthwise {name}: dtypes differ: {a.dtype} and {b.dtype}"
      )
    return ShapedArray(_out_shape(name, a, b, params), a.dtype)

  primitive.def_impl(impl)
  primitive.def_abstract_eval(abstract_eval)
  mlir.register_lowering(primitive, _cpu_lowering(name), platform="cpu")
  mlir.register_lowering(
    primitive, mlir.lower_fun(_GROUPED[name], multiple_results=False)
  )
  return primitive


def _shape(a):
  """The shape of a primal, or of the undefined primal a transpose fills."""
  aval = getattr(a, "aval", None)
  return tuple(aval.shape if aval is not None else a.shape)


# `ad.defbilinear`: the JVP of `f(a, b)` is `f(da, b) + f(a, db)`, transposed
# by these rules (each map's transposes are the other two maps).
def _forward_transposes(prims):
  def lhs(ct, x, w, *, geometry):  # d x
    return prims["input_grad"].bind(
      ct, w, geometry=geometry, in_shape=_shape(x)
    )

  def rhs(ct, x, w, *, geometry):  # d w
    return prims["weight_grad"].bind(
      x, ct, geometry=geometry, window=_shape(w)[:-1]
    )

  return lhs, rhs


def _input_grad_transposes(prims):
  def lhs(ct, dy, w, *, geometry, in_shape):  # d dy
    del dy, in_shape
    return prims["forward"].bind(ct, w, geometry=geometry)

  def rhs(ct, dy, w, *, geometry, in_shape):  # d w
    del in_shape
    return prims["weight_grad"].bind(
      ct, dy, geometry=geometry, window=_shape(w)[:-1]
    )

  return lhs, rhs


def _weight_grad_transposes(prims):
  def lhs(ct, x, dy, *, geometry, window):  # d x
    del window
    return prims["input_grad"].bind(
      dy, ct, geometry=geometry, in_shape=_shape(x)
    )

  def rhs(ct, x, dy, *, geometry, window):  # d dy
    del dy, window
    return prims["forward"].bind(x, ct, geometry=geometry)

  return lhs, rhs


def _batch_rule(prims, name):
  """`vmap`: a mapped activation with shared weights joins the batch axis;
  anything else runs one call per mapped element (`lax.map`)."""
  primitive = prims[name]

  def rule(args, dims, **params):
    a, b = args
    da, db = dims
    if name != "weight_grad" and db is None:
      a = jnp.moveaxis(a, da, 0)
      v, batch = a.shape[:2]
      a = a.reshape(v * batch, *a.shape[2:])
      if name == "input_grad":
        params = dict(params, in_shape=(v * batch, *params["in_shape"][1:]))
      out = primitive.bind(a, b, **params)
      return out.reshape(v, batch, *out.shape[1:]), 0
    size = a.shape[da] if da is not None else b.shape[db]
    a, b = (
      jnp.moveaxis(t, d, 0)
      if d is not None
      else jnp.broadcast_to(t, (size, *t.shape))
      for t, d in ((a, da), (b, db))
    )
    return lax.map(lambda ab: primitive.bind(*ab, **params), (a, b)), 0

  return rule


def _register() -> dict[str, Any]:
  prims = {
    name: _make_primitive(name)
    for name in ("forward", "input_grad", "weight_grad")
  }
  for name, transposes in (
    ("forward", _forward_transposes),
    ("input_grad", _input_grad_transposes),
    ("weight_grad", _weight_grad_transposes),
  ):
    ad.defbilinear(prims[name], *transposes(prims))
    batching.primitive_batchers[prims[name]] = _batch_rule(prims, name)
  return prims


_PRIMITIVES = _register()
