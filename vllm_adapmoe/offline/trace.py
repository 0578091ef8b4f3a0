"""Routing traces: what every MoE layer was asked for, step by step, from a live engine.

Record with ``vllm_adapmoe.start_trace(llm)`` … ``vllm_adapmoe.stop_trace(llm, "run.npz")``.
File format (``numpy.savez_compressed``; one row per token per layer per step, rows of one
(step, layer) contiguous in the batch's token order):

=============  =================  ===================================================
array          dtype / shape      meaning
=============  =================  ===================================================
``ids``        int16  [R, k]      router's top-k experts (router order)
``weights``    float32 [R, k]     renormalised top-k weights
``layer``      int16  [R]         MoE layer index
``step``       int32  [R]         engine step (forward pass) index, from 0
``decode``     bool   [R]         token is a decode token (its request has query length 1)
``segment``    int32  [R]         position of the token's request within the step's batch
``pred_ids``   int16  [R, k]      this layer's top-k as predicted during the previous layer
                                  (its router on the previous layer's MoE input); −1 for layer 0
``pred_weights`` float32 [R, k]   the predicted weights (0 where no prediction)
``pred_ids_D``, ``pred_weights_D``  the same guessed D layers ahead (D = 2, 3, ...: only when
                                  prefetch looked that far; absent otherwise)
``meta``       str (JSON)         format, model shape, settings, per-step request ids, and the
                                  cache state (slots + eviction order) of every layer at start
=============  =================  ===================================================
Routing is recorded before gating, so a trace can be replayed under any gating rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "adapmoe-trace/1"


class TraceRecorder:
    """Worker-side: appends routing of every counted step; ``save`` writes the file."""

    def __init__(self, meta: dict[str, Any], runner: Any = None) -> None:
        self.meta = meta
        self.runner = runner
        self.step = -1
        self.step_req_ids: list[list[str]] = []
        self._rows: list[tuple] = []
        self._segments: np.ndarray | None = None
        self._predictions: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._depths = {1}

    def begin_step(self, query_lens: torch.Tensor) -> None:
        self.step += 1
        batch = getattr(self.runner, "input_batch", None)
        req_ids = list(getattr(batch, "req_ids", []) or [])[: len(query_lens)]
        self.step_req_ids.append([str(r) for r in req_ids])
        lens = query_lens.cpu().numpy()
        self._segments = np.repeat(np.arange(len(lens), dtype=np.int32), lens)

    def record_prediction(self, layer: int, weights: torch.Tensor, ids: torch.Tensor,
                          depth: int = 1) -> None:
        """Routing of ``layer`` as guessed ``depth`` layers before it (same step, same tokens)."""
        self._depths.add(depth)
        self._predictions[layer, depth] = (ids.cpu().numpy().astype(np.int16),
                                           weights.cpu().numpy().astype(np.float32))

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor,
               decode_mask: torch.Tensor | None) -> None:
        n = ids.shape[0]
        guesses = {}  # depth → (ids, weights), only guesses made for these very tokens
        for depth in self._depths:
            guess = self._predictions.pop((layer, depth), None)
            if guess is not None and len(guess[0]) == n:
                guesses[depth] = guess
        decode = (decode_mask.cpu().numpy()[:n] if decode_mask is not None
                  else np.zeros(n, dtype=bool))
        seg = self._segments[:n] if self._segments is not None else np.zeros(n, np.int32)
        if len(seg) < n:  # padded tokens beyond the scheduled ones
            seg = np.concatenate([seg, np.full(n - len(seg), -1, np.int32)])
        self._rows.append((self.step, layer, ids.cpu().numpy().astype(np.int16),
                           weights.cpu().numpy().astype(np.float32), decode, seg, guesses))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        k = int(self.meta["top_k"])
        rows = self._rows
        cat = (lambda i, dtype, shape: np.concatenate([r[i] for r in rows]).astype(dtype)
               if rows else np.zeros(shape, dtype))
        meta = {**self.meta, "format": FORMAT, "steps": self.step + 1,
                "step_req_ids": self.step_req_ids}
        guesses = {}
        for depth in sorted(self._depths):  # 1: pred_ids / pred_weights; D >= 2: pred_ids_D ...
            suffix = "" if depth == 1 else f"_{depth}"
            guesses[f"pred_ids{suffix}"], guesses[f"pred_weights{suffix}"] = self._guesses(depth, k)
        np.savez_compressed(
            path, ids=cat(2, np.int16, (0, k)), weights=cat(3, np.float32, (0, k)),
            layer=np.concatenate([np.full(len(r[2]), r[1], np.int16) for r in rows]) if rows else np.zeros(0, np.int16),
            step=np.concatenate([np.full(len(r[2]), r[0], np.int32) for r in rows]) if rows else np.zeros(0, np.int32),
            decode=cat(4, bool, (0,)), segment=cat(5, np.int32, (0,)),
            meta=np.array(json.dumps(meta)), **guesses)
        return path

    def _guesses(self, depth: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every row's guess ``depth`` layers ahead; −1 / 0 where none was made (layers too
        early to be guessed, or rows recorded before the first such guess)."""
        ids = [np.full((0, k), -1, np.int16)]
        weights = [np.zeros((0, k), np.float32)]
        for row in self._rows:
            n = len(row[2])
            guess = row[6].get(depth)
            ids.append(guess[0] if guess else np.full((n, k), -1, np.int16))
            weights.append(guess[1] if guess else np.zeros((n, k), np.float32))
        return np.concatenate(ids).astype(np.int16), np.concatenate(weights).astype(np.float32)


@dataclass
class StepLayer:
    step: int
    layer: int
    ids: np.ndarray      # [T, k]
    weights: np.ndarray  # [T, k]
    decode: np.ndarray   # [T]
    pred_ids: np.ndarray  # [T, k], −1 = no prediction
    pred_weights: np.ndarray
    # distance D >= 2 → (pred_ids, pred_weights) guessed D layers ahead
    deeper: dict[int, tuple[np.ndarray, np.ndarray]] | None = None

    def guess(self, depth: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(pred_ids, pred_weights) guessed ``depth`` layers ahead, None if not recorded."""
        if depth == 1:
            return self.pred_ids, self.pred_weights
        return (self.deeper or {}).get(depth)


@dataclass
class Trace:
    meta: dict[str, Any]
    ids: np.ndarray
    weights: np.ndarray
    layer: np.ndarray
    step: np.ndarray
    decode: np.ndarray
    segment: np.ndarray
    pred_ids: np.ndarray
    pred_weights: np.ndarray
    deeper: dict[int, tuple[np.ndarray, np.ndarray]] | None = None

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in ("ids", "weights", "layer", "step", "decode", "segment",
                                          "pred_ids", "pred_weights", "meta")}
                depths = [name.removeprefix("pred_ids_") for name in f.files
                          if name.startswith("pred_ids_")]
                deeper = {int(d): (f[f"pred_ids_{d}"], f[f"pred_weights_{d}"]) for d in depths}
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not an adapmoe trace ({e}); record one with "
                             "vllm_adapmoe.start_trace / stop_trace") from e
        meta = json.loads(str(data.pop("meta")))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: trace format {meta.get('format')!r}, expected {FORMAT!r}")
        trace = cls(meta=meta, **data, deeper=deeper)
        n = len(trace.ids)
        if not all(len(a) == n for a in (trace.weights, trace.layer, trace.step, trace.decode,
                                         trace.segment, trace.pred_ids, trace.pred_weights,
                                         *(a for pair in deeper.values() for a in pair))):
            raise ValueError(f"{path}: trace arrays have different lengths")
        return trace

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def lookahead(self) -> int:
        """How many layers ahead guesses were recorded (1 without deeper look-ahead)."""
        return max([1, *(self.deeper or {})])

    def __iter__(self) -> Iterator[StepLayer]:
        """(step, layer) blocks in recorded order."""
        if len(self.ids) == 0:
            return
        key = self.step.astype(np.int64) * 65536 + self.layer
        bounds = np.flatnonzero(np.diff(key)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(key)]):
            yield StepLayer(int(self.step[lo]), int(self.layer[lo]), self.ids[lo:hi],
                            self.weights[lo:hi], self.decode[lo:hi], self.pred_ids[lo:hi],
                            self.pred_weights[lo:hi],
                            {d: (i[lo:hi], w[lo:hi]) for d, (i, w) in (self.deeper or {}).items()})
