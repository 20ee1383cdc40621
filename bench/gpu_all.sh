#!/usr/bin/env bash
# Every GPU measurement of the project, in one or two device calls. From the repo root, with .whl,
# .whl-ray and .commit carried and the anchors copied to .anchors/:
#   bash bench/gpu_all.sh [tune|pdl|single|multi|all]   results and logs land in $OUT (commit them to bench/results)
# tune:   (after a kernel change) the gemv tuner's table for both models (bench/tune.py), one model per
#         GPU; `tune MODEL [DTYPES]` one model on a one-GPU machine (with row counts up to 64 timed, GPT-Neo
#         fp16 took 2 min, int8 more than 3.5: a dtype or two a call); commit $OUT/<GPU>-triton-*.json to
#         kernels/tuned/ before `single`, whose loads then time nothing;
# pdl:    (~5 min) batch 1 and 32 with and without programmatic dependent launch (RAYSPEED_PDL, kernels/pdl.py),
#         GPT-Neo fp16/int8 on GPU 0 and the Llama shape fp16 on GPU 1, HF eager beside the first of each pair;
# single: GPT-Neo 2.7B (fp16, int8, int4, 256 requests in flight) and, given a second GPU, the Llama-2-7B
#         shape (fp16, bf16, int8) at the same time, then the CUDA-only tests (`pytest -m gpu`) on the second
#         GPU, then the compiled-torch anchors beside them (~9 min;
#         quantized tiles missing from kernels/tuned/ are timed at load); `single llama`: the Llama shape and
#         its anchor on a one-GPU machine;
# ab VAR [model] [dtypes]: (~6 min) batch 1 and 32 with the switch VAR=0 (HF eager beside) then VAR=1, e.g.
#         `ab RAYSPEED_PDL`; then the CUDA-only tests;
# multi:  (2 GPUs) TP=2 over NCCL for GPT-Neo (with the symmetric-memory all-reduce as a variant), then the
#         Serve app with one TP=2 replica (~9 min).
# Each step has its own time limit, so a slow step costs its own results only.
. bench/gpu_setup.sh || exit 1
export RAYSPEED_COMMIT=$(cat .commit 2>/dev/null || echo unknown) ANCHOR_BATCHES=1,8,32
phase=${1:-all}
out=${OUT:-bench/results}; mkdir -p "$out"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
run() { local limit=$1 log=$2; shift 2; timeout "$limit" "$@" > "$out/$log.log" 2>&1; echo "$log: exit $?"; }
# a `tune` call earlier on the same (still warm) machine leaves its tables in /tmp/tune-<model>: later phases
# use them instead of kernels/tuned/, so one lease can tune and measure before the table is committed
tuned() { [ -d /tmp/tune-$1 ] && echo RAYSPEED_GEMV_SHIPPED=0 RAYSPEED_CACHE=/tmp/tune-$1; }

if [ "$phase" = tune ] && [ -n "$2" ]; then          # one GPU, one model: `tune neo int8`, `tune llama`
  dtypes=${3:-$([ "$2" = neo ] && echo float16,int8,int4 || echo float16,bfloat16,int8)}
  run 540 tune-$2 env RAYSPEED_CACHE=/tmp/tune-$2 python3 bench/tune.py --model $2 --dtypes $dtypes --out "$out"
elif [ "$phase" = tune ]; then
  run 540 tune-neo env CUDA_VISIBLE_DEVICES=0 RAYSPEED_CACHE=/tmp/tune-neo python3 bench/tune.py --model neo \
      --dtypes float16,int8,int4 --out "$out" &
  if [ "$gpus" -ge 2 ]; then
    run 540 tune-llama env CUDA_VISIBLE_DEVICES=1 RAYSPEED_CACHE=/tmp/tune-llama python3 bench/tune.py --model llama \
        --dtypes float16,bfloat16,int8 --out "$out" &
  fi
  wait
fi
if [ "$phase" = pdl ]; then
  for model in neo llama; do
    gpu=$([ $model = neo ] && echo 0 || echo 1); dtypes=$([ $model = neo ] && echo float16,int8 || echo float16)
    [ $gpu = 1 ] && [ "$gpus" -lt 2 ] && continue
    { run 280 $model-nopdl env CUDA_VISIBLE_DEVICES=$gpu RAYSPEED_PDL=0 $(tuned $model) python3 bench/decode.py \
          --model $model --dtypes $dtypes --batches 1,32 --tag=-nopdl --out "$out"
      run 200 $model-pdl env CUDA_VISIBLE_DEVICES=$gpu RAYSPEED_PDL=1 $(tuned $model) python3 bench/decode.py \
          --model $model --dtypes $dtypes --batches 1,32 --no-hf --tag=-pdl --out "$out"; } &
  done
  wait
fi
if [ "$phase" = ab ]; then
  var=$2 model=${3:-neo} dtypes=${4:-float16,int8,int4}
  run 280 $model-${var}0 env $var=0 $(tuned $model) python3 bench/decode.py --model $model --dtypes $dtypes \
      --batches 1,32 --tag=-${var}0 --out "$out"
  run 280 $model-${var}1 env $var=1 $(tuned $model) python3 bench/decode.py --model $model --dtypes $dtypes \
      --batches 1,32 --no-hf --tag=-${var}1 --out "$out"
  run 300 gputests python3 -m pytest -m gpu -q -p no:cacheprovider tests/actors
fi
if [ "$phase" = single ] && [ "$2" = llama ]; then    # one GPU: the Llama shape's turn
  run 400 llama env $(tuned llama) python3 bench/decode.py --model llama --dtypes float16,bfloat16,int8 \
      --batches 1,8,32 --out "$out"
  run 150 anchor-llama python3 .anchors/anchor_compiled.py llama fp16
elif [ "$phase" = single ] || [ "$phase" = all ]; then
  { run 400 neo env CUDA_VISIBLE_DEVICES=0 $(tuned neo) python3 bench/decode.py --model neo \
        --dtypes float16,int8,int4 --batches 1,8,32 --concurrent 256 --out "$out"
    [ "$gpus" -lt 2 ] && run 300 gputests python3 -m pytest -m gpu -q -p no:cacheprovider tests/actors; } &
  if [ "$gpus" -ge 2 ]; then
    { run 330 llama env CUDA_VISIBLE_DEVICES=1 $(tuned llama) python3 bench/decode.py --model llama \
          --dtypes float16,bfloat16,int8 --batches 1,8,32 --out "$out"
      run 300 gputests env CUDA_VISIBLE_DEVICES=1 python3 -m pytest -m gpu -q -p no:cacheprovider tests/actors; } &
  fi
  wait
  run 150 anchor-neo env CUDA_VISIBLE_DEVICES=0 python3 .anchors/anchor_compiled.py neo fp16 int8 &
  if [ "$gpus" -ge 2 ]; then
    run 150 anchor-llama env CUDA_VISIBLE_DEVICES=1 python3 .anchors/anchor_compiled.py llama fp16 &
  fi
  wait
fi
if { [ "$phase" = multi ] || [ "$phase" = all ]; } && [ "$gpus" -ge 2 ]; then
  # 2026-11-27 on 2xH200 the TP=2 ranks hung at exit in destroy_process_group (live CUDA graphs holding
  # NCCL work, pytorch#115388; fixed in 78314fd); the ranks still print stages and dump stacks if stuck
  run 350 tp env TP_BENCH_STALL_S=90 python3 bench/tp_bench.py --models neo --symm --batches 1,32 --out "$out"
  run 210 serve python3 bench/serve_gpu.py --out "$out"
fi
for log in "$out"/*.log; do
  echo "== $(basename "$log" .log)"; grep -v "loading weights\|Warning" "$log" | tail -n 6 | cut -c1-400
done
