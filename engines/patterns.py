"""Regex patterns of rules, bounded: compiled once, refused when they would
expand too much, matched with a time limit.

The `regex` package, not `re`: it reads the same (Python) syntax, takes a
match timeout, and releases the GIL while it matches, so a slow pattern
neither hangs the caller nor stops the process's other threads. Python's own
parser reads a pattern first (the documented syntax), so its size can be
measured before `regex` writes its fixed repeats out.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parser  # type: ignore[attr-defined]
from typing import Any

import regex

MAX_PATTERN_CHARS = 1_000
# `regex` compiles a fixed repeat such as a{100000} as that many copies (a{10**7}
# takes GBs): the pattern's size with its fixed repeats expanded is bounded.
MAX_PATTERN_SIZE = 50_000
REGEX_TIMEOUT_S = 0.2
REGEX_FLAGS: dict[str, int] = {
    "ignorecase": re.IGNORECASE,
    "multiline": re.MULTILINE,
    "dotall": re.DOTALL,
}


def flags_of(names: Iterable[str]) -> int:
    flags = 0
    for name in names:
        flags |= REGEX_FLAGS[name]
    return flags


_REPEATS = {
    sre_constants.MAX_REPEAT,
    sre_constants.MIN_REPEAT,
    getattr(sre_constants, "POSSESSIVE_REPEAT", sre_constants.MAX_REPEAT),
}


def _expanded_size(tree: Any) -> int:
    """Pieces of a parsed pattern with its fixed repeats written out, the way
    `regex` compiles them (a{1000} is 1000 pieces, a{1,1000} one)."""
    total = 0
    for op, av in tree:
        if op in _REPEATS:
            low, _high, sub = av
            total += _expanded_size(sub) * max(int(low), 1)
        elif op is sre_constants.SUBPATTERN:
            total += 1 + _expanded_size(av[-1])
        elif op is sre_constants.BRANCH:
            total += 1 + sum(_expanded_size(b) for b in av[1])
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            total += 1 + _expanded_size(av[1])
        elif op is getattr(sre_constants, "ATOMIC_GROUP", None):
            total += 1 + _expanded_size(av)
        elif op is sre_constants.GROUPREF_EXISTS:
            total += 1 + _expanded_size(av[1]) + (_expanded_size(av[2]) if av[2] is not None else 0)
        else:
            total += 1
        if total > MAX_PATTERN_SIZE:
            break
    return total


@functools.lru_cache(maxsize=256)
def compiled(pattern: str, flags: int) -> Any:
    """The compiled pattern; ValueError says why it is refused. Python's own
    parser reads it first (the documented syntax, and its size is measured
    before `regex` expands it)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"the pattern has {len(pattern):,} characters; the limit is {MAX_PATTERN_CHARS:,}")
    try:
        tree = sre_parser.parse(pattern, flags)
    except re.error as err:
        raise ValueError(str(err)) from None
    except RecursionError:
        raise ValueError("the pattern nests too deeply") from None
    if _expanded_size(tree) > MAX_PATTERN_SIZE:
        raise ValueError(
            f"the pattern's repeat counts make it too large (over {MAX_PATTERN_SIZE:,} pieces "
            f"when written out); use smaller counts or an open repeat such as {{1,}}"
        )
    try:
        return regex.compile(pattern, flags)
    except (regex.error, OverflowError, MemoryError) as err:
        raise ValueError(str(err)) from None
