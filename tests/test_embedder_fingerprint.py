"""embedder_fingerprint(settings): the embedder's identity from configuration alone.

It is what a code location reads at load time (the embeddings' ``code_version``), so it must open no
connection, need no secret and load no model, and it must equal the fingerprint the running
embedder records (or generations and the embedding cache stop matching). Fingerprints that existing
indexes already store must not change: the literal values below were computed with the code before
``embedder_fingerprint`` existed (when loading definitions built an embedder and read ``.fingerprint``).
"""

from __future__ import annotations

import socket
import time
from dataclasses import replace

import pytest

from rag_assets.embedders import embedder_fingerprint, legacy_fingerprint, make_embedder
from rag_assets.embedders.base import EmbeddingDimensionError, check_recorded_dims
from rag_assets.settings import Settings, SettingsError, settings_from_attributes

try:
    from fake_openai import FakeOpenAI
except ImportError:  # tests/ as a package
    from tests.fake_openai import FakeOpenAI

OPENAI = {"RAG_EMBEDDER": "openai", "RAG_EMBEDDING_API_KEY": "sk-unused"}

# (settings, the fingerprint the code before this change recorded for them)
STORED = [
    ({}, "hashing:feature-hash-v1:256:norm:566a619a7c70"),
    ({"RAG_EMBEDDING_DIMENSIONS": "64"}, "hashing:feature-hash-v1:64:norm:37b79797371f"),
    (OPENAI, "openai:text-embedding-3-small:1536:norm:b9b746faa87d"),
    ({**OPENAI, "RAG_EMBEDDING_DIMENSIONS": "512"}, "openai:text-embedding-3-small:512:norm:266c0f7eaeff"),
    (
        {**OPENAI, "RAG_EMBEDDING_MODEL": "text-embedding-3-large", "RAG_EMBEDDING_DIMENSIONS": "1024"},
        "openai:text-embedding-3-large:1024:norm:b9a97c7a7ded",
    ),
    ({**OPENAI, "RAG_EMBEDDING_MODEL": "text-embedding-3-large"}, "openai:text-embedding-3-large:3072:norm:c20f15c5e421"),
    ({**OPENAI, "RAG_EMBEDDING_MODEL": "text-embedding-ada-002"}, "openai:text-embedding-ada-002:1536:norm:16da08a6b3cc"),
    (
        {**OPENAI, "RAG_EMBEDDING_MODEL": "openai/text-embedding-3-small"},
        "openai:openai/text-embedding-3-small:1536:norm:87e24901118d",
    ),
    (
        {**OPENAI, "RAG_EMBEDDING_MODEL": "nomic-embed-text", "RAG_EMBEDDING_DIMENSIONS": "768"},
        "openai:nomic-embed-text:768:norm:de354134c91b",
    ),
    # torch was the only local backend before RAG_LOCAL_BACKEND; the default is now onnx (fp32), a new
    # fingerprint: an index on the local model builds a new generation on upgrade unless it pins torch
    ({"RAG_EMBEDDER": "local", "RAG_LOCAL_BACKEND": "torch"}, "local:all-MiniLM-L6-v2:384:norm:8d3f57df5f81"),
]


@pytest.mark.parametrize(("env", "stored"), STORED, ids=[s for _, s in STORED])
def test_stored_fingerprints_are_unchanged(env: dict[str, str], stored: str) -> None:
    """Offline and running fingerprints both equal what existing indexes store: no re-embed on upgrade."""
    s = Settings.from_env(env)
    assert embedder_fingerprint(s) == stored
    emb = make_embedder(s)
    try:
        assert emb.fingerprint == stored
    finally:
        emb.close()
    assert legacy_fingerprint(s, int(stored.split(":")[2])) is None  # nothing to migrate


@pytest.mark.parametrize(
    "env",
    [
        {"RAG_EMBEDDING_BATCH_SIZE": "7", "RAG_EMBEDDING_LONG_TEXT": "split"},
        {**OPENAI, "RAG_EMBEDDING_TIMEOUT_S": "3", "RAG_EMBEDDING_RPM": "10", "RAG_EMBEDDING_BASE_URL": "https://gw.example/v1"},
        {"RAG_EMBEDDER": "local", "RAG_EMBEDDING_DEVICE": "cpu", "RAG_EMBEDDING_BATCH_SIZE": "8"},
    ],
)
def test_operational_settings_do_not_change_the_fingerprint(env: dict[str, str]) -> None:
    base = {k: v for k, v in env.items() if k in ("RAG_EMBEDDER", "RAG_EMBEDDING_API_KEY")}
    assert embedder_fingerprint(Settings.from_env(env)) == embedder_fingerprint(Settings.from_env(base))


def test_local_backend_is_part_of_the_fingerprint() -> None:
    """Each local backend gives other vectors: its own fingerprint, offline and running alike; torch
    keeps the fingerprint indexes already store."""
    seen = {}
    for backend in ("torch", "onnx", "onnx-int8"):
        s = Settings.from_env({"RAG_EMBEDDER": "local", "RAG_LOCAL_BACKEND": backend})
        emb = make_embedder(s)
        try:
            assert emb.fingerprint == embedder_fingerprint(s) and not emb.loaded
        finally:
            emb.close()
        seen[backend] = embedder_fingerprint(s)
    assert seen["torch"] == "local:all-MiniLM-L6-v2:384:norm:8d3f57df5f81"
    assert len(set(seen.values())) == 3
    assert embedder_fingerprint(Settings.from_env({"RAG_EMBEDDER": "local"})) == seen["onnx"]  # the default
    assert all(fp.startswith("local:all-MiniLM-L6-v2:384:norm:") for fp in seen.values())
    # the backend means nothing to the other providers
    assert embedder_fingerprint(Settings.from_env({"RAG_LOCAL_BACKEND": "onnx"})) == embedder_fingerprint(
        Settings.from_env({})
    )
    with pytest.raises(SettingsError, match="RAG_LOCAL_BACKEND='tensorrt'"):
        Settings.from_env({"RAG_EMBEDDER": "local", "RAG_LOCAL_BACKEND": "tensorrt"})
    attrs = settings_from_attributes({"name": "kb", "embedder": {"provider": "local", "backend": "onnx-int8"}})
    assert attrs.local_backend == "onnx-int8" and embedder_fingerprint(attrs) == seen["onnx-int8"]


def test_native_dimensions_fingerprint_equals_the_running_embedder_and_never_probes() -> None:
    """An unknown model without RAG_EMBEDDING_DIMENSIONS: "native" in the fingerprint, the size is
    learned at the first request and does not change the fingerprint."""
    with FakeOpenAI(dims=8) as srv:
        s = Settings.from_env({**OPENAI, "RAG_EMBEDDING_MODEL": "fake-embed", "RAG_EMBEDDING_BASE_URL": srv.url})
        fp = embedder_fingerprint(s)
        assert fp == "openai:fake-embed:native:norm:86ecaa000078"
        emb = make_embedder(s)
        try:
            assert emb.fingerprint == fp and srv.request_count == 0
            assert emb.dims == 8 and srv.request_count == 1  # the size, learned at the first request
            assert emb.fingerprint == fp
        finally:
            emb.close()
    # What the code before this change recorded after probing (kept for a one-time rename of that row).
    assert legacy_fingerprint(s, 8) == "openai:fake-embed:8:norm:a738b8be89ea"


def test_a_changed_native_size_is_a_clear_error() -> None:
    fp = "openai:fake-embed:native:norm:86ecaa000078"
    check_recorded_dims(fp, 8, 8)
    with pytest.raises(EmbeddingDimensionError, match=r"now returns 16-dimensional vectors, but this index recorded 8"):
        check_recorded_dims(fp, 8, 16)


def _idle_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fingerprint_and_construction_open_no_connection() -> None:
    """No key, no dimensions, an unknown model: the fingerprint is computed with a real listening
    socket as the endpoint, and nothing ever connects to it; nor does building the embedder."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        for model in ("gateway-embed", "text-embedding-3-small"):
            s = Settings.from_env({"RAG_EMBEDDER": "openai", "RAG_EMBEDDING_MODEL": model, "RAG_EMBEDDING_BASE_URL": url})
            assert s.embedding_api_key is None and s.embedding_dimensions is None
            assert embedder_fingerprint(s).startswith(f"openai:{model}:")
            with pytest.raises(SettingsError, match="RAG_EMBEDDING_API_KEY"):
                make_embedder(s)  # running needs the key; the fingerprint does not
            emb = make_embedder(replace(s, embedding_api_key="sk-unused"))
            assert emb.fingerprint == embedder_fingerprint(s)
            assert not emb.dims_known or model == "text-embedding-3-small"
            emb.close()
        time.sleep(0.05)
        with pytest.raises(BlockingIOError):  # no connection is waiting to be accepted
            listener.accept()
    finally:
        listener.close()


def test_fingerprint_with_a_closed_port_returns_at_once() -> None:
    s = Settings.from_env({"RAG_EMBEDDER": "openai", "RAG_EMBEDDING_BASE_URL": f"http://127.0.0.1:{_idle_port()}/v1",
                           "RAG_EMBEDDING_MODEL": "gateway-embed"})
    t0 = time.perf_counter()
    assert embedder_fingerprint(s).startswith("openai:gateway-embed:native:norm:")
    assert time.perf_counter() - t0 < 0.5


def test_configurations_the_embedder_refuses_are_refused_offline() -> None:
    with pytest.raises(ValueError, match="exceeds the 1536 dimensions"):
        embedder_fingerprint(Settings.from_env({"RAG_EMBEDDER": "openai", "RAG_EMBEDDING_DIMENSIONS": "4096"}))
    with pytest.raises(ValueError, match="at least 8 dimensions"):
        embedder_fingerprint(Settings.from_env({"RAG_EMBEDDING_DIMENSIONS": "4"}))
    with pytest.raises(SettingsError, match="RAG_EMBEDDER='bert'"):
        embedder_fingerprint(replace(Settings.from_env({}), embedder="bert"))
