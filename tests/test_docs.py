"""The `>>>` examples in the public docstrings run and print what they say."""

import doctest

import jax
import pytest

import jaxfactor.convolution
import jaxfactor.cost_model
import jaxfactor.decomposition
import jaxfactor.formats
import jaxfactor.linen
import jaxfactor.nnx
import jaxfactor.primitives
import jaxfactor.ranks


@pytest.mark.parametrize("module", [
    jaxfactor.formats, jaxfactor.primitives, jaxfactor.convolution,
    jaxfactor.cost_model, jaxfactor.decomposition, jaxfactor.ranks,
    jaxfactor.nnx, jaxfactor.linen,
], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  # Users run the examples with JAX's defaults, not the suite's strict mode.
  with jax.numpy_dtype_promotion("standard"), jax.enable_x64(False):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0
