"""The dense baseline: a standard pre-norm decoder of ``n_layers`` blocks (Llama-style with
SwiGLU, no QK-norm and no value embeddings; exportable to Hugging Face ``LlamaForCausalLM``)."""

from __future__ import annotations

from torch import Tensor, nn

from mythos.model.base import CausalLM
from mythos.model.config import ModelConfig
from mythos.model.layers import Block, KVCache, init_weights


class DenseLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        init_weights(self, cfg)

    def trunk(
        self, x: Tensor, input_ids: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None, **kwargs
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        if kwargs:
            raise TypeError(f"dense model got unexpected arguments: {sorted(kwargs)}")
        for i, block in enumerate(self.layers):
            x = self.run_block(block, x, rope, self.value_embed(i, input_ids), cache, (-1, i))
        return x, None, {}
