"""Per-layer device cache: a few expert "slots", an expert→slot map and an eviction policy.

The slots are one stacked tensor per weight (``[S, 2I, H]`` and ``[S, H, I]`` in the kernel's
layout) so a layer computes every resident expert with a single fused-kernel call on slot ids.
Residency and eviction are decided by ``SlotTable`` (shared with the simulator); experts the
current wave needs are never evicted.

Loads are asynchronous and all go through one ``Link`` per model — one loader thread (CPU) or
one copy stream over pinned memory (CUDA) — one copy at a time, as on one PCIe link. Copies
compute waits for go first; prefetches wait behind them. A prefetch still queued when its layer
runs without needing it, or when its slot is re-booked, is cancelled (``prefetch_dropped``), so
a stale copy never lands in a re-booked slot and a wrong guess costs no link time once known.
A copy already running completes before the next starts; compute always waits for the latest
copy of the experts it uses. With ``link_gbps`` (GB/s) each copy is stretched to what it would
take over that link (an *emulated* link for CPU experiments). On CPU without emulation, small
experts are copied inline (counted as stall): the thread hand-off would cost more than the
memcpy; such a copy overlaps nothing, so with a measured link cost no prefetch pays there.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from vllm_adapmoe.engine.store import HostExpertStore
from vllm_adapmoe.engine.stats import LayerStats
from vllm_adapmoe.engine.slot_table import SlotTable, make_policy
from vllm_adapmoe.engine.staging import StagingArea


# Below this, a CPU copy (~10 GB/s: < ~1 ms) is cheaper to do in place than to hand over.
INLINE_COPY_MAX_BYTES = 8 * 2**20


class LinkCost:
    """How many decode layers one expert copy costs (``r``), for the prefetch pay-off rule:
    measured while decoding (moving averages of a copy's duration and of a layer's compute,
    i.e. the time between two layers' steps minus the stall in it), or pinned by ``link_layers``."""

    def __init__(self, pinned: float | None = None) -> None:
        self.pinned = pinned
        # False when copies run inline on the computing thread (CPU, small experts): a copy
        # then hides behind nothing, so a right guess saves no stall and none pays.
        self.overlaps = True
        self.stall_s = 0.0  # every stall of every layer, added by the caches
        self._copy_s: float | None = None
        self._layer_s: float | None = None
        self._last: tuple[int, float, float] | None = None  # (layer, its start, stall_s then)

    def observe_copy(self, seconds: float) -> None:
        self._copy_s = _average(self._copy_s, seconds)

    def layer_started(self, layer: int) -> None:
        """A counted pure-decode step enters ``layer``: the previous layer's compute ended."""
        now = time.perf_counter()
        last = self._last
        if last is not None and layer == last[0] + 1:
            self._layer_s = _average(self._layer_s, max(now - last[1] - (self.stall_s - last[2]), 0.0))
        self._last = (layer, now, self.stall_s)

    def layers_per_load(self) -> float:
        if self.pinned is not None:
            return self.pinned
        if not self._copy_s or not self._layer_s:
            return 0.0  # not measured yet
        return self._copy_s / self._layer_s

    def min_probability(self, depth: int, reuse: float = 0.0) -> float:
        """Issue a prefetch ``depth`` layers ahead when its chance of use p pays: a right one
        saves the stall the head start covers (min(r, depth) layers), a wrong one costs the
        link r layers that later loads wait for, and evicting a resident that is needed again
        with probability ``reuse`` costs a reload: p·min(r, depth) ≥ (1 − p)·r + reuse·r.
        Measured inline copies overlap nothing: no p pays (a pinned ``link_layers`` still rules)."""
        if not self.overlaps and self.pinned is None:
            return math.inf
        r = self.layers_per_load()
        if r <= 0:  # not measured, or pinned free: the limit r → 0
            return (1 + reuse) / 2
        return r * (1 + reuse) / (r + min(r, depth))


class Link:
    """The host→device link of one model: one copy at a time, on-demand copies ahead of queued
    prefetches (each kind in submission order). A queued copy can still be cancelled
    (``Future.cancel``) or promoted to on-demand; one already running always completes, so a
    later copy into the same slot lands after it."""

    def __init__(self, device: torch.device, link_gbps: float | None = None,
                 link_layers: float | None = None) -> None:
        self.device = device
        self.bytes_per_s = link_gbps * 1e9 if link_gbps else None
        self.cost = LinkCost(link_layers)
        self._stream = None
        self._queues: tuple[deque[_Copy], deque[_Copy]] = (deque(), deque())  # on demand, ahead
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        # CPU without emulation: a copy is a memcpy on the cores that compute. For small experts
        # the hand-off to a loader thread costs more than the copy (bundled model, 2 cores: LRU
        # decode 0.33x → 0.89x of all resident when copied inline); big ones still overlap
        # compute on the thread (Mixtral shape: 0.87x threaded vs 0.61x inline). See ExpertCache.
        self.cpu_free = device.type == "cpu" and self.bytes_per_s is None

    def submit(self, copy: Callable[[], None], nbytes: int, prefetch: bool = False) -> Future:
        future: Future = Future()
        with self._wake:
            if self._worker is None:
                if self.device.type == "cuda":
                    self._stream = torch.cuda.Stream(self.device)
                self._worker = threading.Thread(target=self._serve, name="adapmoe-link", daemon=True)
                self._worker.start()
            # CUDA: the slot may still be read by kernels queued on the compute stream
            after = torch.cuda.current_stream(self.device).record_event() if self._stream else None
            self._queues[prefetch].append(_Copy(future, copy, nbytes, after))
            self._wake.notify()
        return future

    def promote(self, future: Future) -> None:
        """Move a queued prefetch copy to the on-demand queue (compute now waits for it)."""
        with self._wake:
            ahead = self._queues[True]
            for item in ahead:
                if item.future is future:
                    ahead.remove(item)
                    self._queues[False].append(item)
                    return

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._queues[False] or self._queues[True]):
                    self._wake.wait()
                item = (self._queues[False] or self._queues[True]).popleft()
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled while queued: the link skips it
            try:
                self._run(item)
                item.future.set_result(None)
            except BaseException as exc:  # surfaces in the waiting compute thread
                item.future.set_exception(exc)

    def _run(self, item: _Copy) -> None:
        start = time.perf_counter()
        if self._stream is not None:
            self._stream.wait_event(item.after)
            with torch.cuda.stream(self._stream):
                item.copy()
            self._stream.synchronize()
        else:
            item.copy()  # torch releases the GIL inside copy_, so this overlaps compute
        if self.bytes_per_s:
            _sleep_until(start + item.nbytes / self.bytes_per_s)
        self.cost.observe_copy(time.perf_counter() - start)


@dataclass
class _Copy:
    future: Future
    copy: Callable[[], None]
    nbytes: int
    after: Any = None  # CUDA event the copy must wait for


class ExpertCache:
    """``num_slots`` own slots; with ``staging`` (the model's shared rows, see ``staging.py``)
    and fewer own slots than ``top_k``, the table also spans ``top_k - num_slots`` staging rows."""

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device,
                 policy: str, stats: LayerStats, link: Link | None = None,
                 staging: StagingArea | None = None, layer: int = 0) -> None:
        self.store = store
        self.own_slots = num_slots
        self.device = device
        self.stats = stats
        self.link = link or Link(device)
        self.staging = staging if staging is not None and staging.uses(layer) else None
        # Allocated at construction so vLLM's memory profiling counts them before sizing KV.
        shape13, shape2, dtype = store.w13.shape[1:], store.w2.shape[1:], store.w13.dtype
        if self.staging is None:
            self.w13 = torch.zeros((num_slots, *shape13), dtype=dtype, device=device)
            self.w2 = torch.zeros((num_slots, *shape2), dtype=dtype, device=device)
            self._rows: list[int] | None = None  # table slot s is row s
        else:
            self.w13, self.w2, self._rows = self.staging.view(layer, shape13, shape2, dtype, device)
        self.num_slots = num_slots if self._rows is None else len(self._rows)
        self.table = SlotTable(self.num_slots, make_policy(policy), stats, own=num_slots)
        self._slot_map = torch.zeros(store.num_experts, dtype=torch.int32, device=device)
        self._pending: dict[int, Future] = {}  # expert → its latest queued copy
        self._dropped: set[int] = set()  # prefetched experts whose copies were cancelled
        self.inline = self.link.cpu_free and store.expert_bytes <= INLINE_COPY_MAX_BYTES
        if self.inline:
            self.link.cost.overlaps = False

    @property
    def slot_of(self) -> dict[int, int]:
        return self.table.slot_of

    @property
    def slot_map(self) -> torch.Tensor:
        """expert id → slot id (int32); valid for resident experts."""
        return self._slot_map

    def slot_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Expert ids → slot ids for the kernel. While every resident expert e sits in slot e
        (all experts resident, or not yet moved) the ids are already slot ids: no gather."""
        if self.table.in_place:
            return ids
        return self._slot_map.index_select(0, ids.flatten()).view(ids.shape)

    @property
    def device_bytes(self) -> int:
        """Bytes of the layer's own slots (shared staging rows: ``StagingArea.device_bytes``)."""
        row = self.w13[0].numel() * self.w13.element_size() + self.w2[0].numel() * self.w2.element_size()
        return self.own_slots * row

    def ready(self, expert: int) -> bool:
        """Resident and its data has landed (no copy still queued)."""
        f = self._pending.get(expert)
        return expert in self.table.slot_of and (f is None or f.done())

    # -- what the MoE layer calls -------------------------------------------------------------
    def count_step(self, needed: list[int], mass: list[int] | None = None) -> None:
        """Count the step (``SlotTable.count_step``); prefetches for this layer that it does not
        need and whose copies have not started are dropped: their copies are cancelled and
        their slots freed, so the link and the slots serve what is needed instead."""
        if self._pending:  # nothing is ever queued when copies are inline
            for e in self.table.prefetched.difference(needed):
                if e in self._pending and self._cancel(e):
                    self._dropped.add(e)
        dropped = self._dropped & self.table.prefetched
        self._dropped.clear()
        self.table.count_step(needed, mass, dropped)

    def start_loads(self, experts: list[int]) -> list[Future]:
        """Book slots for the non-resident ``experts``, queue their copies; returns the copies
        (new or already queued, e.g. by a prefetch: those now go ahead of other prefetches)
        that compute must wait for."""
        placed = self.table.admit(experts)
        self._cancel_evicted()
        for expert, slot in placed:
            self._queue(expert, slot, prefetch=False)
        pending = [self._pending[e] for e in experts if e in self._pending]
        for future in pending:
            self.link.promote(future)
        return pending

    def prefetch(self, experts: list[int], keep: Iterable[int] = (),
                 evictable: set[int] | None = None) -> None:
        """Book and queue ``experts`` ahead of need (the layer has not run yet this step); see
        ``SlotTable.prefetch``."""
        placed = self.table.prefetch(experts, keep, evictable)
        self._cancel_evicted()
        for expert, slot in placed:
            self._queue(expert, slot, prefetch=True)

    def wait(self, pending: list[Future]) -> None:
        if pending:
            start = time.perf_counter()
            for future in pending:
                future.result()
            self._stalled(time.perf_counter() - start)
        if self._pending:
            self._pending = {e: f for e, f in self._pending.items() if not f.done()}

    def end_step(self) -> None:
        """The layer's step is computed: its staging rows are free for the next layer."""
        if self.staging is not None:
            self.table.release_staging()

    def warm(self, experts: Iterable[int]) -> None:
        """Fill the empty own slots at start-up (not counted as loads)."""
        for slot, e in zip(range(self.own_slots), experts):
            self.table.place(e, slot)
            self.table.policy.touch(e)
            self._slot_map[e] = slot
            self._copy(e, slot)

    # -- internals ----------------------------------------------------------------------------
    def _stalled(self, seconds: float) -> None:
        self.stats.stall_s += seconds
        self.link.cost.stall_s += seconds

    def _cancel(self, expert: int) -> bool:
        """Cancel ``expert``'s queued copy if it has not started (it then never counts as a load)."""
        if not self._pending[expert].cancel():
            return False  # running or done: compute may still wait for it
        del self._pending[expert]
        self.stats.loads -= 1
        self.stats.bytes_loaded -= self.store.expert_bytes
        self.table.drop(expert)
        return True

    def _cancel_evicted(self) -> None:
        """Evicted experts whose copies are still queued: cancel them (with copies reordered by
        priority, a stale copy must not land in a slot re-booked since)."""
        for e in [e for e in self._pending if e not in self.table.slot_of]:
            if self._cancel(e):
                self._dropped.add(e)

    def _queue(self, expert: int, slot: int, prefetch: bool) -> None:
        slot = slot if self._rows is None else self._rows[slot]  # the row the kernel reads
        self._slot_map[expert] = slot
        self.stats.bytes_loaded += self.store.expert_bytes
        if self.inline:  # compute waits for this copy as it would for a queued one
            start = time.perf_counter()
            self._copy(expert, slot)
            self._stalled(time.perf_counter() - start)
            self.link.cost.observe_copy(time.perf_counter() - start)
            return
        self._pending[expert] = self.link.submit(lambda: self._copy(expert, slot),
                                                 self.store.expert_bytes, prefetch)

    def _copy(self, expert: int, slot: int) -> None:
        self.w13[slot].copy_(self.store.w13[expert], non_blocking=True)
        self.w2[slot].copy_(self.store.w2[expert], non_blocking=True)


def _average(mean: float | None, sample: float, weight: float = 0.1) -> float:
    return sample if mean is None else mean + weight * (sample - mean)


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
