import pytest
import torch
import torch.nn.functional as F

from tricks.errors import ConfigError
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


def mixup_targets(k: int, n: int = 16, lam: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    return lam * F.one_hot(a, k).float() + (1 - lam) * F.one_hot(b, k).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_is_fp32_whatever_the_logits_dtype(dtype, eps):
    # K = 1000 mixup targets rounded to bf16 sum to ≈1.002: the loss would be off by ~1e-3
    k = 1000
    targets = mixup_targets(k)
    logits = (3 * torch.randn(16, k, generator=torch.Generator().manual_seed(1))).to(dtype)
    want = -(smooth(targets, eps, k).double() * F.log_softmax(logits.double(), 1)).sum(1).mean()
    got = SoftTargetCrossEntropy(k, eps)(logits, targets)
    assert got.dtype == torch.float32
    assert abs(got.double() - want) / want < 1e-6


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_integer_and_soft_paths_agree_under_bf16_autocast(eps):
    torch.manual_seed(0)
    k = 1000
    net = torch.nn.Linear(32, k)
    x, labels = torch.randn(16, 32), torch.randint(0, k, (16,))
    loss = SoftTargetCrossEntropy(k, eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
        fast = loss(logits, labels)
        soft = loss(logits, F.one_hot(labels, k).float())
    assert logits.dtype == torch.bfloat16
    assert fast.dtype == soft.dtype == torch.float32
    assert abs(fast.item() - soft.item()) < 1e-6 * fast.item()


def test_label_smoothing_puts_one_minus_eps_on_the_true_class_and_the_rest_uniformly():
    # the paper's form for every K, including K = 2 at the limit ε = (K−1)/K
    for k, eps in ((2, 0.3), (2, 0.5), (3, 0.6), (10, 0.1), (1000, 0.1)):
        t = smooth(torch.tensor([1]), eps, k)[0]
        assert t[1].item() == pytest.approx(1 - eps, abs=1e-6)
        others = torch.cat([t[:1], t[2:]])
        assert torch.allclose(others, torch.full_like(others, eps / (k - 1)), atol=1e-7)


@pytest.mark.parametrize("k,eps", [(2, 0.6), (3, 0.7), (5, 0.95)])
def test_label_smoothing_too_large_for_k_is_a_one_line_config_error(k, eps):
    # ε > (K−1)/K: torch's fused kernel would raise "label_smoothing must be between 0.0 and
    # 1.0" at the first unmixed batch while the soft path silently computed something else
    with pytest.raises(ConfigError, match=r"train\.label_smoothing=.* for \d+ classes") as e:
        SoftTargetCrossEntropy(k, eps)
    assert "\n" not in str(e.value)
    SoftTargetCrossEntropy(k, (k - 1) / k)  # the limit itself is the uniform target: allowed


def test_no_smoothing_is_plain_cross_entropy_and_the_default():
    # ε = 0 (and the default) must leave one-hot targets alone: −log p of the true class
    torch.manual_seed(2)
    logits, labels = torch.randn(8, 7), torch.randint(0, 7, (8,))
    plain = -F.log_softmax(logits, 1)[torch.arange(8), labels].mean()
    assert torch.equal(smooth(labels, 0.0, 7), F.one_hot(labels, 7).float())
    for loss in (SoftTargetCrossEntropy(7), SoftTargetCrossEntropy(7, 0.0)):
        assert torch.allclose(loss(logits, labels), plain, atol=1e-6)
        assert torch.allclose(loss(logits, F.one_hot(labels, 7).float()), plain, atol=1e-6)
