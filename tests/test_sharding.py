"""Sharding by the factors' metadata, on 4 simulated CPU devices.

Runs `_sharded_run.py` in a subprocess: the device count is fixed when JAX
starts, and the rest of the suite must keep its single device.
"""

import pathlib
import subprocess
import sys

from reference import subprocess_env


def test_sharded_forward_and_grad_equal_single_device():
  script = pathlib.Path(__file__).with_name("_sharded_run.py")
  env = subprocess_env()
  env["JAX_PLATFORMS"] = "cpu"  # simulated CPU devices, also beside a GPU
  result = subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    check=False,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.splitlines() == [
    "nnx built under the mesh: sharded == single-device",
    "nnx placed by its metadata: sharded == single-device",
    "shard_map: per-device == single-device",
    "linen: sharded == single-device",
  ], result.stdout + result.stderr
