"""Model definitions: shared blocks, the dense baseline and the Recurrent-Depth Transformer."""

from mythos.model.base import IGNORE_INDEX, CausalLM, ModelOutput
from mythos.model.build import build_model, load_model_config
from mythos.model.config import ACTConfig, LoopConfig, LoRAConfig, ModelConfig, MoEConfig
from mythos.model.layers import KVCache

__all__ = [
    "ACTConfig", "CausalLM", "IGNORE_INDEX", "KVCache", "LoRAConfig", "LoopConfig", "ModelConfig",
    "ModelOutput", "MoEConfig", "build_model", "load_model_config",
]
