"""Gating's trade-off on the tiny random checkpoints of the newer families (gpt-oss bf16 and
MXFP4, GLM-4.5): calibrate each (``adapmoe calibrate``), then score held-out text at several
thresholds — perplexity and activated experts per token and layer (``adapmoe sweep``'s rows).
The models are random, so absolute perplexities mean little; the rows show that gating drops
experts on these routers and what it costs relative to T = 0.

    python benchmarks/gating_families.py [--out benchmarks/results/gating_families.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

THRESHOLDS = [0.0, 0.0005, 0.001, 0.002, 0.005]


def main() -> None:
    from tiny_model import build_tiny_moe, build_tiny_mxfp4_gpt_oss

    from vllm_adapmoe.cli import sweep_rows
    from vllm_adapmoe.offline.calibrate import calibrate
    from vllm_adapmoe.offline.profile import save_profile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/gating_families.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="adapmoe-gating-families-"))
    models = {"gpt-oss bf16 (3 layers)": build_tiny_moe(tmp / "gpt_oss", "gpt_oss"),
              # the test checkpoint: 2 layers, each expert's down projection rescaled
              "gpt-oss MXFP4 (2 layers, rescaled experts)":
                  build_tiny_mxfp4_gpt_oss(tmp / "gpt_oss_mxfp4")[0],
              "GLM-4.5 (3 layers, 1 dense)": build_tiny_moe(tmp / "glm4_moe", "glm4_moe")}
    out = {"bench": "gating_families", "tokens": args.tokens, "thresholds": THRESHOLDS,
           "families": {}}
    for name, model in models.items():
        profile = save_profile(calibrate(model, window=32, max_tokens=256, progress=False),
                               tmp / f"{model.name}.profile.json")
        kwargs = dict(model=str(model), model_impl="adapmoe", enforce_eager=True, seed=0,
                      max_model_len=512, dtype="bfloat16",
                      additional_config={"adapmoe": {"profile": str(profile), "gate_prefill": True}})
        rows = sweep_rows(kwargs, THRESHOLDS, None, args.tokens, 0)
        out["families"][name] = {"sensitivity": json.loads(profile.read_text())["sensitivity"],
                                 "rows": rows}
        for r in rows:
            print(f"{name:16s} T={r['threshold']:<7g} ppl {r['ppl']:9.2f} "
                  f"({r['ppl'] / rows[0]['ppl'] - 1:+.2%}) experts/token/layer "
                  f"{r['activated_per_token_layer']:.2f}")
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
