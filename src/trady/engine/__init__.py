"""The engine: prepares any nn.Module so that a training step updates only selected input channels.

`SparseEngine(model, example_input, EngineConfig(...))` is the one entry point (`sparse_engine`); below
it: the cost model (`costs`), the autograd Functions (`functions`), the prepared module classes
(`modules`), the trainable slices (`slices`) and the layer kinds beyond convolutions (`layer_kinds`:
smooth `activations`, low-bit `kept_tensors`, `attention`, `functional_calls`).
"""

from trady.engine.config import EngineConfig
from trady.engine.sparse_engine import SUPPORTED_KINDS, SWAPS, SparseEngine

__all__ = ["SUPPORTED_KINDS", "SWAPS", "EngineConfig", "SparseEngine"]
