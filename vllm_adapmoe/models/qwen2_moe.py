"""Qwen2-MoE with the AdapMoE block (mirrors vLLM 0.32's ``models/qwen2_moe.py``).

Stock ``Qwen2MoeModel`` builds its own decoder layers, so the model is mirrored here (compiled
like stock, ``@support_torch_compile``); the layer swaps the sparse block for ours plus stock's
sigmoid-gated shared expert (``qwen_sparse_block``, shared with Qwen3-MoE). Routing: softmax
top-k, renormalised only when ``norm_topk_prob`` (off in Qwen1.5/Qwen2-MoE checkpoints).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.qwen2_moe import Qwen2MoeAttention, Qwen2MoeForCausalLM, Qwen2MoeMLP
from vllm.model_executor.models.utils import make_empty_intermediate_tensors_factory, make_layers
from vllm.sequence import IntermediateTensors

from vllm_adapmoe.models import qwen_moe_shape
from vllm_adapmoe.models.moe_model import AdapMoECausalLM, MoEBlocks, PreNormDecoderLayer, run_decoder
from vllm_adapmoe.models.qwen3_moe import qwen_sparse_block


class AdapMoEQwen2MoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str, moe: MoEBlocks) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen2MoeAttention(
            hidden_size=self.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads, rope_parameters=config.rope_parameters,
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn",
            dual_chunk_attention_config=getattr(config, "dual_chunk_attention_config", None))
        if int(prefix.rsplit(".", 1)[1]) in moe.shape.moe_layers:
            self.mlp = qwen_sparse_block(config, vllm_config, f"{prefix}.mlp", moe, Qwen2MoeMLP)
        else:
            self.mlp = Qwen2MoeMLP(hidden_size=config.hidden_size,
                                   intermediate_size=config.intermediate_size,
                                   hidden_act=config.hidden_act,
                                   quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


# Same dynamic dims as stock infers from its annotations (ours are strings: future annotations).
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0,
                                         "intermediate_tensors": 0, "inputs_embeds": 0})
class AdapMoEQwen2MoeModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", moe: MoEBlocks):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: AdapMoEQwen2MoeDecoderLayer(vllm_config, prefix, moe),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return run_decoder(self, input_ids, positions, intermediate_tensors, inputs_embeds)


class AdapMoEQwen2MoeForCausalLM(AdapMoECausalLM):
    """``--model-impl adapmoe`` for ``Qwen2MoeForCausalLM`` checkpoints."""

    shape_of = staticmethod(qwen_moe_shape)
    hf_to_vllm_mapper = Qwen2MoeForCausalLM.hf_to_vllm_mapper

    def build_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return AdapMoEQwen2MoeModel(vllm_config=vllm_config, prefix=prefix, moe=self.moe)
