#!/usr/bin/env bash
# GPU-only checks and benchmarks, in one call on a lent GPU machine (see /work/.library/device):
# the entry point under torchrun with nccl, then tools/benchmark.py on the debug flavor (bf16 and
# fp32), on the 3b flavor (random weights, bf16, ZeRO-2) as it is, with FlexAttention for the packed
# documents (model.packed_attention=flex) and with train.compile, the GPU-only parity tests
# (FlexAttention's gradients, compiled units), and the data loader per worker. Needs the wheels in
# .whl/ (deepspeed, megatron-core, open_clip, webdataset, pytest and their missing deps). Results
# land in $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed, megatron.core, open_clip; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
common=(--set tracking.mlflow=false --set data.synthetic_dir=/tmp/synth_debug)

echo "== entry point, debug flavor, nccl"
timeout 240 torchrun --nproc_per_node 1 flamingo_dist/train.py --deepspeed ds_configs/zero2.json "${common[@]}" \
  --set tracking.run_dir="$OUT/debug_run" > "$OUT/train_debug.log" 2>&1; echo "exit $?"
grep -E "^step (1|20)/|done:|Error|error" "$OUT/train_debug.log" | head -5

for prec in bf16 fp32; do
  echo "== benchmark debug $prec"
  timeout 200 torchrun --nproc_per_node 1 tools/benchmark.py --deepspeed ds_configs/zero2.json "${common[@]}" \
    --set train.precision=$prec --warmup 5 --steps 20 --out "$OUT/bench_debug_$prec.json" > "$OUT/bench_debug_$prec.log" 2>&1
  echo "exit $?"; grep -E "tokens_per_s|mfu|step_time|memory" "$OUT/bench_debug_$prec.log"
done

if [ "${SKIP_BIG:-0}" != 1 ]; then
  echo "== benchmark 3b bf16 (random weights)"
  timeout 300 torchrun --nproc_per_node 1 tools/benchmark.py --deepspeed ds_configs/zero2.json \
    --set flavor=3b --set tracking.mlflow=false --set data.synthetic_dir=/tmp/synth_3b --set data.synthetic_num_docs=128 \
    --set train.micro_batch_size=8 --set train.activation_checkpointing=false --set data.num_workers=4 \
    --warmup 3 --steps 10 --out "$OUT/bench_3b_bf16.json" > "$OUT/bench_3b_bf16.log" 2>&1
  echo "exit $?"; tail -20 "$OUT/bench_3b_bf16.log"
fi

echo "== GPU parity: FlexAttention's compiled kernel (loss, gradients) against the masked path; compiled units"
timeout 300 python3 -m pytest -q -p no:cacheprovider "tests/test_packing.py::test_flex_attention_gives_the_masked_gradients_on_gpu" \
  "tests/test_packing.py::test_flex_attention_gives_the_masked_logits" > "$OUT/pytest_gpu.log" 2>&1
echo "exit $?"; tail -3 "$OUT/pytest_gpu.log"

echo "== packed-document attention, forward + backward: SDPA with the mask against FlexAttention's kernel"
timeout 120 python3 tools/bench_packed_attention.py --device cuda --backward --dtype bf16 \
  --out "$OUT/bench_packed_attention.json" > "$OUT/bench_packed_attention.log" 2>&1
echo "exit $?"; grep -E "median_ms|speedup|max_abs" "$OUT/bench_packed_attention.log"

if [ "${SKIP_BIG:-0}" != 1 ]; then
  for variant in "model.packed_attention=flex" "train.compile=true"; do
    name=${variant//[.=]/_}
    echo "== benchmark 3b bf16 with $variant"
    timeout 300 torchrun --nproc_per_node 1 tools/benchmark.py --deepspeed ds_configs/zero2.json \
      --set flavor=3b --set tracking.mlflow=false --set data.synthetic_dir=/tmp/synth_3b --set data.synthetic_num_docs=128 \
      --set train.micro_batch_size=8 --set train.activation_checkpointing=false --set data.num_workers=4 --set "$variant" \
      --warmup 5 --steps 10 --out "$OUT/bench_3b_bf16_$name.json" > "$OUT/bench_3b_bf16_$name.log" 2>&1
    echo "exit $?"; grep -E "tokens_per_s|mfu|step_time|memory" "$OUT/bench_3b_bf16_$name.log"
  done
fi

echo "== data loading per worker process (this machine's CPU)"
timeout 120 python3 tools/bench_data.py --num 256 --out "$OUT/bench_data.json" > "$OUT/bench_data.log" 2>&1
echo "exit $?"; grep -E "images_per_s|samples_per_s" "$OUT/bench_data.log"
