"""Mixing-probability schedules (Duckworth et al., Parallel Scheduled Sampling; Bengio et al. 2015) and the
alpha schedules of the relaxations (Goyal et al., Differentiable Scheduled Sampling; Goyal's thesis, 4.3.3)."""
import math

import numpy as np
import pytest

from fairseq_ext.modules.schedules import (
    ALPHA_CEILING,
    AlphaSchedule,
    MixingSchedule,
    check_alpha_arguments,
    exponential_ramp,
    inverse_sigmoid_gold_probability,
    linear_ramp,
    sigmoid_ramp,
)


@pytest.mark.parametrize("ramp_fn", [exponential_ramp, linear_ramp, sigmoid_ramp])
def test_ramps_rise_from_a_thousandth_to_one_monotonically(ramp_fn):
    values = [ramp_fn(s, 100) for s in range(0, 150)]
    assert values[0] == pytest.approx(1e-3, rel=1e-6)
    assert values[100] == 1.0 and values[149] == 1.0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert 1e-3 < values[50] < 1.0


def test_ramp_midpoints_match_their_formulas():
    assert exponential_ramp(50, 100) == pytest.approx(1e-3**0.5)
    assert linear_ramp(50, 100) == pytest.approx(1e-3 + 0.999 * 0.5)
    # the logistic curve is 0.5 halfway; rescaled from [0.001, 0.999] to [0.001, 1]
    assert sigmoid_ramp(50, 100) == pytest.approx(1e-3 + (0.5 - 1e-3) * 0.999 / 0.998)


def test_inverse_sigmoid_is_bengio_gold_probability_and_never_overflows():
    k = 10.0
    assert inverse_sigmoid_gold_probability(0, k) == pytest.approx(k / (k + 1))
    assert inverse_sigmoid_gold_probability(30, k) == pytest.approx(k / (k + math.exp(3)))
    assert inverse_sigmoid_gold_probability(10**9, k) == 0.0


def test_warmup_is_pure_teacher_forcing_then_schedule_starts_at_zero_offset():
    s = MixingSchedule("linear", max_prob=0.5, warmup_updates=10, ramp_updates=20)
    assert [s(u) for u in range(10)] == [0.0] * 10
    assert s(10) == pytest.approx(0.5 * 1e-3)
    assert s(20) == pytest.approx(0.5 * linear_ramp(10, 20))
    assert s(30) == s(1000) == 0.5


def test_constant_and_inverse_sigmoid_schedules():
    assert MixingSchedule("constant", 0.25)(0) == 0.25
    s = MixingSchedule("inverse_sigmoid", 1.0, warmup_updates=5, inverse_sigmoid_k=100.0)
    assert s(4) == 0.0
    assert s(5) == pytest.approx(1 - 100 / 101)
    assert s(10**6) == 1.0


def test_schedule_is_a_pure_function_of_the_update_count():
    s = MixingSchedule("exponential", 0.5, warmup_updates=3, ramp_updates=7)
    assert [s(u) for u in range(20)] == [s(u) for u in range(20)]


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(name="exponential", max_prob=0.5), "--ss-ramp-updates"),
        (dict(name="linear", max_prob=0.5, ramp_updates=0), "--ss-ramp-updates"),
        (dict(name="constant", max_prob=0.5, ramp_updates=100), "--ss-ramp-updates"),
        (dict(name="inverse_sigmoid", max_prob=0.5), "--ss-inverse-sigmoid-k"),
        (dict(name="inverse_sigmoid", max_prob=0.5, inverse_sigmoid_k=0.5), "--ss-inverse-sigmoid-k"),
        (dict(name="linear", max_prob=0.5, ramp_updates=5, inverse_sigmoid_k=3.0), "--ss-inverse-sigmoid-k"),
        (dict(name="constant", max_prob=1.5), "--ss-prob"),
        (dict(name="constant", max_prob=0.5, warmup_updates=-1), "--ss-warmup-updates"),
        (dict(name="cosine", max_prob=0.5), "--ss-schedule"),
    ],
)
def test_impossible_or_ignored_options_are_rejected_naming_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        MixingSchedule(**kwargs)


# -- alpha schedules ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["--dss-alpha", "--soft-beam-alpha"])
def test_uncapped_exponential_alpha_stays_finite_in_float32_after_ten_million_updates(prefix):
    schedule = AlphaSchedule("exponential", alpha=1.0, growth=2.0, period_updates=1, flag_prefix=prefix)
    values = [schedule(u) for u in (0, 10, 66, 67, 10**3, 10**7)]
    assert values[:2] == [1.0, 2.0**10]
    assert values[-1] == ALPHA_CEILING and np.isfinite(np.float32(values[-1]))
    assert all(b >= a for a, b in zip(values, values[1:]))  # still rising, then held at the ceiling
    assert values[2] == pytest.approx(2.0**66) and values[3] == ALPHA_CEILING  # 2^66 < 1e20 < 2^67
    # a fixed alpha beyond the ceiling acts as the ceiling, and a cap above it too
    assert AlphaSchedule("fixed", alpha=1e300, flag_prefix=prefix)(0) == ALPHA_CEILING
    capped = AlphaSchedule("exponential", alpha=1.0, growth=2.0, period_updates=1, alpha_max=1e30, flag_prefix=prefix)
    assert capped(10**7) == ALPHA_CEILING
    assert AlphaSchedule("exponential", 1.0, 2.0, 1, alpha_max=5.0)(10**7) == 5.0


@pytest.mark.parametrize("prefix", ["--dss-alpha", "--soft-beam-alpha"])
def test_a_cap_below_the_starting_alpha_is_refused_naming_both_flags(prefix):
    with pytest.raises(ValueError) as error:
        AlphaSchedule("exponential", alpha=5.0, growth=2.0, period_updates=10, alpha_max=2.0, flag_prefix=prefix)
    assert f"{prefix}-max 2.0 is below the starting {prefix} 5.0" in str(error.value)
    with pytest.raises(ValueError, match=f"{prefix}-max"):
        check_alpha_arguments("exponential", 5.0, 2.0, 10, 2.0, flag_prefix=prefix)
    # a cap equal to the start is accepted (alpha stays there, as asked)
    assert AlphaSchedule("exponential", 5.0, 2.0, 10, alpha_max=5.0, flag_prefix=prefix)(100) == 5.0


def test_differentiable_ss_refuses_a_cap_below_its_starting_alpha_before_training():
    from fairseq_ext.testing import tiny

    flags = ["--criterion", "differentiable_ss", "--dss-alpha", "5", "--dss-alpha-schedule", "exponential",
             "--dss-alpha-growth", "2", "--dss-alpha-period-updates", "10", "--dss-alpha-max", "2"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--dss-alpha-max 2.0 is below the starting --dss-alpha 5.0"):
        tiny.build("transformer", flags)
