"""Errors that mean "the input is wrong", shown to a user as one line (no traceback)."""


class UserError(Exception):
    """Bad input, option or environment: the CLI prints ``error: <message>`` and exits 1."""


class DataError(UserError):
    """A dataset path, file or record that cannot be used."""
