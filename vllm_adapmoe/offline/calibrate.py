"""``adapmoe calibrate``: per-layer sensitivity S_l for AdapMoE's adaptive gating.

Method. A MoE layer routes token x to its top-k experts with weights w_1 >= ... >= w_k and
outputs y = sum_i w_i E_i(x). Dropping the last (k-th) expert and giving its weight to the rest
in proportion (the serving gate's rule: renormalised routers stay normalised, the others keep
their routed mass) gives y' = (sum_i w_i) * ybar, ybar = sum_{i<k} w_i E_i / sum_{i<k} w_i; the
change is

    dy = y' - y = w_k * (ybar - E_k(x))        (Mixtral top-2: dy = w2 * (E1(x) - E2(x)))

Second-order Taylor of the loss with the Hessian replaced by the empirical Fisher F = E[g g^T],
g = dL/dy_l (gradient of the loss wrt layer l's routed output at that token):

    dL ~= 1/2 dy^T F dy ~= 1/2 w_k^2 (g^T (ybar - E_k(x)))^2

so S_l = mean over calibration tokens of (g_t^T (ybar_t - E_k(x_t)))^2; the gating rule (in the
serving layer) drops trailing experts while (their summed weight)^2 * S_l < T.

Loss and scale. L is the *sum* (not the mean) of next-token cross-entropies (nats) over a
window, so g_t = dL/dy_t carries the effect of token t's MoE output on its own prediction and,
through attention, on the later predictions in the window; S_l is then a per-token quantity that
does not shrink with the window length. The last position of each window has no target (g = 0)
and is left out of S_l; the routing statistics use every position.

Families. Every architecture in ``vllm_adapmoe.models.SUPPORTED`` is read through its Hugging
Face implementation: hooks on each MoE layer's routed-expert module see the expert ids and
weights the family's own router chose (softmax or grouped/sigmoid top-k, renormalised or not),
and its routed output, which the recomputed weighted sum must match on every window (a layout
change in transformers fails loudly instead of giving wrong numbers). Shared experts and dense
layers are untouched (they are never gated). Where Hugging Face folds ``routed_scaling_factor``
into the weights (DeepSeek) while vLLM applies it to the routed output, weights are reported in
vLLM's scale and S_l carries the factor squared, so w^2 * S_l is the same loss estimate.

Data: a text file or a directory of ``*.txt`` files (default: the bundled calibration text),
tokenised with the model's tokenizer (BOS before each file), cut into non-overlapping windows of
``window`` tokens; ``max_tokens // window`` windows are drawn at random (``seed``) from the first
~8 x ``max_tokens`` tokens. One window at a time goes through forward + backward (fp32).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_adapmoe.offline.predictor import PredictorFit
from vllm_adapmoe.offline.profile import Profile, architecture_of, config_hash

__all__ = ["calibrate", "load_windows", "DEFAULT_DATA", "DEFAULT_THRESHOLDS", "W2_BINS"]

DEFAULT_DATA = Path(__file__).parents[1] / "bundled" / "calibration.txt"
DEFAULT_THRESHOLDS = (0.001, 0.005, 0.01, 0.05)
W2_BINS = 20
_READ_CHUNK = 1 << 20       # characters of text tokenised at a time
_STREAM_FACTOR = 8          # read at most this many times max_tokens tokens
HELD_OUT_WINDOWS = 8        # at most this many windows score the look-ahead predictors


# -- data ------------------------------------------------------------------------------------
def _text_files(data: str | Path) -> list[Path]:
    path = Path(data)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt files under the data directory {path}")
        return files
    raise FileNotFoundError(f"calibration data {path} does not exist (give a text file or a "
                            "directory of .txt files)")


def _read_pieces(path: Path):
    """The file's text in pieces of ~_READ_CHUNK characters, cut after a newline."""
    carry = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            block = f.read(_READ_CHUNK)
            if not block:
                break
            text = carry + block
            if len(block) < _READ_CHUNK:  # end of file: a small file is one piece
                carry = text
                break
            cut = text.rfind("\n") + 1
            if cut == 0:
                carry = text
                continue
            carry = text[cut:]
            yield text[:cut]
    if carry:
        yield carry


def _token_stream(tokenizer: Any, files: list[Path], limit: int) -> list[int]:
    ids: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for path in files:
        if bos is not None:
            ids.append(bos)
        for piece in _read_pieces(path):
            ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
            if len(ids) >= limit:
                return ids[:limit]
    return ids


def load_windows(tokenizer: Any, data: str | Path, window: int, max_tokens: int, seed: int):
    """The calibration windows, an int64 tensor (n_windows, window), as ``calibrate`` uses them."""
    stream = _token_stream(tokenizer, _text_files(data), _STREAM_FACTOR * max_tokens)
    return _windows(stream, window, max_tokens, seed)


def _windows(stream: list[int], window: int, max_tokens: int, seed: int):
    import torch

    n_avail = len(stream) // window
    if n_avail == 0:
        if len(stream) < 2:
            raise ValueError(f"calibration data has {len(stream)} tokens; need at least 2")
        return torch.tensor(stream, dtype=torch.long)[None]
    want = max(1, max_tokens // window)
    gen = torch.Generator().manual_seed(seed)
    spare = len(stream) - n_avail * window
    offset = int(torch.randint(0, spare + 1, (1,), generator=gen)) if spare else 0
    tokens = torch.tensor(stream[offset: offset + n_avail * window], dtype=torch.long)
    wins = tokens.view(n_avail, window)
    if n_avail > want:
        pick = torch.randperm(n_avail, generator=gen)[:want].sort().values
        wins = wins[pick]
    return wins


# -- MoE blocks ------------------------------------------------------------------------------
# Hugging Face routers that fold ``routed_scaling_factor`` into the routing weights; the serving
# block applies it to the routed output instead, so its weights are HF's divided by the factor.
_HF_WEIGHT_SCALE = {"DeepseekV2ForCausalLM": "routed_scaling_factor",
                    "DeepseekV3ForCausalLM": "routed_scaling_factor",
                    "Glm4MoeForCausalLM": "routed_scaling_factor"}


def _routed_experts(model: Any, num_layers: int) -> list[Any]:
    """The routed-expert modules (``*.experts`` with fused ``gate_up_proj``/``down_proj``), in
    decoder order: one per MoE layer, so list position = MoE-layer index as everywhere else."""
    found = [m for name, m in model.named_modules()
             if name.rsplit(".", 1)[-1] == "experts"
             and hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]
    if len(found) != num_layers:
        raise ValueError(f"{type(model).__name__}: found {len(found)} routed-expert modules with "
                         f"fused gate_up_proj/down_proj, expected one per MoE layer ({num_layers}); "
                         "this transformers version's MoE layout is not what calibrate expects")
    return found


def _router_weights(model: Any) -> list[Any] | None:
    """Each MoE layer's router weight [E, H] (the ``gate`` beside its routed experts), or None
    when a family's router is not one plain linear map (no fitted predictor then)."""
    import torch

    weights = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] == "experts" and hasattr(m, "gate_up_proj"):
            gate = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "gate", None)
            w = getattr(gate, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                return None
            weights.append(w.detach().float().cpu())
    return weights


def _expert_outputs(experts: Any, x, idx):
    """E_{idx[t, i]}(x_t) for every token t and slot i: shape (T, k, H), read with the layout
    flags transformers sets on the module (gpt-oss: x·W orientation, interleaved gate/up,
    biases, and the clamped SwiGLU of its ``_apply_gate``)."""
    import torch
    import torch.nn.functional as F

    has_bias = getattr(experts, "has_bias", False)
    bias13 = experts.gate_up_proj_bias if has_bias else None
    bias2 = experts.down_proj_bias if has_bias else None
    transposed = getattr(experts, "is_transposed", False)
    concatenated = getattr(experts, "is_concatenated", True)
    out = x.new_zeros(idx.shape[0], idx.shape[1], x.shape[-1])
    for e in torch.unique(idx).tolist():
        tok, slot = torch.where(idx == e)
        xs = x[tok]
        gu_w, down_w = experts.gate_up_proj[e], experts.down_proj[e]
        gu = xs @ gu_w if transposed else F.linear(xs, gu_w)
        if bias13 is not None:
            gu = gu + bias13[e]
        if hasattr(experts, "_apply_gate"):  # gpt-oss
            h = experts._apply_gate(gu)
        else:
            gate, up = gu.chunk(2, dim=-1) if concatenated else (gu[..., 0::2], gu[..., 1::2])
            h = experts.act_fn(gate) * up
        y = h @ down_w if transposed else F.linear(h, down_w)
        out[tok, slot] = (y + bias2[e] if bias2 is not None else y).to(out.dtype)
    return out


@dataclass
class _LayerAcc:
    num_experts: int
    s_sum: float = 0.0
    s_sq: float = 0.0
    s_count: int = 0
    top1: Any = None
    topk: Any = None
    weights: list = field(default_factory=list)   # serving weights, sorted descending, per token
    # per-window scratch
    diff: Any = None


class _Recorder:
    """Forward hooks on the routed-expert modules: they see the routing the model really used
    (expert ids and weights, whatever the family's router rule) and the routed output; after
    backward, (scale * g . (y' - E_k))^2 per token."""

    def __init__(self, experts: list[Any], num_experts: int, weight_scale: float) -> None:
        import torch

        self.weight_scale = weight_scale
        self.acc = [_LayerAcc(num_experts, top1=torch.zeros(num_experts, dtype=torch.float64),
                              topk=torch.zeros(num_experts, dtype=torch.float64))
                    for _ in experts]
        self.n_pred = 0
        self.inputs: list[Any] = [None] * len(experts)  # this window's MoE inputs, per layer
        self.handles = [m.register_forward_hook(self._hook(i, m)) for i, m in enumerate(experts)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, i: int, experts: Any):
        import torch

        def hook(_module, inputs, output):
            x, ids, w_hf = inputs[:3]
            y = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                x2 = x.detach().reshape(-1, x.shape[-1])
                self.inputs[i] = x2.float().cpu()
                w_sorted, order = w_hf.detach().float().sort(dim=1, descending=True)
                ids_sorted = ids.gather(1, order)
                outs = _expert_outputs(experts, x2, ids_sorted).float()
                y_rec = (w_sorted[..., None] * outs).sum(1)
                y_real = y.detach().reshape(-1, x2.shape[-1]).float()
                err = (y_rec - y_real).abs().max().item()
                scale = y_real.abs().max().item()
                if not err <= 1e-3 * scale + 1e-5:
                    raise RuntimeError(
                        f"calibrate: recomputed MoE output of layer {i} differs from the model's "
                        f"({err:.3g} vs scale {scale:.3g}); this transformers version's MoE "
                        "layout is not what calibrate expects")
                kept = w_sorted[:, :-1]
                y_kept = (kept[..., None] * outs[:, :-1]).sum(1) / kept.sum(1, keepdim=True)
                a = self.acc[i]
                a.diff = y_kept - outs[:, -1]          # dy / w_k, shape (T, H)
                a.top1 += torch.bincount(ids_sorted[:, 0].cpu(), minlength=a.num_experts).double()
                a.topk += torch.bincount(ids_sorted.reshape(-1).cpu(), minlength=a.num_experts).double()
                a.weights.append((w_sorted / self.weight_scale).cpu())
            if y.requires_grad:
                y.register_hook(self._grad_hook(i))
            return None

        return hook

    def _grad_hook(self, i: int):
        import torch

        def on_grad(g):
            a = self.acc[i]
            with torch.no_grad():
                g2 = g.detach().reshape(-1, g.shape[-1]).float()
                gd = self.weight_scale * (g2 * a.diff).sum(-1)
                s = (gd ** 2)[: self.n_pred].double()
                a.s_sum += s.sum().item()
                a.s_sq += (s * s).sum().item()
                a.s_count += s.numel()
            a.diff = None
            return None

        return on_grad


@contextlib.contextmanager
def _hf_readable(model_dir: str | Path, shape: Any):
    """``model_dir``, or for quantized experts a temporary copy dequantized to bf16 (``s · q``,
    the weights the serving kernel computes with): the Hugging Face model calibrates on that."""
    if shape.expert_format.quant is None:
        yield model_dir
        return
    from vllm_adapmoe.offline.quantize import dequantize_checkpoint

    with tempfile.TemporaryDirectory(prefix="adapmoe-calibrate-") as tmp:
        print(f"calibrate: dequantizing the {shape.expert_format.quant} checkpoint into a bf16 "
              f"copy for the Hugging Face model ({tmp})")
        yield dequantize_checkpoint(model_dir, Path(tmp) / "bf16")


# -- main entry ------------------------------------------------------------------------------
def _entropy_bits(p) -> float:
    return float(-sum(x * math.log2(x) for x in p if x > 0))


def calibrate(model_dir: str | Path, data: str | Path | None = None, *, window: int = 256,
              max_tokens: int = 32768, seed: int = 0, device: str | None = None,
              thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
              progress: bool = True) -> Profile:
    """Measure S_l (and routing statistics) for the model in ``model_dir``; returns a Profile."""
    import torch
    import torch.nn.functional as F
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2")
    t0 = time.perf_counter()
    data_path = Path(data) if data is not None else DEFAULT_DATA
    files = _text_files(data_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    from transformers import AutoConfig

    from vllm_adapmoe.engine.gating import AdaptiveGate
    from vllm_adapmoe.models import SUPPORTED

    hf_config = AutoConfig.from_pretrained(str(model_dir))
    arch = architecture_of(hf_config)
    if arch not in SUPPORTED:
        raise ValueError(f"adapmoe calibrate: {model_dir} is {arch}; supported architectures: "
                         f"{', '.join(sorted(SUPPORTED))}")
    shape = SUPPORTED[arch].shape(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with _hf_readable(model_dir, shape) as hf_dir:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.to(device).eval()
    model.requires_grad_(False)
    cfg = model.config
    top_k, num_experts = shape.top_k, shape.num_experts
    weight_scale = float(getattr(cfg, _HF_WEIGHT_SCALE.get(arch, ""), 1.0) or 1.0)
    if top_k < 2:
        raise ValueError(f"the model routes to top-{top_k}; adaptive gating needs top-k >= 2")

    wins = load_windows(tokenizer, data_path, window, max_tokens, seed)

    rec = _Recorder(_routed_experts(model, shape.num_layers), num_experts, weight_scale)
    # Look-ahead predictors: fitted on all but the last few windows, scored on those.
    routers = _router_weights(model) if shape.num_layers > 1 else None
    fit = PredictorFit(routers, top_k) if routers is not None and wins.shape[0] >= 2 else None
    n_fit = wins.shape[0] - min(HELD_OUT_WINDOWS, max(1, wins.shape[0] // 8))
    held_out: list[list[Any]] = []
    embed = model.get_input_embeddings()
    loss_sum, n_pred_total = 0.0, 0
    try:
        bar = tqdm(range(wins.shape[0]), desc="calibrate", unit="window", disable=not progress)
        for w_i in bar:
            ids = wins[w_i: w_i + 1].to(device)
            rec.n_pred = ids.shape[1] - 1
            emb = embed(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, use_cache=False).logits
            loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            loss.backward()
            loss_sum += loss.item()
            n_pred_total += rec.n_pred
            if fit is not None:
                fit.add(rec.inputs) if w_i < n_fit else held_out.append(rec.inputs)
                rec.inputs = [None] * len(rec.inputs)
            bar.set_postfix(loss=f"{loss_sum / n_pred_total:.3f}")
            del logits, loss, emb
    finally:
        rec.close()

    sensitivity: list[float] = []
    routing: list[dict[str, Any]] = []
    for layer, a in enumerate(rec.acc):
        if a.s_count == 0:
            raise RuntimeError(f"no gradient reached MoE layer {layer}")
        s_mean = a.s_sum / a.s_count
        s_var = max(a.s_sq / a.s_count - s_mean * s_mean, 0.0)
        sensitivity.append(s_mean)
        weights = torch.cat(a.weights).double()      # (tokens, k), descending
        wk = weights[:, -1]
        # the k-th weight is at most 1/k when the k weights sum to at most 1 (softmax routers)
        hi = 1.0 / top_k if weights.sum(1).max() <= 1.0 + 1e-4 else float(wk.max())
        hist = torch.histc(wk.clamp(0, hi), bins=W2_BINS, min=0.0, max=hi)
        top1 = (a.top1 / a.top1.sum()).tolist()
        topk = (a.topk / a.topk.sum()).tolist()
        kept = {f"{t:g}": AdaptiveGate(t, s_mean, True).experts_per_token(weights, None).double()
                for t in thresholds}
        routing.append({
            "layer": layer,
            "tokens": int(wk.numel()),
            "top1_freq": top1,
            "topk_freq": topk,
            "top1_entropy_bits": _entropy_bits(top1),
            "w2_mean": float(wk.mean()),
            "w2_hist": (hist / hist.sum()).tolist(),
            "w2_hist_range": [0.0, hi],
            "s_stderr": math.sqrt(s_var / a.s_count),
            "top1_fraction": {key: float((n == 1).double().mean()) for key, n in kept.items()},
            "mean_kept": {key: float(n.mean()) for key, n in kept.items()},
        })

    predictor = None
    if fit is not None:
        fit.solve()
        for inputs in held_out:
            fit.evaluate(inputs)
        predictor = fit.report()

    seconds = time.perf_counter() - t0
    return Profile(
        model={"architecture": architecture_of(cfg), "config_hash": config_hash(cfg),
               "model_dir": str(model_dir)},
        sensitivity=sensitivity,
        calibration={
            "data": str(data_path), "files": len(files),
            "tokens": int(wins.numel()), "predicted_tokens": n_pred_total,
            "windows": int(wins.shape[0]), "window": int(wins.shape[1]),
            "max_tokens": max_tokens, "seed": seed, "seconds": round(seconds, 2),
            "mean_loss": loss_sum / max(n_pred_total, 1),
            "loss": "sum-reduced next-token cross-entropy (nats) per window; "
                    "S_l = mean_t (g_t . (y'_t - E_k(x_t)))^2, g_t = dL/dy_t",
            "w2": "weight of the k-th (lowest, first dropped) expert as the serving router gives it "
                  "(renormalised over the top k where the family renormalises)",
            "weight_scale": weight_scale,
            "top_k": top_k, "num_experts": num_experts, "device": str(device),
            "dtype": "float32", "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        },
        routing=routing,
        predictor=predictor,
    )
