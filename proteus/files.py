"""Files a run writes: atomic writes, the stale temporary files of killed writes, and write
errors as one line.

Every file is written to a temporary name in its own folder (``.NAME.tmpPID``), flushed to the
disk, and renamed over ``NAME``: a reader sees the old file or the new one, never half of one,
and a full disk or a read-only folder leaves the old file as it was. A write killed midway
(``kill -9``, power loss) leaves only its temporary file, which :func:`remove_stale_temps`
deletes on the next run into that folder and every reader ignores.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from proteus.errors import ProteusError


class OutputError(ProteusError):
    """A file cannot be written (full disk, read-only or missing folder): the message names the
    file and the reason; nothing final was half-written."""


_TEMP = re.compile(r"^\.?(?P<name>.+)\.tmp(?P<pid>\d+)$")


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before the rename (this process's temporary name)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | os.PathLike, chunks: bytes | Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically (temporary name, fsync, rename, fsync of the
    folder); OutputError with one line if the disk or folder refuses."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            for chunk in [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the write error above is the one to report


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of killed writes in ``folder`` (not recursive): those whose
    process is gone. Returns what was deleted."""
    out = []
    folder = Path(folder)
    if not folder.is_dir():
        return out
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m["pid"])):
            try:
                p.unlink()
                out.append(p)
            except OSError:
                pass
    return out


