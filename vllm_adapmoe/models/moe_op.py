"""The AdapMoE block as one opaque op inside vLLM's compiled graph (vLLM side only).

vLLM compiles a model's forward with torch.compile (inductor on CPU, piecewise CUDA graphs on
GPU). The block cannot be traced: which copies run depends on the step's routing. So, like
vLLM's own ``vllm::moe_forward``, the block is registered as a custom op ``vllm::adapmoe_block``
whose fake implementation only gives the output's shape; at run time the op finds the block by
its name in the forward context and runs its step eagerly. The router GEMM and the top-k softmax
stay in the graph, exactly where stock Mixtral computes them on CPU (stock's CPU MoE runner is
traced, not an op), so inductor fuses them the same way and compiled tokens match stock's; so
do gating, the per-expert token counts and the next layers' predictions (``block.prepare``),
which leaves the op one small host transfer and its Python decisions.

Everything per step that the model's Python ``forward`` used to do (read the batch's query
lengths, flush Prometheus counters) must happen inside the op too: with a compiled graph that
Python runs once, at trace time. ``describe_step`` does it lazily, on the first block of a step.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from vllm.forward_context import ForwardContext, get_forward_context, is_forward_context_available
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_adapmoe.models import BLOCK_OP
from vllm_adapmoe.engine.block import AdapMoEBlock
from vllm_adapmoe.engine.step import StepInfo

OP_NAME = BLOCK_OP.split("::")[1]


def _adapmoe_block(hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, gated_weights: torch.Tensor, gated_ids: torch.Tensor,
                   keep: Optional[torch.Tensor], summary: torch.Tensor, predicted: torch.Tensor,
                   layer_name: str) -> torch.Tensor:
    block = get_forward_context().no_compile_layers[layer_name]
    return block.run_step(hidden_states, topk_weights, topk_ids, gated_weights, gated_ids, keep,
                          summary, predicted)


def _adapmoe_block_fake(hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, gated_weights: torch.Tensor,
                        gated_ids: torch.Tensor, keep: Optional[torch.Tensor],
                        summary: torch.Tensor, predicted: torch.Tensor,
                        layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


direct_register_custom_op(op_name=OP_NAME, op_func=_adapmoe_block, fake_impl=_adapmoe_block_fake,
                          tags=(torch.Tag.needs_fixed_stride_order,))


def register_blocks(vllm_config, blocks: list[AdapMoEBlock]) -> None:
    """Make the blocks findable by name from the op (vLLM's static forward context)."""
    context = vllm_config.compilation_config.static_forward_context
    for block in blocks:
        if block.name in context:
            raise ValueError(f"adapmoe: duplicate layer name {block.name}")
        context[block.name] = block
        block.call_op = (lambda x, *prepared, name=block.name:
                         torch.ops.vllm.adapmoe_block(x, *prepared, name))


class StepDescriber:
    """``StepInfo.describe`` for vLLM: decode mask and counting from the forward context.

    Runs at the first block of each forward pass (a new ``ForwardContext`` object each step);
    the other blocks of the same pass return at the identity check.
    """

    def __init__(self, step: StepInfo) -> None:
        self.step = step
        self._context: ForwardContext | None = None
        # per scheduled request (batch order), True while its prompt is still being computed:
        # set by the model runner hook before each forward pass. A prompt's last chunk may be a
        # single token; query length alone would call it a decode token (and gate it).
        self.prompt_requests: torch.Tensor | None = None
        self.any_prompt = False

    def set_prompt_requests(self, flags: Any) -> None:
        """``flags``: bool array, one per scheduled request, True while it is still prefilling."""
        self.prompt_requests = torch.from_numpy(flags)
        self.any_prompt = bool(flags.any())

    def __call__(self, num_tokens: int) -> None:
        context = get_forward_context() if is_forward_context_available() else None
        if context is not None and context is self._context:
            return
        self._context = context
        step = self.step
        metadata = context.attn_metadata if context is not None else None
        if not metadata:  # dummy/profiling runs carry no attention metadata: not counted
            step.counted, step.decode_tokens, step.decode_mask = False, 0, None
            step.all_decode, step.decode_rows = False, None
            return
        first = next(iter(metadata.values()))
        first = first[0] if isinstance(first, list) else first
        qsl = first.query_start_loc
        step.counted = True
        step.decode_rows = None  # computed on first use (prefetch, tracing)
        requests = qsl.shape[0] - 1
        if requests == num_tokens and step.trace is None and not self.any_prompt:
            # as many tokens as requests (each has one or more): a pure decode step, the hot
            # path, known without touching a tensor; nothing reads the mask then
            step.decode_tokens, step.all_decode, step.decode_mask = num_tokens, True, None
            return
        lens = qsl[1:] - qsl[:-1]
        is_decode = lens == 1
        prompt = self.prompt_requests
        if self.any_prompt and prompt is not None and prompt.numel() <= requests:
            # extra (padding) requests, if any, schedule no tokens
            is_decode[:prompt.numel()] &= ~prompt.to(is_decode.device)
        mask = torch.repeat_interleave(is_decode, lens)
        # tokens beyond the scheduled ones (padding) count as prefill: never gated
        pad = num_tokens - mask.numel()
        step.decode_mask = torch.cat([mask, mask.new_zeros(pad)]) if pad > 0 else mask
        step.decode_tokens = int(is_decode.sum())
        step.all_decode = step.decode_tokens == num_tokens
        if step.trace is not None:
            step.trace.begin_step(lens)
