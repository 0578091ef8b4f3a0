"""Held-out perplexity through a running engine (stock or adapmoe), via vLLM's prompt logprobs.

Every window is scored as a prompt (``prompt_logprobs=0`` returns the log-probability of each
actual next token), so this measures exactly what the engine computes — including gating when
``gate_prefill`` is on (all scored tokens are prefill tokens).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def heldout_text() -> str:
    return (Path(__file__).parents[1] / "bundled" / "heldout.txt").read_text()


def token_windows(tokenizer: Any, text: str, window: int = 256, max_tokens: int = 16384) -> list[list[int]]:
    ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]


def perplexity(llm: Any, windows: list[list[int]]) -> dict[str, float]:
    """Mean next-token NLL over all windows (first token of each window unscored)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll, n = 0.0, 0
    for out, ids in zip(outs, windows):
        for tok, lp in zip(ids[1:], out.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            n += 1
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}


def measure_gating(llm: Any, windows: list[list[int]], threshold: float,
                   sensitivity: list[float] | None = None) -> dict[str, float]:
    """Perplexity and activated experts of a running adapmoe ``llm`` at gating budget T
    (``sensitivity`` None keeps the engine's S_l). One row of a gating sweep."""
    import vllm_adapmoe

    vllm_adapmoe.set_gating(llm, threshold, sensitivity)
    vllm_adapmoe.reset_stats(llm)
    row = {"threshold": threshold, **perplexity(llm, windows)}
    total = vllm_adapmoe.stats(llm)["total"]
    row["activated_per_token_layer"] = total["activated_experts"] / total["tokens"]
    row["top1_fraction"] = total["top1_tokens"] / total["tokens"]
    return row
