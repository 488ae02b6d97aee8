"""Smoke tests for the benchmark scripts, at tiny shapes.

What each script times is checked (its programs compute what they claim),
and each script's `main` runs end to end on a command line, in this process
(a process per script would spend most of its time importing JAX) under
JAX's default dtype rules, as a user runs it: float32, standard promotion.
"""

import contextlib
import functools
import importlib.util
import io
import json
import pathlib
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfactor
from jaxfactor import _native

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
native = pytest.mark.skipif(
  not _native.available(),
  reason=f"native kernel unavailable: {_native.error()}",
)


def _load(name):
  # The scripts import each other, as when run from their folder.
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(script, *args):
  """`benchmarks/<script> args` (its `main`) under JAX's default dtype
  rules, not the tests' float64 and strict promotion; returns its stdout."""
  module = _load(script.removesuffix(".py"))
  argv = [str(BENCHMARKS / script), *map(str, args)]
  stdout = io.StringIO()
  with (
    mock.patch.object(sys, "argv", argv),
    contextlib.redirect_stdout(stdout),
    jax.enable_x64(False),
    jax.numpy_dtype_promotion("standard"),
    jax.numpy_rank_promotion("allow"),
  ):
    module.main()
  return stdout.getvalue()


def _allclose(got, want, tol):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_conv_forward_backward_times_forward_and_gradients():
  """What conv.py times: the output and the gradients of `vdot(f(x), t)`."""
  conv = _load("conv")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 3)))
  kernel = jaxfactor.DepthwiseSeparable(
    jnp.asarray(rng.standard_normal((3, 3, 1, 3))),
    jnp.asarray(rng.standard_normal((3, 4))),
  )
  t = jnp.asarray(rng.standard_normal((2, 5, 5, 4)))
  fn = jaxfactor.conv
  y, (dx, dk) = jax.jit(functools.partial(conv._forward_backward, fn))(
    x, kernel, t
  )
  want_dx, want_dk = jax.grad(
    lambda x, k: jnp.vdot(fn(x, k), t), argnums=(0, 1)
  )(x, kernel)
  # float64 throughout (conftest): only summation order differs.
  _allclose(y, fn(x, kernel), 1e-12)
  _allclose((dx, dk), (want_dx, want_dk), 1e-12)


def test_conv_script_writes_its_tables(tmp_path):
  stdout = _run(
    "conv.py",
    "--quick",
    "--shapes",
    "tiny16",
    "--compile-repeats",
    0,
    "--out",
    tmp_path,
  )
  assert "compile time: not measured" in stdout
  result = json.loads((tmp_path / "conv_quick.json").read_text())
  rows = {(r["op"], r["impl"]): r for r in result["rows"]}
  formats = (
    "depthwise_separable",
    "low_rank",
    "tucker",
    "spatially_separable",
    "cp",
  )
  expected = {
    ("dense", "lax conv"),
    ("depthwise", "jaxfactor.depthwise_conv"),
    ("depthwise", "lax grouped (=Flax/Keras/Haiku)"),
    ("separable", "naive grouped + 1x1 conv"),
    *((f, i) for f in formats for i in ("factorized", "reconstructed", "auto")),
  }
  if _native.available():  # the CPU's other depthwise lowering beside it
    expected.add(("depthwise", "jaxfactor shift_add"))
    assert "depthwise convs run as 'native'" in result["machine"]
  if importlib.util.find_spec("torch") is not None:  # PyTorch's rows beside
    expected |= {
      (op, "torch channels-last") for op in ("dense", "depthwise", "separable")
    }
  assert set(rows) == expected
  assert rows["dense", "lax conv"]["theoretical"] == 1.0
  for (op, impl), r in rows.items():
    assert r["fwd_median_ms"] > 0 and r["fwdbwd_median_ms"] > 0, (op, impl)
    if "torch" not in impl:  # jaxfactor.cost counts the JAX programs
      assert r["flops"] > 0, (op, impl)
  for f in formats:
    auto = rows[f, "auto"]
    assert auto["auto_runs"] in ("factorized", "reconstructed")
    # "auto" compiles to the very program of the implementation it chose.
    assert auto["auto_same_program"] is True, f
    assert auto["flops"] == rows[f, auto["auto_runs"]]["flops"]
  assert rows["tucker", "factorized"]["theoretical"] > 1
  table = (tmp_path / "conv_quick.md").read_text()
  # A row per program, and with torch the depthwise and separable rows of
  # the table against it.
  torch_rows = 2 if ("dense", "torch channels-last") in expected else 0
  assert table.count("| tiny16 |") == len(expected) + torch_rows


def test_fusion_programs_agree_across_lowerings():
  fusion = _load("fusion")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  compiled = fusion.programs(x, kernel, t)
  assert set(compiled) == {
    (lowering, consumer)
    for lowering in fusion.LOWERINGS
    for consumer in fusion.CONSUMERS
  }
  for consumer in fusion.CONSUMERS:
    want = compiled["grouped", consumer](x, kernel, t)
    for lowering in fusion.LOWERINGS:  # "native" too where it builds
      # float32, a few hundred terms: summation order differs.
      _allclose(compiled[lowering, consumer](x, kernel, t), want, 1e-4)


def test_fusion_script_writes_its_tables(tmp_path):
  _run(
    "fusion.py",
    "--shapes",
    2,
    6,
    6,
    4,
    1,
    5,
    5,
    2,
    "--rounds",
    1,
    "--out",
    tmp_path,
  )
  rows = [
    line
    for line in (tmp_path / "fusion.md").read_text().splitlines()
    if line.startswith(("| out", "| mean", "| bn_block"))
  ]
  assert len(rows) == 6
  columns = 3 if _native.available() else 2
  assert all(line.count("|") == columns + 2 for line in rows)


@native
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
    _allclose(
      compiled["native", p](x, kernel, t),
      compiled["shift_add", p](x, kernel, t),
      1e-4,
    )
  # The two are different programs: the native one calls the kernel.
  assert "jaxfactor_depthwise" in compiled["native", "fwd"].as_text()
  assert "jaxfactor_depthwise" not in compiled["shift_add", "fwd"].as_text()
  _run(
    "depthwise.py",
    "--shapes",
    2,
    6,
    6,
    4,
    1,
    1,
    5,
    5,
    2,
    2,
    "--rounds",
    1,
    "--out",
    tmp_path,
  )
  rows = (tmp_path / "depthwise.md").read_text().splitlines()
  assert [r.split(" |")[0] for r in rows[4:]] == [
    "| 2 6 6 4, 1",
    "| 1 5 5 2, 2",
  ]


def test_spatial_script_writes_its_table(tmp_path):
  _run("spatial.py", "--quick", "--out", tmp_path)
  rows = [
    line.split(" | ")
    for line in (tmp_path / "spatial.md").read_text().splitlines()
    if line.startswith("| LowRank")
  ]
  assert len(rows) == 2
  # Both lowerings timed, and the rule's choice shown: at these small
  # sizes (8x8, 4x4) XLA's convolution.
  assert all(float(row[4]) > 0 for row in rows)
  assert [row[-1] for row in rows] == ["conv |", "conv |"]


def test_cp_lowering_variants_compute_cp():
  """Every variant `cp_lowering.py` times (the per-axis and merged grouped
  convs written out with `lax` among them) is CP's convolution, with CP's
  gradients, at stride 1 and 2; and the script prints one row per variant."""
  bench = _load("cp_lowering")
  rng = np.random.default_rng(0)
  r = lambda *shape: jnp.asarray(rng.standard_normal(shape))
  cp = jaxfactor.CP(r(3, 4), (r(3, 4), r(3, 4)), r(4, 5))
  x = r(2, 7, 6, 3)
  for stride in (1, 2):
    out = jaxfactor.conv(x, cp, strides=stride).shape
    compiled = bench.programs(x, cp, r(*out), stride)
    labels = list(bench.variants(stride))
    assert set(compiled) == {
      (label, p) for label in labels for p in ("fwd", "fwdbwd")
    }
    t = r(*out)
    for p in ("fwd", "fwdbwd"):
      want = compiled["reconstructed", p](x, cp, t)
      for label in labels:
        _allclose(compiled[label, p](x, cp, t), want, 1e-10)
  stdout = _run(
    "cp_lowering.py", "--batch", 1, "--repeats", 1, "--shapes", "tiny_s2"
  )
  rows = [line for line in stdout.splitlines() if line.startswith("| tiny")]
  assert [row.split(" | ")[1] for row in rows] == labels


def test_decompose_measures_jaxfactor():
  """decompose.py's jaxfactor side: the relative error of a jitted
  decomposition, exact for a kernel of that Tucker rank."""
  bench = _load("decompose")
  rng = np.random.default_rng(0)
  exact = np.einsum(
    "hwab,ca,fb->hwcf",
    rng.standard_normal((3, 3, 2, 2)),
    rng.standard_normal((8, 2)),
    rng.standard_normal((8, 2)),
  )
  error, seconds, compile_s = bench.run_ours(
    exact, jnp.float32, 1, format="tucker", rank=(2, 2), iterations=2
  )
  assert error < 1e-5 and seconds > 0 and compile_s > 0
  decaying = bench.decaying_kernel((3, 3, 8, 8), 0.9)
  error = bench.run_ours(
    decaying, jnp.float32, 1, format="tucker", rank=(2, 2), iterations=2
  )[0]
  assert 0.1 < error < 1


def test_decompose_script_runs(tmp_path):
  pytest.importorskip("tensorly", reason="the `benchmarks` extra")
  _run("decompose.py", "--quick", "--kernels", "decay", "--out", tmp_path)
  result = json.loads((tmp_path / "decompose_quick.json").read_text())
  assert [r["method"] for r in result["rows"]] == ["Tucker-2 HOOI"] * 2 + [
    "CP ALS"
  ] * 2
  for r in result["rows"]:
    # The same algorithm from the same start: errors agree; jaxfactor's CP
    # keeps the best of its starts, TensorLy's best of 5 seeds is close.
    assert 0 < r["ours"] < 1 and 0 < r["theirs"] < 1
    if r["method"] == "Tucker-2 HOOI":
      assert r["ours"] == pytest.approx(r["theirs"], abs=1e-3)
    else:
      assert r["ours"] <= r["theirs"] + 1e-3


def test_networks_ranks_fit_the_flop_fraction():
  """networks.py's factorized ResNet-18 convs: the largest rank within the
  FLOP fraction, by `jaxfactor.cost`."""
  bench = _load("networks")
  for format in ("tucker", "lowrank", "cp"):
    rank, ours, dense = bench.rank_for_flops(format, 16, 32, 2, 8, 0.25)
    assert ours <= 0.25 * dense
    r = rank[0] if isinstance(rank, tuple) else rank
    limit = jaxfactor.max_rank((3, 3, 16, 32), bench.FORMATS[format])
    bigger = bench._abstract(format, 16, 32, bench._rank(format, r + 1, limit))
    more = jaxfactor.cost(
      bigger, (1, 8, 8, 16), strides=2, implementation="factorized"
    ).flops
    assert more > 0.25 * dense, format


def test_networks_script_times_every_build(tmp_path):
  """networks.py's smoke run: every build of a factorized ResNet stage
  trains and infers (in device loops), with the same parameters."""
  _run(
    "networks.py",
    "--quick",
    "--networks",
    "resnet18_cp",
    "--builds",
    "jaxfactor",
    "flax",
    "torch",
    "--device-loop",
    2,
    "--out",
    tmp_path,
  )
  result = json.loads((tmp_path / "networks_quick.json").read_text())
  rows = {r["build"]: r for r in result["rows"]}
  builds = {"jaxfactor", "flax"}
  if importlib.util.find_spec("torch") is not None:
    builds.add("torch")
  assert set(rows) == builds
  # The same network in every framework: the same trainable parameters.
  assert len({r["params"] for r in rows.values()}) == 1
  for build, r in rows.items():
    assert r["train_ms"]["median"] > 0 and r["infer_ms"]["median"] > 0
    assert r["per_call"] == (1 if build == "torch" else 2)
    assert 0 < r["conv3x3_flop_fraction"] <= 0.25
  assert rows["jaxfactor"]["memory"]["xla_train_mib"] > 0
  table = (tmp_path / "networks_quick.md").read_text()
  # A row per build, and the network's ranks.
  assert table.count("| resnet18_cp |") == len(builds) + 1


def test_cp_stable_script_runs(tmp_path):
  stdout = _run("cp_stable.py", "--quick", "--norm-bound", 2, "--out", tmp_path)
  table = (tmp_path / "cp_stable_quick.md").read_text()
  row = next(line for line in table.splitlines() if line.startswith("| W |"))
  cells = row.strip("| ").split(" | ")
  assert cells[:3] == ["W", "2", "300"] and " | ".join(cells) in stdout
  # Plain ALS's terms have outgrown the bound; the stable ones have not.
  plain, stable = float(cells[4].split()[0]), float(cells[6].split()[0])
  assert plain > 2 > stable
