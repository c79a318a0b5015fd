import pytest

from wangend.adapters.schedule import MultiplierError, parse_multiplier


def weights(text: str, steps: int, **kw) -> list[float]:
    schedule = parse_multiplier(text)
    return [schedule.weight(step, steps, **kw) for step in range(steps)]


def test_constant() -> None:
    schedule = parse_multiplier(" 0.8 ")
    assert schedule.is_constant
    assert weights("0.8", 4) == [0.8] * 4


def test_comma_schedule_splits_steps_evenly() -> None:
    assert weights("0.9,0.8,0.7", 6) == [0.9, 0.9, 0.8, 0.8, 0.7, 0.7]
    assert weights("1,0", 3) == [1.0, 1.0, 0.0]  # uneven: the earlier part is shorter
    assert weights("1,0.5,0.25,0", 2) == [1.0, 0.25]  # more values than steps


def test_phases_follow_the_boundary() -> None:
    # two experts, 10 steps, the low-noise expert from step 4 on
    assert [parse_multiplier("1;0").weight(s, 10, 0, boundary=4) for s in range(4)] == [1.0] * 4
    assert [parse_multiplier("1;0").weight(s, 10, 1, boundary=4) for s in range(4, 10)] == [0.0] * 6
    # each phase may have its own schedule, split over that phase's steps only
    high = [parse_multiplier("1,0.5;0.2").weight(s, 10, 0, boundary=4) for s in range(4)]
    low = [parse_multiplier("1,0.5;0.2").weight(s, 10, 1, boundary=4) for s in range(4, 10)]
    assert high == [1.0, 1.0, 0.5, 0.5] and low == [0.2] * 6


def test_single_phase_schedule_spans_both_experts() -> None:
    schedule = parse_multiplier("1,0")
    assert schedule.weight(2, 10, 0, boundary=4) == 1.0
    assert schedule.weight(7, 10, 1, boundary=4) == 0.0


def test_phase_past_the_last_uses_the_last() -> None:
    assert parse_multiplier("0.7").weight(3, 10, 1, boundary=2) == 0.7
    assert parse_multiplier("1;0").weight(3, 10, 0) == 1.0  # one-expert model: phase 0 only


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("1,x", "'x'"),
        ("1,,2", "empty value"),
        ("nan", "'nan'"),
        ("1;2;3;4", "4 phases"),
        ("", "empty"),
    ],
)
def test_errors_name_the_lora_and_the_token(text: str, token: str) -> None:
    with pytest.raises(MultiplierError) as info:
        parse_multiplier(text, lora="style/anime")
    assert "style/anime" in str(info.value) and token in str(info.value)
