"""Run by test_sharding.py in a subprocess with 4 simulated CPU devices.

Builds factorized layers whose parameters carry partitioning metadata, shards
them on a (data=2, model=2) mesh by that metadata, and checks that the
jitted sharded forward pass and gradients equal the single-device ones.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxfactor.linen  # noqa: E402
import jaxfactor.nnx  # noqa: E402

assert jax.device_count() == 4, jax.devices()
# Several CPU devices: "auto" keeps the depthwise convs as shift-adds, which
# XLA partitions, rather than the native kernel's custom call, which it
# would gather.
from jaxfactor import primitives  # noqa: E402
assert primitives.resolve_depthwise_lowering("t", "auto") == "shift_add"
# Auto axes: XLA propagates shardings (GSPMD), as for Flax's own layers.
mesh = jax.make_mesh((2, 2), ("data", "model"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 2)
PARTITIONING = {
    "in_proj": (None, "model"), "core": (None, None, None, "model"),
    "out_proj": ("model", None), "bias": (None,),
}


class Model(nnx.Module):

  def __init__(self, rngs):
    self.conv1 = jaxfactor.nnx.TuckerConv(
        8, 16, (3, 3), rank=(4, 8), partitioning=PARTITIONING, rngs=rngs)
    self.conv2 = jaxfactor.nnx.LowRankConv(
        16, 8, (3, 3), rank=4, rngs=rngs,
        partitioning={"spatial": (None, None, None, "model"),
                      "pointwise": ("model", None)})

  def __call__(self, x):
    return self.conv2(nnx.relu(self.conv1(x)))


def loss(model, x):
  return jnp.mean(model(x) ** 2)


x = jax.random.normal(jax.random.key(1), (8, 10, 10, 8))
# Single-device reference: the same metadata, not applied.
with nnx.use_eager_sharding(False):
  reference = Model(nnx.Rngs(0))
single_y = reference(x)
single_grads = nnx.grad(loss)(reference, x)
specs = nnx.get_partition_spec(nnx.state(reference))
assert specs["conv1"]["in_proj"] == P(None, "model"), specs["conv1"]["in_proj"]


def check(model, x):
  graphdef, state = nnx.split(model)
  in_proj = state["conv1"]["in_proj"][...]
  assert len(in_proj.sharding.device_set) == 4, in_proj.sharding
  assert in_proj.sharding.spec == P(None, "model"), in_proj.sharding

  @jax.jit
  def forward_and_grad(state, x):
    model = nnx.merge(graphdef, state)
    return model(x), nnx.grad(loss)(model, x)

  y, grads = forward_and_grad(state, x)
  np.testing.assert_allclose(y, single_y, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(grads)),
                  jax.tree.leaves(nnx.state(single_grads))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


sharded_x = jax.device_put(x, NamedSharding(mesh, P("data")))
# 1. Flax's default: built under the mesh, parameters are sharded eagerly.
with jax.set_mesh(mesh):
  check(Model(nnx.Rngs(0)), sharded_x)
# 2. An unsharded model placed by its metadata.
graphdef, state = nnx.split(reference)
placed = jax.device_put(state, nnx.get_named_sharding(state, mesh))
check(nnx.merge(graphdef, placed), sharded_x)

# linen: nn.with_partitioning metadata on the same layers.
layer = jaxfactor.linen.TuckerConv(features=16, kernel_size=(3, 3),
                                   rank=(4, 8), partitioning=PARTITIONING)
boxed = layer.init(jax.random.key(0), x)
specs = nn.get_partition_spec(boxed)
assert specs["params"]["in_proj"] == P(None, "model"), specs
shardings = nn.logical_to_mesh_sharding(specs, mesh, ())
variables = jax.device_put(nn.meta.unbox(boxed), nn.meta.unbox(shardings))
y_sharded = jax.jit(layer.apply)(variables, sharded_x)
np.testing.assert_allclose(y_sharded, layer.apply(nn.meta.unbox(boxed), x),
                           rtol=1e-5, atol=1e-6)


def linen_loss(variables, x):
  return jnp.mean(layer.apply(variables, x) ** 2)


sharded_grads = jax.jit(jax.grad(linen_loss))(variables, sharded_x)
single_grads = jax.grad(linen_loss)(nn.meta.unbox(boxed), x)
for a, b in zip(jax.tree.leaves(sharded_grads), jax.tree.leaves(single_grads)):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
print("sharded == single-device")
