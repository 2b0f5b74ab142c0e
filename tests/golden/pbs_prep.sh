#!/bin/bash
#PBS -N survey_pbs-prep
#PBS -q workq
#PBS -A YOUR_PROJECT
#PBS -l select=1:ncpus=2:mpiprocs=1:mem=8GB
#PBS -l walltime=01:30:00
#PBS -j oe
#PBS -o logs/pbs/
# dre-batch prep job of run survey_pbs, pbs scheduler.
# Rendered by dre_hpc.batch.render from templates/pbs.sh.j2: change the run
# config and run dre-batch setup again rather than editing this file.
set -uo pipefail
# PBS_O_WORKDIR: PBS Pro/Torque; SLURM_SUBMIT_DIR: the qsub of slurm-wlm-torque sets no PBS_* variables
cd "${PBS_O_WORKDIR:-${SLURM_SUBMIT_DIR:?neither PBS_O_WORKDIR nor SLURM_SUBMIT_DIR is set: submit this script with qsub}}" || exit 2
if [ ! -f manifest.json ]; then
    echo "dre-batch: $(pwd) is not a dre-batch run directory (no manifest.json)" >&2
    exit 2
fi
# prologue (resources.prep.prologue, verbatim)
module load apptainer openmpi
apptainer exec -B /project/data -B /scratch/dre:/scratch --env PYTHONNOUSERSITE=1 /project/containers/dre_hpc.sif python -m dre_hpc.batch.worker prep .
status=$?
# record an outcome if the payload died without one (one process, inside the same environment)
apptainer exec -B /project/data -B /scratch/dre:/scratch --env PYTHONNOUSERSITE=1 /project/containers/dre_hpc.sif python -m dre_hpc.batch.worker finish prep . --exit-code "$status"
exit "$status"
