"""What every ``--model-impl adapmoe`` model shares, so the per-family files stay thin.

* ``MoEBlocks``: the model's AdapMoE blocks, one per MoE layer and numbered among MoE layers only
  (dense layers have no block): slot budget, gating sensitivities, the shared step and link, and
  the wiring once the layers exist (prefetch targets, op registration, metrics).
* ``SharedExpertsMoE``: routed experts (offloaded, our block) plus shared experts (vLLM's own
  dense MLP, always resident), combined as stock's MoE runner does: ``shared + routed``;
  ``with_shared_experts`` builds it (or the bare block) for the DeepSeek-style families.
* ``load_routed_apart``: stock's own model loader for every weight except the MoE layers'
  routers and routed experts, which go to our blocks (the DeepSeek-style families).
* ``AdapMoECausalLM``: the causal-LM shell (lm_head, logits, weight loading, start-up log line);
  a family subclass says how to read its MoE shape and how to build its decoder stack.
* ``PreNormDecoderLayer`` / ``run_decoder``: the pre-norm decoder layer's forward and the decoder
  stack's forward (embeddings, pipeline-parallel hand-over, final norm) that vLLM's Mixtral,
  Qwen-MoE, OLMoE and DeepSeek files each write out; the family files share them.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, extract_layer_index, maybe_prefix
from vllm.distributed.utils import get_pp_indices
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from vllm_adapmoe.config import AdapMoEConfig, AdapMoEConfigError
from vllm_adapmoe.engine.block import AdapMoEBlock
from vllm_adapmoe.engine.emulation import make_emulation
from vllm_adapmoe.engine.link import Link
from vllm_adapmoe.engine.plan import never_loads
from vllm_adapmoe.engine.step import StepInfo
from vllm_adapmoe.engine.staging import StagingArea
from vllm_adapmoe.engine.routing import RouterSpec
from vllm_adapmoe.traffic import TrafficWriter
from vllm_adapmoe.metrics import PrometheusExporter, SnapshotWriter, make_exporter
from vllm_adapmoe.models import MoEShape
from vllm_adapmoe import cpu_features
from vllm_adapmoe.models import kernels  # noqa: F401  (registers vLLM's fused MoE kernels)
from vllm_adapmoe.models.moe_op import StepDescriber, register_blocks

logger = logging.getLogger("vllm.adapmoe")  # child of "vllm": uses its handlers


class MoEBlocks:
    """The AdapMoE blocks of one model. Build with ``block(prefix, gate, router)`` while the
    decoder layers are made, then call ``wire`` once."""

    def __init__(self, vllm_config: VllmConfig, shape: MoEShape) -> None:
        hf_config = vllm_config.model_config.hf_config
        self.config = config = AdapMoEConfig.from_additional_config(vllm_config.additional_config)
        self.shape = shape = config.stored_shape(shape)  # experts as held: maybe quantized at load
        self.settings = config.engine_settings()
        self.dtype = vllm_config.model_config.dtype
        # Tensor parallel: each rank caches its shard of every expert; budgets are per rank.
        self.shard = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
        self.slots = config.slots_per_layer(shape.num_layers, shape.num_experts,
                                            shape.expert_bytes(self.dtype.itemsize) // self.shard[1],
                                            hf_config, shape.top_k, current_platform.device_type)
        self.sensitivity = config.sensitivities(shape.num_layers, hf_config)
        self.device = torch.device(current_platform.device_type)
        rank_expert_bytes = shape.expert_bytes(self.dtype.itemsize) // self.shard[1]
        self.link = Link(self.device, config.link_gbps, config.link_layers,
                         make_emulation(config.emulate, rank_expert_bytes, shape.hidden_size,
                                        shape.intermediate_size // self.shard[1],
                                        config.emulate_scale),
                         config.copy_timeout_s)
        self.placement = config.placement(shape.num_layers, hf_config)
        # shared by this pipeline stage's layers (the ones this process builds)
        pp = get_pp_group()
        start, end = get_pp_indices(hf_config.num_hidden_layers, pp.rank_in_group, pp.world_size)
        self.staging = StagingArea.for_plan(
            self.slots, shape.top_k, [i for i, d in enumerate(shape.moe_layers) if start <= d < end],
            loads=not never_loads(config.hybrid), prefill_rows=config.prefill_rows,
            num_experts=shape.num_experts)
        self.step = StepInfo()
        self.step.describe = StepDescriber(self.step)
        self.blocks: list[AdapMoEBlock] = []
        self.exporter: PrometheusExporter | SnapshotWriter | None = None

    def block(self, prefix: str, gate: nn.Module, router: RouterSpec | None = None) -> AdapMoEBlock:
        """The block at ``prefix`` (``model.layers.N.mlp``); ``gate`` is the family's router layer."""
        moe_idx = self.shape.moe_index(extract_layer_index(prefix))
        shape = self.shape
        block = AdapMoEBlock(
            layer_idx=moe_idx, num_experts=shape.num_experts, top_k=shape.top_k,
            hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_slots=self.slots[moe_idx], settings=self.settings, step=self.step,
            sensitivity=self.sensitivity[moe_idx], link=self.link, gate=gate, device=self.device,
            params_dtype=self.dtype, prefix=prefix, router=router, shard=self.shard,
            staging=self.staging, expert_format=shape.expert_format)
        if self.placement is not None:
            block.placement = self.placement[moe_idx]
        if self.shard[1] > 1:
            block.reduce = tensor_model_parallel_all_reduce
        self.blocks.append(block)
        return block

    def wire(self, vllm_config: VllmConfig) -> None:
        """Once every layer exists: look-ahead targets (and the profile's fitted predictors for
        them), the step's last block, the op's name lookup, and the Prometheus export."""
        if not self.blocks:
            raise AdapMoEConfigError("adapmoe: this model (stage) has no MoE layer")
        self.blocks.sort(key=lambda b: b.layer_idx)
        ahead = self.config.prefetch_lookahead
        fitted = self.config.predictor_maps(vllm_config.model_config.hf_config)
        for i, block in enumerate(self.blocks):
            block.lookahead.targets = self.blocks[i + 1:i + 1 + ahead]
            for depth, target in enumerate(block.lookahead.targets, 1):
                if (target.layer_idx, depth) in fitted:
                    block.set_lookahead_map(depth, fitted[target.layer_idx, depth])
        self.blocks[-1].last = True
        register_blocks(vllm_config, self.blocks)
        self.exporter = make_exporter([b.stats for b in self.blocks],
                                      [b.layer_idx for b in self.blocks], self.shard[0])
        # multiprocess mode counts after each step; snapshots are written off the decode path;
        # the expert-aware scheduler reads every step's expert traffic (first TP rank's)
        after = []
        if isinstance(self.exporter, PrometheusExporter):
            after.append(self.exporter.sync)
        if self.config.scheduling == "expert-aware" and self.shard[0] == 0:
            # a stage's file is named by its first MoE layer
            after.append(TrafficWriter([b.stats for b in self.blocks],
                                       str(self.blocks[0].layer_idx)).write)
        self.step.on_step_end = _in_turn(after) if after else None

    def reset_stats(self) -> None:
        """Zero the counters ``stats()`` reports; /metrics' totals keep everything so far."""
        if isinstance(self.exporter, SnapshotWriter):
            self.exporter.flush()
        for block in self.blocks:
            block.stats.reset()

    def check_loaded(self) -> None:
        for block in self.blocks:
            block.check_loaded()


class PreNormDecoderLayer(nn.Module):
    """Stock's pre-norm decoder-layer forward: (fused add +) RMSNorm, attention, (fused add +)
    RMSNorm, feed-forward; the residual stream travels beside. A subclass builds
    ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and ``mlp``."""

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.feed_forward(hidden_states), residual

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden_states)


def run_decoder(model: nn.Module, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None,
                *layer_args: Any) -> torch.Tensor | IntermediateTensors:
    """Stock's decoder-stack forward for ``model`` (``embed_input_ids``, ``layers`` with
    ``start_layer``/``end_layer``, ``norm``): this pipeline stage's layers, handing the hidden
    states and residual on to the next stage, the final norm on the last. ``layer_args`` are
    passed to every layer after the residual (DeepSeek's layer takes one more)."""
    if get_pp_group().is_first_rank:
        hidden_states = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        residual = None
    else:
        hidden_states = intermediate_tensors["hidden_states"]
        residual = intermediate_tensors["residual"]
    for layer in model.layers[model.start_layer:model.end_layer]:
        hidden_states, residual = layer(positions, hidden_states, residual, *layer_args)
    if not get_pp_group().is_last_rank:
        return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
    hidden_states, _ = model.norm(hidden_states, residual)
    return hidden_states


class SharedExpertsMoE(nn.Module):
    """Routed experts (our block, offloaded) + shared experts (stock's module, always resident).

    ``shared`` is (checkpoint name, module) of the shared experts; ``extra`` names further stock
    modules the checkpoint addresses directly (Qwen2-MoE's ``shared_expert_gate``, which its
    shared MLP also holds). Checkpoint names under the MoE module: ``gate.*`` and ``experts.*``
    go to the block, the rest to these modules. ``routed_scale`` multiplies the routed output
    before the sum (DeepSeek's ``routed_scaling_factor``: vLLM applies it to the output too).
    """

    def __init__(self, routed: AdapMoEBlock, shared: tuple[str, nn.Module],
                 routed_scale: float = 1.0, extra: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.routed = routed
        self.shared_name = shared[0]
        self.add_module(shared[0], shared[1])
        for name, module in (extra or {}).items():
            self.add_module(name, module)
        self.routed_scale = routed_scale
        # Under TP both parts are partial sums (stock builds the shared MLP unreduced): reduce
        # their sum once, as stock's runner does, instead of the routed part alone.
        self.reduce, routed.reduce = routed.reduce, None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shared = getattr(self, self.shared_name)(hidden_states)
        routed = self.routed(hidden_states)
        if self.routed_scale != 1.0:
            # as vLLM's runner: in fp16 the shared output is divided instead (overflow; the
            # DeepSeek decoder layer compensates), else the routed output is multiplied
            if routed.dtype == torch.float16:
                shared = shared * (1.0 / self.routed_scale)
            else:
                routed = routed * self.routed_scale
        out = shared + routed
        return self.reduce(out) if self.reduce is not None else out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        routed, rest = [], []
        for name, tensor in weights:
            (routed if name.split(".", 1)[0] in ("gate", "experts") else rest).append((name, tensor))
        loaded = {f"routed.{n}" for n in self.routed.load_weights(routed)}
        return loaded | AutoWeightsLoader(self).load_weights(rest)  # never reaches `routed`


def with_shared_experts(block: AdapMoEBlock, shared: nn.Module | None,
                        routed_scale: float) -> nn.Module:
    """The MoE layer of a DeepSeek-style family: ``block`` alone when the model has no shared
    experts, else block + ``shared`` (named ``shared_experts``, as in its checkpoints)."""
    if shared is None:
        if routed_scale != 1.0:  # stock scales inside its shared-expert runner only
            raise AdapMoEConfigError("adapmoe: routed_scaling_factor without shared experts "
                                     "is not supported")
        return block
    return SharedExpertsMoE(block, ("shared_experts", shared), routed_scale=routed_scale)


def load_routed_apart(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                      stock_load: Callable[[nn.Module, Iterable[tuple[str, torch.Tensor]]], set[str]],
                      moe_layers: Iterable[int], router: str = "gate") -> set[str]:
    """Load ``weights`` into ``model`` (a decoder stack): ``layers.N.mlp.<router>.*`` and
    ``layers.N.mlp.experts.*`` of MoE layers go to that layer's ``mlp`` (our block, whose router
    is ``gate``), all else to ``stock_load`` — stock's own loader run on our modules, so its
    name mapping, stacked parameters and skipped extras (MTP layers) stay stock's. Dense layers'
    ``mlp.gate*`` weights are stock's."""
    routed: dict[int, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    moe = set(moe_layers)
    pattern = re.compile(rf"layers\.(\d+)\.mlp\.(?:{router}\.(.+)|(experts\..+))")

    def rest() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            m = pattern.fullmatch(name)
            if m and int(m[1]) in moe:
                routed[int(m[1])].append((f"gate.{m[2]}" if m[2] else m[3], tensor))
            else:
                yield name, tensor

    loaded = stock_load(model, rest())  # consumes `weights`, filling `routed`
    for idx, layer_weights in routed.items():
        names = model.layers[idx].mlp.load_weights(layer_weights)
        loaded |= {f"layers.{idx}.mlp.{n}" for n in names}
    return loaded


class AdapMoECausalLM(nn.Module, SupportsPP):
    """``--model-impl adapmoe`` shell: a family sets ``shape_of`` and ``build_model``, and
    ``hf_to_vllm_mapper`` when its stock causal-LM class maps checkpoint names."""

    shape_of: Callable[[Any], MoEShape]
    hf_to_vllm_mapper: WeightsMapper | None = None
    # stock's fused modules and their checkpoint shards (attention; Qwen's shared experts and
    # dense MLPs): a quantized checkpoint's ignore list names the shards, vLLM matches the
    # fused layer through this (a key a family lacks matches nothing)
    packed_modules_mapping: dict[str, list[str]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                    "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_text_config
        self.config = config
        self.moe = MoEBlocks(vllm_config, type(self).shape_of(config))
        self.model = self.build_model(vllm_config, maybe_prefix(prefix, "model"))
        self.moe.wire(vllm_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self._log_active()

    def build_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        raise NotImplementedError

    @property
    def step(self) -> StepInfo:
        return self.moe.step

    def moe_blocks(self) -> list[AdapMoEBlock]:
        return self.moe.blocks

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
        self.moe.check_loaded()
        if self.moe.link.emulation is not None:  # its scale is measured once the slots are filled
            logger.info("AdapMoE %s", self.moe.link.emulation.describe())
        return loaded

    def _log_active(self) -> None:
        moe, cfg, shape = self.moe, self.moe.config, self.moe.shape
        dense = len(range(*self._layer_range())) - shape.num_layers
        rank, size = moe.shard
        logger.info(
            "AdapMoE active: %s with %d MoE layers x %d experts (top-%d)%s, experts %s, %.3f MiB "
            "each; device slots per layer "
            "%s%s%s (%s kernel, %s eviction%s%s%s%s%s%s); CPU %s, MoE kernel path: %s",
            type(self).__name__, shape.num_layers,
            shape.num_experts, shape.top_k, f", {dense} dense layers (resident)" if dense else "",
            shape.expert_format.describe(moe.dtype), moe.blocks[0].store.expert_bytes / 2**20,
            [b.cache.own_slots for b in moe.blocks],
            _describe_staging(moe.staging, shape.top_k),
            f" on TP rank {rank} of {size}, each slot 1/{size} of an expert" if size > 1 else "",
            moe.blocks[0].kernel.name, cfg.eviction,
            f", emulated link {cfg.link_gbps} GB/s" if cfg.link_gbps else "",
            f", {moe.link.emulation.describe()}" if moe.link.emulation else "",
            f", hybrid {cfg.hybrid}" if cfg.hybrid != "off" else "",
            ' (plan "dp": whole layers only, since the host store is this CPU\'s own memory)'
            if cfg.hybrid != "off" and cfg.plan == "dp" and cfg.same_memory(moe.device.type)
            else "",
            f", gating T={cfg.threshold}" if cfg.threshold else "",
            _describe_prefetch(cfg.prefetch, cfg.prefetch_lookahead, moe.blocks[0].lookahead.guessing),
            cpu_features.describe_cpu(), getattr(moe.blocks[0].kernel, "path", moe.blocks[0].kernel.name))

    def _layer_range(self) -> tuple[int, int]:
        return self.model.start_layer, self.model.end_layer


def _describe_staging(staging: StagingArea | None, top_k: int) -> str:
    if staging is None:
        return ""
    if not staging.prefill_rows:
        return f" + {staging.rows} staging row(s) shared by the layers below top-{top_k}"
    return (f" + {staging.rows} staging row(s) shared by the layers that load "
            f"({staging.prefill_rows} of them prefill_rows)")


def _describe_prefetch(prefetch: bool, lookahead: int, guessing: bool) -> str:
    if not prefetch:
        return ""
    if not guessing:
        return (", prefetch off here: copies are inline memcpys on the computing cores, so no "
                "guess can hide one (pin link_layers to prefetch anyway)")
    return f", prefetch {lookahead} layer(s) ahead"


def _in_turn(calls: list[Callable[[], None]]) -> Callable[[], None]:
    if len(calls) == 1:
        return calls[0]

    def each() -> None:
        for call in calls:
            call()
    return each
