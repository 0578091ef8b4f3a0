"""Per-architecture model files: each swaps its MoE block for the engine's ``AdapMoEBlock``.

``SUPPORTED`` maps a Hugging Face architecture name to the plugin's class and to a function
reading the MoE shape from its config (used to check budgets in the main process at start-up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The custom op the block runs in (registered by ``moe_op.py``); vLLM splits its compiled
# graph there, so piecewise CUDA graphs never capture the block's data-dependent host work.
BLOCK_OP = "vllm::adapmoe_block"


@dataclass(frozen=True)
class MoEShape:
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int

    def expert_bytes(self, itemsize: int) -> int:
        return 3 * self.hidden_size * self.intermediate_size * itemsize


def mixtral_shape(hf_config: Any) -> MoEShape:
    return MoEShape(hf_config.num_hidden_layers, hf_config.num_local_experts,
                    hf_config.num_experts_per_tok, hf_config.hidden_size,
                    hf_config.intermediate_size)


@dataclass(frozen=True)
class Supported:
    class_name: str
    target: str  # module:class, imported lazily by vLLM's registry
    shape: Callable[[Any], MoEShape]


SUPPORTED: dict[str, Supported] = {
    "MixtralForCausalLM": Supported("AdapMoEMixtralForCausalLM",
                                    "vllm_adapmoe.models.mixtral:AdapMoEMixtralForCausalLM",
                                    mixtral_shape),
}
