"""Factorizing trained models: nnx in place, linen by converting variables.

The oracle for a factorized model is the dense model whose kernels are the
factors' `to_dense()`: it must compute the same outputs, whatever the rank,
which checks that every layer kept its geometry and bias.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax
from reference import FORMATS
from reference import relative_error

import jaxfactor
import jaxfactor.linen as jlinen
import jaxfactor.nnx as jnnx
from jaxfactor import _ranks

X = jax.random.normal(jax.random.key(1), (4, 8, 8, 3), jnp.float32)
Y = jax.random.randint(jax.random.key(2), (4,), 0, 10)
# Kernel spectra decaying at different rates, as trained layers' do: a
# budget should not be spread evenly across them.
DECAY = {"conv1": 0.9, "conv2": 0.5, "conv3": 0.75, "line": 0.8}
# Few ALS sweeps: these tests are about the surgery, not CP's fit.
CP_KWARGS = dict(iterations=2, restarts=0)
NNX_REASONS = {
  "grouped": (
    "depthwise conv (feature_group_count=8, one input channel per group):"
    " no channels to factorize"
  ),
  "upsample": "input_dilation=2 (transposed conv)",
  "masked": "masked kernel",
  "custom": "custom conv_general_dilated",
  "head": "not selected by the filter",
}


def decaying(shape, rate, seed):
  """A kernel whose `(k*C) x F` matrix has singular values `rate**i`."""
  rng = np.random.default_rng(seed)
  *window, c, f = shape
  rows = int(np.prod(window)) * c
  u = np.linalg.qr(rng.standard_normal((rows, rows)))[0]
  v = np.linalg.qr(rng.standard_normal((f, f)))[0]
  s = rate ** np.arange(min(rows, f))
  matrix = (u[:, : len(s)] * s) @ v[: len(s)]
  return jnp.asarray(0.3 * matrix.reshape(shape), jnp.float32)


class Net(nnx.Module):
  """Convs of every kind factorize meets, in one small model."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), kernel_dilation=2, rngs=rngs)
    self.conv3 = nnx.Conv(
      8, 8, (3, 3), strides=2, padding="CIRCULAR", rngs=rngs
    )
    # Grouped convs are factorized group by group (test_grouped_layers.py);
    # a depthwise one is left as it is.
    self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
    self.masked = nnx.Conv(
      8, 8, (3, 3), rngs=rngs, mask=jnp.ones((3, 3, 8, 8), jnp.float32)
    )
    self.custom = nnx.Conv(
      8,
      8,
      (3, 3),
      rngs=rngs,
      conv_general_dilated=functools.partial(lax.conv_general_dilated),
    )
    self.line = nnx.Conv(8, 8, 3, rngs=rngs)  # 1-D, along flattened pixels
    self.upsample = nnx.Conv(
      8, 8, (3, 3), input_dilation=2, padding=((1, 1), (1, 1)), rngs=rngs
    )
    self.head = nnx.Conv(8, 10, (1, 1), rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.conv3(x))
    x = self.custom(self.masked(self.grouped(x)))
    b, h, w, c = x.shape
    x = self.line(x.reshape(b, h * w, c)).reshape(b, h, w, c)
    return self.head(self.upsample(x)).mean(axis=(1, 2))


@functools.cache
def _state():
  model = Net(nnx.Rngs(0))
  for seed, (name, rate) in enumerate(DECAY.items()):
    conv = getattr(model, name)
    conv.kernel[...] = decaying(conv.kernel.shape, rate, seed)
    # Biases as trained ones, not Flax's zeros: the surgery must keep them.
    conv.bias[...] = jax.random.normal(
      jax.random.key(seed), conv.bias.shape, jnp.float32
    )
  return nnx.split(model)


def net():
  """A fresh copy of the same model."""
  graphdef, state = _state()
  return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def dense_twin(model, report):
  """The dense model computing what `model` (factorized) should: each
  factorized layer's kernel replaced by its factors' `to_dense()`."""
  twin = net()
  for layer in report.factorized:
    (name,) = layer.path
    getattr(twin, name).kernel[...] = getattr(model, name).factors.to_dense()
  return twin


forward = nnx.jit(lambda model, x: model(x))


def energy_rank(kernel, energy):
  """The smallest LowRank rank keeping `energy` of the squared spectrum."""
  matrix = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
  squares = np.linalg.svd(matrix, compute_uv=False) ** 2
  return int(np.argmax(np.cumsum(squares) / squares.sum() >= energy)) + 1


def by_name(report):
  return {"/".join(map(str, layer.path)): layer for layer in report.layers}


@pytest.fixture
def float32_arithmetic():
  """Exact-to-float32 comparisons need float32 arithmetic: on GPUs, JAX's
  default precision runs float32 convs and matmuls in TF32."""
  with jax.default_matmul_precision("float32"):
    yield


# --- nnx ----------------------------------------------------------------------


@pytest.mark.usefixtures("float32_arithmetic")
@pytest.mark.parametrize("name", FORMATS)
def test_factorized_model_computes_its_dense_twin(name):
  model = net()
  report = jnnx.factorize(model, name, rank=2, **CP_KWARGS)
  assert isinstance(report, jaxfactor.FactorizationReport)
  assert report.format == type(model.conv1.factors).__name__
  cls = _ranks.format_class("test", name)
  expected = {"conv1", "conv2", "conv3", "line"}
  reasons = {path: layer.skipped for path, layer in by_name(report).items()}
  assert reasons == {**dict.fromkeys(expected), **NNX_REASONS} | (
    {"line": "1-D kernel: nothing to separate"}
    if name == "spatially_separable"
    else {}
  )
  for path, layer in by_name(report).items():
    module = getattr(model, path)
    if layer.skipped is None:
      assert type(module.factors) is cls and layer.rank == _ranks.rank_of(
        module.factors
      )
    else:
      assert isinstance(module, nnx.Conv)
  assert (
    relative_error(forward(model, X), forward(dense_twin(model, report), X))
    < 1e-5
  )


def test_layers_keep_bias_geometry_dtypes_and_model_state():
  class WithNorm(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(
        3,
        8,
        (3, 3),
        strides=(2, 1),
        padding="REFLECT",
        kernel_dilation=(1, 2),
        rngs=rngs,
        bias_metadata={"note": "kept"},
      )
      self.norm = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.conv(x))

  model = WithNorm(nnx.Rngs(0))
  bias, mean = model.conv.bias, model.norm.mean[...]
  jnnx.factorize(model, "low_rank", rank=2, inputs=X)
  layer = model.conv
  assert layer.bias is bias and layer.bias.get_metadata()["note"] == "kept"
  assert (layer.strides, layer.padding, layer.kernel_dilation) == (
    (2, 1),
    "REFLECT",
    (1, 2),
  )
  assert layer.factors.dtype == jnp.float32 and layer.rank == 2
  # The input was recorded on a copy: BatchNorm's statistics are untouched.
  np.testing.assert_array_equal(model.norm.mean[...], mean)


def test_rank_as_a_budget_energy_and_filter():
  model = net()
  fraction = 0.3
  report = jnnx.factorize(
    model, "tucker", rank=jaxfactor.Budget(params=fraction)
  )
  assert len(report.factorized) == 4
  for path, layer in by_name(report).items():
    if layer.skipped is None:
      kernel = getattr(net(), path).kernel[...]
      expected = jax.eval_shape(
        lambda k: jaxfactor.decompose(
          k, "tucker", rank=jaxfactor.Budget(params=fraction)
        ),
        kernel,
      )
      assert layer.rank == expected.ranks
      assert layer.params_after <= fraction * layer.params_before
  assert report.flops_before is None and report.flops_after is None
  report = jnnx.factorize(net(), "low_rank", energy=0.9)
  assert report.factorized
  for path, layer in by_name(report).items():
    if layer.skipped is None:
      kernel = getattr(net(), path).kernel[...]
      assert layer.rank == energy_rank(kernel, 0.9)
  report = jnnx.factorize(
    net(), "low_rank", rank=2, filter=lambda path, conv: path == ("conv2",)
  )
  reasons = {path: layer.skipped for path, layer in by_name(report).items()}
  assert reasons["conv2"] is None
  assert reasons["conv1"] == reasons["conv3"] == "not selected by the filter"


def _kept_dense(model, report, kind):
  """Params or FLOPs of the layers a budget left dense."""
  total = 0
  for layer in report.layers:
    if layer.skipped and layer.skipped.startswith("kept dense"):
      conv = getattr(model, layer.path[0])
      total += (
        int(np.prod(layer.kernel_shape))
        if kind == "params"
        else jaxfactor.cost(
          conv.kernel[...],
          layer.input_shape,
          strides=conv.strides,
          padding=conv.padding,
          dilation=conv.kernel_dilation,
        ).flops
      )
  return total


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_is_met(kind):
  fraction = 0.35
  model = net()
  report = jnnx.factorize(
    model, "low_rank", budget=jaxfactor.Budget(**{kind: fraction}), inputs=X
  )
  assert report.factorized
  kept = _kept_dense(model, report, kind)
  after, before = (
    (report.params_after, report.params_before)
    if kind == "params"
    else (report.flops_after, report.flops_before)
  )
  assert after + kept <= fraction * (before + kept)
  # Not spread evenly: the fast-decaying conv2 gets the lowest rank.
  ranks = report.ranks
  assert ranks.get("conv2", 0) < max(ranks.values())


def test_params_budget_beats_one_fraction_for_every_layer():
  fraction = 0.35
  budget = jnnx.factorize(
    net(), "low_rank", budget=jaxfactor.Budget(params=fraction)
  )
  uniform = jnnx.factorize(
    net(), "low_rank", rank=jaxfactor.Budget(params=fraction)
  )
  assert budget.params_after <= fraction * budget.params_before + 1
  assert uniform.params_after <= fraction * uniform.params_before
  assert sum(l.relative_error for l in budget.factorized) < sum(
    l.relative_error for l in uniform.factorized
  )


def test_data_aware_lowers_the_layer_output_error_on_its_dilated_input():
  """Each layer is decomposed against its own recorded input: with kernel
  dilation 2, the whitening sees the taps 2 apart."""
  conv2_input = nnx.relu(net().conv1(X))
  kernel = net().conv2.kernel[...]

  def factorized_conv2(data_aware):
    model = net()
    jnnx.factorize(
      model,
      "low_rank",
      rank=2,
      inputs=X,
      data_aware=data_aware,
      filter=lambda path, conv: path == ("conv2",),
    )
    return model.conv2.factors

  aware = factorized_conv2(True)
  expected = jaxfactor.decompose(
    kernel, "low_rank", rank=2, inputs=conv2_input, dilation=2
  )
  np.testing.assert_allclose(
    aware.to_dense(), expected.to_dense(), rtol=1e-5, atol=1e-6
  )
  reference = jaxfactor.conv(conv2_input, kernel, padding="VALID", dilation=2)

  def output_error(factors):
    return relative_error(
      jaxfactor.conv(conv2_input, factors, padding="VALID", dilation=2),
      reference,
    )

  assert output_error(aware) < output_error(factorized_conv2(False))


@pytest.mark.parametrize(
  "implementation", ["factorized", "reconstructed", "auto"]
)
def test_implementation_of_the_new_layers_and_their_flops(implementation):
  model = net()
  report = jnnx.factorize(
    model,
    "tucker",
    rank=2,
    inputs=X,
    implementation=implementation,
    allow_larger=True,
    filter=lambda path, conv: path == ("conv3",),
  )
  (layer,) = report.factorized
  conv3 = model.conv3
  assert conv3.implementation == implementation
  assert (
    layer.flops_after
    == jaxfactor.cost(
      conv3.factors,
      layer.input_shape,
      strides=2,
      padding="CIRCULAR",
      implementation=implementation,
    ).flops
  )
  assert (
    layer.flops_before
    == jaxfactor.cost(
      net().conv3.kernel[...], layer.input_shape, strides=2, padding="CIRCULAR"
    ).flops
  )


def test_a_larger_factorization_stays_dense_unless_allowed():
  report = jnnx.factorize(
    net(), "low_rank", rank=8, filter=lambda path, conv: path == ("conv1",)
  )
  assert by_name(report)["conv1"].skipped == (
    "kept dense: rank 8 has 280 parameters, more than the dense kernel's"
    " 216 (pass allow_larger=True to factorize it anyway)"
  )
  model = net()
  report = jnnx.factorize(
    model,
    "low_rank",
    rank=8,
    allow_larger=True,
    filter=lambda path, conv: path == ("conv1",),
  )
  assert report.ranks == {"conv1": 8}
  assert isinstance(model.conv1, jnnx.LowRankConv)


def test_a_rank_a_layer_cannot_have_skips_it():
  report = jnnx.factorize(net(), "low_rank", rank=12)
  reasons = {path: layer.skipped for path, layer in by_name(report).items()}
  # conv1's (3*3*3) x 8 matrix has rank at most 8; the 8 -> 8 convs, 72.
  assert reasons["conv1"].startswith(
    "factorize: `rank` 12 is out of range for LowRank"
  )
  assert "at most max_rank = 8" in reasons["conv1"]


def test_report_totals_ranks_and_table():
  report = jnnx.factorize(net(), "low_rank", rank=3, inputs=X)
  factorized = report.factorized
  assert [l.path for l in factorized] == [
    ("conv1",),
    ("conv2",),
    ("conv3",),
    ("line",),
  ]
  assert report.params_before == sum(l.params_before for l in factorized)
  assert report.params_after == sum(l.params_after for l in factorized)
  assert report.flops_before == sum(l.flops_before for l in factorized)
  assert report.flops_after == sum(l.flops_after for l in factorized)
  assert report.params_before == 9 * 3 * 8 + 2 * 9 * 8 * 8 + 3 * 8 * 8
  assert report.params_after == sum(
    k * c * 3 + 3 * 8 for k, c in ((9, 3), (9, 8), (9, 8), (3, 8))
  )
  assert report.ranks == {"conv1": 3, "conv2": 3, "conv3": 3, "line": 3}
  lines = str(report).splitlines()
  assert lines[0].split() == [
    "layer",
    "kernel",
    "rank",
    "params",
    "MFLOPs",
    "rel.err",
  ]
  assert len(lines) == 1 + len(report.layers)
  conv2 = by_name(report)["conv2"]
  row = next(line for line in lines if line.startswith("conv2 "))
  assert f"{conv2.params_before}->{conv2.params_after}" in row
  assert f"{conv2.relative_error:.4f}" in row
  assert any(
    line.startswith("grouped ")
    and line.endswith(f"skipped: {NNX_REASONS['grouped']}")
    for line in lines
  )


def test_the_factorized_model_trains():
  model = net()
  jnnx.factorize(model, "tucker", rank=2)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  def loss(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(X), Y).mean()

  before = float(nnx.jit(loss)(model))
  grads = nnx.jit(nnx.grad(loss))(model)
  core = grads.conv2.core[...]
  assert bool(jnp.all(jnp.isfinite(core))) and bool(jnp.any(core != 0))
  with jax.numpy_dtype_promotion("standard"):  # optax's scalars
    optimizer.update(model, grads)
  assert float(nnx.jit(loss)(model)) < before


def test_stacked_vmap_convs_are_skipped():
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(key))

  class Stack(nnx.Module):
    def __init__(self):
      self.convs = make(jax.random.split(jax.random.key(0), 4))

  report = jnnx.factorize(Stack(), "tucker", rank=2)
  assert report.layers[0].skipped == (
    "kernel of shape (4, 3, 3, 8, 8) for a 2-D window (stacked by"
    " nnx.vmap/scan?)"
  )


# --- linen --------------------------------------------------------------------


class LinenNet(nn.Module):
  """The linen idiom: the conv class is an attribute of the model."""

  conv: type = nn.Conv
  grouped: bool = True

  @nn.compact
  def __call__(self, x):
    # Explicit names: linen's automatic ones follow the class name.
    x = nn.relu(self.conv(features=8, kernel_size=(3, 3), name="conv1")(x))
    x = nn.relu(
      self.conv(
        features=8,
        kernel_size=(3, 3),
        strides=2,
        padding="CIRCULAR",
        name="conv2",
      )(x)
    )
    if self.grouped:
      x = nn.Conv(8, (3, 3), feature_group_count=8, name="grouped")(x)
    return nn.Conv(10, (1, 1), name="head")(x).mean(axis=(1, 2))


@functools.cache
def linen_variables(grouped=True):
  variables = LinenNet(grouped=grouped).init(jax.random.key(0), X)
  params = dict(variables["params"])
  for seed, name in enumerate(("conv1", "conv2")):
    kernel = params[name]["kernel"]
    params[name] = {
      "kernel": decaying(kernel.shape, DECAY[name], seed),
      "bias": jax.random.normal(jax.random.key(seed), (8,), jnp.float32),
    }
  return {"params": params}


def linen_twin(variables, new, report, layer_cls):
  """The dense variables computing what the factorized ones should."""
  params = dict(variables["params"])
  for layer in report.factorized:
    (name,) = layer.path
    factors = layer_cls(features=8, kernel_size=(3, 3)).factors(
      new["params"][name], layer.kernel_shape[-2]
    )
    params[name] = {**params[name], "kernel": factors.to_dense()}
  return {"params": params}


LINEN_LAYERS = {
  "low_rank": jlinen.LowRankConv,
  "tucker": jlinen.TuckerConv,
  "cp": jlinen.CPConv,
  "spatially_separable": jlinen.SpatiallySeparableConv,
  "depthwise_separable": jlinen.DepthwiseSeparableConv,
  "tensor_train": jlinen.TensorTrainConv,
}


# The formats whose params linen must read back in a special way: tuple
# fields and DepthwiseSeparable's channel multiplier.
@pytest.mark.usefixtures("float32_arithmetic")
@pytest.mark.parametrize(
  "name", ["cp", "spatially_separable", "depthwise_separable", "tensor_train"]
)
def test_factorized_variables_compute_the_dense_twin(name):
  variables = linen_variables()
  new, report = jlinen.factorize_variables(
    variables, name, rank=2, model=LinenNet(), inputs=X, **CP_KWARGS
  )
  assert isinstance(report, jaxfactor.FactorizationReport)
  reasons = {path: layer.skipped for path, layer in by_name(report).items()}
  assert reasons == {
    "conv1": None,
    "conv2": None,
    "grouped": NNX_REASONS["grouped"],
    "head": "1x1 kernel",
  }
  assert report.flops_after < report.flops_before
  layer_cls = LINEN_LAYERS[name]
  # rank=None: each layer reads its rank from its params.
  out = jax.jit(LinenNet(conv=layer_cls).apply)(new, X)
  twin = linen_twin(variables, new, report, layer_cls)
  expected = jax.jit(LinenNet().apply)(twin, X)
  assert relative_error(out, expected) < 1e-5
  assert (
    "kernel" in new["params"]["grouped"]
    and "kernel" not in (new["params"]["conv1"])
  )


def test_without_model_every_kernel_larger_than_1x1_is_a_conv():
  variables = linen_variables(grouped=False)
  new, report = jlinen.factorize_variables(variables, "tucker", rank=2)
  assert {p: l.skipped for p, l in by_name(report).items()} == {
    "conv1": None,
    "conv2": None,
    "head": "1x1 kernel",
  }
  assert report.flops_before is None and report.ranks == {
    "conv1": (2, 2),
    "conv2": (2, 2),
  }
  out = LinenNet(
    conv=functools.partial(jlinen.TuckerConv, rank=2), grouped=False
  ).apply(new, X)
  expected = LinenNet(grouped=False).apply(
    linen_twin(variables, new, report, jlinen.TuckerConv), X
  )
  assert relative_error(out, expected) < 1e-5
  _, report = jlinen.factorize_variables(
    variables, "tucker", rank=2, filter=lambda path, kernel: path == ("conv2",)
  )
  assert by_name(report)["conv1"].skipped == "not selected by the filter"


def test_linen_rank_budget_energy_and_data_aware():
  variables = linen_variables()
  model = LinenNet()
  _, report = jlinen.factorize_variables(
    variables, "low_rank", rank=jaxfactor.Budget(params=0.3)
  )
  assert report.factorized and all(
    l.params_after <= 0.3 * l.params_before for l in report.factorized
  )
  _, report = jlinen.factorize_variables(variables, "low_rank", energy=0.9)
  assert report.factorized
  for layer in report.factorized:
    kernel = variables["params"][layer.path[0]]["kernel"]
    assert layer.rank == energy_rank(kernel, 0.9)
  reference = model.apply(variables, X)

  def output_error(data_aware):
    new, _ = jlinen.factorize_variables(
      variables,
      "low_rank",
      rank=2,
      model=model,
      inputs=X,
      data_aware=data_aware,
    )
    return relative_error(
      LinenNet(conv=jlinen.LowRankConv).apply(new, X), reference
    )

  assert output_error(True) < output_error(False)


LINEN_GEOMETRY = {"conv1": {}, "conv2": dict(strides=2, padding="CIRCULAR")}


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_linen_budget_is_met(kind):
  variables = linen_variables()
  new, report = jlinen.factorize_variables(
    variables,
    "low_rank",
    budget=jaxfactor.Budget(**{kind: 0.4}),
    model=LinenNet(),
    inputs=X,
  )
  assert report.factorized
  kept = 0
  for layer in report.layers:
    if layer.skipped and layer.skipped.startswith("kept dense"):
      (name,) = layer.path
      kernel = variables["params"][name]["kernel"]
      kept += (
        kernel.size
        if kind == "params"
        else jaxfactor.cost(
          kernel, layer.input_shape, **LINEN_GEOMETRY[name]
        ).flops
      )
      assert "kernel" in new["params"][name]
  after, before = (
    (report.params_after, report.params_before)
    if kind == "params"
    else (report.flops_after, report.flops_before)
  )
  assert after + kept <= 0.4 * (before + kept)
  # Greedy allocation stops when no layer's next rank fits any more.
  left = 0.4 * (before + kept) - (after + kept)

  def size(layer, rank):
    factors = jaxfactor.LowRank.abstract(layer.kernel_shape, rank, jnp.float32)
    return (
      factors.num_params
      if kind == "params"
      else jaxfactor.cost(
        factors,
        layer.input_shape,
        implementation="factorized",
        **LINEN_GEOMETRY[layer.path[0]],
      ).flops
    )

  for layer in report.factorized:
    assert set(new["params"][layer.path[0]]) == {"spatial", "pointwise", "bias"}
    assert size(layer, layer.rank + 1) - size(layer, layer.rank) > left


def test_linen_implementation_counts_its_flops():
  _, report = jlinen.factorize_variables(
    linen_variables(),
    "tucker",
    rank=2,
    model=LinenNet(),
    inputs=X,
    implementation="reconstructed",
    allow_larger=True,
  )
  layer = by_name(report)["conv1"]
  kernel = linen_variables()["params"]["conv1"]["kernel"]
  factors = jaxfactor.decompose(kernel, "tucker", rank=2)
  assert (
    layer.flops_after
    == jaxfactor.cost(
      factors, layer.input_shape, implementation="reconstructed"
    ).flops
  )


def test_linen_skips_what_is_not_an_nn_conv_and_unboxes_partitioned():
  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_partitioning(
        nn.initializers.lecun_normal(), (None, None, None, "model")
      )
      x = nn.Conv(8, (3, 3), kernel_init=init, name="conv")(x)
      x = nn.Conv(8, 3, name="line")(x.reshape(4, 64, 8))
      return nn.DenseGeneral((2, 4), name="dense_general")(x)  # a 3-D kernel

  variables = Mixed().init(jax.random.key(0), X)
  new, report = jlinen.factorize_variables(
    variables, "spatially_separable", rank=2, model=Mixed(), inputs=X
  )
  assert {p: l.skipped for p, l in by_name(report).items()} == {
    "conv": None,
    "line": "1-D kernel: nothing to separate",
    "dense_general": "not an nn.Conv",
  }
  assert set(new["params"]["conv"]) == {"factors_0", "factors_1", "bias"}
  assert "kernel" in new["params"]["dense_general"]
