"""``rag-assets``: the command-line contract (index, query, status, export, …).

Every command takes ``--json`` for scripts; failures exit non-zero with a message naming the
document, setting or object at fault.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rag_assets.settings import Settings


def _print(obj: dict, as_json: bool, human) -> None:
    if as_json:
        print(json.dumps(obj, indent=None, default=str, ensure_ascii=False))
    else:
        human(obj)


def cmd_index(args, settings: Settings) -> int:
    from rag_assets.sources import is_s3_uri

    target = args.path if args.path else (settings.source_uri or str(settings.source_path))
    if is_s3_uri(target):  # a bucket prefix: its listing is checked by the scan (one clear error)
        path = target
        settings = _with(settings, source_uri=path)
    else:
        path = Path(target)
        if not path.is_dir():
            raise FileNotFoundError(f"source folder does not exist or is not a directory: {path}")
        settings = _with(settings, source_path=path)
    if args.core:
        from rag_assets.pipeline import Indexer
        from rag_assets.progress import bars_wanted

        idx = Indexer(settings)
        try:
            rep = idx.refresh(
                path,
                full=args.full,
                rehash=args.rehash,
                allow_deletes=args.allow_deletes,
                change_source=args.change_source,
                progress=bars_wanted(sys.stderr, as_json=args.json),  # its shard bar: a terminal, not --json
            )
        finally:
            idx.close()
    elif not args.dagster_run:
        # The core's stages, then their record in the Dagster instance (defs/recorded.py): Dagster is
        # imported by the recorder, in a detached process, or here with --verbose (which waits for it).
        from rag_assets.defs.recorded import index_recorded
        from rag_assets.progress import bars_wanted

        rep = index_recorded(
            settings,
            path,
            full=args.full,
            rehash=args.rehash,
            allow_deletes=args.allow_deletes,
            change_source=args.change_source,
            progress=bars_wanted(sys.stderr, as_json=args.json),
            record="wait" if args.verbose else "background",
        )
    else:
        from rag_assets.defs.runner import index_via_dagster
        from rag_assets.progress import StageBars, bars_wanted

        bars = StageBars(enabled=bars_wanted(sys.stderr, as_json=args.json))
        try:
            rep = index_via_dagster(
                settings,
                path,
                full=args.full,
                rehash=args.rehash,
                allow_deletes=args.allow_deletes,
                change_source=args.change_source,
                verbose=args.verbose,
                bars=bars,
            )
        finally:
            bars.close()  # before the summary line (or the error line), never across it
    d = rep.as_dict()

    def human(d: dict) -> None:
        print(
            f"indexed {path}: {d['docs_total']} documents "
            f"(+{d['docs_added']} ~{d['docs_modified']} meta {d['docs_metadata_only']} -{d['docs_deleted']} "
            f"={d['docs_unchanged']}), {d['chunks_total']} chunks; embedded {d['chunks_embedded']} "
            f"({d['tokens_embedded']} tokens), reused {d['chunks_reused']}; {d['shards_refreshed']} shards "
            f"refreshed in {d['seconds']:.2f}s; generation {d['generation']}"
        )
        from rag_assets.failures import one_line

        for e in d["errors"]:  # file names may hold control characters: never raw to a terminal
            print(f"  skipped {one_line(e['doc_id'])}: {one_line(e['error'])}", file=sys.stderr)

    _print(d, args.json, human)
    return 0


def cmd_record(args, settings: Settings) -> int:
    """Drain the index's Dagster outbox in this process (``rag-assets index`` does it in the background)."""
    from rag_assets.defs.report import drain_outbox

    n = drain_outbox(settings)
    _print({"recorded": n}, args.json, lambda d: print(f"recorded {d['recorded']} refresh(es) in the Dagster instance"))
    return 0


def _rerank_settings(args, settings: Settings) -> Settings:
    """``--rerank off|http|local`` overrides RAG_RERANK for this command (checked like the variable)."""
    if getattr(args, "rerank", None) is None:
        return settings
    s = _with(settings, rerank=args.rerank)
    s.validate()
    return s


def cmd_query(args, settings: Settings) -> int:
    from rag_assets.embedders import make_embedder
    from rag_assets.query import parse_filters, search
    from rag_assets.rerank import make_reranker
    from rag_assets.store.db import connect_index

    settings = _rerank_settings(args, settings)
    reranker = make_reranker(settings)
    conn = connect_index(settings)
    emb = make_embedder(settings)
    try:
        res = search(
            conn,
            emb,
            args.text,
            args.k,
            parse_filters(args.filter),
            args.min_score,
            mode=args.mode or settings.retrieval_mode,
            rrf_k=settings.rrf_k,
            ef_search=settings.hnsw_ef_search,
            reranker=reranker,
            rerank_depth=settings.rerank_depth,
            rerank_on_error=settings.rerank_on_error,
        )
    finally:
        emb.close()
        conn.close()
        if reranker is not None:
            reranker.close()
    if res.rerank is not None and not res.rerank.applied:
        print(f"warning: not reranked (first-stage order): {res.rerank.error}", file=sys.stderr)

    def human(d: dict) -> None:
        from rag_assets.failures import one_line

        for i, h in enumerate(d["results"], 1):
            snippet = " ".join(h["text"].split())[:200]
            title = h["metadata"].get("title", "")
            print(f"{i:2d}. {h['score']:.3f}  {one_line(h['doc_id'])}#{h['seq']}  {one_line(str(title))}")
            print(f"      {one_line(snippet)}")
        if not d["results"]:
            print("no results")

    _print(res.as_dict(), args.json, human)
    return 0


def cmd_eval(args, settings: Settings) -> int:
    """Score a labelled question set against the index: recall, MRR and nDCG at k, by document
    (and by chunk where the set labels chunks)."""
    from rag_assets.eval import evaluate, load_questions

    if args.compare:
        return _eval_compare(args, settings)
    settings = _rerank_settings(args, settings)
    rep = evaluate(
        settings,
        load_questions(args.questions),
        k=args.k,
        mode=args.mode,
        generation=args.generation,
        split=args.split,
        exact=args.exact,
        rerank=settings.rerank != "off",
    )
    d = rep.as_dict()
    for qid, doc in rep.missing:  # labelled but not in this generation: the set or the index is off
        print(
            f"warning: {qid}: relevant document {doc!r} is not in generation {rep.generation}",
            file=sys.stderr,
        )

    def human(d: dict) -> None:
        print(
            f"{args.questions}: {d['n']} questions (split {d['split'] or 'all'}), "
            f"generation {d['generation']}, mode {d['mode']}{' (exact)' if d['exact'] else ''}"
            + (f", reranked by {d['rerank']} (depth {d['rerank_depth']})" if d.get("rerank") else "")
        )
        chunks = d["chunk_metrics"] or {}
        print(f"{'metric':<12}{'by doc':>8}" + (f"{'by chunk':>10}" if chunks else ""))
        for name, value in d["metrics"].items():
            print(f"{name:<12}{value:>8.3f}" + (f"{chunks[name]:>10.3f}" if chunks else ""))
        print(f"{'n':<12}{d['n']:>8}" + (f"{d['n_chunk_labelled']:>10}" if chunks else ""))

    _print(d, args.json, human)
    return 0


def _eval_compare(args, settings: Settings) -> int:
    """The quality gate's comparison, by hand: the newest building generation (or ``--generation``)
    against the live one, on this question set; nothing is recorded or switched."""
    from dataclasses import replace

    from rag_assets.quality_gate import judge
    from rag_assets.store.db import connect_index
    from rag_assets.store.generations import get_generation

    gated = replace(settings, quality_questions=args.questions, quality_k=args.k)
    conn = connect_index(settings)
    try:
        if args.generation is not None:
            gen = get_generation(conn, args.generation)
        else:
            row = conn.execute("SELECT id FROM generations WHERE state = 'building' ORDER BY id DESC LIMIT 1").fetchone()
            gen = get_generation(conn, row[0]) if row else None
        if gen is None:
            raise ValueError("no generation to compare: no building generation (or --generation G unknown)")
        d = judge(gated, conn, gen).as_dict()
    finally:
        conn.close()
    d.pop("key", None)

    def human(d: dict) -> None:
        verdict = "would switch" if d["passed"] else "would be refused"
        print(f"generation {d['generation']} vs live {d['live_generation']}: {verdict}: {d['reason']}")

    _print(d, args.json, human)
    return 0


def cmd_status(args, settings: Settings) -> int:
    from rag_assets.status import index_status
    from rag_assets.store.db import connect_index

    conn = connect_index(settings)
    try:
        st = index_status(conn, digest=not args.no_digest)
    finally:
        conn.close()

    def human(d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                v = json.dumps(v, default=str)
            print(f"{k:>22}: {v}")

    _print(st, args.json, human)
    return 0


def cmd_export(args, settings: Settings) -> int:
    from rag_assets.export import export_rows
    from rag_assets.store.db import connect_index

    conn = connect_index(settings)
    try:
        n = export_rows(conn, Path(args.path), args.format)
    finally:
        conn.close()
    _print(
        {"path": args.path, "format": args.format, "rows": n},
        args.json,
        lambda d: print(f"exported {d['rows']} rows to {d['path']} ({d['format']})"),
    )
    return 0


def cmd_cost(args, settings: Settings) -> int:
    from datetime import date

    from rag_assets.cost import cost_report
    from rag_assets.store.db import connect_index

    since = date.fromisoformat(args.since) if args.since else None
    conn = connect_index(settings)
    try:
        rep = cost_report(conn, since, args.price_per_mtok)
    finally:
        conn.close()

    def human(d: dict) -> None:
        print(
            f"{'day':<11} {'model':<24} {'runs':>5} {'tokens':>12} {'cost $':>10} {'full re-embed tokens':>21} "
            f"{'full $':>10} {'saved':>7}"
        )
        for r in d["rows"] + [{"day": "total", "model": "", **d["total"]}]:
            pct = f"{r['saved_pct']:.1f}%" if r.get("saved_pct") is not None else "-"
            print(
                f"{r['day']:<11} {r['model'][:24]:<24} {r['runs']:>5} {r['tokens_embedded']:>12} "
                f"{r['cost_usd']:>10.4f} {r['full_reembed_tokens']:>21} {r['full_reembed_cost_usd']:>10.4f} {pct:>7}"
            )

    _print(rep, args.json, human)
    return 0


def cmd_snapshot(args, settings: Settings) -> int:
    from rag_assets import snapshots as snap

    store = snap.store_for_settings(settings)
    if args.action == "list":
        out: dict = {"target": settings.snapshot_target, "snapshots": snap.list_snapshots(store)}
        _print(out, args.json, lambda d: [print(json.dumps(x, default=str)) for x in d["snapshots"]] or None)
        return 0
    if args.action == "prune":
        if args.keep is None:
            raise ValueError("snapshot prune needs --keep N")
        if args.keep < 1 and not args.yes:
            raise ValueError(
                f"snapshot prune --keep {args.keep} would delete every snapshot (no restore would remain "
                "possible): pass --yes to confirm"
            )
        _print(snap.prune_snapshots(store, args.keep), args.json, _human_dict)
        return 0
    if args.action == "show":
        _print(snap.show_snapshot(store, _need_id(args)), args.json, _human_dict)
        return 0
    from rag_assets.store.db import connect_index

    conn = connect_index(settings)
    try:
        if args.action == "create":
            out = snap.create_snapshot(conn, store, note=args.note)
        else:  # restore
            out = snap.restore_snapshot(
                conn,
                store,
                _need_id(args),
                keep_generations=settings.keep_generations,
                hnsw_m=settings.hnsw_m,
                hnsw_ef_construction=settings.hnsw_ef_construction,
                hnsw_memory_cap_mb=settings.hnsw_build_memory_mb,
                memory_budget_mb=settings.snapshot_restore_memory_mb,
                text_search_config=settings.text_search_config,
            )
    finally:
        conn.close()
    _print(out, args.json, _human_dict)
    return 0


def _need_id(args) -> str:
    if not args.id:
        raise ValueError(f"snapshot {args.action} needs a snapshot ID (see `rag-assets snapshot list`)")
    return args.id


def _human_dict(d: dict) -> None:
    for k, v in d.items():
        print(f"{k:>24}: {json.dumps(v, default=str) if isinstance(v, dict | list) else v}")


def cmd_rollback(args, settings: Settings) -> int:
    from rag_assets.snapshots import rollback
    from rag_assets.store.db import connect_index

    conn = connect_index(settings)
    try:
        out = rollback(conn, settings.keep_generations)
    finally:
        conn.close()
    _print(out, args.json, _human_dict)
    return 0


def cmd_generations(args, settings: Settings) -> int:
    from rag_assets.snapshots import list_generations
    from rag_assets.store.db import connect_index

    conn = connect_index(settings)
    try:
        gens = list_generations(conn)
    finally:
        conn.close()
    _print(
        {"generations": gens},
        args.json,
        lambda d: [print(json.dumps(g, default=str)) for g in d["generations"]],
    )
    return 0


def cmd_plan(args, settings: Settings) -> int:
    """What a switch to the configured embedder/chunker will embed and cost, before any backfill."""
    from rag_assets.plan import plan_switch
    from rag_assets.store.db import connect_index

    conn = connect_index(settings)
    try:
        plan = plan_switch(conn, settings)
    finally:
        conn.close()

    def human(d: dict) -> None:
        what = "a new generation" if d["new_generation"] else "no new generation (the live one matches)"
        price = f"${d['cost_usd']:.4f}" if d["price_known"] else "unknown (no price for this model: RAG_EMBEDDING_PRICE_PER_MTOK)"
        print(
            f"{what}: {d['embedder']} / {d['chunker']}{' (re-chunks every document)' if d['rechunk'] else ''}\n"
            f"  {d['documents']} documents, {d['chunks']} chunks; {d['texts_to_embed']} texts to embed "
            f"({d['tokens_to_embed']} tokens), {d['texts_cached']} already cached; cost {price}"
        )

    _print(plan.as_dict(), args.json, human)
    return 0


def cmd_serve(args, settings: Settings) -> int:
    """One index (``--index`` or the RAG_* environment), or every index of ``--location``."""
    from rag_assets.service.server import serve

    indexes = None
    if args.location and not args.index:
        from rag_assets import registry

        indexes = {n: s.with_secrets() for n, s in registry.load_location(args.location).items()}
    serve(settings, args.host, args.port, indexes=indexes)
    return 0


def cmd_mcp(args, settings: Settings) -> int:
    """The index as an MCP server on stdin/stdout (search and fetch tools), for agents that spawn
    it; `serve` offers the same over HTTP at /indexes/NAME/mcp."""
    from rag_assets.service.mcp_server import serve_stdio

    serve_stdio(settings)
    return 0


def cmd_dev(args, settings: Settings) -> int:
    """`dagster dev` on the same instance and database as the CLI (so CLI runs show in the UI)."""
    import os
    import shutil

    from rag_assets.dagster_instance import dagster_home
    from rag_assets.defs.runner import DAGSTER_EVENT_BATCH_SIZE

    home = dagster_home(settings)
    env = dict(os.environ, DAGSTER_HOME=str(home))
    env.setdefault("DAGSTER_EVENT_BATCH_SIZE", DAGSTER_EVENT_BATCH_SIZE)  # batched asset events
    if args.source:
        # Recorded now, like `index PATH`: the sensors then read the index's binding, whatever the
        # working directory or RAG_SOURCE_PATH of the Dagster processes.
        from rag_assets.store.db import connect_index
        from rag_assets.store.source_binding import SourceSpec, bind_source

        src = Path(args.source)
        if not src.is_dir():
            raise FileNotFoundError(f"source folder does not exist or is not a directory: {src}")
        conn = connect_index(settings)
        try:
            bind_source(conn, SourceSpec.of(src, settings.include, settings.exclude), change=args.change_source)
        finally:
            conn.close()
        env["RAG_SOURCE_PATH"] = str(src.resolve())
    from rag_assets.defs.recorded import spawn_reporter, waiting_records

    if waiting_records(settings):  # CLI refreshes whose recorder died: into the instance the UI opens
        spawn_reporter(settings)
    exe = shutil.which("dagster") or "dagster"
    cmd = [exe, "dev", "-m", args.location or "rag_assets.definitions", "-h", args.host, "-p", str(args.port)]
    print(f"DAGSTER_HOME={home} {' '.join(cmd)}", file=sys.stderr)
    os.execvpe(exe, cmd, env)
    return 0  # not reached


def cmd_db(args, settings: Settings) -> int:
    from rag_assets.store.embedded import embedded_url, stop_embedded

    if args.action == "stop":
        stopped = stop_embedded(settings.home)
        print("stopped" if stopped else "not running")
    else:
        print(settings.database_url or embedded_url(settings.home))
    return 0


def _settings(args) -> Settings:
    """The addressed index: ``--index NAME`` of the code location, else the RAG_* environment."""
    if args.index:
        from rag_assets import registry

        return registry.find(args.index, args.location).with_secrets()
    return Settings.from_env()


def _with(settings: Settings, **kw) -> Settings:
    from dataclasses import replace

    return replace(settings, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag-assets", description=__doc__.splitlines()[0])
    p.add_argument(
        "--index",
        metavar="NAME",
        help="the index of the code location (--location) to address; default: the RAG_* environment's",
    )
    p.add_argument(
        "--location",
        metavar="MODULE",
        help="code location module defining the indexes (default rag_assets.definitions; a dg project: "
        "PKG.definitions, run from the project root)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="index: wait for the refresh's record in the Dagster instance (with --dagster-run: print Dagster's "
        "event log on stderr); by default a refresh shows progress bars and a summary",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("index", help="refresh the index from a folder or s3:// prefix (incremental by default)")
    s.add_argument(
        "path", nargs="?", help="a folder, or s3://bucket/prefix (default: the index's source); boto3's standard configuration"
    )
    s.add_argument("--full", action="store_true", help="rebuild from scratch into a new generation")
    s.add_argument(
        "--rehash", action="store_true", help="re-read every file, not only those whose size/mtime changed"
    )
    s.add_argument(
        "--core", action="store_true", help="run the stages directly instead of as Dagster materializations"
    )
    s.add_argument(
        "--dagster-run",
        action="store_true",
        help="refresh as in-process Dagster runs (a run page and event log in the UI; ~1 s more per run)",
    )
    s.add_argument(
        "--allow-deletes",
        action="store_true",
        help="let a refresh delete more than RAG_MAX_DELETE_FRACTION of the documents",
    )
    s.add_argument(
        "--change-source",
        action="store_true",
        help="point this index at another folder or other RAG_INCLUDE/RAG_EXCLUDE globs (on purpose)",
    )
    s.add_argument("--json", action="store_true", help="print only the report, as one JSON document")
    # Also accepted after the command (`index DOCS --verbose`); SUPPRESS keeps the global one otherwise.
    s.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_index)

    s = sub.add_parser(
        "record", help="write the refreshes not yet recorded into the Dagster instance (waits for a running recorder)"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_record)

    s = sub.add_parser("query", help="top-k chunks for a question")
    s.add_argument("text")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--filter", action="append", metavar="KEY=VALUE", help="metadata filter (repeatable)")
    s.add_argument("--min-score", type=float, default=None, help="drop hits scoring below this (the mode's score)")
    s.add_argument(
        "--mode",
        choices=("vector", "keyword", "hybrid"),
        default=None,
        help="ranking: vector, keyword (full text) or hybrid (both, fused by RRF); default RAG_RETRIEVAL_MODE",
    )
    s.add_argument(
        "--rerank",
        choices=("off", "http", "local"),
        default=None,
        help="second stage over the top RAG_RERANK_DEPTH candidates: the http endpoint (RAG_RERANK_URL) "
        "or a local cross-encoder (RAG_RERANK_MODEL); default RAG_RERANK (off)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_query)

    s = sub.add_parser("eval", help="retrieval quality on a labelled question set (recall, MRR, nDCG at k)")
    s.add_argument("questions", metavar="QUESTIONS.jsonl")
    s.add_argument("-k", type=int, default=10, help="documents ranked per question (default 10)")
    s.add_argument(
        "--mode",
        choices=("vector", "keyword", "hybrid"),
        default=None,
        help="ranking: vector, keyword or hybrid; default RAG_RETRIEVAL_MODE",
    )
    s.add_argument("--generation", type=int, default=None, help="a generation other than the live one")
    s.add_argument("--split", choices=("dev", "report"), default=None, help="only this part of the set")
    s.add_argument("--exact", action="store_true", help="rank by exact distance, not through the HNSW index")
    s.add_argument(
        "--rerank",
        choices=("off", "http", "local"),
        default=None,
        help="second stage over the top RAG_RERANK_DEPTH candidates: the http endpoint (RAG_RERANK_URL) "
        "or a local cross-encoder (RAG_RERANK_MODEL); default RAG_RERANK (off)",
    )
    s.add_argument(
        "--compare",
        action="store_true",
        help="the quality gate by hand: the newest building generation (or --generation) vs the live one",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("status", help="counts, last run, live generation and index digest")
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-digest", action="store_true", help="skip the index digest (faster on big indexes)")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("export", help="write the serving rows to a file")
    s.add_argument("path")
    s.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("cost", help="embedding spend per day and model vs. re-embedding everything")
    s.add_argument("--since", metavar="YYYY-MM-DD")
    s.add_argument(
        "--price-per-mtok", type=float, default=None, help="re-price every run (USD per 1M tokens)"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_cost)

    s = sub.add_parser(
        "snapshot", help="versioned snapshots of the index (RAG_SNAPSHOT_URI: a folder or s3://)"
    )
    s.add_argument("action", choices=("create", "list", "show", "restore", "prune"))
    s.add_argument("id", nargs="?", help="snapshot id (show, restore)")
    s.add_argument("--keep", type=int, help="prune: snapshots to keep")
    s.add_argument("--yes", action="store_true", help="prune: confirm --keep 0 (delete every snapshot)")
    s.add_argument("--note", help="create: a note stored in the record")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_snapshot)

    s = sub.add_parser("rollback", help="switch back to the previous generation at once (no re-embedding)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_rollback)

    s = sub.add_parser("generations", help="index generations (live, retired, building) and their sizes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_generations)

    s = sub.add_parser("plan", help="texts, tokens and cost a switch to the configured embedder/chunker will embed")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("serve", help="the HTTP service: signed webhooks in, queries out")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("mcp", help="serve the index to agents over MCP on stdio (tools: search, fetch)")
    s.set_defaults(fn=cmd_mcp)

    s = sub.add_parser("dev", help="run `dagster dev` (UI, sensors, automation) on this index")
    s.add_argument("--source", help="folder to watch (default: the folder this index was built from)")
    s.add_argument("--change-source", action="store_true", help="--source may differ from the recorded folder")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=3000)
    s.set_defaults(fn=cmd_dev)

    s = sub.add_parser("db", help="the embedded PostgreSQL server")
    s.add_argument("action", choices=("url", "stop"))
    s.set_defaults(fn=cmd_db)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. A failure ends with one line naming its cause; the exit code its kind
    (``rag_assets/failures.py``: 2 settings, 3 source, 4 database, 5 embedding, 6 indexing, 1 bug)."""

    from rag_assets.failures import EXIT_CODES, classify, one_line
    from rag_assets.settings import debug_enabled

    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        return args.fn(args, settings)
    except KeyboardInterrupt:
        print(f"rag-assets {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        kind = classify(e)
        if debug_enabled():
            import traceback

            traceback.print_exc()
        if kind == "unexpected":
            msg = f"unexpected {type(e).__name__}: {e} (set RAG_DEBUG=1 for the traceback)"
        else:
            msg = str(e)
        print(f"rag-assets {args.cmd}: error: {one_line(msg)}", file=sys.stderr)
        return EXIT_CODES[kind]


if __name__ == "__main__":
    sys.exit(main())
