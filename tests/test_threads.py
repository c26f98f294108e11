"""The CLI's OpenMP wait policy (threads.py): passive on a busy machine, the user's own
settings never changed, and nothing changed once torch has loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from come.settings.threads import available_cores, others_running, wait_policy

PROBE = "import os, come.cli.app; print(os.environ.get('OMP_WAIT_POLICY'), come.cli.app._WAIT_POLICY[1])"


def test_wait_policy_rule():
    assert wait_policy(0, 2, {}) is None                # idle: OpenMP's default (spin a while)
    assert wait_policy(1, 2, {}) == "PASSIVE"           # one other process on two cores
    assert wait_policy(1, 4, {}) is None
    assert wait_policy(2, 4, {}) == "PASSIVE"
    for knob in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        assert wait_policy(8, 2, {knob: "1"}) is None    # the user's choice stands


@contextmanager
def busy_processes(n: int):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _probe(env_extra: dict[str, str], code: str = PROBE) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], env={**env, **env_extra}, capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="needs Linux /proc/loadavg")
def test_busy_machine_gets_passive_waiting_and_user_settings_stand():
    n = available_cores()
    with busy_processes(n):
        assert others_running() >= 1
        assert _probe({}).startswith("PASSIVE OpenMP wait policy: passive")
        assert _probe({"OMP_WAIT_POLICY": "ACTIVE"}).startswith("ACTIVE ")
        assert _probe({"OMP_NUM_THREADS": "1"}).startswith("None OpenMP wait policy: as set, OMP_NUM_THREADS=1")
        # torch already loaded (the Python API, tests): too late to matter, so nothing is set
        out = _probe({}, "import torch; " + PROBE)
        assert out.startswith("None OpenMP wait policy: unchanged (torch already loaded)")
