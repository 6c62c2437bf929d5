#!/usr/bin/env bash
# One GPU session's worth of checks: the CUDA tests (compiled Triton), the compile gate
# (kernel_resources.py), the benchmarks, and the memory plan's GPU cells. Results (test log, JSONL rows,
# tables) land in the folder given as argument.
#
#   bash benchmarks/gpu_suite.sh "$OUT"               # tests, compile gate, benchmarks, 3 steps of the TL;DR
#                                                     # recipe: under 9 minutes (+2.5 for the recipe at most)
#   bash benchmarks/gpu_suite.sh "$OUT" memory        # the memory cells alone, about 5 minutes (7 at most)
#   bash benchmarks/gpu_suite.sh "$OUT" "tests bench recipe memory"   # all four: more than one 10-minute command
#
# The memory part measures, on this GPU, one training step of hypo_fast's trainer on a Llama-3-8B-shaped
# model built from its config (random weights, nothing downloaded): LoRA HyPO at 2048 tokens per
# sequence (the 24 GB recipe's shape of step), then 1.5B LoRA and full fine-tuning (ZeRO-3) cells, each
# beside the estimate of benchmarks/memory_8b.py (its rows and tables in memory_8b.jsonl / .txt).
#
# The GPU image has torch/triton/transformers but no liger-kernel or deepspeed: wheels for them may be
# carried in ./wheelhouse (ignored by git; copy ../shared/wheelhouse-py312/*.whl there) and are
# installed into a private folder, leaving the image's own packages alone.
set -uo pipefail
out=$(realpath -m "${1:-${OUT:-benchmarks/results/gpu-run}}")
parts=" ${2:-tests bench recipe} "
mkdir -p "$out"
cd "$(dirname "$0")/.."
site=/tmp/hypo_fast_site
mkdir -p "$site"
if compgen -G "wheelhouse/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" wheelhouse/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# editable, as a developer would: tests import hypo_fast.kernels through the hypo_fast/kernels link; this
# also builds the native CPU ops against the image's torch when it has cmake and a compiler
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$out/machine.txt"

if [[ $parts == *" tests "* ]]; then
  echo "== CUDA tests"
  timeout 180 python3 -m pytest -q -x -p no:cacheprovider -k "not compile_gate" tests/kernels tests/ops tests/test_sampling.py \
    tests/test_fused_losses.py 2>&1 \
    | tee "$out/tests.log" | tail -15

  echo "== compile gate: every launched kernel variant compiled for sm_80/sm_90a/sm_100a with this image's triton"
  # predicted (registers, spills, MMA kind) beside the measured times below; its rows carry this triton's version
  timeout 150 python3 benchmarks/kernel_resources.py --results-dir "$out" -j "$(nproc)" 2>&1 \
    | tee "$out/kernel_resources.txt" | tail -12
fi

if [[ $parts == *" bench "* ]]; then
  echo "== benchmarks (each capped so that tests, compile gate and benchmarks stay under 9 minutes)"
  for bench in bench_linear_logprobs:70 bench_linear_token_kl:40 bench_sample_head:50 bench_dpo_loss:60 bench_generate:50 bench_step:60 memory_8b:40; do
    name=${bench%%:*}
    timeout "${bench##*:}" python3 "benchmarks/$name.py" --device cuda --results-dir "$out" 2>&1 | tee "$out/$name.txt"
  done
fi

if [[ $parts == *" memory "* ]]; then
  echo "== memory: one step's measured peak on this GPU beside the estimate (random weights, nothing downloaded)"
  # each cell in fresh processes, 180 s at most; the most telling first (the 8B-shaped LoRA HyPO step)
  timeout 420 python3 benchmarks/memory_8b.py --device cuda --results-dir "$out" --timeout 180 \
    --measure lora-llama3-8b-2048 full-llama-1.5b-2048 lora-llama-1.5b-2048 2>&1 | tee "$out/memory_cells.txt"
  timeout 60 python3 benchmarks/memory_8b.py --device cuda --results-dir "$out" 2>&1 | tee "$out/memory_8b.txt"
fi

if [[ $parts == *" recipe "* ]]; then
  echo "== TL;DR recipe: 3 steps of hypo_fast/examples/tldr_pythia1b4_hypo.yaml on a random-weight Pythia-1.4B-shaped model"
  timeout 150 python3 -m hypo_fast.examples.tldr smoke --shape pythia-1.4b --steps 3 --out "$out/tldr-smoke" 2>&1 \
    | tee "$out/tldr_smoke.txt" | tail -8
fi
echo "suite done; results in $out"
