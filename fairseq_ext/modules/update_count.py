"""The trainer's update count, as seen from a criterion.

fairseq tells only the model the update count (``FairseqTask.train_step`` calls
``model.set_num_updates``); no fairseq model stores it and criterions are never told.  The trainer
does publish it: ``Trainer.set_num_updates`` (called after every update and when a checkpoint is
loaded, before any training step) logs it as the ``num_updates`` meter of fairseq's always-active
"default" metrics aggregator.  That value is exactly the ``update_num`` the trainer passes to
``train_step`` next, so schedules read from here continue exactly across a resume.

``UpdateCountReader`` prefers a count set explicitly (``set_num_updates``: tests, or any caller that
drives a criterion by hand) over the trainer's.
"""
from typing import Optional

from fairseq.logging import metrics


def trainer_update_count() -> int:
    """The update count the fairseq trainer last published, or 0 before its first update.

    Read from the *active* aggregators (``metrics.get_active_aggregators``), which are the ones
    ``log_scalar`` writes to, not from ``metrics.get_meters("default")``: resuming mid-epoch,
    ``Trainer.load_checkpoint`` calls ``metrics.load_state_dict``, which registers a *new* "default"
    MetersDict holding the checkpoint's values while the old one stays active and keeps receiving
    every later count, so the registry's copy would be stuck at the checkpoint's update count.
    During validation (a new-root aggregation) no active aggregator holds a count: 0 is returned,
    and validation is teacher-forced anyway.
    """
    counts = [
        int(meter.val)
        for meters in metrics.get_active_aggregators()
        for meter in [meters.get("num_updates", None)]
        if meter is not None and getattr(meter, "val", None) is not None
    ]
    return max(counts, default=0)


class UpdateCountReader:
    def __init__(self):
        self._explicit: Optional[int] = None

    def set_num_updates(self, num_updates: int):
        self._explicit = int(num_updates)

    def __call__(self) -> int:
        if self._explicit is not None:
            return self._explicit
        return trainer_update_count()
