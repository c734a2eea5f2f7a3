"""Secrets out of anything hf_kd writes down or shows: the one redaction every card, record, saved
argument file, log line and error message goes through.

A secret hides in three kinds of places, all covered here:

- a value whose *name* says it is secret (``hub_token``, ``token``, ``api_key``, ``password``,
  ``client_secret``, ``auth``, ``HF_TOKEN``…), at any depth of a mapping (``teacher_model_init_kwargs:
  {token: …}``), as a command-line flag (``--hub_token X``, ``--token=X``), a YAML or JSON field
  (``token: X``, ``{token: X}``, ``"token": "X"``), a keyword (``token=X``) or a listed flag
  (``['--hub_token', 'X']``);
- a value *shaped* like a credential, wherever it is: a Hub token (``hf_…``), an OpenAI-style key
  (``sk-…``), a GitHub token (``ghp_…``, ``github_pat_…``), an AWS access key id (``AKIA…``), a Slack
  token (``xox…-``), a bearer header, the password of a URL (``https://user:password@host``);
- the secrets of this run, given by value (``secrets``), and the token huggingface_hub would use
  (``HF_TOKEN``, ``hf auth login``).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any

from huggingface_hub import get_token

REDACTED = "<redacted>"

SECRET_NAME = re.compile(
    r"(?:^|[_.-])(?:token|secret|password|passwd|pwd|api_?key|access_?key|private_?key|key|auth|"
    r"authorization|credentials?)$",
    re.IGNORECASE,
)
"""A field, key, keyword or flag name whose value is secret: it ends with one of these words (``hub_token``,
``api_key``, ``auth``), not merely contains it (``max_new_tokens``, ``tokenizer``, ``author`` are not)."""

_NAME = r"[A-Za-z_][\w.-]*"
_FLAG = re.compile(rf"(--({_NAME})(?:=|\s+))('[^']*'|\"[^\"]*\"|\S+)")
_FIELD = re.compile(rf"^(\s*-?\s*({_NAME})\s*:[ \t]*)(\S.*?)\s*$", re.MULTILINE)
_QUOTED = re.compile(rf"""(["']({_NAME})["']\s*:\s*)("(?:[^"\\]|\\.)*"|'[^']*'|[^\s,}}\]]+)""")
_FLOW = re.compile(rf"""([{{,]\s*({_NAME})\s*:\s*)('[^']*'|"[^"]*"|[^\s,}}]+)""")
_LISTED_FLAG = re.compile(rf"""(["']--({_NAME})["']\s*,\s*)('[^']*'|"[^"]*")""")
_KEYWORD = re.compile(rf"(\b({_NAME})=)('[^']*'|\"[^\"]*\"|[^\s,)]+)")
_CREDENTIAL = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
    r"github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,})\b"
    r"|(?<=Bearer )[A-Za-z0-9._~+/=-]{8,}"
)
"""Values shaped like a credential, whatever their name."""
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")
"""The password of a URL with credentials (``https://user:password@host``)."""


def is_secret_name(name: str) -> bool:
    """Whether a field, key, keyword or flag called ``name`` holds a secret (see :data:`SECRET_NAME`)."""
    return bool(SECRET_NAME.search(name))


def _by_name(match: re.Match) -> str:
    prefix, name, value = match[1], match[2], match[3]
    if not is_secret_name(name) or value in (REDACTED, f"'{REDACTED}'", f'"{REDACTED}"'):
        return match[0]
    quote = value[0] if value[:1] in "'\"" and value[-1:] == value[:1] and len(value) > 1 else ""
    return f"{prefix}{quote}{REDACTED}{quote}"


def redact(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """``text`` (a command line, recipe, card, log line or error message) with every secret replaced by
    :data:`REDACTED`: the ``secrets`` given and the token huggingface_hub would use wherever they appear;
    the value of any flag, YAML/JSON field or keyword with a secret name (:func:`is_secret_name`); and
    anything shaped like a credential."""
    for secret in (*secrets, get_token()):
        if secret:
            text = text.replace(secret, REDACTED)
    for pattern in (_FLAG, _LISTED_FLAG, _FIELD, _FLOW, _QUOTED, _KEYWORD):
        text = pattern.sub(_by_name, text)
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    return _CREDENTIAL.sub(REDACTED, text)


def redact_value(value: Any, secrets: tuple[str | None, ...] = (), replacement: Any = REDACTED) -> Any:
    """``value`` (a JSON-like structure: mappings, lists, tuples, strings, numbers) with the value of every
    key with a secret name, at any depth, replaced by ``replacement`` (when set), and every string through
    :func:`redact`. A new structure; ``value`` is left as it was."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {
            key: (
                replacement
                if isinstance(key, str) and is_secret_name(key) and item not in (None, "", False)
                else redact_value(item, secrets, replacement)
            )
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item, secrets, replacement) for item in value)
    return value


def redact_logs_and_errors() -> None:
    """From now on, every log record (any logger) and the traceback of an error that ends the program
    go through :func:`redact` before they are shown. The scripts call it first."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "redacting", False):
        return

    def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return record

    redacted_record.redacting = True
    logging.setLogRecordFactory(redacted_record)

    def redacted_hook(kind, error, trace) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(kind, error, trace))))

    sys.excepthook = redacted_hook
