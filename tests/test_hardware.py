"""hardware.py: the device names, the default thread count under contention, and the memory estimate."""

import pytest
import torch

import hardware
from cli import UserError
from model import GPT, preset_config


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine whose /proc/stat advances by the idle share given, over 100 jiffies per core."""
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(hardware, "usable_cores", lambda: 2)

    def machine(idle_cores):
        samples = iter([(0, 0), (100 * idle_cores, 200)])  # (idle, total) jiffies before and after
        monkeypatch.setattr(hardware, "_cpu_times", lambda: next(samples))
    return machine


@pytest.mark.parametrize("idle, threads", [(2.0, 2), (1.6, 2), (1.0, 1), (0.4, 1), (0.0, 1)])
def test_default_threads_are_the_idle_cores(two_cores, idle, threads):
    """One other busy program on 2 cores leaves 1 idle core: 1 thread, not 2 fighting it for a core."""
    two_cores(idle)
    before = torch.get_num_threads()
    try:
        assert hardware.set_cpu_threads(0) == threads == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_threads_asked_for_are_used_and_processes_share_the_cores(two_cores):
    before = torch.get_num_threads()
    try:
        two_cores(2.0)
        assert hardware.set_cpu_threads(0, local_processes=2) == 1
        assert hardware.set_cpu_threads(3) == 3  # what the user asks for, without looking
    finally:
        torch.set_num_threads(before)


def test_idle_cores_without_proc_is_every_core(monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_times", lambda: None)
    assert hardware.idle_cores(5, seconds=0) == 5


@pytest.mark.parametrize("name, message", [("tpu", "is not one of auto, cpu, cuda, cuda:N"), ("cuda0", "is not one of"),
                                           ("cuda:x", "is not one of")])
def test_device_names_are_checked(name, message):
    with pytest.raises(UserError, match=message):
        hardware.pick_device(name)


def test_cpu_and_auto_devices():
    assert hardware.pick_device("cpu") == "cpu"
    assert hardware.pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_memory_estimate_bounds_a_real_training_step():
    """The estimate is an upper bound: the parameters and Adam state alone, counted exactly, fit under it."""
    config = preset_config("cpu-tiny")
    params = GPT(config).num_params()["total"]
    estimate = hardware.training_memory_bytes(config, batch_size=12)
    assert 4 * 4 * params < estimate < 2**28  # above weights + grads + 2 moments, far below a machine's memory
    # activations grow with the tokens of a batch: 8x the context, at least 8x the activation part
    longer = preset_config("cpu-tiny", block_size=8 * config.block_size)
    assert hardware.training_memory_bytes(longer, 12) - estimate > 6 * (estimate - 4 * 4 * params)
