"""The backbone's training-time callback: the per-optimizer-step schedule and the path trie's state.

Before the first micro-batch of optimizer step ``s`` (1, 2, ...) it calls
:meth:`~traces_crystallize.transformer.TransformerBackbone.begin_step` with ``s`` and, on a
capture step, the layer-0 input of the micro-batch's first ``traces.capture_rows`` rows
(the token embedding, without dropout). Only that first micro-batch logs routing paths, so
with ``train.grad_accum`` 1, 2 or 4 the step counter, the alpha warm-up, the captures and
the path logging advance once per optimizer step alike. Its state is the path trie (counts,
utility, entropy and first-seen step of every node: the motif ages), saved with every
checkpoint and restored by ``--resume`` and ``statelab.load``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from statelab.callbacks import Callback, MicroBatch


class BackboneSchedule(Callback):
    name = "schedule"

    def __init__(self, backbone: Any) -> None:
        self._backbone = [backbone]  # a list: the backbone owns this object, not the reverse

    @property
    def backbone(self) -> Any:
        return self._backbone[0]

    def on_micro_batch_start(self, trainer: Any, mb: MicroBatch) -> None:
        bb = self.backbone
        if mb.index > 0:
            bb.end_logging()
            return
        step = trainer.step + 1
        x = None
        if bb.is_capture_step(step):
            with torch.no_grad():
                x = trainer.model.embed(mb.x[: bb.params.traces.capture_rows])  # (rows, T, D)
        bb.begin_step(step, x)

    def on_micro_batch_end(self, trainer: Any, mb: MicroBatch) -> None:
        self.backbone.end_logging()

    def state_dict(self) -> dict[str, Any]:
        trie = self.backbone.trie
        return {} if trie is None else {f"trie.{k}": v for k, v in trie.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        trie = self.backbone.trie
        if trie is not None and state:
            trie.load_state_dict({k[len("trie."):]: v for k, v in state.items() if k.startswith("trie.")})
