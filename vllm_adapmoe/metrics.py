"""Prometheus export of the engine's per-layer counters (server side; see README "Serving")."""

from __future__ import annotations

from dataclasses import fields

from vllm_adapmoe.engine.stats import LayerStats

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
