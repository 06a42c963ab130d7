"""The sandbox against hostile programs: each test checks that the harness survives, that the result
says why, and, from outside the sandbox, that the attack had no effect. Small limits keep it fast."""

import os
import secrets
import socket
import textwrap
import time
from pathlib import Path

import pytest

import rewards.sandbox as sandbox
from rewards.sandbox import SandboxLimits, SandboxUnavailable, run_sandboxed

ROOT = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(wall_seconds=5, cpu_seconds=2, memory_mb=256, max_processes=16, max_output_bytes=4096)


pytestmark = pytest.mark.usefixtures("hang_guard")


def run(code: str, **kw):
    limits = kw.pop("limits", FAST)
    return run_sandboxed(textwrap.dedent(code), limits=limits, **kw)


def pids_of(uid: int) -> list[int]:
    """Host processes (zombies included) whose real or effective uid is ``uid``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "status").read_text().split("\nUid:")[1].split()[:2]
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        if str(uid) in fields:
            found.append(int(entry.name))
    return found


# --- ordinary programs --------------------------------------------------------------------------


def test_stdin_stdout_round_trip():
    r = run("import sys\nprint(sys.stdin.read()[::-1], end='')\n", stdin="abc\ndef")
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.killed_reason) == (0, "fed\ncba", "", False, None)


def test_large_stdin_is_fed_completely():
    data = "x" * 300_000 + "\n"  # several pipe buffers
    r = run("import sys\nprint(len(sys.stdin.read()))\n", stdin=data)
    assert r.stdout.strip() == str(len(data))


def test_exit_codes_and_tracebacks():
    assert run("import sys; sys.exit(3)").exit_code == 3
    r = run("raise ValueError('boom')")
    assert r.exit_code == 1 and "ValueError: boom" in r.stderr and r.killed_reason is None
    r = run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert r.exit_code == -11 and r.killed_reason == "killed by SIGSEGV"


def test_unicode_and_invalid_utf8_output():
    r = run("import sys\nprint('héllo ✓ 日本')\nsys.stdout.flush()\nsys.stdout.buffer.write(b'bad:\\xff\\xfe!')\n")
    assert r.exit_code == 0
    assert r.stdout == "héllo ✓ 日本\nbad:\ufffd\ufffd!"


def test_runs_as_an_unprivileged_uid_in_a_scrubbed_private_dir():
    r = run("""
        import os
        print(os.getuid(), os.getgid(), os.getgroups(), os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'])
        open('scratch.txt', 'w').write('ok')  # its own dir is writable
        print(open('scratch.txt').read())
        for path in ['/etc/shadow', '/root']:
            try:
                print(path, os.listdir(path) if os.path.isdir(path) else open(path).read())
            except OSError as exc:
                print(path, type(exc).__name__)
    """)
    uid = r.uid
    assert uid not in (None, 0) and r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == [f"{uid} {uid} [] /tmp /tmp /tmp", "ok", "/etc/shadow PermissionError"]
    # /root is closed, or (when the interpreter lives under it) shows nothing but the way to it
    if not os.stat("/root").st_mode & 0o005:  # unless root's home is open to all on this machine
        assert lines[3] in ("/root PermissionError", "/root ['.pyenv']"), lines[3]


# --- hostile programs ---------------------------------------------------------------------------


def test_no_network_not_even_to_the_hosts_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = run(f"""
            import socket
            for family, address in [(socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_INET, ('1.1.1.1', 53))]:
                s = socket.socket(family)
                s.settimeout(1)
                try:
                    s.connect(address)
                    print('connected', address)
                except OSError as exc:
                    print('refused', address, exc.errno)
        """)
        assert r.exit_code == 0, r.stderr
        assert "connected" not in r.stdout and r.stdout.count("refused") == 2
        with pytest.raises(BlockingIOError):  # the server saw no connection at all
            server.accept()
    finally:
        server.close()


def test_fork_bomb_is_bounded_and_leaves_no_process():
    # First count how many processes the limit allows, leaving the children asleep ...
    r = run("""
        import os, time
        forked = 0
        while True:
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(1000)
                os._exit(0)
            forked += 1
        print(forked)
    """)
    assert r.exit_code == 0 and 0 < int(r.stdout) < FAST.max_processes, (r.stdout, r.stderr)
    assert pids_of(r.uid) == []  # the sleeping children died with the run
    # ... then a real bomb, where every child forks too and nobody gives up.
    start = time.monotonic()
    r = run("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, limits=SandboxLimits(wall_seconds=2, cpu_seconds=2, max_processes=16))
    assert time.monotonic() - start < 6
    assert r.timed_out or r.killed_reason in ("cpu limit", "process limit"), r
    assert pids_of(r.uid) == []
    assert os.fork is not None and os.system("true") == 0  # and the harness can still start processes


def test_ten_gib_allocation_fails_with_memory_limit():
    r = run("x = bytearray(10 * 1024 ** 3)\nprint('allocated', len(x))\n")
    assert r.exit_code == 1 and "allocated" not in r.stdout
    assert r.killed_reason == "memory limit" and "MemoryError" in r.stderr


def test_writes_outside_the_private_dir_leave_nothing_behind():
    name = f"gymrl-sandbox-escape-{secrets.token_hex(6)}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", str(ROOT / name), f"/{name}"]
    r = run(f"""
        for path in {targets!r}:
            try:
                with open(path, 'w') as f:
                    f.write('escaped')
                print('wrote', path)
            except OSError as exc:
                print('denied', path, type(exc).__name__)
    """)
    escaped = [path for path in targets if os.path.exists(path)]  # /tmp, /var/tmp, /dev/shm: the tmpfs, gone now
    for path in escaped:
        os.remove(path)
    assert escaped == []
    assert r.exit_code == 0, r.stderr
    assert f"denied {ROOT / name} PermissionError" in r.stdout and f"denied /{name} PermissionError" in r.stdout


def test_printing_forever_is_capped_and_killed():
    start = time.monotonic()
    r = run("while True:\n    print('spam' * 100, flush=True)\n")
    assert time.monotonic() - start < 4
    assert r.killed_reason == "output limit" and not r.timed_out
    assert len(r.stdout.encode()) == FAST.max_output_bytes and r.exit_code == -9


def test_stderr_is_capped_too():
    r = run("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)\n")
    assert r.killed_reason == "output limit" and len(r.stderr) == FAST.max_output_bytes


def test_sleeping_forever_hits_the_wall_timeout():
    r = run("import time\ntime.sleep(1000)\n", limits=SandboxLimits(wall_seconds=1.5))
    assert r.timed_out and r.killed_reason == "wall timeout" and r.exit_code == -9
    assert 1.5 <= r.duration_s < 3
    assert pids_of(r.uid) == []


def test_harness_environment_is_invisible(monkeypatch):
    secret = f"gymrl-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("GYMRL_TEST_SECRET", secret)
    r = run(f"""
        import os
        print(dict(os.environ))
        for pid in ['self', '1', '{os.getpid()}', *os.listdir('/proc')]:
            try:
                print(pid, open(f'/proc/{{pid}}/environ', 'rb').read())
            except OSError as exc:
                print(pid, type(exc).__name__)
    """)
    assert r.exit_code == 0 and "GYMRL_TEST_SECRET" not in r.stdout + r.stderr and secret not in r.stdout
    assert "'PATH'" in r.stdout  # the program did see an environment, just not ours


def test_grandchild_that_outlives_its_parent_is_killed():
    start = time.monotonic()
    r = run("""
        import os, time
        if os.fork() == 0:
            os.setsid()  # leave the process group too
            if os.fork() == 0:
                time.sleep(1000)
            os._exit(0)
        time.sleep(0.2)
        print('parent done')
    """)
    assert r.exit_code == 0 and r.stdout == "parent done\n" and not r.timed_out
    assert time.monotonic() - start < 3  # did not wait for the grandchild
    assert pids_of(r.uid) == []


def test_busy_loop_hits_the_cpu_limit():
    r = run("while True:\n    pass\n", limits=SandboxLimits(wall_seconds=10, cpu_seconds=1))
    assert r.killed_reason == "cpu limit" and r.exit_code == -24 and not r.timed_out
    assert r.duration_s < 5


def test_huge_file_hits_the_file_size_limit():
    r = run("open('big', 'wb').write(b'x' * (2 * 1024 * 1024))\n", limits=SandboxLimits(max_file_mb=1))
    assert r.killed_reason == "file size limit" and r.exit_code == 1 and "File too large" in r.stderr


def test_refuses_to_run_without_isolation(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')"
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="unshare"):
        run_sandboxed(code)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: "/bin/false")  # namespaces refused
    with pytest.raises(SandboxUnavailable):
        run_sandboxed(code)
    assert not marker.exists()


def test_a_fork_bomb_does_not_starve_a_concurrent_run():
    # Each run has a uid of its own, so one run's processes do not count against another's limit.
    from concurrent.futures import ThreadPoolExecutor

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    honest = textwrap.dedent("""
        import os, time
        time.sleep(0.3)  # let the bomb fill its process table first
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        print('forked fine')
    """)
    # The honest run gets more wall time: it shares the CPU with the bomb (and, in CI, everything else).
    with ThreadPoolExecutor(2) as pool:
        bombed = pool.submit(run_sandboxed, bomb, limits=SandboxLimits(wall_seconds=2, max_processes=8))
        time.sleep(0.1)
        fine = pool.submit(run_sandboxed, honest, limits=SandboxLimits(wall_seconds=20, max_processes=8)).result()
        bombed = bombed.result()
    assert (fine.exit_code, fine.stdout) == (0, "forked fine\n"), fine
    assert bombed.uid != fine.uid and pids_of(bombed.uid) == []
