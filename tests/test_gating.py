"""Adaptive gating: the rule itself, its extremes, and the live path vs a reference of the rule."""

import pytest
import torch

import vllm_adapmoe
from conftest import PROMPTS, greedy
from vllm_adapmoe.engine.gating import AdaptiveGate
from vllm_adapmoe.engine.routing import Routing


def keep(weights, threshold, sensitivity, decode=None, gate_prefill=False):
    gate = AdaptiveGate(threshold, sensitivity, gate_prefill)
    w = torch.tensor(weights, dtype=torch.float32).sort(dim=1, descending=True).values
    return gate.experts_per_token(w, None if decode is None else torch.tensor(decode)).tolist()


def test_top2_rule_hand_worked():
    # w2 = 0.1, 0.3, 0.45; S = 0.5, T = 0.01: w2² S = 0.005 (drop), 0.045, 0.10125 (keep)
    assert keep([[0.9, 0.1], [0.7, 0.3], [0.55, 0.45]], 0.01, 0.5) == [1, 2, 2]
    # boundary is strict: w2² S == T keeps both
    assert keep([[0.5, 0.5]], 0.25, 1.0) == [2]
    assert keep([[0.9, 0.1]], 0.0, 1e9) == [2]  # T = 0 is stock top-k


def test_topk_generalisation_drops_trailing_while_cumulative_tail_is_cheap():
    # k = 3, S = 1, T = 0.05: tails (w2+w3, w3): (0.3, 0.1) → drop w3 only (0.01 < 0.05 <= 0.09)
    assert keep([[0.7, 0.2, 0.1]], 0.05, 1.0) == [2]
    # tails (0.15, 0.05): 0.0225 < 0.05 → keep just the first
    assert keep([[0.85, 0.1, 0.05]], 0.05, 1.0) == [1]


def test_prefill_tokens_untouched_unless_asked():
    w = [[0.9, 0.1], [0.9, 0.1]]
    assert keep(w, 1.0, 1.0, decode=[True, False]) == [1, 2]
    assert keep(w, 1.0, 1.0, decode=[True, False], gate_prefill=True) == [1, 1]


def test_gated_routing_renormalises_kept_weights():
    ids = torch.tensor([[3, 5], [2, 6]], dtype=torch.int32)
    weights = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    r = Routing.gated(ids, weights, AdaptiveGate(0.05, 1.0, True), None)
    assert r.keep.tolist() == [1, 2]
    assert r.expert_sets.tolist() == [[5, -1], [2, 6]]
    ids_k, w_k = r.kernel_args(None)
    # top-1: weight renormalised to 1; the dropped position repeats expert 5 with weight 0
    assert ids_k[0].tolist() == [5, 5] and w_k[0].tolist() == [1.0, 0.0]
    assert ids_k[1].tolist() == [2, 6]  # full top-2 keeps the router's order and weights
    assert w_k[1].tolist() == pytest.approx([0.6, 0.4])
    assert r.activated() == 3 and r.single_expert_tokens() == 1 and r.needed_experts() == [2, 5, 6]


def test_all_top1_step_runs_the_kernel_on_one_column():
    ids = torch.tensor([[3, 5], [2, 6]], dtype=torch.int32)
    r = Routing.gated(ids, torch.tensor([[0.2, 0.8], [0.9, 0.1]]), AdaptiveGate(1.0, 1.0, True), None)
    ids_k, w_k = r.kernel_args(None)
    assert ids_k.tolist() == [[5], [2]] and w_k.tolist() == [[1.0], [1.0]]


SENS = [1.0, 1.0, 1.0]


def test_huge_threshold_means_exactly_one_expert_per_token(engines, tiny_model):
    llm = engines.get(tiny_model, "adapmoe", cache_slots=1, threshold=1e9, sensitivity=SENS,
                      gate_prefill=True)
    vllm_adapmoe.reset_stats(llm)
    greedy(llm, PROMPTS, max_tokens=8)
    for layer in vllm_adapmoe.stats(llm)["layers"]:
        assert layer["activated_experts"] == layer["top1_tokens"] == layer["tokens"] > 0
        assert layer["hits"] + layer["misses"] > 0


def test_default_gates_decode_tokens_only(engines, tiny_model):
    llm = engines.get(tiny_model, "adapmoe", threshold=1e9, sensitivity=SENS)
    vllm_adapmoe.reset_stats(llm)
    greedy(llm, PROMPTS[:4], max_tokens=8)
    for layer in vllm_adapmoe.stats(llm)["layers"]:
        assert layer["top1_tokens"] == layer["decode_tokens"]
        assert layer["activated_experts"] == 2 * layer["tokens"] - layer["decode_tokens"]


def test_a_prompts_one_token_last_chunk_is_not_a_decode_token(tiny_model):
    """Chunked prefill at 16 tokens: a 33-token prompt ends in a one-token chunk. It is still
    a prompt token — not gated by default, not counted as decode — so gating cannot depend on
    where the scheduler cut the prompt; the next step's token is the first decode token."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(tiny_model), model_impl="adapmoe", enforce_eager=True, max_model_len=128,
              max_num_batched_tokens=16, max_num_seqs=16, kv_cache_memory_bytes=64 * 2**20,
              additional_config={"adapmoe": {"threshold": 1e9, "sensitivity": SENS}})
    try:
        vllm_adapmoe.reset_stats(llm)
        llm.generate([{"prompt_token_ids": list(range(5, 38))}],
                     SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
        for layer in vllm_adapmoe.stats(llm)["layers"]:
            assert layer["tokens"] == 34 and layer["decode_tokens"] == layer["top1_tokens"] == 1
    finally:
        llm.llm_engine.engine_core.shutdown()


# CI time: the larger threshold (more top-1 tokens) runs with -m slow
@pytest.mark.parametrize("threshold", [0.02, pytest.param(0.2, marks=pytest.mark.slow)])
def test_gated_offloaded_fused_path_equals_reference_loop(engines, bundled_model, threshold):
    """The live path (fused kernel, 2 slots, waves) = per-expert reference loop, all resident."""
    gating = dict(threshold=threshold, sensitivity=[1.0] * 6)
    fast = engines.get(bundled_model, "adapmoe", dtype="float32", cache_slots=2, **gating)
    ref = engines.get(bundled_model, "adapmoe", dtype="float32", kernel="reference", **gating)
    (tok_f, lp_f), (tok_r, lp_r) = greedy(fast), greedy(ref)
    assert tok_f == tok_r
    worst = max(abs(a - b) for x, y in zip(lp_f, lp_r) for a, b in zip(x, y))
    assert worst < 1e-3
    s = vllm_adapmoe.stats(fast)["total"]
    assert 0 < s["top1_tokens"] <= s["decode_tokens"]
