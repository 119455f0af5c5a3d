#!/usr/bin/env bash
# Real-data benchmark (not run in CI): ELPV solar cells, two product classes (mono, poly),
# with exactly the split in ../shared/benchmarks/elpv/ (see its README for the protocol).
# The data (CC BY-NC-SA 4.0) is downloaded at benchmark time into $BENCH_DIR and never
# committed. Backbone: pretrained EfficientNet-Lite0 with its TF-Lite input scaling,
# image size 288, embedding width 384.
#
#   benches/elpv.sh [EPOCHS]        (default 10; extra train options via $TRAIN_ARGS)
#
# Prints per-class and mean image AUROC (cras eval), training seconds per epoch (from
# the bundle's provenance) and inference images/s (cras infer over the test images).
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-10}
BENCH_DIR=${BENCH_DIR:-target/bench-elpv}
SPLIT=${ELPV_SPLIT:-../shared/benchmarks/elpv}
mkdir -p "$BENCH_DIR"
if [ -z "${CRAS:-}" ]; then
    cargo build --release --quiet
    CRAS=target/release/cras
fi
"$CRAS" setup --backbone efficientnet_lite0

if [ ! -d "$BENCH_DIR/elpv/data" ]; then
    echo "--- downloading elpv-dataset==1.0.0.post1 (CC BY-NC-SA 4.0)"
    python3 -m pip download --no-deps --disable-pip-version-check -q -d "$BENCH_DIR/dl" elpv-dataset==1.0.0.post1
    mkdir -p "$BENCH_DIR/elpv"
    archive=$(ls "$BENCH_DIR"/dl/elpv*dataset* | head -n1)
    case "$archive" in
        *.whl|*.zip) python3 -m zipfile -e "$archive" "$BENCH_DIR/elpv/unpacked" ;;
        *.tar.gz) mkdir -p "$BENCH_DIR/elpv/unpacked" && tar -xzf "$archive" -C "$BENCH_DIR/elpv/unpacked" ;;
    esac
    data=$(dirname "$(find "$BENCH_DIR/elpv/unpacked" -name labels.csv | head -n1)")
    ln -sfn "$(realpath "$data")" "$BENCH_DIR/elpv/data"
fi
DATA=$(realpath "$BENCH_DIR/elpv/data")

echo "--- MVTec layout from the split lists"
ROOT="$BENCH_DIR/mvtec"
rm -rf "$ROOT"
for cls in mono poly; do
    for part in train_good:train/good test_good:test/good test_defect:test/defect; do
        list="$SPLIT/${cls}_${part%%:*}.txt"
        dest="$ROOT/$cls/${part##*:}"
        mkdir -p "$dest"
        while read -r rel; do
            [ -n "$rel" ] && ln -s "$DATA/$rel" "$dest/$(basename "$rel")"
        done < "$list"
    done
done
for cls in mono poly; do
    echo "$cls: train $(ls "$ROOT/$cls/train/good" | wc -l), test good $(ls "$ROOT/$cls/test/good" | wc -l), test defect $(ls "$ROOT/$cls/test/defect" | wc -l)"
done

MODEL="$BENCH_DIR/model"
echo "--- train ($EPOCHS epochs)"
/usr/bin/time -v "$CRAS" train --data "$ROOT" --classes mono,poly --backbone efficientnet_lite0 \
    --normalization tflite --image-size 288 --embed-dim 384 --epochs "$EPOCHS" \
    --out "$MODEL" ${TRAIN_ARGS:-} 2> >(tee "$BENCH_DIR/train.log" >&2)
grep -E "Maximum resident set size" "$BENCH_DIR/train.log" || true

echo "--- eval"
"$CRAS" eval --model "$MODEL" --data "$ROOT" --report "$BENCH_DIR/report"

echo "--- training time per epoch (s)"
python3 - "$MODEL/model.yaml" <<'PY'
import re, sys
secs = [float(x) for x in re.findall(r"seconds: ([0-9.]+)", open(sys.argv[1]).read())]
print(f"{len(secs)} epochs, mean {sum(secs)/max(len(secs),1):.1f} s, min {min(secs):.1f}, max {max(secs):.1f}")
PY

echo "--- inference images/s (cras infer, batch 1 and 8, all test images)"
mapfile -t IMAGES < <(find "$ROOT"/*/test -name '*.png' | sort)
for b in 1 8; do
    start=$(date +%s.%N)
    "$CRAS" infer --model "$MODEL" --batch "$b" "${IMAGES[@]}" > "$BENCH_DIR/infer-b$b.jsonl" 2>/dev/null
    end=$(date +%s.%N)
    python3 -c "n=${#IMAGES[@]}; t=$end-$start; print(f'batch $b: {n} images in {t:.1f} s = {n/t:.1f} images/s (model load included)')"
done
