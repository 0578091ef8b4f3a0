"""Seeded random MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, GLM-4.5,
gpt-oss) saved as
local model directories (no hub access).

Random routing is near-uniform: good for exactness tests, meaningless for caching claims.
"""

from __future__ import annotations

import json
from pathlib import Path

_TEXT = ("the quick brown fox jumps over the lazy dog while experts route tokens "
         "through layers of a mixture and caches keep the hot ones resident ") * 20


def build_tokenizer(path: Path, vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TEXT], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 2048}))


def build_tiny_mixtral(path: str | Path, seed: int = 0, *, num_layers: int = 3,
                       hidden_size: int = 64, intermediate_size: int = 80,
                       num_experts: int = 8, top_k: int = 2, arch: str = "MixtralForCausalLM") -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    config = MixtralConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=num_experts, num_experts_per_tok=top_k, max_position_embeddings=512,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], tie_word_embeddings=False,
        torch_dtype="float32")
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    with torch.no_grad():  # larger router weights → decisive (less tie-prone) routing
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(8.0)
    model.save_pretrained(path, safe_serialization=True)
    if arch != "MixtralForCausalLM":
        cfg = json.loads((path / "config.json").read_text())
        cfg["architectures"] = [arch]
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def _tiny_config(family: str, vocab: dict[str, int], num_layers: int):
    """A small config of each family, fine-grained (16 experts, top-4) with the family's
    peculiarities on: a dense layer, a shared expert, no top-k renormalisation where stock has none."""
    import transformers

    common = dict(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=num_layers,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                  bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                  tie_word_embeddings=False, torch_dtype="float32")
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, intermediate_size=96, moe_intermediate_size=32, num_experts=16,
            num_experts_per_tok=4, shared_expert_intermediate_size=48, norm_topk_prob=False,
            mlp_only_layers=[1], decoder_sparse_step=1)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
            num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[0],
            decoder_sparse_step=1)
    if family == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=32, num_experts=16,
                                        num_experts_per_tok=4)
    if family == "deepseek_v2":  # MLA on vLLM-CPU needs kv_lora_rank + qk_rope_head_dim = 576
        common["num_key_value_heads"] = 2
        return transformers.DeepseekV2Config(
            **common, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=16,
            n_shared_experts=1, num_experts_per_tok=4, n_group=2, topk_group=1,
            topk_method="group_limited_greedy", first_k_dense_replace=1, norm_topk_prob=False,
            routed_scaling_factor=2.0, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=32,
            qk_rope_head_dim=64, v_head_dim=32)
    if family == "glm4_moe":  # GLM-4.5's layout: QK norm, partial rotary, qkv bias, an MTP layer
        return transformers.Glm4MoeConfig(
            **common, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
            n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=2,
            topk_group=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
            use_qk_norm=True, attention_bias=True, num_nextn_predict_layers=1)
    if family == "gpt_oss":  # biased router and experts, clamped SwiGLU, sinks, sliding window
        common["num_key_value_heads"] = 2
        return transformers.GptOssConfig(
            **common, head_dim=32, intermediate_size=32, num_local_experts=16,
            num_experts_per_tok=4, sliding_window=8, rope_parameters={
                "rope_type": "yarn", "factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 512, "rope_theta": 10000.0},
            layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
            + ["sliding_attention"] * (num_layers % 2))
    raise ValueError(f"unknown family {family!r}")


FAMILIES = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "olmoe": "OlmoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
            "glm4_moe": "Glm4MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}


def build_tiny_moe(path: str | Path, family: str, seed: int = 0, num_layers: int = 3,
                   **config_overrides) -> Path:
    """A random ``family`` checkpoint (see ``FAMILIES``) with sharpened routers;
    ``config_overrides`` replace fields of its config (e.g. ``intermediate_size``)."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    config = _tiny_config(family, vocab, num_layers)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family])(config)
    with torch.no_grad():  # larger router weights → decisive (less tie-prone) routing
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.mul_(8.0)
            if family == "gpt_oss" and ".mlp." in name and "bias" in name:
                param.copy_(torch.randn_like(param) * 0.02)  # router/expert biases that matter
        if family == "glm4_moe":  # a random correction bias, so routing depends on it
            for name, param in model.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    if family == "glm4_moe":
        _add_mtp_layer(path, config)
    return path


def _add_mtp_layer(path: Path, config) -> None:
    """GLM checkpoints carry their next-token-prediction layer as ``model.layers.<L>.*`` (L =
    num_hidden_layers), which transformers does not build: write one (random) for the loader to
    skip, routed experts included."""
    import torch
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    last, mtp = config.num_hidden_layers - 1, config.num_hidden_layers
    for name in [n for n in tensors if n.startswith(f"model.layers.{last}.")]:
        tensors[name.replace(f"layers.{last}.", f"layers.{mtp}.", 1)] = torch.randn_like(tensors[name])
    h = config.hidden_size
    tensors.update({f"model.layers.{mtp}.eh_proj.weight": torch.randn(h, 2 * h),
                    f"model.layers.{mtp}.enorm.weight": torch.ones(h),
                    f"model.layers.{mtp}.hnorm.weight": torch.ones(h),
                    f"model.layers.{mtp}.shared_head.norm.weight": torch.ones(h)})
    save_file(tensors, file, metadata={"format": "pt"})


def build_tiny_quantized_mixtral(path: str | Path, scheme: str = "fp8", seed: int = 0,
                                 block: int | None = None) -> tuple[Path, Path]:
    """A tiny Mixtral (hidden 256, expert intermediate 192) whose experts are quantized by the
    project's ``adapmoe quantize``: ``"fp8"`` with 128 × 128 block scales (2 × 2 blocks, the
    last one partial), ``"int4"`` by compressed-tensors in groups of 64. Each expert's down
    projection is first scaled by its own factor, so every expert has its own scales and a slot
    with another expert's scales changes tokens. Returns (the quantized checkpoint, the same
    model with those experts dequantized to float32)."""
    from safetensors.torch import load_file, save_file

    from vllm_adapmoe.offline.quantize import quantize_experts

    path = Path(path)
    block = block or {"fp8": 128, "int4": 64}[scheme]
    src = build_tiny_mixtral(path / "src", seed, num_layers=2, hidden_size=256,
                             intermediate_size=192)
    tensors = load_file(src / "model.safetensors")
    for name in tensors:
        if ".experts." in name and name.endswith(".w2.weight"):
            expert = int(name.split(".experts.")[1].split(".")[0])
            tensors[name] = tensors[name] * (0.5 + 0.25 * expert)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    quantized = quantize_experts(src, path / scheme, scheme, block, progress=False)
    return quantized, quantize_experts(src, path / "dequantized", scheme, block, dequantize=True,
                                       progress=False)


def build_tiny_mxfp4_gpt_oss(path: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random gpt-oss whose experts are in its released MXFP4 form (``adapmoe quantize
    --format mxfp4``), each expert's down projection first scaled by its own factor so the
    experts' scales differ. Returns (the MXFP4 checkpoint, the same model dequantized to bf16 by
    transformers' own MXFP4 dequantizer)."""
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_adapmoe.offline.quantize import quantize_experts

    path = Path(path)
    src = build_tiny_moe(path / "src", "gpt_oss", seed, num_layers=2)
    tensors = load_file(src / "model.safetensors")
    for name in tensors:
        if name.endswith("mlp.experts.down_proj"):
            factors = 0.5 + 0.75 * torch.arange(tensors[name].shape[0], dtype=torch.float32)
            tensors[name] = tensors[name] * factors[:, None, None].to(tensors[name].dtype)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    mxfp4 = quantize_experts(src, path / "mxfp4", "mxfp4", progress=False)
    return mxfp4, quantize_experts(src, path / "dequantized", "mxfp4", dequantize=True,
                                   progress=False)

