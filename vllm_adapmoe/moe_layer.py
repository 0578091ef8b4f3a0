"""The AdapMoE MoE block: route → make resident → compute on slots → combine.

Architecture-agnostic: a router (``gate``), ``num_experts`` SwiGLU experts given as gate/up/down
weights, softmax top-k with renormalisation. Per-architecture model files build one block per
MoE layer and feed it checkpoint weights through ``load_weights``.

One step through one layer, top to bottom (``forward``):
  1. router logits → top-k experts and weights per token (same ops as stock vLLM), then
     adaptive gating (``gating.py``) may drop trailing experts of some tokens;
  2. distinct experts needed this step → hits/misses;
  3. waves: if every needed expert fits in the slots, one wave; otherwise tokens are grouped so
     each wave's experts fit (a token's experts always travel together: the fused kernel sums a
     token's experts internally, and splitting that sum would change the rounding);
  4. per wave: book slots for its misses and queue their copies; (first wave) guess the next
     layer's experts and queue those too (``prefetch.py``); compute the tokens whose experts
     have landed while the copies run; wait; compute the rest — always by remapping expert ids
     → slot ids and running the kernel once on the slot tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vllm_adapmoe.config import AdapMoEConfig
from vllm_adapmoe.expert_cache import ExpertCache, Link
from vllm_adapmoe.expert_kernels import make_kernel
from vllm_adapmoe.expert_store import HostExpertStore
from vllm_adapmoe.gating import AdaptiveGate
from vllm_adapmoe.metrics import LayerStats
from vllm_adapmoe.prefetch import predicted_expert_sets, select_prefetch
from vllm_adapmoe.trace import TraceRecorder

_EXPERT_WEIGHTS = {"w1": "w1", "w2": "w2", "w3": "w3",
                   "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


@dataclass
class StepInfo:
    """What the model knows about the current forward pass, shared by all its MoE blocks."""

    decode_tokens: int = 0
    decode_mask: torch.Tensor | None = None  # [T] True for decode tokens (query length 1)
    counted: bool = False  # False for vLLM's dummy/profiling runs: they do not touch the stats
    trace: TraceRecorder | None = None  # set while a routing trace is being recorded
    # Set by the model: refreshes the fields above at the first block of each forward pass
    # (the model's own Python forward does not run per step once vLLM compiles it).
    describe: Callable[[int], None] | None = None
    # Set by the model: called by its last block after a counted step (e.g. export counters).
    on_step_end: Callable[[], None] | None = None


class AdapMoEBlock(nn.Module):
    def __init__(self, *, layer_idx: int, num_experts: int, top_k: int, hidden_size: int,
                 intermediate_size: int, num_slots: int, config: AdapMoEConfig, step: StepInfo,
                 sensitivity: float = 0.0, link: Link | None = None,
                 params_dtype: torch.dtype | None = None, prefix: str = "") -> None:
        from vllm.model_executor.layers.fused_moe import GateLinear
        from vllm.platforms import current_platform

        super().__init__()
        dtype = params_dtype or torch.get_default_dtype()
        device = torch.device(current_platform.device_type)
        self.layer_idx = layer_idx
        self.num_experts, self.top_k, self.hidden_size = num_experts, top_k, hidden_size
        self.step = step
        self.gate = GateLinear(hidden_size, num_experts, params_dtype=params_dtype,
                               prefix=f"{prefix}.gate")
        self.kernel = make_kernel(config.kernel, device, dtype, hidden_size, intermediate_size)
        self.store = HostExpertStore(num_experts, hidden_size, intermediate_size,
                                     self.kernel.padded_intermediate(intermediate_size), dtype,
                                     self.kernel.pack, pin=device.type == "cuda")
        self.gating = AdaptiveGate(config.threshold, sensitivity, config.gate_prefill)
        self.stats = LayerStats()
        # A token's top-k experts must be co-resident for one kernel call: below top_k slots the
        # extra rows act as staging (documented in README) and are counted in `slots`.
        self.cache = ExpertCache(self.store, max(num_slots, top_k), device, config.eviction,
                                 self.stats, link)
        self.prefetch_enabled = config.prefetch
        self.next_blocks: list[AdapMoEBlock] = []  # the look-ahead layers, wired by the model
        self.last = False  # the model's last MoE block (ends the step), wired by the model
        self.name = prefix
        # Set by the vLLM side: calls this block through the opaque op the compiled graph keeps.
        self.call_op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    # -- weights ----------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names relative to the block: ``gate.weight``, ``experts.E.w{1,2,3}.weight``."""
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "gate.weight":
                self.gate.weight_loader(self.gate.weight, tensor)
                loaded.add(name)
                continue
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "experts" or parts[2] not in _EXPERT_WEIGHTS:
                raise ValueError(f"adapmoe: unexpected MoE weight {name!r} in the checkpoint")
            self.store.put(int(parts[1]), _EXPERT_WEIGHTS[parts[2]], tensor)
        if self.store.complete and not self.cache.slot_of:
            self.cache.warm(range(self.num_experts))
        return loaded

    def check_loaded(self) -> None:
        if not self.store.complete:
            raise ValueError(f"adapmoe: layer {self.layer_idx} is missing experts "
                             f"{self.store.missing()} in the checkpoint")

    # -- the step -----------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The router GEMM (traceable, in the compiled graph as in stock), then the step."""
        orig_shape = hidden_states.shape
        x = hidden_states.view(-1, self.hidden_size)
        router_logits, _ = self.gate(x)
        if self.call_op is not None and torch.compiler.is_compiling():
            out = self.call_op(x, router_logits)  # opaque to the compiler; runs forward_impl
        else:
            out = self.forward_impl(x, router_logits)
        return out.view(orig_shape)

    def forward_impl(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """One step through this layer: ``x`` [T, H], ``router_logits`` [T, E] → [T, H]."""
        if self.step.describe is not None:
            self.step.describe(x.shape[0])
        weights, ids = route(router_logits, self.top_k)
        if self.step.trace is not None and self.step.counted:
            self.step.trace.record(self.layer_idx, ids, weights, self.step.decode_mask)
        routing = (Routing.gated(ids, weights, self.gating, self.step.decode_mask)
                   if self.gating.active else Routing(ids, weights))
        expert_sets = routing.expert_sets
        needed = [e for e in expert_sets.unique().tolist() if e >= 0]
        if self.step.counted:
            self._count(routing, needed)

        out = torch.empty_like(x)
        waves = plan_waves(expert_sets, needed, self.cache.num_slots, self.cache.slot_of)
        for i, (rows, experts) in enumerate(waves):
            rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
            pending = self.cache.start_loads(experts)
            if i == 0:  # our own first loads go on the link first, then the guesses for l+1
                self._prefetch_next(x)
            ready = [e for e in experts if self.cache.ready(e)]
            if pending and ready:  # compute the tokens whose experts have landed meanwhile
                sets = expert_sets[rows]
                hit = (torch.isin(sets, torch.tensor(ready, device=x.device)) | (sets < 0)).all(1)
                self._compute(out, x, routing, rows[hit])
                rows = rows[~hit]
            self.cache.wait(pending)
            self._compute(out, x, routing, rows)
        if self.last and self.step.counted and self.step.on_step_end is not None:
            self.step.on_step_end()
        return out

    def _prefetch_next(self, x: torch.Tensor) -> None:
        """Apply the next layers' routers to this layer's input; book their decode tokens'
        experts. Also records the raw next-layer prediction when a trace is on."""
        tracing = self.step.trace is not None
        if not self.step.counted or not self.next_blocks or not (self.prefetch_enabled or tracing):
            return
        decode = self.step.decode_mask[: x.shape[0]]
        for depth, target in enumerate(self.next_blocks):
            if depth > 0 and not self.prefetch_enabled:
                break
            # the router on all rows, then the decode rows: same GEMM shape as the real routing
            weights, ids = route(target.gate(x)[0], target.top_k)
            if tracing and depth == 0:
                self.step.trace.record_prediction(target.layer_idx, weights, ids)
            if self.prefetch_enabled and bool(decode.any()):
                sets = predicted_expert_sets(weights[decode], ids[decode], target.gating)
                target.cache.prefetch(select_prefetch(sets, target.cache.num_slots))

    def _compute(self, out: torch.Tensor, x: torch.Tensor, routing: Routing,
                 rows: torch.Tensor) -> None:
        """Run the kernel for ``rows`` (all their experts resident) on the slot tensors."""
        for sub, ids, weights in routing.groups(rows) if rows.numel() else ():
            self.stats.waves += self.step.counted
            slot_ids = self.cache.slot_map[ids]
            if sub.numel() == x.shape[0]:
                self.kernel(out, x, self.cache.w13, self.cache.w2, weights, slot_ids)
                continue
            part = torch.empty((sub.numel(), self.hidden_size), dtype=x.dtype, device=x.device)
            self.kernel(part, x[sub], self.cache.w13, self.cache.w2, weights, slot_ids)
            out[sub] = part

    def _count(self, routing: Routing, needed: list[int]) -> None:
        count_routing(self.stats, routing, self.step.decode_tokens)
        self.cache.count_step(needed)

    def stats_dict(self) -> dict[str, float]:
        return {"layer": self.layer_idx, "slots": self.cache.num_slots,
                "expert_bytes": self.store.expert_bytes, "slot_bytes": self.cache.device_bytes,
                **self.stats.as_dict()}


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k with renormalisation, exactly as vLLM's CPU router computes it."""
    logits, ids = torch.topk(router_logits, k=top_k, dim=-1, sorted=False)
    weights = torch.softmax(logits, dim=-1)
    return weights.to(torch.float32), ids.to(torch.int32)


@dataclass
class Routing:
    """One step's routing for one layer, after adaptive gating.

    Tokens that keep all top-k experts use ``ids``/``weights`` in the router's own order (so
    the kernel sums them exactly as stock does); gated tokens use the leading ``keep`` experts
    of the weight-sorted order, with weights renormalised.
    """

    ids: torch.Tensor                       # [T, k] int32, router order
    weights: torch.Tensor                   # [T, k] float32
    keep: torch.Tensor | None = None        # [T] experts kept per token; None = all k
    sorted_ids: torch.Tensor | None = None  # [T, k] by descending weight (gated steps only)
    sorted_weights: torch.Tensor | None = None

    @classmethod
    def gated(cls, ids: torch.Tensor, weights: torch.Tensor, gate: AdaptiveGate,
              decode_mask: torch.Tensor | None) -> Routing:
        sorted_weights, order = weights.sort(dim=1, descending=True)
        keep = gate.experts_per_token(sorted_weights, decode_mask)
        if bool((keep == ids.shape[1]).all()):
            return cls(ids, weights)
        return cls(ids, weights, keep, ids.gather(1, order), sorted_weights)

    @property
    def expert_sets(self) -> torch.Tensor:
        """[T, k] experts each token needs, −1 where gating dropped one (for planning only)."""
        if self.keep is None:
            return self.ids
        dropped = torch.arange(self.ids.shape[1], device=self.ids.device) >= self.keep[:, None]
        return self.sorted_ids.masked_fill(dropped, -1)

    def activated(self) -> int:
        return self.ids.numel() if self.keep is None else int(self.keep.sum())

    def single_expert_tokens(self) -> int:
        if self.keep is None:
            return self.ids.shape[0] if self.ids.shape[1] == 1 else 0
        return int((self.keep == 1).sum())

    def groups(self, rows: torch.Tensor):
        """(rows, ids, weights) per distinct number of kept experts among ``rows``."""
        k = self.ids.shape[1]
        if self.keep is None:
            yield rows, self.ids[rows], self.weights[rows]
            return
        keep = self.keep[rows]
        for n in keep.unique().tolist():
            sub = rows[keep == n]
            if n == k:
                yield sub, self.ids[sub], self.weights[sub]
            else:
                w = self.sorted_weights[sub, :n]
                yield sub, self.sorted_ids[sub, :n].contiguous(), w / w.sum(1, keepdim=True)


def count_routing(stats: LayerStats, routing: Routing, decode_tokens: int) -> None:
    """One step's token counters for a layer (the simulator calls this too, so replays match)."""
    stats.steps += 1
    stats.tokens += routing.ids.shape[0]
    stats.decode_tokens += decode_tokens
    stats.activated_experts += routing.activated()
    stats.top1_tokens += routing.single_expert_tokens()


def plan_waves(expert_sets: torch.Tensor, needed: list[int], capacity: int,
               resident: dict[int, int]) -> list[tuple[torch.Tensor | None, list[int]]]:
    """Group tokens into waves whose experts fit in ``capacity`` slots.

    ``expert_sets`` is [T, k] with −1 for experts gating dropped.
    Returns ``[(token_rows or None for all tokens, experts)]``. Resident experts come first in
    each wave (hits before loads); tokens sharing an expert set are kept together. Greedy: the
    expert-set groups that overlap most with what is resident, then the most common, join a wave
    while its union still fits.
    """
    if len(needed) <= capacity:
        return [(None, sorted(needed, key=lambda e: e not in resident))]
    sets, inverse = torch.unique(expert_sets.sort(dim=1).values, dim=0, return_inverse=True)
    counts = torch.bincount(inverse, minlength=sets.shape[0]).tolist()
    groups = [set(row) - {-1} for row in sets.tolist()]
    remaining = list(range(len(groups)))
    present = set(resident)
    waves: list[tuple[torch.Tensor | None, list[int]]] = []
    while remaining:
        remaining.sort(key=lambda g: (-len(groups[g] & present), -counts[g]))
        wave: set[int] = set()
        chosen = []
        for g in remaining:
            if len(wave | groups[g]) <= capacity:
                wave |= groups[g]
                chosen.append(g)
        remaining = [g for g in remaining if g not in set(chosen)]
        rows = torch.isin(inverse, torch.tensor(chosen, device=inverse.device)).nonzero().squeeze(1)
        waves.append((rows, sorted(wave, key=lambda e: e not in present)))
        present = wave
    return waves
