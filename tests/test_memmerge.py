"""Page merging of guest memory: the process flag reaches the program and its children."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from master_controller.runtimes import memmerge

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/ksm_stat").exists(), reason="this kernel has no per-process KSM"
)


def _merge_any(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    return dict(line.split(": ") for line in out.splitlines() if ": " in line)["ksm_merge_any"]


def test_the_flag_passes_through_exec_and_to_children() -> None:
    child = ["sh", "-c", "cat /proc/self/ksm_stat"]  # a child of a child, after two execs
    assert _merge_any(child) == "no"
    assert _merge_any(memmerge.merging(child)) == "yes"


def test_the_kernel_state_is_read_not_changed() -> None:
    before = memmerge.KSM_RUN.read_text()
    assert memmerge.kernel_state() in ("merging", "stopped")
    assert memmerge.KSM_RUN.read_text() == before
