#!/bin/bash
# DP-SGD on 2 nodes x 4 GPUs without the Hydra launcher: sbatch scripts/slurm_train.sh [overrides]
# One task per GPU; Lightning reads ranks and the master address from SLURM. Before the time
# limit SLURM sends SIGUSR1; dpdit saves checkpoints/last.ckpt after the current step and
# requeues the job, which then resumes in the same run directory.
#SBATCH --job-name=dpdit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my_account

# The run directory must not change when the job is requeued: name it by the job id.
RUN_DIR=${RUN_DIR:-outputs/slurm/${SLURM_JOB_ID}}

srun python train.py \
  trainer=ddp trainer.num_nodes="$SLURM_JOB_NUM_NODES" trainer.devices="$SLURM_NTASKS_PER_NODE" \
  hydra.run.dir="$RUN_DIR" "$@"
