"""``rag_assets.RagIndex``: one RAG index as a Dagster component (``dg scaffold defs rag_assets.RagIndex NAME``).

The attributes are the index's settings, grouped as a user thinks of them (source, database,
chunker, embedder, snapshots, automation, service, hnsw). Each scalar attribute stands for one
``RAG_*`` variable and goes through the same parser and checks (``settings.settings_from_attributes``),
so a bad value fails ``dg check defs`` with the attribute's name. Secrets never appear: attributes
name the variables (``embedder.api_key_env``) that the runs read. Relative paths are resolved
against the project root, where ``dg`` runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field


class Source(dg.Model, dg.Resolvable):
    path: str | None = Field(None, description="Folder to index (relative to the project root).")
    uri: str | None = Field(None, description="s3://bucket/prefix (or a folder); wins over path. boto3's standard configuration.")
    s3_get_concurrency: int | None = None
    s3_max_attempts: int | None = None
    include: list[str] | None = Field(None, description="Glob patterns of the files to index.")
    exclude: list[str] | None = Field(None, description="Glob patterns to leave out.")
    max_doc_bytes: int | None = None
    max_metadata_bytes: int | None = None
    max_delete_fraction: float | None = Field(
        None, description="A refresh deleting more than this fraction of the documents is refused."
    )


class Database(dg.Model, dg.Resolvable):
    url: str | None = Field(
        None, description="PostgreSQL URL without a password (else use url_env). Unset: the embedded server."
    )
    url_env: str | None = Field(None, description="Variable holding the URL, read by the runs (default RAG_DATABASE_URL).")
    pg_schema: str | None = Field(None, description="The index's own Postgres schema (default rag_<name>).")


class Chunker(dg.Model, dg.Resolvable):
    kind: Literal["structure", "fixed"] | None = None
    max_tokens: int | None = None


# Sections are Resolvable so that `{{ env.X }}` templates resolve inside them too. The embedder's
# field `model` (the users' word for it) shadows Resolvable's classmethod `model` only on instances:
# pydantic keeps fields out of the class namespace, so Dagster's `Embedder.model()` still works
# (tests/test_integration_dg.py resolves a templated section and an embedder model).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "model" in "Embedder" shadows', category=UserWarning)

    class Embedder(dg.Model, dg.Resolvable):
        provider: Literal["hashing", "openai", "local"] | None = None
        model: str | None = None
        dimensions: int | None = None
        base_url: str | None = None
        api_key_env: str | None = Field(None, description="Variable holding the API key (default RAG_EMBEDDING_API_KEY).")
        batch_size: int | None = None
        batch_tokens: int | None = None
        concurrency: int | None = None
        rpm: int | None = None
        tpm: int | None = None
        timeout_s: float | None = None
        max_retry_s: float | None = None
        max_input_tokens: int | None = None
        long_text: Literal["error", "split"] | None = None
        price_per_mtok: float | None = None
        prices: str | None = Field(None, description="model=USD per million tokens, comma-separated (RAG_EMBEDDING_PRICES).")
        device: str | None = None
        query_prefix: str | None = Field(None, description="Sent before each question (e5: 'query: ').")
        passage_prefix: str | None = Field(None, description="Sent before each chunk (e5: 'passage: ').")
        query_input_type: str | None = Field(None, description="Request field value for questions (Cohere: search_query).")
        passage_input_type: str | None = Field(None, description="Request field value for chunks (Cohere: search_document).")
        input_type_field: str | None = Field(None, description="The request field of the input types (default input_type).")
        backend: Literal["torch", "onnx", "onnx-int8"] | None = Field(
            None, description="The local model's runtime (RAG_LOCAL_BACKEND; part of its fingerprint)."
        )


class Snapshots(dg.Model, dg.Resolvable):
    uri: str | None = Field(None, description="A folder or s3://bucket/prefix (default: <home>/snapshots).")
    keep: int | None = None
    concurrency: int | None = None
    sse: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    s3_retry_mode: Literal["standard", "adaptive"] | None = None
    s3_max_attempts: int | None = None
    multipart_mb: int | None = None
    restore_memory_mb: int | None = None


class Automation(dg.Model, dg.Resolvable):
    source_sensor_interval_s: int | None = None
    inbox_sensor_interval_s: int | None = None
    automation_interval_s: int | None = None


class Service(dg.Model, dg.Resolvable):
    webhook_secret_env: str | None = None
    query_api_key_env: str | None = None
    webhook_tolerance_s: int | None = None
    webhook_max_body: int | None = None
    webhook_signature_header: str | None = None
    apply_interval_s: float | None = None
    header_timeout_s: float | None = None
    body_timeout_s: float | None = None


class Formats(dg.Model, dg.Resolvable):
    max_pages: int | None = None
    max_cells: int | None = None
    max_unzipped_bytes: int | None = None
    max_zip_ratio: int | None = None
    timeout_s: float | None = None
    memory_mb: int | None = None


class Quality(dg.Model, dg.Resolvable):
    questions: str | None = Field(None, description="JSONL question set that gates generation switches.")
    k: int | None = None
    tolerance: float | None = Field(None, description="Largest drop of recall@k a new generation may show.")


class Hnsw(dg.Model, dg.Resolvable):
    m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    build_memory_mb: int | None = None
    build_workers: int | None = Field(None, description="max_parallel_maintenance_workers of an HNSW build.")


class Sync(dg.Model, dg.Resolvable):
    """How a refresh writes its rows: into the live generation, or a rebuilt one (docs/architecture.md)."""

    strategy: str | None = Field(None, description="auto (cost model) | live | rebuild.")
    live_row_us: float | None = None
    copy_row_us: float | None = None
    build_row_us: float | None = None
    rebuild_fixed_s: float | None = None
    min_saving_s: float | None = None


class Retrieval(dg.Model, dg.Resolvable):
    mode: str | None = None  # vector | keyword | hybrid
    text_search_config: str | None = None
    rrf_k: int | None = None


class Rerank(dg.Model, dg.Resolvable):
    provider: Literal["off", "http", "local"] | None = None
    url: str | None = None
    model: str | None = None
    api: Literal["cohere", "voyage", "tei"] | None = None
    api_key_env: str | None = Field(None, description="Variable holding the API key (default RAG_RERANK_API_KEY).")
    depth: int | None = None
    timeout_s: float | None = None
    max_retry_s: float | None = None
    on_error: Literal["fallback", "fail"] | None = None
    device: str | None = None


class RagIndexScaffolder(dg.Scaffolder):
    """``dg scaffold defs rag_assets.RagIndex NAME``: a defs.yaml for an index named after its folder."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        from dagster.components.component_scaffolding import scaffold_component

        name = _index_name(request.target_path.name)
        scaffold_component(
            request,
            {
                "name": name,
                "source": {"path": f"docs/{name}", "include": ["**/*.md", "**/*.rst", "**/*.txt"]},
                "database": {"pg_schema": f"rag_{name}"},
                "shards": 16,
                "embedder": {"provider": "hashing"},
            },
        )


def _index_name(folder: str) -> str:
    """A valid index name from a folder name (``support-tickets`` → ``support_tickets``)."""
    import re

    name = re.sub(r"[^a-z0-9_]", "_", folder.lower()).strip("_") or "index"
    return name if name[0].isalpha() else f"i_{name}"


@dg.scaffold_with(RagIndexScaffolder)
class RagIndex(dg.Component, dg.Model, dg.Resolvable):
    """A RAG index kept in step with its source: documents → manifest → chunks → embeddings → pgvector.

    Each instance adds its own assets (keys prefixed by ``name``), asset checks, sensors, jobs and
    schedules, in its own Postgres schema; the embedding cache is shared by the indexes of a database.
    """

    name: str = Field(description="Index name: prefixes asset keys and names; CLI: rag-assets --index NAME.")
    source: Source = Field(default_factory=Source)
    database: Database = Field(default_factory=Database)
    shards: int | None = Field(None, description="Shard partitions (1-99); fixed once the index is built.")
    chunker: Chunker = Field(default_factory=Chunker)
    embedder: Embedder = Field(default_factory=Embedder)
    snapshots: Snapshots = Field(default_factory=Snapshots)
    automation: Automation = Field(default_factory=Automation)
    service: Service = Field(default_factory=Service)
    hnsw: Hnsw = Field(default_factory=Hnsw)
    sync: Sync = Field(default_factory=Sync)
    formats: Formats = Field(default_factory=Formats)
    quality: Quality = Field(default_factory=Quality)
    retrieval: Retrieval = Field(default_factory=Retrieval)
    rerank: Rerank = Field(default_factory=Rerank)
    keep_generations: int | None = None
    home: str | None = Field(None, description="Embedded server, snapshots and Dagster CLI runs (default .rag_home).")

    def attributes(self, root: Path | None = None) -> dict:
        """The attributes as ``settings_from_attributes`` takes them, paths resolved against ``root``."""
        attrs = self.model_dump(exclude_none=True)
        db = attrs.setdefault("database", {})
        db.setdefault("pg_schema", f"rag_{self.name}" if self.name != "default" else "rag")
        if root is not None:
            for section, key in (("source", "path"), (None, "home"), ("quality", "questions")):
                holder = attrs.get(section, {}) if section else attrs
                if holder.get(key) and not Path(holder[key]).is_absolute():
                    holder[key] = str((root / holder[key]).resolve())
            if "home" not in attrs:
                attrs["home"] = str((root / ".rag_home").resolve())
        return attrs

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from rag_assets.defs.factory import build_rag_index_defs
        from rag_assets.settings import settings_from_attributes

        settings = settings_from_attributes(self.attributes(Path(context.project_root)))
        return build_rag_index_defs(settings=settings)
