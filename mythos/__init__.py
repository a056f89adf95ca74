"""mythos: a pretraining stack for the Recurrent-Depth Transformer and its dense baseline.

Public API used by scripts and users::

    cfg = mythos.load_model_config("configs/model/rdt-tiny.yaml", overrides=["loops.mean=4"])
    model = mythos.build_model(cfg)
    out = model(input_ids)            # out.logits: [B, S, vocab]
    mythos.tools.export.to_hf_llama(model, out_dir)   # dense Llama-style models only
"""

from mythos.config import ConfigError
from mythos.model import ModelConfig, build_model, load_model_config

__all__ = ["ConfigError", "ModelConfig", "build_model", "load_model_config"]
__version__ = "0.1.0"
