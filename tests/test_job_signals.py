"""Rendered job scripts under signals: bash runs the real script, the payload is a stand-in.

The stand-in ``python`` (a bash script, see standins.py) records its argv like the other stand-ins;
as the payload it traps USR1 and TERM, records which one arrived, and exits 75 after USR1 (the
worker's "interrupted, checkpoint written" code) or 143 after TERM; as ``finish`` it exits 0. The
launcher stand-in (``mpiexec``, ``srun``) execs the payload, so a signal sent to the launcher
reaches it. What is real: bash, the rendered scripts, the signals and their timing. That the real
worker checkpoints on USR1 is tested with the worker itself (test_batch_retry.py, the SLURM test).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from dre_hpc.batch.config import resolve
from dre_hpc.batch.render import render_script

from standins import LAUNCHER, RECORD, calls, path_with, write_standin

# Seconds a step may take before the test fails. Generous: under CI the container build runs
# beside the tests (compiles, unpacks a Debian root), and one run once took more than 30 s to
# finish a signalled job. The payloads loop longer than this, so that a signal that never
# arrives shows as a timeout or a wrong exit status, never as a pass.
PATIENCE = 120

# The payload: ready file once its traps are set, then a loop it leaves only through a trap.
PAYLOAD = RECORD + r'''if [ "$3" = finish ]; then exit 0; fi
signals="${STANDIN_LOG:?}/../signals"
trap 'echo USR1 >> "$signals"; sleep "${STANDIN_DELAY:-0}"; exit 75' USR1
trap 'echo TERM >> "$signals"; exit 143' TERM
touch "${STANDIN_LOG:?}/../ready"
for _ in $(seq 3000); do sleep 0.05; done
exit 0
'''

# A payload without traps: USR1 kills it (exit 138), as it would a process without a handler.
UNTRAPPED = RECORD + r'''if [ "$3" = finish ]; then exit 0; fi
touch "${STANDIN_LOG:?}/../ready"
for _ in $(seq 3000); do sleep 0.05; done
exit 0
'''


def start(tmp_path, scheduler="local", overrides=(), payload=PAYLOAD, env=None):
    """Render the fit script of `scheduler`, start it with bash (stand-ins on PATH) and wait until
    the payload has set its traps; returns the Popen."""
    python = write_standin(tmp_path / "bin", "python-host", payload)
    write_standin(tmp_path / "bin", "srun", LAUNCHER)
    write_standin(tmp_path / "bin", "mpiexec", LAUNCHER)
    config = resolve(None, [f"scheduler.name={scheduler}", *overrides])
    context = {"run_name": "sig", "stage": "fit", "python": str(python), "job_name": "sig-fit"}
    run = tmp_path / "run"
    (run / "scripts").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (run / "scripts" / "fit.sh").write_text(render_script(config, scheduler, "fit", context))
    (tmp_path / "calls").mkdir()
    full = dict(os.environ, STANDIN_LOG=str(tmp_path / "calls"), PATH=path_with(tmp_path / "bin"),
                PBS_O_WORKDIR=str(run), SLURM_SUBMIT_DIR=str(run), **(env or {}))
    proc = subprocess.Popen(["bash", str(run / "scripts" / "fit.sh")], cwd=run, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + PATIENCE
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stand-in payload never started"
        time.sleep(0.01)
    return proc


def finished(proc, timeout=PATIENCE):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def signals(tmp_path):
    path = tmp_path / "signals"
    return path.read_text().split() if path.exists() else []


def argvs(tmp_path):
    return [c["argv"][1:] for c in calls(tmp_path / "calls")]


FIT = ["-m", "dre_hpc.batch.worker", "fit", "."]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_term_and_usr1_reach_the_payload_as_usr1_then_finish_runs(tmp_path, sig):
    proc = start(tmp_path)
    proc.send_signal(sig)                      # to the batch shell only, like --signal=B:USR1
    code, out, err = finished(proc)
    assert code == 75, err
    assert signals(tmp_path) == ["USR1"]       # TERM arrived as USR1, nothing else
    assert argvs(tmp_path) == [FIT + ["--ranks", "1"],
                               ["-m", "dre_hpc.batch.worker", "finish", "fit", ".", "--exit-code", "75"]]


def test_the_script_waits_for_a_payload_that_takes_its_time(tmp_path):
    """The trap interrupts `wait` at once; the script must wait again for the payload (which
    spends 1 s writing its checkpoint) instead of taking the interrupted wait's 138 as status.
    A second signal meanwhile changes nothing."""
    proc = start(tmp_path, env={"STANDIN_DELAY": "1"})
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.2)
    assert proc.poll() is None                 # still waiting for the payload
    code, _, err = finished(proc)
    assert code == 75, err
    assert argvs(tmp_path)[-1][-1] == "75"     # finish got the payload's status
    assert signals(tmp_path)[0] == "USR1" and set(signals(tmp_path)) == {"USR1"}


def test_a_payload_killed_by_the_forwarded_signal_gives_its_signal_status(tmp_path):
    proc = start(tmp_path, payload=UNTRAPPED)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finished(proc)
    assert code == 128 + signal.SIGUSR1, err   # the payload died of USR1, the shell survived TERM
    assert argvs(tmp_path)[-1] == ["-m", "dre_hpc.batch.worker", "finish", "fit", ".", "--exit-code",
                                   str(128 + signal.SIGUSR1)]


@pytest.mark.parametrize("scheduler,launcher", [("slurm", "srun"), ("pbs", "mpiexec")])
def test_the_signal_goes_through_the_mpi_launcher(tmp_path, scheduler, launcher):
    """With 2 x 3 ranks the payload is the launcher (here a stand-in that execs the worker),
    which gets USR1 and must forward it: Open MPI's mpirun and srun do."""
    proc = start(tmp_path, scheduler, ["resources.fit.nodes=2", "resources.fit.ntasks_per_node=3",
                                       "resources.fit.prologue=", "resources.fit.epilogue="])
    proc.send_signal(signal.SIGTERM)
    code, _, err = finished(proc)
    assert code == 75, err
    recorded = calls(tmp_path / "calls")
    assert recorded[0]["program"] == launcher
    assert recorded[1]["argv"][1:] == FIT + ["--ranks", "6"]
    assert signals(tmp_path) == ["USR1"]


def test_undisturbed_payload_status_passes_through(tmp_path):
    """No signal: the payload's own exit status is the script's (here the loop's end, 0)."""
    payload = PAYLOAD.replace("seq 3000", "seq 4")
    proc = start(tmp_path, payload=payload)
    code, _, err = finished(proc)
    assert code == 0 and signals(tmp_path) == [], err
    assert argvs(tmp_path)[-1][-1] == "0"
