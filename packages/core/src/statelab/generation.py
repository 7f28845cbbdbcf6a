"""Text generation: prefill with ``forward``, then one ``step`` per token.

Prompts of different lengths. Left padding is wrong for a recurrent state (the pad tokens
would be folded into it), and right padding would make rows disagree about where
generation starts. So the batch is prefilled with ``forward`` over the length ``L0`` that
*all* prompts share, and from there every row advances one token per ``step``: a row still
inside its prompt is fed its next prompt token (teacher forcing through ``step``, which
equals ``forward`` by the state contract), a row past its prompt is fed the token just
sampled for it. Rows stay aligned, so states of any shape (recurrent states, KV caches)
remain batchable. A row stops at ``max_new_tokens`` or at a stop string; the batch stops
when every row has.

Hooks (:class:`~statelab.interfaces.StepContext`) run after the prefill and after every
``step``, before the next token is chosen; a hook may return a new state. When the model has
a planner and ``use_planner`` is true, the planner's ``generation_hook(model)`` is added.
After the last step every hook is called once more with ``finished=True``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from statelab.interfaces import GenerationHook, State, StepContext

__all__ = ["GenerationResult", "generate", "sample_next"]

_generation_ids = itertools.count(1)


@dataclass
class GenerationResult:
    """``texts[b]``: the generated continuation of prompt ``b`` (without the prompt, cut
    before a stop string); ``tokens[b]``: its token ids (through the token that completed the
    stop string, if any); ``state``: the model state after the last step; ``stats``:
    ``tokens_per_s``, ``step_times_s`` (wall time of each decoding step, hooks included),
    ``prefill_s``, ``new_tokens``, ``generation_id``, ``stopped`` (per row: "stop" or "length")."""

    texts: list[str]
    tokens: list[list[int]]
    state: State
    stats: dict[str, Any] = field(default_factory=dict)


def sample_next(
    logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token ``(B,)`` from ``logits (B, V)``. ``temperature <= 0`` is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _as_token_lists(prompts: Any, tokenizer: Any) -> tuple[list[list[int]], bool]:
    """Normalise prompts to a list of id lists; the bool says whether they were text."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = prompts.unsqueeze(0)
        return [row.tolist() for row in prompts], False
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate: no prompts given")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("generate: text prompts need a tokenizer (pass tokenizer=, or load the model with "
                             "statelab.load)")
        return [tokenizer.encode(p) for p in prompts], True
    return [list(map(int, p)) for p in prompts], False


def generate(
    model: Any,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | Tensor,
    *,
    tokenizer: Any = None,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    hooks: Sequence[GenerationHook] = (),
    use_planner: bool = True,
    state: State | None = None,
) -> GenerationResult:
    """Continue each prompt by up to ``max_new_tokens`` tokens (see the module docstring).

    ``prompts``: a string, a list of strings (needs ``tokenizer`` or ``model.tokenizer``),
    a list of token-id lists, or a ``(B, T)`` tensor. ``state``: an initial state for the
    batch (default: ``model.init_state``). ``seed`` makes sampling reproducible.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    ids, _ = _as_token_lists(prompts, tokenizer)
    if any(len(p) == 0 for p in ids):
        raise ValueError("generate: every prompt needs at least one token (an empty string encodes to nothing)")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if stops and tokenizer is None:
        raise ValueError("generate: stop strings need a tokenizer to decode the output")
    device = next(model.parameters()).device
    B = len(ids)
    lens = [len(p) for p in ids]
    L0, Lmax = min(lens), max(lens)
    prompt = torch.zeros(B, Lmax, dtype=torch.long)
    for b, p in enumerate(ids):
        prompt[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    prompt = prompt.to(device)  # (B, Lmax), rows padded past their own length (never read)
    lens_t = torch.tensor(lens, device=device)

    gen_id = next(_generation_ids)
    all_hooks = list(hooks)
    planner = getattr(model, "planner", None)
    if use_planner and planner is not None:
        h = planner.generation_hook(model)
        if h is not None:
            all_hooks.append(h)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in range(B)]
    done = [max_new_tokens <= 0] * B
    stopped = ["length"] * B
    step_times: list[float] = []
    # tokens fed after the shared prefix: a preallocated buffer, so hooks get a view (B, n)
    # in O(1) rather than a re-stacked copy every step
    fed = torch.empty(B, max(0, Lmax - L0) + max(0, max_new_tokens), dtype=torch.long, device=device)
    n_fed = 0
    max_stop = max((len(s) for s in stops), default=0)
    stats: dict[str, Any] = {"generation_id": gen_id}
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            logits, st, _ = model(prompt[:, :L0], state)  # (B, L0, V)
            logits = logits[:, -1]  # (B, V)
            if device.type == "cuda":  # this stream only: a planner's side stream must not block generation
                torch.cuda.current_stream(device).synchronize()
            stats["prefill_s"] = time.perf_counter() - t0
            pos = L0  # position of the next token to feed (absolute)
            step = 0
            t_start = time.perf_counter()
            while True:
                t_step = time.perf_counter()
                st = _run_hooks(all_hooks, model, step, gen_id, fed[:, :n_fed], logits, st, stats, finished=False)
                nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                in_prompt = lens_t > pos  # (B,) rows still consuming their prompt
                if bool(in_prompt.any()):
                    nxt = torch.where(in_prompt, prompt[:, min(pos, Lmax - 1)], nxt)
                nxt_host = nxt.tolist()
                in_prompt_host = in_prompt.tolist()
                for b in range(B):
                    if in_prompt_host[b] or done[b]:
                        continue
                    out[b].append(nxt_host[b])
                    if stops:
                        tail = tokenizer.decode(out[b][-(4 * max_stop + 1):])
                        if any(s in tail for s in stops):
                            done[b], stopped[b] = True, "stop"
                    if len(out[b]) >= max_new_tokens:
                        done[b] = True
                if all(done):
                    step_times.append(time.perf_counter() - t_step)
                    break
                fed[:, n_fed] = nxt
                n_fed += 1
                logits, st, _ = model.step(nxt, st)  # (B, V)
                pos += 1
                step += 1
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
                step_times.append(time.perf_counter() - t_step)
            elapsed = time.perf_counter() - t_start
            st = _run_hooks(all_hooks, model, step, gen_id, fed[:, :n_fed], logits, st, stats, finished=True)
    finally:
        model.train(was_training)

    texts = []
    for b in range(B):
        text = tokenizer.decode(out[b]) if tokenizer is not None else ""
        if stopped[b] == "stop":
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        texts.append(text)
    n_new = sum(len(o) for o in out)
    stats.update(
        tokens_per_s=n_new / elapsed if elapsed > 0 else float("inf"),
        step_times_s=step_times,
        new_tokens=n_new,
        stopped=stopped,
        elapsed_s=elapsed,
    )
    return GenerationResult(texts, out, st, stats)


def _run_hooks(
    hooks: list[GenerationHook], model: Any, step: int, gen_id: int, tokens: Tensor, logits: Tensor,
    state: State, stats: dict[str, Any], *, finished: bool,
) -> State:
    if not hooks:
        return state
    for hook in hooks:
        ctx = StepContext(model=model, step=step, generation_id=gen_id, tokens=tokens, logits=logits, state=state,
                          finished=finished, stats=stats)
        new = hook(ctx)
        if new is not None and not finished:
            state = new
    return state
