"""Smoke tests: each example runs end to end with tiny settings."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

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


def _run(script, *args):
  # The sharded example sets its own device count; an inherited one would
  # override it.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, str(EXAMPLES / script), *map(str, args)],
      capture_output=True, text=True, timeout=300, check=False, env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def test_compress_digits_runs(tmp_path):
  stdout = _run("compress_digits.py", "--epochs", 1, "--finetune-epochs", 1,
                "--budgets", 0.1, "--formats", "DepthwiseSeparable", "LowRank",
                "--train-size", 256, "--timing-runs", 2, "--timing-batch", 16,
                "--no-progress", "--out", tmp_path)
  assert "compress_digits.csv" in stdout
  with open(tmp_path / "compress_digits.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == (
        "format", "budget", "params", "conv_flops", "flop_fraction",
        "acc_factorized", "acc_finetuned", "infer_ms", "ranks", "note")
    rows = {row["format"]: row for row in reader}
  assert list(rows) == ["dense", "DepthwiseSeparable", "LowRank"]
  dense = rows.pop("dense")
  assert float(dense["flop_fraction"]) == 1.0
  assert 0 <= float(dense["acc_finetuned"]) <= 1
  for row in rows.values():
    assert 0 <= float(row["acc_factorized"]) <= 1
    assert 0 <= float(row["acc_finetuned"]) <= 1
    assert float(row["infer_ms"]) > 0
    assert int(row["params"]) < int(dense["params"])
    assert float(row["flop_fraction"]) == pytest.approx(
        int(row["conv_flops"]) / int(dense["conv_flops"]), abs=1e-4)
  # LowRank meets the budget; DepthwiseSeparable's cheapest (channel
  # multiplier 1 everywhere) costs more, and the row says so.
  assert float(rows["LowRank"]["flop_fraction"]) <= 0.1
  assert rows["LowRank"]["note"] == ""
  assert float(rows["DepthwiseSeparable"]["flop_fraction"]) > 0.1
  assert rows["DepthwiseSeparable"]["ranks"] == "1 1 1"
  assert rows["DepthwiseSeparable"]["note"].startswith("budget out of reach")
  png = (tmp_path / "compress_digits.png").read_bytes()
  assert png.startswith(b"\x89PNG")


def test_mobilenet_digits_runs():
  stdout = _run("mobilenet_digits.py", "--epochs", 1, "--train-size", 256,
                "--timing-runs", 3, "--no-progress")
  rows = {}
  for line in stdout.splitlines():
    for name in ("dense convs", "MobileNet (depthwise-sep.)"):
      if line.startswith(name):
        params, mflops, acc, step_ms = line[len(name):].split()
        rows[name] = (int(params.replace(",", "")), float(mflops),
                      float(acc), float(step_ms))
  dense, mobilenet = rows["dense convs"], rows["MobileNet (depthwise-sep.)"]
  assert mobilenet[0] < dense[0] / 4 and mobilenet[1] < dense[1] / 4
  assert all(0 <= row[2] <= 1 and row[3] > 0 for row in rows.values())


def test_sharded_training_equals_single_device():
  stdout = _run("sharded_training.py", "--steps", 4)
  assert "8 cpu devices, mesh {'data': 4, 'model': 2}" in stdout
  assert "P(None, 'model') over 8 devices" in stdout
  assert "identical initial parameters: True" in stdout
  assert stdout.rstrip().endswith("loss curves equal")


def test_readme_factorize_your_own_model(tmp_path):
  # The README's copyable example runs as written (it saves to the cwd).
  readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
  section = readme.split("## Factorize your own Flax model", 1)[1]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  script = tmp_path / "snippet.py"
  script.write_text(code)
  result = subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, timeout=300, check=False, cwd=tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr
  accuracy = {line.split(":")[0]: line.split(":")[1]
              for line in result.stdout.splitlines() if "accuracy" in line}
  assert accuracy["restored accuracy"] == accuracy["accuracy after fine-tuning"]
  assert (tmp_path / "model.msgpack").exists()
