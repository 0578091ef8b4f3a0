"""Test-only: make the host→device expert copies (or the host's expert computation) fail, so the
fault paths can be exercised end to end (engine tests patch a stack; vLLM tests reach the workers
through ``collective_rpc("adapmoe_inject_copy_fault", ...)`` / ``("adapmoe_inject_host_fault",
...)``). Never set by any user-facing setting.

Modes: ``"off"``; ``"transient"`` (the first copy of each of ``count`` distinct experts per layer
raises once: the retry must absorb it); ``"persistent"`` (every copy raises); ``"stuck"`` (every
copy sleeps ``seconds`` first, as a hung DMA would).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

MODES = ("off", "transient", "persistent", "stuck")


class InjectedCopyFault(RuntimeError):
    """What an injected failing copy raises."""


class InjectedHostFault(RuntimeError):
    """What an injected failing host computation raises."""


def inject_copy_faults(caches: Iterable[Any], mode: str, count: int = 3,
                       seconds: float = 5.0) -> None:
    """Wrap (or, with ``"off"``, unwrap) each ``ExpertCache``'s copy function."""
    if mode not in MODES:
        raise ValueError(f"fault mode {mode!r}: one of {MODES}")
    for cache in caches:
        original = getattr(cache, "_copy_without_faults", None) or cache._copy
        cache._copy_without_faults = original
        cache._copy = original if mode == "off" else _faulty(original, mode, count, seconds)


def _faulty(copy: Callable[[int, int], None], mode: str, count: int,
            seconds: float) -> Callable[[int, int], None]:
    failed: set[int] = set()

    def faulty_copy(expert: int, slot: int) -> None:
        if mode == "persistent":
            raise InjectedCopyFault("injected DMA error")
        if mode == "transient" and expert not in failed and len(failed) < count:
            failed.add(expert)
            raise InjectedCopyFault("injected DMA error")
        if mode == "stuck":
            time.sleep(seconds)
        copy(expert, slot)
    return faulty_copy


def inject_host_faults(executors: Iterable[Any], on: bool = True) -> None:
    """Make (or, with ``on=False``, stop making) each ``HostExecutor``'s kernel raise."""
    for executor in executors:
        original = getattr(executor, "_kernel_without_faults", None) or executor.kernel
        executor._kernel_without_faults = original
        executor.kernel = _failing if on else original


def _failing(*args: Any, **kwargs: Any) -> None:
    raise InjectedHostFault("injected host kernel error")
