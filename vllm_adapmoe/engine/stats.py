"""Per-layer counters and the snapshot returned by ``vllm_adapmoe.stats(llm)`` (meanings: README,
"Statistics")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class LayerStats:
    tokens: int = 0              # tokens through the layer
    decode_tokens: int = 0       # of which decode tokens (query length 1)
    prefill_tokens: int = 0      # of which prompt tokens (tokens − decode_tokens)
    prefill_steps: int = 0       # steps that carried prompt tokens (mixed steps included)
    prefill_step_loads: int = 0  # loads this layer's steps that carried prompt tokens issued
    prefill_step_traffic_s: float = 0.0  # traffic_s (stall_s + host_s) of those steps
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
    prefetch_wasted: int = 0     # copied prefetches it did not use
    prefetch_dropped: int = 0    # prefetches cancelled before copying (correct + wasted + dropped = issued)
    waves: int = 0               # kernel launches (>1 per step when loads overlap or needed > slots)
    host_tokens: int = 0         # tokens computed on the host (hybrid), each whole
    host_experts: int = 0        # distinct experts those needed, per step
    host_s: float = 0.0          # time spent computing on the host (emulated: the preset's)
    promotions: int = 0          # host-computed experts then copied into an idle slot (loads too)
    steps: int = 0

    @property
    def traffic_s(self) -> float:
        """Expert traffic time so far: waiting for copies + computing on the host."""
        return self.stall_s + self.host_s

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
