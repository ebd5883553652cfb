import math

import pytest
import torch

from tricks.train.schedule import lr_at, scaled_lr, schedule_args


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.1, 64) == pytest.approx(0.025)
    assert scaled_lr(0.1, 1024, "none") == pytest.approx(0.1)


def test_warmup_is_linear_from_eta_over_m():
    # lr = i·η/m for i = 1..m
    for i in (1, 2, 50, 100):
        assert lr_at(i, peak=0.4, total=1000, warmup=100) == pytest.approx(0.4 * i / 100)


def paper_cosine(t: int, T: int, peak: float) -> float:
    """He et al. 2018 §5.1: η_t = ½(1 + cos(tπ/T))·η, t = 0..T−1 counting post-warmup batches."""
    return 0.5 * (1 + math.cos(t * math.pi / T)) * peak


@pytest.mark.parametrize("warmup", [0, 1, 7, 100])
def test_cosine_is_the_papers_formula_for_every_update(warmup):
    peak, total = 0.4, 1000
    T = total - warmup
    got = [lr_at(i, peak=peak, total=total, warmup=warmup) for i in range(1, total + 1)]
    want = [i * peak / warmup for i in range(1, warmup + 1)] + \
        [paper_cosine(t, T, peak) for t in range(T)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_cosine_first_update_runs_at_peak_and_no_update_is_wasted_at_zero():
    # the first update the trainer makes is i = 1: it must run at η, not 0.99901·η (T = 50)
    assert lr_at(1, peak=0.1, total=50) == 0.1
    assert lr_at(6, peak=0.1, total=55, warmup=5) == 0.1
    last = lr_at(50, peak=0.1, total=50)
    assert last == pytest.approx(paper_cosine(49, 50, 0.1)) and last > 1e-5
    assert lr_at(26, peak=0.1, total=50) == pytest.approx(0.05)  # t = 25 = T/2


@pytest.mark.parametrize("warmup", [0, 1, 7, 100])
def test_linear_decays_to_zero_over_the_post_warmup_updates(warmup):
    # Li et al. 2020: η_t = (1 − t/T)·η, t = 0..T−1 counting the T post-warmup updates
    peak, total = 0.4, 1000
    T = total - warmup
    got = [lr_at(i, peak=peak, total=total, warmup=warmup, kind="linear")
           for i in range(1, total + 1)]
    want = [i * peak / warmup for i in range(1, warmup + 1)] + \
        [(1 - t / T) * peak for t in range(T)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[warmup] == peak and got[-1] == pytest.approx(peak / T)  # no update at 0


def test_lr_outside_the_run_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        lr_at(0, peak=0.1, total=10)
    with pytest.raises(ValueError, match="outside"):
        lr_at(11, peak=0.1, total=10)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(1, peak=0.1, total=10, kind="poly")


def torch_multistep(peak, steps_per_epoch, epochs, milestones, gamma, warmup_epochs=0):
    """torch's MultiStepLR stepped once per epoch, the reference for the step schedule."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma)
    out = []
    for _ in range(epochs):
        out += [opt.param_groups[0]["lr"]] * steps_per_epoch
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("milestones", [[2, 4], [1], [3, 5, 6]])
def test_step_decay_matches_multisteplr_stepped_per_epoch(milestones):
    spe, epochs = 10, 7
    kw = schedule_args("step", 0, milestones, 0.1, 0.1, spe, epochs)
    got = [lr_at(i, **kw) for i in range(1, spe * epochs + 1)]
    assert got == pytest.approx(torch_multistep(0.1, spe, epochs, milestones, 0.1), rel=1e-12)


def test_step_decay_keeps_eta_for_the_whole_milestone_epoch():
    # 10 steps an epoch, milestones at epochs 2 and 4: epoch 2's last update (20) still at η
    kw = dict(peak=0.1, total=60, kind="step", milestones=[20, 40])
    assert lr_at(20, **kw) == pytest.approx(0.1)
    assert lr_at(21, **kw) == pytest.approx(0.01)
    assert lr_at(40, **kw) == pytest.approx(0.01)
    assert lr_at(41, **kw) == pytest.approx(0.001)


def test_step_decay_with_warmup():
    kw = dict(peak=0.4, total=120, warmup=10, kind="step", milestones=[30])
    assert lr_at(5, **kw) == pytest.approx(0.2)
    assert lr_at(10, **kw) == pytest.approx(0.4)
    assert lr_at(30, **kw) == pytest.approx(0.4)
    assert lr_at(31, **kw) == pytest.approx(0.04)


def test_schedule_args_turn_epochs_into_updates():
    kw = schedule_args("cosine", 2.5, [30, 60], 0.5, 0.8, 4, 90)
    assert kw == dict(peak=0.8, total=360, warmup=10, kind="cosine", milestones=[120, 240],
                      gamma=0.5)
