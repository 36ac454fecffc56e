"""Pixel sizes of slide files: the plausible range, resolution tags in inch/cm, `pixel_size=` over any metadata."""

from __future__ import annotations

import math

import pytest

from ghist._spatial import PIXEL_SIZE_RANGE_UM, check_pixel_size, is_plausible_pixel_size


@pytest.mark.parametrize("value", [0.05, 0.25, 0.5, 8.0, 20.0])
def test_plausible_pixel_sizes_pass(value):
    assert check_pixel_size(value) == value
    assert is_plausible_pixel_size(value)


@pytest.mark.parametrize("value", [1e-6, 0.049, 20.1, 84.667, 352.78, 1e30, math.nan, math.inf, -0.5, 0, True, "0.5"])
def test_implausible_pixel_sizes_are_refused_with_the_range(value):
    assert not is_plausible_pixel_size(value)
    with pytest.raises(ValueError, match=rf"`pixel_size` must be .*between {PIXEL_SIZE_RANGE_UM[0]} and"):
        check_pixel_size(value)
    assert check_pixel_size(None, optional=True) is None
