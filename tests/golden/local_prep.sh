#!/bin/bash
# local job: `dre-batch run` starts it with the run directory as working directory and
# DRE_ARRAY_INDEX, DRE_TILE (fit) and DRE_JOB_ID in the environment.
# dre-batch prep job of run local_demo, local scheduler.
# Rendered by dre_hpc.batch.render from templates/local.sh.j2: change the run
# config and run dre-batch setup again rather than editing this file.
set -uo pipefail
if [ ! -f manifest.json ]; then
    echo "dre-batch: $(pwd) is not a dre-batch run directory (no manifest.json)" >&2
    exit 2
fi
/opt/dre/venv/bin/python -m dre_hpc.batch.worker prep .
status=$?
# record an outcome if the payload died without one (one process, inside the same environment)
/opt/dre/venv/bin/python -m dre_hpc.batch.worker finish prep . --exit-code "$status"
exit "$status"
