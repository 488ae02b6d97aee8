"""Factorizing trained models: nnx in place, linen by converting variables."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax import serialization

import jaxfactor
import jaxfactor.linen as jlinen
import jaxfactor.nnx as jnnx
from reference import FORMATS, relative_error


class Net(nnx.Module):
  """Three 3x3 convs (one strided, one circular), a grouped conv, a 1x1 head."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 24, (3, 3), strides=2, rngs=rngs)
    self.conv3 = nnx.Conv(24, 24, (3, 3), padding="CIRCULAR", rngs=rngs)
    self.grouped = nnx.Conv(24, 24, (3, 3), feature_group_count=4, rngs=rngs)
    self.head = nnx.Conv(24, 10, (1, 1), rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.conv3(x))
    x = nnx.relu(self.grouped(x))
    return self.head(x).mean(axis=(1, 2))


X = jax.random.normal(jax.random.key(1), (16, 10, 10, 3), jnp.float32)


@pytest.fixture
def float32_arithmetic():
  """Exact-to-float32 comparisons need float32 arithmetic: on GPUs, JAX's
  default precision runs float32 convs and matmuls in TF32 (errors ~1e-4
  here). No effect on the CPU."""
  with jax.default_matmul_precision("float32"):
    yield

Y = jax.random.randint(jax.random.key(2), (16,), 0, 10)


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def _train_step(model, optimizer, x, y):
  # optax mixes Python scalars and int32 internally (adam's bias correction,
  # integer labels): let it, while jaxfactor itself stays under strict mode.
  with jax.numpy_dtype_promotion("standard"):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
  return loss


@functools.lru_cache(maxsize=None)
def _trained_state():
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  for _ in range(5):
    _train_step(model, optimizer, X, Y)
  return nnx.split(model)


def trained_net():
  """A fresh copy of the same small model, trained for 5 adam steps."""
  graphdef, state = _trained_state()
  return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


FULL_RANK_IS_LARGER = pytest.mark.filterwarnings(
    "ignore:decompose.*more than the dense kernel")


@FULL_RANK_IS_LARGER
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.usefixtures("float32_arithmetic")
def test_full_rank_keeps_the_outputs(name):
  model = trained_net()
  before = model(X)
  # Full rank: exact from the SVD-based starts, no ALS sweeps needed.
  report = jnnx.factorize(model, name, energy=1.0, inputs=X, iterations=0,
                          restarts=0)
  assert relative_error(model(X), before) < 1e-5
  factorized = {"/".join(map(str, l.path)) for l in report.factorized}
  assert factorized == {"conv1", "conv2", "conv3"}
  assert isinstance(model.conv3, jnnx.LAYERS[jaxfactor.ranks.format_class(
      "test", name)])


def test_skipped_layers_are_reported_with_the_reason():
  model = trained_net()
  report = jnnx.factorize(model, "tucker", rank=0.5)
  reasons = {"/".join(map(str, l.path)): l.skipped for l in report.layers}
  assert reasons["grouped"] == "feature_group_count=4 (grouped conv)"
  assert reasons["head"] == "not selected by the filter"
  assert reasons["conv2"] is None
  assert isinstance(model.grouped, nnx.Conv) and isinstance(model.head, nnx.Conv)
  assert "skipped: feature_group_count=4" in str(report)


@pytest.mark.parametrize("name", FORMATS)
def test_lower_rank_is_smaller_and_within_the_reported_error(name):
  model = trained_net()
  kernels = {p: m.kernel[...] for p, m in nnx.iter_modules(model)
             if isinstance(m, nnx.Conv)}
  report = jnnx.factorize(model, name, rank=0.3, inputs=X)
  assert report.factorized
  assert report.params_after < 0.31 * report.params_before
  assert report.flops_after < report.flops_before
  for layer in report.factorized:
    new = model
    for key in layer.path:
      new = getattr(new, key)
    error = float(jaxfactor.relative_error(new.factors, kernels[layer.path]))
    assert abs(error - layer.relative_error) < 1e-6
    assert new.factors.num_params == layer.params_after
  model(X)  # still runs


def test_keeps_bias_geometry_and_dtypes():
  model = trained_net()
  bias = model.conv2.bias[...]
  jnnx.factorize(model, "low_rank", rank=4)
  layer = model.conv2
  np.testing.assert_array_equal(layer.bias[...], bias)
  assert (layer.strides, layer.padding, layer.rank) == (2, "SAME", 4)
  assert model.conv3.padding == "CIRCULAR"
  assert layer.factors.dtype == jnp.float32


def test_fine_tune_after_factorizing():
  model = trained_net()
  jnnx.factorize(model, "tucker", rank=0.25)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  losses = [float(_train_step(model, optimizer, X, Y)) for _ in range(6)]
  assert losses[-1] < losses[0]


def test_checkpoint_of_a_factorized_model():
  model = trained_net()
  jnnx.factorize(model, "cp", rank=0.25)
  saved = serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))
  other = trained_net()
  jnnx.factorize(other, "cp", rank=0.25, key=jax.random.key(7), restarts=0)
  state = nnx.state(other)
  nnx.replace_by_pure_dict(
      state, serialization.from_bytes(nnx.to_pure_dict(state), saved))
  nnx.update(other, state)
  np.testing.assert_array_equal(other(X), model(X))


def test_data_aware_factorize_lowers_the_output_error():
  def output_error(data_aware):
    model = trained_net()
    reference = trained_net()(X)
    jnnx.factorize(model, "low_rank", rank=0.2, inputs=X,
                   data_aware=data_aware)
    return relative_error(model(X), reference)

  assert output_error(True) < output_error(False)


# --- budgets ---------------------------------------------------------------------

def _decaying_model():
  """Layers of different spectral decay: a budget should not be spread
  evenly across them."""
  model = trained_net()
  rng = np.random.default_rng(0)
  for (_, conv), rate in zip(
      [(p, m) for p, m in nnx.iter_modules(model)
       if isinstance(m, nnx.Conv) and m.kernel.shape[0] == 3
       and m.feature_group_count == 1], (0.95, 0.6, 0.85)):
    k, _, c, f = conv.kernel.shape
    u = np.linalg.qr(rng.standard_normal((k * k * c, k * k * c)))[0]
    v = np.linalg.qr(rng.standard_normal((f, f)))[0]
    s = rate ** np.arange(min(k * k * c, f))
    matrix = (u[:, : len(s)] * s) @ v[: len(s)]
    conv.kernel[...] = jnp.asarray(matrix.reshape(conv.kernel.shape),
                                   jnp.float32) * 0.1
  return model


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_budget_is_met_and_beats_uniform_ranks(kind):
  budget = 0.35
  model = _decaying_model()
  report = jnnx.factorize(model, "low_rank",
                          budget=jaxfactor.Budget(**{kind: budget}), inputs=X)
  kept_dense = [l for l in report.layers
                if l.skipped and l.skipped.startswith("kept dense")]
  assert report.factorized
  if kind == "params":
    dense_total = report.params_before + sum(
        int(np.prod(l.kernel_shape)) for l in kept_dense)
    kept = sum(int(np.prod(l.kernel_shape)) for l in kept_dense)
    assert report.params_after + kept <= budget * dense_total
  budget_error = sum(l.relative_error for l in report.factorized)

  # Uniform: the same parameter fraction in every layer, the largest on a
  # grid that meets the same budget.
  uniform_error = None
  for fraction in np.linspace(0.05, 1.0, 20):
    uniform = _decaying_model()
    r = jnnx.factorize(uniform, "low_rank", rank=float(fraction), inputs=X)
    after, before = ((r.params_after, r.params_before) if kind == "params"
                     else (r.flops_after, r.flops_before))
    if after <= budget * before:
      uniform_error = sum(l.relative_error for l in r.factorized)
  assert uniform_error is not None
  assert budget_error < uniform_error


def test_flop_budget_totals():
  model = _decaying_model()
  dense = _decaying_model()
  paths = [p for p, m in nnx.iter_modules(dense) if isinstance(m, nnx.Conv)
           and m.feature_group_count == 1 and m.kernel.shape[0] == 3]
  store = jnnx._record_inputs(dense, paths, X)
  dense_flops = sum(jaxfactor.cost(
      jnnx._get(dense, p).kernel[...], store[p].shape,
      strides=jnnx._get(dense, p).strides,
      padding=jnnx._get(dense, p).padding).flops for p in paths)
  report = jnnx.factorize(model, "tucker", budget=jaxfactor.Budget(flops=0.4),
                          inputs=X)
  kept = sum(jaxfactor.cost(jnnx._get(dense, l.path).kernel[...],
                            store[l.path].shape,
                            strides=jnnx._get(dense, l.path).strides,
                            padding=jnnx._get(dense, l.path).padding).flops
             for l in report.layers if l.skipped and
             l.skipped.startswith("kept dense"))
  assert report.flops_after + kept <= 0.4 * dense_flops


def test_flop_budget_costs_what_the_new_layers_run():
  # Candidate ranks are costed with the new layers' `implementation`.
  # Reconstructed, every factorization costs more than dense: no budget
  # below 1 can be met.
  with pytest.raises(ValueError, match=r"below the cheapest factorization"):
    jnnx.factorize(_decaying_model(), "low_rank",
                   budget=jaxfactor.Budget(flops=0.9), inputs=X,
                   implementation="reconstructed")
  model = _decaying_model()
  report = jnnx.factorize(model, "low_rank",
                          budget=jaxfactor.Budget(flops=0.3), inputs=X,
                          implementation="factorized")
  assert report.factorized
  for l in report.factorized:
    layer = jnnx._get(model, l.path)
    assert layer.implementation == "factorized"
    assert l.flops_after == jaxfactor.cost(
        layer.factors, l.input_shape, strides=layer.strides,
        padding=layer.padding, implementation="factorized").flops
  kept_flops = sum(
      jaxfactor.cost(jnnx._get(model, l.path).kernel[...], l.input_shape,
                     strides=jnnx._get(model, l.path).strides,
                     padding=jnnx._get(model, l.path).padding).flops
      for l in report.layers if l.skipped and l.skipped.startswith("kept"))
  assert report.flops_after + kept_flops <= 0.3 * (report.flops_before
                                                   + kept_flops)


def test_budget_arguments():
  model = trained_net()
  with pytest.raises(ValueError, match=r"factorize: a FLOP budget needs"
                     r" `inputs`"):
    jnnx.factorize(model, "tucker", budget=jaxfactor.Budget(flops=0.5))
  with pytest.raises(ValueError, match=r"factorize: give exactly one of"
                     r" `rank`, `energy` and `budget`, got \['rank',"
                     r" 'energy'\]"):
    jnnx.factorize(model, "tucker", rank=2, energy=0.5)
  with pytest.raises(ValueError, match=r"Budget: give exactly one of `flops`"
                     r" and `params`, a fraction in \(0, 1\], got flops=1.5"):
    jaxfactor.Budget(flops=1.5)
  with pytest.raises(ValueError, match=r"factorize: the budget \(0.001 of the"
                     r" dense total"):
    jnnx.factorize(model, "tucker", budget=jaxfactor.Budget(params=0.001))


def test_a_layer_without_a_fitting_rank_is_skipped_not_raised():
  model = trained_net()
  report = jnnx.factorize(model, "tucker", rank=0.05)
  reasons = {l.path: l.skipped for l in report.layers}
  assert "leaves no rank" in reasons[("conv1",)]
  report = jnnx.factorize(trained_net(), "low_rank", rank=20)
  reasons = {l.path: l.skipped for l in report.layers}
  assert "at most max_rank = 16" in reasons[("conv1",)]  # 3x3x3 -> 16
  assert reasons[("conv2",)] is None


def test_invalid_arguments_raise_rather_than_skip():
  with pytest.raises(ValueError, match=r"factorize: `rank` must be >= 1, got"
                     r" 0"):
    jnnx.factorize(trained_net(), "tucker", rank=0)
  with pytest.raises(ValueError, match=r"factorize: `energy` must be a number"
                     r" in \(0, 1\], got 1.5"):
    jnnx.factorize(trained_net(), "tucker", energy=1.5)
  with pytest.raises(ValueError, match=r"decompose: `iterations` must be a"
                     r" non-negative int"):
    jnnx.factorize(trained_net(), "tucker", rank=2, iterations=-1)


def test_data_aware_uses_dilated_patches():
  """With kernel dilation 2, the whitening must see the taps 2 apart: the
  result equals decompose() given the layer's dilation."""
  model = trained_net()
  conv = nnx.Conv(3, 16, (3, 3), kernel_dilation=2, rngs=nnx.Rngs(5))
  model.conv1 = conv
  kernel = conv.kernel[...]
  jnnx.factorize(model, "low_rank", rank=2, inputs=X, data_aware=True,
                 filter=lambda path, c: path == ("conv1",))
  expected = jaxfactor.decompose(kernel, "low_rank", rank=2, inputs=X,
                                 dilation=2)
  np.testing.assert_allclose(model.conv1.factors.to_dense(),
                             expected.to_dense(), rtol=1e-5, atol=1e-6)
  undilated = jaxfactor.decompose(kernel, "low_rank", rank=2, inputs=X)
  assert not np.allclose(undilated.to_dense(), expected.to_dense(), atol=1e-4)


# --- linen -------------------------------------------------------------------------

class LinenNet(nn.Module):
  """The linen idiom: the conv class is an attribute of the model."""

  conv: type = nn.Conv

  @nn.compact
  def __call__(self, x):
    # Explicit names: linen's automatic ones follow the class name.
    x = nn.relu(self.conv(features=16, kernel_size=(3, 3), name="conv1")(x))
    x = nn.relu(self.conv(features=24, kernel_size=(3, 3), strides=2,
                          name="conv2")(x))
    return nn.Conv(10, (1, 1), name="head")(x).mean(axis=(1, 2))


@FULL_RANK_IS_LARGER
@pytest.mark.parametrize("name,layer", [("tucker", jlinen.TuckerConv),
                                        ("cp", jlinen.CPConv),
                                        ("low_rank", jlinen.LowRankConv)])
@pytest.mark.usefixtures("float32_arithmetic")
def test_linen_factorize_variables(name, layer):
  dense_vars = LinenNet().init(jax.random.key(0), X)
  reference = LinenNet().apply(dense_vars, X)
  # Full rank: per-layer ranks, read back from the params (rank=None).
  full, report = jlinen.factorize_variables(dense_vars, name, energy=1.0,
                                            iterations=0, restarts=0)
  assert [r["path"] for r in report] == [("conv1",), ("conv2",)]
  out = LinenNet(conv=layer).apply(full, X)
  assert relative_error(out, reference) < 1e-5
  # One rank for every layer, declared on the model.
  small, report = jlinen.factorize_variables(dense_vars, name, rank=2)
  model = LinenNet(conv=functools.partial(layer, rank=2))
  assert model.apply(small, X).shape == reference.shape
  assert all(r["params_after"] < r["params_before"] for r in report)
  assert "kernel" in small["params"]["head"]  # 1x1: left dense


def test_linen_factorize_variables_unboxes_partitioned_kernels():
  class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_partitioning(nn.initializers.lecun_normal(),
                                  (None, None, None, "model"))
      return nn.Conv(8, (3, 3), kernel_init=init, name="conv")(x)

  variables = Boxed().init(jax.random.key(0), X)
  new, report = jlinen.factorize_variables(variables, "low_rank", rank=2)
  assert [r["path"] for r in report] == [("conv",)]
  assert set(new["params"]["conv"]) == {"spatial", "pointwise", "bias"}


def test_linen_model_aware_selection_skips_non_convs():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), name="conv")(x)
      x = nn.Conv(8, (3, 3), feature_group_count=2, name="grouped")(x)
      x = nn.DenseGeneral((2, 4), name="dense_general")(x)  # a 3-D kernel
      return x

  variables = Mixed().init(jax.random.key(0), X)
  new, report = jlinen.factorize_variables(variables, "low_rank", rank=2,
                                           model=Mixed(), inputs=X)
  by_path = {r["path"]: r for r in report}
  assert "rank" in by_path[("conv",)]
  assert by_path[("grouped",)]["skipped"] == "feature_group_count=2"
  assert by_path[("dense_general",)]["skipped"] == "not an nn.Conv"
  assert "kernel" in new["params"]["dense_general"]
  assert "kernel" in new["params"]["grouped"]


def test_linen_layers_accept_flax_kernel_dilation():
  layer = jlinen.LowRankConv(features=4, kernel_size=(3, 3), rank=2,
                             kernel_dilation=2)
  variables = layer.init(jax.random.key(0), X)
  fmt = layer.factors(variables["params"])
  expected = (jaxfactor.conv(X, fmt, dilation=2)
              + variables["params"]["bias"].reshape(1, 1, 1, -1))
  np.testing.assert_allclose(layer.apply(variables, X), expected, rtol=1e-6)


def test_factorize_leaves_model_state_alone_and_keeps_bias_metadata():
  class WithNorm(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs,
                           bias_metadata={"note": "kept"})
      self.norm = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.conv(x))

  model = WithNorm(nnx.Rngs(0))
  mean = model.norm.mean[...]
  jnnx.factorize(model, "low_rank", rank=2, inputs=X)
  np.testing.assert_array_equal(model.norm.mean[...], mean)
  assert model.conv.bias.get_metadata().get("note") == "kept"
  with pytest.raises(TypeError, match=r"factorize: `model` is a bare"
                     r" nnx.Conv"):
    jnnx.factorize(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), "cp", rank=2)


def test_stacked_vmap_convs_are_skipped():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(key))

  class Stack(nnx.Module):
    def __init__(self):
      self.convs = make(jax.random.split(jax.random.key(0), 4))

  report = jnnx.factorize(Stack(), "tucker", rank=2)
  assert report.layers[0].skipped.startswith("kernel of shape (4, 3, 3, 8, 8)")
