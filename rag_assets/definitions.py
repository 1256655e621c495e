"""The code location we ship: ``rag_assets.definitions:defs`` (workspace.yaml, `dagster dev`).

One index, the ``default`` one, configured by the ``RAG_*`` environment: one call of the same
factory a user's project calls (``build_rag_index_defs``). Secrets are not captured here; the
runs read them from their variables.
"""

import dagster as dg

from rag_assets.defs.factory import build_rag_index_defs
from rag_assets.settings import Settings


def build_defs(settings: Settings | None = None, resources: dict | None = None) -> dg.Definitions:
    """All Dagster objects of one index (the ``RAG_*`` environment by default)."""
    settings = settings or Settings.from_env().without_secrets()
    return build_rag_index_defs(settings=settings, resources=resources)


defs = build_defs()
