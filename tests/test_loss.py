import torch
import torch.nn.functional as F

from tricks.train.loss import SoftTargetCrossEntropy, smooth


def test_paper_label_smoothing_targets():
    t = smooth(torch.tensor([2, 0]), 0.1, 5)
    assert torch.allclose(t[0], torch.tensor([0.025, 0.025, 0.9, 0.025, 0.025]))
    assert torch.allclose(t.sum(1), torch.ones(2))


def test_integer_fast_path_equals_soft_path():
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    for eps in (0.0, 0.1, 0.3):
        loss = SoftTargetCrossEntropy(10, eps)
        fast = loss(logits, labels)
        soft = loss(logits, F.one_hot(labels, 10).float())
        direct = -(smooth(labels, eps, 10) * F.log_softmax(logits, 1)).sum(1).mean()
        assert torch.allclose(fast, soft, atol=1e-6)
        assert torch.allclose(fast, direct, atol=1e-6)


def test_smoothing_commutes_with_mixing():
    # mixing is a convex combination of rows, smoothing is affine: the order does not matter
    a, b = torch.tensor([1, 4]), torch.tensor([3, 3])
    lam = 0.7
    mixed_then_smoothed = smooth(lam * F.one_hot(a, 6).float() + (1 - lam) * F.one_hot(b, 6).float(),
                                 0.1, 6)
    smoothed_then_mixed = lam * smooth(a, 0.1, 6) + (1 - lam) * smooth(b, 0.1, 6)
    assert torch.allclose(mixed_then_smoothed, smoothed_then_mixed)
    logits = torch.randn(2, 6)
    loss = SoftTargetCrossEntropy(6, 0.1)
    raw = lam * F.one_hot(a, 6).float() + (1 - lam) * F.one_hot(b, 6).float()
    assert torch.allclose(loss(logits, raw),
                          -(smoothed_then_mixed * F.log_softmax(logits, 1)).sum(1).mean())
