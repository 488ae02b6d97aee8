"""Property-based fuzzing: random layers against `lax` on `to_dense()`.

Each example draws a dtype (float64, float32 or bfloat16), a format (or a
dense kernel), N, window, channels and ranks, strides, dilation, a padding
form, batch axes, the implementation and the CPU lowering (native kernel,
shift-add or grouped conv for depthwise stages; tap matmul on or off), and
compares `conv` with `lax.conv_general_dilated` on the dense kernel,
computed in float64 from the same (rounded) operands. The bound is
componentwise, as in floating-point error analysis:
`|conv - exact| <= tol * (|x| conv |kernel|)`, where the right side bounds
every term of every stage, so cancellation cannot make it flaky. `tol` is
`reference.RTOL` for the drawn dtype.

The number of examples and whether they are replayed come from the
hypothesis profile (see conftest.py): 100, the same ones every run;
`HYPOTHESIS_PROFILE=long` runs 5000 new ones.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from hypothesis import given
from hypothesis import strategies as st
from reference import DEPTHWISE_LOWERINGS
from reference import KERNELS
from reference import PADDINGS
from reference import STRIDES
from reference import WINDOWS

import jaxfactor
from jaxfactor import _native
from jaxfactor._lowering import forced

DTYPES = ("float64", "float32", "bfloat16")
# Drawn, not skipped: a skip inside a property would end all of it.
AVAILABLE_LOWERINGS = [
  lowering
  for lowering in DEPTHWISE_LOWERINGS
  if lowering != "native" or _native.available()
]


@st.composite
def layers(draw):
  dtype = draw(st.sampled_from(DTYPES))
  name = draw(st.sampled_from(KERNELS))
  n = draw(st.integers(1, 3))
  window = tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
  c, f = draw(st.integers(1, 4)), draw(st.integers(1, 4))
  ranks = {
    "depthwise_separable": draw(st.integers(1, 3)),
    "spatially_separable": tuple(
      draw(st.lists(st.integers(1, 4), min_size=n - 1, max_size=n - 1))
    ),
    "low_rank": draw(st.integers(1, 4)),
    "tucker": (draw(st.integers(1, 4)), draw(st.integers(1, 4))),
    "cp": draw(st.integers(1, 4)),
    "tensor_train": (draw(st.integers(1, 4)), draw(st.integers(1, 4))),
    "dense": None,
  }[name]
  per_axis = st.lists(st.integers(1, 3), min_size=n, max_size=n).map(tuple)
  strides = draw(st.integers(1, 3) | per_axis)
  dilation = draw(st.integers(1, 3) | per_axis)
  kinds = ["SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT", "int", "axes"]
  kind = draw(st.sampled_from(kinds + (["CAUSAL"] if n == 1 else [])))
  pair = st.tuples(st.integers(0, 3), st.integers(0, 3))
  padding = {
    "int": lambda: draw(st.integers(0, 3)),
    "axes": lambda: tuple(
      draw(st.lists(st.integers(0, 3) | pair, min_size=n, max_size=n))
    ),
  }.get(kind, lambda: kind)()
  # Sizes around the dilated window: now and then too small for "VALID".
  dilations = dilation if isinstance(dilation, tuple) else (dilation,) * n
  spatial = tuple(
    max(1, (k - 1) * d + 1 + draw(st.integers(-2, 5)))
    for k, d in zip(window, dilations)
  )
  return dict(
    dtype=dtype,
    name=name,
    window=window,
    c=c,
    f=f,
    ranks=ranks,
    kwargs=dict(strides=strides, dilation=dilation, padding=padding),
    shape=(*draw(st.sampled_from([(), (1,), (2,), (2, 1)])), *spatial, c),
    implementation=draw(
      st.sampled_from(["auto", "factorized", "reconstructed"])
    ),
    depthwise=draw(st.sampled_from(AVAILABLE_LOWERINGS)),
    tap_matmul=draw(st.sampled_from([None, True, False])),
    seed=draw(st.integers(0, 2**16)),
  )


def _abs(kernel):
  return jax.tree.map(jnp.abs, kernel)


@given(layer=layers())
def test_conv_equals_lax_on_the_dense_kernel(layer):
  dtype = jnp.dtype(layer["dtype"])
  kernel = reference.random_kernel(
    layer["name"],
    layer["window"],
    layer["c"],
    layer["f"],
    ranks=layer["ranks"],
    seed=layer["seed"],
    dtype=dtype,
  )
  kwargs, shape = layer["kwargs"], layer["shape"]
  x = reference.random_input(shape, seed=layer["seed"] + 1, dtype=dtype)
  try:
    jaxfactor.cost(jax.eval_shape(lambda: kernel), shape, **kwargs)
  except ValueError as e:
    # Flax would return an empty array here; jaxfactor refuses.
    assert "the output would be empty" in str(e)
    return
  n = len(layer["window"])
  batch, spatial = shape[: len(shape) - n - 1], shape[-n - 1 :]

  @jax.jit
  def run(x, kernel, wide_x, wide_kernel):
    ours = jaxfactor.conv(
      x, kernel, implementation=layer["implementation"], **kwargs
    )
    flat = wide_x.reshape(math.prod(batch), *spatial)
    exact = reference.lax_conv(flat, reference.dense(wide_kernel), **kwargs)
    bound = reference.lax_conv(
      jnp.abs(flat), reference.dense(_abs(wide_kernel)), **kwargs
    )
    out = (*batch, *exact.shape[1:])
    return ours, exact.reshape(out), bound.reshape(out)

  wide = reference.cast((x, kernel), jnp.float64)
  with forced(depthwise=layer["depthwise"], tap_matmul=layer["tap_matmul"]):
    ours, exact, bound = run(x, kernel, *wide)
  assert ours.dtype == dtype and ours.shape == exact.shape
  error = np.abs(np.asarray(ours, np.float64) - np.asarray(exact))
  excess = error - reference.rtol(dtype) * np.asarray(bound)
  assert (excess <= 0).all(), (error.max(), np.asarray(bound).max())


def _possible(case):
  return case.get("padding") != "CAUSAL" or case.get("n", 1) == 1


@pytest.mark.parametrize(
  "case",
  reference.all_pairs(
    {
      "padding": PADDINGS,
      "n": (1, 2, 3),
      "strides": STRIDES,
      "dilation": STRIDES,
    },
    _possible,
  ),
  ids=reference.case_id,
)
def test_the_lax_oracle_equals_flax(case):
  """The oracle above (`reference.lax_conv`, whose padding is written from
  Flax's definitions) against Flax's own `nn.Conv`."""
  n = case["n"]
  kernel = reference.random_input((*WINDOWS[n], 3, 4), seed=2)
  x = reference.random_input(reference.spatial_input_shape(WINDOWS[n], extra=5))
  kwargs = reference.geometry(case, n)
  oracle = jax.jit(functools.partial(reference.lax_conv, **kwargs))(x, kernel)
  expected = reference.flax_conv(x, kernel, **kwargs)
  assert reference.relative_error(oracle, expected) < reference.rtol(
    jnp.float64
  )
