import math

import pytest
import torch

import statelab
from statelab import ProbeContext, SpecError
from traces_crystallize.crystallize import crystallize_round
from traces_crystallize.regularizers import Crystallization, LoadBalance, TraceUtilization

D = 16


def spec(backbone=None, regularizers=(), probes=()):
    bb = {"kind": "transformer", "n_layers": 2, "n_heads": 2, "max_seq_len": 32}
    bb.update(backbone or {})
    return {"name": "r", "tokenizer": {"kind": "byte"},
            "model": {"d_model": D, "vocab_size": 20, "backbone": bb, "regularizers": list(regularizers)},
            "probes": list(probes), "tracking": {"enabled": False}}


def test_load_balance_is_one_when_balanced_and_E_when_collapsed():
    E = 4
    reg = LoadBalance()
    probs = torch.full((2, 8, E), 1 / E)
    experts = torch.arange(16).remainder(E).view(2, 8, 1)
    loss, _ = reg({"backbone.layers.0:router.probs": probs, "backbone.layers.0:router.experts": experts})
    assert float(loss) == pytest.approx(1.0)
    collapsed = torch.zeros(2, 8, E)
    collapsed[..., 2] = 1
    loss, m = reg({"backbone.layers.0:router.probs": collapsed})
    assert float(loss) == pytest.approx(E) and m["max_load"] == 1.0


def test_crystallization_loss_is_normalised_router_entropy():
    reg = Crystallization()
    uniform = torch.full((1, 3, 8), 1 / 8)
    onehot = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3]]), 8).float()
    assert float(reg({"a:router.probs": uniform})[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(reg({"a:router.probs": onehot})[0]) == pytest.approx(0.0, abs=1e-5)


def test_trace_utilization_penalises_unused_bias():
    model = statelab.build(spec({"traces": {"enabled": True, "warmup_steps": 0, "alpha_warmup_steps": 0}},
                                [{"kind": "trace-utilization", "weight": 1.0}]))
    for i, block in enumerate(model.backbone.layers):
        block.attn.traces.use.copy_(torch.tensor([0.25, 1.0]) if i == 0 else torch.tensor([0.0, 0.5]))
        with torch.no_grad():
            block.attn.traces.alpha.copy_(torch.tensor([2.0, 3.0]))
    model.eval()
    _, _, aux = model(torch.randint(0, 20, (1, 6)))
    loss, m = TraceUtilization()(aux, model)
    expected = (4 * 0.75 + 9 * 0.0) / 2 / 2 + (4 * 1.0 + 9 * 0.5) / 2 / 2
    assert float(loss.detach()) == pytest.approx(expected)
    assert m["utilization"] == pytest.approx((0.625 + 0.25) / 2)


def test_regularizer_needing_traces_is_refused_without_them():
    with pytest.raises(SpecError, match="needs internal 'traces.alpha'"):
        statelab.validate_spec(spec(regularizers=[{"kind": "trace-utilization"}]))
    with pytest.raises(SpecError, match="needs internal 'router.probs'"):
        statelab.validate_spec(spec(regularizers=[{"kind": "load-balance"}]))


def test_params_are_strict():
    with pytest.raises(SpecError, match="unknown field"):
        statelab.validate_spec(spec({"traces": {"enabled": True, "quota": 5}}))


def test_crystallization_without_moe_has_a_clear_error():
    with pytest.raises(ValueError, match="set ffn: moe"):
        statelab.build(spec({"crystallization": {"enabled": True}}))


def test_motifs_probe_reports_flop_reduction_table_and_plot(tmp_path):
    torch.manual_seed(0)
    cr = {"enabled": True, "min_frequency": 1, "min_utility": -10.0, "max_entropy": 5.0, "threshold": -100.0, "max_motifs": 3}
    model = statelab.build(spec({"ffn": "moe", "n_experts": 4, "top_k": 2, "crystallization": cr}, probes=[{"kind": "motifs"}]))
    crystallize_round(model, torch.randint(0, 20, (4, 16)), step=1)
    assert model.backbone.motifs.n_active == 3
    probe = statelab.make_probe("motifs", {"batches": 2, "batch_size": 4, "seq_len": 16}, model)
    res = probe.run(model, ProbeContext(val_tokens=torch.randint(0, 20, (400,)), out_dir=tmp_path))
    assert res.metrics["motifs"] == 3
    assert 0 < res.metrics["ffn_flop_reduction"] < 0.5  # served tokens use 1 expert instead of 2
    assert 0 < res.metrics["flop_reduction"] < res.metrics["ffn_flop_reduction"]
    assert "val_loss_no_motifs" in res.metrics
    rows = res.artifacts["motifs_table"].read_text().strip().splitlines()
    assert rows[0] == "id,start,experts,frequency,utility,entropy,score" and len(rows) == 4
    assert res.artifacts["routing_flow"].stat().st_size > 1000


def test_traces_probe_bytes_and_heatmap(tmp_path):
    model = statelab.build(spec({"traces": {"enabled": True, "quota_per_head": 16}}, probes=[{"kind": "traces"}]))
    store = model.backbone.layers[1].attn.traces
    store.update(torch.linspace(1, 0, 10).expand(2, 10).contiguous())
    probe = statelab.make_probe("traces", {"layer": 1, "head": 1, "size": 12}, model)
    res = probe.run(model, ProbeContext(out_dir=tmp_path))
    assert res.metrics["bytes.layer0"] == 2 * 16 * 8 and res.metrics["bytes_total"] == 2 * 2 * 16 * 8
    assert res.metrics["entries.layer1"] == store.n_live > 0
    assert res.artifacts["trace_heatmap"].stat().st_size > 1000
    with pytest.raises(ValueError, match="head 5 out of range 0..1"):
        statelab.make_probe("traces", {"layer": 0, "head": 5}, model).run(model, ProbeContext(out_dir=tmp_path))
    assert math.isclose(res.metrics["max_value"], float(store.val.max()))


def test_checkpoint_roundtrip_keeps_traces_motifs_and_frozen_experts(tmp_path):
    from statelab import checkpoint

    cr = {"enabled": True, "min_frequency": 1, "min_utility": -10.0, "max_entropy": 5.0, "threshold": -100.0, "max_motifs": 2}
    tr = {"enabled": True, "quota_per_head": 8, "warmup_steps": 0, "alpha_warmup_steps": 0, "update_interval": 1, "threshold": 0.0}
    model = statelab.build(spec({"ffn": "moe", "n_experts": 4, "top_k": 2, "crystallization": cr, "traces": tr}))
    x = torch.randint(0, 20, (4, 16))
    model.train()
    model.backbone.begin_step(1, model.embed(x))  # a capture (step 1)
    model(x)
    crystallize_round(model, x, step=1)
    bb = model.backbone
    assert bb.motifs.n_active == 2 and bb.layers[0].attn.traces.n_live > 0
    checkpoint.save(tmp_path / "ck", model)
    loaded = statelab.load(tmp_path / "ck")
    lb = loaded.backbone
    assert lb.motifs.n_active == 2 and lb.motifs.listing() == bb.motifs.listing()
    assert [t.n_live for t in lb.trace_stores()] == [t.n_live for t in bb.trace_stores()]
    assert [m.n_frozen for m in lb.moe_layers()] == [m.n_frozen for m in bb.moe_layers()]
    assert lb._ctx.step == 1
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])
