#!/usr/bin/env bash
# Issue 10's GPU checks in one run, for a session whose task is lent a device:
#   here, once:  bash bench/gpu_checks.sh prepare   # megatron-core (pure Python) into .gpu/site, git-ignored
#   device:      run(command="bash bench/gpu_checks.sh", carry=[".gpu"], timeout_s=580)   # ~7 min on an H100
# There it installs alfred-train without dependencies (the image has torch, transformers, peft,
# safetensors, sentencepiece, pyarrow, ...), then runs, each under its own time limit:
#   pytest -m gpu                 CUDA-graph decode == eager and released, kernels, scoring on the GPU
#   bench/bench_gpu_decode.py     ~1.2B decode tok/s at batch 32 and 128 (128 + 512): before / eager /
#                                 CUDA graphs, as a fraction of the HBM floor
#   bench/bench_ppo.py            the PPO iteration split on a ~0.4B shape (goal: generation <= 50%), and
#                                 again with ppo.recompute_logprobs=false (same SFT and RM), its last
#                                 iteration profiled (logging.profile_step): top kernels per phase
# Every output is also written under $OUT (it comes back); copy the tables into bench/RESULTS.md.
# A smoke run of the plumbing on a CPU machine: QUICK=1 PY=.venv/bin/python bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  site=$(.venv/bin/python -c "import megatron.core as m, os; print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))")
  mkdir -p .gpu/site && rm -rf .gpu/site/megatron && cp -r "$site/megatron" .gpu/site/
  find .gpu -name __pycache__ -prune -exec rm -rf {} + ; find .gpu -name "*.so" -delete
  exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"; grep -qx /.gpu/ "$exclude" 2>/dev/null || echo /.gpu/ >>"$exclude"
  du -sh .gpu
  exit 0
fi
out=${OUT:-/tmp/gpu_checks}
py=${PY:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.gpu/site"
"$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.txt" 2>&1 \
  || { cat "$out/install.txt"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
if [ "${QUICK:-0}" = 1 ]; then
  decode=(--shape tiny --batches 4 --prompt-len 16 --new-tokens 16 --hbm-tbs 0.02)
  shape=(model.num_layers=2 model.hidden_size=64 model.max_seq_len=128)
  ppo=(ppo.max_new_tokens=16 ppo.min_new_tokens=16 ppo.rollouts_per_iter=8 ppo.rollout_micro_batch=8
       ppo.train_micro_batch=2)
else
  decode=()
  shape=(model.num_layers=8 model.hidden_size=2048 model.ffn_hidden_size=5632 model.num_attention_heads=16
         model.num_query_groups=4 model.max_seq_len=512)
  ppo=(ppo.max_new_tokens=256 ppo.min_new_tokens=256 ppo.rollouts_per_iter=64 ppo.rollout_micro_batch=64
       ppo.train_micro_batch=8)
fi
status=0
# the files that hold GPU tests (the others import boto3/moto/... at module level, not installed there);
# test_generation.py's in-process tests too: with CUDA there, they decode through CUDA graphs (continuous
# batching, sampling, log-probs against the scoring pass)
timeout 120 "$py" -m pytest -q -ra -m "gpu or not slow" tests/test_generation.py -p no:cacheprovider -o log_level=WARNING \
  2>&1 | grep -v DEBUG | tee "$out/pytest_generation.txt" || status=1
timeout 60 "$py" -m pytest -q -ra -m gpu tests/test_kernels.py tests/test_ppo_scoring.py tests/test_model_init.py \
  -p no:cacheprovider -o log_level=WARNING 2>&1 | grep -v DEBUG | tee "$out/pytest_gpu.txt" || status=1
timeout 220 "$py" bench/bench_gpu_decode.py "${decode[@]}" 2>&1 | tee "$out/decode.txt" || status=1
# the PPO split, then again from the same SFT and RM without the scoring pass's policy forward
# (the second run profiles its last iteration: each phase's top CUDA kernels, to see why scoring, four
# forwards, cost more than training, two forward + backward passes, in the eighth session)
timeout 260 "$py" bench/bench_ppo.py --iters 4 parallel.tp=1 "${ppo[@]}" \
  --then ppo.recompute_logprobs=false logging.profile_step=4 --model "${shape[@]}" 2>&1 | tee "$out/ppo.txt" || status=1
exit $status
