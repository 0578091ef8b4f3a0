"""The AdapMoE MoE block: route → make resident → compute on slots → combine.

Architecture-agnostic: a router (``gate``), ``num_experts`` SwiGLU experts given as gate/up/down
weights, and the family's routing rule (``routing.py``: softmax top-k with or without
renormalisation, DeepSeek's grouped top-k). Per-architecture model files build one block per
MoE layer (numbered among MoE layers only) and feed it checkpoint weights through
``load_weights``; shared experts and dense layers stay with the model file.

One step through one layer, top to bottom (``forward``):
  1. (``prepare``, plain tensor math that vLLM compiles into its graph) router logits → top-k
     experts and weights per token (same ops as stock vLLM); adaptive gating (``gating.py``)
     may drop trailing experts of some tokens; tokens per needed expert; the next layers'
     routers on this input → their predicted experts;
  2. (``run_step``, the rest, behind the opaque op) one copy of that summary to the host →
     distinct experts needed this step → hits/misses;
  3. waves: if every needed expert fits in the slots, one wave; otherwise tokens are grouped so
     each wave's experts fit (a token's experts always travel together: the fused kernel sums a
     token's experts internally, and splitting that sum would change the rounding);
  4. per wave: book slots for its misses and queue their copies; (first wave) guess the next
     layer's experts and queue those too (``prefetch.py``); compute the tokens whose experts
     have landed while the copies run; wait; compute the rest — always by remapping expert ids
     → slot ids and running the kernel once on the slot tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from vllm_adapmoe.config import AdapMoEConfig
from vllm_adapmoe.engine.cache import ExpertCache, Link
from vllm_adapmoe.engine.kernels import make_kernel
from vllm_adapmoe.engine.store import HostExpertStore
from vllm_adapmoe.engine.gating import AdaptiveGate
from vllm_adapmoe.engine.stats import LayerStats
from vllm_adapmoe.engine.prefetch import (PredictionScore, expert_counts, expert_mass,
                                          predicted_expert_sets, worth_prefetching)
from vllm_adapmoe.engine.routing import RouterSpec
from vllm_adapmoe.engine.staging import StagingArea

_EXPERT_WEIGHTS = {"w1": "w1", "w2": "w2", "w3": "w3",
                   "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


class RoutingRecorder(Protocol):
    """Records routing while a trace is taken (``offline/trace.py``'s ``TraceRecorder``)."""

    def begin_step(self, query_lens: torch.Tensor) -> None: ...

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor,
               decode_mask: torch.Tensor | None) -> None: ...

    def record_prediction(self, layer: int, weights: torch.Tensor, ids: torch.Tensor,
                          depth: int = 1) -> None: ...


# ``AdapMoEBlock.prepare``'s output: weights, ids, gated weights, gated ids, keep, summary,
# predicted sets (see there); the op's tensor arguments, in this order.
Prepared = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None",
                 torch.Tensor, torch.Tensor]


@dataclass
class StepInfo:
    """What the model knows about the current forward pass, shared by all its MoE blocks."""

    decode_tokens: int = 0
    decode_mask: torch.Tensor | None = None  # [T] True for decode tokens (query length 1)
    all_decode: bool = False  # every token of the step is a decode token
    decode_rows: torch.Tensor | None = None  # indices of the decode tokens (first use per step)
    counted: bool = False  # False for vLLM's dummy/profiling runs: they do not touch the stats
    trace: RoutingRecorder | None = None  # set while a routing trace is being recorded
    # Set by the model: refreshes the fields above at the first block of each forward pass
    # (the model's own Python forward does not run per step once vLLM compiles it).
    describe: Callable[[int], None] | None = None
    # Set by the model: called by its last block after a counted step (e.g. export counters).
    on_step_end: Callable[[], None] | None = None


class AdapMoEBlock(nn.Module):
    """One MoE layer whose experts live in host memory and are computed from device slots.

    ``gate`` is the router (any module mapping [T, H] → [T, E] logits, or a tuple whose first
    item is that, as vLLM's ``GateLinear``); the serving stack provides it so the router GEMM
    is computed exactly as in its stock model; a ``gate.e_score_correction_bias`` tensor (DeepSeek-V3)
    is used by grouped routing. ``router`` is the family's routing rule (default: softmax top-k,
    renormalised, as Mixtral). ``device`` is where slots and compute live.

    ``shard`` = (rank, size) for tensor parallelism: this block keeps, loads and caches only its
    rank's slice of every expert (gate/up rows, down columns: vLLM's split of ``w13``/``w2``), so
    its output is a partial sum that ``reduce`` (set by the serving stack: the TP all-reduce)
    completes. Routing is computed from the replicated router on every rank, so all ranks make
    the same residency decisions.
    """

    def __init__(self, *, layer_idx: int, num_experts: int, top_k: int, hidden_size: int,
                 intermediate_size: int, num_slots: int, config: AdapMoEConfig, step: StepInfo,
                 gate: nn.Module, device: torch.device, sensitivity: float = 0.0,
                 link: Link | None = None, params_dtype: torch.dtype | None = None,
                 prefix: str = "", store: HostExpertStore | None = None,
                 router: RouterSpec | None = None, shard: tuple[int, int] = (0, 1),
                 staging: StagingArea | None = None) -> None:
        super().__init__()
        rank, size = shard
        if not 0 <= rank < size or intermediate_size % size:
            raise ValueError(f"cannot split intermediate size {intermediate_size} into {size} "
                             f"tensor-parallel shards (rank {rank})")
        self.shard = shard
        intermediate_size //= size  # this rank's slice of every expert
        dtype = params_dtype or torch.get_default_dtype()
        self.router_spec = router or RouterSpec(top_k)
        if self.router_spec.top_k != top_k:
            raise ValueError(f"router top_k {self.router_spec.top_k} != block top_k {top_k}")
        self.layer_idx = layer_idx
        self.num_experts, self.top_k, self.hidden_size = num_experts, top_k, hidden_size
        self.step = step
        self.gate = gate
        self.kernel = make_kernel(config.kernel, device, dtype, hidden_size, intermediate_size)
        # ``store``: a filled host store shared with another block (benchmarks that compare
        # budgets on the same experts); else an empty one, filled by ``load_weights``.
        self.store = store or HostExpertStore(num_experts, hidden_size, intermediate_size,
                                     self.kernel.padded_intermediate(intermediate_size), dtype,
                                     self.kernel.pack, pin=device.type == "cuda")
        self.gating = AdaptiveGate(config.threshold, sensitivity, config.gate_prefill, device)
        # a buffer, so vLLM's compiled graph reads the gating rule's parameters by reference
        self.register_buffer("gating_params", self.gating.params, persistent=False)
        self.stats = LayerStats()
        # A token's top-k experts must be co-resident for one kernel call: below top_k own slots
        # the rest are loaded into the model's shared ``staging`` rows; without it (a block
        # built on its own) the layer gets top_k slots.
        self.cache = ExpertCache(self.store, num_slots if staging else max(num_slots, top_k),
                                 device, config.eviction, self.stats, link, staging, layer_idx)
        self.prefetch_enabled = config.prefetch
        self.next_blocks: list[AdapMoEBlock] = []  # the look-ahead layers, wired by the model
        self.lookahead_maps: dict[int, torch.Tensor] = {}  # distance → fitted map (set_lookahead_map)
        # How well the layers looking ahead at this one predict it, by distance (1: the layer
        # before), and what they predicted this step (scored when this layer has routed).
        self.prediction_scores: dict[int, PredictionScore] = {}
        self._predicted: dict[int, list[int]] = {}
        self.last = False  # the model's last MoE block (ends the step), wired by the model
        self.name = prefix
        self.clock: PhaseClock | None = None  # set by benchmarks to time the step's phases
        # Set by the vLLM side: calls this block through the opaque op the compiled graph keeps.
        self.call_op: Callable[..., torch.Tensor] | None = None
        # Set by the vLLM side under tensor parallelism: sums the ranks' partial outputs.
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    # -- weights ----------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names relative to the block: ``gate.*`` (router), ``experts.E.<w>.weight``
        with ``<w>`` one of w1/w2/w3 (Mixtral) or gate_proj/down_proj/up_proj (Qwen, OLMoE, DeepSeek)."""
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("gate."):  # router weight (and DeepSeek-V3's correction bias)
                param = getattr(self.gate, name.split(".", 1)[1], None)
                if not isinstance(param, torch.Tensor):
                    raise ValueError(f"adapmoe: unexpected router weight {name!r} in the checkpoint")
                loader = getattr(param, "weight_loader", None)  # vLLM's linear layers
                loader(param, tensor) if loader else param.data.copy_(tensor)
                loaded.add(name)
                continue
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "experts" or parts[2] not in _EXPERT_WEIGHTS:
                raise ValueError(f"adapmoe: unexpected MoE weight {name!r} in the checkpoint")
            which = _EXPERT_WEIGHTS[parts[2]]
            self.store.put(int(parts[1]), which, self._own_shard(which, tensor))
        if self.store.complete and not self.cache.slot_of:
            self.cache.warm(range(self.num_experts))
        return loaded

    def _own_shard(self, which: str, weight: torch.Tensor) -> torch.Tensor:
        """This rank's slice: rows of gate/up (column parallel), columns of down (row parallel)."""
        rank, size = self.shard
        if size == 1:
            return weight
        dim = 1 if which == "w2" else 0
        n = weight.shape[dim] // size
        return weight.narrow(dim, rank * n, n)

    def set_lookahead_map(self, depth: int, fitted: torch.Tensor) -> None:
        """Guess the layer ``depth`` ahead with a fitted map [H + 1, E] (``offline/predictor.py``)
        instead of its router; a buffer, so a compiled graph reads it like a weight."""
        name = f"lookahead_map_{depth}"
        self.register_buffer(name, fitted.to(self.cache.device, torch.float32), persistent=False)
        self.lookahead_maps[depth] = getattr(self, name)

    def lookahead_logits(self, x: torch.Tensor, depth: int, target: AdapMoEBlock) -> torch.Tensor:
        """The guess of ``target``'s router logits (``depth`` layers ahead) from this input."""
        fitted = self.lookahead_maps.get(depth)
        if fitted is None:
            return target.router_logits(x)
        return torch.addmm(fitted[-1], x.to(fitted.dtype), fitted[:-1])

    def check_loaded(self) -> None:
        if not self.store.complete:
            raise ValueError(f"adapmoe: layer {self.layer_idx} is missing experts "
                             f"{self.store.missing()} in the checkpoint")

    # -- the step -----------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The tensor math of the step (``prepare``: in the compiled graph, as stock's router
        is), then the step itself (``run_step``: behind the opaque op when compiled)."""
        orig_shape = hidden_states.shape
        x = hidden_states.view(-1, self.hidden_size)
        prepared = self.prepare(x, self.router_logits(x))
        if self.call_op is not None and torch.compiler.is_compiling():
            out = self.call_op(x, *prepared)  # opaque; runs run_step
        else:
            out = self.run_step(x, *prepared)
        if self.reduce is not None:  # outside the op: traced like stock's all-reduce
            out = self.reduce(out)
        return out.view(orig_shape)

    def forward_impl(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """One eager step of ``x`` [T, H] from given router logits [T, E] (the engine's stack,
        benchmarks and tests feed replayed routing this way)."""
        return self.run_step(x, *self.prepare(x, router_logits))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        return logits[0] if isinstance(logits, tuple) else logits

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] float32, ids [T, k] int32) by this family's routing rule."""
        return self.router_spec.route(router_logits,
                                      getattr(self.gate, "e_score_correction_bias", None))

    def prepare(self, x: torch.Tensor, router_logits: torch.Tensor) -> Prepared:
        """Everything about the step's routing that is plain tensor math, so a compiled graph
        fuses it into a few kernels instead of the op issuing dozens of small ones:

        * top-k weights/ids by the family's rule (stock's ops: inductor fuses them as in stock
          and keeps the weights in float32, so routing matches compiled stock exactly);
        * the same after adaptive gating of every token (weights, ids, kept experts per token);
        * ``summary`` [E + 1 (+ E) + Σ E'] int64: tokens needing each expert, top-1 tokens,
          (for score-based eviction: router weight per expert, fixed point,) then for each
          look-ahead layer its predicted tokens per expert (its router on this input);
        * ``predicted`` [T, Σ k'] int32: those predicted expert sets per token (−1: gated off),
          used to restrict the guess to decode tokens in steps that also prefill.

        The op then needs one device→host transfer (``summary``) to decide loads and prefetches.
        """
        weights, ids = self.route(router_logits)
        if self.gating.applies():
            gated = Routing.gated(ids, weights, self.gating, None, self.router_spec.renormalize)
            g_weights, g_ids, keep, sets = gated.weights, gated.ids, gated.keep, gated.expert_sets
            top1 = (keep == 1).sum().view(1)
        else:
            g_weights, g_ids, keep, sets = weights, ids, None, ids
            top1 = torch.zeros(1, dtype=torch.int64, device=ids.device)
        summary, predicted = [expert_counts(sets, self.num_experts), top1], []
        if self.cache.table.policy.uses_router_mass:
            summary.append(expert_mass(weights, ids, self.num_experts))
        if self.prefetch_enabled:
            for depth, target in enumerate(self.next_blocks, 1):
                t_weights, t_ids = target.route(self.lookahead_logits(x, depth, target))
                t_sets = predicted_expert_sets(t_weights, t_ids, target.gating)
                summary.append(expert_counts(t_sets, target.num_experts))
                predicted.append(t_sets)
        predicted_sets = torch.cat(predicted, 1) if predicted else ids[:, :0]
        return weights, ids, g_weights, g_ids, keep, torch.cat(summary), predicted_sets

    def run_step(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 gated_weights: torch.Tensor, gated_ids: torch.Tensor, keep: torch.Tensor | None,
                 summary: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """One step through this layer from ``prepare``'s tensors: ``x`` [T, H] → [T, H]."""
        step, clock = self.step, self.clock
        if step.describe is not None:
            step.describe(x.shape[0])
        if step.counted and step.all_decode:
            self.cache.link.cost.layer_started(self.layer_idx)
        if step.trace is not None and step.counted:
            step.trace.record(self.layer_idx, ids, weights, step.decode_mask)
        counts = summary.tolist()  # the step's one device→host transfer of routing
        clock and clock.mark("router")
        routing = self._routing(weights, ids, gated_weights, gated_ids, keep, counts)
        clock and clock.mark("gating")
        needed = routing.needed_experts()
        n = self.num_experts
        mass = counts[n + 1:2 * n + 1] if self.cache.table.policy.uses_router_mass else None
        if step.counted:
            self._count(routing, needed, mass)
        guesses = counts[n + 1 + (n if mass is not None else 0):]
        out = torch.empty_like(x)
        for i, (rows, experts) in enumerate(
                plan_waves(routing.expert_sets, needed, self.cache.num_slots, self.cache.slot_of)):
            pending = self.cache.start_loads(experts)  # hits first, then misses booked + queued
            clock and clock.mark("residency")
            if i == 0:  # our own first loads go on the link first, then the guesses for l+1
                self._prefetch_next(x, guesses, predicted)
                clock and clock.mark("prefetch")
            self._compute_wave(out, x, routing, rows, experts, pending)
        self.cache.end_step()
        if self.last and step.counted and step.on_step_end is not None:
            step.on_step_end()
        return out

    def _routing(self, weights: torch.Tensor, ids: torch.Tensor, gated_weights: torch.Tensor,
                 gated_ids: torch.Tensor, keep: torch.Tensor | None, counts: list[int]) -> Routing:
        """The routing the kernel runs, with its host summary taken from ``counts``."""
        n, (tokens, k) = self.num_experts, ids.shape
        needed = [e for e, c in enumerate(counts[:n]) if c]
        if not self.gating.active:
            return Routing(ids, weights, _summary=(needed, tokens * k, tokens if k == 1 else 0))
        if keep is not None and (self.step.all_decode or self.gating.gate_prefill):
            return Routing(gated_ids, gated_weights, keep, _summary=(needed, sum(counts[:n]), counts[n]))
        # the step also prefills (those tokens keep all k experts), or the compiled graph was
        # built without gating and a threshold was set since: gate here, with the mask
        return Routing.gated(ids, weights, self.gating, self.step.decode_mask,
                             self.router_spec.renormalize)

    def _compute_wave(self, out: torch.Tensor, x: torch.Tensor, routing: Routing,
                      rows: torch.Tensor | None, experts: list[int], pending: list) -> None:
        """Compute ``rows`` (None: all); while copies are pending, first the rows whose experts
        have landed, then wait for the copies and compute the rest."""
        clock = self.clock
        if pending:
            ready = [e for e in experts if self.cache.ready(e)]
            if ready:
                sets = routing.expert_sets if rows is None else routing.expert_sets[rows]
                landed = torch.tensor(ready, dtype=sets.dtype, device=sets.device)
                hit = (torch.isin(sets, landed) | (sets < 0)).all(1)
                rows = (torch.arange(sets.shape[0], device=sets.device) if rows is None else rows)
                self._compute(out, x, routing, rows[hit])
                rows = rows[~hit]
                clock and clock.mark("compute")
            self.cache.wait(pending)
            clock and clock.mark("stall")
        self._compute(out, x, routing, rows)
        clock and clock.mark("compute")

    def _prefetch_next(self, x: torch.Tensor, counts: list[int], predicted: torch.Tensor) -> None:
        """Book the experts the look-ahead layers' routers predict for this step's decode tokens:
        ``counts`` (per layer, tokens per expert over all tokens) when every token decodes,
        else ``predicted`` restricted to the decode tokens."""
        step = self.step
        if not step.counted or not self.next_blocks:
            return
        if step.trace is not None:
            self._predict_and_record(x)
            return
        if not self.prefetch_enabled:
            return
        if not step.all_decode:
            if step.decode_rows is None:  # once per step, shared by the layers
                step.decode_rows = step.decode_mask.nonzero().squeeze(1)
            if step.decode_rows.numel() == 0:
                return  # no decode token this step: prefill needs every expert anyway
            predicted = predicted[step.decode_rows]
        offset, column = 0, 0
        for depth, target in enumerate(self.next_blocks, 1):
            n, k = target.num_experts, target.top_k
            if step.all_decode:
                target_counts = counts[offset:offset + n]
            else:
                target_counts = expert_counts(predicted[:, column:column + k], n).tolist()
            self._book_prefetch(target, depth, target_counts)
            offset, column = offset + n, column + k

    def _book_prefetch(self, target: AdapMoEBlock, depth: int, counts: list[int]) -> None:
        """Book the predicted experts of ``target`` (``depth`` layers ahead) that pay for their
        copy (and for what they evict), given how well this predictor has done and what a load
        costs on this link, never evicting another predicted one; on pure-decode steps, leave
        the prediction with ``target`` to be scored."""
        score = target.prediction_scores.setdefault(depth, PredictionScore())
        named = [e for e, c in enumerate(counts) if c]
        if self.step.all_decode:
            target._predicted[depth] = named
        issue, evictable = worth_prefetching(counts, target.cache.table, score,
                                             self.cache.link.cost, depth)
        target.cache.prefetch(issue, keep=named, evictable=evictable)

    def _predict_and_record(self, x: torch.Tensor) -> None:
        """While a trace is recorded: the look-ahead guesses on every row (the trace stores every
        token's guess at each distance; only one layer ahead without prefetch), and prefetch
        (if on) from the decode rows among them."""
        step = self.step
        if not step.all_decode and step.decode_rows is None:
            step.decode_rows = step.decode_mask.nonzero().squeeze(1)
        decode = None if step.all_decode else step.decode_rows
        for depth, target in enumerate(self.next_blocks):
            if depth > 0 and not self.prefetch_enabled:
                break
            weights, ids = target.route(self.lookahead_logits(x, depth + 1, target))
            step.trace.record_prediction(target.layer_idx, weights, ids, depth + 1)
            if decode is not None:
                if decode.numel() == 0:
                    continue
                weights, ids = weights[decode], ids[decode]
            if self.prefetch_enabled:
                sets = predicted_expert_sets(weights, ids, target.gating)
                self._book_prefetch(target, depth + 1,
                                    expert_counts(sets, target.num_experts).tolist())

    def _compute(self, out: torch.Tensor, x: torch.Tensor, routing: Routing,
                 rows: torch.Tensor | None) -> None:
        """Run the kernel once for ``rows`` (None: all; their experts resident) on the slots."""
        if rows is not None and rows.numel() == 0:
            return
        self.stats.waves += self.step.counted
        ids, weights = routing.kernel_args(rows)
        slot_ids = self.cache.slot_ids(ids)
        if rows is None:
            self.kernel(out, x, self.cache.w13, self.cache.w2, weights, slot_ids)
            return
        part = torch.empty((rows.numel(), self.hidden_size), dtype=x.dtype, device=x.device)
        self.kernel(part, x[rows], self.cache.w13, self.cache.w2, weights, slot_ids)
        out[rows] = part

    def _count(self, routing: Routing, needed: list[int], mass: list[int] | None) -> None:
        count_routing(self.stats, routing, self.step.decode_tokens)
        self.cache.count_step(needed, mass)
        for depth, predicted in self._predicted.items():
            self.prediction_scores[depth].observe(predicted, needed)
        self._predicted.clear()

    def stats_dict(self) -> dict[str, float]:
        staging = self.cache.staging
        return {"layer": self.layer_idx, "slots": self.cache.own_slots,
                "expert_bytes": self.store.expert_bytes, "slot_bytes": self.cache.device_bytes,
                # the shared staging rows, reported once (with the first layer using them)
                "staging_bytes": staging.device_bytes if staging and staging.first(self.layer_idx) else 0,
                **self.stats.as_dict()}


@dataclass
class Routing:
    """One step's routing for one layer, after adaptive gating, in the form the kernel takes.

    Tokens that keep all top-k experts keep the router's ids and weights in the router's order
    (so the kernel sums them exactly as stock does). A gated token keeps its leading ``keep``
    experts by weight, rescaled to the weight the token had over all k (1 for renormalising
    routers; families without renormalisation keep their routed mass); its dropped positions
    repeat its first expert with weight 0,
    so one kernel call serves every token and a top-1 token still reads one expert's weights.
    When every token is top-1 the kernel gets one column.
    """

    ids: torch.Tensor                  # [T, k] int32
    weights: torch.Tensor              # [T, k] float32
    keep: torch.Tensor | None = None   # [T] experts kept per token; None = all k
    _summary: tuple[list[int], int, int] | None = None

    @classmethod
    def gated(cls, ids: torch.Tensor, weights: torch.Tensor, gate: AdaptiveGate,
              decode_mask: torch.Tensor | None, renormalize: bool = True) -> Routing:
        k = ids.shape[1]
        sorted_weights, order = weights.sort(dim=1, descending=True)
        keep = gate.experts_per_token(sorted_weights, decode_mask)
        kept = torch.arange(k, device=ids.device) < keep[:, None]
        sorted_ids = ids.gather(1, order)
        kept_weights = sorted_weights * kept
        kept_weights = kept_weights / kept_weights.sum(1, keepdim=True)
        if not renormalize:
            kept_weights = kept_weights * weights.sum(1, keepdim=True)
        full = (keep == k)[:, None]
        return cls(torch.where(full, ids, torch.where(kept, sorted_ids, sorted_ids[:, :1])),
                   torch.where(full, weights, kept_weights), keep)

    @property
    def expert_sets(self) -> torch.Tensor:
        """[T, k] experts each token needs, −1 where gating dropped one (for planning)."""
        if self.keep is None:
            return self.ids
        dropped = torch.arange(self.ids.shape[1], device=self.ids.device) >= self.keep[:, None]
        return self.ids.masked_fill(dropped, -1)

    def needed_experts(self) -> list[int]:
        """Distinct experts needed this step, ascending (one device→host transfer, cached)."""
        return self._summarise()[0]

    def activated(self) -> int:
        return self._summarise()[1]

    def single_expert_tokens(self) -> int:
        return self._summarise()[2]

    def _summarise(self) -> tuple[list[int], int, int]:
        """(needed experts, activated token-expert pairs, single-expert tokens) from one copy of
        the [T, k] expert sets to the host (zero-copy on CPU); a few ints, so plain Python."""
        if self._summary is None:
            tokens, k = self.ids.shape
            sets = self.expert_sets.cpu().numpy()
            needed = sorted(set(sets.ravel().tolist()) - {-1})
            if self.keep is None:
                self._summary = (needed, tokens * k, tokens if k == 1 else 0)
            else:
                kept = (sets >= 0).sum(1)
                self._summary = (needed, int(kept.sum()), int((kept == 1).sum()))
        return self._summary

    def kernel_args(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, weights) for the kernel on ``rows`` (None: all tokens)."""
        ids, weights = (self.ids, self.weights) if rows is None else (self.ids[rows], self.weights[rows])
        if self.keep is not None and self.single_expert_tokens() == self.ids.shape[0]:
            return ids[:, :1].contiguous(), weights[:, :1].contiguous()
        return ids, weights


class PhaseClock:
    """Attributes wall time between successive ``mark(phase)`` calls to the named phase
    (``benchmarks/bench_layer.py``). On CUDA it synchronises at every mark, so only for timing."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


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
    # Expert sets as bit masks: unions, overlaps and sizes are int operations, which keeps a
    # many-token prefill over 64-128 experts cheap (one wave per few tokens at small budgets).
    masks = [_bitmask(row) for row in sets.tolist()]
    remaining = list(range(len(masks)))
    present = _bitmask(resident)
    waves: list[tuple[torch.Tensor | None, list[int]]] = []
    while remaining:
        remaining.sort(key=lambda g: (-(masks[g] & present).bit_count(), -counts[g]))
        wave, chosen, rest = 0, [], []
        for g in remaining:
            union = wave | masks[g]
            if union.bit_count() <= capacity:
                wave = union
                chosen.append(g)
            else:
                rest.append(g)
        remaining = rest
        rows = torch.isin(inverse, torch.tensor(chosen, device=inverse.device)).nonzero().squeeze(1)
        experts = [e for e in range(wave.bit_length()) if wave >> e & 1]
        waves.append((rows, sorted(experts, key=lambda e: not present >> e & 1)))
        present = wave
    return waves


def _bitmask(experts) -> int:
    """Bit e set for every expert id e >= 0 (−1 marks experts gating dropped)."""
    mask = 0
    for e in experts:
        if e >= 0:
            mask |= 1 << e
    return mask
