"""Mixtral with the AdapMoE block: vLLM's own attention, norms and embeddings, our MoE block.

Mirrors vLLM 0.32's ``model_executor/models/mixtral.py``; the only change is
``block_sparse_moe`` (an ``AdapMoEBlock`` that keeps experts in host memory and computes them
from a per-layer device cache). Compiled like stock (``@support_torch_compile``): the block's
step runs inside the opaque op ``vllm::adapmoe_block`` (``moe_op.py``), everything else is traced.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.mixtral import MixtralAttention, MixtralModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    make_empty_intermediate_tensors_factory,
    make_layers,
)
from vllm.sequence import IntermediateTensors

from vllm_adapmoe.engine.block import AdapMoEBlock
from vllm_adapmoe.models import mixtral_shape
from vllm_adapmoe.models.moe_model import AdapMoECausalLM, MoEBlocks, PreNormDecoderLayer, run_decoder


class AdapMoEMixtralDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config, cache_config, quant_config, prefix: str, moe: AdapMoEBlock) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = MixtralAttention(
            config=config, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, max_position=config.max_position_embeddings,
            num_kv_heads=config.num_key_value_heads, cache_config=cache_config,
            quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.block_sparse_moe = moe
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block_sparse_moe(hidden_states)  # stock's (checkpoint's) module name


# Same dynamic dims as stock infers from its annotations (ours are strings: future annotations).
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0,
                                         "intermediate_tensors": 0, "inputs_embeds": 0})
class AdapMoEMixtralModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", moe: MoEBlocks):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        dtype = vllm_config.model_config.dtype

        def layer(prefix: str) -> AdapMoEMixtralDecoderLayer:
            gate = GateLinear(config.hidden_size, config.num_local_experts, params_dtype=dtype,
                              prefix=f"{prefix}.block_sparse_moe.gate")
            return AdapMoEMixtralDecoderLayer(
                config, vllm_config.cache_config, vllm_config.quant_config, prefix,
                moe.block(f"{prefix}.block_sparse_moe", gate))

        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, layer, prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return run_decoder(self, input_ids, positions, intermediate_tensors, inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=MixtralModel.hf_to_vllm_mapper)


class AdapMoEMixtralForCausalLM(AdapMoECausalLM):
    """``--model-impl adapmoe`` for ``MixtralForCausalLM`` checkpoints."""

    shape_of = staticmethod(mixtral_shape)

    def build_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return AdapMoEMixtralModel(vllm_config=vllm_config, prefix=prefix, moe=self.moe)
