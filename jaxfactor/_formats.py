"""Factorized convolution kernels: immutable pytrees of factor arrays.

A format *is* a convolution kernel stored in pieces. `to_dense()` returns the
HWIO kernel `[*window, C, F]` it stands for, and `jaxfactor.conv(x, f)` equals
the dense convolution with that kernel for every geometry. Each format also
lists the chain of `lax` stages that computes it without reconstruction
(`_stages.Pointwise` / `_stages.SpatialConv` / `_stages.CoreContraction`);
`conv` runs that chain and `cost` counts it.

Formats are registered pytrees (leaves: the factor arrays, in field order), so
they pass through `jax.jit`, `jax.vmap`, `jax.grad`, `jax.tree.map` and
`flax.serialization`. Constructors validate; pytree unflattening does not (JAX
rebuilds pytrees with placeholder leaves), so `conv`, `cost` and `to_dense`
validate again at trace time.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import serialization
from jax import lax

from jaxfactor import _stages
from jaxfactor import _validation

# `to_dense` is a handful of small contractions; run them at full precision so
# the reconstructed kernel is exact on TPU/GPU too (where the default
# precision of float32 matmuls is lower).
_HIGHEST = lax.Precision.HIGHEST


class Format(abc.ABC):
  """Base class of factorized convolution kernels.

  Subclasses declare `_fields` (pytree children, in order; a field may hold a
  tuple of arrays) and `_static_fields` (hashable metadata, part of the pytree
  structure), and implement the abstract members.
  """

  _fields: ClassVar[tuple[str, ...]] = ()
  _tuple_fields: ClassVar[tuple[str, ...]] = ()
  _static_fields: ClassVar[tuple[str, ...]] = ()

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    jax.tree_util.register_pytree_with_keys(
      cls, cls._flatten_with_keys, cls._unflatten, cls._flatten
    )
    serialization.register_serialization_state(
      cls, _to_state_dict, _from_state_dict
    )
    # So that an exported function taking a format can be serialized.
    jax.export.register_pytree_node_serialization(
      cls,
      serialized_name=f"jaxfactor.{cls.__name__}",
      serialize_auxdata=lambda static: json.dumps(static).encode(),
      deserialize_auxdata=lambda data: tuple(json.loads(data)),
    )

  # --- pytree protocol -------------------------------------------------------

  def _flatten(self):
    return tuple(getattr(self, f) for f in self._fields), self._static()

  def _flatten_with_keys(self):
    children = tuple(
      (jax.tree_util.GetAttrKey(f), getattr(self, f)) for f in self._fields
    )
    return children, self._static()

  def _static(self):
    return tuple(getattr(self, f) for f in self._static_fields)

  @classmethod
  def _unflatten(cls, static, children):
    obj = object.__new__(cls)
    for name, value in zip(cls._static_fields, static):
      object.__setattr__(obj, name, value)
    for name, value in zip(cls._fields, children):
      object.__setattr__(obj, name, value)
    return obj

  # --- immutability ----------------------------------------------------------

  def __setattr__(self, name, value):
    raise AttributeError(
      f"{type(self).__name__} is immutable; use"
      f" .replace({name}=...) to get a modified copy."
    )

  def replace(self, **changes: Any) -> Format:
    """Returns a copy with some fields replaced (validated like `__init__`)."""
    unknown = set(changes) - set(self._fields + self._static_fields)
    if unknown:
      raise TypeError(
        f"{type(self).__name__}.replace: unknown fields {sorted(unknown)};"
        f" the fields are {self._fields + self._static_fields}."
      )
    values = {f: getattr(self, f) for f in self._fields + self._static_fields}
    return type(self)(**{**values, **changes})

  def _set_fields(self, fn: str, **values: Any) -> None:
    for name, value in values.items():
      if name in self._static_fields:
        object.__setattr__(self, name, value)
      elif name in self._tuple_fields:
        object.__setattr__(
          self,
          name,
          tuple(_as_factor(fn, f"{name}[{i}]", v) for i, v in enumerate(value)),
        )
      else:
        object.__setattr__(self, name, _as_factor(fn, name, value))
    self.check(fn)

  def __repr__(self) -> str:
    parts = [f"{f}={_describe(getattr(self, f))}" for f in self._fields] + [
      f"{f}={getattr(self, f)!r}" for f in self._static_fields
    ]
    return f"{type(self).__name__}({', '.join(parts)})"

  # --- shared properties -----------------------------------------------------

  @property
  @abc.abstractmethod
  def window(self) -> tuple[int, ...]:
    """The spatial window `(k_1, ..., k_N)` of the dense kernel."""

  @property
  @abc.abstractmethod
  def in_features(self) -> int:
    """`C`, the number of input channels."""

  @property
  @abc.abstractmethod
  def out_features(self) -> int:
    """`F`, the number of output channels."""

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the dense HWIO kernel, `(*window, C, F)`."""
    return (*self.window, self.in_features, self.out_features)

  @property
  def groups(self) -> int:
    """Channel groups of the convolution (`feature_group_count`): 1, but
    for `Grouped`."""
    return 1

  @property
  def num_spatial_dims(self) -> int:
    return len(self.window)

  @property
  def dtype(self) -> Any:
    leaves = jax.tree.leaves(self)
    if not leaves:
      raise ValueError(
        f"{type(self).__name__}.dtype: the format has no array"
        " leaves (were they mapped to None?)."
      )
    return leaves[0].dtype

  @property
  def num_params(self) -> int:
    """Number of stored parameters (the sum of the factors' sizes)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(self))

  # --- behaviour -------------------------------------------------------------

  def check(self, fn: str, *, abstract: bool = False) -> None:
    """Raises unless the factors are floating arrays of one dtype that chain.

    Args:
      fn: the public function to name in error messages.
      abstract: also accept leaves that only carry `.shape` and `.dtype`
        (e.g. `jax.ShapeDtypeStruct`, for `cost`).
    """
    fmt = type(self).__name__
    named = []
    for name in self._fields:
      value = getattr(self, name)
      if name in self._tuple_fields:
        if not isinstance(value, tuple):
          raise TypeError(
            f"{fn}: `{fmt}.{name}` must be a tuple of arrays, got"
            f" {type(value).__name__}."
          )
        named += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
      else:
        named.append((name, value))
    for name, value in named:
      if not (abstract and hasattr(value, "shape") and hasattr(value, "dtype")):
        _validation.check_array(fn, f"{fmt}.{name}", value)
      _validation.check_floating(fn, f"{fmt}.{name}", value)
      _validation.check_positive_dims(fn, f"{fmt}.{name}", value.shape)
    _validation.check_same_dtype(fn, named)
    self._check_shapes(fn, fmt)

  def params(self) -> dict[str, jax.Array]:
    """The factors as a flat dict: the field names, a tuple field's entries
    as `{field}_{i}` (the parameter names of the Flax modules)."""
    out = {}
    for name in self._fields:
      value = getattr(self, name)
      if name in self._tuple_fields:
        out.update({f"{name}_{i}": v for i, v in enumerate(value)})
      else:
        out[name] = value
    return out

  @classmethod
  def field_of(cls, param_name: str) -> str:
    """The field a `params()` name belongs to (`spatial_1` -> `spatial`)."""
    if param_name in cls._fields:
      return param_name
    return param_name.rsplit("_", 1)[0]

  @classmethod
  def _children(cls, params: dict[str, Any]) -> list[Any]:
    """`params()`-style flat dict -> field values, tuple fields regrouped."""
    children = []
    for name in cls._fields:
      if name in cls._tuple_fields:
        count = sum(1 for key in params if key.startswith(f"{name}_"))
        children.append(tuple(params[f"{name}_{i}"] for i in range(count)))
      else:
        children.append(params[name])
    return children

  @classmethod
  def from_params(cls, params: dict[str, Any], **static: Any) -> Format:
    """Inverse of `params()`; `static` gives the static fields (if any)."""
    return cls(**dict(zip(cls._fields, cls._children(params))), **static)

  @classmethod
  def abstract(
    cls, kernel_shape: Sequence[int], rank: Any, dtype: Any
  ) -> Format:
    """A format of `jax.ShapeDtypeStruct` leaves (for `cost`, no arrays)."""
    structs = {
      name: jax.ShapeDtypeStruct(shape, dtype)
      for name, shape in cls.param_shapes(kernel_shape, rank).items()
    }
    static = (rank,) if cls._static_fields else ()
    return cls._unflatten(static, cls._children(structs))

  @classmethod
  @abc.abstractmethod
  def param_shapes(
    cls, kernel_shape: Sequence[int], rank: Any
  ) -> dict[str, tuple[int, ...]]:
    """Shapes of `params()` for a dense kernel shape and a rank (as in
    `jaxfactor.max_rank`: an int, or a tuple for Tucker, SpatiallySeparable
    and TensorTrain (whose channel modes are then the default split in
    `len(rank)`); the channel multiplier for DepthwiseSeparable)."""

  @abc.abstractmethod
  def _check_shapes(self, fn: str, fmt: str) -> None:
    """Raises ValueError unless the factor shapes chain."""

  @abc.abstractmethod
  def stages(self) -> list[_stages.Stage]:
    """The chain of `lax` stages that applies this kernel, factor by factor."""

  @abc.abstractmethod
  def to_dense(self) -> jax.Array:
    """The dense HWIO kernel `[*window, C, F]` this format stands for."""

  @abc.abstractmethod
  def to_dense_flops(self) -> int:
    """FLOPs that `to_dense()` spends (multiply-add = 2, as XLA counts)."""


def _as_factor(fn: str, name: str, value: Any) -> jax.Array:
  _validation.check_array(fn, name, value)
  return jnp.asarray(value)


def _reshape(a: Any, shape: tuple[int, ...]) -> Any:
  """`a.reshape(shape)`, also for abstract `jax.ShapeDtypeStruct` leaves."""
  if isinstance(a, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(shape, a.dtype)
  return a.reshape(shape)


def _lift(a: jax.Array, ndim: int) -> jax.Array:
  """Adds leading unit axes: explicit broadcasting, as strict mode requires."""
  return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def _describe(value: Any) -> str:
  if isinstance(value, Format):
    return repr(value)
  if isinstance(value, tuple):
    return "(" + ", ".join(_describe(v) for v in value) + ")"
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    return f"{jnp.dtype(value.dtype).name}{list(value.shape)}"
  return repr(value)


def _to_state_dict(fmt: Format) -> dict[str, Any]:
  return {f: serialization.to_state_dict(getattr(fmt, f)) for f in fmt._fields}


def _restore(target: Format, state: dict[str, Any]) -> Format:
  """`target` with `state`'s leaves, unchecked (a `Grouped`'s inner format
  alone would not pass its own checks, its factors carrying a groups axis)."""
  children = []
  for f in target._fields:
    value = getattr(target, f)
    if isinstance(value, Format):
      children.append(_restore(value, state[f]))
    else:
      children.append(serialization.from_state_dict(value, state[f], name=f))
  return type(target)._unflatten(target._static(), children)


def _from_state_dict(target: Format, state: dict[str, Any]) -> Format:
  restored = _restore(target, state)
  restored.check("from_state_dict", abstract=True)
  return restored


def _check_rank(fn: str, name: str, value: jax.Array, ndim: int, layout: str):
  _validation.check_ndim(fn, name, value, ndim, layout)


class DepthwiseSeparable(Format):
  """Depthwise-separable kernel: a depthwise conv, then a pointwise (1x1) conv.

  `K[*w, c, f] = sum_j D[*w, 0, c*m + j] * P[c*m + j, f]`, with `k * C * m +
  C * m * F` parameters for `k = prod(window)`, against `k * C * F` dense.

  Attributes:
    depthwise: `[*window, 1, C*m]`, lax/Flax's depthwise layout: output
      channel `c*m + j` filters input channel `c`.
    pointwise: `[C*m, F]`.
    channel_multiplier: `m` (static). `C = depthwise.shape[-1] // m`.

  References:
    Howard et al., 2017, MobileNets, https://arxiv.org/abs/1704.04861;
    Chollet, 2017, Xception, https://arxiv.org/abs/1610.02357.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> f = jaxfactor.DepthwiseSeparable(
  ...     jnp.ones((3, 3, 1, 8)), jnp.ones((8, 16)), channel_multiplier=2)
  >>> f.shape, f.num_params
  ((3, 3, 4, 16), 200)
  """

  _fields = ("depthwise", "pointwise")
  _static_fields = ("channel_multiplier",)
  depthwise: jax.Array
  pointwise: jax.Array
  channel_multiplier: int

  def __init__(self, depthwise, pointwise, *, channel_multiplier: int = 1):
    channel_multiplier = _validation.as_int(
      "DepthwiseSeparable", "channel_multiplier", channel_multiplier
    )
    if channel_multiplier < 1:
      raise ValueError(
        "DepthwiseSeparable: `channel_multiplier` must be a positive int,"
        f" got {channel_multiplier!r}."
      )
    self._set_fields(
      "DepthwiseSeparable",
      channel_multiplier=channel_multiplier,
      depthwise=depthwise,
      pointwise=pointwise,
    )

  def _check_shapes(self, fn, fmt):
    dw, pw, m = self.depthwise, self.pointwise, self.channel_multiplier
    if dw.ndim < 3 or dw.shape[-2] != 1 or dw.shape[-1] % m:
      raise ValueError(
        f"{_validation.scope(fn, fmt)} `depthwise` must have shape"
        " [*window, 1, C*m] with"
        f" channel_multiplier m={m}, got shape {tuple(dw.shape)}."
      )
    _check_rank(fn, "pointwise", pw, 2, "[C*m, F]")
    _validation.check_chain(
      fn, fmt, "depthwise", dw.shape, -1, "pointwise", pw.shape, 0
    )

  @property
  def window(self):
    return tuple(self.depthwise.shape[:-2])

  @property
  def in_features(self):
    return self.depthwise.shape[-1] // self.channel_multiplier

  @property
  def out_features(self):
    return self.pointwise.shape[-1]

  @classmethod
  def param_shapes(cls, kernel_shape, rank):
    *window, c, f = kernel_shape
    return {"depthwise": (*window, 1, c * rank), "pointwise": (c * rank, f)}

  def stages(self):
    axes = tuple(range(self.num_spatial_dims))
    return [
      _stages.SpatialConv(self.depthwise, axes, self.in_features),
      _stages.Pointwise(self.pointwise),
    ]

  def to_dense(self):
    self.check("to_dense")
    c, m = self.in_features, self.channel_multiplier
    dw = self.depthwise.reshape((*self.window, c, m))
    pw = self.pointwise.reshape((c, m, self.out_features))
    return jnp.einsum("...cj,cjf->...cf", dw, pw, precision=_HIGHEST)

  def to_dense_flops(self):
    return 2 * math.prod(self.shape) * self.channel_multiplier


class SpatiallySeparable(Format):
  """Spatially separable kernel: one 1-D convolution per spatial axis.

  Factor `i` convolves along spatial axis `i` from `R_{i-1}` to `R_i`
  channels (`R_0 = C`, `R_N = F`): a `k_h x 1` then a `1 x k_w` conv for 2-D.
  `sum_i k_i * R_{i-1} * R_i` parameters.

  Attributes:
    factors: N arrays, factor `i` of shape `[k_i, R_{i-1}, R_i]`.

  References:
    Jaderberg et al., 2014, Speeding up Convolutional Neural Networks with Low
    Rank Expansions, https://arxiv.org/abs/1405.3866; Szegedy et al., 2016,
    Inception-v3, https://arxiv.org/abs/1512.00567.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> f = jaxfactor.SpatiallySeparable(
  ...     (jnp.ones((3, 4, 6)), jnp.ones((3, 6, 8))))
  >>> f.shape, f.ranks, f.num_params
  ((3, 3, 4, 8), (6,), 216)
  """

  _fields = ("factors",)
  _tuple_fields = ("factors",)
  factors: tuple[jax.Array, ...]

  def __init__(self, factors: Sequence[jax.typing.ArrayLike]):
    if not isinstance(factors, (tuple, list)) or not factors:
      raise TypeError(
        "SpatiallySeparable: `factors` must be a non-empty tuple of arrays"
        f" (one per spatial axis), got {type(factors).__name__}."
      )
    self._set_fields("SpatiallySeparable", factors=factors)

  def _check_shapes(self, fn, fmt):
    for i, factor in enumerate(self.factors):
      _check_rank(fn, f"factors[{i}]", factor, 3, "[k_i, R_in, R_out]")
    for i in range(1, len(self.factors)):
      _validation.check_chain(
        fn,
        fmt,
        f"factors[{i - 1}]",
        self.factors[i - 1].shape,
        2,
        f"factors[{i}]",
        self.factors[i].shape,
        1,
      )

  @property
  def window(self):
    return tuple(f.shape[0] for f in self.factors)

  @property
  def in_features(self):
    return self.factors[0].shape[1]

  @property
  def out_features(self):
    return self.factors[-1].shape[2]

  @property
  def ranks(self) -> tuple[int, ...]:
    """The inner ranks `(R_1, ..., R_{N-1})`."""
    return tuple(f.shape[2] for f in self.factors[:-1])

  @classmethod
  def param_shapes(cls, kernel_shape, rank):
    *window, c, f = kernel_shape
    chain = (c, *rank, f)
    return {
      f"factors_{i}": (k, chain[i], chain[i + 1]) for i, k in enumerate(window)
    }

  def stages(self):
    return [
      _stages.SpatialConv(factor, (axis,))
      for axis, factor in enumerate(self.factors)
    ]

  def to_dense(self):
    self.check("to_dense")
    kernel = self.factors[0]
    for factor in self.factors[1:]:
      kernel = jnp.einsum(
        "...cr,wrs->...wcs", kernel, factor, precision=_HIGHEST
      )
    return kernel

  def to_dense_flops(self):
    flops, taps = 0, self.window[0]
    for factor in self.factors[1:]:
      k, r_in, r_out = factor.shape
      flops += 2 * taps * self.in_features * r_in * k * r_out
      taps *= k
    return flops


class LowRank(Format):
  """Low-rank kernel: a k x k conv into R channels, then a 1x1 conv to F.

  `K[*w, c, f] = sum_r S[*w, c, r] * P[r, f]`: the `(k*C) x F` filter matrix as
  a product of rank `R`, with `k * C * R + R * F` parameters.

  Attributes:
    spatial: `[*window, C, R]`.
    pointwise: `[R, F]`.

  References:
    Zhang et al., 2016, Accelerating Very Deep Convolutional Networks for
    Classification and Detection, https://arxiv.org/abs/1505.06798.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> f = jaxfactor.LowRank(jnp.ones((3, 3, 4, 2)), jnp.ones((2, 8)))
  >>> f.shape, f.rank, f.num_params
  ((3, 3, 4, 8), 2, 88)
  """

  _fields = ("spatial", "pointwise")
  spatial: jax.Array
  pointwise: jax.Array

  def __init__(self, spatial, pointwise):
    self._set_fields("LowRank", spatial=spatial, pointwise=pointwise)

  def _check_shapes(self, fn, fmt):
    if self.spatial.ndim < 3:
      raise ValueError(
        f"{_validation.scope(fn, fmt)} `spatial` must have shape"
        " [*window, C, R] (rank >= 3),"
        f" got shape {tuple(self.spatial.shape)}."
      )
    _check_rank(fn, "pointwise", self.pointwise, 2, "[R, F]")
    _validation.check_chain(
      fn,
      fmt,
      "spatial",
      self.spatial.shape,
      -1,
      "pointwise",
      self.pointwise.shape,
      0,
    )

  @property
  def window(self):
    return tuple(self.spatial.shape[:-2])

  @property
  def in_features(self):
    return self.spatial.shape[-2]

  @property
  def out_features(self):
    return self.pointwise.shape[-1]

  @property
  def rank(self) -> int:
    return self.pointwise.shape[0]

  @classmethod
  def param_shapes(cls, kernel_shape, rank):
    *window, c, f = kernel_shape
    return {"spatial": (*window, c, rank), "pointwise": (rank, f)}

  def stages(self):
    axes = tuple(range(self.num_spatial_dims))
    return [
      _stages.SpatialConv(self.spatial, axes),
      _stages.Pointwise(self.pointwise),
    ]

  def to_dense(self):
    self.check("to_dense")
    return jnp.einsum(
      "...cr,rf->...cf", self.spatial, self.pointwise, precision=_HIGHEST
    )

  def to_dense_flops(self):
    return 2 * math.prod(self.shape) * self.rank


class Tucker(Format):
  """Tucker-2 kernel: 1x1 conv C -> R_in, k x k conv R_in -> R_out, 1x1 to F.

  `K[*w, c, f] = sum_{a,b} U[c, a] * G[*w, a, b] * V[b, f]`, with
  `C * R_in + k * R_in * R_out + R_out * F` parameters.

  Attributes:
    in_proj: `U`, `[C, R_in]`.
    core: `G`, `[*window, R_in, R_out]`.
    out_proj: `V`, `[R_out, F]`.

  References:
    Kim et al., 2016, Compression of Deep Convolutional Neural Networks for
    Fast and Low Power Mobile Applications, https://arxiv.org/abs/1511.06530.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> f = jaxfactor.Tucker(
  ...     jnp.ones((8, 2)), jnp.ones((3, 3, 2, 3)), jnp.ones((3, 16)))
  >>> f.shape, f.ranks, f.num_params
  ((3, 3, 8, 16), (2, 3), 118)
  """

  _fields = ("in_proj", "core", "out_proj")
  in_proj: jax.Array
  core: jax.Array
  out_proj: jax.Array

  def __init__(self, in_proj, core, out_proj):
    self._set_fields("Tucker", in_proj=in_proj, core=core, out_proj=out_proj)

  def _check_shapes(self, fn, fmt):
    _check_rank(fn, "in_proj", self.in_proj, 2, "[C, R_in]")
    if self.core.ndim < 3:
      raise ValueError(
        f"{_validation.scope(fn, fmt)} `core` must have shape"
        " [*window, R_in, R_out] (rank"
        f" >= 3), got shape {tuple(self.core.shape)}."
      )
    _check_rank(fn, "out_proj", self.out_proj, 2, "[R_out, F]")
    _validation.check_chain(
      fn, fmt, "in_proj", self.in_proj.shape, 1, "core", self.core.shape, -2
    )
    _validation.check_chain(
      fn,
      fmt,
      "core",
      self.core.shape,
      -1,
      "out_proj",
      self.out_proj.shape,
      0,
    )

  @property
  def window(self):
    return tuple(self.core.shape[:-2])

  @property
  def in_features(self):
    return self.in_proj.shape[0]

  @property
  def out_features(self):
    return self.out_proj.shape[1]

  @property
  def in_rank(self) -> int:
    return self.in_proj.shape[1]

  @property
  def out_rank(self) -> int:
    return self.out_proj.shape[0]

  @property
  def ranks(self) -> tuple[int, int]:
    return (self.in_rank, self.out_rank)

  @classmethod
  def param_shapes(cls, kernel_shape, rank):
    *window, c, f = kernel_shape
    a, b = rank
    return {"in_proj": (c, a), "core": (*window, a, b), "out_proj": (b, f)}

  def stages(self):
    axes = tuple(range(self.num_spatial_dims))
    return [
      _stages.Pointwise(self.in_proj),
      _stages.SpatialConv(self.core, axes),
      _stages.Pointwise(self.out_proj),
    ]

  def _out_first(self) -> tuple[bool, int]:
    """Contraction order of `to_dense` with fewer FLOPs, and those FLOPs."""
    k = math.prod(self.window)
    c, f, a, b = (
      self.in_features,
      self.out_features,
      self.in_rank,
      self.out_rank,
    )
    out_first = 2 * k * a * b * f + 2 * k * c * a * f
    in_first = 2 * c * a * k * b + 2 * k * c * b * f
    return out_first <= in_first, min(out_first, in_first)

  def to_dense(self):
    self.check("to_dense")
    if self._out_first()[0]:
      kernel = jnp.einsum(
        "...ab,bf->...af", self.core, self.out_proj, precision=_HIGHEST
      )
      return jnp.einsum(
        "ca,...af->...cf", self.in_proj, kernel, precision=_HIGHEST
      )
    kernel = jnp.einsum(
      "ca,...ab->...cb", self.in_proj, self.core, precision=_HIGHEST
    )
    return jnp.einsum(
      "...cb,bf->...cf", kernel, self.out_proj, precision=_HIGHEST
    )

  def to_dense_flops(self):
    return self._out_first()[1]


class CP(Format):
  """CP (canonical polyadic) kernel: 1x1, one depthwise 1-D conv per axis, 1x1.

  `K[*w, c, f] = sum_r U[c, r] * prod_i A_i[w_i, r] * V[r, f]`, with
  `(C + sum_i k_i + F) * R` parameters: a 1x1 conv C -> R, a depthwise
  `k_i`-tap conv along each spatial axis on the R channels, a 1x1 conv R -> F.

  Attributes:
    in_proj: `U`, `[C, R]`.
    spatial: N arrays, `A_i` of shape `[k_i, R]`.
    out_proj: `V`, `[R, F]`.

  References:
    Lebedev et al., 2015, Speeding-up Convolutional Neural Networks Using
    Fine-tuned CP-Decomposition, https://arxiv.org/abs/1412.6553.

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> f = jaxfactor.CP(
  ...     jnp.ones((8, 4)), (jnp.ones((3, 4)), jnp.ones((3, 4))),
  ...     jnp.ones((4, 16)))
  >>> f.shape, f.rank, f.num_params
  ((3, 3, 8, 16), 4, 120)
  """

  _fields = ("in_proj", "spatial", "out_proj")
  _tuple_fields = ("spatial",)
  in_proj: jax.Array
  spatial: tuple[jax.Array, ...]
  out_proj: jax.Array

  def __init__(
    self, in_proj, spatial: Sequence[jax.typing.ArrayLike], out_proj
  ):
    if not isinstance(spatial, (tuple, list)) or not spatial:
      raise TypeError(
        "CP: `spatial` must be a non-empty tuple of arrays (one per spatial"
        f" axis), got {type(spatial).__name__}."
      )
    self._set_fields("CP", in_proj=in_proj, spatial=spatial, out_proj=out_proj)

  def _check_shapes(self, fn, fmt):
    _check_rank(fn, "in_proj", self.in_proj, 2, "[C, R]")
    _check_rank(fn, "out_proj", self.out_proj, 2, "[R, F]")
    for i, factor in enumerate(self.spatial):
      _check_rank(fn, f"spatial[{i}]", factor, 2, "[k_i, R]")
      _validation.check_chain(
        fn,
        fmt,
        "in_proj",
        self.in_proj.shape,
        1,
        f"spatial[{i}]",
        factor.shape,
        1,
      )
    _validation.check_chain(
      fn,
      fmt,
      "in_proj",
      self.in_proj.shape,
      1,
      "out_proj",
      self.out_proj.shape,
      0,
    )

  @property
  def window(self):
    return tuple(a.shape[0] for a in self.spatial)

  @property
  def in_features(self):
    return self.in_proj.shape[0]

  @property
  def out_features(self):
    return self.out_proj.shape[1]

  @property
  def rank(self) -> int:
    return self.in_proj.shape[1]

  @classmethod
  def param_shapes(cls, kernel_shape, rank):
    *window, c, f = kernel_shape
    return {
      "in_proj": (c, rank),
      **{f"spatial_{i}": (k, rank) for i, k in enumerate(window)},
      "out_proj": (rank, f),
    }

  def stages(self):
    r = self.rank
    return [
      _stages.Pointwise(self.in_proj),
      *(
        _stages.SpatialConv(_reshape(a, (a.shape[0], 1, r)), (axis,), r)
        for axis, a in enumerate(self.spatial)
      ),
      _stages.Pointwise(self.out_proj),
    ]

  def to_dense(self):
    self.check("to_dense")
    taps = self.spatial[0]
    for a in self.spatial[1:]:
      taps = taps[..., None, :] * _lift(a, taps.ndim + 1)  # [k_0..k_i, R]
    weighted = taps[..., None, :] * _lift(self.in_proj, taps.ndim + 1)
    return jnp.einsum(
      "...cr,rf->...cf", weighted, self.out_proj, precision=_HIGHEST
    )

  def to_dense_flops(self):
    # One multiply per element of each outer product, then the contraction.
    flops, taps = 0, self.window[0]
    for k in self.window[1:]:
      taps *= k
      flops += taps * self.rank
    k, c, f, r = (
      math.prod(self.window),
      self.in_features,
      self.out_features,
      self.rank,
    )
    return flops + k * c * r + 2 * k * c * r * f


def tt_modes(size: int, d: int) -> tuple[int, ...]:
  """`size` as a product of `d` modes, as balanced as its primes allow.

  Primes, largest first, each go to the mode with the smallest product so
  far; modes in decreasing order (64 -> (8, 8), 48 -> (8, 6), 3 -> (3, 1)).
  """
  primes, rest, p = [], size, 2
  while p * p <= rest:
    while rest % p == 0:
      primes.append(p)
      rest //= p
    p += 1
  if rest > 1:
    primes.append(rest)
  modes = [1] * d
  for prime in sorted(primes, reverse=True):
    modes[modes.index(min(modes))] *= prime
  return tuple(sorted(modes, reverse=True))


class TensorTrain(Format):
  """Tensor-train kernel: the window and d channel-mode pairs in one train.

  The input and output channels are read as `d`-way tensors, `C = c_1 ...
  c_d` and `F = f_1 ... f_d` (row-major: `c = ravel(c_1, ..., c_d)`), and
  `K[w, c, f] = sum S[w, r_0] G_1[r_0, c_1, f_1, r_1] ... G_d[r_{d-1}, c_d,
  f_d, 1]`: a tensor train over the modes `(w, (c_1, f_1), ..., (c_d,
  f_d))`, with `k * R_0 + sum_i R_{i-1} c_i f_i R_i` parameters (`R_d = 1`).

  It runs as Garipov et al. do: the spatial core first, as a depthwise conv
  with multiplier `R_0` (the same `R_0` filters for every input channel),
  then one 1x1 contraction per core (`_stages.CoreContraction`), which takes
  the channels `(c_i, ..., c_d, f_1, ..., f_{i-1}, R_{i-1})` to `(c_{i+1},
  ..., c_d, f_1, ..., f_i, R_i)`. At `P` output positions (valid taps aside)
  that is `2 P (k C R_0 + sum_i M_i R_{i-1} c_i f_i R_i)` FLOPs for `M_i =
  c_{i+1} ... c_d f_1 ... f_{i-1}`.

  Attributes:
    spatial: `S`, `[*window, R_0]`.
    cores: d arrays, `G_i` of shape `[R_{i-1}, c_i, f_i, R_i]`, the last
      with `R_d = 1`.

  References:
    Garipov et al., 2016, Ultimate tensorization: compressing convolutional
    and FC layers alike, https://arxiv.org/abs/1611.03214; Oseledets, 2011,
    Tensor-Train Decomposition, SIAM J. Sci. Comput. 33(5).

  >>> import jax.numpy as jnp
  >>> import jaxfactor
  >>> f = jaxfactor.TensorTrain(
  ...     jnp.ones((3, 3, 4)),
  ...     (jnp.ones((4, 4, 4, 5)), jnp.ones((5, 2, 4, 1))))
  >>> f.shape, f.ranks, f.in_modes, f.out_modes, f.num_params
  ((3, 3, 8, 16), (4, 5), (4, 2), (4, 4), 396)
  """

  _fields = ("spatial", "cores")
  _tuple_fields = ("cores",)
  spatial: jax.Array
  cores: tuple[jax.Array, ...]

  def __init__(self, spatial, cores: Sequence[jax.typing.ArrayLike]):
    if not isinstance(cores, (tuple, list)) or not cores:
      raise TypeError(
        "TensorTrain: `cores` must be a non-empty tuple of arrays (one per"
        f" channel-mode pair), got {type(cores).__name__}."
      )
    self._set_fields("TensorTrain", spatial=spatial, cores=cores)

  def _check_shapes(self, fn, fmt):
    if self.spatial.ndim < 2:
      raise ValueError(
        f"{_validation.scope(fn, fmt)} `spatial` must have shape"
        " [*window, R_0] (rank >= 2),"
        f" got shape {tuple(self.spatial.shape)}."
      )
    for i, core in enumerate(self.cores):
      _check_rank(fn, f"cores[{i}]", core, 4, "[R_in, c_i, f_i, R_out]")
    first = self.cores[0].shape
    _validation.check_chain(
      fn, fmt, "spatial", self.spatial.shape, -1, "cores[0]", first, 0
    )
    for i in range(1, len(self.cores)):
      _validation.check_chain(
        fn,
        fmt,
        f"cores[{i - 1}]",
        self.cores[i - 1].shape,
        3,
        f"cores[{i}]",
        self.cores[i].shape,
        0,
      )
    last = self.cores[-1].shape
    if last[3] != 1:
      raise ValueError(
        f"{_validation.scope(fn, fmt)} the last core"
        f" `cores[{len(self.cores) - 1}]` must end the train with rank 1"
        f" (shape [R_in, c_d, f_d, 1]), got shape {tuple(last)}."
      )

  @property
  def window(self):
    return tuple(self.spatial.shape[:-1])

  @property
  def in_modes(self) -> tuple[int, ...]:
    """`(c_1, ..., c_d)`, the input channels as a d-way tensor."""
    return tuple(core.shape[1] for core in self.cores)

  @property
  def out_modes(self) -> tuple[int, ...]:
    """`(f_1, ..., f_d)`, the output channels as a d-way tensor."""
    return tuple(core.shape[2] for core in self.cores)

  @property
  def in_features(self):
    return math.prod(self.in_modes)

  @property
  def out_features(self):
    return math.prod(self.out_modes)

  @property
  def ranks(self) -> tuple[int, ...]:
    """The TT ranks `(R_0, ..., R_{d-1})` (`R_d = 1` is not listed)."""
    return tuple(core.shape[0] for core in self.cores)

  @classmethod
  def param_shapes(cls, kernel_shape, rank):
    *window, c, f = kernel_shape
    d = len(rank)
    chain = (*rank, 1)
    return {
      "spatial": (*window, rank[0]),
      **{
        f"cores_{i}": (chain[i], ci, fi, chain[i + 1])
        for i, (ci, fi) in enumerate(zip(tt_modes(c, d), tt_modes(f, d)))
      },
    }

  def stages(self):
    window, c, r0 = self.window, self.in_features, self.ranks[0]
    shape = (*window, 1, c * r0)
    depthwise: Any
    if isinstance(self.spatial, jax.ShapeDtypeStruct):
      depthwise = jax.ShapeDtypeStruct(shape, self.spatial.dtype)
    else:  # the same R_0 filters for every input channel: a broadcast
      depthwise = jnp.broadcast_to(
        self.spatial[..., None, None, :], (*window, 1, c, r0)
      ).reshape(shape)
    axes = tuple(range(self.num_spatial_dims))
    return [
      _stages.SpatialConv(depthwise, axes, c),
      *(_stages.CoreContraction(core) for core in self.cores),
    ]

  def to_dense(self):
    self.check("to_dense")
    k = math.prod(self.window)
    train = self.spatial.reshape(k, 1, self.ranks[0])  # [k, P, R]
    for core in self.cores:
      train = jnp.einsum("kpr,rcfs->kpcfs", train, core, precision=_HIGHEST)
      train = train.reshape(k, -1, core.shape[3])
    # [k, c_1, f_1, ..., c_d, f_d] -> [k, c_1..c_d, f_1..f_d]
    d = len(self.cores)
    pairs = [m for pair in zip(self.in_modes, self.out_modes) for m in pair]
    train = train.reshape(k, *pairs).transpose(
      0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2)
    )
    return train.reshape(self.shape)

  def to_dense_flops(self):
    flops, k, prefix = 0, math.prod(self.window), 1
    for core in self.cores:
      r_in, c, f, r_out = core.shape
      flops += 2 * k * prefix * r_in * c * f * r_out
      prefix *= c * f
    return flops


def _map_groups(fn: Any, inner: Format) -> Any:
  """`jax.vmap(fn)(inner)` over the groups axis; on abstract leaves
  (`jax.ShapeDtypeStruct`, as `cost` passes them) the shapes it would give."""
  if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(inner)):
    return jax.eval_shape(jax.vmap(fn), inner)
  return jax.vmap(fn)(inner)


def _join_groups(kernel: Any) -> Any:
  """`[G, *window, C', F']` per group -> `[*window, C', G * F']`, the groups'
  output features one after another (lax's grouped kernel layout)."""
  g, *window, c, f = kernel.shape
  shape = (*window, c, g * f)
  if isinstance(kernel, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(shape, kernel.dtype)
  return jnp.moveaxis(kernel, 0, -2).reshape(shape)


class Grouped(Format):
  """A grouped convolution (`feature_group_count = G`), each group factorized.

  Input channels `[g * C/G, (g + 1) * C/G)` produce output features
  `[g * F/G, (g + 1) * F/G)` through group `g`'s own kernel, as in Flax's
  `nn.Conv(feature_group_count=G)` (ResNeXt's grouped convs). Here every
  group's `[*window, C/G, F/G]` kernel is a format of the same type and
  rank: `inner` holds them stacked, each factor with a leading axis of size
  `G` (what `jax.vmap` of `decompose` over the groups returns). `to_dense()`
  is the grouped HWIO kernel `[*window, C/G, F]` that Flax and
  `lax.conv_general_dilated(..., feature_group_count=G)` take, and
  `conv(x, grouped)` equals that grouped convolution of `x [..., C]`. Each
  stage of the chain runs as one grouped stage over all groups (`G` times
  the groups of the inner stage), so FLOPs and parameters are `G` times one
  group's.

  Attributes:
    inner: a `LowRank`, `Tucker`, `CP`, `SpatiallySeparable`,
      `DepthwiseSeparable` or `TensorTrain` whose factors all have a leading
      groups axis.

  >>> import jax
  >>> import jaxfactor
  >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 16, 64))  # G = 4
  >>> f = jaxfactor.decompose(kernel, "low_rank", rank=8, feature_group_count=4)
  >>> f.groups, f.shape, f.in_features, f.inner.spatial.shape
  (4, (3, 3, 16, 64), 64, (4, 3, 3, 16, 8))
  """

  _fields = ("inner",)
  inner: Format

  def __init__(self, inner):
    object.__setattr__(self, "inner", inner)
    self.check("Grouped")

  def check(self, fn: str, *, abstract: bool = False) -> None:
    inner = self.inner
    if not isinstance(inner, Format) or isinstance(inner, Grouped):
      raise TypeError(
        f"{fn}: `Grouped.inner` must be a LowRank, Tucker, CP,"
        " SpatiallySeparable, DepthwiseSeparable or TensorTrain format, got"
        f" {type(inner).__name__}."
      )
    leaves = jax.tree.leaves(inner)
    sizes = {a.shape[0] if a.ndim else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(
        f"{fn}: every factor of `Grouped.inner` must have the same leading"
        " groups axis, got shapes"
        f" {[tuple(a.shape) for a in leaves]}."
      )
    for path, a in jax.tree_util.tree_flatten_with_path(inner)[0]:
      if not (abstract and hasattr(a, "shape") and hasattr(a, "dtype")):
        _validation.check_array(
          fn, f"Grouped.inner{jax.tree_util.keystr(path)}", a
        )
    self._group().check(fn, abstract=True)

  @classmethod
  def stack(cls, groups: Sequence[Format]) -> Grouped:
    """The grouped format of `groups[g]`, one format per group, all of the
    same type and shapes."""
    groups = list(groups)
    if not groups or not all(isinstance(f, Format) for f in groups):
      raise TypeError(
        "Grouped.stack: `groups` must be a non-empty sequence of formats,"
        f" got {[type(f).__name__ for f in groups]}."
      )
    structures = {jax.tree.structure(f) for f in groups}
    shapes = {tuple(a.shape for a in jax.tree.leaves(f)) for f in groups}
    if len(structures) != 1 or len(shapes) != 1:
      raise ValueError(
        "Grouped.stack: every group's format must have the same type, rank"
        f" and shapes, got {groups}."
      )
    return cls(jax.tree.map(lambda *a: jnp.stack(a), *groups))

  def _group(self) -> Format:
    """One group's format, of abstract leaves (shapes without the groups
    axis)."""
    return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), self.inner
    )

  def _check_shapes(self, fn, fmt):
    pass  # `check` checks one group's format.

  def params(self) -> dict[str, jax.Array]:
    """The inner format's `params()`, each with its leading groups axis."""
    return self.inner.params()

  @classmethod
  def param_shapes(cls, kernel_shape, rank):
    raise TypeError(
      "Grouped.param_shapes: a grouped format's parameters are its inner"
      " format's with a leading groups axis: use that format's"
      " `param_shapes` for one group's kernel [*window, C/G, F/G]."
    )

  @property
  def groups(self) -> int:
    return jax.tree.leaves(self.inner)[0].shape[0]

  @property
  def window(self):
    return self._group().window

  @property
  def in_features(self):
    """`C`, the channels of `x`: `G` times one group's."""
    return self.groups * self._group().in_features

  @property
  def out_features(self):
    return self.groups * self._group().out_features

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the grouped HWIO kernel, `(*window, C/G, F)`."""
    group = self._group()
    return (*self.window, group.in_features, self.out_features)

  def stages(self):
    kernels = _map_groups(
      lambda f: [stage.kernel for stage in f.stages()], self.inner
    )
    out: list[_stages.Stage] = []
    for stage, kernel in zip(self._group().stages(), kernels):
      if isinstance(stage, _stages.CoreContraction):
        # [G, R_in, c, f, R_out]: one core per group.
        out.append(_stages.CoreContraction(kernel, (), self.groups))
        continue
      if isinstance(stage, _stages.Pointwise):
        # [G, C', F'] as a grouped 1x1 conv over the stage's axes.
        kernel = _reshape(
          kernel, (kernel.shape[0], *(1,) * len(stage.axes), *kernel.shape[1:])
        )
      out.append(
        _stages.SpatialConv(
          _join_groups(kernel), stage.axes, stage.groups * self.groups
        )
      )
    return out

  def to_dense(self):
    self.check("to_dense")
    return _join_groups(jax.vmap(lambda f: f.to_dense())(self.inner))

  def to_dense_flops(self):
    return self.groups * self._group().to_dense_flops()
