"""Where results live: a local folder or object storage (s3://, gs://, whatever pyarrow.fs
resolves), behind one small layer.

Every write is atomic where the store allows: locally a temporary file beside the target is
renamed into place, so a crash never leaves a half-written result, summary, table, plot or
cache file in place of a good one; on object storage an object appears whole when its single
upload completes. Credentials come from the environment, the cloud SDK's own files or an
instance profile (pyarrow reads them); cmd-ray never takes them as settings and writes them
nowhere. `AWS_ENDPOINT_URL` points s3:// at an S3-compatible server.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cmd_ray.errors import StorageError

# Write failures that mean "the storage is full or refuses this much", not a bug.
STORAGE_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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


@dataclass(frozen=True)
class Store:
    """Where a path lives: this machine's file system (scheme "") or an object store named by its
    URI scheme (s3, gs, ...). Made from a path or URI by `store_of`; the one place that knows
    schemes. Adding a backend pyarrow.fs does not resolve by itself means changing `filesystem`
    and `for_ray` here, nothing else."""

    scheme: str

    @property
    def remote(self) -> bool:
        return bool(self.scheme)

    def filesystem(self, path: str | Path):
        """(pyarrow FileSystem, `path` as that file system names it)."""
        import pyarrow.fs as pafs

        if self.remote:
            return pafs.FileSystem.from_uri(str(path))
        return pafs.LocalFileSystem(), str(local(path).resolve())

    def uri(self, path_on_store: str) -> str:
        """A path as the store's own file system names it (what Ray reports, without the scheme)
        turned back into a path or URI the other functions here take."""
        if not self.remote or "://" in path_on_store:
            return path_on_store
        return f"{self.scheme}://{path_on_store.lstrip('/')}"

    def for_ray(self, path: str | Path) -> dict[str, Any]:
        """The storage arguments of Ray's RunConfig for `path`: Ray resolves every scheme pyarrow
        knows by itself; a local path is made absolute (Ray runs trials in folders of their own)."""
        return {"storage_path": absolute(path)}


_LOCAL = Store("")


def store_of(path: str | Path) -> Store:
    """The store of a local path (also file://...) or an object-storage URI (s3://bucket/key, ...)."""
    text = str(path)
    scheme, separator, _ = text.partition("://")
    if not separator or scheme == "file":
        return _LOCAL
    return Store(scheme)


def is_uri(path: str | Path) -> bool:
    """True for object storage (s3://bucket/key, gs://...); False for a local path or file://."""
    return store_of(path).remote


def join(base: str | Path, *parts: str) -> str:
    """`base`/part/...: a URI stays a URI (pathlib would fold its "//"); a local path is expanded."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(local(base).joinpath(*parts))


def local(path: str | Path) -> Path:
    """A local path, expanded; refuses a URI (for what only a local folder can hold)."""
    if is_uri(path):
        raise ValueError(f"{path}: a local path is needed here")
    return Path(str(path).removeprefix("file://")).expanduser()


def absolute(path: str | Path) -> str:
    """A local path expanded and made absolute (a Ray trial runs in a folder of its own); a URI as it is."""
    return str(path) if is_uri(path) else str(local(path).resolve())


def filesystem(path: str | Path):
    """(pyarrow FileSystem, path on it) for a URI or a local path."""
    return store_of(path).filesystem(path)


def write_bytes(path: str | Path, data: bytes) -> str:
    """Write `data` to `path` atomically (see the module docstring); return the path written."""
    if not is_uri(path):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return str(local(path))
    fs, where = filesystem(path)
    try:
        with fs.open_output_stream(where) as stream:
            stream.write(data)
    except OSError as err:
        raise StorageError(errno.EIO, f"{path}: cannot write ({_first_line(err)}); nothing was written there") from None
    return str(path)


def read_bytes(path: str | Path) -> bytes:
    """The whole content of a local file or an object; FileNotFoundError when there is none."""
    if not is_uri(path):
        return local(path).read_bytes()
    fs, where = filesystem(path)
    if not exists(path):
        raise FileNotFoundError(f"{path}: no such object")
    with fs.open_input_stream(where) as stream:
        return stream.read()


def remove(path: str | Path) -> None:
    """Delete a local file (or an empty local folder) or an object, if it is there."""
    if not is_uri(path):
        target = local(path)
        if target.is_dir():
            target.rmdir()
        else:
            target.unlink(missing_ok=True)
        return
    fs, where = filesystem(path)
    if exists(path):
        fs.delete_file(where)


def file_info(path: str | Path) -> tuple[int, Optional[int]]:
    """(size in bytes, modification time in ns or None where the store keeps none) of one file
    or object; FileNotFoundError when there is no such file."""
    import pyarrow.fs as pafs

    fs, where = filesystem(path)
    info = fs.get_file_info(where)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such file")
    return int(info.size), (int(info.mtime_ns) if info.mtime_ns is not None else None)


def exists(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    if not is_uri(path):
        return local(path).exists()
    fs, where = filesystem(path)
    return fs.get_file_info(where).type != pafs.FileType.NotFound


def list_files(path: str | Path) -> list[str]:
    """Every file under a folder or prefix, as full paths or URIs (recursive)."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return sorted(str(p) for p in local(path).rglob("*") if p.is_file())
    fs, where = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(where, recursive=True, allow_not_found=True))
    return sorted(store_of(path).uri(i.path) for i in infos if i.type == pafs.FileType.File)


def check_writable(field: str, path: str | Path) -> None:
    """Refuse a folder or prefix that cannot be created or written, before any work (ValueError,
    one line naming the field): a read-only folder, a missing bucket, missing credentials."""
    if not is_uri(path):
        folder = local(path)
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".cmd-ray-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ValueError(
                f"{field}: cannot write to {folder} ({err.strerror or err}); allowed: a writable folder"
            ) from None
        finally:  # the folders are made when something is written there: a refused run leaves none
            for made in missing:
                with contextlib.suppress(OSError):
                    made.rmdir()
        return
    probe = join(path, f".cmd-ray-write-test-{os.getpid()}")
    try:
        fs, where = filesystem(probe)
        with fs.open_output_stream(where) as stream:
            stream.write(b"ok")
        fs.delete_file(where)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{field}: cannot write to {path} ({_first_line(err)}); allowed: an existing bucket this machine's "
            "credentials (environment, cloud SDK files or instance profile) may write to"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:300]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def to_json(data: Any) -> str:
    """Strict JSON (NaN and inf as null, which any JSON reader takes), indented; values JSON has
    no type for (paths, numpy scalars) as strings."""
    return json.dumps(_jsonable(data), indent=2, default=str, allow_nan=False)


def write_json_atomic(path: str | Path, data: dict[str, Any]) -> str:
    """Write JSON (NaN -> null) to a local file or an object, atomically."""
    return write_bytes(path, (to_json(data) + "\n").encode())


def write_parquet_atomic(path: str | Path, table) -> str:
    """Write a pyarrow Table as Parquet to a local file or an object, atomically."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return write_bytes(path, buffer.getvalue())


def read_parquet(path: str | Path):
    """A Parquet file (local or an object) as a pyarrow Table."""
    return parquet_from_bytes(read_bytes(path))


def parquet_from_bytes(blob: bytes):
    """A Parquet file's bytes as a pyarrow Table, read in this thread only.

    `pq.read_table` scans through Arrow's thread pools: a pool thread may drop the last
    reference to the Python bytes after the table came back, and if the interpreter is exiting
    by then it aborts the process ("terminate called without an active exception", exit -6,
    after the output was written; apache/arrow#34314; about 1 short run in 40 on a loaded
    2-core machine, caught with a core dump). `ParquetFile.read` without threads reads
    synchronously here, and the reader is closed before this returns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(pa.BufferReader(blob), pre_buffer=False) as reader:
        return reader.read(use_threads=False)


def save_figure(fig, path: str | Path) -> str:
    """Save a matplotlib figure as PNG to a local file or an object, atomically, and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=110, format="png")
    finally:
        plt.close(fig)
    return write_bytes(path, buffer.getvalue())
