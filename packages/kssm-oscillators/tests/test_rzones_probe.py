"""The `r-zones` probe."""

import json

import pytest
import statelab
import torch
from statelab.interfaces import ProbeContext

from kssm_oscillators.rzones import zone_index


def test_zone_boundaries():
    r = torch.tensor([0.0, 0.0999, 0.1, 0.2999, 0.3, 0.5, 0.69, 0.7, 0.85, 0.9499, 0.95, 1.0, 1.00001])
    assert zone_index(r).tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 6, 6]


class _CharTok:
    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_rzones_on_a_kssm_model(spec, registry, tmp_path):
    model = statelab.build(spec(), registry=registry)
    probe = statelab.make_probe("r-zones", {"n_windows": 4, "seq_len": 32, "gen_tokens": 24, "prompt_tokens": 8},
                                model, registry=registry)
    val = torch.randint(0, 24, (500,), generator=torch.Generator().manual_seed(0))
    res = probe.run(model, ProbeContext(val_tokens=val, tokenizer=_CharTok(), out_dir=tmp_path, seed=1))
    m = res.metrics
    # the reported zone fractions are those of the R values the model publishes
    fr = sum(m[k] for k in m if k.startswith("zone_"))
    assert fr == pytest.approx(1.0)
    assert 1 <= m["zones_visited"] <= 7 and 0 <= m["R_min"] <= m["R_mean"] <= m["R_max"] <= 1.0001
    assert {"R_mean.backbone.layers.0", "R_mean.backbone.layers.1"} <= set(m)
    # u's range over the same windows: the tiny spec clamps u to [0.1, 10]
    assert 0.1 <= m["u_min"] <= m["u_p05"] <= m["u_median"] <= m["u_p95"] <= m["u_max"] <= 10.0
    assert res.verdict == ("multi-zone" if m["zones_visited"] >= 3 else "locked")
    png = res.artifacts["r_trajectory"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(res.artifacts["r_zones"].read_text())
    assert len(doc["trajectory"]["backbone.layers.0:kssm.R"]) == 8 + 24 and "|>" in doc["text"]


def test_rzones_counts_match_a_forced_R(spec, registry, tmp_path):
    model = statelab.build(spec(), registry=registry)
    probe = statelab.make_probe("r-zones", {"n_windows": 2, "seq_len": 16, "gen_tokens": 4, "prompt_tokens": 4,
                                            "min_zones": 1}, model, registry=registry)
    with statelab.intervene({"kssm.R": 0.6, "kssm.u": 2.5}):
        res = probe.run(model, ProbeContext(out_dir=tmp_path))
    assert res.metrics["u_min"] == res.metrics["u_max"] == 2.5
    assert res.metrics["zone_3_mystery"] == 1.0 and res.metrics["zones_visited"] == 1.0 and res.passed


def test_random_phases_give_at_null(spec, registry, tmp_path):
    """Phases replaced by uniform random ones: R visits zones, and the probe says it is the incoherent level."""
    bb = {"kind": "kssm", "n_layers": 1, "n_oscillators": 64, "group_levels": [1, 4], "n_harmonics": 1}
    model = statelab.build(spec(backbone=bb), registry=registry)
    probe = statelab.make_probe("r-zones", {"n_windows": 8, "seq_len": 64, "gen_tokens": 4, "prompt_tokens": 4,
                                            "min_zones": 2}, model, registry=registry)
    g = torch.Generator().manual_seed(0)
    with statelab.intervene({"kssm.theta": lambda t: (torch.rand(t.shape, generator=g) * 2 - 1) * torch.pi}):
        res = probe.run(model, ProbeContext(out_dir=tmp_path, seed=2))
    m = res.metrics
    assert res.verdict == "at null" and res.passed is False and m["at_null.backbone.layers.0"] == 1.0
    assert m["zones_visited"] >= 2 and m["null_zones_visited"] >= 2  # random phases visit zones too
    assert m["R_mean"] == pytest.approx(m["null_R_mean.backbone.layers.0"], rel=0.1)
    assert m["zone_1_intimacy"] == pytest.approx(m["null_zone_1_intimacy"], abs=0.05)
