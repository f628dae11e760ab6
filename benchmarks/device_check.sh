#!/usr/bin/env bash
# The prepared GPU check (benchmarks/RESULTS.md section 3): ONE device call of at most ~9 minutes, most
# valuable first, every step under its own time limit, results written to $OUT as they come.
#
#   here, once:  bash benchmarks/device_check.sh --prepare /work/shared/data/cifar10   (writes device_data/)
#   here:        bash benchmarks/device_check.sh --dry-run   (CPU, toy sizes, ray/mlflow/pydantic blocked)
#   device:      run(command="bash benchmarks/device_check.sh", timeout_s=560, carry=["device_data"])
#
# Steps (seconds of limit): 1 machine facts (20); 2 gpu_suite correctness on cifar_resnet110 (noise
# contract incl. Philox fused == eager, fp32 (TF32 off) vs bf16 agreement rate) (130); 3 gpu_suite
# certify + worker at n0 + n = 100 + 100,000 for cifar_resnet110 (ours, reference at batch 400, FLOP
# floor) (100); 4 the same for resnet50 (170); 5 train_step resnet50 Gaussian k1/k4 vs ADRE_REG k4 (60);
# 6 train_step cifar_resnet110 Gaussian k1/k8 vs ADRE_REG k8 (50). Total <= 530 s; what a step did not
# finish is missing from $OUT/gpu_results.json, and $OUT/log.txt says which step stopped.
# Afterwards, here: copy $OUT/gpu_results.json to benchmarks/gpu_results.json, paste the Markdown that
# log.txt holds into RESULTS.md section 3, commit. Never write a figure that was not measured.
set -u -o pipefail
cd "$(dirname "$0")/.."
MODE=device
case "${1:-}" in
  --prepare)
    SRC=${2:?usage: --prepare CIFAR10_PARQUET_DIR}
    mkdir -p device_data/cifar10
    python - "$SRC" <<'PY'
import sys
import pyarrow.parquet as pq
src = sys.argv[1]
for split, step in (("train", 5), ("test", 10)):  # rows are sorted by class: a stride keeps every class
    table = pq.read_table(f"{src}/{split}.parquet")
    pq.write_table(table.take(list(range(0, table.num_rows, step))), f"device_data/cifar10/{split}.parquet")
    print(split, table.num_rows // step, "rows")
PY
    exit $? ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --prepare DIR]" >&2; exit 2 ;;
esac

OUT=${OUT:-$(mktemp -d /tmp/device_check.XXXXXX)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
RESULTS="$OUT/gpu_results.json"
DATA=device_data/cifar10
if [ "$MODE" = dry ]; then
  export PYTHONPATH="$PWD/benchmarks/offline:$PYTHONPATH"  # no ray, mlflow, pydantic: as on the device
  [ -f "$DATA/test.parquet" ] || DATA=${ADRE_CIFAR10_DIR:-../shared/data/cifar10}
  SUITE="--smoke"; MODELS1=small_cnn; MODELS2=small_cnn; TRAIN="--smoke"
  SCALE=${SCALE:-10}  # a shared CPU at toy sizes is slower than the GPU at full sizes
else
  SUITE="--quick"; MODELS1=cifar_resnet110; MODELS2=resnet50; TRAIN=""
  SCALE=1
fi

step() {  # step NAME LIMIT_S COMMAND...: runs it under its limit, logs, never stops the script
  local name=$1 limit=$(($2 * SCALE)); shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T) : $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name rc=$rc $(date -u +%T)" | tee -a "$LOG"
}

step facts 20 bash -c "nvidia-smi 2>&1 | head -15; $PY -c 'import torch, sys; print(sys.version); \
print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\")'"
step correctness 130 $PY benchmarks/gpu_suite.py $SUITE --only correctness --models "$MODELS1" \
  --data-dir "$DATA" --out "$RESULTS" --repeat 2
step certify_cifar 100 $PY benchmarks/gpu_suite.py $SUITE --only certify,worker --models "$MODELS1" \
  --data-dir "$DATA" --out "$RESULTS" --repeat 2
step certify_imagenet 170 $PY benchmarks/gpu_suite.py $SUITE --only certify,worker --models "$MODELS2" \
  --data-dir "$DATA" --out "$RESULTS" --repeat 2
step train_imagenet 60 $PY benchmarks/train_step.py --suite imagenet $TRAIN \
  --methods gaussian_k1,gaussian_k4,adre_reg_k4 --out "$RESULTS"
step train_cifar 50 $PY benchmarks/train_step.py --suite cifar $TRAIN \
  --methods gaussian_k1,gaussian_k8,adre_reg_k8 --out "$RESULTS"
echo "results: $RESULTS" | tee -a "$LOG"
