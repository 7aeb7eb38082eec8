# Shared body of slurm/pretrain_<arch>_<arm>.sh; sourced after they set CONFIG and RUN_NAME.
#
# Starts one training task per GPU with srun, forwards SLURM's time-limit signal to the
# tasks (they checkpoint after the current iteration and exit 0), then requeues the job,
# which resumes from the run directory's newest checkpoint. See docs/slurm.md.
#
# Allocation (partition, account, qos, nodes, GPUs, time) is NOT set here: #SBATCH lines
# cannot read variables. Give them on the sbatch command line, which wins over the script:
#   sbatch --partition=gpu --account=myproj --qos=normal --nodes=2 --time=12:00:00 slurm/pretrain_vitl_hierce.sh
# or through sbatch's input variables (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_TIMELIMIT).
# Keep --ntasks-per-node equal to --gpus-per-node when you change the GPU count.

set -euo pipefail

# ---- site settings: edit here, or export before sbatch (sbatch passes your environment) ----
# Training sources, comma-separated: manifest CSVs, ImageFolder directories or "synthetic".
DATA_TRAIN="${DATA_TRAIN:-}"
# Where runs go; relative paths are taken from the repository root.
OUTPUT_ROOT="${OUTPUT_ROOT:-runs}"
OUTPUT_DIR="${OUTPUT_DIR:-$OUTPUT_ROOT/$RUN_NAME}"
# Shell line that makes the environment available, e.g. "source .venv/bin/activate" or
# "module load cuda && conda activate dinov2_hier"; empty: use the environment sbatch passed.
ACTIVATE="${ACTIVATE:-}"
PYTHON="${PYTHON:-python}"
# Signal the tasks get when the batch shell receives the time-limit signal (#SBATCH --signal).
STOP_SIGNAL="${STOP_SIGNAL:-USR1}"
# Give up requeueing after this many restarts (SLURM_RESTART_COUNT).
MAX_REQUEUES="${MAX_REQUEUES:-50}"
# Extra srun options, word-split, e.g. "--cpu-bind=none".
SRUN_ARGS="${SRUN_ARGS:-}"
# ---------------------------------------------------------------------------------------

die() {
  echo "error: $*" >&2
  exit 2
}

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job; submit with: sbatch ${BASH_SOURCE[1]:-slurm/pretrain_<arch>_<arm>.sh}"
[[ -n "$DATA_TRAIN" ]] || die "set DATA_TRAIN to your training manifests, e.g. DATA_TRAIN=data/wbc_train.csv,data/bm_train.csv sbatch ... (or edit slurm/common.sh)"
[[ -f "$CONFIG" ]] || die "config not found: $CONFIG (submit from the repository root or set REPO_DIR)"

if [[ -n "$ACTIVATE" ]]; then
  set +u  # activation scripts (conda, modules) often read unset variables
  eval "$ACTIVATE"
  set -u
fi

# data.train as a YAML list of single-quoted strings (a quote inside a path is doubled).
yaml_list() {
  local -a sources items=()
  local source
  IFS=',' read -r -a sources <<< "$1"
  for source in "${sources[@]}"; do
    items+=("'${source//\'/\'\'}'")
  done
  local IFS=','
  echo "[${items[*]}]"
}
DATA_OVERRIDE="data.train=$(yaml_list "$DATA_TRAIN")"

# Each task reads its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the rendez-vous
# is MASTER_ADDR:MASTER_PORT if you export them, else the first node of the allocation and a
# port derived from the job id (dinov2_hier.distributed.read_launch_env).
# Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} tasks," \
  "partition ${SLURM_JOB_PARTITION:-?}; config $CONFIG; output $OUTPUT_DIR"

# ---- signals -------------------------------------------------------------------------------
# USR1 (#SBATCH --signal=B:USR1@...) reaches this shell only: forward it to srun, which passes
# it to every task; the tasks checkpoint and exit 0; then we requeue (below).
# TERM (scancel, preemption, the time limit itself) reaches the tasks directly from SLURM:
# keep this shell alive until they have written their checkpoint; no requeue from here
# (a preemption in REQUEUE mode requeues by itself, scancel means stop).
srun_pid=""
time_limit_signal=0
on_time_limit() {
  time_limit_signal=1
  echo "time-limit signal: asking the tasks to checkpoint (SIG$STOP_SIGNAL)"
  if [[ -n "$srun_pid" ]]; then
    kill -s "$STOP_SIGNAL" "$srun_pid" 2>/dev/null || true
  fi
}
on_term() {
  echo "SIGTERM: waiting for the tasks to write their checkpoint"
}
trap on_time_limit USR1
trap on_term TERM

# shellcheck disable=SC2086  # SRUN_ARGS is meant to be word-split
srun --kill-on-bad-exit=1 $SRUN_ARGS "$PYTHON" -m dinov2_hier.train \
  --config "$CONFIG" --output-dir "$OUTPUT_DIR" "$DATA_OVERRIDE" "$@" &
srun_pid=$!
# The signal may have come between the fork and the line above: forward it now.
if (( time_limit_signal )); then
  kill -s "$STOP_SIGNAL" "$srun_pid" 2>/dev/null || true
fi

# A trapped signal makes `wait` return early (status > 128): wait again while srun runs.
while true; do
  status=0
  wait "$srun_pid" || status=$?
  if ! kill -0 "$srun_pid" 2>/dev/null; then
    # srun is gone; if a signal cut this very wait short, ask once more for its real status.
    if (( status > 128 )); then
      status=0
      wait "$srun_pid" || status=$?
    fi
    break
  fi
done

if (( time_limit_signal )); then
  if (( status != 0 )); then
    echo "training exited with status $status after the time-limit signal: not requeued"
  elif (( ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES )); then
    echo "already restarted ${SLURM_RESTART_COUNT:-0} times (MAX_REQUEUES=$MAX_REQUEUES): not requeued"
  else
    echo "checkpoint written: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
fi
exit "$status"
