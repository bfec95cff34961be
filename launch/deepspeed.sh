#!/usr/bin/env bash
# Train with the DeepSpeed launcher, on this machine or on every host of a hostfile.
#
#   launch/deepspeed.sh [--num_gpus N] CONFIG [key=value ...]                 one node, N ranks
#   launch/deepspeed.sh --hostfile FILE [--num_gpus N] CONFIG [key=value ...] the hosts in FILE
#
# Options (before CONFIG):
#   --hostfile FILE     "host slots=N" lines (launch/hostfile.example); the launcher reaches the
#                       other hosts with pdsh over passwordless ssh and runs the same command in
#                       the same directory there, so the repository must be on a shared filesystem
#   --num_gpus N        ranks per node. Default: one node -> every GPU this job may use
#                       (CUDA_VISIBLE_DEVICES, else nvidia-smi), or 1 rank on a machine without
#                       GPUs; hostfile -> its slots. On one node with CUDA_VISIBLE_DEVICES set the
#                       launcher gets --include localhost:<those GPUs>: its --num_gpus would drop
#                       the variable and take GPUs 0..N-1, which on a shared node are someone else's
#   --num_nodes N       use only the first N hosts of the hostfile
#   --master_addr HOST  rendezvous host (default: the first host of the hostfile)
#   --master_port PORT  rendezvous port (default 29500; change it when two runs share a node)
#   --ssh_port PORT     ssh port of the hosts (default: ssh's own); other ssh options for pdsh go
#                       in PDSH_SSH_ARGS_APPEND
#   --no_ssh_check      skip the launcher's `ssh HOST hostname` check (it uses ssh's defaults only)
# Run from the repository root: runs/ and mlflow.db are written to the current directory.
# See docs/cluster.md.
set -euo pipefail

usage() { sed -n '2,/^# See docs/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
launcher_args=()
hostfile=""
num_gpus=""
while (($#)); do
    case $1 in
        --hostfile) hostfile=${2:?--hostfile needs a file}; shift 2 ;;
        --num_gpus) num_gpus=${2:?--num_gpus needs a number}; shift 2 ;;
        --num_nodes | --master_addr | --master_port | --ssh_port)
            launcher_args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        --no_ssh_check) launcher_args+=("$1"); shift ;;
        -h | --help) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
(($# >= 1)) || usage
config=$1
shift
[[ -f $config ]] || { echo "config file not found: $config" >&2; exit 2; }

if [[ -n $hostfile ]]; then
    # DeepSpeed only warns about a missing hostfile and then trains on this machine alone.
    [[ -f $hostfile ]] || { echo "hostfile not found: $hostfile" >&2; exit 2; }
    launcher_args+=(--hostfile "$hostfile")
fi

gpus=0
if command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if ((gpus == 0)); then
    # DeepSpeed's CPU accelerator (gloo). Remote hosts of a hostfile do not inherit this
    # variable: put DS_ACCELERATOR=cpu in .deepspeed_env there (docs/cluster.md).
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
visible=()
if ((gpus > 0)) && [[ -z $hostfile ]]; then
    IFS=, read -ra visible <<<"${CUDA_VISIBLE_DEVICES:-}"
fi
if ((${#visible[@]} > 0)); then
    n=${num_gpus:-${#visible[@]}}
    if ((n > ${#visible[@]})); then
        echo "--num_gpus $n, but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names ${#visible[@]} GPU(s)" >&2
        exit 2
    fi
    launcher_args+=(--include "localhost:$(IFS=,; echo "${visible[*]:0:n}")")
else
    if [[ -z $num_gpus && -z $hostfile ]]; then
        num_gpus=$((gpus > 0 ? gpus : 1))
    fi
    if [[ -n $num_gpus ]]; then
        launcher_args+=(--num_gpus "$num_gpus")
    fi
fi

# The project's virtualenv when there is one, else whatever `deepspeed` is on PATH.
deepspeed=deepspeed
if [[ -x $root/.venv/bin/deepspeed ]]; then deepspeed=$root/.venv/bin/deepspeed; fi

set -x
exec "$deepspeed" "${launcher_args[@]}" --module pipeline.train --config "$config" "$@"
