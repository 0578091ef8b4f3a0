"""Shared staging rows: device memory for the experts a layer cannot hold in its own slots.

A kernel call computes a token's top-k experts together, so all of them must be on the device
at once. A layer with fewer own slots than ``top_k`` (the DP plan gives one slot to layers
where gating leaves most tokens with one expert) loads the rest into staging rows. Layers run
one after another, so one set of ``top_k - min(own slots)`` rows serves every such layer; it
is counted in the device budget, unlike a per-layer minimum of ``top_k`` slots. A layer with
no own slot at all (hybrid execution) lives on the host and never loads: it uses no row.

``prefill_rows`` more rows serve every loading layer that holds fewer than all its experts: a
step needing more experts than the layer's slots (a prompt step needs nearly all of them) then
runs in fewer waves of tokens, so it loads a cold expert once instead of once per wave (at 2
slots of 8, top-2, a 128-token step loads 17-27 experts in as many waves without them, at
most 6 in one wave with 6 rows). What a step loads there is gone when the layer's step ends, like any staging row.

The kernel takes one slot tensor per layer, so the using layers' own slots and the staging
rows live in one tensor, the *arena*: ``[own rows of layer a][of layer b]... [staging rows]``.
Each using layer sees the arena from its first own row to the end; its slot ids are rows of
that view (rows of later layers in it are never named).
"""

from __future__ import annotations

import torch

from vllm_adapmoe.engine.cache_plan import layer_staging_rows, staging_rows
from vllm_adapmoe.engine.expert_tensors import ExpertRows


class StagingArea:
    """The arena of one model (one device): built from the plan's own slots per layer."""

    def __init__(self, own_slots: list[int], top_k: int, layers: list[int],
                 prefill_rows: int = 0, num_experts: int | None = None) -> None:
        self.top_k, self.prefill_rows, self.num_experts = top_k, prefill_rows, num_experts
        self.rows = staging_rows([own_slots[layer] for layer in layers], top_k,
                                 prefill_rows=prefill_rows, num_experts=num_experts)
        # a layer with no own slot lives on the host and never loads (``plan.layer_loads``);
        # one holding every expert never loads either
        users = [layer for layer in layers if self.rows_for(own_slots[layer])]
        self._offset: dict[int, int] = {}
        offset = 0
        for layer in users:
            self._offset[layer] = offset
            offset += own_slots[layer]
        self._own_rows = offset
        self._own = {layer: own_slots[layer] for layer in users}
        self.arena: ExpertRows | None = None

    @classmethod
    def for_plan(cls, own_slots: list[int], top_k: int,
                 layers: list[int] | None = None, loads: bool = True,
                 prefill_rows: int = 0, num_experts: int | None = None) -> StagingArea | None:
        """The arena of ``layers`` (default: all; a pipeline stage builds only its own), or
        None when each of them holds a token's ``top_k`` experts in its own slots and there are
        no ``prefill_rows``, or nothing is ever loaded (``loads`` False: hybrid "host-only",
        where rows would sit unused)."""
        layers = list(range(len(own_slots))) if layers is None else layers
        if staging_rows([own_slots[layer] for layer in layers], top_k, loads, prefill_rows,
                        num_experts) == 0:
            return None
        return cls(own_slots, top_k, layers, prefill_rows, num_experts)

    def rows_for(self, own: int) -> int:
        """Staging rows a layer with ``own`` slots may use (``layer_staging_rows``)."""
        return layer_staging_rows(own, self.top_k, self.prefill_rows, self.num_experts)

    def uses(self, layer: int) -> bool:
        return layer in self._offset

    def first(self, layer: int) -> bool:
        """``layer`` is the first that uses the staging rows (reports their bytes)."""
        return layer == min(self._offset)

    def view(self, layer: int, like: ExpertRows,
             device: torch.device) -> tuple[ExpertRows, list[int]]:
        """(slot rows, row of each table slot) for ``layer``: its own slots, then its staging
        rows (``rows_for``), with ``like``'s parts (every layer of a model has the same
        expert shape); the arena is allocated when the first layer is built, so the memory
        profile of the serving stack sees it."""
        if self.arena is None:
            self.arena = ExpertRows.like(like, self._own_rows + self.rows, device)
        elif self.arena.shapes() != like.shapes():
            raise ValueError("adapmoe: the layers sharing staging rows have different expert "
                             f"shapes ({self.arena.shapes()} vs {like.shapes()})")
        start, own = self._offset[layer], self._own[layer]
        first_staging = self._own_rows - start
        rows = list(range(own)) + [first_staging + j for j in range(self.rows_for(own))]
        return self.arena.tail(start), rows

    @property
    def device_bytes(self) -> int:
        """Bytes of the staging rows alone (the small layers' own rows count as their slots)."""
        return 0 if self.arena is None else self.rows * self.arena.row_bytes
