#!/usr/bin/env bash
# Issue 3's GPU figures in one run on one GPU: bf16 autocast + torch.compile tokens/s and MFU of our
# model against Hugging Face LlamaForCausalLM at the one-GPU profile's shape (d12, ~135M parameters)
# and at ~480M (d20), seq 2048, batch 16 (bench/train_step.py, both models compiled, fused AdamW).
# Writes bench/results/train_step_gpu.txt. Four compilations (two models, two shapes) and 15 steps per
# model and shape: a few minutes on an H100.
#
#   bench/gpu.sh                    # the project's .venv (`make install` on a machine with CUDA)
#   PYTHON=python3 bench/gpu.sh     # a python3 that has torch and transformers
#
# lmforge's configs also need pydantic. Where that python3 lacks it and nothing can be fetched, bring
# the wheels (pinned in constraints.txt) in .whl/ from a machine with PyPI; this script installs them:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "bench/gpu.sh: $PYTHON has no pydantic and .whl/ holds no wheels (fix: see this script's header)" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/lmforge-site .whl/*.whl
  export PYTHONPATH=/tmp/lmforge-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>/dev/null || true
export PYTHONUNBUFFERED=1
"$PYTHON" bench/train_step.py --device cuda --dtype bf16 --compile --seq 2048 --batch 16 \
  --warmup 3 --repeats 11 --configs d12 d20 --out bench/results/train_step_gpu.txt
