"""Faults while serving, injected into the engine's copies: a transient failure is retried and
the tokens are unchanged; a persistent one, or a stuck copy, fails the step with one error
within its bound — never a hang, never a slot computed from data that did not land. A slow
(emulated) link never trips the timeout: the queue's expected durations are added to it."""

from __future__ import annotations

import time

import pytest
import torch

import vllm_adapmoe
from test_engine import BATCHES, SHAPE, _decode, _stack
from vllm_adapmoe.engine.errors import ExpertCopyError
from vllm_adapmoe.engine.settings import EngineSettings
from vllm_adapmoe.engine.stack import ExpertStack


def _offloaded(gbps: float | None, copy_timeout_s: float = 60.0, slots=1) -> ExpertStack:
    """One own slot per layer + staging, same experts and routers as ``_stack``'s."""
    reference = _stack("cpu", None)
    stack = ExpertStack(SHAPE, [slots] * 4, EngineSettings(kernel="grouped", link_gbps=gbps,
                                                          copy_timeout_s=copy_timeout_s),
                        torch.device("cpu"), routers=[b.gate for b in reference.blocks],
                        stores=[b.store for b in reference.blocks])
    return stack


def _patch_copies(stack: ExpertStack, copy) -> None:
    for block in stack.blocks:
        original = block.cache._copy
        block.cache._copy = lambda e, s, original=original: copy(original, e, s)


@pytest.mark.parametrize("gbps", [None, 50.0])  # inline CPU copies, and the link's thread
def test_a_transient_copy_failure_is_retried(gbps):
    expected = _decode(_stack("cpu", None), BATCHES, "cpu")
    stack = _offloaded(gbps)
    failed: list[int] = []

    def flaky(original, expert, slot):  # the first copy of each of three experts fails once
        if expert not in failed and len(failed) < 3:
            failed.append(expert)
            raise RuntimeError("DMA error")
        original(expert, slot)
    _patch_copies(stack, flaky)
    assert torch.equal(_decode(stack, BATCHES, "cpu"), expected)
    assert len(failed) == 3 and stack.stats()["total"]["loads"] > 0


@pytest.mark.parametrize("gbps", [None, 50.0])
def test_a_persistent_copy_failure_fails_the_step(gbps):
    stack = _offloaded(gbps)

    def broken(original, expert, slot):
        raise RuntimeError("DMA error")
    _patch_copies(stack, broken)
    with pytest.raises(ExpertCopyError, match=r"failed twice \(DMA error\)"):
        _decode(stack, BATCHES, "cpu")
    for block in stack.blocks:  # the failed step released its staging rows
        table = block.cache.table
        assert all(e == -1 for e in table.expert_in_slot[table.own:])


def test_a_stuck_copy_fails_the_step_within_its_timeout():
    stack = _offloaded(1000.0, copy_timeout_s=0.5)

    def stuck(original, expert, slot):
        time.sleep(5)
        original(expert, slot)
    _patch_copies(stack, stuck)
    start = time.perf_counter()
    with pytest.raises(ExpertCopyError, match=r"has not finished after .*\(copy_timeout_s = 0.5"):
        _decode(stack, BATCHES, "cpu")
    assert time.perf_counter() - start < 3


def test_a_slow_emulated_link_never_trips_the_timeout():
    """Each copy takes ~0.1 s on this emulated link, a step often waits for a queue of several,
    longer than the timeout, and the timeout is 0.15 s beyond the queue: every step completes.
    (0.15 s of slack: on a loaded 2-core machine a copy thread can start ~0.1 s late.)"""
    expected = _decode(_stack("cpu", None), BATCHES[:4], "cpu")
    stack = _offloaded(SHAPE.expert_bytes(2) / 0.1 / 1e9, copy_timeout_s=0.15, slots=2)
    waits: list[float] = []
    for block in stack.blocks:
        def timed(pending, wait=block.cache.wait):
            start = time.perf_counter()
            wait(pending)
            waits.append(time.perf_counter() - start)
        block.cache.wait = timed
    assert torch.equal(_decode(stack, BATCHES[:4], "cpu"), expected)
    assert stack.stats()["total"]["stall_s"] > 0.2
    assert max(waits) > 0.15  # one wait outlasted the bare timeout: the queue's time counted


# -- inside vLLM: faults injected into the workers' copies (``engine/fault_injection.py``) ------

# test_prefetch's layout, in an engine of its own (copy_timeout_s keeps the key apart): its
# predictor scores after these aborts would change test_prefetch's pay-off decisions
PREFETCHING = dict(cache_slots=[2, 1, 2], prefetch=True, link_layers=1, prefetch_lookahead=2,
                   copy_timeout_s=30.0)


def test_a_transient_copy_fault_in_vllm_is_retried(engines, tiny_model):
    """A copy that fails once is retried in the worker: the requests complete, tokens equal
    stock's, and the layers are left clean."""
    from conftest import PROMPTS, greedy

    llm = engines.get(tiny_model, "adapmoe", cache_slots=1)
    vllm_adapmoe.reset_stats(llm)
    llm.collective_rpc("adapmoe_inject_copy_fault", args=("transient", 3))
    try:
        ours = greedy(llm, PROMPTS[:4], 8)
    finally:
        llm.collective_rpc("adapmoe_inject_copy_fault", args=("off",))
    assert ours[0] == greedy(engines.get(tiny_model), PROMPTS[:4], 8)[0]
    assert vllm_adapmoe.stats(llm)["total"]["loads"] > 0
    assert llm.collective_rpc("adapmoe_idle_problems") == [[]]


def _dies_with_its_requests(engines, model, fault: tuple, capfd, **settings) -> str:
    """Start an engine in processes (one that dies in-process takes the test process's vLLM
    state with it), inject ``fault`` (a worker call and its args), generate: vLLM's
    EngineDeadError within 30 s and the engine reporting itself dead. Returns the log."""
    from vllm import SamplingParams
    from vllm.v1.engine.exceptions import EngineDeadError

    from conftest import PROMPTS

    llm = engines.get(model, "adapmoe", processes=True, **settings)
    engines.forget(llm)  # this engine will not survive the test
    try:
        llm.collective_rpc(fault[0], args=fault[1:])
        start = time.perf_counter()
        with pytest.raises(EngineDeadError):
            llm.generate(PROMPTS[:4], SamplingParams(temperature=0.0, max_tokens=8),
                         use_tqdm=False)
        assert time.perf_counter() - start < 30
        assert llm.llm_engine.engine_core.resources.engine_dead
    finally:
        llm.llm_engine.engine_core.shutdown()
    out, err = capfd.readouterr()
    return out + err


def test_a_stuck_copy_in_vllm_fails_the_requests_within_the_timeout(engines, tiny_model, capfd):
    """A copy that hangs (on the link's thread) ends the step after ``copy_timeout_s``: the caller
    gets vLLM's EngineDeadError (its requests fail, the engine reports itself dead) within
    seconds, the worker's log names the stuck copy — never a hang."""
    stuck = ("adapmoe_inject_copy_fault", "stuck", 0, 60.0)
    log = _dies_with_its_requests(engines, tiny_model, stuck, capfd, cache_slots=1,
                                  copy_timeout_s=1.0, link_gbps=100.0)
    assert "has not finished after" in log and "copy_timeout_s = 1" in log


def test_a_failing_host_computation_in_vllm_fails_the_requests(engines, tiny_model, capfd):
    """Hybrid "host-only" with 1 slot a layer: every step computes tokens on the host. When that
    computation raises, the step fails, the caller gets vLLM's EngineDeadError within seconds and
    the worker's log names the error — never a hang, never a silently wrong token."""
    log = _dies_with_its_requests(engines, tiny_model, ("adapmoe_inject_host_fault", True), capfd,
                                  cache_slots=1, hybrid="host-only")
    assert "injected host kernel error" in log


def test_aborts_under_load_leave_no_slot_held(engines, tiny_model):
    """Sixteen requests with prefetch and a staging row; half are aborted mid-decode. The rest
    complete, no layer holds a staging row or an unlanded copy after, the prefetch counters
    still add up, and the engine then decodes exactly as stock."""
    from vllm import SamplingParams

    from conftest import PROMPTS, greedy

    llm = engines.get(tiny_model, "adapmoe", **PREFETCHING)
    engine = llm.llm_engine
    vllm_adapmoe.reset_stats(llm)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"load-{i}", prompt, params)
    finished: dict[str, int] = {}
    aborted = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
        if not aborted and vllm_adapmoe.stats(llm)["total"]["decode_tokens"] > 0:
            engine.abort_request([f"load-{i}" for i in range(0, len(PROMPTS), 2)])
            aborted = True
    assert aborted
    survivors = {f"load-{i}" for i in range(1, len(PROMPTS), 2)}
    assert survivors <= set(finished) and all(finished[r] == 24 for r in survivors)
    assert llm.collective_rpc("adapmoe_idle_problems") == [[]]
    total = vllm_adapmoe.stats(llm)["total"]
    assert total["prefetch_issued"] > 0
    assert total["prefetch_issued"] == (total["prefetch_correct"] + total["prefetch_wasted"]
                                        + total["prefetch_dropped"])
    assert greedy(llm, PROMPTS[:4], 8)[0] == greedy(engines.get(tiny_model), PROMPTS[:4], 8)[0]
