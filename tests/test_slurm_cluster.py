"""The real single-host SLURM of the test suite (bin/slurm-single-host, fixture ``slurm_cluster``):
the scheduler behaviour that dre-batch relies on, checked on real slurmctld/slurmd daemons.

Findings (Debian 12, slurm-wlm 22.05.8), relied on by dre-batch:
- ``--dependency=afterok:ID`` on a job that fails: with ``DependencyParameters=kill_invalid_depend``
  the dependent job is cancelled at once (``JobState=CANCELLED Reason=DependencyNeverSatisfied``)
  instead of pending forever.
- ``afterok:ID_N`` waits for array element N only, not for the whole array.
- A job starts in the directory it was submitted from (``SLURM_SUBMIT_DIR``); relative ``--output``
  paths are relative to it.
- ``--export=NONE`` (and ``qsub -v``, which becomes ``--export=none,...``) makes slurmd load the
  user's login environment first: about 2 s more per job. ``SLURM_CONF`` still reaches the job.

The PBS-compatible ``qsub`` of ``slurm-wlm-torque`` (a Perl wrapper that runs ``sbatch``):
- ``qsub -J 0-1`` and ``qsub -t 0-1`` both become ``sbatch --array=0-1``; ``#PBS -J 0-1`` inside the
  script also works, because ``sbatch`` itself reads ``#PBS -N/-J/-l walltime/-v`` lines.
- The job gets NO PBS variables: ``PBS_ARRAY_INDEX``, ``PBS_ARRAYID``, ``PBS_O_WORKDIR`` and
  ``PBS_JOBID`` are all unset; the array index is only in ``SLURM_ARRAY_TASK_ID``. A PBS script must
  fall back to it (``${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-$SLURM_ARRAY_TASK_ID}}``).
- The job starts in the submit directory (real PBS starts in ``$HOME``); ``cd "$PBS_O_WORKDIR"`` with
  the variable unset is ``cd ""``, a no-op in bash.
- Output goes to ``SCRIPT.oJOBID.INDEX`` / ``SCRIPT.eJOBID.INDEX`` in the submit directory: ``#PBS -o``
  and ``-j`` are overridden by the ``-o``/``-e`` the wrapper always passes; with an array given only as
  ``#PBS -J`` every element writes the same ``SCRIPT.oJOBID``.
- ``-v VAR=value`` reaches the job (as ``--export=none,VAR=value``); ``-W depend=afterok:ID`` becomes
  ``--dependency=afterok:ID``. ``qsub`` prints just the job id.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from slurm_cluster import start_cluster

pytestmark = pytest.mark.slurm


def test_job_array_runs_every_element(slurm_cluster, tmp_path):
    payload = 'echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_JOB_ID" > el_$SLURM_ARRAY_TASK_ID'
    job = slurm_cluster.sbatch("--array=0-2", "--output=/dev/null", "--wrap", payload, cwd=tmp_path)
    states = slurm_cluster.wait_for(job, timeout=30)
    assert states == {f"{job}_{i}": "COMPLETED" for i in range(3)}
    for i in range(3):
        assert (tmp_path / f"el_{i}").read_text().split() == [str(i), job]


def test_dependency_on_failed_job_is_cancelled_not_left_pending(slurm_cluster, tmp_path):
    failing = slurm_cluster.sbatch("--output=/dev/null", "--wrap", "exit 3", cwd=tmp_path)
    dependent = slurm_cluster.sbatch(f"--dependency=afterok:{failing}", "--output=/dev/null",
                                     "--wrap", "touch never", cwd=tmp_path)
    states = slurm_cluster.wait_for([failing, dependent], timeout=30)
    assert states == {failing: "FAILED", dependent: "CANCELLED"}
    (failed,) = slurm_cluster.show_job(failing)
    assert failed["ExitCode"] == "3:0"
    (cancelled,) = slurm_cluster.show_job(dependent)
    assert cancelled["Reason"] == "DependencyNeverSatisfied"
    assert not (tmp_path / "never").exists()


def test_dependency_on_one_array_element(slurm_cluster, tmp_path):
    # Element 1 ends at once, elements 0 and 2 after 6 s: the dependent job must run in between.
    array = slurm_cluster.sbatch(
        "--array=0-2", "--output=/dev/null", "--wrap",
        '[ "$SLURM_ARRAY_TASK_ID" = 1 ] || sleep 6; touch done_$SLURM_ARRAY_TASK_ID', cwd=tmp_path)
    dependent = slurm_cluster.sbatch(f"--dependency=afterok:{array}_1", "--output=/dev/null",
                                     "--wrap", "ls done_* > seen", cwd=tmp_path)
    states = slurm_cluster.wait_for([array, dependent], timeout=30)
    assert set(states.values()) == {"COMPLETED"}, states
    assert (tmp_path / "seen").read_text().split() == ["done_1"]


def test_export_all_with_extra_variable(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch("--export=ALL,DRE_EXTRA=x", "--output=vars.txt",
                               "--wrap", 'echo "$DRE_EXTRA $DRE_FROM_SUBMITTER $SLURM_CONF"',
                               cwd=tmp_path, env={"DRE_FROM_SUBMITTER": "y"})
    assert slurm_cluster.wait_for(job) == {job: "COMPLETED"}
    assert (tmp_path / "vars.txt").read_text().split() == ["x", "y", str(slurm_cluster.conf)]


def test_job_starts_in_submit_directory_and_relative_output_lands_there(slurm_cluster, tmp_path):
    submit_dir = tmp_path / "submit"
    (submit_dir / "logs").mkdir(parents=True)
    job = slurm_cluster.sbatch("--output=logs/job_%j.out", "--error=logs/job_%j.err",
                               "--wrap", 'echo "$PWD $SLURM_SUBMIT_DIR"; echo oops >&2',
                               cwd=submit_dir)
    assert slurm_cluster.wait_for(job) == {job: "COMPLETED"}
    out = submit_dir / "logs" / f"job_{job}.out"
    assert out.read_text().split() == [str(submit_dir)] * 2
    assert (submit_dir / "logs" / f"job_{job}.err").read_text() == "oops\n"


def test_scancel_stops_a_running_job(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch("--output=/dev/null", "--wrap", "sleep 300; touch finished",
                               cwd=tmp_path)
    deadline = time.monotonic() + 20
    while slurm_cluster.states(job).get(job) != "RUNNING":
        assert time.monotonic() < deadline, slurm_cluster.states(job)
        time.sleep(0.1)
    started = time.monotonic()
    slurm_cluster.scancel(job)
    assert slurm_cluster.wait_for(job, timeout=15) == {job: "CANCELLED"}
    assert time.monotonic() - started < 15
    assert not (tmp_path / "finished").exists()


def _is_slurm_qsub() -> bool:
    qsub = shutil.which("qsub")
    if qsub is None:
        return False
    with open(qsub, "rb") as f:
        return b"sbatch" in f.read(200_000)


@pytest.mark.skipif(not _is_slurm_qsub(), reason="no qsub of slurm-wlm-torque (PBS wrapper on SLURM)")
def test_torque_qsub_array_on_slurm(slurm_cluster, tmp_path):
    """``qsub -J`` / ``-t`` arrays through slurm-wlm-torque: see the module docstring."""
    script = tmp_path / "pbs_job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#PBS -N dre_pbs\n"
        "#PBS -l walltime=00:05:00\n"
        'cd "$PBS_O_WORKDIR"\n'
        'idx=${PBS_ARRAY_INDEX:-${PBS_ARRAYID:-$SLURM_ARRAY_TASK_ID}}\n'
        'pro_done=$(ls pro_* 2>/dev/null | wc -l)\n'
        'echo "${PBS_ARRAY_INDEX-unset} ${PBS_ARRAYID-unset} ${PBS_O_WORKDIR-unset}'
        ' ${PBS_JOBID-unset} $SLURM_ARRAY_TASK_ID $pro_done $PWD" > "${VIA_V}_$idx"\n'
    )
    # -J (PBS Pro) and -t (Torque) arrays; -v passes the variable; -W depend orders the second.
    pro = slurm_cluster.run(["qsub", "-J", "0-1", "-v", "VIA_V=pro", str(script)],
                            cwd=tmp_path).stdout.strip()
    torque = slurm_cluster.run(["qsub", "-t", "0-1", "-v", "VIA_V=torque",
                                "-W", f"depend=afterok:{pro}", str(script)],
                               cwd=tmp_path).stdout.strip()
    assert pro.isdigit() and torque.isdigit(), (pro, torque)
    states = slurm_cluster.wait_for([pro, torque], timeout=30)
    assert states == {f"{j}_{i}": "COMPLETED" for j in (pro, torque) for i in range(2)}, states
    for i in range(2):
        # No PBS variable at all; the index is only in SLURM_ARRAY_TASK_ID; starts in the submit dir.
        pro_fields = (tmp_path / f"pro_{i}").read_text().split()
        assert pro_fields[:5] == ["unset", "unset", "unset", "unset", str(i)]
        assert pro_fields[6] == str(tmp_path)
        # The dependent array ran after both elements of the first had written their files.
        assert (tmp_path / f"torque_{i}").read_text().split() == \
            ["unset", "unset", "unset", "unset", str(i), "2", str(tmp_path)]
        for job in (pro, torque):
            assert (tmp_path / f"pbs_job.sh.o{job}.{i}").exists()
            assert (tmp_path / f"pbs_job.sh.e{job}.{i}").read_text() == ""


def test_second_cluster_starts_beside_and_stops_without_leaving_processes(slurm_cluster, tmp_path_factory):
    """A second cluster (new state directory, its own ports and munged) runs beside the session's
    one, and ``stop`` leaves none of its daemons behind."""
    state = tmp_path_factory.mktemp("slurm2")
    second = start_cluster(state)
    pid_files = [state / "run" / "slurmctld.pid", state / "run" / "slurmd.pid",
                 state / "munge" / "munged.pid"]
    try:
        pids = [int(p.read_text()) for p in pid_files]
        assert second.conf != slurm_cluster.conf
        job = second.sbatch("--output=/dev/null", "--wrap", "true", cwd=state)
        assert second.wait_for(job) == {job: "COMPLETED"}
    finally:
        second.stop()
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    assert not [p for p in pid_files if p.exists()]
    # The session's cluster is untouched.
    job = slurm_cluster.sbatch("--output=/dev/null", "--wrap", "true", cwd=state)
    assert slurm_cluster.wait_for(job) == {job: "COMPLETED"}
