"""The ``mqar`` task: Zoology's multi-query associative recall protocol.

Zoology (Arora et al., 2023) trains each model on each ``(seq_len, num_kv_pairs)`` cell --
(64, 4), (128, 8), (256, 16), (512, 64) -- with vocabulary 8192 and 100,000 training examples
per cell, stops early once validation accuracy reaches 0.99, sweeps the learning rate and
reports the best accuracy over the sweep (:func:`statelab.stats.best_over_grid` over seeds),
next to the model's state size. This task makes one cell's data and scores a trained model:
``accuracy`` over the query tokens of the validation examples and ``state_bytes``, the bytes
of one row's state after reading an example (:func:`statelab.tasks.state_bytes`).
``early_stop`` is applied by ``statelab bench``.
"""

from __future__ import annotations

from statelab.data.mqar import MQARData
from statelab.interfaces import Metric, Task, TaskContext, TaskResult
from statelab.tasks import masked_eval, state_bytes

#: Zoology's (seq_len, num_kv_pairs) cells
ZOOLOGY_CELLS = ((64, 4), (128, 8), (256, 16), (512, 64))


class MQARTask(Task):
    metrics = (
        Metric("accuracy", True, "share of query tokens whose value is predicted exactly"),
        Metric("loss", False, "cross-entropy on the query tokens, nats"),
        Metric("state_bytes", False, "bytes of one row's state after one example"),
    )
    primary = "accuracy"

    def _data_spec(self):
        from statelab.spec import MQARSpec

        p = self.params
        return MQARSpec(vocab_size=p.vocab_size, seq_len=p.seq_len, num_kv_pairs=p.num_kv_pairs, power_a=p.power_a,
                        num_train=p.num_train, num_val=p.num_val)

    def spec_overrides(self):
        return {"data.kind": "mqar", "data.mqar": self._data_spec().model_dump(), "train.seq_len": self.params.seq_len}

    def make_data(self, spec, seed: int) -> MQARData:
        return MQARData(self._data_spec(), seed=seed)

    def evaluate(self, model, data, ctx: TaskContext) -> TaskResult:
        p = self.params
        res = masked_eval(model, data.val_batches(p.eval_batch_size, p.seq_len), ctx.device)
        per = res["example_accuracy"]
        return TaskResult(
            {"accuracy": res["accuracy"], "loss": res["loss"],
             "state_bytes": float(state_bytes(model, p.seq_len, ctx.device))},
            samples={"example_accuracy": per},
        )


def build_mqar(params, ctx) -> MQARTask:
    return MQARTask(params)
