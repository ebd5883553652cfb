"""When a progress bar is drawn: only where someone watches it live."""
from __future__ import annotations

import sys


def progress_enabled(requested: bool, stream=None) -> bool:
    """Whether to draw a tqdm bar: ``requested`` and ``stream`` (default ``sys.stderr``, where
    tqdm writes) is a terminal. Redirected to a file or a pipe, a bar is a stream of carriage
    returns; the trainer's per-epoch lines say the progress there instead (tqdm itself redraws
    in place whatever the stream is)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(requested and isatty is not None and isatty())
