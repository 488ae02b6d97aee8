"""Test configuration: float64, strict promotion, caches, hypothesis profiles.

* float64 is enabled so that equivalence and gradient checks can use tight
  tolerances; float32/16-bit tests ask for those dtypes explicitly.
* Strict dtype promotion and rank promotion "raise" (as equinox tests do):
  the library must never rely on implicit promotion or broadcasting.
* Compilation dominates the suite's time, so compiled executables are cached
  on disk across runs, in `$JAXFACTOR_TEST_CACHE` (default
  `~/.cache/jaxfactor/jax-compilation`). It and the compiled native kernel
  (`jaxfactor._native.cache_dir()`) are the only files the tests write
  outside pytest's temporary directories; delete them at will.
* XLA:CPU compiles with LLVM's optimizer turned down
  (`--xla_backend_optimization_level=0`,
  `--xla_llvm_disable_expensive_passes`) and with its older, simpler fusion
  code generator (`--xla_cpu_use_fusion_emitters=false`), appended to any
  `XLA_FLAGS` given: the tests check values, not speed, and this cuts a
  cold run's compile time by about two thirds. (It also runs XLA's naive
  float64 convolutions about ten times slower: large float64 references are
  computed in numpy.) XLA's HLO passes, where the XLA:CPU abort of
  `tests/test_xla_abort.py` lives, run as usual. The example and sharding
  subprocesses run without them, as a user runs them (their programs run
  longer than they compile).
* Hypothesis (the property-based tests) keeps no example database; its
  cache of the literals in the code under test goes to
  `$HYPOTHESIS_STORAGE_DIRECTORY`, default `<tmp>/jaxfactor-hypothesis`,
  not to `.hypothesis/` in the working tree. Its profile comes from
  `$HYPOTHESIS_PROFILE`, default "ci":

  - "ci": 100 examples per property, derandomized: every run replays the
    same examples (whose programs the compilation cache then holds), so a
    red run is reproducible.
  - "dev": 100 new random examples per run; a failure prints the
    `@reproduce_failure` blob that replays it.
  - "long": 5000 new random examples per property, for a soak run before a
    release or after touching a lowering (about an hour on two cores):

        HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -n auto \\
            tests/test_properties.py tests/test_cost.py
"""

import os
import pathlib
import tempfile

# Before JAX creates its CPU client, which reads XLA_FLAGS once.
FAST_COMPILE_FLAGS = (
  "--xla_backend_optimization_level=0",
  "--xla_llvm_disable_expensive_passes=true",
  "--xla_cpu_use_fusion_emitters=false",
)
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_FLAGS]
).strip()

import hypothesis  # noqa: E402
import hypothesis.configuration  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

_cache = os.environ.get(
  "JAXFACTOR_TEST_CACHE",
  str(pathlib.Path.home() / ".cache" / "jaxfactor" / "jax-compilation"),
)
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
  hypothesis.configuration.set_hypothesis_home_dir(
    pathlib.Path(tempfile.gettempdir()) / "jaxfactor-hypothesis"
  )
_common = dict(
  deadline=None,
  database=None,
  print_blob=True,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
# `make test`'s default: 50 fixed examples per property, beside the pairwise
# sweeps that cover every pair of options (test_conv.py); "long" before a
# release or after touching a lowering (CONTRIBUTING.md).
hypothesis.settings.register_profile(
  "ci", max_examples=50, derandomize=True, **_common
)
hypothesis.settings.register_profile("dev", max_examples=100, **_common)
hypothesis.settings.register_profile("long", max_examples=5000, **_common)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
