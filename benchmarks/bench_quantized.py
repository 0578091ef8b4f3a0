"""FP8 and INT4 experts vs bf16 at equal device budget: bytes per load, held-out perplexity,
decode tok/s.

The bundled model's experts are quantized by ``adapmoe quantize`` into temporary directories:
FP8 e4m3 with 128 × 128 block scales, and INT4 in groups of 128 (compressed-tensors
pack-quantized). Every format runs under ``--model-impl adapmoe`` with vLLM's default flags
(compiled): every expert resident, and at the same ``cache_gib`` (``--budget`` of the bf16
experts' bytes: FP8 fits about twice the slots, INT4 about 3.8×) as uniform LRU and as full
AdapMoE (the bundled profile's DP plan, prefetch, gating at ``--threshold``), with an emulated
link (``link_gbps`` fixed for all, derived as in ``bench_decode.py``: one *bf16* expert load ≈
``--link-layers`` decode layers of the all-resident bf16 run; a quantized load moves its own
bytes). On CPU the quantized experts are computed by the engine's dequantizing kernel (vLLM has
no FP8 or INT4 MoE kernel without AMX), so all-resident FP8/INT4 is slower than bf16 here.

    python benchmarks/bench_quantized.py [--batches 1 16] [--budget 0.25] [--rounds 3]
        [--out benchmarks/results/quantized_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import decode_rate, make_prompts  # noqa: E402


def main() -> None:
    import vllm_adapmoe
    from vllm import LLM
    from transformers import AutoTokenizer

    from vllm_adapmoe.offline.evaluation import heldout_text, perplexity, token_windows
    from vllm_adapmoe.offline.quantize import quantize_experts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--budget", type=float, default=0.25, help="share of the bf16 experts' bytes")
    ap.add_argument("--link-layers", type=float, default=10.0)
    ap.add_argument("--threshold", type=float, default=0.013)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/quantized_cpu.json")
    args = ap.parse_args()

    bf16 = vllm_adapmoe.bundled_model_path()
    profile = str(Path(bf16).with_suffix(".profile.json"))
    tmp = Path(tempfile.mkdtemp(prefix="adapmoe-quantized-"))
    models = {"bf16": bf16, **{scheme: str(quantize_experts(bf16, tmp / scheme, scheme,
                                                            progress=False))
                               for scheme in ("fp8", "int4")}}
    common = dict(max_model_len=512, seed=0, kv_cache_memory_bytes=256 * 2**20,
                  max_num_seqs=max(args.batches), model_impl="adapmoe")

    def engine(fmt: str, settings: dict):
        return LLM(model=models[fmt], additional_config={"adapmoe": settings}, **common)

    engines = {f"{fmt} 100%": engine(fmt, {}) for fmt in models}
    bytes_of = {fmt: vllm_adapmoe.stats(engines[f"{fmt} 100%"])["layers"][0]["expert_bytes"]
                for fmt in models}
    cfg = json.loads((Path(bf16) / "config.json").read_text())
    E, L = cfg["num_local_experts"], cfg["num_hidden_layers"]
    cache_gib = args.budget * E * L * bytes_of["bf16"] / 2**30

    tok = AutoTokenizer.from_pretrained(bf16)
    windows = token_windows(tok, heldout_text(), 256, 8192)
    quality = {fmt: perplexity(engines[f"{fmt} 100%"], windows) for fmt in models}

    prompts = {b: make_prompts(bf16, b) for b in args.batches}
    rate = statistics.median(decode_rate(engines["bf16 100%"], prompts[1][:1], args.new_tokens)[0]
                             for _ in range(3))
    link_gbps = bytes_of["bf16"] / (args.link_layers / rate / L) / 1e9
    budget = f"{args.budget:.0%} of bf16 bytes"
    for fmt in models:
        engines[f"{fmt} LRU {budget}, emulated link"] = engine(
            fmt, {"cache_gib": cache_gib, "link_gbps": link_gbps})
        engines[f"{fmt} AdapMoE {budget}, emulated link"] = engine(
            fmt, {"cache_gib": cache_gib, "plan": "dp", "prefetch": True, "profile": profile,
                  "threshold": args.threshold, "link_gbps": link_gbps})

    rows = []
    for batch, batch_prompts in prompts.items():
        rates: dict[str, list[float]] = {name: [] for name in engines}
        traffic: dict[str, dict] = {}
        for llm in engines.values():  # warm-up
            decode_rate(llm, batch_prompts, 8, True)
        for _ in range(args.rounds):  # alternating
            for name, llm in engines.items():
                r, counters = decode_rate(llm, batch_prompts, args.new_tokens, True)
                rates[name].append(r)
                traffic[name] = counters
        for name, r in rates.items():
            fmt = name.split()[0]
            twin = name.replace(fmt, "bf16", 1)
            t = traffic[name]
            rows.append({"batch": batch, "config": name, "format": fmt,
                         "decode_tok_s": statistics.median(r), "samples": r,
                         "vs_bf16_same_setting": statistics.median(r) / statistics.median(rates[twin]),
                         "slots_total": sum(x["slots"] for x in vllm_adapmoe.stats(engines[name])["layers"]),
                         "hit_rate": t["hit_rate"], "expert_bytes": bytes_of[fmt],
                         "bytes_per_decoded_token": t["bytes_loaded"] / t["decoded_tokens"],
                         "activated_per_token_layer": t["activated_experts"] / max(t["tokens"], 1),
                         "emulated": "link" in name})
            print(f"b{batch:<3} {name:45s} {rows[-1]['decode_tok_s']:8.1f} tok/s "
                  f"×{rows[-1]['vs_bf16_same_setting']:.2f} vs bf16, hit {t['hit_rate']:.2f}")
    out = {"bench": "quantized", "model": "bundled", "budget": args.budget,
           "cache_gib": cache_gib, "link_gbps_emulated": link_gbps,
           "link_layers": args.link_layers, "threshold": args.threshold,
           "expert_bytes": bytes_of, "bytes_ratio_fp8": bytes_of["fp8"] / bytes_of["bf16"],
           "bytes_ratio_int4": bytes_of["int4"] / bytes_of["bf16"],
           "heldout": quality, "rounds": args.rounds, "new_tokens": args.new_tokens,
           "kernels": {"bf16": "vLLM cpu_fused_moe", "fp8": "engine dequantizing grouped GEMM",
                       "int4": "engine dequantizing grouped GEMM"},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}: bytes vs bf16 fp8 {out['bytes_ratio_fp8']:.3f}, int4 "
          f"{out['bytes_ratio_int4']:.3f}; ppl " + ", ".join(
              f"{fmt} {q['ppl']:.3f}" for fmt, q in quality.items()))


if __name__ == "__main__":
    main()
