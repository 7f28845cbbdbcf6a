"""Batched PUCT search: against the per-node reference, on hand-built problems, bounds, determinism."""

import pytest
import torch
from torch import nn

from crsm_planner.search import PUCTSearch
from crsm_planner.search_reference import reference_search


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a thread pool only adds overhead on a loaded 2-core runner
    yield
    torch.set_num_threads(n)


class RandomLatentModel(nn.Module):
    """Random MLPs standing in for the learned dynamics, value and prior heads."""

    def __init__(self, L=6, V=11, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, L)
        self.dyn = nn.Sequential(nn.Linear(2 * L, 16), nn.Tanh(), nn.Linear(16, L))
        self.val = nn.Linear(L, 2)
        self.pri = nn.Linear(L, V)

    def dynamics(self, z, tok):
        return z + self.dyn(torch.cat([z, self.emb(tok)], -1))

    def value(self, z):
        out = self.val(z)
        return out[..., 0], out[..., 1].exp()

    def prior(self, z):
        return 2 * self.pri(z)


def _reward(logp, tok):
    """Edge rewards of both kinds: a token log-probability term and a per-token task reward."""
    return 0.3 * logp + (tok % 3 == 0).float()


@pytest.mark.parametrize("seed,sims,depth,top_k,max_nodes,reward", [
    (0, 20, 3, 3, 64, None), (1, 40, 4, 2, 31, None), (2, 25, 2, 4, 200, None), (3, 30, 3, 3, 100, _reward)])
def test_batched_search_matches_the_reference(seed, sims, depth, top_k, max_nodes, reward):
    m = RandomLatentModel(seed=seed)
    B, L, V = 3, 6, 11
    z0 = torch.randn(B, L)
    logits = torch.randn(B, V)
    kw = dict(simulations=sims, depth=depth, c_puct=1.3, top_k=top_k, max_nodes=max_nodes, edge_reward=reward)
    with torch.no_grad():
        res = PUCTSearch(m.dynamics, m.value, m.prior, **kw).run(z0, logits)
        for b in range(B):
            ref = reference_search(m.dynamics, m.value, m.prior, z0[b], logits[b], **kw)
            assert res.root_visits[b].tolist() == ref["visits"]
            assert res.best_token[b].item() == ref["best_token"]
            assert res.nodes_used[b].item() == ref["nodes"]
            torch.testing.assert_close(res.root_q[b], torch.tensor(ref["q"]), rtol=1e-4, atol=1e-5)
            assert res.confidence[b].item() == pytest.approx(ref["confidence"], rel=1e-3, abs=1e-5)
            assert res.root_value[b].item() == pytest.approx(ref["root_value"], rel=1e-4, abs=1e-5)


def _chain_problem(L=4, good=2, var=1e-4):
    """z' = z + e_token; value(z) = z[good] - sum of the other coordinates: every token but
    `good` costs value, so the best first action is `good` whatever follows."""
    eye = torch.eye(L)

    def dynamics(z, tok):
        return z + eye[tok]

    def value(z):
        return 2 * z[..., good] - z.sum(-1), torch.full_like(z[..., 0], var)

    def prior(z):
        return torch.zeros(z.shape[0], L)

    return dynamics, value, prior


def test_puct_finds_the_best_action_against_a_misleading_prior():
    dynamics, value, prior = _chain_problem()
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]])  # the prior strongly prefers token 0
    res = PUCTSearch(dynamics, value, prior, simulations=64, depth=3, c_puct=1.0, top_k=4, max_nodes=128).run(
        torch.zeros(1, 4), logits)
    assert res.best_token.item() == 2
    assert res.root_visits[0, res.root_tokens[0].tolist().index(2)] == res.root_visits.max()
    assert res.confidence.item() > 0.1  # clear winner (the flat case below gives < 1e-6)


def test_flat_or_uncertain_search_gives_zero_confidence():
    L = 4

    def flat_value(z):
        return torch.zeros_like(z[..., 0]), torch.full_like(z[..., 0], 1e-4)

    dynamics, _, prior = _chain_problem()
    flat = PUCTSearch(dynamics, flat_value, prior, simulations=64, depth=3, top_k=4, max_nodes=128).run(
        torch.zeros(2, L), torch.zeros(2, L))
    assert flat.confidence.abs().max().item() < 1e-6
    # the same clear problem as above, but the value head's own variance is huge
    dynamics, noisy_value, prior = _chain_problem(var=1e6)
    unsure = PUCTSearch(dynamics, noisy_value, prior, simulations=64, depth=3, top_k=4, max_nodes=128).run(
        torch.zeros(1, L), torch.zeros(1, L))
    assert unsure.best_token.item() == 2
    assert unsure.confidence.item() < 2e-3


def test_tree_never_exceeds_max_nodes():
    m = RandomLatentModel(seed=3)
    for max_nodes in (5, 13, 50):
        s = PUCTSearch(m.dynamics, m.value, m.prior, simulations=60, depth=6, top_k=4, max_nodes=max_nodes)
        with torch.no_grad():
            res = s.run(torch.randn(4, 6), torch.randn(4, 11))
        assert res.nodes_used.max().item() <= max_nodes
        assert s.latent.shape[1] == max_nodes + 1  # preallocated once, never grown; + the scratch slot
        assert s.children.max().item() < max_nodes  # nothing points at the scratch slot
        assert res.root_visits.sum(1).eq(60).all()  # every simulation counted even in a full tree
        used = torch.arange(max_nodes + 1)[None] < res.nodes_used[:, None]
        assert (s.visits[~used] == 0).all()


def test_search_is_deterministic_under_a_seed():
    m = RandomLatentModel(seed=4)
    s = PUCTSearch(m.dynamics, m.value, m.prior, simulations=30, depth=3, top_k=3, max_nodes=64, root_noise=0.5)
    z0, logits = torch.randn(3, 6), torch.randn(3, 11)
    with torch.no_grad():
        a = s.run(z0, logits, torch.Generator().manual_seed(7))
        b = s.run(z0, logits, torch.Generator().manual_seed(7))
        c = s.run(z0, logits, torch.Generator().manual_seed(8))
    assert torch.equal(a.root_visits, b.root_visits) and torch.equal(a.best_latent, b.best_latent)
    assert torch.equal(a.confidence, b.confidence)
    n7, n8 = (s.sample_noise(3, torch.Generator().manual_seed(i)) for i in (7, 8))
    assert not torch.equal(n7, n8)
    assert a.root_visits.shape == c.root_visits.shape


def test_max_nodes_too_small_is_refused():
    m = RandomLatentModel()
    with pytest.raises(ValueError, match="cannot hold the root and its 4 children"):
        PUCTSearch(m.dynamics, m.value, m.prior, top_k=4, max_nodes=4)


def test_confidence_grows_as_the_visits_concentrate_on_a_clear_winner():
    """More simulations on a problem with a clear best action concentrate the root visits on
    it; the confidence must rise with that, not fall (the gap is measured against the
    alternatives, not against a visit-weighted mean that the winner itself dominates)."""
    dynamics, value, prior = _chain_problem()
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    conf = {}
    for sims in (64, 256):
        res = PUCTSearch(dynamics, value, prior, simulations=sims, depth=3, c_puct=1.0, top_k=4, max_nodes=512).run(
            torch.zeros(1, 4), logits)
        assert res.best_token.item() == 2
        conf[sims] = res.confidence.item()
    assert conf[256] > conf[64]
    assert conf[256] > 0.5


def test_a_task_reward_on_an_edge_steers_the_search_through_a_flat_value():
    """Flat value head: only a reward for token 2, reachable two levels down and only through
    root child 1, separates the root children; the search picks child 1 against its prior."""
    L = 4
    eye = torch.eye(L)
    follow = 5 * torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1], [1, 0, 0, 1]])  # token -> next priors
    search = PUCTSearch(lambda z, t: eye[t], lambda z: (torch.zeros(z.shape[0]), torch.full((z.shape[0],), 1e-6)),
                        lambda z: z @ follow, simulations=40, depth=2, c_puct=1.0, top_k=2, max_nodes=64,
                        edge_reward=lambda logp, tok: (tok == 2).float())
    logits = torch.tensor([[1.0, 0.8, -5.0, -5.0]])  # root children: tokens 0 (favoured) and 1
    res = search.run(torch.zeros(1, L), logits)
    assert res.root_tokens[0].tolist() == [0, 1]
    assert res.best_token.item() == 1 and res.root_q[0, 1] > res.root_q[0, 0] == 0
