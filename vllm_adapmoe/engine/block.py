"""The AdapMoE MoE block: one MoE layer whose experts live in host memory and run from device slots.

Architecture-agnostic: a router (``gate``), ``num_experts`` gated-MLP experts given as gate/up/down
weights (and biases: ``expert_tensors.py``), and the family's routing rule (``routing.py``). Per-architecture model files build one
block per MoE layer (numbered among MoE layers only) and feed it checkpoint weights
(``weights.py``); shared experts and dense layers stay with the model file.

One step through one layer (``forward``), like vLLM's ``MixtralMoE.forward`` handing off to
``FusedMoE``:
  1. ``prepare`` (plain tensor math that vLLM compiles into its graph): the router's top-k
     experts and weights (stock's ops), adaptive gating (``gating.py``), tokens per needed
     expert, the look-ahead layers' guesses (``lookahead.py``);
  2. ``run_step`` (behind the opaque op when compiled): one copy of that summary to the host →
     the step's routing and counters → ``plan_step`` (``plan.py``: waves, loads, prefetch
     guesses that pay) → ``StepExecutor.run`` (``execute.py``: the link and the kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from vllm_adapmoe.engine.cache import ExpertCache
from vllm_adapmoe.engine.costs import EmulatedCosts, ExpertCosts, MeasuredCosts, PinnedCosts
from vllm_adapmoe.engine.errors import AdapMoEConfigError
from vllm_adapmoe.engine.execute import HostExecutor, StepExecutor
from vllm_adapmoe.engine.expert_tensors import ExpertFormat
from vllm_adapmoe.engine.gating import AdaptiveGate
from vllm_adapmoe.engine.kernels import make_kernel
from vllm_adapmoe.engine.link import Link
from vllm_adapmoe.engine.lookahead import LookAhead
from vllm_adapmoe.engine.plan import StepSummary, layer_loads, plan_step
from vllm_adapmoe.engine.prefetch import PredictionLog, expert_counts, expert_mass
from vllm_adapmoe.engine.routing import RouterSpec, Routing, count_routing
from vllm_adapmoe.engine.settings import EngineSettings
from vllm_adapmoe.engine.staging import StagingArea
from vllm_adapmoe.engine.stats import LayerStats
from vllm_adapmoe.engine.step import PhaseClock, StepInfo
from vllm_adapmoe.engine.store import HostExpertStore
from vllm_adapmoe.engine.weights import check_shardable, load_moe_weights

# ``AdapMoEBlock.prepare``'s output: weights, ids, gated weights, gated ids, keep, summary,
# predicted sets (see there); the op's tensor arguments, in this order.
Prepared = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None",
                 torch.Tensor, torch.Tensor]


class AdapMoEBlock(nn.Module):
    """``gate`` is the router (any module mapping [T, H] → [T, E] logits, or a tuple whose first
    item is that, as vLLM's ``GateLinear``); the serving stack provides it so the router GEMM is
    computed exactly as in its stock model; a ``gate.e_score_correction_bias`` tensor
    (DeepSeek-V3) is used by grouped routing. ``router`` is the family's routing rule (default:
    softmax top-k, renormalised, as Mixtral); ``expert_format`` its experts' activation and
    biases (default: SiLU, no biases). ``device`` is where slots and compute live.

    ``shard`` = (rank, size) for tensor parallelism: the block keeps, loads and caches only its
    rank's slice of every expert, so its output is a partial sum that ``reduce`` (set by the
    serving stack: the TP all-reduce) completes. Routing comes from the replicated router on
    every rank, so all ranks make the same residency decisions.
    """

    def __init__(self, *, layer_idx: int, num_experts: int, top_k: int, hidden_size: int,
                 intermediate_size: int, num_slots: int, settings: EngineSettings,
                 step: StepInfo, gate: nn.Module, device: torch.device, sensitivity: float = 0.0,
                 link: Link | None = None, params_dtype: torch.dtype | None = None,
                 prefix: str = "", store: HostExpertStore | None = None,
                 router: RouterSpec | None = None, shard: tuple[int, int] = (0, 1),
                 staging: StagingArea | None = None,
                 expert_format: ExpertFormat = ExpertFormat()) -> None:
        super().__init__()
        self.shard = shard
        intermediate_size = check_shardable(intermediate_size, shard)  # this rank's slice
        if expert_format.quant and shard[1] > 1:
            raise AdapMoEConfigError("adapmoe: quantized experts under tensor parallelism are "
                                     "not supported yet; use --tensor-parallel-size 1")
        dtype = params_dtype or torch.get_default_dtype()
        self.router_spec = router or RouterSpec(top_k)
        if self.router_spec.top_k != top_k:
            raise ValueError(f"router top_k {self.router_spec.top_k} != block top_k {top_k}")
        self.layer_idx, self.name = layer_idx, prefix
        self.num_experts, self.top_k, self.hidden_size = num_experts, top_k, hidden_size
        self.step = step
        self.gate = gate
        self.kernel = make_kernel(settings.kernel, device, dtype, hidden_size, intermediate_size,
                                  expert_format)
        # ``store``: a filled host store shared with another block (benchmarks that compare
        # budgets on the same experts); else an empty one, filled by ``load_weights``.
        self.store = store or HostExpertStore(num_experts, hidden_size, intermediate_size,
                                              self.kernel.padded_intermediate(intermediate_size),
                                              dtype, self.kernel.pack, pin=device.type == "cuda",
                                              fmt=expert_format,
                                              quantize_at_load=settings.quantize_at_load)
        self.gating = AdaptiveGate(settings.threshold, sensitivity, settings.gate_prefill, device)
        # a buffer, so vLLM's compiled graph reads the gating rule's parameters by reference
        self.register_buffer("gating_params", self.gating.params, persistent=False)
        self.stats = LayerStats()
        # A token's top-k experts must be co-resident for one kernel call: below top_k own slots
        # the rest are loaded into the model's shared ``staging`` rows; without it (a block
        # built on its own) the layer gets top_k slots, unless it never loads (host-only, or
        # no own slot: its device tokens are all resident, the others run on the host).
        own_only = staging is not None or not layer_loads(settings.hybrid, num_slots)
        self.cache = ExpertCache(self.store, num_slots if own_only else max(num_slots, top_k),
                                 device, settings.eviction, self.stats, link, staging, layer_idx)
        # its targets are wired by the model; no guessing where no copy can hide behind compute
        self.lookahead = LookAhead(settings.prefetch, guessing=self.cache.link.cost.can_overlap)
        self.cache.link.cost.in_use |= settings.prefetch
        self.predictions = PredictionLog()  # how well the layers before guess this one
        self.hybrid = settings.hybrid
        self.host_costs = _host_costs(settings, self.cache)
        host = (HostExecutor(self.store, self.kernel, self.stats, self.host_costs, device,
                             self.cache.link.emulation, settings.host_threads)
                if self.host_costs is not None else None)
        # experts the slots are filled with at start-up, most wanted first (None: by id); set
        # by the model from the profile's expert frequencies under host-only placement
        self.placement: list[int] | None = None
        self.executor = StepExecutor(self.cache, self.kernel, self.stats, host)
        self.last = False  # the model's last MoE block (ends the step), wired by the model
        # Set by the vLLM side: calls this block through the opaque op the compiled graph keeps.
        self.call_op: Callable[..., torch.Tensor] | None = None
        # Set by the vLLM side under tensor parallelism: sums the ranks' partial outputs.
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        n = num_experts
        # where the look-ahead counts start in ``prepare``'s summary
        self._guess_offset = n + 1 + (n if self.cache.table.policy.uses_router_mass else 0)

    # -- weights ----------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = load_moe_weights(weights, self.gate, self.store, self.shard)
        if self.store.complete and not self.cache.slot_of:
            self.warm()
        return loaded

    def warm(self) -> None:
        """Once every expert is in the host store: fill the slots (``placement`` first), measure
        an emulated machine's scale (the first block to warm), and (hybrid with measured costs)
        time the host computation the planner weighs against a load."""
        order = self.placement or []
        self.cache.warm(order + [e for e in range(self.num_experts) if e not in order])
        emulation = self.cache.link.emulation
        if emulation is not None and not emulation.calibrated:
            emulation.calibrate(self._one_expert_on_device)
        if isinstance(self.host_costs, MeasuredCosts) and not self.host_costs.calibrated:
            self.host_costs.calibrate(self.executor.host.time_host)

    def _one_expert_on_device(self) -> None:
        """One expert for one token from slot 0 (the emulation's measure of device time)."""
        cache = self.cache
        x = torch.zeros(1, self.hidden_size, dtype=self.store.dtype, device=cache.device)
        ids = torch.zeros(1, 1, dtype=torch.int32, device=cache.device)
        weights = torch.ones(1, 1, dtype=torch.float32, device=cache.device)
        self.kernel(torch.empty_like(x), x, cache.slots, weights, ids)
        if cache.device.type == "cuda":
            torch.cuda.synchronize(cache.device)

    def set_lookahead_map(self, depth: int, fitted: torch.Tensor) -> None:
        """Guess the layer ``depth`` ahead with a fitted map [H + 1, E] (``offline/predictor.py``)
        instead of its router; a buffer, so a compiled graph reads it like a weight."""
        name = f"lookahead_map_{depth}"
        self.register_buffer(name, fitted.to(self.cache.device, torch.float32), persistent=False)
        self.lookahead.maps[depth] = getattr(self, name)

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
        summary = [expert_counts(sets, self.num_experts), top1]
        if self.cache.table.policy.uses_router_mass:
            summary.append(expert_mass(weights, ids, self.num_experts))
        predicted = self.lookahead.predicted_sets(x)
        summary += [expert_counts(sets_d, target.num_experts)
                    for sets_d, target in zip(predicted, self.lookahead.targets)]
        predicted_sets = torch.cat(predicted, 1) if predicted else ids[:, :0]
        return weights, ids, g_weights, g_ids, keep, torch.cat(summary), predicted_sets

    def run_step(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 gated_weights: torch.Tensor, gated_ids: torch.Tensor, keep: torch.Tensor | None,
                 summary: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """One step through this layer from ``prepare``'s tensors: ``x`` [T, H] → [T, H]."""
        step, clock = self.step, self.executor.clock
        step.enter(self.layer_idx, x.shape[0], self.cache.link.cost)
        loads_before, traffic_before = self.stats.loads, self.stats.traffic_s
        if step.trace is not None and step.counted:
            step.trace.record(self.layer_idx, ids, weights, step.decode_mask)
        counts = summary.tolist()  # the step's one device→host transfer of routing
        clock and clock.mark("router")
        routing = self._routing(weights, ids, gated_weights, gated_ids, keep, counts)
        needed = routing.needed_experts()
        clock and clock.mark("gating")
        if step.counted:
            self._count(routing, needed, counts)
        guesses = self.lookahead.guesses(x, counts[self._guess_offset:], predicted, step)
        step_summary = StepSummary(needed, routing.expert_sets, guesses,
                                   self._tokens(routing, counts),
                                   *self._link_state())
        plan = plan_step(step_summary, self.cache.table,
                         self.lookahead.planning_targets(guesses) if guesses else (),
                         self.cache.link.cost, self.hybrid, self.host_costs)
        self.lookahead.expect(plan.prefetch, step.all_decode)
        clock and clock.mark("plan")
        out = self.executor.run(plan, x, routing, [t.cache for t in self.lookahead.targets],
                                step.counted)
        if step.counted and x.shape[0] > step.decode_tokens:  # the step carried prompt tokens
            self.stats.prefill_step_loads += self.stats.loads - loads_before
            self.stats.prefill_step_traffic_s += self.stats.traffic_s - traffic_before
        step.leave(self.last)
        return out

    def _routing(self, weights: torch.Tensor, ids: torch.Tensor, gated_weights: torch.Tensor,
                 gated_ids: torch.Tensor, keep: torch.Tensor | None, counts: list[int]) -> Routing:
        """The routing the kernel runs, with its host summary taken from ``counts``."""
        n, (tokens, k) = self.num_experts, ids.shape
        needed = [e for e, c in enumerate(counts[:n]) if c]
        if not self.gating.active:
            return Routing(ids, weights, _summary=(needed, tokens * k, tokens if k == 1 else 0),
                           in_graph=True)
        if keep is not None and (self.step.all_decode or self.gating.gate_prefill):
            return Routing(gated_ids, gated_weights, keep, in_graph=True,
                           _summary=(needed, sum(counts[:n]), counts[n]))
        # the step also prefills (those tokens keep all k experts), or the compiled graph was
        # built without gating and a threshold was set since: gate here, with the mask
        return Routing.gated(ids, weights, self.gating, self.step.decode_mask,
                             self.router_spec.renormalize)

    def _link_state(self) -> tuple[frozenset[int], float]:
        """(hybrid "auto") this layer's copies still in flight, and the link's backlog: what a
        load planned now would wait for."""
        table = self.cache.table
        if (self.hybrid != "auto" or isinstance(self.host_costs, PinnedCosts)
                or table.num_slots == 0  # no slot: every token on the host
                or table.own >= self.num_experts):  # every expert resident: nothing is cold
            return frozenset(), 0.0  # pinned costs: decisions that do not depend on timing
        return self.cache.landing(), self.cache.link.backlog_s()

    def _tokens(self, routing: Routing, counts: list[int]) -> list[int] | None:
        """Tokens per expert, for hybrid decisions (None without hybrid): the summary's counts
        where they describe this routing, else counted on the routing the step gated here."""
        if self.host_costs is None:
            return None
        if routing.in_graph:
            return counts[:self.num_experts]
        return expert_counts(routing.expert_sets, self.num_experts).tolist()

    def _count(self, routing: Routing, needed: list[int], counts: list[int]) -> None:
        n = self.num_experts
        mass = counts[n + 1:2 * n + 1] if self.cache.table.policy.uses_router_mass else None
        count_routing(self.stats, routing, self.step.decode_tokens)
        self.cache.count_step(needed, mass)
        self.predictions.observe(needed)

    @property
    def clock(self) -> PhaseClock | None:
        return self.executor.clock

    @clock.setter
    def clock(self, clock: PhaseClock | None) -> None:
        """Benchmarks time the step's phases (``benchmarks/bench_layer.py``)."""
        self.executor.clock = clock

    def stats_dict(self) -> dict[str, float]:
        staging = self.cache.staging
        return {"layer": self.layer_idx, "slots": self.cache.own_slots,
                "expert_bytes": self.store.expert_bytes, "slot_bytes": self.cache.device_bytes,
                # the shared staging rows, reported once (with the first layer using them)
                "staging_bytes": staging.device_bytes if staging and staging.first(self.layer_idx) else 0,
                **self.stats.as_dict()}


def _host_costs(settings: EngineSettings, cache: ExpertCache) -> ExpertCosts | None:
    """The cost model hybrid decisions use: pinned by ``hybrid_costs``, an ``emulate`` preset's,
    else measured (a load: the link's copies, or one timed probe copy until there is one)."""
    if settings.hybrid == "off":
        return None
    if settings.hybrid_costs is not None:
        return PinnedCosts(*settings.hybrid_costs)
    if cache.link.emulation is not None:
        return EmulatedCosts(cache.link.emulation)
    probe: list[float] = []

    def load_s() -> float:
        measured = cache.link.cost.copy_s
        if measured is not None:
            return measured
        if not probe:
            probe.append(cache.probe_copy_s())
        return probe[0]
    # A CPU without emulation copies on the cores and memory bus that compute (inline, or on
    # the loader thread for large experts): link and host work add up there, and a promotion
    # in the "background" would take the bandwidth the host's experts read from.
    return MeasuredCosts(load_s, parallel=not cache.link.cpu_free)
