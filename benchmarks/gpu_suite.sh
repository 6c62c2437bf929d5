#!/usr/bin/env bash
# One GPU session's worth of checks, about 9 minutes (each step is capped; 11 if every cap were reached): the
# CUDA tests (compiled Triton), the compile gate (kernel_resources.py), then the benchmarks. Results (test log,
# JSONL rows, tables) land in the folder given as argument.
#
#   bash benchmarks/gpu_suite.sh "$OUT"
#
# The GPU image has torch/triton/transformers but no liger-kernel or deepspeed: wheels for them may be
# carried in ./wheelhouse (ignored by git; copy ../shared/wheelhouse-py312/*.whl there) and are
# installed into a private folder, leaving the image's own packages alone.
set -uo pipefail
out=$(realpath -m "${1:-${OUT:-benchmarks/results/gpu-run}}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
site=/tmp/hypo_fast_site
mkdir -p "$site"
if compgen -G "wheelhouse/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" wheelhouse/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# editable, as a developer would: tests import hypo_fast.kernels through the package_dir mapping; this
# also builds the native CPU ops against the image's torch when it has cmake and a compiler
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/machine.txt"

echo "== CUDA tests"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider -k "not compile_gate" tests/kernels tests/ops \
  tests/test_fused_losses.py 2>&1 \
  | tee "$out/tests.log" | tail -15

echo "== compile gate: every launched kernel variant compiled for sm_80/sm_90a/sm_100a with this image's triton"
# predicted (registers, spills, MMA kind) beside the measured times below; its rows carry this triton's version
timeout 150 python3 benchmarks/kernel_resources.py --results-dir "$out" -j "$(nproc)" 2>&1 \
  | tee "$out/kernel_resources.txt" | tail -12

echo "== benchmarks (each capped so that the whole suite stays under 9 minutes)"
for bench in bench_linear_logprobs:70 bench_linear_token_kl:40 bench_sample_head:50 bench_dpo_loss:60 bench_generate:50 bench_step:60 memory_8b:40; do
  name=${bench%%:*}
  timeout "${bench##*:}" python3 "benchmarks/$name.py" --device cuda --results-dir "$out" 2>&1 | tee "$out/$name.txt"
done
echo "suite done; results in $out"
