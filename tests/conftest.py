"""Test configuration: float64, strict promotion, a persistent compile cache.

* float64 is enabled so that equivalence and gradient checks can use tight
  tolerances; float32/bfloat16 tests ask for those dtypes explicitly.
* Strict dtype promotion and rank promotion "raise" (as equinox tests do):
  the library must never rely on implicit promotion or broadcasting.
* Compilation dominates the suite's time, so compiled executables are cached
  on disk across runs (`JAXFACTOR_TEST_CACHE`, default ~/.cache/jaxfactor).
"""

import os
import pathlib

import hypothesis
import jax

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

# CI replays a fixed set of examples so that a red run is reproducible.
hypothesis.settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.register_profile("dev", max_examples=40, deadline=None)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "dev")
