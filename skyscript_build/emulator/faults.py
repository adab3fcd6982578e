"""Seeded fault injection: which request gets which failure.

A fault spec is ``MODE:RATE[,MODE:RATE...]``, e.g. ``429:0.1,500:0.05,timeout:0.02,truncate:0.02``.
Modes:

- ``429``: HTTP 429 RESOURCE_EXHAUSTED with a ``Retry-After`` header.
- ``500``, ``503``: HTTP 500 INTERNAL / 503 UNAVAILABLE with Earth Engine's JSON error body.
- ``timeout``: the server stalls (``stall_s`` seconds, or until it stops) before answering,
  so a client with a shorter timeout gives up.
- ``truncate``: the right headers and status 200, a ``Content-Length`` larger than the body,
  then the connection is closed half way.
- ``html``: status 200 with ``Content-Type: text/html`` and an HTML page instead of the answer.
- ``memory``: HTTP 400 "User memory limit exceeded." (Earth Engine's answer to a computation
  too big for one request; clients retry it as smaller pieces).

The decision for the n-th faultable request (numbered from 0 in arrival order) depends only on
``(seed, n)``, so a given seed always yields the same sequence of faults.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["FAULT_MODES", "FaultPlan", "parse_faults"]

FAULT_MODES = ("429", "500", "503", "timeout", "truncate", "html", "memory")


@dataclass(frozen=True)
class FaultPlan:
    """Fault rates by mode (fractions of requests), a seed, and the fault parameters."""

    rates: tuple[tuple[str, float], ...] = ()
    seed: int = 0
    retry_after_s: int = 1
    stall_s: float = 30.0

    def __post_init__(self) -> None:
        total = 0.0
        for mode, rate in self.rates:
            if mode not in FAULT_MODES:
                raise ConfigError(f"unknown fault mode {mode!r}; known: {', '.join(FAULT_MODES)}")
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"fault rate of {mode} must be between 0 and 1, got {rate}")
            total += rate
        if total > 1.0 + 1e-9:
            raise ConfigError(f"fault rates add up to {total:g}, more than 1")
        if self.stall_s < 0 or self.retry_after_s < 0:
            raise ConfigError("stall and Retry-After times must not be negative")

    def fault_for(self, n: int) -> str | None:
        """The fault mode of the n-th faultable request, or None for a normal answer."""
        if not self.rates:
            return None
        digest = hashlib.blake2b(struct.pack("<qq", self.seed, n), digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2**64
        edge = 0.0
        for mode, rate in self.rates:
            edge += rate
            if u < edge:
                return mode
        return None


def parse_faults(
    spec: str | None, seed: int = 0, retry_after_s: int = 1, stall_s: float = 30.0
) -> FaultPlan:
    """Parse ``MODE:RATE,...`` (empty or None: no faults) into a FaultPlan."""
    rates: list[tuple[str, float]] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        mode, sep, rate = part.partition(":")
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not sep or value < 0:
            raise ConfigError(f"bad fault {part!r}: expected MODE:RATE, e.g. 429:0.1")
        rates.append((mode.strip(), value))
    return FaultPlan(tuple(rates), seed=seed, retry_after_s=retry_after_s, stall_s=stall_s)
