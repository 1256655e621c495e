"""The Dagster integration in process: several indexes in one code location (build_rag_index_defs).

Two indexes share one database (each in its own Postgres schema) and one Dagster instance:
their names never collide, queries are isolated, a change in one refreshes only its shards, and
a text present in both is embedded once (the shared cache). Loading needs no variable and no
network.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import dagster as dg
import pytest

from rag_assets.defs.factory import build_rag_index_defs
from rag_assets.defs.resources import resources_for
from rag_assets.defs.runner import index_via_dagster
from rag_assets.embedders import make_embedder
from rag_assets.query import search
from rag_assets.settings import Settings, SettingsError, settings_from_attributes
from rag_assets.store.db import connect_index
from tests.helpers import write

SHARED = "# Office hours\n\nThe office opens at nine and closes at six on weekdays.\n"


def _index(name: str, schema: str, shards: int, db_url: str, tmp_path) -> Settings:
    return Settings.from_env(
        {},
        index_name=name,
        pg_schema=schema,
        home=tmp_path / "home",
        database_url=db_url,
        shards=shards,
        source_path=tmp_path / name,
    )


@pytest.fixture
def two(db_url, tmp_path):
    hb = _index("handbook", "kb_handbook", 4, db_url, tmp_path)
    sp = _index("support", "kb_support", 8, db_url, tmp_path)
    write(hb.source_path / "leave.md", "# Leave\n\nEveryone gets twenty-five days of paid vacation a year.\n")
    write(hb.source_path / "office.md", SHARED)
    write(sp.source_path / "printer.md", "# Printer\n\nThe printer on floor three jams with thick paper.\n")
    write(sp.source_path / "office.md", SHARED)
    return hb, sp


def _defs(*indexes: Settings) -> dg.Definitions:
    return dg.Definitions.merge(*(build_rag_index_defs(settings=s, resources=resources_for(s)) for s in indexes))


def test_two_indexes_have_their_own_keys_names_and_resources(two):
    hb, sp = two
    defs = _defs(hb, sp)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    for name in ("handbook", "support"):
        assert {f"{name}/{a}" for a in ("raw_documents", "document_manifest", "chunks", "embeddings", "index_snapshot")} <= keys
    assert len(keys) == 10
    sensors = {s.name for s in defs.sensors}
    assert sensors == {
        f"{n}_{s}" for n in ("handbook", "support") for s in ("source_sensor", "inbox_sensor", "generation_sensor", "rag_automation")
    }
    for job in ("full_reindex", "consistency_audit", "finish_generation", "snapshot_index"):
        assert defs.resolve_job_def(f"handbook_{job}") and defs.resolve_job_def(f"support_{job}")
    assert {s.name for s in defs.schedules} == {
        f"{n}_{s}" for n in ("handbook", "support") for s in ("consistency_audit_daily", "snapshot_daily")
    }
    assert set(defs.resources) == {"rag_handbook", "embedder_handbook", "rag_support", "embedder_support"}
    # each index's checks target its own assets
    checks = {k.to_user_string() for k in defs.resolve_asset_graph().asset_check_keys}
    assert "handbook/embeddings:rows_match_chunks" in checks and "support/document_manifest:manifest_matches_source" in checks
    # the partitions follow each index's shard count
    graph = defs.resolve_asset_graph()
    assert len(graph.get(dg.AssetKey(["handbook", "chunks"])).partitions_def.get_partition_keys()) == 4
    assert len(graph.get(dg.AssetKey(["support", "chunks"])).partitions_def.get_partition_keys()) == 8


def test_two_indexes_materialize_in_isolation_and_share_the_cache(two):
    hb, sp = two
    r1 = index_via_dagster(hb, hb.source_path)
    r2 = index_via_dagster(sp, sp.source_path)
    assert (r1.docs_total, r2.docs_total) == (2, 2)
    # the office text was embedded for the handbook; the support index reused it from the shared cache
    assert r1.chunks_embedded == 2 and r2.chunks_embedded == 1 and r2.chunks_reused == 1
    with connect_index(hb) as c:
        n_cache = c.execute("SELECT count(*) FROM rag_cache.embedding_cache").fetchone()[0]
        distinct = c.execute(
            "SELECT count(DISTINCT chunk_hash) FROM (SELECT chunk_hash FROM kb_handbook.chunks "
            "UNION ALL SELECT chunk_hash FROM kb_support.chunks) x"
        ).fetchone()[0]
        assert n_cache == distinct == 3
    emb = make_embedder(hb)
    try:
        for s, docs in ((hb, {"leave.md", "office.md"}), (sp, {"printer.md", "office.md"})):
            with connect_index(s) as c:
                got = {h.doc_id for h in search(c, emb, "paper jam on the printer", k=10).results}
            assert got == docs  # each index answers from its own documents only
    finally:
        emb.close()

    # A change in one index refreshes only that index's shards.
    write(hb.source_path / "leave.md", "# Leave\n\nEveryone gets thirty days of paid vacation a year.\n")
    r3 = index_via_dagster(hb, hb.source_path)
    r4 = index_via_dagster(sp, sp.source_path)
    assert r3.shards_refreshed == 1 and r3.docs_modified == 1 and r3.chunks_embedded == 1
    assert r4.shards_refreshed == 0 and r4.chunks_embedded == 0 and r4.docs_unchanged == 2


def test_two_indexes_in_one_schema_are_refused(db_url, tmp_path):
    a = _index("alpha", "kb_same", 4, db_url, tmp_path)
    b = _index("beta", "kb_same", 4, db_url, tmp_path)
    build_rag_index_defs(settings=a, resources=resources_for(a))
    with pytest.raises(SettingsError, match="both use Postgres schema 'kb_same'"):
        build_rag_index_defs(settings=b, resources=resources_for(b))


def test_attributes_go_through_the_same_model_as_the_environment():
    s = settings_from_attributes(
        {
            "name": "handbook",
            "source": {"path": "docs", "include": ["**/*.{md,rst}"]},
            "database": {"pg_schema": "kb_handbook", "url_env": "HANDBOOK_PG"},
            "embedder": {"provider": "openai", "model": "text-embedding-3-small", "dimensions": 256, "api_key_env": "HB_KEY"},
            "shards": 16,
        }
    )
    env = Settings.from_env(
        {
            "RAG_INDEX_NAME": "handbook",
            "RAG_SOURCE_PATH": "docs",
            "RAG_PG_SCHEMA": "kb_handbook",
            "RAG_EMBEDDER": "openai",
            "RAG_EMBEDDING_MODEL": "text-embedding-3-small",
            "RAG_EMBEDDING_DIMENSIONS": "256",
            "RAG_SHARDS": "16",
        },
        include=("**/*.{md,rst}",),
        database_url_env="HANDBOOK_PG",
        embedding_api_key_env="HB_KEY",
    )
    assert s == env
    with pytest.raises(SettingsError, match=r"attribute embedder\.batch_size=0 is out of range"):
        settings_from_attributes({"name": "x", "embedder": {"batch_size": 0}})
    with pytest.raises(SettingsError, match=r"attribute shards"):
        settings_from_attributes({"name": "x", "shards": 100})
    with pytest.raises(SettingsError, match=r"unknown attribute 'embedder\.modle'"):
        settings_from_attributes({"name": "x", "embedder": {"modle": "m"}})
    with pytest.raises(SettingsError, match="index name"):
        settings_from_attributes({"name": "Bad-Name"})
    with pytest.raises(SettingsError, match="Postgres schema"):
        settings_from_attributes({"name": "x", "database": {"pg_schema": "rag_cache"}})


def test_secrets_are_named_not_captured_and_read_at_run_time():
    s = settings_from_attributes({"name": "hb", "embedder": {"provider": "openai", "model": "m", "dimensions": 8, "api_key_env": "HB_KEY"}})
    assert s.embedding_api_key is None
    assert s.with_secrets({"HB_KEY": "sk-test"}).embedding_api_key == "sk-test"
    assert s.with_secrets({"RAG_EMBEDDING_API_KEY": "other"}).embedding_api_key is None  # only its own variable
    from rag_assets.defs.resources import index_resources

    res = index_resources(s)
    assert "sk-test" not in repr(res) and "HB_KEY" in repr(res["embedder_hb"].api_key)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}


def test_the_code_location_loads_with_no_rag_variable(tmp_path):
    code = "import rag_assets.definitions as d; print(sorted(k.to_user_string() for k in d.defs.resolve_asset_graph().get_all_asset_keys()))"
    r = subprocess.run([sys.executable, "-c", code], env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'embeddings'" in r.stdout and "'document_manifest'" in r.stdout


def test_loading_an_openai_index_makes_no_network_call(tmp_path):
    """An embedding base URL whose listener records every connection: loading opens none, needs no key."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    code = (
        "from rag_assets.defs.factory import build_rag_index_defs as b; "
        f"d = b('remote', embedder={{'provider': 'openai', 'model': 'text-embedding-3-small', 'base_url': 'http://127.0.0.1:{port}/v1'}}); "
        "print(len(list(d.resolve_asset_graph().get_all_asset_keys())))"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        t.join(timeout=5)
        srv.close()
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "5"
    assert accepted == []  # not a single connection to the embedding API


def test_indexes_sharing_a_home_keep_their_own_snapshot_folders(two):
    hb, sp = two
    assert hb.snapshot_target != sp.snapshot_target
    assert hb.snapshot_target.endswith("snapshots/handbook") and sp.snapshot_target.endswith("snapshots/support")
    default = Settings.from_env({}, home=hb.home)
    assert default.snapshot_target.endswith("/snapshots")  # the default index keeps its folder


def test_nothing_but_settings_reads_rag_variables():
    """One configuration model: no module reads a RAG_* variable on its own (settings.py reads them all)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "rag_assets"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "settings.py" and path.parent == root:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(environ|getenv)\b.*[\"']RAG_", line):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert offenders == []


def test_every_component_attribute_is_one_setting_and_back():
    """The component's attribute model and the attribute → setting table hold the same paths."""
    import pydantic

    from rag_assets.component import RagIndex
    from rag_assets.settings import ATTRIBUTE_ENV, ATTRIBUTE_FIELD

    def paths(model, prefix=""):
        out = set()
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
                out |= paths(ann, f"{prefix}{name}.")
            else:
                out.add(prefix + name)
        return out

    assert paths(RagIndex) == set(ATTRIBUTE_ENV) | set(ATTRIBUTE_FIELD)
    # and every RAG_* variable but the secrets (named by *_env attributes) and the list variables has one
    import re
    from pathlib import Path

    src = (Path(__file__).resolve().parent.parent / "rag_assets/settings.py").read_text()
    env_vars = set(re.findall(r'"(RAG_[A-Z0-9_]+)"', src[src.index("def from_env") : src.index("def validate")]))
    secrets_and_lists = {
        "RAG_EMBEDDING_API_KEY", "RAG_WEBHOOK_SECRET", "RAG_QUERY_API_KEY", "RAG_RERANK_API_KEY", "RAG_INCLUDE", "RAG_EXCLUDE"
    }
    assert env_vars - secrets_and_lists == set(ATTRIBUTE_ENV.values())


def test_component_sections_resolve_env_templates(monkeypatch):
    """`{{ env.X }}` resolves inside every section (not only top-level attributes), the embedder's included."""
    from rag_assets.component import RagIndex

    monkeypatch.setenv("RAG_T_URI", "s3://bucket/kb/")
    monkeypatch.setenv("RAG_T_MODEL", "text-embedding-3-small")
    c = RagIndex.resolve_from_dict(
        {"name": "kb", "source": {"uri": "{{ env.RAG_T_URI }}"}, "embedder": {"provider": "openai", "model": "{{ env.RAG_T_MODEL }}", "dimensions": 256}}
    )
    s = settings_from_attributes(c.attributes())
    assert (s.source_uri, s.embedding_model, s.embedding_dimensions, s.pg_schema) == ("s3://bucket/kb/", "text-embedding-3-small", 256, "rag_kb")
