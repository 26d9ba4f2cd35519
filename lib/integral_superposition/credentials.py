"""Telling storage credentials apart from the other fsspec storage options.

fsspec options mix settings that may be shown anywhere (``endpoint_url``, ``region_name``,
``anon``) with credentials that must never be written with a run, logged or sent to an
orchestrator (``key``, ``secret``, ``token``, ``password``, ``client_kwargs`` holding
``aws_secret_access_key``, an ``Authorization`` header, ...). :func:`split_secret_options`
separates the two at any depth; :func:`merge_options` puts them back together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "MASK",
    "is_secret_option",
    "masked_options",
    "masked_paths",
    "masked_uri",
    "merge_options",
    "option_paths",
    "split_secret_options",
    "uri_credentials",
    "without_values",
]

MASK = "***"
"""What a credential's value is replaced by wherever options are shown or serialised."""

# compared against the option name lowercased with everything but letters and digits dropped
_SECRET_WORDS = (
    "secret",
    "token",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "privatekey",
    "sastoken",
    "saskey",
    "connectionstring",
    "authorization",
    "cookie",
)
_SECRET_NAMES = {"key", "sas", "auth", "pwd", "apikey", "accountkey", "sessiontoken"}
_KEY_SUFFIX = re.compile(r"(key|keyid)$")


def is_secret_option(name: str) -> bool:
    """True when a storage option called ``name`` holds a credential (``key``, ``secret``,
    ``aws_session_token``, ``password``, ``account_key``, ``SSECustomerKey``, ...)."""
    flat = re.sub(r"[^a-z0-9]", "", str(name).lower())
    if flat in _SECRET_NAMES or any(w in flat for w in _SECRET_WORDS):
        return True
    return bool(_KEY_SUFFIX.search(flat))


def split_secret_options(
    options: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(public, secret)``: the options without credentials, and the credentials alone, both
    keeping the nesting (``client_kwargs``, ``config_kwargs``, ``headers``) of ``options``.
    ``merge_options(secret, public)`` gives ``options`` back."""
    public: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if is_secret_option(k):
            secret[k] = v
        elif isinstance(v, Mapping):
            pub, sec = split_secret_options(v)
            public[k] = pub
            if sec:
                secret[k] = sec
        else:
            public[k] = v
    return public, secret


def masked_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` with every credential's value replaced by :data:`MASK`."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if is_secret_option(k):
            out[k] = MASK
        elif isinstance(v, Mapping):
            out[k] = masked_options(v)
        else:
            out[k] = v
    return out


def merge_options(base: Mapping[str, Any] | None, top: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` updated by ``top``, nested mappings merged key by key (``top`` wins)."""
    out = dict(base or {})
    for k, v in (top or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_options(out[k], v)
        else:
            out[k] = v
    return out


def masked_paths(options: Mapping[str, Any] | None, prefix: str = "") -> list[str]:
    """Dotted names of the options whose value is :data:`MASK` (a credential that was masked
    on the way here and so is lost)."""
    found: list[str] = []
    for k, v in (options or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            found += masked_paths(v, name + ".")
        elif v == MASK:
            found.append(name)
    return found


def option_paths(options: Mapping[str, Any] | None, prefix: str = "") -> list[str]:
    """Dotted names of every option (``client_kwargs.aws_secret_access_key``), nested
    mappings walked."""
    out: list[str] = []
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out += option_paths(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def without_values(text: str, options: Mapping[str, Any] | None) -> str:
    """``text`` (an error message) with the value of every option in ``options`` (nested
    ones included) replaced by :data:`MASK`."""

    def values(opts: Mapping[str, Any]) -> list[str]:
        out: list[str] = []
        for v in opts.values():
            out += values(v) if isinstance(v, Mapping) else [str(v)]
        return out

    for v in values(options or {}):
        if v:
            text = text.replace(v, MASK)
    return text


def uri_credentials(uri: str) -> list[str]:
    """What in ``uri`` is a credential: ``"password"`` for ``scheme://user:password@host``,
    and the names of query parameters that hold one (``?token=...``, ``?sig=...`` is not
    recognised, ``?X-Amz-Credential=...`` is). Empty for a URI without any."""
    if "://" not in str(uri):
        return []
    try:
        parts = urlsplit(str(uri))
        found = ["password"] if parts.password else []
    except ValueError:  # e.g. a port that is not a number
        return []
    found += [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if is_secret_option(k)]
    return found


def masked_uri(uri: str) -> str:
    """``uri`` with the credentials :func:`uri_credentials` finds replaced by :data:`MASK`."""
    text = str(uri)
    if not uri_credentials(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if parts.password:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:{MASK}@{host}"
    query = "&".join(
        f"{k}={MASK if is_secret_option(k) else v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return parts._replace(netloc=netloc, query=query).geturl()
