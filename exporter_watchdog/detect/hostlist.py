"""Slurm hostlist expressions: `w[2,1]`, `n[01-03,7]`, `a,b[1-2]`, `gpu-node[1-2]-ib`."""

from __future__ import annotations

import re

# A hostlist names at most a cluster's nodes; a larger expansion is a typo or hostile input.
MAX_HOSTS = 65536

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(expr: str) -> list[str]:
    """Expand a hostlist into host names in the order written; raise ValueError on a malformed one."""
    text = expr.strip()
    if not text:
        raise ValueError("empty hostlist")
    hosts: list[str] = []
    for item in _split_top_level(text):
        if not item:
            raise ValueError(f"empty host name in hostlist {expr!r}")
        for host in _expand_item(item, expr):
            hosts.append(host)
            if len(hosts) > MAX_HOSTS:
                raise ValueError(f"hostlist {expr!r} expands to more than {MAX_HOSTS} hosts")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are outside brackets."""
    items: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    items.append(text[start:])
    return items


def _expand_item(item: str, expr: str) -> list[str]:
    """Expand one host pattern; several bracket groups give their cartesian product."""
    open_at = item.find("[")
    if open_at < 0:
        if "]" in item or any(ch.isspace() for ch in item):
            raise ValueError(f"bad host name {item!r} in hostlist {expr!r}")
        return [item]
    close_at = item.index("]", open_at)
    prefix = item[:open_at]
    if any(ch.isspace() for ch in prefix):
        raise ValueError(f"bad host name {item!r} in hostlist {expr!r}")
    suffixes = _expand_item(item[close_at + 1 :], expr) if close_at + 1 < len(item) else [""]
    numbers = _expand_ranges(item[open_at + 1 : close_at], expr)
    if len(numbers) * len(suffixes) > MAX_HOSTS:
        raise ValueError(f"hostlist {expr!r} expands to more than {MAX_HOSTS} hosts")
    return [f"{prefix}{number}{suffix}" for number in numbers for suffix in suffixes]


def _expand_ranges(body: str, expr: str) -> list[str]:
    """Expand `01-03,7` into zero-padded numbers, keeping the written order."""
    numbers: list[str] = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"bad range {part!r} in hostlist {expr!r}")
        low_text, high_text = match.group(1), match.group(2)
        if high_text is None:
            numbers.append(low_text)
            continue
        low, high = int(low_text), int(high_text)
        if high < low:
            raise ValueError(f"descending range {part!r} in hostlist {expr!r}")
        if high - low + 1 > MAX_HOSTS:
            raise ValueError(f"range {part!r} in hostlist {expr!r} is larger than {MAX_HOSTS}")
        # Slurm pads to the width of the lower bound when it is written with leading zeros.
        width = len(low_text) if low_text.startswith("0") and len(low_text) > 1 else 0
        numbers.extend(str(n).zfill(width) for n in range(low, high + 1))
    return numbers
