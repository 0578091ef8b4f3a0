"""``adapmoe calibrate`` and the profile file (CPU, tiny random models, a few seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiny_model import _TEXT, build_tiny_mixtral, build_tiny_moe
from vllm_adapmoe.offline.calibrate import calibrate, load_windows
from vllm_adapmoe.cli import main
from vllm_adapmoe.offline.profile import (FORMAT_VERSION, Profile, ProfileError, config_hash,
                                  load_profile, save_profile)

KW = dict(window=48, max_tokens=288, seed=0, progress=False)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib_data") / "calib.txt"
    path.write_text("\n".join(_TEXT[i: i + 90] for i in range(0, len(_TEXT), 90)))
    return path


@pytest.fixture(scope="module")
def profile(tiny_model, text_file) -> Profile:
    return calibrate(tiny_model, text_file, **KW)


def _strip(p: Profile) -> dict:
    d = p.to_dict()
    d["calibration"].pop("seconds")
    return d


def test_sensitivity_finite_positive(profile, tiny_model):
    assert len(profile.sensitivity) == 3
    assert all(math.isfinite(s) and s > 0 for s in profile.sensitivity)
    assert profile.model["config_hash"] == config_hash(tiny_model)
    assert profile.calibration["tokens"] == 288 and profile.calibration["windows"] == 6
    for layer, r in enumerate(profile.routing):
        assert r["layer"] == layer and r["tokens"] == 288
        assert sum(r["top1_freq"]) == pytest.approx(1) and sum(r["topk_freq"]) == pytest.approx(1)
        assert sum(r["w2_hist"]) == pytest.approx(1) and r["w2_hist_range"] == [0.0, 0.5]
        assert 0 < r["w2_mean"] <= 0.5 and 0 <= r["top1_entropy_bits"] <= 3
        fr = [r["top1_fraction"][t] for t in ("0.001", "0.005", "0.01", "0.05")]
        assert fr == sorted(fr) and all(0 <= f <= 1 for f in fr)


def test_lookahead_predictors(profile, tiny_model):
    """One entry per (target layer, distance ≤ 3) with held-out accuracy of the plain router
    guess and the fitted map; the map is kept exactly where it recovers more of the top-k."""
    from vllm_adapmoe.offline.predictor import decode_map, fitted_maps

    cfg = json.loads((tiny_model / "config.json").read_text())
    hidden, experts = cfg["hidden_size"], cfg["num_local_experts"]
    assert [(e["layer"], e["depth"]) for e in profile.predictor] == [(1, 1), (2, 1), (2, 2)]
    for e in profile.predictor:
        for kind in ("plain", "fitted"):
            assert 0 <= e[kind]["top1"] <= 1 and 0 <= e[kind]["recall"] <= 1
            assert e[kind]["tokens"] == 48  # the one held-out window
        assert (e["use"] == "fitted") == (e["fitted"]["recall"] > e["plain"]["recall"])
        assert ("map" in e) == (e["use"] == "fitted")
        if "map" in e:
            assert decode_map(e["map"]).shape == (hidden + 1, experts)
    assert set(fitted_maps(profile.predictor)) == {
        (e["layer"], e["depth"]) for e in profile.predictor if e["use"] == "fitted"}


def test_deterministic_for_a_seed(profile, tiny_model, text_file):
    assert _strip(calibrate(tiny_model, text_file, **KW)) == _strip(profile)
    other = calibrate(tiny_model, text_file, **{**KW, "seed": 1, "max_tokens": 96})
    assert other.sensitivity != profile.sensitivity


def test_windows(tiny_model, text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    stream = [tok.bos_token_id] + tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    wins = load_windows(tok, text_file, 48, 288, 0)
    assert wins.shape == (6, 48)
    text = " ".join(map(str, stream))
    starts = [text.index(" ".join(map(str, w.tolist()))) for w in wins]
    assert starts == sorted(set(starts))
    assert torch.equal(wins, load_windows(tok, text_file, 48, 288, 0))
    assert not torch.equal(wins, load_windows(tok, text_file, 48, 288, 1))


def _reference_s(model_dir, ids: torch.Tensor, weight_scale: float = 1.0) -> list[float]:
    """S_l by brute force in float64: central finite differences of the summed loss along
    dy / w_k = ybar - E_k, built from each MoE layer's own routed-expert module (the k-th
    lowest-weight expert dropped, its weight spread over the rest), times the weight scale."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64,
                                                 experts_implementation="eager").eval()
    experts = [m for name, m in model.named_modules()
               if name.endswith(".experts") and hasattr(m, "gate_up_proj")]
    ids = ids[None]

    def loss(perturb=None) -> float:
        handle = None
        if perturb is not None:
            layer, t, vec = perturb

            def hook(_m, _i, out):
                out = out.clone()
                out[t] += vec
                return out
            handle = experts[layer].register_forward_hook(hook)
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0, :-1]
        if handle:
            handle.remove()
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()

    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i))
             for n, m in enumerate(experts)]
    loss()
    for h in hooks:
        h.remove()
    eps, out = 1e-3, []  # small enough that no routing decision flips
    for n, m in enumerate(experts):
        x, idx, w = inputs[n]
        with torch.no_grad():
            w, order = w.double().sort(dim=1, descending=True)
            idx = idx.gather(1, order)
            ones = torch.ones_like(w[:, :1])
            each = torch.stack([m(x, idx[:, i:i + 1], ones) for i in range(idx.shape[1])], 1)
            ybar = (w[:, :-1, None] * each[:, :-1]).sum(1) / w[:, :-1].sum(1, keepdim=True)
            d = ybar - each[:, -1]
        proj = [(loss((n, t, eps * d[t])) - loss((n, t, -eps * d[t]))) / (2 * eps)
                for t in range(ids.shape[1] - 1)]
        out.append(weight_scale ** 2 * sum(p * p for p in proj) / len(proj))
    return out


@pytest.mark.parametrize("top_k", [2, 3])
def test_matches_finite_difference_reference(tmp_path, text_file, top_k):
    model_dir = build_tiny_mixtral(tmp_path / "m", seed=1, top_k=top_k)
    got = calibrate(model_dir, text_file, window=12, max_tokens=12, seed=3, progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = load_windows(tok, text_file, 12, 12, 3)[0]
    ref = _reference_s(model_dir, ids)
    assert got.sensitivity == pytest.approx(ref, rel=3e-3)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "deepseek_v2", "glm4_moe", "gpt_oss"])
def test_other_families_match_finite_difference_reference(tmp_path, text_file, family):
    """Shared experts and a dense layer (Qwen2-MoE, DeepSeek), no renormalisation (OLMoE),
    grouped top-k with the routed scale folded into Hugging Face's weights (DeepSeek; GLM-4.5
    with sigmoid scores and a correction bias), a biased router and biased experts with the
    clamped SwiGLU (gpt-oss): one S
    per MoE layer, equal to the brute-force loss curvature in the serving block's weight scale."""
    from transformers import AutoConfig, AutoTokenizer

    from vllm_adapmoe.models import SUPPORTED

    model_dir = build_tiny_moe(tmp_path / family, family, seed=1)
    cfg = AutoConfig.from_pretrained(str(model_dir))
    shape = SUPPORTED[cfg.architectures[0]].shape(cfg)
    got = calibrate(model_dir, text_file, window=12, max_tokens=12, seed=3, progress=False)
    assert len(got.sensitivity) == len(got.routing) == shape.num_layers  # dense layers skipped
    # read back for the model it was calibrated on: MoE layers numbered as serving numbers them
    assert load_profile(save_profile(got, tmp_path / "p.json"), model_dir).sensitivity == got.sensitivity
    scale = got.calibration["weight_scale"]
    assert scale == {"deepseek_v2": 2.0, "glm4_moe": 2.5}.get(family, 1.0)
    ids = load_windows(AutoTokenizer.from_pretrained(str(model_dir)), text_file, 12, 12, 3)[0]
    # fp32 calibration vs fp64 reference on S ~ 1e-5: 1% (a wrong scale or layer is far off)
    assert got.sensitivity == pytest.approx(_reference_s(model_dir, ids, scale), rel=1e-2)
    for r in got.routing:
        kept = [r["mean_kept"][t] for t in ("0.001", "0.005", "0.01", "0.05")]
        assert kept == sorted(kept, reverse=True) and all(1 <= n <= shape.top_k for n in kept)


def test_save_load_roundtrip(profile, tiny_model, tmp_path):
    from transformers import AutoConfig

    path = save_profile(profile, tmp_path / "p.json")
    cfg_obj = AutoConfig.from_pretrained(str(tiny_model))
    cfg_dict = json.loads((tiny_model / "config.json").read_text())
    for target in (tiny_model, str(tiny_model), cfg_obj, cfg_dict, None):
        assert load_profile(path, target) == profile
    assert config_hash(cfg_obj) == config_hash(cfg_dict) == config_hash(tiny_model)


@pytest.mark.parametrize("family, fields, value", [
    ("deepseek_v2", ["n_routed_experts"], 32), ("deepseek_v2", ["moe_intermediate_size"], 64),
    ("deepseek_v2", ["first_k_dense_replace"], 0),
    ("qwen3_moe", ["num_experts", "num_local_experts"], 32),  # transformers 5 writes the latter
    ("qwen3_moe", ["mlp_only_layers"], []), ("olmoe", ["num_experts_per_tok"], 2)])
def test_config_hash_covers_each_familys_expert_fields(tmp_path, family, fields, value):
    cfg = json.loads((build_tiny_moe(tmp_path / family, family) / "config.json").read_text())
    [field] = [f for f in fields if f in cfg]
    assert config_hash({**cfg, field: value}) != config_hash(cfg)


@pytest.mark.parametrize("change", [{"num_layers": 2}, {"hidden_size": 32}])
def test_profile_for_another_model_rejected(profile, tmp_path, change):
    other = build_tiny_mixtral(tmp_path / "other", seed=0, **change)
    path = save_profile(profile, tmp_path / "p.json")
    with pytest.raises(ProfileError, match="calibrated for a different model") as e:
        load_profile(path, other)
    assert f"adapmoe calibrate {other} --out {path}" in str(e.value)


def test_bad_files_rejected(profile, tiny_model, tmp_path):
    with pytest.raises(ProfileError, match="does not exist.*adapmoe calibrate"):
        load_profile(tmp_path / "nope.json", tiny_model)
    bad = tmp_path / "garbled.json"
    bad.write_text('{"format_version": 1, "sensitivity": [0.1, ')
    with pytest.raises(ProfileError, match="not valid JSON.*adapmoe calibrate"):
        load_profile(bad, tiny_model)
    d = profile.to_dict()
    for mutate, msg in [(lambda d: d.update(format_version=FORMAT_VERSION + 1), "format_version"),
                        (lambda d: d.pop("sensitivity"), "lacks the fields"),
                        (lambda d: d["model"].pop("config_hash"), "lacks the fields"),
                        (lambda d: d.update(sensitivity=[1.0, "x", 2.0]), "finite non-negative"),
                        (lambda d: d.update(sensitivity=[1.0, 2.0]), "2 sensitivities"),
                        (lambda d: d.update(predictor=[{"layer": 1, "depth": 1, "use": "fitted",
                                                        "map": {"shape": [2]}}]),
                         "'predictor' is malformed")]:
        dd = json.loads(json.dumps(d))
        mutate(dd)
        bad.write_text(json.dumps(dd))
        with pytest.raises(ProfileError, match=msg):
            load_profile(bad, tiny_model)
    assert issubclass(ProfileError, ValueError)


def test_cli_end_to_end(tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "sub" / "profile.json"
    rc = main(["calibrate", str(tiny_model), "--data", str(text_file), "--out", str(out),
               "--window", "48", "--max-tokens", "96", "--seed", "0", "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "S_l" in printed and f"wrote {out}" in printed
    prof = load_profile(out, tiny_model)
    assert len(prof.sensitivity) == 3 and prof.calibration["tokens"] == 96
    assert main(["calibrate", str(tiny_model), "--data", str(tmp_path / "missing"),
                 "--out", str(out), "--quiet"]) == 2
