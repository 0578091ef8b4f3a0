"""Fitted look-ahead predictors, made by ``adapmoe calibrate`` and stored in the profile.

The prefetcher guesses layer l+d's experts from layer l's MoE input x_l. The plain guess applies
layer l+d's router to x_l; it misses what the layers in between add to the hidden state. A
fitted predictor is an affine map from x_l straight to layer l+d's router logits,
``[x_l, 1] @ M`` with M of shape [H + 1, E], fitted by ridge least squares on the calibration
windows (targets: layer l+d's router applied to its own input x_{l+d}). It costs one small GEMM,
like the plain guess, and is stored per (target layer, distance) only where it beats the plain
guess on windows held out of the fit (top-k recall); the profile records both accuracies.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

MAX_DEPTH = 3  # distances fitted: l+1 .. l+3
RIDGE = 1e-3   # relative to the mean diagonal of the Gram matrix


class PredictorFit:
    """Accumulates the normal equations over calibration windows, then scores both guesses on
    held-out windows. ``routers[l]``: layer l's router weight [E, H] (logits = x @ W.T)."""

    def __init__(self, routers: list[torch.Tensor], top_k: int, depth: int = MAX_DEPTH) -> None:
        self.routers = [r.detach().double() for r in routers]
        self.top_k = top_k
        self.pairs = [(l, d) for d in range(1, depth + 1) for l in range(len(routers) - d)]
        h = self.routers[0].shape[1]
        self.gram = {l: torch.zeros(h + 1, h + 1, dtype=torch.float64) for l, _ in self.pairs}
        self.cross = {p: torch.zeros(h + 1, self.routers[0].shape[0], dtype=torch.float64)
                      for p in self.pairs}
        self.maps: dict[tuple[int, int], torch.Tensor] = {}
        # (top-1 right, top-k experts recovered, tokens) per pair, for the plain and fitted guess
        self.score = {p: {"plain": [0, 0, 0], "fitted": [0, 0, 0]} for p in self.pairs}

    def add(self, inputs: list[torch.Tensor]) -> None:
        """One training window: ``inputs[l]`` = layer l's MoE input [T, H]."""
        xs = [_affine(x) for x in inputs]
        for l in self.gram:
            self.gram[l] += xs[l].T @ xs[l]
        for l, d in self.pairs:
            self.cross[l, d] += xs[l].T @ (inputs[l + d].double() @ self.routers[l + d].T)

    def solve(self) -> None:
        for l, d in self.pairs:
            gram = self.gram[l]
            ridge = RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
            self.maps[l, d] = torch.linalg.solve(gram + ridge, self.cross[l, d])

    def evaluate(self, inputs: list[torch.Tensor]) -> None:
        """One held-out window (after ``solve``)."""
        for l, d in self.pairs:
            x, target = inputs[l].double(), l + d
            truth = (inputs[target].double() @ self.routers[target].T).topk(self.top_k, -1).indices
            guesses = {"plain": x @ self.routers[target].T, "fitted": _affine(inputs[l]) @ self.maps[l, d]}
            for kind, logits in guesses.items():
                guess = logits.topk(self.top_k, -1).indices
                s = self.score[l, d][kind]
                s[0] += int((guess[:, 0] == truth[:, 0]).sum())
                s[1] += int((guess[:, :, None] == truth[:, None, :]).any(1).sum())
                s[2] += len(x)

    def report(self) -> list[dict[str, Any]]:
        """Per (target layer, distance): both guesses' held-out top-1 accuracy and top-k recall;
        the fitted map (``encode_map``) where it recovers more of the top-k than the plain one."""
        out = []
        for l, d in sorted(self.pairs, key=lambda p: (p[1], p[0])):
            entry: dict[str, Any] = {"layer": l + d, "depth": d}
            for kind, (top1, hits, tokens) in self.score[l, d].items():
                entry[kind] = {"top1": top1 / max(tokens, 1),
                               "recall": hits / max(tokens * self.top_k, 1), "tokens": tokens}
            better = entry["fitted"]["recall"] > entry["plain"]["recall"]
            entry["use"] = "fitted" if better else "router"
            if better:
                entry["map"] = encode_map(self.maps[l, d])
            out.append(entry)
        return out


def _affine(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).double()
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)


def encode_map(m: torch.Tensor) -> dict[str, Any]:
    """[H + 1, E] map → JSON: float32 little-endian bytes in base64 (compact for big H)."""
    data = m.float().cpu().numpy().astype("<f4")
    return {"shape": list(data.shape), "float32_base64": base64.b64encode(data.tobytes()).decode()}


def decode_map(entry: dict[str, Any]) -> torch.Tensor:
    shape = tuple(int(n) for n in entry["shape"])
    data = np.frombuffer(base64.b64decode(entry["float32_base64"]), dtype="<f4")
    return torch.from_numpy(data.reshape(shape).copy())


def fitted_maps(predictor: list[dict[str, Any]] | None) -> dict[tuple[int, int], torch.Tensor]:
    """The profile's ``predictor`` entries → {(target layer, distance): map} where fitted."""
    return {(int(e["layer"]), int(e["depth"])): decode_map(e["map"])
            for e in predictor or [] if e.get("use") == "fitted"}
