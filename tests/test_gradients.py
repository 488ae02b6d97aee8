"""Gradients: `check_grads` to order 2 in forward and reverse mode, float64.

A factorized convolution is linear in `x` and in each factor separately, so
central differences with `eps=1.0` are exact up to rounding (as in JAX's own
convolution tests), and one argument is checked at a time. Every CPU
depthwise lowering (the native kernel, the shift-add, the grouped conv) is
three bilinear primitives, each the others' transpose: both modes, any
order. Then each lowering's VJP and JVP against Flax's grouped convolution
on every geometry, and the shift-add's chunked weight gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.test_util import check_grads
from reference import BATCHES
from reference import DEPTHWISE_LOWERINGS
from reference import PADDINGS
from reference import STRIDES
from reference import WINDOWS
from reference import case_id
from reference import random_format
from reference import random_input

import jaxfactor
from jaxfactor import _shift_add
from jaxfactor._lowering import forced

F64 = jnp.float64
TOL = reference.GRAD_TOL[jnp.dtype(F64)]
# Strides and dilation that differ between the axes; the padding varies
# from case to case.
STRIDES_DILATION = dict(strides=(2, 1), dilation=(1, 2))
CASE_PADDINGS = ("SAME", "CIRCULAR", ((2, 0), (0, 1)), "REFLECT", "VALID", 1)


def _check(fn, args):
  check_grads(
    fn, args, order=2, modes=("fwd", "rev"), eps=1.0, atol=TOL, rtol=TOL
  )


def _grad_cases():
  """(kernel, argument, implementation, depthwise, tap_matmul) to check.

  Factorized: each depthwise filter under every depthwise lowering, `x` and
  every other factor under one of them in turn (the lowerings' input
  gradients are each other's transposes, checked against Flax in
  `test_vjp_and_jvp_equal_flax_grouped_conv`); the dense spatial stages as
  XLA's convolution and as tap matmuls. Reconstructed (through `to_dense`):
  one factor per format.
  """
  cases = []
  rotation = iter(DEPTHWISE_LOWERINGS * 5)
  for name, depthwise_args in (
    ("depthwise_separable", (0,)),
    ("cp", (2,)),
    ("tensor_train", (0,)),
  ):
    count = 1 + len(jax.tree.leaves(random_format(name, (3, 2), 2, 3)))
    for argument in ("x", *range(count - 1)):
      lowerings = (
        DEPTHWISE_LOWERINGS if argument in depthwise_args else [next(rotation)]
      )
      for lowering in lowerings:
        cases.append((name, argument, "factorized", lowering, False))
  for name in ("spatially_separable", "low_rank", "tucker", "dense"):
    count = len(jax.tree.leaves(reference.random_kernel(name, (3, 2), 2, 3)))
    for i, argument in enumerate(("x", *range(count))):
      cases.append((name, argument, "factorized", None, i % 2 == 0))
  for name in reference.FORMATS:
    cases.append((name, 1, "reconstructed", None, False))
  return [
    pytest.param(
      *case,
      CASE_PADDINGS[i % len(CASE_PADDINGS)],
      id=case_id(dict(enumerate(case))),
    )
    for i, case in enumerate(cases)
  ]


@pytest.mark.parametrize(
  "name,argument,implementation,depthwise,tap_matmul,padding", _grad_cases()
)
def test_check_grads_one_argument_at_a_time(
  name, argument, implementation, depthwise, tap_matmul, padding
):
  reference.skip_unless_available(depthwise)
  kernel = reference.random_kernel(name, (3, 2), 2, 3)
  x = random_input((1, 6, 5, 2))
  leaves, treedef = jax.tree.flatten(kernel)
  conv = functools.partial(
    jaxfactor.conv,
    implementation=implementation,
    padding=padding,
    **STRIDES_DILATION,
  )
  if argument == "x":
    fn, primal = (lambda x: conv(x, kernel)), x
  else:

    def fn(leaf):
      replaced = leaves[:argument] + [leaf] + leaves[argument + 1 :]
      return conv(x, treedef.unflatten(replaced))

    primal = leaves[argument]
  with forced(depthwise=depthwise, tap_matmul=tap_matmul):
    _check(jax.jit(fn), (primal,))


@pytest.mark.parametrize("lowering", DEPTHWISE_LOWERINGS)
def test_check_grads_of_depthwise_conv(lowering):
  reference.skip_unless_available(lowering)
  x = random_input((1, 6, 5, 2))
  kernel = random_input((3, 2, 1, 4), seed=2)  # channel multiplier 2
  conv = functools.partial(
    jaxfactor.depthwise_conv, padding="REFLECT", **STRIDES_DILATION
  )
  with forced(depthwise=lowering):
    _check(jax.jit(lambda x: conv(x, kernel)), (x,))
    _check(jax.jit(lambda k: conv(x, k)), (kernel,))


def test_check_grads_of_pointwise_conv():
  x = random_input((2, 5, 4, 2))
  kernel = random_input((2, 3), seed=3)
  _check(jax.jit(lambda x: jaxfactor.pointwise_conv(x, kernel)), (x,))
  _check(jax.jit(lambda k: jaxfactor.pointwise_conv(x, k)), (kernel,))


@pytest.mark.parametrize("lowering", DEPTHWISE_LOWERINGS)
def test_forward_mode_equals_reverse_mode(lowering):
  """`jax.jacfwd` equals `jax.jacrev` through `conv` (CP, depthwise
  separable) and `depthwise_conv`; `jax.jvp` of these linear maps in `x`
  is the map applied to the tangent."""
  reference.skip_unless_available(lowering)
  x = random_input((1, 5, 4, 2))
  tangent = random_input(x.shape, seed=5)
  functions = {
    name: functools.partial(
      jaxfactor.conv,
      kernel=random_format(name, (3, 2), 2, 3),
      implementation="factorized",
      **STRIDES_DILATION,
    )
    for name in ("cp", "depthwise_separable")
  }
  functions["depthwise_conv"] = functools.partial(
    jaxfactor.depthwise_conv,
    kernel=random_input((3, 2, 1, 4), seed=2),
    **STRIDES_DILATION,
  )
  with forced(depthwise=lowering):
    for name, fn in functions.items():
      forward = jax.jit(jax.jacfwd(fn))(x)
      reverse = jax.jit(jax.jacrev(fn))(x)
      np.testing.assert_allclose(forward, reverse, rtol=1e-12, atol=1e-12)
      y, dy = jax.jit(lambda x, t, fn=fn: jax.jvp(fn, (x,), (t,)))(x, tangent)
      np.testing.assert_allclose(dy, fn(tangent), rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(y, fn(x), rtol=1e-12, atol=1e-12)
      assert np.abs(forward).max() > 0, name


def _possible(case):
  return case.get("padding") != "CAUSAL" or case.get("n", 1) == 1


VJP_CASES = reference.all_pairs(
  {
    "padding": PADDINGS,
    "n": (1, 2, 3),
    "depthwise": DEPTHWISE_LOWERINGS,
    "strides": STRIDES,
    "dilation": STRIDES,
    "multiplier": (1, 2),
    "batch": BATCHES[:3],
  },
  _possible,
)


@pytest.mark.parametrize("case", VJP_CASES, ids=case_id)
def test_vjp_and_jvp_equal_flax_grouped_conv(case):
  """Each lowering's transposes (reverse mode) and tangents (forward mode)
  against autodiff of Flax's `nn.Conv(feature_group_count=C)`."""
  reference.skip_unless_available(case["depthwise"])
  n, channels = case["n"], 3
  kernel = random_input((*WINDOWS[n], 1, channels * case["multiplier"]), seed=2)
  x = random_input(
    reference.spatial_input_shape(WINDOWS[n], batch=case["batch"], extra=3)
  )
  kwargs = reference.geometry(case, n)
  ours = functools.partial(jaxfactor.depthwise_conv, **kwargs)
  flax = functools.partial(
    reference.flax_conv, feature_group_count=channels, **kwargs
  )
  cotangent = random_input(jax.eval_shape(flax, x, kernel).shape, seed=3)
  tangents = (
    random_input(x.shape, seed=4),
    random_input(kernel.shape, seed=5),
  )

  def derivatives(fn, x, kernel):
    _, pullback = jax.vjp(fn, x, kernel)
    _, tangent = jax.jvp(fn, (x, kernel), tangents)
    return (*pullback(cotangent), tangent)

  with forced(depthwise=case["depthwise"]):
    got = jax.jit(functools.partial(derivatives, ours))(x, kernel)
  want = derivatives(flax, x, kernel)
  for a, b in zip(got, want):
    assert reference.relative_error(a, b) < reference.rtol(F64)


# --- the shift-add's weight gradient ------------------------------------------


@pytest.mark.parametrize(
  ("batch", "devices", "chunk"),
  [
    (32, 1, 4),
    (32, 2, 8),
    (30, 1, 5),
    (31, 1, 5),
    (14, 1, 5),
    (12, 4, 12),
    (13, 2, 10),
  ],
)
def test_weight_grad_chunk_divides_the_batch(batch, devices, chunk):
  """Loop chunks: a multiple of the devices, near `CHUNK_BYTES` per device
  (here 5 images), dividing the batch where one of >= half that size does."""
  per_item = _shift_add.CHUNK_BYTES // 5
  assert _shift_add.chunk_size(batch, per_item, devices) == chunk


@pytest.mark.parametrize("batch,loops", [(7, 1), (11, 3), (12, 2), (14, 2)])
def test_weight_grad_loop_equals_the_definition(monkeypatch, batch, loops):
  """The chunked loop (real activations are > 1 MiB; these are shrunk to
  reach it: 4 images per step, 2 for a batch of 14, one pass for 7), a
  remainder chunk included (batch 11), equals the definition; in bfloat16
  it sums in float32 and rounds once."""
  geometry = dict(strides=(1, 1), dilation=(1, 1), pads=((1, 1), (1, 1)))

  def weight_grad(x, cotangent):
    return _shift_add.weight_grad(x, cotangent, (3, 3), *geometry.values())

  for dtype in (F64, jnp.bfloat16):
    x = random_input((batch, 5, 4, 3), dtype=dtype)
    cotangent = random_input((batch, 5, 4, 3), seed=3, dtype=dtype)
    # 4 images' bytes in this dtype per loop step.
    monkeypatch.setattr(
      _shift_add, "CHUNK_BYTES", 4 * 5 * 4 * 3 * jnp.dtype(dtype).itemsize
    )
    # The taps are a loop (`lax.map`) in each pass over a chunk, the chunks
    # another (`fori_loop`), with one more pass for a remainder.
    jaxpr = str(jax.make_jaxpr(weight_grad)(x, cotangent))
    assert jaxpr.count("scan[") + jaxpr.count("while[") == loops
    actual = jax.jit(weight_grad)(x, cotangent)
    _, _, expected = reference.numpy_depthwise(
      x, np.ones((3, 3, 3)), cotangent, **geometry
    )
    bound = reference.ROUNDED_ONCE.get(jnp.dtype(dtype), reference.rtol(F64))
    assert reference.relative_error(actual, expected) < bound
