"""What embedding costs: USD per million input tokens, by provider and model.

Lookup order (first hit wins):

1. an explicit override (``RAG_EMBEDDING_PRICE_PER_MTOK``, passed in as ``override``);
2. ``RAG_EMBEDDING_PRICES``: a JSON object ``{"model": price}`` or a list ``model=price,other=price``
   (for gateway or self-hosted models, Azure deployment names, negotiated prices), read by
   :class:`rag_assets.settings.Settings` (``embedding_prices``, parsed by :func:`prices_setting`)
   and passed in as ``prices``;
3. the built-in table below (OpenAI list prices; a ``openai/`` gateway prefix is ignored);
4. free providers (``local``, ``hashing``): 0.0;
5. otherwise the price is unknown: 0.0 with ``known=False`` so reports can say "price unknown"
   instead of presenting a paid run as free.

The table holds only prices we are sure of; add others through ``RAG_EMBEDDING_PRICES``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from rag_assets.settings import SettingsError

# USD per 1M input tokens (OpenAI list prices for the standard, non-batch API).
PRICES_PER_MTOK: dict[str, float] = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}

FREE_PROVIDERS = frozenset({"local", "hashing"})

PRICES_ENV = "RAG_EMBEDDING_PRICES"

_GATEWAY_PREFIXES = ("openai/",)


@dataclass(frozen=True)
class Price:
    """A price and where it came from. ``known`` is False when no source had one (then ``per_mtok`` is 0)."""

    per_mtok: float
    known: bool
    source: str  # "override" | "setting" (RAG_EMBEDDING_PRICES) | "table" | "free" | "unknown"

    def cost_usd(self, tokens: int) -> float:
        return cost_usd(tokens, self.per_mtok)


def _check_price(name: str, value: object) -> float:
    try:
        price = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{PRICES_ENV}: price for {name!r} is not a number: {value!r}") from None
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"{PRICES_ENV}: price for {name!r} must be a finite number >= 0, got {value!r}")
    return price


def parse_prices(raw: str | None) -> dict[str, float]:
    """Parse ``RAG_EMBEDDING_PRICES``: JSON ``{"model": 0.05}`` or ``model=0.05,other=0.1``."""
    if raw is None or not raw.strip():
        return {}
    text = raw.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{PRICES_ENV} is not valid JSON: {exc.msg} at position {exc.pos}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{PRICES_ENV} must be a JSON object mapping model to price")
        return {str(k).strip(): _check_price(str(k), v) for k, v in obj.items()}
    out: dict[str, float] = {}
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"{PRICES_ENV}: expected model=price, got {part!r}")
        out[name.strip()] = _check_price(name.strip(), value.strip())
    return out


def prices_setting(raw: str | None) -> tuple[tuple[str, float], ...]:
    """``RAG_EMBEDDING_PRICES`` as the settings hold it: ``(model, price)`` pairs, in the given order.

    Parsed when the settings are read, so a bad value fails at start-up naming the variable, not
    after a paid run when its cost is reported.
    """
    try:
        return tuple(parse_prices(raw).items())
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _table_key(model: str) -> str:
    for prefix in _GATEWAY_PREFIXES:
        if model.startswith(prefix):
            return model[len(prefix) :]
    return model


def lookup_price(
    provider: str,
    model: str,
    override: float | None = None,
    prices: Mapping[str, float] | None = None,
) -> Price:
    """The price of ``provider``/``model`` and its source (see the module docstring for the order).

    ``prices``: the ``RAG_EMBEDDING_PRICES`` table (``Settings.embedding_prices``), model -> price.
    """
    if override is not None:
        return Price(_check_price(model, override), True, "override")
    extra = dict(prices or {})
    for key in (model, f"{provider}/{model}", _table_key(model)):
        if key in extra:
            return Price(_check_price(key, extra[key]), True, "setting")
    key = _table_key(model)
    if key in PRICES_PER_MTOK:
        return Price(PRICES_PER_MTOK[key], True, "table")
    if provider in FREE_PROVIDERS:
        return Price(0.0, True, "free")
    return Price(0.0, False, "unknown")


def price_per_mtok(
    provider: str,
    model: str,
    override: float | None = None,
    prices: Mapping[str, float] | None = None,
) -> float:
    """USD per million input tokens; 0.0 when unknown (use :func:`lookup_price` to tell the difference)."""
    return lookup_price(provider, model, override, prices).per_mtok


def cost_usd(tokens: int, price_per_mtok: float) -> float:
    """Cost in USD of ``tokens`` input tokens at ``price_per_mtok``."""
    return tokens * price_per_mtok / 1_000_000
