"""The error types, re-exported from ``tricks.errors`` (their home) while the branches that
still import them from here land; new code imports ``tricks.errors``."""
from tricks.errors import DataError, OptionError, UserError  # noqa: F401
from .options_check import check_nonneg, check_prob  # noqa: F401
