"""Low-rank adapters: a frozen kernel plus a trained, factorized update.

An adapted convolution computes `conv(x, W) + scale * conv(x, dW)`: `W` is
the frozen kernel (dense, or any format), `dW` a `LowRank` (LoCon), `Tucker`
(LyCORIS's Tucker-LoCon), `CP` or `SpatiallySeparable` value, and
`scale = alpha / rank`. `dW` starts with its last factor at zero, so the
adapted layer starts as exactly the frozen one. A grouped base conv
(`feature_group_count = G`) gets one update per group, a `jaxfactor.Grouped`
(every factor with a leading groups axis): the update is block-diagonal, as
the base is. `merge_update` folds an update into its base kernel, dense or
a format, the result a kernel of the base's type.

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
  """The update as a format value; with groups, a `jaxfactor.Grouped` of
  them (the params carry the leading groups axis)."""
  params = dict(params)
  if groups == 1:
    return cls.from_params(params)
  return formats.Grouped(jax.vmap(cls.from_params)(params))


def check_update(fn: str, update: Any) -> None:
  """Raises unless `update` is an adapter format, or a `Grouped` of one."""
  inner = update.inner if isinstance(update, formats.Grouped) else update
  if not isinstance(inner, ADAPTER_FORMATS):
    raise TypeError(
      f"{fn}: `update` must be a LowRank, Tucker, CP or SpatiallySeparable"
      " (or a jaxfactor.Grouped of one, for a grouped base), got"
      f" {describe(update)}."
    )
  update.check(fn)


def describe(value: Any) -> str:
  if isinstance(value, formats.Grouped):
    return f"Grouped({type(value.inner).__name__})"
  return type(value).__name__


def adapter_conv(
  x: jax.typing.ArrayLike,
  update: formats.Format,
  *,
  scale: float | jax.typing.ArrayLike = 1.0,
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
  dW.to_dense())`. For a grouped base (`feature_group_count = G`) `dW` is a
  `jaxfactor.Grouped` of G updates, one per group (e.g.
  `jaxfactor.Grouped.stack(per_group)`): group `g`'s input channels go
  through update `g` only, and the dense update is block-diagonal, as the
  grouped base kernel is.

  Args:
    x: `[*batch, *spatial, C]`.
    update: a `LowRank`, `Tucker`, `CP` or `SpatiallySeparable` of shape
      `[*window, C, F]`, or a `Grouped` of one (shape `[*window, C/G, F]`).
    scale: `alpha / rank`, a Python float or a scalar array.
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
      format (or a `Grouped` of one).

  References:
    Hu et al., 2021, LoRA, https://arxiv.org/abs/2106.09685; Yeh et al.,
    2024, LyCORIS (LoCon, Tucker-LoCon), https://arxiv.org/abs/2309.14859.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> update = jaxfactor.LowRank(jnp.ones((3, 3, 8, 2)), jnp.zeros((2, 16)))
  >>> jaxfactor.adapter_conv(jnp.ones((1, 9, 9, 8)), update, scale=0.5).shape
  (1, 9, 9, 16)
  """
  check_update("adapter_conv", update)
  y = _convolution.conv(
    x,
    update,
    strides=strides,
    padding=padding,
    dilation=dilation,
    precision=precision,
    preferred_element_type=preferred_element_type,
    implementation=implementation,
  )
  return y * jnp.asarray(scale, y.dtype)


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


def _cp_taps(update: formats.CP) -> jax.Array:
  """`prod_i A_i[w_i, r]`, `[*window, R]`: the CP's spatial filter per rank."""
  taps = update.spatial[0]
  for a in update.spatial[1:]:
    taps = taps[..., None, :] * a.reshape((1,) * (taps.ndim - 1) + a.shape)
  return taps


def _eye(n: int, like: jax.Array) -> jax.Array:
  return jnp.eye(n, dtype=like.dtype)


def _as_low_rank(update: formats.Format) -> formats.LowRank:
  """A `Tucker` (rank `R_out`: the in-projection folded into the core) or
  a `CP` (rank `R`) as the `LowRank` it is."""
  if isinstance(update, formats.Tucker):
    spatial = jnp.einsum(
      "ca,...ab->...cb",
      update.in_proj,
      update.core,
      precision=jax.lax.Precision.HIGHEST,
    )
    return formats.LowRank(spatial, update.out_proj)
  if isinstance(update, formats.CP):
    taps = _cp_taps(update)
    spatial = taps[..., None, :] * update.in_proj.reshape(
      (1,) * (taps.ndim - 1) + update.in_proj.shape
    )
    return formats.LowRank(spatial, update.out_proj)
  if not isinstance(update, formats.LowRank):
    raise TypeError(
      f"a {type(update).__name__} update has no LowRank form here;"
      " expected LowRank, Tucker or CP."
    )
  return update


def _as_tucker(update: formats.Format) -> formats.Tucker:
  """A `LowRank` (ranks `(C, R)`: an identity in-projection) or a `CP`
  (ranks `(R, R)`: a diagonal, depthwise core) as the `Tucker` it is."""
  if isinstance(update, formats.LowRank):
    return formats.Tucker(
      _eye(update.in_features, update.spatial),
      update.spatial,
      update.pointwise,
    )
  if isinstance(update, formats.CP):
    taps = _cp_taps(update)
    eye = _eye(update.rank, taps)
    core = taps[..., None] * eye.reshape((1,) * (taps.ndim - 1) + eye.shape)
    return formats.Tucker(update.in_proj, core, update.out_proj)
  if not isinstance(update, formats.Tucker):
    raise TypeError(
      f"a {type(update).__name__} update has no Tucker form here;"
      " expected Tucker, LowRank or CP."
    )
  return update


def _as_spatially_separable(update: formats.CP) -> formats.SpatiallySeparable:
  """A `CP` of rank R as the `SpatiallySeparable` of inner ranks `(R, ...,
  R)` it is: the projections folded into the first and last factors, the
  middle factors diagonal."""
  first, *middle, last = update.spatial
  return formats.SpatiallySeparable(
    (
      first[:, None, :] * update.in_proj[None],
      *(a[:, :, None] * _eye(update.rank, a)[None] for a in middle),
      last[:, :, None] * update.out_proj[None],
    )
  )


def _as_depthwise_separable(
  update: formats.Format,
) -> formats.DepthwiseSeparable:
  """A `LowRank` of rank R (or a `Tucker` or `CP`, through their `LowRank`)
  as the `DepthwiseSeparable` of channel multiplier R it is: each input
  channel's R filters, then the R x F pointwise factor for every channel."""
  low_rank = _as_low_rank(update)
  *window, c, r = low_rank.spatial.shape
  pointwise = jnp.broadcast_to(
    low_rank.pointwise[None], (c, r, low_rank.out_features)
  )
  return formats.DepthwiseSeparable(
    low_rank.spatial.reshape((*window, 1, c * r)),
    pointwise.reshape((c * r, low_rank.out_features)),
    channel_multiplier=r,
  )


# (update format, base format) -> the update as a value of the base's
# format, exactly, at ranks that grow with the update's own ranks only
# (and with C for LowRank's identity in-projection in Tucker). The pairs not
# listed have no such form: it needs ranks growing with the window
# (SpatiallySeparable into another format) or the dense kernel's size
# (LowRank or Tucker into CP or SpatiallySeparable; anything into a
# TensorTrain).
_CONVERSIONS: dict[tuple[type, type], Any] = {
  (formats.LowRank, formats.LowRank): lambda u: u,
  (formats.Tucker, formats.LowRank): _as_low_rank,
  (formats.CP, formats.LowRank): _as_low_rank,
  (formats.LowRank, formats.Tucker): _as_tucker,
  (formats.Tucker, formats.Tucker): lambda u: u,
  (formats.CP, formats.Tucker): _as_tucker,
  (formats.CP, formats.CP): lambda u: u,
  (formats.CP, formats.SpatiallySeparable): _as_spatially_separable,
  (formats.SpatiallySeparable, formats.SpatiallySeparable): lambda u: u,
  (formats.LowRank, formats.DepthwiseSeparable): _as_depthwise_separable,
  (formats.Tucker, formats.DepthwiseSeparable): _as_depthwise_separable,
  (formats.CP, formats.DepthwiseSeparable): _as_depthwise_separable,
}


def merges_into(update_cls: type, base_cls: type) -> bool:
  """Whether an update of `update_cls` merges exactly into a base of
  `base_cls` (see `merge_update`)."""
  return (update_cls, base_cls) in _CONVERSIONS


def _names(classes) -> str:
  names = [c.__name__ for c in classes]
  if len(names) < 2:
    return "".join(names)
  return ", ".join(names[:-1]) + " or " + names[-1]


def merge_error(fn: str, update_cls: type, base_cls: type) -> str:
  """Why a `update_cls` update does not merge into a `base_cls` base, and
  what to do instead."""
  into = [b for (u, b) in _CONVERSIONS if u is update_cls]
  merging = [u for (u, b) in _CONVERSIONS if b is base_cls]
  advice = (
    f"adapt it with a {_names(merging)} update (they merge into"
    f" {base_cls.__name__})"
    if merging
    else f"no update format merges into {base_cls.__name__}"
  )
  return (
    f"{fn}: a {update_cls.__name__} update has no exact {base_cls.__name__}"
    " form of a sensible size (its ranks would grow with the window or the"
    f" kernel's size); a {update_cls.__name__} update merges into a dense"
    f" kernel or a {_names(into)} base. For this layer, {advice}, or merge"
    " into its dense kernel: merge_update(base.to_dense(), update)."
  )


def _concatenate_one(base: Any, update: Any, scale: Any) -> formats.Format:
  """`concatenate` for two values of one format."""
  if isinstance(base, formats.LowRank):
    return formats.LowRank(
      jnp.concatenate([base.spatial, update.spatial], axis=-1),
      jnp.concatenate([base.pointwise, _scaled(update.pointwise, scale)]),
    )
  if isinstance(base, formats.CP):
    return formats.CP(
      jnp.concatenate([base.in_proj, update.in_proj], axis=-1),
      tuple(
        jnp.concatenate([a, b], axis=-1)
        for a, b in zip(base.spatial, update.spatial)
      ),
      jnp.concatenate([base.out_proj, _scaled(update.out_proj, scale)]),
    )
  if isinstance(base, formats.Tucker):
    return formats.Tucker(
      jnp.concatenate([base.in_proj, update.in_proj], axis=-1),
      _block_diagonal(base.core, update.core),
      jnp.concatenate([base.out_proj, _scaled(update.out_proj, scale)]),
    )
  if isinstance(base, formats.DepthwiseSeparable):
    # Channel c's filters are c*m ... c*m + m - 1: add each channel's own.
    c, f = base.in_features, base.out_features
    m, r = base.channel_multiplier, update.channel_multiplier
    window = base.window
    depthwise = jnp.concatenate(
      [
        base.depthwise.reshape((*window, 1, c, m)),
        update.depthwise.reshape((*window, 1, c, r)),
      ],
      axis=-1,
    )
    pointwise = jnp.concatenate(
      [
        base.pointwise.reshape((c, m, f)),
        _scaled(update.pointwise, scale).reshape((c, r, f)),
      ],
      axis=1,
    )
    return formats.DepthwiseSeparable(
      depthwise.reshape((*window, 1, c * (m + r))),
      pointwise.reshape((c * (m + r), f)),
      channel_multiplier=m + r,
    )
  assert isinstance(base, formats.SpatiallySeparable)
  first, *middle, last = zip(base.factors, update.factors)
  return formats.SpatiallySeparable(
    (
      jnp.concatenate(first, axis=-1),
      *(_block_diagonal(a, b) for a, b in middle),
      jnp.concatenate([last[0], _scaled(last[1], scale)], axis=-2),
    )
  )


def concatenate(
  base: formats.Format, update: formats.Format, scale: Any
) -> formats.Format:
  """`base + scale * update` as one value of `base`'s format, exactly.

  The update is first written exactly in the base's format (`_CONVERSIONS`),
  then the two factorizations of one format are concatenated along their
  ranks: `LowRank` and `CP` side by side, `Tucker` also with the two cores
  on a block diagonal, `DepthwiseSeparable` each channel's filters side by
  side, `SpatiallySeparable` chaining block-diagonal factors. The base's
  factors come first, unchanged (`split` takes them back out), and only
  `scale` is rounded in (it multiplies the update's last factor). A
  `Grouped` base and update are concatenated group by group.

  Raises:
    TypeError: a pair of formats that does not merge (`merge_error`).
  """
  if isinstance(base, formats.Grouped) and isinstance(update, formats.Grouped):
    return formats.Grouped(
      jax.vmap(lambda b, u: concatenate(b, u, scale))(base.inner, update.inner)
    )
  convert = _CONVERSIONS.get((type(update), type(base)))
  if convert is None:
    raise TypeError(merge_error("merge", type(update), type(base)))
  return _concatenate_one(base, convert(update), scale)


def split(merged: formats.Format, rank: Any) -> formats.Format:
  """The base of a `concatenate`d value, whose rank was `rank`: the base's
  own factors, bit for bit."""
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
  if isinstance(merged, formats.DepthwiseSeparable):
    c, f, window = merged.in_features, merged.out_features, merged.window
    total = merged.channel_multiplier
    depthwise = merged.depthwise.reshape((*window, 1, c, total))[..., :rank]
    pointwise = merged.pointwise.reshape((c, total, f))[:, :rank]
    return formats.DepthwiseSeparable(
      depthwise.reshape((*window, 1, c * rank)),
      pointwise.reshape((c * rank, f)),
      channel_multiplier=rank,
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
) -> jax.Array | formats.Format:
  """Folds an update into its base kernel: `W + scale * dW`, as `W` is held.

  A dense kernel stays dense: `kernel + scale * dW.to_dense()` (for a
  grouped kernel `[*window, C/G, F]` and a `Grouped` update, the update's
  block-diagonal dense kernel). A format stays that format, exactly: the
  update is written exactly in the base's format, then the two
  factorizations are concatenated along their ranks, the base's factors
  first and unchanged. The pairs that merge, with the ranks they give for
  a base of rank `r` (`(a, b)` for a `Tucker`, channel multiplier `m` for
  a `DepthwiseSeparable`):

  - a `LowRank` update of rank `s` into `LowRank` (`r + s`), `Tucker`
    (`(a + C, b + s)`: an identity in-projection) or `DepthwiseSeparable`
    (`m + s`);
  - a `Tucker` update of ranks `(c, d)` into `LowRank` (`r + d`: its
    in-projection folded into the core), `Tucker` (`(a + c, b + d)`) or
    `DepthwiseSeparable` (`m + d`);
  - a `CP` update of rank `s` into `LowRank` (`r + s`), `Tucker` (`(a + s,
    b + s)`: a diagonal core), `CP` (`r + s`), `SpatiallySeparable` (each
    inner rank `+ s`) or `DepthwiseSeparable` (`m + s`);
  - a `SpatiallySeparable` update into `SpatiallySeparable` (inner ranks
    added).

  Any other pair would need ranks that grow with the window or the
  kernel's size, and raises. A `Grouped` base takes a `Grouped` update of
  as many groups, group by group.

  Args:
    kernel: the base kernel: dense `[*window, C/G, F]`, or a format.
    update: a `LowRank`, `Tucker`, `CP` or `SpatiallySeparable`, or a
      `Grouped` of one for a grouped base.
    scale: `alpha / rank`.

  Returns:
    A dense kernel of `kernel`'s shape and dtype, or a format of `kernel`'s
    type whose `conv` equals `conv(x, kernel) + adapter_conv(x, update)`.

  Raises:
    ValueError: a pair of formats that does not merge (the message says
      which do), or shapes that do not match.
    TypeError: an update that is not an adapter format.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> base = jaxfactor.LowRank(jnp.ones((3, 3, 8, 4)), jnp.ones((4, 16)))
  >>> update = jaxfactor.Tucker(
  ...     jnp.ones((8, 2)), jnp.ones((3, 3, 2, 3)), jnp.ones((3, 16)))
  >>> jaxfactor.merge_update(base, update, scale=0.5).rank
  7
  """
  fn = "merge_update"
  check_update(fn, update)
  if not isinstance(kernel, formats.Format):
    kernel = jnp.asarray(_validation.check_array(fn, "kernel", kernel))
    return merge_dense(fn, kernel, update, scale)
  kernel.check(fn)
  if isinstance(kernel, formats.Grouped) != isinstance(
    update, formats.Grouped
  ) or (kernel.groups != update.groups):
    raise ValueError(
      f"{fn}: a {describe(update)} update with {update.groups} group(s)"
      f" does not fit a {describe(kernel)} kernel with {kernel.groups}:"
      " a grouped kernel takes a jaxfactor.Grouped update of as many"
      " groups, an ungrouped one an ungrouped update."
    )
  if kernel.shape != update.shape:
    raise ValueError(
      f"{fn}: `kernel` has shape {kernel.shape} but `update` has shape"
      f" {update.shape}."
    )
  pair = (
    (type(update.inner), type(kernel.inner))
    if isinstance(kernel, formats.Grouped)
    and isinstance(update, formats.Grouped)
    else (type(update), type(kernel))
  )
  if not merges_into(*pair):
    raise ValueError(merge_error(fn, *pair))
  return concatenate(kernel, update, scale)


BASE_FORMATS: tuple[type[formats.Format], ...] = (
  formats.LowRank,
  formats.Tucker,
  formats.CP,
  formats.SpatiallySeparable,
  formats.DepthwiseSeparable,
  formats.TensorTrain,
)


def factors_of(
  params: Mapping[str, Any], in_features: int
) -> formats.Format | None:
  """The format value a factorized layer's params dict holds (its `bias`
  and `adapter_*` params aside; their names tell the format), or None."""
  factors = {
    k: v for k, v in params.items() if k != "bias" and "adapter_" not in k
  }
  for cls in BASE_FORMATS:
    if {cls.field_of(k) for k in factors} == set(cls._fields):
      static = (
        {"channel_multiplier": factors["depthwise"].shape[-1] // in_features}
        if cls is formats.DepthwiseSeparable
        else {}
      )
      return cls.from_params(factors, **static)
  return None


def merge_dense(
  fn: str, kernel: jax.Array, update: formats.Format, scale: Any
) -> jax.Array:
  """`kernel + scale * update.to_dense()`, in the kernel's dtype."""
  if tuple(update.shape) != tuple(kernel.shape):
    raise ValueError(
      f"{fn}: `kernel` has shape {tuple(kernel.shape)} but `update`"
      f" ({describe(update)}, {update.groups} group(s)) stands for"
      f" {tuple(update.shape)}."
    )
  return kernel + _scaled(update.to_dense().astype(kernel.dtype), scale)


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


def rank_of(update: formats.Format) -> Any:
  """The rank of an update (per group, for a `Grouped` one)."""
  if isinstance(update, formats.Grouped):
    update = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), update.inner
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
