"""AdaBound/AMSBound (Luo et al., ICLR 2019) with its clipping bounds actually binding."""
import math

import pytest
import torch

from tricks.train.adabound import AdaBound


@pytest.mark.parametrize("amsbound", [False, True])
def test_adabound_clips_the_step_to_both_bounds_as_the_authors_rule(amsbound):
    # gamma = 0.2 closes the bounds fast: by t = 8 the band is [0.062, 0.16]·final_lr-ish, so
    # large gradients (small Adam step) hit the lower bound and tiny ones hit the upper bound
    lr, final_lr, gamma, b1, b2, eps, wd = 0.5, 0.1, 0.2, 0.9, 0.999, 1e-8, 0.0
    w0 = [1.0, -2.0, 0.5, 3.0]
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = AdaBound([p], lr=lr, betas=(b1, b2), final_lr=final_lr, gamma=gamma, eps=eps,
                   weight_decay=wd, amsbound=amsbound)
    grads = [[50.0, 1e-4, -0.3, 2.0], [40.0, 2e-4, 0.4, -1.0], [-60.0, -1e-4, 0.1, 0.5],
             [30.0, 1e-4, -0.2, 0.0], [55.0, 3e-4, 0.3, -0.4], [-45.0, 1e-4, 0.2, 0.1],
             [35.0, -2e-4, -0.1, 0.3], [50.0, 1e-4, 0.25, -0.2]]
    w, m, v, vmax = list(w0), [0.0] * 4, [0.0] * 4, [0.0] * 4
    hits = {"lower": 0, "upper": 0, "inside": 0}
    for t, g in enumerate(grads, 1):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        for i in range(4):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            vmax[i] = max(vmax[i], v[i])
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) / (
                math.sqrt(vmax[i] if amsbound else v[i]) + eps)
            lower = final_lr * (1 - 1 / (gamma * t + 1))
            upper = final_lr * (1 + 1 / (gamma * t))
            clipped = min(max(step, lower), upper)
            hits["lower" if step < lower else "upper" if step > upper else "inside"] += 1
            w[i] -= clipped * m[i]
        assert torch.allclose(p.detach(), torch.tensor(w, dtype=torch.float64), rtol=1e-12,
                              atol=1e-12), t
    # the test means something only if both bounds bound (and not everything is clipped)
    assert hits["lower"] >= 4 and hits["upper"] >= 4 and hits["inside"] >= 2, hits


def test_adabound_bounds_converge_to_final_lr():
    # once gamma·t is huge both bounds are final_lr: AdaBound is SGD with momentum (1 − β1 avg)
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = AdaBound([p], lr=1.0, final_lr=0.05, gamma=1e9)
    p.grad = torch.tensor([1e3, 1.0, 1e-3], dtype=torch.float64)
    opt.step()
    m = 0.1 * p.grad  # (1 − β1)·g
    assert torch.allclose(p.detach(), -0.05 * m, rtol=1e-6)
