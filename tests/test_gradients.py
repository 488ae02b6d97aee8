"""Gradients checked numerically: `check_grads`, order 2, fwd and rev, float64.

A factorized convolution is linear in `x` and in each factor separately, so
central differences with `eps=1.0` are exact up to rounding (as in JAX's own
convolution tests), and one factor is checked at a time.

The "shift_add" depthwise lowering has a hand-written VJP and so, like every
`jax.custom_vjp` function, supports reverse mode only: its checks run in "rev"
mode (order 2: grad of grad), and forward mode is checked through
"shift_add_autodiff" and "grouped", which share its forward pass or its
results. "native" (the CPU default on one device, where it builds) is
three bilinear primitives, each the others' transpose: both
modes, any order.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

import jaxfactor
from jaxfactor import _native
from jaxfactor import primitives
from reference import FORMATS, random_format, random_input

# Float64 gradient tolerance from JAX's own tables (f64 ~1e-5).
GRAD_TOL = 1e-5
GEOMETRY = dict(strides=(2, 1), padding="SAME", dilation=(1, 2))


# What `depthwise_lowering="auto"` runs here.
AUTO_LOWERING = primitives.resolve_depthwise_lowering("test", "auto")


def _modes(has_depthwise=True, lowering="auto"):
  if lowering == "auto":
    lowering = AUTO_LOWERING
  if has_depthwise and lowering == "shift_add":
    return ("rev",)
  return ("fwd", "rev")


def _has_depthwise(fmt):
  return any(primitives.is_depthwise(s) for s in fmt.stages())


def _check(f, args, modes=("fwd", "rev")):
  check_grads(f, args, order=2, modes=modes, eps=1.0,
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
  _check(conv, (x,), _modes(_has_depthwise(fmt)
                            and implementation != "reconstructed"))


# The depthwise lowerings that run here ("native" needs its compiled kernel).
LOWERINGS = ["shift_add", "shift_add_autodiff", "grouped",
             pytest.param("native", marks=pytest.mark.skipif(
                 not _native.available(),
                 reason=f"native kernel unavailable: {_native.error()}"))]


@pytest.mark.parametrize("name", ["depthwise_separable", "cp"])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_grads_of_each_depthwise_lowering(name, lowering):
  fmt = random_format(name, (3, 2), 2, 3)
  x = random_input((1, 5, 4, 2))
  leaves, treedef = jax.tree.flatten(fmt)

  def conv(x, first):
    f = treedef.unflatten([first, *leaves[1:]])
    return jaxfactor.conv(x, f, implementation="factorized",
                          depthwise_lowering=lowering, **GEOMETRY)

  modes = _modes(lowering=lowering)
  _check(jax.jit(lambda x: conv(x, leaves[0])), (x,), modes)
  _check(jax.jit(lambda first: conv(x, first)), (leaves[0],), modes)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("padding",
                         ["SAME", "VALID", "CIRCULAR", "REFLECT", 2, "pairs"])
@pytest.mark.parametrize("geometry", ["unit", "strided_dilated"])
@pytest.mark.parametrize("lowering", ["shift_add", "native"])
def test_hand_written_vjp_equals_grouped_conv_vjp(n, padding, geometry,
                                                  lowering):
  """The hand-written VJPs ("shift_add"'s, "native"'s transposes) against
  autodiff of `lax`'s grouped convolution (and of the shift-add forward
  pass), on every padding mode, N = 1-3, with a channel multiplier."""
  if lowering == "native" and not _native.available():
    pytest.skip(f"native kernel unavailable: {_native.error()}")
  window = (3, 2, 2)[:n]
  x = random_input((2, *(7, 6, 5)[:n], 3))
  kernel = random_input((*window, 1, 6), seed=2)  # channel multiplier 2
  if padding == "pairs":
    padding = ((2, 0), (0, 1), (1, 1))[:n]
  kwargs = dict(padding=padding)
  if geometry == "strided_dilated":
    kwargs.update(strides=(2, 3, 1)[:n], dilation=(2, 1, 2)[:n])
  cotangent = random_input(jaxfactor.depthwise_conv(x, kernel,
                                                    **kwargs).shape, seed=3)

  def vjp(lowering):
    _, pullback = jax.vjp(lambda x, k: jaxfactor.depthwise_conv(
        x, k, depthwise_lowering=lowering, **kwargs), x, kernel)
    return pullback(cotangent)

  ours = vjp(lowering)
  for reference in ("grouped", "shift_add_autodiff"):
    for a, b in zip(ours, vjp(reference)):
      assert jnp.allclose(a, b, rtol=1e-12, atol=1e-12), reference


def test_shift_add_is_reverse_mode_only():
  """Documented: forward mode needs "shift_add_autodiff" or "grouped"."""
  x = random_input((1, 5, 4, 2))
  kernel = random_input((3, 3, 1, 2), seed=2)
  f = lambda x, lowering: jaxfactor.depthwise_conv(
      x, kernel, depthwise_lowering=lowering)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda x: f(x, "shift_add"), (x,), (x,))
  jax.jvp(lambda x: f(x, "shift_add_autodiff"), (x,), (x,))


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

  _check(conv, (leaves[index],),
         _modes(_has_depthwise(fmt) and implementation == "factorized"))


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT"])
def test_grads_through_materialized_padding(padding):
  fmt = random_format("cp", (3, 3), 2, 3)
  x = random_input((1, 4, 5, 2))
  _check(jax.jit(lambda x: jaxfactor.conv(x, fmt, padding=padding)), (x,),
         _modes())


def test_grads_of_primitives():
  x = random_input((1, 5, 4, 2))
  depthwise = random_input((3, 2, 1, 4), seed=2)
  pointwise = random_input((2, 3), seed=3)
  _check(jax.jit(lambda x: jaxfactor.depthwise_conv(x, depthwise, **GEOMETRY)),
         (x,), _modes())
  _check(jax.jit(lambda k: jaxfactor.depthwise_conv(x, k, **GEOMETRY)),
         (depthwise,), _modes())
  _check(jax.jit(lambda x: jaxfactor.pointwise_conv(x, pointwise)), (x,))
  _check(jax.jit(lambda k: jaxfactor.pointwise_conv(x, k)), (pointwise,))


def test_grads_of_dense_kernel():
  x = random_input((1, 5, 4, 2))
  kernel = random_input((3, 2, 2, 3), seed=2)
  _check(jax.jit(lambda x: jaxfactor.conv(x, kernel, **GEOMETRY)), (x,))
  _check(jax.jit(lambda k: jaxfactor.conv(x, k, **GEOMETRY)), (kernel,))


@pytest.mark.parametrize(
    ("batch", "devices", "chunk"),
    [(32, 1, 4), (32, 2, 8), (30, 1, 5), (31, 1, 5), (14, 1, 5), (12, 4, 12),
     (13, 2, 10)])
def test_shift_add_weight_grad_chunk_divides_the_batch(batch, devices, chunk):
  """Loop chunks: a multiple of the devices, near `_CHUNK_BYTES` per device
  (here 5 images), dividing the batch where one of >= half that size does."""
  per_item = primitives._CHUNK_BYTES // 5
  assert primitives._chunk_size(batch, per_item, devices) == chunk


@pytest.mark.parametrize("batch", [7, 11, 12, 14])
def test_shift_add_weight_grad_loop(monkeypatch, batch):
  """The chunked weight-gradient loop (real activations are > 1 MiB; these
  are shrunk to reach it: 4 images per step, 2 for a batch of 14, and one
  pass for 7), a remainder chunk included (batch 11), equals the grouped
  conv's gradient; in bfloat16 it accumulates in float32."""
  assert jax.device_count() == 1  # the chunk is a multiple of the devices
  x = random_input((batch, 5, 4, 3))
  kernel = random_input((3, 3, 1, 3), seed=2)
  cot = random_input((batch, 5, 4, 3), seed=3)

  def kernel_grad(lowering, dtype):
    # 4 images' bytes in this dtype per loop step.
    monkeypatch.setattr(primitives, "_CHUNK_BYTES",
                        4 * 5 * 4 * 3 * jnp.dtype(dtype).itemsize)
    fn = jax.grad(lambda k: jnp.vdot(jaxfactor.depthwise_conv(
        x.astype(dtype), k, depthwise_lowering=lowering),
                                     cot.astype(dtype)).astype(jnp.float32))
    if lowering == "shift_add":
      jaxpr = str(jax.make_jaxpr(fn)(kernel.astype(dtype)))
      # The taps are a loop (`lax.map`, a scan) in each pass over a chunk,
      # and the chunks another (`fori_loop` lowers to a scan), with one more
      # pass for a remainder.
      loops = jaxpr.count("scan[") + jaxpr.count("while[")
      assert loops == {7: 1, 11: 3}.get(batch, 2)
    return fn(kernel.astype(dtype))

  expected = kernel_grad("grouped", jnp.float64)
  assert jnp.allclose(kernel_grad("shift_add", jnp.float64), expected,
                      rtol=1e-12, atol=1e-12)
  low = kernel_grad("shift_add", jnp.bfloat16).astype(jnp.float64)
  # Summing `batch` products of bfloat16 (8 bits) inputs, rounded once.
  assert jnp.max(jnp.abs(low - expected)) < 2e-2 * jnp.max(jnp.abs(expected))


def test_shift_add_grad_exports_with_a_symbolic_batch():
  from jax import export
  kernel = random_input((3, 3, 1, 4), seed=2)
  loss = lambda x: jnp.sum(jaxfactor.depthwise_conv(
      x, kernel, depthwise_lowering="shift_add") ** 2)
  (b,) = export.symbolic_shape("b")
  exported = export.export(jax.jit(jax.grad(loss)))(
      jax.ShapeDtypeStruct((b, 6, 5, 4), jnp.float64))
  x = random_input((3, 6, 5, 4))
  assert jnp.allclose(exported.call(x), jax.grad(loss)(x), rtol=1e-12)
