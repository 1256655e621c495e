"""The object-store source against S3 spoken over HTTP (moto's server on 127.0.0.1, versioned
buckets), with boto3 configured the standard way (``AWS_ENDPOINT_URL``, credentials from the
environment). Requests are counted on the server side, so "no GET" means no GET reached S3.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from dataclasses import replace
from urllib.parse import parse_qs

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rag_assets.pipeline import Indexer, MassDeleteRefused
from rag_assets.sources import DocumentChanging, FileStat, SourceError
from rag_assets.sources.s3 import S3Location, S3Source
from rag_assets.store.serving import index_digest
from rag_assets.store.source_binding import SourceMismatch
from tests.helpers import RecordingEmbedder, full_rebuild, markdown_doc, paragraph
from tests.test_pipeline import _rows


class RequestLog:
    """WSGI middleware in front of moto: counts S3 operations as they arrive over HTTP, and the
    most GetObject requests in flight at once."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        self.inflight = 0
        self.max_inflight = 0

    @staticmethod
    def operation(environ) -> str:
        method = environ["REQUEST_METHOD"]
        parts = environ.get("PATH_INFO", "/").lstrip("/").split("/", 1)
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        has_key = len(parts) == 2 and parts[1] != ""
        if method == "GET" and has_key:
            return "GetObject"
        if method == "GET" and "versioning" in query:
            return "GetBucketVersioning"
        if method == "GET" and "versions" in query:
            return "ListObjectVersions"
        if method == "GET" and query.get("list-type") == ["2"]:
            return "ListObjectsV2"
        return f"{method} {'object' if has_key else 'bucket'}"

    def __call__(self, environ, start_response):
        op = self.operation(environ)
        with self.lock:
            self.ops[op] += 1
            if op == "GetObject":
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return self.app(environ, start_response)
        finally:
            if op == "GetObject":
                with self.lock:
                    self.inflight -= 1

    def reset(self) -> None:
        with self.lock:
            self.ops.clear()
            self.max_inflight = 0

    def gets(self) -> int:
        return self.ops["GetObject"]


@pytest.fixture(scope="module")
def moto_s3():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    log = RequestLog(server._server.app)
    server._server.app = log  # every request passes the counter first
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}", log
    server.stop()


@pytest.fixture
def s3(moto_s3, monkeypatch):
    """boto3's standard configuration pointed at moto; returns (client, request log)."""
    import boto3

    endpoint, log = moto_s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    log.reset()
    return boto3.client("s3"), log


def _bucket(client, versioned: bool = True) -> str:
    name = f"rag-src-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    if versioned:
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def _indexer(settings, **kw) -> Indexer:
    return Indexer(replace(settings, **kw), embedder=RecordingEmbedder(32))


# --- change detection: zero GETs, one GET per touch --------------------------------------------


def test_no_change_costs_zero_gets_and_a_touch_one_get_and_no_embedding(settings, s3):
    client, log = s3
    b = _bucket(client)
    import random

    rng = random.Random(1)
    for i in range(6):
        client.put_object(Bucket=b, Key=f"docs/d{i}.md", Body=markdown_doc(rng).encode())
    uri = f"s3://{b}/docs"
    idx = _indexer(settings)
    r1 = idx.refresh(uri)
    assert r1.docs_added == 6 and not r1.errors
    assert log.gets() == 6

    log.reset()
    r2 = idx.refresh(uri)
    assert log.gets() == 0, log.ops
    assert r2.chunks_embedded == 0 and r2.docs_added + r2.docs_modified + r2.docs_metadata_only == 0
    assert r2.shards_refreshed == 0
    # the listing: one GetBucketVersioning and one page of ListObjectVersions
    assert log.ops["ListObjectVersions"] == 1 and log.ops["GetBucketVersioning"] == 1

    # touch: the same bytes uploaded again (a new version, same ETag)
    body = client.get_object(Bucket=b, Key="docs/d2.md")["Body"].read()
    client.put_object(Bucket=b, Key="docs/d2.md", Body=body)
    # copy onto itself (new user metadata: how S3 "touches" an object)
    client.copy_object(
        Bucket=b, Key="docs/d4.md", CopySource={"Bucket": b, "Key": "docs/d4.md"},
        MetadataDirective="REPLACE", Metadata={"owner": "team-a"},
    )
    before = len(idx.embedder.texts)
    log.reset()
    r3 = idx.refresh(uri)
    assert log.gets() == 2, log.ops  # exactly one GET per touched object
    assert len(idx.embedder.texts) == before and r3.chunks_embedded == 0
    assert r3.docs_modified == 0 and r3.docs_metadata_only == 2 and r3.docs_rechunked == 0
    meta = idx.conn.execute("SELECT metadata FROM manifest WHERE doc_id = 'd4.md'").fetchone()[0]
    assert meta["user_metadata"] == {"owner": "team-a"}

    log.reset()
    assert idx.refresh(uri).chunks_embedded == 0 and log.gets() == 0
    idx.close()


def test_a_change_within_the_same_second_is_seen_by_its_version_id(settings, s3):
    """LastModified has one-second resolution and a copy onto itself keeps the ETag and size: in a
    versioned bucket only the VersionId shows such a change. Writes are repeated until one lands in
    the same second as the indexed version (a refresh of one object takes well under a second)."""
    client, log = s3
    b = _bucket(client)
    idx = _indexer(settings)
    hit = False
    for attempt in range(20):
        client.put_object(Bucket=b, Key="a.md", Body=f"# A\n\nversion {attempt}\n".encode())
        idx.refresh(f"s3://{b}")
        indexed = idx.conn.execute("SELECT mtime_ns FROM manifest WHERE doc_id = 'a.md'").fetchone()[0]
        client.copy_object(
            Bucket=b, Key="a.md", CopySource={"Bucket": b, "Key": "a.md"},
            MetadataDirective="REPLACE", Metadata={"rev": str(attempt)},
        )
        head = client.head_object(Bucket=b, Key="a.md")
        if int(head["LastModified"].timestamp()) * 10**9 != indexed:
            continue  # the copy landed in a later second: not the case under test
        log.reset()
        r = idx.refresh(f"s3://{b}")
        assert log.gets() == 1 and r.docs_metadata_only == 1 and r.chunks_embedded == 0
        meta = idx.conn.execute("SELECT metadata FROM manifest WHERE doc_id = 'a.md'").fetchone()[0]
        assert meta["user_metadata"] == {"rev": str(attempt)} and meta["version_id"] == head["VersionId"]
        hit = True
        break
    assert hit, "no copy landed in the same second as the indexed version in 20 attempts"
    idx.close()


def test_metadata_carries_uri_etag_version_type_and_user_metadata(settings, s3):
    client, _ = s3
    b = _bucket(client)
    put = client.put_object(
        Bucket=b, Key="kb/guide.md", Body=b"---\ntags: [a]\netag: forged\n---\n# Guide\n\ntext\n",
        ContentType="text/markdown", Metadata={"Owner": "docs-team"},
    )
    idx = _indexer(settings)
    idx.refresh(f"s3://{b}/kb/")
    meta = idx.conn.execute("SELECT metadata FROM manifest WHERE doc_id = 'guide.md'").fetchone()[0]
    assert meta["uri"] == f"s3://{b}/kb/guide.md"
    assert meta["etag"] == put["ETag"].strip('"')  # the source's ETag, not the front matter's
    assert meta["version_id"] == put["VersionId"]
    assert meta["content_type"] == "text/markdown"
    assert meta["user_metadata"] == {"owner": "docs-team"}
    assert meta["tags"] == ["a"] and meta["title"] == "Guide" and meta["path"] == "guide.md"
    head = client.head_object(Bucket=b, Key="kb/guide.md")
    assert meta["mtime"] == head["LastModified"].astimezone(__import__("datetime").UTC).isoformat()
    idx.close()


def test_prefix_globs_and_placeholders(settings, s3):
    client, _ = s3
    b = _bucket(client, versioned=False)
    for key in ("p/a.md", "p/sub/b.rst", "p/sub/skip.md", "p/image.png", "p/sub/", "pother/x.md", "top.md"):
        client.put_object(Bucket=b, Key=key, Body=b"# T\n\nx\n")
    src = S3Source(f"s3://{b}/p", include=["**/*.md", "**/*.rst"], exclude=["sub/skip.md"])
    assert sorted(src.scan().stats) == ["a.md", "sub/b.rst"]
    assert sorted(S3Source(f"s3://{b}", include=["*.md"]).scan().stats) == ["top.md"]
    assert S3Location.parse("s3://bkt").uri == "s3://bkt/"
    assert S3Location.parse("s3://bkt/a/b").prefix == "a/b/"


def test_unversioned_bucket_uses_list_objects_v2(settings, s3):
    client, log = s3
    b = _bucket(client, versioned=False)
    client.put_object(Bucket=b, Key="a.md", Body=b"# A\n\nalpha\n")
    idx = _indexer(settings)
    idx.refresh(f"s3://{b}")
    log.reset()
    assert idx.refresh(f"s3://{b}").docs_unchanged == 1
    assert log.ops["ListObjectsV2"] == 1 and log.ops["ListObjectVersions"] == 0 and log.gets() == 0
    client.put_object(Bucket=b, Key="a.md", Body=b"# A\n\nalpha, edited\n")
    assert idx.refresh(f"s3://{b}").docs_modified == 1
    idx.close()


def test_many_pages_and_bounded_parallel_gets(settings, s3):
    client, log = s3
    b = _bucket(client)
    for i in range(30):
        client.put_object(Bucket=b, Key=f"n{i:03d}.md", Body=f"# N{i}\n\n{paragraph(__import__('random').Random(i))}".encode())
    idx = _indexer(settings, s3_get_concurrency=3)
    log.reset()
    r = idx.refresh(f"s3://{b}")
    assert r.docs_added == 30 and log.gets() == 30
    assert 1 <= log.max_inflight <= 3
    idx.close()


# --- bad input: reported by key, the rest goes on -------------------------------------------


def test_oversize_and_unsupported_objects_are_reported_by_key_and_skipped(settings, s3):
    client, log = s3
    b = _bucket(client)
    client.put_object(Bucket=b, Key="ok.md", Body=b"# OK\n\nfine\n")
    client.put_object(Bucket=b, Key="big.md", Body=b"x" * 5000)
    client.put_object(Bucket=b, Key="scan.md", Body=b"%PDF-1.7 ...", ContentType="application/pdf")
    client.put_object(Bucket=b, Key="bin.md", Body=b"\x00\x01binary")
    client.put_object(Bucket=b, Key="photo.md", Body=b"\x89PNG...", ContentType="image/png")
    idx = _indexer(settings, max_doc_bytes=4096)
    log.reset()
    r = idx.refresh(f"s3://{b}")
    errs = {e["doc_id"]: e["error"] for e in r.errors}
    assert set(errs) == {"big.md", "scan.md", "bin.md", "photo.md"}
    assert "too large (5000 bytes > RAG_MAX_DOC_BYTES=4096)" in errs["big.md"]
    # a PDF content type goes to the PDF converter (whatever the key's suffix): broken bytes, a clear error
    assert "not a readable PDF" in errs["scan.md"]
    assert "content type image/png" in errs["photo.md"]  # no converter reads it
    assert "binary" in errs["bin.md"]
    assert r.docs_total == 1
    assert log.gets() == 4  # ok, scan, bin and photo; the oversize object is refused from its listed size
    log.reset()
    r2 = idx.refresh(f"s3://{b}")  # still reported, not fetched again until they change
    assert set(e["doc_id"] for e in r2.errors) == set(errs) and log.gets() == 0
    client.put_object(Bucket=b, Key="big.md", Body=b"# Big\n\nnow small\n")
    r3 = idx.refresh(f"s3://{b}")
    assert {e["doc_id"] for e in r3.errors} == {"scan.md", "bin.md", "photo.md"} and r3.docs_added == 1
    idx.close()


def test_an_object_rewritten_after_the_listing_is_read_next_run(s3):
    client, _ = s3
    b = _bucket(client)
    client.put_object(Bucket=b, Key="a.md", Body=b"v1")
    src = S3Source(f"s3://{b}")
    listed = src.scan().stats["a.md"]
    client.put_object(Bucket=b, Key="a.md", Body=b"v2, longer")
    with pytest.raises(DocumentChanging, match="a.md: rewritten since the listing"):
        src.read("a.md", listed)
    assert src.read("a.md", src.scan().stats["a.md"]).text == "v2, longer"
    assert src.read("a.md", FileStat(2, 0, None)).text == "v2, longer"  # no token: unconditional


def test_missing_bucket_is_one_clear_source_error(settings, s3):
    idx = _indexer(settings)
    with pytest.raises(Exception) as ei:
        idx.refresh("s3://rag-no-such-bucket-xyz/docs")
    chain = [ei.value, ei.value.__cause__]
    err = next(e for e in chain if isinstance(e, SourceError))
    assert "S3 bucket 'rag-no-such-bucket-xyz' does not exist" in str(err)
    from rag_assets.failures import classify

    assert classify(ei.value) == "source"
    idx.close()


def test_access_denied_and_wrong_credentials_name_the_bucket(settings, s3, monkeypatch):
    import boto3
    from moto.core.authorization import enable_iam_authentication

    client, _ = s3
    b = _bucket(client)
    client.put_object(Bucket=b, Key="a.md", Body=b"a")
    iam = boto3.client("iam")
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)  # no policy: every S3 action is denied
    key = iam.create_access_key(UserName=user)["AccessKey"]
    with enable_iam_authentication():
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(SourceError, match=rf"access to S3 bucket '{b}' denied \(AccessDenied"):
            S3Source(f"s3://{b}").scan()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
        with pytest.raises(SourceError, match=rf"access to S3 bucket '{b}' denied \(InvalidAccessKeyId"):
            S3Source(f"s3://{b}").scan()


def test_mass_delete_guard_applies_to_a_bucket(settings, s3):
    client, _ = s3
    b = _bucket(client)
    for i in range(10):
        client.put_object(Bucket=b, Key=f"d/{i}.md", Body=f"# {i}\n\ndoc {i}\n".encode())
    idx = _indexer(settings)
    idx.refresh(f"s3://{b}/d")
    for i in range(8):
        client.delete_object(Bucket=b, Key=f"d/{i}.md")
    with pytest.raises(MassDeleteRefused, match=rf"missing from s3://{b}/d/"):
        idx.refresh(f"s3://{b}/d")
    assert idx.refresh(f"s3://{b}/d", allow_deletes=True).docs_deleted == 8
    idx.close()


def test_the_index_is_bound_to_its_bucket_prefix(settings, s3):
    client, log = s3
    b = _bucket(client)
    client.put_object(Bucket=b, Key="d/a.md", Body=b"# A\n\nalpha\n")
    idx = _indexer(settings)
    idx.refresh(f"s3://{b}/d")
    client.put_object(Bucket=b, Key="d/b.md", Body=b"# B\n\nbeta\n")
    assert idx.refresh(None).docs_added == 1  # the background path reads the bound prefix
    with pytest.raises(SourceMismatch, match=rf"built from s3://{b}/d/"):
        idx.refresh(f"s3://{b}/other")
    with pytest.raises(SourceMismatch):
        idx.refresh(settings.home)  # a folder instead of the bucket
    idx.close()


def test_a_new_index_binds_rag_source_uri(settings, s3):
    client, _ = s3
    b = _bucket(client)
    client.put_object(Bucket=b, Key="a.md", Body=b"# A\n\nalpha\n")
    from rag_assets.settings import Settings

    s = Settings.from_env({"RAG_SOURCE_URI": f"s3://{b}", "RAG_S3_GET_CONCURRENCY": "4"},
                          home=settings.home, database_url=settings.database_url, shards=settings.shards)
    assert s.source_uri == f"s3://{b}" and s.s3_get_concurrency == 4
    idx = Indexer(s, embedder=RecordingEmbedder(32))
    assert idx.refresh(None).docs_added == 1
    idx.close()


def test_cli_indexes_an_s3_prefix(db_url, tmp_path, s3):
    client, _ = s3
    b = _bucket(client)
    client.put_object(Bucket=b, Key="kb/a.md", Body=b"# Alpha\n\nThe alpha document.\n")
    client.put_object(Bucket=b, Key="kb/b.md", Body=b"# Beta\n\nThe beta document.\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(RAG_HOME=str(tmp_path / "home"), RAG_DATABASE_URL=db_url, RAG_SHARDS="8", RAG_EMBEDDING_DIMENSIONS="32")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "rag_assets.cli", *args], env=env,
                              capture_output=True, text=True, timeout=300)

    p = run("index", f"s3://{b}/kb", "--core", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["docs_added"] == 2
    p = run("index", "s3://rag-no-such-bucket-cli/kb", "--core", "--change-source")
    assert p.returncode == 3 and "S3 bucket 'rag-no-such-bucket-cli' does not exist" in p.stderr


# --- equivalence: any sequence of object changes == a full rebuild --------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "overwrite", "touch", "copy_in_place", "delete", "rename", "noop"]),
        st.integers(0, 7),
        st.integers(0, 10**6),
    ),
    min_size=1,
    max_size=5,
)


@hsettings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, seed=st.integers(0, 10**6))
def test_property_incremental_equals_full_rebuild(settings, s3, make_db, ops, seed):
    import random

    client, log = s3
    b = _bucket(client)
    uri = f"s3://{b}/kb"
    rng = random.Random(seed)
    live: set[str] = set()
    for i in range(3):
        client.put_object(Bucket=b, Key=f"kb/f{i}.md", Body=f"---\ntags: [t{i}]\n---\n{markdown_doc(rng)}".encode())
        live.add(f"f{i}.md")
    s = replace(settings, database_url=make_db())
    idx = Indexer(s, embedder=RecordingEmbedder(32))
    idx.refresh(uri)
    for op, k, r in ops:
        names = sorted(live)
        name = names[k % len(names)] if names else None
        key = f"kb/{name}"
        expect_gets = None
        if op == "put" or name is None:
            new = f"n{r}.md"
            client.put_object(Bucket=b, Key=f"kb/{new}", Body=markdown_doc(random.Random(r)).encode())
            live.add(new)
        elif op == "overwrite":
            client.put_object(Bucket=b, Key=key, Body=markdown_doc(random.Random(r)).encode())
        elif op == "touch":
            body = client.get_object(Bucket=b, Key=key)["Body"].read()
            client.put_object(Bucket=b, Key=key, Body=body)
            expect_gets = 1
        elif op == "copy_in_place":
            client.copy_object(Bucket=b, Key=key, CopySource={"Bucket": b, "Key": key},
                               MetadataDirective="REPLACE", Metadata={"rev": str(r)})
            expect_gets = 1
        elif op == "delete":
            client.delete_object(Bucket=b, Key=key)
            live.discard(name)
        elif op == "rename":
            new = f"r{r}.md"
            client.copy_object(Bucket=b, Key=f"kb/{new}", CopySource={"Bucket": b, "Key": key})
            client.delete_object(Bucket=b, Key=key)
            live.discard(name)
            live.add(new)
        else:
            expect_gets = 0
        before = len(idx.embedder.texts)
        log.reset()
        rep = idx.refresh(uri, allow_deletes=True)
        assert len(idx.embedder.texts) - before == rep.chunks_embedded
        if expect_gets is not None:
            assert log.gets() == expect_gets, (op, log.ops)
            assert rep.chunks_embedded == 0 and rep.docs_modified == 0, op
        if op == "rename":
            assert rep.chunks_embedded == 0  # same texts under a new key: all from the cache
        ref = full_rebuild(s, make_db(), uri)
        assert index_digest(idx.conn) == index_digest(ref.conn), f"after {op}"
        assert _rows(idx.conn) == _rows(ref.conn)
        ref.close()
    idx.close()


def test_fast_timestamp_parser_agrees_with_botocores():
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    from rag_assets.sources.s3 import _fast_timestamp

    for v in ("2026-12-02T01:38:20.000Z", "2026-12-02T01:38:20Z", "Wed, 02 Dec 2026 01:38:20 GMT", "1700000000"):
        assert _fast_timestamp(v) == DEFAULT_TIMESTAMP_PARSER(v)
        assert _fast_timestamp(v).timestamp() == DEFAULT_TIMESTAMP_PARSER(v).timestamp()


def test_source_sensor_lists_the_bucket_and_reports_changed_shards(settings, s3):
    """Dagster: the source sensor of an S3-bound index lists the bucket (no GET) and reports exactly the
    shards whose objects changed, as it does for a folder."""
    import json

    import dagster as dg

    from rag_assets.defs.resources import resources_for
    from rag_assets.defs.sensors import build_sensors
    from rag_assets.manifest import shard_of

    client, log = s3
    b = _bucket(client)
    for i in range(6):
        client.put_object(Bucket=b, Key=f"kb/d{i}.md", Body=f"# D{i}\n\nbody {i}".encode())
    uri = f"s3://{b}/kb"
    idx = _indexer(settings)
    try:
        idx.refresh(uri)  # binds the index to the bucket
    finally:
        idx.close()
    sensor = next(s for s in build_sensors(settings) if s.name.endswith("source_sensor"))

    def tick(instance, cursor):
        res = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources_for(settings)))
        if isinstance(res, dg.SkipReason):
            return [], cursor
        return [int(ev.partition) for ev in res.asset_events], res.cursor

    with dg.instance_for_test() as instance:
        log.reset()
        first, cursor = tick(instance, None)
        assert sorted(first) == list(range(settings.shards))  # no cursor yet: every shard is reported once
        assert log.gets() == 0  # listing only
        assert tick(instance, cursor)[0] == []
        client.put_object(Bucket=b, Key="kb/d3.md", Body=b"# D3\n\nnew body")
        changed, cursor = tick(instance, cursor)
        assert changed == [shard_of("d3.md", settings.shards)]
        client.delete_object(Bucket=b, Key="kb/d5.md")
        changed, _ = tick(instance, cursor)
        assert changed == [shard_of("d5.md", settings.shards)]
        assert log.gets() == 0
    assert json.loads(cursor)  # the cursor is the per-shard versions
