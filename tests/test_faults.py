"""Faults while serving, injected into the engine's copies: a transient failure is retried and
the tokens are unchanged; a persistent one, or a stuck copy, fails the step with one error
within its bound — never a hang, never a slot computed from data that did not land. A slow
(emulated) link never trips the timeout: the queue's expected durations are added to it."""

from __future__ import annotations

import time

import pytest
import torch

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
    """Each copy takes ~0.1 s on this emulated link, queues of several are common, and the
    timeout is 0.05 s beyond the queue: every step completes."""
    expected = _decode(_stack("cpu", None), BATCHES[:4], "cpu")
    stack = _offloaded(SHAPE.expert_bytes(2) / 0.1 / 1e9, copy_timeout_s=0.05, slots=2)
    assert torch.equal(_decode(stack, BATCHES[:4], "cpu"), expected)
    assert stack.stats()["total"]["stall_s"] > 0.2
