#!/bin/bash
# ViT-S/14 pretraining, arm "supcon": DINOv2 + supervised contrastive loss on leaf labels.
# Submit from the repository root (site values: top of slurm/common.sh or environment variables):
#   DATA_TRAIN=data/wbc_train.csv,data/bm_train.csv sbatch --partition=P --account=A slurm/pretrain_vits_supcon.sh [key=value ...]
# The #SBATCH lines below are generic; options given to sbatch override them.
#SBATCH --job-name=dh-vits-supcon
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

CONFIG="${CONFIG:-configs/train/vits14_supcon.yaml}"
RUN_NAME="${RUN_NAME:-vits14_supcon}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO_DIR" && [[ -f slurm/common.sh ]] || { echo "error: no slurm/common.sh in '$REPO_DIR': run sbatch from the repository root or set REPO_DIR" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source slurm/common.sh "$@"
