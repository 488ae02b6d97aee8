"""The compiled depthwise kernel, called directly through its FFI targets.

The three handlers (forward, input gradient, weight gradient) against a
float64 numpy reference on random geometries, the FFI boundary's checks, and
failures inside the kernel's thread pool. The tests call the registered
targets with `jax.ffi.ffi_call` (layout [batch, 3 spatial axes, channels],
weights [3 spatial axes, channels], attributes `stride`, `dilation` and the
low `pad` as int64 arrays), not jaxfactor's primitives, so they test the
kernel alone. `tools/sanitize.sh` runs them against a build with
AddressSanitizer and UndefinedBehaviorSanitizer.
"""

import ctypes
import os
import subprocess

import jax
import numpy as np
import pytest
import reference
from jax import lax

from jaxfactor import _native

pytestmark = pytest.mark.skipif(
  not _native.available(),
  reason=f"native kernel unavailable: {_native.error()}",
)

TARGETS = {
  name: f"jaxfactor_depthwise_{name}"
  for name in ("forward", "input_grad", "weight_grad")
}
# Each code path of the kernel: 1 and 3 channels take the flat runs (the
# weights repeated to whole vectors), 16 a tile of one float32 vector, 17 the
# tiles with leftover channels, 130 the wide per-position sums (float64's
# vectors are half as wide, so its paths shift).
CHANNELS = (1, 3, 16, 17, 130)
DTYPES = (np.float32, np.float64)
# Relative to the sum of the absolute products.
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-12}


class Case:
  """A geometry over 3 spatial axes, pads as lax's (low, high) pairs."""

  def __init__(self, *, batch, size, window, stride, dilation, pads):
    self.batch, self.size, self.window = batch, size, window
    self.stride, self.dilation, self.pads = stride, dilation, pads

  def __repr__(self):
    return (
      f"Case(batch={self.batch}, size={self.size}, window={self.window},"
      f" stride={self.stride}, dilation={self.dilation},"
      f" pads={self.pads})"
    )


FIXED = (
  # A long row: the register tiles at their full widths.
  Case(
    batch=2,
    size=(1, 2, 45),
    window=(1, 2, 3),
    stride=(1, 1, 1),
    dilation=(1, 1, 2),
    pads=((0, 0), (1, 0), (2, 2)),
  ),
  # Strides and dilations that differ per axis, odd padding.
  Case(
    batch=1,
    size=(5, 6, 7),
    window=(3, 2, 3),
    stride=(2, 1, 3),
    dilation=(1, 2, 1),
    pads=((1, 1), (0, 1), (2, 0)),
  ),
  # Rows shorter than the (dilated) window.
  Case(
    batch=2,
    size=(1, 3, 2),
    window=(1, 2, 3),
    stride=(1, 1, 1),
    dilation=(1, 1, 2),
    pads=((0, 0), (1, 1), (3, 2)),
  ),
  # Negative padding (lax crops), strided.
  Case(
    batch=1,
    size=(1, 4, 9),
    window=(1, 3, 4),
    stride=(1, 2, 2),
    dilation=(1, 1, 1),
    pads=((0, 0), (-1, 2), (3, -1)),
  ),
)


def random_case(seed):
  """1 to 3 real spatial axes (missing ones size 1 in front), each with its
  own window, stride, dilation and padding; rows may be shorter than the
  dilated window."""
  rng = np.random.default_rng(seed)
  axes = int(rng.integers(1, 4))
  size, window, stride, dilation, pads = [], [], [], [], []
  for axis in range(3):
    if axis < 3 - axes:
      n, k, s, d, lo, hi = 1, 1, 1, 1, 0, 0
    else:
      n, k = int(rng.integers(1, 12)), int(rng.integers(1, 5))
      s, d = int(rng.integers(1, 4)), int(rng.integers(1, 3))
      lo, hi = (int(p) for p in rng.integers(-1, 4, size=2))
      hi = max(hi, (k - 1) * d + 1 - n - lo)  # at least one output
    size.append(n)
    window.append(k)
    stride.append(s)
    dilation.append(d)
    pads.append((lo, hi))
  return Case(
    batch=int(rng.integers(1, 3)),
    size=tuple(size),
    window=tuple(window),
    stride=tuple(stride),
    dilation=tuple(dilation),
    pads=tuple(pads),
  )


CASES = [*FIXED, *(random_case(seed) for seed in range(6))]


def attributes(stride, dilation, low_pads):
  return {
    "stride": np.asarray(stride, np.int64),
    "dilation": np.asarray(dilation, np.int64),
    "pad": np.asarray(low_pads, np.int64),
  }


def native(name, out_shape, dtype, a, b, **attrs):
  """One handler, called through its FFI target."""
  return jax.ffi.ffi_call(
    TARGETS[name], jax.ShapeDtypeStruct(out_shape, dtype)
  )(a, b, **attrs)


def grouped(case, x, w):
  return lax.conv_general_dilated(
    x,
    w[..., None, :],
    case.stride,
    case.pads,
    rhs_dilation=case.dilation,
    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
    feature_group_count=x.shape[-1],
    precision=lax.Precision.HIGHEST,
  )


def operands(case, channels, dtype, rng):
  """Random x, w and dy for `case`."""
  x = rng.standard_normal((case.batch, *case.size, channels)).astype(dtype)
  w = rng.standard_normal((*case.window, channels)).astype(dtype)
  y_shape = jax.eval_shape(lambda x, w: grouped(case, x, w), x, w).shape
  return x, w, rng.standard_normal(y_shape).astype(dtype)


def expected(case, triples):
  """Per (x, w, dy): y, dx and dw in float64 numpy
  (`reference.numpy_depthwise`), and bounds on their sums of absolute
  products (the same maps of |x|, |w| and |dy|)."""
  geometry = dict(strides=case.stride, pads=case.pads, dilation=case.dilation)
  return [
    (
      reference.numpy_depthwise(x, w, dy, **geometry),
      reference.numpy_depthwise(*map(np.abs, (x, w, dy)), **geometry),
    )
    for x, w, dy in triples
  ]


def kernel(case, triples):
  """Per (x, w, dy): y, dx and dw from the three FFI targets."""
  attrs = attributes(case.stride, case.dilation, [lo for lo, _ in case.pads])

  @jax.jit
  def run(triples):
    return [
      (
        native("forward", dy.shape, dy.dtype, x, w, **attrs),
        native("input_grad", x.shape, x.dtype, dy, w, **attrs),
        native("weight_grad", w.shape, w.dtype, x, dy, **attrs),
      )
      for x, w, dy in triples
    ]

  return run(triples)


def assert_close(name, got, want, bound, dtype):
  got, want, bound = (np.asarray(a) for a in (got, want, bound))
  assert got.dtype == dtype, (name, got.dtype)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  error = np.abs(got - want)
  allowed = TOLERANCE[dtype] * bound + np.finfo(dtype).tiny
  worst = np.unravel_index(np.argmax(error - allowed), error.shape)
  assert np.all(error <= allowed), (
    f"{name}: |{got[worst]} - {want[worst]}| > {allowed[worst]} at {worst}"
  )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize(
  "case", CASES, ids=[f"case{i}" for i in range(len(CASES))]
)
def test_kernel_equals_the_definition(case, dtype):
  """Forward, input and weight gradient, for every channel count."""
  rng = np.random.default_rng(0)
  triples = [operands(case, c, dtype, rng) for c in CHANNELS]
  for channels, gots, (wants, bounds) in zip(
    CHANNELS, kernel(case, triples), expected(case, triples)
  ):
    for name, got, want, bound in zip(TARGETS, gots, wants, bounds):
      assert_close(
        f"{name}, {channels} channels, {case}", got, want, bound, dtype
      )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_empty_operands_give_zeros(dtype):
  """An operand with no elements: every sum is empty, the result zeros."""
  attrs = attributes((1, 1, 1), (1, 1, 1), (0, 0, 0))
  x = np.ones((2, 1, 1, 4, 3), dtype)
  # A window axis of size 0 (weights with no elements).
  y = native(
    "forward", (2, 1, 1, 4, 3), dtype, x, np.ones((1, 1, 0, 3), dtype), **attrs
  )
  np.testing.assert_array_equal(y, 0)
  # No channels at all: nothing to compute.
  y = native(
    "forward",
    (2, 1, 1, 4, 0),
    dtype,
    x[..., :0],
    np.ones((1, 1, 1, 0), dtype),
    **attrs,
  )
  assert y.shape == (2, 1, 1, 4, 0)
  # No batch: the weight gradient is zeros.
  dw = native(
    "weight_grad",
    (1, 1, 2, 3),
    dtype,
    x[:0],
    np.ones((0, 1, 1, 3, 3), dtype),
    **attrs,
  )
  np.testing.assert_array_equal(dw, 0)


def _valid_forward(dtype=np.float32):
  """A valid forward call's operands, output shape and attributes."""
  x = np.ones((2, 1, 3, 8, 4), dtype)
  w = np.ones((1, 2, 3, 4), dtype)
  return x, w, (2, 1, 2, 6, 4), attributes((1, 1, 1), (1, 1, 1), (0, 0, 0))


def _replace(attrs, **changes):
  return {**attrs, **{k: np.asarray(v, np.int64) for k, v in changes.items()}}


_x, _w, _y_shape, _attrs = _valid_forward()
# (handler, output shape, output dtype, a, b, attributes, error message)
BAD_CALLS = {
  "integer_operands": (
    "forward",
    _y_shape,
    np.int32,
    _x.astype(np.int32),
    _w.astype(np.int32),
    _attrs,
    "x is int32; only float32 and float64",
  ),
  "half_operands": (
    "forward",
    _y_shape,
    np.float16,
    _x.astype(np.float16),
    _w.astype(np.float16),
    _attrs,
    "x is float16; only float32 and float64",
  ),
  "mixed_weights": (
    "forward",
    _y_shape,
    np.float32,
    _x,
    _w.astype(np.float64),
    _attrs,
    "w is float64 but x is float32",
  ),
  # Would have written 8-byte elements into a 4-byte buffer's bounds.
  "mixed_output": (
    "forward",
    _y_shape,
    np.float64,
    _x,
    _w,
    _attrs,
    "y is float64 but x is float32",
  ),
  "rank_4_input": (
    "forward",
    _y_shape,
    np.float32,
    _x[0],
    _w,
    _attrs,
    r"x has shape \[1, 3, 8, 4\]; expected rank 5",
  ),
  "rank_3_weights": (
    "forward",
    _y_shape,
    np.float32,
    _x,
    _w[0],
    _attrs,
    r"w has shape \[2, 3, 4\]; expected rank 4",
  ),
  "rank_4_output": (
    "forward",
    _y_shape[1:],
    np.float32,
    _x,
    _w,
    _attrs,
    "y has shape .*; expected rank 5",
  ),
  "weight_channels": (
    "forward",
    _y_shape,
    np.float32,
    _x,
    _w[..., :3],
    _attrs,
    "differ in channels",
  ),
  "output_channels": (
    "forward",
    (*_y_shape[:-1], 5),
    np.float32,
    _x,
    _w,
    _attrs,
    "differ in channels",
  ),
  "output_batch": (
    "forward",
    (3, *_y_shape[1:]),
    np.float32,
    _x,
    _w,
    _attrs,
    "differ in batch size",
  ),
  "two_strides": (
    "forward",
    _y_shape,
    np.float32,
    _x,
    _w,
    _replace(_attrs, stride=(1, 1)),
    "expected 3 strides, dilations and paddings, got 2",
  ),
  "four_pads": (
    "forward",
    _y_shape,
    np.float32,
    _x,
    _w,
    _replace(_attrs, pad=(0, 0, 0, 0)),
    "expected 3 strides, dilations and paddings",
  ),
  "zero_stride": (
    "forward",
    _y_shape,
    np.float32,
    _x,
    _w,
    _replace(_attrs, stride=(1, 0, 1)),
    "spatial axis 1: stride 0 and dilation 1 must be",
  ),
  "negative_dilation": (
    "forward",
    _y_shape,
    np.float32,
    _x,
    _w,
    _replace(_attrs, dilation=(1, 1, -2)),
    "spatial axis 2: stride 1 and dilation -2 must",
  ),
  "huge_pad": (
    "forward",
    _y_shape,
    np.float32,
    _x,
    _w,
    _replace(_attrs, pad=(0, 0, -(2**50))),
    "spatial axis 2: padding -1125899906842624 is outside",
  ),
  # Strides this large are allowed, but 6 outputs 2^40 apart need far
  # more padding than the input has.
  "output_out_of_reach": (
    "forward",
    _y_shape,
    np.float32,
    _x,
    _w,
    _replace(_attrs, stride=(1, 1, 2**40)),
    "spatial axis 2: an output of size 6 from an"
    " input of size 8 .* needs a high padding",
  ),
  "input_grad_channels": (
    "input_grad",
    _x.shape[:-1] + (3,),
    np.float32,
    np.ones(_y_shape, np.float32),
    _w,
    _attrs,
    "input_grad: dx .* differ in channels",
  ),
  "input_grad_dtype": (
    "input_grad",
    _x.shape,
    np.float32,
    np.ones(_y_shape, np.float64),
    _w,
    _attrs,
    "input_grad: dy is float64 but dx is float32",
  ),
  "weight_grad_rank": (
    "weight_grad",
    _w.shape[1:],
    np.float32,
    _x,
    np.ones(_y_shape, np.float32),
    _attrs,
    r"weight_grad: dw has shape \[2, 3, 4\]",
  ),
  "weight_grad_batch": (
    "weight_grad",
    _w.shape,
    np.float32,
    _x,
    np.ones((1, *_y_shape[1:]), np.float32),
    _attrs,
    "weight_grad: x .* differ in batch size",
  ),
}


def test_valid_call_is_accepted():
  """The calls below differ from this valid one in one respect each."""
  y = native("forward", _y_shape, np.float32, _x, _w, **_attrs)
  np.testing.assert_array_equal(y, 6)  # 2 x 3 taps of ones


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_boundary_rejects_a_wrong_call(call):
  """XLA passes shapes and dtypes through unchecked: a wrong call must come
  back as a Python exception (not a crash or a read past a buffer), and the
  process must go on working."""
  name, out_shape, out_dtype, a, b, attrs, message = call
  with pytest.raises(
    jax.errors.JaxRuntimeError, match=f"jaxfactor depthwise .*{message}"
  ):
    np.asarray(native(name, out_shape, out_dtype, a, b, **attrs))
  test_valid_call_is_accepted()


@pytest.fixture(scope="module")
def faulty_targets(tmp_path_factory):
  """The kernel built with fault injection (-DJAXFACTOR_NATIVE_FAULTS, a
  test-only switch) and the same flags as the library in use, sanitizers
  included, registered under its own target names."""
  compiler = _native._compiler()
  path = str(tmp_path_factory.mktemp("native") / "faulty.so")
  subprocess.run(
    [
      compiler,
      *_native._flags(),
      "-O1",
      "-DJAXFACTOR_NATIVE_FAULTS",
      "-isystem",
      jax.ffi.include_dir(),
      _native._SOURCE,
      "-o",
      path,
    ],
    check=True,
    capture_output=True,
    timeout=600,
  )
  library = ctypes.cdll.LoadLibrary(path)
  targets = {}
  for name, symbol in (
    ("forward", "JaxfactorDepthwiseForward"),
    ("input_grad", "JaxfactorDepthwiseInputGrad"),
    ("weight_grad", "JaxfactorDepthwiseWeightGrad"),
  ):
    targets[name] = f"jaxfactor_test_faulty_{name}"
    jax.ffi.register_ffi_target(
      targets[name], jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
    )
  return targets


def _pool_threads():
  """XLA's CPU thread pool has a thread per usable core."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


@pytest.mark.parametrize("side", ["caller", "pool"])
@pytest.mark.parametrize("name", TARGETS)
def test_exception_in_kernel_is_an_error(
  faulty_targets, monkeypatch, name, side
):
  """A C++ exception on the calling thread or in a pool task comes back as
  an error once every task is done: no std::terminate, no unwinding while
  tasks still run, and the next call is right."""
  if side == "pool" and _pool_threads() < 2:
    pytest.skip("XLA's thread pool has a single thread here")
  dtype = np.float32
  case = FIXED[1]
  x, w, dy = operands(case, 17, dtype, np.random.default_rng(0))
  a, b, out_shape = {
    "forward": (x, w, dy.shape),
    "input_grad": (dy, w, x.shape),
    "weight_grad": (x, dy, w.shape),
  }[name]
  attrs = attributes(case.stride, case.dilation, [lo for lo, _ in case.pads])
  call = jax.ffi.ffi_call(
    faulty_targets[name], jax.ShapeDtypeStruct(out_shape, dtype)
  )
  monkeypatch.setenv("JAXFACTOR_NATIVE_FAULT", side)
  with pytest.raises(
    jax.errors.JaxRuntimeError,
    match=f"jaxfactor depthwise {name}: injected fault on the {side}",
  ):
    np.asarray(call(a, b, **attrs))
  monkeypatch.delenv("JAXFACTOR_NATIVE_FAULT")
  [(wants, bounds)] = expected(case, [(x, w, dy)])
  index = list(TARGETS).index(name)
  assert_close(name, call(a, b, **attrs), wants[index], bounds[index], dtype)
