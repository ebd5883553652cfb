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


class RecordError(DataError):
    """One record of a record file that cannot be used (bad checksum, undecodable): the message
    names the file and the record; ``path``, ``index`` and ``reason`` say it to code (the
    bad-record policy, ``pipeline.bad_records``). Rebuilt from its message alone too (torch's
    DataLoader re-raises a worker's exception from its text)."""

    def __init__(self, message: str, path: str | None = None, index: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        if index is None:
            import re
            m = re.search(r"(\S+\.rec): record (\d+):? (.*)", message)
            if m:
                path, index, reason = m.group(1), int(m.group(2)), m.group(3).splitlines()[0]
        self.path, self.index, self.reason = path, index, reason
