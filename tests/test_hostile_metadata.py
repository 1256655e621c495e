"""Hostile document metadata (issue 16, defects 4 and 7).

One bad front-matter value (an impossible date, ``.inf``, a NUL, a lone surrogate, a recursive
alias, a huge integer, a non-scalar key, ``!!binary``, an alias bomb, ...) is reported by doc_id and
skips that document only: every other document of every shard indexes. Metadata is bounded
(RAG_MAX_METADATA_BYTES, measured on the canonical JSON), alias bombs are refused before they are
expanded, and what a query returns per hit is bounded too. Everything runs against a real
PostgreSQL: what passes the checks is what jsonb stores and gives back.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import re
import time
from dataclasses import replace

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rag_assets.manifest import canonical_json, shard_of
from rag_assets.pipeline import Indexer
from rag_assets.query import MAX_HIT_METADATA_BYTES, bounded_metadata, search
from rag_assets.settings import Settings, SettingsError
from rag_assets.sources import (
    DEFAULT_MAX_METADATA_BYTES,
    MAX_DERIVED_TITLE_CHARS,
    Document,
    DocumentError,
    FolderSource,
    make_document,
    make_webhook_document,
)
from rag_assets.store import inbox
from rag_assets.store.db import connect
from rag_assets.store.webhook_docs import apply_inbox, pending_inbox_shards
from tests.conftest import TEST_SCHEMA
from tests.helpers import RecordingEmbedder, markdown_doc, write

WHEN = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)


def _lol(levels: int = 9, width: int = 9) -> str:
    """The YAML "billion laughs": ~600 bytes that expand to width**levels strings."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines)


# Each value is its own file; every one of them failed a whole run (or blew up memory) before.
HOSTILE = {
    "impossible_date.md": ("date: 2021-02-30", "impossible date '2021-02-30'"),
    "year_zero.md": ("date: 0000-01-01", "impossible date"),
    "inf.md": ("weight: .inf", "'.inf' is not a finite number"),
    "neg_inf.md": ("weight: -.inf", "'-.inf' is not a finite number"),
    "nan.md": ("weight: .nan", "'.nan' is not a finite number"),
    "overflow_float.md": ("weight: 1.0e+999", "not a finite number"),
    "nul.md": ('title: "a\\0b"', "NUL character"),
    "nul_in_key.md": ('"k\\0": 1', "a key in metadata contains a NUL"),
    "nul_nested.md": ('tags: [ok, {deep: "x\\0"}]', "metadata['tags'][1]['deep'] contains a NUL"),
    "lone_surrogate.md": ('title: "\\ud800"', "lone surrogate (\\ud800)"),
    "surrogate_key.md": ('"\\udfff": 1', "lone surrogate"),
    "recursive_alias.md": ("a: &x [*x]", "recursive alias"),
    "recursive_map.md": ("a: &x {self: *x}", "recursive alias"),
    "huge_int.md": ("n: " + "9" * 5000, "integer too large"),
    "big_int.md": ("n: 1" + "0" * 320, "integer too large"),  # beyond any double
    "big_hex.md": ("n: 0x" + "f" * 300, "integer too large"),
    "big_sexagesimal.md": ("n: " + "59:" * 180 + "1", "integer too large"),
    "non_scalar_key.md": ("? [a, b]\n: 1", "sequence as a mapping key"),
    "binary.md": ("blob: !!binary aGVsbG8=", "!!binary"),
    "alias_bomb.md": (
        _lol(),
        "more than RAG_MAX_METADATA_BYTES=65536 bytes as JSON once its YAML aliases are expanded",
    ),
    "too_deep.md": ("x: " + "[" * 40 + "]" * 40, "nested deeper than 32"),
    "very_deep.md": ("x: " + "[" * 20000 + "]" * 20000, "nested deeper than 32"),
    "too_big.md": ("notes: " + "x" * (DEFAULT_MAX_METADATA_BYTES + 10), "more than RAG_MAX_METADATA_BYTES"),
    "python_tag.md": ("x: !!python/object/apply:os.system [ls]", "invalid YAML front matter"),
    "not_a_mapping.md": ("- a\n- b", "front matter must be a YAML mapping"),
}


def _doc(front: str, body: str = "# Title\n\nbody text\n") -> bytes:
    return f"---\n{front}\n---\n{body}".encode()


def _storable(reason: str) -> None:
    """An error is stored in source_errors and logged: it must be storable text itself."""
    assert "\x00" not in reason
    reason.encode("utf-8")
    assert len(reason) < 1000


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_front_matter_value_is_an_error_naming_the_document(name):
    front, expected = HOSTILE[name]
    t0 = time.perf_counter()
    with pytest.raises(DocumentError) as ei:
        make_document(f"dir/{name}", _doc(front), 0, 10 << 20)
    assert time.perf_counter() - t0 < 2, "refused without expanding or looping"
    e = ei.value
    assert e.doc_id == f"dir/{name}" and str(e).startswith(f"dir/{name}: ")
    assert expected in e.reason, e.reason
    _storable(e.reason)


def test_values_json_can_hold_are_normalised_deterministically():
    doc = make_document(
        "ok.md",
        _doc(
            "title: Guide\n"
            "date: 2024-02-29\n"
            "when: 2024-02-29 10:11:12+02:00\n"
            "tags: !!set {b, c, a}\n"
            "1: one\n"
            "on: push\n"
            "null: nothing\n"
            "order: !!omap [x: 1, y: 2]\n"
            "base: &b {a: 1, b: 2}\n"
            "merged: {<<: *b, c: 3}\n"
            "shared: [*b, *b]\n"
            "n: -9223372036854775808\n"
            "big: 36893488147419103232\n"
            'ctrl: "tab\\there \\x01 \\u2028"\n'
        ),
        0,
        1 << 20,
    )
    m = doc.metadata
    assert m["date"] == "2024-02-29" and m["when"] == "2024-02-29T10:11:12+02:00"
    assert m["tags"] == ["a", "b", "c"]  # a set has no order: sorted, so the hash is stable
    assert (m["1"], m["on"], m["null"]) == ("one", "push", "nothing")  # keys as written, not str(True)
    assert m["order"] == [["x", 1], ["y", 2]]
    assert m["merged"] == {"a": 1, "b": 2, "c": 3} and m["shared"] == [{"a": 1, "b": 2}] * 2
    assert m["n"] == -(2**63) and m["big"] == 2**65 and m["ctrl"] == "tab\there \x01 \u2028"
    again = make_document("ok.md", _doc("tags: !!set {c, a, b}\n"), 0, 1 << 20)
    assert again.metadata["tags"] == ["a", "b", "c"]


def test_small_aliases_are_fine_and_the_bound_is_the_setting():
    # aliases within the bound are ordinary YAML
    small = make_document("s.md", _doc(_lol(levels=3, width=3)), 0, 1 << 20)
    assert small.metadata["l2"] == [[["lol"] * 9] * 3] * 3
    # the bound is measured on the canonical JSON of the whole metadata, and is configurable
    front = "notes: " + "y" * 3000
    assert make_document("a.md", _doc(front), 0, 1 << 20).metadata["notes"] == "y" * 3000
    with pytest.raises(DocumentError, match=r"a\.md: .*RAG_MAX_METADATA_BYTES=2048"):
        make_document("a.md", _doc(front), 0, 1 << 20, max_metadata_bytes=2048)
    # the bomb is refused by its size in JSON, before anything is expanded
    t0 = time.perf_counter()
    with pytest.raises(DocumentError, match="once its YAML aliases are expanded"):
        make_document("bomb.md", _doc(_lol(levels=30, width=50)), 0, 1 << 20)
    assert time.perf_counter() - t0 < 1


def test_a_giant_first_heading_does_not_make_metadata_too_big():
    heading = "# " + "T" * 100_000
    doc = make_document("h.md", f"{heading}\n\nbody\n".encode(), 0, 1 << 20)
    assert len(doc.metadata["title"]) == MAX_DERIVED_TITLE_CHARS
    assert len(canonical_json(doc.metadata).encode()) <= DEFAULT_MAX_METADATA_BYTES


def test_folder_source_applies_its_metadata_bound(tmp_path):
    write(tmp_path / "a.md", _doc("notes: " + "z" * 5000).decode())
    assert FolderSource(tmp_path).read("a.md").metadata["notes"] == "z" * 5000
    with pytest.raises(DocumentError, match=r"a\.md: .*more than RAG_MAX_METADATA_BYTES=4096 bytes as JSON$"):
        FolderSource(tmp_path, max_metadata_bytes=4096).read("a.md")


def test_setting_is_read_and_checked():
    assert Settings.from_env({}).max_metadata_bytes == 64 * 1024 == DEFAULT_MAX_METADATA_BYTES
    assert Settings.from_env({"RAG_MAX_METADATA_BYTES": "100000"}).max_metadata_bytes == 100_000
    with pytest.raises(SettingsError, match="RAG_MAX_METADATA_BYTES"):
        Settings.from_env({"RAG_MAX_METADATA_BYTES": "10"})


def _recursive_dict() -> dict:
    d: dict = {"a": 1}
    d["self"] = d
    return d


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"x": float("nan")}, "metadata['x'] is nan"),
        ({"x": [1, float("inf")]}, "metadata['x'][1] is inf"),
        ({"x": "a\x00b"}, "NUL"),
        ({"k\x00": 1}, "NUL"),
        ({"x": "\ud83d"}, "lone surrogate"),
        ({"\udc00": 1}, "lone surrogate"),
        ({"x": 10**400}, "integer too large"),
        ({"x": b"bytes"}, "is a bytes"),
        ({1: "int key"}, "non-string key"),
        ({"x": _recursive_dict()}, "contains itself"),
        ({"x": "v" * (DEFAULT_MAX_METADATA_BYTES + 1)}, "RAG_MAX_METADATA_BYTES"),
        (["not", "a", "mapping"], "metadata must be an object"),
    ],
)
def test_webhook_metadata_gets_the_same_rules(metadata, expected):
    with pytest.raises(DocumentError) as ei:
        make_webhook_document("hook/doc.md", "# Hook\n\ntext", metadata, WHEN)
    assert ei.value.doc_id == "hook/doc.md" and expected in ei.value.reason, ei.value.reason
    _storable(ei.value.reason)


def test_webhook_content_with_a_lone_surrogate_is_an_error_naming_the_document():
    with pytest.raises(DocumentError, match=r"hook\.md: content contains a lone surrogate"):
        make_webhook_document("hook.md", "text \udc80 more", {}, WHEN)
    ok = make_webhook_document("hook.md", "text", {"when": dt.date(2024, 1, 2), "s": {"b", "a"}}, WHEN)
    assert ok.metadata["when"] == "2024-01-02" and ok.metadata["s"] == ["a", "b"]


# --- the pipeline ------------------------------------------------------------------------------


GOOD_FRONT = [
    "title: Good {i}\ntags: [alpha, beta]\ndate: 2024-02-29\n",
    "owner: {{name: team {i}, ids: [1, 2, 3]}}\nweight: 1.5\n",
    "draft: false\nversion: {i}\n",
    "",
]


def test_hostile_front_matter_is_reported_and_skipped_while_every_other_file_indexes(settings, docs_dir):
    s = replace(settings, shards=16)
    rng = random.Random(7)
    good: dict[str, str] = {}
    per_shard = [0] * s.shards
    i = 0
    while min(per_shard) < 2:  # good documents in every shard, at least two each
        front = GOOD_FRONT[i % len(GOOD_FRONT)].format(i=i)
        text = (f"---\n{front}---\n" if front else "") + markdown_doc(rng, sections=2)
        name = f"good/g{i:03d}.md"
        write(docs_dir / name, text)
        good[name] = text
        per_shard[shard_of(name, s.shards)] += 1
        i += 1
    for name, (front, _) in HOSTILE.items():
        write(docs_dir / "bad" / name, _doc(front).decode())
    bad = {f"bad/{n}" for n in HOSTILE}
    # the bad files are spread over the shards like the good ones, so one shard's failure would show
    assert len({shard_of(d, s.shards) for d in bad}) >= 8

    idx = Indexer(s, embedder=RecordingEmbedder(32))
    t0 = time.perf_counter()
    r = idx.refresh(docs_dir)
    assert time.perf_counter() - t0 < 120
    errs = {e["doc_id"]: e["error"] for e in r.errors}
    assert set(errs) == bad, sorted(set(errs) ^ bad)
    for name, (_, expected) in HOSTILE.items():
        assert expected in errs[f"bad/{name}"], (name, errs[f"bad/{name}"])
        _storable(errs[f"bad/{name}"])
    indexed = {d for (d,) in idx.conn.execute("SELECT DISTINCT doc_id FROM items")}
    assert indexed == set(good)
    assert r.docs_total == len(good)
    # what was stored is exactly what the source made of each good file
    stored = dict(idx.conn.execute("SELECT doc_id, metadata FROM manifest").fetchall())
    for name in good:
        st_ = (docs_dir / name).stat()
        expect = make_document(name, (docs_dir / name).read_bytes(), st_.st_mtime_ns, s.max_doc_bytes)
        assert stored[name] == expect.metadata, name
    # the errors are remembered (not re-read until the files change) and do not block the next run
    r2 = idx.refresh(docs_dir)
    assert {e["doc_id"] for e in r2.errors} == bad and r2.docs_total == len(good)
    # a fixed file indexes on the next run
    write(docs_dir / "bad" / "inf.md", _doc("weight: 2.5").decode())
    r3 = idx.refresh(docs_dir)
    assert "bad/inf.md" not in {e["doc_id"] for e in r3.errors} and r3.docs_added == 1
    (served,) = idx.conn.execute(
        "SELECT metadata FROM items WHERE doc_id = 'bad/inf.md' LIMIT 1"
    ).fetchone()
    assert served["weight"] == 2.5


def test_hostile_webhook_metadata_in_the_inbox_is_rejected_without_blocking_others(settings, db_url):
    """Inbox rows whose metadata jsonb holds what Python cannot send back (1e400 reads as inf), a
    number beyond 64 bits, or more than the bound: each event is rejected naming its document,
    and the other events of every shard apply (the COPY into the manifest used to fail them all)."""
    conn = connect(db_url, schema=TEST_SCHEMA)
    inbox.shard_count(conn, 8)

    def raw(event_id: str, doc_id: str, metadata_json: str) -> None:
        conn.execute(
            """INSERT INTO inbox (event_id, event_type, doc_id, shard, source_time, content, metadata)
               VALUES (%s, 'document.created', %s, %s, '2026-01-01 00:00:00+00', '# T\n\ntext', %s::jsonb)""",
            (event_id, doc_id, shard_of(doc_id, 8), metadata_json),
        )

    raw("ev-inf", "hook/inf.md", '{"x": 1e400}')
    raw("ev-big", "hook/bigint.md", '{"x": -1' + "0" * 330 + "}")
    raw("ev-huge", "hook/huge.md", json.dumps({"x": "h" * (DEFAULT_MAX_METADATA_BYTES + 1)}))
    raw("ev-deep", "hook/deep.md", '{"x": ' + "[" * 40 + "]" * 40 + "}")
    goods = [f"hook/good{i}.md" for i in range(12)]
    for i, d in enumerate(goods):
        # 1e20 comes back from jsonb as the integer 100000000000000000000: still a usable number
        raw(f"ev-good{i}", d, json.dumps({"tags": ["a", i], "n": i * 1.5, "big": 1e20}))
    out = apply_inbox(conn, pending_inbox_shards(conn))
    errs = {e["doc_id"]: e["error"] for e in out["errors"]}
    assert set(errs) == {"hook/inf.md", "hook/bigint.md", "hook/huge.md", "hook/deep.md"}, out["errors"]
    # jsonb gives 1e400 back as a 401-digit integer: out of a double's range
    assert "metadata['x'] is an integer too large" in errs["hook/inf.md"] and "ev-inf" in errs["hook/inf.md"]
    assert "integer too large" in errs["hook/bigint.md"]
    assert "RAG_MAX_METADATA_BYTES" in errs["hook/huge.md"]
    assert "nested deeper" in errs["hook/deep.md"]
    assert out["events_applied"] == len(goods) and out["events_rejected"] == 4
    applied = dict(conn.execute("SELECT doc_id, metadata FROM manifest").fetchall())
    assert set(applied) == set(goods)
    assert applied["hook/good3.md"]["tags"] == ["a", 3] and applied["hook/good3.md"]["n"] == 4.5
    assert applied["hook/good3.md"]["big"] == 10**20


# --- what a query returns ----------------------------------------------------------------------


def test_query_hits_carry_bounded_metadata(settings, docs_dir):
    """Rows indexed before the bound (or under a larger RAG_MAX_METADATA_BYTES) cannot make every
    response huge: such a hit's metadata is cut to path and title with metadata_truncated."""
    write(docs_dir / "big.md", _doc("notes: " + "n" * 200_000, "# Big\n\nthe text of the big one\n").decode())
    write(docs_dir / "small.md", _doc("tags: [s]", "# Small\n\nthe text of the small one\n").decode())
    s = settings
    idx = Indexer(s, embedder=RecordingEmbedder(32))
    # a source with a larger bound stands for an index built before the bound existed
    idx.source = lambda path=None, change_source=False: FolderSource(
        docs_dir, s.include, max_metadata_bytes=1 << 20
    )
    r = idx.refresh(docs_dir)
    assert r.errors == []
    (big_stored,) = idx.conn.execute("SELECT metadata FROM manifest WHERE doc_id = 'big.md'").fetchone()
    assert len(big_stored["notes"]) == 200_000
    hits = {h.doc_id: h.metadata for h in search(idx.conn, idx.embedder, "the text", k=10).results}
    # cut to path and title, plus the chunk's own heading path (bounded by the chunker's header cap)
    assert hits["big.md"] == {"metadata_truncated": True, "path": "big.md", "title": "Big", "heading_path": ["Big"]}
    assert hits["small.md"]["tags"] == ["s"] and "metadata_truncated" not in hits["small.md"]
    assert bounded_metadata({"path": "p", "title": "t" * 5000, "x": "x" * MAX_HIT_METADATA_BYTES}) == {
        "metadata_truncated": True,
        "path": "p",
        "title": "t" * 999 + "…",
    }


# --- properties --------------------------------------------------------------------------------


def _dq(s: str) -> str:
    """``s`` as a YAML double-quoted scalar; anything outside printable ASCII as an escape, so
    NUL, control characters and lone surrogates reach the YAML parser as escapes (as in a file)."""
    out = []
    for c in s:
        o = ord(c)
        if 0x20 <= o < 0x7F and c not in '"\\':
            out.append(c)
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


# any code point, with the ones that broke runs (NUL, surrogates, controls) drawn often
_chars = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x10FFFF),
    st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\x01", "\x1f", "\u2028", "\ufeff"]),
)
_yaml_scalar = st.one_of(
    st.text(alphabet=_chars, max_size=12).map(_dq),
    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=8).map(
        lambda s: json.dumps(s, ensure_ascii=False)
    ),
    st.sampled_from(
        [
            ".inf",
            "-.inf",
            ".nan",
            ".NaN",
            "~",
            "null",
            "yes",
            "on",
            "0x1F",
            "0o17",
            "017",
            "1:30:00",
            "1_000",
            "2021-02-30",
            "2021-02-28",
            "2021-02-28T10:00:00Z",
            "2001-12-14 21:59:43.10 -5",
            "0000-01-01",
            "9999-12-31 23:59:59-05:00",
            "!!binary aGVsbG8=",
            "!!str 12",
            "!!float 1",
            "!!int 12",
            "1.7e+308",
            "-0.0",
            "!!timestamp 2020-13-01",
            "!!null ''",
            "!!bool yes",
            "''",
            '""',
        ]
    ),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=15, max_value=6000).map(lambda n: "9" * n),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: f"{f:.17e}"),
)
# "&@" marks a fresh anchor and "*#k" an alias to the k-th anchor defined so far (see _resolve), so
# generated YAML mostly parses and its aliases point backwards or into themselves (recursion).
_alias = st.integers(0, 40).map(lambda k: f"*#{k}")
_yaml_key = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
    st.text(alphabet=_chars, max_size=6).map(_dq),
    st.integers(-5, 5).map(str),
    st.sampled_from(["true", "null", "2021-02-30", "1.5", ".inf", "[k]", "{k: v}", "&@ k", "!!binary aGk="]),
    _alias,
)


def _anchored(v: str) -> str:
    return v if v.startswith(("&", "*")) else f"&@ {v}"  # a node has one anchor, an alias none


def _yaml_values(children):
    return st.one_of(
        st.lists(children, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(_yaml_key, children), max_size=4).map(
            lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"
        ),
        st.lists(_yaml_key, max_size=4).map(lambda ks: "!!set {" + ", ".join(ks) + "}"),
        children.map(_anchored),
        _alias,
        st.lists(_alias, min_size=1, max_size=12).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.tuples(_alias, children).map(lambda t: "{<<: " + t[0] + ", m: " + t[1] + "}"),
    )


def _resolve(yaml_text: str) -> str:
    anchors: list[str] = []

    def sub(m: re.Match) -> str:
        if m.group() == "&@":
            anchors.append(f"n{len(anchors)}")
            return "&" + anchors[-1]
        return "*" + anchors[int(m.group(1)) % len(anchors)] if anchors else "none"

    return re.sub(r"&@|\*#(\d+)", sub, yaml_text)


_yaml_value = st.recursive(_yaml_scalar, _yaml_values, max_leaves=25)
_front_matter = st.one_of(
    st.lists(st.tuples(_yaml_key, _yaml_value.map(_anchored)), min_size=1, max_size=6).map(
        lambda kv: _resolve("\n".join(f"{k}: {v}" for k, v in kv))
    ),
    # the "laughs" shape: each line repeats the line before it w times
    st.lists(st.integers(1, 12), min_size=1, max_size=12).map(
        lambda ws: "\n".join(
            ["l0: &l0 [lol, lol]"]
            + [f"l{i + 1}: &l{i + 1} [" + ", ".join([f"*l{i}"] * w) + "]" for i, w in enumerate(ws)]
        )
    ),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200),
)


def _same(a: object, b: object) -> bool:
    """Equal as JSON values: jsonb keeps numbers as decimals, so 1.7e308 reads back as an int."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b) if isinstance(a, float) or isinstance(b, float) else a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _check_survives_jsonb(conn: psycopg.Connection, doc: Document) -> None:
    text = json.dumps(doc.metadata, ensure_ascii=False, allow_nan=False)
    assert len(canonical_json(doc.metadata).encode()) <= DEFAULT_MAX_METADATA_BYTES
    (back,) = conn.execute("SELECT %s::jsonb", (text,)).fetchone()
    assert _same(back, doc.metadata), (back, doc.metadata)
    # and as the pipeline writes it (binary COPY of a Jsonb into a jsonb column)
    with conn.cursor() as cur:
        with cur.copy("COPY meta_probe (m) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["jsonb"])
            cp.write_row((psycopg.types.json.Jsonb(doc.metadata),))
        (back2,) = cur.execute("SELECT m FROM meta_probe").fetchone()
        cur.execute("TRUNCATE meta_probe")
    assert _same(back2, doc.metadata)


@pytest.fixture
def pg(db_url):
    conn = psycopg.connect(db_url, autocommit=True)
    conn.execute("CREATE TABLE meta_probe (m jsonb)")
    yield conn
    conn.close()


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(front=_front_matter)
def test_property_front_matter_yields_jsonb_safe_metadata_or_an_error_naming_the_doc(pg, front):
    doc_id = "prop/doc.md"
    try:
        doc = make_document(doc_id, f"---\n{front}\n---\n# T\n\nbody\n".encode(), 0, 10 << 20)
    except DocumentError as e:
        assert e.doc_id == doc_id and str(e).startswith(doc_id + ": ")
        _storable(e.reason)
        return
    _check_survives_jsonb(pg, doc)


_py_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=10),
    st.dates(),
    st.datetimes(timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-5))])),
)
_py_value = st.recursive(
    _py_scalar,
    lambda ch: st.one_of(
        st.lists(ch, max_size=4),
        st.dictionaries(
            st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=6),
            ch,
            max_size=4,
        ),
        st.frozensets(st.text(max_size=3), max_size=3),
    ),
    max_leaves=20,
)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metadata=st.dictionaries(st.text(max_size=8), _py_value, max_size=5))
def test_property_webhook_metadata_is_jsonb_safe_or_an_error_naming_the_doc(pg, metadata):
    try:
        doc = make_webhook_document("hook/p.md", "# P\n\ntext", metadata, WHEN)
    except DocumentError as e:
        assert e.doc_id == "hook/p.md"
        _storable(e.reason)
        return
    _check_survives_jsonb(pg, doc)
    assert all(not isinstance(v, float) or math.isfinite(v) for v in doc.metadata.values())


def test_the_metadata_bound_setting_reaches_the_indexer(settings, docs_dir):
    """RAG_MAX_METADATA_BYTES is honoured by a refresh, not only by FolderSource's default."""
    from dataclasses import replace as _replace

    from rag_assets.pipeline import Indexer

    (docs_dir / "big.md").write_text("---\nnote: " + "x" * 3000 + "\n---\n# Big\n\nbody")
    (docs_dir / "ok.md").write_text("# Ok\n\nbody")
    idx = Indexer(_replace(settings, max_metadata_bytes=2048))
    try:
        rep = idx.refresh(docs_dir)
        assert [e["doc_id"] for e in rep.errors] == ["big.md"]
        assert rep.docs_total == 1
    finally:
        idx.close()
