"""The public docstrings: every example runs, every public name has one."""

import doctest
import importlib
import inspect
import pathlib
import pkgutil

import jax
import pytest

import jaxfactor
import jaxfactor.linen
import jaxfactor.nnx

PUBLIC = (jaxfactor, jaxfactor.nnx, jaxfactor.linen)
WITH_EXAMPLES = (
  "jaxfactor._adapters",
  "jaxfactor._convolution",
  "jaxfactor._cost",
  "jaxfactor._decompose",
  "jaxfactor._formats",
  "jaxfactor._ranks",
  "jaxfactor.linen",
  "jaxfactor.nnx",
)
# Arguments that no longer exist: a public signature naming one is stale.
REMOVED = {
  "depthwise_lowering",
  "spatial_lowering",
  "partitioning",
  "init",
  "initialization",
}


def test_every_module_with_examples_is_doctested():
  root = pathlib.Path(jaxfactor.__file__).parent
  found = {
    f"jaxfactor.{m.name}"
    for m in pkgutil.iter_modules([str(root)])
    if (root / f"{m.name}.py").is_file()
    and ">>>" in (root / f"{m.name}.py").read_text()
  }
  assert found == set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  # Users run the examples with JAX's defaults, not the suite's strict mode.
  with jax.numpy_dtype_promotion("standard"), jax.enable_x64(False):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0


def _public_names():
  for module in PUBLIC:
    for name in module.__all__:
      yield module, name


@pytest.mark.parametrize(
  "module,name", list(_public_names()), ids=lambda v: getattr(v, "__name__", v)
)
def test_public_name_has_a_docstring_and_no_removed_argument(module, name):
  obj = getattr(module, name)
  assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
  signatures = []
  if inspect.isclass(obj):
    # `__init__`: nnx's metaclass hides it behind (*args, **kwargs).
    signatures.append(inspect.signature(obj.__init__))
    for attr, member in vars(obj).items():
      if not attr.startswith("_") and callable(member):
        signatures.append(inspect.signature(getattr(obj, attr)))
  elif callable(obj):
    signatures.append(inspect.signature(obj))
  removed = set(REMOVED)
  layer = inspect.isclass(obj) and name.endswith("Conv")
  if layer:
    removed.add("dilation")  # `kernel_dilation`, as in Flax
  for signature in signatures:
    assert not removed & set(signature.parameters), (name, signature)
  if layer:
    assert "kernel_dilation" in signatures[0].parameters or name == (
      "PointwiseConv"
    )


@pytest.mark.parametrize(
  "module", [jaxfactor.nnx, jaxfactor.linen], ids=lambda m: m.__name__
)
def test_reports_are_the_top_level_classes(module):
  for name in ("FactorizationReport", "LayerReport"):
    assert name in module.__all__
    assert getattr(module, name) is getattr(jaxfactor, name)
