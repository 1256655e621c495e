"""Asymmetric embedding models: queries and passages are embedded differently.

e5 (``query: `` / ``passage: ``), bge (an instruction before the query only) and nomic-embed
(``search_query: `` / ``search_document: ``) expect a text prefix; hosted providers (Cohere's
``input_type`` ``search_query``/``search_document``, Voyage's ``query``/``document``, Jina's
``task`` ``retrieval.query``/``retrieval.passage``) take a request field instead. Embedding a
question like a passage, or a passage like a question, costs these models recall, silently.

:class:`InputStyle` says which prefix and which request field value each *purpose* gets
(``"passage"``: a chunk to be stored; ``"query"``: a question). It is part of the embedder's
fingerprint (:meth:`InputStyle.fingerprint_options`): the passage side changes every stored vector,
and the query side decides whether a question can be compared with them, so an index is only ever
queried under the style it was built with (``check_embedder_matches``). Options left at their
defaults add nothing to the fingerprint, so indexes built before this existed keep theirs.

A prefix is part of what is sent: the provider bills its tokens, and the input limit applies to
prefix plus text, so the long-text policy counts both and a split text sends the prefix with each
piece (:func:`rag_assets.embedders.long_texts.plan_inputs`). Pure: no connection, no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PASSAGE = "passage"
QUERY = "query"
PURPOSES = (PASSAGE, QUERY)

DEFAULT_INPUT_TYPE_FIELD = "input_type"
MAX_PREFIX_CHARS = 1000
MAX_INPUT_TYPE_CHARS = 100
# request fields the client itself sets: an input type must not overwrite one of them
RESERVED_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def check_purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r}: use 'passage' (a chunk) or 'query' (a question)")
    return purpose


@dataclass(frozen=True)
class InputStyle:
    """How one embedder tells queries from passages: text prefixes and/or a request field value.

    ``input_type_field`` names the request body field the input types go in (``input_type`` for
    Cohere- and Voyage-style APIs, ``task`` for Jina's); only the OpenAI-compatible client sends it.
    """

    query_prefix: str = ""
    passage_prefix: str = ""
    query_input_type: str | None = None
    passage_input_type: str | None = None
    input_type_field: str = DEFAULT_INPUT_TYPE_FIELD

    def __post_init__(self) -> None:
        for name, value in (("RAG_EMBEDDING_QUERY_PREFIX", self.query_prefix),
                            ("RAG_EMBEDDING_PASSAGE_PREFIX", self.passage_prefix)):
            if len(value) > MAX_PREFIX_CHARS or "\x00" in value:
                raise ValueError(f"{name}: at most {MAX_PREFIX_CHARS} characters and no NUL")
        for name, value in (("RAG_EMBEDDING_QUERY_INPUT_TYPE", self.query_input_type),
                            ("RAG_EMBEDDING_PASSAGE_INPUT_TYPE", self.passage_input_type)):
            if value is not None and (not value.strip() or len(value) > MAX_INPUT_TYPE_CHARS or "\x00" in value):
                raise ValueError(f"{name}={value!r}: a non-empty value of at most {MAX_INPUT_TYPE_CHARS} characters")
        if not _FIELD.fullmatch(self.input_type_field) or self.input_type_field in RESERVED_FIELDS:
            raise ValueError(
                f"RAG_EMBEDDING_INPUT_TYPE_FIELD={self.input_type_field!r}: a JSON field name "
                f"(letters, digits, _) other than {', '.join(RESERVED_FIELDS)}"
            )

    @classmethod
    def from_settings(cls, settings) -> InputStyle:
        return cls(
            query_prefix=settings.embedding_query_prefix,
            passage_prefix=settings.embedding_passage_prefix,
            query_input_type=settings.embedding_query_input_type,
            passage_input_type=settings.embedding_passage_input_type,
            input_type_field=settings.embedding_input_type_field,
        )

    @property
    def uses_input_type(self) -> bool:
        return self.query_input_type is not None or self.passage_input_type is not None

    @property
    def is_symmetric(self) -> bool:
        return not (self.query_prefix or self.passage_prefix or self.uses_input_type)

    def prefix(self, purpose: str) -> str:
        return self.query_prefix if check_purpose(purpose) == QUERY else self.passage_prefix

    def input_type(self, purpose: str) -> str | None:
        return self.query_input_type if check_purpose(purpose) == QUERY else self.passage_input_type

    def request_fields(self, purpose: str) -> dict[str, str]:
        """The extra request body fields for texts of ``purpose`` (empty when it has no input type)."""
        value = self.input_type(purpose)
        return {} if value is None else {self.input_type_field: value}

    def fingerprint_options(self) -> dict[str, object]:
        """The options that go into the fingerprint: only those set, so a symmetric model's
        fingerprint is the one it always had."""
        out: dict[str, object] = {}
        if self.query_prefix:
            out["query_prefix"] = self.query_prefix
        if self.passage_prefix:
            out["passage_prefix"] = self.passage_prefix
        if self.uses_input_type:
            out["input_type_field"] = self.input_type_field
            if self.query_input_type is not None:
                out["query_input_type"] = self.query_input_type
            if self.passage_input_type is not None:
                out["passage_input_type"] = self.passage_input_type
        return out


SYMMETRIC = InputStyle()
