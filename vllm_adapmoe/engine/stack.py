"""A stack of offloaded MoE layers without a model around them: what a model does with its blocks
(one link, one per-step description, look-ahead wiring), with torch alone.

Used by ``benchmarks/bench_engine.py`` and the engine tests: layer l's output plus its input is
layer l+1's input (a residual stream without attention or norms), routing either from each
layer's own router or given per step (replayed traces).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm_adapmoe.engine.block import AdapMoEBlock
from vllm_adapmoe.engine.emulation import Emulation, make_emulation
from vllm_adapmoe.engine.link import Link
from vllm_adapmoe.engine.settings import EngineSettings
from vllm_adapmoe.engine.plan import never_loads
from vllm_adapmoe.engine.staging import StagingArea
from vllm_adapmoe.engine.stats import summarise
from vllm_adapmoe.engine.step import StepInfo
from vllm_adapmoe.engine.store import HostExpertStore


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    intermediate: int
    experts: int
    top_k: int

    def expert_bytes(self, itemsize: int) -> int:
        return 3 * self.hidden * self.intermediate * itemsize


class ReplayRouter(nn.Module):
    """A router whose logits are set from outside (a replayed trace) instead of computed:
    ``logits`` [T, E] is returned for any input of T rows or fewer (the look-ahead of the layer
    before calls it on the same decode rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            raise RuntimeError("ReplayRouter: set .logits before the step")
        return self.logits[: x.shape[0]]


class ExpertStack:
    def __init__(self, shape: LayerShape, slots: list[int], settings: EngineSettings,
                 device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 sensitivity: list[float] | None = None, routers: list[nn.Module] | None = None,
                 stores: list[HostExpertStore] | None = None,
                 emulation: Emulation | None = None,
                 placement: list[list[int]] | None = None) -> None:
        """``emulation``: an ``emulate`` preset's, shared with other stacks so that they run on
        one measured scale (else one is made from ``settings.emulate`` and measured here).
        ``placement``: per layer, the experts its slots are filled with first."""
        self.shape, self.device, self.dtype = shape, device, dtype
        self.step_info = StepInfo(counted=True)
        if emulation is None:
            emulation = make_emulation(settings.emulate, shape.expert_bytes(dtype.itemsize),
                                       shape.hidden, shape.intermediate, settings.emulate_scale)
        self.link = Link(device, settings.link_gbps, settings.link_layers, emulation,
                         settings.copy_timeout_s)
        self.staging = StagingArea.for_plan(slots, shape.top_k,
                                            loads=not never_loads(settings.hybrid),
                                            prefill_rows=settings.prefill_rows,
                                            num_experts=shape.experts)
        sensitivity = sensitivity or [0.0] * len(slots)
        routers = routers or [nn.Linear(shape.hidden, shape.experts, bias=False, device=device,
                                        dtype=dtype) for _ in slots]
        self.blocks = [
            AdapMoEBlock(layer_idx=i, num_experts=shape.experts, top_k=shape.top_k,
                         hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_slots=n, settings=settings, step=self.step_info, gate=routers[i],
                         device=device, sensitivity=sensitivity[i], link=self.link,
                         params_dtype=dtype, prefix=f"layers.{i}",
                         store=stores[i] if stores else None, staging=self.staging)
            for i, n in enumerate(slots)]
        for block, order in zip(self.blocks, placement or []):
            block.placement = order
        if stores:  # filled already: warm the slots as at start-up
            for block in self.blocks:
                block.warm()
        for i, block in enumerate(self.blocks):
            block.lookahead.targets = self.blocks[i + 1:i + 1 + settings.prefetch_lookahead]
        self.blocks[-1].last = True

    def load_random(self, seed: int = 0, progress: bool = False) -> None:
        """Random experts (scaled so the residual stream stays bounded), straight into the host
        stores; then the slots are warmed as at start-up."""
        generator = torch.Generator().manual_seed(seed)
        h, i = self.shape.hidden, self.shape.intermediate
        items = [(b, e) for b in self.blocks for e in range(self.shape.experts)]
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc="random experts", unit="expert")
        for block, e in items:
            for name, rows, cols in (("w1", i, h), ("w3", i, h), ("w2", h, i)):
                w = torch.randn(rows, cols, generator=generator).mul_(cols ** -0.5)
                block.store.put(e, name, w.to(self.dtype))
        for block in self.blocks:
            block.check_loaded()
            block.warm()

    def decode_step(self, x: torch.Tensor,
                    router_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One decode step of ``x`` [T, H] through every layer; ``router_logits`` (one [T, E] per
        layer) replaces the routers' own output when given."""
        info = self.step_info
        info.decode_tokens, info.all_decode, info.decode_mask, info.decode_rows = \
            x.shape[0], True, None, None
        return self._through_layers(x, router_logits)

    def prompt_step(self, x: torch.Tensor,
                    router_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One step of ``x`` [T, H] prompt tokens (a prefill chunk) through every layer."""
        info = self.step_info
        info.decode_tokens, info.all_decode, info.decode_rows = 0, False, None
        info.decode_mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return self._through_layers(x, router_logits)

    def _through_layers(self, x: torch.Tensor,
                        router_logits: list[torch.Tensor] | None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            logits = block.router_logits(x) if router_logits is None else router_logits[i]
            x = x + block.forward_impl(x, logits)
        return x

    def forget_residency(self) -> None:
        """Every layer forgets what its slots hold (the layer-streaming baseline)."""
        for block in self.blocks:
            block.cache.table.clear()

    def stats(self) -> dict:
        return summarise([b.stats_dict() for b in self.blocks])

    def reset_stats(self) -> None:
        for block in self.blocks:
            block.stats.reset()

    def device_bytes(self) -> int:
        """Every layer's own slots plus the shared staging rows."""
        staging = self.staging.device_bytes if self.staging else 0
        return staging + sum(b.cache.device_bytes for b in self.blocks)
