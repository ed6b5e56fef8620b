"""Integration-test harness: throwaway PostgreSQL and Redis servers on free 127.0.0.1 ports.

Usage from a test::

    from harness import Postgres, Redis, evictd_bin
    with Postgres() as pg, Redis() as rd:
        pg.psql("CREATE TABLE t (id int PRIMARY KEY)")
        conn = pg.connect()              # psycopg2 connection
        rd.client().set("k", "v")        # redis-py client

Servers live in tempfile.mkdtemp() directories that are removed at exit; they
never touch the system servers (5432/6379). Every wait is bounded.

Python: the tests need psycopg2 and redis-py. When the interpreter running a
test script lacks them (e.g. a pyenv python ahead of /usr/bin in PATH) and the
system python3 has them (Debian python3-psycopg2/python3-redis), importing this
module re-executes the script under /usr/bin/python3 once.
"""

import atexit
import glob
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def _ensure_deps():
    try:
        import psycopg2  # noqa: F401
        import redis  # noqa: F401
        return
    except ImportError as exc:
        err = exc
    system_py = "/usr/bin/python3"
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    run_as_script = script and getattr(main, "__spec__", None) is None and os.path.isfile(sys.argv[0])
    if (run_as_script and os.environ.get("EVICTD_HARNESS_REEXEC") != "1" and os.path.exists(system_py)
            and os.path.realpath(sys.executable) != os.path.realpath(system_py)
            and subprocess.run([system_py, "-c", "import psycopg2, redis"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0):
        sys.stdout.flush()
        sys.stderr.flush()
        env = dict(os.environ, EVICTD_HARNESS_REEXEC="1")
        os.execve(system_py, [system_py] + sys.argv, env)
    raise ImportError("the integration tests need psycopg2 and redis-py "
                      "(apt-get install python3-psycopg2 python3-redis; see deploy/install-deps.sh): %s" % err)


_ensure_deps()

import psycopg2  # noqa: E402
import psycopg2.extensions  # noqa: E402
import redis as redis_py  # noqa: E402

START_TIMEOUT = 30.0  # seconds for any server to come up or go down
IS_ROOT = os.geteuid() == 0


class HarnessError(RuntimeError):
    """A server could not be started or stopped, or a helper timed out."""


class PsqlError(HarnessError):
    """psql exited non-zero; the message holds its stderr."""


def repo_root():
    """The repository root (two levels above this file)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def evictd_bin():
    """The evictd binary under test: $EVICTD_BIN or <repo>/build/evictd."""
    return os.environ.get("EVICTD_BIN") or os.path.join(repo_root(), "build", "evictd")


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout=10.0, interval=0.05, what="condition"):
    """Poll pred() until it returns a truthy value (returned); HarnessError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def collect_notifies(conn, timeout=1.0, want=None):
    """Read NOTIFYs on a LISTENing psycopg2 connection (autocommit) for up to timeout seconds.

    Returns a list of psycopg2 Notify objects; stops early once `want` have arrived.
    """
    got = []
    deadline = time.monotonic() + timeout
    while True:
        conn.poll()
        while conn.notifies:
            got.append(conn.notifies.pop(0))
        if want is not None and len(got) >= want:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            return got
        select.select([conn], [], [], min(left, 0.2))


def _tail(path, n=40):
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as exc:
        return "(no log: %s)" % exc


def _pg_bindir():
    if os.environ.get("PG_BINDIR"):
        return os.environ["PG_BINDIR"]
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    for d in reversed(dirs):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise HarnessError("no PostgreSQL server binaries found (set PG_BINDIR); see deploy/install-deps.sh")


class Postgres:
    """A private PostgreSQL cluster: initdb'd in a temp dir, listening on 127.0.0.1:port."""

    def __init__(self, port=None, start=True):
        self.bindir = _pg_bindir()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="evictd-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "log")
        self._running = False
        self._cleaned = False
        atexit.register(self.cleanup)
        if IS_ROOT:  # initdb/postgres refuse to run as root: hand the dir to postgres
            import pwd
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o700)
        self._server_cmd([os.path.join(self.bindir, "initdb"), "-D", self.data, "-A", "trust",
                          "--nosync", "-U", "postgres", "-E", "UTF8", "--locale=C"], "initdb")
        if start:
            self.start()

    def _server_cmd(self, argv, what, timeout=START_TIMEOUT + 15):
        if IS_ROOT:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        with tempfile.TemporaryFile() as out:  # not a pipe: the postmaster must not inherit one
            try:
                rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.dir, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                raise HarnessError("%s timed out after %ss" % (what, timeout))
            out.seek(0)
            text = out.read().decode(errors="replace")
        if rc != 0:
            raise HarnessError("%s failed (exit %d): %s\n--- server log ---\n%s" % (what, rc, text, _tail(self.log)))
        return text

    def start(self):
        opts = "-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off" % (self.port, self.dir)
        self._server_cmd([os.path.join(self.bindir, "pg_ctl"), "start", "-D", self.data, "-l", self.log,
                          "-w", "-t", str(int(START_TIMEOUT)), "-o", opts], "pg_ctl start")
        self._running = True
        return self

    def stop(self):
        if self._running:
            self._server_cmd([os.path.join(self.bindir, "pg_ctl"), "stop", "-D", self.data, "-m", "fast",
                              "-w", "-t", str(int(START_TIMEOUT))], "pg_ctl stop")
            self._running = False

    def restart(self):
        self.stop()
        return self.start()

    def dsn(self, user="postgres", db="postgres"):
        return "postgresql://%s@127.0.0.1:%d/%s" % (user, self.port, db)

    def connect(self, user="postgres", db="postgres", autocommit=False):
        conn = psycopg2.connect(self.dsn(user, db), connect_timeout=10)
        conn.autocommit = autocommit
        return conn

    def psql(self, sql=None, user="postgres", db="postgres", file=None, variables=None, tuples_only=True, timeout=120):
        """Run SQL text (or a file) through psql -v ON_ERROR_STOP=1; return stdout, raise PsqlError on failure."""
        argv = [os.path.join(self.bindir, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", db]
        if tuples_only:
            argv.append("-At")
        for k, v in (variables or {}).items():
            argv += ["-v", "%s=%s" % (k, v)]
        argv += ["-f", file if file else "-"]
        env = dict(os.environ, PGCONNECT_TIMEOUT="10")
        env.pop("PGPASSWORD", None)
        try:
            p = subprocess.run(argv, input=(sql or "") if not file else None, capture_output=True, text=True,
                               timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise PsqlError("psql timed out after %ss" % timeout)
        if p.returncode != 0:
            raise PsqlError("psql failed (exit %d): %s" % (p.returncode, p.stderr.strip()))
        return p.stdout

    def cleanup(self):
        if self._cleaned:
            return
        try:
            self.stop()
        except HarnessError as exc:
            sys.stderr.write("harness: %s\n" % exc)
        self._cleaned = True
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False


class Redis:
    """A private redis-server (no persistence) on 127.0.0.1:port, run as a child process."""

    def __init__(self, port=None, start=True, extra_args=()):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="evictd-redis-")
        self.log = os.path.join(self.dir, "log")
        self.extra_args = list(extra_args)
        self.proc = None
        self._stopped_by_signal = False
        self._cleaned = False
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        atexit.register(self.cleanup)
        if start:
            self.start()

    def start(self):
        if self.proc and self.proc.poll() is None:
            return self
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"] + self.extra_args
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise HarnessError("redis-server exited with %s\n--- log ---\n%s" % (self.proc.returncode, _tail(self.log)))
            try:
                if redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=1,
                                  socket_connect_timeout=1).ping():
                    return self
            except redis_py.exceptions.AuthenticationError:
                return self  # up, but needs a password (extra_args)
            except redis_py.exceptions.ResponseError as exc:
                if "NOAUTH" in str(exc):
                    return self
            except (redis_py.exceptions.ConnectionError, redis_py.exceptions.TimeoutError):
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise HarnessError("redis-server on port %d did not answer PING within %ss" % (self.port, START_TIMEOUT))
            time.sleep(0.05)

    def url(self, db=0):
        return "redis://127.0.0.1:%d/%d" % (self.port, db)

    def client(self, db=0, **kw):
        kw.setdefault("socket_timeout", 5)
        kw.setdefault("socket_connect_timeout", 5)
        return redis_py.Redis(host="127.0.0.1", port=self.port, db=db, **kw)

    def sigstop(self):
        """Freeze the server (connections stay open, nothing answers)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        self._stopped_by_signal = True

    def sigcont(self):
        os.kill(self.proc.pid, signal.SIGCONT)
        self._stopped_by_signal = False

    def stop(self):
        if not self.proc or self.proc.poll() is not None:
            return
        if self._stopped_by_signal:
            self.sigcont()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def cleanup(self):
        if self._cleaned:
            return
        self.stop()
        self._cleaned = True
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False
