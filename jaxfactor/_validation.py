"""Argument checks shared by every public function.

Every check runs on static information (shapes, dtypes, Python values), so it
costs nothing under `jax.jit` and fires before any `lax` call. Messages always
name the calling function and the argument, and show what was seen next to
what was expected.
"""

from __future__ import annotations

import operator
import os
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "factorized", "reconstructed")
PLATFORMS = ("cpu", "gpu", "tpu")
PADDING_STRINGS = (
  "SAME",
  "SAME_LOWER",
  "VALID",
  "CIRCULAR",
  "REFLECT",
  "CAUSAL",
)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Where warnings are not attributed: jaxfactor, and JAX (whose tracing runs
# jaxfactor under `jit`, `vmap`, ...).
_SKIPPED = (
  _PACKAGE + os.sep,
  os.path.dirname(os.path.abspath(jax.__file__)) + os.sep,
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
  """`warnings.warn`, attributed to the first caller outside jaxfactor.

  So a warning points at the user's line, however deep in the library it
  is raised (Python 3.12's `skip_file_prefixes`, by hand). JAX's own frames
  are skipped too: a warning raised while `jax.jit` or `jax.vmap` traces
  jaxfactor points at the line that called the transformed function.
  """
  # stacklevel 2 is the caller of `warn`, frame 1 here.
  level = 2
  frame: types.FrameType | None = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None and os.path.abspath(
    frame.f_code.co_filename
  ).startswith(_SKIPPED):
    frame = frame.f_back
    level += 1
  warnings.warn(message, category, stacklevel=level)


def is_array(value: Any) -> bool:
  """True for jax arrays (tracers included) and numpy arrays."""
  return isinstance(value, (jax.Array, np.ndarray))


def check_array(fn: str, name: str, value: Any) -> jax.Array | np.ndarray:
  """`value`, which must be a jax or numpy array."""
  if not is_array(value):
    raise TypeError(
      f"{fn}: `{name}` must be a jax or numpy array, got"
      f" {type(value).__name__}."
    )
  return value


def check_floating(fn: str, name: str, value: Any) -> None:
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(
      f"{fn}: `{name}` must have a floating dtype, got {value.dtype}."
    )


def check_ndim(fn: str, name: str, value: Any, ndim: int, layout: str) -> None:
  if value.ndim != ndim:
    raise ValueError(
      f"{fn}: `{name}` must have shape {layout} (rank {ndim}), got shape"
      f" {tuple(value.shape)} (rank {value.ndim})."
    )


def check_positive_dims(fn: str, name: str, shape: Sequence[int]) -> None:
  if any(d < 1 for d in shape):
    raise ValueError(
      f"{fn}: every axis of `{name}` must have size >= 1, got shape"
      f" {tuple(shape)}."
    )


def scope(fn: str, fmt: str) -> str:
  """Message prefix: "conv: LowRank", or "LowRank:" from its constructor."""
  return f"{fn}:" if fn == fmt else f"{fn}: {fmt}"


def check_chain(
  fn: str,
  fmt: str,
  left: str,
  left_shape,
  left_axis: int,
  right: str,
  right_shape,
  right_axis: int,
) -> None:
  """Checks that two factors meet on an axis of the same size."""
  a, b = left_shape[left_axis], right_shape[right_axis]
  if a != b:
    raise ValueError(
      f"{scope(fn, fmt)} factors do not chain: `{left}` has shape"
      f" {tuple(left_shape)} and `{right}` has shape {tuple(right_shape)};"
      f" {left}.shape[{left_axis}] ({a}) must equal"
      f" {right}.shape[{right_axis}] ({b})."
    )


def check_same_dtype(fn: str, named_arrays: Sequence[tuple[str, Any]]) -> None:
  """Rejects mixed dtypes rather than letting XLA promote silently.

  Dtypes are compared as JAX will hold them (a numpy float64 array is float32
  when 64-bit mode is off), as Flax's own layers see them.
  """
  canonical = jax.dtypes.canonicalize_dtype
  first_name, first = named_arrays[0]
  for name, value in named_arrays[1:]:
    if canonical(value.dtype) != canonical(first.dtype):
      raise TypeError(
        f"{fn}: `{name}` has dtype {canonical(value.dtype)} but"
        f" `{first_name}` has dtype {canonical(first.dtype)}; jaxfactor does"
        " not promote dtypes silently, cast one of them explicitly."
      )


def check_preferred_element_type(fn: str, dtype: Any, preferred: Any) -> Any:
  """Returns `preferred` as a numpy dtype, or None.

  It must be the inputs' dtype or a wider standard float (float32 or
  float64): a swap between 16-bit types (bfloat16 <-> float16) would lose
  range or precision silently.
  """
  if preferred is None:
    return None
  try:
    preferred = np.dtype(preferred)
  except TypeError:
    raise TypeError(
      f"{fn}: `preferred_element_type` must be a dtype, got {preferred!r}."
    ) from None
  dtype = jax.dtypes.canonicalize_dtype(dtype)
  widening = preferred == dtype or (
    preferred in (np.dtype(np.float32), np.dtype(np.float64))
    and jnp.issubdtype(dtype, jnp.floating)
    and jnp.finfo(preferred).bits > jnp.finfo(dtype).bits
  )
  if not widening:
    raise TypeError(
      f"{fn}: `preferred_element_type` must be the inputs' dtype {dtype}"
      f" or a wider float32/float64, got {preferred}."
    )
  if jax.dtypes.canonicalize_dtype(preferred) != preferred:
    raise ValueError(
      f"{fn}: `preferred_element_type`={preferred} needs 64-bit mode: set"
      " jax.config.update('jax_enable_x64', True) first."
    )
  return preferred


def check_implementation(fn: str, implementation: Any) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"{fn}: `implementation` must be one of {IMPLEMENTATIONS}, got"
      f" {implementation!r}."
    )


def check_platform(fn: str, platform: Any) -> str:
  """`platform` ("cpu", "gpu", "tpu"), default: JAX's default backend."""
  if platform is None:
    backend = jax.default_backend()
    return backend if backend in ("cpu", "tpu") else "gpu"
  if platform not in PLATFORMS:
    raise ValueError(
      f"{fn}: `platform` must be one of {PLATFORMS} or None (JAX's default"
      f" backend), got {platform!r}."
    )
  return platform


def check_kernel(
  fn: str, kernel: Any, *, abstract: bool = False
) -> tuple[tuple[int, ...], int]:
  """Validates a dense HWIO kernel or a format; returns `(window, C)`.

  With `abstract`, leaves that only carry `.shape` and `.dtype` (e.g.
  `jax.ShapeDtypeStruct`) are accepted too.
  """
  from jaxfactor import _formats  # pylint: disable=g-import-not-at-top

  if isinstance(kernel, _formats.Format):
    kernel.check(fn, abstract=abstract)
    return kernel.window, kernel.in_features
  abstract_ok = (
    abstract and hasattr(kernel, "shape") and hasattr(kernel, "dtype")
  )
  if not abstract_ok and not is_array(kernel):
    raise TypeError(
      f"{fn}: `kernel` must be a dense HWIO array or a jaxfactor format"
      " (DepthwiseSeparable, SpatiallySeparable, LowRank, Tucker, CP,"
      f" TensorTrain), got {type(kernel).__name__}."
    )
  check_floating(fn, "kernel", kernel)
  if kernel.ndim < 3:
    raise ValueError(
      f"{fn}: a dense `kernel` must have shape [*window, C, F] with at"
      f" least one spatial axis (rank >= 3), got shape"
      f" {tuple(kernel.shape)}."
    )
  check_positive_dims(fn, "kernel", kernel.shape)
  return tuple(kernel.shape[:-2]), kernel.shape[-2]


def check_key(fn: str, key: Any) -> None:
  """A PRNG key: a typed key array, or a raw uint32[2] key."""
  if isinstance(key, (jax.Array, np.ndarray)) and (
    jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    or (key.dtype == np.uint32 and key.shape == (2,))
  ):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape:
      raise ValueError(
        f"{fn}: `key` must be a single PRNG key, got an array"
        f" of {key.shape} keys."
      )
    return
  described = (
    f"{type(key).__name__} of dtype {key.dtype} and shape {tuple(key.shape)}"
    if hasattr(key, "dtype")
    else type(key).__name__
  )
  raise TypeError(
    f"{fn}: `key` must be a PRNG key (e.g. jax.random.key(0)), got {described}."
  )


def as_int(fn: str, name: str, value: Any) -> int:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{fn}: `{name}` must be a static Python int, got a traced value;"
      " mark it static (e.g. `jax.jit(..., static_argnames=...)`)."
    )
  if isinstance(value, bool):
    raise TypeError(f"{fn}: `{name}` must be an int, got bool {value!r}.")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(
      f"{fn}: `{name}` must be an int, got {type(value).__name__} {value!r}."
    ) from None


def check_positive_int(fn: str, name: str, value: Any) -> int:
  """An int >= 1 (a bool is not one)."""
  if isinstance(value, bool):
    raise TypeError(f"{fn}: `{name}` must be an int, got bool {value!r}.")
  value = as_int(fn, name, value)
  if value < 1:
    raise ValueError(f"{fn}: `{name}` must be >= 1, got {value}.")
  return value


def _is_sequence(value: Any) -> bool:
  return (isinstance(value, Sequence) and not isinstance(value, str)) or (
    isinstance(value, np.ndarray) and value.ndim == 1
  )


def canonicalize_positive_ints(
  fn: str, name: str, value: Any, ndim: int
) -> tuple[int, ...]:
  """`strides` / `dilation`: an int or one positive int per spatial axis.

  None means 1, as in Flax.
  """
  if value is None:
    value = 1
  if _is_sequence(value):
    if len(value) != ndim:
      raise ValueError(
        f"{fn}: `{name}` must be an int or a sequence of {ndim} ints (one"
        f" per spatial axis), got {tuple(value)!r} of length {len(value)}."
      )
    values = tuple(as_int(fn, name, v) for v in value)
  else:
    values = (as_int(fn, name, value),) * ndim
  if any(v < 1 for v in values):
    raise ValueError(
      f"{fn}: `{name}` must be positive on every axis, got {value!r}."
    )
  return values


def canonicalize_padding(
  fn: str, padding: Any, ndim: int
) -> str | tuple[tuple[int, int], ...]:
  """Flax's padding forms, checked: a mode string or a (low, high) per axis."""
  if isinstance(padding, str):
    padding = padding.upper()  # lax reads padding strings case-insensitively
    if padding not in PADDING_STRINGS:
      raise ValueError(
        f"{fn}: `padding` must be one of {PADDING_STRINGS}, an int, or one"
        f" int or (low, high) pair per spatial axis, got {padding!r}."
      )
    if padding == "CAUSAL" and ndim != 1:
      raise ValueError(
        f"{fn}: `padding`='CAUSAL' needs exactly 1 spatial axis, got a"
        f" kernel with {ndim} spatial axes."
      )
    return padding
  if isinstance(padding, Sequence):
    if len(padding) != ndim:
      raise ValueError(
        f"{fn}: `padding` must have one int or (low, high) pair per spatial"
        f" axis ({ndim}), got {padding!r} of length {len(padding)}."
      )
    pairs = []
    for p in padding:
      if isinstance(p, Sequence) and not isinstance(p, str):
        if len(p) != 2:
          raise ValueError(
            f"{fn}: each `padding` entry must be an int or a (low, high)"
            f" pair, got {p!r} in {padding!r}."
          )
        pair = (as_int(fn, "padding", p[0]), as_int(fn, "padding", p[1]))
      else:
        pair = (as_int(fn, "padding", p),) * 2
      pairs.append(pair)
    pads = tuple(pairs)
  else:
    pads = ((as_int(fn, "padding", padding),) * 2,) * ndim
  if any(v < 0 for pair in pads for v in pair):
    raise ValueError(f"{fn}: `padding` must be non-negative, got {padding!r}.")
  return pads


def check_input(
  fn: str,
  x: Any,
  window: Sequence[int],
  in_features: int | None,
  *,
  abstract: bool = False,
) -> jax.Array | np.ndarray:
  """`x` must be `[*batch, *spatial, C]` with the kernel's N (and C).

  Returns `x` (typed as what it was checked to be).
  """
  if not abstract:
    check_array(fn, "x", x)
  check_floating(fn, "x", x)
  n = len(window)
  if x.ndim < n + 1:
    raise ValueError(
      f"{fn}: `x` must have shape [*batch, *spatial, C] with {n} spatial"
      f" axes (rank >= {n + 1}) for a kernel with window {tuple(window)},"
      f" got shape {tuple(x.shape)}."
    )
  if in_features is not None and x.shape[-1] != in_features:
    raise ValueError(
      f"{fn}: `x` has {x.shape[-1]} channels (shape {tuple(x.shape)}) but"
      f" the kernel expects in_features={in_features}."
    )
  # Batch axes may be empty; spatial and channel axes may not.
  if any(d < 1 for d in x.shape[x.ndim - n - 1 :]):
    raise ValueError(
      f"{fn}: every spatial and channel axis of `x` must have size >= 1,"
      f" got shape {tuple(x.shape)}."
    )
  return x
