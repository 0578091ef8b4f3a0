"""Mixtral with the AdapMoE block: vLLM's own attention, norms and embeddings, our MoE block.

Mirrors vLLM 0.32's ``model_executor/models/mixtral.py``; the only change is
``block_sparse_moe`` (an ``AdapMoEBlock`` that keeps experts in host memory and computes them
from a per-layer device cache). Compiled like stock (``@support_torch_compile``): the block's
step runs inside the opaque op ``vllm::adapmoe_block`` (``moe_op.py``), everything else is traced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.mixtral import MixtralAttention, MixtralModel
from vllm.platforms import current_platform
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from vllm_adapmoe.config import AdapMoEConfig, AdapMoEConfigError
from vllm_adapmoe.models import mixtral_shape
from vllm_adapmoe.engine.cache import Link
from vllm_adapmoe.metrics import PrometheusExporter
from vllm_adapmoe.models import kernels  # noqa: F401  (registers vLLM's fused MoE kernels)
from vllm_adapmoe.models.moe_op import StepDescriber, register_blocks
from vllm_adapmoe.engine.block import AdapMoEBlock, StepInfo

logger = logging.getLogger("vllm.adapmoe")  # child of "vllm": uses its handlers


class AdapMoEMixtralDecoderLayer(nn.Module):
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

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.block_sparse_moe(hidden_states), residual


# Same dynamic dims as stock infers from its annotations (ours are strings: future annotations).
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0,
                                         "intermediate_tensors": 0, "inputs_embeds": 0})
class AdapMoEMixtralModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.adapmoe = adapmoe = AdapMoEConfig.from_additional_config(vllm_config.additional_config)
        self.step = StepInfo()
        self.step.describe = StepDescriber(self.step)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        dtype = vllm_config.model_config.dtype
        shape = mixtral_shape(config)
        slots = adapmoe.slots_per_layer(shape.num_layers, shape.num_experts,
                                        shape.expert_bytes(dtype.itemsize), config, shape.top_k)
        sensitivity = adapmoe.sensitivities(shape.num_layers, config)
        device = torch.device(current_platform.device_type)
        self.link = Link(device, adapmoe.link_gbps)

        def layer(prefix: str) -> AdapMoEMixtralDecoderLayer:
            idx = int(prefix.rsplit(".", 1)[1])
            moe = AdapMoEBlock(
                layer_idx=idx, num_experts=config.num_local_experts,
                top_k=config.num_experts_per_tok, hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_slots=slots[idx],
                config=adapmoe, step=self.step, sensitivity=sensitivity[idx], link=self.link,
                gate=GateLinear(config.hidden_size, config.num_local_experts, params_dtype=dtype,
                                prefix=f"{prefix}.block_sparse_moe.gate"),
                device=device, params_dtype=dtype, prefix=f"{prefix}.block_sparse_moe")
            return AdapMoEMixtralDecoderLayer(config, vllm_config.cache_config,
                                              vllm_config.quant_config, prefix, moe)

        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, layer, prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        blocks = self.moe_blocks()
        for i, block in enumerate(blocks):
            block.next_blocks = blocks[i + 1:i + 1 + adapmoe.prefetch_lookahead]
        blocks[-1].last = True
        register_blocks(vllm_config, blocks)
        exporter = PrometheusExporter.if_enabled([b.stats for b in blocks])
        self.step.on_step_end = exporter.sync if exporter is not None else None
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def moe_blocks(self) -> list[AdapMoEBlock]:
        return [layer.block_sparse_moe for layer in self.layers[self.start_layer:self.end_layer]]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in self.layers[self.start_layer:self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = AutoWeightsLoader(self).load_weights(weights, mapper=MixtralModel.hf_to_vllm_mapper)
        for block in self.moe_blocks():
            block.check_loaded()
        return loaded


class AdapMoEMixtralForCausalLM(nn.Module, SupportsPP):
    """``--model-impl adapmoe`` for ``MixtralForCausalLM`` checkpoints."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if get_tensor_model_parallel_world_size() != 1:
            raise AdapMoEConfigError(
                "adapmoe: tensor parallelism is not supported yet; run with tensor_parallel_size=1")
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = AdapMoEMixtralModel(vllm_config=vllm_config,
                                         prefix=maybe_prefix(prefix, "model"))
        self.adapmoe = self.model.adapmoe
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        blocks = self.model.moe_blocks()
        logger.info(
            "AdapMoE active: %s with %d MoE layers x %d experts (top-%d); device slots per layer "
            "%s (%s kernel, %s eviction%s%s%s)", type(self).__name__, len(blocks),
            config.num_local_experts, config.num_experts_per_tok,
            [b.cache.num_slots for b in blocks], blocks[0].kernel.name, self.adapmoe.eviction,
            f", emulated link {self.adapmoe.link_gbps} GB/s" if self.adapmoe.link_gbps else "",
            f", gating T={self.adapmoe.threshold}" if self.adapmoe.threshold else "",
            f", prefetch {self.adapmoe.prefetch_lookahead} layer(s) ahead" if self.adapmoe.prefetch else "")

    def moe_blocks(self) -> list[AdapMoEBlock]:
        return self.model.moe_blocks()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)
