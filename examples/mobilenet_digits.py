"""A small MobileNet against the same network with dense convs, on digits.

Both networks are trained from scratch on the data of `compress_digits.py`
(scikit-learn's 8x8 handwritten digits, the same fixed split), with the same
seed, optimizer and epochs. The MobileNet's blocks are depthwise-separable as
in Howard et al. 2017 (https://arxiv.org/abs/1704.04861, Fig. 3): a 3x3
depthwise conv (`jaxfactor.nnx.DepthwiseConv`), BatchNorm, ReLU, a 1x1
pointwise conv (`jaxfactor.nnx.PointwiseConv`), BatchNorm, ReLU. The dense
network replaces each block by one 3x3 `nnx.Conv`, BatchNorm, ReLU (the
paper's "Conv MobileNet", Table 4); both start with the same full 3x3 conv.

Prints, for each: trainable parameters, conv FLOPs per image
(`jaxfactor.cost`, layer by layer), test accuracy and the median time of one
jitted training step.

Run: `python examples/mobilenet_digits.py` (`--help` for the flags).
"""

import argparse

import jax
import numpy as np
from compress_digits import load_data
from compress_digits import median_ms
from compress_digits import predict
from compress_digits import train
from compress_digits import train_step
from flax import nnx

import jaxfactor
import jaxfactor.nnx

# (in, out, stride) of each block after the 1 -> 32 stem: 8x8 -> 4x4 -> 2x2.
BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2))
# Flax's default 0.99 averages the BatchNorm statistics over more steps than
# a short run on 1,347 images has.
BN_MOMENTUM = 0.9


class SeparableBlock(nnx.Module):
  """Depthwise 3x3, BN, ReLU, pointwise 1x1, BN, ReLU (MobileNet)."""

  def __init__(self, in_features, out_features, stride, *, rngs):
    self.depthwise = jaxfactor.nnx.DepthwiseConv(
      in_features, (3, 3), stride, use_bias=False, rngs=rngs
    )
    self.norm1 = nnx.BatchNorm(in_features, momentum=BN_MOMENTUM, rngs=rngs)
    self.pointwise = jaxfactor.nnx.PointwiseConv(
      in_features, out_features, use_bias=False, rngs=rngs
    )
    self.norm2 = nnx.BatchNorm(out_features, momentum=BN_MOMENTUM, rngs=rngs)
    self.stride = stride

  def __call__(self, x):
    x = nnx.relu(self.norm1(self.depthwise(x)))
    return nnx.relu(self.norm2(self.pointwise(x)))

  def cost(self, input_shape):
    # The two convs are one DepthwiseSeparable kernel with a BN in between;
    # the BN does not change their FLOPs.
    kernel = jaxfactor.DepthwiseSeparable(
      self.depthwise.depthwise[...], self.pointwise.pointwise[...]
    )
    return jaxfactor.cost(
      kernel, input_shape, strides=self.stride, implementation="factorized"
    )


class DenseBlock(nnx.Module):
  """A dense 3x3 conv, BN, ReLU: the block MobileNet replaces."""

  def __init__(self, in_features, out_features, stride, *, rngs):
    self.conv = nnx.Conv(
      in_features, out_features, (3, 3), stride, use_bias=False, rngs=rngs
    )
    self.norm = nnx.BatchNorm(out_features, momentum=BN_MOMENTUM, rngs=rngs)
    self.stride = stride

  def __call__(self, x):
    return nnx.relu(self.norm(self.conv(x)))

  def cost(self, input_shape):
    return jaxfactor.cost(
      self.conv.kernel[...], input_shape, strides=self.stride
    )


class Net(nnx.Module):
  """A full 3x3 stem, `BLOCKS` of `block`, global average pool, linear."""

  def __init__(self, block, *, rngs):
    self.stem = nnx.Conv(1, 32, (3, 3), use_bias=False, rngs=rngs)
    self.stem_norm = nnx.BatchNorm(32, momentum=BN_MOMENTUM, rngs=rngs)
    self.blocks = nnx.List([block(c, f, s, rngs=rngs) for c, f, s in BLOCKS])
    self.head = nnx.Linear(BLOCKS[-1][1], 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))

  def conv_cost(self, image_shape):
    """Parameters and FLOPs of the convs, for one image of `image_shape`."""
    shape = (1, *image_shape)
    total = jaxfactor.cost(self.stem.kernel[...], shape)
    shape = (*shape[:-1], 32)
    for block, (_, features, stride) in zip(self.blocks, BLOCKS):
      c = block.cost(shape)
      total = jaxfactor.Cost(total.params + c.params, total.flops + c.flops)
      size = -(-shape[1] // stride)  # SAME padding: ceil(size / stride).
      shape = (1, size, size, features)
    return total


def accuracy(model, images, labels):
  """Test accuracy with BatchNorm's running statistics."""
  model = nnx.view(model, use_running_average=True)
  return float(np.mean(np.asarray(predict(model, images)) == labels))


def step_ms(trained, x, y, runs):
  """Median time of one training step of each model, in ms.

  Steps copies of the `(model, optimizer)` pairs (the trained models stay as
  they are), warmed up, taking turns round by round so that a load that
  changes during the measurement (another job on the machine) hits all of
  them alike.
  """
  steps = []
  for pair in trained:
    model, optimizer = nnx.clone(pair)
    for _ in range(2):  # Warm up.
      jax.block_until_ready(train_step(model, optimizer, x, y))
    steps.append(
      lambda model=model, optimizer=optimizer: jax.block_until_ready(
        train_step(model, optimizer, x, y)
      )
    )
  return median_ms(steps, runs)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = " (default: %(default)s)"
  parser.add_argument(
    "--epochs",
    type=int,
    default=30,
    help="training epochs, each network" + default,
  )
  parser.add_argument(
    "--learning-rate",
    type=float,
    default=3e-3,
    help="peak of the cosine schedule" + default,
  )
  parser.add_argument(
    "--batch-size", type=int, default=64, help="training batch" + default
  )
  parser.add_argument(
    "--train-size",
    type=int,
    default=None,
    help="use only the first N training images (smoke runs)",
  )
  parser.add_argument(
    "--timing-runs",
    type=int,
    default=30,
    help="timed training steps per network, taking turns;"
    " the median is reported" + default,
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="model initialization and data order" + default,
  )
  parser.add_argument(
    "--no-progress",
    dest="progress",
    action="store_false",
    help="no progress bars",
  )
  args = parser.parse_args()

  data = load_data(args.train_size)
  x_train, y_train, x_test, y_test = data
  print(
    f"digits: {len(x_train)} training and {len(x_test)} test images,"
    f" 8x8; backend {jax.default_backend()}, {args.epochs} epochs,"
    f" batch {args.batch_size}, seed {args.seed}\n"
  )
  header = (
    f"{'network':<28} {'params':>8} {'conv MFLOPs':>11}"
    f" {'test acc':>8} {'step ms':>8}"
  )
  lines = [header, "-" * len(header)]
  names = ("dense convs", "MobileNet (depthwise-sep.)")
  trained = []
  for name, block in zip(names, (DenseBlock, SeparableBlock)):
    model = Net(block, rngs=nnx.Rngs(args.seed))
    _, optimizer = train(
      model,
      data,
      epochs=args.epochs,
      learning_rate=args.learning_rate,
      batch_size=args.batch_size,
      seed=args.seed,
      desc=name,
      progress=args.progress,
      evaluate=accuracy,
    )
    trained.append((model, optimizer))
  batch = slice(0, args.batch_size)
  times = step_ms(trained, x_train[batch], y_train[batch], args.timing_runs)
  for name, (model, _), ms in zip(names, trained, times):
    params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    cost = model.conv_cost(x_train.shape[1:])
    lines.append(
      f"{name:<28} {params:>8,} {cost.flops / 1e6:>11.3f}"
      f" {accuracy(model, x_test, y_test):>8.4f} {ms:>8.2f}"
    )
  print("\n".join(lines))
  print(
    "\nparams: trainable (BatchNorm statistics excluded); conv FLOPs per"
    " image from jaxfactor.cost; step ms: median of"
    f" {args.timing_runs} jitted training steps on {args.batch_size}"
    " images (forward, backward and Adam update), the networks taking"
    " turns."
  )


if __name__ == "__main__":
  main()
