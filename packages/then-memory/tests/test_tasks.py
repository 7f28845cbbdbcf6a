import pytest
import torch

from statelab.tokenizers import ByteTokenizer
from then_memory.plugin import FactQAParams
from then_memory.tasks import FactDocsData


def test_fact_rows_end_with_a_document_and_count_only_answers():
    tok = ByteTokenizer()
    data = FactDocsData(tok, FactQAParams(), seed=0)
    b = data.train_batch(3, 4, 256)
    assert b.x.shape == b.y.shape == b.mask.shape == (4, 256)
    assert torch.equal(b.x, data.train_batch(3, 4, 256).x)  # a pure function of (seed, step)
    for i in range(4):
        text = tok.decode(b.x[i].tolist() + [int(b.y[i, -1])])
        assert text.endswith(".\n") and "\nA: " in text
        counted = "".join(tok.decode([int(t)]) for t, m in zip(b.y[i], b.mask[i]) if m)
        answers = [line[3:] + "\n" for line in text.split("\n") if line.startswith("A: ")]
        assert counted == "".join(answers)  # the answers' bodies and their end markers, nothing else
    every = FactDocsData(tok, FactQAParams(loss_on="all"), seed=0).train_batch(3, 4, 256)
    assert bool(every.mask.all())
    vals = FactDocsData(tok, FactQAParams(loss_on="values"), seed=0).train_batch(3, 4, 256)
    counted = "".join(tok.decode([int(t)]) for t, m in zip(vals.y[0], vals.mask[0]) if m)
    text = tok.decode(vals.x[0].tolist() + [int(vals.y[0, -1])])
    assert counted == "".join(line.rsplit(" ", 1)[1] + "\n" for line in text.split("\n") if line.startswith("A: "))


def test_tasks_are_registered_and_refuse_other_tokenizers():
    from statelab.data import DataError
    from statelab.spec import parse_spec
    from statelab.tasks import make_task

    for kind in ("fact-qa", "personality", "user-log"):
        task = make_task(kind, {"eval_docs": 2})
        assert task.primary == "accuracy" and task.spec_overrides()["data.kind"] == kind
    spec = parse_spec({"name": "x", "tokenizer": {"kind": "char"}, "data": {"kind": "fact-qa"},
                       "model": {"d_model": 16, "vocab_size": 300, "backbone": {"kind": "mamba", "mixer": "mamba1"}},
                       "tracking": {"enabled": False}})
    with pytest.raises(DataError, match="tokenizer: {kind: byte}"):
        make_task("fact-qa").make_data(spec, 0)
