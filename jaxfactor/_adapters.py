"""Low-rank adapters: a frozen kernel plus a trained, factorized update.

An adapted convolution computes `conv(x, W) + scale * conv(x, dW)`: `W` is
the frozen kernel (dense, or any format), `dW` a `LowRank` (LoCon), `Tucker`
(LyCORIS's Tucker-LoCon), `CP` or `SpatiallySeparable` value, and
`scale = alpha / rank`. `dW` starts with its last factor at zero, so the
adapted layer starts as exactly the frozen one. A grouped base conv
(`feature_group_count = G`) gets one update per group, stacked on a leading
axis of every factor: the update is block-diagonal, as the base is.

Everything here is a pure function over arrays and format values; the nnx
and linen layers only hold the parameters and call it.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfactor import _convolution
from jaxfactor import _decompose
from jaxfactor import _formats as formats
from jaxfactor import _ranks
from jaxfactor import _validation

ADAPTER_FORMATS: tuple[type[formats.Format], ...] = (
  formats.LowRank,
  formats.Tucker,
  formats.CP,
  formats.SpatiallySeparable,
)

# Non-zero factors start as jaxfactor's layers do (Flax's lecun_normal); the
# last factor starts at zero.
default_init = jax.nn.initializers.lecun_normal()


def adapter_format(fn: str, format: Any) -> type[formats.Format]:
  """The update's format class: `LowRank`, `Tucker`, `CP` or
  `SpatiallySeparable` (a class or its snake_case name)."""
  cls = _ranks.format_class(fn, format)
  if cls not in ADAPTER_FORMATS:
    raise ValueError(
      f"{fn}: `format` {cls.__name__} is not an adapter format: its rank is"
      " a channel multiplier, so its update has at least one filter per"
      " input channel; use one of"
      f" {tuple(c.__name__ for c in ADAPTER_FORMATS)}."
    )
  return cls


def scale_rank(cls: type[formats.Format], rank: Any) -> int:
  """The rank in `scale = alpha / rank`: the size of the axis the last,
  zero-initialised factor sums over (`R_out` for `Tucker`, the last inner
  rank for `SpatiallySeparable`)."""
  if cls in (formats.LowRank, formats.CP):
    return int(rank)
  return int(rank[-1])


def scale(fn: str, cls: type[formats.Format], rank: Any, alpha: Any) -> float:
  """`alpha / rank`; `alpha=None` means `alpha = rank` (scale 1)."""
  if alpha is None:
    return 1.0
  if (
    isinstance(alpha, bool)
    or not isinstance(alpha, (int, float, np.integer, np.floating))
    or not math.isfinite(alpha)
    or alpha <= 0
  ):
    raise ValueError(
      f"{fn}: `alpha` must be a positive number (or None for alpha = rank),"
      f" got {alpha!r}."
    )
  return float(alpha) / scale_rank(cls, rank)


def group_shape(
  fn: str, kernel_shape: Sequence[int], groups: int
) -> tuple[int, ...]:
  """One group's update kernel shape `[*window, C/G, F/G]`, from the base
  kernel's `[*window, C/G, F]` (lax's and Flax's grouped layout)."""
  *window, c, f = kernel_shape
  if groups < 1 or f % groups:
    raise ValueError(
      f"{fn}: a kernel of shape {tuple(kernel_shape)} with"
      f" feature_group_count={groups}: its {f} output features must be a"
      f" multiple of the {groups} groups."
    )
  return (*window, c, f // groups)


def resolve_rank(fn: str, cls, kernel_shape, rank: Any, groups: int) -> Any:
  """The update's static rank for one group of the base kernel."""
  return _ranks.resolve_rank(
    fn, cls, group_shape(fn, kernel_shape, groups), rank
  )


def num_params(cls, kernel_shape, rank: Any, groups: int) -> int:
  """Parameters of the update of a kernel of `kernel_shape`."""
  shape = group_shape("num_params", kernel_shape, groups)
  return groups * _ranks.num_params(shape, cls, rank)


def init(
  key: jax.Array,
  cls: type[formats.Format],
  kernel_shape: Sequence[int],
  rank: Any,
  groups: int,
  dtype: Any,
  initializer: Any = default_init,
) -> dict[str, jax.Array]:
  """Initial update params (`Format.params()` names): the last factor zero,
  the others from `initializer`, each group drawn on its own; with
  `groups > 1` every factor has a leading axis of size `groups`."""
  shapes = cls.param_shapes(group_shape("init", kernel_shape, groups), rank)
  last = list(shapes)[-1]
  keys = jax.random.split(key, len(shapes))
  values = {}
  for (name, shape), k in zip(shapes.items(), keys):
    if name == last:
      value = jnp.zeros(((groups,) if groups > 1 else ()) + shape, dtype)
    elif groups == 1:
      value = initializer(k, shape, dtype)
    else:
      value = jnp.stack(
        [initializer(g, shape, dtype) for g in jax.random.split(k, groups)]
      )
    values[name] = value
  return values


def update_value(
  cls: type[formats.Format], params: Mapping[str, Any], groups: int
) -> formats.Format:
  """The update as a format value; with groups, one stacked on axis 0."""
  params = dict(params)
  if groups == 1:
    return cls.from_params(params)
  return jax.vmap(cls.from_params)(params)


def _check_groups(fn: str, update: formats.Format, groups: int) -> None:
  if groups == 1:
    update.check(fn)
    return
  leading = {
    leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(update)
  }
  if leading != {groups}:
    raise ValueError(
      f"{fn}: with feature_group_count={groups}, every factor of `update`"
      f" must have a leading axis of size {groups} (one update per group),"
      f" got leading sizes {sorted(map(str, leading))}."
    )
  jax.vmap(lambda f: f.check(fn))(update)


def adapter_conv(
  x: jax.typing.ArrayLike,
  update: formats.Format,
  *,
  scale: float | jax.typing.ArrayLike = 1.0,
  feature_group_count: int = 1,
  strides: int | Sequence[int] = 1,
  padding: Any = "SAME",
  dilation: int | Sequence[int] = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
  implementation: str = "auto",
) -> jax.Array:
  """The adapter branch of an adapted convolution: `scale * conv(x, update)`.

  An adapted layer computes `conv(x, W) + adapter_conv(x, dW, ...)` with the
  base layer's own geometry, which equals `conv(x, W + scale *
  dW.to_dense())`. With `feature_group_count = G`, `x`'s channels are split
  into G groups as a grouped convolution splits them, group `g` is
  convolved with its own update (`dW`'s factors stacked on a leading axis
  of size G, e.g. `jax.tree.map(lambda *a: jnp.stack(a), *per_group)`), and
  the outputs are concatenated: the dense update is block-diagonal, as the
  grouped base kernel is (see `merge_update`).

  Args:
    x: `[*batch, *spatial, C]`.
    update: a `LowRank`, `Tucker`, `CP` or `SpatiallySeparable` of shape
      `[*window, C/G, F/G]` (stacked over G groups when G > 1).
    scale: `alpha / rank`, a Python float or a scalar array.
    feature_group_count: G, the base convolution's groups.
    strides: as in `conv`.
    padding: as in `conv`.
    dilation: as in `conv`.
    precision: as in `conv`.
    preferred_element_type: as in `conv`.
    implementation: as in `conv`: the update runs factorized or
      reconstructed.

  Returns:
    `[*batch, *out_spatial, F]`.

  Raises:
    TypeError, ValueError: as `conv`; an update that is not an adapter
      format, or whose factors are not stacked over the G groups.

  References:
    Hu et al., 2021, LoRA, https://arxiv.org/abs/2106.09685; Yeh et al.,
    2024, LyCORIS (LoCon, Tucker-LoCon), https://arxiv.org/abs/2309.14859.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> update = jaxfactor.LowRank(jnp.ones((3, 3, 8, 2)), jnp.zeros((2, 16)))
  >>> jaxfactor.adapter_conv(jnp.ones((1, 9, 9, 8)), update, scale=0.5).shape
  (1, 9, 9, 16)
  """
  fn = "adapter_conv"
  if not isinstance(update, ADAPTER_FORMATS):
    raise TypeError(
      f"{fn}: `update` must be a LowRank, Tucker, CP or SpatiallySeparable,"
      f" got {type(update).__name__}."
    )
  groups = _validation.as_int(fn, "feature_group_count", feature_group_count)
  if groups < 1:
    raise ValueError(
      f"{fn}: `feature_group_count` must be a positive int, got {groups}."
    )
  _check_groups(fn, update, groups)
  geometry = dict(
    strides=strides,
    padding=padding,
    dilation=dilation,
    precision=precision,
    preferred_element_type=preferred_element_type,
    implementation=implementation,
  )
  if groups == 1:
    y = _convolution.conv(x, update, **geometry)
  else:
    x = _validation.check_array(fn, "x", x)
    channels = x.shape[-1]
    if channels % groups:
      raise ValueError(
        f"{fn}: `x` has {channels} channels (shape {tuple(x.shape)}), not a"
        f" multiple of feature_group_count={groups}."
      )
    grouped = jnp.moveaxis(
      jnp.reshape(x, (*x.shape[:-1], groups, channels // groups)), -2, 0
    )
    ys = jax.vmap(lambda xg, fg: _convolution.conv(xg, fg, **geometry))(
      grouped, update
    )  # [G, *batch, *out, F/G]
    y = jnp.moveaxis(ys, 0, -2)
    y = y.reshape((*y.shape[:-2], y.shape[-2] * y.shape[-1]))
  return y * jnp.asarray(scale, y.dtype)


def dense_update(update: formats.Format, groups: int = 1) -> jax.Array:
  """The update's dense kernel in the base kernel's layout `[*window, C/G,
  F]`: group g's `to_dense()` in output channels `g*F/G ...`."""
  if groups == 1:
    return update.to_dense()
  per_group = jax.vmap(lambda f: f.to_dense())(update)  # [G, *w, Cg, Fg]
  stacked = jnp.moveaxis(per_group, 0, -2)  # [*w, Cg, G, Fg]
  return stacked.reshape((*stacked.shape[:-2], -1))


def _scaled(value: jax.Array, scale: Any) -> jax.Array:
  return value * jnp.asarray(scale, value.dtype)


def _block_diagonal(a: jax.Array, b: jax.Array) -> jax.Array:
  """`[..., p, q]` and `[..., r, s]` -> `[..., p + r, q + s]`, zeros off."""
  lead = a.shape[:-2]
  top = jnp.concatenate(
    [a, jnp.zeros((*lead, a.shape[-2], b.shape[-1]), a.dtype)], axis=-1
  )
  bottom = jnp.concatenate(
    [jnp.zeros((*lead, b.shape[-2], a.shape[-1]), b.dtype), b], axis=-1
  )
  return jnp.concatenate([top, bottom], axis=-2)


def concatenate(
  base: formats.Format, update: formats.Format, scale: Any
) -> formats.Format:
  """`base + scale * update` as one value of `base`'s format, exactly.

  The sum of two factorizations of one format is a factorization of the
  summed rank: `LowRank` and `CP` concatenate their factors along the rank,
  `Tucker` also puts the two cores on a block diagonal, and
  `SpatiallySeparable` chains block-diagonal factors. Only `scale` is
  rounded in (it multiplies the update's last factor).

  Raises:
    TypeError: `update` of another format than `base`, or a format whose
      factorizations do not add up this way.
  """
  if isinstance(base, formats.LowRank) and isinstance(update, formats.LowRank):
    return formats.LowRank(
      jnp.concatenate([base.spatial, update.spatial], axis=-1),
      jnp.concatenate([base.pointwise, _scaled(update.pointwise, scale)]),
    )
  if isinstance(base, formats.CP) and isinstance(update, formats.CP):
    return formats.CP(
      jnp.concatenate([base.in_proj, update.in_proj], axis=-1),
      tuple(
        jnp.concatenate([a, b], axis=-1)
        for a, b in zip(base.spatial, update.spatial)
      ),
      jnp.concatenate([base.out_proj, _scaled(update.out_proj, scale)]),
    )
  if isinstance(base, formats.Tucker) and isinstance(update, formats.Tucker):
    return formats.Tucker(
      jnp.concatenate([base.in_proj, update.in_proj], axis=-1),
      _block_diagonal(base.core, update.core),
      jnp.concatenate([base.out_proj, _scaled(update.out_proj, scale)]),
    )
  if isinstance(base, formats.SpatiallySeparable) and isinstance(
    update, formats.SpatiallySeparable
  ):
    first, *middle, last = zip(base.factors, update.factors)
    return formats.SpatiallySeparable(
      (
        jnp.concatenate(first, axis=-1),
        *(_block_diagonal(a, b) for a, b in middle),
        jnp.concatenate([last[0], _scaled(last[1], scale)], axis=-2),
      )
    )
  raise TypeError(
    f"merge: cannot add a {type(update).__name__} update to a"
    f" {type(base).__name__} kernel as one {type(base).__name__}: only"
    " LowRank, CP, Tucker and SpatiallySeparable updates of the kernel's own"
    " format concatenate exactly."
  )


def split(merged: formats.Format, rank: Any) -> formats.Format:
  """The first `rank` of a `concatenate`d value: the base, bit for bit."""
  if isinstance(merged, formats.LowRank):
    return formats.LowRank(merged.spatial[..., :rank], merged.pointwise[:rank])
  if isinstance(merged, formats.CP):
    return formats.CP(
      merged.in_proj[:, :rank],
      tuple(a[:, :rank] for a in merged.spatial),
      merged.out_proj[:rank],
    )
  if isinstance(merged, formats.Tucker):
    a, b = rank
    return formats.Tucker(
      merged.in_proj[:, :a], merged.core[..., :a, :b], merged.out_proj[:b]
    )
  if not isinstance(merged, formats.SpatiallySeparable):
    raise TypeError(
      f"unmerge: a {type(merged).__name__} kernel holds no concatenated"
      " update (see `concatenate`)."
    )
  chain = (merged.in_features, *rank, merged.out_features)
  return formats.SpatiallySeparable(
    tuple(
      factor[:, : chain[i], : chain[i + 1]]
      for i, factor in enumerate(merged.factors)
    )
  )


def merge_update(
  kernel: jax.typing.ArrayLike | formats.Format,
  update: formats.Format,
  *,
  scale: float | jax.typing.ArrayLike = 1.0,
  feature_group_count: int = 1,
) -> jax.Array | formats.Format:
  """Folds an update into its base kernel: `W + scale * dW`, as `W` is held.

  A dense kernel stays dense: `kernel + scale * dW.to_dense()` (block-
  diagonal over the groups of a grouped kernel). A format stays that
  format, exactly: the two factorizations are concatenated along their
  ranks (see the adapters guide), so a rank-`r` `LowRank` base and a
  rank-`s` update give a rank-`r + s` `LowRank`.

  Args:
    kernel: the base kernel: dense `[*window, C/G, F]`, or a format of the
      update's type.
    update: a `LowRank`, `Tucker`, `CP` or `SpatiallySeparable` (stacked
      over the groups when `feature_group_count > 1`).
    scale: `alpha / rank`.
    feature_group_count: the base convolution's groups (dense kernels only).

  Returns:
    A dense kernel of `kernel`'s shape and dtype, or a format of `kernel`'s
    type whose `conv` equals `conv(x, kernel) + adapter_conv(x, update)`.

  Raises:
    ValueError: a format base of another type than the update, or shapes
      that do not match.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> base = jaxfactor.LowRank(jnp.ones((3, 3, 8, 4)), jnp.ones((4, 16)))
  >>> update = jaxfactor.LowRank(jnp.ones((3, 3, 8, 2)), jnp.ones((2, 16)))
  >>> jaxfactor.merge_update(base, update, scale=0.5).rank
  6
  """
  fn = "merge_update"
  if not isinstance(update, ADAPTER_FORMATS):
    raise TypeError(
      f"{fn}: `update` must be a LowRank, Tucker, CP or SpatiallySeparable,"
      f" got {type(update).__name__}."
    )
  groups = _validation.as_int(fn, "feature_group_count", feature_group_count)
  _check_groups(fn, update, groups)
  if isinstance(kernel, formats.Format):
    if type(kernel) is not type(update) or groups != 1:
      raise ValueError(
        f"{fn}: a {type(update).__name__} update has no exact"
        f" {type(kernel).__name__} form of the summed rank; merge an update"
        " of the base's own format (or a dense base)."
      )
    kernel.check(fn)
    if kernel.shape != update.shape:
      raise ValueError(
        f"{fn}: `kernel` has shape {kernel.shape} but `update` has shape"
        f" {update.shape}."
      )
    return concatenate(kernel, update, scale)
  kernel = jnp.asarray(_validation.check_array(fn, "kernel", kernel))
  return merge_dense(fn, kernel, update, scale, groups)


def merge_dense(
  fn: str, kernel: jax.Array, update: formats.Format, scale: Any, groups: int
) -> jax.Array:
  """`kernel + scale * dense_update(update)`, in the kernel's dtype."""
  delta = dense_update(update, groups)
  if tuple(delta.shape) != tuple(kernel.shape):
    raise ValueError(
      f"{fn}: `kernel` has shape {tuple(kernel.shape)} but `update` (with"
      f" feature_group_count={groups}) stands for {tuple(delta.shape)}."
    )
  return kernel + _scaled(delta.astype(kernel.dtype), scale)


def last_factor(cls: type[formats.Format], params: Mapping[str, Any]) -> str:
  """The name of the update's last factor, the one that starts at zero."""
  if cls is formats.SpatiallySeparable:
    return f"factors_{sum(1 for k in params if k.startswith('factors_')) - 1}"
  return "pointwise" if cls is formats.LowRank else "out_proj"


def groups_of(cls: type[formats.Format], params: Mapping[str, Any]) -> int:
  """G from stored update params: their leading axis, if stacked."""
  factor = params[last_factor(cls, params)]
  plain = 3 if cls is formats.SpatiallySeparable else 2
  return int(factor.shape[0]) if factor.ndim == plain + 1 else 1


def rank_dropout(
  cls: type[formats.Format],
  params: Mapping[str, jax.Array],
  rate: float,
  key: jax.Array,
) -> dict[str, jax.Array]:
  """Drops each rank of the update with probability `rate` (one mask per
  call), scaling the kept ones by `1 / (1 - rate)`: the last factor's
  rank axis (axis -2 in every adapter format) is masked."""
  params = dict(params)
  last = last_factor(cls, params)
  factor = params[last]
  rank = factor.shape[-2]
  keep = jax.random.bernoulli(key, 1.0 - rate, (rank,))
  mask = jnp.where(
    keep,
    jnp.asarray(1.0 / (1.0 - rate), factor.dtype),
    jnp.zeros((), factor.dtype),
  )
  shape = [1] * factor.ndim
  shape[-2] = rank
  params[last] = factor * mask.reshape(shape)
  return params


def check_rate(fn: str, name: str, rate: Any) -> float:
  if (
    isinstance(rate, bool)
    or not isinstance(rate, (int, float, np.integer, np.floating))
    or not 0 <= rate < 1
  ):
    raise ValueError(f"{fn}: `{name}` must be in [0, 1), got {rate!r}.")
  return float(rate)


def branch(
  x: jax.Array,
  cls: type[formats.Format],
  params: Mapping[str, jax.Array],
  *,
  scale: Any,
  groups: int,
  rank_dropout_rate: float,
  module_dropout_rate: float,
  key: jax.Array | None,
  **conv_kwargs: Any,
) -> jax.Array:
  """The adapter branch of a layer, with its dropouts (`key` None: off)."""
  if key is not None and rank_dropout_rate > 0:
    key, sub = jax.random.split(key)
    params = rank_dropout(cls, params, rank_dropout_rate, sub)
  y = adapter_conv(
    x,
    update_value(cls, params, groups),
    scale=scale,
    feature_group_count=groups,
    **conv_kwargs,
  )
  if key is not None and module_dropout_rate > 0:
    keep = jax.random.bernoulli(key, 1.0 - module_dropout_rate)
    y = y * keep.astype(y.dtype)
  return y


def pattern_value(fn: str, name: str, value: Any, path: str) -> Any:
  """A per-layer value: `value` itself, or from a `{regex: value}` mapping,
  the first pattern that matches the whole "/"-joined path (None: none)."""
  if not isinstance(value, Mapping):
    return value
  for pattern, chosen in value.items():
    if not isinstance(pattern, str):
      raise TypeError(
        f"{fn}: the keys of a `{name}` pattern must be regular expressions"
        f" (str), got {pattern!r}."
      )
    if re.fullmatch(pattern, path):
      return chosen
  return None


def extract(
  fn: str,
  delta: jax.Array,
  cls: type[formats.Format],
  groups: int,
  *,
  rank: Any,
  energy: float | None,
  alpha: Any,
) -> tuple[Any, float, dict[str, jax.Array]]:
  """The update closest to a kernel difference `delta [*window, C/G, F]`.

  Each group's `delta / scale` is decomposed (`jaxfactor.decompose`:
  Eckart-Young optimal for `LowRank`, and for a 2-D `SpatiallySeparable`);
  with `energy`, at the largest rank any group needs. Returns `(rank,
  scale, params)`, the params stacked over the groups when `groups > 1`.
  """
  shape = group_shape(fn, delta.shape, groups)
  f = shape[-1]
  parts = [delta[..., g * f : (g + 1) * f] for g in range(groups)]
  if energy is not None:
    with warnings.catch_warnings():
      # An update may outgrow the kernel (adapt reports that itself).
      warnings.filterwarnings("ignore", message=".*larger than what it")
      chosen = [
        _decompose.choose_rank(part, cls, energy=energy) for part in parts
      ]
    rank = (
      tuple(max(r) for r in zip(*chosen))
      if isinstance(chosen[0], tuple)
      else max(chosen)
    )
  rank = _ranks.resolve_rank(fn, cls, shape, rank)
  factor = scale(fn, cls, rank, alpha)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*larger than what it")
    values = [
      _decompose.decompose(
        part / jnp.asarray(factor, part.dtype), cls, rank=rank
      )
      for part in parts
    ]
  params = (
    values[0].params()
    if groups == 1
    else jax.tree.map(lambda *a: jnp.stack(a), *values).params()
  )
  return rank, factor, dict(params)


def rank_of(update: formats.Format, groups: int) -> Any:
  """The rank of an update (per group: a stacked update's leading axis is
  not a rank)."""
  if groups > 1:
    update = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), update
    )
  return _ranks.rank_of(update)


def choose(
  fn: str,
  cls: type[formats.Format],
  name: str,
  kernel_shape: Sequence[int],
  groups: int,
  *,
  rank: Any,
  alpha: Any,
  allow_larger: bool,
) -> tuple[Any, Any, str | None]:
  """One layer's `(rank, alpha, None)`, or `(None, None, why)` it gets no
  adapter: no rank pattern matches its "/"-joined path `name`, the rank
  does not exist for its kernel, or (unless `allow_larger`) the update
  would have at least as many parameters as the kernel."""
  layer_rank = pattern_value(fn, "rank", rank, name)
  if layer_rank is None:
    return None, None, "no rank pattern matches its path"
  if cls is formats.SpatiallySeparable and len(kernel_shape) < 4:
    return None, None, "1-D kernel: nothing to separate"
  try:
    layer_rank = resolve_rank(fn, cls, kernel_shape, layer_rank, groups)
  except ValueError as error:
    return None, None, str(error)
  size, dense = (
    num_params(cls, kernel_shape, layer_rank, groups),
    math.prod(kernel_shape),
  )
  if size >= dense and not allow_larger:
    return (
      None,
      None,
      f"an update of rank {layer_rank} has {size} parameters, at least the"
      f" kernel's {dense}: fine-tune the layer instead (pass"
      " allow_larger=True to adapt it anyway)",
    )
  layer_alpha = pattern_value(fn, "alpha", alpha, name)
  scale(fn, cls, layer_rank, layer_alpha)  # checked before any change
  return layer_rank, layer_alpha, None
