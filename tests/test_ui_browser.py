"""The Dagster UI of this code location, seen in a real browser (headless Chromium via playwright-core).

Against a real `dagster dev` on the embedded defaults, a browser:
1. opens the Lineage view of `chunks` (document_manifest → chunks → embeddings) and launches a
   materialization from the UI (Materialize all → All partitions → Launch backfill); the backfill it
   created succeeds (checked over GraphQL);
2. shows the asset graph with the rag assets and their 8 shard partitions ("8 partitions", "100% filled");
3. shows the materialization metadata plots of `embeddings` (Overview → Metadata → Plots), among them
   `chunks_embedded` and `tokens_embedded`.

Screenshots go to artifacts/ui/ (git-ignored); the two used by the docs are copied to docs/images/.
The test installs what it needs: Debian's `chromium` (apt-get, as root) and `playwright-core` from npm
into artifacts/ui/node (git-ignored). It skips only when no browser or no Node.js can be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rag_assets.dagster_instance import dagster_home
from rag_assets.manifest import shard_key
from rag_assets.settings import Settings
from rag_assets.store.embedded import ensure_runtime_dir, stop_embedded
from tests.e2e_utils import (
    REPO,
    Dagster,
    ProcessSet,
    base_env,
    dagster_dev_argv,
    free_port,
    session_pids,
    wait_backfills,
    wait_for,
    write_corpus,
)

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "artifacts" / "ui"
NODE_DIR = ARTIFACTS / "node"
PLAYWRIGHT = "playwright-core@1.65.1"
N_SHARDS = 8
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

DRIVER = r"""
const { chromium } = require('playwright-core');
const [base, phase, outDir, profile, chromiumPath, argsJson] = process.argv.slice(2);
(async () => {
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath, headless: true, args: JSON.parse(argsJson),
    viewport: { width: 1600, height: 900 },
  });
  const page = browser.pages()[0] || await browser.newPage();
  const report = {};
  const settle = async () => {
    await page.waitForLoadState('networkidle', { timeout: 60000 }).catch(() => {});
    await page.waitForTimeout(1500);
    const skip = page.getByRole('button', { name: 'Skip' });   // the one-time community prompt
    if (await skip.count()) { await skip.first().click(); await page.waitForTimeout(500); }
  };
  const lineage = async () => {
    // chunks in the middle: raw_documents → document_manifest → chunks → embeddings → index_snapshot
    await page.goto(base + '/assets/chunks?view=lineage', { timeout: 60000 });
    await settle();
    await page.getByRole('button', { name: 'All', exact: true }).first().click();   // graph depth: all
    await page.getByText('raw_documents', { exact: true }).first().waitFor({ timeout: 60000 });
    await page.waitForTimeout(1500);
    // the view keeps its zoom when the depth grows: zoom out until both ends are on screen
    const width = page.viewportSize().width;
    const inView = async (name) => {   // the node (≈ 260 px wide at full zoom) around its title
      const box = await page.getByText(name, { exact: true }).last().boundingBox();
      return box && box.x > 300 && box.x + 260 < width - 70;
    };
    const zoomOut = async () => {
      await page.locator('[aria-label="zoom_out"]').last().click();
      await page.waitForTimeout(600);
    };
    for (let i = 0; i < 6 && !((await inView('raw_documents')) && (await inView('index_snapshot'))); i++) {
      await zoomOut();
    }
    await zoomOut();   // one more step: a margin around the outer nodes
    await page.waitForTimeout(1500);
  };
  try {
    if (phase === 'launch') {
      // chunks and its nearest neighbours: the three partitioned assets the runs materialize
      await page.goto(base + '/assets/chunks?view=lineage', { timeout: 60000 });
      await settle();
      await page.getByText('document_manifest', { exact: true }).first().waitFor({ timeout: 60000 });
      await page.getByRole('button', { name: /Materialize all/ }).first().click();
      const dialog = page.getByRole('dialog').last();
      await dialog.getByText('Launch runs to materialize', { exact: false }).waitFor({ timeout: 60000 });
      await dialog.getByRole('button', { name: 'All', exact: true }).click();
      await page.waitForTimeout(1000);
      await page.screenshot({ path: outDir + '/01-launch-dialog.png' });
      report.dialog = await dialog.innerText();
      await dialog.getByRole('button', { name: /Launch backfill|Launch run/ }).click();
      await dialog.waitFor({ state: 'detached', timeout: 60000 });
      await page.waitForTimeout(1000);
      await page.screenshot({ path: outDir + '/02-launched.png' });
      report.launched = true;
    } else if (phase === 'graph') {
      await lineage();
      await page.screenshot({ path: outDir + '/03-asset-graph.png' });
      report.graph = await page.evaluate(() => document.body.innerText);
      await page.goto(base + '/assets/embeddings?view=partitions', { timeout: 60000 });
      await settle();
      await page.getByText('Materialized (', { exact: false }).first().waitFor({ timeout: 60000 });
      await page.screenshot({ path: outDir + '/04-partitions.png' });
      report.partitions = await page.evaluate(() => document.body.innerText);
      await page.goto(base + '/assets/embeddings', { timeout: 60000 });
      await settle();
      await page.getByText('Plots', { exact: true }).first().click();
      await page.getByText('tokens_embedded', { exact: true }).first().waitFor({ timeout: 60000 });
      await page.getByText('Events', { exact: true }).last().click();   // x axis: materialization events
      await page.waitForTimeout(2500);
      await page.getByText('Metadata', { exact: true }).first().evaluate(el => el.scrollIntoView({ block: 'start' }));
      await page.waitForTimeout(1000);
      await page.screenshot({ path: outDir + '/05-metadata-plots.png' });
      await page.getByText('tokens_embedded', { exact: true }).first().evaluate(el => el.scrollIntoView({ block: 'start' }));
      await page.waitForTimeout(1000);
      await page.screenshot({ path: outDir + '/06-metadata-plots-tokens.png' });
      report.plots = await page.evaluate(() => document.body.innerText);
      report.svgCharts = await page.locator('svg, canvas').count();
    }
  } catch (e) {
    await page.screenshot({ path: outDir + `/error-${phase}.png` }).catch(() => {});
    report.error = String(e);
  }
  console.log('REPORT ' + JSON.stringify(report));
  await browser.close();
})();
"""


def _ensure_browser() -> tuple[str, Path]:
    """(chromium path, node_modules folder) — installed here if missing; skip only if impossible."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900
        )
        chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("no Chromium: not installed and `apt-get install chromium` is not possible here")
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("no Node.js/npm to run playwright-core")
    modules = NODE_DIR / "node_modules"
    if not (modules / "playwright-core" / "package.json").exists():
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR), PLAYWRIGHT],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot install {PLAYWRIGHT} from npm: {r.stderr.strip()[-300:]}")
    return chromium, modules


def _browse(base: str, phase: str, chromium: str, modules: Path, tmp: Path) -> dict:
    script = tmp / "driver.js"
    script.write_text(DRIVER)
    profile = tmp / f"profile-{phase}"  # a fresh --user-data-dir per browser
    r = subprocess.run(
        ["node", str(script), base, phase, str(ARTIFACTS), str(profile), chromium, json.dumps(CHROMIUM_ARGS)],
        env=dict(os.environ, NODE_PATH=str(modules)),
        capture_output=True,
        text=True,
        timeout=240,
    )
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("REPORT ")), None)
    assert line, f"browser driver failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}"
    report = json.loads(line[len("REPORT ") :])
    assert not report.get("error"), f"{phase}: {report['error']} (see {ARTIFACTS}/error-{phase}.png)"
    return report


@pytest.fixture
def dev(tmp_path):
    ensure_runtime_dir()
    docs = tmp_path / "docs"
    write_corpus(docs, 24, seed=5)
    env = base_env(
        RAG_HOME=str(tmp_path / "home"),
        RAG_SOURCE_PATH=str(docs),
        RAG_SHARDS=str(N_SHARDS),
        RAG_SOURCE_SENSOR_INTERVAL_S="5",
        RAG_INBOX_SENSOR_INTERVAL_S="5",
        RAG_AUTOMATION_INTERVAL_S="5",
        XDG_RUNTIME_DIR=os.environ["XDG_RUNTIME_DIR"],
    )
    settings = Settings.from_env(env)
    env["DAGSTER_HOME"] = str(dagster_home(settings))
    port = free_port()
    procs = ProcessSet(tmp_path / "logs")
    try:
        procs.start(
            "dagster-dev",
            dagster_dev_argv(port),
            env,
        )
        yield Dagster(port), procs
    finally:
        procs.stop_all()
        stop_embedded(settings.home)
    assert not [pid for p in procs.procs for pid in session_pids(p.pid)]


def test_asset_graph_ui_materialization_and_metadata_plots(dev, tmp_path):
    chromium, modules = _ensure_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    api, procs = dev
    api.wait_loaded(timeout=150, check=procs.check_alive)
    base = api.base

    def backfills() -> dict[str, dict[str, str]]:
        d = api.gql(
            "{ partitionBackfillsOrError(limit: 50) { ... on PartitionBackfills { results { id tags { key value } } } } }"
        )
        return {
            b["id"]: {t["key"]: t["value"] for t in b["tags"]}
            for b in d["partitionBackfillsOrError"]["results"]
        }

    def from_ui(ids) -> list[str]:
        # backfills the UI launches carry dagster/from_ui; the automation sensor may start its own
        return [i for i, tags in ids.items() if tags.get("dagster/from_ui") == "true"]

    api.gql("mutation { setNuxSeen }")  # no one-time "join the community" prompt over the page
    api.settle_after_start(quiet_s=12, timeout=150, check=procs.check_alive)  # see e2e_utils
    before = set(backfills())
    t0 = time.monotonic()
    launched = _browse(base, "launch", chromium, modules, tmp_path)
    assert launched.get("launched")
    assert "materialize 3 assets" in launched["dialog"] and "8 partitions" in launched["dialog"]

    def new_ui_backfill():
        now = backfills()
        return from_ui({i: t for i, t in now.items() if i not in before})

    (bid,) = wait_for(new_ui_backfill, 60, "the backfill launched from the UI")
    print("\nnew backfills:", {i: t for i, t in backfills().items() if i not in before})
    want = {shard_key(i) for i in range(N_SHARDS)}

    wait_backfills(api, [bid], want, timeout=180, check=procs.check_alive)
    print(f"\nUI-launched backfill {bid} succeeded in {time.monotonic() - t0:.1f} s")

    shown = _browse(base, "graph", chromium, modules, tmp_path)
    for name in ("raw_documents", "document_manifest", "chunks", "embeddings"):
        assert name in shown["graph"], name
    assert shown["graph"].count("8 partitions") >= 3 and "100% filled" in shown["graph"]
    assert "Materialized (8)" in shown["partitions"]
    assert all(k in shown["partitions"] for k in sorted(want))
    for key in ("chunks_embedded", "tokens_embedded", "cache_hit_rate"):
        assert key in shown["plots"], key
    assert shown["svgCharts"] > 5

    images = REPO / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copy(ARTIFACTS / "03-asset-graph.png", images / "asset-graph.png")
    shutil.copy(ARTIFACTS / "05-metadata-plots.png", images / "metadata-plots.png")
