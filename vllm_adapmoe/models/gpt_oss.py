"""gpt-oss with the AdapMoE block (mirrors vLLM 0.32's ``models/gpt_oss.py``).

Stock's model is built to be extended: ``GptOssModel.block_cls`` makes each decoder layer. Ours
is stock's ``TransformerBlock`` with its ``__init__`` re-done so the MLP is our block (stock's
would allocate every expert on the device); ``forward`` — attention with sinks and the
alternating sliding window, the norms — and the model's ``forward`` stay stock's. The router is
stock's biased ``GateLinear``; routing is softmax over the top-k logits (Mixtral's rule). Experts
have biases and the clamped SwiGLU vLLM calls ``swigluoai`` on interleaved gate/up rows
(``ExpertFormat``), stored per layer in the checkpoint: bf16 (``experts.gate_up_proj
[E, H, 2I]``...) or, in the released checkpoints, MXFP4 (``experts.gate_up_proj_blocks``,
``..._scales``), which stays MXFP4 in the store and slots. Every weight but the routers and
routed experts loads with stock's own loader.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM, GptOssModel, TransformerBlock
from vllm.model_executor.models.utils import extract_layer_index

from vllm_adapmoe.models import gpt_oss_shape
from vllm_adapmoe.models.moe_model import AdapMoECausalLM, MoEBlocks, load_routed_apart


class AdapMoEGptOssLayer(TransformerBlock):
    """Stock's layer with our MoE block as ``mlp``; ``forward`` is stock's."""

    def __init__(self, vllm_config: VllmConfig, quant_config, prefix: str = "", *,
                 moe: MoEBlocks) -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.layer_idx = extract_layer_index(prefix)
        self.attn = self.attention_cls(config, prefix=f"{prefix}.attn", quant_config=quant_config,
                                       cache_config=vllm_config.cache_config)
        router = GateLinear(config.hidden_size, config.num_local_experts, bias=True,
                            prefix=f"{prefix}.mlp.router", return_bias=False)
        self.mlp = moe.block(f"{prefix}.mlp", router)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=1e-5)  # stock's fixed eps
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=1e-5)


class AdapMoEGptOssModel(GptOssModel):
    """Stock's model (compiled like it, same ``forward``) made of our layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", moe: MoEBlocks) -> None:
        # read by stock's __init__ when it makes the layers; a plain attribute, so it may be
        # set before nn.Module.__init__ runs
        self.block_cls = partial(AdapMoEGptOssLayer, moe=moe)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_routed_apart(self, weights, GptOssModel.load_weights,
                                 gpt_oss_shape(self.config).moe_layers, router="router")


class AdapMoEGptOssForCausalLM(AdapMoECausalLM):
    """``--model-impl adapmoe`` for ``GptOssForCausalLM`` checkpoints (bf16 or MXFP4 experts)."""

    shape_of = staticmethod(gpt_oss_shape)
    hf_to_vllm_mapper = GptOssForCausalLM.hf_to_vllm_mapper
    packed_modules_mapping = GptOssForCausalLM.packed_modules_mapping

    def build_model(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        return AdapMoEGptOssModel(vllm_config=vllm_config, prefix=prefix, moe=self.moe)
