"""File-system helpers shared by the data and model writers."""

from __future__ import annotations

import os
from pathlib import Path


def file_mode(path: Path) -> int:
    """The mode to give a rewritten file: the existing one's, else the umask default."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
