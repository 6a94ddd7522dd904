"""How many threads torch gets on CPU for ``hf-cb``: every usable core on an idle machine, else one fewer.

Between operators the batching thread's OpenMP workers spin-wait for each other, so one worker descheduled by another
process stalls the whole pool at every operator; ``CoreGovernor`` follows the machine's load to avoid that.
``OMP_NUM_THREADS`` in the environment fixes the number instead (measurements: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# torch's own choice before this module lowers it (physical cores, where it can tell): the most the pool gets.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def usable_cpus() -> set[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def leave_a_core_for_the_server() -> int:
    """On CPU, give torch's intra-op pool one core fewer than this process may use (at least one); return its size.

    The batching thread is the only thread that runs the model, and its idle OpenMP workers spin between operators:
    with every core in the pool, they take the core that the server's event loop, the streams and the clients need
    (vLLM's CPU backend reserves a core for the same reason). ``OMP_NUM_THREADS`` in the environment wins.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(TORCH_DEFAULT_THREADS, len(usable_cpus()) - 1)))
    return torch.get_num_threads()


def busy_seconds(cpus: set[int], stat: Path = Path("/proc/stat")) -> float | None:
    """Time ``cpus`` have spent busy since boot (neither idle nor waiting for I/O; stolen time counts as busy), in
    seconds; None where there is no ``/proc/stat``."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines[1:]:  # the first line sums every CPU of the machine
        name, *fields = line.split()
        if not name.startswith("cpu"):
            break
        if int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(field) for field in fields[:8])
            ticks += user + nice + system + irq + softirq + steal
    return ticks / CLOCK_TICKS


def own_seconds() -> float:
    """CPU time this process has used, every thread of it, in seconds."""
    times = os.times()
    return times.user + times.system


class CoreGovernor:
    """Picks torch's thread count from what other processes take of this process's CPUs, measured each ``interval``.

    ``sample`` is cheap between measurements (a clock read), so it can run before every model step.
    """

    def __init__(
        self,
        cpus: set[int],
        most: int,
        *,
        interval: float = 1.0,
        busy_above: float = 0.33,
        quiet_below: float = 0.2,
        quiet_samples: int = 3,
        busy: Callable[[set[int]], float | None] = busy_seconds,
        own: Callable[[], float] = own_seconds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cpus, self.most, self.fewest = cpus, most, max(1, most - 1)
        # One core short at first; back there as soon as other processes take ``busy_above`` of a core on these CPUs
        # (/proc/stat less this process's own CPU time), and up to ``most`` after ``quiet_samples`` quiet intervals.
        self.threads = self.fewest
        self.interval = interval
        self.busy_above, self.quiet_below, self.quiet_samples = busy_above, quiet_below, quiet_samples
        self._busy, self._own, self._clock = busy, own, clock
        self._at, self._busy_then, self._own_then = clock(), busy(cpus) or 0.0, own()
        self._quiet = 0
        self.others = 0.0  # cores the other processes took over the last interval

    def sample(self) -> int:
        """The thread count to use now; measures the machine again if ``interval`` has passed."""
        now = self._clock()
        if now - self._at < self.interval:
            return self.threads
        busy, own = self._busy(self.cpus), self._own()
        if busy is None:
            return self.threads
        self.others = max(0.0, (busy - self._busy_then) - (own - self._own_then)) / (now - self._at)
        self._at, self._busy_then, self._own_then = now, busy, own
        if self.others >= self.busy_above:
            self._quiet = 0
            self._set(self.fewest)
        elif self.others < self.quiet_below:
            self._quiet += 1
            if self._quiet >= self.quiet_samples:
                self._set(self.most)
        else:  # neither busy nor quiet: keep the count, and start counting quiet seconds again
            self._quiet = 0
        return self.threads

    def _set(self, threads: int) -> None:
        if threads != self.threads:
            logger.info(
                "torch threads %d -> %d: other processes took %.2f of this process's %d cores",
                self.threads,
                threads,
                self.others,
                len(self.cpus),
            )
            self.threads = threads


def governed_threads(model: torch.nn.Module) -> CoreGovernor | None:
    """On CPU, let a ``CoreGovernor`` set the thread count of the thread that runs ``model``, before each forward
    pass (the count is the calling thread's own in OpenMP); None where ``OMP_NUM_THREADS`` fixes it, there is one
    CPU, or no ``/proc/stat`` to read."""
    cpus = usable_cpus()
    most = min(TORCH_DEFAULT_THREADS, len(cpus))
    if "OMP_NUM_THREADS" in os.environ or most < 2 or busy_seconds(cpus) is None:
        return None
    governor = CoreGovernor(cpus, most)

    def before_forward(module, args) -> None:
        threads = governor.sample()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    model.register_forward_pre_hook(before_forward)
    return governor
