"""Routing traces and the simulator: round-trip, hand-worked policies, Belady as a lower
bound, and exact agreement with the live engine's counters."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import vllm_adapmoe
from conftest import PROMPTS, greedy
from vllm_adapmoe.engine.costs import PinnedCosts, StepTimes
from vllm_adapmoe.offline.simulator import host_curves, simulate
from vllm_adapmoe.offline.trace import Trace, TraceRecorder

COUNTERS = ("tokens", "decode_tokens", "activated_experts", "top1_tokens", "hits", "misses",
            "loads", "evictions", "steps", "prefetch_issued", "prefetch_correct",
            "prefetch_wasted", "prefetch_dropped", "promotions", "prefill_tokens",
            "prefill_steps", "prefill_step_loads")


def make_trace(tmp_path, steps, num_experts=8, name="t.npz", weights=None):
    """``steps``: per step, a list of per-token top-2 pairs (one layer, all decode tokens);
    ``weights``: per step, the tokens' router weights (default 0.5 each)."""
    rec = TraceRecorder({"model": "synthetic", "num_layers": 1, "num_experts": num_experts,
                         "top_k": 2, "expert_bytes": 100})
    for i, pairs in enumerate(steps):
        rec.begin_step(torch.ones(len(pairs), dtype=torch.int64))
        ids = torch.tensor(pairs, dtype=torch.int32)
        w = (torch.full(ids.shape, 0.5) if weights is None
             else torch.tensor(weights[i], dtype=torch.float32))
        rec.record(0, ids, w, torch.ones(len(pairs), dtype=torch.bool))
    return Trace.load(rec.save(tmp_path / name))


def test_trace_round_trip_and_schema(tmp_path):
    trace = make_trace(tmp_path, [[(0, 1)], [(2, 3), (0, 4)]])
    assert trace.meta["format"] == "adapmoe-trace/1" and trace.meta["steps"] == 2
    assert trace.ids.dtype == np.int16 and trace.ids.shape == (3, 2)
    assert trace.weights.dtype == np.float32 and trace.decode.all()
    blocks = list(trace)
    assert [(b.step, b.layer, b.ids.tolist()) for b in blocks] == [
        (0, 0, [[0, 1]]), (1, 0, [[2, 3], [0, 4]])]
    assert trace.segment.tolist() == [0, 0, 1]


def test_garbled_trace_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a trace")
    with pytest.raises(ValueError, match="not an adapmoe trace"):
        Trace.load(bad)


def test_lru_and_lfu_hand_worked(tmp_path):
    # 2 slots (= top_k), one token per step needing 2 experts:
    # A=(0,1) B=(0,2) C=(0,1) D=(3,0)
    trace = make_trace(tmp_path, [[(0, 1)], [(0, 2)], [(0, 1)], [(3, 0)]])
    lru = simulate(trace, 2, "lru", warm_start=False)["total"]
    # LRU: load 0,1 | 2 evicts 1 | 1 evicts 2 | 3 evicts 1 → 5 loads, hits: 0,0,0 = 3
    assert (lru["loads"], lru["hits"], lru["misses"], lru["evictions"]) == (5, 3, 5, 3)
    lfu = simulate(trace, 2, "lfu", warm_start=False)["total"]
    # LFU (counts survive eviction): same decisions here; 0 is always the most used
    assert (lfu["loads"], lfu["hits"]) == (5, 3)
    assert lfu["bytes_loaded"] == 500


# unit times of the replay: a copy 10, a kernel call 1 + 0.1 per expert + 0.01 per pair
TIMES = StepTimes(load_s=10.0, call_s=1.0, expert_s=0.1, pair_s=0.01, layer_s=0.5)


def test_time_replay_hand_worked(tmp_path):
    """Slots start with experts 0 and 1. Step 0: two tokens on (0,1), resident: one call of
    2 experts, 4 pairs. Step 1: one token on (2,3): two copies, then one call of 2 experts."""
    trace = make_trace(tmp_path, [[(0, 1), (1, 0)], [(2, 3)]])
    out = simulate(trace, 2, "lru", placement=[[0, 1]], timing=TIMES)
    assert out["total"]["loads"] == 2 and "time" not in simulate(trace, 2, "lru")
    assert out["time"]["step_s"] == pytest.approx([0.5 + 1.2 + 0.04, 0.5 + 20.0 + 1.2 + 0.02])
    assert out["time"]["total_s"] == pytest.approx(sum(out["time"]["step_s"]))
    assert out["time"]["per_decoded_token_s"] == pytest.approx(out["time"]["total_s"] / 3)


def test_time_replay_prices_the_host_beside_or_after_the_device(tmp_path):
    """host-only at 2 slots holding (0,1): the token on (0,2) runs whole on the host (2 experts,
    2 pairs), the one on (0,1) on the device. Where host and device share the cores the step
    costs both; where they run side by side, the longer of the two."""
    trace = make_trace(tmp_path, [[(0, 1), (0, 2)]])
    host = StepTimes(10.0, 1.0, 0.1, 0.01, 0.5, host=(2.0, 1.0, 0.1))
    device_s, host_s = 0.5 + 1.0 + 0.2 + 0.02, 2.0 + 2.0 + 0.2
    out = simulate(trace, 2, "lru", placement=[[0, 1]], hybrid="host-only",
                   host_costs=PinnedCosts(10.0, 1.0, 0.1), timing=host)
    assert out["total"]["host_tokens"] == 1 and out["total"]["loads"] == 0
    assert out["time"]["step_s"] == pytest.approx([device_s + host_s])
    side_by_side = StepTimes(10.0, 1.0, 0.1, 0.01, 0.5, parallel=True, host=(2.0, 1.0, 0.1))
    out = simulate(trace, 2, "lru", placement=[[0, 1]], hybrid="host-only",
                   host_costs=PinnedCosts(10.0, 1.0, 0.1), timing=side_by_side)
    assert out["time"]["step_s"] == pytest.approx([max(device_s, host_s)])
    # a host call's own overhead (its split of the step, the hand-off) lands on the host's path
    extra = StepTimes(10.0, 1.0, 0.1, 0.01, 0.5, host=(2.0, 1.0, 0.1), host_extra_s=0.3)
    out = simulate(trace, 2, "lru", placement=[[0, 1]], hybrid="host-only",
                   host_costs=PinnedCosts(10.0, 1.0, 0.1), timing=extra)
    assert out["time"]["step_s"] == pytest.approx([device_s + host_s + 0.3])
    # each of the two calls runs part of the step's tokens: both pay the gather and scatter
    split = dataclasses.replace(host, subset_s=0.05)
    out = simulate(trace, 2, "lru", placement=[[0, 1]], hybrid="host-only",
                   host_costs=PinnedCosts(10.0, 1.0, 0.1), timing=split)
    assert out["time"]["step_s"] == pytest.approx([device_s + host_s + 2 * 0.05])


def test_time_replay_streaming_copies_every_step(tmp_path):
    """Layer streaming: slots forget between steps, so the same experts are copied again."""
    trace = make_trace(tmp_path, [[(0, 1)], [(0, 1)]])
    out = simulate(trace, 2, "lru", placement=[[0, 1]], streaming=True, timing=TIMES)
    assert out["total"]["loads"] == 2
    assert out["time"]["step_s"] == pytest.approx([0.5 + 1.22, 0.5 + 20.0 + 1.22])


def test_belady_lower_bound_hand_worked(tmp_path):
    # 3 slots; sequence of single experts (pairs with a fixed partner 7)
    seq = [0, 1, 2, 0, 1, 2, 0, 1]
    trace = make_trace(tmp_path, [[(e, 7)] for e in seq])
    lru = simulate(trace, 3, "lru", warm_start=False)["total"]["loads"]
    opt = simulate(trace, 3, "belady", warm_start=False)["total"]["loads"]
    # worked by hand: LRU evicts exactly the expert needed next (9 loads); Belady evicts the
    # one needed furthest ahead (loads at steps 0,0,1,2,4,6 → 6)
    assert (lru, opt) == (9, 6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("slots", [2, 3, 5])
def test_belady_never_worse_than_lru_or_lfu(tmp_path, seed, slots):
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.ones(8) * 0.5)
    steps = []
    for _ in range(60):
        n = int(rng.integers(1, 4))
        steps.append([tuple(int(e) for e in rng.choice(8, 2, replace=False, p=skew)) for _ in range(n)])
    trace = make_trace(tmp_path, steps)
    opt = simulate(trace, slots, "belady", warm_start=False)["total"]["loads"]
    for policy in ("lru", "lfu"):
        assert opt <= simulate(trace, slots, policy, warm_start=False)["total"]["loads"]


def test_adversarial_cycle_lru_worst_case(tmp_path):
    # cycle through 4 experts with 3 slots: LRU misses every time, Belady about every 3rd
    steps = [[(e, (e + 1) % 4)] for e in [0, 2, 1, 3] * 10]
    trace = make_trace(tmp_path, steps)
    lru = simulate(trace, 3, "lru", warm_start=False)["total"]
    opt = simulate(trace, 3, "belady", warm_start=False)["total"]
    assert opt["loads"] < lru["loads"]


def _assert_counters_equal(live, sim):
    for l_live, l_sim in zip(live["layers"], sim["layers"]):
        for key in COUNTERS:
            assert l_live[key] == l_sim[key], (key, l_live["layer"], l_live[key], l_sim[key])


def test_simulator_reproduces_live_counters(engines, tiny_model, tmp_path):
    llm = engines.get(tiny_model, "adapmoe", cache_slots=2)
    greedy(llm, PROMPTS[:3], max_tokens=4)  # the cache is warm and not in its initial state
    vllm_adapmoe.reset_stats(llm)
    vllm_adapmoe.start_trace(llm)
    greedy(llm, PROMPTS, max_tokens=12)
    path = vllm_adapmoe.stop_trace(llm, tmp_path / "live.npz")
    live = vllm_adapmoe.stats(llm)
    trace = Trace.load(path)
    assert trace.meta["slots"] == [2, 2, 2] and trace.meta["steps"] == live["layers"][0]["steps"]
    assert any(ids for ids in trace.meta["step_req_ids"])
    _assert_counters_equal(live, simulate(trace, trace.meta["slots"], "lru"))


def test_prefill_rows_in_vllm_match_stock_and_replay(engines, tiny_model, tmp_path):
    """``prefill_rows`` inside vLLM: greedy tokens equal stock's, prompt steps load fewer
    experts than without the rows, and the simulator, told the rows, reproduces every
    counter."""
    stock = greedy(engines.get(tiny_model), PROMPTS, max_tokens=8)
    per_token = {}
    for rows in (0, 4):
        # (no rows: the engine test_simulator_reproduces_live_counters started)
        llm = engines.get(tiny_model, "adapmoe", cache_slots=2,
                          **({"prefill_rows": rows} if rows else {}))
        vllm_adapmoe.reset_stats(llm)
        vllm_adapmoe.start_trace(llm)
        assert greedy(llm, PROMPTS, max_tokens=8) == stock
        trace = Trace.load(vllm_adapmoe.stop_trace(llm, tmp_path / f"rows{rows}.npz"))
        live = vllm_adapmoe.stats(llm)
        assert trace.meta["prefill_rows"] == rows
        _assert_counters_equal(live, simulate(trace, trace.meta["slots"], "lru",
                                              prefill_rows=trace.meta["prefill_rows"]))
        total = live["total"]
        assert total["prefill_tokens"] > 0 and total["prefill_step_loads"] > 0
        per_token[rows] = total["prefill_step_loads"] / total["prefill_tokens"]
    assert per_token[4] < per_token[0]


def test_simulator_reproduces_live_counters_with_gating(engines, tiny_model, tmp_path):
    settings = dict(cache_slots=1, threshold=1e9, sensitivity=[1.0, 1.0, 1.0], gate_prefill=True)
    llm = engines.get(tiny_model, "adapmoe", **settings)
    vllm_adapmoe.reset_stats(llm)
    vllm_adapmoe.start_trace(llm)
    greedy(llm, PROMPTS, max_tokens=8)
    trace = Trace.load(vllm_adapmoe.stop_trace(llm, tmp_path / "gated.npz"))
    sim = simulate(trace, trace.meta["slots"], "lru", threshold=1e9, sensitivity=[1.0] * 3,
                   gate_prefill=True)
    _assert_counters_equal(vllm_adapmoe.stats(llm), sim)
    assert json.loads(json.dumps(sim))  # JSON-serialisable


def test_host_curves_gate_the_trace_as_served(tmp_path):
    """With T = 0.05 and S = 1 a second expert of weight 0.1 is dropped (0.01 < T), one of 0.4
    or 0.5 kept. Step 0: (0,1)@(.9,.1) → {0}, (0,2)@(.6,.4) → {0,2}; step 1: (0,3)@(.9,.1) →
    {0}, (1,0)@(.5,.5) → {1,0}. With no own slot every needed expert runs on the host: 2 + 2
    over 4 tokens gated, 3 + 3 ungated; with every expert resident, none."""
    trace = make_trace(tmp_path, [[(0, 1), (0, 2)], [(0, 3), (1, 0)]], num_experts=4,
                       weights=[[(0.9, 0.1), (0.6, 0.4)], [(0.9, 0.1), (0.5, 0.5)]])
    ungated = host_curves(trace, progress=False)[0]
    gated = host_curves(trace, progress=False, threshold=0.05, sensitivity=[1.0])[0]
    assert ungated[0] == pytest.approx(6 / 4) and gated[0] == pytest.approx(4 / 4)
    assert ungated[4] == gated[4] == 0.0
    assert all(g <= u for g, u in zip(gated, ungated))
    assert host_curves(trace, progress=False, threshold=0.0, sensitivity=[1.0]) == [ungated]


def test_mrs_keeps_the_expert_the_router_favours(tmp_path):
    """Score = decayed router weight: an expert that got heavy weight a few steps ago outlives
    one touched more recently by a single light token (LRU evicts the favoured one)."""
    from vllm_adapmoe.engine.slot_table import MASS_SCALE, MRSPolicy, SlotTable
    from vllm_adapmoe.engine.stats import LayerStats

    def run(policy):
        table = SlotTable(2, policy, LayerStats())
        steps = [([0], {0: 4.0}), ([1], {1: 0.1}), ([2], {2: 1.0})]  # 2 must evict 0 or 1
        for needed, mass in steps:
            table.count_step(needed, [int(mass.get(e, 0) * MASS_SCALE) for e in range(4)]
                             if policy.uses_router_mass else None)
            table.admit(needed)
        return sorted(table.slot_of)

    from vllm_adapmoe.engine.slot_table import LRUPolicy
    assert run(MRSPolicy(decay=0.8)) == [0, 2]  # 4·0.64 > 0.1·0.8
    assert run(LRUPolicy()) == [1, 2]


def test_simulator_reproduces_live_counters_with_mrs_eviction(engines, tiny_model, tmp_path):
    llm = engines.get(tiny_model, "adapmoe", cache_slots=4, eviction="mrs")
    greedy(llm, PROMPTS[:3], max_tokens=4)  # warm: scores and residency not initial
    vllm_adapmoe.reset_stats(llm)
    vllm_adapmoe.start_trace(llm)
    greedy(llm, PROMPTS, max_tokens=12)
    trace = Trace.load(vllm_adapmoe.stop_trace(llm, tmp_path / "mrs.npz"))
    live = vllm_adapmoe.stats(llm)
    assert live["total"]["evictions"] > 0
    sim = simulate(trace, trace.meta["slots"], "mrs")
    _assert_counters_equal(live, sim)
    # the scores steer evictions (which steps vLLM batches together varies with timing, so look
    # at a few budgets rather than one)
    hits = {p: [simulate(trace, s, p)["total"]["hits"] for s in (2, 3, 4, 5)] for p in ("mrs", "lru")}
    assert hits["mrs"] != hits["lru"]
