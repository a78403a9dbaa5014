#!/usr/bin/env bash
# GPU-only checks and benchmarks in one call on a lent GPU machine (the device tool, see
# /work/.library/device), most important first, all inside BUDGET_S seconds (default 500, so a
# call with timeout_s 600 returns everything; a step that would start past the budget is skipped
# and says so):
#   1. the GPU parity tests: FlexAttention's compiled kernel (loss and gradients) against the
#      masked path, compiled (xattn, LM layer) units against eager
#   2. the 3b flavor (random weights, ViT-L-14, xattn every layer, micro-batch 8, ZeRO-2, bf16):
#      step time, tokens/s, images/s, peak memory, frozen-aware MFU (tools/benchmark.py)
#   3. ours against OpenFlamingo on the same model, bf16, on the GPU (tools/bench_openflamingo.py)
#   4. the 3b flavor with train.compile, then with model.packed_attention=flex
#   5. packed-document attention alone, forward + backward (tools/bench_packed_attention.py)
#   6. the entry point under torchrun with nccl (debug flavor), the debug benchmark, the data loader
# Before the call, here: `bash tools/gpu_wheels.sh` (fills .whl/) and `make
# .bench/openflamingo/open_flamingo`; the run carries [".whl", ".bench/openflamingo"]. The summary
# is printed; every log and JSON goes to $OUT/gpu_results.tgz, rewritten after each step (the
# device tool brings back at most 8 files); record the results in docs/benchmarks.md.
set -uo pipefail
FINAL=${OUT:-gpu_out}
OUT=/tmp/gpu_results
BUDGET_S=${BUDGET_S:-500}
mkdir -p "$OUT" "$FINAL"
pack() { tar -czf "$FINAL/gpu_results.tgz" -C "$OUT" . 2>/dev/null; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed, megatron.core, open_clip; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

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
big=(--set flavor=3b --set tracking.mlflow=false --set data.synthetic_dir=/tmp/synth_3b --set data.synthetic_num_docs=128
     --set train.micro_batch_size=8 --set train.activation_checkpointing=false --set data.num_workers=4)
summary() { grep -hsE "tokens_per_s|mfu|step_time|memory|images_per_s" "$OUT/$1" | head -8; }  # -s: a skipped step has no log

step "GPU parity tests" 150 pytest_gpu.log python3 -m pytest -q -p no:cacheprovider \
  "tests/test_packing.py::test_flex_attention_gives_the_masked_gradients_on_gpu" \
  "tests/test_model.py::test_compiled_units_give_the_same_loss_and_gradients[cuda-False]" \
  "tests/test_model.py::test_compiled_units_give_the_same_loss_and_gradients[cuda-True]"
tail -3 "$OUT/pytest_gpu.log"

step "3b bf16" 150 bench_3b_bf16.log torchrun --nproc_per_node 1 tools/benchmark.py --deepspeed ds_configs/zero2.json \
  "${big[@]}" --warmup 3 --steps 10 --out "$OUT/bench_3b_bf16.json"
summary bench_3b_bf16.log

step "ours against OpenFlamingo, bf16, GPU" 150 bench_openflamingo.log python3 tools/bench_openflamingo.py --device cuda \
  --openflamingo .bench/openflamingo --work /tmp/of_work --precision bf16 --pairs 2 --warmup 3 --steps 10 \
  --out "$OUT/bench_openflamingo.json"
grep -sE "samples/s|ratio" "$OUT/bench_openflamingo.log"

for variant in "train.compile=true" "model.packed_attention=flex"; do
  name=${variant//[.=]/_}
  step "3b bf16 with $variant" 150 "bench_3b_$name.log" torchrun --nproc_per_node 1 tools/benchmark.py \
    --deepspeed ds_configs/zero2.json "${big[@]}" --set "$variant" --warmup 5 --steps 10 --out "$OUT/bench_3b_$name.json"
  summary "bench_3b_$name.log"
done

step "packed-document attention, forward + backward" 60 bench_packed_attention.log python3 tools/bench_packed_attention.py \
  --device cuda --backward --dtype bf16 --out "$OUT/bench_packed_attention.json"
grep -sE "median_ms|speedup|max_abs" "$OUT/bench_packed_attention.log"

common=(--set tracking.mlflow=false --set data.synthetic_dir=/tmp/synth_debug)
step "entry point, debug flavor, nccl" 90 train_debug.log torchrun --nproc_per_node 1 flamingo_dist/train.py \
  --deepspeed ds_configs/zero2.json "${common[@]}" --set tracking.run_dir="$OUT/debug_run"
grep -sE "^step (1|20)/|done:|Error|error" "$OUT/train_debug.log" | head -5

step "benchmark debug bf16" 60 bench_debug_bf16.log torchrun --nproc_per_node 1 tools/benchmark.py \
  --deepspeed ds_configs/zero2.json "${common[@]}" --set train.precision=bf16 --warmup 5 --steps 20 \
  --out "$OUT/bench_debug_bf16.json"
summary bench_debug_bf16.log

step "data loading per worker process (this machine's CPU)" 60 bench_data.log python3 tools/bench_data.py --num 256 \
  --out "$OUT/bench_data.json"
grep -sE "images_per_s|samples_per_s" "$OUT/bench_data.log"
pack
echo "== done at ${SECONDS}s; logs and JSON in $FINAL/gpu_results.tgz"
