"""rag_assets in a user's ``dg`` project: the sample project (tests/dg_project) with two indexes,
one reading an S3 bucket (moto's server over HTTP, boto3's standard configuration), one a folder.

``dg check defs`` / ``dg list defs --json`` run in subprocesses as a user runs them; both indexes
are materialized through the CLI's Dagster path (``rag-assets --location ... --index NAME``),
queried in isolation, refreshed independently; ``dg scaffold defs rag_assets.RagIndex`` writes a
defs.yaml that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write

PROJECT = Path(__file__).parent / "dg_project"
DG = shutil.which("dg") or str(Path(sys.executable).parent / "dg")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _put(endpoint: str, bucket: str, key: str, body: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in AWS.items() if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1").put_object(
        Bucket=bucket, Key=key, Body=body.encode()
    )


@pytest.fixture
def project(tmp_path, db_url, moto_endpoint):
    import uuid

    import boto3

    root = tmp_path / "proj"
    shutil.copytree(PROJECT, root)
    bucket = f"handbook-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    _put(moto_endpoint, bucket, "kb/leave.md", "# Leave\n\nEveryone gets twenty-five days of paid vacation a year.\n")
    _put(moto_endpoint, bucket, "kb/office.md", "# Office hours\n\nThe office opens at nine and closes at six.\n")
    write(root / "docs/support/printer.md", "# Printer\n\nThe printer on floor three jams with thick paper.\n")
    write(root / "docs/support/office.md", "# Office hours\n\nThe office opens at nine and closes at six.\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "AWS_"))}
    env.update(
        AWS,
        AWS_ENDPOINT_URL=moto_endpoint,
        RAG_DEMO_HANDBOOK_URI=f"s3://{bucket}/kb/",
        PYTHONPATH=os.pathsep.join([str(root / "src"), str(Path(__file__).parent.parent)]),
        RAG_DEMO_DB_URL=db_url,
        RAG_DEMO_HOME=str(tmp_path / "home"),
        NO_COLOR="1",
    )
    env["_BUCKET"] = bucket
    return root, env


def _run(cmd: list[str], root: Path, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    return r


def _rag(root: Path, env: dict, index: str, *args: str) -> dict:
    r = _run(
        [sys.executable, "-m", "rag_assets.cli", "--location", "rag_demo.definitions", "--index", index, *args, "--json"],
        root,
        env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_dg_checks_lists_and_materializes_two_indexes(project):
    root, env = project
    r = _run([DG, "check", "defs"], root, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _run([DG, "list", "defs", "--json"], root, env)
    assert r.returncode == 0, r.stderr[-3000:]
    listing = json.loads(r.stdout)
    keys = {a["asset_key"] for a in listing["assets"]}
    assert {f"{i}/{a}" for i in ("handbook", "support") for a in ("raw_documents", "document_manifest", "chunks", "embeddings", "index_snapshot")} == keys
    assert {s["name"] for s in listing["sensors"]} >= {"handbook_source_sensor", "support_source_sensor"}
    assert {c["key"] for c in listing["asset_checks"]} >= {"handbook/embeddings:rows_match_chunks", "support/embeddings:rows_match_chunks"}
    assert len({j["name"] for j in listing["jobs"]}) == len(listing["jobs"]) == 8

    hb = _rag(root, env, "handbook", "index")
    sp = _rag(root, env, "support", "index")
    assert hb["docs_total"] == 2 and sp["docs_total"] == 2
    assert sp["chunks_reused"] == 1  # the office text: embedded once for both indexes
    q = _rag(root, env, "support", "query", "paper jam")
    assert {h["doc_id"] for h in q["results"]} == {"printer.md", "office.md"}
    _put(env["AWS_ENDPOINT_URL"], env["_BUCKET"], "kb/leave.md", "# Leave\n\nEveryone gets thirty days of paid vacation a year.\n")
    hb2 = _rag(root, env, "handbook", "index")
    sp2 = _rag(root, env, "support", "index")
    assert hb2["docs_modified"] == 1 and hb2["shards_refreshed"] == 1
    assert sp2["shards_refreshed"] == 0 and sp2["chunks_embedded"] == 0


def test_dg_check_names_the_bad_attribute(project):
    root, env = project
    y = root / "src/rag_demo/defs/support/defs.yaml"
    y.write_text(y.read_text().replace("shards: 8", "shards: 100"))
    r = _run([DG, "check", "defs"], root, env)
    assert r.returncode != 0
    assert "attribute shards" in r.stdout + r.stderr
    y.write_text(y.read_text().replace("shards: 100", "shardz: 8"))
    r = _run([DG, "check", "defs"], root, env)
    assert r.returncode != 0 and "shardz" in r.stdout + r.stderr


def test_dg_scaffold_writes_a_defs_yaml_that_loads(project):
    root, env = project
    for d in ("handbook", "support"):
        shutil.rmtree(root / "src/rag_demo/defs" / d)
    r = _run([DG, "scaffold", "defs", "rag_assets.RagIndex", "team-wiki"], root, env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = (root / "src/rag_demo/defs/team-wiki/defs.yaml").read_text()
    assert "type: rag_assets.RagIndex" in text and "name: team_wiki" in text and "pg_schema: rag_team_wiki" in text
    (root / "docs/team_wiki").mkdir(parents=True)
    r = _run([DG, "check", "defs"], root, env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = _run([DG, "list", "defs", "--json"], root, env)
    assert "team_wiki/embeddings" in {a["asset_key"] for a in json.loads(r.stdout)["assets"]}
