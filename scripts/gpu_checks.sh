#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the full benchmark (paper preset), demo training through the bundle
# with fp16 AMP, and the torchrun/NCCL overlay on one GPU. Every step has its own time limit and writes its log and
# results to OUT_DIR, so a step that fails or times out leaves the others' results.
#
#   bash scripts/gpu_checks.sh OUT_DIR [BENCHMARK_SECONDS]
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [BENCHMARK_SECONDS]}
bench_seconds=${2:-300}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1

summary="$out/summary.txt"
log_dir="$out"
source "$(dirname "$0")/gpu_steps.sh"
gpu_header

step benchmark "$bench_seconds" python scripts/benchmark.py --output "$out/benchmark_gpu.json"

demo=(--config_file "['bundle/configs/train.json','bundle/configs/demo.json']" --bundle_root bundle
    --dataset_dir "$work/demo" --total_iterations 200 --eval_every 100 --checkpoint_every 100 --log_every 50)
step train_amp 240 python -m monai.bundle run training "${demo[@]}" --amp True \
    --output_dir "$work/amp/logs" --ckpt_dir "$work/amp/models"
step torchrun_nccl 180 torchrun --standalone --nnodes=1 --nproc_per_node=1 -m monai.bundle run training \
    --config_file "['bundle/configs/train.json','bundle/configs/demo.json','bundle/configs/multi_gpu_train.json']" \
    --bundle_root bundle --dataset_dir "$work/demo" --total_iterations 100 --eval_every 100 --amp True \
    --output_dir "$work/ddp/logs" --ckpt_dir "$work/ddp/models"
cp "$work/amp/logs/validation_report.json" "$out/train_amp_validation_report.json" 2>/dev/null
grep -h "Final\|Resuming\|Error\|error\|Grad strides" "$out"/train_amp.log "$out"/torchrun_nccl.log | tail -n 20
