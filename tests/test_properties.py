"""Property-based sweep: random formats, ranks and geometries vs Flax's conv."""

import jax.numpy as jnp
from hypothesis import assume
from hypothesis import given
from hypothesis import strategies as st

import jaxfactor
from reference import (FORMATS, RTOL, flax_conv, random_format, random_input,
                       relative_error)


@st.composite
def cases(draw):
  name = draw(st.sampled_from(FORMATS + ("dense",)))
  n = draw(st.integers(1, 3))
  window = tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
  c, f = draw(st.integers(1, 4)), draw(st.integers(1, 4))
  ranks = {
      "depthwise_separable": draw(st.integers(1, 3)),
      "spatially_separable": tuple(
          draw(st.lists(st.integers(1, 4), min_size=n - 1, max_size=n - 1))),
      "low_rank": draw(st.integers(1, 4)),
      "tucker": (draw(st.integers(1, 4)), draw(st.integers(1, 4))),
      "cp": draw(st.integers(1, 4)),
      "dense": None,
  }[name]
  per_axis = st.lists(st.integers(1, 3), min_size=n, max_size=n).map(tuple)
  strides = draw(st.integers(1, 3) | per_axis)
  dilation = draw(st.integers(1, 3) | per_axis)
  modes = ["SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT"] + (
      ["CAUSAL"] if n == 1 else [])
  pair = st.tuples(st.integers(0, 3), st.integers(0, 3))
  padding = draw(
      st.sampled_from(modes)
      | st.integers(0, 3)
      | st.lists(st.integers(0, 3) | pair, min_size=n, max_size=n).map(tuple)
  )
  batch = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
  spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=n, max_size=n)))
  implementation = draw(st.sampled_from(["auto", "factorized", "reconstructed"]))
  seed = draw(st.integers(0, 2**16))
  return dict(name=name, window=window, c=c, f=f, ranks=ranks,
              strides=strides, dilation=dilation, padding=padding,
              batch=batch, spatial=spatial, implementation=implementation,
              seed=seed)


@given(cases())
def test_conv_equals_flax_dense_conv_on_random_geometry(case):
  kwargs = dict(strides=case["strides"], padding=case["padding"],
                dilation=case["dilation"])
  shape = (*case["batch"], *case["spatial"], case["c"])
  if case["name"] == "dense":
    kernel = random_input((*case["window"], case["c"], case["f"]),
                          seed=case["seed"])
    dense = kernel
  else:
    kernel = random_format(case["name"], case["window"], case["c"], case["f"],
                           ranks=case["ranks"], seed=case["seed"])
    dense = kernel.to_dense()
  try:
    jaxfactor.cost(kernel, shape, **kwargs)
  except ValueError as e:
    # Flax would return an empty array here; jaxfactor refuses (README).
    assert "the output would be empty" in str(e)
    assume(False)
  x = random_input(shape, seed=case["seed"] + 1)
  expected = flax_conv(x, dense, **kwargs)
  actual = jaxfactor.conv(x, kernel, implementation=case["implementation"],
                          **kwargs)
  assert actual.shape == expected.shape
  assert relative_error(actual, expected) < RTOL[jnp.float64]
