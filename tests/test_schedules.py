import math

import pytest

from fairseq_ext.modules.schedules import (
    MixingSchedule,
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
