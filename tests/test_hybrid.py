"""Hybrid execution: a cold expert's tokens computed where the expert lives, on the host, when
that costs less than loading it. Hand-worked plans, the engine (outputs equal all resident,
host-only never loads), and inside vLLM (tokens equal stock; live counters = replayed)."""

from __future__ import annotations

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
from vllm_adapmoe.offline.simulator import simulate
from vllm_adapmoe.offline.trace import Trace

# one load = 1 s; one expert on the host = 0.5 s + 0.3 s per token: 1 token goes to the host
# (0.8 s), 2 or more load (>= 1.1 s)
COSTS = PinnedCosts(load_s=1.0, host_fixed_s=0.5, host_token_s=0.3)
FORCE_HOST = (1e9, 0.0, 0.0)  # loading never pays


def _summary(sets: list[list[int]], experts: int = 4) -> StepSummary:
    needed = sorted({e for row in sets for e in row if e >= 0})
    tokens = [sum(row.count(e) for row in sets) for e in range(experts)]
    return StepSummary(needed, _sets(sets), {}, tokens)


def test_cold_experts_of_few_tokens_go_to_the_host():
    """Experts 0, 1 resident; 2 and 3 cold, one token each: both tokens run on the host, whole
    (token 1 needs resident 0 too), and the device computes token 0 without a load."""
    plan = plan_step(_summary([[0, 1], [2, 0], [3, 1]]), _table(2, [0, 1]), hybrid="auto", host=COSTS)
    assert plan.host_rows.tolist() == [1, 2] and plan.host_experts == [0, 1, 2, 3]
    [wave] = plan.waves
    assert wave.rows.tolist() == [0] and wave.experts == [0, 1] and wave.loads == []


def test_an_expert_many_tokens_need_is_loaded():
    plan = plan_step(_summary([[0, 2], [2, 1], [3, 1]]), _table(2, [0, 1]), hybrid="auto", host=COSTS)
    assert plan.host_rows.tolist() == [2] and plan.host_experts == [1, 3]  # 3: one token
    loads = [e for w in plan.waves for e in w.loads]
    # 2 slots for the device tokens {0,2}, {2,1}: two waves, 2 loaded, then 1 again
    assert loads == [2, 1] and sorted(torch.cat([w.rows for w in plan.waves]).tolist()) == [0, 1]


def test_host_only_never_loads_and_off_never_computes_on_the_host():
    sets = [[0, 2], [2, 1], [3, 1]]
    only = plan_step(_summary(sets), _table(2, [0, 1]), hybrid="host-only", host=COSTS)
    assert only.host_rows.tolist() == [0, 1, 2] and only.waves == []
    off = plan_step(_summary(sets), _table(2, [0, 1]), hybrid="off", host=COSTS)
    # off: three waves of one token each on 2 slots (1 is evicted for 2, then loaded back)
    assert off.host_rows is None and [e for w in off.waves for e in w.loads] == [2, 1, 3]


def test_measured_costs_fit_the_microbenchmark():
    durations = {1: 0.010, 16: 0.025}
    costs = MeasuredCosts(lambda: 0.02)
    costs.calibrate(lambda tokens: __import__("time").sleep(durations[tokens]), repeats=1)
    assert costs.host_token_s == pytest.approx(0.001, abs=5e-4)
    assert costs.host_s(1) == pytest.approx(0.010, abs=2e-3) and costs.load_s == 0.02


@pytest.mark.parametrize("hybrid, slots", [("auto", 2), ("auto", [1, 2, 1, 3]), ("host-only", 2)])
def test_hybrid_stack_equals_all_resident(hybrid, slots):
    expected = _decode(_stack("cpu", None), BATCHES, "cpu")
    stack = _stack("cpu", slots, hybrid=hybrid, hybrid_costs=FORCE_HOST)
    assert torch.equal(_decode(stack, BATCHES, "cpu"), expected)
    total = stack.stats()["total"]
    assert total["host_experts"] > 0 and total["host_tokens"] > 0 and total["loads"] == 0


def test_measured_hybrid_stack_equals_all_resident():
    """Costs measured here (a probe copy, the host microbenchmark): whatever it decides, the
    outputs are those of every expert resident."""
    expected = _decode(_stack("cpu", None), BATCHES, "cpu")
    stack = _stack("cpu", 2, hybrid="auto")
    assert torch.equal(_decode(stack, BATCHES, "cpu"), expected)
    assert stack.blocks[0].host_costs.calibrated


def test_a_failing_host_computation_raises():
    stack = _stack("cpu", 2, hybrid="host-only")

    def broken(*args, **kwargs):
        raise RuntimeError("host kernel failed")
    for block in stack.blocks:
        block.executor.host.kernel = broken
    with pytest.raises(RuntimeError, match="host kernel failed"):
        _decode(stack, [4], "cpu")


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


def test_host_only_compiled_matches_stock(engines, tiny_model):
    llm = engines.get(tiny_model, "adapmoe", eager=False, cache_slots=1, hybrid="host-only")
    vllm_adapmoe.reset_stats(llm)
    assert_same(greedy(engines.get(tiny_model, eager=False)), greedy(llm))
    total = vllm_adapmoe.stats(llm)["total"]
    assert total["loads"] == 0 and total["host_experts"] > 0
