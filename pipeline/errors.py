"""Errors that mean "the input is wrong", shown to a user as one line (no traceback)."""


class UserError(Exception):
    """Bad input, option or environment: the CLI prints ``error: <message>`` and exits 1."""


class DataError(UserError):
    """A dataset path, file or record that cannot be used."""


class OptionError(UserError, ValueError):
    """An op or loader option outside its valid range (a ValueError for library users too)."""


def check_prob(name: str, p: float) -> float:
    if not 0 <= p <= 1:
        raise OptionError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


def check_nonneg(name: str, v: float) -> float:
    if v < 0:
        raise OptionError(f"{name} must be ≥ 0, got {v}")
    return float(v)


class DiskError(UserError):
    """A file or folder that cannot be written: full disk, read-only file system, no permission
    (one line naming the path; see ``pipeline.atomic.disk_error``)."""
