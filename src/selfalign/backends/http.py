"""What the HTTP backends share: the API key kept out of every message, the server's error text, and when to retry."""

from __future__ import annotations

import email.utils
import time
from typing import Any

RETRYABLE_STATUS = {408, 425, 429}  # plus every 5xx


class Secret:
    """Holds the API key so that no repr, log line or traceback shows it."""

    def __init__(self, value: str | None) -> None:
        self._value = value or None

    def reveal(self) -> str | None:
        return self._value

    def scrub(self, text: str) -> str:
        return text.replace(self._value, "***") if self._value else text

    def __repr__(self) -> str:
        return "***" if self._value else "None"


def error_text(response: Any) -> str:
    """The server's error message, short: OpenAI-style {"error": {"message": ...}} or the body's start."""
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:300]
    return str(payload)[:300]


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())
