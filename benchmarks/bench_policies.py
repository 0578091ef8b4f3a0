"""Trace-driven comparison of cache policies at fixed budgets (machine-independent counts).

Replays one routing trace (record it with `adapmoe trace`) through the simulator for each
budget: uniform LRU, uniform LFU, uniform MRS (score = decayed router weight), DP-sized LRU, DP + prefetch, DP + prefetch + gating, and
Belady's optimum (uniform slots, no prefetch: the best any eviction policy can do there).
Reports on-demand misses and total loads per decoded token (pure-decode steps), hit rate,
prefetch accuracy; writes JSON and a PNG.

    python benchmarks/bench_policies.py --trace T.npz --profile P.json [--budgets 0.25 0.5]
        [--threshold 0.01] [--out benchmarks/results/policies.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from vllm_adapmoe.engine.cache_plan import miss_curves_from_profile, plan_dp
    from vllm_adapmoe.config import uniform_split
    from vllm_adapmoe.offline.simulator import simulate
    from vllm_adapmoe.offline.trace import Trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--threshold", type=float, default=0.01)
    ap.add_argument("--out", default="benchmarks/results/policies.json")
    args = ap.parse_args()

    trace = Trace.load(args.trace)
    profile = json.loads(Path(args.profile).read_text())
    curves = miss_curves_from_profile(profile)
    sens = profile["sensitivity"]
    E, L = int(trace.meta["num_experts"]), trace.num_layers
    k = int(trace.meta["top_k"])
    gating = dict(threshold=args.threshold, sensitivity=sens)
    rows = []
    for budget in args.budgets:
        total = max(L, round(budget * E * L))
        uniform, dp = uniform_split(total, L), plan_dp(curves, total, lo=min(k, E))
        variants = [
            ("uniform LRU", uniform, "lru", {}),
            ("uniform LFU", uniform, "lfu", {}),
            ("uniform MRS", uniform, "mrs", {}),
            ("DP LRU", dp, "lru", {}),
            ("DP + prefetch", dp, "lru", {"prefetch": True}),
            (f"DP + prefetch + gating T={args.threshold:g}", dp, "lru", {"prefetch": True, **gating}),
            (f"DP + prefetch + gating T={args.threshold:g}, MRS", dp, "mrs",
             {"prefetch": True, **gating}),
            ("Belady (uniform)", uniform, "belady", {}),
            ("Belady (DP)", dp, "belady", {}),
        ]
        for name, slots, policy, extra in variants:
            r = simulate(trace, slots, policy, **extra)
            layers = r["layers"]
            dec_tokens = max(layers[0]["decode_step_tokens"], 1)
            misses = sum(x["decode_step_misses"] for x in layers) / dec_tokens
            t = r["total"]
            rows.append({"budget": budget, "total_slots": total, "config": name, "slots": slots,
                         "misses_per_decoded_token": misses,
                         "loads_per_decoded_token": t["loads_per_decoded_token"],
                         "hit_rate": t["hit_rate"],
                         "activated_per_token_layer": t["activated_experts"] / max(t["tokens"], 1),
                         "prefetch_issued": t["prefetch_issued"],
                         "prefetch_accuracy": t["prefetch_correct"] / t["prefetch_issued"]
                         if t["prefetch_issued"] else None})
    print(f"{'budget':>6} {'config':<34} {'misses/tok':>10} {'loads/tok':>9} {'hit rate':>8}  slots")
    for r in rows:
        print(f"{r['budget']:>6.0%} {r['config']:<34} {r['misses_per_decoded_token']:>10.3f} "
              f"{r['loads_per_decoded_token']:>9.3f} {r['hit_rate']:>8.3f}  {r['slots']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trace": args.trace, "profile": args.profile, "rows": rows}, indent=1))
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    budgets = sorted({r["budget"] for r in rows})
    names = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [next(r["misses_per_decoded_token"] for r in rows if r["budget"] == b and r["config"] == name)
                for b in budgets]
        ax.bar([j + i * width for j in range(len(budgets))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(budgets))], [f"{b:.0%}" for b in budgets])
    ax.set_xlabel("device budget (share of all experts)")
    ax.set_ylabel("on-demand misses per decoded token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
