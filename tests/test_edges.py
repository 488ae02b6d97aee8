"""The edges: serving with symbolic shapes, checkpoints, non-finite values,
scale, and arguments that must take effect or raise."""

import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import export

import jaxfactor
import jaxfactor.linen
import jaxfactor.nnx

FORMATS = {
  "low_rank": 3,
  "tucker": (2, 3),
  "cp": 4,
  "spatially_separable": 3,
  "depthwise_separable": 2,
  "tensor_train": (3, 4),
}


def _kernel(shape=(3, 3, 4, 6), seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


# --- serving: jax.export with symbolic shapes ---------------------------------


def _nnx_layers():
  rngs = nnx.Rngs(0)
  return [
    jaxfactor.nnx.LowRankConv(4, 6, (3, 3), rank=2, rngs=rngs),
    jaxfactor.nnx.TuckerConv(4, 6, (3, 3), 2, rank=(2, 3), rngs=rngs),
    jaxfactor.nnx.CPConv(4, 6, (3, 3), rank=3, padding="CIRCULAR", rngs=rngs),
    jaxfactor.nnx.SpatiallySeparableConv(
      4, 6, (3, 3), rank=3, padding="REFLECT", rngs=rngs
    ),
    jaxfactor.nnx.DepthwiseSeparableConv(
      4, 6, (3, 3), 2, kernel_dilation=2, rngs=rngs
    ),
    jaxfactor.nnx.DepthwiseConv(4, (3, 3), 2, channel_multiplier=2, rngs=rngs),
    jaxfactor.nnx.PointwiseConv(4, 6, rngs=rngs),
    jaxfactor.nnx.TensorTrainConv(
      4, 6, (3, 3), (1, 2), rank=(3, 4), padding="CIRCULAR", rngs=rngs
    ),
  ]


@pytest.mark.parametrize("index", range(8))
def test_layers_export_with_symbolic_batch_height_width(index):
  layer = _nnx_layers()[index]
  x = jax.random.normal(jax.random.key(1), (3, 11, 12, 4), jnp.float32)
  expected = layer(x)
  b, h, w = export.symbolic_shape("b, h, w")
  exported = export.export(jax.jit(lambda x: layer(x)))(
    jax.ShapeDtypeStruct((b, h, w, 4), jnp.float32)
  )
  restored = export.deserialize(exported.serialize())
  np.testing.assert_allclose(restored.call(x), expected, rtol=1e-5, atol=1e-5)
  # Another batch and size through the same exported program.
  x2 = jax.random.normal(jax.random.key(2), (1, 8, 9, 4), jnp.float32)
  np.testing.assert_allclose(restored.call(x2), layer(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_conv_exports_with_a_symbolic_batch_and_format_arguments(name):
  factors = jaxfactor.decompose(_kernel(), name, rank=FORMATS[name])
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4), jnp.float32)
  (b,) = export.symbolic_shape("b")
  fn = jax.jit(lambda x, f: jaxfactor.conv(x, f, strides=2))
  exported = export.export(fn)(
    jax.ShapeDtypeStruct((b, 9, 9, 4), jnp.float32), factors
  )
  restored = export.deserialize(exported.serialize())
  np.testing.assert_allclose(
    restored.call(x, factors), fn(x, factors), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize(
  "name,implementation,geometry",
  [
    ("tucker", "factorized", dict(padding="SAME", strides=2)),
    ("cp", "auto", dict(padding="VALID", dilation=(2, 1))),
    ("low_rank", "reconstructed", dict(padding=((2, 0), (1, 3)), strides=3)),
    ("depthwise_separable", "factorized", dict(padding="REFLECT")),
    ("spatially_separable", "factorized", dict(padding="CIRCULAR")),
    ("tensor_train", "factorized", dict(padding="SAME", strides=(2, 1))),
    ("dense", "auto", dict(padding="SAME_LOWER", strides=(1, 2))),
  ],
)
def test_cost_counts_symbolic_batch_and_spatial_sizes(
  name, implementation, geometry
):
  """The FLOPs of a symbolic `input_shape` are an expression that equals the
  count for each concrete shape: evaluated by an exported program (a
  symbolic dimension becomes a value there) at several sizes."""
  kernel = _kernel()
  if name != "dense":
    kernel = jaxfactor.decompose(kernel, name, rank=FORMATS[name])

  def flops(x, kernel):
    count = jaxfactor.cost(
      kernel, x.shape, implementation=implementation, **geometry
    ).flops
    return jnp.asarray(count, jnp.int64)

  b, h, w = export.symbolic_shape("b, h, w")
  exported = export.export(jax.jit(flops))(
    jax.ShapeDtypeStruct((b, h, w, 4), jnp.float32), kernel
  )
  # Without concrete sizes "auto" runs a format factorized (as `conv` does).
  concrete = "factorized" if implementation == "auto" else implementation
  for shape in [(1, 7, 7, 4), (3, 10, 9, 4), (2, 16, 5, 4)]:
    expected = jaxfactor.cost(
      kernel, shape, implementation=concrete, **geometry
    ).flops
    got = exported.call(np.zeros(shape, np.float32), kernel)
    assert int(got) == expected, shape


def test_cost_refuses_a_symbolic_channel_size():
  (c,) = export.symbolic_shape("c")
  with pytest.raises(
    ValueError,
    match=r"cost: the channel size of `input_shape` must be static",
  ):
    jaxfactor.cost(_kernel(), (2, 10, 10, c))


# --- checkpoints without decomposition ----------------------------------------


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)

  def __call__(self, x):
    return self.conv2(nnx.relu(self.conv1(x)))


def test_orbax_restores_a_factorized_nnx_model_into_an_abstract_one(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3), jnp.float32)
  model = _Net(nnx.Rngs(0))
  report = jaxfactor.nnx.factorize(model, "tucker", rank=(2, 3))
  expected = model(x)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", nnx.state(model))
  checkpointer.wait_until_finished()
  ranks = json.loads(json.dumps(report.ranks))  # as saved beside it

  abstract = nnx.eval_shape(lambda: _Net(nnx.Rngs(0)))
  jaxfactor.nnx.restore_structure(abstract, "tucker", ranks)
  graphdef, abstract_state = nnx.split(abstract)
  restored = nnx.merge(
    graphdef, checkpointer.restore(tmp_path / "state", abstract_state)
  )
  assert isinstance(restored.conv2, jaxfactor.nnx.TuckerConv)
  np.testing.assert_array_equal(restored(x), expected)


def test_restore_structure_on_a_concrete_model_decomposes_nothing():
  model = _Net(nnx.Rngs(0))
  jaxfactor.nnx.restore_structure(model, "cp", {"conv1": 5})
  assert isinstance(model.conv1, jaxfactor.nnx.CPConv)
  assert model.conv1.rank == 5
  assert all(not np.any(a) for a in jax.tree.leaves(model.conv1.factors))
  assert isinstance(model.conv2, nnx.Conv)
  with pytest.raises(
    ValueError,
    match=r"restore_structure: `ranks` names"
    r" \['head'\], which are not nnx.Conv layers",
  ):
    jaxfactor.nnx.restore_structure(model, "cp", {"head": 2})


def test_restore_structure_rebuilds_a_tensor_train_from_saved_ranks():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3), jnp.float32)
  model = _Net(nnx.Rngs(0))
  report = jaxfactor.nnx.factorize(model, "tensor_train", rank=(3, 4))
  ranks = json.loads(json.dumps(report.ranks))  # tuples saved as lists
  fresh = _Net(nnx.Rngs(1))
  jaxfactor.nnx.restore_structure(fresh, "tensor_train", ranks)
  assert isinstance(fresh.conv2, jaxfactor.nnx.TensorTrainConv)
  assert fresh.conv2.factors.ranks == model.conv2.factors.ranks == (3, 4)
  shapes = [jax.tree.map(jnp.shape, nnx.state(m)) for m in (fresh, model)]
  assert shapes[0] == shapes[1]
  nnx.update(fresh, nnx.state(model))
  np.testing.assert_array_equal(fresh(x), model(x))


def test_factorize_on_an_abstract_model_says_what_to_use():
  abstract = nnx.eval_shape(lambda: _Net(nnx.Rngs(0)))
  with pytest.raises(ValueError, match="use jaxfactor.nnx.restore_structure"):
    jaxfactor.nnx.factorize(abstract, "tucker", rank=2)


class _LinenNet(nn.Module):
  conv: type = nn.Conv

  @nn.compact
  def __call__(self, x):
    return self.conv(features=8, kernel_size=(3, 3), name="conv")(x)


def test_orbax_restores_factorized_linen_variables(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4), jnp.float32)
  dense = _LinenNet().init(jax.random.key(0), x)
  variables, report = jaxfactor.linen.factorize_variables(
    dense, "tucker", rank=(2, 4), model=_LinenNet(), inputs=x
  )
  factorized = _LinenNet(conv=jaxfactor.linen.TuckerConv)
  expected = factorized.apply(variables, x)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "variables", variables)
  checkpointer.wait_until_finished()

  abstract = jax.eval_shape(_LinenNet().init, jax.random.key(0), x)
  target = jaxfactor.linen.restore_structure(
    abstract, "tucker", json.loads(json.dumps(report.ranks))
  )
  restored = checkpointer.restore(tmp_path / "variables", target)
  np.testing.assert_array_equal(factorized.apply(restored, x), expected)


def test_from_factors_builds_the_layer_of_a_format_value():
  factors = jaxfactor.decompose(_kernel(), "low_rank", rank=3)
  bias = jnp.arange(6.0, dtype=jnp.float32)
  layer = jaxfactor.nnx.from_factors(factors, 2, bias=bias, padding="VALID")
  assert isinstance(layer, jaxfactor.nnx.LowRankConv)
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4), jnp.float32)
  expected = (
    jaxfactor.conv(x, factors, strides=2, padding="VALID")
    + bias[None, None, None]
  )
  np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(
    ValueError,
    match=r"from_factors: `bias` must have"
    r" shape \(6,\)",
  ):
    jaxfactor.nnx.from_factors(factors, bias=jnp.zeros(5))


# --- non-finite values --------------------------------------------------------


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_decompose_under_jit_gives_nan_factors_for_non_finite_kernels(
  name, bad
):
  kernel = _kernel().at[1, 2, 0, 3].set(bad)
  factors = jax.jit(
    lambda k: jaxfactor.decompose(k, name, rank=FORMATS[name], iterations=3)
  )(kernel)
  assert all(
    bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree.leaves(factors)
  )
  with pytest.raises(
    ValueError, match="decompose: `kernel` .* has non-finite values"
  ):
    jaxfactor.decompose(kernel, name, rank=FORMATS[name])


def test_data_aware_decomposition_rejects_what_would_give_nan_factors():
  kernel = _kernel()
  few = jax.random.normal(
    jax.random.key(1), (1, 3, 3, 4), jnp.float32
  )  # 1 patch < 36
  with pytest.raises(
    ValueError,
    match=r"decompose: the covariance of"
    r" `inputs` \(36 x 36, from 1 samples\) is singular",
  ):
    jaxfactor.decompose(kernel, "low_rank", rank=2, inputs=few, damping=0)
  # Under jit the same call gives NaN factors, never silently wrong ones.
  factors = jax.jit(
    lambda k, x: jaxfactor.decompose(k, "low_rank", rank=2, inputs=x, damping=0)
  )(kernel, few)
  assert all(bool(jnp.all(jnp.isnan(a))) for a in jax.tree.leaves(factors))
  # The default damping makes it well posed.
  factors = jaxfactor.decompose(kernel, "low_rank", rank=2, inputs=few)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(factors))
  inputs = jax.random.normal(jax.random.key(2), (4, 6, 6, 4), jnp.float32)
  for bad in (np.nan, np.inf):
    with pytest.raises(
      ValueError,
      match=r"decompose: `inputs` \(shape"
      r" \(4, 6, 6, 4\)\) has non-finite values",
    ):
      jaxfactor.decompose(
        kernel, "tucker", rank=2, inputs=inputs.at[0, 1, 2, 3].set(bad)
      )


@pytest.mark.parametrize("lowering", ["native", "shift_add", "grouped"])
def test_a_non_finite_depthwise_weight_reaches_every_output_that_reads_it(
  lowering,
):
  """The documented contract: every output that reads the weight with real
  input is non-finite; on CPU, products with zero padding are skipped, so
  outputs whose every read of it lands in padding stay finite."""
  from jaxfactor import _lowering  # pylint: disable=import-outside-toplevel

  x = jnp.ones((1, 5, 5, 2), jnp.float32)
  kernel = jnp.zeros((3, 3, 1, 2), jnp.float32).at[0, 0, 0, 0].set(jnp.inf)
  with _lowering.forced(depthwise=lowering):
    y = jaxfactor.depthwise_conv(x, kernel)
  # Tap (0, 0) reads input (i - 1, j - 1): real input for i, j >= 1.
  assert bool(jnp.all(jnp.isinf(y[0, 1:, 1:, 0])))
  assert bool(jnp.all(jnp.isfinite(y[..., 1])))
  if lowering != "grouped":  # XLA's own convolution: not specified
    assert bool(jnp.all(y[0, 0, :, 0] == 0))


# --- scale --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_decompose_is_scale_invariant_in_float32(name):
  kernel = _kernel()
  base = float(
    jaxfactor.relative_error(
      jaxfactor.decompose(kernel, name, rank=FORMATS[name]), kernel
    )
  )
  for scale in (1e20, 1e-20):
    scaled = kernel * scale
    factors = jaxfactor.decompose(scaled, name, rank=FORMATS[name])
    error = float(jaxfactor.relative_error(factors, scaled))
    assert error == pytest.approx(base, rel=1e-3, abs=1e-5), scale


# --- arguments that take effect or raise --------------------------------------


def test_a_long_cp_decomposition_warns_first_at_the_callers_line(monkeypatch):
  from jaxfactor import _decompose  # pylint: disable=import-outside-toplevel

  class Started(Exception):
    pass

  def started(*args):
    raise Started

  monkeypatch.setattr(_decompose, "_cp", started)  # the warning comes first
  warnings.filterwarnings("ignore", message=".*larger than what it replaces")
  with (
    pytest.warns(
      RuntimeWarning,
      match=r"decompose: CP of rank 576 for a"
      r" kernel of shape \(3, 3, 64, 64\) is a long"
      r" decomposition: ~3.9e\+12 FLOPs \(100 ALS sweeps from"
      r" 5 starts\); the rank exceeds the kernel's largest"
      r" mode \(64\)",
    ) as record,
    pytest.raises(Started),
  ):
    jaxfactor.decompose(jnp.ones((3, 3, 64, 64), jnp.float32), "cp", rank=576)
  assert (
    pathlib.Path(record[0].filename).resolve()
    == pathlib.Path(__file__).resolve()
  )
  # A short one is silent.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(Started):
      jaxfactor.decompose(jnp.ones((3, 3, 64, 64), jnp.float32), "cp", rank=73)


def test_decompose_checks_its_key():
  with pytest.raises(
    TypeError,
    match=r"decompose: `key` must be a PRNG key"
    r" \(e.g. jax.random.key\(0\)\), got int",
  ):
    jaxfactor.decompose(_kernel(), "cp", rank=2, key=3)
  keys = jax.random.split(jax.random.key(0), 2)
  with pytest.raises(
    ValueError,
    match=r"decompose: `key` must be a single"
    r" PRNG key",
  ):
    jaxfactor.decompose(_kernel(), "cp", rank=2, key=keys)
  jaxfactor.decompose(
    _kernel(), "cp", rank=2, key=jax.random.PRNGKey(1), iterations=1
  )


def test_a_missing_rank_names_the_public_layer():
  with pytest.raises(TypeError, match="LowRankConv.__init__"):
    jaxfactor.nnx.LowRankConv(4, 6, (3, 3), rngs=nnx.Rngs(0))  # pylint: disable=missing-kwoa


def test_factorize_keeps_a_layer_dense_rather_than_make_it_larger():
  model = _Net(nnx.Rngs(0))
  x = jnp.ones((1, 6, 6, 3), jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning: the report says it
    report = jaxfactor.nnx.factorize(model, "low_rank", energy=1.0, inputs=x)
  (conv1, conv2) = report.layers
  # conv1 (27 x 8): full rank 8 costs 27*8 + 8*8 > 27*8 parameters.
  assert conv1.skipped.startswith(
    "kept dense: rank 8 has 280 parameters, more than the dense kernel's 216"
  )
  assert isinstance(model.conv1, nnx.Conv)
  assert conv2.skipped is not None and isinstance(model.conv2, nnx.Conv)
  model = _Net(nnx.Rngs(0))
  report = jaxfactor.nnx.factorize(
    model, "low_rank", energy=1.0, allow_larger=True
  )
  assert [layer.skipped for layer in report.layers] == [None, None]
  assert isinstance(model.conv1, jaxfactor.nnx.LowRankConv)


def test_factorize_progress_prints_a_line_per_layer(capsys):
  jaxfactor.nnx.factorize(_Net(nnx.Rngs(0)), "tucker", rank=2, progress=True)
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 2
  assert lines[0].startswith("factorize: 1/2 conv1 (3, 3, 3, 8): rank (2, 2)")


def test_an_undamped_covariance_with_a_dead_channel_is_singular():
  kernel = _kernel()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4), jnp.float32)
  x = x.at[..., 0].set(0.0)  # factors, with a vanishing pivot
  with pytest.raises(
    ValueError,
    match=r"decompose: the covariance of"
    r" `inputs` \(4 x 4, from 128 samples\) is singular",
  ):
    jaxfactor.decompose(kernel, "tucker", rank=2, inputs=x, damping=0)
  factors = jaxfactor.decompose(kernel, "tucker", rank=2, inputs=x)
  assert float(jaxfactor.relative_error(factors, kernel)) < 1


def test_data_aware_factorize_skips_a_layer_without_patches():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.down = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
      self.dilated = nnx.Conv(8, 8, (3, 3), kernel_dilation=2, rngs=rngs)

    def __call__(self, x):
      return self.dilated(self.down(x))

  model = Net(nnx.Rngs(0))
  x = jnp.ones((2, 8, 8, 3), jnp.float32)
  report = jaxfactor.nnx.factorize(
    model, "low_rank", rank=2, inputs=x, data_aware=True
  )
  layers = {layer.path: layer for layer in report.layers}
  down, dilated = layers[("down",)], layers[("dilated",)]
  assert down.skipped is None
  assert dilated.skipped == (
    "data-aware: its input (4, 4) is smaller than the dilated window"
    " (5, 5), so it has no patches to decompose against"
  )
  assert isinstance(model.dilated, nnx.Conv)
