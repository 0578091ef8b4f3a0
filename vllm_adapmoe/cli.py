"""The ``adapmoe`` console script.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_cmd_<name>(args) -> int`` registered in
``_COMMANDS``; add new ones (plan, sweep, trace, ...) the same way.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


# -- calibrate -------------------------------------------------------------------------------
def _add_calibrate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from vllm_adapmoe.offline.calibrate import DEFAULT_DATA

    p = sub.add_parser(
        "calibrate", help="measure per-layer sensitivity S_l and routing statistics",
        description="Measure AdapMoE's per-layer sensitivity S_l (Fisher estimate of the loss "
                    "increase when a token's last top-k expert is dropped) and routing "
                    "statistics, and write them as a profile JSON.")
    p.add_argument("model_dir", help="local Hugging Face model directory (any architecture --model-impl adapmoe supports)")
    p.add_argument("--data", default=None,
                   help=f"text file or directory of .txt files (default: {DEFAULT_DATA.name}, "
                        "bundled)")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--max-tokens", type=int, default=32768,
                   help="calibration tokens in all (default 32768)")
    p.add_argument("--seed", type=int, default=0, help="window sampling seed (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    return p


def format_profile_table(profile) -> str:
    routing = profile.routing
    n_exp = len(routing[0]["top1_freq"]) if routing and "top1_freq" in routing[0] else 0
    top_k = profile.calibration.get("top_k", 2)
    t_key = "0.005"
    lines = [f"{'layer':>5}  {'S_l':>11}  {'mean w_k':>8}  {'top1 H(bits)':>12}  "
             f"{'top-1 @T=' + t_key:>13}  {'kept @T=' + t_key:>12}"]
    for i, s in enumerate(profile.sensitivity):
        r = routing[i] if i < len(routing) else {}
        frac = r.get("top1_fraction", {}).get(t_key)
        kept = r.get("mean_kept", {}).get(t_key)
        lines.append(f"{i:>5}  {s:>11.4g}  {r.get('w2_mean', float('nan')):>8.3f}  "
                     f"{r.get('top1_entropy_bits', float('nan')):>12.3f}  "
                     f"{'' if frac is None else format(frac, '.1%'):>13}  "
                     f"{'' if kept is None else format(kept, '.2f'):>12}")
    if n_exp:
        lines.append(f"(top-1 frequency entropy: max {math.log2(n_exp):.3f} bits for {n_exp} "
                     f"experts; w_k: weight of a token's {top_k}th expert; last columns: share of "
                     f"tokens gated to one expert and mean experts kept of {top_k}, dropping "
                     "trailing experts while (their weight)^2*S_l < T)")
    return "\n".join(lines)


def format_predictor_table(predictor: list[dict]) -> str:
    """Held-out accuracy of the look-ahead guesses, plain router vs fitted map."""
    lines = [f"{'layer':>5} {'ahead':>5}  {'router top-1':>12} {'recall':>6}  "
             f"{'fitted top-1':>12} {'recall':>6}  uses"]
    for e in predictor:
        p, f = e["plain"], e["fitted"]
        lines.append(f"{e['layer']:>5} {e['depth']:>5}  {p['top1']:>12.1%} {p['recall']:>6.1%}  "
                     f"{f['top1']:>12.1%} {f['recall']:>6.1%}  {e['use']}")
    lines.append(f"(guessing layer l's experts from layer l-ahead's MoE input, on "
                 f"{predictor[0]['plain']['tokens'] if predictor else 0} held-out calibration "
                 "tokens; recall: share of the true top-k recovered)")
    return "\n".join(lines)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from vllm_adapmoe.offline.calibrate import calibrate
    from vllm_adapmoe.offline.profile import save_profile

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = calibrate(args.model_dir, args.data, window=args.window,
                        max_tokens=args.max_tokens, seed=args.seed, device=args.device,
                        progress=not args.quiet)
    out = save_profile(profile, args.out)
    if not args.quiet:
        c = profile.calibration
        print(format_profile_table(profile))
        if profile.predictor:
            print(format_predictor_table(profile.predictor))
        print(f"{c['tokens']} tokens in {c['windows']} windows of {c['window']}, "
              f"mean loss {c['mean_loss']:.3f} nats/token, {c['seconds']:.1f} s")
    print(f"wrote {out}")
    return 0


# -- trace -----------------------------------------------------------------------------------
def _add_trace(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "trace", help="record a routing trace from a live vLLM run of the plugin",
        description="Serve prompts cut from a text file through LLM(..., model_impl='adapmoe') "
                    "with continuous batching and record every step's routing (and next-layer "
                    "predictions) to an .npz trace (format: vllm_adapmoe/trace.py).")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    p.add_argument("--data", default=None, help="text file (default: bundled calibration text)")
    p.add_argument("--prompts", type=int, default=64, help="number of requests (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--batch", type=int, default=16, help="max concurrent requests (default 16)")
    p.add_argument("--settings", default="{}", help='adapmoe settings (JSON), default all resident')
    return p


def _cmd_trace(args: argparse.Namespace) -> int:
    import json
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams, TokensPrompt

    import vllm_adapmoe
    from vllm_adapmoe.offline.calibrate import DEFAULT_DATA

    text = open(args.data or DEFAULT_DATA, encoding="utf-8").read()
    llm = LLM(model=args.model_dir, model_impl="adapmoe", enforce_eager=True, seed=0,
              max_model_len=args.prompt_tokens + args.max_tokens + 8, max_num_seqs=args.batch,
              additional_config={"adapmoe": json.loads(args.settings)})
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    n = args.prompt_tokens
    if len(ids) < n * args.prompts:
        raise ValueError(f"{args.data or DEFAULT_DATA} has {len(ids)} tokens; need "
                         f"{n * args.prompts} for {args.prompts} prompts of {n}")
    prompts = [TokensPrompt(prompt_token_ids=ids[i * n:(i + 1) * n]) for i in range(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    vllm_adapmoe.start_trace(llm)
    llm.generate(prompts, params)
    path = vllm_adapmoe.stop_trace(llm, args.out)
    total = vllm_adapmoe.stats(llm)["total"]
    print(f"wrote {path}: {args.prompts} requests, {total['steps'] // len(vllm_adapmoe.stats(llm)['layers'])} "
          f"steps")
    llm.llm_engine.engine_core.shutdown()
    return 0


# -- profile (miss curves + prediction accuracy from a trace) --------------------------------
def _add_profile(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from vllm_adapmoe.engine.slot_table import POLICIES as LIVE_POLICIES

    p = sub.add_parser(
        "profile", help="add miss curves and prefetch accuracy from a trace to a profile",
        description="Replay a routing trace through the cache simulator for every per-layer "
                    "slot count k = 1..E (live policy + prefetcher + gating) and store each "
                    "layer's miss curve f_l(k) — on-demand misses per decoded token —, its host "
                    "curve h_l(s) for s = 0..E (host experts per decoded token under hybrid "
                    "execution) and the next-layer prediction accuracy in the profile (used by "
                    "plan='dp'; the host curves with hybrid on).")
    p.add_argument("profile")
    p.add_argument("--trace", required=True)
    p.add_argument("--out", default=None, help="write here instead of updating PROFILE")
    p.add_argument("--policy", default="lru", choices=list(LIVE_POLICIES),
                   help="the eviction policy served with (the live engine's)")
    p.add_argument("--no-prefetch", action="store_true", help="curves without the prefetcher")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="gating budget T the curves assume (default 0: no gating)")
    return p


def _cmd_profile(args: argparse.Namespace) -> int:
    from vllm_adapmoe.offline.profile import load_profile, save_profile
    from vllm_adapmoe.offline.simulator import host_curves, miss_curves, prediction_accuracy
    from vllm_adapmoe.offline.trace import Trace

    profile = load_profile(args.profile)
    trace = Trace.load(args.trace)
    if trace.num_layers != profile.num_layers:
        raise ValueError(f"trace has {trace.num_layers} layers, profile {profile.num_layers}")
    _warn_if_short(trace, args.trace)
    settings = {"prefetch": not args.no_prefetch, "threshold": args.threshold,
                "sensitivity": profile.sensitivity}
    profile.miss_curves = miss_curves(trace, args.policy, **settings)
    # what plan "dp" uses with hybrid on; gated as the miss curves are
    profile.host_curves = host_curves(trace, args.policy, threshold=args.threshold,
                                      sensitivity=profile.sensitivity)
    profile.prediction = prediction_accuracy(trace)
    profile.trace_settings = {"trace": str(args.trace), "policy": args.policy,
                              "prefetch": settings["prefetch"], "threshold": args.threshold,
                              "steps": trace.meta["steps"]}
    print(f"{'layer':>5}  {'pred top-1':>10}  {'pred recall':>11}  misses/decoded token for k = 1..E")
    for layer, curve in enumerate(profile.miss_curves):
        acc = profile.prediction[layer]
        fmt = (lambda v: "-" if v is None else f"{v:.1%}")
        print(f"{layer:>5}  {fmt(acc['top1']):>10}  {fmt(acc['recall']):>11}  "
              + " ".join(f"{v:.2f}" for v in curve))
    print(f"wrote {save_profile(profile, args.out or args.profile)}")
    return 0


SHORT_TRACE_TOKENS = 512  # decoded tokens per layer below which the curves are mostly noise


def _warn_if_short(trace, path: str) -> None:
    """plan "dp" follows the curves exactly, so curves from a few hundred tokens plan for that
    trace's accidents (which experts a handful of requests happened to use), not for the
    model's routing: say so, with the command that records more."""
    decoded = int(trace.decode.sum()) // max(trace.num_layers, 1)
    if decoded < SHORT_TRACE_TOKENS:
        print(f"adapmoe profile: warning: {path} has {decoded} decoded tokens per layer; curves "
              f"from under {SHORT_TRACE_TOKENS} follow that trace's noise and plan 'dp' with "
              "them. Record a longer one: adapmoe trace MODEL_DIR --out TRACE --prompts 64 "
              "--max-tokens 64 (the defaults)", file=sys.stderr)


# -- quantize --------------------------------------------------------------------------------
def _add_quantize(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize", help="write a copy of a checkpoint with its routed experts in FP8 or INT4",
        description="Quantize the routed experts of a bf16/fp16/fp32 checkpoint, everything "
                    "else unchanged and listed as ignored: --format fp8 = float8 e4m3 with one "
                    "float32 scale per block (quant_method \"fp8\", weight_block_size); "
                    "--format int4 = symmetric INT4 in groups, packed by compressed-tensors "
                    "(quant_method \"compressed-tensors\", format pack-quantized).")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=("fp8", "int4", "mxfp4"), default="fp8", dest="scheme",
                   help="fp8 or int4 (per-expert families), mxfp4 (gpt-oss)")
    p.add_argument("--block", type=int, default=128,
                   help="FP8 block side / INT4 group size (default 128)")
    p.add_argument("--dequantize", action="store_true",
                   help="write the quantized model's experts back in the source dtype "
                        "(for comparisons)")
    return p


def _cmd_quantize(args: argparse.Namespace) -> int:
    from vllm_adapmoe.offline.quantize import quantize_experts

    out = quantize_experts(args.model_dir, args.out_dir, args.scheme, args.block, args.dequantize)
    print(f"wrote {out}")
    return 0


# -- plan ------------------------------------------------------------------------------------
def _add_plan(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan", help="split a total slot budget over layers (DP on measured miss curves)",
        description="Choose slots per MoE layer for a total budget: 'dp' minimises the sum of "
                    "the profile's measured miss curves; 'closed-form' uses the paper-style "
                    "uniform-choice cost (top-1 ratio, prefetch accuracy); 'uniform' splits "
                    "evenly. Prints the plan and its expected misses under the measured curves.")
    p.add_argument("profile")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--total-slots", type=int)
    budget.add_argument("--fraction", type=float, help="share of all experts, e.g. 0.25")
    p.add_argument("--method", default="dp", choices=["dp", "closed-form", "uniform"])
    p.add_argument("--threshold", type=float, default=0.005,
                   help="gating T for the closed form's top-1 ratio (default 0.005)")
    p.add_argument("--out", default=None, help="plan JSON (default: PROFILE with .plan.json)")
    p.add_argument("--plot", default=None, help="also write a PNG of the plan")
    return p


def _cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vllm_adapmoe.engine.cache_plan import (closed_form_curve, plan_cost, plan_dp, plan_uniform,
                                                plan_with_staging, staging_rows)
    from vllm_adapmoe.offline.plan_io import plan_table, plot_plan, save_plan
    from vllm_adapmoe.offline.profile import load_profile

    profile = load_profile(args.profile)
    L = profile.num_layers
    E = len(profile.miss_curves[0]) if profile.miss_curves else len(profile.routing[0]["top1_freq"])
    total = args.total_slots if args.total_slots is not None else max(L, round(args.fraction * E * L))
    curves = profile.miss_curves
    top_k = min(int(profile.calibration.get("top_k", 2)), E)

    def staged(plan_curves: list[list[float]] | None) -> list[int]:
        """The plan whose own slots plus shared staging rows use the ``total`` slots."""
        if plan_curves is None:
            return plan_with_staging(total, top_k, L, lambda b, lo: plan_uniform(L, E, b, lo))
        return plan_with_staging(total, top_k, L, lambda b, lo: plan_dp(plan_curves, b, lo=lo),
                                 lambda s: plan_cost(s, plan_curves))

    if args.method == "dp":
        if not curves:
            raise ValueError(f"{args.profile} has no miss curves; run `adapmoe profile "
                             f"{args.profile} --trace TRACE.npz` (or use --method closed-form)")
        slots = staged(curves)
    elif args.method == "closed-form":
        key = f"{args.threshold:g}"
        form = []
        for layer in range(L):
            top1 = (profile.routing[layer].get("top1_fraction") or {}).get(key, 0.0)
            acc = ((profile.prediction or [{}] * L)[layer] or {}).get("recall") or 0.0
            form.append(closed_form_curve(E, top_k, top1, acc))
        slots = staged(form)
    else:
        slots = staged(None)
    staging = staging_rows(slots, top_k)
    print(f"{args.method} plan for {total} slots over {L} layers x {E} experts"
          + (f": {sum(slots)} own slots + {staging} staging row(s) shared by the layers below "
             f"top_k={top_k}" if staging else ""))
    print(plan_table(slots, curves))
    if curves:
        uniform = staged(None)
        print(f"expected misses per decoded token: this plan {plan_cost(slots, curves):.3f}, "
              f"uniform {plan_cost(uniform, curves):.3f}")
    out = Path(args.out or Path(args.profile).with_suffix(".plan.json"))
    save_plan(out, slots, args.method, sum(slots), curves=curves,
              extra={"staging_rows": staging, "device_slots": total})
    if args.plot:
        plot_plan(slots, curves, args.plot)
    print(f"wrote {out}")
    return 0


# -- sweep -----------------------------------------------------------------------------------
def _add_sweep(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sweep", help="gating sweep: held-out perplexity and activated experts per threshold",
        description="Score held-out text through LLM(..., model_impl='adapmoe') at each gating "
                    "threshold T (every scored token gated) and report perplexity and activated "
                    "experts per token and layer. --ray N spreads the thresholds over N engine "
                    "replicas as Ray actors (same numbers as one process).")
    p.add_argument("model_dir")
    p.add_argument("--thresholds", type=float, nargs="+", required=True)
    p.add_argument("--profile", default=None, help="profile with S_l (or give 'sensitivity' in --settings)")
    p.add_argument("--settings", default="{}", help="further adapmoe settings (JSON), e.g. a budget")
    p.add_argument("--data", default=None, help="text file (default: bundled held-out text)")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored (default 16384)")
    p.add_argument("--ray", type=int, default=0, metavar="N", help="N Ray replicas (default: one process)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p


def _cmd_sweep(args: argparse.Namespace) -> int:
    import json
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    settings = {**json.loads(args.settings), "gate_prefill": True}
    if args.profile:
        settings["profile"] = args.profile
    if "profile" not in settings and "sensitivity" not in settings:
        raise ValueError("gating needs S_l: give --profile PROFILE.json (adapmoe calibrate) or "
                         "'sensitivity' in --settings")
    llm_kwargs = dict(model=args.model_dir, model_impl="adapmoe", enforce_eager=True, seed=0,
                      max_model_len=512, additional_config={"adapmoe": settings})  # 256-token windows
    rows = sweep_rows(llm_kwargs, args.thresholds, args.data, args.tokens, args.ray)
    base = rows[0]
    print(f"{'T':>8}  {'perplexity':>10}  {'vs first':>8}  {'experts/token/layer':>19}")
    for r in rows:
        print(f"{r['threshold']:>8.4g}  {r['ppl']:>10.3f}  {r['ppl'] / base['ppl'] - 1:>+8.2%}  "
              f"{r['activated_per_token_layer']:>19.3f}")
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps({"model": args.model_dir, "settings": settings,
                                              "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


def sweep_rows(llm_kwargs: dict, thresholds: list[float], data: str | None, tokens: int,
               replicas: int) -> list[dict]:
    """``measure_gating`` at each threshold, in one engine or over ``replicas`` Ray actors."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from vllm_adapmoe.offline.evaluation import heldout_text, measure_gating, token_windows

    text = Path(data).read_text() if data else heldout_text()
    windows = token_windows(AutoTokenizer.from_pretrained(llm_kwargs["model"]), text, 256, tokens)
    if not windows:
        raise ValueError(f"fewer than 256 tokens of text in {data or 'the held-out text'}")
    if replicas:
        from vllm_adapmoe.replicas import ReplicaPool

        with ReplicaPool(replicas, **llm_kwargs) as pool:
            return pool.gating_sweep(windows, thresholds)
    from vllm import LLM

    llm = LLM(**llm_kwargs)
    try:
        return [measure_gating(llm, windows, t) for t in thresholds]
    finally:
        llm.llm_engine.engine_core.shutdown()


# -- dispatch --------------------------------------------------------------------------------
_COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "calibrate": (_add_calibrate, _cmd_calibrate),
    "trace": (_add_trace, _cmd_trace),
    "profile": (_add_profile, _cmd_profile),
    "plan": (_add_plan, _cmd_plan),
    "sweep": (_add_sweep, _cmd_sweep),
    "quantize": (_add_quantize, _cmd_quantize),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapmoe",
                                     description="AdapMoE expert-offloading tools for vLLM")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add, run) in _COMMANDS.items():
        add(sub).set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"adapmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
