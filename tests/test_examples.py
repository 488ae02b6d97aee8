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
  rows = [line.split() for line in result.stdout.splitlines()
          if line.split() and line.split()[0].startswith(
              ("dense", "DepthwiseSeparable", "SpatiallySeparable", "LowRank",
               "Tucker", "CP"))]
  xla_over_cost = {row[0]: float(row[5]) for row in rows}
  assert len(xla_over_cost) == 6
  # XLA counts exactly what `cost` counts, but for CP's fused recomputation.
  assert all(v == 1.0 for k, v in xla_over_cost.items()
             if not k.startswith("CP"))
  assert 1.0 <= next(v for k, v in xla_over_cost.items()
                     if k.startswith("CP")) < 1.2
