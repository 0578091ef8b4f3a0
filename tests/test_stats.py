"""Counters users and benchmarks rely on (README, "Statistics") are consistent with each other."""

import vllm_adapmoe
from conftest import PROMPTS, greedy


def test_counters_consistent_under_small_cache(engines, tiny_model):
    llm = engines.get(tiny_model, "adapmoe", cache_slots=2)
    vllm_adapmoe.reset_stats(llm)
    greedy(llm, PROMPTS, max_tokens=8)
    s = vllm_adapmoe.stats(llm)
    assert len(s["layers"]) == 3
    for layer in s["layers"]:
        assert layer["slots"] == 2
        assert layer["tokens"] > layer["decode_tokens"] > 0
        assert layer["activated_experts"] == 2 * layer["tokens"]  # top-2, no gating
        assert layer["misses"] > 0 and layer["hits"] >= 0
        # each miss needs a load; waves may reload an expert evicted earlier in the same step
        assert layer["loads"] >= layer["misses"]
        assert layer["bytes_loaded"] == layer["loads"] * layer["expert_bytes"]
        assert layer["stall_s"] > 0
        assert layer["prefetch_issued"] == layer["prefetch_correct"] == 0
    total = s["total"]
    for key in ("tokens", "hits", "misses", "loads", "bytes_loaded"):
        assert total[key] == sum(layer[key] for layer in s["layers"])


def test_hits_plus_misses_is_distinct_experts_needed(engines, tiny_model):
    # One prompt, one decode step at a time: a decode token needs exactly 2 distinct experts
    # per layer, so hits + misses = 2 per layer per decode step.
    llm = engines.get(tiny_model, "adapmoe", cache_slots=2)
    vllm_adapmoe.reset_stats(llm)
    greedy(llm, [PROMPTS[2]], max_tokens=6)
    for layer in vllm_adapmoe.stats(llm)["layers"]:
        prefill_steps = layer["steps"] - layer["decode_tokens"]
        assert layer["decode_tokens"] == 5  # the first new token comes from the prefill step
        assert prefill_steps == 1
        decode_needed = 2 * layer["decode_tokens"]
        assert decode_needed < layer["hits"] + layer["misses"] <= decode_needed + 8


def test_all_resident_second_identical_request_has_no_misses(engines, tiny_model):
    llm = engines.get(tiny_model, "adapmoe")
    greedy(llm, [PROMPTS[3]], max_tokens=8)
    vllm_adapmoe.reset_stats(llm)
    greedy(llm, [PROMPTS[3]], max_tokens=8)
    total = vllm_adapmoe.stats(llm)["total"]
    assert total["misses"] == total["loads"] == total["bytes_loaded"] == 0
    assert total["hits"] > 0 and total["hit_rate"] == 1.0


def test_reset_zeroes_everything(engines, tiny_model):
    llm = engines.get(tiny_model, "adapmoe", cache_slots=1)
    greedy(llm, [PROMPTS[0]], max_tokens=2)
    vllm_adapmoe.reset_stats(llm)
    total = vllm_adapmoe.stats(llm)["total"]
    assert all(total[k] == 0 for k in ("tokens", "hits", "misses", "loads", "stall_s", "steps"))


def test_slot_memory_scales_with_budget_not_experts(engines, tiny_model):
    per_slot, staging = {}, {}
    for slots in (1, 2, None):
        llm = engines.get(tiny_model, "adapmoe", **({"cache_slots": slots} if slots else {}))
        layers = vllm_adapmoe.stats(llm)["layers"]
        layer = layers[0]
        per_slot[layer["slots"]] = layer["slot_bytes"]
        staging[layer["slots"]] = [x["staging_bytes"] for x in layers]
        assert layer["slot_bytes"] == layer["slots"] * layer["expert_bytes"]
    assert sorted(per_slot) == [1, 2, 8]
    assert per_slot[8] == 4 * per_slot[2] == 8 * per_slot[1]
    # 1 slot per layer of a top-2 model: one staging row shared by all 3 layers, reported once
    assert staging[1] == [per_slot[1], 0, 0] and staging[2] == staging[8] == [0, 0, 0]
