"""Files a command writes (a report, an export): checked before the work, and a failure to
write is one sentence (``UsageError``), never a traceback."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd

from . import UsageError

# a cell that begins with one of these is a formula to a spreadsheet (OWASP, CSV injection)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def output_file(path: str | Path, what: str = "--out") -> Path:
    """``path`` when a file can be put there: not a folder, and no file where a folder of its
    path should be (checked before any measurement or figure is made)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; name a file, e.g. {path / 'out'}")
    for above in path.parents:
        if above.exists():
            if not above.is_dir():
                raise UsageError(f"{what} {path}: {above} is a file, not a folder")
            break
    return path


@contextlib.contextmanager
def writing(path: Path, what: str = "--out"):
    """Make ``path``'s folder and write inside the block; an OSError (read-only place, full
    disk, no permission) becomes one sentence."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
    except OSError as e:
        raise UsageError(f"cannot write {what} {path}: {e.strerror or e}") from None


def without_formulas(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every text cell that a spreadsheet would run as a formula (it begins with
    = + - @, a tab or a carriage return, as a layer name from a shapes CSV may) prefixed with a
    single quote, as OWASP's guidance on CSV injection says; numbers stay numbers."""
    def defuse(v):
        return f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v

    out = df.copy()
    for col in out.select_dtypes(include=["object", "string"]).columns:
        out[col] = out[col].map(defuse)
    return out
