"""The launcher's pure parts: node names and how a process died."""

import os
import signal
import socket

import pytest

from explainctl.local import launcher
from explainctl.spec.errors import InvalidInput


def test_node_names_are_unique_per_slurm_job_step_and_process(monkeypatch):
    host = socket.gethostname()
    for name in ("SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    assert launcher.node_name() == f"explain-pid{os.getpid()}@{host}"
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    assert launcher.node_name() == f"explain-slurm4711@{host}"
    monkeypatch.setenv("SLURM_STEP_ID", "2")
    assert launcher.node_name("gpu-pool") == f"gpu-pool-slurm4711.2@{host}"


def test_a_death_is_described_in_words():
    assert launcher._how(-signal.SIGKILL) == "killed by SIGKILL"
    assert launcher._how(75) == "exited with code 75"


def test_gpus_none_asks_for_one_process_on_the_cpu():
    assert launcher.parse_gpus("none") == launcher.parse_gpus(None) == []
    assert launcher.parse_gpus("0,1") == ["0", "1"]
    with pytest.raises(InvalidInput):
        launcher.parse_gpus("nothing")
