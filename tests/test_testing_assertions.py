"""chunkglm.testing's assertions fail when they should."""

from __future__ import annotations

import numpy as np
import pytest

from chunkglm.testing import assert_close_to_scale, assert_maps_close, rel_l2


def test_close_to_scale_allows_ulps_of_the_scale_near_zero_and_nothing_more():
    desired = np.array([10.0, 1e-9, -3.0, np.nan, np.inf])
    assert_close_to_scale(desired + [1e-11, 5e-11, 0.0, 0.0, 0.0], desired, rtol=1e-11)
    with pytest.raises(AssertionError):  # an element-wise rtol would have refused 5e-11 on 1e-9
        np.testing.assert_allclose(desired[1] + 5e-11, desired[1], rtol=1e-11)
    with pytest.raises(AssertionError):
        assert_close_to_scale(desired + [0.0, 2e-10, 0.0, 0.0, 0.0], desired, rtol=1e-11)
    with pytest.raises(AssertionError, match="NaN positions"):
        assert_close_to_scale(np.array([10.0, 0.0, -3.0, 1.0, np.inf]), desired, rtol=1e-11)
    with pytest.raises(AssertionError):
        assert_close_to_scale(np.array([10.0, 0.0, -3.0, np.nan, -np.inf]), desired, rtol=1e-11)


def test_rel_l2_over_a_mask():
    ref = np.array([[3.0, 4.0], [100.0, 0.0]])
    mask = np.array([[True, True], [False, False]])
    assert rel_l2(ref + [[0.0, 0.5], [50.0, 0.0]], ref, mask) == pytest.approx(0.1)
    assert_maps_close(ref + [[0.0, 0.5], [50.0, 0.0]], ref, mask, rel_l2_max=0.1 + 1e-12)
    with pytest.raises(AssertionError, match="relative L2"):
        assert_maps_close(ref + [[0.0, 0.5], [0.0, 0.0]], ref, None, rel_l2_max=1e-3)
