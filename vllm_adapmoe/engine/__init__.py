"""The offload engine: everything that keeps experts in host memory and computes them from device
slots, importable with torch alone (no vLLM import here or on any call path).

  store.py       host tier: every expert of a layer in the kernel's layout (pinned on CUDA)
  cache.py       per-layer device slots + the one host→device ``Link`` (copy stream on CUDA;
                 small experts inline on CPU, else a loader thread)
  slot_table.py  residency and eviction policies (LRU, LFU, Belady), tensor-free
  routing.py     router logits → top-k experts and weights (each family's rule, as vLLM's)
  gating.py      adaptive top-k (AdapMoE's sensitivity rule)
  prefetch.py    guessing the next layers' experts and choosing what to copy ahead
  cache_plan.py  per-layer slot budgets (uniform, DP over miss curves)
  kernels.py     compute on slots (reference loop, torch grouped GEMM; fused kernels registered
                 by the serving stack)
  block.py       one MoE layer's step: route → gate → make resident → compute → prefetch
  stats.py       per-layer counters

The vLLM side (``vllm_adapmoe.models``) builds blocks with vLLM's router layer and registers
vLLM's fused kernels; the offline tools (``vllm_adapmoe.offline``) replay and plan with these
same classes.
"""

from vllm_adapmoe.engine.block import AdapMoEBlock, PhaseClock, Routing, StepInfo
from vllm_adapmoe.engine.cache import ExpertCache, Link
from vllm_adapmoe.engine.kernels import GroupedKernel, ReferenceKernel, make_kernel, register_kernel
from vllm_adapmoe.engine.routing import RouterSpec, route
from vllm_adapmoe.engine.stats import LayerStats, summarise
from vllm_adapmoe.engine.store import HostExpertStore

__all__ = ["AdapMoEBlock", "ExpertCache", "GroupedKernel", "HostExpertStore", "LayerStats", "Link",
           "PhaseClock", "ReferenceKernel", "RouterSpec", "Routing", "StepInfo", "make_kernel", "register_kernel",
           "route", "summarise"]
