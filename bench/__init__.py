"""Benchmarks: each prints its figures and saves them under bench/results/."""

import statistics


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max, rounded to 10 ms."""
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }
