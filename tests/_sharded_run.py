"""Run by test_sharding.py in a subprocess with 4 simulated CPU devices.

Builds factorized layers whose factor initializers carry mesh-axis names
(`nnx.with_partitioning`, linen's `nn.with_partitioning`), shards them on a
(data=2, model=2) mesh by that metadata, and checks that the jitted sharded
forward pass and gradients equal the single-device ones. A partitioned
program lowers its depthwise stages to the shift-add (XLA cannot partition
the native kernel's custom call: it would gather the operands); a
`shard_map`, whose body is one device's program, to the native kernel.
Prints one line per check; test_sharding.py reads them.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxfactor
import jaxfactor.linen
import jaxfactor.nnx
from jaxfactor import _native

# The test suite's compilation cache (see conftest.py).
jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get(
    "JAXFACTOR_TEST_CACHE",
    str(pathlib.Path.home() / ".cache" / "jaxfactor" / "jax-compilation"),
  ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
assert jax.device_count() == 4, jax.devices()
# float32 results of the same sums in another order (the shards'): jax's
# float32 tolerance; gradients sum over the batch as well.
RTOL, GRAD_RTOL, ATOL = 1e-5, 1e-4, 1e-6

# Auto axes: XLA propagates shardings (GSPMD), as for Flax's own layers.
mesh = jax.make_mesh(
  (2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
)


def sharded(*names):
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class Model(nnx.Module):
  def __init__(self, rngs):
    self.tucker = jaxfactor.nnx.TuckerConv(
      8,
      16,
      (3, 3),
      rank=(4, 8),
      in_proj_init=sharded(None, "model"),
      core_init=sharded(None, None, None, "model"),
      out_proj_init=sharded("model", None),
      rngs=rngs,
    )
    self.separable = jaxfactor.nnx.DepthwiseSeparableConv(
      16,
      8,
      (3, 3),
      implementation="factorized",  # a depthwise stage, whatever "auto" says
      depthwise_init=sharded(None, None, None, "model"),
      pointwise_init=sharded("model", None),
      rngs=rngs,
    )

  def __call__(self, x):
    return self.separable(nnx.relu(self.tucker(x)))


def loss(model, x):
  return jnp.mean(model(x) ** 2)


def close(actual, expected, rtol):
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=ATOL)


x = jax.random.normal(jax.random.key(1), (8, 10, 10, 8))
sharded_x = jax.device_put(x, NamedSharding(mesh, P("data")))

# Single-device reference: the same metadata, not applied.
with nnx.use_eager_sharding(False):
  reference = Model(nnx.Rngs(0))
graphdef, reference_state = nnx.split(reference)


@jax.jit
def forward_and_grad(state, x):
  model = nnx.merge(graphdef, state)
  return model(x), nnx.grad(loss)(model, x)


single = forward_and_grad(reference_state, x)
single_text = forward_and_grad.lower(reference_state, x).as_text()
assert ("jaxfactor_depthwise_forward" in single_text) == _native.available()
specs = nnx.get_partition_spec(reference_state)
assert specs["tucker"]["in_proj"] == P(None, "model"), specs["tucker"]
assert specs["separable"]["depthwise"] == P(None, None, None, "model")


def check(state, label):
  in_proj = state["tucker"]["in_proj"][...]
  assert len(in_proj.sharding.device_set) == 4, in_proj.sharding
  assert in_proj.sharding.spec == P(None, "model"), in_proj.sharding
  close(forward_and_grad(state, sharded_x), single, GRAD_RTOL)
  # Partitioned: the shift-add, which XLA partitions like any other op.
  text = forward_and_grad.lower(state, sharded_x).as_text()
  assert "custom_call @jaxfactor" not in text, label
  print(f"nnx {label}: sharded == single-device")


# 1. Flax's default: built under the mesh, parameters are sharded eagerly.
with jax.set_mesh(mesh):
  check(nnx.state(Model(nnx.Rngs(0))), "built under the mesh")
# 2. An unsharded model placed by its metadata.
placed = jax.device_put(
  reference_state, nnx.get_named_sharding(reference_state, mesh)
)
check(placed, "placed by its metadata")

# 3. shard_map: the body is one device's program, so it may run the native
# kernel; the batch is split over both mesh axes.
kernel = jax.random.normal(jax.random.key(2), (3, 3, 1, 8))
per_device = jax.shard_map(
  lambda x: jaxfactor.depthwise_conv(x, kernel),
  mesh=mesh,
  in_specs=P(("data", "model")),
  out_specs=P(("data", "model")),
)
text = jax.jit(per_device).lower(sharded_x).as_text()
assert ("custom_call @jaxfactor" in text) == _native.available()
close(jax.jit(per_device)(sharded_x), jaxfactor.depthwise_conv(x, kernel), RTOL)
print("shard_map: per-device == single-device")

# linen: nn.with_partitioning metadata on the factor initializers.
init = nn.initializers.lecun_normal()
layer = jaxfactor.linen.TuckerConv(
  features=16,
  kernel_size=(3, 3),
  rank=(4, 8),
  in_proj_init=nn.with_partitioning(init, (None, "model")),
  core_init=nn.with_partitioning(init, (None, None, None, "model")),
  out_proj_init=nn.with_partitioning(init, ("model", None)),
)
boxed = layer.init(jax.random.key(0), x)
specs = nn.get_partition_spec(boxed)
assert specs["params"]["in_proj"] == P(None, "model"), specs
variables = jax.device_put(nn.meta.unbox(boxed), nn.get_sharding(boxed, mesh))
assert variables["params"]["in_proj"].sharding.spec == P(None, "model")
unboxed = nn.meta.unbox(boxed)
close(jax.jit(layer.apply)(variables, sharded_x), layer.apply(unboxed, x), RTOL)


def linen_loss(variables, x):
  return jnp.mean(layer.apply(variables, x) ** 2)


close(
  jax.jit(jax.grad(linen_loss))(variables, sharded_x),
  jax.grad(linen_loss)(unboxed, x),
  GRAD_RTOL,
)
print("linen: sharded == single-device")
