"""Run untrusted Python (model-written code) in a throwaway sandbox on Linux.

``run_sandboxed(code)`` starts ``unshare`` with fresh network, mount, PID, IPC and UTS namespaces. Inside,
a small root launcher (``_LAUNCHER``, PID 1 of the new PID namespace) prepares the mounts, then forks the
program, which sets its limits, drops privileges and execs ``python -I``. Each layer and why it exists:

- **Network namespace**: only a loopback that is down, so no connection can leave (not even to the host's
  127.0.0.1 services: Ray, vLLM, the reward servers). Without ``unshare`` or namespaces nothing is run:
  ``SandboxUnavailable`` is raised instead.
- **PID namespace + process group**: when the launcher (PID 1) dies, the kernel kills every process left in
  the namespace, even ones that called ``setsid()`` to leave the process group. The harness SIGKILLs the
  whole group on timeout, on too much output, and always at the end; when it stops a live run it also
  waits for PID 1 to be gone, which the kernel allows only once the namespace is empty. Nothing outlives
  a run.
- **Mount namespace**: a fresh size-limited tmpfs, owned by the run's uid, is the program's cwd, HOME and
  TMPDIR, and is also mounted over /tmp, /var/tmp, /dev/shm and /run/lock, so the world-writable places
  (and the host's sockets in /tmp, such as Ray's) are out of sight. It vanishes with the namespace.
  Directories the interpreter needs but the sandbox user may not enter (pyenv under /root) are shown
  through a traversable tmpfs laid over the closed parent, so the rest of it stays hidden.
- **Privilege drop** (when run as root): supplementary groups cleared, then setgid/setuid to a uid of its
  own, picked at random per run from a range no account uses, so writes outside the tmpfs fail, other
  sandboxes' files are foreign, and RLIMIT_NPROC (which root ignores) counts only this run's processes.
  ``no_new_privs`` makes setuid binaries useless. Not root: ``--user --map-root-user`` creates the
  namespaces and the program enters a further user namespace to shed the capabilities that gave; its
  writes are then limited only by the invoking user's own permissions.
- **Resource limits** (setrlimit before exec, per process): CPU seconds (busy loops: SIGXCPU, SIGKILL a
  second later), address space (a 10 GiB allocation fails with MemoryError instead of starving the host),
  processes (fork bombs), open files, file size, no core dumps; the tmpfs size caps the disk used.
- **Scrubbed environment**: only PATH, LANG, HOME, TMPDIR and PYTHON* safety settings (which ``-I``
  makes moot for CPython); none of the harness's variables (tokens, keys) reach the program, and its
  /proc shows only its own namespace.
- **Output caps**: stdout and stderr are read as they come; past ``max_output_bytes`` the run is killed,
  so ``while True: print()`` cannot fill memory. Bytes are decoded with ``errors="replace"``.

Not defended: kernel exploits (no seccomp filter; the program may create user namespaces of its own), the
readable filesystem (the repository, site-packages), and memory summed over processes (the address-space
limit is per process, up to ``max_processes`` of them; a cgroup would be needed to cap the total).
"""

import marshal
import os
import re
import secrets
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_UID_BASE, _UID_SPAN = 1_900_000_000, 1 << 24  # no account, container or subuid range lives up here
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8", "PYTHONNOUSERSITE": "1"}
_NAMESPACES = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--ipc", "--uts"]


class SandboxUnavailable(RuntimeError):
    """The machine offers no way to isolate the program (no ``unshare``, namespaces refused); nothing ran."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0  # sleeping or waiting forever
    cpu_seconds: int = 5  # busy loops (RLIMIT_CPU, per process)
    memory_mb: int = 512  # huge allocations (RLIMIT_AS, per process)
    max_processes: int = 32  # fork bombs (RLIMIT_NPROC, for the run's own uid)
    max_open_files: int = 64  # descriptor exhaustion (RLIMIT_NOFILE)
    max_file_mb: int = 16  # one huge file (RLIMIT_FSIZE)
    max_disk_mb: int = 64  # many files: the size of the private tmpfs
    max_output_bytes: int = 64 * 1024  # per stream; more kills the run


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int  # negative: killed by that signal (as in ``subprocess``)
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None  # "wall timeout", "output limit", "cpu limit", "memory limit", ...
    duration_s: float
    uid: int | None = None  # the uid the program ran as (None when not started as root)


def run_sandboxed(code: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
                  interpreter: str | None = None) -> SandboxResult:
    """Run ``code`` with ``interpreter -I`` (default ``sys.executable``) in the sandbox described above."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise SandboxUnavailable("util-linux `unshare` not found: cannot isolate the network, refusing to run")
    interpreter = interpreter or sys.executable
    root = os.geteuid() == 0
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if root else None
    mb = 1024 * 1024
    rlimits = [("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 1), ("RLIMIT_AS", limits.memory_mb * mb, None),
               ("RLIMIT_NPROC", limits.max_processes, None), ("RLIMIT_NOFILE", limits.max_open_files, None),
               ("RLIMIT_FSIZE", limits.max_file_mb * mb, None), ("RLIMIT_CORE", 0, None)]
    report_r, report_w = os.pipe()  # the launcher's channel to us; closed (CLOEXEC) before the program runs
    report = ""
    try:
        with tempfile.TemporaryDirectory(prefix="gymrl-sandbox-") as host_dir:
            program = os.path.join(host_dir, "main.py")
            with open(program, "w", encoding="utf-8", errors="replace") as f:
                f.write(code)
            config = {"report_fd": report_w, "uid": uid, "program": program, "disk_mb": limits.max_disk_mb,
                      "rlimits": [(name, soft, soft if hard is None else hard) for name, soft, hard in rlimits],
                      "argv": [interpreter, "-I", "/tmp/main.py"], "env": _ENV,
                      "expose": _interpreter_dirs(interpreter) if root else []}
            flags = _NAMESPACES if root else ["--user", "--map-root-user", *_NAMESPACES]
            argv = [unshare, *flags, "--", sys.executable, "-I", "-S", "-c", _LAUNCHER, marshal.dumps(config).hex()]
            start = time.monotonic()
            with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={"PATH": _ENV["PATH"], "LANG": "C.UTF-8"}, cwd="/",
                                  start_new_session=True, pass_fds=(report_w,)) as proc:
                os.close(report_w)
                report_w = -1
                ours = "interrupted"
                try:
                    out, err, ours = _communicate(proc, stdin.encode(), limits, start + limits.wall_seconds)
                finally:
                    report = _read_available(report_r)
                    _kill_all(proc, report if ours else "")  # a live run: wait for its namespace to empty
            duration = time.monotonic() - start
    finally:
        if report_w >= 0:
            os.close(report_w)
        report += _read_available(report_r)
        os.close(report_r)
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    if failure := re.search(r"^error: (.*)$", report, re.M):
        raise SandboxUnavailable(f"sandbox setup failed: {failure.group(1)}")
    if status := re.search(r"^exit (\d+)$", report, re.M):
        exit_code = os.waitstatus_to_exitcode(int(status.group(1)))
    elif ours:  # we killed it while it was still starting
        exit_code = proc.returncode
    else:
        raise SandboxUnavailable(f"sandbox did not start (unshare exit {proc.returncode}): {stderr.strip()[-500:]}")
    return SandboxResult(exit_code, stdout, stderr, ours == "wall timeout", ours or _why(exit_code, stderr),
                         duration, uid)


def _communicate(proc, data: bytes, limits: SandboxLimits, deadline: float):
    """Feed stdin and read stdout/stderr until ``unshare`` has exited and both pipes are at their end.

    Returns (stdout bytes, stderr bytes, why we stopped early or None); killing is the caller's job."""
    outputs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    stdin_fd, pidfd = proc.stdin.fileno(), os.pidfd_open(proc.pid)  # a pidfd turns readable on exit
    waiting, pending, stopped = {*outputs, pidfd}, memoryview(data), None
    with selectors.DefaultSelector() as sel:
        for fd in waiting:
            sel.register(fd, selectors.EVENT_READ)
        if pending:
            os.set_blocking(stdin_fd, False)
            sel.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        try:
            while waiting and stopped is None:
                remaining = deadline - time.monotonic()
                events = sel.select(remaining) if remaining > 0 else []
                if remaining <= 0:
                    stopped = "wall timeout"
                for key, _ in events:
                    if key.fd == stdin_fd:
                        try:
                            pending = pending[os.write(stdin_fd, pending[:65536]):]
                        except BrokenPipeError:  # it stopped reading: drop the rest
                            pending = pending[:0]
                    elif key.fd == pidfd or not (block := os.read(key.fd, 65536)):  # exited, or end of file
                        sel.unregister(key.fd)
                        waiting.discard(key.fd)
                    else:
                        outputs[key.fd] += block
                        if len(outputs[key.fd]) > limits.max_output_bytes:
                            del outputs[key.fd][limits.max_output_bytes:]
                            stopped = "output limit"
                if stdin_fd in sel.get_map() and (not pending or pidfd not in waiting):
                    sel.unregister(stdin_fd)
                    proc.stdin.close()
        finally:
            os.close(pidfd)
    return bytes(outputs[proc.stdout.fileno()]), bytes(outputs[proc.stderr.fileno()]), stopped


def _why(exit_code: int, stderr: str) -> str | None:
    """A name for how the program ended, when it was a limit (or a signal) and not its own choice."""
    if exit_code < 0:
        return {signal.SIGXCPU: "cpu limit", signal.SIGXFSZ: "file size limit"}.get(
            -exit_code, f"killed by {signal.Signals(-exit_code).name}")
    tail = stderr[-2000:]
    if exit_code and "MemoryError" in tail:
        return "memory limit"
    if exit_code and "BlockingIOError: [Errno 11]" in tail:
        return "process limit"
    if exit_code and "[Errno 27] File too large" in tail:  # Python ignores SIGXFSZ, so writes fail instead
        return "file size limit"
    return None


def _kill_all(proc: subprocess.Popen, report: str) -> None:
    """SIGKILL the process group, wait until the PID namespace is empty, then reap ``unshare``.

    The group goes first, before any reaping, so its id cannot have been reused. When we stop a live run
    (``report`` has the launcher's host pid), we also wait for the launcher, PID 1 of the namespace: it is
    gone only after the kernel has killed and reaped everything else in the namespace."""
    launcher = None
    if found := re.search(r"^pid (\d+)$", report, re.M):
        try:
            launcher = os.pidfd_open(int(found.group(1)))
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if launcher is not None:
        select.select([launcher], [], [], 10)  # a pidfd turns readable when its process has exited
        os.close(launcher)
    proc.wait()


def _read_available(fd: int) -> str:
    """What the launcher has written to its report pipe so far."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks).decode("utf-8", "replace")


def _interpreter_dirs(interpreter: str) -> list[str]:
    """Directories the interpreter needs (its prefix, a venv's base), which the sandbox user must reach."""
    dirs = {os.path.dirname(os.path.dirname(p)) for p in (interpreter, os.path.realpath(interpreter))}
    if os.path.realpath(interpreter) == os.path.realpath(sys.executable):
        dirs |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted({os.path.realpath(d) for d in dirs}, key=len)


# The launcher runs as root (or as root of a new user namespace) and is PID 1 of the new PID namespace.
# It mounts the private tmpfs, forks the program, relays its wait status, then exits, which kills
# whatever the program left behind. Failures before the program's exec are reported as "error: ...".
_LAUNCHER = r"""
import ctypes, marshal, os, resource, stat, sys
cfg = marshal.loads(bytes.fromhex(sys.argv[1]))  # same interpreter on both sides
report, uid = cfg["report_fd"], cfg["uid"]
libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 2, 4, 8, 4096, 16384
PR_SET_NO_NEW_PRIVS, CLONE_NEWUSER = 38, 0x10000000

def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

def enterable(path):  # can the sandbox user pass through this directory?
    st = os.stat(path)
    bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == uid else stat.S_IXOTH
    return uid is None or bool(st.st_mode & bit)

def expose(path, fd):  # make `path` lead to the directory held as `fd`, for the sandbox user
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        here = "/" + "/".join(parts[:i])
        if not os.path.isdir(here):
            os.mkdir(here, 0o755)
        elif not enterable(here):  # e.g. /root: cover it with an empty, enterable tmpfs
            mount("tmpfs", here, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    if not (os.path.isdir(path) and os.path.samestat(os.stat(path), os.fstat(fd))):
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)

try:  # our pid outside the namespace, so that the harness can wait for the namespace to empty
    host_pid = open("/proc/self/status").read().split("NSpid:")[1].split()[0]
    os.write(report, f"pid {host_pid}\n".encode())
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # a /proc showing only this namespace
    os.umask(0o022)
    with open(cfg["program"], "rb") as f:
        program = f.read()
    held = [(path, os.open(path, os.O_PATH)) for path in cfg["expose"]]
    owner = "" if uid is None else f",uid={uid},gid={uid}"
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,mode=700{owner}")
    for shared in ("/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(shared):
            mount("/tmp", shared, None, MS_BIND)
    for path, fd in held:
        expose(path, fd)
        os.close(fd)
    with open("/tmp/main.py", "wb") as f:
        f.write(program)
    os.set_inheritable(report, False)
except Exception as exc:
    os.write(report, f"error: {exc}\n".encode())
    sys.exit(1)

pid = os.fork()
if pid == 0:
    try:
        os.chdir("/tmp")
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        if uid is None:
            check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        else:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as exc:
        os.write(report, f"error: {exc}\n".encode())
    os._exit(127)
while True:  # as PID 1 this also reaps orphans
    done, status = os.wait()
    if done == pid:
        break
os.write(report, f"exit {status}\n".encode())
"""
