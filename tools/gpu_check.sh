#!/usr/bin/env bash
# GPU-only checks and benchmarks in one call on a lent GPU machine (the device tool, see
# /work/.library/device), most important first, all inside BUDGET_S seconds (default 540, for a
# call with timeout_s 600; a step that would start past the budget is skipped and says so):
#   parity  the GPU parity tests: FlexAttention's kernel (head_dim 16) against the masked path,
#           compiled units against eager on CUDA, our ZeRO step against DeepSpeed's on the GPU, and
#           one host read per step on the GPU (a copy to the host counts there)
#   sweep   3b, ZeRO-2, bf16, no activation checkpointing where it fits: micro-batch 8/16/32 x
#           sequence 256/512/1024 (tools/bench_shapes.py: step time, tokens/s, frozen-aware MFU,
#           peak memory; the target is >= 45 % at the best shape, >= 30 % at 8x256) and a profiler
#           summary of 3 steps of 8x256 (device time per phase, kernels, busy time, host syncs)
#   of      ours against OpenFlamingo on the same GPU, bf16: the small shape and the 3b shape
#           (tools/bench_openflamingo.py; targets x1.2 and x1.5 samples/s)
#   9b      9b, ZeRO-2, bf16 at 8x256 and 16x512 (its 7B LM drawn on the GPU)
#   compile 3b with train.compile=true at 8x256 and 16x512 (keep it only if >= x1.15 eager)
#   zero3   3b under ZeRO-3 at 8x256
#   plan    the capacity planner's peaks against the measured ones of sweep, 9b and zero3
#           (tools/plan.py --against; the target is within 15 %)
#   entry   the user's entry point under the `deepspeed` launcher with nccl (debug flavor)
# ONLY="9b compile" runs those steps alone (a second call, when the first ran out of budget).
# SMOKE=1 runs the whole script here on the CPU with the debug flavor and tiny shapes (the venv on
# PATH, no wheels): it checks the script and the tools' arguments before a GPU call is spent.
# Before the call, here: `bash tools/gpu_wheels.sh` (fills .whl/), `make .bench/openflamingo/open_flamingo`
# and the debug flavor's backbones (data/backbones: any test run builds them); the run carries
# [".whl", ".bench/openflamingo", "data/backbones"]. The summary is printed; every log and JSON
# goes to $OUT/gpu_results.tgz, rewritten after each step (the device tool brings back at most 8
# files); record the results in docs/benchmarks.md.
set -uo pipefail
FINAL=${OUT:-gpu_out}
OUT=/tmp/gpu_results
BUDGET_S=${BUDGET_S:-540}
ONLY=${ONLY:-parity sweep of 9b compile zero3 plan entry}
mkdir -p "$OUT" "$FINAL"
pack() { tar -czf "$FINAL/gpu_results.tgz" -C "$OUT" . 2>/dev/null; }
if [ -n "${SMOKE:-}" ]; then  # the flavors and shapes of each step, for a dry run on the CPU
  F3B=debug F9B=debug S3B="2x32 4x64" SBIG="2x32" SCOMPILE="2x32" OF_SHAPES=small PROFILE=2 WORKERS=1 DEVICE=cpu
  export PATH=$PWD/.venv/bin:$PATH
else
  F3B=3b F9B=9b S3B="8x256 16x256 32x256 8x512 16x512 32x512 8x1024 16x1024 32x1024" SBIG="8x256 16x512"
  SCOMPILE="8x256 16x512" OF_SHAPES="small 3b" PROFILE=3 WORKERS=8 DEVICE=cuda
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH  # the wheels' bin/ holds the `deepspeed` launcher
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed, megatron.core, open_clip; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

wanted() { [[ " $ONLY " == *" $1 "* ]]; }
# step NAME CAP_S LOG CMD...: runs CMD with a timeout of min(CAP_S, what is left of the budget),
# output to $OUT/LOG; skipped when less than 30 s are left
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left}s of the budget left"; return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (at ${SECONDS}s, limit ${cap}s)"
  timeout "$cap" "$@" > "$OUT/$log" 2>&1
  echo "exit $?"
  pack
}
big=(--set tracking.mlflow=false --set data.synthetic_num_docs=128 --set train.activation_checkpointing=false
     --set data.num_workers=$WORKERS)
shapes() { grep -hsE "^ *[0-9]+x[0-9]+ +AC|^best|^profile|out of memory" "$OUT/$1"; }  # -s: a skipped step has no log

if wanted parity; then
  step "GPU parity tests" 150 pytest_gpu.log python3 -m pytest -q -p no:cacheprovider \
    "tests/test_packing.py::test_flex_attention_gives_the_masked_gradients_on_gpu" \
    "tests/test_model.py::test_compiled_units_give_the_same_loss_and_gradients[cuda-False]" \
    "tests/test_model.py::test_compiled_units_give_the_same_loss_and_gradients[cuda-True]" \
    "tests/test_zero_step.py::test_the_fused_step_updates_as_deepspeeds_and_skips_together[zero2-dp1]" \
    "tests/test_zero_step.py::test_one_host_read_per_optimizer_step[zero2-dp1]"
  tail -3 "$OUT/pytest_gpu.log"
fi

if wanted sweep; then
  step "3b ZeRO-2 bf16: micro-batch x sequence" 200 bench_3b_shapes.log python3 tools/bench_shapes.py \
    --deepspeed ds_configs/zero2.json --set flavor=$F3B --set data.synthetic_dir=/tmp/synth_$F3B "${big[@]}" \
    --shapes $S3B --profile-steps $PROFILE --out "$OUT/bench_3b_shapes.json"
  shapes bench_3b_shapes.log
fi

if wanted of; then
  for shape in $OF_SHAPES; do
    step "ours against OpenFlamingo, bf16, GPU, $shape shape" 120 "bench_openflamingo_$shape.log" \
      python3 tools/bench_openflamingo.py --device $DEVICE --shape "$shape" --openflamingo .bench/openflamingo \
      --work "/tmp/of_work_$shape" --precision bf16 --pairs 1 --warmup 3 --steps 10 \
      --out "$OUT/bench_openflamingo_$shape.json"
    grep -sE "samples/s|ratio" "$OUT/bench_openflamingo_$shape.log"
  done
fi

if wanted 9b; then
  step "9b ZeRO-2 bf16" 120 bench_9b_shapes.log python3 tools/bench_shapes.py --deepspeed ds_configs/zero2.json \
    --set flavor=$F9B --set data.synthetic_dir=/tmp/synth_$F9B "${big[@]}" --shapes $SBIG \
    --out "$OUT/bench_9b_shapes.json"
  shapes bench_9b_shapes.log
fi

if wanted compile; then
  step "3b bf16 with train.compile=true" 150 bench_3b_compile.log python3 tools/bench_shapes.py \
    --deepspeed ds_configs/zero2.json --set flavor=$F3B --set data.synthetic_dir=/tmp/synth_$F3B "${big[@]}" \
    --set train.compile=true --shapes $SCOMPILE --warmup 3 --out "$OUT/bench_3b_compile.json"
  shapes bench_3b_compile.log
fi

if wanted zero3; then
  step "3b ZeRO-3 bf16" 90 bench_3b_zero3.log python3 tools/bench_shapes.py --deepspeed ds_configs/zero3.json \
    --set flavor=$F3B --set data.synthetic_dir=/tmp/synth_$F3B "${big[@]}" --shapes ${SBIG%% *} \
    --out "$OUT/bench_3b_zero3.json"
  shapes bench_3b_zero3.log
fi

if wanted plan; then
  step "planned against measured peaks" 60 plan_against.log python3 tools/plan.py --against \
    $(ls "$OUT"/bench_3b_shapes.json "$OUT"/bench_9b_shapes.json "$OUT"/bench_3b_zero3.json 2>/dev/null)
  cat "$OUT/plan_against.log" | tail -15
fi

if wanted entry; then
  step "entry point under the deepspeed launcher, debug flavor, nccl" 90 train_debug.log deepspeed --num_gpus 1 \
    flamingo_dist/train.py --deepspeed ds_configs/zero2.json --set tracking.mlflow=false \
    --set data.synthetic_dir=/tmp/synth_debug --set tracking.run_dir="$OUT/debug_run"
  grep -sE "^step (1|20)/|done:|Error|error" "$OUT/train_debug.log" | head -5
fi
pack
echo "== done at ${SECONDS}s; logs and JSON in $FINAL/gpu_results.tgz"
