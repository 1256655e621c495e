"""What ``rag-assets index`` shows while it works: one tqdm bar per stage on a terminal, nothing elsewhere.

A refresh through Dagster reports progress as Dagster events (one asset materialization per shard
and stage); :class:`StageBars` turns those into bars on stderr. Pipes and CI get no bars (their logs
would fill with carriage returns), ``--json`` gets none either (stdout is one JSON document and
stderr stays quiet), so the only output there is the summary line.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from typing import TextIO

# The stages in the order a refresh runs them, with the bar's label and unit.
STAGES: dict[str, tuple[str, str]] = {
    "scan": ("documents scanned", "doc"),
    "document_manifest": ("manifest shards", "shard"),
    "chunks": ("chunked shards", "shard"),
    "embedded": ("chunks embedded", "chunk"),
    "embeddings": ("shards synced", "shard"),
}


def bars_wanted(stream: TextIO, *, as_json: bool) -> bool:
    """Bars only for a person at a terminal: never with ``--json``, never into a pipe or file."""
    if as_json:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@dataclass
class StageBars:
    """One bar per stage, created on first use; every method is a no-op when disabled."""

    enabled: bool
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    _bars: dict = field(default_factory=dict)

    def start(self, stage: str, total: int | None) -> None:
        if not self.enabled or stage in self._bars:
            return
        from tqdm import tqdm  # lazy: a quiet run (pipe, --json) never imports it

        label, unit = STAGES[stage]
        # shutil's size, not tqdm's own probe: a terminal reporting 0x0 (some ptys) gets 80x24,
        # where tqdm would hide every bar.
        size = shutil.get_terminal_size()
        self._bars[stage] = tqdm(
            total=total,
            desc=f"{label:<18}",
            unit=unit,
            file=self.stream,
            leave=True,
            ncols=min(size.columns, 100),
            nrows=max(size.lines, len(STAGES) + 1),
        )

    def advance(self, stage: str, n: int = 1) -> None:
        if not self.enabled or n <= 0:
            return
        if stage not in self._bars:
            self.start(stage, None)
        self._bars[stage].update(n)

    def finish(self, stage: str) -> None:
        """Close one stage's bar now (its elapsed time then is the stage's, not the whole run's)."""
        bar = self._bars.pop(stage, None)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
