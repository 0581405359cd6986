"""Where the course's files live: bundled data, and the cache for downloads and the built tiny model."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def cache_root() -> Path:
    """``$CHATGLM_COURSE_CACHE``, else ``~/.cache/chatglm-course``."""
    return Path(os.environ.get("CHATGLM_COURSE_CACHE") or Path.home() / ".cache" / "chatglm-course")
