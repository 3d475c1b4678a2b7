"""
Which tests reach which exercise functions: a pytest plugin and a call tracer for test_exercises.py.

Not a test file. test_exercises.py runs the suite once on the reference code with this module as a
pytest plugin (`-p exercise_tracer`), which names the context every call happens in (a test, or the
fixture being set up), and with `install` in a `sitecustomize.py` on PYTHONPATH, so that the pytest
process and every Python subprocess the tests start are traced (subprocesses inherit the context
through the environment). The tracer records the first call of each target
function in each context, to TRACE_FILE, as `context<TAB>file.py:Qualified.name`.

Environment (set by test_exercises.py): EXERCISE_TRACE_FILE, where records go; EXERCISE_TRACE_ROOT,
the checkout whose files are traced; EXERCISE_TRACE_TARGETS, `file.py:Qualified.name` separated by
commas; EXERCISE_TRACE_CONTEXT, set by the plugin as it goes.
"""

import inspect
import json
import os
import sys
import threading

import pytest

FILE_VARIABLE, ROOT_VARIABLE, TARGETS_VARIABLE, CONTEXT_VARIABLE = (
    "EXERCISE_TRACE_FILE", "EXERCISE_TRACE_ROOT", "EXERCISE_TRACE_TARGETS", "EXERCISE_TRACE_CONTEXT")
OUTSIDE_ANY_TEST = "collect"  # module-level code of test files and conftest: counted against every test


# ----------------------------------------------------------------------------
# the tracer (in the pytest process and in every Python subprocess it starts)

def install():
    """Trace calls of the target functions in this process, if the environment asks for it."""
    if not os.environ.get(FILE_VARIABLE):
        return
    root = os.path.realpath(os.environ[ROOT_VARIABLE])
    targets = {}
    for target in os.environ[TARGETS_VARIABLE].split(","):
        path, _, qualname = target.partition(":")
        targets[(os.path.join(root, path), qualname)] = target
    matches, recorded = {}, set()  # code object -> target or None; (context, target) already written

    def trace(frame, event, arg):
        code = frame.f_code
        target = matches.get(code, False)
        if target is False:
            target = targets.get((os.path.realpath(code.co_filename), code.co_qualname))
            matches[code] = target
        if target is not None:
            context = os.environ.get(CONTEXT_VARIABLE, OUTSIDE_ANY_TEST)
            if (context, target) not in recorded:
                recorded.add((context, target))
                with open(os.environ[FILE_VARIABLE], "a") as f:  # one short append per record: safe across processes
                    f.write(f"{context}\t{target}\n")
        return None  # no line events: only calls are counted

    sys.settrace(trace)
    threading.settrace(trace)


def sitecustomize_source():
    """A sitecustomize.py that installs the tracer at every Python start, without importing pytest."""
    constants = (f"FILE_VARIABLE, ROOT_VARIABLE, TARGETS_VARIABLE, CONTEXT_VARIABLE = "
                 f"{FILE_VARIABLE!r}, {ROOT_VARIABLE!r}, {TARGETS_VARIABLE!r}, {CONTEXT_VARIABLE!r}\n"
                 f"OUTSIDE_ANY_TEST = {OUTSIDE_ANY_TEST!r}\n")
    return "import os\nimport sys\nimport threading\n" + constants + inspect.getsource(install) + "\ninstall()\n"


# ----------------------------------------------------------------------------
# the pytest plugin: contexts, each test's fixtures, and outcomes

_items = {}  # nodeid -> {"fixtures": [...], "outcome": ...}


def fixture_context(fixturedef):
    return f"fixture:{fixturedef.baseid}::{fixturedef.argname}"


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        fixtures = []
        if info is not None:
            for definitions in info.name2fixturedefs.values():
                fixtures += [fixture_context(d) for d in definitions]
        _items[item.nodeid] = {"fixtures": fixtures, "outcome": "passed"}


_running = []  # the test being run


def pytest_runtest_setup(item):
    _running[:] = [item.nodeid]
    os.environ[CONTEXT_VARIABLE] = f"test:{item.nodeid}"


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    context = fixture_context(fixturedef)
    if _running and context not in _items[_running[0]]["fixtures"]:  # asked for by getfixturevalue
        _items[_running[0]]["fixtures"].append(context)
    outer = os.environ.get(CONTEXT_VARIABLE)
    os.environ[CONTEXT_VARIABLE] = context
    yield
    os.environ[CONTEXT_VARIABLE] = outer


def pytest_runtest_call(item):
    os.environ[CONTEXT_VARIABLE] = f"test:{item.nodeid}"


def pytest_runtest_teardown(item):
    os.environ[CONTEXT_VARIABLE] = f"test:{item.nodeid}"


def pytest_runtest_logreport(report):
    record = _items.setdefault(report.nodeid, {"fixtures": [], "outcome": "passed"})
    if report.failed:
        record["outcome"] = "failed"
    elif report.skipped and record["outcome"] == "passed":
        record["outcome"] = "skipped"


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(FILE_VARIABLE):
        with open(os.environ[FILE_VARIABLE] + ".items.json", "w") as f:
            json.dump(_items, f)


def read_trace(trace_file):
    """({nodeid: {fixtures, outcome}}, {context: {targets}}) of a traced run."""
    with open(trace_file + ".items.json") as f:
        items = json.load(f)
    calls = {}
    if os.path.exists(trace_file):
        with open(trace_file) as f:
            for line in f:
                context, _, target = line.rstrip("\n").partition("\t")
                calls.setdefault(context, set()).add(target)
    return items, calls


def reaching(items, calls, targets):
    """The tests that call any of targets: in the test itself, in one of its fixtures, or at collection."""
    targets = set(targets)
    if calls.get(OUTSIDE_ANY_TEST, set()) & targets:
        return set(items)
    return {nodeid for nodeid, item in items.items()
            if calls.get(f"test:{nodeid}", set()) & targets
            or any(calls.get(fixture, set()) & targets for fixture in item["fixtures"])}
