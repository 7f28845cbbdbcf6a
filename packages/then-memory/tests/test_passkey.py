import torch
from torch import nn

import statelab
from statelab.interfaces import ProbeContext
from statelab.tokenizers import ByteTokenizer
from then_memory.passkey import PasskeyProbe
from then_memory.plugin import PasskeyParams

TRIGGER = b"pass key is "
QUESTION_END = b"key? The pass key is"


class Oracle(nn.Module):
    """A byte-level 'model' that reads the pass key into its state and recites it when asked.
    With ``forgetful`` it drops the incoming state, so it can only answer from its prompt."""

    vocab_size = 256
    planner = None

    def __init__(self, forgetful=False):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.forgetful = forgetful

    def init_state(self, B, device=None):
        return {"tail": torch.zeros(B, 24, dtype=torch.long), "key": torch.full((B, 12), -1), "klen": torch.zeros(B, dtype=torch.long),
                "reading": torch.zeros(B, dtype=torch.long), "ans": torch.full((B,), -1)}

    def _tok(self, s, b, c):
        s["tail"][b] = torch.cat([s["tail"][b, 1:], torch.tensor([c])])
        tail = bytes(s["tail"][b].tolist())
        if s["ans"][b] >= 0:
            s["ans"][b] += 1
        if s["reading"][b]:
            if chr(c).isdigit():
                s["key"][b, s["klen"][b]] = c
                s["klen"][b] += 1
            else:
                s["reading"][b] = 0
        if tail.endswith(TRIGGER) and s["klen"][b] == 0:
            s["reading"][b] = 1
        if tail.endswith(QUESTION_END) and s["klen"][b] > 0:
            s["ans"][b] = 0
        logits = torch.zeros(256)
        a = int(s["ans"][b])
        nxt = ord(".") if a < 0 else (ord(" ") if a == 0 else (int(s["key"][b, a - 1]) if a - 1 < s["klen"][b] else ord(".")))
        logits[nxt] = 1.0
        return logits

    def forward(self, tokens, state=None):
        B, T = tokens.shape
        s = self.init_state(B) if state is None or self.forgetful else {k: v.clone() for k, v in state.items()}
        out = torch.stack([torch.stack([self._tok(s, b, int(tokens[b, t])) for t in range(T)]) for b in range(B)])
        return out, s, {}

    def hidden(self, tokens, state=None):
        return self.forward(tokens, state)

    def step(self, tokens, state=None):
        logits, s, aux = self.forward(tokens[:, None], state)
        return logits[:, 0], s, aux


def params(**kw):
    args = dict(lengths=[112, 160], depths=[0.0, 0.5, 1.0], trials=3, batch_size=2, segment_len=40)
    args.update(kw)
    return PasskeyParams(**args)


def test_oracle_reading_from_memory_scores_perfectly(tmp_path):
    res = PasskeyProbe(params()).run(Oracle(), ProbeContext(tokenizer=ByteTokenizer(), out_dir=tmp_path, seed=3))
    assert res.metrics["acc"] == 1.0 and res.metrics["acc@160@0.5"] == 1.0
    assert res.passed is True and res.verdict == "retrieves"
    assert res.artifacts["heatmap"].stat().st_size > 0
    table = res.artifacts["table"].read_text()
    assert "| 112 | 1.00 | 1.00 | 1.00 | 1.00 |" in table


def test_the_question_alone_does_not_contain_the_key(tmp_path):
    res = PasskeyProbe(params()).run(Oracle(forgetful=True), ProbeContext(tokenizer=ByteTokenizer(), out_dir=tmp_path))
    assert res.metrics["acc"] == 0.0 and res.passed is False and res.verdict == "fails"


def test_runs_on_a_then_model(tmp_path, registry, then_spec):
    model = statelab.build(then_spec(), registry=registry)
    res = PasskeyProbe(params(lengths=[128], depths=[0.5], trials=2)).run(
        model, ProbeContext(tokenizer=ByteTokenizer(), out_dir=tmp_path))
    assert 0.0 <= res.metrics["acc@128"] <= 1.0 and res.metrics["pass_length"] == 128
    assert model.training  # left in the mode it was found in


def test_registered_and_buildable(registry, then_spec):
    spec = then_spec()
    spec["probes"] = [{"kind": "passkey", "lengths": [128], "trials": 1}]
    model = statelab.build(spec, registry=registry)
    probe = statelab.make_probe("passkey", {"lengths": [128]}, model, registry=registry)
    assert isinstance(probe, PasskeyProbe)
