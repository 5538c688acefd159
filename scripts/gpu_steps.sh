# Sourced by the GPU check scripts: the machine's header and time-limited steps, so that one step that fails or times
# out leaves the others' results. The caller sets `summary` (a file) and `log_dir` (a folder) first.
#
#   gpu_header                      the GPU, its driver and the library versions, into $summary
#   step NAME SECONDS COMMAND...    COMMAND with a time limit, its output in $log_dir/NAME.log, its rc and seconds
#                                   appended to $summary

gpu_header() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$summary"
    python -c "import torch, monai, ignite; print('torch', torch.__version__, 'monai', monai.__version__, \
'ignite', ignite.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$summary"
}

step() {
    local name=$1 seconds=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$seconds" "$@" >"$log_dir/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc, $(($(date +%s) - start)) s" | tee -a "$summary"
}
