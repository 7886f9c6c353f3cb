"""Files on disk: written so that a crash, a kill or a full disk never leaves a half-written file in place;
sealed with their SHA-256 so that damage afterwards is found (`seal_folder`, `verify_folder`); and written by one
process at a time (`folder_lock`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afprobe.errors import AfprobeError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`. Inside `results_folder` the
    rename waits until the whole block has written (so a failure leaves every earlier file as it was)."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _replace(Path(temporary), path, bytes_sha256(data))


def _replace(temporary: Path, path: Path, digest: str | None) -> None:
    """Rename a finished temporary over `path`, now or, inside `results_folder`, when its block commits."""
    if _PENDING:
        pending = _PENDING[-1]
        earlier = pending.pop(path.resolve(), None)
        if earlier is not None:
            earlier[0].unlink(missing_ok=True)
        pending[path.resolve()] = (temporary, digest)
        return
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    stat = path.stat()
    if digest is not None:
        _WRITTEN[path.resolve()] = (stat.st_size, stat.st_mtime_ns, digest)
    else:
        _WRITTEN.pop(path.resolve(), None)


def exists_or_pending(path: Path) -> bool:
    """`path` is on disk, or written and waiting for its `results_folder` block to commit."""
    return path.exists() or any(path.resolve() in pending for pending in _PENDING)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any, **dumps: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, **dumps) + "\n")


def finite_json(value: Any) -> Any:
    """JSON has no infinity or NaN: write them as null."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return finite_json(value.item())
    return value


@contextmanager
def staged_writes(out: Path) -> Iterator[Path]:
    """For writers that are not ours (sae-lens, PEFT) and write several files in place: they write into a hidden
    folder inside `out`; on success each file is fsynced and renamed over its namesake in `out`. A crash or a full
    disk on the way leaves `out`'s earlier files as they were, never half of a new file (the hidden folder is removed,
    or, after a kill, ignored by seals and removed by the next run)."""
    import shutil

    for stale in out.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        yield staging
        staged = sorted(p for p in staging.rglob("*") if p.is_file())
        for path in staged:
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(path, 0o666 & ~_umask())
        for path in staged:
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            hidden = target.parent / f".{target.name}.{staging.name}.tmp"
            os.replace(path, hidden)
            _replace(hidden, target, None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Renames waiting for the innermost `results_folder` block to finish: final path -> (temporary, digest).
_PENDING: list[dict[Path, tuple[Path, str | None]]] = []
_TO_SEAL: list[list[Path]] = []


@contextmanager
def results_folder(out: Path) -> Iterator[Path]:
    """Create `out`; every file written inside the block (by `atomic_write_*` or `staged_writes`) is written in full
    and fsynced first, and only when the block has finished are they all renamed into place and the folder sealed
    (`SHA256SUMS`, see `seal_folder`). A failure inside (full disk, no permission, an error) leaves the folder's
    earlier files as they were, and becomes one error naming the fix. Nested blocks commit with the outermost."""
    outermost = not _PENDING
    if outermost:
        _PENDING.append({})
        _TO_SEAL.append([])
    pending, to_seal = _PENDING[0], _TO_SEAL[0]
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            yield out
            to_seal.append(out)
            if outermost:
                _PENDING.pop(), _TO_SEAL.pop()  # from here on, writes go straight to disk
                for path, (temporary, digest) in pending.items():
                    _replace(temporary, path, digest)
                sealed: set[Path] = set()
                for folder in to_seal:  # inner folders first: a folder's seal skips subfolders sealed on their own
                    if folder.resolve() not in sealed:
                        seal_folder(folder)
                        sealed.add(folder.resolve())
        except OSError as exc:
            raise AfprobeError(
                f"could not write to {out} ({exc.strerror or exc}): free disk space or change --out"
            ) from exc
    finally:
        if outermost:
            if _PENDING and _PENDING[0] is pending:
                _PENDING.pop(), _TO_SEAL.pop()
            for temporary, _ in pending.values():  # renamed ones are gone already
                temporary.unlink(missing_ok=True)


# -- checksums ------------------------------------------------------------------------------------------------------

# Each sealed folder lists its files' SHA-256 here, in `sha256sum` format (`sha256sum -c SHA256SUMS` checks it too).
CHECKSUMS = "SHA256SUMS"
LOCK_FILE = ".afprobe.lock"

# (size, mtime, digest) of the bytes this process wrote, so sealing a folder records what was meant to be written
# rather than whatever is on disk by then (a file since replaced by other means no longer matches size and mtime).
_WRITTEN: dict[Path, tuple[int, int, str]] = {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sealed_files(folder: Path) -> list[Path]:
    """The files a seal of `folder` covers: every file below it, except hidden ones (temporaries, the lock) and the
    files of subfolders that carry their own seal."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if not (path / CHECKSUMS).is_file():
                found += _sealed_files(path)
        elif path.is_file() and path.name != CHECKSUMS:
            found.append(path)
    return found


def seal_folder(folder: Path) -> Path:
    """Write `folder/SHA256SUMS` for every file the seal covers."""
    lines = []
    for path in _sealed_files(folder):
        stat = path.stat()
        size, mtime, digest = _WRITTEN.get(path.resolve(), (-1, -1, ""))
        if (size, mtime) != (stat.st_size, stat.st_mtime_ns):
            digest = file_sha256(path)
        lines.append(f"{digest}  {path.relative_to(folder).as_posix()}\n")
    target = folder / CHECKSUMS
    atomic_write_text(target, "".join(lines))
    return target


@dataclass(frozen=True)
class Damage:
    """One file that is not what was written."""

    path: Path
    problem: str  # "changed", "missing", "unreadable"

    def describe(self) -> str:
        return f"{self.path}: {self.problem}"


def read_checksums(folder: Path) -> dict[str, str]:
    """`name -> sha256` from `folder/SHA256SUMS` (empty when the folder is not sealed)."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return {}
    listed = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name:
            listed[name] = digest
    return listed


def verify_folder(folder: Path) -> list[Damage]:
    """Every file listed in `folder/SHA256SUMS` that is missing or differs from its checksum."""
    damage = []
    for name, digest in read_checksums(folder).items():
        path = folder / name
        if not path.is_file():
            damage.append(Damage(path, "missing"))
            continue
        try:
            if file_sha256(path) != digest:
                damage.append(Damage(path, "changed since it was written (checksum differs)"))
        except OSError as exc:
            damage.append(Damage(path, f"unreadable ({exc.strerror or exc})"))
    return damage


# -- one writer per folder ------------------------------------------------------------------------------------------


_HELD: set[Path] = set()


class FolderLocked(AfprobeError):
    """Another process is writing the folder."""


@contextmanager
def folder_lock(folder: Path, what: str = "afprobe") -> Iterator[Path]:
    """Hold `folder`'s writer lock while inside; another process asking for it gets a `FolderLocked` naming the
    holder. The lock is the operating system's (`flock`), so a killed holder releases it at once and the next job
    takes it over; the lock file itself stays (hidden) and says who held it last."""
    import fcntl
    import socket

    key = folder.resolve()
    if key in _HELD:  # this process holds it already (a command that calls a job which locks the same folder)
        yield folder / LOCK_FILE
        return
    path = folder / LOCK_FILE
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError as exc:
        raise AfprobeError(f"cannot write to {folder} ({exc.strerror or exc}): choose a writable folder") from exc
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderLocked(
                f"{folder} is being written by {holder}: wait for that job to finish, or write to another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} on {socket.gethostname()} ({what}, since {started})\n")
        handle.flush()
        _HELD.add(key)
        try:
            yield path
        except BaseException:
            # A job that fails before writing anything leaves no folder behind.
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                path.unlink()
                folder.rmdir()
            raise
        finally:
            _HELD.discard(key)
    finally:
        handle.close()  # closing the descriptor releases the lock
