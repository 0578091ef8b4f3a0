"""Per-architecture model files: each swaps its MoE block for ``moe_layer.AdapMoEBlock``.

``SUPPORTED`` maps the Hugging Face architecture name to the plugin's class (module:class).
"""

SUPPORTED: dict[str, tuple[str, str]] = {
    "MixtralForCausalLM": ("AdapMoEMixtralForCausalLM",
                           "vllm_adapmoe.models.mixtral:AdapMoEMixtralForCausalLM"),
}
