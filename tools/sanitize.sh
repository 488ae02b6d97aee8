#!/bin/sh
# Runs the native depthwise kernel's tests against a build with
# AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   tools/sanitize.sh [pytest arguments]
#
# JAXFACTOR_NATIVE_SANITIZE=1 makes jaxfactor._native build (and cache, under
# its own key) the library with -fsanitize=address,undefined; every finding
# aborts the process, so a clean run is a passing one. Python is not built
# with ASan, so the ASan runtime must be preloaded for the library to load,
# and the C++ runtime with it: ASan finds the real __cxa_throw when it starts,
# and without libstdc++ loaded by then the first C++ exception (jaxlib throws
# some while starting) fails one of its checks.
# Leak checking is off: CPython and jaxlib keep memory until exit by design.
# pytest captures Python's output only (--capture=sys): a sanitizer's report
# is written to file descriptor 2 just before the process dies, and would be
# lost with the rest of pytest's descriptor-level capture.
# $PYTHON (default .venv/bin/python) and $CXX (default c++) choose the tools.
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
cxx=${CXX:-c++}
asan=$("$cxx" -print-file-name=libasan.so)
cxxrt=$("$cxx" -print-file-name=libstdc++.so)
for runtime in "$asan" "$cxxrt"; do
  case $runtime in
    /*) ;;  # a bare name means the compiler does not have it
    *) echo "sanitize.sh: $cxx has no $runtime (GCC's runtimes)" >&2
       exit 1 ;;
  esac
done
export JAXFACTOR_NATIVE_SANITIZE=1
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
LD_PRELOAD="$asan $cxxrt${LD_PRELOAD:+ $LD_PRELOAD}" exec "$python" -m pytest \
  tests/test_native_build.py tests/test_native_sanitized.py -p no:xdist \
  --capture=sys "$@"
