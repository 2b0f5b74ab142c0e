"""The fit job's bookkeeping without MPI, SExtractor or a fit: checkpoints, fitting units, the
MPI world check, the single-process communicator and the stop signals.

Fast (no model cube, no fit): `Checkpoint` part files (round trip over several parts and ranks,
parts of another identity, truncated and corrupt parts, units of the wrong size, leftover
``.tmp`` files, clear), `CheckpointPolicy` with a fake clock, `plan_units` / `phases`,
`check_world` / `open_comm`, `SerialComm` / `LocalCounter`, and `StopSignals` with real signals
sent to this process. The real MPI paths (`MpiComm`, `WorkCounter`, shared memory) run under
``mpirun`` in tests/test_mpi_worker.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np
import pytest

from dre_hpc.batch import comm as comm_module
from dre_hpc.batch.checkpoint import Checkpoint, CheckpointPolicy, identity_digest
from dre_hpc.batch.chunk_fit import StopSignals, phases, plan_units
from dre_hpc.batch.comm import LocalCounter, MpiMismatchError, SerialComm, check_world, open_comm

IDENTITY = identity_digest({"tile": "t", "bounds": [0, 12], "fit": {"statistic": "wls"}})


def _unit_columns(uid: int, n: int) -> dict:
    """Results of one unit: the column kinds of a fit (int flags, float64, a 2-D surface)."""
    rng = np.random.default_rng(uid)
    return {"FLAGS": np.arange(n, dtype=np.int64) + 10 * uid, "CHI2": rng.normal(size=n),
            "MODEL_IDX": rng.integers(0, 100, n), "SURFACE": rng.normal(size=(n, 7)).astype(np.float32)}


SIZES = {0: 4, 1: 4, 2: 3, 3: 1}            # uid -> objects of the chunk's units


def _same(found: dict, uids) -> None:
    assert sorted(found) == sorted(uids)
    for uid in uids:
        expected = _unit_columns(uid, SIZES[uid])
        assert set(found[uid]) == set(expected)
        for name, value in expected.items():
            assert found[uid][name].dtype == value.dtype, (uid, name)
            np.testing.assert_array_equal(found[uid][name], value, err_msg=f"{uid} {name}")


# -- Checkpoint ---------------------------------------------------------------------------------------

def test_identity_digest_is_canonical():
    assert identity_digest({"a": 1, "b": [1, 2]}) == identity_digest({"b": [1, 2], "a": 1})
    assert identity_digest({"a": 1}) != identity_digest({"a": 2})
    assert len(IDENTITY) == 64


def test_round_trip_over_several_parts_and_ranks(tmp_path):
    folder = tmp_path / "00000.ckpt"
    rank0, rank1 = Checkpoint(folder, IDENTITY, rank=0), Checkpoint(folder, IDENTITY, rank=1)
    assert rank0.save({}) is None and not folder.exists()          # nothing to save: no file
    first = rank0.save({0: _unit_columns(0, 4), 2: _unit_columns(2, 3)})
    second = rank0.save({3: _unit_columns(3, 1)})
    other = rank1.save({1: _unit_columns(1, 4)})
    assert first.name.startswith("part-r0000-") and first.name.endswith("-00000.npz")
    assert second.name.startswith("part-r0000-") and second.name.endswith("-00001.npz")
    assert other.name.startswith("part-r0001-")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (first, second, other))
    warnings = []
    found = Checkpoint(folder, IDENTITY, rank=0).load(SIZES, warn=warnings.append)   # a rerun
    assert warnings == []
    _same(found, [0, 1, 2, 3])
    # a later attempt (new token) adds parts beside the earlier ones, never over them
    again = Checkpoint(folder, IDENTITY, rank=0)
    assert again.token != rank0.token
    assert again.save({0: _unit_columns(0, 4)}) not in (first, second)
    _same(Checkpoint(folder, IDENTITY).load(SIZES, warn=warnings.append), [0, 1, 2, 3])
    assert warnings == []


def test_a_part_of_another_identity_is_ignored_with_a_warning(tmp_path):
    folder = tmp_path / "ckpt"
    Checkpoint(folder, IDENTITY).save({0: _unit_columns(0, 4)})
    changed = identity_digest({"tile": "t", "bounds": [0, 12], "fit": {"statistic": "dre"}})
    stale = Checkpoint(folder, changed, rank=1).save({1: _unit_columns(1, 4)})
    warnings = []
    found = Checkpoint(folder, IDENTITY).load(SIZES, warn=warnings.append)
    _same(found, [0])
    assert len(warnings) == 1 and str(stale) in warnings[0] and "another fit" in warnings[0]
    # and the other identity sees only its own part, reporting ours
    warnings.clear()
    _same(Checkpoint(folder, changed).load(SIZES, warn=warnings.append), [1])
    assert len(warnings) == 1 and "ignored" in warnings[0]


def test_truncated_and_corrupt_parts_are_ignored_with_a_warning_naming_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    good = Checkpoint(folder, IDENTITY, rank=0).save({0: _unit_columns(0, 4)})
    cut = Checkpoint(folder, IDENTITY, rank=1).save({1: _unit_columns(1, 4), 2: _unit_columns(2, 3)})
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])          # a half-written file
    garbage = folder / "part-r0002-deadbeef-00000.npz"
    garbage.write_bytes(b"not a zip file at all" * 20)
    empty = folder / "part-r0003-deadbeef-00000.npz"
    empty.write_bytes(b"")
    warnings = []
    found = Checkpoint(folder, IDENTITY).load(SIZES, warn=warnings.append)
    _same(found, [0])                              # the readable part only: 1 and 2 are refitted
    assert good.exists()
    for path in (cut, garbage, empty):
        assert sum(str(path) in w and "unreadable" in w for w in warnings) == 1, (path, warnings)
    assert len(warnings) == 3


def test_the_default_warning_goes_to_stderr(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "part-r0000-00000000-00000.npz").write_bytes(b"junk")
    assert Checkpoint(folder, IDENTITY).load(SIZES) == {}
    assert "part-r0000-00000000-00000.npz: unreadable" in capsys.readouterr().err


def test_a_unit_with_the_wrong_object_count_or_not_of_the_chunk_is_rejected(tmp_path):
    folder = tmp_path / "ckpt"
    Checkpoint(folder, IDENTITY, rank=0).save({0: _unit_columns(0, 4)})
    short = Checkpoint(folder, IDENTITY, rank=1).save({1: _unit_columns(1, 4), 2: _unit_columns(2, 2)})
    foreign = Checkpoint(folder, IDENTITY, rank=2).save({3: _unit_columns(3, 1), 9: _unit_columns(9, 1)})
    ragged = Checkpoint(folder, IDENTITY, rank=3).save({3: {"FLAGS": np.zeros(1), "CHI2": np.zeros(2)}})
    warnings = []
    found = Checkpoint(folder, IDENTITY).load(SIZES, warn=warnings.append)
    _same(found, [0])           # a bad unit refuses its whole part (units 1 and 3 are refitted)
    messages = {path: [w for w in warnings if str(path) in w] for path in (short, foreign, ragged)}
    assert all(len(m) == 1 for m in messages.values()), warnings
    assert "unit 2 holds the wrong number of objects" in messages[short][0]
    assert "unit 9 is not a unit of this chunk" in messages[foreign][0]
    assert "unit 3 holds the wrong number of objects" in messages[ragged][0]


def test_tmp_leftovers_are_ignored(tmp_path):
    folder = tmp_path / "ckpt"
    saved = Checkpoint(folder, IDENTITY).save({0: _unit_columns(0, 4)})
    # a part whose writer died before the rename: whole content, but under the temporary name
    leftover = Checkpoint(tmp_path / "elsewhere", IDENTITY).save({1: _unit_columns(1, 4)})
    os.replace(leftover, folder / "part-r0001-cafecafe-00000.npz.tmp")
    (folder / "part-r0002-cafecafe-00000.npz.tmp").write_bytes(b"half")
    warnings = []
    _same(Checkpoint(folder, IDENTITY).load(SIZES, warn=warnings.append), [0])
    assert warnings == [] and saved.exists()


def test_save_leaves_no_temporary_file_and_clear_removes_the_folder(tmp_path):
    folder = tmp_path / "chunks" / "t" / "00000.ckpt"
    checkpoint = Checkpoint(folder, IDENTITY)
    checkpoint.save({0: _unit_columns(0, 4)})
    assert [p.suffix for p in folder.iterdir()] == [".npz"]
    checkpoint.clear()
    assert not folder.exists() and folder.parent.is_dir()
    checkpoint.clear()                                           # twice: no error
    assert Checkpoint(folder, IDENTITY).load(SIZES, warn=pytest.fail) == {}    # nothing, no warning


# -- CheckpointPolicy ---------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_policy_by_time():
    clock = FakeClock()
    policy = CheckpointPolicy(300, None, clock=clock)
    assert not policy.due(10 ** 9)                   # no count limit: objects never make it due
    clock.now += 299.9
    assert not policy.due(1)
    clock.now += 0.1
    assert policy.due(0) and policy.due(1)
    policy.written()
    assert not policy.due(1)
    clock.now += 300
    assert policy.due(1)


def test_policy_by_count_and_never():
    clock = FakeClock()
    policy = CheckpointPolicy(0, 5, clock=clock)      # 0 s: never by time
    assert not policy.due(4) and policy.due(5) and policy.due(6)
    clock.now += 10 ** 9
    assert not policy.due(4)
    never = CheckpointPolicy(0, None, clock=clock)
    clock.now += 10 ** 9
    assert not never.due(10 ** 9)
    both = CheckpointPolicy(60, 100, clock=clock)
    assert not both.due(99) and both.due(100)
    clock.now += 60
    assert both.due(0)


def test_policy_default_clock_is_monotonic_seconds():
    assert not CheckpointPolicy(3600, None).due(10 ** 6)
    quick = CheckpointPolicy(0.01, None)
    assert _wait_for(lambda: quick.due(0))                    # the real clock moves on


# -- plan_units and phases ----------------------------------------------------------------------------

def _check_plan(ext, lo, batch_size):
    units = plan_units(ext, lo, batch_size)
    ext = np.asarray(ext)
    covered = np.concatenate([u.first + u.index for u in units]) if units else np.array([], int)
    # every object of [lo, lo + n) in exactly one unit
    assert np.array_equal(np.sort(covered), lo + np.arange(ext.size))
    keys = []
    for position, unit in enumerate(units):
        assert unit.uid == position and unit.size == unit.index.size > 0
        tile_index = unit.first + unit.index
        batch = tile_index // batch_size
        assert (batch == batch[0]).all(), "a unit crosses a tile-global batch boundary"
        assert (ext[tile_index - lo] == unit.ext).all(), "a unit crosses an extension"
        b = int(batch[0])
        assert unit.first == max(b * batch_size, lo)
        assert unit.stop == min((b + 1) * batch_size, lo + ext.size)
        assert (unit.index >= 0).all() and (unit.index < unit.stop - unit.first).all()
        assert np.all(np.diff(unit.index) > 0)                     # in tile order within the unit
        keys.append((unit.ext, b))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)    # uid order = (ext, batch) order
    return units


def test_plan_units_of_a_chunk_starting_mid_batch():
    ext = [2, 1, 1, 2, 1, 2, 2, 2, 1, 3, 1]           # objects 6..16 of the tile, batch size 4
    units = _check_plan(ext, 6, 4)
    assert [(u.ext, u.first, u.stop, u.index.tolist()) for u in units] == [
        (1, 6, 8, [1]),                  # batch [4, 8) but the chunk starts at 6: object 7
        (1, 8, 12, [0, 2]),              # objects 8, 10
        (1, 12, 16, [2]),                # object 14
        (1, 16, 17, [0]),                # object 16: the chunk ends inside batch [16, 20)
        (2, 6, 8, [0]),                  # object 6
        (2, 8, 12, [1, 3]),              # objects 9, 11
        (2, 12, 16, [0, 1]),             # objects 12, 13
        (3, 12, 16, [3]),                # object 15
    ]


@pytest.mark.parametrize("lo,batch_size,seed", [(0, 4, 1), (6, 4, 2), (255, 256, 3), (1000, 7, 4),
                                                (3, 1, 5), (0, 1000, 6)])
def test_plan_units_properties(lo, batch_size, seed):
    rng = np.random.default_rng(seed)
    ext = rng.integers(1, 5, size=int(rng.integers(1, 60)))
    _check_plan(ext, lo, batch_size)


def test_plan_units_of_nothing_and_of_one_extension():
    assert plan_units(np.array([], dtype=int), 10, 4) == []
    units = _check_plan([1] * 10, 4, 4)                 # aligned: 4..7, 8..11, 12..13
    assert [(u.first, u.stop, u.size) for u in units] == [(4, 8, 4), (8, 12, 4), (12, 14, 2)]


def test_phases_group_units_by_extension_in_order():
    units = plan_units([3, 1, 1, 3, 2, 1, 3, 3], 0, 2)
    grouped = phases(units)
    assert [ext for ext, _ in grouped] == [1, 2, 3]
    assert [u for _, group in grouped for u in group] == units        # same units, same order
    for ext, group in grouped:
        assert all(u.ext == ext for u in group)
        assert [u.uid for u in group] == sorted(u.uid for u in group)
    assert phases([]) == []


# -- the MPI world check and the single-process communicator --------------------------------------------

def test_check_world_accepts_a_matching_world():
    check_world(1, None, None)
    check_world(1, 1, None)
    check_world(4, 4, 4)
    check_world(4, None, 4)


def test_check_world_against_the_requested_ranks():
    with pytest.raises(MpiMismatchError) as info:
        check_world(1, 2, None)
    text = str(info.value)
    assert "asked for 2 MPI ranks" in text and "world of 1" in text
    assert "container/host MPI mismatch" in text


def test_check_world_against_the_launcher():
    with pytest.raises(MpiMismatchError) as info:
        check_world(1, None, 4)                  # every rank "rank 0 of 1": the wrong MPI library
    text = str(info.value)
    assert "launcher started 4 ranks" in text and "world of 1" in text
    assert "container/host MPI mismatch" in text
    with pytest.raises(MpiMismatchError, match="asked for 2"):
        check_world(4, 2, 4)


LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID",
                 "SLURM_NTASKS", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID",
                 "PMIX_RANK", "SLURM_STEP_NUM_TASKS")


@pytest.fixture
def fresh_comm(monkeypatch):
    """No MPI launcher in the environment and no communicator opened yet (restored after)."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(comm_module, "_COMM", None)
    return monkeypatch


def test_open_comm_without_a_launcher_is_serial_and_never_imports_mpi4py(fresh_comm):
    fresh_comm.setitem(sys.modules, "mpi4py", None)          # importing it would fail
    fresh_comm.setenv("SLURM_LOCALID", "3")                   # srun's node-local rank
    comm = open_comm(1)
    assert isinstance(comm, SerialComm) and comm.local_rank == 3
    assert open_comm() is comm and open_comm(1) is comm       # one per process
    with pytest.raises(MpiMismatchError, match="asked for 2"):
        open_comm(2)                                          # the cached world is still checked


def test_open_comm_for_several_ranks_without_mpi4py_says_how_to_fix(fresh_comm):
    fresh_comm.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(MpiMismatchError) as info:
        open_comm(2)
    assert "asks for 2 MPI ranks" in str(info.value) and "pip install mpi4py" in str(info.value)


def test_open_comm_sees_a_launcher_of_another_size(fresh_comm):
    fresh_comm.setattr(comm_module, "_COMM", SerialComm())   # e.g. a world of 1 from the wrong MPI
    fresh_comm.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(MpiMismatchError, match="launcher started 2 ranks"):
        open_comm()


def test_serial_comm():
    comm = SerialComm()
    assert (comm.rank, comm.size, comm.node_rank, comm.node_size, comm.local_rank) == (0, 1, 0, 1, 0)
    assert SerialComm(local_rank=2).local_rank == 2
    comm.barrier()
    payload = {"a": [1, 2]}
    assert comm.bcast(payload) is payload and comm.gather(payload) == [payload]
    assert comm.any(True) is True and comm.any(0) is False and comm.any("x") is True
    array = comm.shared_array((3, 4), np.float32)
    assert array.shape == (3, 4) and array.dtype == np.float32
    with pytest.raises(SystemExit) as info:
        comm.abort(7)
    assert info.value.code == 7
    assert isinstance(comm.counter(2), LocalCounter)


def test_local_counter():
    counter = comm_module.LocalCounter(2)
    assert [counter.next(0) for _ in range(3)] == [0, 1, 2]
    assert counter.next(1) == 0 and counter.next(0) == 3          # slots count independently
    assert not counter.stopped()
    counter.request_stop()
    assert counter.stopped()
    counter.request_stop()
    assert counter.stopped() and counter.next(1) == 1             # stop does not reset counting
    counter.free()


# -- StopSignals ----------------------------------------------------------------------------------------

def _wait_for(predicate, seconds=5.0):
    """Python runs a signal handler between bytecodes of the main thread: give it a moment."""
    import time
    end = time.monotonic() + seconds
    while not predicate() and time.monotonic() < end:
        time.sleep(0.001)
    return predicate()


@pytest.fixture
def previous_handlers():
    """Known handlers for SIGTERM and SIGUSR1 before each test; pytest's own are restored after."""
    seen = []
    handlers = {sig: (lambda signum, frame: seen.append(signum)) for sig in StopSignals.SIGNALS}
    saved = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    yield handlers, seen
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signals_record_the_signal_and_restore_the_handlers(previous_handlers, sig):
    handlers, seen = previous_handlers
    with StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), sig)
        assert _wait_for(lambda: stop.received is not None)
        assert stop.received == signal.Signals(sig).name
        other = signal.SIGTERM if sig == signal.SIGUSR1 else signal.SIGUSR1
        os.kill(os.getpid(), other)                        # a second signal: the first is kept
        _wait_for(lambda: False, 0.05)
        assert stop.received == signal.Signals(sig).name
    assert seen == []                                      # the process survived, nobody else saw it
    for s, handler in handlers.items():
        assert signal.getsignal(s) is handler
    os.kill(os.getpid(), sig)                              # after exit: the previous handler again
    assert _wait_for(lambda: seen == [sig])
    assert stop.received == signal.Signals(sig).name


def test_stop_signals_restore_the_handlers_after_an_exception(previous_handlers):
    handlers, _ = previous_handlers
    with pytest.raises(RuntimeError):
        with StopSignals():
            assert signal.getsignal(signal.SIGTERM) is not handlers[signal.SIGTERM]
            raise RuntimeError("fit failed")
    assert all(signal.getsignal(s) is h for s, h in handlers.items())


def test_stop_signals_outside_the_main_thread_install_nothing(previous_handlers):
    handlers, _ = previous_handlers
    out = {}

    def body():
        with StopSignals() as stop:
            out["handlers"] = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
            out["received"] = stop.received

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert out == {"handlers": handlers, "received": None}


def test_a_part_with_a_flipped_byte_is_refused(tmp_path):
    """A part whose bytes changed on disk (not a torn write: same size, every record readable)
    is refused: the zip format's CRC of each array is why parts are .npz files."""
    folder = tmp_path / "ckpt"
    part = Checkpoint(folder, IDENTITY, rank=0).save({0: _unit_columns(0, 4)})
    raw = bytearray(part.read_bytes())
    offset = raw.index(b"u0.SURFACE.npy")       # its local header's name; then the .npy header (128)
    raw[offset + len(b"u0.SURFACE.npy") + 128 + 40] ^= 0x40      # a byte of the surface's values
    assert len(raw) == part.stat().st_size
    part.write_bytes(bytes(raw))
    warnings = []
    assert Checkpoint(folder, IDENTITY).load(SIZES, warn=warnings.append) == {}
    assert len(warnings) == 1 and "unreadable" in warnings[0]
