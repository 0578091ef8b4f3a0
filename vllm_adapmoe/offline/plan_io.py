"""Cache plans as a table, a JSON file and a plot: what ``adapmoe plan`` prints and writes.

The planning itself (uniform, DP over miss curves) is the engine's (``engine/cache_plan.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_adapmoe.engine.cache_plan import layer_costs

__all__ = ["plan_table", "save_plan", "load_plan", "plot_plan"]


def plan_table(slots: Sequence[int], curves: Sequence[Sequence[float]] | None = None) -> str:
    """A printable table: layer, slots, expected misses/token at that allocation, and a total row."""
    slots = [int(s) for s in slots]
    costs = layer_costs(slots, curves) if curves is not None else None
    head = f"{'layer':>5}  {'slots':>5}  {'misses/token':>12}"
    lines = [head, "-" * len(head)]
    for layer, s in enumerate(slots):
        miss = f"{costs[layer]:12.4f}" if costs is not None else f"{'-':>12}"
        lines.append(f"{layer:>5}  {s:>5}  {miss}")
    lines.append("-" * len(head))
    miss = f"{sum(costs):12.4f}" if costs is not None else f"{'-':>12}"
    lines.append(f"{'total':>5}  {sum(slots):>5}  {miss}")
    return "\n".join(lines)


def save_plan(path: str | Path, slots: Sequence[int], method: str, total: int,
              curves: Sequence[Sequence[float]] | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    """Write the plan as JSON; returns the path.

    Keys: ``method``, ``total_slots``, ``slots``, ``expected_misses_per_token`` (float, or null
    without curves), ``expected_misses_per_layer`` (list or null), then any ``extra`` keys
    (which may not replace the ones above).
    """
    slots = [int(s) for s in slots]
    if sum(slots) != total:
        raise ValueError(f"slots sum to {sum(slots)}, not total={total}")
    costs = layer_costs(slots, curves) if curves is not None else None
    data: dict[str, Any] = {
        "method": method,
        "total_slots": int(total),
        "slots": slots,
        "expected_misses_per_token": float(sum(costs)) if costs is not None else None,
        "expected_misses_per_layer": costs,
    }
    for key, value in (extra or {}).items():
        if key in data:
            raise ValueError(f"extra key {key!r} would overwrite a plan field")
        data[key] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_plan(path: str | Path) -> list[int]:
    """The ``slots`` list of a plan written by :func:`save_plan` (checked to be integers >= 1)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read cache plan {path}: {exc}") from exc
    slots = data.get("slots") if isinstance(data, dict) else None
    if (not isinstance(slots, list) or not slots
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in slots)):
        raise ValueError(f"cache plan {path}: \"slots\" must be a non-empty list of integers >= 1, "
                         f"got {slots!r}")
    total = data.get("total_slots")
    if total is not None and total != sum(slots):
        raise ValueError(f"cache plan {path}: slots sum to {sum(slots)} but total_slots is {total}")
    return slots


def plot_plan(slots: Sequence[int], curves: Sequence[Sequence[float]] | None,
              path: str | Path) -> bool:
    """PNG of slots per layer (bars) and, with curves, each layer's misses/token at that allocation.

    Returns ``True`` when the file was written, ``False`` (silently) when matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    slots = [int(s) for s in slots]
    costs = layer_costs(slots, curves) if curves is not None else None
    layers = list(range(len(slots)))
    fig = Figure(figsize=(max(4.0, 0.4 * len(slots) + 2.0), 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(layers, slots, color="tab:blue", label="slots")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("device slots", color="tab:blue")
    ax.set_title(f"cache plan: {sum(slots)} slots"
                 + (f", {sum(costs):.3f} expected misses/token" if costs is not None else ""))
    if costs is not None:
        ax2 = ax.twinx()
        ax2.plot(layers, costs, "o-", color="tab:red", label="misses/token")
        ax2.set_ylabel("expected misses/token", color="tab:red")
        ax2.set_ylim(bottom=0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return True
