"""How the converter choice was measured (docs/architecture.md, "Decision: document converters").

markitdown and pypdf are not dependencies of rag_assets; run the comparison parts in a throwaway
virtual environment that has them, and the ``ours`` part in the project's environment:

    python -m venv /tmp/cmp && /tmp/cmp/bin/pip install 'markitdown[docx,pptx,xlsx,pdf]==0.1.9' pypdf==7.1.1 pypdfium2==5.15.2
    /tmp/cmp/bin/python benchmarks/formats_compare.py pdf --pdf-dir /tmp/texlive/x --files 40
    /tmp/cmp/bin/python benchmarks/formats_compare.py office markitdown --samples /tmp/fmt-probe --html-dir DIR
    python benchmarks/formats_compare.py office ours --samples /tmp/fmt-probe --html-dir DIR

``--samples`` holds the unpacked sdists of python-pptx 1.0.2, python-docx 1.2.0 and tablib 3.10.0;
``--html-dir`` the ``html/library`` folder of Debian's python3.11-doc. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import re
import sys
import time
from pathlib import Path

WORD = re.compile(r"[A-Za-z]{2,}")
CHROME = ("Previous topic", "Next topic", "This Page", "Report a Bug", "Quick search", "Navigation", "Theme")


def compare_pdf(pdf_dir: Path, n: int) -> dict:
    """Speed and word agreement of pypdfium2, pypdf and markitdown (pdfminer) on the same PDFs."""
    import pypdf
    import pypdfium2 as pdfium
    from markitdown import MarkItDown

    md = MarkItDown(enable_plugins=False)
    files = sorted(pdf_dir.rglob("*.pdf"))
    random.Random(12).shuffle(files)
    files = files[:n]

    def t_pdfium(data):
        doc = pdfium.PdfDocument(data)
        out = []
        for i in range(len(doc)):
            tp = doc[i].get_textpage()
            out.append(tp.get_text_bounded())
            tp.close()
        k = len(doc)
        doc.close()
        return "\n".join(out), k

    def t_pypdf(data):
        r = pypdf.PdfReader(io.BytesIO(data))
        return "\n".join((p.extract_text() or "") for p in r.pages), len(r.pages)

    def t_markitdown(data):
        return md.convert_stream(io.BytesIO(data), file_extension=".pdf").text_content, 0

    impls = {"pypdfium2": t_pdfium, "pypdf": t_pypdf, "markitdown": t_markitdown}
    res = {k: {"s": 0.0, "pages": 0, "chars": 0, "fail": 0, "glued": 0, "cid": 0, "rec": []} for k in impls}
    for f in files:
        data = f.read_bytes()
        words = {}
        for name, fn in impls.items():
            t = time.perf_counter()
            try:
                text, pages = fn(data)
            except Exception as e:  # a failure is counted, the comparison goes on
                res[name]["fail"] += 1
                print(name, f.name, type(e).__name__, e, file=sys.stderr)
                text, pages = "", 0
            r = res[name]
            r["s"] += time.perf_counter() - t
            r["pages"] += pages
            r["chars"] += len(text)
            r["glued"] += len(re.findall(r"[A-Za-z]{25,}", text))
            r["cid"] += text.count("(cid:") + text.count("\ufffd")
            words[name] = collections.Counter(w.lower() for w in WORD.findall(text))
        for k in impls:
            a, b = (words[o] for o in impls if o != k)
            consensus = {w: min(a[w], b[w]) for w in set(a) & set(b)}
            total = sum(consensus.values())
            if total:
                res[k]["rec"].append(sum(min(words[k][w], c) for w, c in consensus.items()) / total)
    pages = res["pypdfium2"]["pages"]
    for v in res.values():
        v["pages_per_s"] = round(pages / v["s"], 1)
        v["s"] = round(v["s"], 2)
        v["consensus_recall"] = round(sum(v["rec"]) / len(v["rec"]), 4) if v["rec"] else None
        del v["rec"]
    return {"files": len(files), "pages": pages, **res}


def compare_office(impl: str, samples: Path, html_dir: Path) -> dict:
    sets = {
        "pptx": sorted(samples.glob("python_pptx-1.0.2/features/steps/test_files/*.pptx")),
        "docx": sorted(samples.glob("python_docx-1.2.0/features/steps/test_files/*.docx"))
        + sorted(samples.glob("python_docx-1.2.0/tests/test_files/*.docx")),
        "xlsx": sorted(samples.glob("tablib-3.10.0/tests/files/*.xlsx"))
        + sorted(samples.glob("python_pptx-1.0.2/features/steps/test_files/*.xlsx")),
        "html": sorted(html_dir.glob("*.html")),
    }
    if impl == "markitdown":
        from markitdown import MarkItDown

        md = MarkItDown(enable_plugins=False)

        def conv(f: Path, fmt: str) -> str:
            return md.convert_stream(io.BytesIO(f.read_bytes()), file_extension="." + fmt).text_content
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from rag_assets.formats import convert

        def conv(f: Path, fmt: str) -> str:
            return convert(f.name, f.read_bytes(), fmt).text

    out = {}
    for fmt, files in sets.items():
        r = {"files": len(files), "s": 0.0, "chars": 0, "fail": 0, "headings": 0, "table_lines": 0,
             "links": 0, "chrome_hits": 0}
        for f in files:
            t = time.perf_counter()
            try:
                text = conv(f, fmt)
            except Exception:  # ours raises FormatError for documents with no text: counted
                r["fail"] += 1
                text = ""
            r["s"] += time.perf_counter() - t
            r["chars"] += len(text)
            r["headings"] += len(re.findall(r"(?m)^#{1,6} ", text))
            r["table_lines"] += len(re.findall(r"(?m)^\|", text))
            r["links"] += len(re.findall(r"\]\(", text))
            r["chrome_hits"] += sum(text.count(c) for c in CHROME)
        r["s"] = round(r["s"], 2)
        out[fmt] = r
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pdf")
    p.add_argument("--pdf-dir", type=Path, required=True)
    p.add_argument("--files", type=int, default=40)
    o = sub.add_parser("office")
    o.add_argument("impl", choices=("markitdown", "ours"))
    o.add_argument("--samples", type=Path, required=True)
    o.add_argument("--html-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.what == "pdf":
        result = compare_pdf(args.pdf_dir, args.files)
    else:
        result = compare_office(args.impl, args.samples, args.html_dir)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
