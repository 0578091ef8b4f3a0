"""A short load + soak through `vllm serve --model-impl adapmoe` on the bundled model (offloaded
at half the experts, prefetch, gating; prefill chunked at 32 tokens): streamed requests, long
prompts, aborts mid-stream. Every request not aborted completes whole, none errors, the server
stays healthy and its counters consistent. The long run (10,000 requests, memory growth) is
``benchmarks/soak.py``; its figures are in README."""

import re
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402


def _run(tmp_path, requests: int, concurrency: int, soak_requests: int, short: int, long: int):
    log = tmp_path / "soak.log"
    proc, base = soak.start(soak.BUNDLED_MODEL, soak.DEFAULT_SETTINGS, log, eager=True,
                            extra=["--max-num-batched-tokens", "32"])
    try:
        soak.wait_ready(proc, base, log)
        prompts = soak.make_prompts((soak.BUNDLED / "heldout.txt").read_text(), short, long)
        result = soak.run(base, proc.pid, soak.BUNDLED_MODEL, prompts, requests, concurrency,
                          soak_requests, max_tokens=12, abort=0.2)
        metrics = httpx.get(f"{base}/metrics").text
        assert httpx.get(f"{base}/health").status_code == 200
        text = log.read_text()  # before shutdown, whose teardown logs are not the run's
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return result, metrics, text


def _check(phase: dict, requests: int) -> None:
    assert phase["n_errors"] == 0, phase["errors"]
    assert phase["completed"] + phase["aborted"] == requests
    assert phase["aborted"] > 0 and phase["completed"] > 0
    assert phase["short"] == 0  # every request not aborted got all its tokens


def test_short_soak_through_the_server(tmp_path):
    result, metrics, log = _run(tmp_path, requests=40, concurrency=16, soak_requests=60,
                                short=12, long=4)
    _check(result["load"], 40)
    _check(result["soak"], 60)
    assert "AdapMoE active" in log and "Traceback" not in log

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf'^adapmoe_{name}_total{{layer="\d+"}} (\S+)$',
                                                metrics, re.M))
    assert total("misses") > 0 and total("prefetch_issued") > 0
    assert total("activated_experts") < 2 * total("tokens")  # gating dropped experts
    assert total("prefetch_issued") >= total("prefetch_correct") + total("prefetch_wasted")


@pytest.mark.slow
def test_long_soak_memory_is_flat(tmp_path):
    result, _, _ = _run(tmp_path, requests=200, concurrency=64, soak_requests=2000, short=60,
                        long=20)
    _check(result["soak"], 2000)
    assert result["soak"]["rss_growth_mib"] < 100
