"""A local Earth Engine emulator: the real ``ee`` client talks to it over HTTP."""

from __future__ import annotations

from .client import init_ee_client
from .collections import Catalog, ImageRecord, load_collections
from .faults import FAULT_MODES, FaultPlan, parse_faults
from .server import Emulator, EmulatorStats

__all__ = [
    "Emulator",
    "EmulatorStats",
    "Catalog",
    "ImageRecord",
    "load_collections",
    "FaultPlan",
    "FAULT_MODES",
    "parse_faults",
    "init_ee_client",
]
