"""Atomic file writes: write beside the target, then rename, so a crash never leaves a
half-written result, summary, table, plot or cache file in place of a good one."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

# Write failures that mean "the storage is full or refuses this much", not a bug.
STORAGE_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StorageError(OSError):
    """A result could not be written (storage full, over quota, read-only); the message is one
    line naming the file, and the previous version of that file is untouched."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _errno(err: OSError) -> Optional[int]:
    """The errno of an OSError; pyarrow's IO errors carry it only in the message ('[Errno 28] ...')."""
    if err.errno is not None:
        return err.errno
    found = re.search(r"\[Errno (\d+)\]", str(err))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto `path`.

    If writing fails because the storage is full (or over quota, or the file too large), the
    temporary file is removed, `path` keeps its previous content and StorageError is raised.
    """
    path = Path(path).expanduser()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual permissions
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        code = _errno(err)
        if isinstance(err, StorageError) or code not in (*STORAGE_FULL_ERRNOS, errno.EROFS, errno.EACCES):
            raise
        kept = "its previous version is kept" if path.exists() else "nothing was written there"
        raise StorageError(code, f"{path}: cannot write ({os.strerror(code)}); {kept}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> Path:
    """Write JSON (NaN -> null) to a temp file beside `path`, then rename it into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return Path(path).expanduser()


def write_parquet_atomic(path: str | Path, table) -> Path:
    """Write a pyarrow Table as Parquet beside `path`, then rename it into place."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path).expanduser()


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG beside `path`, rename it into place, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path).expanduser()
