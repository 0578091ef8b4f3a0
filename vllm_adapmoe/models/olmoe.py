"""OLMoE with the AdapMoE block (mirrors vLLM 0.32's ``models/olmoe.py``).

Stock ``OlmoeModel`` takes the decoder-layer class as an argument, so the model is stock's
(compiled the same way); only ``mlp`` is swapped. OLMoE routes with softmax top-k *without*
renormalisation (stock passes ``renormalize=False`` whatever the config says), no shared experts,
every layer MoE.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.olmoe import OlmoeAttention, OlmoeForCausalLM, OlmoeModel

from vllm_adapmoe.engine.routing import RouterSpec
from vllm_adapmoe.models import olmoe_shape
from vllm_adapmoe.models.moe_model import AdapMoECausalLM, MoEBlocks, PreNormDecoderLayer


class AdapMoEOlmoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", moe: MoEBlocks) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.self_attn = OlmoeAttention(vllm_config=vllm_config, prefix=f"{prefix}.self_attn")
        gate = GateLinear(config.hidden_size, config.num_experts, prefix=f"{prefix}.mlp.gate")
        self.mlp = moe.block(f"{prefix}.mlp", gate,
                             RouterSpec(config.num_experts_per_tok, renormalize=False))
        self.input_layernorm = RMSNorm(config.hidden_size, eps=1e-5)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=1e-5)


class AdapMoEOlmoeForCausalLM(AdapMoECausalLM):
    """``--model-impl adapmoe`` for ``OlmoeForCausalLM`` checkpoints."""

    shape_of = staticmethod(olmoe_shape)
    hf_to_vllm_mapper = OlmoeForCausalLM.hf_to_vllm_mapper

    def build_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return OlmoeModel(vllm_config=vllm_config, prefix=prefix,
                          layer_type=partial(AdapMoEOlmoeDecoderLayer, moe=self.moe))
