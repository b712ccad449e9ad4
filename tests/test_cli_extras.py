"""The runtime install has no torch: training subcommands must say how to get it, in one line."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from textgen.training.config import TrainConfig

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; from textgen.service.cli import main; main()"


@pytest.mark.parametrize("command", [["train"], ["eval", "x.pt"], ["sample", "x.pt"]])
def test_training_commands_without_torch_print_how_to_install(command: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *command], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["textgen: error: this command needs the training extra (torch): pip install 'textgen[train]'"]


def test_train_help_lists_an_option_per_config_field_without_torch() -> None:
    """`textgen train --help` is built from TrainConfig's fields, which the runtime install (no torch) imports."""
    code = ("import sys; sys.modules['torch'] = None; import textgen.training.config; "
            "from textgen.service.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    flags = {f.metadata.get("flag") or "--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)}
    assert flags >= {"--corpus", "--cell", "--hidden-size", "--num-layers", "--dropout", "--init", "--iterator",
                     "--bptt", "--batch-size", "--optimizer", "--lr", "--weight-decay", "--beta2", "--schedule",
                     "--warmup-steps", "--clip", "--ema", "--max-steps", "--time-budget", "--eval-every", "--seed",
                     "--threads", "--out"}  # the flags textgen train has always had
    listed = set(re.findall(r"^  (?:-[a-z], )?(--[a-z0-9-]+)", proc.stdout, re.MULTILINE))
    assert listed == flags | {"--resume", "--quiet", "--help"}
    assert "--cell [rnn|gru|lstm]" in proc.stdout and "[default: 384]" in proc.stdout
