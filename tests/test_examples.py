"""Examples are runnable documentation: run every command of each example README's sh block."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = sorted((ROOT / "examples").glob("*/README.md"))


def readme_commands(readme: Path) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", readme.read_text(), flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


@pytest.mark.parametrize("readme", READMES, ids=[r.parent.name for r in READMES])
def test_readme_commands_run(readme, tmp_path):
    commands = readme_commands(readme)
    assert commands, f"{readme} has no sh commands"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for command in commands:
        proc = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"`{command}` failed:\n{proc.stdout}\n{proc.stderr}"
    outputs = [word for cmd in commands for word in shlex.split(cmd) if word.endswith(".onnx")]
    assert all((tmp_path / out).is_file() for out in outputs)
