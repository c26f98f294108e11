"""How torch's CPU threads wait, chosen once before torch loads (the CLI's start).

torch's CPU kernels run on OpenMP threads that, between parallel regions, SPIN for a while
before they sleep. On an idle machine that is the fast choice. On a shared one (other
processes runnable), a spinning thread holds a core another process needs and the run's
own threads wait for each other behind it: SmolLM2 at 25% on a 2-core machine took
24.7 s idle but 108.7 s beside two busy processes with spinning threads, and 49.3 s with
OMP_WAIT_POLICY=PASSIVE (BENCHMARKS.md, "The quickstart's time"). Passive waiting costs
about 14% idle (28.1 s), so it is chosen only when other processes are running when
the command starts.
OMP_WAIT_POLICY / GOMP_SPINCOUNT / OMP_NUM_THREADS set by the user are never changed.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

_USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def others_running(samples: int = 5) -> float | None:
    """How many OTHER processes are runnable now: the median of a few reads of the kernel's
    running count (/proc/loadavg's 4th field, which includes this process), None where there
    is none. Not the load average: it lags by minutes and counts this command's own past."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return None
        if i < samples - 1:
            time.sleep(0.01)
    return statistics.median(counts)


def wait_policy(others: float, cores: int, environ: dict[str, str]) -> str | None:
    """The OMP_WAIT_POLICY to set: PASSIVE when other processes already occupy at least half
    the cores, None (leave OpenMP's default) when idle or when the user chose a policy, a
    spin count or a thread count."""
    if any(k in environ for k in (*_USER_KNOBS, "OMP_NUM_THREADS")):
        return None
    return "PASSIVE" if others >= 0.5 * cores else None


def choose_wait_policy() -> tuple[bool, str]:
    """Set OMP_WAIT_POLICY before torch loads, as `wait_policy` decides. Returns whether it
    set one, and the log line that says what was decided and why."""
    if "torch" in sys.modules:
        return False, "OpenMP wait policy: unchanged (torch already loaded)"
    cores, others = available_cores(), others_running()
    if others is None:
        return False, "OpenMP wait policy: default (no /proc/loadavg to tell a busy machine)"
    load = f"{others:g} other processes running on {cores} cores"
    policy = wait_policy(others, cores, dict(os.environ))
    if policy is None:
        chosen = next((f"{k}={os.environ[k]}" for k in (*_USER_KNOBS, "OMP_NUM_THREADS") if k in os.environ), None)
        return False, f"OpenMP wait policy: {'as set, ' + chosen if chosen else 'default (spin)'}; {load}"
    os.environ["OMP_WAIT_POLICY"] = policy
    return True, (f"OpenMP wait policy: passive, since the machine is busy ({load}); "
            "set OMP_WAIT_POLICY or OMP_NUM_THREADS to choose")
