"""Per-layer device cache: a few expert "slots", an expert→slot map and an eviction policy.

The slots are one stacked tensor per expert part (``ExpertRows``: ``[S, 2I, H]``, ``[S, H, I]``
and any biases, in the kernel's layout) so a layer computes every resident expert with a single
fused-kernel call on slot ids.
Residency and eviction are decided by ``SlotTable`` (shared with the simulator); experts the
current wave needs are never evicted.

Loads are asynchronous and go through the model's one ``Link`` (``link.py``). A prefetch still
queued when its layer
runs without needing it, or when its slot is re-booked, is cancelled (``prefetch_dropped``), so
a stale copy never lands in a re-booked slot and a wrong guess costs no link time once known.
Compute always waits for the latest copy of the experts it uses. On CPU without emulation, small
experts are copied inline (counted as stall): the thread hand-off would cost more than the
memcpy; such a copy overlaps nothing, so with a measured link cost no prefetch pays there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from vllm_adapmoe.engine.errors import ExpertCopyError
from vllm_adapmoe.engine.expert_tensors import ExpertRows
from vllm_adapmoe.engine.link import Link, run_with_retry
from vllm_adapmoe.engine.store import HostExpertStore
from vllm_adapmoe.engine.stats import LayerStats
from vllm_adapmoe.engine.slot_table import SlotTable, make_policy
from vllm_adapmoe.engine.staging import StagingArea


# Below this, a CPU copy (~10 GB/s: < ~1 ms) is cheaper to do in place than to hand over.
INLINE_COPY_MAX_BYTES = 8 * 2**20


class ExpertCache:
    """``num_slots`` own slots; with ``staging`` (the model's shared rows, see ``staging.py``)
    and fewer own slots than ``top_k``, the table also spans ``top_k - num_slots`` staging rows."""

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device,
                 policy: str, stats: LayerStats, link: Link | None = None,
                 staging: StagingArea | None = None, layer: int = 0) -> None:
        self.store = store
        self.layer = layer
        self.own_slots = num_slots
        self.device = device
        self.stats = stats
        self.link = link or Link(device)
        self.staging = staging if staging is not None and staging.uses(layer) else None
        # Allocated at construction so vLLM's memory profiling counts them before sizing KV.
        if self.staging is None:
            self.slots = ExpertRows.like(store.rows, num_slots, device)
            self._rows: list[int] | None = None  # table slot s is row s
        else:
            self.slots, self._rows = self.staging.view(layer, store.rows, device)
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
        return self.own_slots * self.slots.row_bytes

    def ready(self, expert: int) -> bool:
        """Resident and its data has landed (no copy still queued)."""
        f = self._pending.get(expert)
        return expert in self.table.slot_of and (f is None or f.done())

    def landing(self) -> frozenset[int]:
        """Resident experts whose copies are still queued or running."""
        if not self._pending:
            return frozenset()
        return frozenset(e for e, f in self._pending.items() if not f.done())

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
        table, n = self.table, self.store.num_experts
        if table.own >= n and len(table.slot_of) == n:
            return []  # every expert in an own slot: nothing to book, nothing can be evicted
        placed = table.admit(experts)
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

    def promote(self, experts: list[int], used: set[int]) -> None:
        """Copy host-computed ``experts`` into idle own slots behind any on-demand copy (see
        ``SlotTable.promote``); the next step finds them resident."""
        for expert in experts:
            placed = self.table.promote(expert, used)
            self._cancel_evicted()
            for e, slot in placed:
                self._queue(e, slot, prefetch=True)

    def wait(self, pending: list[Future]) -> None:
        """Until ``pending`` copies have landed; one that takes longer than the link's backlog
        plus ``copy_timeout_s`` is stuck: the step fails with an ``ExpertCopyError``."""
        if pending:
            start = time.perf_counter()
            limit = self.link.copy_timeout_s + self.link.backlog_s()
            for future in pending:
                try:
                    future.result(timeout=max(limit - (time.perf_counter() - start), 0.0))
                except FutureTimeout:
                    raise ExpertCopyError(
                        f"adapmoe: an expert copy to layer {self.layer}'s slots has not finished "
                        f"after {time.perf_counter() - start:.1f} s (copy_timeout_s = "
                        f"{self.link.copy_timeout_s:g} beyond the link's queue): the host→device "
                        "link is stuck; the step fails instead of waiting forever") from None
            self._stalled(time.perf_counter() - start)
        if self._pending:
            self._pending = {e: f for e, f in self._pending.items() if not f.done()}

    def end_step(self) -> None:
        """The layer's step is computed: its staging rows are free for the next layer."""
        if self.staging is not None:
            self.table.release_staging()

    def idle_problems(self, settle_s: float = 5.0) -> list[str]:
        """With no step running (every request finished or aborted): what is still held that
        should not be — staging rows, copies that never land, slot bookkeeping out of step with
        the kernel's map. Empty when the layer is clean. Copies still queued (prefetches for a
        step that never came) get ``settle_s`` to land first."""
        problems = []
        deadline = time.perf_counter() + settle_s
        for expert, future in list(self._pending.items()):
            try:
                future.result(timeout=max(deadline - time.perf_counter(), 0.0))
            except FutureTimeout:
                problems.append(f"layer {self.layer}: expert {expert}'s copy never landed")
            except Exception as exc:  # a failed copy: its slot must not stay booked
                if expert in self.table.slot_of:
                    problems.append(f"layer {self.layer}: expert {expert} booked after its copy "
                                    f"failed ({exc})")
        held = [e for e in self.table.expert_in_slot[self.own_slots:] if e >= 0]
        if held:
            problems.append(f"layer {self.layer}: staging rows still hold experts {held}")
        for expert, slot in self.table.slot_of.items():
            row = slot if self._rows is None else self._rows[slot]
            if self.table.expert_in_slot[slot] != expert or (
                    not self.table.in_place and int(self._slot_map[expert]) != row):
                problems.append(f"layer {self.layer}: expert {expert}'s slot {slot} is out of "
                                "step with the kernel's slot map")
        return problems

    def warm(self, experts: Iterable[int]) -> None:
        """Fill the empty own slots at start-up (not counted as loads)."""
        for slot, e in zip(range(self.own_slots), experts):
            self.table.place(e, slot)
            self.table.policy.touch(e)
            self._slot_map[e] = slot
            self._copy(e, slot)

    def probe_copy_s(self) -> float:
        """One expert's copy timed into scratch device memory (the slots are left alone),
        stretched to an emulated link's rate: what a load costs before any was measured."""
        scratch = ExpertRows.like(self.store.rows, 1, self.device)
        start = time.perf_counter()
        scratch.copy_row(0, self.store.rows, 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        rate = self.link.bytes_per_s
        return max(seconds, self.store.expert_bytes / rate) if rate else seconds

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
            run_with_retry(lambda: self._copy(expert, slot))
            self._stalled(time.perf_counter() - start)
            self.link.cost.observe_copy(time.perf_counter() - start)
            return
        self._pending[expert] = self.link.submit(lambda: self._copy(expert, slot),
                                                 self.store.expert_bytes, prefetch)

    def _copy(self, expert: int, slot: int) -> None:
        self.slots.copy_row(slot, self.store.rows, expert)
