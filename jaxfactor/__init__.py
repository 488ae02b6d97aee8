"""jaxfactor: factorized convolutions for JAX and Flax.

A factorized convolution is an immutable pytree of factor arrays that *is* a
convolution kernel, stored in pieces. `conv(x, kernel)` takes a dense HWIO
kernel or any format and equals the dense convolution with `kernel.to_dense()`.
"""

from jaxfactor.convolution import conv as conv
from jaxfactor.cost_model import Cost as Cost
from jaxfactor.cost_model import cost as cost
from jaxfactor.decomposition import decompose as decompose
from jaxfactor.decomposition import relative_error as relative_error
from jaxfactor.formats import CP as CP
from jaxfactor.formats import DepthwiseSeparable as DepthwiseSeparable
from jaxfactor.formats import Format as Format
from jaxfactor.formats import LowRank as LowRank
from jaxfactor.formats import SpatiallySeparable as SpatiallySeparable
from jaxfactor.formats import Tucker as Tucker
from jaxfactor.primitives import depthwise_conv as depthwise_conv
from jaxfactor.primitives import pointwise_conv as pointwise_conv
from jaxfactor.ranks import Budget as Budget
from jaxfactor.ranks import max_rank as max_rank

__version__ = "0.1.0"

__all__ = (
    "Budget",
    "CP",
    "Cost",
    "DepthwiseSeparable",
    "Format",
    "LowRank",
    "SpatiallySeparable",
    "Tucker",
    "conv",
    "cost",
    "decompose",
    "depthwise_conv",
    "max_rank",
    "pointwise_conv",
    "relative_error",
)
