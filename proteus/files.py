"""Files a run writes and reads: atomic writes, the stale temporary files of killed writes,
bounded reads of files given by path, JSON read with depth and size limits, sealed JSON, and
every failure as one line.

Every file is written to a temporary name in its own folder (``.NAME.tmpPID``), flushed to the
disk, and renamed over ``NAME``: a reader sees the old file or the new one, never half of one,
and a full disk or a read-only folder leaves the old file as it was. A write killed midway
(``kill -9``, power loss) leaves only its temporary file, which :func:`remove_stale_temps`
deletes on the next run into that folder and every reader ignores.

Reading: :func:`read_bounded` opens a file without blocking, refuses anything that is not a
regular file (a folder, a device such as ``/dev/zero``, a FIFO, a socket) and anything larger
than its limit, before a byte is read; with ``follow=False`` a symbolic link is refused too.
:func:`read_json` adds UTF-8, a nesting-depth limit checked before parsing (no
``RecursionError``) and the JSON syntax, each refused in one line naming the file.

Sealed JSON (:func:`seal_json`): the object gets a ``"seal"`` member holding a format tag, what
the file is bound to (``binds``: e.g. the SHA-256 of the artifact a summary describes) and the
SHA-256 of the canonical JSON of everything else. A hand edit, a flipped byte or a file of
another kind is refused on read. The digest is not keyed: it detects edits and damage, and ties
files together; it does not stop someone who recomputes it on purpose, which is why ``proteus
submit`` also recomputes every score it publishes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from proteus.errors import ProteusError


class OutputError(ProteusError):
    """A file cannot be written (full disk, read-only or missing folder): the message names the
    file and the reason; nothing final was half-written."""


class InputError(ProteusError):
    """A file given by path that is refused before it is used: missing, not a regular file,
    too large, a symbolic link where none is allowed, not UTF-8 JSON, nested too deep, or a
    sealed file whose seal does not match. The message names the file."""


MAX_JSON_BYTES = 16 << 20  # a run's JSON files are kilobytes; a summary with losses, < 1 MB
MAX_JSON_DEPTH = 32  # the deepest JSON proteus writes nests 4 levels
SEAL_KEY = "seal"

# the temporary name atomic_write uses: a leading dot, the file's name, ".tmp", the writer's pid
# (files of older writers have no dot)
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
        fsync_dir(path.parent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the write error above is the one to report


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def fsync_dir(folder: Path) -> None:
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


def stale_pid(pid: int) -> bool:
    """Whether the process ``pid`` that named a temporary file is gone."""
    return not _alive(pid)


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


def remove_stale_temps(folder: str | os.PathLike, names=None) -> list[Path]:
    """Delete the temporary files of killed writes in ``folder`` (not recursive): regular
    files named as :func:`temp_path` names them (``.NAME.tmpPID``) whose process is gone, and,
    with ``names`` (a function of NAME), only those of the files that folder's writer writes: a
    user's ``notes.tmp123`` is never touched. Returns what was deleted."""
    out = []
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return out
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if not m or (names is not None and not names(m["name"])):
            continue
        try:
            regular = stat.S_ISREG(os.lstat(p).st_mode)
        except OSError:
            continue
        if regular and not _alive(int(m["pid"])):
            try:
                p.unlink()
                out.append(p)
            except OSError:
                pass
    return out


# ---------------------------------------------------------------------------------------------
# Bounded reads


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _size_text(n: int) -> str:
    return f"{n:,} bytes" if n < 1 << 20 else f"{n / 2**20:,.1f} MiB"


def check_file(path: str | os.PathLike, what: str, limit: int, *, follow: bool = True) -> int:
    """The size of the regular file ``path``, or InputError (one line): missing, a folder, a
    device, a FIFO or a socket, larger than ``limit`` bytes, or (``follow=False``) a symbolic
    link. For files a library opens itself (the tokenizer): nothing is read here."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise InputError(f"{what} {path} not found") from None
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return _check_stat(st, path, what, limit)


def _check_stat(st: os.stat_result, path, what: str, limit: int) -> int:
    if stat.S_ISLNK(st.st_mode):
        raise InputError(f"{what} {path} is a symbolic link; only the file itself is read")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise InputError(f"{what} {path} is {_size_text(st.st_size)}, over the "
                         f"{_size_text(limit)} limit for such a file")
    return st.st_size


def read_bounded(path: str | os.PathLike, what: str, limit: int, *, follow: bool = True
                 ) -> bytes:
    """Every byte of the regular file ``path``, refused before reading (InputError, one line)
    when :func:`check_file` would refuse it; a file that grows past ``limit`` while it is read
    is refused too. Opening never blocks (a FIFO is refused, not waited on)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{what} {path} not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise InputError(f"{what} {path} is a symbolic link; only the file itself is "
                             "read") from None
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        _check_stat(os.fstat(fd), path, what, limit)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise InputError(f"{what} {path} grew past the {_size_text(limit)} limit while "
                                 "it was read")
        return b"".join(chunks)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, what: str, limit: int) -> tuple[str, int]:
    """(SHA-256 hex, size) of a regular file that is not a symbolic link, read bounded."""
    raw = read_bounded(path, what, limit, follow=False)
    return hashlib.sha256(raw).hexdigest(), len(raw)


# ---------------------------------------------------------------------------------------------
# JSON with limits


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``raw`` (strings skipped),
    counted without recursion."""
    b = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    if not b.size:
        return 0
    step = (np.isin(b, (ord("["), ord("{"))).astype(np.int32)
            - np.isin(b, (ord("]"), ord("}"))).astype(np.int32))
    return int(np.cumsum(step).max(initial=0))


def parse_json(raw: bytes, where: str, max_depth: int = MAX_JSON_DEPTH):
    """JSON from bytes: UTF-8, nested at most ``max_depth`` deep, valid syntax; InputError
    (one line naming ``where``) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where} is not UTF-8 text (byte {e.start}); it is not JSON "
                         "written by proteus") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise InputError(f"{where} nests {depth} levels deep, more than the {max_depth} a "
                         "proteus file has; it is not read")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{where} is not JSON ({str(e).splitlines()[0][:80]})") from None


def read_json(path: str | os.PathLike, what: str, limit: int = MAX_JSON_BYTES, *,
              follow: bool = True, max_depth: int = MAX_JSON_DEPTH):
    """A JSON file given by path, read bounded (:func:`read_bounded`) and parsed with a depth
    limit (:func:`parse_json`)."""
    return parse_json(read_bounded(path, what, limit, follow=follow), f"{what} {path}",
                      max_depth)


# ---------------------------------------------------------------------------------------------
# Sealed JSON


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True).encode()


def json_digest(obj) -> str:
    """SHA-256 of ``obj``'s canonical JSON (sorted keys, no spaces): the same for an object and
    for the object read back from any file :func:`atomic_write_json` wrote of it."""
    return hashlib.sha256(_canonical(json.loads(json.dumps(obj)))).hexdigest()


def seal_json(obj: dict, kind: str, binds: dict | None = None) -> dict:
    """``obj`` with a ``"seal"`` member: ``kind`` (a format tag), ``binds`` and the SHA-256 of
    the canonical JSON of the whole (the digest itself left out)."""
    body = json.loads(json.dumps({k: v for k, v in obj.items() if k != SEAL_KEY}))
    seal = {"format": kind, "binds": json.loads(json.dumps(binds or {}))}
    seal["sha256"] = hashlib.sha256(_canonical({**body, SEAL_KEY: seal})).hexdigest()
    return {**body, SEAL_KEY: seal}


def verify_json_seal(obj, kind: str, where: str) -> tuple[dict, dict]:
    """(body without the seal, binds) of a sealed object, or InputError (one line): not an
    object, no seal (an older proteus, or not proteus's), another kind of file, or an edit."""
    seal = obj.get(SEAL_KEY) if isinstance(obj, dict) else None
    if not isinstance(seal, dict):
        raise InputError(f"{where} has no seal (written by an older proteus, or not by "
                         "proteus); it is not trusted")
    if seal.get("format") != kind:
        raise InputError(f"{where} is sealed as {seal.get('format')!r}, not a {kind} file")
    digest = seal.get("sha256")
    binds = seal.get("binds")
    if not isinstance(digest, str) or not isinstance(binds, dict):
        raise InputError(f"{where}: its seal is malformed; the file is damaged")
    body = {k: v for k, v in obj.items() if k != SEAL_KEY}
    unsealed = {"format": kind, "binds": binds}
    if hashlib.sha256(_canonical({**body, SEAL_KEY: unsealed})).hexdigest() != digest:
        raise InputError(f"{where} was changed after it was written (its SHA-256 seal does not "
                         "match); it is not trusted")
    return body, binds


def write_sealed_json(path: str | os.PathLike, obj: dict, kind: str,
                      binds: dict | None = None) -> None:
    """:func:`seal_json`, written atomically."""
    atomic_write_json(path, seal_json(obj, kind, binds))


def read_sealed_json(path: str | os.PathLike, kind: str, what: str,
                     limit: int = MAX_JSON_BYTES) -> tuple[dict, dict]:
    """(body, binds) of a sealed JSON file: bounded read, no symbolic link, depth limit, seal
    checked."""
    return verify_json_seal(read_json(path, what, limit, follow=False), kind, f"{what} {path}")


