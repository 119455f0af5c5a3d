#!/usr/bin/env bash
# The GPU path on an NVIDIA machine, in one run: build, parity, speed, training.
#
#   benches/gpu/check.sh [OUT_DIR]        (default target/gpu-check)
#
# x86_64 with an NVIDIA driver (r580+ for CUDA 13) and network to PyPI and NVIDIA's
# index; or a Jetson with JetPack (set ORT_DYLIB_PATH to NVIDIA's onnxruntime-gpu build
# for the JetPack and skip the downloads with CHECK_OFFLINE=1). Needs ../shared/fixtures.
# Writes OUT_DIR/report.md: every figure with the command that made it. Each step is
# independent: a failing one is reported and the next runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/gpu-check}
mkdir -p "$OUT"
REPORT="$OUT/report.md"
FIX=${CRAS_FIXTURES:-../shared/fixtures}
CRAS=target/release/cras
: >"$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }
step() { say ""; say "## $1"; say '```'; say "\$ ${*:2}"; "${@:2}" 2>&1 | tee -a "$REPORT"; local rc=${PIPESTATUS[0]}; say '```'; say "exit $rc"; return 0; }

say "# GPU check $(date -u +%FT%TZ) on $(uname -m)"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 | tee -a "$REPORT"

step "build (gpu feature)" cargo build --release --features gpu
if [ "${CHECK_OFFLINE:-0}" != 1 ]; then
    step "onnxruntime GPU build and CUDA libraries" "$CRAS" setup --gpu --backbone efficientnet_lite0
    # TensorRT 10 for CUDA 13 from NVIDIA's index (not on PyPI as a wheel).
    python3 -m venv "$OUT/trt" && "$OUT/trt/bin/pip" install -q tensorrt-cu13-libs==10.16.1.11 \
        --extra-index-url https://pypi.nvidia.com 2>&1 | tail -2 | tee -a "$REPORT"
    TRT_LIB=$(find "$OUT/trt" -name 'libnvinfer.so.10' -printf '%h\n' | head -1)
    export LD_LIBRARY_PATH="${TRT_LIB:-}:${LD_LIBRARY_PATH:-}"
fi

# The lite0 fixture as a bundle (the wrn50 timing below uses random weights).
LITE0=$OUT/lite0
step "lite0 bundle" "$CRAS" import-reference --backbone efficientnet_lite0 \
    --checkpoint "$FIX/lite0-d384/ckpt_best_0.pth" --centers "$FIX/lite0-d384/center.pth" \
    --classes alpha,beta --no-bn-replay --out "$LITE0"
IMAGES=$(find "$FIX/lite0-d384/images" -name '*.png' -path '*test*' | sort)

# GPU against CPU on the fixture images: max abs score and map differences.
for provider in cuda tensorrt; do
    for p in cpu $provider; do
        # shellcheck disable=SC2086
        "$CRAS" infer --model "$LITE0" --provider $p --out "$OUT/infer-$provider-$p" $IMAGES \
            >"$OUT/infer-$provider-$p.jsonl" 2>>"$OUT/infer.log"
    done
    say ""; say "## $provider vs cpu (lite0, fixture images)"
    python3 - "$OUT/infer-$provider-cpu" "$OUT/infer-$provider-$provider" <<'PY' | tee -a "$REPORT"
import json, sys, pathlib, struct
a, b = map(pathlib.Path, sys.argv[1:])
def scores(d):
    return [json.loads(l)["score"] for l in open(str(d) + ".jsonl")]
def npy(p):
    raw = p.read_bytes(); n = struct.unpack("<H", raw[8:10])[0]
    return struct.unpack("<%df" % ((len(raw) - 10 - n) // 4), raw[10 + n:])
sa, sb = scores(a), scores(b)
print("images", len(sa), "max score diff", max(abs(x - y) for x, y in zip(sa, sb)) if sa and len(sa) == len(sb) else "n/a")
md = 0.0
for m in a.rglob("*.map.npy"):
    o = b / m.relative_to(a)
    if o.exists():
        md = max(md, max(abs(x - y) for x, y in zip(npy(m), npy(o))))
print("max map diff", md)
PY
done

step "engine prepare, fp32" "$CRAS" engine prepare --model "$LITE0" --images $IMAGES
step "engine prepare, fp16" "$CRAS" engine prepare --model "$LITE0" --images $IMAGES --fp16

# Engine alone: lite0-d384 and the paper's wrn50 at batch 1, 8, 32.
for provider in cpu cuda tensorrt; do
    step "engine latency ($provider)" env BENCH_PROVIDER=$provider BENCH_BATCHES=1,8,32 \
        cargo bench --features gpu --bench engine_latency -- lite0-d384
    step "engine latency ($provider, wrn50)" env BENCH_PROVIDER=$provider BENCH_BATCHES=1,8,32 \
        cargo bench --features gpu --bench engine_latency -- wrn50
done

# cras run with the device-memory test source against the same line in host memory:
# 30 s each on CUDA (policy require, frames stage on the GPU). The log must not say the
# camera fell back; /metrics gives the frames judged and the stage latencies.
run_daemon() { # $1 template, $2 label
    local dir="$OUT/run-$2" port=$((18000 + RANDOM % 1000))
    mkdir -p "$dir"
    cat >"$dir/config.yaml" <<YAML
device: {site: gpu-check, id: box1}
model:
  bundle: $LITE0
  provider: cuda
  gpu: {policy: require}
  preprocess: graph
  thresholds: {alpha: {image: 0.5}, beta: {image: 0.5}}
cameras:
  - {id: cam1, pipeline: $1, params: {width: 1920, height: 1080, fps: 30}, max_fps: 30}
mqtt: {url: "mqtt://127.0.0.1:1", client_id: gpu-check}
spool: {dir: $dir/spool}
http: {listen: "127.0.0.1:$port"}
YAML
    timeout 40 "$CRAS" run --config "$dir/config.yaml" --pipelines pipelines >"$dir/log" 2>&1 &
    sleep 35
    curl -s "127.0.0.1:$port/metrics" >"$dir/metrics" || true
    wait
    say "$2: $(grep -c 'device frames' "$dir/log") fallback line(s); $(grep -E '^cras_frames_processed_total' "$dir/metrics")"
    grep -E '^cras_stage_latency_ms_(sum|count)' "$dir/metrics" | tee -a "$REPORT"
}
say ""; say "## cras run: device-memory frames against host frames (1080p test pattern, CUDA)"
say '```'
run_daemon test-pattern-cuda device
run_daemon test-pattern host
say '```'

# One training epoch on the synthetic line, GPU against CPU (needs nvcc: docs/cuda.md).
step "synthetic line" "$CRAS" synth --out "$OUT/syn" --classes 2 --train 40 --test-good 8 --test-defect 8 --size 256 --seed 1
step "build (cuda feature, training)" cargo build --release --features cuda --target-dir target/cuda
for dev in cpu cuda; do
    step "one epoch on $dev" /usr/bin/time -v target/cuda/release/cras train --data "$OUT/syn" \
        --backbone efficientnet_lite0 --epochs 1 --device $dev --out "$OUT/train-$dev"
done
say ""; say "report: $REPORT"
