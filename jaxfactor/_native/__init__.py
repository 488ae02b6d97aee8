"""A compiled depthwise convolution for CPU: the "native" lowering.

`depthwise.cc` holds three XLA FFI handlers (forward, input gradient, weight
gradient of a channels-last depthwise conv). XLA calls them as custom calls,
so a model that uses them compiles no kernel for its depthwise convs: the
shift-add lowering's k-tap sums and per-tap reductions were most of the LLVM
code XLA:CPU generated for a MobileNet-style train step (see the README's
compile-time section).

The source is compiled the first time it is needed, with the machine's C++
compiler (`$CXX`, else `c++`) and the FFI headers jaxlib ships
(`jax.ffi.include_dir()`), into a cache directory (`$JAXFACTOR_CACHE_DIR`,
else `$XDG_CACHE_HOME/jaxfactor/native`, else `~/.cache/jaxfactor/native`),
keyed by the source, the compiler, jaxlib's version and the CPU; later
processes load the cached library. `available()` says whether that worked;
"auto" then uses it on CPU, and falls back to the shift-add lowering where it
did not (no compiler, `JAXFACTOR_NATIVE=0`). `error()` says why not.

The three maps (`forward`, `input_grad`, `weight_grad`) are JAX primitives:
each is bilinear and its transposes are the other two, so JAX differentiates
them in both modes and to any order.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import NamedTuple

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

_SOURCE = os.path.join(os.path.dirname(__file__), "depthwise.cc")
_TARGETS = {
    "jaxfactor_depthwise_forward": "JaxfactorDepthwiseForward",
    "jaxfactor_depthwise_input_grad": "JaxfactorDepthwiseInputGrad",
    "jaxfactor_depthwise_weight_grad": "JaxfactorDepthwiseWeightGrad",
}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
          "-w")

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> str:
  """Where the compiled library is kept."""
  if os.environ.get("JAXFACTOR_CACHE_DIR"):
    return os.environ["JAXFACTOR_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxfactor", "native")


def _cpu_fingerprint() -> str:
  """The CPU's feature flags (the library is built for this CPU)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.processor()


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "c++"))


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return jax.__version__


def _library_path(compiler: str) -> str:
  version = subprocess.run([compiler, "--version"], capture_output=True,
                           text=True, check=False).stdout
  with open(_SOURCE, "rb") as f:
    source = f.read().decode()
  key = hashlib.sha256()
  for part in (source, version, " ".join(_FLAGS),
               _jaxlib_version(), platform.machine(), _cpu_fingerprint(),
               sys.platform):
    key.update(part.encode())
    key.update(b"\0")
  return os.path.join(cache_dir(),
                      f"depthwise-{key.hexdigest()[:16]}.so")


def _build(compiler: str, path: str) -> None:
  """Compiles the source into `path` (atomically: concurrent builds agree)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  try:
    result = subprocess.run(
        [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp],
        capture_output=True, text=True, check=False, timeout=600)
    if result.returncode != 0:
      raise RuntimeError(f"{compiler} failed:\n{result.stderr[-4000:]}")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o755 & ~umask)  # mkstemp makes it private
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load() -> None:
  """Builds (or finds) the library and registers its FFI targets, once."""
  if "loaded" in _state:
    return
  with _lock:
    if "loaded" in _state:
      return
    try:
      if os.environ.get("JAXFACTOR_NATIVE", "1") == "0":
        raise RuntimeError("disabled by JAXFACTOR_NATIVE=0")
      compiler = _compiler()
      if compiler is None:
        raise RuntimeError(
            f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not on PATH;"
            " set $CXX)")
      path = _library_path(compiler)
      if not os.path.exists(path):
        _build(compiler, path)
      try:
        library = ctypes.cdll.LoadLibrary(path)
      except OSError:  # a damaged cached build: build it again, once
        _build(compiler, path)
        library = ctypes.cdll.LoadLibrary(path)
      for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)),
            platform="cpu")
      _state["primitives"] = _register_primitives()
      _state["library"] = library
      _state["path"] = path
    except Exception as e:  # pylint: disable=broad-except
      _state["error"] = f"{type(e).__name__}: {e}"
    _state["loaded"] = True


def available() -> bool:
  """Whether the compiled depthwise conv can be used (builds it if needed)."""
  _load()
  return "library" in _state


def error() -> str | None:
  """Why `available()` is False, or None."""
  _load()
  return _state.get("error")


def library_path() -> str | None:
  """The compiled library in use, or None."""
  _load()
  return _state.get("path")


class Geometry(NamedTuple):
  """Static geometry over 3 spatial axes (fewer come as size-1 axes)."""

  stride: tuple[int, int, int]
  dilation: tuple[int, int, int]
  pads: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

  def output_shape(self, in_shape, window):
    """`[B, *out, C]` for input `[B, *in, C]` and a `window` over 3 axes."""
    batch, *spatial, channels = in_shape
    out = [_geometry.output_size(n, k, s, d, pad)
           for n, k, s, d, pad
           in zip(spatial, window, self.stride, self.dilation, self.pads)]
    return (batch, *out, channels)


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
      raise TypeError(f"jaxfactor depthwise {name}: dtypes differ:"
                      f" {a.dtype} and {b.dtype}")
    return ShapedArray(_out_shape(name, a, b, params), a.dtype)

  portable = mlir.lower_fun(_PORTABLE[name], multiple_results=False)

  def lowering(ctx, a, b, *, geometry, **params):
    parameters = getattr(ctx.module_context, "lowering_parameters", None)
    if getattr(parameters, "for_export", False):
      # `jax.export` serializes only custom calls with compatibility
      # guarantees: exported programs get the grouped convolution.
      return portable(ctx, a, b, geometry=geometry, **params)
    return jax.ffi.ffi_lowering(f"jaxfactor_depthwise_{name}")(
        ctx, a, b, stride=np.array(geometry.stride, np.int64),
        dilation=np.array(geometry.dilation, np.int64),
        pad=np.array([lo for lo, _ in geometry.pads], np.int64))

  primitive.def_impl(impl)
  primitive.def_abstract_eval(abstract_eval)
  mlir.register_lowering(primitive, lowering, platform="cpu")
  # Any other platform (e.g. `jax.export` for a GPU from a CPU host).
  mlir.register_lowering(primitive, portable)
  return primitive


def _grouped_forward(x, w, *, geometry):
  """`forward` as `lax`'s grouped convolution: the portable lowering."""
  return lax.conv_general_dilated(
      x, w[..., None, :], geometry.stride, geometry.pads,
      rhs_dilation=geometry.dilation,
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      feature_group_count=x.shape[-1], precision=lax.Precision.HIGHEST)


def _grouped_input_grad(dy, w, *, geometry, in_shape):
  _, pullback = jax.vjp(
      lambda x: _grouped_forward(x, w, geometry=geometry),
      jnp.zeros(in_shape, dy.dtype))
  return pullback(dy)[0]


def _grouped_weight_grad(x, dy, *, geometry, window):
  _, pullback = jax.vjp(
      lambda w: _grouped_forward(x, w, geometry=geometry),
      jnp.zeros((*window, x.shape[-1]), x.dtype))
  return pullback(dy)[0]


_PORTABLE = {"forward": _grouped_forward, "input_grad": _grouped_input_grad,
             "weight_grad": _grouped_weight_grad}


def forward(geometry: Geometry, x, w):
  """`y = depthwise_conv(x [B, *in, C], w [*window, C])`, 3 spatial axes."""
  return _primitives()["forward"].bind(x, w, geometry=geometry)


def input_grad(geometry: Geometry, in_shape, dy, w):
  """The transpose of `forward` in `x` (shape `in_shape`), applied to `dy`."""
  return _primitives()["input_grad"].bind(dy, w, geometry=geometry,
                                          in_shape=tuple(in_shape))


def weight_grad(geometry: Geometry, window, x, dy):
  """The transpose of `forward` in `w` (of shape `[*window, C]`), at `dy`."""
  return _primitives()["weight_grad"].bind(x, dy, geometry=geometry,
                                           window=tuple(window))


def _shape(a):
  """The shape of a primal, or of the undefined primal a transpose fills."""
  aval = getattr(a, "aval", None)
  return tuple(aval.shape if aval is not None else a.shape)


# The three maps are bilinear and each one's transposes are the other two, so
# JAX differentiates them in both modes and to any order (`ad.defbilinear`:
# the JVP of `f(a, b)` is `f(da, b) + f(a, db)`, transposed by these rules).
def _forward_transposes(prims):
  def lhs(ct, x, w, *, geometry):  # d x
    return prims["input_grad"].bind(ct, w, geometry=geometry,
                                    in_shape=_shape(x))

  def rhs(ct, x, w, *, geometry):  # d w
    return prims["weight_grad"].bind(x, ct, geometry=geometry,
                                     window=_shape(w)[:-1])
  return lhs, rhs


def _input_grad_transposes(prims):
  def lhs(ct, dy, w, *, geometry, in_shape):  # d dy
    del dy, in_shape
    return prims["forward"].bind(ct, w, geometry=geometry)

  def rhs(ct, dy, w, *, geometry, in_shape):  # d w
    del in_shape
    return prims["weight_grad"].bind(ct, dy, geometry=geometry,
                                     window=_shape(w)[:-1])
  return lhs, rhs


def _weight_grad_transposes(prims):
  def lhs(ct, x, dy, *, geometry, window):  # d x
    del window
    return prims["input_grad"].bind(dy, ct, geometry=geometry,
                                    in_shape=_shape(x))

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
    activation_only = name != "weight_grad" and db is None
    if activation_only:
      a = jnp.moveaxis(a, da, 0)
      v, batch = a.shape[:2]
      a = a.reshape(v * batch, *a.shape[2:])
      if name == "input_grad":
        params = dict(params, in_shape=(v * batch, *params["in_shape"][1:]))
      out = primitive.bind(a, b, **params)
      return out.reshape(v, batch, *out.shape[1:]), 0
    size = a.shape[da] if da is not None else b.shape[db]
    a, b = (jnp.moveaxis(t, d, 0) if d is not None
            else jnp.broadcast_to(t, (size, *t.shape))
            for t, d in ((a, da), (b, db)))
    return lax.map(lambda ab: primitive.bind(*ab, **params), (a, b)), 0
  return rule


def _primitives():
  if not available():
    raise RuntimeError(
        f"jaxfactor: the native depthwise conv is not available: {error()}")
  return _state["primitives"]


def _register_primitives():
  prims = {name: _make_primitive(name)
           for name in ("forward", "input_grad", "weight_grad")}
  for name, transposes in (("forward", _forward_transposes),
                           ("input_grad", _input_grad_transposes),
                           ("weight_grad", _weight_grad_transposes)):
    ad.defbilinear(prims[name], *transposes(prims))
    batching.primitive_batchers[prims[name]] = _batch_rule(prims, name)
  return prims
