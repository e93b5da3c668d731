#!/usr/bin/env bash
# One device-machine call of the GPU runbook (BENCHMARKS.md "GPU", Runbook), each step time-capped so
# the call ends inside the tool's 10 minutes. Run there from the repo root, after bench/device_prep.sh
# here, with `carry: [".whl", ".vocab"]`. In priority order (30 device-minutes do not cover them all; the
# first four give both goals' figures, on tuned kernels, in about 25):
#
#   bash bench/device_round.sh correctness   # kernels.check, the CUDA tests, bench.moe_variants (~4 min)
#   bash bench/device_round.sh tune          # kernels.tune, 120b: MoE and decode linears at batch 1, the 1k/1k
#                                            #   run's 512, then 8, 64, 256 and 1,024 (~7 min)
#   bash bench/device_round.sh tunedecode    # kernels.tune, 120b at 1, 8 and 16: the MoE (gemv steps to 1 KB, W2's
#                                            #   combine-tail chunks), the gate, attention, linears at 1; 20b (~8 min)
#   bash bench/device_round.sh bench         # bench.gpu, 120b: decode (batch 1: the first goal), prefill, profiles
#   bash bench/device_round.sh throughput    # a whole 120b 1k/1k (1,024 requests): the second goal's figure
#   bash bench/device_round.sh tuneprefill   # kernels.tune: 120b's MoE at the 8,192-token prefill chunk, then
#                                            #   20b's decode shapes
#   bash bench/device_round.sh throughput8   # the 1k/1k on an fp8 KV cache, all 1,024 at once (one wave)
#   bash bench/device_round.sh bench20       # bench.gpu for gpt-oss-20b
#
# Everything lands in $OUT (the device tool brings it back): log.txt, the JSON, and configs/ after a
# tune (the merged file). Copy configs/*.json into kernels/configs/ here before the next call.
set -uo pipefail
cd "$(dirname "$0")/.."
step=${1:?"usage: bench/device_round.sh correctness|tune|tunedecode|bench|throughput|tuneprefill|throughput8|bench20"}
case $step in correctness|tune|tunedecode|bench|throughput|tuneprefill|throughput8|bench20) ;;
    *) echo "device_round: unknown step $step (correctness, tune, tunedecode, bench, throughput, tuneprefill, throughput8 or bench20)" >&2
       exit 2 ;; esac
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
L=$OUT/log.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_round: pip install of .whl/ failed (run bench/device_prep.sh here, carry .whl)" | tee -a "$L"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TIKTOKEN_ENCODINGS_BASE=$PWD/.vocab PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
t0=$(date +%s)
el() { echo "== $(($(date +%s) - t0)) s: $*" | tee -a "$L"; }
run() { local cap=$1; shift; el "$*"; timeout "$cap" "$@" 2>&1 | grep -v Warn | tee -a "$L" | tail -60; }

case $step in
correctness)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee -a "$L"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$L"
    run 120 python3 -m kernels.check  # session 27: 65 s
    # session 27: the first 6 took 124 s; a run of all 11 behind 15 short tests had not finished the last at 300 s
    run 330 python3 -m pytest -q -x -p no:cacheprovider \
        tests/kernels/test_decode_graphs.py::test_graph_replay_matches_eager_on_cuda \
        tests/kernels/test_decode_graphs.py::test_ep_rank_static_decode_captures_on_cuda \
        tests/kernels/test_dispatch.py::test_runner_replays_on_cuda \
        tests/engine/test_overlap.py::test_overlap_equals_lockstep_on_cuda \
        tests/engine/test_kv_budget.py::test_fraction_sizes_the_pool_on_cuda \
        tests/deployments/test_gpu_group.py::test_gpu_group_serves_on_the_gpu \
        tests/kernels/test_pdl.py::test_self_test_passes_on_cuda \
        tests/kernels/test_pdl.py::test_engine_logits_are_the_same_bits_with_and_without_pdl \
        tests/engine/test_kv_fp8.py::test_torch_and_triton_paths_agree_on_an_fp8_pool_on_cuda
    run 100 python3 -m bench.moe_variants --model gpt-oss-120b --tokens 1,2,4,8,32,64
    ;;
tune)
    # merged into the committed kernels/configs/<GPU>.json (the attention entries there stay), then copied out.
    # The goals' steps first: batch 1, and 512, a 1k/1k run's decode on a bf16 cache (untuned, it borrows the
    # 256 bucket's tiles, kernels.tuned.REACH; its sweep reaches BLOCK_M 32, a busy expert's rows); 1,024 (the
    # fp8 cache's one wave) last. ~1,600 candidates; a shape cut by --max-seconds keeps its committed entry.
    run 500 python3 -m kernels.tune --kernels moe,linear --models gpt-oss-120b --batches 1,512,8,64,256,1024 \
        --max-seconds 420
    mkdir -p "$OUT/configs" && cp kernels/configs/*.json "$OUT/configs/"
    ;;
tunedecode)
    # session 28's batch-1 changes, both unmeasured: the gemv sweep's K steps up to 1 KB (bytes in flight, not
    # tile shape, set its bandwidth at batch 1) and the gate family (one pass over a row, the few pairs aligned in
    # registers); session 29's W2 combine-tail chunks at batch 1 (TAIL_G: one round of L2 loads or six), timed as
    # served now (with the residual and the next norm); attention, never tuned (at batch 1 its default is 64
    # programs on 132 SMs; now up to 32 splits); session 29's one-row GEMV linears (qkv, o, unembedding).
    # 120b's decode buckets up to the gate's 16 rows, its linears at 1, then 20b's with what is left of the call
    run 540 bash -c 'python3 -m kernels.tune --kernels moe,gate,attn --models gpt-oss-120b --batches 1,8,16 \
        --max-seconds 290; python3 -m kernels.tune --kernels linear --models gpt-oss-120b --batches 1 \
        --max-seconds 60; python3 -m kernels.tune --kernels moe,gate --models gpt-oss-20b --batches 1,8 \
        --max-seconds 90'
    mkdir -p "$OUT/configs" && cp kernels/configs/*.json "$OUT/configs/"
    ;;
tuneprefill)
    # a 120b 1k/1k run's 8,192-token prefill chunks (~60 s of that run: 1M prompt tokens at session 9's 17.5k
    # tok/s), whose sweep has 4 BLOCK_M (32..256, up to 128 accumulators a thread) on two paths, and the DQ
    # tiles (kernels/moe_dq.py) at 128 and 256; then 20b's decode shapes with what is left of the call
    run 540 bash -c 'python3 -m kernels.tune --kernels moe --models gpt-oss-120b --batches 8192; \
        python3 -m kernels.tune --kernels moe,linear --models gpt-oss-20b --batches 1,8,64,256 --max-seconds 200'
    mkdir -p "$OUT/configs" && cp kernels/configs/*.json "$OUT/configs/"
    ;;
bench)
    # no throughput window here: a short one only ever held the first prompts' prefill (session 9: 75 s, no
    # request finished); the throughput step runs the whole 1k/1k
    run 540 python3 -m bench.gpu --models gpt-oss-120b --phases decode,prefill,profile --profile-batches 1,64,256 \
        --out "$OUT"
    ;;
bench20)
    run 540 python3 -m bench.gpu --models gpt-oss-20b --throughput-seconds 60 --out "$OUT"
    ;;
throughput)
    # the bench step's 75 s window is mostly the first prompts' prefill; the goal is a whole run
    # (bench.gpu --update-benchmarks merges this row into that step's table, marked)
    run 570 python3 -m bench.gpu --models gpt-oss-120b --phases throughput --throughput-seconds 480 --out "$OUT"
    ;;
throughput8)
    # 1,024 bf16 1k/1k sequences do not fit beside 120b's weights (two waves of 512, the second starting as the
    # first ends); on an fp8 cache they all do: one wave, twice the decode batch (a row of its own, marked fp8)
    run 570 python3 -m bench.gpu --models gpt-oss-120b --phases throughput --throughput-seconds 480 \
        --kv-cache-dtype fp8 --concurrency 1024 --out "$OUT"
    ;;
esac
el done
