"""Emulated hardware for CPU experiments: this machine's clock stretched to a named preset's physics.

On a CPU-only machine "host" and "device" are the same cores and the same memory, so a copy over
the link is a memcpy and a host computation is as fast as a device one: emulating only the link
(``link_gbps``) makes computing a cold expert on the host look free. An ``emulate`` preset fixes
the ratios that matter instead, from published figures of a real machine:

  * one expert's time on the *device* (reading its bytes at the device's memory bandwidth) is
    what the kernel on the slots takes here: it is measured at start-up (``calibrate``), and
    ``scale`` = that ÷ the preset device's time for it;
  * every emulated duration is the preset's physical time × ``scale``: a copy (bytes ÷ link
    bandwidth), a host computation (bytes ÷ host bandwidth + flops ÷ host flop rate, per expert
    and summed over the step's host experts: they share one memory bus). The engine pads the
    real work with sleeps to those durations (the link in ``link.py``, the host in
    ``execute.py``). Two runs to be compared should share one clock: ``emulate_scale`` pins it.

The host's real work still runs on these cores, inside the device's time: a pessimistic detail
for hybrid rows (a few % at the presets' ratios). Results measured this way are labelled
"emulated <preset>".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class HardwarePreset:
    name: str
    link_gbps: float       # host→device copies, pinned memory (GB/s)
    device_gbps: float     # device memory bandwidth (GB/s)
    device_tflops: float   # device bf16 dense tensor rate (TFLOP/s)
    host_gbps: float       # host memory bandwidth, sustained (GB/s)
    host_tflops: float     # host bf16 matmul rate (TFLOP/s)
    sources: str


PRESETS: dict[str, HardwarePreset] = {
    "h100-pcie4": HardwarePreset(
        "h100-pcie4", link_gbps=25.0, device_gbps=3350.0, device_tflops=989.0,
        host_gbps=150.0, host_tflops=5.0,
        sources="NVIDIA H100 SXM5 datasheet (3.35 TB/s HBM3, 989 TFLOP/s bf16 dense); PCIe Gen4 "
                "x16 is 32 GB/s per direction, ~25 GB/s measured for pinned copies (CUDA "
                "bandwidthTest); one server socket of 8-channel DDR5-4800 (307 GB/s peak, ~150 "
                "GB/s sustained) with AMX bf16 (~5 TFLOP/s)"),
    "rtx4090-pcie4": HardwarePreset(
        "rtx4090-pcie4", link_gbps=25.0, device_gbps=1008.0, device_tflops=165.0,
        host_gbps=60.0, host_tflops=1.0,
        sources="NVIDIA Ada whitepaper, RTX 4090 (1,008 GB/s GDDR6X, 165 TFLOP/s bf16 dense with "
                "fp32 accumulate); PCIe Gen4 x16 as above; a desktop with dual-channel DDR5 "
                "(~90 GB/s peak, ~60 GB/s sustained) and AVX-512/AVX2 bf16 (~1 TFLOP/s)"),
}


class Emulation:
    """The preset's durations on this machine's clock for experts of ``expert_bytes`` bytes and
    ``expert_flops`` flops per token (2 · 3 · hidden · intermediate for a SwiGLU expert)."""

    def __init__(self, preset: HardwarePreset, expert_bytes: int, expert_flops: int,
                 scale: float | None = None) -> None:
        self.preset = preset
        self.expert_bytes, self.expert_flops = expert_bytes, expert_flops
        # pinned (two runs compared on one clock), else measured by ``calibrate``
        self.scale: float | None = scale
        self.device_expert_s: float | None = None if scale is None else scale * self.preset_device_s()

    @property
    def label(self) -> str:
        return f"emulated {self.preset.name}"

    def preset_device_s(self, tokens: int = 1) -> float:
        p = self.preset
        return self.expert_bytes / (p.device_gbps * 1e9) + self.expert_flops * tokens / (p.device_tflops * 1e12)

    def calibrate(self, run_one_expert: Callable[[], None], seconds: float = 2.0,
                  warmup_s: float = 0.2, batch_s: float = 0.002) -> None:
        """``run_one_expert()`` computes one expert for one token on the device slots. After
        ``warmup_s`` of calls, batches of calls lasting ~``batch_s`` are timed for ``seconds``;
        the device time is the fastest batch's mean call.

        Why the fastest, over seconds: one call is short (~0.02 ms here) and the machines these
        runs share swing between phases ~1.4x apart that last from a fraction of a second to
        several. The median of 21 single calls, taken within a few milliseconds, put the same
        model on the same machine at x484 and at x261 in two starts; the fastest batch over two
        seconds lands in a fast phase nearly every time."""
        deadline = time.perf_counter() + warmup_s
        while time.perf_counter() < deadline:
            run_one_expert()
        start = time.perf_counter()
        run_one_expert()
        per_batch = max(1, int(batch_s / max(time.perf_counter() - start, 1e-7)))
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while True:
            start = time.perf_counter()
            for _ in range(per_batch):
                run_one_expert()
            now = time.perf_counter()
            best = min(best, (now - start) / per_batch)
            if now >= deadline:
                break
        self.device_expert_s = best
        self.scale = self.device_expert_s / self.preset_device_s()

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def _scaled(self, seconds: float) -> float:
        if self.scale is None:
            raise RuntimeError("Emulation.calibrate must run before emulated durations are read")
        return seconds * self.scale

    @property
    def link_bytes_per_s(self) -> float:
        """The emulated link's rate on this machine's clock."""
        return self.preset.link_gbps * 1e9 / self._scaled(1.0)

    def copy_s(self, nbytes: int) -> float:
        return self._scaled(nbytes / (self.preset.link_gbps * 1e9))

    def host_s(self, tokens: int) -> float:
        """One expert computed on the host for ``tokens`` tokens (0 tokens: nothing to compute)."""
        if tokens <= 0:
            return 0.0
        p = self.preset
        return self._scaled(self.expert_bytes / (p.host_gbps * 1e9)
                            + self.expert_flops * tokens / (p.host_tflops * 1e12))

    def describe(self) -> str:
        if self.scale is None:
            return self.label
        return (f"{self.label} (x{self.scale:.0f}: one expert on the device "
                f"{self.device_expert_s * 1e3:.3f} ms here; a load "
                f"{self.copy_s(self.expert_bytes) * 1e3:.2f} ms, on the host "
                f"{self.host_s(1) * 1e3:.2f} ms for 1 token)")


def make_emulation(name: str | None, expert_bytes: int, hidden: int,
                   intermediate: int, scale: float | None = None) -> Emulation | None:
    if name is None:
        return None
    return Emulation(PRESETS[name], expert_bytes, 6 * hidden * intermediate, scale)
