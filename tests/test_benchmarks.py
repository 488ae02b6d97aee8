"""Smoke tests for the benchmark scripts' own logic, at tiny shapes."""

import functools
import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfactor
from jaxfactor import _native

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
  # The scripts import each other, as when run from their folder.
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_conv_forward_backward_times_forward_and_gradients():
  """What conv.py times: the output and the gradients of `vdot(f(x), t)`."""
  conv = _load("conv")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 3)))
  kernel = jaxfactor.DepthwiseSeparable(
      jnp.asarray(rng.standard_normal((3, 3, 1, 3))),
      jnp.asarray(rng.standard_normal((3, 4))))
  t = jnp.asarray(rng.standard_normal((2, 5, 5, 4)))
  fn = jaxfactor.conv
  y, (dx, dk) = jax.jit(functools.partial(conv._forward_backward, fn))(
      x, kernel, t)
  want_dx, want_dk = jax.grad(lambda x, k: jnp.vdot(fn(x, k), t),
                              argnums=(0, 1))(x, kernel)
  # float64 throughout (conftest): only summation order differs.
  np.testing.assert_allclose(y, fn(x, kernel), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
  for got, want in zip(jax.tree.leaves(dk), jax.tree.leaves(want_dk)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_fusion_programs_agree_across_lowerings():
  fusion = _load("fusion")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  compiled = fusion.programs(x, kernel, t)
  for consumer in fusion.CONSUMERS:
    want = compiled["grouped", consumer](x, kernel, t)
    for lowering in fusion.LOWERINGS:  # "native" too where it builds
      got = compiled[lowering, consumer](x, kernel, t)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        # float32, a few hundred terms: summation order differs.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fusion_script_writes_its_tables(tmp_path):
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / "fusion.py"), "--shapes", "2", "6",
       "6", "4", "1", "5", "5", "2", "--rounds", "1", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  rows = [line for line in (tmp_path / "fusion.md").read_text().splitlines()
          if line.startswith(("| out", "| mean", "| bn_block"))]
  assert len(rows) == 6


def test_spatial_script_writes_its_table(tmp_path):
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / "spatial.py"), "--quick", "--out",
       str(tmp_path)],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  rows = [line for line in (tmp_path / "spatial.md").read_text().splitlines()
          if line.startswith("| LowRank")]
  assert len(rows) == 2


def test_cp_lowering_variants_compute_cp():
  """Every variant `cp_lowering.py` times (the per-axis grouped convs written
  out with `lax` among them) is CP's convolution, at stride 1 and 2."""
  bench = _load("cp_lowering")
  rng = np.random.default_rng(0)
  r = lambda *shape: jnp.asarray(rng.standard_normal(shape))
  cp = jaxfactor.CP(r(3, 4), (r(3, 4), r(3, 4)), r(4, 5))
  x = r(2, 7, 6, 3)
  for stride in (1, 2):
    expected = jaxfactor.conv(x, cp, strides=stride,
                              implementation="reconstructed")
    for fn in bench.variants(stride).values():
      np.testing.assert_allclose(fn(x, cp), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not _native.available(),
                    reason=f"native kernel unavailable: {_native.error()}")
def test_depthwise_script_times_agreeing_programs(tmp_path):
  """depthwise.py's native and shift-add programs compute the same thing
  (float32: summation order differs), and the script writes one row per
  shape."""
  depthwise = _load("depthwise")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 7, 7, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 3)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32)
  compiled = depthwise.programs(x, kernel, t, 2)
  for p in ("fwd", "fwd+bwd"):
    want = compiled["shift_add", p](x, kernel, t)
    got = compiled["native", p](x, kernel, t)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / "depthwise.py"), "--shapes", "2", "6",
       "6", "4", "1", "1", "5", "5", "2", "2", "--rounds", "1", "--out",
       str(tmp_path)],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  rows = (tmp_path / "depthwise.md").read_text().splitlines()
  assert [r.split(" |")[0] for r in rows[4:]] == ["| 2 6 6 4, 1",
                                                 "| 1 5 5 2, 2"]
