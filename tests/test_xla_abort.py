"""Convolution gradients that abort XLA:CPU, routed around by jaxfactor.

jaxlib 0.10.2's algebraic simplifier aborts the process (`Check failed ...
Window dimensions do not match RHS shape`) when it compiles the input
gradient of a convolution that has, along one axis, window 2, stride 2,
dilation 1 and padding (1, 1) or (1, 2) on an even size, when the other
axes' windows are larger than their outputs (docs/known-issues.md).
`jaxfactor._stages.spatial_conv` pads such axes itself; without that, each
case below kills the test process.

The reference is a float64 numpy convolution and its adjoints, written out
tap by tap; a format's factor gradients are the dense kernel's gradient
pulled back through `to_dense`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfactor
from jaxfactor import _stages

# (input spatial shape, window, strides, padding): with `lax`'s convolution
# each aborted under `jax.jit(jax.grad(...))` on jaxlib 0.10.2.
CASES = {
  "reproducer": ((4, 4), (2, 3), (2, 1), ((1, 1), (0, 0))),
  "unread_high_pad": ((6, 4), (2, 3), (2, 1), ((1, 2), (0, 0))),
  "second_axis": ((4, 4), (3, 2), (1, 2), ((0, 0), (1, 1))),
  "int_padding": ((4, 2), (2, 3), (2, 1), 1),
  "3d": ((4, 4, 4), (2, 3, 3), (2, 1, 1), ((1, 1), (0, 0), (0, 0))),
}
C, F = 3, 4


def _pairs(padding, n):
  if isinstance(padding, int):
    return ((padding, padding),) * n
  return tuple(padding)


def _taps(xp_shape, window, strides):
  """Each tap and the slices of the padded input its outputs read."""
  n = len(window)
  out = [(xp_shape[1 + a] - window[a]) // strides[a] + 1 for a in range(n)]
  for tap in np.ndindex(*window):
    yield (
      tap,
      (
        slice(None),
        *(
          slice(t, t + (o - 1) * s + 1, s) for t, o, s in zip(tap, out, strides)
        ),
      ),
    )


def numpy_conv_and_grads(x, w, strides, padding, r):
  """`y = conv(x, w)` and the gradients of `sum(r * y)`, in float64."""
  n = w.ndim - 2
  pads = _pairs(padding, n)
  xp = np.pad(x, [(0, 0), *pads, (0, 0)])
  y = np.zeros(r.shape)
  gxp, gw = np.zeros_like(xp), np.zeros_like(w)
  lead = list(range(n + 1))  # batch and spatial axes
  for tap, sl in _taps(xp.shape, w.shape[:n], strides):
    y += xp[sl] @ w[tap]
    gxp[sl] += r @ w[tap].T
    gw[tap] = np.tensordot(xp[sl], r, (lead, lead))
  crop = tuple(
    slice(lo, lo + size) for (lo, _), size in zip(pads, x.shape[1:-1])
  )
  return y, gxp[(slice(None), *crop)], gw


def _kernel(kind, window, rng):
  def r(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float64)

  if kind == "dense":
    return r(*window, C, F)
  if kind == "low_rank":
    return jaxfactor.LowRank(r(*window, C, 2), r(2, F))
  return jaxfactor.Tucker(r(C, 2), r(*window, 2, 3), r(3, F))


# Every case with a dense kernel; the formats' chains (whose dense spatial
# stage has the same geometry) on two, to keep compilations few. A format's
# "reconstructed" convolution is the dense one with `to_dense()`.
RUNS = (
  [(case, "dense", "auto") for case in CASES]
  + [
    (case, kind, "factorized")
    for case in ("reproducer", "3d")
    for kind in ("low_rank", "tucker")
  ]
  + [("reproducer", "tucker", "reconstructed")]
)


@pytest.mark.parametrize("case,kind,implementation", RUNS)
def test_grad_does_not_abort(case, kind, implementation):
  spatial, window, strides, padding = CASES[case]
  rng = np.random.default_rng(0)
  kernel = _kernel(kind, window, rng)
  x = jnp.asarray(rng.standard_normal((2, *spatial, C)), jnp.float64)

  def conv(x, kernel):
    return jaxfactor.conv(
      x, kernel, strides=strides, padding=padding, implementation=implementation
    )

  r = jnp.asarray(
    rng.standard_normal(jax.eval_shape(conv, x, kernel).shape), jnp.float64
  )
  grad = jax.grad(lambda x, k: jnp.sum(r * conv(x, k)), argnums=(0, 1))
  # One compilation for the forward pass and both gradients.
  y, (gx, gk) = jax.jit(lambda x, k: (conv(x, k), grad(x, k)))(x, kernel)

  dense = kernel if kind == "dense" else kernel.to_dense()
  y_ref, gx_ref, gw_ref = numpy_conv_and_grads(
    np.asarray(x), np.asarray(dense), strides, padding, np.asarray(r)
  )
  gk_ref = (
    gw_ref
    if kind == "dense"
    else jax.vjp(lambda k: k.to_dense(), kernel)[1](jnp.asarray(gw_ref))[0]
  )
  tol = dict(rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(y, y_ref, **tol)
  np.testing.assert_allclose(gx, gx_ref, **tol)
  for got, want in zip(jax.tree.leaves(gk), jax.tree.leaves(gk_ref)):
    np.testing.assert_allclose(got, want, **tol)


def test_only_prone_axes_are_padded():
  # Axis 0 is prone: window 2, stride 2, padding (1, 1), size 4, and the
  # other axes' windows (2 x 3 taps) exceed their outputs (3 x 1).
  window, strides, dilation = (2, 2, 3), (2, 2, 1), (1, 1, 1)
  pads = [(1, 1), (1, 1), (0, 0)]
  x = jnp.zeros((1, 4, 5, 3, 1))
  padded, left = _stages.pad_swap_prone_axes(x, window, strides, dilation, pads)
  assert padded.shape == (1, 6, 5, 3, 1)
  assert left == [(0, 0), (1, 1), (0, 0)]
  # Not where XLA keeps the operands (outputs 3 x 6 positions) or where the
  # axis's output size is 2 (size 2).
  for shape in ((1, 4, 5, 8, 1), (1, 2, 5, 3, 1)):
    x = jnp.zeros(shape)
    same, kept = _stages.pad_swap_prone_axes(x, window, strides, dilation, pads)
    assert same is x and kept == pads
