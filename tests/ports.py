"""Local TCP ports for the tests that start several processes."""
from __future__ import annotations

import random
import socket

#: Below Linux's ephemeral range (32768-60999 by default) and inside the range of ports
#: that ``distributed.port_from_job_id`` derives from SLURM job ids.
PORT_RANGE = range(10000, 30000)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports of :data:`PORT_RANGE` that are free now.

    Outside the ephemeral range, a port handed out here cannot be taken by the connections
    that the processes open meanwhile (gloo pairs, store clients get ephemeral ports), so
    a test may pick all its ports first and use them one after another. Drawn from the
    system's random source: repeated calls, in one process or in parallel ones, differ.
    """
    ports: list[int] = []
    for candidate in random.SystemRandom().sample(PORT_RANGE, 400):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        ports.append(candidate)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"fewer than {n} free ports in [{PORT_RANGE.start}, {PORT_RANGE.stop})")
