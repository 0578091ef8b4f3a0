"""Cache-size planning (``vllm_adapmoe.engine.cache_plan``): DP vs brute force, bounds, files. Pure Python."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from vllm_adapmoe.engine.cache_plan import (closed_form_curve, miss_curves_from_profile, plan_cost,
                                            plan_dp, plan_uniform)
from vllm_adapmoe.offline.plan_io import load_plan, plan_table, plot_plan, save_plan
from vllm_adapmoe.config import uniform_split


def _all_allocations(caps, total, lo):
    for s in itertools.product(*(range(lo, c + 1) for c in caps)):
        if sum(s) == total:
            yield list(s)


def _brute(curves, total, lo):
    """(min cost, lexicographically largest optimal allocation) by enumeration."""
    caps = [len(c) for c in curves]
    allocs = list(_all_allocations(caps, total, lo))
    costs = [sum(c[s - 1] for c, s in zip(curves, a)) for a in allocs]
    best = min(costs)
    return best, max(a for a, c in zip(allocs, costs) if c == best)


def _random_curves(rng, monotone, integer=False):
    curves = []
    for _ in range(rng.randint(2, 4)):
        e = rng.randint(2, 5)
        if integer:
            vals = [rng.randint(0, 4) for _ in range(e)]
        else:
            vals = [rng.random() * 3 for _ in range(e)]
        if monotone:
            vals.sort(reverse=True)
        curves.append(vals)
    return curves


@pytest.mark.parametrize("monotone", [True, False])
def test_dp_equals_brute_force(monotone):
    rng = random.Random(1234 + monotone)
    for _ in range(150):
        curves = _random_curves(rng, monotone)
        caps = [len(c) for c in curves]
        for lo in (1, 2) if min(caps) >= 2 else (1,):
            for total in range(lo * len(curves), sum(caps) + 1):
                slots = plan_dp(curves, total, lo=lo)
                assert sum(slots) == total
                assert all(lo <= s <= c for s, c in zip(slots, caps))
                best, _ = _brute(curves, total, lo)
                assert math.isclose(plan_cost(slots, curves), best, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("monotone", [True, False])
def test_dp_tie_break_is_lexicographically_largest(monotone):
    # Integer-valued curves: float sums are exact, so ties are real ties.
    rng = random.Random(99 + monotone)
    for _ in range(150):
        curves = _random_curves(rng, monotone, integer=True)
        for total in range(len(curves), sum(len(c) for c in curves) + 1):
            assert plan_dp(curves, total) == _brute(curves, total, 1)[1]


def test_tie_break_flat_curves_fill_earlier_layers_first():
    flat = [[1.0] * 4 for _ in range(3)]
    assert plan_dp(flat, 6) == [4, 1, 1]
    assert plan_dp(flat, 9) == [4, 4, 1]
    assert plan_dp(flat, 6, lo=2) == [2, 2, 2]


def test_infeasible_totals_raise():
    curves = [[3.0, 2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="too small"):
        plan_dp(curves, 1)
    with pytest.raises(ValueError, match="too small"):
        plan_dp(curves, 3, lo=2)
    with pytest.raises(ValueError, match="more than"):
        plan_dp(curves, 8)
    with pytest.raises(ValueError, match="lo"):
        plan_dp(curves, 7, lo=4)  # layer 1 has only 3 experts
    with pytest.raises(ValueError):
        plan_dp(curves, 4, lo=0)
    with pytest.raises(ValueError):
        plan_dp([[1.0, float("nan")]], 1)
    with pytest.raises(ValueError):
        plan_dp([], 1)
    assert plan_dp(curves, 2) == [1, 1] and plan_dp(curves, 7) == [4, 3]
    with pytest.raises(ValueError):
        plan_uniform(4, 8, 3)
    with pytest.raises(ValueError):
        plan_uniform(4, 8, 33)


def test_cost_non_increasing_in_budget():
    rng = random.Random(7)
    for _ in range(100):
        curves = _random_curves(rng, monotone=True)
        caps = [len(c) for c in curves]
        costs = [plan_cost(plan_dp(curves, t), curves)
                 for t in range(len(curves), sum(caps) + 1)]
        assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:]))


def test_steep_layer_gets_more_slots():
    e = 8
    steep = [4.0 * (1 - k / e) ** 0.5 for k in range(1, e + 1)]
    flat = [0.2 * (1 - k / e) for k in range(1, e + 1)]
    slots = plan_dp([flat, steep, flat], 12)
    assert slots[1] > slots[0] and slots[1] > slots[2]
    assert plan_cost(slots, [flat, steep, flat]) < plan_cost(plan_uniform(3, e, 12), [flat, steep, flat])


def test_dp_with_closed_form_curves_is_uniformish():
    # Equal linear curves: every split has the same cost; DP then fills earlier layers first.
    c = closed_form_curve(8, 2, 0.3, 0.5)
    slots = plan_dp([c] * 4, 16)
    assert sum(slots) == 16
    assert math.isclose(plan_cost(slots, [c] * 4), plan_cost(plan_uniform(4, 8, 16), [c] * 4))


def test_closed_form_curve():
    for e, top_k, r, p in [(8, 2, 0.0, 0.0), (8, 2, 0.4, 0.7), (16, 4, 0.9, 1.0), (1, 1, 1.0, 1.0)]:
        f = closed_form_curve(e, top_k, r, p)
        assert len(f) == e
        assert all(b <= a for a, b in zip(f, f[1:]))
        assert f[-1] == 0.0 and min(f) >= 0.0
    f = closed_form_curve(8, 2, 1.0, 0.0)
    assert all(math.isclose(f[k - 1], 1 - k / 8) for k in range(1, 9))
    f = closed_form_curve(8, 2, 0.5, 0.25)  # a = 1.5, minus 0.25 prefetched
    assert all(math.isclose(f[k - 1], 1.25 * (1 - k / 8)) for k in range(1, 9))
    for bad in [(0, 1, 0.5, 0.5), (8, 9, 0.5, 0.5), (8, 2, 1.5, 0.5), (8, 2, 0.5, -0.1)]:
        with pytest.raises(ValueError):
            closed_form_curve(*bad)


def test_miss_curves_from_profile():
    assert miss_curves_from_profile({"miss_curves": [[2, 1], [1.5, 0]]}) == [[2.0, 1.0], [1.5, 0.0]]
    with pytest.raises(ValueError, match="adapmoe profile"):
        miss_curves_from_profile({"sensitivity": [0.1]})


def test_plan_uniform_matches_uniform_split():
    for layers in range(1, 6):
        for total in range(layers, layers * 8 + 1):
            s = plan_uniform(layers, 8, total)
            assert s == uniform_split(total, layers) and sum(s) == total
    # unequal expert counts: a full layer's share spills over to the others
    s = plan_uniform(3, [2, 8, 8], 12)
    assert s == [2, 5, 5] and sum(s) == 12
    s = plan_uniform(3, [8, 2, 8], 13, lo=2)
    assert sum(s) == 13 and s[1] == 2 and all(2 <= x <= c for x, c in zip(s, [8, 2, 8]))


def test_plan_table():
    curves = [[1.0, 0.5, 0.0], [2.0, 1.0, 0.0]]
    table = plan_table([1, 2], curves)
    rows = [line.split() for line in table.splitlines()]
    assert rows[2] == ["0", "1", "1.0000"] and rows[3] == ["1", "2", "1.0000"]
    assert table.splitlines()[-1].split() == ["total", "3", "2.0000"]
    assert "-" in plan_table([1, 2], None).splitlines()[-1]


def test_save_load_round_trip(tmp_path):
    curves = [[1.0, 0.5, 0.0], [2.0, 1.0, 0.0]]
    path = save_plan(tmp_path / "sub" / "plan.json", [2, 2], "dp", 4, curves=curves,
                     extra={"budget": "cache_total_slots=4"})
    assert load_plan(path) == [2, 2]
    data = json.loads(path.read_text())
    assert data["method"] == "dp" and data["total_slots"] == 4 and data["slots"] == [2, 2]
    assert data["expected_misses_per_token"] == 1.5 and data["budget"] == "cache_total_slots=4"
    path2 = save_plan(tmp_path / "u.json", [3, 1], "uniform", 4)
    assert load_plan(path2) == [3, 1]
    assert json.loads(path2.read_text())["expected_misses_per_token"] is None
    with pytest.raises(ValueError):
        save_plan(tmp_path / "bad.json", [2, 2], "dp", 5)
    (tmp_path / "broken.json").write_text('{"slots": [1, 0]}')
    with pytest.raises(ValueError):
        load_plan(tmp_path / "broken.json")


def test_plot_plan(tmp_path):
    path = tmp_path / "plan.png"
    wrote = plot_plan([2, 1], [[1.0, 0.5], [2.0, 1.0]], path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert wrote is False and not path.exists()
    else:
        assert wrote is True and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_with_staging_gives_flat_layers_one_slot():
    """The budget pays for the shared staging row: where two layers gain nothing from a second
    slot, one slot each plus one staging row beats top_k slots everywhere."""
    from vllm_adapmoe.engine.cache_plan import plan_with_staging, staging_rows

    flat, steep = [0.5, 0.5, 0.5, 0.5], [2.0, 1.0, 0.4, 0.1]
    curves = [flat, flat, steep, steep]
    slots = plan_with_staging(8, 2, 4, lambda budget, lo: plan_dp(curves, budget, lo=lo),
                              lambda s: plan_cost(s, curves))
    assert slots == [1, 1, 3, 2] and staging_rows(slots, 2) == 1
    assert sum(slots) + staging_rows(slots, 2) == 8
    assert plan_cost(slots, curves) < plan_cost([2, 2, 2, 2], curves)
    # equal cost: no staging
    assert plan_with_staging(8, 2, 4, lambda budget, lo: plan_dp([steep] * 4, budget, lo=lo),
                             lambda s: plan_cost(s, [steep] * 4)) == [2, 2, 2, 2]
    # uniform below top_k per layer: one staging row, paid from the budget
    uniform = plan_with_staging(6, 2, 4, lambda budget, lo: plan_uniform(4, 8, budget, lo))
    assert uniform == [2, 1, 1, 1] and sum(uniform) + staging_rows(uniform, 2) == 6
    with pytest.raises(ValueError, match="staging"):
        plan_with_staging(4, 2, 4, lambda budget, lo: plan_uniform(4, 8, budget, lo))
