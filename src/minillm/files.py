"""Writing files so that nothing is lost: every file the package writes goes through here.

The rules, for every writer in the package (tokenizers, manifests, exports, checkpoints):

* A file is written to a unique temporary name in the target's folder, flushed and fsynced, then
  renamed over the target, and the folder is fsynced. A crash or a full disk leaves either the old
  file or the new one, never half of either, and never a stray temporary file.
* An output that names one of the command's inputs is refused.
* An existing output is kept unless the caller passes ``overwrite=True`` (``--force`` on the CLI).
* An artifact of several files is written into a temporary folder that is renamed into place, so
  that its files always belong together.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

PathLike = str | os.PathLike[str]


class OutputError(ValueError):
    """An output path that would lose data: it names an input, or exists without overwrite."""


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable. Not every platform can open a folder (Windows cannot).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output(
    path: PathLike, *, inputs: Iterable[PathLike] = (), overwrite: bool = False, what: str = "output"
) -> Path:
    """Validate an output path before any work is done; returns it as a Path.

    Refuses an empty path, a path that is one of `inputs` (or lies inside an input folder), and an
    existing path unless `overwrite`. An existing folder is never replaced by a file.
    """
    if path is None or str(path) == "":
        raise OutputError(f"the {what} path is empty; give a file name")
    out = Path(path)
    resolved = out.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if resolved == src or (src.is_dir() and resolved.is_relative_to(src)):
            raise OutputError(f"the {what} {str(out)!r} is also an input; write it somewhere else")
    if out.exists() and not overwrite:
        raise OutputError(f"{str(out)!r} exists; choose another {what} path, or pass overwrite=True (--force)")
    if not out.parent.exists():
        raise OutputError(f"the folder of the {what} {str(out)!r} does not exist; create it first")
    return out


def atomic_write(
    path: PathLike,
    data: bytes | str | Callable[[Path], None],
    *,
    overwrite: bool = True,
    inputs: Iterable[PathLike] = (),
    encoding: str = "utf-8",
) -> Path:
    """Write `data` to `path` atomically.

    `data` is bytes, text (written with `encoding`), or a function that writes the file at the
    temporary path it is given (for libraries such as safetensors that want a file name). The
    defaults suit internal writers; user-facing commands pass ``overwrite=args.force``.
    """
    out = check_output(path, inputs=inputs, overwrite=overwrite)
    if out.is_dir():
        raise OutputError(f"{str(out)!r} is a folder; give a file name")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
            with os.fdopen(fd, "wb") as f:
                fd = -1
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)
    return out


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Build a folder of files under a temporary name, then move it into place as one step.

    Usage::

        with atomic_dir("export") as tmp:
            (tmp / "config.json").write_text(...)
            (tmp / "model.safetensors").write_bytes(...)

    On success the old folder (if `overwrite`) is replaced whole; on any exception the temporary
    folder is removed and the old one is untouched. Between the two renames of a replacement the
    old folder sits beside the target as ``.NAME.old-*`` and is removed right after.
    """
    out = check_output(path, inputs=inputs, overwrite=overwrite)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{str(out)!r} is a file, not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
