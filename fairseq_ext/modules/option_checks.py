"""Checks of option values that several components share, raised before any training step.

Each check names the flag and says what to do, so an impossible setting never reaches an update.
"""


def check_label_smoothing(epsilon: float, flag: str = "--label-smoothing") -> None:
    """Refuse a label smoothing outside [0, 1): 1 or more puts no mass on the gold token, a negative one is not
    a distribution (fairseq's label_smoothed_nll_loss accepts both silently)."""
    if not 0.0 <= float(epsilon) < 1.0:
        raise ValueError(
            f"{flag} {epsilon} is outside [0, 1): it is the probability mass spread over the vocabulary "
            f"(0 = none, as in plain cross-entropy; 0.1 is usual); pass a value in [0, 1)"
        )
