"""torch's CPU threads for hf-cb: one core short while anything else is busy, every core while the machine is quiet.

The governor's arithmetic runs on a fake clock and fake CPU counters; reading ``/proc/stat`` runs against the real
machine with a real busy process beside it (fault injection: a neighbour that keeps a core busy).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from tripod.engines import cpu_threads
from tripod.engines.cpu_threads import CoreGovernor, busy_seconds, governed_threads, leave_a_core_for_the_server


def test_torch_leaves_a_core_to_the_server_unless_omp_num_threads_says(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(cpu_threads, "TORCH_DEFAULT_THREADS", 4)
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert leave_a_core_for_the_server() == 4
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert leave_a_core_for_the_server() == 3
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
        assert leave_a_core_for_the_server() == 1
    finally:
        torch.set_num_threads(before)


class Machine:
    """A fake clock and CPU counters: ``run(seconds, others, own)`` advances them as if other processes and this
    one had kept that many cores busy."""

    def __init__(self) -> None:
        self.now, self.busy, self.own, self.reads = 100.0, 5000.0, 40.0, 0

    def run(self, seconds: float, others: float, own: float = 1.0) -> None:
        self.now += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own

    def read_busy(self, cpus) -> float:
        self.reads += 1
        return self.busy

    def governor(self, most: int = 2) -> CoreGovernor:
        return CoreGovernor(
            {0, 1}, most, busy=self.read_busy, own=lambda: self.own, clock=lambda: self.now, interval=1.0
        )


def test_the_pool_grows_after_three_quiet_seconds_and_shrinks_at_once_when_a_neighbour_is_busy():
    machine = Machine()
    governor = machine.governor()
    assert governor.sample() == 1  # it starts one core short
    for expected in (1, 1, 2):  # this process busy on 1.5 cores; the rest of the machine nearly idle
        machine.run(1.0, others=0.05, own=1.5)
        assert governor.sample() == expected
    machine.run(1.0, others=0.5, own=1.5)  # a neighbour takes half a core
    assert governor.sample() == 1
    assert governor.others == pytest.approx(0.5)
    counts = []
    for others in (0.1, 0.25, 0.0, 0.0):  # 0.25: neither busy nor quiet, and the quiet count starts again
        machine.run(1.0, others=others)
        counts.append(governor.sample())
    assert counts == [1, 1, 1, 1]
    machine.run(1.0, others=0.0)
    assert governor.sample() == 2


def test_the_governor_reads_the_counters_once_an_interval_and_not_before():
    machine = Machine()
    governor = machine.governor()
    reads = machine.reads
    for _ in range(300):  # 300 steps of 5 ms: one and a half intervals
        machine.run(0.005, others=0.9)
        governor.sample()
    assert machine.reads == reads + 1  # one measurement, when the first second had passed
    assert governor.others == pytest.approx(0.9)


def test_busy_seconds_counts_only_this_process_cpus_and_not_idle_or_io_wait(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  900 0 900 900 900 0 0 0 0 0\n"
        "cpu0 100 10 20 5000 700 1 2 3 0 0\n"
        "cpu1 400 0 0 9000 0 0 0 0 0 0\n"
        "cpu2 50 0 50 100 0 0 0 0 0 0\n"
        "intr 12345\n"
    )
    ticks = cpu_threads.CLOCK_TICKS
    assert busy_seconds({0, 2}, stat) == pytest.approx((100 + 10 + 20 + 1 + 2 + 3 + 50 + 50) / ticks)
    assert busy_seconds({1}, tmp_path / "missing") is None


def test_a_busy_neighbour_on_this_machine_is_seen(tmp_path):
    """Real counters: a process spinning beside this one takes most of a core, and the governor sees it."""
    if busy_seconds(cpu_threads.usable_cpus()) is None:
        pytest.skip("no /proc/stat on this system")
    governor = CoreGovernor(cpu_threads.usable_cpus(), 2, interval=1.0)
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        governor._at = 0.0  # measure from here, with the neighbour running
        governor.sample()
        time.sleep(1.2)
        assert governor.sample() == 1
        assert governor.others >= 0.5, governor.others
    finally:
        neighbour.kill()
        neighbour.wait()


def test_the_thread_that_runs_the_model_gets_the_governors_count(monkeypatch):
    """The count is the calling thread's own in OpenMP, so the hook sets it before each forward pass on the thread
    that runs the model; OMP_NUM_THREADS turns the governor off."""
    monkeypatch.setattr(cpu_threads, "TORCH_DEFAULT_THREADS", 2)
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: {0, 1})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert governed_threads(torch.nn.Linear(4, 4)) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    model = torch.nn.Linear(4, 4)
    governor = governed_threads(model)
    assert governor is not None and (governor.fewest, governor.most) == (1, 2)
    monkeypatch.setattr(governor, "sample", lambda: 2)
    seen = []

    def run() -> None:
        torch.set_num_threads(1)
        model(torch.ones(1, 4))
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    try:
        runner = threading.Thread(target=run)
        runner.start()
        runner.join()
    finally:
        torch.set_num_threads(before)
    assert seen == [2]
