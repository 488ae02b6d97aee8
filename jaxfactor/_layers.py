"""What the linen and nnx layers share: checks, initialization, the call.

The two Flax APIs differ only in how they declare parameters; everything
else (rank resolution, initial factor values, dtype promotion and the
convolution itself) is here, once, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta
from flax.linen import dtypes as flax_dtypes

from jaxfactor import _convolution
from jaxfactor import _decompose
from jaxfactor import _formats as formats
from jaxfactor import _ranks
from jaxfactor import _validation

Initializer = Callable[..., Any]

# Flax's defaults for `nn.Conv`: lecun_normal kernels, zero biases. With
# lecun_normal on every factor (fan-in = the factor's input axis times its
# window) the reconstructed kernel has exactly the variance of a dense
# lecun_normal kernel, `1 / (k * C)`: the variances multiply along the chain
# and each inner rank's fan-in cancels the sum over that rank.
default_kernel_init = jax.nn.initializers.lecun_normal()
default_bias_init = jax.nn.initializers.zeros

# Which format field each factor-initializer argument sets; a tuple field's
# initializer sets every entry.
INIT_ARGS: dict[type[formats.Format], dict[str, str]] = {
  formats.DepthwiseSeparable: {
    "depthwise": "depthwise_init",
    "pointwise": "pointwise_init",
  },
  formats.SpatiallySeparable: {"factors": "factors_init"},
  formats.LowRank: {"spatial": "spatial_init", "pointwise": "pointwise_init"},
  formats.Tucker: {
    "in_proj": "in_proj_init",
    "core": "core_init",
    "out_proj": "out_proj_init",
  },
  formats.CP: {
    "in_proj": "in_proj_init",
    "spatial": "spatial_init",
    "out_proj": "out_proj_init",
  },
  formats.TensorTrain: {"spatial": "spatial_init", "cores": "cores_init"},
}

# lecun_normal with a TT core's fan-in, `R_in * c_i` (axes 0 and 1 of
# `[R_in, c_i, f_i, R_out]`): with the window's fan-in `k` for `spatial`,
# the variances multiply to `1 / (k * C)` after the sums over the ranks, the
# variance of a dense lecun_normal kernel. (Flax's default would read the
# core's fan-in as `R_in * c_i * f_i`.)
DEFAULT_INITS: dict[tuple[type[formats.Format], str], Initializer] = {
  (formats.TensorTrain, "cores"): jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=(2, 3)
  ),
}


def kernel_size_tuple(layer: str, kernel_size: Any) -> tuple[int, ...]:
  """Flax's rule: an int is a 1-D window; otherwise one size per axis."""
  sizes = (kernel_size,) if isinstance(kernel_size, int) else kernel_size
  if (
    not isinstance(sizes, Sequence)
    or not sizes
    or any(
      isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes
    )
  ):
    raise ValueError(
      f"{layer}: `kernel_size` must be a positive int or a non-empty"
      f" sequence of positive ints, got {kernel_size!r}."
    )
  return tuple(sizes)


def check_geometry(
  layer: str, window, strides, padding, kernel_dilation
) -> None:
  """Rejects geometry of the wrong length at construction, not first call."""
  n = len(window)
  _validation.canonicalize_positive_ints(layer, "strides", strides, n)
  _validation.canonicalize_positive_ints(
    layer, "kernel_dilation", kernel_dilation, n
  )
  _validation.canonicalize_padding(layer, padding, n)


def check_features(layer: str, name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(
      f"{layer}: `{name}` must be a positive int, got {value!r}."
    )
  return value


def check_groups(
  layer: str, feature_group_count: Any, in_features: int, out_features: int
) -> int:
  """`feature_group_count` as an int dividing both feature counts."""
  groups = check_features(layer, "feature_group_count", feature_group_count)
  for name, features in (
    ("in_features", in_features),
    ("out_features", out_features),
  ):
    if features % groups:
      raise ValueError(
        f"{layer}: `{name}` (={features}) must be divisible by"
        f" `feature_group_count` (={groups})."
      )
  return groups


def group_kernel_shape(
  window: Sequence[int], in_features: int, out_features: int, groups: int
) -> tuple[int, ...]:
  """One group's dense kernel, `[*window, C/G, F/G]`: what ranks and
  factor shapes are of."""
  return (*window, in_features // groups, out_features // groups)


def factors_value(
  cls: type[formats.Format],
  params: Mapping[str, Any],
  static: Mapping[str, Any],
  groups: int,
) -> formats.Format:
  """The format of a layer's params; with `groups > 1` (each param with a
  leading groups axis) a `Grouped` one."""
  if groups == 1:
    return cls.from_params(dict(params), **static)
  children = cls._children(dict(params))
  inner = cls._unflatten(tuple(static[n] for n in cls._static_fields), children)
  return formats.Grouped(inner)


def stack_groups(values: Sequence[Any]) -> Any:
  """Per-group initial values stacked on a new leading groups axis.

  Sharding metadata (linen's `nn.Partitioned`, nnx's `with_partitioning`)
  is kept, the groups axis unsharded.
  """
  first = values[0]
  if isinstance(first, meta.AxisMetadata):
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *values)
    return meta.add_axis(stacked, 0, {meta.PARTITION_NAME: None})
  if isinstance(first, nnx.VariableMetadata):
    metadata = dict(first.metadata)
    if metadata.get("out_sharding"):
      metadata["out_sharding"] = (None, *metadata["out_sharding"])
    return dataclasses.replace(
      first,
      raw_value=jnp.stack([v.raw_value for v in values]),
      metadata=metadata,
    )
  return jnp.stack(values)


def grouped_initializer(init: Initializer, groups: int) -> Initializer:
  """`init` run once per group on one group's shape (its fan-in is one
  group's), the draws stacked: `shape` is `(groups, *one group's shape)`."""

  def grouped(key, shape, dtype=jnp.float32):
    keys = jax.random.split(key, groups)
    return stack_groups([init(k, tuple(shape[1:]), dtype) for k in keys])

  return grouped


def check_options(
  layer: str, implementation: str, preferred_element_type: Any, bias_init: Any
) -> None:
  _validation.check_implementation(layer, implementation)
  if preferred_element_type is not None:
    try:
      jax.numpy.dtype(preferred_element_type)
    except TypeError:
      raise TypeError(
        f"{layer}: `preferred_element_type` must be a dtype or None, got"
        f" {preferred_element_type!r}."
      ) from None
  if not callable(bias_init):
    raise TypeError(
      f"{layer}: `bias_init` must be an initializer, got"
      f" {type(bias_init).__name__}."
    )


def factor_initializers(
  layer: str,
  cls: type[formats.Format],
  given: Mapping[str, Initializer | None],
  kernel_init: Initializer | None,
) -> dict[str, Initializer]:
  """Each field's initializer: the one given, else Flax's default.

  `kernel_init` (a dense-kernel initializer, for the spectral start)
  excludes factor initializers: the factors then come from decomposing its
  draw, and a factor initializer given beside it would be ignored.
  """
  for arg, init in given.items():
    if init is not None and not callable(init):
      raise TypeError(
        f"{layer}: `{arg}` must be an initializer, got {type(init).__name__}."
      )
  if kernel_init is not None:
    if not callable(kernel_init):
      raise TypeError(
        f"{layer}: `kernel_init` must be an initializer, got"
        f" {type(kernel_init).__name__}."
      )
    clash = sorted(arg for arg, init in given.items() if init is not None)
    if clash:
      raise ValueError(
        f"{layer}: give either `kernel_init` (the factors decompose a dense"
        f" kernel drawn from it) or factor initializers, not both; got"
        f" kernel_init and {', '.join(clash)}."
      )
  return {
    field: given[arg] or DEFAULT_INITS.get((cls, field), default_kernel_init)
    for field, arg in INIT_ARGS[cls].items()
  }


def init_factors(
  layer: str,
  cls: type[formats.Format],
  key: jax.Array,
  kernel_shape: tuple[int, ...],
  rank: Any,
  param_dtype: Any,
  initializers: Mapping[str, Initializer],
  kernel_init: Initializer | None,
  groups: int = 1,
) -> dict[str, Any]:
  """Initial values of `cls.param_shapes(kernel_shape, rank)`.

  Each factor from its own initializer (whose output may carry Flax
  metadata, e.g. `nnx.with_partitioning`), or, with `kernel_init`, the
  factors of a dense kernel drawn from it (spectral initialization: Khodak
  et al., ICLR 2021, https://arxiv.org/abs/2105.01029).

  With `groups > 1`, `kernel_shape` is one group's and every factor gets a
  leading groups axis: each group's factors drawn as an ungrouped layer's,
  or the groups of a grouped dense kernel `[*window, C/G, F]` drawn from
  `kernel_init` (the kernel `nn.Conv(feature_group_count=G)` would draw).
  """
  if kernel_init is not None:
    *window, c, f = kernel_shape
    dense = kernel_init(key, (*window, c, f * groups), param_dtype)
    if not _validation.is_array(dense):
      raise TypeError(
        f"{layer}: `kernel_init` must return an array, got"
        f" {type(dense).__name__}; put sharding metadata on the factor"
        " initializers instead."
      )
    return dict(
      _decompose.decompose(
        dense, cls, rank=rank, feature_group_count=groups
      ).params()
    )
  shapes = cls.param_shapes(kernel_shape, rank)
  keys = jax.random.split(key, len(shapes))
  if groups == 1:
    return {
      name: initializers[cls.field_of(name)](k, shape, param_dtype)
      for (name, shape), k in zip(shapes.items(), keys)
    }
  return {
    name: grouped_initializer(initializers[cls.field_of(name)], groups)(
      k, (groups, *shape), param_dtype
    )
    for (name, shape), k in zip(shapes.items(), keys)
  }


def resolve_rank(layer: str, cls, kernel_shape, rank: Any):
  return _ranks.resolve_rank(layer, cls, kernel_shape, rank)


def check_input_channels(layer: str, x: Any, in_features: int, window) -> None:
  if not hasattr(x, "shape") or len(x.shape) < len(window) + 1:
    raise ValueError(
      f"{layer}: the input must have shape [*batch, *spatial, C] with"
      f" {len(window)} spatial axes (kernel_size {tuple(window)}), got"
      f" shape {getattr(x, 'shape', type(x).__name__)}."
    )
  if x.shape[-1] != in_features:
    raise ValueError(
      f"{layer}: the input has {x.shape[-1]} channels (shape"
      f" {tuple(x.shape)}) but the layer has in_features={in_features}."
    )


def apply(
  x: jax.Array,
  kernel: Any,
  bias: jax.Array | None,
  *,
  dtype: Any,
  strides: Any,
  padding: Any,
  kernel_dilation: Any,
  precision: Any,
  preferred_element_type: Any,
  implementation: str = "auto",
  kind: str = "conv",
) -> jax.Array:
  """`conv(x, kernel) + bias` after Flax's dtype promotion."""
  leaves, treedef = jax.tree.flatten(kernel)
  promoted = flax_dtypes.promote_dtype(
    x, *leaves, *([] if bias is None else [bias]), dtype=dtype
  )
  x, leaves = promoted[0], promoted[1 : 1 + len(leaves)]
  kernel = jax.tree.unflatten(treedef, leaves)
  options = dict(
    precision=precision, preferred_element_type=preferred_element_type
  )
  geometry = dict(strides=strides, padding=padding, dilation=kernel_dilation)
  if kind == "depthwise":
    y = _convolution.depthwise_conv(x, kernel, **geometry, **options)
  elif kind == "pointwise":
    y = _convolution.pointwise_conv(x, kernel, **options)
  else:
    y = _convolution.conv(
      x, kernel, implementation=implementation, **geometry, **options
    )
  if bias is not None:
    y = y + promoted[-1].astype(y.dtype).reshape(
      (1,) * (y.ndim - 1) + bias.shape
    )
  return y
