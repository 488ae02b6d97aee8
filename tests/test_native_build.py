"""Building and loading the compiled depthwise kernel (`jaxfactor._native`).

The source compiles without a warning under -Wall -Wextra, and a machine
where the library cannot be built says so once, with what it costs and how
to fix it.
"""

import json
import os
import platform
import shutil
import subprocess
import sys

import jax
import pytest

import jaxfactor
from jaxfactor import _native

needs_compiler = pytest.mark.skipif(
  _native._compiler() is None, reason="no C++ compiler"
)


def _compile(extra, output):
  """The build command of `_native` (sanitizers aside), warnings as errors."""
  result = subprocess.run(
    [
      _native._compiler(),
      *_native._FLAGS,
      "-Werror",
      *extra,
      "-isystem",
      jax.ffi.include_dir(),
      _native._SOURCE,
      "-o",
      output,
    ],
    capture_output=True,
    text=True,
    check=False,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-8000:]


@needs_compiler
def test_builds_without_warnings(tmp_path):
  """The library exactly as `_native` builds it (optimizer warnings come from
  the optimizer): its build printed nothing. A library without a record of
  its build is compiled again here, with every warning an error."""
  log = _native.build_log()
  if log is None:
    _compile([], str(tmp_path / "depthwise.so"))
  else:
    assert log == "", log


@needs_compiler
@pytest.mark.skipif(
  platform.machine() not in ("x86_64", "AMD64"), reason="x86 only"
)
def test_compiles_without_warnings_for_baseline_x86(tmp_path):
  """A CPU without AVX-512 is warned of differently (e.g. -Wpsabi)."""
  _compile(["-march=x86-64", "-fsyntax-only"], os.devnull)


@needs_compiler
def test_sanitized_build_has_its_own_cache_key(monkeypatch):
  compiler = _native._compiler()
  monkeypatch.delenv("JAXFACTOR_NATIVE_SANITIZE", raising=False)
  plain = _native._library_path(compiler)
  monkeypatch.setenv("JAXFACTOR_NATIVE_SANITIZE", "1")
  sanitized = _native._library_path(compiler)
  assert plain != sanitized
  assert os.path.basename(sanitized).startswith("depthwise-asan-")
  assert "-fsanitize=address,undefined" in _native._flags()


_PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")  # a repeated warning is recorded too
  import jaxfactor._native as native
  results = [native.available() for _ in range(3)]
  native.error(), native.library_path()
print(json.dumps({
    "available": results, "error": native.error(), "log": native.build_log(),
    "warnings": [[w.category.__name__, str(w.message)] for w in caught
                 if "jaxfactor" in str(w.message)]}))
"""


def _probe(tmp_path, **env):
  """A fresh process with an empty cache: imports `jaxfactor._native`,
  calls `available()` three times, reports its warnings."""
  environ = {
    k: v for k, v in os.environ.items() if k not in ("JAXFACTOR_NATIVE", "CXX")
  }
  root = os.path.dirname(os.path.dirname(jaxfactor.__file__))
  environ.update(
    JAXFACTOR_CACHE_DIR=str(tmp_path / "cache"),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([root, environ.get("PYTHONPATH", "")]),
    **env,
  )
  result = subprocess.run(
    [sys.executable, "-c", _PROBE],
    env=environ,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_one_fallback_warning(report, why):
  assert report["available"] == [False] * 3
  assert len(report["warnings"]) == 1, report["warnings"]
  category, message = report["warnings"][0]
  assert category == "RuntimeWarning"
  for text in (
    why,  # why
    "pure-JAX shift-add",
    "slower to compile and to train",  # cost
    "install a C++ compiler",
    "$CXX",  # the fix
    "JAXFACTOR_NATIVE=0",
  ):  # silencing it
    assert text in message, (text, message)


def test_missing_compiler_warns_once(tmp_path):
  missing = str(tmp_path / "no-such-c++")
  report = _probe(tmp_path, CXX=missing)
  _assert_one_fallback_warning(report, f"no C++ compiler ({missing!r}")


def test_failing_compiler_warns_once(tmp_path):
  compiler = tmp_path / "broken-c++"
  compiler.write_text(
    "#!/bin/sh\necho 'broken-c++: cannot compile' >&2\nexit 1\n"
  )
  compiler.chmod(0o755)
  report = _probe(tmp_path, CXX=str(compiler))
  _assert_one_fallback_warning(report, "broken-c++: cannot compile")


@pytest.mark.skipif(not _native.available(), reason="no library to copy")
def test_prebuilt_library_needs_no_compiler(tmp_path):
  """A node without a compiler loads a library built elsewhere for the same
  source, flags, jaxlib and CPU (docs/guides/native.md), silently."""
  built = _native.library_path()
  (tmp_path / "cache").mkdir()
  copy = tmp_path / "cache" / os.path.basename(built)
  shutil.copyfile(built, copy)
  report = _probe(tmp_path, CXX=str(tmp_path / "no-such-c++"))
  assert report["available"] == [True] * 3
  assert report["warnings"] == []
  assert report["error"] is None


@pytest.mark.skipif(not _native.available(), reason="no library to copy")
def test_build_log_keeps_the_compilers_warnings(tmp_path):
  """What the compiler prints is kept beside the library it built (what
  `test_builds_without_warnings` reads): a stand-in compiler that warns."""
  compiler = tmp_path / "warning-c++"
  compiler.write_text(
    "#!/bin/sh\n"
    'if [ "$1" = --version ]; then echo "warning-c++ 1.0"; exit 0; fi\n'
    "for out; do :; done\n"  # the last argument: the output file
    "echo 'depthwise.cc:1:1: warning: a warning' >&2\n"
    f"cp '{_native.library_path()}' \"$out\"\n"
  )
  compiler.chmod(0o755)
  report = _probe(tmp_path, CXX=str(compiler))
  assert report["available"] == [True] * 3
  assert report["log"] == "depthwise.cc:1:1: warning: a warning\n"


def test_opting_out_is_silent(tmp_path):
  """JAXFACTOR_NATIVE=0 is a choice, not a failure: no warning."""
  report = _probe(
    tmp_path, CXX=str(tmp_path / "no-such-c++"), JAXFACTOR_NATIVE="0"
  )
  assert report["available"] == [False] * 3
  assert report["warnings"] == []
  assert "JAXFACTOR_NATIVE=0" in report["error"]
