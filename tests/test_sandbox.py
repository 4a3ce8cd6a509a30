"""minillm.sandbox: generated code that loops, forks, allocates, floods, deletes or connects cannot hang,
exhaust or harm the run; scores come from doctest's verdict, made in the parent."""

from __future__ import annotations

import difflib
import doctest
import inspect
import os
import socket
import time

import pytest

from minillm import sandbox
from minillm.sandbox import RunResult, Score, run_python, score_function, score_many

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs process groups and rlimits")

ADD_DOC = '''Add two numbers.

>>> add(2, 3)
5
>>> add(-1, 1)
0
>>> add("a", 1)
Traceback (most recent call last):
...
TypeError: can only concatenate str (not "int") to str
>>> add(0.5, 0.25)  # doctest: +SKIP
0.75
'''
ADD = "def add(a, b):\n    return a + b\n"


def _group_alive(pgid: int) -> bool:
    """Is any process still in process group `pgid`? (Linux /proc; elsewhere the pid alone is checked.)"""
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # state, ppid, pgrp
            return True
    return False


# --------------------------------------------------------------------------------------------
# run_python


def test_run_python_runs_code_in_a_child_with_a_fixed_hash_seed():
    code = "import os, sys\nprint(sum(range(10)), hash('abc'))\nprint(os.getpid(), file=sys.stderr)"
    a, b = run_python(code), run_python(code)
    assert isinstance(a, RunResult)
    assert (a.status, a.returncode) == ("ok", 0)
    assert a.stdout.split()[0] == "45"
    assert a.stdout == b.stdout  # PYTHONHASHSEED=0: string hashes, and set orders, repeat
    assert int(a.stderr) != os.getpid()
    assert 0 < a.seconds < 5


def test_errors_give_the_traceback_of_the_code_only():
    r = run_python("x = 1\nraise ValueError('boom')")
    assert (r.status, r.returncode) == ("error", 1)
    assert "ValueError: boom" in r.stderr
    assert "main.py" in r.stderr and "line 2" in r.stderr
    assert "_child_main" not in r.stderr
    assert run_python("import sys; sys.exit(3)").returncode == 3


def test_infinite_loop_times_out_and_leaves_no_process():
    r = run_python("import os\nprint(os.getpid(), flush=True)\nwhile True: pass", timeout=1.0)
    assert r.status == "timeout"
    assert 1.0 <= r.seconds < 2.5
    pid = int(r.stdout.split()[0])  # what it printed before the kill is kept
    assert not _group_alive(pid)


def test_fork_bomb_is_refused_and_the_run_is_unharmed():
    r = run_python("import os\nwhile True: os.fork()")
    assert r.status == "error"
    assert "os.fork is not allowed" in r.stderr
    assert r.seconds < 5
    # A bomb that swallows the refusal only spins until the deadline, alone in its group.
    r = run_python(
        "import os\nprint(os.getpid(), flush=True)\nwhile True:\n    try:\n        os.fork()\n"
        "    except Exception:\n        pass\n",
        timeout=1.0,
    )
    assert r.status == "timeout"
    assert not _group_alive(int(r.stdout.split()[0]))
    for code, event in [
        ("import os; os.system('true')", "os.system"),
        ("import os; os.posix_spawn('/bin/true', ['true'], {})", "os.posix_spawn"),
        ("import multiprocessing as m; p = m.Process(target=print); p.start()", "os.fork"),
        ("import _posixsubprocess; _posixsubprocess.fork_exec()", "fork_exec"),
    ]:
        r = run_python(code)
        assert r.status == "error" and event in r.stderr and "not allowed" in r.stderr, (code, r.stderr)


def test_subprocess_is_refused():
    r = run_python("import subprocess\nsubprocess.run(['echo', 'sandbox-echo'])")
    assert r.status == "error"
    assert "subprocess.Popen is not allowed" in r.stderr
    assert "sandbox-echo" not in r.stdout


def test_a_10_gb_allocation_is_a_memory_error_in_the_child():
    start = time.monotonic()
    r = run_python("b = bytearray(10 * 2**30)")
    assert r.status == "error"
    assert "MemoryError" in r.stderr
    assert time.monotonic() - start < 5


def test_removing_or_writing_files_outside_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in [
        f"import os; os.remove({str(victim)!r})",
        f"import os; os.unlink({str(victim)!r})",
        f"import os; os.rename({str(victim)!r}, 'stolen.txt')",
        f"open({str(victim)!r}, 'w').write('gone')",
        f"open({str(victim)!r}, 'a').write('more')",
        f"import os; os.truncate({str(victim)!r}, 0)",
        f"import os; os.chmod({str(victim)!r}, 0)",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        f"import pathlib; pathlib.Path({str(victim)!r}).unlink()",
    ]:
        r = run_python(code)
        assert r.status == "error" and "not allowed" in r.stderr, (code, r.stderr)
    assert victim.read_text() == "keep me"
    assert oct(victim.stat().st_mode & 0o777) != "0o0"
    for code in [
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        "import os; n = os.getcwd().count('/'); open('../' * n + 'tmp/sandbox-escape.txt', 'w')",
        f"import os; os.symlink({str(tmp_path)!r}, 'link')",  # a symlink could lead writes outside
        f"import os; os.link({str(victim)!r}, 'hard')",  # and so could a hard link
        f"import os; os.mkdir({str(tmp_path / 'd')!r})",
    ]:
        r = run_python(code)
        assert r.status == "error" and "not allowed" in r.stderr, (code, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert not os.path.exists("/tmp/sandbox-escape.txt")


def test_files_inside_the_working_folder_work_and_the_folder_is_removed():
    code = (
        "import os, tempfile, shutil\n"
        "open('a.txt', 'w').write('hi')\n"
        "os.makedirs('d/e'); os.rename('a.txt', 'd/e/b.txt')\n"
        "print(open('d/e/b.txt').read(), os.getcwd())\n"
        "fd, name = tempfile.mkstemp(); os.close(fd); print(name.startswith(os.getcwd()))\n"
        "os.chmod('d', 0)  # the cleanup must cope\n"
        "import helper; print(helper.X)\n"
    )
    r = run_python(code, files={"helper.py": "X = 42\n"})
    assert r.status == "ok", r.stderr
    text, cwd, in_tmp, x = r.stdout.split()
    assert (text, in_tmp, x) == ("hi", "True", "42")
    assert "minillm-sandbox-" in cwd
    assert not os.path.exists(cwd)
    with pytest.raises(ValueError, match="relative path"):
        run_python("pass", files={"../x.py": ""})


def test_file_size_and_count_are_limited():
    r = run_python(f"with open('big', 'wb') as f:\n    f.write(b'x' * {2 * sandbox.FILE_BYTES})")
    assert r.status == "error" and "File too large" in r.stderr
    r = run_python(f"for i in range({sandbox.MAX_CREATED + 1}): open(f'f{{i}}', 'w').close()")
    assert r.status == "error" and "creating more than" in r.stderr


def test_network_is_refused():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        for code in [
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/')",
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/var/run/docker.sock')",
        ]:
            r = run_python(code)
            assert r.status == "error" and "not allowed" in r.stderr, (code, r.stderr)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever connected
    finally:
        server.close()
    # asyncio's event loop needs a local socket pair, and still works.
    r = run_python("import asyncio\nasync def f():\n    return 3\nprint(asyncio.run(f()))")
    assert (r.status, r.stdout) == ("ok", "3\n"), r.stderr


def test_no_secrets_signals_or_ctypes(monkeypatch):
    monkeypatch.setenv("MINILLM_TEST_SECRET", "hunter2")
    r = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())")
    assert r.status == "ok"
    assert "MINILLM_TEST_SECRET" not in r.stdout and "PYTHONPATH" not in r.stdout
    assert r.stdout.split("\n")[1] == "True"
    for code in [
        "import os; print(open(f'/proc/{os.getppid()}/environ').read())",
        "import os; print(open(f'/proc/self/root/proc/{os.getppid()}/environ').read())",
        "import os; os.kill(os.getppid(), 0)",
        "import os; os.kill(-1, 0)",
        "import ctypes",
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "import sys; sys.settrace(lambda *a: None)",
    ]:
        r = run_python(code)
        assert r.status == "error" and "not allowed" in r.stderr, (code, r.stderr)
        assert "hunter2" not in r.stdout


def test_an_output_flood_is_cut_not_held_in_memory():
    r = run_python("print('x' * 10**8)", max_output=10_000)
    assert r.status == "ok"
    assert r.stdout.startswith("x" * 10_000)
    assert "more bytes not kept" in r.stdout
    assert len(r.stdout) < 10_100


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="timeout"):
        run_python("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("pass", memory_mb=8)


# --------------------------------------------------------------------------------------------
# score_function and score_many


def test_a_correct_function_passes_all_its_doctests():
    s = score_function(ADD, ADD_DOC, name="add")
    assert s == Score(True, True, 3, 3, "ok", "")  # the SKIP example is not counted
    assert s.passes is True


def test_a_wrong_function_fails_some_and_says_which():
    s = score_function("def add(a, b):\n    return a * b if a != -1 else 0\n", ADD_DOC, name="add")
    assert (s.parses, s.compiles, s.doctests, s.doctests_passed) == (True, True, 3, 1)
    assert s.passes is False
    assert s.detail.startswith("example 1 (add(2, 3)): expected '5', printed '6'")


def test_code_that_does_not_parse_is_never_run(monkeypatch):
    def no_child(*args, **kwargs):
        raise AssertionError("a child was started")

    monkeypatch.setattr(sandbox.subprocess, "Popen", no_child)
    s = score_function("def add(a, b:\n    return a + b\n", ADD_DOC)
    assert (s.parses, s.compiles, s.doctests, s.doctests_passed, s.status) == (False, False, 3, 0, "error")
    assert s.detail.startswith("SyntaxError")


def test_compiles_means_the_definition_runs_and_defines_the_function():
    assert score_function("x = 1 / 0\n" + ADD, ADD_DOC).detail == "ZeroDivisionError: division by zero"
    assert not score_function("return 1\n", ADD_DOC).compiles  # parses, but does not compile
    s = score_function("def plus(a, b):\n    return a + b\n", ADD_DOC, name="add")
    assert not s.compiles and "defines no function 'add'" in s.detail
    s = score_function("from operator import add\n", ADD_DOC, name="add")
    assert not s.compiles and "not defined by the code" in s.detail  # importing is not writing it
    s = score_function("import functools\n@functools.lru_cache\n" + ADD, ADD_DOC, name="add")
    assert s.passes
    s = score_function(ADD, None)
    assert (s.compiles, s.doctests, s.passes) == (True, 0, None)


def test_verdicts_match_doctest_itself():
    # Reference code written here (trusted), run by doctest in this process, against the sandbox.
    doc = '''
    >>> f(3)
    [0, 1, 2]
    >>> f(30)  # doctest: +ELLIPSIS
    [0, 1, ..., 29]
    >>> f(12)  # doctest: +NORMALIZE_WHITESPACE
    [0,  1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
     11]
    >>> print(len(f(5)))
    5
    >>> f(-1)
    Traceback (most recent call last):
    ValueError: negative
    >>> f('x')  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    TypeError: whatever the message
    >>> {'b', 'a'} == {'a', 'b'}
    True
    >>> f(0)
    >>> f(2)
    [1, 2]
    '''
    code = (
        "def f(n):\n    if n < 0:\n        raise ValueError('negative')\n"
        "    return list(range(n)) if n else None\n"
    )
    globs: dict = {}
    exec(compile(code, "<reference>", "exec"), globs)  # noqa: S102 - our own reference code, not generated
    test = doctest.DocTestParser().get_doctest(doc, globs, "f", None, 0)
    runner = doctest.DocTestRunner(verbose=False)
    runner.run(test, out=lambda _: None)
    failed, tried = runner.summarize(verbose=False)
    s = score_function(code, doc, name="f")
    assert (s.doctests, s.doctests_passed) == (tried, tried - failed) == (9, 8)
    assert s.detail.startswith("example 9 (f(2)): expected '[1, 2]', printed '[0, 1]'")


def test_a_child_cannot_forge_its_score():
    wrong = "def add(a, b):\n    return 7\n"
    forgeries = [
        # fake result lines on stdout, and on every descriptor it can write to
        (
            "import json, os\nline = '\\n' + json.dumps({'compiled': True}) + '\\n'\n"
            "for i in range(4):\n    line += json.dumps({'i': i, 'got': '5\\n', 'exc': None}) + '\\n'\n"
            "print(line + 'doctests_passed=3')\n"
            "for fd in range(3, 64):\n    try:\n        os.write(fd, line.encode())\n"
            "    except OSError:\n        pass\n"
        ),
        # doctest patched inside the child: the comparison is not made there
        "import doctest\ndoctest.OutputChecker.check_output = lambda *a: True\n",
        # the driver's own report function, found through the frames, used to forge example 0
        (
            "import sys\nf = sys._getframe()\nwhile f is not None and 'report' not in f.f_locals:\n"
            "    f = f.f_back\n"
            "f.f_locals['report']({'i': 0, 'got': '5\\n', 'exc': None})\n"
        ),
    ]
    for forgery in forgeries:
        s = score_function(forgery + wrong, ADD_DOC, name="add")
        assert s.doctests_passed == 0 and s.passes is False, (forgery, s)
    # The last one did reach the report pipe, with the nonce; the driver's own record then came twice.
    assert s.detail == "the child's report was tampered with"


def test_a_looping_function_times_out_and_keeps_what_passed_before():
    code = "def add(a, b):\n    while a == -1:\n        pass\n    return a + b\n"
    start = time.monotonic()
    s = score_function(code, ADD_DOC, name="add", timeout=1.0)
    assert time.monotonic() - start < 2.5
    assert (s.status, s.compiles, s.doctests_passed) == ("timeout", True, 1)
    assert s.detail == "timed out after 1 s in example 2"


def test_score_many_keeps_the_order():
    items = [
        (ADD, ADD_DOC),
        ("def add(a, b):\n    return 0\n", ADD_DOC),
        ("def add(a, b:", ADD_DOC),
        (ADD, None),
        ("def add(a, b):\n    return b + a\n", ADD_DOC, "add"),
    ] * 2
    scores = score_many(items, workers=2)
    expected = [(True, 3), (True, 1), (False, 0), (True, 0), (True, 2)] * 2
    assert [(s.parses, s.doctests_passed) for s in scores] == expected
    assert [s.passes for s in scores] == [True, False, False, None, False] * 2


# --------------------------------------------------------------------------------------------
# Module context: the names of the module a function comes from

RATIO_DOC = '''The ratio of matches, with difflib's private helper.

>>> ratio(3, 4)
1.5
>>> ratio(0, 0)
1.0
>>> __name__, '__file__' in globals() and __file__.endswith('candidate.py')
('candidate', True)
'''
RATIO = "def ratio(matches, length):\n    return _calculate_ratio(matches, length)\n"


def test_module_context_gives_the_code_its_modules_private_names():
    s = score_function(RATIO, RATIO_DOC, name="ratio", module="difflib")
    assert s == Score(True, True, 3, 3, "ok", "")  # the module's dunders are not the candidate's
    s = score_function(RATIO, RATIO_DOC, name="ratio")
    assert (s.compiles, s.doctests_passed) == (True, 1)
    assert "NameError: name '_calculate_ratio' is not defined" in s.detail
    # A real stdlib function, scored against its own docstring: it needs SequenceMatcher, _nlargest...
    code = inspect.getsource(difflib.get_close_matches)
    doc = difflib.get_close_matches.__doc__
    s = score_function(code, doc, name="get_close_matches", module="difflib")
    assert s.passes and s.doctests >= 3, s
    assert not score_function(code, doc, name="get_close_matches").passes


def test_with_module_context_the_code_must_still_define_the_function():
    doc = difflib.get_close_matches.__doc__
    for code, why in [
        ("x = 1\n", "defines no function 'get_close_matches'"),  # the module's own is not in reach
        ("def close_matches(word, possibilities):\n    return []\n", "defines no function"),
        ("get_close_matches = IS_CHARACTER_JUNK\n", "is not defined by the code"),  # a module alias
        ("get_close_matches = get_close_matches\n", "NameError"),
        ("from difflib import get_close_matches\n", "is not defined by the code"),
        ("import difflib\nget_close_matches = difflib.get_close_matches\n", "is not defined by the code"),
        ("import functools\nget_close_matches = functools.lru_cache(ndiff)\n", "is not defined by the code"),
    ]:
        s = score_function(code, doc, name="get_close_matches", module="difflib")
        assert not s.compiles and s.doctests_passed == 0 and why in s.detail, (code, s)


def test_a_bad_module_name_is_refused_before_any_child_runs(monkeypatch):
    def no_child(*args, **kwargs):
        raise AssertionError("a child was started")

    monkeypatch.setattr(sandbox.subprocess, "Popen", no_child)
    for bad in ["os; import shutil", "difflib\nimport os", "", ".difflib", "email..utils", "a-b", "class",
                "__main__", 3]:
        with pytest.raises(ValueError, match="dotted module name"):
            score_function(RATIO, RATIO_DOC, name="ratio", module=bad)
    with pytest.raises(ValueError, match="needs the name"):  # else the module's own function could run
        score_function(RATIO, RATIO_DOC, module="difflib")
    with pytest.raises(ValueError, match="dotted module name"):
        score_many([(RATIO, RATIO_DOC, "ratio", "difflib"), (RATIO, RATIO_DOC, "ratio", "os.")])
    with pytest.raises(ValueError, match="needs the name"):
        score_many([(RATIO, RATIO_DOC)], module="difflib")
    with pytest.raises(ValueError, match="an item is"):
        score_many([(RATIO,)])


def test_a_module_that_cannot_be_imported_gives_an_error_score():
    s = score_function(RATIO, RATIO_DOC, name="ratio", module="minillm_no_such_module")
    assert (s.parses, s.compiles, s.doctests, s.doctests_passed, s.status) == (True, False, 3, 0, "error")
    assert s.detail == (
        "cannot import the module context minillm_no_such_module: "
        "ModuleNotFoundError: No module named 'minillm_no_such_module'"
    )
    s = score_function(RATIO, RATIO_DOC, name="ratio", module="ctypes")  # refused by the audit hook
    assert s.status == "error" and s.detail.startswith("cannot import the module context ctypes: ")
    assert "not allowed" in s.detail
    s = score_function(RATIO, RATIO_DOC, name="ratio", module="minillm")  # no site-packages in the child
    assert s.status == "error" and "No module named 'minillm'" in s.detail


def test_score_many_takes_a_module_for_all_or_per_item():
    items = [
        (RATIO, RATIO_DOC, "ratio"),
        (RATIO, RATIO_DOC, "ratio", None),  # an item's own None wins over the keyword
        (RATIO, RATIO_DOC, "ratio", "difflib"),
    ]
    assert [s.passes for s in score_many(items)] == [False, False, True]
    assert [s.passes for s in score_many(items, module="difflib")] == [True, False, True]
