"""Sizes, CPU shares and counts as admins write them ("2G", "0.5", "4096"), checked once.

Sizes are binary (1024-based) whatever the suffix says, as cgroups, df and Docker count them.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

from hostd.errors import HostdError

MAX = 2**60  # far beyond any real limit: a bigger number is a typo
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# At most 30 digits, so int() and Fraction() never chew on megabytes of input.
_SIZE = re.compile(r"([0-9]{1,30})(?:\.([0-9]{1,30}))?\s*(?:([KMGT])(?:I?B)?|B)?", re.IGNORECASE)
_DECIMAL = re.compile(r"[0-9]{1,30}(?:\.[0-9]{1,30})?")
_INTEGER = re.compile(r"[0-9]{1,30}")


def parse_size(text: str, what: str) -> int:
    """Bytes from "512M", "1.5G", "10GiB" or "100000"; fractions of a byte are cut off."""
    m = _SIZE.fullmatch(text.strip())
    # A fraction needs a unit: "1.5" bytes is a mistake, "1.5G" is not.
    size = 0 if m is None or (m[2] and not m[3]) else _size(m[1], m[2], m[3])
    if size <= 0:
        raise HostdError(f"invalid {what} size {text!r}", "use a positive size like 512M, 2G or 1T")
    if size > MAX:
        raise HostdError(f"{what} size {text!r} is too large", f"use at most {format_size(MAX)}")
    return size


def _size(whole: str, fraction: str | None, unit: str | None) -> int:
    return int(Fraction(f"{whole}.{fraction or 0}") * _UNITS[(unit or "").upper()])


def human_size(n: int) -> str:
    """`n` bytes for a status table: the largest unit it reaches, one decimal ("48.9M")."""
    suffix, unit = next(((s, u) for s, u in reversed(_UNITS.items()) if 1024 <= u <= n), ("", 1))
    return f"{n / unit:.1f}".removesuffix(".0") + suffix


def format_size(n: int) -> str:
    """`n` bytes as "512M" or "1.5G": exact where two decimals of some unit allow it, so it
    parses back to `n`; otherwise rounded in the largest unit."""
    units = [(suffix, unit) for suffix, unit in reversed(_UNITS.items()) if 1024 <= unit <= n]
    if not units:
        return str(n)
    suffix, unit = next(((s, u) for s, u in units if n * 100 % u == 0), units[0])
    whole, hundredths = divmod((n * 100 + unit // 2) // unit, 100)
    return f"{whole}{f'.{hundredths:02d}'.rstrip('0') if hundredths else ''}{suffix}"


def parse_cpus(text: str, host_cpus: int) -> float:
    """CPUs from "0.5" or "2", to 0.01 CPU (finer shares are noise), at most the host's count."""
    cpus = float(round(Decimal(text.strip()), 2)) if _DECIMAL.fullmatch(text.strip()) else 0.0
    if cpus <= 0:
        raise HostdError(f"invalid cpus {text!r}", "use a positive number of CPUs like 0.5 or 2")
    if cpus > host_cpus:
        raise HostdError(
            f"cpus {text!r} is more than this host has", f"use at most {host_cpus} (its CPU count)"
        )
    return cpus


def parse_count(text: str, what: str) -> int:
    """A positive whole number such as a pids limit, from "4096"."""
    count = int(text.strip()) if _INTEGER.fullmatch(text.strip()) else 0
    if count <= 0:
        raise HostdError(f"invalid {what} {text!r}", "use a positive whole number like 4096")
    if count > MAX:
        raise HostdError(f"{what} {text!r} is too large", f"use at most {MAX}")
    return count


def parse_ports(text: str) -> tuple[int, int]:
    """A host port or an inclusive range: "8080" or "20000-20009"."""
    m = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", text.strip())
    first = int(m[1]) if m else 0
    last = int(m[2] or m[1]) if m else 0
    if not m or not 1 <= first <= last <= 65535:
        raise HostdError(
            f"invalid port range {text!r}", "use a port or a range like 20000-20009 (1-65535)"
        )
    return first, last
