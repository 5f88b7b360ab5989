"""Atomic writes: everything is written under a temporary sibling name, then `os.replace`d.

A reader never sees half a file or half a directory, and a failed write leaves the target as it
was (absent, or the previous version). Temporary names are `.<name>.tmp-<8 hex>` in the target's
folder (same filesystem, so the final rename is atomic); they are removed on failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from mergejax.io.cli_errors import OutputExistsError

# `.<name>.tmp-<8 hex>` (a write in progress) and `.<name>.old-<8 hex>` (the previous version,
# set aside for the instant of the swap in `atomic_dir`): the only names this module creates.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-[0-9a-f]{8}$")


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A fresh hidden name beside `path`: `<folder>/.<name>.<tag>-<8 hex>` (not created)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def temp_tag(tmp: str | os.PathLike) -> int:
    """The random part of a `temp_sibling` name as an integer (to tell other processes which
    temporary folder to write into: `with_temp_tag` rebuilds the name)."""
    m = _TEMP_NAME.match(Path(tmp).name)
    if m is None:
        raise ValueError(f"{tmp} is not a temporary name of mergejax.io.atomic")
    return int(Path(tmp).name.rsplit("-", 1)[1], 16)


def with_temp_tag(path: str | os.PathLike, tag: int, kind: str = "tmp") -> Path:
    """The `temp_sibling` name of `path` whose random part is `tag` (from `temp_tag`)."""
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}.{kind}-{tag:08x}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary file path beside `path`; on a clean exit it replaces `path`.

    Write the file at the yielded path inside the block. On an exception the temporary file is
    removed and `path` is left untouched. The parent folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Writes `text` to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh empty temporary directory beside `path`; on a clean exit it becomes `path`.

    An existing `path` (file or directory) is replaced: it is first renamed aside
    (`.<name>.old-<hex>`), the new directory renamed into place, then the old one deleted; if
    the second rename fails the old one is put back. On an exception inside the block the
    temporary directory is deleted and `path` is left as it was.
    """
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temp_sibling(path), temp_sibling(path, "old")
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():  # put the previous version back
                os.replace(old, path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():  # never delete the only copy
            _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike, *, older_than_s: float = 600.0
                             ) -> list[Path]:
    """Deletes the leftovers of killed atomic writes directly inside `folder`; returns them.

    Only names this module creates are touched (`.<name>.tmp-<8 hex>` files or directories,
    and `.<name>.old-<8 hex>`), never anything else, and only those last modified more than
    `older_than_s` seconds ago (a concurrent writer's temporary is younger; pass 0 when a lock
    guarantees there is none). An `.old-` leftover whose `<name>` is missing is the only copy
    (a kill between the two renames of `atomic_dir`): it is renamed back to `<name>` instead of
    deleted. A missing `folder` is not an error. Symlinks are unlinked, never followed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done: list[Path] = []
    now = time.time()
    for entry in sorted(folder.iterdir()):
        m = _TEMP_NAME.match(entry.name)
        if m is None:
            continue
        try:
            if now - entry.lstat().st_mtime < older_than_s:
                continue
            target = folder / m.group("name")
            if m.group("tag") == "old" and not os.path.lexists(target):
                os.replace(entry, target)  # the only copy: put it back
            else:
                _remove(entry)
            done.append(entry)
        except FileNotFoundError:  # removed meanwhile by someone else
            continue
    return done


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_path(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                      overwrite: bool = False, flag: str = "--overwrite",
                      what: str = "output") -> Path:
    """Refuses an output `path` that would destroy something; returns it made absolute.

    Raises OutputExistsError (a usage error, exit 2 in the CLIs) if `path` is, contains or is
    inside one of `inputs` (whatever `overwrite` says), or exists and is not empty (a non-empty
    directory, or a file) unless `overwrite`. Symlinks are resolved for the comparison.
    """
    out = Path(os.path.abspath(path))
    real = Path(os.path.realpath(out))
    for i in inputs:
        src = Path(os.path.abspath(i))
        if _overlaps(out, src) or _overlaps(real, Path(os.path.realpath(src))):
            rel = ("is the input" if real == Path(os.path.realpath(src)) or out == src
                   else "is inside the input" if src in out.parents or
                   Path(os.path.realpath(src)) in real.parents else "contains the input")
            raise OutputExistsError(f"{what} {out} {rel} {src}; writing it would replace the "
                                    "input: choose another output path")
    if out.is_dir() and not out.is_symlink():
        if any(out.iterdir()) and not overwrite:
            raise OutputExistsError(f"{what} {out} exists and is not empty; pass {flag} to "
                                    "replace it, or choose another path")
    elif os.path.lexists(out) and not overwrite:
        raise OutputExistsError(f"{what} {out} exists; pass {flag} to replace it, or choose "
                                "another path")
    return out
