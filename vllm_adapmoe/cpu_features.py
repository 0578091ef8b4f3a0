"""The CPU features that decide which MoE kernel runs, and the AMX tile permission Linux wants.

On Intel Xeons with AMX, vLLM-CPU's kernels (fused MoE, MLA attention, quantized linears) run
AMX tile instructions. Linux hands a process AMX tile state only after it asks for it
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); a process that has not asked gets
SIGILL on its first tile instruction, which in vLLM is a worker dying with exit code -4 on the
first step. vLLM 0.32's workers never ask, so ``register()`` asks in every process the plugin is
loaded into (``patches/0003`` does the same in vLLM's CPU worker). The permission is per process
and covers all its threads, existing and future; asking twice is harmless.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from functools import lru_cache

# Linux x86-64 (arch/x86/include/uapi/asm/prctl.h, asm/unistd_64.h)
_SYS_ARCH_PRCTL = 158
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

# The features that pick a kernel path in vLLM-CPU, as /proc/cpuinfo names them.
_REPORTED = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _first_cpu_field(names: tuple[str, ...]) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of ``names`` (the first
    CPU's), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(names):
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    return frozenset((_first_cpu_field(("flags", "Features")) or "").split())


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The first CPU's model name in /proc/cpuinfo, for benchmark rows and test logs (machines
    of one name come with different CPUs)."""
    found = _first_cpu_field(("model name",))
    return found.strip() if found is not None else "unknown CPU"


def _linux_x86() -> bool:
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def has_amx() -> bool:
    """The CPU (and the kernel, which lists the flag only when it supports it) has AMX tiles."""
    return _linux_x86() and "amx_tile" in cpu_flags()


def _arch_prctl(code: int, arg: int | ctypes.c_uint64) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(code),
                        ctypes.byref(arg) if isinstance(arg, ctypes.c_uint64) else ctypes.c_long(arg))


def amx_permitted() -> bool:
    """This process may execute AMX tile instructions (Linux granted XTILEDATA)."""
    if not has_amx():
        return False
    mask = ctypes.c_uint64(0)
    if _arch_prctl(_ARCH_GET_XCOMP_PERM, mask) != 0:
        return False
    return bool(mask.value >> _XFEATURE_XTILEDATA & 1)


def request_amx() -> bool:
    """Ask Linux for AMX tile state for this process; True when granted, False on a CPU without
    AMX (a no-op there). Uses PyTorch's request (the one PyTorch's own AMX paths rely on) where it
    has one, else the system call itself."""
    if not has_amx():
        return False
    try:
        import torch

        init = getattr(torch.cpu, "_init_amx", None)
    except ImportError:
        init = None
    if init is not None:
        init()
    else:
        _arch_prctl(_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    return amx_permitted()


def describe_cpu() -> str:
    """One line for logs and crash reports: architecture, the kernel-relevant features, and
    whether this process may use AMX, e.g. ``x86_64: avx2 avx512f avx512_bf16; no AMX``."""
    flags = cpu_flags()
    present = [f for f in _REPORTED if f in flags and not f.startswith("amx")]
    if has_amx():
        amx = "AMX (tile permission granted)" if amx_permitted() else "AMX (no tile permission)"
    else:
        amx = "no AMX"
    return f"{platform.machine()}: {' '.join(present) or 'no vector extensions listed'}; {amx}"
