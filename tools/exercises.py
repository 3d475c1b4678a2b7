"""
Course exercises, graded by the project's own tests (EXERCISES.md says what each one asks).

    python tools/exercises.py list                       every exercise, its functions and its state
    python tools/exercises.py start N[,M,...]            replace exercise N's functions by stubs (signature and docstring kept)
    python tools/exercises.py check N[,M,...] [--full]   run the tests that grade N, one line each as they end, then a total
    python tools/exercises.py reset N[,M,...]            put exercise N's reference code back from git, byte for byte
    python tools/exercises.py handout N,M,... DIR        a copy for students: those exercises started, no git history
    python tools/exercises.py grade N,M,... STUDENT [--out=grade.json]   a teacher's grading, as JSON

A started function's body is one line, `raise NotImplementedError("exercise N: write ...")`: its
tests fail at once and loudly. Functions are found with the `ast` module, by their exact line
spans. `start` and `reset` refuse a file with uncommitted changes outside its exercises' functions,
and `start` one whose functions hold yours.

An exercise is graded by the quick tests marked `@pytest.mark.exercise(N)` (tests/conftest.py),
which call its functions directly; `check N --full` runs the whole suite and says which tests stop
at exercise N's stub and which wait for another exercise. A test that fails only at the stub of
*another* exercise waits (WAIT): it says nothing about exercise N until that one is written.
`grade` puts a student's function bodies, and nothing else of theirs, into the committed
reference and runs the reference's own tests on them, one exercise at a time.
"""

import ast
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: find the project modules
from cli import UserError, run, write_atomic

ROOT = Path(__file__).resolve().parent.parent  # the project root, above tools/
STUB_MESSAGE = "exercise {number}: write {function} (EXERCISES.md)"
STUB = 'raise NotImplementedError("{message}")'
# a stub's message anywhere in a failure's report: a test's own traceback, or a subprocess's output
STUB_FOUND = re.compile(r"exercise (\d+): write \S+ \(EXERCISES\.md\)")
README = "README.md"
HANDOUT_RECORD = "tools/handout.json"  # in a handout: which exercises were handed out
GRADE_TIMEOUT_S = 600  # per exercise: a student's endless loop must not hang a class's grading


@dataclass(frozen=True)
class Exercise:
    title: str
    file: str  # the file the functions are in, relative to the project root
    functions: tuple  # their qualified names in that file: "apply_rotary", "KVCache.store"


# numbered as EXERCISES.md has them (a number, once given, stays: handouts and grades name it)
EXERCISES = {
    1: Exercise("Bits per byte", "train.py", ("predicted_bytes", "evaluate")),
    2: Exercise("The learning-rate schedule", "optim.py", ("learning_rate", "cosine_decay")),
    3: Exercise("Weight tying, and what it saves", "model.py", ("GPT.num_params",)),
    4: Exercise("A boundary rule, decided from the past", "byte_tokenizer.py", ("is_spacelike", "chunk_ends")),
    5: Exercise("Reading a latency table", "bench.py", ("summarize_ms", "time_split")),
    6: Exercise("Rotary positions", "model.py", ("rotary_tables", "apply_rotary")),
    7: Exercise("Causal attention's KV cache", "model.py", ("KVCache.__init__", "KVCache.store")),
    8: Exercise("Muon's orthogonalisation", "optim.py", ("orthogonalize",)),
    9: Exercise("Merging a reparameterized FFN", "reparam.py", ("merge_rep_linear", "merge_rep_parallel")),
    10: Exercise("Forward and reverse KL, temperature and the tail bucket", "distill.py",
                 ("tail_logprob", "kl_divergence", "distillation_loss")),
    11: Exercise("Sliding-window byte layers and their cache", "byte_tokenizer.py",
                 ("window_mask", "ByteBlock.forward")),
    12: Exercise("Pooling: the core at chunk ends", "byte_tokenizer.py", ("PooledBytes.run_core",)),
    13: Exercise("Causal self-attention", "model.py", ("CausalSelfAttention.forward",)),
    14: Exercise("The training step", "train.py", ("accumulate_gradients",)),
    15: Exercise("Sampling: temperature, top-k, top-p", "model.py", ("sample_next",)),
    16: Exercise("A byte-level BPE, trained and encoding", "tokenizer.py", ("train_bpe", "bpe_encode")),
}


# ----------------------------------------------------------------------------
# a function's body in the source (found with ast), files and git

def _find(tree, qualname, file):
    """The FunctionDef node of `qualname` ("f" or "Class.method") in a parsed module."""
    body, node = tree.body, None
    for name in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name), None)
        if node is None:
            raise UserError(f"{file} has no {qualname}: the exercise table in tools/exercises.py is out of date")
        body = node.body
    return node


def _is_docstring(statement):
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
        and isinstance(statement.value.value, str)


def body_spans(source, functions, file):
    """{qualname: (first, end, indent)}: the 0-based lines [first, end) of each body after its docstring."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    spans = {}
    for qualname in functions:
        node = _find(tree, qualname, file)
        statements = node.body[1:] if _is_docstring(node.body[0]) else node.body
        if not statements or statements[0].lineno == node.lineno:
            raise UserError(f"{file}'s {qualname} has no body of its own lines to replace")
        if len(statements) < len(node.body):  # after the docstring
            first = node.body[0].end_lineno
        else:  # no docstring: the body starts after the signature, with any comment lines above its first statement
            first = statements[0].lineno - 1
            while lines[first - 1].strip().startswith("#"):
                first -= 1
        indent = lines[statements[0].lineno - 1][:statements[0].col_offset]
        spans[qualname] = (first, node.end_lineno, indent)
    return spans


def bodies(source, functions, file):
    """{qualname: the text of its body}."""
    lines = source.splitlines(keepends=True)
    return {q: "".join(lines[a:b]) for q, (a, b, _) in body_spans(source, functions, file).items()}


def replace_bodies(source, new_bodies, file):
    """source with the body of each function in new_bodies ({qualname: text}) replaced."""
    lines = source.splitlines(keepends=True)
    spans = body_spans(source, new_bodies, file)
    for qualname, (first, end, _) in sorted(spans.items(), key=lambda item: -item[1][0]):  # bottom up
        lines[first:end] = [new_bodies[qualname]]
    return "".join(lines)


def stub(number, qualname):
    return STUB.format(message=STUB_MESSAGE.format(number=number, function=qualname))


def stub_bodies(number, exercise, source):
    """{qualname: its one-line stub}, indented as the body it replaces."""
    newline = "\r\n" if "\r\n" in source else "\n"
    spans = body_spans(source, exercise.functions, exercise.file)
    return {q: indent + stub(number, q) + newline for q, (_, _, indent) in spans.items()}


def read(root, file):
    return (Path(root) / file).read_bytes().decode("utf-8")  # bytes: no newline translation either way


def write(root, file, text):
    (Path(root) / file).write_bytes(text.encode("utf-8"))


def git(root, *args):
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True)
    except FileNotFoundError:
        raise UserError("git is not installed: start, reset, handout and grade need the project's git "
                        "history") from None


def has_history(root):
    """A git checkout of its own (a handout, even one inside another repository, has none)."""
    return (Path(root) / ".git").exists()


def committed(root, file):
    """The file as git's HEAD has it."""
    result = git(root, "show", f"HEAD:{file}")
    if result.returncode or not has_history(root):
        if not has_history(root):
            raise UserError(f"{root} has no git history (a handout has none): start, reset and grade need it; "
                            "check and list work without")
        raise UserError(f"git has no committed {file}: commit it first")
    return result.stdout.decode("utf-8")


def extract_committed(root, folder):
    """The committed project (git archive: no history, no build output) written into folder."""
    archive = git(root, "archive", "--format=tar", "HEAD")
    if archive.returncode:
        raise UserError(f"git archive failed in {root}: handout and grade need a git checkout's committed files")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")


def is_started(number, source):
    exercise = EXERCISES[number]
    return all(text.strip() == stub(number, q) for q, text in bodies(source, exercise.functions, exercise.file).items())


def check_only_exercises_changed(source, reference, file):
    """Refuse a file whose differences from git's HEAD reach outside its exercises' functions."""
    functions = [f for exercise in EXERCISES.values() if exercise.file == file for f in exercise.functions]
    if replace_bodies(source, bodies(reference, functions, file), file) != reference:
        raise UserError(f"{file} has uncommitted changes outside its exercises' functions: commit or stash them "
                        "first, so that reset can give the file back exactly")


# ----------------------------------------------------------------------------
# start, reset, list

def parse_numbers(text):
    numbers = [int(part) for part in text.split(",") if part.strip().isdigit()]
    if not numbers or len(numbers) != len(text.split(",")):
        raise UserError(f"expected exercise numbers like 3 or 1,4,7, got {text!r}: python tools/exercises.py list "
                        "shows them")
    for number in numbers:
        if number not in EXERCISES:
            raise UserError(f"there is no exercise {number}: choose from {', '.join(map(str, EXERCISES))}")
    return numbers


def start(numbers, root=ROOT, check_git=True):
    """Stub each exercise's functions. check_git=False: in a copy without history (a handout being made)."""
    for number in numbers:
        exercise = EXERCISES[number]
        source = read(root, exercise.file)
        if check_git and is_started(number, source):
            print(f"exercise {number} is already started")
            continue
        if check_git:
            reference = committed(root, exercise.file)
            check_only_exercises_changed(source, reference, exercise.file)
            if bodies(source, exercise.functions, exercise.file) != bodies(reference, exercise.functions, exercise.file):
                raise UserError(f"exercise {number}'s functions in {exercise.file} hold uncommitted changes of your "
                                f"own: commit them, or put the reference back with python tools/exercises.py reset {number}")
        write(root, exercise.file, replace_bodies(source, stub_bodies(number, exercise, source), exercise.file))
        print(f"exercise {number} started: {', '.join(exercise.functions)} in {exercise.file} raise "
              f"NotImplementedError; grade with python tools/exercises.py check {number}")


def reset(numbers, root=ROOT):
    """Put each exercise's functions back as committed; a student's version of them is replaced."""
    for number in numbers:
        exercise = EXERCISES[number]
        source, reference = read(root, exercise.file), committed(root, exercise.file)
        check_only_exercises_changed(source, reference, exercise.file)
        write(root, exercise.file, replace_bodies(source, bodies(reference, exercise.functions, exercise.file),
                                                  exercise.file))
        print(f"exercise {number} reset: {', '.join(exercise.functions)} in {exercise.file} are the reference code")


def state(number, root=ROOT):
    """started (stubs), reference, or written (anything else: work in progress); in a handout, not handed out."""
    exercise = EXERCISES[number]
    source = read(root, exercise.file)
    if is_started(number, source):
        return "started"
    if has_history(root) and git(root, "cat-file", "-e", f"HEAD:{exercise.file}").returncode == 0:
        reference = bodies(committed(root, exercise.file), exercise.functions, exercise.file)
        return "reference" if bodies(source, exercise.functions, exercise.file) == reference else "written"
    record = Path(root) / HANDOUT_RECORD
    if record.is_file() and number not in json.loads(record.read_text())["exercises"]:
        return "not handed out"
    return "written"  # no history to compare with: in a handout, the student's work


def list_exercises(root=ROOT):
    for number, exercise in EXERCISES.items():
        print(f"{number:>2}  {exercise.title:<56} {exercise.file:<17} {state(number, root):<14}  "
              f"{', '.join(exercise.functions)}")


# ----------------------------------------------------------------------------
# running the tests: pytest in a subprocess, each test's record read as it ends

def run_pytest(root, args, on_test=None, timeout=None):
    """
    [record] of pytest run in root with args (a record: id, outcome, exercises, message, text; see
    tests/conftest.py's ExerciseReport), calling on_test(record, n_collected) as each test ends.
    A run past timeout seconds is stopped, its unfinished test recorded as failed.
    """
    with tempfile.TemporaryDirectory() as folder:
        report, log = Path(folder) / "report.jsonl", Path(folder) / "pytest.log"
        report.touch()
        # -vv: pytest would cut a long assertion message, and with it a subprocess's stub
        command = [sys.executable, "-m", "pytest", "-vv", "-p", "no:cacheprovider", f"--exercise-report={report}",
                   *args]
        records, collected, pending, started = [], 0, "", time.monotonic()
        with open(log, "w") as output, open(report) as lines:
            process = subprocess.Popen(command, cwd=root, stdout=output, stderr=subprocess.STDOUT)
            while True:
                finished = process.poll() is not None
                timed_out = not finished and timeout is not None and time.monotonic() - started > timeout
                if timed_out:
                    process.kill()
                    process.wait()
                *complete, pending = (pending + lines.read()).split("\n")
                for line in complete:
                    record = json.loads(line)
                    if "collected" in record:
                        collected = record["collected"]
                        continue
                    records.append(record)
                    if on_test:
                        on_test(record, collected)
                if finished or timed_out:
                    break
                time.sleep(0.1)
        if timed_out:
            return records + [{"id": f"(the test after {len(records)} of {collected})", "outcome": "failed",
                               "exercises": [], "message": f"timed out after {timeout} s", "text": ""}]
        if process.returncode not in (0, 1, 5):  # 5: no test collected
            raise UserError(f"pytest could not run the tests in {root} ({pytest_problem(log.read_text())})")
    return records


def pytest_problem(output):
    """The line of pytest's output that says why it stopped: a collection error's, else its last."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR ") or line.startswith("E   ")]
    return (errors or lines or ["no output"])[0][:300]


def stubs_met(record):
    """The exercises whose stubs a failed test stopped at."""
    return {int(n) for n in STUB_FOUND.findall(record["text"])}


def verdict(record, numbers):
    """PASS, SKIP, FAIL, or WAIT (failed only at the stubs of exercises not in numbers), and the line to show."""
    if record["outcome"] == "passed":
        return "PASS", ""
    if record["outcome"] == "skipped":
        return "SKIP", record["message"]
    stubs = stubs_met(record)
    if stubs and not stubs & set(numbers):
        return "WAIT", f"stops at the stub of exercise {', '.join(map(str, sorted(stubs)))}"
    if stubs:
        return "FAIL", f"stops at the stub of exercise {min(stubs & set(numbers))}: not written yet"
    return "FAIL", record["message"]


def counts_line(tests, numbers):
    """'5 of 7 tests pass, 1 fail, 1 wait for exercise 3, 1 skipped', and whether nothing failed."""
    verdicts = [verdict(r, numbers)[0] for r in tests]
    waiting = {}
    for record, word in zip(tests, verdicts):
        if word == "WAIT":
            for other in stubs_met(record):
                waiting[other] = waiting.get(other, 0) + 1
    parts = [f"{verdicts.count('PASS')} of {len(tests)} tests pass"]
    parts += [f"{verdicts.count('FAIL')} fail"] if "FAIL" in verdicts else []
    parts += [f"{n} wait for exercise {other}" for other, n in sorted(waiting.items())]
    parts += [f"{verdicts.count('SKIP')} skipped"] if "SKIP" in verdicts else []
    return ", ".join(parts), "FAIL" not in verdicts, "PASS" in verdicts


# ----------------------------------------------------------------------------
# check and grade

def check(numbers, full=False, root=ROOT):
    """Run exercise numbers' graded tests (with full, the whole suite), showing each as it ends; True if done."""
    for number in numbers:
        exercise = EXERCISES[number]
        print(f"exercise {number}: {exercise.title} ({', '.join(exercise.functions)} in {exercise.file})")
    n_done = 0

    def show(record, collected):
        nonlocal n_done
        n_done += 1
        word, message = verdict(record, numbers)
        # the whole suite is hundreds of tests: its passing ones, beyond the graded, only now and then
        graded = set(record["exercises"]) & set(numbers)
        if not full or graded or word != "PASS" or n_done % 25 == 0 or n_done == collected:
            print(f"[{n_done:>{len(str(collected))}}/{collected}] {word:<4}  {record['id']}"
                  + (f"  {message}" if message else ""), flush=True)

    args = ["tests"] if full else ["tests", f"--exercise={','.join(map(str, numbers))}"]
    records = run_pytest(root, args, on_test=show)
    all_done = True
    for number in numbers:
        tests = [r for r in records if number in r["exercises"]]
        if not tests:
            raise UserError(f"no test is marked @pytest.mark.exercise({number}): exercise {number} has no graded tests")
        line, nothing_failed, some_passed = counts_line(tests, [number])
        done = nothing_failed and some_passed
        print(f"exercise {number}: {'done' if done else 'not done'}: {line}"
              + (" (check again once that is written)" if done and " wait " in line else ""))
        all_done = all_done and done
    if full:
        line, nothing_failed, _ = counts_line(records, numbers)
        print(f"the whole suite: {line}")
        all_done = all_done and nothing_failed
    return all_done


def student_bodies(number, student):
    """The bodies of exercise number's functions in the student's copy of its file, or a one-line problem."""
    exercise = EXERCISES[number]
    path = Path(student) / exercise.file
    if not path.is_file():
        return None, f"no {exercise.file} in {student}"
    try:
        found = bodies(read(student, exercise.file), exercise.functions, exercise.file)
    except SyntaxError as e:
        return None, f"{exercise.file} does not parse: {e.msg}, line {e.lineno}"
    except UserError as e:
        return None, str(e).partition(":")[0]
    if is_started(number, read(student, exercise.file)):
        return None, "not written: the functions are still the stubs"
    return found, ""


def grade_one(number, student, reference):
    """One exercise's result: the student's bodies in the reference copy, its graded tests run there."""
    exercise = EXERCISES[number]
    result = {"title": exercise.title, "file": exercise.file, "functions": list(exercise.functions)}
    found, problem = student_bodies(number, student)
    if found is None:
        return {**result, "status": "fail", "message": problem, "passed": 0, "failed": 0, "skipped": 0, "tests": []}
    original = read(reference, exercise.file)
    write(reference, exercise.file, replace_bodies(original, found, exercise.file))
    try:
        records = run_pytest(reference, ["tests", f"--exercise={number}"], timeout=GRADE_TIMEOUT_S)
    finally:
        write(reference, exercise.file, original)
    tests = [{"id": r["id"], "outcome": verdict(r, [number])[0].lower(), "message": verdict(r, [number])[1]}
             for r in records]
    outcomes = [t["outcome"] for t in tests]
    passed = "pass" in outcomes and "fail" not in outcomes
    return {**result, "status": "pass" if passed else "fail", "message": counts_line(records, [number])[0],
            "passed": outcomes.count("pass"), "failed": outcomes.count("fail"), "skipped": outcomes.count("skip"),
            "tests": tests}


def grade(numbers, student, out, root=ROOT):
    """Grade a student's exercises against the committed reference and its own tests; write JSON to out."""
    student, out = Path(student), Path(out)
    if not student.is_dir():
        raise UserError(f"{student} is not a folder: name a student's handout folder, or a folder holding their "
                        "versions of the exercise files")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK) or out.is_dir():
        raise UserError(f"cannot write {out}: name a file in a folder you can write, with --out=FILE")
    commit = git(root, "rev-parse", "HEAD")
    if commit.returncode:
        raise UserError(f"{root} has no git history: grade in the teacher's checkout, whose committed files are "
                        "the reference")
    report = {"student": str(student.resolve()), "reference_commit": commit.stdout.decode().strip(), "exercises": {}}
    with tempfile.TemporaryDirectory() as folder:
        extract_committed(root, folder)
        for number in numbers:
            result = grade_one(number, student, folder)
            report["exercises"][str(number)] = result
            print(f"exercise {number}: {result['status'].upper()}  {result['message']}", flush=True)
    results = report["exercises"].values()
    report["total"] = {"exercises": len(numbers), "passed": sum(r["status"] == "pass" for r in results),
                       "tests": sum(len(r["tests"]) for r in results), "tests_passed": sum(r["passed"] for r in results)}
    write_atomic(out, json.dumps(report, indent=2) + "\n", "name a file in a folder you can write, with --out=FILE")
    total = report["total"]
    print(f"{student.name}: {total['passed']} of {total['exercises']} exercises pass "
          f"({total['tests_passed']} of {total['tests']} tests); each test in {out}")


# ----------------------------------------------------------------------------
# handout

def handout_readme(numbers):
    rows = "\n".join(f"| {n}. {EXERCISES[n].title} | {', '.join(f'`{f}`' for f in EXERCISES[n].functions)} | "
                     f"`{EXERCISES[n].file}` | `python tools/exercises.py check {n}` |" for n in numbers)
    return ("## Your exercises\n\nIn this copy, the functions below raise `NotImplementedError` until you write "
            "them.\nEXERCISES.md says what each exercise asks, what to read first, and the question to answer.\n"
            "Each is graded by the project's own quick tests, one line per test as it ends, and a total:\n\n"
            f"| exercise | write | in | check it with |\n|---|---|---|---|\n{rows}\n\n`python tools/exercises.py list` "
            "shows where each stands, and `check N --full` runs the whole suite.\nThe rest of the suite passes as "
            "handed out: `python -m pytest -q` fails only at these exercises' stubs.\n\n")


def handout(numbers, folder, root=ROOT):
    """The committed project in folder, with these exercises started."""
    folder = Path(folder)
    # only a new or empty folder: a handout never writes over anything
    try:
        if folder.is_file() or folder.is_dir() and any(folder.iterdir()):
            raise UserError(f"{folder} is {'a file' if folder.is_file() else 'not empty'}: name a new folder for "
                            "the handout")
        folder.mkdir(parents=True, exist_ok=True)
        extract_committed(root, folder)
        start(numbers, folder, check_git=False)
        write(folder, HANDOUT_RECORD, json.dumps({"exercises": numbers}) + "\n")
        readme = read(folder, README)
        title, _, rest = readme.partition("\n\n")  # after the title line
        write(folder, README, f"{title}\n\n{handout_readme(numbers)}{rest}")
    except OSError as e:
        raise UserError(f"cannot write the handout to {folder} ({e.strerror or e}): name a new folder where you "
                        "can write") from None
    print(f"handout with exercises {', '.join(map(str, numbers))} written to {folder} (no git history)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    command = argv[0]
    args = [a for a in argv[1:] if not a.startswith("--")]
    options = dict(a[2:].partition("=")[::2] for a in argv[1:] if a.startswith("--"))
    expected = {"list": 0, "start": 1, "check": 1, "reset": 1, "handout": 2, "grade": 2}
    allowed = {"check": {"full"}, "grade": {"out"}}
    if command not in expected:
        raise UserError(f"unknown command {command!r}: use list, start, check, reset, handout or grade (see --help)")
    if len(args) != expected[command]:
        raise UserError(f"{command} takes {expected[command]} argument(s), got {len(args)}: see --help")
    unknown = set(options) - allowed.get(command, set())
    if unknown:
        raise UserError(f"{command} has no option --{sorted(unknown)[0]}: see --help")
    numbers = parse_numbers(args[0]) if args else None
    if command == "list":
        list_exercises()
    elif command in ("start", "reset"):
        (start if command == "start" else reset)(numbers)
    elif command == "handout":
        handout(numbers, args[1])
    elif command == "grade":
        grade(numbers, args[1], options.get("out") or "grade.json")
    else:
        sys.exit(0 if check(numbers, full="full" in options) else 1)


if __name__ == "__main__":
    run(main)
