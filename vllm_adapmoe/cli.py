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
    from vllm_adapmoe.calibrate import DEFAULT_DATA

    p = sub.add_parser(
        "calibrate", help="measure per-layer sensitivity S_l and routing statistics",
        description="Measure AdapMoE's per-layer sensitivity S_l (Fisher estimate of the loss "
                    "increase when a token's last top-k expert is dropped) and routing "
                    "statistics, and write them as a profile JSON.")
    p.add_argument("model_dir", help="local Hugging Face model directory (Mixtral-style MoE)")
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
    t_key = "0.005"
    lines = [f"{'layer':>5}  {'S_l':>11}  {'mean w2':>7}  {'top1 H(bits)':>12}  "
             f"{'top-1 @T=' + t_key:>13}"]
    for i, s in enumerate(profile.sensitivity):
        r = routing[i] if i < len(routing) else {}
        frac = r.get("top1_fraction", {}).get(t_key)
        lines.append(f"{i:>5}  {s:>11.4g}  {r.get('w2_mean', float('nan')):>7.3f}  "
                     f"{r.get('top1_entropy_bits', float('nan')):>12.3f}  "
                     f"{'' if frac is None else format(frac, '.1%'):>13}")
    if n_exp:
        lines.append(f"(top-1 frequency entropy: max {math.log2(n_exp):.3f} bits "
                     f"for {n_exp} experts; last column: share of tokens gated to top-1 when "
                     "w2^2*S_l < T)")
    return "\n".join(lines)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from vllm_adapmoe.calibrate import calibrate
    from vllm_adapmoe.profile import save_profile

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = calibrate(args.model_dir, args.data, window=args.window,
                        max_tokens=args.max_tokens, seed=args.seed, device=args.device,
                        progress=not args.quiet)
    out = save_profile(profile, args.out)
    if not args.quiet:
        c = profile.calibration
        print(format_profile_table(profile))
        print(f"{c['tokens']} tokens in {c['windows']} windows of {c['window']}, "
              f"mean loss {c['mean_loss']:.3f} nats/token, {c['seconds']:.1f} s")
    print(f"wrote {out}")
    return 0


# -- dispatch --------------------------------------------------------------------------------
_COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "calibrate": (_add_calibrate, _cmd_calibrate),
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
