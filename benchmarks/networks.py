"""Whole-network speed: training and inference steps of small CNNs.

Networks (ImageNet heads, 1000 classes):

* `mobilenet_v1_1.0`, `mobilenet_v1_0.5`: MobileNet v1 (Howard et al. 2017,
  https://arxiv.org/abs/1704.04861) at width 1.0 and 0.5, batch norm + ReLU
  after every depthwise and pointwise conv.
* `mobilenet_v2`: MobileNet v2's stack of inverted-residual blocks (Sandler
  et al. 2018, https://arxiv.org/abs/1801.04381), width 1.0, ReLU6.
* `resnet18_dense`: ResNet-18 (He et al. 2015,
  https://arxiv.org/abs/1512.03385).
* `resnet18_tucker`, `resnet18_lowrank`, `resnet18_cp`: the same with every
  3x3 conv factorized, each at the largest rank (`jaxfactor.max_rank`'s
  range, searched with `jaxfactor.cost`) whose factorized FLOPs are at most
  25% of the dense conv's at its input size (`--fraction`).

Each network is written once, as a list of layers (`mobilenet_v1`,
`mobilenet_v2`, `resnet18`), and built as

* `jaxfactor`: jaxfactor's nnx layers (`DepthwiseConv` + `PointwiseConv`,
  `TuckerConv`, `LowRankConv`, `CPConv`; dense convs are `nnx.Conv`);
* `flax`: as a Flax user writes it today: `nnx.Conv(feature_group_count=C)`
  + a 1x1 `nnx.Conv`, and the factorized convs as stages of plain
  `nnx.Conv`s;
* `torch`: the same layers in PyTorch, channels-last (when torch is
  installed; eager, on the CPU or with CUDA when JAX runs on a GPU);
* `keras`: `keras.applications.MobileNet` / `MobileNetV2` on the JAX backend
  (when Keras 3 is installed; it has no ResNet-18).

Every build of a network has the same trainable parameters (the table shows
their count). Measured per build: a training step (forward, backward, optax
SGD with momentum or Adam; torch.optim's equivalent), an inference step
(batch norm on running averages), the compile time (JAX: trace + lower +
compile, `jax.jit(...).lower(...).compile()`; torch, eager: its first call
minus its median), and memory (JAX: the compiled train step's buffers from
`memory_analysis()`, arguments + temporaries + outputs - donated aliases;
torch on CUDA: `max_memory_allocated` over a train step; on the CPU for
every build, the growth of the process's resident memory over its warm-up
steps, sampled every millisecond). The steps of one network run in
interleaved rounds, each round in a new random order, after compilation
and two warm-up calls; tables give medians and the interquartile range.

`--device-loop N` runs N steps inside one compiled `jax.lax.fori_loop` per
call and reports the time per step, so that on a GPU or TPU a cell measures
the kernels rather than the host's dispatch (torch rows stay per call).

Run: `python benchmarks/networks.py`; `--quick` for a smoke run. Writes
`benchmarks/results/networks[_quick][_TAG].md` and `.json`.
"""

import argparse
import functools
import json
import os
import pathlib
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxfactor
from jaxfactor import _native

# MobileNet v1's separable blocks: (output channels at width 1, stride).
V1_BLOCKS = (
  (64, 1),
  (128, 2),
  (128, 1),
  (256, 2),
  (256, 1),
  (512, 2),
  *((512, 1),) * 5,
  (1024, 2),
  (1024, 1),
)
# MobileNet v2's inverted-residual stages: (expansion, channels, blocks,
# stride of the first block).
V2_STAGES = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # 2 blocks each
FORMATS = {
  "tucker": jaxfactor.Tucker,
  "lowrank": jaxfactor.LowRank,
  "cp": jaxfactor.CP,
}
# name: (family, width at full size, width in --quick)
NETWORKS = {
  "mobilenet_v1_1.0": ("mobilenet_v1", 1.0, 0.125),
  "mobilenet_v1_0.5": ("mobilenet_v1", 0.5, 0.0625),
  # MobileNet v1 with each depthwise-separable pair a dense 3x3 conv.
  "mobilenet_v1_dense": ("mobilenet_v1_dense", 1.0, 0.125),
  "mobilenet_v2": ("mobilenet_v2", 1.0, 0.25),
  "resnet18_dense": ("resnet18", 1.0, 0.125),
  "resnet18_tucker": ("resnet18", 1.0, 0.125),
  "resnet18_lowrank": ("resnet18", 1.0, 0.125),
  "resnet18_cp": ("resnet18", 1.0, 0.125),
}
BUILDS = ("jaxfactor", "flax", "torch", "keras")


# --- the networks, written once ----------------------------------------------
#
# A network is a list of layers, tuples read by each framework's builder:
#   ("conv", C, F, k, stride)       dense k x k conv, no bias
#   ("dw", C, stride)               3x3 depthwise conv, no bias
#   ("pw", C, F)                    1x1 conv, no bias
#   ("factorized", format, C, F, stride, rank)   a 3x3 conv in a format
#   ("bn", C), ("relu",), ("relu6",), ("maxpool",)   (3x3, stride 2)
#   ("residual", body, shortcut)    body(x) + shortcut(x) (identity if empty)
#   ("head", C, classes)            global average pool, then a linear layer


def mobilenet_v1(width, classes=1000, blocks=V1_BLOCKS, dense=False):
  """MobileNet v1's layers at `width` (channels `int(c * width)`, as Keras);
  with `dense`, its dense-conv twin: each depthwise 3x3 + pointwise pair a
  dense 3x3 conv of the same channels and stride."""
  ch = lambda c: max(1, int(c * width))
  c = ch(32)
  layers = [("conv", 3, c, 3, 2), ("bn", c), ("relu",)]
  for f, stride in blocks:
    f = ch(f)
    if dense:
      layers += [("conv", c, f, 3, stride), ("bn", f), ("relu",)]
      c = f
      continue
    layers += [
      ("dw", c, stride),
      ("bn", c),
      ("relu",),
      ("pw", c, f),
      ("bn", f),
      ("relu",),
    ]
    c = f
  return [*layers, ("head", c, classes)]


def make_divisible(v, divisor=8):
  """MobileNet v2's channel rounding (as in Keras and torchvision)."""
  rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * v else rounded


def mobilenet_v2(width, classes=1000, stages=V2_STAGES):
  """MobileNet v2's layers at `width`, channels rounded as Keras does."""
  c = make_divisible(32 * width)
  layers = [("conv", 3, c, 3, 2), ("bn", c), ("relu6",)]
  for expansion, channels, blocks, first_stride in stages:
    f = make_divisible(channels * width)
    for i in range(blocks):
      stride = first_stride if i == 0 else 1
      hidden = c * expansion
      body = []
      if expansion != 1:
        body += [("pw", c, hidden), ("bn", hidden), ("relu6",)]
      body += [
        ("dw", hidden, stride),
        ("bn", hidden),
        ("relu6",),
        ("pw", hidden, f),
        ("bn", f),
      ]
      if stride == 1 and c == f:
        layers.append(("residual", body, []))
      else:
        layers += body
      c = f
  last = make_divisible(1280 * width) if width > 1 else 1280
  return [
    *layers,
    ("pw", c, last),
    ("bn", last),
    ("relu6",),
    ("head", last, classes),
  ]


def _abstract(format, c, f, rank):
  """A `format` value of shapes only, for `jaxfactor.cost`."""
  z = jnp.zeros
  if format == "tucker":
    a, b = rank
    make = lambda: jaxfactor.Tucker(z((c, a)), z((3, 3, a, b)), z((b, f)))
  elif format == "lowrank":
    make = lambda: jaxfactor.LowRank(z((3, 3, c, rank)), z((rank, f)))
  else:
    make = lambda: jaxfactor.CP(
      z((c, rank)), (z((3, rank)), z((3, rank))), z((rank, f))
    )
  return jax.eval_shape(make)


def _rank(format, r, limit):
  """Rank `r` of a format: Tucker's both ranks, each clipped to its maximum."""
  if format == "tucker":
    return (min(r, limit[0]), min(r, limit[1]))
  return r


def rank_for_flops(format, c, f, stride, size, fraction):
  """The largest rank at which a 3x3 conv `c -> f` in `format` costs at most
  `fraction` of the dense conv's FLOPs on a `size` x `size` input, and the
  two FLOP counts (`jaxfactor.cost`, the factorized implementation).

  Ranks run from 1 to `jaxfactor.max_rank` (Tucker: one rank for both
  modes, each clipped to its maximum, as `jaxfactor.Budget` scales them);
  FLOPs grow with the rank, so the largest fitting one is bisected for.
  """
  shape = (1, size, size, c)
  dense = jaxfactor.cost(
    jax.ShapeDtypeStruct((3, 3, c, f), jnp.float32), shape, strides=stride
  ).flops
  limit = jaxfactor.max_rank((3, 3, c, f), FORMATS[format])

  def flops(r):
    return jaxfactor.cost(
      _abstract(format, c, f, _rank(format, r, limit)),
      shape,
      strides=stride,
      implementation="factorized",
    ).flops

  lo, hi = 1, max(limit) if isinstance(limit, tuple) else limit
  if flops(lo) > fraction * dense:
    raise ValueError(
      f"rank_for_flops: even rank 1 of {format} costs more than {fraction}"
      f" of the dense 3x3 conv {c} -> {f}"
    )
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if flops(mid) <= fraction * dense else (lo, mid - 1)
  return _rank(format, lo, limit), flops(lo), dense


def resnet18(
  width,
  size,
  format="dense",
  fraction=0.25,
  classes=1000,
  stages=RESNET18_STAGES,
  blocks=2,
):
  """ResNet-18's layers at `width` for `size` x `size` inputs; with a
  `format`, its 3x3 convs factorized at `fraction` of their dense FLOPs.

  Returns `(layers, flops)`: `flops` sums the 3x3 convs' `(factorized,
  dense)` FLOPs per example (`None` for the dense network)."""
  ch = lambda c: max(1, int(c * width))
  c = ch(64)
  layers = [("conv", 3, c, 7, 2), ("bn", c), ("relu",), ("maxpool",)]
  size = -(-size // 4)
  totals = [0, 0]

  def conv3(c, f, stride, size):
    if format == "dense":
      return ("conv", c, f, 3, stride)
    rank, ours, dense = rank_for_flops(format, c, f, stride, size, fraction)
    totals[0] += ours
    totals[1] += dense
    return ("factorized", format, c, f, stride, rank)

  for channels, first_stride in stages:
    f = ch(channels)
    for i in range(blocks):
      stride = first_stride if i == 0 else 1
      out = -(-size // stride)
      body = [
        conv3(c, f, stride, size),
        ("bn", f),
        ("relu",),
        conv3(f, f, 1, out),
        ("bn", f),
      ]
      shortcut = (
        [("conv", c, f, 1, stride), ("bn", f)] if stride != 1 or c != f else []
      )
      layers += [("residual", body, shortcut), ("relu",)]
      c, size = f, out
  layers.append(("head", c, classes))
  return layers, (None if format == "dense" else tuple(totals))


def network(name, quick, size, fraction):
  """`(layers, flops)` of a network in `NETWORKS` (see `resnet18`).

  With `quick`, narrow and shallow: the first blocks of each network (a
  strided block, and a residual one where the network has them), so that
  the smoke run compiles in seconds.
  """
  family, width, quick_width = NETWORKS[name]
  format = name.removeprefix("resnet18_")
  if not quick:
    if family == "mobilenet_v1":
      return mobilenet_v1(width), None
    if family == "mobilenet_v1_dense":
      return mobilenet_v1(width, dense=True), None
    if family == "mobilenet_v2":
      return mobilenet_v2(width), None
    return resnet18(width, size, format, fraction)
  if family == "mobilenet_v1":
    return mobilenet_v1(quick_width, blocks=V1_BLOCKS[:3]), None
  if family == "mobilenet_v1_dense":
    return mobilenet_v1(quick_width, blocks=V1_BLOCKS[:3], dense=True), None
  if family == "mobilenet_v2":
    return mobilenet_v2(quick_width, stages=V2_STAGES[:2]), None
  return resnet18(
    quick_width, size, format, fraction, stages=RESNET18_STAGES[:2], blocks=1
  )


def ranks_of(layers):
  """The ranks of a network's factorized convs, in order."""
  found = []
  for layer in layers:
    if layer[0] == "factorized":
      found.append(layer[5])
    elif layer[0] == "residual":
      found += ranks_of(layer[1]) + ranks_of(layer[2])
  return found


# --- builders ----------------------------------------------------------------


def build_nnx(layers, build, seed=0):
  """An `nnx.Sequential` of `layers`: with `build="jaxfactor"` its
  depthwise, pointwise and factorized convs are jaxfactor's nnx layers,
  with `build="flax"` plain `nnx.Conv`s."""
  from flax import nnx

  import jaxfactor.nnx as jnnx

  rngs = nnx.Rngs(seed)
  conv = functools.partial(nnx.Conv, use_bias=False, rngs=rngs)

  class Residual(nnx.Module):
    def __init__(self, body, shortcut):
      self.body = body
      self.shortcut = shortcut

    def __call__(self, x):
      return self.body(x) + (x if self.shortcut is None else self.shortcut(x))

  class Head(nnx.Module):
    def __init__(self, c, classes):
      self.linear = nnx.Linear(c, classes, rngs=rngs)

    def __call__(self, x):
      return self.linear(x.mean(axis=(-3, -2)))

  def factorized(format, c, f, stride, rank):
    if build == "jaxfactor":
      cls = {
        "tucker": jnnx.TuckerConv,
        "lowrank": jnnx.LowRankConv,
        "cp": jnnx.CPConv,
      }[format]
      return [cls(c, f, (3, 3), stride, rank=rank, use_bias=False, rngs=rngs)]
    if format == "tucker":
      a, b = rank
      return [
        conv(c, a, (1, 1)),
        conv(a, b, (3, 3), stride),
        conv(b, f, (1, 1)),
      ]
    if format == "lowrank":
      return [conv(c, rank, (3, 3), stride), conv(rank, f, (1, 1))]
    return [
      conv(c, rank, (1, 1)),
      conv(rank, rank, (3, 1), (stride, 1), feature_group_count=rank),
      conv(rank, rank, (1, 3), (1, stride), feature_group_count=rank),
      conv(rank, f, (1, 1)),
    ]

  def make(layers):
    out = []
    for kind, *a in layers:
      if kind == "conv":
        c, f, k, stride = a
        out.append(conv(c, f, (k, k), stride))
      elif kind == "dw":
        c, stride = a
        out.append(
          jnnx.DepthwiseConv(c, (3, 3), stride, use_bias=False, rngs=rngs)
          if build == "jaxfactor"
          else conv(c, c, (3, 3), stride, feature_group_count=c)
        )
      elif kind == "pw":
        c, f = a
        out.append(
          jnnx.PointwiseConv(c, f, use_bias=False, rngs=rngs)
          if build == "jaxfactor"
          else conv(c, f, (1, 1))
        )
      elif kind == "factorized":
        out += factorized(*a)
      elif kind == "bn":
        out.append(nnx.BatchNorm(a[0], rngs=rngs))
      elif kind == "relu":
        out.append(jax.nn.relu)
      elif kind == "relu6":
        out.append(jax.nn.relu6)
      elif kind == "maxpool":
        out.append(
          functools.partial(
            nnx.max_pool, window_shape=(3, 3), strides=(2, 2), padding="SAME"
          )
        )
      elif kind == "residual":
        body, shortcut = a
        out.append(Residual(make(body), make(shortcut) if shortcut else None))
      elif kind == "head":
        out.append(Head(*a))
      else:
        raise ValueError(f"build_nnx: unknown layer {kind!r}")
    return nnx.Sequential(*out)

  return make(layers)


def build_torch(layers, device):
  """`layers` as a `torch.nn.Sequential`, channels-last, on `device`."""
  import torch
  from torch import nn

  class Residual(nn.Module):
    def __init__(self, body, shortcut):
      super().__init__()
      self.body, self.shortcut = body, shortcut

    def forward(self, x):
      return self.body(x) + (x if self.shortcut is None else self.shortcut(x))

  class Head(nn.Module):
    def __init__(self, c, classes):
      super().__init__()
      self.linear = nn.Linear(c, classes)

    def forward(self, x):
      return self.linear(x.mean(dim=(2, 3)))

  def conv(c, f, k, stride=1, groups=1):
    k = (k, k) if isinstance(k, int) else k
    return nn.Conv2d(
      c,
      f,
      k,
      stride,
      padding=tuple(d // 2 for d in k),
      groups=groups,
      bias=False,
    )

  def factorized(format, c, f, stride, rank):
    if format == "tucker":
      a, b = rank
      return [conv(c, a, 1), conv(a, b, 3, stride), conv(b, f, 1)]
    if format == "lowrank":
      return [conv(c, rank, 3, stride), conv(rank, f, 1)]
    return [
      conv(c, rank, 1),
      conv(rank, rank, (3, 1), (stride, 1), groups=rank),
      conv(rank, rank, (1, 3), (1, stride), groups=rank),
      conv(rank, f, 1),
    ]

  def make(layers):
    out = []
    for kind, *a in layers:
      if kind == "conv":
        out.append(conv(*a))
      elif kind == "dw":
        c, stride = a
        out.append(conv(c, c, 3, stride, groups=c))
      elif kind == "pw":
        out.append(conv(*a, 1))
      elif kind == "factorized":
        out += factorized(*a)
      elif kind == "bn":
        out.append(nn.BatchNorm2d(a[0]))
      elif kind == "relu":
        out.append(nn.ReLU())
      elif kind == "relu6":
        out.append(nn.ReLU6())
      elif kind == "maxpool":
        out.append(nn.MaxPool2d(3, 2, 1))
      elif kind == "residual":
        body, shortcut = a
        out.append(Residual(make(body), make(shortcut) if shortcut else None))
      elif kind == "head":
        out.append(Head(*a))
      else:
        raise ValueError(f"build_torch: unknown layer {kind!r}")
    return nn.Sequential(*out)

  return make(layers).to(device=device, memory_format=torch.channels_last)


def keras_available():
  """Whether Keras 3 runs here on the JAX backend (imported on first use)."""
  os.environ.setdefault("KERAS_BACKEND", "jax")
  try:
    import keras
  except ImportError:
    return False
  return keras.backend.backend() == "jax"


def build_keras(name, quick, size):
  """The Keras application of a MobileNet network (weights=None, logits),
  or None: Keras has no ResNet-18."""
  import keras

  family, width, quick_width = NETWORKS[name]
  width = quick_width if quick else width
  shape = (size, size, 3)
  with warnings.catch_warnings():  # about ImageNet weights we do not load
    warnings.simplefilter("ignore")
    if family == "mobilenet_v1":
      return keras.applications.MobileNet(
        shape,
        alpha=width,
        dropout=0.0,
        weights=None,
        classifier_activation=None,
      )
    if family == "mobilenet_v2":
      return keras.applications.MobileNetV2(
        shape, alpha=width, weights=None, classifier_activation=None
      )
  return None


# --- JAX programs ------------------------------------------------------------


class JaxNet(NamedTuple):
  """A network as pure functions of `(params, state)`: `train(params, state,
  x) -> (logits, state)` (batch statistics) and `infer(params, state, x) ->
  logits` (running averages)."""

  params: Any
  state: Any
  train: Callable[..., Any]
  infer: Callable[..., Any]


def nnx_net(model):
  from flax import nnx

  graph, params, state = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_graph = nnx.graphdef(model)

  def train(params, state, x):
    m = nnx.merge(graph, params, state, copy=True)
    logits = m(x)
    return logits, nnx.split(m, nnx.Param, ...)[2]

  def infer(params, state, x):
    return nnx.merge(eval_graph, params, state, copy=True)(x)

  return JaxNet(params, state, train, infer)


def keras_net(model):
  params = [v.value for v in model.trainable_variables]
  state = [v.value for v in model.non_trainable_variables]

  def train(params, state, x):
    return model.stateless_call(params, state, x, training=True)

  def infer(params, state, x):
    return model.stateless_call(params, state, x, training=False)[0]

  return JaxNet(params, state, train, infer)


def optimizer(name):
  import optax

  return optax.sgd(0.01, momentum=0.9) if name == "sgd" else optax.adam(1e-3)


def train_step(net, tx):
  """`(params, state, opt_state, x, y) -> (params, state, opt_state, loss)`:
  one step of softmax cross-entropy."""
  import optax

  def step(params, state, opt_state, x, y):
    def loss(params):
      logits, new_state = net.train(params, state, x)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return ce.mean(), new_state

    (value, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, value

  return step


def device_loops(step, infer, steps):
  """`step` and `infer` run `steps` times inside one `lax.fori_loop`.

  The training steps chain through the parameters; each inference reads
  the input plus a negligible multiple of the previous logits' mean, so no
  iteration is loop-invariant (XLA could hoist it) or independent of the
  one before.
  """

  def train_loop(params, state, opt_state, x, y):
    def body(i, carry):
      return step(*carry[:3], x, y)

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.fori_loop(0, steps, body, (params, state, opt_state, zero))

  def infer_loop(params, state, x):
    def body(i, previous):
      logits = infer(params, state, x + 1e-30 * previous)
      return logits.mean().astype(previous.dtype)

    return jax.lax.fori_loop(0, steps, body, jnp.zeros((), x.dtype))

  return train_loop, infer_loop


def _mib(nbytes):
  return None if nbytes is None else nbytes / 2**20


def xla_bytes(compiled):
  """A compiled program's buffers: arguments + temporaries + outputs, less
  the outputs written into donated arguments; None where XLA does not say."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, AttributeError):
    return None
  if m is None:
    return None
  return (
    m.argument_size_in_bytes
    + m.temp_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
  )


class Cell(NamedTuple):
  """One build of one network, ready to time: `train()` and `infer()` run a
  step (blocking), `per_call` steps per call; compile seconds, memory."""

  train: Callable[[], Any]
  infer: Callable[[], Any]
  per_call: int
  params: int
  compile_s: dict
  memory: dict


def jax_cell(net, x, y, tx, steps):
  """Compiles `net`'s steps for `(x, y)` (`steps` > 0: in device loops)."""
  step, infer = train_step(net, tx), net.infer
  if steps:
    step, infer = device_loops(step, infer, steps)
  opt_state = tx.init(net.params)
  jax.block_until_ready((net.params, net.state, opt_state))
  compile_s, compiled = {}, {}
  for name, fn, args, donate in (
    ("train", step, (net.params, net.state, opt_state, x, y), (0, 1, 2)),
    ("infer", infer, (net.params, net.state, x), ()),
  ):
    jax.clear_caches()  # timed as the first of its kind in the process
    start = time.perf_counter()
    compiled[name] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    compile_s[name] = time.perf_counter() - start
  live = [net.params, net.state, opt_state]

  def train():
    *live[:], loss = compiled["train"](*live, x, y)
    return jax.block_until_ready((live, loss))

  def infer_call():
    return jax.block_until_ready(compiled["infer"](*live[:2], x))

  count = sum(np.size(p) for p in jax.tree.leaves(net.params))
  memory = {
    "xla_train_mib": _mib(xla_bytes(compiled["train"])),
    "xla_infer_mib": _mib(xla_bytes(compiled["infer"])),
  }
  return Cell(train, infer_call, max(steps, 1), count, compile_s, memory)


def torch_device():
  """Where torch runs beside JAX: CUDA when JAX runs on a GPU, else the CPU;
  None when torch is not installed."""
  try:
    import torch
  except ImportError:
    return None
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return "cuda"
  return "cpu"


def torch_cell(layers, x, y, optimizer_name):
  """The torch build of `layers`, eager, its steps for `(x, y)` (numpy)."""
  import torch

  device = torch_device()
  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
    sync = lambda: None
  else:
    # cuDNN picks its fastest algorithm per shape, as XLA autotunes its own.
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize
  torch.manual_seed(0)
  model = build_torch(layers, device)
  xt = (
    torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    .to(device)
    .contiguous(memory_format=torch.channels_last)
  )
  yt = torch.from_numpy(np.asarray(y, np.int64)).to(device)
  opt = (
    torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if optimizer_name == "sgd"
    else torch.optim.Adam(model.parameters(), lr=1e-3)
  )
  loss_fn = torch.nn.CrossEntropyLoss()

  def train():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(xt), yt)
    loss.backward()
    opt.step()
    sync()
    return loss

  def infer():
    model.eval()
    with torch.inference_mode():
      out = model(xt)
    sync()
    return out

  count = sum(p.numel() for p in model.parameters())
  return Cell(train, infer, 1, count, {}, {}), device


# --- measuring ---------------------------------------------------------------


def _rss_bytes():
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


class PeakRSS:
  """The growth of resident memory inside a `with` block, sampled every
  millisecond by a thread (`delta_mib`; None without /proc). A lower bound
  on what the block allocates: memory the allocator kept from earlier work
  is reused without growing the process."""

  def __enter__(self):
    self.base = self.peak = _rss_bytes()
    self.delta_mib = None
    self.done = threading.Event()
    if self.base is not None:
      self.thread = threading.Thread(target=self._sample, daemon=True)
      self.thread.start()
    return self

  def _sample(self):
    while not self.done.wait(0.001):
      self.peak = max(self.peak, _rss_bytes() or 0)

  def __exit__(self, *exc):
    self.done.set()
    if self.base is not None:
      self.thread.join()
      self.peak = max(self.peak, _rss_bytes() or 0)
      self.delta_mib = (self.peak - self.base) / 2**20


def warm_up(cell, torch_cuda=False):
  """Two calls of each step under `PeakRSS` (and, for torch on CUDA, its
  peak allocation over a train step); returns `{step: first call s}` and
  fills `cell.memory`."""
  first = {}
  if torch_cuda:
    import torch

    cell.train()
    torch.cuda.reset_peak_memory_stats()
    cell.train()
    cell.memory["cuda_train_mib"] = _mib(torch.cuda.max_memory_allocated())
  with PeakRSS() as rss:
    for name in ("train", "infer"):
      fn = getattr(cell, name)
      start = time.perf_counter()
      fn()
      first[name] = time.perf_counter() - start
      fn()
  if jax.default_backend() == "cpu":
    cell.memory["rss_delta_mib"] = rss.delta_mib
  return first


def interleaved(cells, rounds, seed=0):
  """`{(build, step): [ms per step]}`: `rounds` rounds, each running every
  cell's steps once in a new random order."""
  calls = {
    (build, name): (getattr(cell, name), cell.per_call)
    for build, cell in cells.items()
    for name in ("train", "infer")
  }
  keys = list(calls)
  times = {key: [] for key in keys}
  order = np.random.default_rng(seed)
  for _ in range(rounds):
    for i in order.permutation(len(keys)):
      fn, per_call = calls[keys[i]]
      start = time.perf_counter()
      fn()
      times[keys[i]].append(1e3 * (time.perf_counter() - start) / per_call)
  return times


def summary(ms):
  """Median and interquartile range of a list of times."""
  q1, median, q3 = np.percentile(ms, (25, 50, 75))
  return {"median": median, "q1": q1, "q3": q3, "min": min(ms)}


def run_network(name, args, builds):
  """Builds, compiles, warms up and times one network; its result rows."""
  layers, flops = network(name, args.quick, args.size, args.fraction)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.size, args.size, 3), np.float32)
  y = rng.integers(0, 1000, args.batch)
  tx = optimizer(args.optimizer)
  cells, first, devices = {}, {}, {}
  for build in builds:
    if build in ("jaxfactor", "flax"):
      net = nnx_net(build_nnx(layers, build))
    elif build == "keras":
      model = build_keras(name, args.quick, args.size)
      if model is None:
        continue
      net = keras_net(model)
    else:
      cell, devices[build] = torch_cell(layers, x, y, args.optimizer)
      first[build] = warm_up(cell, devices[build] == "cuda")
      cells[build] = cell
      continue
    devices[build] = jax.default_backend()
    cell = jax_cell(
      net, jnp.asarray(x), jnp.asarray(y, jnp.int32), tx, args.device_loop
    )
    first[build] = warm_up(cell)
    cells[build] = cell
  times = interleaved(cells, args.rounds)
  rows = []
  for build, cell in cells.items():
    train, infer = (
      summary(times[build, "train"]),
      summary(times[build, "infer"]),
    )
    compile_s = dict(cell.compile_s)
    if not compile_s:  # eager: the first call's overhead over a median call
      compile_s = {
        s: first[build][s] - t["median"] / 1e3
        for s, t in (("train", train), ("infer", infer))
      }
    rows.append(
      dict(
        network=name,
        build=build,
        device=devices[build],
        per_call=cell.per_call,
        params=cell.params,
        train_ms=train,
        infer_ms=infer,
        compile_s=compile_s,
        compile_kind="jit" if cell.compile_s else "first call - median",
        memory=cell.memory,
        ranks=[
          list(r) if isinstance(r, tuple) else r for r in ranks_of(layers)
        ],
        conv3x3_flop_fraction=None if flops is None else flops[0] / flops[1],
      )
    )
    r = rows[-1]
    print(
      f"{name:17} {build:9} train {train['median']:9.2f} ms"
      f" [{train['q1']:.2f}, {train['q3']:.2f}]  infer"
      f" {infer['median']:9.2f} ms  compile"
      f" {r['compile_s']['train']:.1f}/{r['compile_s']['infer']:.1f} s",
      flush=True,
    )
  return rows


# --- the report --------------------------------------------------------------


def _ms(v):
  return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _cell(t):
  return f"{_ms(t['median'])} [{_ms(t['q1'])}, {_ms(t['q3'])}]"


def _opt(v, spec=".0f"):
  return "-" if v is None else format(v, spec)


def report(rows, machine, command, args):
  lines = [
    "# Whole networks: training and inference steps",
    "",
    f"`{command}`",
    "",
    machine,
    "",
    f"Input {args.size}x{args.size}x3, batch {args.batch}, float32, 1000"
    f" classes; training step: forward, backward and"
    f" {'SGD with momentum 0.9' if args.optimizer == 'sgd' else 'Adam'}"
    f" (optax; torch.optim for torch); {args.rounds} interleaved rounds,"
    " median [interquartile range] in ms per step."
    + (
      f" JAX steps run {args.device_loop} per call in a `lax.fori_loop`."
      if args.device_loop
      else ""
    ),
    "",
    "| network | build | params | train ms | infer ms | train speedup"
    " | infer speedup | compile s train / infer | XLA train MiB"
    " | peak MiB | RSS growth MiB |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  base = {
    r["network"]: r for r in rows if r["build"] == "flax"
  }  # Flax as written today
  for r in rows:
    b = base.get(r["network"])
    speed = lambda k, b=b, r=r: (
      "-" if b is None else f"{b[k]['median'] / r[k]['median']:.2f}"
    )
    c = r["compile_s"]
    m = r["memory"]
    compile_text = f"{c['train']:.1f} / {c['infer']:.1f}"
    if r["compile_kind"] != "jit":
      compile_text += " (eager)"
    lines.append(
      f"| {r['network']} | {r['build']} ({r['device']}) | {r['params']:,} |"
      f" {_cell(r['train_ms'])} | {_cell(r['infer_ms'])} |"
      f" {speed('train_ms')} | {speed('infer_ms')} | {compile_text} |"
      f" {_opt(m.get('xla_train_mib'))} | {_opt(m.get('cuda_train_mib'))} |"
      f" {_opt(m.get('rss_delta_mib'))} |"
    )
  factorized = {
    r["network"]: r for r in rows if r["conv3x3_flop_fraction"] is not None
  }
  if factorized:
    lines += [
      "",
      "Factorized ResNet-18s: ranks of the 3x3 convs in order (the largest"
      " at which each costs at most"
      f" {args.fraction:.0%} of the dense conv's FLOPs, `jaxfactor.cost`),"
      " and the 3x3 convs' FLOPs over the dense ones':",
      "",
      "| network | ranks | 3x3 FLOPs / dense |",
      "|---|---|---|",
      *(
        f"| {n} | {' '.join(map(str, r['ranks']))} |"
        f" {r['conv3x3_flop_fraction']:.3f} |"
        for n, r in factorized.items()
      ),
    ]
  lines += [
    "",
    "Speedups are over the `flax` build of the same network (Flax's own"
    " layers, as written today). Compile: JAX's trace + lower + compile;"
    " torch runs eagerly, and shows its first call's time over its median."
    " XLA train MiB: the compiled training step's buffers"
    " (`memory_analysis()`: arguments + temporaries + outputs - donated);"
    " peak MiB: torch's `max_memory_allocated` over a training step on"
    " CUDA; RSS growth: the process's resident memory over the warm-up"
    " steps, on the CPU (a lower bound: the allocator reuses memory freed"
    " by earlier networks).",
  ]
  return lines


def describe_machine(torch_dev, keras_on):
  import flax
  import jaxlib
  import optax

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [
        l.split(":", 1)[1].strip() for l in f if l.startswith("model name")
      ]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  parts = [
    f"{cpu}, {os.cpu_count()} cores",
    f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
    f"jax {jax.__version__}, jaxlib {jaxlib.__version__},"
    f" flax {flax.__version__}, optax {optax.__version__}",
  ]
  if torch_dev is None:
    parts.append("torch not installed")
  else:
    import torch

    parts.append(
      f"torch {torch.__version__} ("
      + (
        f"{torch.get_num_threads()} threads"
        if torch_dev == "cpu"
        else "CUDA, cuDNN benchmark mode"
      )
      + ")"
    )
  if keras_on:
    import keras

    parts.append(f"keras {keras.__version__} (JAX backend)")
  else:
    parts.append("keras not installed")
  native = (
    "native kernel"
    if _native.available()
    else f"native kernel unavailable ({_native.error()})"
  )
  if jax.default_backend() == "cpu":
    parts.append(f"jaxfactor's depthwise convs: {native}")
  parts.append(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  return "Machine: " + "; ".join(parts) + "."


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smoke run")
  parser.add_argument("--batch", type=int, default=None, help="default 8")
  parser.add_argument(
    "--size", type=int, default=None, help="input height = width (112)"
  )
  parser.add_argument(
    "--rounds", type=int, default=None, help="interleaved rounds (default 7)"
  )
  parser.add_argument(
    "--networks",
    nargs="*",
    choices=list(NETWORKS),
    # The dense twin is slow (about 8x MobileNet v1's FLOPs): on request.
    default=[name for name in NETWORKS if name != "mobilenet_v1_dense"],
  )
  parser.add_argument(
    "--builds", nargs="*", choices=BUILDS, default=list(BUILDS)
  )
  parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
  parser.add_argument(
    "--fraction",
    type=float,
    default=0.25,
    help="the factorized 3x3 convs' FLOPs over the dense convs' (0.25)",
  )
  parser.add_argument(
    "--device-loop",
    type=int,
    default=0,
    metavar="N",
    help="run JAX steps N at a time inside one compiled fori_loop",
  )
  parser.add_argument("--tag", default="", help="suffix for the output files")
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent / "results",
  )
  args = parser.parse_args()
  args.batch = args.batch or (2 if args.quick else 8)
  args.size = args.size or (32 if args.quick else 112)
  args.rounds = args.rounds or (2 if args.quick else 7)
  if args.device_loop < 0:
    parser.error(f"--device-loop must be >= 0, got {args.device_loop}")
  # Compile times are measured: nothing comes from a persistent cache.
  jax.config.update("jax_compilation_cache_dir", None)
  builds = list(args.builds)
  torch_dev = torch_device()
  if "torch" in builds and torch_dev is None:
    print("torch is not installed: no torch rows")
    builds.remove("torch")
  if "keras" in builds and args.quick:
    # Keras's applications are whole networks, not --quick's first blocks.
    print("--quick: no keras rows")
    builds.remove("keras")
  keras_on = "keras" in builds and keras_available()
  if "keras" in builds and not keras_on:
    print("Keras 3 with the JAX backend is not installed: no keras rows")
    builds.remove("keras")
  command = "python benchmarks/networks.py " + " ".join(sys.argv[1:])
  machine = describe_machine(torch_dev, keras_on)
  args.out.mkdir(parents=True, exist_ok=True)
  suffix = ("_quick" if args.quick else "") + (
    f"_{args.tag}" if args.tag else ""
  )
  started = time.time()
  rows = []
  for name in args.networks:
    rows += run_network(name, args, builds)
    lines = report(rows, machine, command, args)
    # Written after each network: what was timed is kept if a later one fails.
    (args.out / f"networks{suffix}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"networks{suffix}.json").write_text(
      json.dumps(
        dict(
          machine=machine,
          command=command,
          settings={
            k: str(v) if isinstance(v, pathlib.Path) else v
            for k, v in vars(args).items()
          },
          seconds=time.time() - started,
          rows=rows,
        ),
        indent=1,
      )
    )
  print("\n".join(report(rows, machine, command, args)))
  print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
  main()
