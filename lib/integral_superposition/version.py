"""Package version and code version (version plus a hash of the library's source)."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

try:
    __version__ = metadata.version("integral-superposition")
except metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"


@functools.cache
def library_source_hash() -> str:
    """SHA-256 over the library's ``.py`` files (path and content), in sorted order."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def code_version() -> str:
    """``"<version>+<first 12 hex of the library hash>"``: changes whenever ``lib/`` changes."""
    return f"{__version__}+{library_source_hash()[:12]}"
