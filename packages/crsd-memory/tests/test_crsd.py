import pytest
import torch

import statelab
from statelab.testing import check_backbone, state_roundtrip

from crsd_memory.crsd import CRSD, chunked_scan, linear_scan
from crsd_memory.plugin import CRSDParams
from crsd_memory.reference import linear_recurrence

D = 16
SMALL = dict(d_reservoir=8, hebbian=dict(n_heads=2, chunk_size=4), episodic=dict(slots=4, chunk_size=5))


def make(**kw):
    return CRSD(D, CRSDParams(**{**SMALL, **kw}))


@pytest.mark.parametrize("T", [1, 2, 7, 64, 100])
def test_parallel_scan_matches_loop(T):
    a = torch.rand(2, T, 5)
    b = torch.randn(2, T, 5)
    h0 = torch.randn(2, 5)
    h, hT = linear_scan(a, b, h0)
    h_ref, hT_ref = linear_recurrence(a, b, h0)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hT, hT_ref, atol=1e-5, rtol=1e-5)
    # a constant per-channel decay (the reservoir) broadcasts
    lam = torch.rand(5)
    torch.testing.assert_close(linear_scan(lam, b, h0)[0], linear_recurrence(lam, b, h0)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_scan_matches_loop(chunk):
    a, b, h0 = torch.rand(2, 37, 5), torch.randn(2, 37, 5), torch.randn(2, 5)
    h, hT = chunked_scan(a, b, h0, chunk)
    h_ref, hT_ref = linear_recurrence(a, b, h0)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hT, hT_ref, atol=1e-5, rtol=1e-5)


def test_chunk_size_reaches_the_scans():
    bb = make(chunk_size=6)
    assert all(layer.chunk_size == 6 for layer in bb.layers)
    whole = make(chunk_size=64)
    whole.load_state_dict(bb.state_dict())
    x = torch.randn(2, 20, D)
    with torch.no_grad():
        torch.testing.assert_close(bb(x)[0], whole(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(memory=False), dict(spectral=False, memory_layers=[1]),
                                dict(reservoir=False, chunk_size=7), dict(memory=False, spectral=False, reservoir=False)])
def test_conformance(kw):
    check_backbone(lambda: make(**kw), D)


def test_ablations_remove_their_parameters_and_state():
    full = make(n_layers=1)
    names = {n for n, _ in full.named_parameters()} | {n for n, _ in full.named_buffers()}
    assert any("spec_filter" in n for n in names) and any("res_in" in n for n in names)
    bare = make(n_layers=1, memory=False, spectral=False, reservoir=False)
    names = {n for n, _ in bare.named_parameters()} | {n for n, _ in bare.named_buffers()}
    assert not any(part in n for n in names for part in ("spec_filter", "res_in", "w_rho", "memory", "w_mem"))
    assert set(bare.init_state(2)) == {"layers.0.h"}


def test_spectral_block_is_one_linear_map():
    """FFT -> filter -> iFFT -> Linear equals LayerNorm then one D x D matrix (the fold): the
    block is linear in the normalised features."""
    layer = make(n_layers=1).layers[0]
    with torch.no_grad():
        layer.spec_filter.normal_()
        h = torch.randn(5, D)
        s = layer.spec_norm(h)
        eye = torch.eye(D)
        C = torch.fft.irfft(torch.fft.rfft(eye, dim=-1, norm="ortho") * torch.view_as_complex(layer.spec_filter),
                            n=D, dim=-1, norm="ortho")  # (D, D): row i is the map of basis vector i
        folded = s @ (layer.out.weight @ C.T).T + layer.out.bias
        torch.testing.assert_close(layer._mix(h), folded, atol=1e-5, rtol=1e-5)


def test_offline_equals_online_over_many_chunks():
    bb = make(n_layers=2).eval()
    x = torch.randn(2, 40, D)
    with torch.no_grad():
        y, s_full, _ = bb(x)
        s = None
        ys = []
        for t in range(40):
            y_t, s, _ = bb.step(x[:, t], s)
            ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-5, rtol=1e-4)
    for k in s_full:
        torch.testing.assert_close(s[k].float(), s_full[k].float(), atol=1e-5, rtol=1e-4, msg=k)
    # every part of the state (hidden, reservoir, memory matrices, buffer slots) goes through safetensors
    assert {k.split(".", 2)[2] for k in s_full} == {"h", "rho", "mem_hebb_H", "mem_epi_keys", "mem_epi_values",
                                                   "mem_epi_prio", "mem_epi_slot_t", "mem_epi_t"}
    s_rt = state_roundtrip(s_full)
    with torch.no_grad():
        torch.testing.assert_close(bb(x[:, :5], s_rt)[0], bb(x[:, :5], s_full)[0], atol=0, rtol=0)


def test_recall_gates_the_state_update():
    bb = make(n_layers=1).eval()
    x = torch.randn(2, 12, D)
    with torch.no_grad():
        _, s, aux = bb(x)
        with statelab.intervene({"memory.recall": 0.0}):
            _, s0, aux0 = bb(x)
    g, g0 = aux["crsd.update_gate"], aux0["crsd.update_gate"]
    # without recall the gate is a constant sigmoid(bias); with it, it varies with the recall
    torch.testing.assert_close(g0, torch.sigmoid(bb.layers[0].w_gate.bias).expand_as(g0))
    assert (g - g0).abs().max() > 1e-3
    assert (s["layers.0.h"] - s0["layers.0.h"]).abs().max() > 1e-4


def test_spectral_block_is_orthonormal_at_init():
    """The filter starts at 1, so FFT -> iFFT is the identity and norms are preserved."""
    layer = make(n_layers=1).layers[0]
    h = torch.randn(3, D)
    s = layer.spec_norm(h)
    f = torch.fft.rfft(s, dim=-1, norm="ortho")
    torch.testing.assert_close(torch.fft.irfft(f * torch.view_as_complex(layer.spec_filter), n=D, dim=-1, norm="ortho"), s,
                               atol=1e-5, rtol=1e-5)


def test_injectable_keys_are_the_hidden_states():
    bb = make(n_layers=2)
    assert bb.injectable_keys() == ["layers.0.h", "layers.1.h"]
