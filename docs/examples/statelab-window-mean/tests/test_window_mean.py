import torch

from statelab.testing import check_memory
from statelab_window_mean.window import WindowMean


def test_conformance():
    check_memory(lambda: WindowMean(16, window=4), 16)


def test_matches_a_direct_window_mean():
    torch.manual_seed(0)
    mem = WindowMean(8, window=3)
    h = torch.randn(2, 10, 8)
    out, _, aux = mem(h)
    padded = torch.cat([torch.zeros(2, 2, 8), h], 1)
    expected = torch.stack([padded[:, t : t + 3].mean(1) for t in range(10)], 1)
    torch.testing.assert_close(aux["memory.recall"], mem.proj(expected))
    torch.testing.assert_close(out, h + mem.proj(expected))
