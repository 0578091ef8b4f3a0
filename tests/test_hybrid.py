"""Hybrid execution: a cold expert's tokens computed where the expert lives, on the host, when
that costs less than loading it. Hand-worked plans, the engine (outputs equal all resident,
host-only never loads), and inside vLLM (tokens equal stock; live counters = replayed)."""

from __future__ import annotations

import time

import pytest
import torch

import vllm_adapmoe
from conftest import PROMPTS, greedy
from test_engine import BATCHES, _decode, _stack
from test_exactness import assert_same
from test_plan import _sets, _table
from test_trace_sim import _assert_counters_equal
from vllm_adapmoe.engine.costs import MeasuredCosts, PinnedCosts
from vllm_adapmoe.engine.plan import StepSummary, plan_step
from vllm_adapmoe.engine.cache_plan import plan_hybrid, staging_rows
from vllm_adapmoe.offline.simulator import host_work_curves, simulate
from vllm_adapmoe.offline.trace import Trace

# one load = 1 s; one expert on the host = 0.5 s + 0.3 s per token: 1 token goes to the host
# (0.8 s), 2 or more load (>= 1.1 s)
COSTS = PinnedCosts(load_s=1.0, host_fixed_s=0.5, host_token_s=0.3)
FORCE_HOST = (1e9, 0.0, 0.0)  # loading never pays


def _summary(sets: list[list[int]], experts: int = 4) -> StepSummary:
    """The step's summary as the block builds it (tokens per expert for the cost model)."""
    needed = sorted({e for row in sets for e in row if e >= 0})
    tokens = [sum(row.count(e) for row in sets) for e in range(experts)]
    return StepSummary(needed, _sets(sets), {}, tokens)


def test_the_host_takes_a_cold_expert_while_it_shortens_the_critical_path():
    """Experts 0, 1 resident; 2 and 3 cold, one token each. Loading both: the link's path is
    2.0 s. Token 1 to the host (experts 2 and 0, whole: 2 x 0.8 s) → max(link 1.0, host 1.6);
    token 2 too would make the host's path 3.2 s, so expert 3 is loaded."""
    plan = plan_step(_summary([[0, 1], [2, 0], [3, 1]]), _table(2, [0, 1]), hybrid="auto", host=COSTS)
    assert plan.host_rows.tolist() == [1] and plan.host_experts == [0, 2]
    assert sorted(torch.cat([w.rows for w in plan.waves]).tolist()) == [0, 2]
    assert [e for w in plan.waves for e in w.loads] == [3]
    assert plan.promote == []  # both own slots hold experts the device tokens use


def test_an_expert_many_tokens_need_is_loaded():
    """Expert 3 (one token) goes to the host; expert 2 (two tokens) would add 2.2 s there
    against a 1 s load."""
    plan = plan_step(_summary([[0, 2], [2, 1], [3, 1]]), _table(2, [0, 1]), hybrid="auto", host=COSTS)
    assert plan.host_rows.tolist() == [2] and plan.host_experts == [1, 3]
    assert 2 in [e for w in plan.waves for e in w.loads]
    assert sorted(torch.cat([w.rows for w in plan.waves]).tolist()) == [0, 1]


def test_a_link_queue_sends_even_a_dearer_expert_to_the_host():
    """Three cold experts, one token each, 1.2 s each on the host against a 1 s load: loading
    all three is a 3 s path; one on the host runs beside the other two loads (max(2, 1.2))."""
    dear = PinnedCosts(load_s=1.0, host_fixed_s=1.0, host_token_s=0.2)
    plan = plan_step(_summary([[2], [3], [4]], experts=5), _table(2, [0, 1]), hybrid="auto", host=dear)
    assert plan.host_rows.tolist() == [0] and plan.host_experts == [2]


def test_one_token_runs_whole_on_the_host_or_loads_its_cold_experts():
    """Batch 1: expert 0 resident, 2 cold. On the host the token costs 2 x 0.8 s (its resident
    expert too) beside a 1 s load: max(1.0, 1.6) loses to loading (1.0). With two cold experts
    the link's path is 2.0 s and the host's 1.6 s wins: every expert of the token goes to the
    host (its one call, no row split), as the many-token greedy would decide."""
    plan = plan_step(_summary([[0, 2]]), _table(2, [0, 1]), hybrid="auto", host=COSTS)
    assert plan.host_rows is None and [e for w in plan.waves for e in w.loads] == [2]
    plan = plan_step(_summary([[2, 3]]), _table(2, [0, 1]), hybrid="auto", host=COSTS)
    assert plan.host_rows.tolist() == [0] and plan.host_experts == [2, 3] and not plan.waves
    padded = plan_step(_summary([[2, 3], [-1, -1]]), _table(2, [0, 1]), hybrid="auto", host=COSTS)
    assert padded.host_rows.tolist() == [0] and padded.host_experts == [2, 3]  # greedy agrees


def test_a_host_expert_is_promoted_into_an_idle_slot():
    """Every token on the host: its cold expert is promoted, evicting the least recently used
    resident (none of them was used by the step); the table counts a load and a promotion."""
    cheap = PinnedCosts(load_s=1.0, host_fixed_s=0.1, host_token_s=0.1)
    table = _table(2, [0, 1])
    plan = plan_step(_summary([[2, 1]]), table, hybrid="auto", host=cheap)
    assert plan.host_rows.tolist() == [0] and plan.waves == [] and plan.promote == [2]
    loads = table.stats.loads
    assert table.promote(2, set()) == [(2, 0)]  # 0 touched before 1: the LRU victim
    assert table.stats.promotions == 1 and table.stats.loads == loads + 1 and 2 in table.slot_of
    assert table.promote(3, {1, 2}) == []  # every own slot holds an expert the step used
    only = plan_step(_summary([[3, 1]]), table, hybrid="host-only", host=cheap)
    assert only.promote == []  # host-only never loads


def test_host_only_never_loads_and_off_never_computes_on_the_host():
    sets = [[0, 2], [2, 1], [3, 1]]
    only = plan_step(_summary(sets), _table(2, [0, 1]), hybrid="host-only", host=COSTS)
    assert only.host_rows.tolist() == [0, 1, 2] and only.waves == []
    off = plan_step(_summary(sets), _table(2, [0, 1]), hybrid="off", host=COSTS)
    # off: three waves of one token each on 2 slots (1 is evicted for 2, then loaded back)
    assert off.host_rows is None and [e for w in off.waves for e in w.loads] == [2, 1, 3]


def test_measured_costs_fit_the_microbenchmark():
    """c + e·experts + t·pairs from three timed calls: c = 5 ms, e = 2 ms, t = 1 ms."""
    costs = MeasuredCosts(lambda: 0.02, parallel=True)
    costs.calibrate(lambda experts, tokens: time.sleep(0.005 + 0.002 * experts
                                                       + 0.001 * experts * tokens), repeats=1)
    assert costs.host_token_s == pytest.approx(0.001, abs=4e-4)
    assert costs.host_fixed_s == pytest.approx(0.002, abs=6e-4)
    assert costs.host_call_s == pytest.approx(0.005, abs=1.5e-3)
    assert costs.host_s(1) == pytest.approx(0.003, abs=1e-3) and costs.load_s == 0.02


def test_where_copies_and_host_work_share_the_cores_they_add_up():
    """Inline copies (CPU, no emulation): loading both cold experts costs 2 x 1 s; the host
    call costs 0.5 s + 0.3 s per expert. Side by side, one expert on the host already wins
    (max(1, 1.1) < 2); added up, only all of them do (0.5 + 4 x 0.3 < 2 — the call once)."""
    sets = [[0, 1], [2, 0], [3, 1]]
    serial = PinnedCosts(load_s=1.0, host_fixed_s=0.3, host_token_s=0.0, host_call_s=0.5,
                         parallel=False)
    plan = plan_step(_summary(sets), _table(2, [0, 1]), hybrid="auto", host=serial)
    assert plan.host_rows.tolist() == [1, 2] and plan.waves[0].loads == []
    dear_call = PinnedCosts(load_s=1.0, host_fixed_s=0.3, host_token_s=0.0, host_call_s=1.5,
                            parallel=False)
    assert plan_step(_summary(sets), _table(2, [0, 1]), hybrid="auto", host=dear_call).host_rows is None


def test_where_host_and_device_are_the_same_cores_one_host_call_can_take_every_token():
    """A device wave costs 0.5 s (its kernel call), one host call 0.1 s + 0.01 s per expert:
    the resident tokens too are cheaper in the host's one call than in a device wave, and no
    promotion is planned (a copy there would only add device waves)."""
    cpu = PinnedCosts(load_s=1.0, host_fixed_s=0.01, host_token_s=0.0, host_call_s=0.1,
                      parallel=False, device_call_s=0.5)
    plan = plan_step(_summary([[0, 1], [1, 0], [2, 3]]), _table(2, [0, 1]), hybrid="auto", host=cpu)
    assert plan.host_rows.tolist() == [0, 1, 2] and plan.waves == [] and plan.promote == []


@pytest.mark.parametrize("hybrid, slots", [("auto", 2), ("auto", [1, 2, 1, 3]), ("host-only", 2)])
def test_hybrid_stack_equals_all_resident(hybrid, slots):
    expected = _decode(_stack("cpu", None), BATCHES, "cpu")
    stack = _stack("cpu", slots, hybrid=hybrid, hybrid_costs=FORCE_HOST)
    assert torch.equal(_decode(stack, BATCHES, "cpu"), expected)
    total = stack.stats()["total"]
    assert total["host_experts"] > 0 and total["host_tokens"] > 0
    # loading never pays: the only loads are promotions into idle slots (auto), none host-only
    assert total["loads"] == total["promotions"]
    assert (total["promotions"] > 0) == (hybrid == "auto")


def test_a_layer_with_no_own_slot_lives_on_the_host_under_auto():
    """Under "auto" too, a 0-slot layer never loads (it would need top_k staging rows to cache
    nothing): with loads far cheaper than host work, the other layers load, it does not, and
    the staging rows serve the smallest layer that loads (2 - 1 = 1 row)."""
    expected = _decode(_stack("cpu", None), BATCHES, "cpu")
    stack = _stack("cpu", [0, 2, 1, 3], hybrid="auto", hybrid_costs=(0.001, 1.0, 1.0))
    assert torch.equal(_decode(stack, BATCHES, "cpu"), expected)
    layers = stack.stats()["layers"]
    assert layers[0]["loads"] == 0 and layers[0]["host_tokens"] == layers[0]["tokens"] > 0
    assert all(layer["loads"] > 0 for layer in layers[1:])
    assert stack.staging is not None and stack.staging.rows == 1
    assert [len(b.cache.slot_of) for b in stack.blocks][0] == 0


def test_measured_hybrid_stack_equals_all_resident():
    """Costs measured here (a probe copy, the host microbenchmark): whatever it decides, the
    outputs are those of every expert resident."""
    expected = _decode(_stack("cpu", None), BATCHES, "cpu")
    stack = _stack("cpu", 2, hybrid="auto")
    assert torch.equal(_decode(stack, BATCHES, "cpu"), expected)
    assert stack.blocks[0].host_costs.calibrated


def test_large_experts_on_a_cpu_add_their_copies_to_the_host_work():
    """Experts over the inline limit are copied on the loader thread, yet on a CPU without
    emulation that thread shares the cores and the memory bus the host computes with: the
    measured costs add link and host work up, so no promotion is planned "in the background"
    (one Mixtral-shaped run had 2.8 such loads per token, at 0.58x host-only)."""
    from vllm_adapmoe.engine.cache import INLINE_COPY_MAX_BYTES
    from vllm_adapmoe.engine.stack import LayerShape

    shape = LayerShape(hidden=1024, intermediate=1536, experts=4, top_k=2)
    assert shape.expert_bytes(2) > INLINE_COPY_MAX_BYTES
    batches = [1, 3, 1, 2]
    expected = _decode(_stack("cpu", None, layers=2, shape=shape), batches, "cpu")
    # the link measured, not pinned: as a user runs it
    hybrid = _stack("cpu", 1, layers=2, hybrid="auto", link_layers=None, shape=shape)
    assert torch.equal(_decode(hybrid, batches, "cpu"), expected)
    assert all(not b.cache.inline and not b.host_costs.parallel for b in hybrid.blocks)
    total = hybrid.stats()["total"]
    assert total["host_experts"] > 0 and total["promotions"] == 0


def test_a_failing_host_computation_raises():
    from vllm_adapmoe.engine.fault_injection import InjectedHostFault, inject_host_faults

    stack = _stack("cpu", 2, hybrid="host-only")
    inject_host_faults([block.executor.host for block in stack.blocks])
    with pytest.raises(InjectedHostFault, match="injected host kernel error"):
        _decode(stack, [4], "cpu")


def test_host_curves_and_the_hybrid_plan():
    """h(s) per decoded token: every needed expert on the host at 0 slots, none at E; at batch
    4 a token rarely has both experts resident, so the curve stays high until s = E, and the
    DP over such curves keeps whole layers resident rather than spreading the slots."""
    g = torch.Generator().manual_seed(0)
    steps = [[torch.randperm(4, generator=g)[:2].repeat(4, 1) if i % 2 else
              torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(4)])
              for i in range(20)] for _ in range(2)]
    curves = host_work_curves(steps, 4)
    for layer_steps, curve in zip(steps, curves):
        distinct = sum(len(s.unique()) for s in layer_steps)
        assert curve[0] == pytest.approx(distinct / 80) and curve[4] == 0.0
    concave = [[1.0, 0.9, 0.8, 0.7, 0.0]] * 2
    assert plan_hybrid(concave, 6, 2) == [4, 2]  # one layer whole, not [3, 3]
    convex = [[1.0, 0.5, 0.2, 0.15, 0.12]] * 2  # diminishing returns: spread
    assert plan_hybrid(convex, 6, 2) == [3, 3]
    # a layer with no own slot lives on the host and needs no staging row: 4 slots keep one
    # layer whole (no staging), where a loading 0-slot layer would cost 2 rows of 4
    assert plan_hybrid(concave, 4, 2) == [4, 0] and staging_rows([4, 0], 2) == 0
    assert plan_hybrid(concave, 1, 2) == [0, 0]  # one own slot would need a staging row too
    assert staging_rows([0, 1, 3], 2) == 1  # rows serve the smallest layer that loads
    with pytest.raises(ValueError, match="no split fits"):
        plan_hybrid(concave, 10, 2)  # more than every expert plus a row


def test_where_host_is_device_memory_the_plan_keeps_whole_layers(tmp_path):
    """On a CPU without an emulated or limited link a host expert costs what a resident one
    does, so the hybrid plan keeps whole layers (the ones saving the most host work; ties: the
    later ones) and leaves the remainder unused; anywhere else the DP spreads as before."""
    from types import SimpleNamespace
    from unittest import mock

    from vllm_adapmoe.config import AdapMoEConfig
    from vllm_adapmoe.engine.cache_plan import plan_whole_layers

    convex = [[1.0, 0.5, 0.2, 0.15, 0.12]] * 2
    assert plan_hybrid(convex, 6, 2) == [3, 3]
    assert plan_hybrid(convex, 6, 2, whole_layers=True) == [0, 4]
    curves = [[2.0, 1.0, 0.0], [3.0, 1.0, 0.0], [1.0, 0.5, 0.0], [3.0, 2.0, 0.0]]
    assert plan_whole_layers(curves, 5) == [0, 2, 0, 2]  # most saved; the rest unused
    assert plan_whole_layers(curves, 1) == [0, 0, 0, 0]
    assert plan_whole_layers([[3.0, 1.0, 0.0, 0.0], [1.0, 0.0]], 3) == [3, 0]
    prof = tmp_path / "p.json"
    prof.write_text("{}")  # read through the patched _profile below
    raw = {"profile": str(prof), "cache_total_slots": 6, "plan": "dp", "hybrid": "auto"}
    profile = SimpleNamespace(host_curves=convex)
    for extra, device, slots in (({}, "cpu", [0, 4]), ({}, "cuda", [3, 3]),
                                 ({"link_gbps": 10.0}, "cpu", [3, 3]),
                                 ({"emulate": "h100-pcie4"}, "cpu", [3, 3])):
        config = AdapMoEConfig.from_dict({**raw, **extra})
        with mock.patch.object(AdapMoEConfig, "_profile", lambda self, hf: profile):
            assert config.slots_per_layer(2, 4, 1, None, 2, device) == slots, (extra, device)


def test_a_plan_from_curves_gated_otherwise_than_served_is_named(tmp_path):
    """plan "dp" over a profile whose curves were replayed at another gating T still plans,
    and ``curves_threshold`` names the T they assume (the start-up warning's input)."""
    from types import SimpleNamespace
    from unittest import mock

    from vllm_adapmoe.config import AdapMoEConfig

    prof = tmp_path / "p.json"
    prof.write_text("{}")  # read through the patched _profile below
    profile = SimpleNamespace(trace_settings={"threshold": 0.0})
    raw = {"profile": str(prof), "cache_total_slots": 6, "plan": "dp", "hybrid": "auto"}
    with mock.patch.object(AdapMoEConfig, "_profile", lambda self, hf: profile):
        assert AdapMoEConfig.from_dict({**raw, "threshold": 0.01}).curves_threshold(None) == 0.0
        assert AdapMoEConfig.from_dict(raw).curves_threshold(None) is None
        assert AdapMoEConfig.from_dict({**raw, "plan": "uniform", "threshold": 0.01}
                                       ).curves_threshold(None) is None
        profile.trace_settings = None  # a profile without curves' settings: nothing to name
        assert AdapMoEConfig.from_dict({**raw, "threshold": 0.01}).curves_threshold(None) is None


def test_a_layer_wholly_on_the_host_equals_all_resident():
    """llama.cpp's --n-cpu-moe form: layers 0 and 1 keep no expert on the device. Host-only
    never loads, so it allocates no staging rows: its device memory is its own slots alone."""
    expected = _decode(_stack("cpu", None), BATCHES, "cpu")
    stack = _stack("cpu", [0, 0, 8, 8], hybrid="host-only")
    assert torch.equal(_decode(stack, BATCHES, "cpu"), expected)
    layers = stack.stats()["layers"]
    assert layers[0]["host_tokens"] == layers[0]["tokens"] and layers[3]["host_tokens"] == 0
    assert sum(layer["loads"] for layer in layers) == 0
    assert stack.staging is None
    assert stack.device_bytes() == 16 * stack.blocks[0].store.expert_bytes
    one = _stack("cpu", [1, 0, 1, 2], hybrid="host-only")  # below top_k, still no staging
    assert torch.equal(_decode(one, BATCHES, "cpu"), expected)
    assert one.staging is None and [len(b.cache.slot_of) for b in one.blocks] == [1, 0, 1, 2]
    assert one.stats()["total"]["loads"] == 0


PINNED = {"load_s": 1.0, "host_fixed_s": 0.5, "host_token_s": 0.3}


def test_hybrid_in_vllm_matches_stock_and_replays(engines, tiny_model, tmp_path):
    """2 slots per layer, pinned costs (an expert wanted by one token runs on the host, one
    wanted by more is loaded): greedy tokens equal stock's, both answers happen, and the
    simulator, given the same costs, reproduces every counter."""
    llm = engines.get(tiny_model, "adapmoe", cache_slots=2, hybrid="auto", hybrid_costs=PINNED)
    greedy(llm, PROMPTS[:3], max_tokens=4)
    vllm_adapmoe.reset_stats(llm)
    vllm_adapmoe.start_trace(llm)
    ours = greedy(llm)
    trace = Trace.load(vllm_adapmoe.stop_trace(llm, tmp_path / "hybrid.npz"))
    assert_same(greedy(engines.get(tiny_model)), ours)
    live = vllm_adapmoe.stats(llm)
    assert live["total"]["host_experts"] > 0 and live["total"]["loads"] > 0
    sim = simulate(trace, trace.meta["slots"], "lru", hybrid="auto",
                   hybrid_costs=tuple(PINNED.values()))
    _assert_counters_equal(live, sim)
    for key in ("host_tokens", "host_experts"):
        assert live["total"][key] == sim["total"][key], key


def test_emulated_hybrid_in_vllm_matches_stock(engines, tiny_model):
    """``emulate`` inside vLLM: the worker measures its scale, pads copies and host work to the
    H100 preset's durations, and tokens still equal stock's."""
    llm = engines.get(tiny_model, "adapmoe", cache_slots=2, hybrid="auto", emulate="h100-pcie4")
    vllm_adapmoe.reset_stats(llm)
    prompts = PROMPTS[:4]  # a load is ~30 ms emulated here: a short run
    assert_same(greedy(engines.get(tiny_model), prompts, 8), greedy(llm, prompts, 8), 4, 8)
    total = vllm_adapmoe.stats(llm)["total"]
    assert total["host_experts"] > 0 and total["host_s"] > 0
