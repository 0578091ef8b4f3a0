"""More than one device: tensor parallelism (CPU, TP = 2, one OpenMP thread per rank).

Each rank keeps half of every expert (vLLM's w13/w2 split) in its own slots; routing is
replicated, so both ranks make the same residency decisions, and the partial outputs are
all-reduced as stock's MoE runner does — greedy tokens equal stock vLLM at TP = 2.
"""

import pytest

import vllm_adapmoe
from conftest import greedy
from test_exactness import assert_same


@pytest.fixture(scope="module")
def tp2_stock(engines, tiny_model):
    return greedy(engines.get(tiny_model, tp=2))


def test_tp2_offloaded_with_prefetch_matches_stock(engines, tiny_model, tp2_stock):
    llm = engines.get(tiny_model, "adapmoe", tp=2, cache_slots=2, prefetch=True)
    vllm_adapmoe.reset_stats(llm)
    assert_same(tp2_stock, greedy(llm))
    total = vllm_adapmoe.stats(llm)["total"]  # rank 0's counters (every rank decides alike)
    assert total["misses"] > 0 and total["prefetch_issued"] > 0


def test_tp_for_a_family_not_checked_yet_is_a_clear_error(engines, tmp_path):
    from tiny_model import build_tiny_moe

    with pytest.raises(Exception, match="tensor parallelism is supported for Mixtral so far"):
        engines.get(build_tiny_moe(tmp_path / "q3", "olmoe"), "adapmoe", tp=2)
