# shellcheck shell=bash
# The body of launch/slurm/train.sbatch and train_cpu.sbatch, which set their #SBATCH options
# (and DS_ACCELERATOR for the CPU one) and then source this file with the job's arguments:
#
#   sbatch launch/slurm/train.sbatch CONFIG [key=value ...]
#
# What it does (docs/cluster.md explains it for users):
# - one srun step with one task per GPU (or per CPU slot): srun starts every rank itself and each
#   rank reads RANK/LOCAL_RANK/WORLD_SIZE from SLURM; MASTER_ADDR/MASTER_PORT are exported here;
# - a fixed run name, slurm-$SLURM_JOB_ID, so a requeued job resumes the same run from
#   runs/<run name>/checkpoints/latest (the trainer's train.resume=auto);
# - USR1 (sent by SLURM 90 s before the time limit, see --signal=B:USR1@90) or TERM (preemption,
#   scancel) reaching this shell is forwarded to the ranks, which checkpoint and exit 75;
#   exit 75 means "requeue me", and this script requeues the job with `scontrol requeue`;
# - srun is ended when this shell exits, whatever the reason.
#
# Environment knobs (all optional):
#   MSHG_ROOT        repository with the code (default: the directory sbatch was run from)
#   PYTHON           interpreter (default: $MSHG_ROOT/.venv/bin/python, else python3)
#   MSHG_RUN_NAME    run name (default: slurm-$SLURM_JOB_ID); set it to continue an older run
#   MSHG_MASTER_PORT rendezvous port (default: 15000 + job id mod 15000, below the ephemeral range)
#   MSHG_SRUN_WAIT   seconds the other ranks get after the first rank ends before srun kills them
#                    (default 300); bounds the hang when one rank dies
#   MSHG_ENTRY       python module to run (default: pipeline.train; the tests use a stand-in)

set -euo pipefail

REQUEUE_EXIT=75  # the trainer's "checkpoint written, requeue me" exit code (EX_TEMPFAIL)

log() { echo "[mshg $(date +%H:%M:%S)] $*"; }

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "This is a SLURM batch script: submit it with sbatch (see docs/cluster.md)." >&2
    exit 2
fi
if (($# < 1)); then
    echo "usage: sbatch $(basename "${BASH_SOURCE[1]:-train.sbatch}") CONFIG [key=value ...]" >&2
    exit 2
fi
config=$1
shift

MSHG_ROOT=${MSHG_ROOT:-$SLURM_SUBMIT_DIR}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $MSHG_ROOT/.venv/bin/python ]]; then PYTHON=$MSHG_ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
entry=${MSHG_ENTRY:-pipeline.train}
run_name=${MSHG_RUN_NAME:-slurm-$SLURM_JOB_ID}
# The job runs in the submit directory (runs/ and mlflow.db land there); the code may live elsewhere.
export PYTHONPATH="$MSHG_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Rendezvous for torch.distributed: rank 0 runs on the first node of the allocation. The port is
# derived from the job id so that two jobs sharing a node do not collide, and stays the same when
# the job is requeued.
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${hosts%%$'\n'*}
export MASTER_PORT=${MSHG_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}  # = pipeline.distributed.slurm_master_port
# One compute thread per allocated CPU, not one per core of the node (ranks share nodes).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# SLURM 22.05 srun does not inherit --cpus-per-task from sbatch; this variable makes it.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
    "$SLURM_NTASKS tasks, run $run_name, master $MASTER_ADDR:$MASTER_PORT," \
    "accelerator ${DS_ACCELERATOR:-default}"

signalled=""
srun_pid=""
# shellcheck disable=SC2317  # called from a trap
forward() {
    # srun forwards the signals it receives to every task of the step.
    signalled=$1
    if [[ -z $srun_pid ]]; then log "got SIG$1 before the ranks started: ignored"; return; fi
    log "got SIG$1: forwarding it to the ranks (srun pid $srun_pid)"
    kill -s "$1" "$srun_pid" 2>/dev/null || true
}
# Installed before srun starts, so that an early signal cannot kill this shell and orphan srun.
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# Each task sets its own rank variables from SLURM's, then becomes the trainer (exec, so the
# signals srun forwards reach python directly). Our run name goes before the user's overrides so
# that a train.run_name=... on the command line still wins.
# shellcheck disable=SC2016  # $SLURM_* must expand in each task, not here
srun --wait="${MSHG_SRUN_WAIT:-300}" \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' rank \
    "$PYTHON" -m "$entry" --config "$config" "train.run_name=$run_name" "$@" &
srun_pid=$!

# shellcheck disable=SC2317  # called from a trap
stop_children() {
    # proctrack/linuxproc does not reap what a job leaves behind: end srun (and with it the
    # step's tasks) if this shell exits early for any reason.
    if kill -0 "$srun_pid" 2>/dev/null; then
        log "ending srun (pid $srun_pid)"
        kill -TERM "$srun_pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$srun_pid" 2>/dev/null || return 0; sleep 0.5; done
        kill -KILL "$srun_pid" 2>/dev/null || true
    fi
}
trap stop_children EXIT

# A trapped signal interrupts `wait` (status > 128) while srun keeps running: wait again until
# srun itself has exited and we hold its real status.
while :; do
    signalled=""
    rc=0
    wait "$srun_pid" || rc=$?
    if [[ -n $signalled ]] && ((rc > 128)); then continue; fi
    break
done
log "ranks finished with exit code $rc"

if ((rc == REQUEUE_EXIT)); then
    log "requeueing job $SLURM_JOB_ID; it resumes run $run_name from its latest checkpoint"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0  # SLURM ends this shell now and starts the job again later
    fi
    log "scontrol requeue failed (job cancelled, or submitted with --no-requeue?)"
fi
exit "$rc"
