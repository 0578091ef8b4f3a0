"""With every expert resident (and with tiny caches), adapmoe = stock vLLM, token for token.

Tolerance for chosen-token logprobs: 1e-4 absolute. The plugin runs the same fused CPU kernel
on the same rows (bit-identical per token), so in practice the difference is exactly 0.
"""

import pytest

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


def test_tiny_batch_of_one_small_cache_matches_stock(engines, tiny_model):
    llm = engines.get(tiny_model, "adapmoe", cache_slots=1)
    for i in (0, 5, 8):
        assert greedy(llm, [PROMPTS[i]]) == greedy(engines.get(tiny_model), [PROMPTS[i]])


def test_bundled_all_resident_matches_stock(engines, bundled_model):
    assert_same(greedy(engines.get(bundled_model)), greedy(engines.get(bundled_model, "adapmoe")))
