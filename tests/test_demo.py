"""The README's promise: `make demo`, then the commands it shows next, work as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def demo_commands() -> list[str]:
    """The Makefile's demo recipe, as shell lines with the venv's bin folder spelled out."""
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "Makefile has a demo target"
    lines = [line.strip() for line in recipe.group(1).splitlines() if line.strip() and not line.strip().startswith("@#")]
    return [line.replace("$(BIN)/", ".venv/bin/") for line in lines]


def readme_follow_ups() -> list[str]:
    """The one shell block under the README's "After `make demo`" heading."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## After `make demo`\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README has an 'After `make demo`' section"
    block = re.search(r"```sh\n(.*?)```", section.group(1), re.S)
    assert block, "that section opens with a ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_demo_then_readme_follow_ups_work_as_written(tmp_path):
    commands = demo_commands()
    assert any(" run " in c for c in commands) and any(" export " in c for c in commands)
    follow_ups = readme_follow_ups()
    assert follow_ups[0] == "source .venv/bin/activate"
    assert {"kdsearch pareto", "kdsearch list"} <= set(follow_ups) and any(c.startswith("kdsearch export") for c in follow_ups)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the demo's folder: a checkout whose .venv is this one
    quick = [c.replace("--num-samples 24", "--num-samples 2") for c in commands]
    assert quick != commands, "the demo's run takes --num-samples 24"
    for command in (*quick, " && ".join(follow_ups)):
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()
    cards = list((tmp_path / "exports" / "demo").rglob("model_card.json"))
    assert cards, "the export wrote a model card"
