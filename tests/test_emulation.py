"""Emulated hardware presets: durations from the preset's physics on this machine's measured
scale; the engine pads copies and host work to them; tokens stay those of all resident."""

from __future__ import annotations

import time

import pytest
import torch

from test_engine import BATCHES, SHAPE, _decode, _stack
from vllm_adapmoe.config import frequency_order
from vllm_adapmoe.engine.emulation import PRESETS, Emulation, make_emulation
from vllm_adapmoe.engine.settings import EngineSettings
from vllm_adapmoe.engine.stack import ExpertStack

H100 = PRESETS["h100-pcie4"]
EXPERT_BYTES = 3 * 4096 * 14336 * 2  # one Mixtral-8x7B expert, bf16


def test_preset_physics_at_mixtral_shape():
    """Scale 1 is the preset itself: a load ~14 ms, the expert on the host ~2.4 ms, on the
    device ~0.1 ms (the figures the presets are made of)."""
    emu = make_emulation("h100-pcie4", EXPERT_BYTES, 4096, 14336)
    emu.scale = 1.0
    assert emu.copy_s(EXPERT_BYTES) == pytest.approx(EXPERT_BYTES / 25e9)
    assert 0.013 < emu.copy_s(EXPERT_BYTES) < 0.015
    assert 0.0023 < emu.host_s(1) < 0.0025 and emu.host_s(0) == 0.0
    # memory-bound: 4 tokens cost little more than 1
    assert emu.host_s(4) < 1.1 * emu.host_s(1)
    assert 0.0001 < emu.preset_device_s() < 0.00011
    slower = make_emulation("rtx4090-pcie4", EXPERT_BYTES, 4096, 14336)
    slower.scale = 1.0
    assert slower.host_s(1) > emu.host_s(1) and slower.copy_s(1) == emu.copy_s(1)


def test_calibration_scales_every_duration():
    emu = Emulation(H100, EXPERT_BYTES, 6 * 4096 * 14336)
    with pytest.raises(RuntimeError, match="calibrate"):
        emu.copy_s(1)
    calls = []
    emu.calibrate(lambda: (calls.append(1), time.sleep(0.002)), seconds=0.05, warmup_s=0.01)
    assert emu.scale == pytest.approx(emu.device_expert_s / emu.preset_device_s())
    assert 0.002 <= emu.device_expert_s < 0.02 and len(calls) >= 10
    assert emu.copy_s(EXPERT_BYTES) == pytest.approx(EXPERT_BYTES / 25e9 * emu.scale)
    assert emu.link_bytes_per_s == pytest.approx(25e9 / emu.scale)
    assert "emulated h100-pcie4" in emu.describe()


def test_calibration_takes_the_machines_fast_phase():
    """A shared machine swings between slower and faster phases lasting up to seconds: the
    clock is the fastest batch over the whole window, not the first calls' median."""
    emu = Emulation(H100, EXPERT_BYTES, 6 * 4096 * 14336)
    start = time.perf_counter()
    emu.calibrate(lambda: time.sleep(0.004 if time.perf_counter() - start < 0.15 else 0.001),
                  seconds=0.3, warmup_s=0.01)
    assert 0.001 <= emu.device_expert_s < 0.003


def test_a_pinned_scale_is_used_as_given_and_never_measured():
    """``emulate_scale``: two servers compared side by side run on one clock."""
    emu = make_emulation("h100-pcie4", EXPERT_BYTES, 4096, 14336, scale=440.0)
    assert emu.calibrated and emu.scale == 440.0
    assert emu.copy_s(EXPERT_BYTES) == pytest.approx(EXPERT_BYTES / 25e9 * 440.0)
    assert emu.device_expert_s == pytest.approx(440.0 * emu.preset_device_s())
    assert "(x440:" in emu.describe()
    reference = _stack("cpu", None)
    stack = ExpertStack(SHAPE, [2] * 4, EngineSettings(emulate="h100-pcie4", emulate_scale=7.0,
                                                       kernel="grouped"),
                        torch.device("cpu"), routers=[b.gate for b in reference.blocks],
                        stores=[b.store for b in reference.blocks])
    # the stack's warm-up calibrates an unpinned emulation; this one keeps its scale
    assert torch.equal(_decode(stack, [1, 2], "cpu"), _decode(reference, [1, 2], "cpu"))
    assert stack.link.emulation.scale == 7.0 and stack.link.bytes_per_s == pytest.approx(25e9 / 7)


def _emulated(scale: float) -> Emulation:
    """The test shape's experts on a fixed scale (no timing noise in what is padded)."""
    emu = make_emulation("h100-pcie4", SHAPE.expert_bytes(2), SHAPE.hidden, SHAPE.intermediate)
    emu.scale = scale
    return emu


@pytest.mark.parametrize("hybrid", ["off", "auto", "host-only"])
def test_emulated_stack_equals_all_resident_and_takes_the_emulated_time(hybrid):
    """Copies take the preset's link time and host work the preset's host time on this scale
    (a load 20 ms, one expert on the host ~3.4 ms): outputs are all resident's, and the run
    lasts at least its host time and its stalls (each layer waits for both, side by side)."""
    expected = _decode(_stack("cpu", None), BATCHES, "cpu")
    emu = _emulated(0.02 / (SHAPE.expert_bytes(2) / 25e9))
    reference = _stack("cpu", None)
    stack = ExpertStack(SHAPE, [2] * 4, EngineSettings(hybrid=hybrid, emulate="h100-pcie4", kernel="grouped"),
                        torch.device("cpu"), routers=[b.gate for b in reference.blocks],
                        stores=[b.store for b in reference.blocks], emulation=emu)
    assert stack.link.bytes_per_s == emu.link_bytes_per_s and not stack.link.cpu_free
    start = time.perf_counter()
    out = _decode(stack, BATCHES, "cpu")
    elapsed = time.perf_counter() - start
    assert torch.equal(out, expected)
    total = stack.stats()["total"]
    assert elapsed >= 0.95 * max(total["stall_s"], total["host_s"])
    if hybrid == "off":  # every load is waited for, one after another
        assert total["host_tokens"] == 0 and total["loads"] > 0
        assert total["stall_s"] >= 0.95 * total["loads"] * emu.copy_s(SHAPE.expert_bytes(2))
    else:  # host time is the preset's: at least one expert's for each host expert of a step
        assert total["host_experts"] > 0
        assert total["host_s"] >= total["host_experts"] * emu.host_s(1) * 0.999
    if hybrid == "host-only":
        assert total["loads"] == 0


def test_hybrid_beats_loading_when_a_load_costs_many_layers():
    """The point of hybrid execution, in miniature: on the emulated H100, batch-1 decode at 2
    of 8 slots spends far less time waiting with hybrid "auto" than loading every miss."""
    reference = _stack("cpu", None)
    times = {}
    for hybrid in ("off", "auto"):
        stack = ExpertStack(SHAPE, [2] * 4, EngineSettings(hybrid=hybrid, emulate="h100-pcie4", kernel="grouped"),
                            torch.device("cpu"), routers=[b.gate for b in reference.blocks],
                            stores=[b.store for b in reference.blocks],
                            emulation=_emulated(0.01 / (SHAPE.expert_bytes(2) / 25e9)))
        start = time.perf_counter()
        _decode(stack, [1] * 6, "cpu")
        times[hybrid] = time.perf_counter() - start
        total = stack.stats()["total"]
        assert (total["host_experts"] > 0) == (hybrid == "auto")
    assert times["auto"] < times["off"]


def test_host_only_placement_keeps_the_most_frequent_experts():
    assert frequency_order([0.1, 0.4, 0.0, 0.4, 0.1]) == [1, 3, 0, 4, 2]
    reference = _stack("cpu", None)
    stack = ExpertStack(SHAPE, [2] * 4, EngineSettings(hybrid="host-only", kernel="grouped"),
                        torch.device("cpu"),
                        routers=[b.gate for b in reference.blocks])
    for block in stack.blocks:
        block.placement = [5, 3, 1]
    stack.load_random(seed=1)
    assert all(sorted(b.cache.slot_of) == [3, 5] for b in stack.blocks)
    assert torch.equal(_decode(stack, BATCHES, "cpu"), _decode(reference, BATCHES, "cpu"))
    assert stack.stats()["total"]["loads"] == 0
    assert all(sorted(b.cache.slot_of) == [3, 5] for b in stack.blocks)  # fixed: never moves
