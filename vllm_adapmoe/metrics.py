"""Per-layer counters (DESIGN.md §6) and the snapshot returned by ``vllm_adapmoe.stats(llm)``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class LayerStats:
    tokens: int = 0              # tokens through the layer
    decode_tokens: int = 0       # of which decode tokens (query length 1)
    activated_experts: int = 0   # token-expert pairs computed
    top1_tokens: int = 0         # tokens computed with a single expert (adaptive gating)
    hits: int = 0                # distinct needed experts already resident, per step
    misses: int = 0              # distinct needed experts that had to be loaded on demand
    loads: int = 0               # host→device expert copies (every copy)
    bytes_loaded: int = 0
    evictions: int = 0
    stall_s: float = 0.0         # time compute waited for copies
    prefetch_issued: int = 0
    prefetch_correct: int = 0    # prefetched experts the layer then used
    prefetch_wasted: int = 0     # prefetched experts it did not use (correct + wasted = issued)
    waves: int = 0               # kernel launches (>1 per step when loads overlap or needed > slots)
    steps: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarise(layers: list[dict[str, float]]) -> dict[str, object]:
    """The ``stats()`` shape: per-layer dicts plus their sum under ``"total"``."""
    total: dict[str, float] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in ("layer", "expert_bytes"):
                continue
            total[key] = total.get(key, 0) + value
    needed = total.get("hits", 0) + total.get("misses", 0)
    total["hit_rate"] = total.get("hits", 0) / needed if needed else 0.0
    return {"total": total, "layers": layers}


_COUNTERS: dict[str, object] = {}


class PrometheusExporter:
    """Mirrors every layer's ``LayerStats`` into Prometheus counters ``adapmoe_<name>_total``
    (label ``layer``) after each step.

    Only active when ``PROMETHEUS_MULTIPROC_DIR`` is set before the server starts: that is the
    only way counters living in the worker process reach the API server's ``/metrics``.
    ``reset_stats`` zeroes the snapshot counters but never the monotonic Prometheus ones.
    """

    def __init__(self, stats: list[LayerStats]) -> None:
        from prometheus_client import Counter

        self.stats = stats
        self.names = [f.name for f in fields(LayerStats)]
        for name in self.names:
            if name not in _COUNTERS:  # one registration per process
                _COUNTERS[name] = Counter(f"adapmoe_{name}", f"AdapMoE {name} per MoE layer",
                                          ["layer"])
        self._last = [s.as_dict() for s in stats]

    @classmethod
    def if_enabled(cls, stats: list[LayerStats]) -> PrometheusExporter | None:
        import os

        return cls(stats) if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None

    def sync(self) -> None:
        for layer, (st, last) in enumerate(zip(self.stats, self._last)):
            now = st.as_dict()
            for name in self.names:
                delta = now[name] - last[name] if now[name] >= last[name] else now[name]
                if delta > 0:
                    _COUNTERS[name].labels(layer=str(layer)).inc(delta)
            self._last[layer] = now
