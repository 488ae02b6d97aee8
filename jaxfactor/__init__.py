"""jaxfactor: factorized convolutions for JAX and Flax.

A factorized convolution is an immutable pytree of factor arrays that *is* a
convolution kernel, stored in pieces. `conv(x, kernel)` takes a dense HWIO
kernel or any format and equals the dense convolution with `kernel.to_dense()`.
"""

from jaxfactor._adapters import adapter_conv as adapter_conv
from jaxfactor._adapters import merge_update as merge_update
from jaxfactor._convolution import conv as conv
from jaxfactor._convolution import depthwise_conv as depthwise_conv
from jaxfactor._convolution import pointwise_conv as pointwise_conv
from jaxfactor._cost import Cost as Cost
from jaxfactor._cost import cost as cost
from jaxfactor._decompose import cp_degeneracy as cp_degeneracy
from jaxfactor._decompose import decompose as decompose
from jaxfactor._decompose import relative_error as relative_error
from jaxfactor._formats import CP as CP
from jaxfactor._formats import DepthwiseSeparable as DepthwiseSeparable
from jaxfactor._formats import Format as Format
from jaxfactor._formats import Grouped as Grouped
from jaxfactor._formats import LowRank as LowRank
from jaxfactor._formats import SpatiallySeparable as SpatiallySeparable
from jaxfactor._formats import TensorTrain as TensorTrain
from jaxfactor._formats import Tucker as Tucker
from jaxfactor._learned import PruningLayerReport as PruningLayerReport
from jaxfactor._learned import PruningReport as PruningReport
from jaxfactor._ranks import Budget as Budget
from jaxfactor._ranks import max_rank as max_rank
from jaxfactor._surgery import AdaptationReport as AdaptationReport
from jaxfactor._surgery import AdapterLayerReport as AdapterLayerReport
from jaxfactor._surgery import FactorizationReport as FactorizationReport
from jaxfactor._surgery import LayerReport as LayerReport

__version__ = "0.1.0"

__all__ = (
  "AdaptationReport",
  "AdapterLayerReport",
  "Budget",
  "CP",
  "Cost",
  "DepthwiseSeparable",
  "FactorizationReport",
  "Format",
  "Grouped",
  "LayerReport",
  "LowRank",
  "PruningLayerReport",
  "PruningReport",
  "SpatiallySeparable",
  "TensorTrain",
  "Tucker",
  "adapter_conv",
  "conv",
  "cost",
  "cp_degeneracy",
  "decompose",
  "depthwise_conv",
  "max_rank",
  "merge_update",
  "pointwise_conv",
  "relative_error",
)
