"""The offload engine: everything that keeps experts in host memory and computes them from device
slots, importable with torch alone (no vLLM import here or on any call path).

  settings.py    the engine's own settings record (``EngineSettings``); errors.py its error type
  expert_tensors.py  what an expert is made of (weights, biases, FP8 block scales) and rows
                 of experts stored as one tensor per part
  store.py       host tier: every expert of a layer in the kernel's layout (pinned on CUDA)
  weights.py     checkpoint names → router and host store (this rank's shard under TP)
  link.py        the one host→device ``Link`` (copy stream on CUDA; small experts inline on
                 CPU, else a loader thread) and what a copy costs in decode layers
  cache.py       per-layer device slots over a ``SlotTable``, loads through the link
  slot_table.py  residency and eviction policies (LRU, LFU, MRS, Belady), tensor-free
  staging.py     shared staging rows for layers with fewer own slots than top_k
  routing.py     router logits → top-k experts and weights (each family's rule, as vLLM's),
                 and one step's routing in kernel form
  gating.py      adaptive top-k (AdapMoE's sensitivity rule)
  prefetch.py    the prefetch pay-off rule and predictor scores
  lookahead.py   one layer's guesses of the next layers' experts
  plan.py        one layer's step decided: waves, loads, prefetch guesses (pure; the simulator
                 calls it too)
  execute.py     one layer's plan run: the link and the kernel on the slots
  kernels.py     compute on slots (reference loop, torch grouped GEMM; fused kernels registered
                 by the serving stack)
  block.py       one MoE layer: prepare (traced) → plan → execute
  step.py        what the blocks share about the current forward pass; a phase timer
  cache_plan.py  per-layer slot budgets (uniform, DP over miss curves)
  stack.py       N layers without a model (benchmarks, tests)
  stats.py       per-layer counters

The vLLM side (``vllm_adapmoe.models``) builds blocks with vLLM's router layer and registers
vLLM's fused kernels; the offline tools (``vllm_adapmoe.offline``) replay and plan with these
same classes.
"""

from vllm_adapmoe.engine.block import AdapMoEBlock
from vllm_adapmoe.engine.cache import ExpertCache
from vllm_adapmoe.engine.expert_tensors import ExpertFormat, ExpertRows
from vllm_adapmoe.engine.kernels import GroupedKernel, ReferenceKernel, make_kernel, register_kernel
from vllm_adapmoe.engine.link import Link
from vllm_adapmoe.engine.plan import StepPlan, StepSummary, plan_step
from vllm_adapmoe.engine.routing import RouterSpec, Routing, route
from vllm_adapmoe.engine.settings import EngineSettings
from vllm_adapmoe.engine.step import PhaseClock, StepInfo
from vllm_adapmoe.engine.stats import LayerStats, summarise
from vllm_adapmoe.engine.store import HostExpertStore

__all__ = ["AdapMoEBlock", "EngineSettings", "ExpertCache", "ExpertFormat", "ExpertRows",
           "GroupedKernel", "HostExpertStore",
           "LayerStats", "Link", "PhaseClock", "ReferenceKernel", "RouterSpec", "Routing", "StepInfo",
           "StepPlan", "StepSummary", "make_kernel", "plan_step", "register_kernel", "route",
           "summarise"]
