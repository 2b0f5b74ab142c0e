#!/bin/bash
#SBATCH --job-name=survey_dr1-fit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:4
#SBATCH --mem=128G
#SBATCH --time=06:00:00
#SBATCH --partition=gpu
#SBATCH --account=YOUR_ACCOUNT
#SBATCH --output=logs/slurm/%x-%A_%a.out
#SBATCH --constraint=a100
# dre-batch fit job of run survey_dr1, slurm scheduler.
# Rendered by dre_hpc.batch.render from templates/slurm.sh.j2: change the run
# config and run dre-batch setup again rather than editing this file.
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:?is not set: submit this script with sbatch}" || exit 2
if [ ! -f manifest.json ]; then
    echo "dre-batch: $(pwd) is not a dre-batch run directory (no manifest.json)" >&2
    exit 2
fi
# prologue (resources.fit.prologue, verbatim)
module load python/3.11 openmpi/4.1 cuda/12.2
source "$HOME/venvs/dre_hpc/bin/activate"
srun /opt/dre/venv/bin/python -m dre_hpc.batch.worker fit .
status=$?
# record an outcome if the payload died without one (one process, inside the same environment)
/opt/dre/venv/bin/python -m dre_hpc.batch.worker finish fit . --exit-code "$status"
# epilogue (resources.fit.epilogue, verbatim)
echo "fit chunk finished on $(hostname)"
exit "$status"
