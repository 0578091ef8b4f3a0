"""Per-layer device cache: a few expert "slots", an expert→slot map and an eviction policy.

The slots are one stacked tensor per weight (``[S, 2I, H]`` and ``[S, H, I]`` in the kernel's
layout) so a layer computes every resident expert with a single fused-kernel call on slot ids.
Experts the current wave needs are never evicted.

Loads are asynchronous: ``start_loads`` books slots (evicting in the caller's thread, so the
bookkeeping is never racy) and hands the copies to one loader thread (CPU) or a side copy stream
(CUDA, pinned host memory); ``wait`` blocks until they land and counts that time as stall.
One loader = one link: with ``link_gbps`` (GB/s) each copy is stretched to what it would take
over that link, so back-to-back loads queue like they would on PCIe (an *emulated* link).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vllm_adapmoe.expert_store import HostExpertStore
from vllm_adapmoe.metrics import LayerStats
from vllm_adapmoe.slot_table import SlotTable, make_policy


class ExpertCache:
    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device,
                 policy: str, stats: LayerStats, link_gbps: float | None = None) -> None:
        self.store = store
        self.num_slots = num_slots
        self.device = device
        self.stats = stats
        self.link_bytes_per_s = link_gbps * 1e9 if link_gbps else None  # GB/s
        self.table = SlotTable(num_slots, make_policy(policy), stats)
        # Allocated at construction so vLLM's memory profiling counts them before sizing KV.
        self.w13 = torch.zeros((num_slots, *store.w13.shape[1:]), dtype=store.w13.dtype, device=device)
        self.w2 = torch.zeros((num_slots, *store.w2.shape[1:]), dtype=store.w2.dtype, device=device)
        self._slot_map = torch.zeros(store.num_experts, dtype=torch.int32, device=device)
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None  # CUDA copy stream, created with the loader

    @property
    def slot_of(self) -> dict[int, int]:
        return self.table.slot_of

    @property
    def slot_map(self) -> torch.Tensor:
        """expert id → slot id (int32); valid for resident experts."""
        return self._slot_map

    @property
    def device_bytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()

    # -- what the MoE layer calls -------------------------------------------------------------
    def count_step(self, needed: list[int]) -> None:
        self.table.count_step(needed)

    def start_loads(self, experts: list[int]) -> list[Future]:
        """Book a slot for every non-resident expert of ``experts`` and start copying it in."""
        pending = []
        for expert, slot in self.table.admit(experts):
            self._slot_map[expert] = slot
            pending.append(self._loader().submit(self._copy, expert, slot))
        return pending

    def wait(self, pending: list[Future]) -> None:
        if not pending:
            return
        start = time.perf_counter()
        for future in pending:
            future.result()
        self.stats.stall_s += time.perf_counter() - start

    def warm(self, experts: Iterable[int]) -> None:
        """Fill empty slots at start-up (not counted as loads)."""
        for slot, e in zip(range(self.num_slots), experts):
            self.table.place(e, slot)
            self.table.policy.touch(e)
            self._slot_map[e] = slot
            self.w13[slot].copy_(self.store.w13[e])
            self.w2[slot].copy_(self.store.w2[e])

    # -- the loader ---------------------------------------------------------------------------
    def _loader(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapmoe-load")
            if self.device.type == "cuda":
                self._stream = torch.cuda.Stream(self.device)
        return self._executor

    def _copy(self, expert: int, slot: int) -> None:
        """Runs on the loader thread: one expert host → slot (the GIL is released in copy_)."""
        start = time.perf_counter()
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                self.w13[slot].copy_(self.store.w13[expert], non_blocking=True)
                self.w2[slot].copy_(self.store.w2[expert], non_blocking=True)
            self._stream.synchronize()
        else:
            self.w13[slot].copy_(self.store.w13[expert])
            self.w2[slot].copy_(self.store.w2[expert])
        if self.link_bytes_per_s:
            _sleep_until(start + self.store.expert_bytes / self.link_bytes_per_s)
        self.stats.loads += 1
        self.stats.bytes_loaded += self.store.expert_bytes


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
