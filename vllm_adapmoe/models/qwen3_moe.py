"""Qwen3-MoE with the AdapMoE block (mirrors vLLM 0.32's ``models/qwen3_moe.py``).

Stock ``Qwen3MoeModel`` takes the decoder-layer class as an argument, so the model is stock's
(compiled the same way); the layer below mirrors stock's with the sparse block swapped. Routing:
softmax top-k, renormalised when ``norm_topk_prob``. Layers in ``mlp_only_layers`` (or off the
``decoder_sparse_step``) keep stock's dense MLP; a shared expert (``shared_expert_intermediate_size``
> 0) stays resident, computed by stock's module.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.qwen3_moe import Qwen3MoeAttention, Qwen3MoeMLP, Qwen3MoeModel

from vllm_adapmoe.engine.routing import RouterSpec
from vllm_adapmoe.models import qwen_moe_shape
from vllm_adapmoe.models.moe_model import (AdapMoECausalLM, MoEBlocks, PreNormDecoderLayer,
                                           SharedExpertsMoE)


def qwen_sparse_block(config, vllm_config: VllmConfig, prefix: str, moe: MoEBlocks,
                      mlp_cls: type[nn.Module]) -> nn.Module:
    """Qwen2/3-MoE's sparse block: the routed experts as our block, plus (when the config has
    one) the sigmoid-gated shared expert as stock's ``mlp_cls``."""
    gate = GateLinear(config.hidden_size, config.num_experts, prefix=f"{prefix}.gate")
    block = moe.block(prefix, gate, RouterSpec(config.num_experts_per_tok,
                                               renormalize=config.norm_topk_prob))
    shared_size = getattr(config, "shared_expert_intermediate_size", 0)
    if shared_size <= 0:
        return block
    shared_gate = ReplicatedLinear(config.hidden_size, 1, bias=False, quant_config=None,
                                   prefix=f"{prefix}.shared_expert_gate")
    shared = mlp_cls(hidden_size=config.hidden_size, intermediate_size=shared_size,
                     hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                     reduce_results=False, expert_gate=shared_gate,
                     prefix=f"{prefix}.shared_expert")
    return SharedExpertsMoE(block, ("shared_expert", shared),
                            extra={"shared_expert_gate": shared_gate})


class AdapMoEQwen3MoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", moe: MoEBlocks) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_text_config
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen3MoeAttention(
            hidden_size=self.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, rope_parameters=config.rope_parameters,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            rms_norm_eps=config.rms_norm_eps, qkv_bias=getattr(config, "attention_bias", False),
            head_dim=getattr(config, "head_dim", None), cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.self_attn",
            dual_chunk_attention_config=getattr(config, "dual_chunk_attention_config", None))
        if int(prefix.rsplit(".", 1)[1]) in moe.shape.moe_layers:
            self.mlp = qwen_sparse_block(config, vllm_config, f"{prefix}.mlp", moe, Qwen3MoeMLP)
        else:
            self.mlp = Qwen3MoeMLP(hidden_size=config.hidden_size,
                                   intermediate_size=config.intermediate_size,
                                   hidden_act=config.hidden_act,
                                   quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class AdapMoEQwen3MoeForCausalLM(AdapMoECausalLM):
    """``--model-impl adapmoe`` for ``Qwen3MoeForCausalLM`` checkpoints."""

    shape_of = staticmethod(qwen_moe_shape)
    # stock's Qwen3MoeModel.load_weights maps checkpoint names itself

    def build_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return Qwen3MoeModel(vllm_config=vllm_config, prefix=prefix,
                             decoder_layer_type=partial(AdapMoEQwen3MoeDecoderLayer, moe=self.moe))
