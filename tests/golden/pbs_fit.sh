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
# the payload runs in the background so that this shell can forward TERM and USR1 to it as USR1
# (the worker then checkpoints and exits 75, retryable; Open MPI's mpirun kills its ranks at once
# on TERM but forwards USR1); `wait` returns early (status > 128) whenever a trapped signal
# arrives, so it is repeated until the payload has really exited
interrupted=0
payload=
trap 'interrupted=1; if [ -n "$payload" ]; then kill -USR1 "$payload" 2>/dev/null; fi' TERM USR1
mpiexec -n 32 apptainer exec -B /project/data -B /scratch/dre:/scratch --env PYTHONNOUSERSITE=1 /project/containers/dre_hpc.sif python -m dre_hpc.batch.worker fit . --ranks 32 &
payload=$!
if [ "$interrupted" = 1 ]; then kill -USR1 "$payload" 2>/dev/null; fi
while :; do
    interrupted=0
    wait "$payload"
    status=$?
    if [ "$interrupted" = 0 ] || [ "$status" -le 128 ]; then break; fi
done
# record an outcome if the payload died without one, and resubmit an interrupted item
# (scheduler.retries; one process, inside the same environment)
apptainer exec -B /project/data -B /scratch/dre:/scratch --env PYTHONNOUSERSITE=1 /project/containers/dre_hpc.sif python -m dre_hpc.batch.worker finish fit . --exit-code "$status"
exit "$status"
