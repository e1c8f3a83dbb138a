"""The README's Python example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        scope = {}
        exec(compile(code, str(README), "exec"), scope)
    assert "Linear4bit" in capsys.readouterr().out  # the example prints the base layer's type
    layer = scope["layer"]
    assert layer.lora_A.grad is not None and layer.magnitude_delta.grad is not None
    assert all(not p.requires_grad or p.grad is not None for p in scope["model"].parameters())
