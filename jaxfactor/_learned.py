"""Learned ranks: a group-sparsity penalty on rank components, and pruning.

A factorized kernel is a sum over each *bond* (an index shared by factors)
of rank components: `LowRank`'s rank `r` is column `r` of `spatial` and row
`r` of `pointwise`; Tucker has an in-rank bond (`in_proj`/`core`) and an
out-rank bond (`core`/`out_proj`); CP's component `r` is a slice of every
factor; `SpatiallySeparable` and `TensorTrain` have one bond between each
pair of neighbouring factors. A component's *group* is the slices of all
the factors that carry it, and the penalty is the group lasso
`strength * sum_bonds sum_r ||group_r||_2`.

`rank_penalty` applies it as a proximal step after any optax optimizer:
group soft-thresholding, `g <- g * max(0, 1 - t / ||g||)` with `t =
learning_rate * strength`, which sets a group exactly to zero once its norm
falls under `t`. `prune_layers` then slices the zero components away, which
leaves the convolution unchanged, or, given a budget, also the components
that contribute least to each kernel.

The nnx and linen entry points only find the layers (by module, or by the
parameter names the layers use) and hand them here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.core import meta

from jaxfactor import _cost
from jaxfactor import _formats as formats
from jaxfactor import _ranks
from jaxfactor import _surgery

# The formats whose ranks are sums of separable components. A
# DepthwiseSeparable's channel multiplier is not: its m filters per input
# channel cannot be removed one component at a time.
SUPPORTED: tuple[type[formats.Format], ...] = (
  formats.LowRank,
  formats.Tucker,
  formats.CP,
  formats.SpatiallySeparable,
  formats.TensorTrain,
)

_UNSUPPORTED = (
  "DepthwiseSeparable: its channel multiplier is not a sum of rank components"
)


class Bond(NamedTuple):
  """One rank index shared by factors.

  Attributes:
    name: the rank it is, as the format names it ("rank", "in_rank",
      "ranks[1]").
    slices: `(param_name, axis)` of every factor that carries it.
  """

  name: str
  slices: tuple[tuple[str, int], ...]


def _count(names: Sequence[str], field: str) -> int:
  return sum(1 for n in names if n.startswith(f"{field}_"))


def bonds(cls: type[formats.Format], names: Sequence[str]) -> list[Bond]:
  """The bonds of a `cls` layer whose `params()` names are `names`."""
  if cls is formats.LowRank:
    return [Bond("rank", (("spatial", -1), ("pointwise", 0)))]
  if cls is formats.Tucker:
    return [
      Bond("in_rank", (("in_proj", 1), ("core", -2))),
      Bond("out_rank", (("core", -1), ("out_proj", 0))),
    ]
  if cls is formats.CP:
    spatial = tuple(
      (f"spatial_{i}", 1) for i in range(_count(names, "spatial"))
    )
    return [Bond("rank", (("in_proj", 1), *spatial, ("out_proj", 0)))]
  if cls is formats.SpatiallySeparable:
    n = _count(names, "factors")
    return [
      Bond(f"ranks[{i}]", ((f"factors_{i}", 2), (f"factors_{i + 1}", 1)))
      for i in range(n - 1)
    ]
  if cls is formats.TensorTrain:
    d = _count(names, "cores")
    return [Bond("ranks[0]", (("spatial", -1), ("cores_0", 0)))] + [
      Bond(f"ranks[{i}]", ((f"cores_{i - 1}", 3), (f"cores_{i}", 0)))
      for i in range(1, d)
    ]
  raise TypeError(f"bonds: no rank components in {cls.__name__}")


def _other_axes(a: Any, axis: int) -> tuple[int, ...]:
  return tuple(i for i in range(a.ndim) if i != axis % a.ndim)


def _along(v: jax.Array, a: Any, axis: int) -> jax.Array:
  """`v [R]` shaped to broadcast along `axis` of `a` (explicitly: strict
  rank promotion)."""
  shape = [1] * a.ndim
  shape[axis % a.ndim] = v.shape[0]
  return v.reshape(shape)


def group_norms(params: Mapping[str, Any], bond: Bond) -> jax.Array:
  """`[R]`: the Euclidean norm of each component's group of slices."""
  squares = sum(
    jnp.sum(jnp.square(params[name]), axis=_other_axes(params[name], axis))
    for name, axis in bond.slices
  )
  return jnp.sqrt(squares)


def soft_threshold(
  cls: type[formats.Format], params: Mapping[str, Any], threshold: Any
) -> dict[str, Any]:
  """Group soft-thresholding of every bond's components, bond after bond.

  Each bond's step is the exact proximal operator of `threshold * sum_r
  ||group_r||`: a group of norm at most `threshold` becomes exactly zero,
  the others shrink towards zero by `threshold` in norm. Where bonds share a
  factor (Tucker's core, inner factors and cores), the steps run in bond
  order, each on the previous one's result.
  """
  out = dict(params)
  for bond in bonds(cls, list(params)):
    norms = group_norms(out, bond)
    above = norms > threshold
    scale = jnp.where(above, 1 - threshold / jnp.where(above, norms, 1), 0)
    for name, axis in bond.slices:
      out[name] = out[name] * _along(scale, out[name], axis)
  return out


# --- the optax transformation -------------------------------------------------


class RankPenaltyState(NamedTuple):
  """The step count, for a `learning_rate` schedule."""

  count: jax.Array  # type: ignore[assignment]  # optax's name for it


# (path to the layer's params, format class, the params' names)
LayerParams = tuple[tuple[Any, ...], type[formats.Format], tuple[str, ...]]


def _key(entry: Any) -> Any:
  """A pytree path entry as a plain key (dict key, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _boxed(x: Any) -> bool:
  # nnx.Optimizer's `init` gets Variables; linen params may be boxed.
  return isinstance(x, (nnx.Variable, meta.AxisMetadata))


def _by_path(tree: Any) -> dict[tuple[Any, ...], Any]:
  return {
    tuple(_key(k) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_boxed
    )[0]
  }


def format_of(names: Sequence[str]) -> type[formats.Format] | None:
  """The format whose `params()` names are exactly `names`, or None."""
  given = set(names)
  candidates: tuple[type[formats.Format], ...] = (
    *SUPPORTED,
    formats.DepthwiseSeparable,
  )
  for cls in candidates:
    expected = set()
    for field in cls._fields:
      if field in cls._tuple_fields:
        count = _count(names, field)
        if not count:
          break
        expected |= {f"{field}_{i}" for i in range(count)}
      else:
        expected.add(field)
    else:
      if expected == given:
        return cls
  return None


def layers_by_name(tree: Any) -> list[LayerParams]:
  """The factorized layers in a params tree, told by their param names: each
  dict whose keys, `bias` aside, are one format's `params()` names."""
  children: dict[tuple[Any, ...], list[str]] = {}
  for path in _by_path(tree):
    if path and isinstance(path[-1], str) and path[-1] != "bias":
      children.setdefault(path[:-1], []).append(path[-1])
  found = []
  for parent, names in children.items():
    cls = format_of(names)
    if cls is not None:
      found.append((parent, cls, tuple(sorted(names))))
  return found


def check_strength(fn: str, strength: Any, learning_rate: Any) -> None:
  if (
    isinstance(strength, bool)
    or not isinstance(strength, (int, float))
    or not strength >= 0
  ):
    raise ValueError(
      f"{fn}: `strength` must be a number >= 0, got {strength!r}."
    )
  if callable(learning_rate):
    return
  if (
    isinstance(learning_rate, bool)
    or not isinstance(learning_rate, (int, float))
    or not learning_rate > 0
  ):
    raise ValueError(
      f"{fn}: `learning_rate` must be a number > 0 or an optax schedule"
      f" (step -> rate), got {learning_rate!r}."
    )


def rank_penalty(
  fn: str,
  layers: Sequence[LayerParams] | None,
  *,
  strength: float,
  learning_rate: Any,
) -> optax.GradientTransformation:
  """The proximal group-lasso step over `layers` (None: found by name)."""
  check_strength(fn, strength, learning_rate)
  layers = None if layers is None else list(layers)

  def locate(params: Any) -> tuple[dict, list[LayerParams]]:
    if params is None:
      raise ValueError(
        f"{fn}: the proximal step needs the parameters: call"
        " `tx.update(updates, state, params)` (as nnx.Optimizer and"
        " optax's training loops do)."
      )
    flat = _by_path(params)
    if layers is None:
      found = [
        layer for layer in layers_by_name(params) if layer[1] in SUPPORTED
      ]
    else:
      found = [
        layer
        for layer in layers
        if all((*layer[0], name) in flat for name in layer[2])
      ]
    if not found:
      raise ValueError(
        f"{fn}: the parameters hold no LowRank, Tucker, CP,"
        " SpatiallySeparable or TensorTrain layer's factors (are they"
        " excluded by the optimizer's `wrt` filter or mask?)."
      )
    return flat, found

  def init_fn(params):
    locate(params)
    return RankPenaltyState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    flat, found = locate(params)
    rate = (
      learning_rate(state.count) if callable(learning_rate) else learning_rate
    )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    index = {
      tuple(_key(k) for k in path): i for i, (path, _) in enumerate(leaves)
    }
    new = [leaf for _, leaf in leaves]
    for path, cls, names in found:
      keys = {name: (*path, name) for name in names}
      missing = [k for k in keys.values() if k not in index]
      if missing:
        raise ValueError(
          f"{fn}: `updates` and `params` differ in structure: no update for"
          f" {['/'.join(map(str, k)) for k in missing]}."
        )
      stepped = {n: flat[k] + new[index[k]] for n, k in keys.items()}
      dtype = stepped[names[0]].dtype
      threshold = jnp.asarray(rate, dtype) * jnp.asarray(strength, dtype)
      shrunk = soft_threshold(cls, stepped, threshold)
      for name, k in keys.items():
        new[index[k]] = shrunk[name] - flat[k]
    return jax.tree_util.tree_unflatten(treedef, new), RankPenaltyState(
      count=optax.safe_increment(state.count)
    )

  return optax.GradientTransformation(init_fn, update_fn)


# --- pruning ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PruningLayerReport:
  """What `prune_ranks` did to one factorized layer.

  Attributes:
    path: the layer's path (nnx: as `nnx.iter_modules` gives it; linen: the
      path of its params dict).
    format: the layer's format name.
    input_shape: the layer's input shape, when `inputs` were given.
    rank_before, rank_after: its rank, as `jaxfactor.max_rank` gives ranks.
    params_before, params_after: its factors' parameters (bias excluded).
    flops_before, flops_after: FLOPs of one call on `input_shape`, as the
      layer runs it (its `implementation`; None without `inputs`).
    relative_error: `||K_after - K_before|| / ||K_before||` of the dense
      kernels: 0 where only components that contribute nothing went.
    skipped: why the layer was left as it is, or None.
  """

  path: tuple[Any, ...]
  format: str
  input_shape: tuple[int, ...] | None = None
  rank_before: Any = None
  rank_after: Any = None
  params_before: int = 0
  params_after: int = 0
  flops_before: int | None = None
  flops_after: int | None = None
  relative_error: float | None = None
  skipped: str | None = None


@dataclasses.dataclass(frozen=True)
class PruningReport:
  """Per-layer pruning reports and totals over the pruned layers.

  `str(report)` is a table: per layer the format, rank, params and MFLOPs
  before and after, and the relative change of the kernel.
  """

  layers: tuple[PruningLayerReport, ...]

  @property
  def pruned(self) -> tuple[PruningLayerReport, ...]:
    """The layers that were considered (not skipped), pruned or not."""
    return tuple(layer for layer in self.layers if layer.skipped is None)

  @property
  def params_before(self) -> int:
    return sum(layer.params_before for layer in self.pruned)

  @property
  def params_after(self) -> int:
    return sum(layer.params_after for layer in self.pruned)

  @property
  def flops_before(self) -> int | None:
    return _surgery.total([layer.flops_before for layer in self.pruned])

  @property
  def flops_after(self) -> int | None:
    return _surgery.total([layer.flops_after for layer in self.pruned])

  @property
  def ranks(self) -> dict[str, Any]:
    """`{"/".join(path): rank_after}` of the layers (JSON-ready): what
    `restore_structure` takes to rebuild the pruned model's structure."""
    return {
      "/".join(map(str, layer.path)): layer.rank_after for layer in self.pruned
    }

  def __str__(self) -> str:
    rows = [
      f"{'layer':<24} {'format':<18} {'rank':<17} {'params':>17}"
      f" {'MFLOPs':>17} {'rel.err':>8}"
    ]
    for layer in self.layers:
      name = "/".join(map(str, layer.path))
      if layer.skipped:
        rows.append(f"{name:<24} {layer.format:<18} skipped: {layer.skipped}")
        continue
      before, after = layer.flops_before, layer.flops_after
      flops = (
        "-"
        if before is None or after is None
        else f"{before / 1e6:.2f}->{after / 1e6:.2f}"
      )
      rank = f"{layer.rank_before}->{layer.rank_after}"
      params = f"{layer.params_before}->{layer.params_after}"
      rows.append(
        f"{name:<24} {layer.format:<18} {rank:<17} {params:>17}"
        f" {flops:>17} {layer.relative_error:>8.4f}"
      )
    return "\n".join(rows)


@dataclasses.dataclass
class Layer:
  """One factorized layer, as pruning sees it.

  Attributes:
    path: where it is in the model.
    factors: its kernel, a format value.
    strides, padding, kernel_dilation, implementation: how it runs.
    input_shape: its recorded input shape, or None.
  """

  path: tuple[Any, ...]
  factors: formats.Format
  strides: Any = 1
  padding: Any = "SAME"
  kernel_dilation: Any = 1
  implementation: str = "auto"
  input_shape: tuple[int, ...] | None = None

  def flops(self, kernel: Any) -> int | None:
    if self.input_shape is None:
      return None
    return _cost.cost(
      kernel,
      self.input_shape,
      strides=self.strides,
      padding=self.padding,
      dilation=self.kernel_dilation,
      implementation=self.implementation,
    ).flops


@jax.jit
def contributions(factors: formats.Format) -> list[jax.Array]:
  """Per bond, `[R]`: `||K_r|| / ||K||`, the Frobenius norm of the kernel
  that component `r` alone adds (the kernel is linear in each slice), over
  the kernel's. Zero exactly when removing the component leaves the kernel
  as it is; independent of how the factors are scaled."""
  cls, params = type(factors), factors.params()
  static = factors._static()
  dense = lambda p: cls._unflatten(static, cls._children(p)).to_dense()
  total = jnp.linalg.norm(dense(params).ravel())
  total = jnp.where(total > 0, total, 1)
  out = []
  for bond in bonds(cls, list(params)):
    name, axis = bond.slices[0]
    size = params[name].shape[axis]

    def alone(r, name=name, axis=axis, size=size):
      mask = jax.nn.one_hot(r, size, dtype=params[name].dtype)
      masked = {**params, name: params[name] * _along(mask, params[name], axis)}
      return jnp.linalg.norm(dense(masked).ravel())

    out.append(jax.lax.map(alone, jnp.arange(size)) / total)
  return out


def _shapes(
  factors: formats.Format, counts: Sequence[int]
) -> dict[str, tuple[int, ...]]:
  """The `params()` shapes of `factors` with `counts[b]` components on
  bond `b`."""
  params = factors.params()
  shapes = {name: list(a.shape) for name, a in params.items()}
  for bond, count in zip(bonds(type(factors), list(params)), counts):
    for name, axis in bond.slices:
      shapes[name][axis] = count
  return {name: tuple(shape) for name, shape in shapes.items()}


def _abstract(factors: formats.Format, counts: Sequence[int]) -> Any:
  cls = type(factors)
  structs = {
    name: jax.ShapeDtypeStruct(shape, factors.dtype)
    for name, shape in _shapes(factors, counts).items()
  }
  return cls._unflatten(factors._static(), cls._children(structs))


def _sliced(factors: formats.Format, keep: Sequence[np.ndarray]) -> Any:
  cls, params = type(factors), factors.params()
  for bond, kept in zip(bonds(cls, list(params)), keep):
    for name, axis in bond.slices:
      params[name] = jnp.take(params[name], jnp.asarray(kept), axis=axis)
  return cls.from_params(params)


def prune_layers(
  fn: str,
  layers: Sequence[Layer],
  *,
  tolerance: float,
  budget: _ranks.Budget | None,
) -> tuple[dict[tuple[Any, ...], formats.Format], PruningReport]:
  """Removes the rank components under `tolerance`, then, with a budget,
  the least contributing ones until the budget is met.

  A component's score is its relative contribution (`contributions`).
  Components scoring at most `tolerance` go; every bond keeps at least its
  best component. With a budget, the remaining components are removed in
  increasing score, across all layers, while the total (params, or FLOPs on
  the recorded inputs) is above the budget's fraction of the layers' dense
  total.

  Returns the pruned layers' new factors by path (those that changed) and
  the report.
  """
  check_tolerance(fn, tolerance)
  if budget is not None:
    if not isinstance(budget, _ranks.Budget):
      raise TypeError(
        f"{fn}: `budget` must be a jaxfactor.Budget, got"
        f" {type(budget).__name__}."
      )
    if budget.flops is not None and any(
      layer.input_shape is None for layer in layers
    ):
      raise ValueError(
        f"{fn}: a FLOP budget needs `inputs` to know each layer's input shape."
      )
  skipped, todo = [], []
  for layer in layers:
    if isinstance(layer.factors, SUPPORTED):
      todo.append(layer)
    else:
      skipped.append(
        PruningLayerReport(
          path=layer.path,
          format=type(layer.factors).__name__,
          input_shape=layer.input_shape,
          skipped=_UNSUPPORTED,
        )
      )
  scores = [
    [np.asarray(s, np.float64) for s in contributions(layer.factors)]
    for layer in todo
  ]
  keep = [
    [_kept(s, tolerance) for s in layer_scores] for layer_scores in scores
  ]
  if budget is not None and todo:
    _meet_budget(fn, todo, scores, keep, budget)
  new, reports = {}, list(skipped)
  for layer, kept in zip(todo, keep):
    before = layer.factors
    after = before
    if any(len(k) < len(s) for k, s in zip(kept, _sizes(before))):
      after = _sliced(before, kept)
      new[layer.path] = after
    change = jnp.linalg.norm((after.to_dense() - before.to_dense()).ravel())
    norm = jnp.linalg.norm(before.to_dense().ravel())
    reports.append(
      PruningLayerReport(
        path=layer.path,
        format=type(before).__name__,
        input_shape=layer.input_shape,
        rank_before=_ranks.rank_of(before),
        rank_after=_ranks.rank_of(after),
        params_before=before.num_params,
        params_after=after.num_params,
        flops_before=layer.flops(before),
        flops_after=layer.flops(after),
        relative_error=float(change / norm) if norm > 0 else float(change),
      )
    )
  order = {layer.path: i for i, layer in enumerate(layers)}
  reports.sort(key=lambda report: order[report.path])
  return new, PruningReport(layers=tuple(reports))


def _sizes(factors: formats.Format) -> list[range]:
  """Per bond, the range of its component indices."""
  params = factors.params()
  return [
    range(params[bond.slices[0][0]].shape[bond.slices[0][1]])
    for bond in bonds(type(factors), list(params))
  ]


def check_tolerance(fn: str, tolerance: Any) -> None:
  if (
    isinstance(tolerance, bool)
    or not isinstance(tolerance, (int, float))
    or not tolerance >= 0
  ):
    raise ValueError(
      f"{fn}: `tolerance` must be a number >= 0 (a relative contribution),"
      f" got {tolerance!r}."
    )


def _kept(scores: np.ndarray, tolerance: float) -> np.ndarray:
  kept = np.flatnonzero(scores > tolerance)
  return kept if kept.size else np.array([int(np.argmax(scores))])


def _meet_budget(
  fn: str,
  layers: Sequence[Layer],
  scores: Sequence[Sequence[np.ndarray]],
  keep: list[list[np.ndarray]],
  budget: _ranks.Budget,
) -> None:
  """Removes components from `keep`, least contributing first, until the
  layers' total meets `budget` (in place)."""
  use_flops = budget.flops is not None
  fraction = float(budget.flops if use_flops else budget.params)  # type: ignore[arg-type]

  def size(i: int, counts: tuple[int, ...]) -> int:
    abstract = _abstract(layers[i].factors, counts)
    if use_flops:
      return layers[i].flops(abstract)  # type: ignore[return-value]
    return abstract.num_params

  def dense(layer: Layer) -> int:
    kernel = jax.ShapeDtypeStruct(layer.factors.shape, layer.factors.dtype)
    return layer.flops(kernel) if use_flops else math.prod(kernel.shape)  # type: ignore[return-value]

  target = fraction * sum(dense(layer) for layer in layers)
  kept = [[list(k) for k in layer_keep] for layer_keep in keep]
  current = [size(i, tuple(map(len, k))) for i, k in enumerate(kept)]
  order = sorted(
    (float(s[r]), i, b, int(r))
    for i, layer_keep in enumerate(keep)
    for b, bond_keep in enumerate(layer_keep)
    for r in bond_keep
    for s in (scores[i][b],)
  )
  for _, i, b, r in order:
    if sum(current) <= target:
      break
    if len(kept[i][b]) == 1:
      continue
    kept[i][b].remove(r)
    current[i] = size(i, tuple(map(len, kept[i])))
  if sum(current) > target:
    kind = "FLOPs" if use_flops else "parameters"
    raise ValueError(
      f"{fn}: the budget ({fraction} of the dense total, {target:.0f}"
      f" {kind}) is below what rank 1 on every bond costs ({sum(current)})."
    )
  for i, layer_keep in enumerate(kept):
    keep[i] = [np.array(sorted(k)) for k in layer_keep]
