"""The planner's compressed view of a backbone's steerable state, and a latent dynamics model.

* :class:`StateCodec` flattens the injectable entries of a model state (``backbone.<k>``
  for ``k`` in ``backbone.injectable_keys()``) into one vector ``s (B, S)``, normalises
  it per feature and projects it linearly to a latent ``z (B, L)``; a linear decoder maps
  a latent back to a (normalised) state. ``S`` is only known once a model is seen, so
  the codec's weights start empty and take their shape on :meth:`StateCodec.materialize`
  (first fit) or when a checkpoint is loaded.
* :class:`LatentDynamics` predicts ``z_{t+1} = z_t + MLP([z_t, E(x_{t+1})])`` from the
  current latent and the next token (its own small embedding, not the LM's).

Both are distilled from real backbone rollouts in :meth:`MCTSPlanner.fit`.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from statelab.interfaces import State


class StateCodec(nn.Module):
    """``s (B, S)`` <-> ``z (B, L)``: ``z = W_e (s - mu) / sd``, ``s_hat = mu + sd * (W_d z + b_d)``."""

    def __init__(self, d_latent: int) -> None:
        super().__init__()
        self.d_latent = d_latent
        # empty until materialize(S): the state width depends on the backbone
        self.enc_weight = nn.Parameter(torch.empty(d_latent, 0))  # (L, S)
        self.dec_weight = nn.Parameter(torch.empty(0, d_latent))  # (S, L)
        self.dec_bias = nn.Parameter(torch.empty(0))  # (S,)
        self.register_buffer("mean", torch.empty(0))  # (S,)
        self.register_buffer("std", torch.empty(0))  # (S,)
        self.keys: list[str] = []
        self.shapes: list[torch.Size] = []

    # -- shape ---------------------------------------------------------------------
    @property
    def state_dim(self) -> int:
        return self.enc_weight.shape[1]

    @property
    def is_materialized(self) -> bool:
        return self.state_dim > 0

    def materialize(self, state_dim: int) -> None:
        """Give the codec its weights for states of ``state_dim`` features (random init)."""
        dev = self.enc_weight.device
        enc = torch.empty(self.d_latent, state_dim, device=dev)
        nn.init.normal_(enc, std=1.0 / math.sqrt(state_dim))
        dec = torch.empty(state_dim, self.d_latent, device=dev)
        nn.init.normal_(dec, std=1.0 / math.sqrt(self.d_latent))
        rg = self.enc_weight.requires_grad
        self.enc_weight = nn.Parameter(enc, requires_grad=rg)
        self.dec_weight = nn.Parameter(dec, requires_grad=rg)
        self.dec_bias = nn.Parameter(torch.zeros(state_dim, device=dev), requires_grad=rg)
        self.mean = torch.zeros(state_dim, device=dev)
        self.std = torch.ones(state_dim, device=dev)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "enc_weight")
        if w is not None and w.shape[1] != self.state_dim and not self.is_materialized:
            self.materialize(w.shape[1])  # a fitted planner loaded into a fresh (empty) one
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- flatten -------------------------------------------------------------------
    def bind(self, model, state: Mapping[str, Tensor]) -> None:
        """Record which entries of ``state`` are steered (and their shapes) for ``model``."""
        keys = [f"backbone.{k}" for k in model.backbone.injectable_keys()]
        if not keys:
            raise ValueError(
                f"the backbone {type(model.backbone).__name__} has no injectable state; "
                "the mcts planner needs a steerable backbone such as 'mamba'"
            )
        missing = [k for k in keys if k not in state]
        if missing:
            raise KeyError(f"state lacks injectable entries {missing}; "
                           "pass a full model state (keys 'backbone.layers.<i>.<k>')")
        shapes = [state[k].shape[1:] for k in keys]
        dim = sum(int(math.prod(s)) for s in shapes)
        if self.is_materialized and dim != self.state_dim:
            raise ValueError(
                f"this planner was fitted on states of {self.state_dim} features, "
                f"but the backbone's injectable state has "
                f"{dim}; refit it with `statelab planner fit CKPT` (planner.fit) on this backbone"
            )
        self.keys, self.shapes = keys, shapes

    def flatten(self, state: Mapping[str, Tensor]) -> Tensor:
        """Injectable entries of ``state`` -> ``(B, S)`` float32."""
        return torch.cat([state[k].reshape(state[k].shape[0], -1).float() for k in self.keys], dim=1)  # (B, S)

    def unflatten(self, s: Tensor, like: Mapping[str, Tensor]) -> State:
        """``(B, S)`` -> ``{key: tensor}`` with the shapes and dtypes of ``like``."""
        out: State = {}
        i = 0
        for k, shp in zip(self.keys, self.shapes):
            n = int(math.prod(shp))
            out[k] = s[:, i : i + n].reshape(s.shape[0], *shp).to(like[k].dtype)  # (B, *shape)
            i += n
        return out

    # -- codec ---------------------------------------------------------------------
    def set_normalization(self, s: Tensor) -> None:
        """Per-feature mean and std from sample states ``s (N, S)``; near-constant features get
        a floor of 1% of the typical std so that they are not blown up."""
        var = s.var(dim=0, unbiased=False)
        floor = 1e-4 * var.mean().clamp_min(1e-12)
        self.mean = s.mean(dim=0).detach().clone()
        self.std = (var + floor).sqrt().detach().clone()

    @torch.no_grad()
    def init_pca(self, s: Tensor) -> None:
        """Start the codec at the best linear autoencoder of sample states ``s (N, S)``: the
        encoder projects on the top principal directions of the normalised states, the
        decoder maps back along them."""
        x = self.normalize(s)  # (N, S)
        q = min(self.d_latent, x.shape[0], x.shape[1])
        _, _, v = torch.svd_lowrank(x, q=q, niter=4)  # v (S, q)
        self.enc_weight.zero_()
        self.dec_weight.zero_()
        self.enc_weight[:q] = v.T
        self.dec_weight[:, :q] = v
        self.dec_bias.zero_()

    def normalize(self, s: Tensor) -> Tensor:
        return (s - self.mean) / self.std

    def encode(self, s: Tensor) -> Tensor:
        """Raw states ``(..., S)`` -> latents ``(..., L)``."""
        return F.linear(self.normalize(s), self.enc_weight)

    def decode_normalized(self, z: Tensor) -> Tensor:
        """Latents ``(..., L)`` -> normalised states ``(..., S)``."""
        return F.linear(z, self.dec_weight, self.dec_bias)

    def decode_delta(self, z_to: Tensor, z_from: Tensor) -> Tensor:
        """The raw-state change ``D(z_to) - D(z_from)`` ``(..., S)`` (the decoder's bias cancels)."""
        return F.linear(z_to - z_from, self.dec_weight) * self.std


class LatentDynamics(nn.Module):
    """``z_{t+1} = z_t + MLP([z_t, E(x_{t+1})])``: a residual one-step predictor in latent space."""

    def __init__(self, vocab_size: int, d_latent: int, d_token: int, d_hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_token)
        self.net = nn.Sequential(
            nn.Linear(d_latent + d_token, d_hidden), nn.GELU(),
            nn.Linear(d_hidden, d_hidden), nn.GELU(),
            nn.Linear(d_hidden, d_latent),
        )
        nn.init.normal_(self.embed.weight, std=0.1)
        nn.init.zeros_(self.net[-1].weight)  # starts as the "state does not change" predictor
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: Tensor, tokens: Tensor) -> Tensor:
        """``z (..., L)``, ``tokens (...)`` -> ``z' (..., L)``."""
        return z + self.net(torch.cat([z, self.embed(tokens)], dim=-1))  # (..., L)

    def rollout(self, z: Tensor, tokens: Tensor) -> Tensor:
        """``z (B, L)``, ``tokens (B, k)`` -> the predicted latents after each token ``(B, k, L)``."""
        out = []
        for j in range(tokens.shape[1]):
            z = self(z, tokens[:, j])
            out.append(z)
        return torch.stack(out, dim=1)  # (B, k, L)
