"""Calibration profile: the JSON file written by ``adapmoe calibrate`` and read by the plugin.

A profile holds one sensitivity ``S_l`` per MoE layer (see ``vllm_adapmoe.offline.calibrate``), the
routing statistics gathered in the same pass, and the identity of the model it was measured on.
``load_profile`` refuses a profile whose ``config_hash`` differs from the model being served.

Layout (``format_version`` 1)::

    {"format_version": 1,
     "model": {"architecture": str, "config_hash": str (sha256 hex), "model_dir": str},
     "sensitivity": [S_0, S_1, ...],                      # one float per MoE layer
     "calibration": {"data": str, "tokens": int, "windows": int, "window": int,
                     "max_tokens": int, "seed": int, "seconds": float, "loss": str, ...},
     "routing": [{...per-layer statistics...}, ...],
     "predictor": [{"layer", "depth", "plain": {top1, recall}, "fitted": {...}, "use",
                    "map"?}, ...],                     # calibrate; see offline/predictor.py
     # optional, from `adapmoe profile PROFILE --trace T.npz`:
     "miss_curves": [[f_0(1), ..., f_0(E)], ...], "prediction": [{...}, ...],
     "trace_settings": {...}}
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FORMAT_VERSION", "CONFIG_HASH_FIELDS", "Profile", "ProfileError", "config_hash", "moe_shape_of",
           "architecture_of", "save_profile", "load_profile"]

FORMAT_VERSION = 1

#: Config fields that define the MoE shape; a profile is only valid for a model that matches them.
CONFIG_HASH_FIELDS = ("num_hidden_layers", "num_local_experts", "num_experts_per_tok",
                      "hidden_size", "intermediate_size", "vocab_size")


class ProfileError(ValueError):
    """A profile file cannot be used (missing, unreadable, malformed or for another model)."""


@dataclass
class Profile:
    model: dict[str, Any]                 # {"architecture", "config_hash", "model_dir"}
    sensitivity: list[float]              # S_l, one per MoE layer
    calibration: dict[str, Any] = field(default_factory=dict)
    routing: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    # Added by `adapmoe profile PROFILE --trace T.npz` (optional):
    miss_curves: list[list[float]] | None = None    # f_l(k), k = 1..E, misses per decoded token
    host_curves: list[list[float]] | None = None    # h_l(s), s = 0..E, host experts per decoded token
    prediction: list[dict[str, Any]] | None = None  # next-layer prediction accuracy per layer
    trace_settings: dict[str, Any] | None = None    # trace and simulator settings behind them
    # Written by calibrate: look-ahead predictors per (target layer, distance), held-out
    # accuracy of the plain and the fitted guess, the fitted map where used (predictor.py).
    predictor: list[dict[str, Any]] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.sensitivity)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format_version": d.pop("format_version"), **d}


# -- model identity --------------------------------------------------------------------------
def _as_config_dict(hf_config: Any) -> dict[str, Any]:
    """A plain dict of the (text) config from a transformers config object, a dict or a model dir."""
    if isinstance(hf_config, (str, Path)):
        cfg_path = Path(hf_config)
        if cfg_path.is_dir():
            cfg_path = cfg_path / "config.json"
        try:
            hf_config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise ProfileError(f"cannot read the model config {cfg_path}: {e}") from e
    if isinstance(hf_config, dict):
        cfg = hf_config
        if not any(k in cfg for k in CONFIG_HASH_FIELDS) and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
        return cfg
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if hasattr(text, "to_dict"):  # as config.json spells it (no attribute aliases such as
        d = text.to_dict()        # OLMoE's num_local_experts → num_experts)
        d = {k: d.get(k) for k in CONFIG_HASH_FIELDS}
        d["architectures"] = getattr(hf_config, "architectures", None)
        return d
    d = {k: getattr(hf_config, k, None) for k in CONFIG_HASH_FIELDS}
    d["architectures"] = getattr(hf_config, "architectures", None)
    return d


def config_hash(hf_config: Any) -> str:
    """sha256 over the config fields that shape the model (``CONFIG_HASH_FIELDS``) and, for a
    supported architecture, its routed-expert shape as the plugin reads it (which decoder layers
    are MoE layers, experts, top-k, hidden and expert sizes): each family names these fields
    differently (``num_local_experts``, ``num_experts``, ``n_routed_experts``,
    ``moe_intermediate_size``, ``first_k_dense_replace``, ``mlp_only_layers``...).

    ``hf_config`` may be a transformers config object, a ``config.json`` dict, or a model dir.
    """
    cfg = _as_config_dict(hf_config)
    payload: dict[str, Any] = {k: cfg.get(k) for k in CONFIG_HASH_FIELDS}
    shape = moe_shape_of(hf_config)
    if shape is not None:
        payload["moe"] = [list(shape.moe_layers), shape.num_experts, shape.top_k,
                          shape.hidden_size, shape.intermediate_size]
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def moe_shape_of(hf_config: Any) -> Any:
    """The plugin's ``MoEShape`` of a supported architecture (None for others)."""
    from vllm_adapmoe.models import SUPPORTED

    arch = architecture_of(hf_config)
    if arch not in SUPPORTED:
        return None
    return SUPPORTED[arch].shape(_config_object(hf_config))


def _config_object(hf_config: Any) -> Any:
    """A transformers config object (its text config) from an object, a dict or a model dir."""
    if isinstance(hf_config, (str, Path)) or isinstance(hf_config, dict):
        from transformers import AutoConfig

        if isinstance(hf_config, dict):
            hf_config = AutoConfig.for_model(**hf_config)
        else:
            path = Path(hf_config)
            hf_config = AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def architecture_of(hf_config: Any) -> str:
    archs = _as_config_dict(hf_config).get("architectures") or ["unknown"]
    return str(archs[0])


def _describe(hf_config: Any) -> str:
    cfg = _as_config_dict(hf_config)
    return ", ".join(f"{k}={cfg.get(k)}" for k in CONFIG_HASH_FIELDS)


# -- save / load -----------------------------------------------------------------------------
def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write ``profile`` as JSON (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    tmp.replace(path)
    return path


def _check_predictor(predictor: Any, path: Path, model_arg: str) -> list[dict[str, Any]] | None:
    from vllm_adapmoe.offline.predictor import fitted_maps

    if predictor is None:
        return None
    try:
        fitted_maps(predictor)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise ProfileError(f"profile file {path}: 'predictor' is malformed ({e}); "
                           f"{_fix(path, model_arg)}") from e
    return predictor


def _fix(path: Path, model: str = "MODEL_DIR") -> str:
    return f"run `adapmoe calibrate {model} --out {path}` to (re)create it"


def load_profile(path: str | Path, hf_config_or_model_dir: Any = None) -> Profile:
    """Read and validate a profile; with ``hf_config_or_model_dir``, also check it fits that model.

    Raises ``ProfileError`` (a ``ValueError``) with the fix in the message when the file is
    missing, not JSON, lacks fields, has another format version, or was calibrated for a model
    whose MoE config differs.
    """
    path = Path(path)
    model_arg = (str(hf_config_or_model_dir) if isinstance(hf_config_or_model_dir, (str, Path))
                 else "MODEL_DIR")
    if not path.is_file():
        raise ProfileError(f"profile file {path} does not exist; {_fix(path, model_arg)}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ProfileError(f"profile file {path} is not valid JSON ({e}); "
                           f"{_fix(path, model_arg)}") from e
    if not isinstance(data, dict):
        raise ProfileError(f"profile file {path} is not a JSON object; {_fix(path, model_arg)}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ProfileError(f"profile file {path} has format_version {version!r}, this version of "
                           f"vllm-adapmoe reads {FORMAT_VERSION}; {_fix(path, model_arg)}")
    missing = [k for k in ("model", "sensitivity", "calibration", "routing") if k not in data]
    model = data.get("model")
    if isinstance(model, dict):
        missing += [f"model.{k}" for k in ("architecture", "config_hash") if k not in model]
    elif "model" not in missing:
        missing.append("model (not an object)")
    if missing:
        raise ProfileError(f"profile file {path} lacks the fields {missing}; "
                           f"{_fix(path, model_arg)}")
    sens = data["sensitivity"]
    if (not isinstance(sens, list) or not sens
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                       and s >= 0 for s in sens)):
        raise ProfileError(f"profile file {path}: 'sensitivity' must be a non-empty list of "
                           f"finite non-negative numbers; {_fix(path, model_arg)}")
    curves = data.get("miss_curves")
    if curves is not None and (not isinstance(curves, list) or len(curves) != len(sens) or not all(
            isinstance(c, list) and c and all(isinstance(v, (int, float)) for v in c) for c in curves)):
        raise ProfileError(f"profile file {path}: 'miss_curves' must hold one list of numbers per "
                           f"layer; rerun `adapmoe profile {path} --trace TRACE.npz`")
    host = data.get("host_curves")
    if host is not None and (not isinstance(host, list) or len(host) != len(sens) or not all(
            isinstance(c, list) and c and all(isinstance(v, (int, float)) for v in c) for c in host)):
        raise ProfileError(f"profile file {path}: 'host_curves' must hold one list of numbers per "
                           f"layer; rerun `adapmoe profile {path} --trace TRACE.npz`")
    profile = Profile(model=model, sensitivity=[float(s) for s in sens],
                      calibration=data["calibration"], routing=data["routing"],
                      format_version=version, miss_curves=curves, host_curves=host,
                      prediction=data.get("prediction"), trace_settings=data.get("trace_settings"),
                      predictor=_check_predictor(data.get("predictor"), path, model_arg))
    if hf_config_or_model_dir is not None:
        want = config_hash(hf_config_or_model_dir)
        if model["config_hash"] != want:
            raise ProfileError(
                f"profile {path} was calibrated for a different model "
                f"({model.get('architecture')} at {model.get('model_dir')!r}, "
                f"config_hash {str(model['config_hash'])[:12]}…) than the one being served "
                f"({_describe(hf_config_or_model_dir)}, config_hash {want[:12]}…); "
                f"run `adapmoe calibrate {model_arg} --out {path}`")
        # MoE layers as the plugin numbers them (dense layers have no sensitivity)
        shape = moe_shape_of(hf_config_or_model_dir)
        n_layers = shape.num_layers if shape is not None else None
        if n_layers is not None and n_layers != len(profile.sensitivity):
            raise ProfileError(f"profile {path} has {len(profile.sensitivity)} sensitivities but "
                               f"the model has {n_layers} MoE layers; {_fix(path, model_arg)}")
    return profile
