"""Files published whole: a reader sees the old content or the new, never a torn write, and the
rename survives a power cut (temp file + fsync + os.replace + fsync of the directory)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    """Make a rename or creation in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temp file beside `path`; it is then fsynced and renamed onto `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path`, published whole."""
    publish(path, lambda tmp: tmp.write_text(text))
