"""The runtime install has no torch: training subcommands must say how to get it, in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; from textgen.service.cli import main; main()"


@pytest.mark.parametrize("command", [["train"], ["eval", "x.pt"], ["sample", "x.pt"]])
def test_training_commands_without_torch_print_how_to_install(command: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *command], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["textgen: error: this command needs the training extra (torch): pip install 'textgen[train]'"]
