"""The embedded tiny model: a small ChatGLM pretrained on the bundled corpus, so the course runs without a GPU.

:mod:`~helpers.tiny.build` builds it (vocabulary, pretraining, INT4, the public layout) and finds the committed or
cached copy; :mod:`~helpers.tiny.pretraining` makes the instruction-style exercises it is pretrained on.
"""

from .build import (  # noqa: F401
    BUILD_DESCRIPTION,
    SHIPPED_DIR,
    TinyRecipe,
    build_from_options,
    build_tiny,
    ensure_tiny,
    parser,
    shipped_tiny,
    source_files,
    tiny_dir,
)
