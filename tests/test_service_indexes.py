"""`rag-assets serve` over every index of a code location: /indexes/{name}/... per index.

Two indexes in one database, each with its own webhook signing secret and query key: an event
signed for one index is refused by the other, lands in its own inbox only, queries answer from
their own index only, and the default index is also served at the root.
"""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from rag_assets.pipeline import Indexer
from rag_assets.service.indexes import create_indexes_app, root_index
from rag_assets.settings import Settings, SettingsError
from rag_assets.store import inbox
from rag_assets.store.db import connect_index
from tests.helpers import write
from tests.service_utils import ThreadServer, event_body, signed_headers

SECRET_A = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"
SECRET_B = "whsec_" + "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJC"


@pytest.fixture
def indexes(db_url, tmp_path):
    out = {}
    for name, secret, key, text in (
        ("handbook", SECRET_A, "key-handbook-0123", "# Leave\n\nPaid vacation is twenty-five days a year."),
        ("support", SECRET_B, "key-support-45678", "# Printer\n\nThe printer on floor three jams with thick paper."),
    ):
        s = Settings.from_env(
            {},
            index_name=name,
            pg_schema=f"kb_{name}",
            home=tmp_path / "home",
            database_url=db_url,
            shards=4,
            source_path=tmp_path / name,
            webhook_secret=secret,
            query_api_key=key,
        )
        write(s.source_path / "doc.md", text)
        idx = Indexer(s)
        try:
            idx.refresh(s.source_path)
        finally:
            idx.close()
        out[name] = s
    return out


def test_each_index_has_its_own_routes_secret_key_and_inbox(indexes):
    app = create_indexes_app(indexes, pool_min_size=1, pool_max_size=4)
    with ThreadServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        listed = c.get("/indexes").json()
        assert {i["name"] for i in listed["indexes"]} == {"handbook", "support"} and listed["root"] is None
        for name, key, want in (("handbook", "key-handbook-0123", "doc.md"), ("support", "key-support-45678", "doc.md")):
            r = c.post(f"/indexes/{name}/query", json={"text": "printer paper jam", "k": 3}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            hits = r.json()["results"]
            assert [h["doc_id"] for h in hits] == [want]
            assert (name == "support") == ("printer" in hits[0]["text"])  # each index answers from its own documents
        # the other index's key is refused
        r = c.post("/indexes/handbook/query", json={"text": "x"}, headers={"Authorization": "Bearer key-support-45678"})
        assert r.status_code == 401
        # an event signed with the support secret: accepted by support, refused by handbook
        body = event_body("hook/new.md", content="# New\n\nA ticket about the coffee machine.")
        assert c.post("/indexes/handbook/webhooks/documents", content=body, headers=signed_headers(SECRET_B, "evt-1", body)).status_code == 401
        assert c.post("/indexes/support/webhooks/documents", content=body, headers=signed_headers(SECRET_B, "evt-1", body)).status_code == 202
    for name, pending in (("handbook", 0), ("support", 1)):
        with connect_index(indexes[name]) as conn:
            assert inbox.pending_count(conn) == pending


def test_the_default_or_lone_index_is_also_at_the_root(indexes):
    assert root_index({"support": indexes["support"]}) == "support"
    assert root_index(indexes) is None
    lone = {"support": indexes["support"]}
    app = create_indexes_app(lone, pool_min_size=1, pool_max_size=2)
    with ThreadServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/query", json={"text": "printer"}, headers={"Authorization": "Bearer key-support-45678"})
        assert r.status_code == 200 and r.json()["results"][0]["doc_id"] == "doc.md"


def test_an_index_without_a_secret_is_named(indexes):
    bad = dict(indexes, support=replace(indexes["support"], webhook_secret=None))
    with pytest.raises(SettingsError, match="index 'support'"):
        create_indexes_app(bad)
