"""The reference engine: transformers models running on hybridkv's pages (torch; CPU or GPU).

``Engine`` packs the scheduler's step into one sequence, runs the model with the registered
``"hybridkv"`` attention (``attention.py``), which writes each layer's new keys and values
into its pages and reads them back through the step's block tables, and samples the next
tokens. ``build_model`` makes a seeded random model from a transformers config.
"""

from hybridkv.runtime.attention import StepContext
from hybridkv.runtime.engine import Engine, EngineConfig
from hybridkv.runtime.model import build_model, model_layout, tiny_config
from hybridkv.runtime.requests import TokenEvent

__all__ = ["Engine", "EngineConfig", "StepContext", "TokenEvent", "build_model", "model_layout", "tiny_config"]
