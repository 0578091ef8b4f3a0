"""The step planner (``engine/plan.py``) on hand-worked inputs, and the engine's import graph."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import torch

from vllm_adapmoe.engine.link import LinkCost
from vllm_adapmoe.engine.plan import (StepSummary, Target, plan_prefetch, plan_step,
                                      prompt_step_loads)
from vllm_adapmoe.engine.prefetch import PredictionScore
from vllm_adapmoe.engine.slot_table import SlotTable, make_policy
from vllm_adapmoe.engine.stats import LayerStats

ENGINE = Path(__file__).parents[1] / "vllm_adapmoe" / "engine"


def _table(slots: int, resident: list[int], own: int | None = None) -> SlotTable:
    table = SlotTable(slots, make_policy("lru"), LayerStats(), own=own)
    table.admit(resident)
    return table


def _sets(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def test_one_wave_when_the_needed_experts_fit():
    table = _table(4, [3])
    plan = plan_step(StepSummary([0, 1, 3], _sets([[0, 1], [1, 3]])), table)
    [wave] = plan.waves
    assert wave.rows is None and wave.experts == [3, 0, 1]  # resident first
    assert wave.resident == [3] and wave.loads == [0, 1]
    assert plan.prefetch == []


def test_waves_start_with_what_is_resident_and_keep_tokens_whole():
    """2 slots, tokens {0,1}, {2,3}, {0,1}, expert 2 resident: the {2,3} tokens go first (they
    overlap the residents), then both {0,1} tokens together, each a whole token."""
    table = _table(2, [2])
    plan = plan_step(StepSummary([0, 1, 2, 3], _sets([[0, 1], [3, 2], [1, 0]])), table)
    first, second = plan.waves
    assert first.rows.tolist() == [1] and first.experts == [2, 3]
    assert first.resident == [2] and first.loads == [3]
    assert second.rows.tolist() == [0, 2] and second.experts == [0, 1]
    assert second.resident == [] and second.loads == [0, 1]


def test_gated_positions_need_nothing():
    table = _table(2, [])
    plan = plan_step(StepSummary([4], _sets([[4, -1], [4, -1]])), table)
    assert [(w.rows, w.experts) for w in plan.waves] == [(None, [4])]


def test_prefetch_booking_follows_the_pay_off_rule():
    """One load = one layer (pinned), precision 1/2 (no history), reuse 1/2 (no history):
    a guess takes a free slot at p >= 1/2 and evicts at p >= 3/4, with p = 1 - (1/2)^c."""
    target = _table(2, [0])  # one free own slot
    score = PredictionScore()
    booking = plan_prefetch([0, 3, 1, 0], Target(1, target, score), LinkCost(1.0))
    assert booking.depth == 1 and booking.named == [1, 2]
    assert booking.issue == [1, 2]  # p = 7/8 and 1/2, most wanted first
    assert booking.evictable == {1}  # only 7/8 >= 3/4
    slow = plan_prefetch([0, 3, 1, 0], Target(1, target, score), LinkCost(10.0))
    assert slow.issue == [] and slow.named == [1, 2]  # at 10 layers per load neither pays


def test_plan_step_books_only_targets_it_has_guesses_for():
    table, near, far = _table(4, [0]), _table(2, []), _table(2, [])
    targets = [Target(1, near, PredictionScore()), Target(2, far, PredictionScore())]
    plan = plan_step(StepSummary([0], _sets([[0, -1]]), {2: [0, 0, 2, 0]}), table, targets,
                     LinkCost(1.0))
    assert [(b.depth, b.issue) for b in plan.prefetch] == [(2, [2])]


def test_planning_reads_residency_and_never_writes_it():
    table, target = _table(2, [1, 2]), _table(2, [5, 6])
    before = copy.deepcopy((table.state(), table.stats.as_dict(), target.state()))
    plan_step(StepSummary([0, 1, 3], _sets([[0, 1], [3, 1]]), {1: [4, 0, 0, 0, 0, 0, 0, 1]}),
              table, [Target(1, target, PredictionScore())], LinkCost(1.0))
    assert (table.state(), table.stats.as_dict(), target.state()) == before


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_engine_imports_neither_vllm_nor_the_plugin():
    """Every import in ``engine/`` (top level or inside a function) is torch, the standard
    library, or the engine itself: not vLLM, the plugin's settings parser, models or offline."""
    files = sorted(ENGINE.glob("*.py"))
    assert len(files) > 10
    for path in files:
        for module in _imports(path):
            top = module.split(".")[0]
            assert top != "vllm", (path.name, module)
            if top == "vllm_adapmoe":
                assert module.startswith("vllm_adapmoe.engine"), (path.name, module)


def test_the_schedulers_prompt_step_prior_counts_a_cold_expert_once_per_wave():
    """The expert-aware scheduler's prior: loads of a uniformly routed 128-token prompt step."""
    # rows enough for every expert: one wave, each cold expert loaded once
    assert prompt_step_loads(8, 2, own=2, capacity=8, tokens=128) == 6
    assert prompt_step_loads(64, 8, own=16, capacity=64, tokens=128) == 48
    # 2 slots: token-complete waves of one expert pair each reload experts between waves
    two = prompt_step_loads(8, 2, own=2, capacity=2, tokens=128)
    four = prompt_step_loads(8, 2, own=2, capacity=4, tokens=128)
    assert two > four > 6 and two <= 2 * 28  # at most both experts of each of the 28 pairs
    assert prompt_step_loads(64, 8, own=16, capacity=16, tokens=128) > 4 * 48
    # nothing cold, or nothing to run
    assert prompt_step_loads(8, 2, own=8, capacity=8, tokens=128) == 0
    assert prompt_step_loads(8, 2, own=2, capacity=2, tokens=0) == 0
