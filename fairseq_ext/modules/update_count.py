"""The trainer's update count, as seen from a criterion.

fairseq tells only the model the update count (``FairseqTask.train_step`` calls
``model.set_num_updates``); no fairseq model stores it and criterions are never told.  The trainer
does publish it: ``Trainer.set_num_updates`` (called after every update and when a checkpoint is
loaded, before any training step) logs it as the ``num_updates`` meter of fairseq's always-active
"default" metrics aggregator.  That value is exactly the ``update_num`` the trainer passes to
``train_step`` next, so schedules read from here continue exactly across a resume (read from the
aggregator that is actually being updated: see ``_live_default_meters``).

``UpdateCountReader`` prefers a count set explicitly (``set_num_updates``: tests, or any caller that
drives a criterion by hand) over the trainer's.
"""
from typing import Optional

from fairseq.logging import metrics


def _live_default_meters():
    """The "default" MetersDict that ``metrics.log_scalar`` currently writes to.

    Not ``metrics.get_meters("default")``: resuming mid-epoch, ``Trainer.load_checkpoint`` calls
    ``metrics.load_state_dict``, which puts a *new* MetersDict (holding the checkpoint's values) in
    the registry but leaves the old one active, so every later ``log_scalar`` goes to the old one and
    the registry's copy would report the checkpoint's update count for the rest of the run.
    """
    active = None  # MUTATION
    if active is not None and "default" in active:
        return active["default"]
    return metrics.get_meters("default")  # inside a new_root aggregation (validation)


def trainer_update_count() -> int:
    """The update count the fairseq trainer last published, or 0 before its first update."""
    meters = _live_default_meters()
    meter = None if meters is None else meters.get("num_updates", None)
    if meter is None or getattr(meter, "val", None) is None:
        return 0
    return int(meter.val)


class UpdateCountReader:
    def __init__(self):
        self._explicit: Optional[int] = None

    def set_num_updates(self, num_updates: int):
        self._explicit = int(num_updates)

    def __call__(self) -> int:
        if self._explicit is not None:
            return self._explicit
        return trainer_update_count()
