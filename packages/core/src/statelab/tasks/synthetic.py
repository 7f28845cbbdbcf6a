"""``copy`` (selective copying) and ``induction`` tasks over :mod:`statelab.data.synthetic`."""

from __future__ import annotations

from functools import partial

from statelab.data.synthetic import SyntheticData, copy_examples, induction_examples
from statelab.interfaces import Metric, Task, TaskContext, TaskResult
from statelab.tasks import masked_eval

_METRICS = (
    Metric("accuracy", True, "share of answer tokens predicted exactly (argmax)"),
    Metric("example_accuracy", True, "share of examples whose whole answer is right"),
    Metric("loss", False, "cross-entropy on the answer tokens, nats"),
)


class _MaskedTask(Task):
    metrics = _METRICS
    primary = "accuracy"

    def example_len(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec_overrides(self):
        return {**super().spec_overrides(), "train.seq_len": self.example_len()}

    def evaluate(self, model, data, ctx: TaskContext) -> TaskResult:
        res = masked_eval(model, data.val_batches(self.params.eval_batch_size, self.example_len()), ctx.device)
        per = res["example_accuracy"]
        return TaskResult(
            {"accuracy": res["accuracy"], "example_accuracy": sum(per) / len(per), "loss": res["loss"]},
            samples={"example_accuracy": per},
        )


class CopyTask(_MaskedTask):
    """Selective copying: ``num_tokens`` data tokens among ``context_len`` positions, copied
    after a separator (see :mod:`statelab.data.synthetic`)."""

    def example_len(self) -> int:
        return self.params.context_len + self.params.num_tokens

    def make_data(self, spec, seed: int) -> SyntheticData:
        p = self.params
        gen = partial(copy_examples, vocab_size=p.vocab_size, context_len=p.context_len, num_tokens=p.num_tokens)
        return SyntheticData("copy", gen, vocab_size=p.vocab_size, example_len=self.example_len(),
                             num_train=p.num_train, num_val=p.num_val, seed=seed)


class InductionTask(_MaskedTask):
    """Induction: after ``T v ... T`` predict ``v`` (see :mod:`statelab.data.synthetic`)."""

    def example_len(self) -> int:
        return self.params.seq_len

    def make_data(self, spec, seed: int) -> SyntheticData:
        p = self.params
        gen = partial(induction_examples, vocab_size=p.vocab_size, seq_len=p.seq_len)
        return SyntheticData("induction", gen, vocab_size=p.vocab_size, example_len=p.seq_len,
                             num_train=p.num_train, num_val=p.num_val, seed=seed)


def build_copy(params, ctx) -> CopyTask:
    return CopyTask(params)


def build_induction(params, ctx) -> InductionTask:
    return InductionTask(params)
