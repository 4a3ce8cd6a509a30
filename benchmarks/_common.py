"""Helpers shared by the benchmark scripts: timing and the machine line every report starts with."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def best_of(fn: Callable[[], T], repeat: int = 3) -> tuple[float, T]:
    """The fastest of `repeat` runs (seconds) and the last result: the least noisy estimate."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out  # type: ignore[return-value]
