"""
tools/exercises.py: every exercise names real functions that keep a docstring in a handout; `check`
tells PASS, FAIL and WAIT apart however long a failure's report; `start` and `reset` never lose a
student's work; `grade` runs the reference's own tests on a student's function bodies and writes JSON;
a handout lists only its own exercises as started.

The round trip (STLM_EXERCISE_ROUND_TRIP=1, as .ci/run sets; a few minutes on 2 cores) runs the marked
tests of every exercise once on the reference (all pass), each exercise's marked tests once with it
started (all fail, at its stub), and the whole suite once in a handout with every exercise started
(every failure is at a stub). Everything runs in temp copies of the working tree committed to a fresh
git repository there: the real checkout is never touched. In a handout (no git history) these skip.
"""

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import exercises
from tools.exercises import EXERCISES

ROOT = Path(__file__).resolve().parent.parent
ALL = ",".join(map(str, EXERCISES))

round_trip = pytest.mark.skipif(os.environ.get("STLM_EXERCISE_ROUND_TRIP") != "1",
                                reason="the exercises' round trip runs every exercise's tests started and a handout's "
                                       "whole suite (minutes): .ci/run runs it; set STLM_EXERCISE_ROUND_TRIP=1 to run it")
pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists()
                                or any(exercises.state(n, ROOT) == "started" for n in EXERCISES),
                                reason="a handout, or exercises started: these tests need the reference code")


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True).stdout


def run_exercises(folder, *args):
    return subprocess.run([sys.executable, "tools/exercises.py", *args], cwd=folder, capture_output=True, text=True)


def file_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(folder).rglob("*") if p.is_file() and ".git" not in p.relative_to(folder).parts
            and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A copy of the working tree (tracked and untracked files, not ignored ones), committed to git there."""
    folder = tmp_path_factory.mktemp("reference") / "stlm"
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes((ROOT / name).read_bytes())
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "-c", "user.name=exercises", "-c", "user.email=exercises@localhost", "commit", "-q", "-m", "reference")
    return folder


@pytest.fixture(scope="module")
def work(reference, tmp_path_factory):
    """A clone of the reference copy to start and reset exercises in."""
    folder = tmp_path_factory.mktemp("work") / "stlm"
    subprocess.run(["git", "clone", "-q", str(reference), str(folder)], check=True)
    return folder


def test_every_exercise_names_real_functions_that_keep_a_docstring():
    """The stub keeps a function's signature and docstring: the docstring is the handout's spec."""
    for number, exercise in EXERCISES.items():
        tree = ast.parse((ROOT / exercise.file).read_text())
        for function in exercise.functions:
            node = exercises._find(tree, function, exercise.file)
            assert exercises._is_docstring(node.body[0]), f"exercise {number}: {function} has no docstring"


def record(name, outcome="passed", graded=(5,), text="", message=""):
    return {"id": f"tests/t.py::{name}", "outcome": outcome, "exercises": list(graded), "text": text,
            "message": message}


def a_long_report(stub_line):
    """A subprocess's traceback deep inside a long assertion message, as a test that runs a script reports it."""
    return "AssertionError: train.py failed\n" + "  File \"x.py\", line 1, in f\n" * 400 + stub_line + "\n"


def test_check_counts_pass_fail_and_wait_and_finds_a_stub_however_long_the_report(monkeypatch, capsys):
    records = [record("a"), record("b", "failed", text=a_long_report(
                   'NotImplementedError: exercise 3: write GPT.num_params (EXERCISES.md)')),
               record("c", "failed", text="NotImplementedError: exercise 5: write time_split (EXERCISES.md)"),
               record("d", "failed", message="AssertionError: 1 != 2"), record("e", "skipped", message="no GPT-2 files")]

    def fake_pytest(root, args, on_test=None, timeout=None):
        assert args == ["tests", "--exercise=5"]
        for r in records:
            on_test(r, len(records))
        return records

    monkeypatch.setattr(exercises, "run_pytest", fake_pytest)
    assert not exercises.check([5])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ")[1].split()[0] for line in lines[1:-1]] == ["PASS", "WAIT", "FAIL", "FAIL", "SKIP"]
    assert lines[1].startswith("[1/5] PASS  tests/t.py::a") and "stops at the stub of exercise 3" in lines[2]
    assert "exercise 5: not written yet" in lines[3] and lines[4].endswith("AssertionError: 1 != 2")
    assert lines[-1] == "exercise 5: not done: 1 of 5 tests pass, 2 fail, 1 wait for exercise 3, 1 skipped"
    # an exercise whose own tests pass and whose others wait is done, and says so
    records[2:4] = []
    assert exercises.check([5])
    assert capsys.readouterr().out.splitlines()[-1] == ("exercise 5: done: 1 of 3 tests pass, 1 wait for exercise 3, "
                                                        "1 skipped (check again once that is written)")


def test_check_full_runs_the_whole_suite_and_fails_on_any_failure_not_at_another_stub(monkeypatch, capsys):
    others = [record(f"other{i}", graded=()) for i in range(60)]
    records = [record("graded"), *others, record("uses_5", "failed", graded=(),
                                                  text="exercise 5: write time_split (EXERCISES.md)"),
               record("uses_7", "failed", graded=(), text="exercise 7: write KVCache.store (EXERCISES.md)")]

    def fake_pytest(root, args, on_test=None, timeout=None):
        assert args == ["tests"]
        for r in records:
            on_test(r, len(records))
        return records

    monkeypatch.setattr(exercises, "run_pytest", fake_pytest)
    assert not exercises.check([5], full=True)
    lines = capsys.readouterr().out.splitlines()
    shown = [line.split("] ")[1].split()[1] if line.startswith("[") else None for line in lines]
    # the graded test, every non-passing one, and every 25th as progress
    assert [s for s in shown if s] == ["tests/t.py::graded", "tests/t.py::other23", "tests/t.py::other48",
                                       "tests/t.py::uses_5", "tests/t.py::uses_7"]
    assert lines[-2] == "exercise 5: done: 1 of 1 tests pass"
    assert lines[-1] == "the whole suite: 61 of 63 tests pass, 1 fail, 1 wait for exercise 7"


def test_uncommitted_changes_are_never_overwritten(work):
    """Changes outside the exercises' functions are refused in one line, and a student's own version is never lost to start."""
    number = 5
    file = work / EXERCISES[number].file
    original = file.read_bytes()
    file.write_bytes(original + b"# a change of the student's own\n")
    try:
        for command in ("start", "reset"):
            result = run_exercises(work, command, str(number))
            assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
            assert "uncommitted changes" in result.stderr
            assert file.read_bytes() == original + b"# a change of the student's own\n"
    finally:
        file.write_bytes(original)
    # a student's own version of an exercise's functions: start refuses, reset puts the reference back
    assert run_exercises(work, "start", str(number)).returncode == 0
    attempt = file.read_text().replace(f'raise NotImplementedError("exercise {number}: ', 'return ("my own ', 1)
    file.write_text(attempt)
    result = run_exercises(work, "start", str(number))
    assert result.returncode == 2 and "of your own" in result.stderr and file.read_text() == attempt
    assert run_exercises(work, "reset", str(number)).returncode == 0 and file.read_bytes() == original
    for bad in (["start", "99"], ["start", "one"], ["check"], ["finish", "1"], ["check", "1", "--fast"],
                ["grade", "1", str(work / "no such folder")]):
        result = run_exercises(work, *bad)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_a_handout_lists_only_its_exercises_as_started(reference, tmp_path):
    handout = tmp_path / "handout"
    assert run_exercises(reference, "handout", "3,6,7", str(handout)).returncode == 0
    assert not (handout / ".git").exists()
    states = {n: exercises.state(n, handout) for n in EXERCISES}
    assert states == {n: "started" if n in (3, 6, 7) else "not handed out" for n in EXERCISES}
    readme = (handout / "README.md").read_text()
    assert all(f"python tools/exercises.py check {n}" in readme for n in (3, 6, 7))
    assert "check 1`" not in readme
    # the student writes exercise 7 (here: the reference's bodies)
    model = exercises.read(handout, "model.py")
    written = exercises.bodies(exercises.read(reference, "model.py"), EXERCISES[7].functions, "model.py")
    exercises.write(handout, "model.py", exercises.replace_bodies(model, written, "model.py"))
    listing = run_exercises(handout, "list").stdout.splitlines()
    assert [line.split()[0] for line in listing if " started " in line] == ["3", "6"]
    assert " written " in listing[6]


def test_a_handout_never_writes_over_anything_and_refuses_in_one_line(reference, tmp_path):
    """A file, a folder with something in it, and a folder that cannot be made (under a file; as root, a
    read-only folder would be written anyway): one line, exit 2, the destination as it was."""
    (tmp_path / "a file").write_text("mine\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine\n")
    for destination, reason in (("a file", "is a file"), ("full", "is not empty"),
                                ("a file/handout", "cannot write the handout")):
        result = run_exercises(reference, "handout", "3", str(tmp_path / destination))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and reason in result.stderr, result.stderr
    assert (tmp_path / "a file").read_text() == "mine\n" and os.listdir(tmp_path / "full") == ["notes.txt"]


def test_grade_runs_the_references_tests_on_a_students_bodies_and_writes_json(reference, tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    # the student's optim.py: a cosine upside down (exercise 2), Muon's orthogonalisation as it should be (8),
    # and a change outside both (ignored: only their functions' bodies are graded)
    optim = exercises.read(reference, "optim.py")
    wrong = optim.replace("0.5 * (1.0 + math.cos(math.pi * progress))", "0.5 * (1.0 - math.cos(math.pi * progress))")
    assert wrong != optim
    exercises.write(student, "optim.py", wrong.replace("MUON_MOMENTUM = 0.95", "MUON_MOMENTUM = 0.5"))
    # their tests edited to pass whatever the code does: grade runs the reference's, not these
    (student / "tests").mkdir()
    (student / "tests" / "test_train.py").write_text("def test_everything():\n    pass\n")
    out = tmp_path / "grades" / "student.json"
    out.parent.mkdir()
    result = run_exercises(reference, "grade", "2,8,5", str(student), f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("student: 1 of 3 exercises pass (")
    report = json.loads(out.read_text())
    grades = report["exercises"]
    assert (grades["2"]["status"], grades["8"]["status"], grades["5"]["status"]) == ("fail", "pass", "fail")
    assert grades["2"]["failed"] >= 1 and grades["8"]["failed"] == 0 and grades["8"]["passed"] >= 2
    assert all(t["id"].startswith("tests/test_") and t["outcome"] in ("pass", "fail", "skip")
               for t in grades["2"]["tests"] + grades["8"]["tests"])
    assert grades["5"]["message"] == f"no bench.py in {student}" and grades["5"]["tests"] == []
    assert report["total"]["exercises"] == 3 and report["total"]["passed"] == 1
    assert report["reference_commit"] == git(reference, "rev-parse", "HEAD").decode().strip()
    assert exercises.read(reference, "optim.py") == optim  # the reference is never touched


# ----------------------------------------------------------------------------
# the round trip

def check_lines(result):
    """The per-test lines of check's output: (word, node id, message)."""
    lines = [line.split("] ", 1)[1] for line in result.stdout.splitlines() if line.startswith("[")]
    return [(line[:4], line[6:].split("  ")[0], line[6:].partition("  ")[2]) for line in lines]


@round_trip
def test_check_passes_every_exercise_on_the_reference(work):
    result = run_exercises(work, "check", ALL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert {word for word, _, _ in check_lines(result)} <= {"PASS", "SKIP"}
    for number in EXERCISES:
        assert any(line.startswith(f"exercise {number}: done: ") for line in result.stdout.splitlines())


@round_trip
@pytest.mark.parametrize("number", list(EXERCISES))
def test_start_fails_every_graded_test_at_its_stub_and_reset_restores_every_byte(number, work):
    exercise = EXERCISES[number]
    before = file_hashes(work)
    started = run_exercises(work, "start", str(number))
    assert started.returncode == 0, started.stderr
    after = file_hashes(work)
    assert {f for f in before if before[f] != after[f]} == {exercise.file}
    assert exercises.state(number, work) == "started"
    try:
        result = run_exercises(work, "check", str(number))
        assert result.returncode == 1, result.stdout + result.stderr
        lines = check_lines(result)
        # every graded test stops at this exercise's stub: a test that passes with a stub grades nothing
        assert lines and all(word == "SKIP" or (word == "FAIL" and message.endswith(
            f"exercise {number}: not written yet")) for word, _, message in lines), result.stdout
        assert f"exercise {number}: not done: 0 of " in result.stdout.splitlines()[-1]
    finally:
        reset = run_exercises(work, "reset", str(number))
    assert reset.returncode == 0, reset.stderr
    assert file_hashes(work) == before
    assert exercises.state(number, work) == "reference"


@round_trip
def test_a_handout_fails_only_at_its_stubs_and_holds_no_reference_body(reference, tmp_path):
    handout = tmp_path / "handout"
    result = run_exercises(reference, "handout", ALL, str(handout))
    assert result.returncode == 0, result.stderr
    assert not (handout / ".git").exists() and not list(handout.rglob("__pycache__"))
    handed_out = [p.read_bytes() for p in handout.rglob("*") if p.is_file()]
    for number, exercise in EXERCISES.items():
        assert exercises.state(number, handout) == "started"
        for function, body in exercises.bodies((reference / exercise.file).read_text(), exercise.functions,
                                               exercise.file).items():
            assert not any(body.encode() in content for content in handed_out), f"{function}'s body is in the handout"
    # the whole suite, as a student runs it: whatever fails, fails at a stub, and every graded test fails
    records = exercises.run_pytest(handout, ["tests"])
    failed = [r for r in records if r["outcome"] == "failed"]
    not_at_a_stub = [r["id"] for r in failed if not exercises.stubs_met(r)]
    assert not not_at_a_stub, f"fail, but not at a stub: {not_at_a_stub}"
    passing_graded = [r["id"] for r in records if r["exercises"] and r["outcome"] == "passed"]
    assert not passing_graded, f"graded tests that pass with every exercise started: {passing_graded}"
