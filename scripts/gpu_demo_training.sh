#!/usr/bin/env bash
# The Quick-start demo trained on one CUDA GPU, as is, larger and larger-and-longer, in one call with a time limit.
# A short smoke run goes first (the whole training path on CUDA with fp16 AMP, final validation included); the three
# runs then share the GPU and end together at the limit. Whatever a run reached is kept: every validation is a line of
# its metrics.jsonl with the wall time so far, so an unfinished run still gives Dice against time.
#
#   bash scripts/gpu_demo_training.sh OUT_DIR [SECONDS]
#
# OUT_DIR gets summary.txt (versions, each run's return code and time, its validations and final lines) and
# logs.tar.gz (each run's log and output_dir, without the checkpoints).
set -u
out=${1:?usage: gpu_demo_training.sh OUT_DIR [SECONDS]}
seconds=${2:-480}
start=$(date +%s)
work=$(mktemp -d)
summary="$out/summary.txt"
log_dir="$work"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
source "$(dirname "$0")/gpu_steps.sh"
gpu_header

train() {  # train NAME SECONDS ARGS...: the Quick-start command with ARGS as a step
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" python -m monai.bundle run training --bundle_root bundle \
        --config_file "['bundle/configs/train.json','bundle/configs/demo.json']" \
        --ckpt_dir "$work/$name/models" --output_dir "$work/$name/logs" "$@"
}

report() {  # report NAME: the run's validations, final lines and errors (progress bars end lines with \r)
    echo "== $1" >>"$summary"
    tr '\r' '\n' <"$work/$1.log" | grep -a -o "Validation at iteration [0-9]*: .*\|Final .*\|As one label map.*\
\|Trivial rules.*\|Training finished.*\|[A-Za-z]*Error.*" >>"$summary"
    tail -c 400 "$work/$1.log" | tr '\r' '\n' | grep -a "Iteration: " | tail -n 1 >>"$summary"  # where it stopped
}

train smoke 150 --total_iterations 20 --eval_every 20 --checkpoint_every 20
report smoke
if ! grep -q "Trivial rules" "$work/smoke.log"; then
    tail -c 8000 "$work/smoke.log"
    cat "$summary"
    rm -rf "$work"
    exit 1
fi

left=$((seconds - $(date +%s) + start))
workers=(--num_workers 4)  # episodes are a function of (seed, index): workers change the speed, not the episodes
train quick_start "$left" "${workers[@]}" &
train base16_batch4 "$left" "${workers[@]}" --base_channels 16 --batch_size 4 &
train base16_batch4_6400 "$left" "${workers[@]}" --base_channels 16 --batch_size 4 --total_iterations 6400 \
    --warmup_iterations 200 --lr_scheduler#decay_interval 400 --eval_every 1600 --checkpoint_every 1600 &
wait
for name in quick_start base16_batch4 base16_batch4_6400; do
    report "$name"
done
tar -czf "$out/logs.tar.gz" -C "$work" --exclude=models .
rm -rf "$work"
cat "$summary"
