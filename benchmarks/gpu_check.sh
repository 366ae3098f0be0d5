#!/usr/bin/env bash
# One prepared GPU check: every GPU path and figure of the project in one short run (issue 13).
#
#   benchmarks/gpu_check.sh                      # on a CUDA machine: full settings (steps 0-5 took 333 s on an H100)
#   benchmarks/gpu_check.sh --device cpu --quick # the same steps on tiny settings (the test suite runs this)
#
# Prints JSON lines (one per measurement, each tagged with "check") and appends them to
# $OUT/gpu_check.jsonl when OUT is set. Steps: set-up (./.venv from the repository, packages from the
# registries only), the CUDA-parametrised tests, pre-training steps with and without AMP next to the
# reference-style step, registration (in process and the command line end to end) against ANTs SyN
# on the CPU, segmentation inference of a 512x512x300 volume with and without AMP, and a short
# fine-tuning run in steps per second, a cohort's registrations batched 1 to 16 at a time (5b), and
# last a longer pre-training on the atlas task of `segmentation.py compare`, checked by registering
# held-out pairs (whether the Z-matching heads learn with more steps than a CPU affords). Any failing
# step stops the script with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

RESULTS=""
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    RESULTS="$OUT/gpu_check.jsonl"
    : > "$RESULTS"
fi

# Every JSON line a step prints goes to stdout and to $RESULTS, tagged with the step's name.
run_step() {
    local name="$1"; shift
    local start=$SECONDS
    echo "== $name: $*" >&2
    "$@" | PY_STEP="$name" "$PY" -c '
import json, os, sys
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        print(json.dumps({"check": os.environ["PY_STEP"], **row}), flush=True)
' | tee -a "${RESULTS:-/dev/null}"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        echo "{\"check\": \"$name\", \"failed\": true, \"exit\": $status}" | tee -a "${RESULTS:-/dev/null}"
        exit "$status"
    fi
    echo "{\"check\": \"$name\", \"wall_s\": $((SECONDS - start))}" | tee -a "${RESULTS:-/dev/null}"
}

# 0. set-up: a fresh environment from the repository (keeps an existing .venv). Where the machine's
# Python already has a (CUDA) PyTorch, the environment sees it instead of installing another.
# GVSL_PYTHON names a ready interpreter instead (one whose CUDA PyTorch lives in its own virtual
# environment, which --system-site-packages would not see), with gvsl and its packages importable.
if [ -n "${GVSL_PYTHON:-}" ]; then
    PY="$GVSL_PYTHON"
else
    if [ ! -x .venv/bin/python ]; then
        if "${PYTHON:-python3}" -c "import torch" 2>/dev/null; then
            "${PYTHON:-python3}" -m venv --system-site-packages .venv
        fi
        scripts/bootstrap.sh test >&2
    fi
    PY=.venv/bin/python
fi
if [ "$QUICK" = 0 ]; then
    "$PY" -m pip install --quiet antspyx >&2 || echo "antspyx not installed: ANTs rows are skipped" >&2
fi
run_step device "$PY" -c '
import json, sys, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": cuda, "requested": sys.argv[1],
                  "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "bf16": bool(cuda and torch.cuda.is_bf16_supported())}))
if sys.argv[1] == "cuda" and not cuda:
    sys.exit("gpu_check: --device cuda, but this PyTorch sees no CUDA GPU")
' "$DEVICE"

if [ "$QUICK" = 1 ]; then
    CROP="32 32 32"; WIDTH=4; STEPS=2; SIZE="64 64 48"; WINDOW=32; SEG_WIDTH=4
    CASES="same"; FT="--cases 2 --width 4 --crop 32 32 32 --pretrain-steps 2 --finetune-steps 4 --val-every 4"
    PRETEXT="--cases 2 --pretrain-steps 2 --check-positions 1"
    COHORT="--subjects 2 --batch-sizes 1 2 --device cpu --spacing 4"
else
    CROP="128 128 128"; WIDTH=32; STEPS=10; SIZE="512 512 300"; WINDOW=128; SEG_WIDTH=32
    CASES="same multimodal"; FT="--cases 4 --width 16 --crop 64 64 64 --pretrain-steps 50 --finetune-steps 300 --val-every 100"
    PRETEXT="--pretrain-steps 3000 --unlabelled-cases 24"
    COHORT="--subjects 16 --batch-sizes 1 2 4 8 16 --device cuda"
fi

# 1. the CUDA-parametrised tests (on a GPU only: elsewhere none exist)
if [ "$DEVICE" = cuda ]; then
    run_step tests_cuda "$PY" -c '
import json, subprocess, sys
r = subprocess.run([sys.executable, "-m", "pytest", "Testing", "-q", "-k", "cuda", "-p", "no:cacheprovider"],
                   capture_output=True, text=True)
tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr.strip()[-300:]
print(json.dumps({"pytest_exit": r.returncode, "summary": tail}))
sys.stderr.write(r.stdout[-3000:])
sys.exit(r.returncode)
'
fi

# 2. pre-training steps: gvsl with and without AMP, and the reference-style step (once)
run_step pretrain_fp32 "$PY" benchmarks/pretrain_step.py --device "$DEVICE" --crop $CROP --batch-size 2 \
    --width "$WIDTH" --steps "$STEPS" --workers 2
if [ "$DEVICE" != cpu ]; then
    run_step pretrain_amp "$PY" benchmarks/pretrain_step.py --device "$DEVICE" --crop $CROP --batch-size 2 \
        --width "$WIDTH" --steps "$STEPS" --workers 2 --amp --no-baseline
fi

# 3. registration: in process and the command line end to end, next to ANTs SyN on the CPU
run_step registration "$PY" benchmarks/registration.py --cases $CASES --seeds 0 --methods gvsl ants_syn \
    --cli --device "$DEVICE"

# 4. segmentation inference of a CT-sized volume, with and without AMP
run_step segmentation_fp32 "$PY" benchmarks/segmentation.py inference --device "$DEVICE" --size $SIZE \
    --width "$SEG_WIDTH" --window "$WINDOW"
if [ "$DEVICE" != cpu ]; then
    run_step segmentation_amp "$PY" benchmarks/segmentation.py inference --device "$DEVICE" --size $SIZE \
        --width "$SEG_WIDTH" --window "$WINDOW" --amp
fi

# 5. fine-tuning: a short run from scratch and from a briefly pre-trained backbone (steps per second)
run_step finetune "$PY" benchmarks/segmentation.py learning-curve --device "$DEVICE" $FT

# 5b. a cohort registered in one process with its deformable stages batched 1 to 16 pairs at a time:
# subjects per minute and peak GPU memory at each batch size, and each field's distance to its unbatched one
run_step cohort_batches "$PY" benchmarks/cohort.py $COHORT

# 6. pre-training long enough to tell whether the Z-matching heads learn at the compare's settings (width 8,
# 32³ crops): held-out registration unregistered / affine / deformable. Last, as the longest step.
run_step pretext "$PY" benchmarks/segmentation.py pretext --device "$DEVICE" $PRETEXT
