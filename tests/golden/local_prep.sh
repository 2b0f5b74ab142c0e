#!/bin/bash
# local job: `dre-batch run` starts it with the run directory as working directory and
# DRE_ARRAY_INDEX, DRE_TILE (fit) and DRE_JOB_ID in the environment. MPI ranks are not bound to
# cores here (a rank uses resources.fit.cpus_per_task BLAS threads).
# dre-batch prep job of run local_demo, local scheduler.
# Rendered by dre_hpc.batch.render from templates/local.sh.j2: change the run
# config and run dre-batch setup again rather than editing this file.
set -uo pipefail
if [ ! -f manifest.json ]; then
    echo "dre-batch: $(pwd) is not a dre-batch run directory (no manifest.json)" >&2
    exit 2
fi
# the payload runs in the background so that this shell can forward TERM and USR1 to it as USR1
# (the worker then checkpoints and exits 75, retryable; Open MPI's mpirun kills its ranks at once
# on TERM but forwards USR1); `wait` returns early (status > 128) whenever a trapped signal
# arrives, so it is repeated until the payload has really exited
interrupted=0
payload=
trap 'interrupted=1; if [ -n "$payload" ]; then kill -USR1 "$payload" 2>/dev/null; fi' TERM USR1
/opt/dre/venv/bin/python -m dre_hpc.batch.worker prep . &
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
/opt/dre/venv/bin/python -m dre_hpc.batch.worker finish prep . --exit-code "$status"
exit "$status"
