"""The README's Python example runs as written and prints the planted tag counts."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "SAETrainer(" in b)
    assert len(example.strip().splitlines()) <= 16
    proc = subprocess.run(
        [sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert counts["ft_only"] == 4 and counts["base_only"] == 4
    assert (tmp_path / "my_crosscoder" / "cfg.json").exists()
