#!/usr/bin/env bash
# The accelerator check (issues 5 and 17) in one call on a GPU machine; each part is time-boxed,
# so the whole fits a short lease, and logs go to OUTDIR:
#   kernels  the Triton kernel and decode-graph tests, compiled on the device;
#   step     engine decode throughput (benchmarks/bench_step.py) at 1 / 32 / 256 streams, bfloat16,
#            with decode graphs and without (capture time and memory from the engine's log), dummy
#            weights in the default model's shape and in Llama-3-8B's, and the default shape over
#            an int8 KV cache;
#   parity   the float32 logit tests against transformers and the Jiutian reference (both on the
#            CPU) with pagoda's model, KV pool and kernels on the device, and the KV dtype tests;
#   serving  HTTP serving (benchmarks/bench_serving.py) at 1 / 32 / 256 clients on the default
#            model's shape, when a tokenizer directory is given (dummy weights carry none);
#   profile  the step's host time against its device time, batch 32, graphs on and off.
#
#   bash benchmarks/gpu_check.sh OUTDIR [TOKENIZER_DIR]
# PARTS picks parts (default all, in the order above). DEVICE, BATCHES and SHAPES override cuda,
# "1 32 256" and both shapes (a dry run on a CPU: DEVICE=cpu BATCHES="1 2" SHAPES=...).
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
parts=" ${PARTS:-kernels step parity serving profile} "
want() { [[ $parts == *" $1 "* ]]; }
step() {  # step TIMEOUT ARGS...: bench_step's JSON lines and the capture lines
    local limit=$1; shift
    timeout "$limit" $py benchmarks/bench_step.py --device "$dev" --dtype bfloat16 --load-format dummy \
        --steps 64 "$@" 2>&1 | tee -a "$out/step.log" | grep -E "^\{|captur|graphs take|Error|error:" | tee -a "$out/step.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no gpu')"; } 2>&1 | tee "$out/gpu.txt"

if want kernels; then
    echo "== kernels on $dev"
    timeout 150 $py -m pytest -q -p no:cacheprovider -x tests/unit/test_triton_kernels.py \
        tests/unit/test_graph_runner.py 2>&1 | tail -25 | tee "$out/kernels.txt"
fi

if want step; then
    for shape in $shapes; do
        echo "== bench_step $shape (graphs)"
        step 150 --model-config "$shape" --batch $batches
    done
    for shape in $shapes; do
        echo "== bench_step $shape --disable-graphs"
        step 120 --model-config "$shape" --batch $batches --steps 16 --disable-graphs
    done
    echo "== bench_step $smol, int8 KV cache"
    step 100 --model-config "$smol" --batch $batches --kv-cache-dtype int8
fi

if want parity; then
    echo "== parity on $dev"
    PAGODA_TEST_DEVICE=$dev timeout 150 $py -m pytest -q -p no:cacheprovider tests/unit/test_model_parity.py \
        tests/unit/test_jiutian.py tests/unit/test_kv_cache_dtype.py 2>&1 | tail -15 | tee "$out/parity.txt"
fi

if want serving && [ -n "$tok" ]; then
    echo "== serving $smol"
    $py -m pagoda.cli serve --device "$dev" --dtype bfloat16 --load-format dummy --model-config "$smol" \
        --tokenizer "$tok" --port 8011 --max-running-requests 256 >"$out/server.log" 2>&1 &
    server=$!
    for _ in $(seq 90); do  # up to ~2 min for the server to answer, unless it died
        kill -0 $server 2>/dev/null || break
        $py -c "import httpx; httpx.get('http://127.0.0.1:8011/health').raise_for_status()" 2>/dev/null && break
        sleep 1
    done
    timeout 150 $py benchmarks/bench_serving.py --base-url http://127.0.0.1:8011/v1 \
        --concurrency $batches --input-len 128 --output-len 128 2>&1 | tail -12 | tee "$out/serving.txt"
    kill $server
    tail -5 "$out/server.log"
fi

if want profile; then
    echo "== step profile, batch 32, $smol"
    for graphs in "" --disable-graphs; do
        timeout 90 $py benchmarks/bench_step.py --device "$dev" --dtype bfloat16 --load-format dummy \
            --model-config "$smol" --batch 32 --steps 16 --profile $graphs >"$out/profile$graphs.txt" 2>&1
        grep -E "tok_s|time total" "$out/profile$graphs.txt"
    done
fi
