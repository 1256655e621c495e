"""The indexes a loaded code location defines, by name: how the CLI and the service find them.

``build_rag_index_defs`` registers each index it builds, so importing a code location (ours, or a
user's ``dg`` project, whose components call the factory) makes its indexes addressable by
``rag-assets --index NAME`` and served by ``rag-assets serve``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from rag_assets.settings import Settings, SettingsError

_INDEXES: dict[str, Settings] = {}


def register(settings: Settings) -> None:
    """Record an index (a name built again replaces its entry: tests and reloads rebuild definitions).

    Two indexes with different names in one Postgres schema of one database would overwrite each
    other's tables: refused, naming both.
    """
    for other in _INDEXES.values():
        if (
            other.index_name != settings.index_name
            and other.pg_schema == settings.pg_schema
            and (other.database_url, other.database_url_env, other.home)
            == (settings.database_url, settings.database_url_env, settings.home)
        ):
            raise SettingsError(
                f"indexes {other.index_name!r} and {settings.index_name!r} both use Postgres schema "
                f"{settings.pg_schema!r} in the same database; give each index its own pg_schema"
            )
    _INDEXES[settings.index_name] = settings


def forget(name: str) -> None:
    _INDEXES.pop(name, None)


def indexes() -> dict[str, Settings]:
    return dict(_INDEXES)


def load_location(module: str) -> dict[str, Settings]:
    """Import a code location module (``pkg.definitions``) and return the indexes it defined."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a dg project run from its root, as `dg` itself does
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise SettingsError(f"--location {module!r}: cannot import it ({e})") from None
    defs = getattr(mod, "defs", None)
    if defs is not None and callable(defs) and not getattr(defs, "has_context_arg", False):
        defs()  # `@dg.definitions` (a dg project): its components call the factory when loaded
    return indexes()


def find(name: str, module: str | None) -> Settings:
    """The settings of index ``name`` from code location ``module`` (ours by default)."""
    found = load_location(module or "rag_assets.definitions")
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise SettingsError(f"--index {name!r}: no such index in {module or 'rag_assets.definitions'} (it defines: {known})")
    return found[name]
