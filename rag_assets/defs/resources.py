"""Dagster resources: thin wrappers that turn configuration into the core's ``StageContext``.

Everything not set here comes from the ``RAG_*`` environment (``Settings.from_env``), so the same
code location runs on the embedded defaults and in production; secrets arrive as ``dg.EnvVar``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import dagster as dg

from rag_assets.embedders import Embedder, make_embedder
from rag_assets.pipeline import StageContext
from rag_assets.settings import SECRET_FIELDS, Settings

from .names import IndexNames


class RagResource(dg.ConfigurableResource):
    """Where the index lives and what it indexes (unset → the RAG_* environment)."""

    database_url: str | None = None
    source_path: str | None = None
    home: str | None = None
    overrides: str | None = None  # JSON of further Settings fields (tests, the CLI's in-process runs)

    def settings(self) -> Settings:
        """The index's settings: the non-secret ones fixed when the definitions were built
        (``overrides``), or the ``RAG_*`` environment when none were; secrets from their variables."""
        over = settings_from_json(self.overrides) if self.overrides else {}
        if self.database_url:
            over["database_url"] = self.database_url
        if self.source_path:
            over["source_path"] = Path(self.source_path)
        if self.home:
            over["home"] = Path(self.home)
        s = Settings.from_env({}, **over) if self.overrides else Settings.from_env(**over)
        return s.with_secrets()


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


def stage_context_from(
    context: dg.AssetExecutionContext | dg.OpExecutionContext, names: IndexNames
) -> StageContext:
    """The stage context of the index ``names`` belongs to (its resources are bound under its names)."""
    rag = getattr(context.resources, names.rag_resource)
    embedder = getattr(context.resources, names.embedder_resource, None)
    return stage_context(context, rag, embedder)


def index_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The resources of one index built by the factory: its settings without secrets, fixed at load;
    the database URL and the webhook/query secrets read from their variables at run time
    (``Settings.with_secrets``), the embedding API key as a ``dg.EnvVar`` where the provider needs
    one. Loading reads no variable and needs no secret."""
    names = IndexNames.of(settings)
    public = settings.without_secrets()
    return {
        names.rag_resource: RagResource(
            database_url=settings.database_url, overrides=settings_to_json(public)
        ),
        names.embedder_resource: EmbedderResource(
            api_key=settings.embedding_api_key
            or (dg.EnvVar(settings.embedding_api_key_env) if settings.embedder == "openai" else None)
        ),
    }


def settings_to_json(settings: Settings) -> str:
    """The non-secret settings as JSON (secrets travel as EnvVar or explicit resource fields)."""
    d = {k: v for k, v in settings.public_dict().items() if v != "***"}
    for k in SECRET_FIELDS:  # the URL travels in the resource's own field (it may hold a password)
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
    if d.get("embedding_prices") is not None:
        d["embedding_prices"] = tuple((str(m), float(p)) for m, p in d["embedding_prices"])
    return d


def resources_for(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Resources pinned to an explicit configuration (tests, the CLI's in-process runs)."""
    names = IndexNames.of(settings)
    return {
        names.rag_resource: RagResource(
            database_url=settings.database_url,
            source_path=str(settings.source_path),
            home=str(settings.home),
            overrides=settings_to_json(settings),
        ),
        names.embedder_resource: EmbedderResource(api_key=settings.embedding_api_key),
    }
