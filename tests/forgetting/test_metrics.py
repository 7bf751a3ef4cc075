"""GEM's ACC / BWT / FWT on hand-made matrices with known values."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.forgetting.metrics import acc, bwt, fwt, gem, mean_std, summarise

R = [[0.5, 0.1, 0.2],
     [0.4, 0.6, 0.3],
     [0.3, 0.5, 0.7]]
B = [0.1, 0.1, 0.1]


def test_known_values() -> None:
    assert acc(R) == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    assert bwt(R) == pytest.approx(((0.3 - 0.5) + (0.5 - 0.6)) / 2)   # -0.15: forgetting
    assert fwt(R, B) == pytest.approx(((0.1 - 0.1) + (0.3 - 0.1)) / 2)  # 0.1
    assert gem(R, B) == pytest.approx({"acc": 0.5, "bwt": -0.15, "fwt": 0.1})


def test_no_forgetting_and_pure_forgetting() -> None:
    perfect = np.triu(np.ones((4, 4))) * 0 + np.tril(np.ones((4, 4)))  # learned and kept, nothing before
    assert bwt(perfect) == 0.0 and acc(perfect) == 1.0 and fwt(perfect, np.zeros(4)) == 0.0
    amnesic = np.eye(4)  # each domain learned, then lost completely
    assert bwt(amnesic) == -1.0 and acc(amnesic) == 0.25


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="square matrix"):
        acc([[1.0, 2.0]])
    with pytest.raises(ValueError, match="one score per domain"):
        fwt(R, [0.1, 0.2])


def test_mean_and_std_over_seeds() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx({"mean": 2.0, "std": 1.0})
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0}
    out = summarise([{"acc": 0.5, "bwt": -0.1}, {"acc": 0.7, "bwt": -0.3}])
    assert out["acc"]["mean"] == pytest.approx(0.6) and out["bwt"]["std"] == pytest.approx(np.sqrt(0.02))
