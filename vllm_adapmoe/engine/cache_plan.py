"""Per-layer cache sizing: how many device expert slots each MoE layer gets under a total budget.

AdapMoE (ICCAD'24) sizes the per-layer caches with a dynamic programme: given a total of ``C``
slots over ``L`` MoE layers, pick ``s_l`` with ``sum(s_l) == C`` and ``lo <= s_l <= E_l`` that
minimises ``sum_l f_l(s_l)``, where ``f_l(k)`` is the expected number of on-demand expert loads
(misses) per decoded token of layer ``l`` when it has ``k`` slots -- its *miss curve*.  Miss curves
come from replaying routing traces through the cache simulator (``profile["miss_curves"]``) or,
without a trace, from the closed-form model in :func:`closed_form_curve`.

Functions:

* :func:`plan_dp` -- the exact DP, ``dp[i][j] = min_k dp[i-1][j-k] + f_i(k)``;
* :func:`plan_uniform` -- the even split used when no curves are available;
* :func:`closed_form_curve` -- the uniform-routing miss model;
* :func:`miss_curves_from_profile` -- the measured curves from a profile dict.

Printing, saving and plotting plans is the offline tools' business (``offline/plan_io.py``).

Miss curves are indexed from one slot: ``curves[l][k - 1] == f_l(k)`` for ``k = 1 .. E_l`` with
``E_l = len(curves[l])`` (layers may have different expert counts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


__all__ = ["plan_dp", "plan_hybrid", "plan_whole_layers", "plan_uniform", "plan_with_staging", "staging_rows", "layer_staging_rows", "plan_cost", "closed_form_curve",
           "miss_curves_from_profile", "uniform_split", "layer_costs"]


# -- validation helpers ------------------------------------------------------------------------
def _check_curves(curves: Sequence[Sequence[float]]) -> list[list[float]]:
    if isinstance(curves, (str, bytes)) or not isinstance(curves, Sequence) or len(curves) == 0:
        raise ValueError("miss curves must be a non-empty list with one list of floats per MoE layer")
    out = []
    for layer, curve in enumerate(curves):
        if isinstance(curve, (str, bytes)) or not isinstance(curve, Sequence) or len(curve) == 0:
            raise ValueError(f"miss curve of layer {layer} must be a non-empty list of floats "
                             f"(f(k) for k = 1..E), got {curve!r}")
        values = []
        for k, v in enumerate(curve, start=1):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"miss curve of layer {layer}: f({k}) must be a finite number, got {v!r}")
            values.append(float(v))
        out.append(values)
    return out


def _check_budget(caps: Sequence[int], total: int, lo: int) -> None:
    """ValueError unless some ``s`` with ``lo <= s_l <= caps[l]`` sums to ``total``."""
    if isinstance(total, bool) or not isinstance(total, int):
        raise ValueError(f"total slots must be an integer, got {total!r}")
    if isinstance(lo, bool) or not isinstance(lo, int) or lo < 1:
        raise ValueError(f"lo (minimum slots per layer) must be an integer >= 1, got {lo!r}")
    num_layers = len(caps)
    if lo > min(caps):
        raise ValueError(f"lo={lo} slots per layer is more than layer {list(caps).index(min(caps))} "
                         f"has experts ({min(caps)}); lower lo")
    if total < lo * num_layers:
        raise ValueError(f"total={total} slots is too small: {num_layers} MoE layers need at least "
                         f"lo={lo} slot(s) each ({lo * num_layers} in all); raise the budget")
    if total > sum(caps):
        raise ValueError(f"total={total} slots is more than the {sum(caps)} experts of all "
                         f"{num_layers} MoE layers together; lower the budget (or keep every expert "
                         "resident)")


# -- planners ----------------------------------------------------------------------------------
def plan_dp(curves: Sequence[Sequence[float]], total: int, lo: int = 1) -> list[int]:
    """Slots per layer minimising ``sum_l f_l(s_l)`` exactly, with ``sum(s) == total``.

    ``curves[l][k - 1] = f_l(k)`` for ``k = 1 .. E_l``; each layer gets ``lo <= s_l <= E_l``.
    Curves need not be monotone.  Cost O(L * max E) vector ops of length ``total``.

    Tie-breaking (deterministic): among all optimal allocations the **lexicographically largest**
    slot vector is returned, i.e. earlier layers get the extra slots -- the same convention as
    :func:`uniform_split`.  Ties are exact float equality of the costs the DP
    computes (e.g. flat curves, or integer-valued ones), not a tolerance.

    Raises ``ValueError`` when no allocation is feasible (``total < lo * L``,
    ``total > sum(E_l)``, ``lo > min(E_l)``) or a curve is malformed.
    """
    f = _check_curves(curves)
    caps = [len(c) for c in f]
    _check_budget(caps, total, lo)
    num_layers = len(f)

    # best[i][j]: minimal cost of layers i..L-1 using exactly j slots (inf if infeasible).
    # Built from the back so that the forward reconstruction can take the largest k first; one
    # vector op per (layer, k) keeps it fast at E = 128 and ~100 layers (float64, the same IEEE
    # additions as Python floats, so the exact-equality reconstruction below still holds).
    inf = math.inf
    table = torch.full((num_layers + 1, total + 1), inf, dtype=torch.float64)
    table[num_layers, 0] = 0.0
    for i in range(num_layers - 1, -1, -1):
        nxt, row = table[i + 1], table[i]
        for k in range(lo, min(caps[i], total) + 1):
            row[k:] = torch.minimum(row[k:], nxt[: total + 1 - k] + f[i][k - 1])
    best = table.tolist()
    if best[0][total] == inf:  # unreachable after _check_budget, kept as a guard
        raise ValueError(f"no allocation of {total} slots satisfies lo={lo} <= s_l <= E_l")

    slots, j = [], total
    for i in range(num_layers):
        target, nxt, curve = best[i][j], best[i + 1], f[i]
        for k in range(min(caps[i], j), lo - 1, -1):  # largest k first -> lexicographically largest
            rest = nxt[j - k]
            if rest < inf and curve[k - 1] + rest == target:  # same float ops as above: exact
                break
        else:  # pragma: no cover - the DP guarantees a match
            raise AssertionError("plan_dp: reconstruction failed")
        slots.append(k)
        j -= k
    return slots


def layer_staging_rows(own: int, top_k: int, prefill_rows: int = 0,
                       num_experts: int | None = None) -> int:
    """Staging rows a loading layer with ``own`` slots may use (``engine/staging.py``): the
    rest of a token's ``top_k`` experts, plus ``prefill_rows`` where it holds fewer than
    ``num_experts`` (None: any count). A layer with no own slot never loads
    (``plan.layer_loads``): none."""
    if own <= 0:
        return 0
    offloaded = num_experts is None or own < num_experts
    return max(top_k - own, 0) + (prefill_rows if offloaded else 0)


def staging_rows(slots: Sequence[int], top_k: int, loads: bool = True,
                 prefill_rows: int = 0, num_experts: int | None = None) -> int:
    """Shared staging rows a plan needs: the most any loading layer uses (a token's ``top_k``
    experts must fit in its own slots plus the rows; ``layer_staging_rows``); none where nothing
    is ever loaded (``loads`` False: hybrid "host-only", whose device tokens are all resident)."""
    if not loads:
        return 0
    return max((layer_staging_rows(s, top_k, prefill_rows, num_experts) for s in slots),
               default=0)


def plan_with_staging(total: int, top_k: int, num_layers: int,
                      plan: Callable[[int, int], list[int]],
                      cost: Callable[[list[int]], float] | None = None) -> list[int]:
    """Own slots per layer when ``total`` device slots pay for the shared staging rows too.

    For each staging size ``g = 0 .. top_k - 1`` whose budget allows ``lo = top_k - g`` slots
    per layer: ``plan(total - g, lo)``; kept if it needs at most ``g`` rows. Without ``cost``
    the first kept plan wins (fewest staging rows: the uniform split); with it the cheapest
    (ties: fewer staging rows) -- the DP decides whether one-slot layers plus staging beat
    ``top_k`` slots everywhere.
    """
    best: tuple[float, list[int]] | None = None
    for g in range(max(top_k, 1)):
        lo = max(1, top_k - g)
        if total - g < lo * num_layers:
            continue
        slots = plan(total - g, lo)
        if staging_rows(slots, top_k) > g:
            continue
        value = cost(slots) if cost is not None else 0.0
        if best is None or value < best[0]:
            best = (value, slots)
        if cost is None:
            break
    if best is None:
        raise ValueError(f"{total} slots cannot give every layer one slot plus the "
                         f"{top_k - 1} shared staging row(s) a top-{top_k} token needs; "
                         "raise the budget")
    return best[1]


def plan_hybrid(host_curves: Sequence[Sequence[float]], total: int, top_k: int,
                whole_layers: bool = False) -> list[int]:
    """Own slots per layer (0 allowed) minimising ``sum_l h_l(s_l)`` for hybrid execution, where
    ``host_curves[l][s] = h_l(s)``, s = 0..E, is the host work per decoded token with s slots
    (``offline/simulator.py: host_curves``). ``total`` pays for the shared staging rows too
    (``top_k - min(s)`` over the layers with slots: a layer below top_k own slots may still
    load into them; one with none lives on the host and never loads). At large batches the
    curves favour whole resident layers (llama.cpp's ``--n-cpu-moe`` split, which needs no
    staging row) over the same slots spread thin; at batch 1, the frequent experts of every
    layer.

    ``whole_layers``: every layer all resident or none (``plan_whole_layers``), for where the
    host and the device are the same memory (CPU without an emulated or limited link): there a
    host expert costs what a resident one does, so slots save no work, and a partial layer
    only adds its per-step decision of which tokens go where."""
    h = _check_curves(host_curves)
    if whole_layers:
        return plan_whole_layers(h, total)
    num_layers = len(h)
    # above any allowed plan's cost: rules out own counts a plan's staging rows do not serve
    barred = sum(max(c) for c in h) + 1.0
    experts = sum(len(c) - 1 for c in h)
    best: tuple[float, list[int]] | None = None
    for g in range(max(top_k, 1)):
        lo = top_k - g  # the smallest own count these g staging rows serve (or none: 0)
        budget = total - g
        if budget < 0 or budget > experts:
            continue
        allowed = [[v if s == 0 or s >= lo else barred for s, v in enumerate(c)] for c in h]
        # plan_dp indexes f(k) from k = 1: f(k) = h(k - 1) is the same list, one slot shifted
        slots = [k - 1 for k in plan_dp(allowed, budget + num_layers, lo=1)]
        if any(0 < s < lo for s in slots):  # no allowed split: every other needs <= g rows
            continue
        value = sum(curve[s] for curve, s in zip(h, slots))
        if best is None or value < best[0]:
            best = (value, slots)
    if best is None:
        raise ValueError(f"{total} slots: no split fits between 0 and the "
                         f"{experts} experts of all layers")
    return best[1]


def plan_whole_layers(host_curves: Sequence[Sequence[float]], total: int) -> list[int]:
    """Whole layers resident (``E_l`` own slots) or on the host (0), at most ``total`` slots:
    the layers that save the most host work ``h_l(0) - h_l(E_l)`` (a 0/1 knapsack; ties: the
    later layers, as llama.cpp's ``--n-cpu-moe`` keeps the last ones). Slots left over stay
    unused: a partial layer would take them, and no staging row is needed."""
    h = _check_curves(host_curves)
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total slots must be an integer >= 0, got {total!r}")
    sizes = [len(c) - 1 for c in h]
    gains = [c[0] - c[-1] for c in h]
    # best[c]: (host work saved, layers chosen) using at most c slots; later layers first so
    # that a tie keeps the choice made with the later layers
    best: list[tuple[float, tuple[int, ...]]] = [(0.0, ())] * (total + 1)
    for layer in reversed(range(len(h))):
        size, gain = sizes[layer], gains[layer]
        for c in range(total, size - 1, -1):
            saved, chosen = best[c - size]
            if saved + gain > best[c][0] + 1e-12:
                best[c] = (saved + gain, chosen + (layer,))
    chosen = set(best[total][1])
    return [sizes[l] if l in chosen else 0 for l in range(len(h))]


def plan_uniform(num_layers: int, experts: int | Sequence[int], total: int, lo: int = 1) -> list[int]:
    """``total`` slots split as evenly as possible over ``num_layers``; earlier layers get the remainder.

    ``experts`` is the expert count per layer (one int for all, or one per layer).  With equal
    counts this is exactly :func:`uniform_split`; when per-layer counts differ
    and a layer's share exceeds its experts, the excess is split again (same rule) over the layers
    that still have room.  Raises ``ValueError`` for an infeasible budget.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    if isinstance(experts, int) and not isinstance(experts, bool):
        caps = [experts] * num_layers
    else:
        caps = list(experts)
        if len(caps) != num_layers:
            raise ValueError(f"experts lists {len(caps)} counts for {num_layers} layers; give one per layer")
    if any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in caps):
        raise ValueError(f"expert counts must be integers >= 1, got {caps}")
    _check_budget(caps, total, lo)

    slots = uniform_split(total, num_layers)
    while True:
        excess = sum(max(0, s - c) for s, c in zip(slots, caps))
        if excess == 0:
            return slots
        slots = [min(s, c) for s, c in zip(slots, caps)]
        open_layers = [i for i in range(num_layers) if slots[i] < caps[i]]
        for i, extra in zip(open_layers, uniform_split(excess, len(open_layers))):
            slots[i] += extra


def plan_cost(slots: Sequence[int], curves: Sequence[Sequence[float]]) -> float:
    """``sum_l f_l(s_l)``: expected misses per decoded token of an allocation."""
    return sum(layer_costs(slots, curves))


def layer_costs(slots: Sequence[int], curves: Sequence[Sequence[float]]) -> list[float]:
    f = _check_curves(curves)
    if len(slots) != len(f):
        raise ValueError(f"{len(slots)} slot counts for {len(f)} miss curves; give one per layer")
    out = []
    for layer, (s, curve) in enumerate(zip(slots, f)):
        if not 1 <= s <= len(curve):
            raise ValueError(f"layer {layer}: {s} slots is outside 1..{len(curve)} (its miss curve)")
        out.append(curve[s - 1])
    return out


# -- miss curves -------------------------------------------------------------------------------
def closed_form_curve(num_experts: int, top_k: int, top1_ratio: float,
                      prefetch_accuracy: float) -> list[float]:
    """Expected misses per token ``f(k)``, ``k = 1 .. num_experts``, assuming uniform routing.

    With ``E = num_experts``:

    * a token activates on average ``a = top1_ratio * 1 + (1 - top1_ratio) * top_k`` experts
      (``top1_ratio`` = fraction of tokens whose second..k-th experts were gated off);
    * with ``k`` of the ``E`` experts resident and experts chosen uniformly at random, each needed
      expert hits with probability ``k / E``, so misses per token are ``a * (1 - k/E)``;
    * prefetching loads at most one expert per token ahead of time and is right with probability
      ``prefetch_accuracy``, turning that fraction of the first expert's misses into hits:
      subtract ``prefetch_accuracy * (1 - k/E)``.

    ``f(k) = max(0, (a - prefetch_accuracy) * (1 - k/E))``; non-increasing in ``k`` and
    ``f(E) == 0``.  This is our reading of the assumptions behind the public AdapMoE code
    (uniform expert choice, mixing the top-1 ratio and the prefetch accuracy), not a copy of it;
    measured curves (:func:`miss_curves_from_profile`) should be preferred when a trace exists.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in 1..{num_experts}, got {top_k!r}")
    for name, v in (("top1_ratio", top1_ratio), ("prefetch_accuracy", prefetch_accuracy)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    active = top1_ratio * 1.0 + (1.0 - top1_ratio) * top_k
    out = []
    for k in range(1, num_experts + 1):
        miss = 1.0 - k / num_experts
        out.append(max(0.0, active * miss - prefetch_accuracy * miss))
    return out


def miss_curves_from_profile(profile: Any) -> list[list[float]]:
    """The measured per-layer miss curves, ``profile["miss_curves"][l][k - 1] = f_l(k)``.

    ``profile`` is a profile dict (or an object with ``to_dict()``, e.g. ``Profile``).
    """
    if hasattr(profile, "to_dict") and not isinstance(profile, dict):
        profile = profile.to_dict()
    if not isinstance(profile, dict):
        raise ValueError(f"profile must be a dict (the loaded profile JSON), got {type(profile).__name__}")
    curves = profile.get("miss_curves")
    if curves is None:
        raise ValueError("the profile has no \"miss_curves\" (expected misses per token for each "
                         "layer and slot count); run `adapmoe profile` / calibrate with a trace "
                         "first, or use closed_form_curve() / plan=\"uniform\"")
    return _check_curves(curves)


def uniform_split(total: int, num_layers: int) -> list[int]:
    """Split ``total`` slots over layers as evenly as possible (earlier layers get the remainder)."""
    base, rest = divmod(total, num_layers)
    return [base + (1 if i < rest else 0) for i in range(num_layers)]
