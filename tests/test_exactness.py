"""With every expert resident (and with tiny caches), adapmoe = stock vLLM, token for token.

Tolerance for chosen-token logprobs: 1e-4 absolute. The plugin runs the same fused CPU kernel
on the same rows (bit-identical per token), so in practice the difference is exactly 0.
"""

import pytest

import vllm_adapmoe
from conftest import PROMPTS, greedy

LOGPROB_TOL = 1e-4


def assert_same(stock, ours, prompts: int = len(PROMPTS), tokens: int = 32):
    tokens_s, lp_s = stock
    tokens_o, lp_o = ours
    assert len(tokens_s) == len(tokens_o) == prompts
    for i, (a, b) in enumerate(zip(tokens_s, tokens_o)):
        assert len(a) == len(b) == tokens
        assert a == b, f"prompt {i} diverged: stock {a} vs adapmoe {b}"
    worst = max(abs(x - y) for ls, lo in zip(lp_s, lp_o) for x, y in zip(ls, lo))
    assert worst <= LOGPROB_TOL, f"logprob difference {worst} > {LOGPROB_TOL}"


@pytest.fixture(scope="module")
def tiny_stock(engines, tiny_model):
    return greedy(engines.get(tiny_model))


def test_tiny_all_resident_matches_stock(engines, tiny_model, tiny_stock):
    assert_same(tiny_stock, greedy(engines.get(tiny_model, "adapmoe")))


@pytest.mark.parametrize("slots", [1, 2])
def test_tiny_small_cache_matches_stock(engines, tiny_model, tiny_stock, slots):
    llm = engines.get(tiny_model, "adapmoe", cache_slots=slots)
    assert_same(tiny_stock, greedy(llm))


def test_worker_processes_match_in_process_stock(engines, tiny_model, tiny_stock):
    """The shared engines run inside the test process; users' ``LLM(...)`` spawns an EngineCore
    and a worker. The plugin there, at 1 slot, gives the same tokens (and it offloaded)."""
    llm = engines.get(tiny_model, "adapmoe", cache_slots=1, processes=True)
    vllm_adapmoe.reset_stats(llm)
    assert_same(tiny_stock, greedy(llm))
    assert vllm_adapmoe.stats(llm)["total"]["misses"] > 0
    assert type(llm.llm_engine.engine_core).__name__ == "SyncMPClient"


def test_tiny_batch_of_one_small_cache_matches_stock(engines, tiny_model):
    llm = engines.get(tiny_model, "adapmoe", cache_slots=1)
    for i in (0, 5, 8):
        assert greedy(llm, [PROMPTS[i]]) == greedy(engines.get(tiny_model), [PROMPTS[i]])


def test_bundled_all_resident_matches_stock(engines, bundled_model):
    assert_same(greedy(engines.get(bundled_model)), greedy(engines.get(bundled_model, "adapmoe")))


# prompts that repeat themselves, so the n-gram proposer has something to propose
REPEATING = ["the quick brown fox jumps over the lazy dog the quick brown fox",
             "experts route tokens experts route tokens", "a mixture of a mixture of a mixture of",
             "the lazy dog while experts route", "to be or not to be, to be or not",
             "the hot ones the hot ones the", "O fox O fox O", "layers of layers of"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}


def test_ngram_speculative_decoding_matches_stock(engines, tiny_model):
    """vLLM's n-gram proposer (no draft model): verify steps carry up to 4 tokens per request, all
    computed whole by the block (not gated). At 2 slots + prefetch, tokens equal stock's with the
    same speculation, and verify steps did run (more non-decode tokens than the prompts have)."""
    stock = engines.get(tiny_model, speculative=NGRAM)
    ours = engines.get(tiny_model, "adapmoe", speculative=NGRAM, cache_slots=2, prefetch=True,
                       link_layers=1)
    vllm_adapmoe.reset_stats(ours)
    assert_same(greedy(stock, REPEATING, 24), greedy(ours, REPEATING, 24), len(REPEATING), 24)
    tokenizer = ours.get_tokenizer()
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in REPEATING)
    layer = vllm_adapmoe.stats(ours)["layers"][0]
    assert layer["tokens"] - layer["decode_tokens"] > prompt_tokens
    assert layer["misses"] > 0
