"""A compiled depthwise convolution for CPU: building and loading it.

`depthwise.cc` holds three XLA FFI handlers (forward, input gradient, weight
gradient of a channels-last depthwise conv over 3 spatial axes). XLA calls
them as custom calls (`jaxfactor._depthwise` lowers its primitives to them on
CPU), so a model that uses them compiles no kernel for its depthwise convs:
the shift-add lowering's k-tap sums and per-tap reductions were most of the
LLVM code XLA:CPU generated for a MobileNet-style train step.

The source is compiled the first time it is needed, with the machine's C++
compiler (`$CXX`, else `c++`) and the FFI headers jaxlib ships
(`jax.ffi.include_dir()`), into a cache directory (`$JAXFACTOR_CACHE_DIR`,
else `$XDG_CACHE_HOME/jaxfactor/native`, else `~/.cache/jaxfactor/native`),
keyed by the source, the flags, jaxlib's version and the CPU, and by the
compiler; later processes load the cached library, and a process without a
compiler loads one built elsewhere for the same key (prebuilding: see
docs/guides/native.md). `available()` says whether that worked; CPU programs
then use it, and the shift-add lowering where it did not. A failure (no
compiler, a failed build) is announced once per process with a
`RuntimeWarning`; `JAXFACTOR_NATIVE=0` turns the library off without one.
`error()` says why it is not available. `JAXFACTOR_NATIVE_SANITIZE=1` builds
it with AddressSanitizer and UndefinedBehaviorSanitizer
(`tools/sanitize.sh`).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import jax

_SOURCE = os.path.join(os.path.dirname(__file__), "depthwise.cc")
_TARGETS = {
  "jaxfactor_depthwise_forward": "JaxfactorDepthwiseForward",
  "jaxfactor_depthwise_input_grad": "JaxfactorDepthwiseInputGrad",
  "jaxfactor_depthwise_weight_grad": "JaxfactorDepthwiseWeightGrad",
}
# jaxlib's headers come in with -isystem: -Wall -Wextra speak of ours only.
_FLAGS = (
  "-O3",
  "-march=native",
  "-std=c++17",
  "-shared",
  "-fPIC",
  "-Wall",
  "-Wextra",
)
# With $JAXFACTOR_NATIVE_SANITIZE=1 (tools/sanitize.sh): AddressSanitizer and
# UndefinedBehaviorSanitizer, every finding fatal. Such a build loads only in
# a process that preloads the ASan runtime.
_SANITIZE_FLAGS = (
  "-fsanitize=address,undefined",
  "-fno-sanitize-recover=all",
  "-fno-omit-frame-pointer",
  "-g",
  "-O1",
)


def _sanitize() -> bool:
  return os.environ.get("JAXFACTOR_NATIVE_SANITIZE", "0") == "1"


def _flags() -> tuple[str, ...]:
  """The compiler flags for this process's build."""
  return _FLAGS + (_SANITIZE_FLAGS if _sanitize() else ())


_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> str:
  """Where the compiled library is kept."""
  if os.environ.get("JAXFACTOR_CACHE_DIR"):
    return os.environ["JAXFACTOR_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
    os.path.expanduser("~"), ".cache"
  )
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


def _library_path(compiler: str | None) -> str | None:
  """The cached library for this source, these flags, this jaxlib and this
  CPU, built by `compiler`: `depthwise-<key>-<compiler's key>.so`. Without a
  compiler, one that any compiler built for them (a prebuilt library, the
  newest if several), else None."""
  with open(_SOURCE, "rb") as f:
    source = f.read().decode()
  key = hashlib.sha256()
  for part in (
    source,
    " ".join(_flags()),
    _jaxlib_version(),
    platform.machine(),
    _cpu_fingerprint(),
    sys.platform,
  ):
    key.update(part.encode())
    key.update(b"\0")
  kind = "depthwise-asan" if _sanitize() else "depthwise"
  stem = os.path.join(cache_dir(), f"{kind}-{key.hexdigest()[:16]}")
  if compiler is None:
    built = sorted(glob.glob(glob.escape(stem) + "-*.so"), key=os.path.getmtime)
    return built[-1] if built else None
  version = subprocess.run(
    [compiler, "--version"], capture_output=True, text=True, check=False
  ).stdout
  return f"{stem}-{hashlib.sha256(version.encode()).hexdigest()[:8]}.so"


def _build(compiler: str, path: str) -> None:
  """Compiles the source into `path` (atomically: concurrent builds agree)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  try:
    result = subprocess.run(
      [
        compiler,
        *_flags(),
        "-isystem",
        jax.ffi.include_dir(),
        _SOURCE,
        "-o",
        tmp,
      ],
      capture_output=True,
      text=True,
      check=False,
      timeout=600,
    )
    if result.returncode != 0:
      raise RuntimeError(f"{compiler} failed:\n{result.stderr[-4000:]}")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o755 & ~umask)  # mkstemp makes it private
    # The compiler's messages beside the library (warnings: `build_log`),
    # written first, so a library in the cache always has its log.
    with open(tmp + ".log", "w", encoding="utf-8") as log:
      log.write(result.stderr)
    os.replace(tmp + ".log", _log_path(path))
    os.replace(tmp, path)
  finally:
    for leftover in (tmp, tmp + ".log"):
      if os.path.exists(leftover):
        os.remove(leftover)


def _log_path(path: str) -> str:
  return os.path.splitext(path)[0] + ".log"


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
      path = _library_path(compiler)
      if path is None:
        raise RuntimeError(
          f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not on PATH;"
          f" set $CXX) and no prebuilt library in {cache_dir()}"
        )
      if compiler is not None and not os.path.exists(path):
        _build(compiler, path)
      try:
        library = ctypes.cdll.LoadLibrary(path)
      except OSError as e:
        if _sanitize():  # not damaged: the ASan runtime is not preloaded
          raise RuntimeError(
            f"{e} (a JAXFACTOR_NATIVE_SANITIZE=1 build loads only with"
            " the ASan runtime in LD_PRELOAD: see tools/sanitize.sh)"
          ) from e
        if compiler is None:  # a prebuilt library: nothing can rebuild it
          raise
        # A damaged cached build: build it again, once.
        _build(compiler, path)
        library = ctypes.cdll.LoadLibrary(path)
      for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )
      _state["library"] = library
      _state["path"] = path
    except Exception as e:  # pylint: disable=broad-except
      _state["error"] = f"{type(e).__name__}: {e}"
    _state["loaded"] = True
    # Once per process, by the thread that tried: a silent fallback would
    # cost slower compiles and training steps with nothing to say why.
    # JAXFACTOR_NATIVE=0 is a choice, not a failure.
    chosen = os.environ.get("JAXFACTOR_NATIVE", "1") == "0"
    failure = None if "library" in _state or chosen else _state["error"]
  if failure is not None:  # outside the lock: a filter may make it raise
    warnings.warn(
      "jaxfactor: the compiled CPU depthwise convolution is unavailable"
      f" ({failure}). Depthwise convolutions on CPU run as a pure-JAX"
      " shift-add instead, which is slower to compile and to train. To"
      " fix this, install a C++ compiler or point $CXX at one; to use the"
      " shift-add without this warning, set JAXFACTOR_NATIVE=0.",
      RuntimeWarning,
      stacklevel=3,
    )


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


def build_log() -> str | None:
  """What the compiler printed (its warnings) when it built the library in
  use; None when there is none, or no record of its build (a library built
  elsewhere and copied into the cache)."""
  path = library_path()
  if path is None or not os.path.exists(_log_path(path)):
    return None
  with open(_log_path(path), encoding="utf-8") as log:
    return log.read()
