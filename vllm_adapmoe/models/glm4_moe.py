"""GLM-4.5 / GLM-4.6 (``Glm4MoeForCausalLM``) with the AdapMoE block (mirrors vLLM 0.32's
``models/glm4_moe.py``).

GLM's MoE layer routes as DeepSeek-V3 does — sigmoid scores plus a correction bias, grouped
top-k, renormalised when ``norm_topk_prob``, ``routed_scaling_factor`` on the routed output —
with one shared expert (stock's MLP, always resident) and the first ``first_k_dense_replace``
layers dense. Attention (GQA, partial rotary, optional QK norm) is stock's module; the layer
re-does stock's ``__init__`` with our block and inherits its ``forward``. The checkpoint's MTP
(next-token prediction) layers are skipped by stock's loader, which loads every non-routed
weight; speculative decoding with them is refused at start-up (see ``validate_engine_args``).
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
from vllm.model_executor.models.glm4_moe import (Glm4MoeAttention, Glm4MoeDecoderLayer, Glm4MoeMLP,
                                                 Glm4MoeModel)
from vllm.model_executor.models.utils import make_empty_intermediate_tensors_factory, make_layers
from vllm.sequence import IntermediateTensors

from vllm_adapmoe.engine.routing import RouterSpec
from vllm_adapmoe.models import deepseek_shape
from vllm_adapmoe.models.moe_model import (AdapMoECausalLM, MoEBlocks, load_routed_apart, run_decoder,
                                           with_shared_experts)


def glm4_moe(config, vllm_config: VllmConfig, prefix: str, moe: MoEBlocks) -> nn.Module:
    """A MoE layer: fp32 router with its correction bias (as stock), our block, the shared expert."""
    gate = GateLinear(config.hidden_size, config.n_routed_experts, out_dtype=torch.float32,
                      params_dtype=torch.float32, prefix=f"{prefix}.gate")
    gate.e_score_correction_bias = nn.Parameter(
        torch.empty(config.n_routed_experts, dtype=torch.float32))
    router = RouterSpec(config.num_experts_per_tok, renormalize=config.norm_topk_prob,
                        scoring="sigmoid", num_groups=config.n_group or 1,
                        topk_groups=config.topk_group or 1)
    block = moe.block(prefix, gate, router)
    shared = None if not config.n_shared_experts else Glm4MoeMLP(
        hidden_size=config.hidden_size,
        intermediate_size=config.moe_intermediate_size * config.n_shared_experts,
        hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
        reduce_results=False, prefix=f"{prefix}.shared_experts")
    return with_shared_experts(block, shared, config.routed_scaling_factor)


class AdapMoEGlm4MoeDecoderLayer(Glm4MoeDecoderLayer):
    """Stock's layer with our MoE; ``forward`` is stock's."""

    def __init__(self, vllm_config: VllmConfig, prefix: str, moe: MoEBlocks) -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.layer_idx = int(prefix.split(".")[-1])
        self.self_attn = Glm4MoeAttention(
            config=config, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            max_position_embeddings=getattr(config, "max_position_embeddings", 131072),
            head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
            qkv_bias=config.attention_bias, cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config, prefix=f"{prefix}.self_attn",
            use_qk_norm=config.use_qk_norm)
        if self.layer_idx in moe.shape.moe_layers:
            self.mlp = glm4_moe(config, vllm_config, f"{prefix}.mlp", moe)
        else:
            self.mlp = Glm4MoeMLP(hidden_size=config.hidden_size,
                                  intermediate_size=config.intermediate_size,
                                  hidden_act=config.hidden_act,
                                  quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.routed_scaling_factor = config.routed_scaling_factor


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1,
                                         "intermediate_tensors": 0, "inputs_embeds": 0})
class AdapMoEGlm4MoeModel(nn.Module):
    hf_to_vllm_mapper = Glm4MoeModel.hf_to_vllm_mapper  # read by stock's load_weights

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", moe: MoEBlocks):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vocab_size = config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: AdapMoEGlm4MoeDecoderLayer(vllm_config, prefix, moe),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)
        self.is_fused_shared_expert_enabled = False  # read by stock's load_weights

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return run_decoder(self, input_ids, positions, intermediate_tensors, inputs_embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_routed_apart(self, weights, Glm4MoeModel.load_weights,
                                 deepseek_shape(self.config).moe_layers)


class AdapMoEGlm4MoeForCausalLM(AdapMoECausalLM):
    """``--model-impl adapmoe`` for ``Glm4MoeForCausalLM`` (GLM-4.5, GLM-4.5-Air, GLM-4.6)."""

    shape_of = staticmethod(deepseek_shape)
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}

    def build_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return AdapMoEGlm4MoeModel(vllm_config=vllm_config, prefix=prefix, moe=self.moe)
