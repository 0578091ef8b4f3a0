"""DeepSeek-V2/V3 with the AdapMoE block (mirrors vLLM 0.32's ``models/deepseek_v2.py``).

Stock's decoder layer builds its MoE (and all routed experts on the device) in ``__init__``, so the
layer here re-does ``__init__`` with our block and inherits stock's ``forward`` unchanged (MLA or
MHA attention, fp16 overflow scaling). The model mirrors stock's (one PP/SP-free loop) and loads
every non-routed weight with stock's own loader; ``mlp.gate.*`` and ``mlp.experts.*`` of MoE
layers go to our blocks. Routing: grouped top-k with softmax or sigmoid scores and V3's
correction bias, renormalised when ``norm_topk_prob``; ``routed_scaling_factor`` scales the
routed output before the shared experts (always resident, stock's MLP) are added, as stock does.
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
from vllm.model_executor.models.deepseek_v2 import (
    DeepseekAttention,
    DeepseekV2Attention,
    DeepseekV2DecoderLayer,
    DeepseekV2MLAAttention,
    DeepseekV2MLP,
    DeepseekV2Model,
    _get_moe_router_dtype,
)
from vllm.model_executor.models.utils import make_empty_intermediate_tensors_factory, make_layers
from vllm.sequence import IntermediateTensors

from vllm_adapmoe.engine.errors import AdapMoEConfigError
from vllm_adapmoe.engine.routing import RouterSpec
from vllm_adapmoe.models import deepseek_shape
from vllm_adapmoe.models.moe_model import (AdapMoECausalLM, MoEBlocks, load_routed_apart, run_decoder,
                                           with_shared_experts)


def deepseek_moe(config, vllm_config: VllmConfig, prefix: str, moe: MoEBlocks) -> nn.Module:
    """A MoE layer: router (+ V3's correction bias), our block, stock's shared experts."""
    gate = GateLinear(config.hidden_size, config.n_routed_experts,
                      out_dtype=_get_moe_router_dtype(config), prefix=f"{prefix}.gate")
    if getattr(config, "topk_method", None) == "noaux_tc":
        gate.e_score_correction_bias = nn.Parameter(
            torch.empty(config.n_routed_experts, dtype=torch.float32))
    router = RouterSpec(config.num_experts_per_tok, renormalize=config.norm_topk_prob,
                        scoring=getattr(config, "scoring_func", "softmax"),
                        num_groups=getattr(config, "n_group", 1) or 1,
                        topk_groups=getattr(config, "topk_group", 1) or 1)
    block = moe.block(prefix, gate, router)
    shared = None if config.n_shared_experts is None else DeepseekV2MLP(
        hidden_size=config.hidden_size,
        intermediate_size=config.moe_intermediate_size * config.n_shared_experts,
        hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
        reduce_results=False, prefix=f"{prefix}.shared_experts")
    return with_shared_experts(block, shared, getattr(config, "routed_scaling_factor", 1.0))


class AdapMoEDeepseekV2DecoderLayer(DeepseekV2DecoderLayer):
    """Stock's layer with our MoE; ``forward`` is stock's."""

    def __init__(self, vllm_config: VllmConfig, prefix: str, moe: MoEBlocks) -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.hidden_size = config.hidden_size
        self.layer_idx = int(prefix.split(".")[-1])
        qk_nope_head_dim = getattr(config, "qk_nope_head_dim", 0)
        qk_rope_head_dim = getattr(config, "qk_rope_head_dim", 0)
        self.use_mha = config.model_type == "deepseek" or (qk_nope_head_dim == qk_rope_head_dim == 0)
        self.use_sequence_parallel_moe = False
        attn_cls = (DeepseekAttention if self.use_mha else
                    DeepseekV2MLAAttention if vllm_config.model_config.use_mla else DeepseekV2Attention)
        self.self_attn = attn_cls(
            vllm_config=vllm_config, config=config, hidden_size=self.hidden_size,
            num_heads=config.num_attention_heads, qk_nope_head_dim=qk_nope_head_dim,
            qk_rope_head_dim=qk_rope_head_dim, v_head_dim=getattr(config, "v_head_dim", 0),
            q_lora_rank=getattr(config, "q_lora_rank", None),
            kv_lora_rank=getattr(config, "kv_lora_rank", 0),
            max_position_embeddings=getattr(config, "max_position_embeddings", 8192),
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn", topk_indices_buffer=None, reduce_results=True)
        if self.layer_idx in moe.shape.moe_layers:
            self.mlp = deepseek_moe(config, vllm_config, f"{prefix}.mlp", moe)
        else:
            self.mlp = DeepseekV2MLP(hidden_size=config.hidden_size,
                                     intermediate_size=config.intermediate_size,
                                     hidden_act=config.hidden_act,
                                     quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.routed_scaling_factor = getattr(config, "routed_scaling_factor", 1.0)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0,
                                         "intermediate_tensors": 0, "inputs_embeds": 0})
class AdapMoEDeepseekV2Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", moe: MoEBlocks):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if hasattr(config, "index_topk") or getattr(config, "llama_4_scaling", None) is not None:
            raise AdapMoEConfigError("adapmoe: DeepSeek-V3.2 sparse attention and llama-4 "
                                     "scaling are not supported")
        self.config = config
        self.hidden_size = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: AdapMoEDeepseekV2DecoderLayer(vllm_config, prefix, moe),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)
        # read by stock's load_weights
        self.use_mha = self.layers[self.start_layer].use_mha
        self.is_fused_shared_expert_enabled = False
        self.num_redundant_experts = 0

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return run_decoder(self, input_ids, positions, intermediate_tensors, inputs_embeds, None)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_routed_apart(self, weights, DeepseekV2Model.load_weights,
                                 deepseek_shape(self.config).moe_layers)


class AdapMoEDeepseekV2ForCausalLM(AdapMoECausalLM):
    """``--model-impl adapmoe`` for ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM``."""

    shape_of = staticmethod(deepseek_shape)
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"],
                              "qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]}

    def build_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return AdapMoEDeepseekV2Model(vllm_config=vllm_config, prefix=prefix, moe=self.moe)


class AdapMoEDeepseekV3ForCausalLM(AdapMoEDeepseekV2ForCausalLM):
    pass
