"""SNI route patterns: which pool a TLS server name goes to (pure, no Twisted).

A pattern is an exact host name (``db.example.com``) or a wildcard whose ``*``
stands for exactly one leftmost label (``*.example.com`` matches
``a.example.com``, not ``example.com`` nor ``a.b.example.com``), as in
certificate name matching (RFC 6125) and HAProxy's ``req.ssl_sni -m end`` used
with one label. Names are compared in their normal form: lower case, IDNA
A-labels (``bücher.example`` is ``xn--bcher-kva.example``), no trailing dot.
An exact pattern wins over a wildcard, whatever their order in the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs
import idna

__all__ = ["SniRoutes", "normalise_name", "normalise_pattern"]

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalise_name(name: str) -> str:
    """The comparable form of a host name; ValueError (in words) when it is not one."""
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValueError("empty host name")
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"not a valid international host name ({e})") from None
    text = text.lower()
    if len(text) > 253:
        raise ValueError("host name longer than 253 characters")
    for label in text.split("."):
        if not _LABEL.fullmatch(label):
            raise ValueError(f"invalid label {label!r} in host name")
    return text


def normalise_pattern(pattern: str) -> str:
    """The normal form of an SNI pattern; ValueError explains a bad one."""
    if pattern.startswith("*."):
        return "*." + normalise_name(pattern[2:])
    if "*" in pattern:
        raise ValueError(
            "a wildcard must be a whole leftmost label followed by a dot,"
            ' like "*.example.com"'
        )
    return normalise_name(pattern)


@attrs.frozen
class SniRoutes:
    """Maps a client's server name to a pool name, or None for "no route"."""

    exact: dict[str, str]
    wildcard: dict[str, str]  # key: the domain after "*."

    @classmethod
    def build(cls, routes: Iterable[tuple[str, str]]) -> SniRoutes:
        """From (pattern, pool) pairs whose patterns are already normalised."""
        exact: dict[str, str] = {}
        wildcard: dict[str, str] = {}
        for pattern, pool in routes:
            if pattern.startswith("*."):
                wildcard.setdefault(pattern[2:], pool)
            else:
                exact.setdefault(pattern, pool)
        return cls(exact, wildcard)

    def match(self, server_name: str | None) -> str | None:
        """The pool for ``server_name`` (as sent by a client), or None."""
        if server_name is None:
            return None
        try:
            name = normalise_name(server_name)
        except ValueError:
            return None
        pool = self.exact.get(name)
        if pool is not None:
            return pool
        _, dot, parent = name.partition(".")
        return self.wildcard.get(parent) if dot else None
