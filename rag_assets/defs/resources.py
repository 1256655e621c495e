"""Dagster resources: thin wrappers that turn configuration into the core's ``StageContext``.

Everything not set here comes from the ``RAG_*`` environment (``Settings.from_env``), so the same
code location runs on the embedded defaults and in production; secrets arrive as ``dg.EnvVar``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import dagster as dg

from rag_assets.embedders import Embedder, make_embedder
from rag_assets.pipeline import StageContext
from rag_assets.settings import Settings


class RagResource(dg.ConfigurableResource):
    """Where the index lives and what it indexes (unset → the RAG_* environment)."""

    database_url: str | None = None
    source_path: str | None = None
    home: str | None = None
    overrides: str | None = None  # JSON of further Settings fields (tests, the CLI's in-process runs)

    def settings(self) -> Settings:
        s = Settings.from_env()
        over = settings_from_json(self.overrides) if self.overrides else {}
        if self.database_url:
            over["database_url"] = self.database_url
        if self.source_path:
            over["source_path"] = Path(self.source_path)
        if self.home:
            over["home"] = Path(self.home)
        return replace(s, **over) if over else s


class EmbedderResource(dg.ConfigurableResource):
    """The embedding provider (RAG_EMBEDDER and RAG_EMBEDDING_*); the API key comes as an EnvVar."""

    api_key: str | None = None

    def build(self, settings: Settings) -> Embedder:
        if self.api_key:
            settings = replace(settings, embedding_api_key=self.api_key)
        return make_embedder(settings)


def stage_context(
    context: dg.AssetExecutionContext | dg.OpExecutionContext,
    rag: RagResource,
    embedder: EmbedderResource | None,
) -> StageContext:
    settings = rag.settings()
    emb = embedder.build(settings) if embedder is not None else make_embedder(settings)
    return StageContext.create(settings, embedder=emb, run_id=context.run.run_id, kind="dagster")


def default_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "rag": RagResource(
            database_url=dg.EnvVar("RAG_DATABASE_URL") if os.environ.get("RAG_DATABASE_URL") else None
        ),
        "embedder": EmbedderResource(
            api_key=dg.EnvVar("RAG_EMBEDDING_API_KEY") if os.environ.get("RAG_EMBEDDING_API_KEY") else None
        ),
    }


def settings_to_json(settings: Settings) -> str:
    """The non-secret settings as JSON (secrets travel as EnvVar or explicit resource fields)."""
    d = {k: v for k, v in settings.public_dict().items() if v != "***"}
    for k in ("embedding_api_key", "webhook_secret", "query_api_key"):
        d.pop(k, None)
    return json.dumps(d)


def settings_from_json(text: str) -> dict:
    d = json.loads(text)
    for k in ("home", "source_path"):
        if d.get(k) is not None:
            d[k] = Path(d[k])
    for k in ("include", "exclude"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    return d


def resources_for(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Resources pinned to an explicit configuration (tests, the CLI's in-process runs)."""
    return {
        "rag": RagResource(
            database_url=settings.database_url,
            source_path=str(settings.source_path),
            home=str(settings.home),
            overrides=settings_to_json(settings),
        ),
        "embedder": EmbedderResource(api_key=settings.embedding_api_key),
    }
