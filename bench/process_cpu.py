"""CPU seconds spent by processes of this machine (Linux /proc), to tell a scenario's
cost per job apart from its rate: on a small machine the client, the broker and the
gateway share the cores, so a rate alone cannot say whose CPU a change saved."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
BROKER_COMMAND = "beam.smp"  # RabbitMQ's Erlang VM


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process `pid` (every thread); 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name is in parentheses and may hold spaces: split after its end.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def broker_pids() -> list[int]:
    """RabbitMQ's processes on this machine (none: the broker runs elsewhere)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == BROKER_COMMAND:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@dataclass
class CpuMeter:
    """CPU seconds of some processes between `start()` and `seconds()`."""

    pids: list[int]
    _start: float = 0.0

    @classmethod
    def of(cls, pids: Iterable[int]) -> CpuMeter:
        return cls(list(pids))

    def _total(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def start(self) -> None:
        self._start = self._total()

    def seconds(self) -> float:
        return self._total() - self._start
