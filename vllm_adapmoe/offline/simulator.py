"""Trace-driven cache simulator: replay recorded routing against any per-layer allocation,
eviction policy (LRU, LFU, MRS, or Belady's offline optimum) and gating rule.

It runs the live code for every decision — ``Routing.gated`` for gating, the engine's planner
(``plan_step`` for waves and loads, ``plan_prefetch`` for the guesses that pay), ``SlotTable``
for residency and eviction — and applies each plan to the tables alone (no tensors move), so
replaying a trace with the settings it was recorded under reproduces the engine's counters
exactly (tested), and any other setting answers "what would this budget/policy/rule have cost
on this workload". Given ``timing`` (``StepTimes``: a cost model's unit times) it also replays
durations: each layer step's plan — its waves, copies and host call — priced and summed per step
(with ``StepTimes.plan_timed``, plus the time its own ``plan_step`` call took here).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from vllm_adapmoe.engine.cache_plan import layer_staging_rows
from vllm_adapmoe.engine.costs import ExpertCosts, PinnedCosts, StepTimes
from vllm_adapmoe.engine.gating import AdaptiveGate
from vllm_adapmoe.engine.link import LinkCost
from vllm_adapmoe.engine.plan import StepSummary, Target, layer_loads, plan_prefetch, plan_step
from vllm_adapmoe.engine.prefetch import (PredictionLog, expert_counts, expert_mass,
                                          predicted_expert_sets)
from vllm_adapmoe.engine.routing import Routing, count_routing
from vllm_adapmoe.engine.stats import LayerStats, summarise
from vllm_adapmoe.engine.slot_table import POLICIES as LIVE_POLICIES
from vllm_adapmoe.engine.slot_table import BeladyPolicy, SlotTable, make_policy
from vllm_adapmoe.offline.trace import StepLayer, Trace

POLICIES = (*LIVE_POLICIES, "belady")


def simulate(trace: Trace, slots: int | list[int], policy: str = "lru", *,
             threshold: float = 0.0, sensitivity: list[float] | None = None,
             gate_prefill: bool = False, prefetch: bool = False, warm_start: bool = True,
             expert_bytes: int | None = None, link_layers: float | None = None,
             hybrid: str = "off",
             hybrid_costs: tuple[float, float, float] | None = None,
             host_costs: ExpertCosts | None = None, timing: StepTimes | None = None,
             placement: list[list[int]] | None = None,
             streaming: bool = False, prefill_rows: int = 0) -> dict[str, Any]:
    """Replay ``trace``; returns the ``vllm_adapmoe.stats`` shape (plus per-token ratios).

    ``warm_start`` starts each layer from the cache state recorded at trace start (needed for
    exact agreement with the engine); otherwise caches start empty. ``prefetch`` replays the
    prefetcher from the predictions recorded in the trace (every look-ahead distance it
    recorded), with its pay-off rule at ``link_layers`` (one load ≈ that many decode layers;
    None: a free link, as a live run whose link costs at most one layer). ``hybrid`` replays
    where cold experts run, with ``hybrid_costs`` (load_s, host_fixed_s, host_token_s) pinned as
    the live run pinned them ("auto" needs them), or ``host_costs`` (any cost model) instead.
    ``placement``: per layer, the experts its slots start with (as the engine's start-up fills
    them: these first, then by id), instead of the trace's recorded state. ``streaming``: every
    layer forgets its slots after each step (the layer-streaming baseline). ``prefill_rows``:
    the shared rows every loading layer below all its experts may also use (the setting; a
    trace records it). ``timing``: adds
    ``out["time"]`` — predicted seconds per step (``step_s``) and their sum.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    L, k = trace.num_layers, int(trace.meta["top_k"])
    slots = [slots] * L if isinstance(slots, int) else list(slots)
    if len(slots) != L:
        raise ValueError(f"{len(slots)} slot counts for {L} layers")
    sensitivity = sensitivity or [0.0] * L
    gates = [AdaptiveGate(threshold, s, gate_prefill) for s in sensitivity]
    blocks = [(b, _routing(b, gates[b.layer])) for b in trace]
    uses = _future_uses(blocks) if policy == "belady" else None

    stats = [LayerStats() for _ in range(L)]
    decode_step_misses, decode_step_tokens = [0] * L, [0] * L  # steps with only decode tokens
    tables = []
    for layer in range(L):
        pol = BeladyPolicy(uses[layer]) if uses is not None else make_policy(policy)
        # as live: no staging rows where nothing is loaded (host-only, or no own slot)
        rows = slots[layer]
        if layer_loads(hybrid, rows):
            rows += layer_staging_rows(rows, k, prefill_rows, int(trace.meta["num_experts"]))
        table = SlotTable(rows, pol, stats[layer], own=slots[layer])
        state = (trace.meta.get("cache_state") or [None] * L)[layer]
        if placement is not None:
            start = [*placement[layer], *(e for e in range(int(trace.meta["num_experts"]))
                                          if e not in placement[layer])]
            for slot, expert in enumerate(start[:table.own]):  # as ExpertCache.warm
                table.place(expert, slot)
                table.policy.touch(expert)
        elif warm_start and state is not None and len(state["expert_in_slot"]) == table.num_slots:
            table.load_state(state)
            table.release_staging()  # a trace recorded with more own slots: not staging's
        tables.append(table)

    if hybrid == "auto" and hybrid_costs is None and host_costs is None:
        raise ValueError('hybrid="auto" replays need hybrid_costs (the pinned cost model)')
    host = host_costs or (PinnedCosts(*hybrid_costs) if hybrid_costs is not None
                          else PinnedCosts(0.0, 0.0, 0.0))
    step_s: dict[int, float] = defaultdict(float)
    last_step = None
    cost = LinkCost(link_layers)
    depths = list(range(trace.lookahead, 0, -1)) if prefetch else []  # live order: farthest first
    logs = _prediction_logs(trace, depths, warm_start)
    for block, routing in blocks:
        table, st, log = tables[block.layer], stats[block.layer], logs[block.layer]
        if streaming and last_step is not None and block.step != last_step:
            for t in tables:
                t.clear()
        last_step = block.step
        before = (st.loads, st.prefetch_issued, st.promotions)
        if isinstance(table.policy, BeladyPolicy):
            table.policy.now = block.step
        for depth in depths:  # what the layers before booked for this one, in the live order
            counts = predicted_counts(block, gates[block.layer], int(trace.meta["num_experts"]), depth)
            if counts is not None:
                booking = plan_prefetch(counts, Target(depth, table, log.score(depth)), cost)
                table.prefetch(booking.issue, keep=booking.named, evictable=booking.evictable)
                if block.decode.all():
                    log.expect(depth, booking.named)
        needed = routing.needed_experts()
        count_routing(st, routing, int(block.decode.sum()))
        loads_before = st.loads
        misses_before = st.misses
        table.count_step(needed, router_mass(block, trace.meta) if table.policy.uses_router_mass
                         else None)
        log.observe(needed)
        if block.decode.all():
            decode_step_misses[block.layer] += st.misses - misses_before
            decode_step_tokens[block.layer] += len(block.ids)
        tokens = (expert_counts(routing.expert_sets, int(trace.meta["num_experts"])).tolist()
                  if hybrid != "off" else None)
        planning = time.perf_counter()
        plan = plan_step(StepSummary(needed, routing.expert_sets, {}, tokens), table,
                         hybrid=hybrid, host=host)
        planning = time.perf_counter() - planning
        if plan.host_rows is not None:
            st.host_tokens += plan.host_rows.numel()
            st.host_experts += len(plan.host_experts)
        for wave in plan.waves:
            table.admit(wave.experts)
        for expert in plan.promote:  # a replay's link is idle between steps
            table.promote(expert, {e for w in plan.waves for e in w.experts})
        table.release_staging()
        if not block.decode.all():
            st.prefill_step_loads += st.loads - loads_before
        if timing is not None:
            step_s[block.step] += (_priced(timing, plan, routing, st, before)
                                   + (planning if timing.plan_timed else 0.0))

    size = expert_bytes or int(trace.meta.get("expert_bytes", 0))
    layers = []
    for layer, st in enumerate(stats):
        st.bytes_loaded = st.loads * size
        layers.append({"layer": layer, "slots": tables[layer].own, "expert_bytes": size,
                       **st.as_dict(), "decode_step_misses": decode_step_misses[layer],
                       "decode_step_tokens": decode_step_tokens[layer]})
    out = summarise(layers)
    decoded = max(stats[0].decode_tokens, 1)
    out["total"]["loads_per_decoded_token"] = out["total"]["loads"] / decoded
    if timing is not None:
        steps = [step_s[s] for s in sorted(step_s)]
        out["time"] = {"step_s": steps, "total_s": float(sum(steps)),
                       "per_decoded_token_s": float(sum(steps)) / decoded}
    return out


def _priced(timing: StepTimes, plan, routing: Routing, st: LayerStats,
            before: tuple[int, int, int]) -> float:
    """One layer step's predicted seconds: its plan's kernel calls, copies and host call."""
    sets = routing.expert_sets
    waves = [(len(w.experts), int(((sets if w.rows is None else sets[w.rows]) >= 0).sum()))
             for w in plan.waves]
    host = (None if plan.host_rows is None else
            (len(plan.host_experts), int((sets[plan.host_rows] >= 0).sum())))
    copies = st.loads - before[0]
    on_demand = copies - (st.prefetch_issued - before[1]) - (st.promotions - before[2])
    subsets = (sum(1 for w in plan.waves if w.rows is not None),  # as the executor gathers
               plan.host_rows is not None and plan.host_rows.numel() < len(sets))
    return timing.step_s(waves, host, copies, on_demand, subsets)


def miss_curves(trace: Trace, policy: str = "lru", progress: bool = True,
                **settings: Any) -> list[list[float]]:
    """f_l(k) for k = 1..E: on-demand misses per decoded token of layer l with k own slots,
    over the trace's pure-decode steps (prefill needs every expert whatever the budget).
    Layers are independent (per-layer caches), so one replay per k serves all layers; below
    top_k a layer also loads into shared staging rows, which keep nothing between its steps."""
    from tqdm.auto import tqdm

    E, L = int(trace.meta["num_experts"]), trace.num_layers
    curves: list[list[float]] = [[] for _ in range(L)]
    for k in tqdm(range(1, E + 1), desc="miss curves", unit="budget", disable=not progress):
        result = simulate(trace, k, policy, **settings)
        for layer, st in enumerate(result["layers"]):
            curves[layer].append(st["decode_step_misses"] / max(st["decode_step_tokens"], 1))
    return curves


def host_curves(trace: Trace, policy: str = "lru", progress: bool = True, *,
                threshold: float = 0.0,
                sensitivity: list[float] | None = None) -> list[list[float]]:
    """``h_l(s)`` for s = 0..E: experts computed on the host per decoded token of layer l with
    ``s`` own slots under hybrid execution, over the trace's pure-decode steps (see
    ``host_work_curves``); what ``plan: "dp"`` minimises when ``hybrid`` is on. With gating
    (``threshold`` > 0 and the layers' ``sensitivity``) the steps are gated first, as served: a
    token gated to fewer experts is more often wholly resident, and how much gating drops
    differs by layer, so the best split of the slots differs too."""
    sensitivity = sensitivity or [0.0] * trace.num_layers
    gates = [AdaptiveGate(threshold, s, gate_prefill=False) for s in sensitivity]
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(trace.num_layers)]
    for block in trace:
        if len(block.ids) and block.decode.all():
            sets = _routing(block, gates[block.layer]).expert_sets
            per_layer[block.layer].append(sets.to(torch.int64))
    return host_work_curves(per_layer, int(trace.meta["num_experts"]), policy, progress)


def host_work_curves(steps: list[list[torch.Tensor]], num_experts: int, policy: str = "lru",
                     progress: bool = False) -> list[list[float]]:
    """For each layer's decode steps (``steps[l]``: one [T, k] expert-set tensor per step) and
    s = 0..E own slots: distinct experts computed on the host per decoded token when every
    cold expert's tokens go there (whole) and idle slots take promotions — hybrid execution on
    a link slow enough that no miss is loaded. A token whose experts are all resident stays
    on the device, so the curve falls slowly while a step's tokens rarely have all their
    experts resident (large batches) and drops to 0 at s = E: whole resident layers can beat
    the same slots spread over every layer, which a miss curve cannot show."""
    from tqdm.auto import tqdm

    force_host = PinnedCosts(load_s=1e9, host_fixed_s=0.0, host_token_s=0.0)
    curves = []
    for layer_steps in tqdm(steps, desc="host curves", unit="layer", disable=not progress):
        tokens = sum(len(sets) for sets in layer_steps)
        curve = []
        for slots in range(num_experts + 1):
            table = SlotTable(max(slots, 1), make_policy(policy), LayerStats(), own=slots)
            for expert in range(slots):  # filled at start-up, as the engine's warm() does
                table.place(expert, expert)
                table.policy.touch(expert)
            host = 0
            for sets in layer_steps:
                needed = sorted(e for e in sets.unique().tolist() if e >= 0)
                counts = expert_counts(sets, num_experts).tolist()
                plan = plan_step(StepSummary(needed, sets, {}, counts), table, hybrid="auto",
                                 host=force_host)
                host += len(plan.host_experts)
                used = {e for wave in plan.waves for e in wave.experts}
                for wave in plan.waves:
                    table.admit(wave.experts)
                for expert in plan.promote:
                    table.promote(expert, used)
            curve.append(host / max(tokens, 1))
        curves.append(curve)
    return curves


def prediction_accuracy(trace: Trace) -> list[dict[str, float]]:
    """Per layer, for decode tokens: how often the router of layer l applied to layer l−1's
    input got layer l's top-1 expert right, and the share of its top-k it recovered."""
    out = []
    for layer in range(trace.num_layers):
        rows = (trace.layer == layer) & trace.decode & (trace.pred_ids[:, 0] >= 0)
        if layer == 0 or not rows.any():
            out.append({"layer": layer, "tokens": int(rows.sum()), "top1": None, "recall": None})
            continue
        ids, pred = trace.ids[rows], trace.pred_ids[rows]
        w, pw = trace.weights[rows], trace.pred_weights[rows]
        top1 = ids[np.arange(len(ids)), w.argmax(1)] == pred[np.arange(len(pred)), pw.argmax(1)]
        recall = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids.tolist(), pred.tolist())])
        out.append({"layer": layer, "tokens": int(rows.sum()), "top1": float(top1.mean()),
                    "recall": float(recall)})
    return out


def _routing(block: StepLayer, gate: AdaptiveGate) -> Routing:
    ids = torch.from_numpy(block.ids.astype("int32"))
    weights = torch.from_numpy(block.weights)
    if not gate.active:
        return Routing(ids, weights)
    return Routing.gated(ids, weights, gate, torch.from_numpy(block.decode))


def router_mass(block: StepLayer, meta: dict[str, Any]) -> list[int]:
    """What the live step feeds a score-based policy: the live ``expert_mass`` on the step's
    recorded (ungated) top-k routing."""
    ids = torch.from_numpy(block.ids.astype("int32"))
    return expert_mass(torch.from_numpy(block.weights), ids, int(meta["num_experts"])).tolist()


def predicted_counts(block: StepLayer, gate: AdaptiveGate, num_experts: int,
                     depth: int = 1) -> list[int] | None:
    """What the live prefetcher saw for this (step, layer), guessed ``depth`` layers before:
    predicted decode tokens per expert (None: no prediction, e.g. the first layers or no
    decode token)."""
    guess = block.guess(depth)
    if guess is None or block.layer < depth:
        return None
    pred_ids, pred_weights = guess
    decode = torch.from_numpy(block.decode) & torch.from_numpy(pred_ids[:, 0] >= 0)
    if not bool(decode.any()):
        return None
    ids = torch.from_numpy(pred_ids.astype("int32"))[decode]
    weights = torch.from_numpy(pred_weights)[decode]
    return expert_counts(predicted_expert_sets(weights, ids, gate), num_experts).tolist()


def _prediction_logs(trace: Trace, depths: list[int], warm_start: bool) -> list[PredictionLog]:
    """Each layer's predictor scores per look-ahead distance, as recorded at trace start
    (older traces: distance 1 only)."""
    logs = [PredictionLog() for _ in range(trace.num_layers)]
    states = trace.meta.get("prediction_scores") or [None] * trace.num_layers
    for log, state in zip(logs, states):
        for depth in depths:
            log.score(depth)
        if not warm_start or not state:
            continue
        for depth, saved in (state.items() if isinstance(state, dict) else [("1", state)]):
            if int(depth) in log.scores:
                log.scores[int(depth)].load_state(saved)
    return logs


def _future_uses(blocks: list[tuple[StepLayer, Routing]]) -> dict[int, dict[int, list[int]]]:
    uses: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for block, routing in blocks:
        for e in routing.needed_experts():
            uses[block.layer][e].append(block.step)
    return uses
