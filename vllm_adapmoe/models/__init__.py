"""Per-architecture model files: each swaps its MoE block for the engine's ``AdapMoEBlock``.

``SUPPORTED`` maps a Hugging Face architecture name to the plugin's class and to a function
reading the MoE shape from its config (used to check budgets in the main process at start-up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_adapmoe.engine.expert_tensors import ExpertFormat
from vllm_adapmoe.models.checkpoint_quant import checkpoint_format

# The custom op the block runs in (registered by ``moe_op.py``); vLLM splits its compiled
# graph there, so piecewise CUDA graphs never capture the block's data-dependent host work.
BLOCK_OP = "vllm::adapmoe_block"


@dataclass(frozen=True)
class MoEShape:
    """The routed-expert shape of a model. ``moe_layers``: decoder-layer indices of its MoE layers
    (dense layers are not in it); MoE layers are numbered by their position in this tuple
    everywhere (stats, traces, plans, profiles)."""

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    expert_format: ExpertFormat = ExpertFormat()

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def moe_index(self, layer_idx: int) -> int:
        return self.moe_layers.index(layer_idx)

    def expert_bytes(self, itemsize: int) -> int:
        """One expert's bytes as stored (quantized weights and their scales, biases)."""
        return self.expert_format.expert_bytes(self.hidden_size, self.intermediate_size, itemsize)


def mixtral_shape(c: Any) -> MoEShape:
    return MoEShape(tuple(range(c.num_hidden_layers)), c.num_local_experts,
                    c.num_experts_per_tok, c.hidden_size, c.intermediate_size,
                    checkpoint_format(c))


def qwen_moe_layers(c: Any) -> tuple[int, ...]:
    """Qwen2-MoE / Qwen3-MoE: MoE every ``decoder_sparse_step`` layers, except ``mlp_only_layers``."""
    dense = set(getattr(c, "mlp_only_layers", None) or [])
    return tuple(i for i in range(c.num_hidden_layers)
                 if i not in dense and c.num_experts > 0 and (i + 1) % c.decoder_sparse_step == 0)


def qwen_moe_shape(c: Any) -> MoEShape:
    return MoEShape(qwen_moe_layers(c), c.num_experts, c.num_experts_per_tok, c.hidden_size,
                    c.moe_intermediate_size, checkpoint_format(c))


def olmoe_shape(c: Any) -> MoEShape:
    return MoEShape(tuple(range(c.num_hidden_layers)), c.num_experts, c.num_experts_per_tok,
                    c.hidden_size, c.intermediate_size, checkpoint_format(c))


def deepseek_moe_layers(c: Any) -> tuple[int, ...]:
    """DeepSeek-V2/V3: dense for the first ``first_k_dense_replace`` layers, then MoE every
    ``moe_layer_freq`` layers."""
    return tuple(i for i in range(c.num_hidden_layers)
                 if c.n_routed_experts is not None and i >= c.first_k_dense_replace
                 and i % getattr(c, "moe_layer_freq", 1) == 0)


def deepseek_shape(c: Any) -> MoEShape:
    return MoEShape(deepseek_moe_layers(c), c.n_routed_experts, c.num_experts_per_tok,
                    c.hidden_size, c.moe_intermediate_size, checkpoint_format(c))


def gpt_oss_shape(c: Any) -> MoEShape:
    """gpt-oss: every layer MoE; biased experts with the clamped, interleaved SwiGLU."""
    return MoEShape(tuple(range(c.num_hidden_layers)), c.num_local_experts,
                    c.num_experts_per_tok, c.hidden_size, c.intermediate_size,
                    checkpoint_format(c, ExpertFormat(
                        "swigluoai", bias=True, alpha=getattr(c, "swiglu_alpha", 1.702),
                        limit=getattr(c, "swiglu_limit", 7.0))))


@dataclass(frozen=True)
class ExpertNames:
    """Where a family's routed experts live in its checkpoint:
    ``model.layers.N.<block>.experts.E.<gate|up|down>.weight``, or with ``stacked`` one tensor
    per layer, ``model.layers.N.<block>.experts.<gate>`` (gate and up together, ``up`` unused)
    and ``...experts.<down>``, their biases ``<name>_bias``."""

    block: str
    gate: str
    up: str
    down: str
    stacked: bool = False


MIXTRAL_NAMES = ExpertNames("block_sparse_moe", "w1", "w3", "w2")
MLP_NAMES = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")
GPT_OSS_NAMES = ExpertNames("mlp", "gate_up_proj", "", "down_proj", stacked=True)


@dataclass(frozen=True)
class Supported:
    class_name: str
    target: str  # module:class, imported lazily by vLLM's registry
    shape: Callable[[Any], MoEShape]
    experts: ExpertNames
    # tensor parallelism checked equal to stock (tests/test_parallel.py); else TP > 1 is refused
    tensor_parallel: bool = False


def _entry(module: str, name: str, shape: Callable[[Any], MoEShape],
           tensor_parallel: bool = False, experts: ExpertNames = MLP_NAMES) -> Supported:
    return Supported(name, f"vllm_adapmoe.models.{module}:{name}", shape, experts, tensor_parallel)


SUPPORTED: dict[str, Supported] = {
    "MixtralForCausalLM": _entry("mixtral", "AdapMoEMixtralForCausalLM", mixtral_shape,
                                 tensor_parallel=True, experts=MIXTRAL_NAMES),
    "Qwen2MoeForCausalLM": _entry("qwen2_moe", "AdapMoEQwen2MoeForCausalLM", qwen_moe_shape,
                                  tensor_parallel=True),
    "Qwen3MoeForCausalLM": _entry("qwen3_moe", "AdapMoEQwen3MoeForCausalLM", qwen_moe_shape,
                                  tensor_parallel=True),
    "OlmoeForCausalLM": _entry("olmoe", "AdapMoEOlmoeForCausalLM", olmoe_shape),
    "DeepseekV2ForCausalLM": _entry("deepseek_v2", "AdapMoEDeepseekV2ForCausalLM", deepseek_shape),
    "DeepseekV3ForCausalLM": _entry("deepseek_v2", "AdapMoEDeepseekV3ForCausalLM", deepseek_shape),
    # GLM-4.5/4.6: DeepSeek-V3's MoE layout and shape fields (dense first layers, one shared expert)
    "Glm4MoeForCausalLM": _entry("glm4_moe", "AdapMoEGlm4MoeForCausalLM", deepseek_shape,
                                 tensor_parallel=True),
    "GptOssForCausalLM": _entry("gpt_oss", "AdapMoEGptOssForCausalLM", gpt_oss_shape,
                                tensor_parallel=True, experts=GPT_OSS_NAMES),
}
