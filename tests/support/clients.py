"""The official ``openai`` client pointed at a replica started by a test."""

from __future__ import annotations

import openai


def openai_client(url: str, *, timeout: float = 300, api_key: str = "unused") -> openai.OpenAI:
    """A client on ``url``'s ``/v1`` that never retries: a retry would hide the answer under test."""
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)


def async_openai_client(url: str, *, timeout: float = 300, api_key: str = "unused") -> openai.AsyncOpenAI:
    """The asyncio twin of :func:`openai_client`."""
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)
