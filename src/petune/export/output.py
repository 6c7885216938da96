"""Writing an export so that the output path holds either the previous file or the whole new one, never half."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from petune.train import UserError


def check_free(path: Path, overwrite: bool) -> None:
    """A `UserError` when `path` exists (an empty folder does not count) and `overwrite` is not set."""
    taken = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if taken and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output(path: Path, overwrite: bool, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write into; moved onto `path` when the block ends without error.

    An error (or Ctrl-C) inside the block removes the temporary file and leaves `path` as it was. A file
    is replaced in one `os.replace`; a folder is swapped with two renames (the old one is removed after).
    """
    check_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o755 if folder else 0o644)  # mkstemp/mkdtemp make it private
        _move_into_place(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


def _move_into_place(temporary: Path, path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists() or not (path.is_dir() or temporary.is_dir()):
        os.replace(temporary, path)  # a file onto a file (or onto nothing): one atomic step
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    os.replace(path, old)
    os.replace(temporary, path)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def write_text(path: Path, text: str, overwrite: bool) -> None:
    """`text` into `path`, atomically; refused when `path` exists and `overwrite` is not set."""
    with atomic_output(path, overwrite) as temporary:
        temporary.write_text(text)
