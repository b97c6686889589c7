"""Benchmarks: each prints its figures and saves them under bench/results/."""

import json
import statistics
from pathlib import Path
from typing import Any


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max, rounded to 10 ms."""
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def save(figures: dict[str, Any], path: Path) -> None:
    """Print the figures and save them as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"saved to {path}")
