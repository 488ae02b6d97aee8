"""Budgets spread over layers: the allocation, the loss criterion, latency.

The oracles: the uniform split (every layer at the budget's fraction of its
own cost) on the allocator's own objective; a model whose loss depends on one
layer far more than on another; the loss computed one kernel at a time on a
model edited in place; the roofline estimate of each factorized layer.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxfactor
import jaxfactor.linen as jlinen
import jaxfactor.nnx as jnnx
from jaxfactor import _allocate

X = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))


def spectral_layer(ranks, cost_per_rank, decay, penalty=None):
  """`(costs, penalties, dense)` of a layer whose squared singular values
  decay geometrically, its relative errors the Eckart-Young tails."""
  squares = decay ** (2 * np.arange(ranks))
  kept = np.cumsum(squares) / squares.sum()
  errors = [math.sqrt(max(0.0, 1.0 - k)) for k in kept]
  costs = [cost_per_rank * r for r in range(1, ranks + 1)]
  penalties = (penalty or _allocate.spectral_penalty)(errors)
  return costs, penalties, cost_per_rank * ranks


def objective(layers, choice):
  return sum(
    0.0 if index is None else penalties[index]
    for (_, penalties, _), index in zip(layers, choice)
  )


def spent(layers, choice):
  return sum(
    dense if index is None else costs[index]
    for (costs, _, dense), index in zip(layers, choice)
  )


@pytest.mark.parametrize("penalty", [None, list])
def test_allocation_is_never_worse_than_the_uniform_split(penalty):
  """Whatever the penalties: the spectral ones, or the relative errors
  themselves (concave in the energy kept, where greedy steps from the
  cheapest ranks lose to the uniform split)."""
  rng = np.random.default_rng(0)
  for _ in range(30):
    layers = [
      spectral_layer(
        int(rng.integers(4, 24)),
        float(rng.uniform(0.5, 20)),
        float(rng.uniform(0.5, 0.995)),
        penalty,
      )
      for _ in range(int(rng.integers(2, 6)))
    ]
    fraction = float(rng.uniform(0.15, 0.6))
    choice = _allocate.allocate("t", layers, fraction)
    total = sum(dense for *_, dense in layers)
    assert spent(layers, choice) <= fraction * total * (1 + 1e-9)
    uniform = [
      max([i for i, c in enumerate(costs) if c <= fraction * dense] or [0])
      for costs, _, dense in layers
    ]
    if spent(layers, uniform) > fraction * total:
      continue  # no uniform split meets this budget
    assert objective(layers, choice) <= objective(layers, uniform) + 1e-12


def test_a_small_step_does_not_block_the_step_the_uniform_split_takes():
  """From the cheapest ranks, marginal analysis raises layer B first (the
  best ratio) and then cannot afford layer A's large drop; the uniform split
  takes that drop."""
  layers = [([1.0, 6.0], [5.0, 0.5], 12.0), ([1.0, 2.0], [3.0, 1.5], 3.0)]
  choice = _allocate.allocate("t", layers, 0.5)
  assert choice == [1, 0]
  assert objective(layers, choice) == 3.5


def test_an_exchange_moves_budget_to_the_layer_that_gains_more():
  """The uniform split spends 5 on A for a drop of 0.1 and cannot afford
  B's drop of 3.9; moving A's budget to B pays (and the rest then
  keeps B dense)."""
  layers = [([1.0, 5.0], [1.0, 0.9], 10.0), ([1.0, 5.0], [4.0, 0.1], 6.0)]
  assert _allocate.allocate("t", layers, 0.5) == [0, None]


def test_no_layer_is_destroyed_to_keep_another_dense():
  """An expensive layer with a flat spectrum and a cheap one: the summed
  relative error kept the cheap one dense and left the other at error 0.94
  (the uniform split leaves both near 0.8)."""
  layers = [spectral_layer(32, 10.0, 0.99), spectral_layer(32, 2.0, 0.95)]
  errors = [
    math.sqrt(1 - math.exp(-p))
    for p in (layers[0][1][2], layers[0][1][7], layers[1][1][7])
  ]
  assert errors[0] > 0.93 and max(errors[1:]) < 0.83
  choice = _allocate.allocate("t", layers, 0.25)
  assert None not in choice
  worst = max(layers[i][1][k] for i, k in enumerate(choice))
  assert math.sqrt(1 - math.exp(-worst)) < 0.85


class Branches(nnx.Module):
  """Two identical convs on one input, one's output weighted 30 times more:
  the same spectra, very different effects on the loss."""

  def __init__(self, rngs):
    conv = dict(param_dtype=jnp.float64, rngs=rngs)
    self.loud = nnx.Conv(4, 8, (3, 3), **conv)
    self.quiet = nnx.Conv(4, 8, (3, 3), **conv)
    self.quiet.kernel[...] = self.loud.kernel[...]

  def __call__(self, x):
    return 30.0 * self.loud(x) + self.quiet(x)


def squared_error(target):
  return lambda model, x: jnp.mean((model(x) - target) ** 2)


def test_loss_criterion_gives_the_layer_that_matters_the_larger_rank():
  model = Branches(nnx.Rngs(0))
  budget = jaxfactor.Budget(params=0.5)
  spectral = jnnx.factorize(
    Branches(nnx.Rngs(0)), "low_rank", budget=budget, inputs=X
  )
  report = jnnx.factorize(
    model,
    "low_rank",
    budget=budget,
    inputs=X,
    criterion="loss",
    loss_fn=squared_error(Branches(nnx.Rngs(0))(X)),
    calibration=X,
  )
  assert spectral.criterion == "spectral" and report.criterion == "loss"
  ranks = {layer.path: layer.rank for layer in report.factorized}
  by_spectrum = {layer.path: layer.rank for layer in spectral.factorized}
  assert by_spectrum[("loud",)] == by_spectrum[("quiet",)]
  assert ranks[("loud",)] > by_spectrum[("loud",)] > ranks[("quiet",)]
  assert report.params_after <= 0.5 * report.params_before
  # The measured increase at the chosen rank, layer by layer.
  for layer in report.factorized:
    alone = Branches(nnx.Rngs(0))
    jnnx.factorize(
      alone,
      "low_rank",
      rank=layer.rank,
      filter=lambda p, c, path=layer.path: p == path,
    )
    assert layer.loss_increase == pytest.approx(
      float(squared_error(Branches(nnx.Rngs(0))(X))(alone, X)), rel=1e-9
    )
  assert "d.loss" in str(report)
  assert all(layer.loss_increase is None for layer in spectral.factorized)


def test_batched_scoring_equals_one_kernel_at_a_time():
  model = Branches(nnx.Rngs(1))
  target = jnp.ones((2, 6, 6, 8))
  loss_fn = squared_error(target)
  kernels = jax.random.normal(jax.random.key(2), (3, 3, 3, 4, 8))
  batched = _allocate_losses_nnx(model, loss_fn)(("quiet",), kernels)
  for kernel, value in zip(kernels, batched):
    edited = nnx.clone(model)
    edited.quiet.kernel[...] = kernel
    assert value == pytest.approx(float(loss_fn(edited, X)), rel=1e-12)
  # The model itself is untouched.
  assert jnp.array_equal(model.quiet.kernel[...], model.loud.kernel[...])

  class LinenBranches(nn.Module):
    @nn.compact
    def __call__(self, x):
      conv = dict(param_dtype=jnp.float64)
      loud = nn.Conv(8, (3, 3), name="loud", **conv)
      return 30.0 * loud(x) + nn.Conv(8, (3, 3), name="quiet", **conv)(x)

  net = LinenBranches()
  variables = net.init(jax.random.key(3), X)

  def linen_loss(v, x):
    return jnp.mean((net.apply(v, x) - target) ** 2)

  batched = jlinen._kernel_losses(variables, linen_loss, X)(("quiet",), kernels)
  for kernel, value in zip(kernels, batched):
    params = dict(variables["params"])
    params["quiet"] = {**params["quiet"], "kernel": kernel}
    expected = linen_loss({"params": params}, X)
    assert value == pytest.approx(float(expected), rel=1e-12)


def _allocate_losses_nnx(model, loss_fn):
  return jnnx._kernel_losses(model, loss_fn, X)


def test_linen_loss_criterion_matches_nnx():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      conv = dict(param_dtype=jnp.float64)
      loud = nn.Conv(8, (3, 3), name="loud", **conv)
      return 30.0 * loud(x) + nn.Conv(8, (3, 3), name="quiet", **conv)(x)

  model = Branches(nnx.Rngs(0))
  variables = {
    "params": {
      name: {
        "kernel": getattr(model, name).kernel[...],
        "bias": getattr(model, name).bias[...],
      }
      for name in ("loud", "quiet")
    }
  }
  target = model(X)
  _, report = jlinen.factorize_variables(
    variables,
    "low_rank",
    budget=jaxfactor.Budget(params=0.5),
    model=Net(),
    inputs=X,
    criterion="loss",
    loss_fn=lambda v, x: jnp.mean((Net().apply(v, x) - target) ** 2),
    calibration=X,
  )
  nnx_report = jnnx.factorize(
    model,
    "low_rank",
    budget=jaxfactor.Budget(params=0.5),
    inputs=X,
    criterion="loss",
    loss_fn=squared_error(target),
    calibration=X,
  )
  assert report.ranks == nnx_report.ranks
  assert report.criterion == "loss"


class Pair(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(64, 64, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(64, 32, (3, 3), rngs=rngs)

  def __call__(self, x):
    return self.conv2(nnx.relu(self.conv1(x)))


def test_latency_budget_is_met_under_the_cost_model():
  model = Pair(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 64), jnp.float32)
  kernels = {"conv1": model.conv1.kernel[...], "conv2": model.conv2.kernel[...]}
  report = jnnx.factorize(
    model, "low_rank", budget=jaxfactor.Budget(latency=0.5), inputs=x
  )
  assert report.criterion == "spectral"

  def seconds(kernel, implementation):
    return _allocate.estimated_seconds(
      kernel,
      (1, 16, 16, kernel.shape[-2]),
      strides=1,
      padding="SAME",
      dilation=1,
      implementation=implementation,
    )

  dense = sum(seconds(k, "reconstructed") for k in kernels.values())
  after = 0.0
  for layer in report.layers:
    (name,) = layer.path
    current = getattr(model, name)
    after += (
      seconds(kernels[name], "reconstructed")
      if layer.skipped
      else seconds(current.factors, "factorized")
    )
  assert report.factorized
  assert after <= 0.5 * dense


BAD = [
  (
    dict(budget=jaxfactor.Budget(params=0.5), criterion="hessian"),
    ValueError,
    r"factorize: `criterion` must be one of \('spectral', 'loss'\), got"
    r" 'hessian'",
  ),
  (
    dict(rank=2, criterion="loss", loss_fn=len, calibration=X),
    ValueError,
    r'factorize: criterion="loss" scores the ranks a `budget` chooses from',
  ),
  (
    dict(budget=jaxfactor.Budget(params=0.5), criterion="loss", calibration=X),
    TypeError,
    r'factorize: criterion="loss" needs `loss_fn`, a callable returning a'
    r" scalar loss, got NoneType",
  ),
  (
    dict(budget=jaxfactor.Budget(params=0.5), criterion="loss", loss_fn=len),
    ValueError,
    r'factorize: criterion="loss" needs `calibration`, the batch',
  ),
  (
    dict(budget=jaxfactor.Budget(params=0.5), loss_fn=len, calibration=X),
    ValueError,
    r'factorize: `loss_fn` and `calibration` only serve criterion="loss";'
    r' the criterion is "spectral"',
  ),
  (
    dict(budget=jaxfactor.Budget(latency=0.5)),
    ValueError,
    r"factorize: a latency budget needs `inputs` to know each layer's input"
    r" shape",
  ),
  (
    dict(
      budget=jaxfactor.Budget(params=0.5),
      inputs=X,
      criterion="loss",
      loss_fn=lambda model, x: model(x),
      calibration=X,
    ),
    ValueError,
    re.escape("loss_fn must return a scalar loss, got one of shape (2, 6,"),
  ),
  (
    dict(
      budget=jaxfactor.Budget(params=0.5),
      inputs=X,
      criterion="loss",
      loss_fn=lambda model, x: jnp.log(-jnp.mean(model(x) ** 2)),
      calibration=X,
    ),
    ValueError,
    r"loss_fn returned a non-finite loss for layer \('loud',\)",
  ),
]


@pytest.mark.parametrize("kwargs, error, message", BAD)
def test_bad_arguments(kwargs, error, message):
  with pytest.raises(error, match=message):
    jnnx.factorize(Branches(nnx.Rngs(0)), "low_rank", **kwargs)


def test_linen_bad_criterion():
  with pytest.raises(
    ValueError, match=r"factorize_variables: `criterion` must be one of"
  ):
    jlinen.factorize_variables(
      {"params": {}}, "low_rank", rank=2, criterion="loss-aware"
    )
