"""What kind of failure an exception is, as an exit code, and the one line that names its cause.

Why: a failure on the default path used to end in ~130 lines of Dagster output whose last line
("Error occurred while executing op ...") dropped the cause, and every failure exited 2. Scripts
and orchestrators need to tell "fix your settings" from "the database is down" from "the
embedding API refused us" without parsing text; people need the cause on the last line.
"""

from __future__ import annotations

from collections.abc import Iterator

EXIT_UNEXPECTED = 1  # a bug: the line says so and how to see the traceback
EXIT_SETTINGS = 2  # a setting or argument is wrong
EXIT_SOURCE = 3  # the source: a missing folder, another folder than the index's, a refused mass delete
EXIT_DATABASE = 4  # PostgreSQL unreachable or unusable (self-check failed)
EXIT_EMBEDDING = 5  # the embedding provider failed for good
EXIT_INDEXING = 6  # a refresh failed for another reason (its message names the document or shard)

EXIT_CODES = {
    "settings": EXIT_SETTINGS,
    "source": EXIT_SOURCE,
    "database": EXIT_DATABASE,
    "embedding": EXIT_EMBEDDING,
    "indexing": EXIT_INDEXING,
    "unexpected": EXIT_UNEXPECTED,
}

# Exception class names, as Dagster's serialized errors carry them (``cls_name``), by kind.
_KIND_BY_CLASS = {
    "SourceMismatch": "source",
    "MassDeleteRefused": "source",
    "FileNotFoundError": "source",
    "SettingsError": "settings",
    "EmbeddingError": "embedding",
    "TextTooLongError": "embedding",
    "ServerCheckError": "database",
    "OperationalError": "database",
    "ConnectionError": "database",
    "EmbeddedServerError": "database",
}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]


def classify(e: BaseException) -> str:
    """The kind of a failure: the most specific kind found along its cause chain."""
    for link in _chain(e):
        kind = getattr(link, "kind", None)
        if kind in EXIT_CODES:
            return kind
        for cls in type(link).__mro__:
            if cls.__name__ in _KIND_BY_CLASS:
                return _KIND_BY_CLASS[cls.__name__]
    import psycopg

    if any(isinstance(x, psycopg.OperationalError) for x in _chain(e)):
        return "database"
    from rag_assets.settings import SettingsError

    if isinstance(e, SettingsError | ValueError):
        return "settings"
    if isinstance(e, RuntimeError):
        return "indexing"
    return "unexpected"


def kind_of_class_names(names: list[str]) -> str | None:
    """The kind of a failure known only by its class names (a Dagster step's error chain)."""
    for n in names:
        if n in _KIND_BY_CLASS:
            return _KIND_BY_CLASS[n]
    return None


def one_line(text: str, limit: int = 2000) -> str:
    """Messages on one line, control characters escaped (file names may hold any of them)."""
    import re

    out = []
    for ch in re.sub(r"[\r\n\t]+", " ", str(text)).strip():
        o = ord(ch)
        out.append(ch if o >= 32 and o != 127 and not 0x80 <= o < 0xA0 else f"\\x{o:02x}")
    s = "".join(out)
    return s if len(s) <= limit else s[: limit - 1] + "…"
