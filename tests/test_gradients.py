"""Gradients checked numerically: `check_grads`, order 2, fwd and rev, float64.

A factorized convolution is linear in `x` and in each factor separately, so
central differences with `eps=1.0` are exact up to rounding (as in JAX's own
convolution tests), and one factor is checked at a time.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

import jaxfactor
from reference import FORMATS, random_format, random_input

# Float64 gradient tolerance from JAX's own tables (f64 ~1e-5).
GRAD_TOL = 1e-5
GEOMETRY = dict(strides=(2, 1), padding="SAME", dilation=(1, 2))


def _check(f, args):
  check_grads(f, args, order=2, modes=("fwd", "rev"), eps=1.0,
              atol=GRAD_TOL, rtol=GRAD_TOL)


def _factor_paths(fmt):
  return [path for path, _ in jax.tree_util.tree_leaves_with_path(fmt)]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_grads_wrt_x(name, implementation):
  fmt = random_format(name, (3, 2), 2, 3)
  x = random_input((1, 5, 4, 2))
  conv = jax.jit(lambda x: jaxfactor.conv(
      x, fmt, implementation=implementation, **GEOMETRY))
  _check(conv, (x,))


@pytest.mark.parametrize("name", ["depthwise_separable", "cp"])
@pytest.mark.parametrize("lowering", ["shift_add", "grouped"])
def test_grads_of_each_depthwise_lowering(name, lowering):
  fmt = random_format(name, (3, 2), 2, 3)
  x = random_input((1, 5, 4, 2))
  leaves, treedef = jax.tree.flatten(fmt)

  def conv(x, first):
    f = treedef.unflatten([first, *leaves[1:]])
    return jaxfactor.conv(x, f, implementation="factorized",
                          depthwise_lowering=lowering, **GEOMETRY)

  _check(jax.jit(lambda x: conv(x, leaves[0])), (x,))
  _check(jax.jit(lambda first: conv(x, first)), (leaves[0],))


def _grad_cases():
  for name in FORMATS:
    fmt = random_format(name, (3, 2), 2, 3)
    for index, path in enumerate(_factor_paths(fmt)):
      yield name, index, jax.tree_util.keystr(path)


@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
@pytest.mark.parametrize("name,index,path", list(_grad_cases()))
def test_grads_wrt_each_factor(name, index, path, implementation):
  del path  # only in the test id
  fmt = random_format(name, (3, 2), 2, 3)
  leaves, treedef = jax.tree.flatten(fmt)
  x = random_input((1, 5, 4, 2))

  @jax.jit
  def conv(factor):
    replaced = treedef.unflatten(leaves[:index] + [factor] + leaves[index + 1:])
    return jaxfactor.conv(x, replaced, implementation=implementation,
                          **GEOMETRY)

  _check(conv, (leaves[index],))


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT"])
def test_grads_through_materialized_padding(padding):
  fmt = random_format("cp", (3, 3), 2, 3)
  x = random_input((1, 4, 5, 2))
  _check(jax.jit(lambda x: jaxfactor.conv(x, fmt, padding=padding)), (x,))


def test_grads_of_primitives():
  x = random_input((1, 5, 4, 2))
  depthwise = random_input((3, 2, 1, 4), seed=2)
  pointwise = random_input((2, 3), seed=3)
  _check(jax.jit(lambda x: jaxfactor.depthwise_conv(x, depthwise, **GEOMETRY)),
         (x,))
  _check(jax.jit(lambda k: jaxfactor.depthwise_conv(x, k, **GEOMETRY)),
         (depthwise,))
  _check(jax.jit(lambda x: jaxfactor.pointwise_conv(x, pointwise)), (x,))
  _check(jax.jit(lambda k: jaxfactor.pointwise_conv(x, k)), (pointwise,))


def test_grads_of_dense_kernel():
  x = random_input((1, 5, 4, 2))
  kernel = random_input((3, 2, 2, 3), seed=2)
  _check(jax.jit(lambda x: jaxfactor.conv(x, kernel, **GEOMETRY)), (x,))
  _check(jax.jit(lambda k: jaxfactor.conv(x, k, **GEOMETRY)), (kernel,))
