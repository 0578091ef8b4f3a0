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
        self._predictions: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def begin_step(self, query_lens: torch.Tensor) -> None:
        self.step += 1
        batch = getattr(self.runner, "input_batch", None)
        req_ids = list(getattr(batch, "req_ids", []) or [])[: len(query_lens)]
        self.step_req_ids.append([str(r) for r in req_ids])
        lens = query_lens.cpu().numpy()
        self._segments = np.repeat(np.arange(len(lens), dtype=np.int32), lens)

    def record_prediction(self, layer: int, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """Routing of ``layer`` as guessed during the layer before it (same step, same tokens)."""
        self._predictions[layer] = (ids.cpu().numpy().astype(np.int16),
                                    weights.cpu().numpy().astype(np.float32))

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor,
               decode_mask: torch.Tensor | None) -> None:
        n = ids.shape[0]
        pred = self._predictions.pop(layer, None)
        if pred is None or len(pred[0]) != n:
            pred = (np.full(tuple(ids.shape), -1, np.int16), np.zeros(tuple(ids.shape), np.float32))
        decode = (decode_mask.cpu().numpy()[:n] if decode_mask is not None
                  else np.zeros(n, dtype=bool))
        seg = self._segments[:n] if self._segments is not None else np.zeros(n, np.int32)
        if len(seg) < n:  # padded tokens beyond the scheduled ones
            seg = np.concatenate([seg, np.full(n - len(seg), -1, np.int32)])
        self._rows.append((self.step, layer, ids.cpu().numpy().astype(np.int16),
                           weights.cpu().numpy().astype(np.float32), decode, seg, *pred))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        k = int(self.meta["top_k"])
        rows = self._rows
        cat = (lambda i, dtype, shape: np.concatenate([r[i] for r in rows]).astype(dtype)
               if rows else np.zeros(shape, dtype))
        meta = {**self.meta, "format": FORMAT, "steps": self.step + 1,
                "step_req_ids": self.step_req_ids}
        np.savez_compressed(
            path, ids=cat(2, np.int16, (0, k)), weights=cat(3, np.float32, (0, k)),
            layer=np.concatenate([np.full(len(r[2]), r[1], np.int16) for r in rows]) if rows else np.zeros(0, np.int16),
            step=np.concatenate([np.full(len(r[2]), r[0], np.int32) for r in rows]) if rows else np.zeros(0, np.int32),
            decode=cat(4, bool, (0,)), segment=cat(5, np.int32, (0,)),
            pred_ids=cat(6, np.int16, (0, k)), pred_weights=cat(7, np.float32, (0, k)),
            meta=np.array(json.dumps(meta)))
        return path


@dataclass
class StepLayer:
    step: int
    layer: int
    ids: np.ndarray      # [T, k]
    weights: np.ndarray  # [T, k]
    decode: np.ndarray   # [T]
    pred_ids: np.ndarray  # [T, k], −1 = no prediction
    pred_weights: np.ndarray


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

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in ("ids", "weights", "layer", "step", "decode", "segment",
                                          "pred_ids", "pred_weights", "meta")}
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not an adapmoe trace ({e}); record one with "
                             "vllm_adapmoe.start_trace / stop_trace") from e
        meta = json.loads(str(data.pop("meta")))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: trace format {meta.get('format')!r}, expected {FORMAT!r}")
        trace = cls(meta=meta, **data)
        n = len(trace.ids)
        if not all(len(a) == n for a in (trace.weights, trace.layer, trace.step, trace.decode,
                                         trace.segment, trace.pred_ids, trace.pred_weights)):
            raise ValueError(f"{path}: trace arrays have different lengths")
        return trace

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    def __iter__(self) -> Iterator[StepLayer]:
        """(step, layer) blocks in recorded order."""
        if len(self.ids) == 0:
            return
        key = self.step.astype(np.int64) * 65536 + self.layer
        bounds = np.flatnonzero(np.diff(key)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(key)]):
            yield StepLayer(int(self.step[lo]), int(self.layer[lo]), self.ids[lo:hi],
                            self.weights[lo:hi], self.decode[lo:hi], self.pred_ids[lo:hi],
                            self.pred_weights[lo:hi])
