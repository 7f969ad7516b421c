"""The README's first Python block (the any-model path) runs as written, and does what it says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def first_python_block() -> str:
    text = README.read_text()
    match = re.search(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert match, "README.md has no python block"
    return match.group(1)


def test_readme_any_model_example_runs_verbatim():
    code = first_python_block()
    assert "trady.rank(" in code and "trady.Tuner(" in code  # the any-model path comes first
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    lines = out.getvalue().splitlines()
    epochs = [re.match(r"epoch (\d+): (\d+) of (\d+) budget units in (\d+) layers", line) for line in lines[:-1]]
    assert len(epochs) == 5 and all(epochs)
    for m in epochs:
        used, budget = int(m.group(2)), int(m.group(3))
        assert 0 < used <= budget  # the budget holds every epoch
    accuracy = float(re.match(r"test accuracy on digits 5-9: ([0-9.]+)", lines[-1]).group(1))
    assert accuracy > 0.5  # 5 classes: chance is 0.2
