"""The embedding price table and its configuration overrides."""

from __future__ import annotations

import pytest

from rag_assets.embedders.pricing import (
    PRICES_ENV,
    Price,
    cost_usd,
    lookup_price,
    parse_prices,
    price_per_mtok,
)
from rag_assets.settings import Settings, SettingsError


@pytest.mark.parametrize(
    ("model", "price"),
    [("text-embedding-3-small", 0.02), ("text-embedding-3-large", 0.13), ("text-embedding-ada-002", 0.10)],
)
def test_table_prices(model: str, price: float) -> None:
    assert price_per_mtok("openai", model) == price
    p = lookup_price("openai", model)
    assert p == Price(price, True, "table")


def test_gateway_prefix_uses_the_table() -> None:
    assert price_per_mtok("openai", "openai/text-embedding-3-small") == 0.02


def test_free_providers_are_known_zero() -> None:
    for provider, model in [("local", "all-MiniLM-L6-v2"), ("hashing", "feature-hash-v1")]:
        p = lookup_price(provider, model)
        assert p.per_mtok == 0.0 and p.known and p.source == "free"


def test_unknown_paid_model_is_zero_but_flagged() -> None:
    p = lookup_price("openai", "some-gateway-model")
    assert p.per_mtok == 0.0
    assert not p.known and p.source == "unknown"


def test_override_wins_over_everything() -> None:
    p = lookup_price("openai", "text-embedding-3-small", override=0.07, prices={"text-embedding-3-small": 0.5})
    assert p == Price(0.07, True, "override")


def test_env_list_and_json() -> None:
    assert parse_prices("my-model=0.05, other=0.1") == {"my-model": 0.05, "other": 0.1}
    assert parse_prices('{"my-model": 0.05, "other": 1}') == {"my-model": 0.05, "other": 1.0}
    assert parse_prices("") == {} and parse_prices(None) == {}
    prices = parse_prices("my-model=0.05,text-embedding-3-small=0.01")
    assert lookup_price("openai", "my-model", prices=prices) == Price(0.05, True, "setting")
    # The setting overrides the table (negotiated prices, gateway mark-ups).
    assert lookup_price("openai", "text-embedding-3-small", prices=prices) == Price(0.01, True, "setting")


def test_prices_are_a_setting_not_read_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """RAG_EMBEDDING_PRICES is read once, by Settings, in the same two formats; pricing reads no environment."""
    monkeypatch.setenv(PRICES_ENV, "custom-embed=0.25")
    assert lookup_price("openai", "custom-embed") == Price(0.0, False, "unknown")
    s = Settings.from_env({PRICES_ENV: "custom-embed=0.25, other=1"})
    assert s.embedding_prices == (("custom-embed", 0.25), ("other", 1.0))
    assert Settings.from_env({PRICES_ENV: '{"custom-embed": 0.25}'}).embedding_prices == (("custom-embed", 0.25),)
    assert Settings.from_env({}).embedding_prices == ()
    assert price_per_mtok("openai", "custom-embed", prices=dict(s.embedding_prices)) == 0.25


def test_bad_prices_setting_fails_when_settings_are_read() -> None:
    with pytest.raises(SettingsError, match=f"{PRICES_ENV}: price for 'm' is not a number"):
        Settings.from_env({PRICES_ENV: "m=abc"})


def test_openai_embedder_prices_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from rag_assets.embedders import make_embedder

    monkeypatch.delenv(PRICES_ENV, raising=False)
    env = {
        "RAG_EMBEDDER": "openai",
        "RAG_EMBEDDING_API_KEY": "k",
        "RAG_EMBEDDING_BASE_URL": "http://127.0.0.1:9/v1",
        "RAG_EMBEDDING_MODEL": "gateway-embed",
        PRICES_ENV: "gateway-embed=0.04",
    }
    emb = make_embedder(Settings.from_env(env))
    assert emb.price() == Price(0.04, True, "setting")
    # The explicit per-model override still wins over the table.
    emb = make_embedder(Settings.from_env({**env, "RAG_EMBEDDING_PRICE_PER_MTOK": "0.5"}))
    assert emb.price() == Price(0.5, True, "override")


@pytest.mark.parametrize("raw", ["my-model", "=0.1", "m=abc", "m=-1", "m=nan", "[1, 2]", "{bad json"])
def test_bad_env_values_raise(raw: str) -> None:
    with pytest.raises(ValueError, match=PRICES_ENV):
        parse_prices(raw)


def test_cost() -> None:
    assert cost_usd(1_000_000, 0.02) == pytest.approx(0.02)
    assert cost_usd(0, 0.13) == 0.0
    assert cost_usd(2_500_000, 0.13) == pytest.approx(0.325)
    assert Price(0.10, True, "table").cost_usd(500_000) == pytest.approx(0.05)


def test_embedders_report_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    from rag_assets.embedders.openai_compat import OpenAICompatEmbedder

    monkeypatch.delenv(PRICES_ENV, raising=False)
    e = OpenAICompatEmbedder("http://127.0.0.1:9/v1", "k", "text-embedding-3-large")
    assert e.price_per_mtok() == 0.13
    assert OpenAICompatEmbedder("http://127.0.0.1:9/v1", "k", "x", price_per_mtok=0.3).price_per_mtok() == 0.3
    unknown = OpenAICompatEmbedder("http://127.0.0.1:9/v1", "k", "mystery-embed")
    assert unknown.price_per_mtok() == 0.0 and not unknown.price().known
