"""Freshness: seconds from editing one document to a query returning the edit, under a real `dagster dev`.

For each setting a fresh environment is built on the project's embedded defaults (temporary RAG_HOME with
the embedded PostgreSQL and the generated DAGSTER_HOME), `dagster dev` is started, every shard is
backfilled over GraphQL, then one document at a time is edited N times; nothing but the source sensor,
the automation sensor and the daemon reacts. Each edit is split into where its time went, from Dagster's
own records:

  sensor      edit → the source sensor's raw_documents report (sensor interval; the daemon's sensor loop
              never runs more often than every 5 s)
  automation  report → the automation sensor's run request (automation interval; same 5 s loop floor)
  launch      run created → RUN_START (queue dequeue + the run worker process start)
  spawn       step subprocess starts (multiprocess executor: one Python process per step)
  compute     the three steps' own work
  other       the rest inside the run up to the embeddings commit (pool slot claims, executor loop)
  visible     edit → the query returns it (what users see; the sum of the above plus query polling)

Settings:
  defaults        the Settings defaults of this project (read at run time from rag_assets.settings)
  fast            sensor and automation intervals of 1 s
  fast-inprocess  1 s, and the code location with `in_process_executor` (the steps run in the run
                  worker, no subprocess per step): what definitions.py would give with that executor
  service-apply   (--source webhook only) Dagster on its defaults, and `rag-assets serve` with
                  RAG_SERVICE_APPLY_INTERVAL_S=1: the service applies the events it acknowledged itself
  fast-direct     fast-inprocess, and a source sensor that requests the runs itself instead of
                  reporting runless events for the automation sensor (one daemon hop instead of two);
                  not in the default list: --settings fast-direct

With ``--source webhook`` each edit is instead a signed ``document.created`` event POSTed to a real
`rag-assets serve` process on the same database, timed from its 2xx acknowledgement; ``sensor`` is then
acknowledgement → the inbox sensor's report (``RAG_INBOX_SENSOR_INTERVAL_S``).

Usage:
  python benchmarks/freshness.py --source webhook --settings defaults,fast-inprocess
  python benchmarks/freshness.py                      # 5 edits per setting, all three settings
  python benchmarks/freshness.py --repeats 3 --settings fast,fast-inprocess --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import dagster as dg

REPO = Path(__file__).resolve().parents[1]


@dg.definitions
def in_process_defs() -> dg.Definitions:
    """The project's definitions with the in-process executor (for the `fast-inprocess` setting)."""
    from rag_assets.definitions import build_defs

    return dg.Definitions.merge(build_defs(), dg.Definitions(executor=dg.in_process_executor))


@dg.definitions
def direct_defs() -> dg.Definitions:
    """`fast-inprocess` plus a source sensor that requests the runs itself (no automation hop).

    The project's source sensor only *reports* changed shards (runless events) and the automation
    sensor launches the runs on its next tick: two daemon loops, each at most every 5 s. This variant
    replaces the source sensor with one that emits a RunRequest per changed shard for the three assets,
    so an edit waits for one loop instead of two."""
    import json

    from rag_assets.definitions import build_defs
    from rag_assets.defs.sensors import shard_stat_versions
    from rag_assets.manifest import shard_key
    from rag_assets.settings import Settings
    from rag_assets.sources import FolderSource

    base = build_defs()
    settings = Settings.from_env()
    targets = [dg.AssetKey(k) for k in ("document_manifest", "chunks", "embeddings")]

    @dg.sensor(
        name="source_sensor_direct",
        minimum_interval_seconds=settings.source_sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        asset_selection=targets,
    )
    def source_sensor_direct(context: dg.SensorEvaluationContext):
        source = FolderSource(
            settings.source_path, settings.include, settings.exclude, settings.max_doc_bytes
        )
        versions, _ = shard_stat_versions(source, settings.shards)
        cursor = json.dumps({shard_key(s): v for s, v in versions.items()})
        if not context.cursor:
            return dg.SensorResult(cursor=cursor)  # the bootstrap backfill builds the first state
        last = json.loads(context.cursor)
        changed = [s for s in range(settings.shards) if last.get(shard_key(s)) != versions[s]]
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(partition_key=shard_key(s), asset_selection=targets) for s in changed
            ],
            cursor=cursor,
        )

    return dg.Definitions(
        assets=list(base.assets),
        jobs=list(base.jobs),
        schedules=list(base.schedules),
        sensors=[s for s in base.sensors if s.name != "source_sensor"] + [source_sensor_direct],
        resources=base.resources,
        executor=dg.in_process_executor,
    )


VARIANT_ATTRIBUTE = {"fast-inprocess": "in_process_defs", "fast-direct": "direct_defs"}


def _workspace(folder: Path, setting: str) -> Path:
    attribute = VARIANT_ATTRIBUTE.get(setting)
    if not attribute:
        return REPO / "workspace.yaml"
    ws = folder / "workspace.yaml"
    ws.write_text(
        "load_from:\n  - python_file:\n"
        f"      relative_path: {Path(__file__).resolve()}\n"
        f"      attribute: {attribute}\n"
        f"      working_directory: {REPO}\n"
        "      location_name: rag_assets\n"
    )
    return ws


def _covers(tags, shard: str) -> bool:
    if tags.get("dagster/partition") == shard:
        return True
    lo, hi = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    return bool(lo and hi and lo <= shard <= hi)


def _breakdown(instance, shard: str, t_edit: float, t_visible: float, known_runs: set[str]) -> dict:
    """Split one edit's latency using the instance's records (timestamps are epoch seconds)."""
    from dagster._core.events import DagsterEventType

    out: dict = {"visible": round(t_visible - t_edit, 2)}
    recs = instance.fetch_materializations(dg.AssetKey("raw_documents"), limit=50).records
    reported = [r.timestamp for r in recs if r.partition_key == shard and r.timestamp >= t_edit - 0.5]
    t_report = min(reported) if reported else None
    runs = [r for r in instance.get_run_records(limit=20) if r.dagster_run.run_id not in known_runs]
    runs = [
        r
        for r in runs
        if r.create_timestamp.timestamp() >= t_edit - 0.5 and _covers(r.dagster_run.tags, shard)
    ]
    if not runs:
        return out
    run = min(runs, key=lambda r: r.create_timestamp)  # the first run for the edited shard after the edit
    created = run.create_timestamp.timestamp()
    if t_report is None:  # fast-direct: the source sensor requested the run itself
        t_report = created
    kinds = {
        DagsterEventType.RUN_START,
        DagsterEventType.STEP_WORKER_STARTING,
        DagsterEventType.STEP_START,
        DagsterEventType.STEP_SUCCESS,
    }
    events = [
        e
        for e in instance.all_logs(run.dagster_run.run_id)
        if e.dagster_event and e.dagster_event.event_type in kinds
    ]
    run_start = next(
        (e.timestamp for e in events if e.dagster_event.event_type == DagsterEventType.RUN_START), None
    )
    spawn = compute = 0.0
    worker_starting: dict[str, float] = {}
    emb_done = None
    for e in events:
        t = e.dagster_event.event_type
        if t == DagsterEventType.STEP_WORKER_STARTING:
            worker_starting[e.step_key] = e.timestamp
        elif t == DagsterEventType.STEP_START:
            if e.step_key in worker_starting:
                spawn += e.timestamp - worker_starting[e.step_key]
            step_started = e.timestamp
            worker_starting.setdefault("__start__" + e.step_key, step_started)
        elif t == DagsterEventType.STEP_SUCCESS:
            compute += e.timestamp - worker_starting.get("__start__" + e.step_key, e.timestamp)
            if e.step_key == "embeddings":
                emb_done = e.timestamp
    out.update(
        run_id=run.dagster_run.run_id,
        sensor=round(t_report - t_edit, 2),
        automation=round(created - t_report, 2),
        launch=round(run_start - created, 2) if run_start else None,
        spawn=round(spawn, 2),
        compute=round(compute, 2),
        other=round((emb_done - run_start) - spawn - compute, 2) if run_start and emb_done else None,
    )
    return out


def _post_event(service, secret: str, doc_id: str, token: str) -> tuple[float, str]:
    """POST one signed `document.created` event; returns (time of the 2xx acknowledgement, query text)."""
    import httpx

    from tests.service_utils import event_body, signed_headers

    sentence = f"The freshness marker {token} names this event"
    body = event_body(doc_id, "document.created", f"# Event {token}\n\n{sentence}.\n")
    r = httpx.post(
        service.url + "/webhooks/documents", content=body, headers=signed_headers(secret, f"fz-{token}", body)
    )
    if r.status_code not in (200, 202):
        raise RuntimeError(f"webhook not accepted: {r.status_code} {r.text}")
    return time.time(), sentence


def run_setting(
    name: str, repeats: int, n_docs: int, shards: int, timeout: float, keep: bool, source: str = "folder"
) -> dict:
    from rag_assets.dagster_instance import dagster_home
    from rag_assets.manifest import shard_key, shard_of
    from rag_assets.settings import Settings
    from rag_assets.store.embedded import ensure_runtime_dir, stop_embedded
    from tests.e2e_utils import (
        Dagster,
        ProcessSet,
        base_env,
        dagster_dev_argv,
        edit_marker,
        free_port,
        wait_queryable,
        write_corpus,
    )

    ensure_runtime_dir()
    defaults = Settings()
    if name in ("defaults", "service-apply"):
        intervals = {}
    else:
        intervals = {
            k: "1"
            for k in (
                "RAG_SOURCE_SENSOR_INTERVAL_S",
                "RAG_INBOX_SENSOR_INTERVAL_S",
                "RAG_AUTOMATION_INTERVAL_S",
            )
        }
    root = Path(tempfile.mkdtemp(prefix=f"freshness-{name}-"))
    docs = root / "docs"
    ids = write_corpus(docs, n_docs, seed=11)
    env = base_env(
        RAG_HOME=str(root / "home"),
        RAG_SOURCE_PATH=str(docs),
        RAG_SHARDS=str(shards),
        XDG_RUNTIME_DIR=os.environ["XDG_RUNTIME_DIR"],
        **intervals,
    )
    settings = Settings.from_env(env)
    home = dagster_home(settings)
    env["DAGSTER_HOME"] = str(home)
    port = free_port()
    procs = ProcessSet(root / "logs")
    result: dict = {
        "setting": name,
        "source_sensor_interval_s": settings.source_sensor_interval_s,
        "automation_interval_s": settings.automation_interval_s,
        "executor": "in_process (the project default)",
        "trigger": "source sensor → run request"
        if name == "fast-direct"
        else "source sensor → automation sensor",
        "defaults_from_settings": {
            "source_sensor_interval_s": defaults.source_sensor_interval_s,
            "automation_interval_s": defaults.automation_interval_s,
        },
        "source": source,
        "edits": [],
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    instance = None
    service = None
    try:
        ws = _workspace(root, name)
        procs.start(
            "dagster-dev",
            dagster_dev_argv(port, ws),
            env,
        )
        api = Dagster(port)
        result["load_s"] = round(api.wait_loaded(180, check=procs.check_alive), 1)
        t0 = time.monotonic()
        bid = api.launch_backfill()
        want = {shard_key(i) for i in range(shards)}

        def backfilled():
            from tests.e2e_utils import run_partitions

            b = api.backfill(bid)
            if b["status"] in ("FAILED", "COMPLETED_FAILED", "CANCELED"):
                raise RuntimeError(f"backfill failed: {b}")
            runs = b["runs"] or []
            ok = {p for r in runs if r["status"] == "SUCCESS" for p in run_partitions(r)}
            return b["status"] == "COMPLETED_SUCCESS" or (
                ok == want and all(r["status"] == "SUCCESS" for r in runs)
            )

        from tests.e2e_utils import wait_for

        wait_for(backfilled, timeout, "the bootstrap backfill", interval=1.0, check=procs.check_alive)
        result["backfill_s"] = round(time.monotonic() - t0, 1)
        api.wait_quiet(
            quiet_s=2 * max(settings.source_sensor_interval_s, settings.automation_interval_s, 5) + 2,
            timeout=timeout,
            check=procs.check_alive,
        )
        instance = dg.DagsterInstance.from_config(str(home))
        if source == "webhook":
            from tests.service_utils import ProcessServer, new_secret

            secret = new_secret()
            svc_env = {**env, "RAG_WEBHOOK_SECRET": secret}
            if name == "service-apply":
                svc_env["RAG_SERVICE_APPLY_INTERVAL_S"] = "1"
            service = ProcessServer(svc_env, log_path=root / "logs" / "serve.log")
            service.start()
        rng = random.Random(5)
        order = rng.sample(ids, min(repeats, len(ids)))
        for i in range(repeats):
            doc_id = order[i % len(order)]
            shard = shard_key(shard_of(doc_id, shards))
            # start at a random phase of the sensor loop, like a real edit
            time.sleep(rng.uniform(0, max(settings.source_sensor_interval_s, 5)))
            known = {r.dagster_run.run_id for r in instance.get_run_records(limit=200)}
            token = "fz" + uuid.uuid4().hex[:12]
            if source == "webhook":
                doc_id = f"hooks/probe{i:03d}.md"
                shard = shard_key(shard_of(doc_id, shards))
                t_edit, query = _post_event(service, secret, doc_id, token)  # t_edit = acknowledgement
            else:
                t_edit = time.time()
                query = edit_marker(docs / doc_id, token)
            secs = wait_queryable(settings, query, doc_id, token, timeout=timeout, check=procs.check_alive)
            api.wait_quiet(quiet_s=2, timeout=timeout, check=procs.check_alive)
            if (
                name == "service-apply"
            ):  # applied by the service itself: Dagster's records are not on the path
                row = {"visible": round(secs, 2)}
            else:
                row = _breakdown(instance, shard, t_edit, t_edit + secs, known)
            row.update(doc=doc_id, shard=shard)
            result["edits"].append(row)
            print(f"  [{name}] edit {i + 1}/{repeats}: {secs:5.1f} s  {row}", file=sys.stderr, flush=True)
    finally:
        if service is not None:
            service.stop()
        if instance is not None:
            instance.dispose()
        notes = procs.stop_all()
        stop_embedded(settings.home)
        if notes:
            print(f"  [{name}] stop: {notes}", file=sys.stderr)
        if keep:
            print(f"  [{name}] kept {root}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    vis = [e["visible"] for e in result["edits"]]
    result["median_s"] = round(statistics.median(vis), 2) if vis else None
    for k in ("sensor", "automation", "launch", "spawn", "compute", "other"):
        vals = [e[k] for e in result["edits"] if e.get(k) is not None]
        result[f"median_{k}_s"] = round(statistics.median(vals), 2) if vals else None
    return result


TARGETS = {"defaults": 45.0, "fast": 10.0, "fast-inprocess": 10.0, "fast-direct": 10.0, "service-apply": 10.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--docs", type=int, default=40)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--settings", default="defaults,fast,fast-inprocess")
    p.add_argument("--timeout", type=float, default=240.0)
    p.add_argument("--json", dest="json_path", default=None, help="also write the JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temp folders (logs) for inspection")
    p.add_argument(
        "--source",
        choices=("folder", "webhook"),
        default="folder",
        help="folder: edit a file (source sensor); webhook: POST a signed event to `rag-assets serve` (inbox "
        "sensor), timed from its acknowledgement",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `finally` on SIGTERM too
    sys.path.insert(0, str(REPO))
    results = []
    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        if name == "service-apply" and args.source != "webhook":
            p.error("--settings service-apply needs --source webhook")
        print(f"== {name}", file=sys.stderr, flush=True)
        results.append(
            run_setting(name, args.repeats, args.docs, args.shards, args.timeout, args.keep, args.source)
        )
    cols = ("sensor", "automation", "launch", "spawn", "compute", "other")
    print(
        f"\nfreshness ({args.source}): {'acknowledged event' if args.source == 'webhook' else 'edit'} → queryable, median of {args.repeats} edits ({args.docs} docs, {args.shards} shards, "
        f"loadavg at start {results[0]['loadavg_start'] if results else '-'})"
    )
    head = (
        f"{'setting':<15} {'intervals':>9} {'median':>7} {'target':>7} {'min':>6} {'max':>6} | "
        + " ".join(f"{c:>10}" for c in cols)
    )
    print(head)
    print("-" * len(head))
    for r in results:
        vis = [e["visible"] for e in r["edits"]]
        target = TARGETS.get(r["setting"])
        flag = (
            "" if r["median_s"] is None or target is None else ("ok" if r["median_s"] <= target else "MISS")
        )
        print(
            f"{r['setting']:<15} {r['source_sensor_interval_s']:>4}/{r['automation_interval_s']:<4} "
            f"{r['median_s']:>7} {f'{target:.0f} {flag}':>7} {min(vis):>6} {max(vis):>6} | "
            + " ".join(
                f"{r.get(f'median_{c}_s') if r.get(f'median_{c}_s') is not None else '-':>10}" for c in cols
            )
        )
    print(
        "\n(intervals = source sensor / automation sensor seconds; breakdown columns are medians in seconds)"
    )
    out = {
        "benchmark": "freshness",
        "source": args.source,
        "repeats": args.repeats,
        "docs": args.docs,
        "shards": args.shards,
        "cpus": os.cpu_count(),
        "results": results,
    }
    print(json.dumps(out, default=str))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
