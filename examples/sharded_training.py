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

The same script runs as several processes, JAX's multi-controller model:
each process runs it with `--num-processes`, its own `--process-id` and the
same `--coordinator`; `jax.distributed.initialize` joins them, the mesh
spans every process's devices, and on CPUs the processes exchange data
through Gloo collectives. Two processes on one machine, 4 simulated CPU
devices each, so that the mesh is the single-process run's:

    python examples/sharded_training.py --num-processes 2 --process-id 0 \
        --coordinator localhost:12355 &
    python examples/sharded_training.py --num-processes 2 --process-id 1 \
        --coordinator localhost:12355

On a GPU or TPU cluster the same flags start one process per host (or the
cluster's launcher provides them; see the sharding guide).

Run: `python examples/sharded_training.py` (`--help` for the flags). Exits
with status 1 if the curves differ by more than `--tolerance`.
"""

import argparse
import os

import jax
import numpy as np
import optax
from compress_digits import load_data
from compress_digits import train_step
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxfactor.nnx

SIMULATED_DEVICES = 8


def start_jax(num_processes, process_id, coordinator):
  """Sets up JAX's devices; call before anything asks JAX for devices.

  On the CPU, simulates `SIMULATED_DEVICES / num_processes` devices in this
  process (unless XLA_FLAGS already sets a count), so that the global mesh
  has the same shape however many processes share it. The flag only sets
  how many *CPU* devices XLA creates: on a GPU/TPU machine it changes
  nothing (jax.devices() are the accelerators), and it is skipped where JAX
  is told not to use the CPU.
  """
  flag = "--xla_force_host_platform_device_count"
  if flag not in os.environ.get("XLA_FLAGS", "") and "cpu" in os.environ.get(
    "JAX_PLATFORMS", "cpu"
  ):
    count = SIMULATED_DEVICES // num_processes
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" {flag}={count}"
    ).strip()
  if num_processes > 1:
    # CPU devices of different processes talk through Gloo (GPUs and TPUs
    # have their own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator, num_processes=num_processes, process_id=process_id
    )


def gather(tree):
  """Every element of `tree`'s (possibly multi-process) arrays, in numpy."""
  return multihost_utils.process_allgather(tree, tiled=True)


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
  # Adam carries, and amplifies, from step to step. Measured over the 60
  # default steps on 8 CPU devices: 4.8e-7 in one process; 1.1e-5 in two
  # processes, whose Gloo all-reduce adds the parts in yet another order
  # (1e-6 until step 42, then growing). 1e-4 is 9x that, and far below
  # what a wrong sharding or a missed reduction gives (the loss itself).
  parser.add_argument(
    "--tolerance",
    type=float,
    default=1e-4,
    help="largest allowed |loss difference| per step" + default,
  )
  parser.add_argument(
    "--seed", type=int, default=0, help="initialization and batches" + default
  )
  parser.add_argument(
    "--num-processes",
    type=int,
    default=1,
    help="processes that run this script together" + default,
  )
  parser.add_argument(
    "--process-id",
    type=int,
    default=0,
    help="this process's index, 0 to --num-processes - 1" + default,
  )
  parser.add_argument(
    "--coordinator",
    default="localhost:12355",
    help="host:port of process 0, which the others connect to" + default,
  )
  args = parser.parse_args()
  if not 0 <= args.process_id < args.num_processes:
    parser.error(
      f"--process-id {args.process_id} is not in [0, {args.num_processes})"
    )
  start_jax(args.num_processes, args.process_id, args.coordinator)

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
    f"{jax.process_count()} process(es), {len(devices)}"
    f" {devices[0].platform} devices, mesh"
    f" {dict(mesh.shape)}; global batch {batch_size}"
    f" ({batch_size // data_axis} per data shard), {args.steps} Adam steps"
  )

  with jax.set_mesh(mesh):
    model = Net(nnx.Rngs(args.seed))
    initial = gather(nnx.state(model))  # On the host, from every process.
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
  # The reference: the same metadata, not applied, everything on one device
  # (one of this process's own).
  local = jax.local_devices()[0]
  with nnx.use_eager_sharding(False), jax.default_device(local):
    single = Net(nnx.Rngs(args.seed))
  same_init = all(
    np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves(initial), jax.tree.leaves(nnx.state(single))
    )
  )
  single_losses, _ = run(
    single, batches, args.learning_rate, lambda a: jax.device_put(a, local)
  )

  print(f"identical initial parameters: {same_init}")
  print(f"\n{'step':>5} {'sharded loss':>13} {'single-device':>13}")
  for step in sorted({*range(0, args.steps, 10), args.steps - 1}):
    print(
      f"{step + 1:>5} {sharded_losses[step]:>13.6f}"
      f" {single_losses[step]:>13.6f}"
    )
  for name, m, fetch in (
    ("sharded", model, gather),
    ("single-device", single, np.asarray),
  ):
    predictions = fetch(nnx.jit(lambda m, x: m(x).argmax(-1))(m, x_test))
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
