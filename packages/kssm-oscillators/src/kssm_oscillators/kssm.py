"""K-SSM: a Kuramoto state-space backbone where order parameters are the only path to the output.

One layer, for each token ``x_t`` (B, D):

1. Drive (computed for the whole sequence with one matmul, before the recurrence):
   ``[a_t, F^re_t, F^im_t, p_t] = W LayerNorm(x_t) + b`` gives a frequency shift ``a_t``
   (B, N), a complex forcing ``F_t = F^re_t + i F^im_t`` (B, N) and the ten bistability
   parameters ``p_t`` (B, 10), from which ``u_t`` (B,) (see :mod:`kssm_oscillators.bistability`).
2. Kuramoto dynamics, ``substeps`` Euler steps of ``dt = token_time / substeps``:

       dtheta_i/dt = omega_i + a_ti + K_i u_t R sin(psi - theta_i) + |F_ti| sin(arg F_ti - theta_i)

   with learnable natural frequencies ``omega`` and couplings ``K`` (N,). The coupling term
   is the mean field form of ``(K_i u_t / N) sum_j sin(theta_j - theta_i)``: O(N) per step
   (the O(N^2) sum is in :mod:`kssm_oscillators.naive`). Phases are wrapped to [-pi, pi)
   after each token. ``u_t`` scales the coupling: u = 1 is the plain Kuramoto model.
3. Multi-scale order parameters of the phases after the token, for harmonics
   ``k = 1..K`` and oscillator groups at several scales (``group_levels = [1, 4, 16, 64]``
   with N = 128: the whole population, 4 groups, 16 groups, pairs):
   ``R e^{i psi} = mean_group e^{i k theta}``.
4. Output ``y_t = readout([R, R cos psi, R sin psi])``: the next layer and the head see
   nothing else. There is no residual connection around the oscillators. With
   ``readout: order`` only ``R`` of the groups at ``readout_levels`` (default: the whole
   population, all harmonics) is read: ``y_t = readout(R[levels])``, so no per-group phase
   reaches the output and synchronisation is the only channel.

Named internals (per layer, qualified by site in an assembled model):
``kssm.u`` (B, T), ``kssm.delta`` (B, T), ``kssm.theta`` (B, T, N) the phases the readout
reads, ``kssm.R`` and ``kssm.psi`` (B, T, G, K) with ``G = sum(group_levels)`` groups
(index 0 is the whole population when ``group_levels[0] == 1``) and K harmonics.
Forcing ``kssm.u`` changes the dynamics; forcing ``kssm.R``/``kssm.psi``/``kssm.theta``
changes the readout.

State: ``{"theta": (B, N)}``, the phases after the last token.

Training: driven phase oscillators are weakly chaotic, so gradients through many tokens of
the phase recurrence explode (x1000 between T=8 and T=64 at initialisation). With
``grad_horizon = h`` (default 4) the phases are detached every ``h`` tokens while training:
truncated backprop through time inside the sequence; the forward values are unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from statelab.interfaces import Aux, Backbone, Layer, State
from statelab.internals import publish

from kssm_oscillators.bistability import INIT_BIAS, bistable_terms

TWO_PI = 2.0 * math.pi
SPLIT_EPS = 1e-12  # |H| = sqrt(re^2 + im^2 + eps): its gradient is finite at H = 0


def wrap_phase(theta: Tensor) -> Tensor:
    """Phases to [-pi, pi)."""
    return torch.remainder(theta + math.pi, TWO_PI) - math.pi


def mean_field_substep(theta: Tensor, rate: Tensor, coupling: Tensor, f_re: Tensor, f_im: Tensor, dt: float) -> Tensor:
    """One Euler step of the driven Kuramoto model through the mean field, O(N).

    All tensors (B, N) (``coupling`` may be (B, 1)). ``rate = omega + a``.
    ``(K/N) sum_j sin(theta_j - theta_i) = K (Im Z cos theta_i - Re Z sin theta_i)`` with
    ``Z = mean_j e^{i theta_j}``; the forcing adds ``Im(F e^{-i theta_i})``.
    """
    c, s = torch.cos(theta), torch.sin(theta)  # (B, N)
    field_re = torch.addcmul(f_re, coupling, c.mean(-1, keepdim=True))  # (B, N): K Re Z + Re F
    field_im = torch.addcmul(f_im, coupling, s.mean(-1, keepdim=True))  # (B, N): K Im Z + Im F
    velocity = torch.addcmul(torch.addcmul(rate, field_im, c), field_re, s, value=-1.0)
    return torch.add(theta, velocity, alpha=dt)  # fused ops: the loop is launch-bound on GPUs


def split_substep(theta: Tensor, rate: Tensor, coupling: Tensor, f_re: Tensor, f_im: Tensor, dt: float) -> Tensor:
    """One step of the same model with a split integrator (``integrator: split``), O(N).

    The rotation ``rate`` is applied exactly, then the pull of the total field
    ``H_i = F_i + K_i Z`` (forcing plus mean field, held fixed over the step) is solved
    exactly: ``dtheta/dt = |H| sin(arg H - theta)`` relaxes the offset ``delta = theta - arg H``
    as ``tan(delta / 2) <- g tan(delta / 2)``, ``g = exp(-|H| dt)``. The change of phase is
    ``2 atan((g - 1) |H| sin(delta) / ((1 + g) |H| + (1 - g) |H| cos(delta)))`` (the
    denominator is at least ``2 g |H| > 0``). It agrees with Euler to first order in ``dt`` but
    never overshoots: a strong field writes ``arg H`` into the phase (a gate on the circle,
    ``g`` the fraction kept) instead of making the map chaotic.
    """
    theta = theta + dt * rate  # (B, N)
    c, s = torch.cos(theta), torch.sin(theta)  # (B, N)
    h_re = torch.addcmul(f_re, coupling, c.mean(-1, keepdim=True))  # (B, N): Re H
    h_im = torch.addcmul(f_im, coupling, s.mean(-1, keepdim=True))  # (B, N): Im H
    y = s * h_re - c * h_im  # |H| sin(delta)
    x = c * h_re + s * h_im  # |H| cos(delta)
    h = torch.sqrt(h_re * h_re + h_im * h_im + SPLIT_EPS)  # |H|
    keep = torch.exp(-(dt * h).clamp_max(30.0))  # (B, N): >= 1e-13, so the denominator stays > 0
    return theta + 2.0 * torch.atan((keep - 1.0) * y / ((1.0 + keep) * h + (1.0 - keep) * x))


def order_parameters(theta: Tensor, n_harmonics: int, group_levels: list[int], eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    """``theta (B, T, N)`` -> ``(R, cos psi, sin psi)``, each (B, T, G, K).

    Group level ``g`` splits the N oscillators into ``g`` contiguous groups of ``N / g``.
    ``R = sqrt(re^2 + im^2 + eps)`` (never exactly 0, so the direction is defined).
    """
    B, T, N = theta.shape
    g_max = max(group_levels)
    k = torch.arange(1, n_harmonics + 1, device=theta.device, dtype=theta.dtype)  # (K,)
    kt = theta.unsqueeze(-1) * k  # (B, T, N, K)
    re = torch.cos(kt).view(B, T, g_max, N // g_max, n_harmonics).mean(3)  # (B, T, g_max, K)
    im = torch.sin(kt).view(B, T, g_max, N // g_max, n_harmonics).mean(3)  # (B, T, g_max, K)
    res, ims = [], []
    for g in group_levels:  # coarser groups average whole finer ones (equal sizes)
        res.append(re.view(B, T, g, g_max // g, n_harmonics).mean(3))  # (B, T, g, K)
        ims.append(im.view(B, T, g, g_max // g, n_harmonics).mean(3))
    re, im = torch.cat(res, 2), torch.cat(ims, 2)  # (B, T, G, K)
    R = torch.sqrt(re * re + im * im + eps)
    return R, re / R, im / R


class KuramotoLayer(Layer):
    def __init__(
        self,
        d_model: int,
        n_oscillators: int = 128,
        n_harmonics: int = 4,
        group_levels: tuple[int, ...] = (1, 4, 16, 64),
        substeps: int = 1,
        token_time: float = 0.5,
        coupling_init: float = 0.5,
        freq_spread: float = 1.0,
        readout_mult: int = 2,
        readout: str = "full",
        readout_levels: tuple[int, ...] = (1,),
        clamp_u: bool = True,
        clamp_gradient: str = "straight-through",
        u_min: float = 0.1,
        u_max: float = 10.0,
        den_eps: float = 1e-3,
        param_scale: float = 4.0,
        grad_horizon: int = 4,
        forcing_gain: tuple[float, float] | None = None,
        kernel: str = "auto",
        integrator: str = "euler",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if any(n_oscillators % g or max(group_levels) % g for g in group_levels):
            raise ValueError(
                f"group_levels {list(group_levels)} must each divide n_oscillators ({n_oscillators}) and the largest level"
            )
        self.d_model, self.N, self.K = d_model, n_oscillators, n_harmonics
        self.group_levels = list(group_levels)
        self.G = sum(group_levels)
        self.substeps, self.dt = substeps, token_time / substeps
        self.grad_horizon = grad_horizon
        if kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel {kernel!r}: choose auto (Triton on CUDA, else the PyTorch loop), torch or triton")
        self.kernel = kernel
        if integrator not in ("euler", "split"):
            raise ValueError(f"integrator {integrator!r}: choose euler or split")
        self.integrator = integrator
        self.bistable = dict(clamp=clamp_u, u_min=u_min, u_max=u_max, den_eps=den_eps, param_scale=param_scale,
                             clamp_gradient=clamp_gradient)
        if readout not in ("full", "order"):
            raise ValueError(f"readout {readout!r}: choose 'full' or 'order'")
        if readout == "order" and any(g not in self.group_levels for g in readout_levels):
            raise ValueError(f"readout_levels {list(readout_levels)} must be among group_levels {self.group_levels}")
        self.readout = readout
        starts = [sum(self.group_levels[:i]) for i in range(len(self.group_levels))]
        # entries of the G axis read by readout 'order': every group of each chosen level
        self.register_buffer("read_groups", torch.tensor(
            [s + j for s, g in zip(starts, self.group_levels) if g in readout_levels for j in range(g)], dtype=torch.long),
            persistent=False)
        N = n_oscillators
        self.norm = nn.LayerNorm(d_model)
        self.drive = nn.Linear(d_model, 3 * N + 10)  # [a | F_re | F_im | a..j]
        nn.init.normal_(self.drive.weight, std=1.0 / math.sqrt(d_model))
        with torch.no_grad():
            self.drive.weight[3 * N :].mul_(0.02)  # the ten parameters start near INIT_BIAS: u ~ 1
            self.drive.bias.zero_()
            self.drive.bias[3 * N :] = torch.tensor(INIT_BIAS)
        self.omega = nn.Parameter(torch.linspace(-freq_spread, freq_spread, N))
        self.coupling = nn.Parameter(torch.full((N,), coupling_init))
        # optional learnable per-oscillator forcing gains, log-spaced: weakly forced oscillators
        # keep their phase over many tokens (slow memory), strongly forced ones follow the input
        self.log_gain = (
            nn.Parameter(torch.linspace(math.log(forcing_gain[0]), math.log(forcing_gain[1]), N))
            if forcing_gain is not None else None
        )
        n_feat = 3 * self.G * n_harmonics if readout == "full" else len(self.read_groups) * n_harmonics
        hidden = readout_mult * d_model
        self.readout_lin = nn.Linear(n_feat, d_model)
        self.readout_mlp = (
            nn.Sequential(nn.Linear(n_feat, hidden), nn.GELU(), nn.Linear(hidden, d_model)) if readout_mult > 0 else None
        )
        # initial phases: spread over the circle, fixed per layer (a buffer, not learned)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("theta0", (torch.rand(N, generator=g) * 2 - 1) * math.pi, persistent=True)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        theta = self.theta0.to(device=device if device is not None else self.theta0.device)
        return {"theta": theta.unsqueeze(0).expand(batch_size, -1).clone()}  # (B, N)

    def normed(self, x: Tensor) -> Tensor:
        """LayerNorm of ``x``, pre-scaled so rows up to fp32's largest values cannot overflow
        its variance (LayerNorm is scale-invariant up to its eps)."""
        return self.norm(x / x.detach().abs().amax(-1, keepdim=True).clamp_min(1.0))

    def integrate(self, theta: Tensor, rate: Tensor, coupling: Tensor, f_re: Tensor, f_im: Tensor) -> Tensor:
        """The sequential part: phases after each token, (B, T, N). Inputs (B, T, N) except
        ``theta`` (B, N). Runs the fused kernel (:mod:`kssm_oscillators.fused`) when asked or,
        with ``kernel: auto``, for float32 on CUDA; else the reference loop below."""
        from kssm_oscillators import fused

        if self.kernel == "triton" or (self.kernel == "auto" and rate.dtype == torch.float32 and fused.can_fuse(rate)):
            horizon = self.grad_horizon if self.training else 0
            return fused.fused_integrate(theta, rate, coupling, f_re, f_im, self.dt, self.substeps, horizon, self.integrator)
        substep = split_substep if self.integrator == "split" else mean_field_substep
        out = []
        for t in range(rate.shape[1]):
            if self.grad_horizon and self.training and t % self.grad_horizon == 0 and t > 0:
                theta = theta.detach()  # truncated backprop through the (chaotic) phase recurrence
            r, k, fr, fi = rate[:, t], coupling[:, t], f_re[:, t], f_im[:, t]  # (B, N)
            for _ in range(self.substeps):
                theta = substep(theta, r, k, fr, fi, self.dt)
            theta = wrap_phase(theta)
            out.append(theta)
        return torch.stack(out, 1)  # (B, T, N)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        B, T, _ = x.shape
        N = self.N
        theta = state["theta"] if state else self.init_state(B, x.device)["theta"]
        drive = self.drive(self.normed(x))  # (B, T, 3N + 10): the whole sequence at once
        a, f_re, f_im, p = drive.split([N, N, N, 10], dim=-1)
        aux: Aux = {}
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # the recurrence never runs in half
        u, _, delta = bistable_terms(p.to(work), **self.bistable)  # (B, T)
        u = publish(aux, "kssm.u", u)
        publish(aux, "kssm.delta", delta)
        rate = self.omega.to(work) + a.to(work)  # (B, T, N)
        f_re, f_im = f_re.to(work), f_im.to(work)
        if self.log_gain is not None:
            gain = self.log_gain.to(work).exp()  # (N,)
            f_re, f_im = f_re * gain, f_im * gain
        coupling = self.coupling.to(work) * u.unsqueeze(-1)  # (B, T, N)
        thetas = self.integrate(theta.to(work), rate, coupling, f_re, f_im)  # (B, T, N)
        new_state = {"theta": thetas[:, -1]}
        read = publish(aux, "kssm.theta", thetas)
        R, cos_psi, sin_psi = order_parameters(read, self.K, self.group_levels)  # (B, T, G, K)
        R = publish(aux, "kssm.R", R)
        psi = publish(aux, "kssm.psi", torch.atan2(sin_psi, cos_psi))
        if self.readout == "full":
            feat = torch.cat([R, R * torch.cos(psi), R * torch.sin(psi)], -1).view(B, T, -1)  # (B, T, 3GK)
        else:
            feat = R.index_select(2, self.read_groups).reshape(B, T, -1)  # (B, T, G_read K): magnitudes only
        y = self.readout_lin(feat)
        if self.readout_mlp is not None:
            y = y + self.readout_mlp(feat)
        return y.to(x.dtype), new_state, aux

    def step(self, x_t: Tensor, state: State | None = None) -> tuple[Tensor, State, Aux]:
        y, new_state, aux = self.forward(x_t.unsqueeze(1), state)  # (B, 1, D): the same math, one token
        return y.squeeze(1), new_state, {k: v.squeeze(1) for k, v in aux.items()}


class KSSM(Backbone):
    """A stack of :class:`KuramotoLayer` and a final LayerNorm. Not steerable: a planner's
    gated interpolation of phases is not meaningful on the circle, so no injectable keys."""

    def __init__(self, d_model: int, n_layers: int = 4, **layer_kw) -> None:
        super().__init__(d_model)
        self.layers = nn.ModuleList([KuramotoLayer(d_model, seed=i, **layer_kw) for i in range(n_layers)])
        self.final_norm = nn.LayerNorm(d_model)

    def training_callbacks(self) -> list:
        """Everything the trainer logs goes to ``metrics.jsonl`` too, for ``statelab monitor``."""
        from statelab.monitor import MetricsFile

        return [MetricsFile()]


def build(params, ctx) -> KSSM:
    kw = params.model_dump()
    n_layers = kw.pop("n_layers")
    return KSSM(ctx.d_model, n_layers, **kw)


__all__ = ["KSSM", "KuramotoLayer", "build", "mean_field_substep", "order_parameters", "wrap_phase"]
