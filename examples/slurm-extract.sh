#!/bin/bash
# SLURM: a Ray cluster over the allocated nodes (head on the first), then the weclip driver on the head.
# sbatch examples/slurm-extract.sh MANIFEST OUT   (weclip installed in the environment every node activates)
#SBATCH --job-name=weclip-extract
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
set -euo pipefail
manifest=$1 out=$2
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
port=6379

srun --nodes=1 --ntasks=1 -w "$head" ray start --head --node-ip-address="$head_ip" --port=$port \
     --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="$SLURM_GPUS_PER_NODE" --block &
sleep 20
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" ray start --address="$head_ip:$port" \
       --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="$SLURM_GPUS_PER_NODE" --block &
done
sleep 20

# The driver runs beside the head's raylet; RAY_ADDRESS makes it join that cluster (every node has weclip installed).
RAY_ADDRESS="$head_ip:$port" weclip extract "$manifest" -o "$out" --gpus-per-task 1 --cpus-per-task 8 \
    --set model.pretrained=/models/ViT-B-16.pt
