"""HTML through the core path: the Django docs 5.0 and 5.1 built to HTML with Sphinx, indexed from a
folder and from a moto S3 bucket.

Why: issue 12 asks that binary formats keep both levels of incrementality. This measures it on a real
HTML site (Sphinx output: navigation, sidebars, scripts around the main content), not on files we wrote.
For each source (folder, then S3) in its own fresh ``RAG_HOME`` (its own embedded Postgres, so its own
parse cache and embedding cache), through ``rag-assets index SOURCE --core --json`` with the hashing
embedder and ``RAG_INCLUDE='**/*.html'``:

1. full index of the 5.0 HTML: documents, chunks, texts embedded, seconds, parses (new rows in
   ``rag_cache.parse_cache``);
2. a no-change run: parses and texts embedded must be 0 (and GetObject requests 0 for S3);
3. 5.0 -> 5.1 applied like a checkout (files whose bytes differ rewritten, files only in 5.0 deleted):
   texts embedded against the own lower bound, the distinct chunk texts of 5.1 absent from 5.0's
   chunks (read from the ``chunks`` table before and after).

Only the ``*.html`` files of each build are copied (the include glob would skip the rest anyway).

Usage:
  python benchmarks/html_bench.py                  # downloads the sdists and builds the HTML if needed
  python benchmarks/html_bench.py --html-root /tmp/djhtml --sources folder --json out.json

Needs Sphinx (benchmark-only, not a project dependency): ``pip install "sphinx==7.4.7"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_assets.store.db import connect  # noqa: E402

VERSIONS = {"5.0": "django==5.0.*", "5.1": "django==5.1.*"}
BUCKET, PREFIX = "djdocs", "html"


# --- building the HTML -----------------------------------------------------------------------------


def build_html(root: Path, src: Path) -> dict[str, Path]:
    """Each version's Sphinx HTML under ``root/VERSION`` (built once; a present folder is reused)."""
    out = {}
    for version, spec in VERSIONS.items():
        dest = root / version
        out[version] = dest
        if (dest / "index.html").exists():
            continue
        src.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        spec, "-d", str(src)], check=True)
        sdist = next(p for p in sorted(src.glob("*.tar.gz")) if p.name.lower().startswith(f"django-{version}."))
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(src)], check=True)
        docs = src / sdist.name[: -len(".tar.gz")] / "docs"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sphinx", "-q", "-b", "html", "-j", "1", str(docs), str(dest)],
                       check=True, stderr=subprocess.DEVNULL)
        print(f"built Django {version} docs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def html_files(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*.html"))}


# --- S3 (moto in this process, requests counted) ---------------------------------------------------


class RequestLog:
    """WSGI middleware in front of moto: S3 operations counted as they arrive."""

    def __init__(self, app):
        self.app, self.lock, self.ops = app, threading.Lock(), Counter()

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        parts = environ.get("PATH_INFO", "/").lstrip("/").split("/", 1)
        q = environ.get("QUERY_STRING", "")
        if method == "GET" and len(parts) == 2 and parts[1]:
            op = "GetObject"
        elif method == "GET" and "list-type=2" in q:
            op = "ListObjectsV2"
        elif method == "GET" and "versioning" in q:
            op = "GetBucketVersioning"
        else:
            op = f"{method} other"
        with self.lock:
            self.ops[op] += 1
        return self.app(environ, start_response)


# --- one source's three steps ----------------------------------------------------------------------


@dataclass
class Step:
    step: str
    seconds: float
    docs_total: int
    added: int
    modified: int
    deleted: int
    unchanged: int
    chunks_total: int
    texts_embedded: int
    parses: int
    lower_bound: int | None = None
    requests: dict[str, int] = field(default_factory=dict)
    errors: int = 0


class Run:
    """A fresh RAG_HOME and the CLI invoked on it, as a user would."""

    def __init__(self, home: Path, extra_env: dict[str, str]):
        self.env = {**os.environ, "RAG_HOME": str(home), "RAG_INCLUDE": "**/*.html", "RAG_EMBEDDER": "hashing",
                    **extra_env}
        for var in ("RAG_DATABASE_URL", "RAG_SOURCE_URI", "RAG_SOURCE_PATH", "RAG_EXCLUDE", "RAG_PG_SCHEMA"):
            self.env.pop(var, None)
        self.url: str | None = None

    def cli(self, *args: str) -> str:
        p = subprocess.run(["rag-assets", *args], env=self.env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"rag-assets {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def db(self):
        if self.url is None:
            self.url = self.cli("db", "url").strip()
        return connect(self.url, schema="rag")

    def parse_rows(self) -> int:
        with self.db() as conn:
            if conn.execute("SELECT to_regclass('rag_cache.parse_cache')").fetchone()[0] is None:
                return 0
            return conn.execute("SELECT count(*) FROM rag_cache.parse_cache").fetchone()[0]

    def chunk_texts(self) -> set[str]:
        with self.db() as conn:
            if conn.execute("SELECT to_regclass('chunks')").fetchone()[0] is None:
                return set()
            return {r[0] for r in conn.execute("SELECT DISTINCT text FROM chunks")}

    def index(self, name: str, source: str, log: RequestLog | None, lower_bound: int | None = None) -> Step:
        before = self.parse_rows()
        if log is not None:
            log.ops.clear()
        t0 = time.perf_counter()
        d = json.loads(self.cli("index", source, "--core", "--allow-deletes", "--json"))
        seconds = time.perf_counter() - t0
        return Step(
            step=name, seconds=round(seconds, 3), docs_total=d["docs_total"], added=d["docs_added"],
            modified=d["docs_modified"], deleted=d["docs_deleted"], unchanged=d["docs_unchanged"],
            chunks_total=d["chunks_total"], texts_embedded=d["chunks_embedded"],
            parses=self.parse_rows() - before, lower_bound=lower_bound,
            requests=dict(log.ops) if log is not None else {}, errors=len(d.get("errors") or []),
        )


def apply_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Like a checkout: rewrite files whose bytes differ, delete files not in the new version."""
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*.html")}
    for rel in present - files.keys():
        (folder / rel).unlink()
    for rel, data in files.items():
        p = folder / rel
        if not p.exists() or p.read_bytes() != data:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


def apply_bucket(client, files: dict[str, bytes], old: dict[str, bytes]) -> None:
    for rel in old.keys() - files.keys():
        client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}")
    for rel, data in files.items():
        if old.get(rel) != data:
            client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}", Body=data, ContentType="text/html")


def measure(kind: str, v50: dict[str, bytes], v51: dict[str, bytes], work: Path) -> list[Step]:
    home = work / f"home-{kind}"
    log = server = None
    if kind == "folder":
        folder = work / "corpus"
        apply_folder(folder, v50)
        source, run = str(folder), Run(home, {})

        def upgrade() -> None:
            apply_folder(folder, v51)
    else:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        log = RequestLog(server._server.app)
        server._server.app = log
        host, port = server.get_host_and_port()
        aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        client = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        apply_bucket(client, v50, {})
        source, run = f"s3://{BUCKET}/{PREFIX}", Run(home, aws)
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            run.env.pop(var, None)

        def upgrade() -> None:
            apply_bucket(client, v51, v50)
    try:
        steps = [run.index("full index of 5.0", source, log), run.index("no-change run", source, log)]
        texts_50 = run.chunk_texts()
        upgrade()
        step = run.index("5.0 -> 5.1", source, log)
        step.lower_bound = len(run.chunk_texts() - texts_50)
        steps.append(step)
        return steps
    finally:
        run.cli("db", "stop")
        if server is not None:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html-root", type=Path, default=Path(tempfile.gettempdir()) / "djhtml")
    ap.add_argument("--src", type=Path, default=Path(tempfile.gettempdir()) / "djsrc")
    ap.add_argument("--sources", default="folder,s3", help="comma-separated: folder, s3")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    trees = build_html(args.html_root, args.src)
    v50, v51 = html_files(trees["5.0"]), html_files(trees["5.1"])
    changed = sum(1 for k in v51.keys() & v50.keys() if v51[k] != v50[k])
    corpus = {"files_5.0": len(v50), "bytes_5.0": sum(map(len, v50.values())), "files_5.1": len(v51),
              "changed": changed, "only_5.1": len(v51.keys() - v50.keys()), "only_5.0": len(v50.keys() - v51.keys())}
    result: dict = {"corpus": corpus, "sources": {}}
    with tempfile.TemporaryDirectory(prefix="html-bench-") as tmp:
        for kind in args.sources.split(","):
            steps = measure(kind.strip(), v50, v51, Path(tmp))
            result["sources"][kind] = [asdict(s) for s in steps]
            print(f"\n{kind}: {corpus['files_5.0']} HTML files of 5.0 ({corpus['bytes_5.0'] / 1e6:.1f} MB); "
                  f"5.1: {changed} changed, {corpus['only_5.1']} added, {corpus['only_5.0']} deleted")
            print("| step | wall s | docs | +/~/- | chunks | texts embedded | lower bound | parses | GetObject |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for s in steps:
                lb = "" if s.lower_bound is None else f"{s.lower_bound:,}"
                gets = s.requests.get("GetObject", 0) if kind == "s3" else ""
                print(f"| {s.step} | {s.seconds:.2f} | {s.docs_total:,} | {s.added}/{s.modified}/{s.deleted} | "
                      f"{s.chunks_total:,} | {s.texts_embedded:,} | {lb} | {s.parses:,} | {gets} |")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
