#!/usr/bin/env bash
# The CUDA check of issue 5, in one call on a GPU machine (each part time-boxed, logs in OUTDIR):
#   1. model parity on the GPU: the float32 logit tests against transformers and the Jiutian
#      reference (both computed on the CPU), with pagoda's model, KV pool and kernels on cuda,
#      and the KV-cache dtype tests (bf16 and int8 pages) on the default device;
#   2. engine decode throughput (benchmarks/bench_step.py) at 1 / 32 / 256 streams, bfloat16,
#      with decode graphs and without (their capture time and memory from the engine's log),
#      dummy weights in the default model's shape (also over an int8 KV cache) and in
#      Llama-3-8B's;
#   3. serving through HTTP (benchmarks/bench_serving.py) at 1 / 32 / 256 clients on the default
#      model's shape, when a tokenizer directory is given (dummy weights carry none).
#
#   bash benchmarks/gpu_check.sh OUTDIR [TOKENIZER_DIR]
# DEVICE, BATCHES and SHAPES override cuda, "1 32 256" and both shapes (a dry run on a CPU).
set -u
out=${1:?usage: gpu_check.sh OUTDIR [TOKENIZER_DIR]}
tok=${2:-}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
dev=${DEVICE:-cuda}
batches=${BATCHES:-1 32 256}
smol=benchmarks/configs/smollm2-135m.json
shapes=${SHAPES:-$smol benchmarks/configs/llama3-8b.json}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

echo "== parity on $dev"
PAGODA_TEST_DEVICE=$dev timeout 150 $py -m pytest -q -p no:cacheprovider \
    tests/unit/test_model_parity.py tests/unit/test_jiutian.py tests/unit/test_kv_cache_dtype.py 2>&1 | tail -15 \
    | tee "$out/parity.txt"

for shape in $shapes; do
    for graphs in "" --disable-graphs; do
        echo "== bench_step $shape ${graphs:-(graphs)}"
        timeout 200 $py benchmarks/bench_step.py --device "$dev" --dtype bfloat16 --load-format dummy \
            --model-config "$shape" --batch $batches --steps 64 $graphs 2>&1 \
            | grep -E "^\{|captured|graphs take" | tee -a "$out/step.txt"
    done
done
echo "== bench_step $smol, int8 KV cache"
timeout 200 $py benchmarks/bench_step.py --device "$dev" --dtype bfloat16 --kv-cache-dtype int8 --load-format dummy \
    --model-config "$smol" --batch $batches --steps 64 2>&1 | grep -v "^generating" | tail -6 | tee -a "$out/step.txt"

if [ -n "$tok" ]; then
    echo "== serving $smol"
    $py -m pagoda.cli serve --device "$dev" --dtype bfloat16 --load-format dummy --model-config "$smol" \
        --tokenizer "$tok" --port 8011 --max-running-requests 256 >"$out/server.log" 2>&1 &
    server=$!
    for _ in $(seq 90); do  # up to ~2 min for the server to answer, unless it died
        kill -0 $server 2>/dev/null || break
        $py -c "import httpx; httpx.get('http://127.0.0.1:8011/health').raise_for_status()" 2>/dev/null && break
        sleep 1
    done
    timeout 180 $py benchmarks/bench_serving.py --base-url http://127.0.0.1:8011/v1 \
        --concurrency $batches --input-len 128 --output-len 128 2>&1 | tail -12 | tee "$out/serving.txt"
    kill $server
    tail -5 "$out/server.log"
fi

echo "== step profile, batch 32, $smol"
for graphs in "" --disable-graphs; do  # the step's host time against its GPU time
    timeout 120 $py benchmarks/bench_step.py --device "$dev" --dtype bfloat16 --load-format dummy \
        --model-config "$smol" --batch 32 --steps 16 --profile $graphs >"$out/profile$graphs.txt" 2>&1
    grep -E "tok_s|time total" "$out/profile$graphs.txt"
done
