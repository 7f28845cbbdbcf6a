"""Slow, obviously correct references for the K-SSM layer (tests and benchmarks only).

* :func:`kuramoto_substep_naive`: the Kuramoto update with the explicit O(N^2) pairwise sum
  ``(K_i / N) sum_j sin(theta_j - theta_i)``, one oscillator at a time if asked.
* :func:`order_parameters_naive`: ``R e^{i psi} = mean_{j in group} e^{i k theta_j}`` with
  complex numbers, one group and one harmonic at a time.
* :func:`layer_phases_naive`: a layer's phase trajectory token by token from its
  parameters, using the two functions above and nothing from :mod:`kssm_oscillators.kssm`
  except the bistability terms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kssm_oscillators.bistability import bistable_terms


def kuramoto_substep_naive(theta: Tensor, rate: Tensor, coupling: Tensor, f_re: Tensor, f_im: Tensor, dt: float) -> Tensor:
    """Same contract as :func:`kssm_oscillators.kssm.mean_field_substep`, O(N^2) memory and time."""
    N = theta.shape[-1]
    diff = theta.unsqueeze(-2) - theta.unsqueeze(-1)  # (B, N, N): [i, j] = theta_j - theta_i
    pairwise = torch.sin(diff).sum(-1) / N  # (B, N)
    forcing = torch.sqrt(f_re**2 + f_im**2) * torch.sin(torch.atan2(f_im, f_re) - theta)  # |F| sin(arg F - theta)
    return theta + dt * (rate + coupling * pairwise + forcing)


def order_parameters_naive(theta: Tensor, n_harmonics: int, group_levels: list[int]) -> tuple[Tensor, Tensor]:
    """``theta (B, T, N)`` -> ``(R, psi)`` (B, T, G, K) by explicit loops over groups and harmonics."""
    B, T, N = theta.shape
    Rs, psis = [], []
    for g in group_levels:
        size = N // g
        for grp in range(g):
            members = theta[..., grp * size : (grp + 1) * size]  # (B, T, size)
            r_k, p_k = [], []
            for k in range(1, n_harmonics + 1):
                z = torch.exp(1j * k * members.double()).mean(-1)  # (B, T) complex
                r_k.append(z.abs())
                p_k.append(torch.angle(z))
            Rs.append(torch.stack(r_k, -1))
            psis.append(torch.stack(p_k, -1))
    return torch.stack(Rs, 2), torch.stack(psis, 2)  # (B, T, G, K)


def layer_phases_naive(layer, x: Tensor, theta0: Tensor) -> Tensor:
    """Phases after each token, (B, T, N), for a :class:`~kssm_oscillators.kssm.KuramotoLayer`
    on input ``x (B, T, D)`` from phases ``theta0 (B, N)``, one token at a time."""
    N = layer.N
    theta = theta0.clone()
    out = []
    for t in range(x.shape[1]):
        d = layer.drive(layer.normed(x[:, t]))  # (B, 3N + 10)
        a, f_re, f_im, p = d[:, :N], d[:, N : 2 * N], d[:, 2 * N : 3 * N], d[:, 3 * N :]
        u, _, _ = bistable_terms(p, **layer.bistable)  # (B,)
        coupling = layer.coupling * u[:, None]  # (B, N)
        if layer.log_gain is not None:
            f_re, f_im = f_re * layer.log_gain.exp(), f_im * layer.log_gain.exp()
        for _ in range(layer.substeps):
            theta = kuramoto_substep_naive(theta, layer.omega + a, coupling, f_re, f_im, layer.dt)
        theta = torch.atan2(torch.sin(theta), torch.cos(theta))  # wrap to (-pi, pi]
        out.append(theta)
    return torch.stack(out, 1)


def circular_distance(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise distance between phases on the circle, in [0, pi]."""
    d = torch.remainder(a - b, 2 * math.pi)
    return torch.minimum(d, 2 * math.pi - d)
