"""
exercises.py: for every exercise, `start N` fails exactly its graded tests and the rest of the
suite passes, `reset N` gives every file back byte for byte, `check N` passes on the reference
code, and a handout's own suite fails only in its started exercises and holds no reference body.

Started one by one, the exercises would need the whole suite once each: ten runs, about 25
minutes on 2 cores. These tests need one run, and reason about the rest:

1. The suite runs once on the reference code with a call tracer (tests/exercise_tracer.py). It
   records which tests reach each exercise function: from the test itself, from any fixture the
   test uses (a module or session fixture is set up once but counts for every test using it),
   from collection (counts for every test), and from any Python process a test starts (the
   tracer is installed at interpreter start, and the context travels in the environment). It
   also records outcomes: every graded test passes on the reference code, which is what
   `check N` checks there (`check` itself runs twice below, on an exercise whose tests are quick).
2. A test that never calls a function runs the same code whether that function's body is the
   reference or a stub, so with exercise N started only the tests that reach N's functions can
   change outcome. Those are run, in a copy with N started: the ones that fail must be exactly
   N's graded tests. They fail at the first call of a stub, so this costs a fraction of their
   normal time. The one assumption: no test reaches an exercise function only through a result
   cached by an earlier test (a functools cache or a module global); none does today.
3. A handout with every exercise started differs from the reference in those stubs, README.md
   and having no .git; the same argument runs the tests that reach any stub plus the ones that
   read the project's own files (test_reliability's scan of every file).

All of that costs about 10 minutes on 2 cores (the traced suite is most of it), so those tests
run when STLM_EXERCISE_ROUND_TRIP=1, as .ci/run sets; a plain `pytest` skips them, saying so.
Everything runs in temp copies of the working tree, committed to a fresh git repository there:
the real checkout is never touched. In a copy without git history (a handout), these skip.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import exercise_tracer
import exercises
from exercises import EXERCISES

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = "tests/test_exercises.py"
FILE_READING_TESTS = ("tests/test_reliability.py::test_nothing_refers_to_a_folder_outside_the_checkout",)
QUICK_EXERCISE = min(EXERCISES, key=lambda n: len(EXERCISES[n].tests)) if EXERCISES else None


def started_here():
    return [n for n in EXERCISES if exercises.state(n, ROOT) == "started"]


round_trip = pytest.mark.skipif(os.environ.get("STLM_EXERCISE_ROUND_TRIP") != "1",
                                reason="the exercises' round trip runs the suite again, traced (about 10 minutes on "
                                       "2 cores): .ci/run runs it; set STLM_EXERCISE_ROUND_TRIP=1 to run it here")
pytestmark = pytest.mark.skipif(not (ROOT / ".git").exists() or (EXERCISES and bool(started_here())),
                                reason="a handout, or exercises started: the round trip needs the reference code")


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True).stdout


def run_exercises(folder, *args):
    return subprocess.run([sys.executable, "exercises.py", *args], cwd=folder, capture_output=True, text=True)


def file_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(folder).rglob("*") if p.is_file() and ".git" not in p.relative_to(folder).parts
            and "__pycache__" not in p.parts}


def pytest_outcomes(folder, node_ids):
    """{node id: 'pass' | 'fail' | 'skip'} of pytest on node_ids in folder: check's own runner, exercises.run_tests."""
    return {node_id: outcome for node_id, outcome, _ in exercises.run_tests(node_ids, folder)}


def graded(exercise, node_ids):
    """The collected node ids an exercise's tests name (a name without [parameters] covers every case)."""
    return {n for n in node_ids if n in exercise.tests or n.partition("[")[0] in exercise.tests}


def targets(numbers):
    return [f"{EXERCISES[n].file}:{function}" for n in numbers for function in EXERCISES[n].functions]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A copy of the working tree (tracked and untracked files, not ignored ones), committed to git there."""
    folder = tmp_path_factory.mktemp("reference") / "stlm"
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "-c", "user.name=exercises", "-c", "user.email=exercises@localhost", "commit", "-q", "-m", "reference")
    return folder


@pytest.fixture(scope="module")
def traced(reference, tmp_path_factory):
    """({node id: fixtures and outcome}, {context: exercise functions called}) of one traced run of the suite."""
    folder = tmp_path_factory.mktemp("trace")
    (folder / "sitecustomize.py").write_text(exercise_tracer.sitecustomize_source())
    trace_file = folder / "calls.tsv"
    env = {"PYTHONPATH": os.pathsep.join([str(folder), str(reference / "tests"), os.environ.get("PYTHONPATH", "")]),
           exercise_tracer.FILE_VARIABLE: str(trace_file), exercise_tracer.ROOT_VARIABLE: str(reference),
           exercise_tracer.TARGETS_VARIABLE: ",".join(targets(EXERCISES))}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "exercise_tracer",
                    f"--ignore={THIS_FILE}"], cwd=reference,
                   capture_output=True, text=True, env={**os.environ, **env})
    return exercise_tracer.read_trace(str(trace_file))


@pytest.fixture(scope="module")
def work(reference, tmp_path_factory):
    """A clone of the reference copy to start and reset exercises in."""
    folder = tmp_path_factory.mktemp("work") / "stlm"
    subprocess.run(["git", "clone", "-q", str(reference), str(folder)], check=True)
    return folder


@round_trip
def test_the_table_names_real_functions_and_tests(traced):
    items, _ = traced
    for number, exercise in EXERCISES.items():
        source = (ROOT / exercise.file).read_text()
        exercises.body_spans(source, exercise.functions, exercise.file)  # raises if a function is gone
        for node_id in exercise.tests:
            assert graded(exercises.Exercise("", "", (), (node_id,)), items), f"exercise {number}: no test {node_id}"


@round_trip
@pytest.mark.parametrize("number", list(EXERCISES))
def test_start_fails_exactly_the_graded_tests_and_reset_restores_every_byte(number, traced, work):
    items, calls = traced
    exercise = EXERCISES[number]
    expected = graded(exercise, items)
    ran_here = {n for n in expected if items[n]["outcome"] != "skipped"}  # a skipped test (no GPT-2 files) cannot fail
    assert all(items[n]["outcome"] == "passed" for n in ran_here), "a graded test fails on the reference code"
    reaching = exercise_tracer.reaching(items, calls, targets([number]))
    assert ran_here <= reaching, f"graded tests that never call {exercise.functions}: {sorted(ran_here - reaching)}"

    before = file_hashes(work)
    started = run_exercises(work, "start", str(number))
    assert started.returncode == 0, started.stderr
    after = file_hashes(work)
    assert {f for f in before if before[f] != after[f]} == {exercise.file}
    assert exercises.state(number, work) == "started"

    outcomes = pytest_outcomes(work, sorted(reaching))
    failed = {n for n, outcome in outcomes.items() if outcome == "fail"}
    assert failed == ran_here, (f"fail but are not graded: {sorted(failed - ran_here)}; "
                                f"graded but pass: {sorted(ran_here - failed)}")

    reset = run_exercises(work, "reset", str(number))
    assert reset.returncode == 0, reset.stderr
    assert file_hashes(work) == before
    assert exercises.state(number, work) == "reference"


@round_trip
def test_check_passes_on_the_reference_and_fails_on_a_stub(work):
    number = QUICK_EXERCISE
    n_tests = len(EXERCISES[number].tests)
    result = run_exercises(work, "check", str(number))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("PASS") for line in lines) >= n_tests
    assert lines[-1].startswith(f"exercise {number}: ") and " tests pass" in lines[-1]
    assert run_exercises(work, "start", str(number)).returncode == 0
    try:
        result = run_exercises(work, "check", str(number))
        assert result.returncode == 1
        failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
        assert len(failures) >= n_tests and all(f"exercise {number}: write" in line for line in failures)
        assert result.stdout.splitlines()[-1].startswith(f"exercise {number}: 0 of ")
    finally:
        assert run_exercises(work, "reset", str(number)).returncode == 0


def test_check_marks_the_failures_that_wait_for_another_exercise(monkeypatch, capsys):
    outcomes = [("tests/t.py::a", "pass", ""), ("tests/t.py::b", "fail", "NotImplementedError: exercise 3: write f"),
                ("tests/t.py::c", "fail", "NotImplementedError: exercise 5: write g"),
                ("tests/t.py::d", "fail", "AssertionError: 1 != 2"), ("tests/t.py::e", "skip", "no GPT-2 files")]
    monkeypatch.setattr(exercises, "run_tests", lambda node_ids, root: outcomes)
    assert not exercises.check(5)
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines[:-1]] == ["PASS", "WAIT", "FAIL", "FAIL", "SKIP"]
    assert lines[-1] == "exercise 5: 1 of 5 tests pass, 1 wait for exercise 3, 1 skipped"


def test_uncommitted_changes_are_never_overwritten(work):
    """Changes outside the exercises' functions are refused in one line, and a student's own version is never lost to start."""
    number = QUICK_EXERCISE
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
    for bad in (["start", "99"], ["start", "one"], ["check"], ["finish", "1"]):
        result = run_exercises(work, *bad)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


@round_trip
def test_a_handout_fails_only_its_exercises_and_holds_no_reference_body(reference, traced, tmp_path):
    items, calls = traced
    numbers = list(EXERCISES)
    handout = tmp_path / "handout"
    result = run_exercises(reference, "handout", ",".join(map(str, numbers)), str(handout))
    assert result.returncode == 0, result.stderr
    assert not (handout / ".git").exists() and not list(handout.rglob("__pycache__"))
    readme = (handout / "README.md").read_text()
    assert all(f"python exercises.py check {n}" in readme for n in numbers)

    handed_out = [p.read_bytes() for p in handout.rglob("*") if p.is_file()]
    for number in numbers:
        exercise = EXERCISES[number]
        assert exercises.state(number, handout) == "started"
        for function, body in exercises.bodies((reference / exercise.file).read_text(), exercise.functions,
                                               exercise.file).items():
            assert not any(body.encode() in content for content in handed_out), f"{function}'s body is in the handout"

    reaching = exercise_tracer.reaching(items, calls, targets(numbers)) | set(FILE_READING_TESTS)
    expected = {n for number in numbers for n in graded(EXERCISES[number], items) if items[n]["outcome"] != "skipped"}
    outcomes = pytest_outcomes(handout, sorted(reaching))
    failed = {n for n, outcome in outcomes.items() if outcome == "fail"}
    assert failed == expected, f"unexpected failures: {sorted(failed - expected)}; passing: {sorted(expected - failed)}"
