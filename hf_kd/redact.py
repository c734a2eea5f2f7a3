"""Secrets out of any text hf_kd writes down (a command line or a recipe quoted in a card)."""

from __future__ import annotations

import re

from huggingface_hub import get_token

REDACTED = "<redacted>"
_SECRET_NAME = r"[\w.-]*(?:token|secret|password|api_key)"
_SECRET_FLAG = re.compile(rf"(--{_SECRET_NAME}(?:=|\s+))(\S+)", re.IGNORECASE)
_SECRET_FIELD = re.compile(rf"^(\s*{_SECRET_NAME}\s*:[ \t]*)(\S.*)$", re.IGNORECASE | re.MULTILINE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def redact(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """``text`` (a command line or recipe) with every secret replaced by :data:`REDACTED`: the
    ``secrets`` given and the token huggingface_hub would use (``HF_TOKEN``, ``hf auth login``)
    wherever they appear, the value of any ``--*token``/``*secret``/``*password``/``*api_key`` flag or
    field, and anything shaped like a Hub token (``hf_`` + 20 or more letters and digits)."""
    for secret in (*secrets, get_token()):
        if secret:
            text = text.replace(secret, REDACTED)
    text = _SECRET_FLAG.sub(lambda m: m[1] + REDACTED, text)
    text = _SECRET_FIELD.sub(lambda m: m[1] + REDACTED, text)
    return _HF_TOKEN.sub(REDACTED, text)
