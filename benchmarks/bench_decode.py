"""Decode throughput and expert traffic: stock vLLM vs adapmoe budgets, alternating in one run.

For each batch size, every configuration generates the same greedy batch; rounds alternate the
configurations (A B C A B C ...) so machine noise hits all alike; medians are reported.
Decode tokens/s = batch × (N−1) / (t(N new tokens) − t(1 new token)), i.e. prefill removed.

Configurations: stock vLLM with default flags (compiled: the baseline users run); adapmoe
with every expert resident ("100%"); for each budget below 100%: uniform LRU slots, and with
`--profile` the full AdapMoE setting (DP plan from the profile's miss curves + prefetch + gating
at `--threshold`). All compiled (vLLM's default); `--eager` adds "stock eager" and "100% eager"
(`enforce_eager=True`) as a second, labelled baseline.

Link emulation (`--link`): the emulated host→device bandwidth is derived from this machine's own
all-resident batch-1 decode so that one expert load costs about `--link-layers` (10) layers of
decode compute; those configurations are repeated with it and labelled "emulated-link".

    python benchmarks/bench_decode.py [--model DIR] [--batches 1 16] [--budgets 1.0 0.5 0.25]
        [--profile P.json --threshold 0.01] [--link] [--eager] [--rounds 3]
        [--out benchmarks/results/decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def make_prompts(model: str, n: int) -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "vllm_adapmoe" / "bundled" / "heldout.txt").read_text()
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    return [lines[(i * 37) % len(lines)] for i in range(n)]


def timed(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0


def decode_rate(llm, prompts, new_tokens: int, adapmoe: bool = False) -> tuple[float, dict | None]:
    """Decode tokens/s, and (adapmoe) the counters of the decode part: the full run's minus
    the prefill-only run's."""
    import vllm_adapmoe

    def run(n: int) -> tuple[float, dict | None]:
        if adapmoe:
            vllm_adapmoe.reset_stats(llm)
        t = timed(llm, prompts, n)
        return t, vllm_adapmoe.stats(llm)["total"] if adapmoe else None

    (t_full, full), (t_prefill, prefill) = run(new_tokens), run(1)
    rate = len(prompts) * (new_tokens - 1) / max(t_full - t_prefill, 1e-9)
    if not adapmoe:
        return rate, None
    decode = {k: full[k] - prefill[k] for k in full if isinstance(full[k], (int, float))}
    decode["decoded_tokens"] = len(prompts) * (new_tokens - 1)
    decode["hit_rate"] = decode["hits"] / max(decode["hits"] + decode["misses"], 1)
    return rate, decode


def main() -> None:
    import vllm_adapmoe
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=vllm_adapmoe.bundled_model_path())
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                    help="fraction of each layer's experts held on device")
    ap.add_argument("--link", action="store_true", help="also run with an emulated slow link")
    ap.add_argument("--link-only", action="store_true",
                    help="with --link: offloaded configurations only with the emulated link")
    ap.add_argument("--ablation", action="store_true",
                    help="with --profile: also full AdapMoE minus one mechanism at a time")
    ap.add_argument("--eager", action="store_true",
                    help="add enforce_eager stock and all-resident runs as a second baseline")
    ap.add_argument("--link-layers", type=float, default=10.0)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eviction", default="lru")
    ap.add_argument("--profile", default=None, help="enables the full AdapMoE configurations")
    ap.add_argument("--threshold", type=float, default=0.01)
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    args = ap.parse_args()
    if args.link and 1.0 not in args.budgets:
        ap.error("--link calibrates the emulated link on the all-resident run: keep 1.0 in --budgets")

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    E, L = cfg["num_local_experts"], cfg["num_hidden_layers"]
    common = dict(model=args.model, max_model_len=512, seed=0, kv_cache_memory_bytes=256 * 2**20,
                  max_num_seqs=max(args.batches))
    engines = {"stock": LLM(**common)}  # default flags: compiled
    if args.eager:
        engines["stock eager"] = LLM(**common, enforce_eager=True)

    def plain_profile() -> str:
        """The profile without its fitted look-ahead maps (guesses by the routers alone)."""
        data = json.loads(Path(args.profile).read_text())
        data.pop("predictor", None)
        path = Path(args.out).with_suffix(".plain-profile.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        return str(path)

    def variants(budget: float) -> dict[str, dict]:
        if budget >= 1.0:
            return {"100%": {}}
        out = {f"LRU {budget:.0%}": {"cache_slots": max(1, round(E * budget)), "eviction": args.eviction}}
        if args.profile:
            full = {"cache_total_slots": max(L, round(E * L * budget)), "plan": "dp",
                    "prefetch": True, "threshold": args.threshold, "profile": args.profile}
            out[f"AdapMoE {budget:.0%}"] = full
            if args.ablation:  # full minus (or plus) one mechanism
                out[f"AdapMoE {budget:.0%} -prefetch"] = {**full, "prefetch": False}
                # link_layers 0: every guess pays (the rule as on a free link)
                out[f"AdapMoE {budget:.0%} -pay-off"] = {**full, "link_layers": 0}
                out[f"AdapMoE {budget:.0%} -fitted predictor"] = {**full, "profile": plain_profile()}
                out[f"AdapMoE {budget:.0%} +LFU"] = {**full, "eviction": "lfu"}
                out[f"AdapMoE {budget:.0%} +lookahead 3"] = {**full, "prefetch_lookahead": 3}
        return out

    def engine(settings: dict, eager: bool = False):
        return LLM(**common, model_impl="adapmoe", additional_config={"adapmoe": settings},
                   enforce_eager=eager)

    configs = {name: cfg for b in args.budgets for name, cfg in variants(b).items()}
    for name, settings in configs.items():
        if name == "100%" or not (args.link and args.link_only):
            engines[name] = engine(settings)
    if args.eager and "100%" in configs:
        engines["100% eager"] = engine({}, eager=True)
    prompts_by_batch = {b: make_prompts(args.model, b) for b in args.batches}

    link_gbps = None
    if args.link:
        ref = engines.get("100%", engines["stock"])
        rate = statistics.median(decode_rate(ref, prompts_by_batch[1][:1], args.new_tokens)[0]
                                 for _ in range(3))
        layer_s = 1.0 / rate / L
        expert_bytes = vllm_adapmoe.stats(ref)["layers"][0]["expert_bytes"]
        link_gbps = expert_bytes / (args.link_layers * layer_s) / 1e9
        print(f"decode layer time {layer_s * 1e3:.3f} ms; expert {expert_bytes} B; "
              f"emulated link {link_gbps:.4f} GB/s (1 load ≈ {args.link_layers:g} layers)")
        for name, settings in configs.items():
            if name != "100%":
                engines[f"{name} emulated-link"] = engine({**settings, "link_gbps": link_gbps})

    rows = []
    for batch, prompts in prompts_by_batch.items():
        rates: dict[str, list[float]] = {name: [] for name in engines}
        traffic: dict[str, dict] = {}
        for name, llm in engines.items():  # warm-up round (fills caches, JIT, allocator)
            decode_rate(llm, prompts, 8, not name.startswith("stock"))
        for _ in range(args.rounds):
            for name, llm in engines.items():
                rate, counters = decode_rate(llm, prompts, args.new_tokens, not name.startswith("stock"))
                rates[name].append(rate)
                if counters:
                    traffic[name] = counters  # last round's (caches warm)
        stock = statistics.median(rates["stock"])
        resident = statistics.median(rates.get("100%", rates["stock"]))
        for name, r in rates.items():
            med = statistics.median(r)
            row = {"batch": batch, "config": name, "decode_tok_s": med,
                   "vs_stock": med / stock, "vs_all_resident": med / resident, "samples": r}
            if name in traffic:
                t = traffic[name]
                decoded = t["decoded_tokens"]
                row.update(slots=[x["slots"] for x in vllm_adapmoe.stats(engines[name])["layers"]],
                           activated_per_token_layer=t["activated_experts"] / max(t["tokens"], 1),
                           prefetch_accuracy=t["prefetch_correct"] / t["prefetch_issued"]
                           if t["prefetch_issued"] else None,
                           hit_rate=t["hit_rate"],
                           misses_per_decoded_token=t["misses"] / decoded,
                           loads_per_decoded_token=t["loads"] / decoded,
                           bytes_per_decoded_token=t["bytes_loaded"] / decoded,
                           stall_s=t["stall_s"], decoded_tokens=decoded)
            rows.append(row)

    print(f"\n{'batch':>5} {'config':<32} {'tok/s':>8} {'vs stock':>8} {'vs 100%':>8} "
          f"{'hit rate':>8} {'loads/tok':>9}")
    for r in rows:
        print(f"{r['batch']:>5} {r['config']:<32} {r['decode_tok_s']:>8.1f} {r['vs_stock']:>8.2f} "
              f"{r['vs_all_resident']:>8.2f} {r.get('hit_rate', float('nan')):>8.3f} "
              f"{r.get('loads_per_decoded_token', float('nan')):>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "experts_per_layer": E, "moe_layers": L,
                               "baseline": "stock vLLM, default flags (compiled)",
                               "link_gbps_emulated": link_gbps, "new_tokens": args.new_tokens,
                               "rounds": args.rounds, "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
