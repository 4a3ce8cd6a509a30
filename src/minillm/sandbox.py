"""Evaluation by execution: run model-generated Python in a limited child process, never in ours.

    result = run_python("print(sum(range(10)))")         RunResult(status="ok", stdout="45\\n", ...)
    score = score_function(code, docstring, name="f")     parses? compiles? how many doctests pass?
    score = score_function(code, docstring, name="mean", module="statistics")   in its module's names
    scores = score_many([(code, docstring), ...])         the same for many, a few at a time

Generated code is untrusted: it may loop forever, fork until the machine stops, allocate 10 GB, flood
its output, delete files or open sockets, by accident far more often than by design. Each run gets:

* its own process, in its own session, so that on timeout the whole process group is SIGKILLed, and
  after every run too (nothing it started may outlive it);
* a fresh temporary working folder (also its HOME and TMPDIR), removed afterwards;
* resource limits that the kernel enforces: address space (a 10 GB allocation is a MemoryError),
  CPU seconds, the size of any file it writes, open files, no core dumps;
* an interpreter without site-packages (`-S -s`) and a minimal environment: no proxies, tokens or
  PYTHONPATH of ours, a fixed hash seed so that outputs are reproducible;
* a Python audit hook (PEP 578), installed before the code runs and impossible to remove from Python,
  that refuses process creation (fork, exec, spawn, subprocess, os.system), signals to other
  processes, network sockets, ctypes, writing, removing or renaming files outside the working folder,
  reading other processes' /proc entries, and the tools that would let the code tamper with the hook.

What this is not: a security boundary against a determined attacker. The hook runs in the same
interpreter as the code it guards; a crafted exploit (native code, an interpreter bug, rebuilding a
purged builtin module through the import machinery) can get past it, and the child runs as the same
user as we do (root, on many containers and CI machines) and may read any file that user can read.
The kernel-enforced parts (the limits, the process-group kill, the working folder) hold regardless.
For hostile code, add an OS boundary around this: an unprivileged user, a container or a VM.

Scoring never trusts the child with the verdict. The parent parses the docstring's examples and keeps
their expected outputs; the child only runs each example's source and reports what it printed or
raised, on a pipe of its own, each line tagged with a random nonce. The parent compares, with
doctest's own OutputChecker. A child that prints a fake result, or patches doctest inside itself,
changes nothing; to pass, it has to print the expected outputs, which it is never shown.
"""

from __future__ import annotations

import ast
import doctest
import functools
import inspect
import json
import keyword
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

__all__ = ["RunResult", "run_python", "Score", "score_function", "score_many"]

Status = Literal["ok", "error", "timeout", "killed"]

# Limits that are not arguments. Any one file the child writes stays under FILE_BYTES, and it may
# create at most MAX_CREATED files or folders, so a run can never put more than 256 MB on the disk.
FILE_BYTES = 4 * 2**20
MAX_CREATED = 64
OPEN_FILES = 128
# What one doctest example may print before the child cuts it (a longer `want` is not realistic).
EXAMPLE_CHARS = 16_000

# The names of a module context that are not copied into the candidate's namespace: the import
# machinery's, which describe the module itself (the candidate keeps its own).
_MACHINERY = frozenset({
    "__name__", "__qualname__", "__file__", "__cached__", "__loader__", "__spec__", "__package__",
    "__path__", "__builtins__", "__doc__", "__annotations__", "__annotate__", "__dict__",
})

_SCRIPT = "main.py"
_CANDIDATE = "candidate.py"
_CONFIG = ".sandbox-config.json"


@dataclass(frozen=True)
class RunResult:
    """How a child run ended.

    `status` is "ok" (exit code 0), "error" (another exit code: an uncaught exception, a refused
    operation), "timeout" (we killed it at the deadline) or "killed" (a signal: the CPU limit, a crash).
    `stdout` and `stderr` keep at most `max_output` bytes each; a note at the end says how much was cut.
    """

    status: Status
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_python(
    code: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    max_output: int = 64_000,
    files: dict[str, str] | None = None,
) -> RunResult:
    """Run `code` as the `__main__` script of a limited child process and return how it ended.

    `files` maps relative paths to text written into the working folder first (helper modules, data).
    The code is never compiled or run in this process.
    """
    result, _ = _run("run", code, timeout=timeout, memory_mb=memory_mb, max_output=max_output, files=files)
    return result


# --------------------------------------------------------------------------------------------
# The parent's side: start the child, read its output with a cap, kill its group, clean up


class _Sink:
    """Collects at most `cap` bytes of a stream and counts the rest, so a flood cannot fill our memory."""

    def __init__(self, cap: int) -> None:
        self.cap, self.parts, self.kept, self.total = cap, [], 0, 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap - self.kept
        if room > 0:
            self.parts.append(data[:room])
            self.kept += min(room, len(data))

    def data(self) -> bytes:
        return b"".join(self.parts)

    def text(self) -> str:
        text = self.data().decode("utf-8", errors="replace")
        if self.total > self.kept:
            text += f"\n[... {self.total - self.kept:,} more bytes not kept]\n"
        return text


def _check_limits(timeout: float, memory_mb: int, max_output: int) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be at least 64 (the interpreter needs about 30), got {memory_mb}")
    if max_output < 0:
        raise ValueError(f"max_output must be >= 0 bytes, got {max_output}")


def _child_env(root: str) -> dict[str, str]:
    # Built from nothing, so nothing of ours leaks in (tokens, proxies, PYTHONPATH, PYTHONSTARTUP).
    # The child runs without -E so that these few PYTHON* settings apply; no others exist here.
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": root,
        "TMPDIR": root,
        "PYTHONHASHSEED": "0",  # sets and dicts of strings print in the same order on every run
        "PYTHONUTF8": "1",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",  # what it printed before a timeout is not lost in a buffer
        "OMP_NUM_THREADS": "1",
    }


def _write_files(root: str, files: dict[str, str] | None, reserved: str) -> None:
    for rel, text in (files or {}).items():
        parts = rel.replace("\\", "/").split("/")
        if not rel or os.path.isabs(rel) or ".." in parts or rel in (reserved, _CONFIG):
            raise ValueError(f"files: {rel!r} must be a relative path in the working folder, not {reserved}")
        path = os.path.join(root, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def _remove_tree(root: str) -> None:
    # The child may have made a folder unreadable (chmod is allowed inside): give them all back first.
    for top, dirs, _ in os.walk(root):
        for d in dirs:
            path = os.path.join(top, d)
            if not os.path.islink(path):
                try:
                    os.chmod(path, 0o700)
                except OSError:
                    pass
    shutil.rmtree(root, ignore_errors=True)


def _exited(proc: subprocess.Popen) -> bool:
    """Has the child ended? Without reaping it where possible: its pid then still names its group."""
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


def _kill_group(proc: subprocess.Popen) -> None:
    # start_new_session made the child the leader of a new group whose id is its pid.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(sel: selectors.BaseSelector, sinks: dict[int, _Sink], wait: float) -> bool:
    """Read what is ready within `wait` seconds; False if nothing was."""
    ready = sel.select(wait)
    for key, _ in ready:
        try:
            data = os.read(key.fd, 1 << 16)
        except BlockingIOError:
            continue
        if data:
            sinks[key.fd].feed(data)
        else:
            sel.unregister(key.fd)
    return bool(ready)


@functools.cache
def _driver_source() -> str:
    return textwrap.dedent(inspect.getsource(_child_main)) + "\n_child_main()\n"


def _run(
    mode: Literal["run", "score"],
    code: str,
    *,
    timeout: float,
    memory_mb: int,
    max_output: int,
    files: dict[str, str] | None = None,
    extra: dict | None = None,
    nonce: str = "",
    report_cap: int = 0,
) -> tuple[RunResult, bytes]:
    """Run the driver in `mode` ("run" or "score"); returns the result and the report pipe's bytes."""
    if os.name != "posix":
        raise RuntimeError("minillm.sandbox needs a POSIX system (process groups, resource limits)")
    if not sys.executable:
        raise RuntimeError("minillm.sandbox cannot find the Python interpreter (sys.executable is empty)")
    _check_limits(timeout, memory_mb, max_output)
    # A real path: the hook compares resolved paths with it (/tmp may itself be a symlink).
    root = os.path.realpath(tempfile.mkdtemp(prefix="minillm-sandbox-"))
    report_r = report_w = -1
    try:
        code_file = os.path.join(root, _SCRIPT if mode == "run" else _CANDIDATE)
        _write_files(root, files, os.path.basename(code_file))
        with open(code_file, "w", encoding="utf-8") as f:
            f.write(code)
        if mode == "score":
            report_r, report_w = os.pipe()
        config = {
            "mode": mode, "root": root, "code_file": code_file, "nonce": nonce, "report_fd": report_w,
            "memory": memory_mb * 2**20, "cpu": int(timeout) + 1, "file_bytes": FILE_BYTES,
            "max_created": MAX_CREATED, "open_files": OPEN_FILES, "example_chars": EXAMPLE_CHARS,
            **(extra or {}),
        }
        # The driver reads and deletes this file before the code runs, so the code never sees the nonce
        # there; a file rather than stdin, so a large config cannot block us on a full pipe.
        config_file = os.path.join(root, _CONFIG)
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config, f)
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-S", "-s", "-B", "-c", _driver_source(), config_file],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=root, env=_child_env(root), start_new_session=True, close_fds=True,
            pass_fds=(report_w,) if report_w >= 0 else (),
        )
        if report_w >= 0:
            os.close(report_w)  # ours: the pipe must reach EOF when the child's copy closes
            report_w = -1
        out, err, rep = _Sink(max_output), _Sink(max_output), _Sink(report_cap)
        try:
            sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
            if report_r >= 0:
                sinks[report_r] = rep
            timed_out = _watch(proc, sinks, start + timeout)
        finally:
            _kill_group(proc)  # on timeout, and after a normal exit too: nothing it started survives
            proc.kill()  # the leader itself, should the group kill have failed: wait() must return
            proc.wait()
            seconds = time.monotonic() - start
            proc.stdout.close()
            proc.stderr.close()
        rc = proc.returncode
        status: Status = "timeout" if timed_out else "killed" if rc < 0 else "ok" if rc == 0 else "error"
        return RunResult(status, rc, out.text(), err.text(), round(seconds, 3)), rep.data()
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        _remove_tree(root)


def _watch(proc: subprocess.Popen, sinks: dict[int, _Sink], deadline: float) -> bool:
    """Read the child's pipes until it ends or the deadline passes; returns True on timeout.

    On timeout the group is killed here and what it wrote before dying is still read.
    """
    sel = selectors.DefaultSelector()
    try:
        for fd in sinks:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        timed_out = False
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            # Wake up now and then: a child that ended while something still holds its pipes open
            # (it cannot fork, but still) must not keep us waiting until the deadline.
            if not _pump(sel, sinks, min(remaining, 0.1)) and _exited(proc):
                break
        while not timed_out and not _exited(proc):  # it closed its pipes but still runs
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            time.sleep(min(remaining, 0.01))
        _kill_group(proc)
        grace = time.monotonic() + 1.0  # the pipes reach EOF as soon as every writer is dead
        while sel.get_map() and time.monotonic() < grace:
            _pump(sel, sinks, 0.05)
        return timed_out
    finally:
        sel.close()


# --------------------------------------------------------------------------------------------
# The child's side. This function is sent as source text to `python -c`, so it imports all it needs
# itself and uses nothing else of this module; it never runs in the calling process.


def _child_main() -> None:  # pragma: no cover - runs only in the child
    import sys

    # With -c, sys.path[0] is the working folder: drop it until our own imports are done, so that a
    # file there (say a json.py of the caller's `files`) cannot stand in for a module we rely on.
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    import __future__

    import importlib
    import io
    import json
    import os
    import resource
    import traceback
    import types

    try:  # loaded now, while we still may, so that its fork_exec can be removed below
        import _posixsubprocess  # noqa: F401
    except ImportError:
        pass

    config_file = sys.argv[1]
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    os.remove(config_file)
    root, mode, nonce, report_fd = config["root"], config["mode"], config["nonce"], config["report_fd"]
    code_file = config["code_file"]
    with open(code_file, encoding="utf-8") as f:
        code = f.read()

    # Limits, set by the child on itself before any of the code runs (no preexec_fn: that is unsafe
    # when the parent has threads, as score_many's pool does). The hard limit goes down too.
    def limit(name, soft, hard=None):
        kind = getattr(resource, name, None)
        if kind is None:
            return
        hard = soft if hard is None else hard
        _, old_hard = resource.getrlimit(kind)
        if old_hard != resource.RLIM_INFINITY:
            hard = min(hard, old_hard)
            soft = min(soft, hard)
        try:
            resource.setrlimit(kind, (soft, hard))
        except (ValueError, OSError):
            pass

    limit("RLIMIT_AS", config["memory"])  # a big allocation fails with MemoryError instead of swapping
    limit("RLIMIT_CPU", config["cpu"], config["cpu"] + 1)  # SIGXCPU, then SIGKILL: a second guard
    limit("RLIMIT_FSIZE", config["file_bytes"])  # a write past it fails (Python ignores SIGXFSZ)
    limit("RLIMIT_NOFILE", config["open_files"])
    limit("RLIMIT_CORE", 0)
    # No RLIMIT_NPROC: it counts every process of the user (and does nothing for root), so it would
    # either stop this child's threads or nothing at all. Forks are refused by the hook below.

    # Functions that raise no audit event but must not be reached: device nodes and FIFOs anywhere,
    # signals through pidfds, the system clock, the priority or CPUs of other processes, namespaces,
    # and _posixsubprocess.fork_exec (subprocess without its audit event). Each is replaced by a stub
    # that refuses (modules that import the name still load). A guard against plain use only: the
    # import machinery can rebuild a builtin module from scratch.
    purge = {
        "posix": ("mknod", "mkfifo", "pidfd_open", "chroot", "setns", "unshare", "setpriority",
                  "sched_setaffinity", "sched_setscheduler", "sched_setparam"),
        "_signal": ("pidfd_send_signal",),
        "time": ("clock_settime", "clock_settime_ns"),
        "_posixsubprocess": ("fork_exec",),
    }

    def stub(what):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is not allowed")

        refused.__name__ = what.rsplit(".", 1)[-1]
        return refused

    stubs = []
    for modname, names in purge.items():
        mod = sys.modules.get(modname)
        for name in names:
            if mod is None or name not in mod.__dict__:
                continue
            fn = mod.__dict__[name]
            stubs.append(stub(f"{modname.lstrip('_')}.{name}"))
            for holder in (mod, os) if modname == "posix" else (mod,):
                holder.__dict__[name] = stubs[-1]
            if modname == "posix":
                for kept in (os.supports_dir_fd, os.supports_fd, os.supports_follow_symlinks,
                             os.supports_effective_ids):
                    kept.discard(fn)
            del fn
    preloaded = frozenset(sys.modules)

    refused = frozenset({
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
        "subprocess.Popen", "pty.spawn", "_posixsubprocess.fork_exec", "webbrowser.open",
        "os.link", "os.symlink", "os.chown", "os.chflags", "os.lchflags", "fcntl.ioctl",
        "resource.setrlimit", "resource.prlimit", "os.unshare", "os.setns",
        # The tools that could reach into this driver, its hook or its nonce.
        "sys.settrace", "sys.setprofile", "sys._settraceallthreads", "sys._setprofileallthreads",
        "sys.monitoring.register_callback", "sys._current_frames", "sys._current_exceptions",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "cpython.PyInterpreterState_New",  # audit hooks are per interpreter
    })
    refused_prefixes = (
        "ctypes.", "socket.", "sys.remote", "cpython.remote", "_winapi.", "winreg.", "msvcrt.",
    )
    blocked_modules = frozenset({
        "ctypes", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels",
        "_interpqueues", "_testcapi", "_testinternalcapi", "_testmultiphase", "_testsinglephase",
    })
    # Events that modify the file system, and where their (path, dir_fd) arguments are.
    path_events = {
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
        "os.rename": ((0, 2), (1, 3)), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
        "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.chdir": ((0, None),),
        "shutil.rmtree": ((0, 1),),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    inside_root = root.rstrip("/") + "/"

    # The hook and its helpers use only what they were given as default arguments (builtin
    # functions and immutable values), so that the code cannot change their behaviour by patching a
    # module; replacing a function's __code__ or defaults is refused below.
    def resolve(path, _lstat=os.lstat, _readlink=os.readlink):
        """The real absolute path of `path` (absolute, str), symlinks followed, like the kernel would."""
        stack = path.split("/")[::-1]
        done = []
        hops = 0
        while stack:
            part = stack.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            here = "/" + "/".join(done + [part])
            try:
                mode = _lstat(here).st_mode
            except (OSError, ValueError):
                done.append(part)  # does not exist (yet): the rest is taken as written
                continue
            if mode & 0o170000 == 0o120000:  # a symlink
                hops += 1
                if hops > 40:
                    return None
                target = _readlink(here)
                if target.startswith("/"):
                    done = []
                stack.extend(target.split("/")[::-1])
            else:
                done.append(part)
        return "/" + "/".join(done)

    def real(path, dir_fd=None, _fspath=os.fspath, _getcwd=os.getcwd, _readlink=os.readlink,
             _type=type, _str=str, _bytes=bytes, _int=int, _resolve=resolve):
        """Where `path` (relative to dir_fd or the working folder) really is; None if it cannot be told."""
        if _type(path) is _int:  # an open file descriptor
            try:
                return _resolve(_readlink(f"/proc/self/fd/{path}"))
            except OSError:
                return None
        try:
            path = _fspath(path)
        except TypeError:
            return None
        if _type(path) is _bytes:
            path = path.decode("utf-8", "surrogateescape")
        if _type(path) is not _str:
            return None
        if not path.startswith("/"):
            if dir_fd is None or dir_fd == -1:
                base = _getcwd()
            else:
                try:
                    base = _readlink(f"/proc/self/fd/{dir_fd}")
                except OSError:
                    return None
            path = base + "/" + path
        return _resolve(path)

    def refuse(what, _error=PermissionError):
        raise _error(f"sandbox: {what} is not allowed")

    def check_write(path, dir_fd=None, _real=real, _inside=inside_root, _refuse=refuse):
        where = _real(path, dir_fd)
        if where is None or not where.startswith(_inside):
            _refuse(f"changing {path!r} (outside the working folder)")

    created = [0]
    own = str(os.getpid())
    protected = []  # the driver's functions, filled in as they are defined

    def hook(event, args, _refused=refused, _prefixes=refused_prefixes, _blocked=blocked_modules,
             _preloaded=preloaded, _path_events=path_events, _write_flags=write_flags, _creat=os.O_CREAT,
             _real=real, _check_write=check_write, _refuse=refuse, _inside=inside_root, _created=created,
             _max_created=config["max_created"], _own=own, _pid=int(own), _stat=os.stat,
             _function=types.FunctionType, _type=type, _int=int, _str=str, _protected=protected):
        if event == "open":
            path, mode, flags = args
            if _type(path) is _int:
                return  # an already open descriptor: it was checked when it was opened
            if _type(flags) is not _int:
                flags = _write_flags if mode and any(c in mode for c in "wax+") else 0
            if mode is None and not _str(path).startswith("/") and ".." in _str(path).split("/"):
                # os.open may be given a dir_fd that the event does not show: keep relative paths below it.
                _refuse(f"os.open of {path!r} with '..'")
            if flags & _write_flags:
                where = _real(path)
                if where == "/dev/null":
                    return
                if where is None or not where.startswith(_inside):
                    _refuse(f"writing {path!r} (outside the working folder)")
                if flags & _creat:
                    _created[0] += 1
                    if _created[0] > _max_created:
                        _refuse(f"creating more than {_max_created} files")
                return
            where = _real(path)
            if where is None:
                _refuse(f"opening {path!r}")
            if where.startswith("/proc/"):
                entry = where.split("/")[2]
                if entry.isdigit() and entry != _own:
                    _refuse(f"reading another process's {where!r}")
            if mode is None and not where.startswith(_inside):
                try:
                    is_dir = _stat(where).st_mode & 0o170000 == 0o040000
                except OSError:
                    is_dir = False
                if is_dir:  # a folder's descriptor outside could serve as dir_fd for writes
                    _refuse(f"os.open of the folder {where!r}")
        elif event in _path_events:
            for i, j in _path_events[event]:
                _check_write(args[i], args[j] if j is not None else None)
            if event == "os.mkdir":
                _created[0] += 1
                if _created[0] > _max_created:
                    _refuse(f"creating more than {_max_created} files")
        elif event == "import":
            name = args[0]
            if name in _blocked or name.startswith("_test") or name in _preloaded:
                # A module loaded before the hook is only imported again if someone removed it from
                # sys.modules, to get a copy without the purged functions.
                raise ImportError(f"sandbox: importing {name} is not allowed")
        elif event == "os.kill" or event == "os.killpg":
            if args[0] not in (0, _pid):
                _refuse("signalling another process")
        elif event == "socket.__new__":
            if args[1] != 1:  # AF_UNIX socket pairs are what asyncio's event loop needs; no network
                _refuse("a network socket")
        elif event in ("object.__setattr__", "object.__delattr__"):
            if _type(args[0]) is _function and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
                for fn in _protected:  # namedtuple sets __defaults__ of its own functions: only ours
                    if fn is args[0]:
                        _refuse(f"changing {args[1]} of the sandbox's own functions")
        elif event in _refused or event.startswith(_prefixes):
            _refuse(event)

    protected.extend([hook, resolve, real, refuse, check_write, *stubs])
    sys.addaudithook(hook)
    # The module context (scoring only), imported under the limits and the hook, and before the
    # working folder goes on sys.path: only the standard library can answer to its name.
    context = context_error = None
    if mode == "score" and config.get("module"):
        try:
            context = importlib.import_module(config["module"])
        except BaseException as error:  # SystemExit and KeyboardInterrupt at import too
            context_error = error
    sys.path.insert(0, root)  # the code may import the helper files it was given

    # Saved before the code runs: it may replace sys.stdout, builtins or module functions.
    real_stdout, real_stderr = sys.stdout, sys.stderr
    displayhook = sys.__displayhook__
    string_io, write, format_only = io.StringIO, os.write, traceback.format_exception_only
    dumps, exit_now, compile_, exec_ = json.dumps, os._exit, compile, exec
    features = [(n, getattr(__future__, n)) for n in __future__.all_feature_names]

    def first_line(error):
        lines = format_only(type(error), error)
        return (lines[-1] if lines else type(error).__name__).strip()[:300]

    def future_flags(ns, _features=features):
        # What `from __future__ import ...` in a namespace turns on, as doctest reads it from globals.
        flags = 0
        for fname, feature in _features:
            if ns.get(fname) is feature:
                flags |= feature.compiler_flag
        return flags

    if mode == "run":
        main = types.ModuleType("__main__")
        main.__file__ = code_file
        sys.modules["__main__"] = main
        sys.argv = [code_file]
        try:
            exec_(compile_(code, code_file, "exec", dont_inherit=True), main.__dict__)
        except SystemExit:
            raise
        except BaseException as error:  # printed without this driver's frame, as python would
            traceback.print_exception(type(error), error, error.__traceback__.tb_next)
            sys.exit(1)
        return

    def report(record, _fd=report_fd, _nonce=nonce):
        # A line of its own (a leading newline ends any junk written to this pipe before), tagged.
        data = ("\n" + _nonce + " " + dumps(record) + "\n").encode("utf-8", "surrogatepass")
        try:
            while data:
                data = data[write(_fd, data):]
        except OSError:
            pass

    def finish(status):
        for stream in (real_stdout, real_stderr):
            try:
                stream.flush()
            except Exception:
                pass
        exit_now(status)  # no atexit handlers of the candidate's: they could print or hang

    protected.extend([first_line, future_flags, report, finish])

    name = config.get("name")
    module = types.ModuleType("candidate")
    module.__file__ = code_file
    sys.modules["candidate"] = module
    ns = module.__dict__
    if context_error is not None:
        report({"compiled": False, "error": "cannot import the module context "
                f"{config['module']}: {first_line(context_error)}"})
        finish(1)
    if context is not None:
        # The candidate starts from the names of its module (doctest runs examples in a copy of the
        # module's globals too), less the import machinery's and the function's own: the module's
        # real function is never in reach under that name, the code has to define it.
        machinery = config["machinery"]
        for key, value in list(vars(context).items()):
            if key != name and key not in machinery:
                ns[key] = value
    try:
        exec_(compile_(code, code_file, "exec", future_flags(ns), True), ns)
    except BaseException as error:
        report({"compiled": False, "error": first_line(error)})
        finish(1)
    if name is not None:
        obj = inner = ns.get(name)
        for _ in range(10):  # through decorators that keep __wrapped__ (functools.wraps, lru_cache)
            if isinstance(inner, type) or not hasattr(inner, "__wrapped__"):
                break
            inner = inner.__wrapped__
        code_obj = getattr(inner, "__code__", None)
        ours = (isinstance(inner, type) and getattr(inner, "__module__", None) == "candidate") or (
            code_obj is not None and code_obj.co_filename == code_file
        )
        if not callable(obj):
            report({"compiled": False, "error": f"the code defines no function {name!r}"})
            finish(1)
        if not ours:  # `from textwrap import dedent` is not writing dedent
            report({"compiled": False, "error": f"{name!r} is not defined by the code (imported?)"})
            finish(1)
    report({"compiled": True})

    cap = config["example_chars"]
    label = name or "candidate"
    for i, source in config["examples"]:
        flags = future_flags(ns)
        out = string_io()
        sys.stdout, sys.displayhook = out, displayhook
        exc = None
        try:  # doctest's own way: compile as "single" so that bare expressions are displayed
            exec_(compile_(source, f"<doctest {label}[{i}]>", "single", flags, True), ns)
        except BaseException as error:
            formatted = format_only(type(error), error)
            if isinstance(error, SyntaxError):
                kind = type(error)  # doctest keeps a SyntaxError from its "Name:" line on
                prefixes = (f"{kind.__qualname__}:", f"{kind.__module__}.{kind.__qualname__}:")
                for k, line in enumerate(formatted):
                    if line.startswith(prefixes):
                        formatted = formatted[k:]
                        break
            exc = "".join(formatted)
        finally:
            sys.stdout = real_stdout
        got = out.getvalue()
        if got and not got.endswith("\n"):
            got += "\n"
        if len(got) > cap:
            got = got[:cap] + "\n[output cut]\n"
        report({"i": i, "got": got, "exc": exc})
    report({"done": True})
    finish(0)


# --------------------------------------------------------------------------------------------
# Scoring a generated function against the doctests of a reference docstring


@dataclass(frozen=True)
class Score:
    """How a generated function fares: does it parse, run, and pass the reference's doctests?

    `compiles` means that the definition ran without error (and, when a name was asked for, that the
    code itself defines it). `doctests` counts the reference's examples (those marked SKIP aside);
    `status` is the child run's ("error" also when the code did not parse and nothing ran);
    `detail` is the first thing that went wrong, in one short line ("" when nothing did).
    """

    parses: bool
    compiles: bool
    doctests: int
    doctests_passed: int
    status: Status
    detail: str

    @property
    def passes(self) -> bool | None:
        """All doctests pass; None when the reference has none, so nothing can be said."""
        if self.doctests == 0:
            return None
        return self.doctests_passed == self.doctests


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _examples(docstring: str | None, name: str) -> tuple[list[tuple[int, doctest.Example, int]], str]:
    """The examples to run, as (index, example, option flags), SKIP ones left out; and a parse error."""
    if not docstring:
        return [], ""
    try:
        examples = doctest.DocTestParser().get_examples(docstring, name)
    except ValueError as error:  # a malformed docstring: nothing can be checked
        return [], _short(f"docstring: {error}")
    kept = []
    for i, example in enumerate(examples):
        flags = 0
        for flag, on in example.options.items():
            flags = flags | flag if on else flags & ~flag
        if not flags & doctest.SKIP:
            kept.append((i, example, flags))
    return kept, ""


def _strip_details(msg: str) -> str:
    strip = getattr(doctest, "_strip_exception_details", None)
    if strip is not None:
        return strip(msg)
    return msg.split(":", 1)[0].rsplit(".", 1)[-1]  # pragma: no cover - doctest has had it since 3.2


def _judge(example: doctest.Example, flags: int, got: str, exc: str | None) -> bool:
    """doctest.DocTestRunner's verdict on one example, from what the child printed or raised."""
    check = doctest.OutputChecker().check_output
    if exc is None:
        return check(example.want, got, flags)
    if example.exc_msg is None:
        return False  # an exception nobody expected
    if check(example.exc_msg, exc, flags):
        return True
    return bool(flags & doctest.IGNORE_EXCEPTION_DETAIL) and check(
        _strip_details(example.exc_msg), _strip_details(exc), flags
    )


def _records(report: bytes, nonce: str) -> tuple[list[dict], bool]:
    """The driver's records (lines tagged with the nonce); and whether any record came twice."""
    tag = (nonce + " ").encode()
    records, seen, repeated = [], set(), False
    for line in report.split(b"\n"):
        if not line.startswith(tag):
            continue
        try:
            record = json.loads(line[len(tag):].decode("utf-8", "surrogatepass"))
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        key = ("i", record.get("i")) if "i" in record else tuple(sorted(record))[:1]
        repeated |= key in seen
        seen.add(key)
        records.append(record)
    return records, repeated


def _check_module(module: object, name: str | None) -> None:
    """Refuse, before any child runs, a module context that is not a dotted name, or one without `name`."""
    if module is None:
        return
    if (not isinstance(module, str) or module == "__main__"
            or not all(part.isidentifier() and not keyword.iskeyword(part) for part in module.split("."))):
        raise ValueError(f"module must be a dotted module name such as 'email.utils', got {module!r}")
    if name is None:
        # Without a name, the examples could run the module's own function and pass for the code.
        raise ValueError(f"module={module!r} needs the name of the function the code must define")


def score_function(
    code: str,
    docstring: str | None = None,
    *,
    name: str | None = None,
    timeout: float = 5.0,
    module: str | None = None,
) -> Score:
    """Score generated `code` against the doctest examples of the reference `docstring`.

    The code is parsed here (ast.parse runs nothing); everything else happens in a sandboxed child,
    which executes the definition, then each example's source in its namespace. The expected outputs
    never leave this process: the child reports what each example printed or raised, and the
    comparison is doctest's, made here. With `name`, the code must define that function itself.

    `module` (a dotted name: "difflib", "email.utils") is the context of a function taken from a
    module, whose docstring's examples need that module's names, private helpers and constants
    included. The child imports it (after its limits and hook are in place, from the standard
    library only: the child has no site-packages; the import counts against `timeout`) and starts
    the code's namespace from a copy of its globals, as doctest does, less the import machinery's
    dunders and less `name` itself, which `module` requires: the module's real function is never in
    reach under its name, and an alias of another of its functions is not a function the code
    defines. A module that cannot be imported in the sandbox gives an "error" score saying so. The
    context is the module's globals after its import, as doctest sees them: a name the module
    deletes at its end (difflib's `del re`) is not there.

    Methods are not scored: their code runs here as a function outside its class, without the name
    mangling of `self.__x`, the `__class__` cell of `super()`, or the instance their examples need.
    """
    _check_module(module, name)
    examples, docstring_error = _examples(docstring, name or "candidate")
    n = len(examples)
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        if isinstance(error, SyntaxError):
            detail = f"{type(error).__name__}: {error.msg} (line {error.lineno})"
        else:
            detail = f"{type(error).__name__}: {error}"
        return Score(False, False, n, 0, "error", _short(detail))
    # Each example's record holds at most EXAMPLE_CHARS characters, up to 6 bytes each in JSON.
    nonce = secrets.token_hex(16)
    result, report = _run(
        "score", code, timeout=timeout, memory_mb=512, max_output=16_000, nonce=nonce,
        extra={"name": name, "module": module, "machinery": sorted(_MACHINERY),
               "examples": [(i, ex.source) for i, ex, _ in examples]},
        report_cap=(n + 4) * (6 * EXAMPLE_CHARS + 4096),
    )
    records, repeated = _records(report, nonce)
    if repeated:
        return Score(True, False, n, 0, result.status, "the child's report was tampered with")
    compiled = next((r for r in records if "compiled" in r), None)
    by_index = {r.get("i"): r for r in records if "i" in r}
    passed, first_failure = 0, ""
    for i, example, flags in examples:
        record = by_index.get(i)
        if record is None:
            continue
        got, exc = record.get("got"), record.get("exc")
        if not isinstance(got, str) or not (exc is None or isinstance(exc, str)):
            continue
        if _judge(example, flags, got, exc):
            passed += 1
        elif not first_failure:
            said = f"raised {exc.strip().splitlines()[-1]}" if exc else f"printed {got.strip()!r}"
            want = (example.exc_msg or example.want).strip()
            first_failure = f"example {i + 1} ({example.source.strip()}): expected {want!r}, {said}"
    compiles = bool(compiled and compiled.get("compiled") is True)
    if result.status == "timeout":
        pending = next((i for i, _, _ in examples if i not in by_index), None)
        where = "" if pending is None else f" in example {pending + 1}"
        detail = f"timed out after {timeout:g} s" + (" defining the code" if compiled is None else where)
    elif result.status == "killed":
        detail = f"killed by {_signal_name(-result.returncode)}"
    elif compiled is None:
        lines = result.stderr.strip().splitlines()
        detail = "the child gave no report" + (f": {lines[-1]}" if lines else "")
    elif not compiles:
        detail = str(compiled.get("error", "the code did not run"))
    else:
        detail = first_failure or docstring_error
    return Score(True, compiles, n, passed if compiles else 0, result.status, _short(detail))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def score_many(
    items: Iterable[tuple[str, str | None] | tuple[str, str | None, str | None]
                    | tuple[str, str | None, str | None, str | None]],
    *,
    workers: int = 2,
    timeout: float = 5.0,
    module: str | None = None,
) -> list[Score]:
    """score_function over (code, docstring), (code, docstring, name) or (code, docstring, name, module)
    items, `workers` children at a time (each item its own process); the scores come back in the order
    of the items. `module` is the module context of the items without a fourth element (an item's own,
    None included, wins). Every item is checked before the first child starts."""
    jobs = []
    for item in items:
        job = tuple(item)
        if not 2 <= len(job) <= 4:
            raise ValueError(f"an item is (code, docstring[, name[, module]]), got {len(job)} elements")
        name = job[2] if len(job) > 2 else None
        mod = job[3] if len(job) > 3 else module
        _check_module(mod, name)
        jobs.append((job[0], job[1], name, mod))

    def one(job: tuple) -> Score:
        code, docstring, name, mod = job
        return score_function(code, docstring, name=name, timeout=timeout, module=mod)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, jobs))
