"""Convolution speed: every jaxfactor format against the dense conv.

For MobileNet-style layer shapes (the low-rank formats at LowRank and Tucker
rank F/4, SpatiallySeparable and CP rank F/2), times the lax dense conv, every
format with each `implementation`, the depthwise conv alone (on CPU also with
its shift-add lowering beside the default compiled kernel), the naive
depthwise lowering Flax/Keras/Haiku build (grouped conv + 1x1 conv), and
PyTorch channels-last when torch is installed (on the CPU, or with CUDA when
JAX runs on a GPU); forward and forward+backward (the forward pass, its output
kept, plus the gradients w.r.t. the input and every factor, as torch's
`y = f(x); y.backward(t)`). jit, 2 warm-ups, `block_until_ready`, `--repeats`
interleaved runs, median and min. Then the compile time of a small
MobileNet-style train step (`compile_times`).

Columns: theoretical FLOP ratio (dense FLOPs / the op's FLOPs, from
`jaxfactor.cost`), achieved speedup (dense time / op time, same run), and the
time over a roofline bound max(FLOPs / peak, bytes / bandwidth) with the
machine's peaks (`--peak-gflops`, `--bandwidth-gbs`; on a GPU or TPU measured
at the start of the run by `measure_peaks`).

Run: `python benchmarks/conv.py` (add `--quick` for a smoke run). XLA flags are
read from the environment, e.g.
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/conv.py`,
and so are glibc's allocator settings, e.g.
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (huge pages for large buffers); pass
`--tag` to keep such runs apart.
`results/conv_gpu.md` ran as
`python benchmarks/conv.py --batch 256 --tag gpu --compile-repeats 3`.
Writes `benchmarks/results/conv[_quick][_TAG].md` and `.json`.
"""

import argparse
import contextlib
import functools
import json
import os
import pathlib
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxfactor
from jaxfactor import _lowering
from jaxfactor import _native

SHAPES = {  # name: (H=W, C, F, stride)
  "mb56": (56, 128, 128, 1),
  "mb28": (28, 256, 256, 1),
  "mb14": (14, 512, 512, 1),
  "mb7": (7, 1024, 1024, 1),
  "s2_56": (56, 128, 256, 2),
  # Few channels: memory- and narrow-GEMM-bound, where "auto" should
  # reconstruct the low-rank formats (their rank-4 stages run slowly).
  "c16_56": (56, 16, 16, 1),
}
QUICK = {"tiny16": (16, 32, 32, 1), "tiny_s2": (16, 32, 64, 2)}
DN = ("NHWC", "HWIO", "NHWC")


def _normal(key, shape, fan_in):
  return jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)


def kernels(c, f, key):
  k = iter(jax.random.split(key, 16))
  return {
    "dense": _normal(next(k), (3, 3, c, f), 9 * c),
    "depthwise_separable": jaxfactor.DepthwiseSeparable(
      _normal(next(k), (3, 3, 1, c), 9), _normal(next(k), (c, f), c)
    ),
    "low_rank": jaxfactor.LowRank(
      _normal(next(k), (3, 3, c, f // 4), 9 * c),
      _normal(next(k), (f // 4, f), f // 4),
    ),
    "tucker": jaxfactor.Tucker(
      _normal(next(k), (c, c // 4), c),
      _normal(next(k), (3, 3, c // 4, f // 4), 9 * c // 4),
      _normal(next(k), (f // 4, f), f // 4),
    ),
    "spatially_separable": jaxfactor.SpatiallySeparable(
      (
        _normal(next(k), (3, c, f // 2), 3 * c),
        _normal(next(k), (3, f // 2, f), 3 * f // 2),
      )
    ),
    "cp": jaxfactor.CP(
      _normal(next(k), (c, f // 2), c),
      (_normal(next(k), (3, f // 2), 3), _normal(next(k), (3, f // 2), 3)),
      _normal(next(k), (f // 2, f), f // 2),
    ),
  }


def depthwise_default():
  """How depthwise convs run by default on this backend (one device)."""
  if jax.default_backend() != "cpu":
    return "grouped"
  return "native" if _native.available() else "shift_add"


class Op(NamedTuple):
  """One timed op: `fn(x, params)`, and what `jaxfactor.cost` counts."""

  fn: Callable[..., Any]
  params: Any
  kernel: Any  # the kernel whose FLOPs are counted; None: a depthwise kernel
  implementation: str = "auto"
  # `jaxfactor._lowering.forced` arguments to compile under, if any.
  lowering: dict | None = None


def ops(c, f, stride, key):
  """`{name: Op}` for one layer shape."""
  ks = kernels(c, f, key)
  out = {}

  def add(name, fn, params, kernel, implementation="auto", lowering=None):
    out[name] = Op(fn, params, kernel, implementation, lowering)

  add(
    "dense | lax conv",
    lambda x, k: jaxfactor.conv(x, k, strides=stride),
    ks["dense"],
    ks["dense"],
  )
  dw = ks["depthwise_separable"].depthwise
  add(
    "depthwise | jaxfactor.depthwise_conv",
    lambda x, k: jaxfactor.depthwise_conv(x, k, strides=stride),
    dw,
    None,
  )
  if depthwise_default() == "native":
    # The CPU's other depthwise lowering, beside the compiled kernel.
    add(
      "depthwise | jaxfactor shift_add",
      lambda x, k: jaxfactor.depthwise_conv(x, k, strides=stride),
      dw,
      None,
      lowering=dict(depthwise="shift_add"),
    )
  add(
    "depthwise | lax grouped (=Flax/Keras/Haiku)",
    lambda x, k: lax.conv_general_dilated(
      x,
      k,
      (stride, stride),
      "SAME",
      dimension_numbers=DN,
      feature_group_count=c,
    ),
    dw,
    None,
  )
  sep = ks["depthwise_separable"]
  add(
    "separable | naive grouped + 1x1 conv",
    lambda x, f_: lax.conv_general_dilated(
      lax.conv_general_dilated(
        x,
        f_.depthwise,
        (stride, stride),
        "SAME",
        dimension_numbers=DN,
        feature_group_count=c,
      ),
      f_.pointwise[None, None],
      (1, 1),
      "SAME",
      dimension_numbers=DN,
    ),
    sep,
    sep,
    "factorized",
  )
  for name in (
    "depthwise_separable",
    "low_rank",
    "tucker",
    "spatially_separable",
    "cp",
  ):
    for impl in ("factorized", "reconstructed", "auto"):
      add(
        f"{name} | {impl}",
        lambda x, f_, impl=impl: jaxfactor.conv(
          x, f_, strides=stride, implementation=impl
        ),
        ks[name],
        ks[name],
        impl,
      )
  return out


def _interleaved(calls, repeats):
  """`{name: call}` -> `{name: [seconds] * repeats}`, one round at a time.

  Two warm-up calls each, then `repeats` rounds over all calls, so slow
  drifts of a shared machine hit every op alike. Each round runs the calls in
  a new random order: in a fixed order an op always follows the same
  neighbour, and one that follows a reconstructed dense conv (which evicts the
  caches) measured up to 1.5x slower than the identical op elsewhere.
  """
  for call in calls.values():
    call()
    call()
  times = {name: [] for name in calls}
  names = list(calls)
  order = np.random.default_rng(0)
  for _ in range(repeats):
    for i in order.permutation(len(names)):
      name, call = names[i], calls[names[i]]
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  return times


def compile_for(fns, args, lowering=None):
  """`{key: fn}` -> `{key: jax.jit(fn)` compiled for `args`}.

  With `lowering` (the arguments of the private hook
  `jaxfactor._lowering.forced`, e.g. `dict(depthwise="shift_add")`), built
  and compiled under that CPU lowering: the hook clears JAX's caches on entry
  and exit, and a compiled executable keeps the lowering it was compiled
  with.
  """
  context = (
    _lowering.forced(**lowering) if lowering else contextlib.nullcontext()
  )
  with context:
    return {key: jax.jit(fn).lower(*args).compile() for key, fn in fns.items()}


def time_compiled(compiled, args, rounds):
  """`{key: compiled}`, each called as `f(*args)` -> `{key: [ms per call]}`,
  interleaved (`_interleaved`)."""
  calls = {
    key: lambda fn=fn: jax.block_until_ready(fn(*args))
    for key, fn in compiled.items()
  }
  return {
    key: [1e3 * t for t in times]
    for key, times in _interleaved(calls, rounds).items()
  }


def depthwise_operands(x_shape, out_shape, seed=0):
  """Random float32 `(x, 3x3 depthwise kernel, cotangent)`."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = (
    jnp.asarray(rng.standard_normal((3, 3, 1, x_shape[-1])), jnp.float32) / 3
  )
  cotangent = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
  return x, kernel, cotangent


def torch_device():
  """Where torch runs beside JAX: CUDA when JAX runs on a GPU, else the CPU."""
  try:
    import torch
  except ImportError:
    return None
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return "cuda"
  return "cpu"


def torch_ops(batch, size, c, f, stride):
  device = torch_device()
  if device is None:
    return {}
  import torch

  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
    sync = lambda: None
  else:
    # cuDNN picks its fastest algorithm per shape, as XLA autotunes its own.
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize

  def tensor(*shape):
    return torch.randn(*shape, device=device).to(
      memory_format=torch.channels_last
    )

  def layer(*args, **kwargs):
    return torch.nn.Conv2d(*args, bias=False, **kwargs).to(
      device=device, memory_format=torch.channels_last
    )

  x = tensor(batch, c, size, size)
  dense = layer(c, f, 3, stride, 1)
  dw = layer(c, c, 3, stride, 1, groups=c)
  pw = layer(c, f, 1)

  out = -(-size // stride)
  cot = {f: tensor(batch, f, out, out) for f in {c, f}}

  def run(module_fn, backward):
    def call():
      xx = x.detach().requires_grad_(backward)
      y = module_fn(xx)
      if backward:
        y.backward(cot[y.shape[1]])
      sync()
      return y

    return call

  return {
    "dense | torch channels-last": lambda b: run(dense, b),
    "depthwise | torch channels-last": lambda b: run(dw, b),
    "separable | torch channels-last": lambda b: run(lambda t: pw(dw(t)), b),
  }


def measure_peaks(n=8192, copy_size=1 << 28, repeats=10):
  """(GFLOP/s, GB/s): a float32 matmul at JAX's default precision, and a copy.

  The roofline's two ceilings on an accelerator, measured in this run: an
  `n`^3 matmul (2 n^3 FLOPs) and an elementwise pass over `copy_size` floats
  (1 GiB; its bytes read plus written), medians of `repeats`.
  """
  a = jax.random.normal(jax.random.key(0), (n, n))
  b = jax.random.normal(jax.random.key(1), (n, n))
  v = jax.random.normal(jax.random.key(2), (copy_size,))
  matmul = jax.jit(jnp.matmul)
  copy = jax.jit(lambda v: v + 1)

  def median_seconds(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  gflops = 2 * n**3 / median_seconds(matmul, a, b) / 1e9
  gbs = 2 * v.nbytes / median_seconds(copy, v) / 1e9
  return gflops, gbs


def _auto_choice(kernel, shape, stride):
  """What `implementation="auto"` runs for this format and input."""
  counts = {
    impl: jaxfactor.cost(
      kernel, shape, strides=stride, implementation=impl
    ).flops
    for impl in ("auto", "factorized", "reconstructed")
  }
  return (
    "factorized"
    if counts["auto"] == counts["factorized"]
    else ("reconstructed")
  )


def _forward_backward(fn, x, params, cotangent):
  """`(y, (dx, dparams))`: the forward pass and the VJP of a random cotangent.

  Returning `y` keeps the forward pass in the program, as in torch's
  `y = f(x); y.backward(cotangent)` (the gradient of `vdot(f(x), t)` alone
  lets XLA drop the last stage's forward pass), and stops XLA from fusing
  the output into a loss it would never meet in a model. A random cotangent:
  with `sum(y)` it is a broadcast 1 that XLA folds into the backward pass,
  which flatters it.
  """
  y, vjp = jax.vjp(fn, x, params)
  return y, vjp(cotangent)


def _program_text(compiled):
  """A compiled program's HLO without its name and debug information
  (source locations, op names), so that programs compare by content."""
  lines = [
    line
    for line in compiled.as_text().splitlines()
    if line.startswith(("%", "ENTRY", " ", "}"))
  ]
  return re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines))


def _compile(op, x, cotangent):
  """`(fwd, fwd+bwd)` compiled for `op` (under `op.lowering`, if any), and
  their HLO texts."""
  compiled = compile_for(
    {
      "fwd": lambda x, p, t: op.fn(x, p),
      "fwdbwd": functools.partial(_forward_backward, op.fn),
    },
    (x, op.params, cotangent),
    op.lowering,
  )
  return (
    (compiled["fwd"], compiled["fwdbwd"]),
    tuple(_program_text(c) for c in compiled.values()),
  )


def _flops(table, choices, x_shape, c, stride):
  """`{name: FLOPs}` (`jaxfactor.cost`), every spatial stage counted as a
  convolution (no tap matmul): the theoretical ratios do not depend on how
  a stage is lowered. "auto" rows count the implementation in `choices`
  (what "auto" runs, resolved beforehand: without the tap matmul it could
  choose otherwise)."""
  batch, size = x_shape[:2]
  out = -(-size // stride)
  flops = {}
  with _lowering.forced(tap_matmul=False):
    for name, op in table.items():
      if op.kernel is None:  # a depthwise kernel alone
        flops[name] = jaxfactor.cost(
          jaxfactor.DepthwiseSeparable(op.params, jnp.eye(c)),
          x_shape,
          strides=stride,
          implementation="factorized",
        ).flops - (2 * batch * out**2 * c * c)
      else:
        flops[name] = jaxfactor.cost(
          op.kernel,
          x_shape,
          strides=stride,
          implementation=choices.get(name) or op.implementation,
        ).flops
  return flops


def run_shape(shape_name, size, c, f, stride, batch, repeats, args):
  x = jax.random.normal(jax.random.key(0), (batch, size, size, c))
  table = ops(c, f, stride, jax.random.key(1))
  choices = {
    name: _auto_choice(op.kernel, x.shape, stride)
    for name, op in table.items()
    if op.implementation == "auto" and isinstance(op.kernel, jaxfactor.Format)
  }
  flops = _flops(table, choices, x.shape, c, stride)
  dense_flops = flops["dense | lax conv"]
  out = -(-size // stride)
  calls, meta, programs = {}, {}, {}
  for name, op in table.items():
    features = c if name.startswith("depthwise |") else f
    cot = jax.random.normal(jax.random.key(2), (batch, out, out, features))
    (fwd, grad), programs[name] = _compile(op, x, cot)
    calls[name, "fwd"] = lambda fwd=fwd, p=op.params, t=cot: (
      jax.block_until_ready(fwd(x, p, t))
    )
    calls[name, "fwdbwd"] = lambda grad=grad, p=op.params, t=cot: (
      jax.block_until_ready(grad(x, p, t))
    )
    nbytes = 4 * (
      x.size
      + batch * out * out * features
      + sum(l.size for l in jax.tree.leaves(op.params))
    )
    choice = choices.get(name)
    same = None
    if choice is not None:
      # "auto" is resolved when the program is traced and lowered: when it
      # compiles to exactly the chosen implementation's programs, the two
      # rows time one program twice.
      chosen = name.replace("| auto", f"| {choice}")
      same = programs[name] == programs[chosen]
    meta[name] = dict(
      flops=flops[name], bytes=nbytes, auto=choice, same_program=same
    )
  for name, make in torch_ops(batch, size, c, f, stride).items():
    calls[name, "fwd"] = make(False)
    calls[name, "fwdbwd"] = make(True)
    op = name.split(" | ")[0]
    meta[name] = dict(
      flops={"dense": dense_flops}.get(op),
      bytes=None,
      auto=None,
      same_program=None,
    )
  times = _interleaved(calls, repeats)
  med = {key: statistics.median(t) for key, t in times.items()}
  rows = []
  for name, m in meta.items():
    op, impl = name.split(" | ")
    base = (
      "dense | torch channels-last" if "torch" in impl else ("dense | lax conv")
    )
    fwd, fwdbwd = med[name, "fwd"], med[name, "fwdbwd"]
    roofline = (
      None
      if m["flops"] is None or m["bytes"] is None
      else max(
        m["flops"] / (args.peak_gflops * 1e9),
        m["bytes"] / (args.bandwidth_gbs * 1e9),
      )
    )
    rows.append(
      dict(
        shape=shape_name,
        op=op,
        impl=impl,
        auto_runs=m["auto"],
        auto_same_program=m["same_program"],
        fwd_median_ms=1e3 * fwd,
        fwd_min_ms=1e3 * min(times[name, "fwd"]),
        fwdbwd_median_ms=1e3 * fwdbwd,
        fwdbwd_min_ms=1e3 * min(times[name, "fwdbwd"]),
        flops=m["flops"],
        theoretical=None if not m["flops"] else dense_flops / m["flops"],
        fwd_speedup=med[base, "fwd"] / fwd,
        fwdbwd_speedup=med[base, "fwdbwd"] / fwdbwd,
        over_roofline=None if roofline is None else fwd / roofline,
      )
    )
    r = rows[-1]
    print(
      f"{shape_name:7} {op:20} {impl:36} fwd {r['fwd_median_ms']:8.2f} ms"
      f"  fwd+bwd {r['fwdbwd_median_ms']:8.2f} ms  speedup"
      f" {r['fwd_speedup']:6.2f}/{r['fwdbwd_speedup']:6.2f}",
      flush=True,
    )
  return rows


def _ms(v):
  """Milliseconds to one decimal, or 3 significant digits under 10 (GPU)."""
  return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def targets(rows):
  """The performance targets, checked on this run's medians."""
  get = {(r["shape"], r["op"], r["impl"]): r for r in rows}
  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  lines = []

  def check(ok, text):
    lines.append(f"| {'yes' if ok else '**no**'} | {text} |")

  for s in shapes:
    if (s, "depthwise", "jaxfactor.depthwise_conv") not in get:
      continue
    ours = get[s, "depthwise", "jaxfactor.depthwise_conv"]
    grouped = get[s, "depthwise", "lax grouped (=Flax/Keras/Haiku)"]
    for key, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
      ratio = grouped[f"{key}_median_ms"] / ours[f"{key}_median_ms"]
      check(
        ratio >= 5,
        f"{s}: depthwise {label} {ratio:.1f}x faster than"
        " the grouped conv (>= 5x)",
      )
    sep = get[s, "depthwise_separable", "auto"]
    for key, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
      check(
        sep[f"{key}_speedup"] >= 2.5,
        f"{s}: depthwise-separable {label} {sep[f'{key}_speedup']:.2f}x"
        " faster than dense (>= 2.5x)",
      )
    need = {"mb56": 0.45, "mb14": 0.9, "mb7": 0.9}.get(s)
    if need:
      for fmt in ("low_rank", "tucker"):
        r = get[s, fmt, "auto"]
        for key, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
          share = r[f"{key}_speedup"] / r["theoretical"]
          check(
            share >= need,
            f"{s}: {fmt} {label} reaches {share:.0%} of"
            f" its {r['theoretical']:.1f}x FLOP speedup"
            f" (>= {need:.0%})",
          )
  for s in shapes:
    for fmt in (
      "depthwise_separable",
      "low_rank",
      "tucker",
      "spatially_separable",
      "cp",
    ):
      if (s, fmt, "auto") not in get:
        continue
      auto = get[s, fmt, "auto"]
      # A check of the choice: judged on the chosen implementation's own row
      # when "auto" compiled to the very same programs (checked above), so a
      # right choice scores exactly 1.00; timing one program twice only adds
      # noise (identical programs differed by up to 27% in medians). The
      # other targets use auto's own rows, what users of the default get.
      timed = (
        get[s, fmt, auto["auto_runs"]] if auto["auto_same_program"] else auto
      )
      for key, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
        best = min(
          get[s, fmt, i][f"{key}_median_ms"]
          for i in ("factorized", "reconstructed")
        )
        ratio = timed[f"{key}_median_ms"] / best
        same = (
          ", the same program" if auto["auto_same_program"] else ", its own row"
        )
        check(
          ratio <= 1.1,
          f"{s}: {fmt} auto ({auto['auto_runs']}{same}) {label}"
          f" {ratio:.2f}x the better of factorized and reconstructed"
          " (<= 1.1x)",
        )
  torch_lines = []
  for s in shapes:
    for op, ours_impl in (
      ("depthwise", "jaxfactor.depthwise_conv"),
      ("separable", None),
    ):
      t = get.get((s, op, "torch channels-last"))
      if t is None:
        continue
      ours = (
        get[s, op, ours_impl]
        if ours_impl
        else get[s, "depthwise_separable", "auto"]
      )
      torch_lines.append(
        f"| {s} | {op} | {_ms(ours['fwd_median_ms'])} /"
        f" {_ms(t['fwd_median_ms'])} ="
        f" {ours['fwd_median_ms'] / t['fwd_median_ms']:.2f}x |"
        f" {_ms(ours['fwdbwd_median_ms'])} / {_ms(t['fwdbwd_median_ms'])} ="
        f" {ours['fwdbwd_median_ms'] / t['fwdbwd_median_ms']:.2f}x |"
      )
  return lines, torch_lines


def compile_times(repeats=9):
  """Compile time of a small MobileNet-style train step: dense vs separable.

  Four blocks of 3x3 convs (dense `nnx.Conv`, or `jaxfactor.nnx`
  depthwise + pointwise layers, or, for reference, the same separable network
  built from Flax's own layers: `nnx.Conv` with `feature_group_count` and a
  1x1 `nnx.Conv`, and jaxfactor's separable network without its depthwise
  convs: the floor its depthwise layers add to, and jaxfactor's with its
  depthwise convs lowered as shift-adds, as on a machine without a C++
  compiler), batch norm and ReLU, a linear head, SGD via optax. The
  persistent compilation cache is off, and JAX's in-memory caches are
  cleared before each compilation (`_lowering.forced` clears them anyway),
  so each one is timed as the first of its kind in a process. Median of
  `repeats` compilations of fresh models, the networks taking turns.
  """
  import optax
  from flax import nnx

  import jaxfactor.nnx as jnnx

  class Net(nnx.Module):
    def __init__(self, kind, rngs):
      widths = (16, 32, 64, 128)
      self.blocks = nnx.List()
      c = 3
      for w in widths:
        if kind in ("separable", "without_depthwise"):
          depthwise = (
            [jnnx.DepthwiseConv(c, (3, 3), rngs=rngs)]
            if kind == "separable"
            else []
          )
          self.blocks.append(
            nnx.List(
              [
                *depthwise,
                nnx.BatchNorm(c, rngs=rngs),
                jnnx.PointwiseConv(c, w, rngs=rngs),
                nnx.BatchNorm(w, rngs=rngs),
              ]
            )
          )
        elif kind == "flax_separable":
          self.blocks.append(
            nnx.List(
              [
                nnx.Conv(c, c, (3, 3), feature_group_count=c, rngs=rngs),
                nnx.BatchNorm(c, rngs=rngs),
                nnx.Conv(c, w, (1, 1), rngs=rngs),
                nnx.BatchNorm(w, rngs=rngs),
              ]
            )
          )
        else:
          self.blocks.append(
            nnx.List(
              [nnx.Conv(c, w, (3, 3), rngs=rngs), nnx.BatchNorm(w, rngs=rngs)]
            )
          )
        c = w
      self.head = nnx.Linear(c, 10, rngs=rngs)

    def __call__(self, x):
      for block in self.blocks:
        for layer in block:
          x = layer(x)
          if isinstance(layer, nnx.BatchNorm):
            x = jax.nn.relu(x)
      return self.head(x.mean(axis=(1, 2)))

  def compile_once(kind, seed):
    model = Net(kind, nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
      def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(
          model(x), y
        ).mean()

      value, grads = nnx.value_and_grad(loss)(model)
      optimizer.update(model, grads)
      return value

    x = jnp.ones((8, 32, 32, 3))
    y = jnp.zeros((8,), jnp.int32)
    jax.block_until_ready((x, y))
    jax.clear_caches()
    start = time.perf_counter()
    step(model, optimizer, x, y)  # trace + compile + one run
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(step(model, optimizer, x, y))
    return first - (time.perf_counter() - start)

  kinds = (
    "dense",
    "separable",
    "flax_separable",
    "without_depthwise",
    "separable_shift_add",
  )
  times = {kind: [] for kind in kinds}
  for seed in range(repeats):  # interleaved: drifts hit every network alike
    for kind in kinds:
      if kind == "separable_shift_add":
        # What runs on CPU without a C++ compiler or with several devices.
        with _lowering.forced(depthwise="shift_add"):
          times[kind].append(compile_once("separable", seed))
      else:
        times[kind].append(compile_once(kind, seed))
  return {kind: statistics.median(t) for kind, t in times.items()}


def report(rows, compiled, machine):
  """The markdown table, the targets and the comparison with torch."""

  def fmt(v, spec):
    return "-" if v is None else format(v, spec)

  target_lines, torch_lines = targets(rows)
  lines = [
    machine,
    "",
    "| shape | op | impl | fwd ms med (min) | theo. | fwd speedup |"
    " fwd+bwd ms med (min) | fwd+bwd speedup | fwd / roofline |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    impl = r["impl"] + (f" ({r['auto_runs']})" if r["auto_runs"] else "")
    lines.append(
      f"| {r['shape']} | {r['op']} | {impl} |"
      f" {_ms(r['fwd_median_ms'])} ({_ms(r['fwd_min_ms'])}) |"
      f" {fmt(r['theoretical'], '.1f')} | {r['fwd_speedup']:.2f} |"
      f" {_ms(r['fwdbwd_median_ms'])} ({_ms(r['fwdbwd_min_ms'])}) |"
      f" {r['fwdbwd_speedup']:.2f} | {fmt(r['over_roofline'], '.1f')} |"
    )
  lines += [
    "",
    "**Targets** (same run, medians)",
    "",
    "| met | measured |",
    "|---|---|",
    *target_lines,
  ]
  if compiled is None:
    lines += ["", "| - | compile time: not measured |"]
  else:
    ratio = compiled["separable"] / compiled["dense"]
    lines += [
      "",
      f"| {'yes' if ratio <= 1.5 else '**no**'} | compile time"
      f" of a 4-block MobileNet-style train step: separable"
      f" {compiled['separable']:.2f} s vs dense"
      f" {compiled['dense']:.2f} s = {ratio:.2f}x (<= 1.5x); the same"
      f" network from Flax's own layers (grouped conv + 1x1 conv):"
      f" {compiled['flax_separable']:.2f} s ="
      f" {compiled['flax_separable'] / compiled['dense']:.2f}x;"
      f" jaxfactor's without its depthwise convs:"
      f" {compiled['without_depthwise']:.2f} s ="
      f" {compiled['without_depthwise'] / compiled['dense']:.2f}x;"
      f' jaxfactor\'s with shift-add depthwise convs ("auto"'
      f" without a C++ compiler or on several CPU devices):"
      f" {compiled['separable_shift_add']:.2f} s ="
      f" {compiled['separable_shift_add'] / compiled['dense']:.2f}x |",
    ]
  if torch_lines:
    lines += [
      "",
      f"**Against PyTorch {torch_device().upper()} channels-last**"
      " (jaxfactor / torch, ms; below 1 = jaxfactor faster)",
      "",
      "| shape | op | fwd | fwd+bwd |",
      "|---|---|---|---|",
      *torch_lines,
    ]
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--shapes", nargs="*", default=None)
  parser.add_argument(
    "--compile-repeats",
    type=int,
    default=None,
    help="compilations per network for the compile time"
    " (default: 9, 1 with --quick; 0: not measured)",
  )
  parser.add_argument(
    "--peak-gflops",
    type=float,
    default=None,
    help="the roofline's FLOP rate (default: 190, this"
    " project's CPU, on the CPU; measured in this run"
    " on other backends)",
  )
  parser.add_argument(
    "--bandwidth-gbs",
    type=float,
    default=None,
    help="the roofline's bandwidth (default: 36, likewise)",
  )
  parser.add_argument(
    "--tag",
    default="",
    help="suffix for the output files, e.g. for a run under other XLA_FLAGS",
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent / "results",
  )
  args = parser.parse_args()
  compile_repeats = args.compile_repeats
  if compile_repeats is None:
    compile_repeats = 1 if args.quick else 9
  if compile_repeats > 0:
    # Compile times are measured: nothing comes from a persistent cache.
    jax.config.update("jax_compilation_cache_dir", None)
  shapes = QUICK if args.quick else SHAPES
  if args.shapes:
    shapes = {k: v for k, v in shapes.items() if k in args.shapes}
  batch = 2 if args.quick else args.batch
  repeats = 3 if args.quick else args.repeats
  started = time.time()
  # Build (or load) the native depthwise kernel before anything is timed.
  build_start = time.perf_counter()
  if _native.available():
    native = (
      f"native depthwise kernel built or loaded in"
      f" {time.perf_counter() - build_start:.1f} s"
    )
  else:
    native = f"native depthwise kernel unavailable ({_native.error()})"
  peaks = "this project's CPU"
  if args.peak_gflops is None or args.bandwidth_gbs is None:
    if jax.default_backend() == "cpu":
      measured = (190.0, 36.0)
    else:
      measured = measure_peaks()
      peaks = "measured in this run"
    args.peak_gflops = args.peak_gflops or measured[0]
    args.bandwidth_gbs = args.bandwidth_gbs or measured[1]
  else:
    peaks = "given"

  device = torch_device()
  if device is None:
    torch_version = ", torch not installed"
  else:
    import torch

    torch_version = f", torch {torch.__version__} " + (
      f"({torch.get_num_threads()} threads)"
      if device == "cpu"
      else "(CUDA, cuDNN benchmark mode)"
    )

  def machine():
    return (
      f"{platform.machine()}, {os.cpu_count()} cores,"
      f" {jax.default_backend()} ({jax.devices()[0].device_kind}),"
      f" jax {jax.__version__}{torch_version}, batch {batch}, float32"
      f" (default precision), {repeats} interleaved runs, medians,"
      f" roofline {args.peak_gflops:.0f} GFLOP/s and"
      f" {args.bandwidth_gbs:.0f} GB/s ({peaks}), XLA_FLAGS="
      f"{os.environ.get('XLA_FLAGS', '')!r}, GLIBC_TUNABLES="
      f"{os.environ.get('GLIBC_TUNABLES', '')!r}, depthwise convs run"
      f" as {depthwise_default()!r} ({native}),"
      f" {time.time() - started:.0f} s"
    )

  args.out.mkdir(parents=True, exist_ok=True)
  suffix = ("_quick" if args.quick else "") + (
    f"_{args.tag}" if args.tag else ""
  )

  def write(rows, compiled):
    lines = report(rows, compiled, machine())
    (args.out / f"conv{suffix}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"conv{suffix}.json").write_text(
      json.dumps(
        dict(machine=machine(), rows=rows, compile_seconds=compiled), indent=1
      )
    )
    return lines

  rows = []
  for shape_name, (size, c, f, stride) in shapes.items():
    rows += run_shape(shape_name, size, c, f, stride, batch, repeats, args)
    write(rows, None)  # What was timed is kept if a later step fails.
  compiled = compile_times(compile_repeats) if compile_repeats > 0 else None
  print("\n".join(write(rows, compiled)))


if __name__ == "__main__":
  main()
