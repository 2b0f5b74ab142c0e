#!/bin/bash
#PBS -N survey_pbs-fit
#PBS -q workq
#PBS -A YOUR_PROJECT
#PBS -l select=2:ncpus=16:mpiprocs=16:mem=64GB
#PBS -l walltime=12:00:00
#PBS -j oe
#PBS -o logs/pbs/
#PBS -l place=scatter
# dre-batch fit job of run survey_pbs, pbs scheduler.
# Rendered by dre_hpc.batch.render from templates/pbs.sh.j2: change the run
# config and run dre-batch setup again rather than editing this file.
set -uo pipefail
# PBS_O_WORKDIR: PBS Pro/Torque; SLURM_SUBMIT_DIR: the qsub of slurm-wlm-torque sets no PBS_* variables
cd "${PBS_O_WORKDIR:-${SLURM_SUBMIT_DIR:?neither PBS_O_WORKDIR nor SLURM_SUBMIT_DIR is set: submit this script with qsub}}" || exit 2
if [ ! -f manifest.json ]; then
    echo "dre-batch: $(pwd) is not a dre-batch run directory (no manifest.json)" >&2
    exit 2
fi
# prologue (resources.fit.prologue, verbatim)
module load apptainer openmpi
mpiexec -n 32 apptainer exec -B /project/data -B /scratch/dre:/scratch --env PYTHONNOUSERSITE=1 /project/containers/dre_hpc.sif python -m dre_hpc.batch.worker fit .
status=$?
# record an outcome if the payload died without one (one process, inside the same environment)
apptainer exec -B /project/data -B /scratch/dre:/scratch --env PYTHONNOUSERSITE=1 /project/containers/dre_hpc.sif python -m dre_hpc.batch.worker finish fit . --exit-code "$status"
exit "$status"
