"""rag_assets: an incremental index manager for retrieval-augmented generation.

``rag_assets.RagIndex`` (the Dagster component) and ``rag_assets.build_rag_index_defs`` (the
factory) are imported lazily: the CLI must not pay for importing Dagster when a command does not
need it.
"""

__version__ = "0.1.0"

_LAZY = {"RagIndex": "rag_assets.component", "build_rag_index_defs": "rag_assets.defs.factory"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rag_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
