#!/usr/bin/env bash
# The GPU checks, in one call of the device tool, for a session that is lent a GPU (one H200 here):
#
#   make gpu-kit        # here, once: the wheels the device image lacks, into .whl/ (about 13 MB)
#   device run:  command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600
#
# Last run whole on one H200 on 2026-12-04 (torch 2.11.0+cu130): every step exit status 0, 447 s in all.
#
# 1. benchmarks/gpu_smoke.py: BlockMask training equals the dense mask (loss, gradients; every mode on padded batches,
#    the gist mode on packed rows), grouped-query generation in bf16, an NF4 QLoRA step with activation checkpointing.
# 2. The recipes by name on CUDA in bf16 (tiny model, mask_format auto = FlexAttention BlockMasks, activation
#    checkpointing): single device, resumed, FSDP2 with NCCL (one process), gist_generate from the result, and
#    gist_eleuther_eval (lm-eval through TorchtuneGistLM: gist, truncate and full-prompt reads of it).
# 3. benchmarks/bench_gpu.py sized to the time left, on 8 layers of the 8B shape: decode (no compiles, the most
#    telling), then the 8B QLoRA memory beside torchtune's stock config, attention throughput and packing (in that
#    order; results_gpu.json is rewritten after every measured row, so a cut run keeps what it measured).
#
# Everything lands in $OUT: log.txt, summary.txt (one line per step: exit status and seconds), eval/ (the eval step's
# results and comparison.md), results_gpu.json, RESULTS.md and the plots. Back here: copy results_gpu.json to
# benchmarks/ and run `python benchmarks/bench_cpu.py --render-only` to put the GPU section into benchmarks/RESULTS.md.
# Compiled decoding (`compile=True`) does not fit in that call; a second one times it and replaces only the decode
# section of the first call's results (copied to benchmarks/results_gpu.json here, so it travels with the tree):
#   device run:  command="cp benchmarks/results_gpu.json $OUT/ && CHECKS=bench BENCH_ONLY=decode
#                BENCH_ARGS='--layers 8 --prompt-lens 4096,16384 --decode-batch 1,8,32 --new-tokens 16
#                --stock-cache-len 16448 --decode-compile --update' bash benchmarks/device_check.sh",
#                carry=[".whl"], timeout_s=600
# (the results' "notes" describe the first call: edit them if the new decode rows change what they say).
# To check the script on a CPU: PY=.venv/bin/python DEVICE=cpu DTYPE=fp32 BENCH_ARGS=--tiny TIME_SCALE=4 bash benchmarks/device_check.sh
# (TIME_SCALE multiplies every step's time limit, sized for the device tool's 600 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/device_check}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
TIME_SCALE=${TIME_SCALE:-1}
CHECKS=${CHECKS:-all}  # all: the smoke checks, the recipes and the benchmarks; bench: the benchmarks only
BENCH_ONLY=${BENCH_ONLY:-decode,memory,attention,packing}
BENCH_ARGS=${BENCH_ARGS:---layers 8 --qlora-shapes 1x2048,4x512 --reps 5 --train-shapes 1x4096 --pack-examples 32 --prompt-lens 4096,16384 --decode-batch 1,8,32 --new-tokens 16 --stock-cache-len 16448}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
exec > >(tee "$OUT/log.txt") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import torchtune" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# Stop at once if the installed stack does not import (e.g. datasets against the image's pyarrow or fsspec).
"$PY" -c "import pyarrow, fsspec, huggingface_hub; print('pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__, 'huggingface_hub', huggingface_hub.__version__)" || exit 1
"$PY" -c "import torchtune, torchao, torchdata, datasets, lm_eval, safetensors" || exit 1
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/recipes"

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, record its exit status and duration
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name"
    timeout -k 10 "$((limit * TIME_SCALE))" "$@"
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
}

nvidia-smi -L 2>/dev/null
"$PY" -c "import torch, torchtune, torchao; print('torch', torch.__version__, 'torchtune', torchtune.__version__, 'torchao', torchao.__version__)"

TINY=${TINY:-/tmp/device_check_tiny}
rm -rf "$TINY"
TUNE=("$PY" -m torchtune._cli.tune run)
ON=(device="$DEVICE" dtype="$DTYPE" assets_dir="$TINY/assets" enable_activation_checkpointing=True)
if [ "$CHECKS" = all ]; then
    step smoke 260 "$PY" benchmarks/gpu_smoke.py --only generation,qlora,block_mask  # block_mask compiles FlexAttention: last
    step tiny_assets 60 "$PY" -m torchtune_gist.tiny --out "$TINY/assets"
    step single_device 120 "${TUNE[@]}" gist_lora_single_device --config configs/tiny/gist_lora_single_device.yaml \
        "${ON[@]}" output_dir="$TINY/single" max_steps_per_epoch=20 log_peak_memory_stats=True
    step resume 90 "${TUNE[@]}" gist_lora_single_device --config configs/tiny/gist_lora_single_device.yaml \
        "${ON[@]}" output_dir="$TINY/single" max_steps_per_epoch=20 epochs=2 resume_from_checkpoint=True
    step distributed 120 "${TUNE[@]}" --nproc_per_node 1 gist_lora_distributed --config configs/tiny/gist_lora_distributed.yaml \
        "${ON[@]}" output_dir="$TINY/distributed" max_steps_per_epoch=10
    TRAINED=$(ls -d "$TINY"/single/epoch_* 2>/dev/null | sort -V | tail -1)  # resume's epoch_1, else epoch_0
    step generate 90 "${TUNE[@]}" gist_generate --config configs/tiny/gist_generate.yaml device="$DEVICE" dtype="$DTYPE" compile=True \
        assets_dir="$TINY/assets" gist_checkpoint_dir="$TRAINED"
    step eval 90 "${TUNE[@]}" gist_eleuther_eval --config configs/tiny/gist_eval.yaml device="$DEVICE" dtype="$DTYPE" \
        assets_dir="$TINY/assets" output_dir="$OUT/eval" metadata.num_samples=8 \
        "runs=[{mode: gist, checkpoint_dir: $TRAINED}, {mode: truncate, checkpoint_dir: $TRAINED}, {mode: pos_control, checkpoint_dir: $TRAINED}]"
fi
# The rest of the device tool's 600 s, less a margin for the files' trip back.
if [ "$SECONDS" -lt $((480 * TIME_SCALE)) ]; then
    # shellcheck disable=SC2086
    step bench $(((570 * TIME_SCALE - SECONDS) / TIME_SCALE)) "$PY" benchmarks/bench_gpu.py --out "$OUT" --only "$BENCH_ONLY" $BENCH_ARGS
else
    echo "bench skipped: ${SECONDS}s used, too little of the 600 s left" | tee -a "$OUT/summary.txt"
    failed=1
fi
cat "$OUT/summary.txt"
exec >&- 2>&-  # let tee write the end of log.txt before the files go back
wait "$TEE_PID"
exit "$failed"
