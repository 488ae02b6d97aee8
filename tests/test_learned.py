"""Learned ranks: the proximal group-lasso step, pruning and budgets.

Oracles: the group soft-threshold written out in numpy from each format's
definition of a rank component; the unpruned layer's output, and
`lax.conv_general_dilated` on its `to_dense()` kernel, for the pruned one;
`jaxfactor.cost` of the dense kernels for budgets.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import jaxfactor
import jaxfactor.linen as jlinen
import jaxfactor.nnx as jnnx

F64 = jnp.float64


def _normal(key, shape):
  return jax.random.normal(jax.random.key(key), shape, F64)


def _shrink(group, t):
  norm = np.linalg.norm(group)
  return group * max(0.0, 1.0 - t / norm) if norm > 0 else group


def _reference(name, params, t):
  """Group soft-thresholding, from each format's rank components."""
  p = {k: np.array(v) for k, v in params.items()}
  if name == "low_rank":  # column r of spatial, row r of pointwise
    for r in range(p["pointwise"].shape[0]):
      s, w = p["spatial"][..., r], p["pointwise"][r]
      g = _shrink(np.concatenate([s.ravel(), w.ravel()]), t)
      p["spatial"][..., r] = g[: s.size].reshape(s.shape)
      p["pointwise"][r] = g[s.size :]
  elif name == "cp":  # column r of every factor
    names = ["in_proj", "spatial_0", "spatial_1"]
    for r in range(p["out_proj"].shape[0]):
      parts = [p[n][:, r] for n in names] + [p["out_proj"][r]]
      g = _shrink(np.concatenate(parts), t)
      sizes = np.cumsum([0] + [x.size for x in parts])
      for n, a, b in zip(names, sizes[:-1], sizes[1:]):
        p[n][:, r] = g[a:b]
      p["out_proj"][r] = g[sizes[-2] :]
  else:  # tucker: the in-ranks, then the out-ranks
    for a in range(p["in_proj"].shape[1]):
      u, c = p["in_proj"][:, a], p["core"][..., a, :]
      g = _shrink(np.concatenate([u.ravel(), c.ravel()]), t)
      p["in_proj"][:, a] = g[: u.size]
      p["core"][..., a, :] = g[u.size :].reshape(c.shape)
    for b in range(p["out_proj"].shape[0]):
      c, v = p["core"][..., b], p["out_proj"][b]
      g = _shrink(np.concatenate([c.ravel(), v.ravel()]), t)
      p["core"][..., b] = g[: c.size].reshape(c.shape)
      p["out_proj"][b] = g[c.size :]
  return p


FACTORS = {
  "low_rank": lambda: jaxfactor.LowRank(
    _normal(0, (3, 2, 4, 5)), _normal(1, (5, 6))
  ),
  "cp": lambda: jaxfactor.CP(
    _normal(0, (4, 5)),
    (_normal(1, (3, 5)), _normal(2, (2, 5))),
    _normal(3, (5, 6)),
  ),
  "tucker": lambda: jaxfactor.Tucker(
    _normal(0, (4, 3)), _normal(1, (3, 2, 3, 4)), _normal(2, (4, 6))
  ),
}


@pytest.mark.parametrize("name", sorted(FACTORS))
def test_proximal_step_is_the_group_soft_threshold(name):
  params = {"conv": FACTORS[name]().params()}
  grads = jax.tree.map(lambda a: 0.1 * jnp.ones_like(a), params)
  lr = 0.5
  stepped = {k: v - lr * 0.1 for k, v in params["conv"].items()}
  # A threshold between the first bond's group norms: some groups go to
  # exactly zero, some survive.
  norms = _first_bond_norms(name, stepped)
  strength = float(np.median(norms)) / lr
  tx = optax.chain(
    optax.sgd(lr), jlinen.rank_penalty(strength=strength, learning_rate=lr)
  )
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  got = optax.apply_updates(params, updates)["conv"]
  want = _reference(name, stepped, lr * strength)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-14)
  zero = np.array(
    [np.all(_first_bond(name, want, r) == 0) for r in range(len(norms))]
  )
  assert zero.any() and not zero.all()
  assert np.array_equal(zero, norms <= lr * strength)


def _first_bond(name, p, r):
  if name == "low_rank":
    return np.concatenate([p["spatial"][..., r].ravel(), p["pointwise"][r]])
  if name == "cp":
    return np.concatenate(
      [p[n][:, r] for n in ("in_proj", "spatial_0", "spatial_1")]
      + [p["out_proj"][r]]
    )
  return np.concatenate([p["in_proj"][:, r], p["core"][..., r, :].ravel()])


def _first_bond_norms(name, p):
  p = {k: np.array(v) for k, v in p.items()}
  count = p["in_proj" if name != "low_rank" else "pointwise"].shape[
    1 if name != "low_rank" else 0
  ]
  return np.array(
    [np.linalg.norm(_first_bond(name, p, r)) for r in range(count)]
  )


class Net(nnx.Module):
  def __init__(self, rngs, **kw):
    self.low_rank = jnnx.LowRankConv(4, 6, (3, 3), rank=4, **kw, rngs=rngs)
    self.tucker = jnnx.TuckerConv(6, 6, (3, 2), rank=(3, 4), **kw, rngs=rngs)
    self.cp = jnnx.CPConv(6, 6, (2, 3), rank=5, strides=2, **kw, rngs=rngs)
    self.separable = jnnx.SpatiallySeparableConv(
      6, 6, (3, 3), rank=5, padding="VALID", **kw, rngs=rngs
    )
    self.train = jnnx.TensorTrainConv(
      6, 4, (3, 3), rank=(3, 2), **kw, rngs=rngs
    )
    self.depthwise = jnnx.DepthwiseSeparableConv(4, 4, (3, 3), **kw, rngs=rngs)

  def __call__(self, x):
    for layer in (self.low_rank, self.tucker, self.cp, self.separable):
      x = layer(x)
    return self.depthwise(self.train(x))


def _zero_components(model):
  """Zeroes one factor's slice of component 0 on every bond, and the whole
  group of another LowRank component."""
  lr, tk, cp = model.low_rank, model.tucker, model.cp
  lr.spatial[...] = lr.spatial[...].at[..., 0].set(0.0)
  lr.spatial[...] = lr.spatial[...].at[..., 2].set(0.0)
  lr.pointwise[...] = lr.pointwise[...].at[2].set(0.0)
  tk.in_proj[...] = tk.in_proj[...].at[:, 0].set(0.0)
  tk.out_proj[...] = tk.out_proj[...].at[0].set(0.0)
  cp.spatial_1[...] = cp.spatial_1[...].at[:, 0].set(0.0)
  ss = model.separable
  ss.factors_1[...] = ss.factors_1[...].at[:, 0].set(0.0)
  tt = model.train
  tt.cores_0[...] = tt.cores_0[...].at[..., 0].set(0.0)


def test_pruning_zero_components_leaves_every_output_unchanged():
  model = Net(nnx.Rngs(0), param_dtype=F64)
  _zero_components(model)
  x = _normal(5, (2, 9, 8, 4))
  before = model(x)
  old = {name: getattr(model, name).factors for name in ("low_rank", "cp")}
  biases = {name: getattr(model, name).bias[...] for name in ("low_rank", "cp")}
  report = jnnx.prune_ranks(model, inputs=x)
  assert report.ranks == {
    "low_rank": 2,
    "tucker": (2, 3),
    "cp": 4,
    "separable": (4,),
    "train": (3, 1),
  }
  np.testing.assert_allclose(model(x), before, rtol=1e-12, atol=1e-12)
  # Against lax's conv on the unpruned layers' dense kernels.
  dims = ("NHWC", "HWIO", "NHWC")
  dense = lax.conv_general_dilated(
    x,
    old["low_rank"].to_dense(),
    (1, 1),
    "SAME",
    dimension_numbers=dims,
    precision=lax.Precision.HIGHEST,
  ) + biases["low_rank"].reshape(1, 1, 1, -1)
  np.testing.assert_allclose(model.low_rank(x), dense, rtol=1e-12, atol=1e-12)
  y = model.tucker(model.low_rank(x))
  dense = lax.conv_general_dilated(
    y,
    old["cp"].to_dense(),
    (2, 2),
    "SAME",
    dimension_numbers=dims,
    precision=lax.Precision.HIGHEST,
  ) + biases["cp"].reshape(1, 1, 1, -1)
  np.testing.assert_allclose(model.cp(y), dense, rtol=1e-12, atol=1e-12)
  # The report: what was removed contributed nothing; DepthwiseSeparable
  # has no components to prune.
  pruned = {layer.path: layer for layer in report.pruned}
  assert pruned[("tucker",)].rank_before == (3, 4)
  assert pruned[("low_rank",)].params_after == 3 * 3 * 4 * 2 + 2 * 6
  assert all(layer.relative_error < 1e-14 for layer in report.pruned)
  assert report.flops_after < report.flops_before
  skipped = [layer for layer in report.layers if layer.skipped]
  assert [layer.path for layer in skipped] == [("depthwise",)]
  assert skipped[0].skipped.startswith("DepthwiseSeparable")
  assert "skipped: DepthwiseSeparable" in str(report)
  assert "4->2" in str(report)


def test_linen_pruned_variables_apply_unchanged_and_match_nnx():
  layer = jlinen.TuckerConv(6, (3, 3), rank=(3, 4), param_dtype=F64)
  x = _normal(5, (1, 6, 6, 4))
  variables = layer.init(jax.random.key(0), x)
  params = dict(variables["params"])
  params["in_proj"] = params["in_proj"].at[:, 1].set(0.0)
  params["out_proj"] = params["out_proj"].at[3].set(0.0)
  variables = {"params": params}
  new, report = jlinen.prune_ranks_variables(variables, model=layer, inputs=x)
  assert report.ranks == {"": (2, 3)}
  assert new["params"]["core"].shape == (3, 3, 2, 3)
  assert report.layers[0].flops_after < report.layers[0].flops_before
  np.testing.assert_allclose(
    layer.apply(new, x), layer.apply(variables, x), rtol=1e-12, atol=1e-12
  )
  # The same layer in nnx prunes to the same factors.
  twin = jnnx.from_factors(layer.factors(params), bias=params["bias"])
  model = nnx.List([twin])
  jnnx.prune_ranks(model)
  np.testing.assert_array_equal(model[0].core[...], new["params"]["core"])


def _train(penalty):
  model = nnx.List([jnnx.LowRankConv(3, 8, (3, 3), rank=6, rngs=nnx.Rngs(0))])
  lr = 0.1
  tx = optax.sgd(lr, momentum=0.9)  # adam fails strict dtype promotion
  if penalty:
    tx = optax.chain(
      tx, jnnx.rank_penalty(model, strength=1.5, learning_rate=lr)
    )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 3), jnp.float32)
  # A rank-2 teacher: the penalty should remove most of the other ranks.
  teacher = jnnx.LowRankConv(3, 8, (3, 3), rank=2, rngs=nnx.Rngs(1))
  y = 3 * teacher(x)

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: jnp.mean((m[0](x) - y) ** 2)
    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(30):
    step(model, optimizer)
  return model, x


def test_the_penalty_drives_components_to_exact_zero():
  model, x = _train(penalty=True)
  zero = np.all(model[0].pointwise[...] == 0, axis=1) & np.all(
    model[0].spatial[...] == 0, axis=(0, 1, 2)
  )
  assert 0 < zero.sum() < 6
  free, _ = _train(penalty=False)
  assert not np.any(np.all(free[0].pointwise[...] == 0, axis=1))
  before = model[0](x)
  report = jnnx.prune_ranks(model)
  assert report.ranks == {"0": 6 - int(zero.sum())}
  np.testing.assert_allclose(model[0](x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_is_met_keeping_the_largest_components(kind):
  model = Net(nnx.Rngs(0), param_dtype=F64, implementation="factorized")
  # LowRank components of known sizes: orthonormal columns and rows, so
  # component r's contribution is proportional to scale[r].
  scale = np.array([1.0, 8.0, 2.0, 4.0])
  q = np.linalg.qr(np.array(_normal(6, (36, 4))))[0]
  model.low_rank.spatial[...] = jnp.asarray((q * scale).reshape(3, 3, 4, 4))
  model.low_rank.pointwise[...] = jnp.asarray(
    np.linalg.qr(np.array(_normal(7, (6, 4))))[0].T
  )
  x = _normal(5, (2, 9, 8, 4))
  shapes = {
    name: getattr(model, name).factors.shape
    for name in ("low_rank", "tucker", "cp", "separable", "train")
  }
  report = jnnx.prune_ranks(model, inputs=x)  # nothing zero: records shapes
  inputs = {layer.path[0]: layer for layer in report.pruned}
  if kind == "params":
    dense = sum(math.prod(s) for s in shapes.values())
  else:
    dense = sum(
      jaxfactor.cost(
        jnp.zeros(shapes[name], F64),
        inputs[name].input_shape,
        strides=getattr(model, name).strides,
        padding=getattr(model, name).padding,
      ).flops
      for name in shapes
    )
  before = report.params_after if kind == "params" else report.flops_after
  budget = jaxfactor.Budget(**{kind: 0.5 * before / dense})
  report = jnnx.prune_ranks(model, budget=budget, inputs=x)
  after = report.params_after if kind == "params" else report.flops_after
  assert after <= 0.5 * before
  # Removing one more component would have been unnecessary: the budget is
  # met, and the LowRank layer lost its smallest components first.
  kept = np.sqrt(np.sum(np.array(model.low_rank.spatial[...]) ** 2, (0, 1, 2)))
  assert set(np.round(kept, 6)) <= set(scale)
  assert np.isin(np.sort(scale)[-len(kept) :], np.round(kept, 6)).all()
  np.testing.assert_equal(model(x).shape, (2, 3, 2, 4))


def test_errors():
  model = Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"`strength` must be a number >= 0"):
    jnnx.rank_penalty(model, strength=-1.0, learning_rate=0.1)
  with pytest.raises(ValueError, match=r"`learning_rate` must be a number > 0"):
    jnnx.rank_penalty(model, strength=1.0, learning_rate=0)
  dense = nnx.List([nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))])
  tx = jnnx.rank_penalty(dense, strength=1.0, learning_rate=0.1)
  with pytest.raises(ValueError, match=r"hold no LowRank, Tucker, CP"):
    nnx.Optimizer(dense, tx, wrt=nnx.Param)
  tx = jlinen.rank_penalty(strength=1.0, learning_rate=0.1)
  params = {"conv": FACTORS["low_rank"]().params()}
  with pytest.raises(ValueError, match=r"needs the parameters"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match=r"`tolerance` must be a number >= 0"):
    jnnx.prune_ranks(model, tolerance=-0.1)
  with pytest.raises(TypeError, match=r"`budget` must be a jaxfactor.Budget"):
    jnnx.prune_ranks(model, budget=0.5)
  with pytest.raises(ValueError, match=r"FLOP budget needs `inputs`"):
    jnnx.prune_ranks(model, budget=jaxfactor.Budget(flops=0.5))
  with pytest.raises(ValueError, match=r"below what rank 1 on every bond"):
    jnnx.prune_ranks(model, budget=jaxfactor.Budget(params=0.001))
  with pytest.raises(TypeError, match=r"`model` is a bare LowRankConv"):
    jnnx.prune_ranks(model.low_rank)
  with pytest.raises(ValueError, match=r"give both `model` and `inputs`"):
    jlinen.prune_ranks_variables({"params": params}, model=jlinen.LowRankConv)
