"""Slurm hostlist expansion."""

from __future__ import annotations

import re

import pytest

from exporter_watchdog.detect.hostlist import MAX_HOSTS, expand_hostlist


@pytest.mark.parametrize(
    ("expr", "hosts"),
    [
        ("vm", ["vm"]),
        ("w[2,1]", ["w2", "w1"]),  # Slurm keeps the order it was given
        ("n[01-03,7]", ["n01", "n02", "n03", "n7"]),
        ("a,b[1-2]", ["a", "b1", "b2"]),
        ("gpu-node[1-2]-ib", ["gpu-node1-ib", "gpu-node2-ib"]),
        ("dtu[1-2]", ["dtu1", "dtu2"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[0-1]", ["n0", "n1"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("x[5]", ["x5"]),
        (" n[1-2] ", ["n1", "n2"]),
        ("a[1-2],b,c[3]", ["a1", "a2", "b", "c3"]),
    ],
)
def test_expand(expr: str, hosts: list[str]) -> None:
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "empty hostlist"),
        ("n[1-", "unbalanced '['"),
        ("n]", "unbalanced ']'"),
        ("a,,b", "empty host name"),
        ("a,", "empty host name"),
        ("n[3-1]", "descending range"),
        ("n[a]", "bad range 'a'"),
        ("n[1-2-3]", "bad range"),
        ("n[]", "bad range"),
        ("n[[1]]", "nested brackets"),
        ("a b", "bad host name"),
    ],
)
def test_malformed_hostlists_raise_naming_the_input(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        expand_hostlist(expr)
    if expr.strip():
        assert repr(expr) in str(info.value)


def test_huge_expansions_are_refused() -> None:
    with pytest.raises(ValueError, match=f"than {MAX_HOSTS}"):
        expand_hostlist(f"n[0-{MAX_HOSTS}]")
    with pytest.raises(ValueError, match=f"than {MAX_HOSTS}"):
        expand_hostlist("r[1-1000]n[1-1000]")
    assert len(expand_hostlist(f"n[1-{MAX_HOSTS}]")) == MAX_HOSTS
