"""Smoke tests: each example runs end to end with tiny settings."""

import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_layer_costs_demo_runs():
  result = subprocess.run(
      [sys.executable, str(EXAMPLES / "layer_costs.py"), "--channels", "8",
       "--features", "8", "--size", "6", "--batch", "2"],
      capture_output=True, text=True, timeout=300, check=False,
  )
  assert result.returncode == 0, result.stderr
  assert "All formats agree with their dense kernels" in result.stdout
  assert result.stdout.count("True") == 6  # XLA agrees for every kernel
