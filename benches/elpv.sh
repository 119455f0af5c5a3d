#!/usr/bin/env bash
# Real-data benchmark (not run in CI): ELPV solar cells, two product classes (mono, poly),
# with exactly the split in ../shared/benchmarks/elpv/ (see its README for the protocol).
# The data (CC BY-NC-SA 4.0) is downloaded at benchmark time into $BENCH_DIR and never
# committed. Backbone: pretrained EfficientNet-Lite0 ($BACKBONE names another with pinned
# weights, e.g. efficientnet_lite2; its models are named <backbone>-<tag>).
#
#   benches/elpv.sh [SEEDS]    (default "0 1 2")
#
# Trains `cras train` with its defaults (no tuning flags; $TRAIN_ARGS adds some, e.g.
# --paper) once per seed (the seed also draws the validation hold-out), evaluates each
# model on the test split (never used to choose anything), and prints per seed: the
# selected epoch and its validation AUROC, image AUROC per class and their mean, seconds
# per epoch and peak memory; then the mean and range over the seeds, and inference
# images/s of the first seed's model.
# HOLDOUT_SEED=N keeps seed N's validation hold-out for every seed (`--holdout-seed N`), so
# only the training's own randomness moves; its models are named h<N>s<seed>.
# REUSE=1 keeps a seed's model and report from an earlier run instead of training again.
# VAL_SLICE=N takes every Nth defective test image of each class (sorted by name, the
# first of each N) out of the test split into $BENCH_DIR/val-defects-N/<class>/ and trains
# with `--val-defect-images` on them: validation on real defects, test on the rest. Its
# models are named v<N><tag>; compare them with default models evaluated on the same rest
# (EVAL_ONLY=MODEL... evaluates existing bundles there).
# ADD_CLASS=1 also measures `cras add-class` with the first seed: train on mono alone and
# add poly, train on poly alone and add mono, each against the joint model's figure.
# About 20 minutes per seed and 10 per add-class case on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-"0 1 2"}
BENCH_DIR=${BENCH_DIR:-target/bench-elpv}
SPLIT=${ELPV_SPLIT:-../shared/benchmarks/elpv}
TRAIN_ARGS=${TRAIN_ARGS:-}
BACKBONE=${BACKBONE:-efficientnet_lite0}
TAG=seed
if [ -n "${HOLDOUT_SEED:-}" ]; then
    TRAIN_ARGS="$TRAIN_ARGS --holdout-seed $HOLDOUT_SEED"
    TAG="h${HOLDOUT_SEED}s"
fi
[ "$BACKBONE" = efficientnet_lite0 ] || TAG="$BACKBONE-$TAG"
mkdir -p "$BENCH_DIR"
if [ -z "${CRAS:-}" ]; then
    cargo build --release --quiet
    CRAS=target/release/cras
fi
"$CRAS" setup --backbone "$BACKBONE"
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
if [ -n "${VAL_SLICE:-}" ]; then
    ROOT="$BENCH_DIR/mvtec-v$VAL_SLICE"
    VAL_DIR="$BENCH_DIR/val-defects-$VAL_SLICE"
    TAG="v$VAL_SLICE$TAG"
    TRAIN_ARGS="$TRAIN_ARGS --val-defect-images $VAL_DIR"
fi
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
if [ -n "${VAL_SLICE:-}" ]; then
    rm -rf "$VAL_DIR"
    for cls in mono poly; do
        mkdir -p "$VAL_DIR/$cls"
        find "$ROOT/$cls/test/defect" -name '*.png' | sort | awk -v n="$VAL_SLICE" 'NR % n == 1' |
            while read -r f; do mv "$f" "$VAL_DIR/$cls/"; done
        echo "$cls: $(ls "$VAL_DIR/$cls" | wc -l) defect images moved to validation ($VAL_DIR)"
    done
fi
for cls in mono poly; do
    echo "$cls: train $(ls "$ROOT/$cls/train/good" | wc -l), test good $(ls "$ROOT/$cls/test/good" | wc -l), test defect $(ls "$ROOT/$cls/test/defect" | wc -l)"
done

# Peak memory comes from GNU time (Debian package `time`); without it, none is printed.
TIMER=()
[ -x /usr/bin/time ] && TIMER=(/usr/bin/time -v)

# train NAME CLASSES SEED: a bundle in $BENCH_DIR/NAME, its log in NAME.log.
train() {
    local name=$1 classes=$2 seed=$3
    echo "--- train $name (classes $classes, seed $seed)"
    # shellcheck disable=SC2086
    "${TIMER[@]}" "$CRAS" train --data "$ROOT" --classes "$classes" --backbone "$BACKBONE" \
        --seed "$seed" --work "$BENCH_DIR/work-$name" --out "$BENCH_DIR/$name" $TRAIN_ARGS \
        2> >(tee "$BENCH_DIR/$name.log" >&2)
}

# evaluate NAME: metrics.json in $BENCH_DIR/report-NAME (test split, after training).
evaluate() {
    "$CRAS" eval --model "$BENCH_DIR/$1" --data "$ROOT" --report "$BENCH_DIR/report-$1" | tail -n 4
}

if [ -n "${EVAL_ONLY:-}" ]; then
    for m in $EVAL_ONLY; do
        echo "--- $m on $ROOT"
        "$CRAS" eval --model "$BENCH_DIR/$m" --data "$ROOT" --report "$BENCH_DIR/report-$m-on-$(basename "$ROOT")" | tail -n 4
    done
    exit 0
fi

for seed in $SEEDS; do
    if [ -n "${REUSE:-}" ] && [ -f "$BENCH_DIR/report-$TAG$seed/metrics.json" ]; then
        echo "--- seed $seed: reusing $BENCH_DIR/$TAG$seed (REUSE is set)"
        continue
    fi
    rm -rf "${BENCH_DIR:?}/$TAG$seed"
    train "$TAG$seed" mono,poly "$seed"
    evaluate "$TAG$seed"
done

echo "--- summary (test figures; each model chose its epoch on validation only)"
python3 - "$BENCH_DIR" "$TAG" $SEEDS <<'PY'
import json, re, sys
root, tag, seeds = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for s in seeds:
    y = open(f"{root}/{tag}{s}/model.yaml").read()
    sel = int(re.search(r"selected_epoch: (\d+)", y).group(1))
    vals = [float(x) for x in re.findall(r"validation_auroc: ([0-9.eE-]+)", y)]
    secs = [float(x) for x in re.findall(r"seconds: ([0-9.]+)", y)]
    m = json.load(open(f"{root}/report-{tag}{s}/metrics.json"))
    per = {c["class"]: c["image_auroc"] for c in m["classes"]}
    log = open(f"{root}/{tag}{s}.log").read()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    peak = f"{int(rss.group(1)) / 1024:.0f}" if rss else "-"
    rows.append((s, sel, vals[sel - 1], per["mono"], per["poly"], m["mean"]["image_auroc"],
                 sum(secs) / len(secs), peak))
print("| seed | selected epoch (validation) | mono | poly | mean | s / epoch | peak MiB |")
print("|---|---|---|---|---|---|---|")
for s, sel, v, mono, poly, mean, spe, peak in rows:
    print(f"| {s} | {sel} ({v:.4f}) | {mono:.3f} | {poly:.3f} | {mean:.3f} | {spe:.0f} | {peak} |")
means = [r[5] for r in rows]
print(f"mean image AUROC over seeds {' '.join(seeds)}: {sum(means) / len(means):.3f} "
      f"(range {min(means):.3f} - {max(means):.3f}, spread {max(means) - min(means):.3f})")
PY

if [ -n "${ADD_CLASS:-}" ]; then
    first=${SEEDS%% *}
    for pair in mono:poly poly:mono; do
        base=${pair%%:*} add=${pair##*:}
        rm -rf "$BENCH_DIR/only-$base" "$BENCH_DIR/only-$base+$add"
        train "only-$base" "$base" "$first"
        echo "--- add-class $add to only-$base"
        "${TIMER[@]}" "$CRAS" add-class --model "$BENCH_DIR/only-$base" --data "$ROOT" --class "$add" \
            2> >(tee "$BENCH_DIR/add-$add.log" >&2)
        evaluate "only-$base+$add"
    done
    echo "--- add-class against training with both classes (seed $first, test image AUROC)"
    python3 - "$BENCH_DIR" "$TAG$first" <<'PY'
import json, re, sys
root, joint_name = sys.argv[1], sys.argv[2]
def per(name):
    m = json.load(open(f"{root}/report-{name}/metrics.json"))
    return {c["class"]: c["image_auroc"] for c in m["classes"]}
joint = per(joint_name)
print("| model | mono | poly | mean | add-class s |")
print("|---|---|---|---|---|")
print(f"| trained on both | {joint['mono']:.3f} | {joint['poly']:.3f} | {(joint['mono'] + joint['poly']) / 2:.3f} | - |")
for base, add in (("mono", "poly"), ("poly", "mono")):
    p = per(f"only-{base}+{add}")
    y = open(f"{root}/only-{base}+{add}/model.yaml").read()
    secs = float(re.search(r"added_classes:(?:.|\n)*?seconds: ([0-9.]+)", y).group(1))
    print(f"| {base}, {add} added | {p['mono']:.3f} | {p['poly']:.3f} | {(p['mono'] + p['poly']) / 2:.3f} | {secs:.0f} |")
PY
fi

echo "--- inference images/s (cras infer, batch 1 and 8, all test images)"
MODEL="$BENCH_DIR/$TAG${SEEDS%% *}"
mapfile -t IMAGES < <(find "$ROOT"/*/test -name '*.png' | sort)
for b in 1 8; do
    start=$(date +%s.%N)
    "$CRAS" infer --model "$MODEL" --batch "$b" "${IMAGES[@]}" > "$BENCH_DIR/infer-b$b.jsonl" 2>/dev/null
    end=$(date +%s.%N)
    python3 -c "n=${#IMAGES[@]}; t=$end-$start; print(f'batch $b: {n} images in {t:.1f} s = {n/t:.1f} images/s (model load included)')"
done
