"""A seeded random Mixtral saved as a local model directory (no hub access).

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
