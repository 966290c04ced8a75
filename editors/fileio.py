"""The one way knowledger writes a file: atomically, never through a symlink, with a set mode.

Torch-free on purpose (the agent's lock and workspace code and the CLI may use it without loading a
model). Every file knowledger leaves on disk — caches, snapshots, checkpoints, exported folders,
benchmark results — goes through one of these:

- `atomic_write_bytes(path, data)` / `atomic_write_text(path, text)`: a temporary file beside
  `path` (same directory, so the rename is atomic), written, optionally fsynced, chmod-ed to `mode`
  (0644 by default: caches are meant to be shared), renamed over `path`. On any error the
  temporary file is removed and `path` is untouched. A `path` that is a symlink is refused, never
  followed; so is a path whose parents below `root` include a symlink.
- `atomic_dir(dest)`: a context manager yielding a temporary directory beside `dest`; on a clean
  exit it is chmod-ed and renamed to `dest` (which must not exist or be an empty directory), on an
  error removed.
- `open_no_follow(path, flags)`: `os.open` with O_NOFOLLOW (and O_CLOEXEC), for files that are
  opened in place (the workspace lock): a symlink at `path` raises `UnsafePath`.
- `check_inside(path, root)`: the resolved path is inside the resolved root and no component from
  `root` down to `path` is a symlink.

A symlink inside a workspace or cache is how a workspace received from someone else could make
knowledger write to any file of the user who opens it; refusing them everywhere closes that door.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["UnsafePath", "atomic_write_bytes", "atomic_write_text", "atomic_dir", "open_no_follow",
           "check_inside", "check_not_symlink", "sha256_bytes", "sha256_file"]


class UnsafePath(OSError):
    """A path knowledger will not write through: a symlink, or outside the folder it belongs to."""


def check_not_symlink(path: str | os.PathLike) -> Path:
    """`path` itself must not be a symlink (a missing path is fine); returns it as a Path."""
    p = Path(path)
    if p.is_symlink():
        raise UnsafePath(f"refusing to write through a symlink: {p}")
    return p


def check_inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """`path` resolves inside `root`, and no existing component from `root` down is a symlink."""
    p, r = Path(path), Path(root)
    try:
        rel = p.absolute().relative_to(r.absolute())
    except ValueError:
        raise UnsafePath(f"{p} is outside {r}") from None
    cur = r.absolute()
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            raise UnsafePath(f"refusing to write through a symlink: {cur}")
    if not p.resolve().is_relative_to(r.resolve()):
        raise UnsafePath(f"{p} resolves outside {r}")
    return p


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """os.open(path, flags | O_NOFOLLOW | O_CLOEXEC); a symlink at `path` raises UnsafePath.

    Never pass O_TRUNC for a file that is only locked: opening must not change its contents.
    """
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if Path(path).is_symlink():
            raise UnsafePath(f"refusing to open a symlink: {path}") from e
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644, fsync: bool = True,
                       root: str | os.PathLike | None = None,
                       halfway: Callable[[], None] | None = None) -> Path:
    """Write `data` to `path` atomically (see the module docstring); returns the path.

    `halfway` is called once half of `data` is in the temporary file (fault-injection tests kill
    the process there)."""
    path = check_not_symlink(path)
    if root is not None:
        check_inside(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if halfway is not None:
                f.write(data[:len(data) // 2])
                f.flush()
                halfway()
                f.write(data[len(data) // 2:])
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        check_not_symlink(path)  # again: someone may have planted one while we wrote
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", **kw) -> Path:
    """atomic_write_bytes for text."""
    return atomic_write_bytes(path, text.encode(encoding), **kw)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, mode: int = 0o755, file_mode: int = 0o644,
               replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside `dest`, then rename it into place.

    `dest` must not exist, or be an empty directory; with replace=True an existing directory is
    swapped out after the new one is complete. Files inside get `file_mode`, folders `mode`.
    """
    dest = check_not_symlink(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not replace and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} already exists and is not an empty directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        for folder, dirs, files in os.walk(tmp):
            os.chmod(folder, mode)
            for name in files:
                f = Path(folder) / name
                if not f.is_symlink():
                    os.chmod(f, file_mode)
        check_not_symlink(dest)
        if dest.exists():
            if replace and any(dest.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
                os.replace(dest, old / dest.name)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                dest.rmdir()
                os.replace(tmp, dest)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | os.PathLike, name: str) -> int:
    """Remove temporaries that a killed writer left for `name` in `folder`; returns how many."""
    n = 0
    for p in Path(folder).glob(f".{name}.*"):
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(p.lstat().st_mode):
                shutil.rmtree(p)
            else:
                p.unlink()
            n += 1
    return n


def sha256_bytes(*chunks: bytes) -> str:
    """Hex sha256 of the concatenated chunks."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
