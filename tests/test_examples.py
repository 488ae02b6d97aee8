"""Smoke tests: each example runs end to end with tiny settings.

Each example runs in its own process, as a user runs it (float32, JAX's
default dtype rules), sharing the tests' persistent compilation cache.
"""

import csv
import pathlib
import re
import socket
import subprocess
import sys

import pytest
from reference import subprocess_env

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
FORMATS = (
  "DepthwiseSeparable",
  "SpatiallySeparable",
  "LowRank",
  "Tucker",
  "CP",
)


def _run(script, *args, fast_compile=False):
  """Runs an example as a user does (`fast_compile`: with the suite's
  compile-time XLA flags, for a run that spends its time compiling)."""
  result = subprocess.run(
    [sys.executable, str(EXAMPLES / script), *map(str, args)],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
    env=subprocess_env(fast_compile=fast_compile),
  )
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def test_layer_costs_counts_what_xla_counts():
  stdout = _run(
    "layer_costs.py",
    "--channels",
    8,
    "--features",
    8,
    "--size",
    6,
    "--batch",
    2,
  )
  assert "All formats agree with their dense kernels" in stdout
  rows = {}
  for line in stdout.splitlines():
    fields = line.split()
    if fields and fields[0].startswith(("dense", *FORMATS)):
      rows[fields[0]] = fields
  assert len(rows) == 6
  dense = rows.pop("dense")
  assert int(dense[1].replace(",", "")) == 3 * 3 * 8 * 8
  # `jaxfactor.cost` counts exactly what XLA counts, for every format.
  assert dense[5] == "1.000"
  for name, fields in rows.items():
    assert fields[5] == "1.000", name
    assert float(fields[2]) > 1, name  # fewer parameters than dense
    assert fields[6] in ("factorized", "reconstructed"), name
    assert float(fields[7]) <= 1e-5, name


def test_compress_digits_runs(tmp_path):
  stdout = _run(
    "compress_digits.py",
    "--epochs",
    1,
    "--finetune-epochs",
    1,
    "--budgets",
    0.1,
    "--formats",
    "DepthwiseSeparable",
    "LowRank",
    "--train-size",
    128,
    "--timing-runs",
    2,
    "--timing-batch",
    16,
    "--no-progress",
    "--out",
    tmp_path,
  )
  assert "compress_digits.csv" in stdout
  with open(tmp_path / "compress_digits.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == (
      "format",
      "budget",
      "params",
      "conv_flops",
      "flop_fraction",
      "acc_factorized",
      "acc_finetuned",
      "infer_ms",
      "ranks",
      "note",
    )
    rows = {row["format"]: row for row in reader}
  assert list(rows) == ["dense", "DepthwiseSeparable", "LowRank"]
  dense = rows.pop("dense")
  assert float(dense["flop_fraction"]) == 1.0
  assert dense["ranks"] == "- - -"
  assert 0 <= float(dense["acc_finetuned"]) <= 1
  assert float(dense["infer_ms"]) > 0
  for row in rows.values():
    assert 0 <= float(row["acc_factorized"]) <= 1
    assert 0 <= float(row["acc_finetuned"]) <= 1
    assert float(row["infer_ms"]) > 0
    assert int(row["params"]) < int(dense["params"])
    assert float(row["flop_fraction"]) == pytest.approx(
      int(row["conv_flops"]) / int(dense["conv_flops"]), abs=1e-4
    )
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
  stdout = _run(
    "mobilenet_digits.py",
    "--epochs",
    1,
    "--train-size",
    128,
    "--timing-runs",
    2,
    "--no-progress",
  )
  rows = {}
  for line in stdout.splitlines():
    for name in ("dense convs", "MobileNet (depthwise-sep.)"):
      if line.startswith(name):
        params, mflops, acc, step_ms = line[len(name) :].split()
        rows[name] = (
          int(params.replace(",", "")),
          float(mflops),
          float(acc),
          float(step_ms),
        )
  dense, mobilenet = rows["dense convs"], rows["MobileNet (depthwise-sep.)"]
  assert mobilenet[0] < dense[0] / 4 and mobilenet[1] < dense[1] / 4
  assert all(0 <= row[2] <= 1 and row[3] > 0 for row in rows.values())


def _free_port():
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_sharded_training_across_two_processes_equals_single_device():
  """The example as JAX's multi-controller runs it: two processes joined by
  `jax.distributed.initialize` (Gloo collectives on the CPU), 4 simulated
  devices each, one (data=4, model=2) mesh over both. Each process compares
  its sharded loss curve with the single-device run's."""
  command = [
    sys.executable,
    str(EXAMPLES / "sharded_training.py"),
    "--steps",
    "3",
    "--batch-size",
    "16",
    "--num-processes",
    "2",
    "--coordinator",
    f"localhost:{_free_port()}",
  ]
  processes = [
    subprocess.Popen(
      [*command, "--process-id", str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=subprocess_env(fast_compile=True),
    )
    for i in range(2)
  ]
  outputs = []
  for process in processes:
    try:
      stdout, stderr = process.communicate(timeout=600)
    finally:
      for other in processes:
        if other.poll() is None and process.returncode is None:
          other.kill()
    assert process.returncode == 0, stdout + stderr
    outputs.append(stdout)
  # Both processes report the same global computation. (Gloo prints its
  # connections to stdout as well, from several threads.)
  tables = [
    re.findall(r"^ +\d+ +\d+\.\d+ +\d+\.\d+$", out, re.MULTILINE)
    for out in outputs
  ]
  assert len(tables[0]) == 2 and tables[1] == tables[0], outputs
  stdout = outputs[0]
  assert "2 process(es), 8 cpu devices, mesh {'data': 4, 'model': 2}" in stdout
  # Each factor's inner rank axis is split over "model", as its
  # initializer's `nnx.with_partitioning` names say, across both processes.
  for line in (
    "conv2.in_proj    (32, 16)         P(None, 'model')",
    "conv2.core       (3, 3, 16, 16)   P(None, None, None, 'model')",
    "conv3.spatial_0  (3, 32)          P(None, 'model')",
    "conv3.out_proj   (32, 64)         P('model', None)",
  ):
    assert f"{line} over 8 devices" in stdout
  assert (
    "Adam's first moment of conv2.in_proj follows it: P(None, 'model')"
    in stdout
  )
  assert "identical initial parameters: True" in stdout
  accuracy = {
    line.split(", ")[1].split(":")[0]: float(line.split()[-1])
    for line in stdout.splitlines()
    if line.startswith("test accuracy")
  }
  assert set(accuracy) == {"sharded", "single-device"}
  assert 0 <= accuracy["sharded"] <= 1
  assert accuracy["sharded"] == accuracy["single-device"]
  assert "\nloss curves equal" in stdout


def test_readme_factorize_your_own_model(tmp_path):
  # The README's copyable example runs as written (it saves to the cwd).
  readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
  section = readme.split("## Factorize your own Flax model", 1)[1]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  script = tmp_path / "snippet.py"
  script.write_text(code)
  result = subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
    cwd=tmp_path,
    env=subprocess_env(),
  )
  assert result.returncode == 0, result.stdout + result.stderr
  accuracy = {
    line.split(":")[0]: line.split(":")[1]
    for line in result.stdout.splitlines()
    if "accuracy" in line
  }
  assert accuracy["restored accuracy"] == accuracy["accuracy after fine-tuning"]
  assert (tmp_path / "model.msgpack").exists()


def test_adapt_digits_runs(tmp_path):
  stdout = _run(
    "adapt_digits.py",
    "--pretrain-epochs",
    1,
    "--epochs",
    1,
    "--formats",
    "Tucker",
    "--ranks",
    1,
    "--train-size",
    64,
    "--no-progress",
    "--out",
    tmp_path,
  )
  assert "adapt_digits.csv" in stdout
  with open(tmp_path / "adapt_digits.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == (
      "method",
      "rank",
      "trainable",
      "trainable_fraction",
      "accuracy",
      "merged_accuracy",
      "step_ms",
    )
    rows = {(row["method"], row["rank"]): row for row in reader}
  assert list(rows) == [
    ("head only", ""),
    ("full", ""),
    ("Tucker", "1"),
  ]
  head, full = rows[("head only", "")], rows[("full", "")]
  assert float(full["trainable_fraction"]) == 1.0
  for row in rows.values():
    assert 0 <= float(row["accuracy"]) <= 1
    assert float(row["step_ms"]) > 0
  for key in (("Tucker", "1"),):
    row = rows[key]
    # Adapters and the head: more than the head alone, far fewer than all.
    assert (
      int(head["trainable"]) < int(row["trainable"]) < int(full["trainable"])
    )
    # Merging the adapters into the kernels keeps the predictions (up to an
    # argmax tie broken by rounding: one test image).
    assert (
      abs(float(row["merged_accuracy"]) - float(row["accuracy"])) <= 1 / 200
    )
  assert head["merged_accuracy"] == full["merged_accuracy"] == ""
  png = (tmp_path / "adapt_digits.png").read_bytes()
  assert png.startswith(b"\x89PNG")


def test_compress_mnist_runs(tmp_path):
  stdout = _run(
    "compress_mnist.py",
    "--epochs",
    1,
    "--finetune-epochs",
    1,
    "--seeds",
    0,
    "--budgets",
    0.1,
    "--methods",
    "uniform-tucker",
    "--train-size",
    128,
    "--sample-size",
    32,
    "--timing-runs",
    2,
    "--timing-batch",
    16,
    "--no-progress",
    "--out",
    tmp_path,
  )
  assert "compress_mnist.csv" in stdout
  with open(tmp_path / "compress_mnist.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == (
      "method",
      "budget",
      "seeds",
      "params",
      "conv_flops",
      "flop_fraction",
      "acc_factorized",
      "acc_factorized_std",
      "acc_finetuned",
      "acc_finetuned_std",
      "infer_ms",
      "ranks",
      "note",
    )
    rows = {row["method"]: row for row in reader}
  assert list(rows) == ["dense", "uniform-tucker"]
  dense = rows.pop("dense")
  assert float(dense["flop_fraction"]) == 1.0
  assert dense["ranks"] == "- - - - -"
  for row in (dense, *rows.values()):
    assert row["seeds"] == "1"
    assert 0 <= float(row["acc_finetuned"]) <= 1
    assert float(row["acc_finetuned_std"]) >= 0
    assert float(row["infer_ms"]) > 0
  for row in rows.values():
    assert 0 <= float(row["acc_factorized"]) <= 1
    assert int(row["params"]) < int(dense["params"])
    assert float(row["flop_fraction"]) == pytest.approx(
      int(row["conv_flops"]) / int(dense["conv_flops"]), abs=1e-3
    )
  # The uniform budget holds per layer, except conv1 (one input channel),
  # whose cheapest Tucker costs more than 10% of its FLOPs and which stays
  # dense: it adds its share. (`factorize`'s model-wide budget, the
  # spectral rows, is the one test_compress_digits_runs runs.)
  conv1_share = (28 * 28 * 9 * 16 * 2) / int(dense["conv_flops"])
  assert float(rows["uniform-tucker"]["flop_fraction"]) <= 0.1 + conv1_share
  assert rows["uniform-tucker"]["ranks"].startswith("- ")
  assert rows["uniform-tucker"]["note"] == "conv1 kept dense: out of reach"
  with open(tmp_path / "compress_mnist_runs.csv", newline="") as f:
    runs = list(csv.DictReader(f))
  assert len(runs) == 2
  assert {run["seed"] for run in runs} == {"0"}
  png = (tmp_path / "compress_mnist.png").read_bytes()
  assert png.startswith(b"\x89PNG")
