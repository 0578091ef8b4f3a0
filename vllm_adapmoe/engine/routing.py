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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
