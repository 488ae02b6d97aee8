"""Data-parallel training of a factorized model, factors sharded by metadata.

Builds a small CNN on digits with two jaxfactor layers (`TuckerConv`,
`CPConv`) whose factor initializers carry mesh-axis names, in Flax's idiom:
`in_proj_init=nnx.with_partitioning(init, (None, "model"))` stores the names
as the `nnx.Param`'s `out_sharding`. Built under `jax.set_mesh(mesh)` on a
`("data", "model")` mesh over all devices, the parameters (and Adam's state,
which follows them) are sharded by that metadata: the factorization's inner
rank axis is split over "model", so each device holds part of every factor.
Each batch is split over "data". The same steps then run on one device from
the same initial values and batches, and the two loss curves are compared.

On a CPU-only machine the script simulates 8 devices
(`--xla_force_host_platform_device_count=8`, unless XLA_FLAGS already sets a
count); on GPUs or TPUs it runs unchanged on the devices there are.

Run: `python examples/sharded_training.py` (`--help` for the flags). Exits
with status 1 if the curves differ by more than `--tolerance`.
"""

import os

# Before JAX starts: the flag only sets how many *CPU* devices XLA creates, so
# on a GPU/TPU machine it changes nothing there (jax.devices() are the
# accelerators), and it is skipped where JAX is told not to use the CPU.
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", "") and "cpu" in os.environ.get(
  "JAX_PLATFORMS", "cpu"
):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8"
  ).strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from compress_digits import load_data  # noqa: E402
from compress_digits import train_step  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxfactor.nnx  # noqa: E402


def sharded(*names):
  """Flax's default kernel initializer, with mesh-axis `names` attached."""
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


# Mesh-axis names per factor: the inner rank axes over "model"; the biases
# replicated.
TUCKER_INITS = dict(
  in_proj_init=sharded(None, "model"),
  core_init=sharded(None, None, None, "model"),
  out_proj_init=sharded("model", None),
  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)),
)
CP_INITS = dict(
  in_proj_init=sharded(None, "model"),
  spatial_init=sharded(None, "model"),  # every axis' factor
  out_proj_init=sharded("model", None),
  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)),
)


class Net(nnx.Module):
  """A dense stem, a Tucker conv, a CP conv and a linear head (8x8 input)."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.conv2 = jaxfactor.nnx.TuckerConv(
      32, 64, (3, 3), rank=(16, 16), **TUCKER_INITS, rngs=rngs
    )
    self.conv3 = jaxfactor.nnx.CPConv(
      64, 64, (3, 3), rank=32, **CP_INITS, rngs=rngs
    )
    self.head = nnx.Linear(2 * 2 * 64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.avg_pool(x, (2, 2), (2, 2))
    x = nnx.relu(self.conv3(x))
    x = nnx.avg_pool(x, (2, 2), (2, 2))
    return self.head(x.reshape(x.shape[0], -1))


def run(model, batches, learning_rate, put):
  """Trains `model` on `batches` (placed by `put`).

  Returns:
    The losses and the optimizer.
  """
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
  losses = [
    float(train_step(model, optimizer, put(x), put(y))) for x, y in batches
  ]
  return np.array(losses), optimizer


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = " (default: %(default)s)"
  parser.add_argument(
    "--steps", type=int, default=60, help="Adam steps, each run" + default
  )
  parser.add_argument(
    "--batch-size",
    type=int,
    default=64,
    help="global batch, rounded up to a multiple of the data axis" + default,
  )
  parser.add_argument(
    "--model-axis",
    type=int,
    default=None,
    help="devices on the 'model' axis (default: 2 when the"
    " device count is even, else 1)",
  )
  parser.add_argument(
    "--learning-rate",
    type=float,
    default=3e-3,
    help="Adam's learning rate" + default,
  )
  # The sharded run sums each shard's part of a reduction (the batch mean,
  # the contractions over a sharded rank), then the parts: float32 sums in
  # another order, a few units in the last place apart (eps = 1.2e-7), which
  # Adam carries from step to step. 1e-5 is about 80 eps at losses near 1,
  # 20x the 4.8e-7 measured over 60 steps on 8 CPU devices.
  parser.add_argument(
    "--tolerance",
    type=float,
    default=1e-5,
    help="largest allowed |loss difference| per step" + default,
  )
  parser.add_argument(
    "--seed", type=int, default=0, help="initialization and batches" + default
  )
  args = parser.parse_args()

  devices = jax.devices()
  model_axis = args.model_axis or (2 if len(devices) % 2 == 0 else 1)
  if len(devices) % model_axis:
    parser.error(
      f"--model-axis {model_axis} does not divide the {len(devices)} devices"
    )
  data_axis = len(devices) // model_axis
  # Auto axes: XLA propagates the shardings (GSPMD), as for Flax's layers.
  mesh = jax.make_mesh(
    (data_axis, model_axis),
    ("data", "model"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )
  batch_size = -(-args.batch_size // data_axis) * data_axis

  x_train, y_train, x_test, y_test = load_data()
  rng = np.random.default_rng(args.seed)
  batches = [
    (x_train[i], y_train[i])
    for i in (
      rng.choice(len(x_train), batch_size, replace=False)
      for _ in range(args.steps)
    )
  ]
  print(
    f"{len(devices)} {devices[0].platform} devices, mesh"
    f" {dict(mesh.shape)}; global batch {batch_size}"
    f" ({batch_size // data_axis} per data shard), {args.steps} Adam steps"
  )

  with jax.set_mesh(mesh):
    model = Net(nnx.Rngs(args.seed))
    initial = jax.device_get(nnx.state(model))  # Gathered on the host.
    for path, param in (
      ("conv2.in_proj", model.conv2.in_proj),
      ("conv2.core", model.conv2.core),
      ("conv3.spatial_0", model.conv3.spatial_0),
      ("conv3.out_proj", model.conv3.out_proj),
    ):
      value = param[...]
      print(
        f"  {path:<16} {str(value.shape):<16} {value.sharding.spec}"
        f" over {len(value.sharding.device_set)} devices"
      )
    batch_sharding = NamedSharding(mesh, P("data"))
    sharded_losses, optimizer = run(
      model,
      batches,
      args.learning_rate,
      lambda a: jax.device_put(a, batch_sharding),
    )
    mu = optimizer.opt_state[0].mu["conv2"]["in_proj"][...]
    print(
      f"  Adam's first moment of conv2.in_proj follows it: {mu.sharding.spec}"
    )
  # The reference: the same metadata, not applied, everything on one device.
  with nnx.use_eager_sharding(False):
    single = Net(nnx.Rngs(args.seed))
  same_init = all(
    np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves(initial), jax.tree.leaves(nnx.state(single))
    )
  )
  single_losses, _ = run(
    single, batches, args.learning_rate, lambda a: jax.device_put(a, devices[0])
  )

  print(f"identical initial parameters: {same_init}")
  print(f"\n{'step':>5} {'sharded loss':>13} {'single-device':>13}")
  for step in sorted({*range(0, args.steps, 10), args.steps - 1}):
    print(
      f"{step + 1:>5} {sharded_losses[step]:>13.6f}"
      f" {single_losses[step]:>13.6f}"
    )
  for name, m in (("sharded", model), ("single-device", single)):
    predictions = np.asarray(nnx.jit(lambda m, x: m(x).argmax(-1))(m, x_test))
    print(f"test accuracy, {name}: {np.mean(predictions == y_test):.4f}")
  difference = float(np.max(np.abs(sharded_losses - single_losses)))
  print(
    f"\nmax |sharded - single-device| over {args.steps} losses:"
    f" {difference:.2e} (tolerance {args.tolerance:.0e})"
  )
  if not same_init or difference > args.tolerance:
    raise SystemExit("the loss curves differ")
  print("loss curves equal")


if __name__ == "__main__":
  main()
