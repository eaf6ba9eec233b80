"""Schedules of a mixing probability as a function of the trainer's update count.

Every schedule here is a pure function of the update count, so a run resumed from a checkpoint
(whose update count the trainer restores) continues the schedule exactly.

Value at update ``u`` with warm-up ``W`` (updates of pure teacher forcing), ramp length ``R`` and
maximum ``p_max``::

    p(u) = 0                                   if u < W
    p(u) = p_max * f(u - W)                    otherwise

with ``f`` one of

* ``constant``:        f(s) = 1
* ``exponential``:     f(s) = m ** ((R - s) / R) for s < R, else 1       (tensor2tensor "exp")
* ``linear``:          f(s) = m + (1 - m) * min(s / R, 1)                (tensor2tensor "linear")
* ``sigmoid``:         a logistic curve from m to 1 over R updates       (tensor2tensor "sigmoid")
* ``inverse_sigmoid``: f(s) = 1 - k / (k + exp(s / k))                   (Bengio et al. 2015)

where ``m = 0.001`` is tensor2tensor's starting fraction (``inverse_decay_mix_prob``'s
``min_value``).  tensor2tensor calls ``R`` its "warmup steps" (Parallel Scheduled Sampling paper,
Table 1 column "Warm-up Steps"); here "warm-up" means updates of pure teacher forcing before the
ramp starts, as in the paper's summarization runs ("teacher-forcing for the first 50% of training
steps as warm-up steps").  Bengio's inverse sigmoid decay is the probability ``k / (k + exp(s/k))``
of feeding the *gold* token; ``f`` above is its complement, the probability of the model's own.
"""
import math
from dataclasses import dataclass
from typing import Optional

from fairseq.dataclass import ChoiceEnum

SCHEDULE_CHOICES = ChoiceEnum(["constant", "exponential", "linear", "sigmoid", "inverse_sigmoid"])
RAMP_SCHEDULES = ("exponential", "linear", "sigmoid")

# tensor2tensor's min_value: the ramped schedules start at 0.1% of their maximum.
RAMP_START_FRACTION = 1e-3


def exponential_ramp(step: float, ramp: int, start: float = RAMP_START_FRACTION) -> float:
    if ramp <= 0 or step >= ramp:
        return 1.0
    return start ** ((ramp - step) / ramp)


def linear_ramp(step: float, ramp: int, start: float = RAMP_START_FRACTION) -> float:
    if ramp <= 0:
        return 1.0
    return start + (1.0 - start) * min(step / ramp, 1.0)


def sigmoid_ramp(step: float, ramp: int, start: float = RAMP_START_FRACTION) -> float:
    """Logistic curve through ``start`` at 0 and ``1 - start`` at ``ramp``, rescaled to [start, 1]."""
    if ramp <= 0 or step >= ramp:
        return 1.0
    lo = math.log(start / (1.0 - start))  # inverse sigmoid of `start`
    x = lo + (-2.0 * lo) * (step / ramp)
    s = 1.0 / (1.0 + math.exp(-x))
    return start + (s - start) * (1.0 - start) / (1.0 - 2.0 * start)


def inverse_sigmoid_gold_probability(step: float, k: float) -> float:
    """Bengio et al. (2015): probability of feeding the gold token, k / (k + exp(step / k))."""
    exponent = step / k
    if exponent > 700.0:  # exp overflows a double past ~709.8; the value is 0 to double precision
        return 0.0
    return k / (k + math.exp(exponent))


@dataclass(frozen=True)
class MixingSchedule:
    """A probability schedule ``p(update)``; see the module docstring for the formulas.

    Args:
        name: one of SCHEDULE_CHOICES.
        max_prob: the value the schedule rises to (p_max), in [0, 1].
        warmup_updates: updates of pure teacher forcing (p = 0) before the schedule starts.
        ramp_updates: length R of the exponential / linear / sigmoid ramp.
        inverse_sigmoid_k: strength k of the inverse sigmoid decay (k >= 1).
    """

    name: str
    max_prob: float
    warmup_updates: int = 0
    ramp_updates: Optional[int] = None
    inverse_sigmoid_k: Optional[float] = None

    def __post_init__(self):
        check_schedule_arguments(
            self.name, self.max_prob, self.warmup_updates, self.ramp_updates, self.inverse_sigmoid_k
        )

    def fraction(self, steps_after_warmup: float) -> float:
        s = steps_after_warmup
        if self.name == "constant":
            return 1.0
        if self.name == "exponential":
            return exponential_ramp(s, self.ramp_updates)
        if self.name == "linear":
            return linear_ramp(s, self.ramp_updates)
        if self.name == "sigmoid":
            return sigmoid_ramp(s, self.ramp_updates)
        return 1.0 - inverse_sigmoid_gold_probability(s, self.inverse_sigmoid_k)

    def __call__(self, num_updates: int) -> float:
        if num_updates < self.warmup_updates:
            return 0.0
        return self.max_prob * self.fraction(num_updates - self.warmup_updates)


def check_schedule_arguments(name, max_prob, warmup_updates, ramp_updates, inverse_sigmoid_k, flag_prefix="--ss"):
    """Raises ValueError naming the flag when the combination is impossible or an option would be ignored."""
    p = flag_prefix
    choices = list(SCHEDULE_CHOICES)
    if str(name) not in choices:
        raise ValueError(f"{p}-schedule {name!r} is unknown; choose one of {choices}")
    name = str(name)
    if not 0.0 <= max_prob <= 1.0:
        raise ValueError(f"{p}-prob must be a probability in [0, 1], got {max_prob}")
    if warmup_updates < 0:
        raise ValueError(f"{p}-warmup-updates must be >= 0, got {warmup_updates}")
    if name in RAMP_SCHEDULES:
        if ramp_updates is None:
            raise ValueError(f"{p}-schedule {name} rises over {p}-ramp-updates N updates: please set N (>= 1)")
        if ramp_updates < 1:
            raise ValueError(f"{p}-ramp-updates must be >= 1, got {ramp_updates}")
    elif ramp_updates is not None:
        raise ValueError(
            f"{p}-ramp-updates only applies to {p}-schedule {'/'.join(RAMP_SCHEDULES)}, not {name}: drop it"
        )
    if name == "inverse_sigmoid":
        if inverse_sigmoid_k is None:
            raise ValueError(f"{p}-schedule inverse_sigmoid needs its strength {p}-inverse-sigmoid-k K (K >= 1)")
        if inverse_sigmoid_k < 1.0:
            raise ValueError(f"{p}-inverse-sigmoid-k must be >= 1 (Bengio et al.), got {inverse_sigmoid_k}")
    elif inverse_sigmoid_k is not None:
        raise ValueError(f"{p}-inverse-sigmoid-k only applies to {p}-schedule inverse_sigmoid, not {name}: drop it")


# -- the temperature alpha of the relaxations (differentiable scheduled sampling, soft beam search) --
ALPHA_SCHEDULE_CHOICES = ChoiceEnum(["fixed", "exponential"])

# The largest alpha any schedule returns.  At alpha = 1e20 the relaxations are already hard in float32: the
# soft argmax softmax(alpha s) gives weight exp(-1e20 gap) and the top-k relaxation softmax(-alpha (s - m)^2)
# weight exp(-1e20 gap^2), both below float32's smallest positive number (~1.4e-45 = exp(-103)) for any gap
# above 1e-9, finer than float32 resolves scores of magnitude 0.01 or more.  It is also small enough that
# alpha times any score gap or squared gap the relaxations meet (below 1e18: banned tokens score -1e9) and
# alpha times a gradient stay inside float32's range (3.4e38), so values and gradients stay finite.  An
# exponential schedule without a cap would otherwise pass float32's range after enough updates and the loss
# would turn NaN.
ALPHA_CEILING = 1e20


@dataclass(frozen=True)
class AlphaSchedule:
    """The peakedness ``alpha(update)`` of a relaxed argmax (Goyal, Dyer and Berg-Kirkpatrick, Differentiable
    Scheduled Sampling for Credit Assignment, section 5: "varying alpha exponentially (annealing) with the
    epochs"; Goyal's thesis, section 4.3.3: soft beam search anneals alpha across epochs too).

    ``fixed``: alpha(u) = alpha.  ``exponential``: alpha(u) = min(alpha_max, alpha * growth ** (s / period))
    with ``s = max(0, u - start_updates)`` counted from the end of the teacher-forced warm-up, where the
    mixing (and thus the relaxation) starts.  The paper grows alpha once per epoch; here the period
    is a number of updates (an epoch's worth reproduces the paper), and the curve is continuous.
    Every value is also capped at ``ALPHA_CEILING`` (1e20), where the relaxations are already hard in
    float32, so that alpha stays finite in the dtype of the scores however long training runs.

    ``flag_prefix`` names the options in error messages (``--dss-alpha``, ``--soft-beam-alpha``).
    """

    name: str
    alpha: float
    growth: Optional[float] = None
    period_updates: Optional[int] = None
    alpha_max: Optional[float] = None
    start_updates: int = 0
    flag_prefix: str = "--dss-alpha"

    def __post_init__(self):
        check_alpha_arguments(
            self.name, self.alpha, self.growth, self.period_updates, self.alpha_max, flag_prefix=self.flag_prefix
        )

    def __call__(self, num_updates: int) -> float:
        if self.name == "fixed":
            return min(self.alpha, ALPHA_CEILING)
        steps = max(0, num_updates - self.start_updates) / self.period_updates
        log_alpha = math.log(self.alpha) + steps * math.log(self.growth)
        cap = ALPHA_CEILING if self.alpha_max is None else min(self.alpha_max, ALPHA_CEILING)
        # compared in log space: exp(log_alpha) overflows a double after enough updates
        return cap if log_alpha >= math.log(cap) else math.exp(log_alpha)


def check_alpha_arguments(name, alpha, growth, period_updates, alpha_max, flag_prefix="--dss-alpha"):
    """Raises ValueError naming the flag when the combination is impossible or an option would be ignored."""
    p = flag_prefix
    choices = list(ALPHA_SCHEDULE_CHOICES)
    if str(name) not in choices:
        raise ValueError(f"{p}-schedule {name!r} is unknown; choose one of {choices}")
    if not alpha > 0.0 or math.isinf(alpha):
        raise ValueError(f"{p} must be a finite number > 0, got {alpha}")
    if str(name) == "fixed":
        for flag, value in ((f"{p}-growth", growth), (f"{p}-period-updates", period_updates), (f"{p}-max", alpha_max)):
            if value is not None:
                raise ValueError(f"{flag} only applies to {p}-schedule exponential, not fixed: drop it")
        return
    if growth is None or period_updates is None:
        raise ValueError(
            f"{p}-schedule exponential multiplies alpha by {p}-growth G every {p}-period-updates N updates: set both"
        )
    if not growth > 0.0 or math.isinf(growth):
        raise ValueError(
            f"{p}-growth must be a finite number > 0 (> 1 sharpens the relaxation over training), got {growth}"
        )
    if period_updates < 1:
        raise ValueError(f"{p}-period-updates must be >= 1, got {period_updates}")
    if alpha_max is not None:
        if not alpha_max > 0.0:
            raise ValueError(f"{p}-max must be > 0, got {alpha_max}")
        if alpha_max < alpha:
            # min(alpha_max, ...) would hold alpha at the cap from the first update: no annealing at all
            raise ValueError(
                f"{p}-max {alpha_max} is below the starting {p} {alpha}: alpha would stay at {alpha_max} from "
                f"the first update; raise {p}-max to at least {p}, or lower {p}"
            )
