"""Smoke tests for the benchmark scripts' own logic, at tiny shapes."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxfactor

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_conv_forward_backward_returns_output_and_vjp():
  conv = _load("conv")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 3)))
  kernel = jaxfactor.DepthwiseSeparable(
      jnp.asarray(rng.standard_normal((3, 3, 1, 3))),
      jnp.asarray(rng.standard_normal((3, 4))))
  t = jnp.asarray(rng.standard_normal((2, 5, 5, 4)))
  fn = jaxfactor.conv
  y, (dx, dk) = jax.jit(lambda x, k, t: conv._forward_backward(fn, x, k, t))(
      x, kernel, t)
  want_y, vjp = jax.vjp(fn, x, kernel)
  want_dx, want_dk = vjp(t)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(dk), jax.tree.leaves(want_dk)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fusion_programs_agree_across_lowerings():
  fusion = _load("fusion")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  compiled = fusion.programs(x, kernel, t)
  for consumer in ("out", "mean", "bn_block"):
    got = compiled["shift_add", consumer](x, kernel)
    want = compiled["grouped", consumer](x, kernel)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      # float32, a few hundred terms: summation order differs.
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fusion_script_prints_its_table():
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / "fusion.py"), "--shape", "2", "6", "6",
       "4", "--rounds", "1"],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  rows = [line for line in result.stdout.splitlines()
          if line.startswith(("| out", "| mean", "| bn_block"))]
  assert len(rows) == 3
