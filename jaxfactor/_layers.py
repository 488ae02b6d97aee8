"""What the linen and nnx layers share: checks, initialization, the call.

The two Flax APIs differ only in how they declare parameters; everything
else (rank resolution, initial factor values, dtype promotion and the
convolution itself) is here, once, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from jaxfactor import _validation
from jaxfactor import _convolution as convolution
from jaxfactor import _decompose as decomposition
from jaxfactor import _formats as formats
from jaxfactor import _ranks as ranks_lib

Initializer = Callable[..., jax.Array]

# Flax's defaults for `nn.Conv`: lecun_normal kernels, zero biases.
default_kernel_init = jax.nn.initializers.lecun_normal()
default_bias_init = jax.nn.initializers.zeros

# Which format field each initializer argument sets; a tuple field's
# initializer sets every entry.
INIT_ARGS = {
    formats.DepthwiseSeparable: {"depthwise": "depthwise_init",
                                 "pointwise": "pointwise_init"},
    formats.SpatiallySeparable: {"factors": "factors_init"},
    formats.LowRank: {"spatial": "spatial_init", "pointwise": "pointwise_init"},
    formats.Tucker: {"in_proj": "in_proj_init", "core": "core_init",
                     "out_proj": "out_proj_init"},
    formats.CP: {"in_proj": "in_proj_init", "spatial": "spatial_init",
                 "out_proj": "out_proj_init"},
}


def kernel_size_tuple(layer: str, kernel_size: Any) -> tuple[int, ...]:
  """Flax's rule: an int is a 1-D window; otherwise one size per axis."""
  sizes = (kernel_size,) if isinstance(kernel_size, int) else kernel_size
  if (
      not isinstance(sizes, Sequence)
      or not sizes
      or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
             for k in sizes)
  ):
    raise ValueError(
        f"{layer}: `kernel_size` must be a positive int or a non-empty"
        f" sequence of positive ints, got {kernel_size!r}."
    )
  return tuple(sizes)


def check_geometry(layer: str, window, strides, padding, dilation) -> None:
  """Rejects geometry of the wrong length at construction, not first call."""
  n = len(window)
  _validation.canonicalize_positive_ints(layer, "strides", strides, n)
  _validation.canonicalize_positive_ints(layer, "dilation", dilation, n)
  _validation.canonicalize_padding(layer, padding, n)


def check_features(layer: str, name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{layer}: `{name}` must be a positive int, got {value!r}.")
  return value


def resolve_rank(layer: str, cls, kernel_shape, rank: Any):
  """A static rank from an int/tuple or a float fraction of dense params."""
  if isinstance(rank, float):
    if not 0 < rank <= 1:
      raise ValueError(
          f"{layer}: a float `rank` is a fraction of the dense kernel's"
          f" parameters and must be in (0, 1], got {rank!r}."
      )
    return ranks_lib.rank_for_fraction(layer, kernel_shape, cls, rank)
  return ranks_lib.canonicalize_rank(layer, kernel_shape, cls, rank)


def init_factors(
    layer: str,
    cls,
    key: jax.Array,
    kernel_shape: tuple[int, ...],
    rank: Any,
    param_dtype: Any,
    initializers: Mapping[str, Initializer],
    init: str,
    kernel_init: Initializer,
) -> dict[str, jax.Array]:
  """Initial values of `cls.param_shapes(kernel_shape, rank)`.

  "default": each factor from its own initializer. With Flax's default
  lecun_normal on every factor (fan-in = the factor's input axis times its
  window), the reconstructed kernel has exactly the variance of a dense
  lecun_normal kernel, `1 / (k * C)`: the variances multiply along the chain
  and each inner rank's fan-in cancels the sum over that rank.

  "spectral": draw a dense kernel with `kernel_init` and decompose it (Khodak
  et al., ICLR 2021, https://arxiv.org/abs/2105.01029).
  """
  if init == "spectral":
    dense = kernel_init(key, kernel_shape, param_dtype)
    return decomposition.decompose(dense, cls, rank=rank).params()
  if init != "default":
    raise ValueError(
        f"{layer}: `init` must be 'default' or 'spectral', got {init!r}."
    )
  shapes = cls.param_shapes(kernel_shape, rank)
  keys = jax.random.split(key, len(shapes))
  out = {}
  for (name, shape), k in zip(shapes.items(), keys):
    out[name] = initializers[cls.field_of(name)](k, shape, param_dtype)
  return out


def partition_names(partitioning: Mapping[str, Any] | None,
                    name: str) -> tuple[Any, ...] | None:
  """Mesh-axis names for parameter `name`, given per parameter or per field
  (`spatial` covers `spatial_0`, `spatial_1`, ...); None when not given."""
  partitioning = partitioning or {}
  names = partitioning.get(name, partitioning.get(re.sub(r"_\d+$", "", name)))
  return None if names is None else tuple(names)


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
    dilation: Any,
    precision: Any,
    implementation: str,
    kind: str = "conv",
) -> jax.Array:
  """`conv(x, kernel) + bias` after Flax's dtype promotion."""
  leaves, treedef = jax.tree.flatten(kernel)
  promoted = flax_dtypes.promote_dtype(
      x, *leaves, *([] if bias is None else [bias]), dtype=dtype
  )
  x, leaves = promoted[0], promoted[1 : 1 + len(leaves)]
  kernel = jax.tree.unflatten(treedef, leaves)
  geometry = dict(strides=strides, padding=padding, dilation=dilation,
                  precision=precision)
  if kind == "depthwise":
    y = convolution.depthwise_conv(x, kernel, **geometry)
  elif kind == "pointwise":
    y = convolution.pointwise_conv(x, kernel, precision=precision)
  else:
    y = convolution.conv(x, kernel, implementation=implementation, **geometry)
  if bias is not None:
    y = y + promoted[-1].reshape((1,) * (y.ndim - 1) + bias.shape)
  return y
