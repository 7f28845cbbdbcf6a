"""The conformance kit: the same checks for every Backbone, Memory and assembled model.

Use it from a plugin's tests::

    from statelab.testing import check_backbone

    def test_conformance():
        check_backbone(lambda: MyBackbone(d_model=32, n_layers=2), d_model=32)

Each ``check_*`` function runs every applicable check and raises ``AssertionError`` with a
message naming the check that failed and by how much. Individual checks are public too.
Tolerances default to fp32 values; pass ``atol``/``rtol`` for modules whose fast and
step paths differ by more (document why in the test).

Sequence lengths default to :func:`default_length`: several chunks of the module's largest
``chunk_size`` plus a remainder, so chunked fast paths are checked across chunk
boundaries. Every check that hands a state to the module also checks that the module
left it untouched: a state is a value, and a module that updates it in place corrupts
the caller's copy (a planner's snapshot, a resumed stream).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from statelab.interfaces import Backbone, Memory, State, StatefulModule
from statelab.internals import key_name

__all__ = [
    "assert_close",
    "check_backbone",
    "check_batch_independence",
    "check_causality",
    "check_chunked_forward",
    "check_determinism",
    "check_forward_then_step",
    "check_gradients",
    "check_injection",
    "check_memory",
    "check_model",
    "check_publishes",
    "check_shapes",
    "check_state_roundtrip",
    "check_stateful_module",
    "default_length",
    "state_roundtrip",
]


def assert_close(actual: Tensor, expected: Tensor, *, atol: float, rtol: float, what: str) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    diff = (actual.float() - expected.float()).abs()
    tol = atol + rtol * expected.float().abs()
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{what}: non-finite values")
    if (diff > tol).any():
        raise AssertionError(f"{what}: max abs diff {diff.max().item():.3e} exceeds atol={atol:g} rtol={rtol:g}")


def _assert_states_close(a: State, b: State, *, atol: float, rtol: float, what: str) -> None:
    if set(a) != set(b):
        raise AssertionError(f"{what}: state keys differ: {sorted(set(a) ^ set(b))}")
    for k in a:
        assert_close(a[k], b[k], atol=atol, rtol=rtol, what=f"{what} [state {k!r}]")


def default_length(module: nn.Module, chunks: int = 2) -> int:
    """A sequence length that crosses chunk boundaries: ``chunks`` chunks of the largest
    ``chunk_size`` attribute among the module's submodules, plus a remainder (at least 12)."""
    sizes = [m.chunk_size for m in module.modules() if isinstance(getattr(m, "chunk_size", None), int)]
    c = max(sizes, default=4)
    return max(12, chunks * c + c // 2 + 1)


def _snapshot(state: State | None) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in (state or {}).items()}


def _assert_untouched(before: dict[str, Tensor], state: State | None, what: str) -> None:
    """``state`` still holds the values snapshotted in ``before`` (no in-place update)."""
    for k, v in before.items():
        if not torch.equal((state or {})[k].detach(), v):
            raise AssertionError(f"{what} modified its incoming state in place (entry {k!r}); return a new tensor "
                                 "instead (e.g. `h = a * h + u`, not `h.mul_(a).add_(u)`)")


def state_roundtrip(state: State) -> State:
    """Save a state with safetensors and load it back (contiguous copies)."""
    blob = save({k: v.detach().contiguous() for k, v in state.items()})
    return load(blob)


def _inputs(batch: int, T: int, d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, T, d, generator=g)


def check_shapes(module: StatefulModule, d_model: int, batch: int = 2, T: int = 8) -> None:
    x = _inputs(batch, T, d_model, 0)
    state0 = module.init_state(batch, x.device, None)
    for k, v in state0.items():
        if not isinstance(v, Tensor):
            raise AssertionError(f"shapes: init_state()[{k!r}] is {type(v).__name__}, not a Tensor")
        if v.dim() == 0 or v.shape[0] != batch:
            raise AssertionError(f"shapes: init_state()[{k!r}] has shape {tuple(v.shape)}; the first dim must be the batch ({batch})")
    y, state, aux = module(x, None)
    if tuple(y.shape) != (batch, T, d_model):
        raise AssertionError(f"shapes: forward returned {tuple(y.shape)}, expected {(batch, T, d_model)}")
    if set(state) != set(state0):
        raise AssertionError(f"shapes: forward's state keys {sorted(state)} differ from init_state's {sorted(state0)}")
    for k, v in state.items():
        if v.shape[0] != batch:
            raise AssertionError(f"shapes: state[{k!r}] first dim {v.shape[0]} != batch {batch}")
    if not isinstance(aux, dict):
        raise AssertionError("shapes: aux must be a dict of named tensors")
    y_t, state_t, _ = module.step(x[:, 0], None)
    if tuple(y_t.shape) != (batch, d_model):
        raise AssertionError(f"shapes: step returned {tuple(y_t.shape)}, expected {(batch, d_model)}")


def check_causality(module: StatefulModule, d_model: int, T: int | None = None, t0: int | None = None,
                    atol: float = 1e-5) -> None:
    """Changing inputs at positions >= t0 leaves outputs before t0 unchanged."""
    T = T or default_length(module)
    t0 = t0 if t0 is not None else T // 2 - 1
    x = _inputs(2, T, d_model, 1)
    x2 = x.clone()
    x2[:, t0:] = torch.randn_like(x2[:, t0:]) * 3.0
    y1, _, _ = module(x, None)
    y2, _, _ = module(x2, None)
    assert_close(y2[:, :t0], y1[:, :t0], atol=atol, rtol=0, what=f"causality (outputs before t={t0})")
    if torch.allclose(y1[:, t0:], y2[:, t0:]):
        raise AssertionError("causality: outputs after the change did not change at all; the module ignores its input")


def check_forward_then_step(
    module: StatefulModule, d_model: int, T: int | None = None, prefix: int | None = None, atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """forward(prefix) then step per token == forward(whole), outputs and final state;
    ``step`` leaves its incoming state untouched."""
    T = T or default_length(module)
    prefix = prefix if prefix is not None else T // 2 - 1
    x = _inputs(2, T, d_model, 2)
    y_full, s_full, _ = module(x, None)
    y_pre, s, _ = module(x[:, :prefix], None)
    outs = [y_pre]
    for t in range(prefix, T):
        before = _snapshot(s)
        y_t, s_next, _ = module.step(x[:, t], s)
        _assert_untouched(before, s, f"step (t={t})")
        s = s_next
        outs.append(y_t.unsqueeze(1))
    assert_close(torch.cat(outs, 1), y_full, atol=atol, rtol=rtol, what="forward-then-step outputs")
    _assert_states_close(s, s_full, atol=atol, rtol=rtol, what="forward-then-step final state")


def check_chunked_forward(module: StatefulModule, d_model: int, T: int | None = None, split: int | None = None,
                          atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """forward(x[:split]) then forward(x[split:], state) == forward(x): a non-empty initial
    state works, and forward leaves it untouched."""
    T = T or default_length(module)
    split = split if split is not None else T // 2 + 1
    x = _inputs(2, T, d_model, 3)
    y_full, s_full, _ = module(x, None)
    y1, s1, _ = module(x[:, :split], None)
    before = _snapshot(s1)
    y2, s2, _ = module(x[:, split:], s1)
    _assert_untouched(before, s1, "forward")
    assert_close(torch.cat([y1, y2], 1), y_full, atol=atol, rtol=rtol, what="chunked forward outputs")
    _assert_states_close(s2, s_full, atol=atol, rtol=rtol, what="chunked forward final state")


def check_state_roundtrip(module: StatefulModule, d_model: int, T: int = 8, atol: float = 0.0) -> None:
    """A state saved with safetensors and loaded back continues identically."""
    x = _inputs(2, T, d_model, 4)
    _, s, _ = module(x[:, : T // 2], None)
    s2 = state_roundtrip(s)
    for k in s:
        if not torch.equal(s[k].detach().cpu(), s2[k]):
            raise AssertionError(f"state roundtrip: entry {k!r} changed through safetensors")
    ya, _, _ = module(x[:, T // 2 :], s)
    yb, _, _ = module(x[:, T // 2 :], s2)
    assert_close(yb, ya, atol=max(atol, 1e-6), rtol=0, what="state roundtrip continuation")


def check_gradients(module: nn.Module, run: Callable[[], Tensor], allow_unused: Iterable[str] = ()) -> None:
    """Every trainable parameter gets a finite, non-zero gradient from ``run()``'s output."""
    module.zero_grad(set_to_none=True)
    out = run()
    (out.float().pow(2).mean()).backward()
    allowed = tuple(allow_unused)
    missing = []
    for name, p in module.named_parameters():
        if not p.requires_grad or any(a in name for a in allowed):
            continue
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0:
            missing.append(name)
    module.zero_grad(set_to_none=True)
    if missing:
        raise AssertionError(f"gradients: no (or non-finite) gradient reaches {missing}")


def check_batch_independence(module: StatefulModule, d_model: int, T: int = 8, atol: float = 1e-5) -> None:
    """Row 0's output does not depend on row 1's input."""
    x = _inputs(3, T, d_model, 5)
    x2 = x.clone()
    x2[1:] = torch.randn_like(x2[1:])
    y1, s1, _ = module(x, None)
    y2, s2, _ = module(x2, None)
    assert_close(y2[0], y1[0], atol=atol, rtol=1e-5, what="batch independence (row 0 output)")
    for k in s1:
        assert_close(s2[k][0], s1[k][0], atol=atol, rtol=1e-5, what=f"batch independence (row 0 state {k!r})")


def check_determinism(make: Callable[[], nn.Module], run: Callable[[nn.Module], Tensor], seed: int = 123) -> None:
    """Building under the same seed gives the same parameters and outputs."""
    torch.manual_seed(seed)
    a = make()
    torch.manual_seed(seed)
    b = make()
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if not torch.equal(sa[k], sb[k]):
            raise AssertionError(f"determinism: parameter {k!r} differs between two builds under seed {seed}")
    a.eval()
    b.eval()
    with torch.no_grad():
        ya, yb = run(a), run(b)
    if not torch.equal(ya, yb):
        raise AssertionError("determinism: outputs differ between two builds under the same seed")


def check_injection(backbone: Backbone, d_model: int, T: int = 6) -> None:
    """For steerable backbones: inject with a=0 is identity, a=1 reaches the target, a=0.5
    lands halfway, neither the state nor the target is modified in place, and decoding
    continues from the result."""
    keys = backbone.injectable_keys()
    if not keys:
        return
    x = _inputs(2, T, d_model, 6)
    _, s, _ = backbone(x, None)
    target = {k: torch.randn_like(s[k]) for k in keys}
    before, target_before = _snapshot(s), _snapshot(target)
    s0 = backbone.inject(s, target, 0.0)
    s1 = backbone.inject(s, target, 1.0)
    s_half = backbone.inject(s, target, torch.full((2,), 0.5))
    _assert_untouched(before, s, "inject")
    _assert_untouched(target_before, target, "inject (its target)")
    for k in keys:
        assert_close(s0[k], s[k], atol=0, rtol=0, what=f"injection a=0 [{k}]")
        assert_close(s1[k], target[k].to(s[k].dtype), atol=1e-6, rtol=0, what=f"injection a=1 [{k}]")
        assert_close(s_half[k], (0.5 * (s[k] + target[k])).to(s[k].dtype), atol=1e-5, rtol=1e-5,
                     what=f"injection a=0.5 [{k}]")
    y, _, _ = backbone.step(x[:, -1], s_half)
    if not torch.isfinite(y).all():
        raise AssertionError("injection: decoding after an injection produced non-finite values")


def check_stateful_module(
    make: Callable[[], StatefulModule],
    d_model: int,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    allow_unused: Iterable[str] = (),
    T: int | None = None,
    publishes: Iterable[str] | None = None,
) -> StatefulModule:
    """All checks that apply to any :class:`StatefulModule`. Returns the module checked.

    ``T``: default :func:`default_length`. ``publishes``: the internal names the module's
    component declares (its ``Component.published(params)``), checked by :func:`check_publishes`."""
    torch.manual_seed(0)
    module = make()
    module.eval()  # dropout off: the checks compare exact computations
    T = T or default_length(module)
    with torch.no_grad():
        if publishes is not None:
            check_publishes(module, publishes, d_model, T=T)
        check_shapes(module, d_model, T=min(T, 8))
        check_causality(module, d_model, T=T, t0=T // 2 - 1, atol=atol)
        check_forward_then_step(module, d_model, T=T, prefix=T // 2 - 1, atol=atol, rtol=rtol)
        check_chunked_forward(module, d_model, T=T, split=T // 2 + 1, atol=atol, rtol=rtol)
        check_state_roundtrip(module, d_model, T=min(T, 8), atol=atol)
        check_batch_independence(module, d_model, T=min(T, 8), atol=atol)
    x = _inputs(2, min(T, 8), d_model, 7)
    module.train()
    check_gradients(module, lambda: module(x, None)[0], allow_unused=allow_unused)
    module.eval()
    check_determinism(make, lambda m: m(x, None)[0])
    return module


def check_backbone(make: Callable[[], Backbone], d_model: int, **kw) -> Backbone:
    """:func:`check_stateful_module` plus the backbone structure and steering contract."""
    module = check_stateful_module(make, d_model, **kw)
    assert isinstance(module, Backbone), f"{type(module).__name__} is not a statelab.Backbone"
    if module.n_layers < 1:
        raise AssertionError("backbone: it has no layers")
    for i, layer in enumerate(module.layers):
        if not isinstance(layer, StatefulModule):
            raise AssertionError(f"backbone: layers[{i}] is {type(layer).__name__}, not a StatefulModule")
    with torch.no_grad():
        check_injection(module, d_model)
    return module


def check_memory(make: Callable[[], StatefulModule], d_model: int, **kw) -> StatefulModule:
    """:func:`check_stateful_module` for a :class:`Memory`, plus its ``ingest``: the state it
    returns equals forward's, it continues like forward's, and the incoming state is untouched."""
    module = check_stateful_module(make, d_model, **kw)
    if not isinstance(module, Memory):
        raise AssertionError(f"memory: {type(module).__name__} is not a statelab.Memory")
    atol, rtol = kw.get("atol", 1e-5), kw.get("rtol", 1e-4)
    T = kw.get("T") or default_length(module)
    x = _inputs(2, T, d_model, 8)
    split = T // 2 + 1
    with torch.no_grad():
        _, s_fwd, _ = module(x[:, :split], None)
        s_ing = module.ingest(x[:, :split], None)
        _assert_states_close(s_ing, s_fwd, atol=atol, rtol=rtol, what="ingest state (vs forward's)")
        before = _snapshot(s_ing)
        s_more = module.ingest(x[:, split:], s_ing)
        _assert_untouched(before, s_ing, "ingest")
        _, s_full, _ = module(x, None)
        _assert_states_close(s_more, s_full, atol=atol, rtol=rtol, what="ingest in two parts (vs forward of the whole)")
    return module


def check_publishes(module: StatefulModule, names: Iterable[str], d_model: int, T: int | None = None) -> None:
    """Every declared internal ``name`` appears in the module's ``aux`` (forward or step), so
    a regularizer or probe that validation accepted finds it at run time."""
    T = T or default_length(module)
    x = _inputs(2, T, d_model, 9)
    _, s, aux = module(x, None)
    seen = {key_name(k) for k in aux}
    seen |= {key_name(k) for k in module.step(x[:, -1], s)[2]}
    missing = sorted(set(names) - seen)
    if missing:
        raise AssertionError(f"publishes: declared {missing} but forward/step publish only {sorted(seen) or '(none)'}; "
                             "publish them with statelab.publish, or stop declaring them")


def check_model(make: Callable[[], nn.Module], *, T: int | None = None, atol: float = 1e-5, rtol: float = 1e-4,
                allow_unused: Iterable[str] = ()) -> None:
    """The checks on an assembled :class:`~statelab.model.StatelabModel` (token inputs); a
    model built from a spec also has every internal its backbone and memories declare
    (planners publish while generating, so theirs are not required here)."""
    torch.manual_seed(0)
    model = make()
    model.eval()
    T = T or default_length(model)
    V = model.vocab_size
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, V, (2, T), generator=g)
    with torch.no_grad():
        logits, s_full, _ = model(tok)
        if tuple(logits.shape) != (2, T, V):
            raise AssertionError(f"model shapes: logits {tuple(logits.shape)} != {(2, T, V)}")
        p = T // 2
        tok2 = tok.clone()
        tok2[:, p:] = torch.randint(0, V, (2, T - p), generator=g)
        l2, _, _ = model(tok2)
        assert_close(l2[:, :p], logits[:, :p], atol=atol, rtol=0, what="model causality")
        _, s, _ = model(tok[:, :p])
        outs = []
        for t in range(p, T):
            before = _snapshot(s)
            lt, s_next, _ = model.step(tok[:, t], s)
            _assert_untouched(before, s, f"model step (t={t})")
            s = s_next
            outs.append(lt.unsqueeze(1))
        assert_close(torch.cat(outs, 1), logits[:, p:], atol=atol, rtol=rtol, what="model forward-then-step")
        _assert_states_close(s, s_full, atol=atol, rtol=rtol, what="model forward-then-step state")
        s_rt = state_roundtrip(s)
        _assert_states_close(s_rt, {k: v.cpu() for k, v in s.items()}, atol=0, rtol=0, what="model state roundtrip")
        resolved = getattr(model, "resolved", None)
        if resolved is not None:
            _, _, aux = model(tok)
            seen = {key_name(k) for k in aux} | {key_name(k) for k in model.step(tok[:, -1], s)[2]}
            for rc in [resolved.backbone, *resolved.memories]:
                missing = sorted(set(rc.component.published(rc.params)) - seen)
                if missing:
                    raise AssertionError(f"model publishes: {rc.component.slot} {rc.component.name!r} declares {missing}, "
                                         f"which the model's forward/step never publish (seen: {sorted(seen)})")
    model.train()
    check_gradients(model, lambda: model(tok)[0], allow_unused=allow_unused)
    model.eval()
    check_determinism(make, lambda m: m(tok)[0])
