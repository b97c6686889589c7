"""The agent's clamping of a viewer's window to the sizes the guest's display supports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mc_agent import display


def test_sizes_within_the_limits_are_kept() -> None:
    assert display.clamp(1024, 700) == (1024, 700)
    assert display.clamp(800, 600) == (800, 600)
    assert display.clamp(1920, 1200) == (1920, 1200)


def test_sizes_outside_are_clamped_and_widths_even() -> None:
    assert display.clamp(4000, 3000) == (1920, 1200)
    assert display.clamp(1023, 701) == (1022, 701)


def test_a_small_window_gets_the_smallest_screen_in_its_shape() -> None:
    assert display.clamp(400, 300) == (800, 600)
    assert display.clamp(390, 500) == (800, 1026)  # a phone: as tall as its shape says
    assert display.clamp(390, 760) == (800, 1200)  # ...up to the tallest screen
    assert display.clamp(4000, 90) == (1920, 600)


@pytest.mark.parametrize("size", [(0, 600), (800, -1), ("800", 600), (800.0, 600), (True, 600)])
def test_nonsense_is_refused(size: tuple[object, object]) -> None:
    with pytest.raises(ValueError):
        display.clamp(*size)  # type: ignore[arg-type]


@given(st.integers(1, 100_000), st.integers(1, 100_000))
def test_every_answer_is_a_size_the_display_can_take(width: int, height: int) -> None:
    got_width, got_height = display.clamp(width, height)
    assert display.MIN_WIDTH <= got_width <= display.MAX_WIDTH and got_width % 2 == 0
    assert display.MIN_HEIGHT <= got_height <= display.MAX_HEIGHT
