"""cli.py: the device names, the default thread count under contention, and a closed output pipe."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
from cli import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine whose /proc/stat advances by the idle share given, over 100 jiffies per core."""
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cli, "usable_cores", lambda: 2)

    def machine(idle_cores):
        samples = iter([(0, 0), (100 * idle_cores, 200)])  # (idle, total) jiffies before and after
        monkeypatch.setattr(cli, "_cpu_times", lambda: next(samples))
    return machine


@pytest.mark.parametrize("idle, threads", [(2.0, 2), (1.6, 2), (1.0, 1), (0.4, 1), (0.0, 1)])
def test_default_threads_are_the_idle_cores(two_cores, idle, threads):
    """One other busy program on 2 cores leaves 1 idle core: 1 thread, not 2 fighting it for a core."""
    two_cores(idle)
    before = torch.get_num_threads()
    try:
        assert cli.set_threads(0) == threads == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_threads_asked_for_are_used_and_processes_share_the_cores(two_cores):
    before = torch.get_num_threads()
    try:
        two_cores(2.0)
        assert cli.set_threads(0, local_processes=2) == 1
        two_cores(0.0)
        assert cli.set_threads(2) == 2  # what the user asks for, busy cores or not
        with pytest.raises(UserError, match="up to the 2 cores this process may use, got 3"):
            cli.set_threads(3)
    finally:
        torch.set_num_threads(before)


def test_idle_cores_without_proc_is_every_core(monkeypatch):
    monkeypatch.setattr(cli, "_cpu_times", lambda: None)
    assert cli.idle_cores(5, seconds=0) == 5


@pytest.mark.parametrize("name, message", [("tpu", "is not one of auto, cpu, cuda, cuda:N"), ("cuda0", "is not one of"),
                                           ("cuda:x", "is not one of")])
def test_device_names_are_checked(name, message):
    with pytest.raises(UserError, match=message):
        cli.pick_device(name)


def test_cpu_and_auto_devices():
    assert cli.pick_device("cpu") == "cpu"
    assert cli.pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_reader_that_goes_away_ends_the_script_quietly(tmp_path):
    """`python tools/exercises.py list | head -1`: the closed pipe stops the script without a traceback."""
    script = tmp_path / "many_lines.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport cli\n"
                      "cli.run(lambda: [print(i) for i in range(1_000_000)])\n")
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"0\n"
    process.stdout.close()  # what head does once it has its line
    stderr = process.communicate(timeout=60)[1].decode()
    assert process.returncode == 1 and stderr == ""


def test_write_atomic_writes_whole_files_and_fails_in_one_line(tmp_path):
    """Text and bytes land whole; a folder that cannot exist (a file stands there) is one UserError with the fix."""
    cli.write_atomic(tmp_path / "a" / "text.json", "{}\n", fix="unused")
    cli.write_atomic(tmp_path / "a" / "data.bin", b"\x00\xff", fix="unused")
    assert (tmp_path / "a" / "text.json").read_text() == "{}\n"
    assert (tmp_path / "a" / "data.bin").read_bytes() == b"\x00\xff"
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(UserError, match=r"could not write .*: pick another --out$"):
        cli.write_atomic(blocker / "out.json", "{}", fix="pick another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "not_a_folder"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["data.bin", "text.json"]  # no temp file left
