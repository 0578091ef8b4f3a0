"""Adaptive-gating sweep: held-out perplexity vs activated experts per token, for the
sensitivity rule (per-layer S_l from a profile) and a naive rule (one fixed w2 threshold for all
layers, i.e. S_l = 1: drop trailing experts while their weight < sqrt(T); top-2: drop expert 2
when w2 < sqrt(T)). One engine; gating changed on the fly
(``vllm_adapmoe.set_gating``); every scored token is gated (``gate_prefill``).

    python benchmarks/sweep_threshold.py --profile vllm_adapmoe/bundled/shakespeare_moe.profile.json \\
        [--model DIR] [--thresholds ...] [--naive-w2 ...] [--out benchmarks/results/gating_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    import vllm_adapmoe
    from vllm import LLM
    from vllm_adapmoe.offline.evaluation import heldout_text, measure_gating, token_windows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=vllm_adapmoe.bundled_model_path())
    ap.add_argument("--profile", required=True)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1])
    ap.add_argument("--naive-w2", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.35, 0.4, 0.45],
                    help="naive rule: weight thresholds on the dropped experts' summed weight")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored")
    ap.add_argument("--out", default="benchmarks/results/gating_sweep.json")
    args = ap.parse_args()

    llm = LLM(model=args.model, model_impl="adapmoe", enforce_eager=True, max_model_len=1024, seed=0,
              additional_config={"adapmoe": {"profile": args.profile, "gate_prefill": True}})
    windows = token_windows(llm.get_tokenizer(), heldout_text(), 256, args.tokens)
    layers = len(vllm_adapmoe.stats(llm)["layers"])
    profile_s = json.loads(Path(args.profile).read_text())["sensitivity"]

    def measure(rule: str, threshold: float, sensitivity: list[float], **extra) -> dict:
        row = {"rule": rule, **extra, **measure_gating(llm, windows, threshold, sensitivity)}
        print(f"{rule:<12} T={threshold:<8.4g} ppl {row['ppl']:8.3f}  experts/token/layer "
              f"{row['activated_per_token_layer']:.3f}  top-1 {row['top1_fraction']:.1%}", flush=True)
        return row

    top_k = json.loads(Path(args.profile).read_text())["calibration"].get("top_k", 2)
    rows = [measure(f"stock top-{top_k}", 0.0, profile_s)]
    rows += [measure("sensitivity", t, profile_s) for t in args.thresholds]
    rows += [measure("naive", w * w, [1.0] * layers, w2_threshold=w) for w in args.naive_w2]
    base = rows[0]
    for r in rows:
        r["ppl_increase"] = r["ppl"] / base["ppl"] - 1
        r["activated_reduction"] = 1 - r["activated_per_token_layer"] / base["activated_per_token_layer"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "profile": args.profile,
                               "sensitivity": profile_s, "tokens": base["tokens"], "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")
    llm.llm_engine.engine_core.shutdown()


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, marker in (("sensitivity", "o-"), ("naive", "s--")):
        pts = sorted((r["activated_per_token_layer"], r["ppl"]) for r in rows if r["rule"] == rule)
        ax.plot(*zip(*pts), marker, label=rule)
    ax.axhline(rows[0]["ppl"], color="gray", lw=0.8, label=rows[0]["rule"])
    ax.set_xlabel("activated experts per token per layer")
    ax.set_ylabel("held-out perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
