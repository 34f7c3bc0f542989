"""The README's "Use from Python" example runs as written (in a fresh folder)."""
from __future__ import annotations

import re

from conftest import REPO


def _example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Use from Python\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block in the README's 'Use from Python' section"
    return match.group(1)


def test_readme_use_from_python_example_runs(tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(tmp_path)
    code = _example()
    assert "compress.prune(" in code and "compress.load(" in code
    exec(compile(code, "README.md (Use from Python)", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "MACs kept" in out and "layers hold 2:4" in out
    assert (tmp_path / "ckpt" / "arch.json").is_file() and (tmp_path / "model.onnx").is_file()
