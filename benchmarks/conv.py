"""Convolution speed: every jaxfactor format against the dense conv, one process.

For MobileNet-style layer shapes (and the low-rank formats at the ranks of
`perf-baseline.md`: LowRank and Tucker at F/4, SpatiallySeparable at F/2, CP at
F/2), times the lax dense conv, every format with each `implementation`, the
naive depthwise lowering Flax/Keras/Haiku build (grouped conv + 1x1 conv), and
PyTorch CPU channels-last when torch is installed; forward and forward+backward
(gradients w.r.t. the input and every factor). jit, 2 warm-ups,
`block_until_ready`, `--repeats` interleaved runs, median and min.

Columns: theoretical FLOP ratio (dense FLOPs / the op's FLOPs, from
`jaxfactor.cost`), achieved speedup (dense time / op time, same run), and the
time over a roofline bound max(FLOPs / peak, bytes / bandwidth) with the
machine's measured peaks (`--peak-gflops`, `--bandwidth-gbs`).

Run: `python benchmarks/conv.py` (add `--quick` for a smoke run). XLA flags are
read from the environment, e.g.
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/conv.py`.
Writes `benchmarks/results/conv[_quick].md` and `.json`.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxfactor

SHAPES = {  # name: (H=W, C, F, stride)
    "mb56": (56, 128, 128, 1),
    "mb28": (28, 256, 256, 1),
    "mb14": (14, 512, 512, 1),
    "mb7": (7, 1024, 1024, 1),
    "s2_56": (56, 128, 256, 2),
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
          _normal(next(k), (3, 3, 1, c), 9), _normal(next(k), (c, f), c)),
      "low_rank": jaxfactor.LowRank(_normal(next(k), (3, 3, c, f // 4), 9 * c),
                                    _normal(next(k), (f // 4, f), f // 4)),
      "tucker": jaxfactor.Tucker(
          _normal(next(k), (c, c // 4), c),
          _normal(next(k), (3, 3, c // 4, f // 4), 9 * c // 4),
          _normal(next(k), (f // 4, f), f // 4)),
      "spatially_separable": jaxfactor.SpatiallySeparable(
          (_normal(next(k), (3, c, f // 2), 3 * c),
           _normal(next(k), (3, f // 2, f), 3 * f // 2))),
      "cp": jaxfactor.CP(_normal(next(k), (c, f // 2), c),
                         (_normal(next(k), (3, f // 2), 3),
                          _normal(next(k), (3, f // 2), 3)),
                         _normal(next(k), (f // 2, f), f // 2)),
  }


def ops(c, f, stride, key):
  """name -> (function of (x, params), params, FLOPs)."""
  ks = kernels(c, f, key)
  out = {}

  def add(name, fn, params, kernel, implementation="auto"):
    out[name] = (fn, params, kernel, implementation)

  add("dense | lax conv",
      lambda x, k: jaxfactor.conv(x, k, strides=stride), ks["dense"],
      ks["dense"])
  dw = ks["depthwise_separable"].depthwise
  add("depthwise | jaxfactor.depthwise_conv",
      lambda x, k: jaxfactor.depthwise_conv(x, k, strides=stride), dw, None)
  add("depthwise | lax grouped (=Flax/Keras/Haiku)",
      lambda x, k: lax.conv_general_dilated(
          x, k, (stride, stride), "SAME", dimension_numbers=DN,
          feature_group_count=c), dw, None)
  sep = ks["depthwise_separable"]
  add("separable | naive grouped + 1x1 conv",
      lambda x, f_: lax.conv_general_dilated(
          lax.conv_general_dilated(x, f_.depthwise, (stride, stride), "SAME",
                                   dimension_numbers=DN,
                                   feature_group_count=c),
          f_.pointwise[None, None], (1, 1), "SAME", dimension_numbers=DN),
      sep, sep, "factorized")
  for name in ("depthwise_separable", "low_rank", "tucker",
               "spatially_separable", "cp"):
    for impl in ("factorized", "reconstructed", "auto"):
      add(f"{name} | {impl}",
          lambda x, f_, impl=impl: jaxfactor.conv(
              x, f_, strides=stride, implementation=impl),
          ks[name], ks[name], impl)
  return out


def _timed(fn, args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def torch_ops(batch, size, c, f, stride):
  try:
    import torch
  except ImportError:
    return {}
  torch.set_num_threads(os.cpu_count() or 1)
  x = torch.randn(batch, c, size, size).to(memory_format=torch.channels_last)
  dense = torch.nn.Conv2d(c, f, 3, stride, 1, bias=False).to(
      memory_format=torch.channels_last)
  dw = torch.nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False).to(
      memory_format=torch.channels_last)
  pw = torch.nn.Conv2d(c, f, 1, bias=False).to(
      memory_format=torch.channels_last)

  def run(module_fn, backward):
    def call():
      xx = x.detach().requires_grad_(backward)
      y = module_fn(xx)
      if backward:
        y.sum().backward()
      return y
    return call

  return {
      "dense | torch channels-last": lambda b: run(dense, b),
      "depthwise | torch channels-last": lambda b: run(dw, b),
      "separable | torch channels-last": lambda b: run(
          lambda t: pw(dw(t)), b),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--shapes", nargs="*", default=None)
  parser.add_argument("--peak-gflops", type=float, default=190.0)
  parser.add_argument("--bandwidth-gbs", type=float, default=36.0)
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).parent / "results")
  args = parser.parse_args()
  shapes = QUICK if args.quick else SHAPES
  if args.shapes:
    shapes = {k: v for k, v in shapes.items() if k in args.shapes}
  batch = 2 if args.quick else args.batch
  repeats = 3 if args.quick else args.repeats
  rows = []
  for shape_name, (size, c, f, stride) in shapes.items():
    x = jax.random.normal(jax.random.key(0), (batch, size, size, c))
    table = ops(c, f, stride, jax.random.key(1))
    dense_flops = jaxfactor.cost(table["dense | lax conv"][1], x.shape,
                                 strides=stride).flops
    timings = {}
    for name, (fn, params, kernel, impl) in table.items():
      fwd = jax.jit(fn)
      grad = jax.jit(jax.grad(lambda x, p, fn=fn: jnp.sum(fn(x, p)),
                              argnums=(0, 1)))
      if kernel is None:  # a depthwise kernel alone
        flops = jaxfactor.cost(
            jaxfactor.DepthwiseSeparable(params, jnp.eye(c)), x.shape,
            strides=stride, implementation="factorized").flops - (
                2 * batch * (-(-size // stride)) ** 2 * c * c)
      else:
        flops = jaxfactor.cost(kernel, x.shape, strides=stride,
                               implementation=impl).flops
      timings[name] = dict(fwd=_timed(fwd, (x, params), repeats),
                           fwdbwd=_timed(grad, (x, params), repeats),
                           flops=flops, params=params)
    for name, make in torch_ops(batch, size, c, f, stride).items():
      timings[name] = dict(
          fwd=_timed(make(False), (), repeats),
          fwdbwd=_timed(make(True), (), repeats),
          flops=None, params=None)
    dense_fwd = statistics.median(timings["dense | lax conv"]["fwd"])
    dense_bwd = statistics.median(timings["dense | lax conv"]["fwdbwd"])
    torch_dense = timings.get("dense | torch channels-last")
    for name, t in timings.items():
      op, impl = name.split(" | ")
      base_f, base_b = (dense_fwd, dense_bwd)
      if "torch" in impl and torch_dense:
        base_f = statistics.median(torch_dense["fwd"])
        base_b = statistics.median(torch_dense["fwdbwd"])
      fwd_ms = 1e3 * statistics.median(t["fwd"])
      flops = t["flops"]
      if flops is None:
        flops = {"dense": dense_flops}.get(op)
      out_pixels = batch * (-(-size // stride)) ** 2
      features = c if op == "depthwise" else f
      nbytes = 4 * (batch * size * size * c + out_pixels * features) + (
          4 * sum(int(np.prod(l.shape)) for l in jax.tree.leaves(t["params"]))
          if t["params"] is not None else 0)
      roofline_ms = None if flops is None else 1e3 * max(
          flops / (args.peak_gflops * 1e9), nbytes / (args.bandwidth_gbs * 1e9))
      rows.append(dict(
          shape=shape_name, op=op, impl=impl,
          fwd_median_ms=fwd_ms, fwd_min_ms=1e3 * min(t["fwd"]),
          fwdbwd_median_ms=1e3 * statistics.median(t["fwdbwd"]),
          theoretical=None if flops is None else dense_flops / flops,
          fwd_speedup=base_f / statistics.median(t["fwd"]),
          fwdbwd_speedup=base_b / statistics.median(t["fwdbwd"]),
          roofline_ms=roofline_ms,
          over_roofline=None if roofline_ms is None else fwd_ms / roofline_ms,
      ))
      print(f"{shape_name:8} {op:20} {impl:36} fwd {fwd_ms:8.2f} ms"
            f"  fwd+bwd {rows[-1]['fwdbwd_median_ms']:8.2f} ms"
            f"  speedup {rows[-1]['fwd_speedup']:6.2f}/"
            f"{rows[-1]['fwdbwd_speedup']:6.2f}", flush=True)

  def fmt(v, spec):
    return "-" if v is None else format(v, spec)

  machine = (f"{platform.machine()}, {os.cpu_count()} cores,"
             f" {jax.default_backend()}, jax {jax.__version__}, batch {batch},"
             f" float32, {repeats} runs, XLA_FLAGS="
             f"{os.environ.get('XLA_FLAGS', '')!r}")
  lines = [machine, "",
           "| shape | op | impl | fwd med (min) ms | theo. | fwd speedup |"
           " fwd+bwd med ms | fwd+bwd speedup | fwd / roofline |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['shape']} | {r['op']} | {r['impl']} |"
        f" {r['fwd_median_ms']:.1f} ({r['fwd_min_ms']:.1f}) |"
        f" {fmt(r['theoretical'], '.1f')} | {r['fwd_speedup']:.2f} |"
        f" {r['fwdbwd_median_ms']:.1f} | {r['fwdbwd_speedup']:.2f} |"
        f" {fmt(r['over_roofline'], '.1f')} |")
  args.out.mkdir(parents=True, exist_ok=True)
  suffix = "_quick" if args.quick else ""
  (args.out / f"conv{suffix}.md").write_text("\n".join(lines) + "\n")
  (args.out / f"conv{suffix}.json").write_text(
      json.dumps(dict(machine=machine, rows=rows), indent=1))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
