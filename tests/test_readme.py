"""The README's Python example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 3, "README's python examples: the layer, PEFT patched, a qdora model in SFTTrainer"
    scopes = []
    for code in blocks:
        scopes.append({})
        exec(compile(code, str(README), "exec"), scopes[-1])
    out = capsys.readouterr().out
    assert "Linear4bit" in out  # the first example prints the base layer's type
    assert "150 DoRA layers computed by qdora" in out  # SmolLM2: 30 layers x 5 targets
    assert "['adapter_config.json', 'adapter_model.safetensors']" in out
    scope = scopes[0]
    layer = scope["layer"]
    assert layer.lora_A.grad is not None and layer.magnitude_delta.grad is not None
    assert all(not p.requires_grad or p.grad is not None for p in scope["model"].parameters())
