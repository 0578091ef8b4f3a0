"""Start-up checks in the main process, before vLLM starts its workers: the checkpoint's files
and the host memory the expert pool will take. A fault found here is one error that names the
shard, the weight or the sizes and what fixes it, instead of a worker dying later with a
message buried in its log ("WorkerProc initialization failed").

* ``check_checkpoint``: every safetensors shard's header parses and its tensors fit in the file
  (headers only: cheap on a 90 GB model); every routed expert weight of every MoE layer is
  present with the shape the config implies and one floating dtype — or, for quantized
  checkpoints, in the format's own dtype (float8 e4m3, packed int32) with every block scale;
  other quantized formats are refused by name (``models.checkpoint_format``).
* ``check_host_memory``: the expert pool's bytes (plus, on CPU, the device slots, which live in
  the same memory) against what the machine can give: the smaller of ``MemAvailable`` and the
  cgroup's limit minus its usage (``available_memory``, readable from any root for tests).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from vllm_adapmoe.engine.errors import AdapMoEConfigError
from vllm_adapmoe.engine.expert_tensors import MX_BLOCK
from vllm_adapmoe.engine.weights import CHECKPOINT_SUFFIXES

FLOAT_DTYPES = {"BF16", "F16", "F32"}
QUANT_DTYPES = {"fp8-block": {"F8_E4M3"}, "int4-group": {"I32"}, "mxfp4": {"U8"}}
SCALE_SUFFIXES = tuple(scale for _, scale in CHECKPOINT_SUFFIXES.values() if scale)
_REDOWNLOAD = "re-download it (e.g. `huggingface-cli download REPO --include NAME --force-download`)"


# -- checkpoint ----------------------------------------------------------------------------------
def read_header(path: Path) -> dict[str, Any]:
    """The safetensors header of ``path`` (tensor name → dtype, shape, data_offsets), checked
    against the file's size."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"its header length ({n} bytes) is beyond the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapMoEConfigError(
            f"adapmoe: checkpoint shard {path} is damaged ({exc}); {_REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise AdapMoEConfigError(f"adapmoe: checkpoint shard {path} has no tensor table; {_REDOWNLOAD}")
    data = size - 8 - n
    header.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if end > data:
        raise AdapMoEConfigError(
            f"adapmoe: checkpoint shard {path} is truncated: its tensors need {end} bytes after "
            f"the header, the file holds {data}; {_REDOWNLOAD}")
    return header


def shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise AdapMoEConfigError(
                f"adapmoe: checkpoint {model_dir} lacks the shard(s) {missing} its index lists; "
                "download them")
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def check_checkpoint(model_dir: Path, shape: Any, names: Any) -> None:
    """``shape``: the family's ``MoEShape``; ``names``: its ``ExpertNames`` (where the routed
    experts live in the checkpoint and what their three weights are called)."""
    quant = shape.expert_format.quant  # unsupported formats: refused already
    files = shard_files(model_dir)
    if not files:
        return  # not safetensors (vLLM reads .bin / .pt itself): nothing to check cheaply
    found: dict[str, tuple[str, list[int], Path]] = {}
    for path in files:
        for name, t in read_header(path).items():
            found[name] = (t["dtype"], t["shape"], path)
    dtypes: set[str] = set()
    for moe_idx, layer in enumerate(shape.moe_layers):
        missing, missing_keys = [], []
        for key, dims, experts in _expert_tensors(layer, shape, names):
            entry = found.get(key)
            if entry is None:
                missing += experts
                missing_keys.append(key)
                continue
            dtype, got, path = entry
            if list(got) != dims:
                raise AdapMoEConfigError(
                    f"adapmoe: {key} in {path.name} has shape {list(got)}, the config implies "
                    f"{dims} (hidden_size {shape.hidden_size}, expert intermediate size "
                    f"{shape.intermediate_size}); the checkpoint does not match its config.json")
            if not key.endswith(SCALE_SUFFIXES + ("_bias",)):  # the weights' own dtype
                dtypes.add(dtype)
        if missing:
            raise AdapMoEConfigError(
                f"adapmoe: layer {moe_idx} (decoder layer {layer}) is missing experts "
                f"{sorted(set(missing))} in the checkpoint {model_dir} (no {missing_keys[0]}); "
                "re-download it")
    allowed = QUANT_DTYPES.get(quant, FLOAT_DTYPES)
    if dtypes - allowed or len(dtypes) > 1:
        raise AdapMoEConfigError(
            f"adapmoe: the routed experts of {model_dir} are stored as {sorted(dtypes)}; "
            f"--model-impl adapmoe needs them in one of {', '.join(sorted(allowed))}"
            + (f" (its config says {quant})" if quant else ""))


def _expert_tensors(layer: int, shape: Any, names: Any) -> list[tuple[str, list[int], list[int]]]:
    """(checkpoint key, shape, experts it holds) of each routed-expert tensor of ``layer``."""
    h, i, n = shape.hidden_size, shape.intermediate_size, shape.num_experts
    fmt, prefix = shape.expert_format, f"model.layers.{layer}.{names.block}.experts"
    if names.stacked:
        return [(f"{prefix}.{w}", d, list(range(n)))
                for w, d in _stacked_dims(names, fmt, h, i, n).items()]
    weight, scale = CHECKPOINT_SUFFIXES[fmt.quant]
    dims = {}
    for w, (rows, cols) in ((names.gate, (i, h)), (names.up, (i, h)), (names.down, (h, i))):
        dims[f"{w}.{weight}"] = list(fmt.weight_shape(rows, cols, torch.bfloat16)[0])
        if scale:  # one scale per block
            dims[f"{w}.{scale}"] = list(fmt.blocks(rows, cols))
    return [(f"{prefix}.{e}.{w}", d, [e]) for e in range(n) for w, d in dims.items()]


def _stacked_dims(names: Any, fmt: Any, h: int, i: int, n: int) -> dict[str, list[int]]:
    """gpt-oss: one tensor per layer — bf16 in x·W orientation, or MXFP4 blocks and scales
    with rows = outputs — and the biases."""
    if fmt.quant == "mxfp4":  # a block of MX_BLOCK values is MX_BLOCK / 2 bytes
        b = MX_BLOCK
        dims = {f"{names.gate}_blocks": [n, 2 * i, h // b, b // 2],
                f"{names.gate}_scales": [n, 2 * i, h // b],
                f"{names.down}_blocks": [n, h, i // b, b // 2], f"{names.down}_scales": [n, h, i // b]}
    else:
        dims = {names.gate: [n, h, 2 * i], names.down: [n, i, h]}
    if fmt.bias:
        dims.update({f"{names.gate}_bias": [n, 2 * i], f"{names.down}_bias": [n, h]})
    return dims


def local_model_dir(model: str) -> Path | None:
    """The model's local directory: the path given, or its snapshot in the Hugging Face cache
    (never downloaded here); None when neither exists."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached (vLLM will download it) or not a repo id
        return None


# -- host memory ---------------------------------------------------------------------------------
def available_memory(root: Path = Path("/")) -> tuple[int, str]:
    """(bytes this process can still allocate, where that figure comes from): the smaller of
    ``MemAvailable`` and the cgroup's limit minus its usage (cgroup v2, else v1)."""
    limits: list[tuple[int, str]] = []
    meminfo = root / "proc/meminfo"
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append((int(line.split()[1]) * 1024, "MemAvailable"))
    for limit_file, usage_file in (("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current"),
                                   ("sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = root / limit_file, root / usage_file
        if limit.is_file() and usage.is_file():
            text = limit.read_text().strip()
            if text != "max" and int(text) < 2**60:  # v1 writes a huge number for "no limit"
                limits.append((int(text) - int(usage.read_text().strip()), "the cgroup's limit minus its usage"))
            break
    if not limits:
        return 2**63, "unknown (no /proc/meminfo)"
    return min(limits)


def check_host_memory(pool_bytes: int, what: str, root: Path = Path("/")) -> None:
    """One error when ``pool_bytes`` do not fit in what the machine can give."""
    available, source = available_memory(root)
    if pool_bytes > available:
        gib = 2**30
        raise AdapMoEConfigError(
            f"adapmoe: {what} needs {pool_bytes / gib:.1f} GiB of host memory, "
            f"{max(available, 0) / gib:.1f} GiB are available ({source}); what helps: a smaller "
            "model, a quantized checkpoint once supported, a machine (or cgroup) with more "
            "memory, or tensor parallelism across machines (each rank holds 1/tp of every expert)")


def expert_pool_bytes(shape: Any, itemsize: int, slots: list[int], device_type: str,
                      staging_rows: int = 0) -> tuple[int, str]:
    """Host bytes the engine allocates for the experts on one machine (all TP ranks together)."""
    per_expert = shape.expert_bytes(itemsize)
    pool = shape.num_layers * shape.num_experts * per_expert
    what = (f"the host expert pool ({shape.num_layers} MoE layers x {shape.num_experts} experts x "
            f"{per_expert / 2**20:.1f} MiB)")
    if device_type == "cpu":  # the "device" slots are host memory too
        pool += (sum(slots) + staging_rows) * per_expert
        what += f" plus the {sum(slots) + staging_rows} device slots (on CPU, the same memory)"
    return pool, what


def device_memory(device_index: int = 0) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device from NVML — no CUDA context in this (the API
    server's) process; None where NVML is not there."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device_index))
            return int(info.free), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


def check_device_memory(slot_bytes: int, kv_min_bytes: int, free: int, total: int,
                        utilization: float) -> None:
    """One error when one rank's expert slots (own + staging) and the KV cache of a single
    ``max_model_len`` sequence cannot fit in what vLLM may use of the device: its
    ``gpu_memory_utilization`` share of the total, less what other processes already hold."""
    usable = int(utilization * total) - (total - free)
    if slot_bytes + kv_min_bytes > usable:
        gib = 2**30
        raise AdapMoEConfigError(
            f"adapmoe: the expert slots need {slot_bytes / gib:.2f} GiB of device memory and the KV "
            f"cache at least {kv_min_bytes / gib:.2f} GiB for one max_model_len sequence, but "
            f"{max(usable, 0) / gib:.2f} GiB are usable (gpu_memory_utilization = {utilization:g} "
            f"of {total / gib:.1f} GiB, {(total - free) / gib:.1f} GiB held by other processes); "
            "what helps: a smaller cache_gib / cache_slots, hybrid (computes cold experts on the "
            "host), a shorter max_model_len, a larger gpu_memory_utilization, or more ranks")


def kv_bytes_per_token(hf_config: Any, itemsize: int, tp: int) -> int:
    """K and V of one token in every attention layer, one rank's share (MLA models: their
    compressed latent, as vLLM stores it)."""
    layers = hf_config.num_hidden_layers
    if getattr(hf_config, "kv_lora_rank", None):  # DeepSeek MLA: one latent + rope key
        return layers * (hf_config.kv_lora_rank + hf_config.qk_rope_head_dim) * itemsize
    heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * layers * max(heads // tp, 1) * head_dim * itemsize
