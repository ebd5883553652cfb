"""Small checks of op options, each a one-line ``OptionError`` naming the option."""
from tricks.errors import OptionError


def check_prob(name: str, p: float) -> float:
    if not 0 <= p <= 1:
        raise OptionError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


def check_nonneg(name: str, v: float) -> float:
    if v < 0:
        raise OptionError(f"{name} must be ≥ 0, got {v}")
    return float(v)
