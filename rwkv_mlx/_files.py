"""Atomic file writes, shared by every writer in the package."""

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[IO], None], text: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    An interrupted write never leaves a partial file under the final name, and
    an existing file there stays intact until the rename. The file gets the
    permissions a plain ``open(path, "w")`` would give (0666 less the umask),
    not the 0600 of a temporary file.

    Args:
        path (Path): The file to write.
        write (Callable[[IO], None]): Writes the contents to the open file.
        text (bool): Open the file in UTF-8 text mode instead of binary.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_new_directory(path: Path, flag: str) -> None:
    """Raise unless ``path`` can become a new directory without replacing anything.

    A missing path or an empty directory passes. A file, or a directory with
    anything in it (a model that would be overwritten, say), is rejected
    before any work starts.

    Args:
        path (Path): The directory a command is about to write.
        flag (str): The command-line flag that named it, for the message.

    Raises:
        FileExistsError: ``path`` is a file or a non-empty directory.
    """
    path = Path(path)
    if path.is_dir():
        if any(path.iterdir()):
            raise FileExistsError(f"{flag} {path} already exists and is not empty; choose another {flag} or remove it")
    elif path.exists():
        raise FileExistsError(f"{flag} {path} is a file, not a directory; choose another {flag}")
