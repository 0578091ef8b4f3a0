"""Router logits → each token's top-k experts and their weights, for every supported family.

The math follows vLLM's CPU router (``fused_moe/router/cpu_router.py``) op for op: under
torch.compile inductor fuses these ops into the same kernels as stock's, and near-tie tokens
only route identically when the ops are the same (see ``block.py``). Families differ in:

* ``renormalize`` (Mixtral, Qwen3-MoE: yes; Qwen2-MoE, OLMoE, DeepSeek-V2-Lite: no — the
  top-k weights are the experts' softmax probabilities over all experts);
* grouped top-k (DeepSeek): experts are split into ``num_groups`` groups, only the
  ``topk_groups`` best groups compete, scores are softmax or sigmoid, and V3 adds a per-expert
  ``correction_bias`` that steers the choice but not the weights;

DeepSeek's ``routed_scaling_factor`` is not a router matter: vLLM 0.32 scales the routed output
(``apply_routed_scale_to_output``), and so does the model file.

``Routing`` is one step's routing after adaptive gating, in the form the kernel takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_adapmoe.engine.gating import AdaptiveGate
from vllm_adapmoe.engine.stats import LayerStats


@dataclass(frozen=True)
class RouterSpec:
    top_k: int
    renormalize: bool = True
    scoring: str = "softmax"            # "softmax" or "sigmoid" (sigmoid: grouped only)
    num_groups: int | None = None       # grouped top-k when set (DeepSeek)
    topk_groups: int | None = None

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"adapmoe: unsupported router scoring {self.scoring!r}")
        if self.scoring == "sigmoid" and not self.grouped:
            raise ValueError("adapmoe: sigmoid scoring is only supported with grouped top-k")

    @property
    def grouped(self) -> bool:
        return self.num_groups is not None

    def route(self, router_logits: torch.Tensor,
              correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, E] logits → (weights [T, k] float32, ids [T, k] int32)."""
        if self.grouped:
            return grouped_route(router_logits, self, correction_bias)
        return route(router_logits, self.top_k, self.renormalize)


def route(router_logits: torch.Tensor, top_k: int,
          renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k; with ``renormalize`` the softmax runs over the k chosen logits only
    (= renormalised probabilities), else the weights are the full-softmax probabilities."""
    logits, ids = torch.topk(router_logits, k=top_k, dim=-1, sorted=False)
    if renormalize:
        weights = torch.softmax(logits, dim=-1)
    else:
        weights = (logits - torch.logsumexp(router_logits, dim=-1, keepdim=True)).exp()
    return weights.to(torch.float32), ids.to(torch.int32)


def grouped_route(router_logits: torch.Tensor, spec: RouterSpec,
                  correction_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's grouped top-k: best ``topk_groups`` groups first, then top-k inside them."""
    scores = router_logits.float()
    scores = torch.softmax(scores, dim=-1) if spec.scoring == "softmax" else scores.sigmoid()
    tokens, experts = scores.shape
    groups = spec.num_groups
    unbiased = scores
    if correction_bias is not None:
        scores = scores + correction_bias.unsqueeze(0)
        group_scores = scores.view(tokens, groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = scores.view(tokens, groups, -1).max(dim=-1).values
    best_groups = torch.topk(group_scores, k=spec.topk_groups, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, best_groups, 1)
    expert_mask = (group_mask.unsqueeze(-1).expand(tokens, groups, experts // groups)
                   .reshape(tokens, -1))
    masked = scores.masked_fill(~expert_mask.bool(), float("-inf"))
    if correction_bias is not None:  # the bias picks the experts; weights stay unbiased
        ids = torch.topk(masked, k=spec.top_k, dim=-1, sorted=False)[1]
        weights = unbiased.gather(1, ids)
    else:
        weights, ids = torch.topk(masked, k=spec.top_k, dim=-1, sorted=False)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


@dataclass
class Routing:
    """One step's routing for one layer, after adaptive gating, in the form the kernel takes.

    Tokens that keep all top-k experts keep the router's ids and weights in the router's order
    (so the kernel sums them exactly as stock does). A gated token keeps its leading ``keep``
    experts by weight, rescaled to the weight the token had over all k (1 for renormalising
    routers; families without renormalisation keep their routed mass); its dropped positions
    repeat its first expert with weight 0,
    so one kernel call serves every token and a top-1 token still reads one expert's weights.
    When every token is top-1 the kernel gets one column.
    """

    ids: torch.Tensor                  # [T, k] int32
    weights: torch.Tensor              # [T, k] float32
    keep: torch.Tensor | None = None   # [T] experts kept per token; None = all k
    _summary: tuple[list[int], int, int] | None = None
    in_graph: bool = False  # described by ``prepare``'s summary (its counts are this routing's)
    _sets: torch.Tensor | None = None  # ``expert_sets``, made once (a step reads it often)

    @classmethod
    def gated(cls, ids: torch.Tensor, weights: torch.Tensor, gate: AdaptiveGate,
              decode_mask: torch.Tensor | None, renormalize: bool = True) -> Routing:
        k = ids.shape[1]
        sorted_weights, order = weights.sort(dim=1, descending=True)
        keep = gate.experts_per_token(sorted_weights, decode_mask)
        kept = torch.arange(k, device=ids.device) < keep[:, None]
        sorted_ids = ids.gather(1, order)
        kept_weights = sorted_weights * kept
        kept_weights = kept_weights / kept_weights.sum(1, keepdim=True)
        if not renormalize:
            kept_weights = kept_weights * weights.sum(1, keepdim=True)
        full = (keep == k)[:, None]
        return cls(torch.where(full, ids, torch.where(kept, sorted_ids, sorted_ids[:, :1])),
                   torch.where(full, weights, kept_weights), keep)

    @property
    def expert_sets(self) -> torch.Tensor:
        """[T, k] experts each token needs, −1 where gating dropped one (for planning)."""
        if self.keep is None:
            return self.ids
        if self._sets is None:
            dropped = torch.arange(self.ids.shape[1], device=self.ids.device) >= self.keep[:, None]
            self._sets = self.ids.masked_fill(dropped, -1)
        return self._sets

    def needed_experts(self) -> list[int]:
        """Distinct experts needed this step, ascending (one device→host transfer, cached)."""
        return self._summarise()[0]

    def activated(self) -> int:
        return self._summarise()[1]

    def single_expert_tokens(self) -> int:
        return self._summarise()[2]

    def _summarise(self) -> tuple[list[int], int, int]:
        """(needed experts, activated token-expert pairs, single-expert tokens) from one copy of
        the [T, k] expert sets to the host (zero-copy on CPU); a few ints, so plain Python."""
        if self._summary is None:
            tokens, k = self.ids.shape
            sets = self.expert_sets.cpu().numpy()
            needed = sorted(set(sets.ravel().tolist()) - {-1})
            if self.keep is None:
                self._summary = (needed, tokens * k, tokens if k == 1 else 0)
            else:
                kept = (sets >= 0).sum(1)
                self._summary = (needed, int(kept.sum()), int((kept == 1).sum()))
        return self._summary

    def kernel_args(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, weights) for the kernel on ``rows`` (None: all tokens)."""
        ids, weights = (self.ids, self.weights) if rows is None else (self.ids[rows], self.weights[rows])
        if self.keep is not None and self.single_expert_tokens() == self.ids.shape[0]:
            return ids[:, :1].contiguous(), weights[:, :1].contiguous()
        return ids, weights


def count_routing(stats: LayerStats, routing: Routing, decode_tokens: int) -> None:
    """One step's token counters for a layer (the simulator calls this too, so replays match)."""
    stats.steps += 1
    stats.tokens += routing.ids.shape[0]
    stats.decode_tokens += decode_tokens
    stats.prefill_tokens += routing.ids.shape[0] - decode_tokens
    stats.prefill_steps += int(routing.ids.shape[0] > decode_tokens)
    stats.activated_experts += routing.activated()
    stats.top1_tokens += routing.single_expert_tokens()
