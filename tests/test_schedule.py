import math

import pytest

from tricks.train.schedule import lr_at, scaled_lr


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.1, 64) == pytest.approx(0.025)
    assert scaled_lr(0.1, 1024, "none") == pytest.approx(0.1)


def test_warmup_is_linear_from_eta_over_m():
    # lr = i·η/m for i = 1..m
    for i in (1, 2, 50, 100):
        assert lr_at(i, peak=0.4, total=1000, warmup=100) == pytest.approx(0.4 * i / 100)


def test_cosine_after_warmup():
    peak, m, T = 0.4, 100, 1000
    assert lr_at(m, peak=peak, total=T, warmup=m) == pytest.approx(peak)
    for i in (101, 300, 550, 999, 1000):
        want = 0.5 * (1 + math.cos(math.pi * (i - m) / (T - m))) * peak
        assert lr_at(i, peak=peak, total=T, warmup=m) == pytest.approx(want)
    assert lr_at((T + m) // 2, peak=peak, total=T, warmup=m) == pytest.approx(peak / 2)
    assert lr_at(T, peak=peak, total=T, warmup=m) == pytest.approx(0.0, abs=1e-12)


def test_cosine_without_warmup_starts_at_peak():
    assert lr_at(0, peak=0.1, total=10) == pytest.approx(0.1)
    assert lr_at(5, peak=0.1, total=10) == pytest.approx(0.05)


def test_step_decay_divides_by_ten_at_milestones():
    kw = dict(peak=0.1, total=120, kind="step", milestones=[30, 60, 90])
    assert lr_at(29, **kw) == pytest.approx(0.1)
    assert lr_at(30, **kw) == pytest.approx(0.01)
    assert lr_at(60, **kw) == pytest.approx(0.001)
    assert lr_at(95, **kw) == pytest.approx(0.0001)


def test_step_decay_with_warmup():
    kw = dict(peak=0.4, total=120, warmup=10, kind="step", milestones=[30])
    assert lr_at(5, **kw) == pytest.approx(0.2)
    assert lr_at(20, **kw) == pytest.approx(0.4)
    assert lr_at(31, **kw) == pytest.approx(0.04)
