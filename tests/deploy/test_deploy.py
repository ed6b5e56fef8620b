#!/usr/bin/env python3
"""Checks of deploy/: what can be checked on this machine without Docker or Kubernetes.

    python3 tests/deploy/test_deploy.py          # last line: "N passed, N failed, N skipped"

- systemd: `systemd-analyze verify` accepts deploy/systemd/evictd.service (skipped, saying so, only
  where systemd-analyze is absent), its offline security exposure stays low, and the unit has the
  directives the deployment relies on; the env example names the config's secrets.
- Docker: the Dockerfile's stages, base images and packages; its build-stage commands are the
  configure/build commands of deploy/demo.sh and tests/run (the README's two commands), and
  running them here, outside Docker, in a copy of exactly what the Dockerfile COPYs, builds
  evictd; the final stage installs exactly the libraries that binary links.
- Compose: the YAML parses, has postgres, redis and evictd with health checks, and its one-shot
  database setup script, run here against a throwaway PostgreSQL and Redis, lets the
  least-privilege role run `evictd check --connect` and delete keys.
- Kubernetes: the YAML parses; probes, ports, Secret references, resources, security context, the
  dead-letter emptyDir; the ConfigMap's config is config/routex.json plus "http" and is valid.
- Grafana: the dashboard parses, uses a Prometheus datasource variable, and queries only metrics
  (and labels) listed in deploy/grafana/metrics.txt, which the /metrics test checks are served.

Environment: EVICTD_BIN (the evictd binary; default build/evictd), EVD_DEPLOY_SKIP_BUILD=1 skips
the out-of-Docker build (about a minute on 2 cores).
Needs python3-yaml (deploy/install-deps.sh installs it); the compose-setup test also needs
python3-psycopg2 and python3-redis, PostgreSQL and redis-server, like the integration tests.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import unittest


def _prefer_system_python():
    """Re-run under Debian's python3 when this interpreter lacks yaml/psycopg2/redis and it has them."""
    try:
        import yaml  # noqa: F401
        import psycopg2  # noqa: F401
        import redis  # noqa: F401
        return
    except ImportError:
        pass
    system_py = "/usr/bin/python3"
    if (os.environ.get("EVD_DEPLOY_REEXEC") != "1" and os.path.exists(system_py)
            and os.path.realpath(sys.executable) != os.path.realpath(system_py)
            and subprocess.run([system_py, "-c", "import yaml, psycopg2, redis"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30).returncode == 0):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(system_py, [system_py] + sys.argv, dict(os.environ, EVD_DEPLOY_REEXEC="1"))


if __name__ == "__main__":
    _prefer_system_python()

try:
    import yaml
except ImportError:  # reported by the tests that need it
    yaml = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
UNIT = os.path.join(DEPLOY, "systemd", "evictd.service")
ENV_EXAMPLE = os.path.join(DEPLOY, "systemd", "evictd.env.example")
DOCKERFILE = os.path.join(DEPLOY, "docker", "Dockerfile")
COMPOSE = os.path.join(DEPLOY, "docker", "docker-compose.yml")
K8S = os.path.join(DEPLOY, "k8s", "evictd-sidecar.yaml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "evictd-dashboard.json")
METRICS_TXT = os.path.join(DEPLOY, "grafana", "metrics.txt")
ROUTEX = os.path.join(ROOT, "config", "routex.json")

INSTALLED_BIN = "/usr/local/bin/evictd"  # where the unit, the image and the docs put evictd
CONFIG_PATH = "/etc/evictd/config.json"
HTTP_PORT = 9187

# The metric families issue 6 asks /metrics to serve (the dashboard must stay within them).
ISSUE_METRICS = {
    "evictd_changes_total": {"table", "op"},
    "evictd_keys_deleted_total": {"target"},
    "evictd_patterns_deleted_total": {"target"},
    "evictd_retries_total": {"target"},
    "evictd_dead_letters_total": {"reason"},
    "evictd_pending": set(),
    "evictd_outbox_backlog": set(),
    "evictd_reconnects_total": {"conn"},
    "evictd_lag_seconds_bucket": {"le"},
    "evictd_lag_seconds_sum": set(),
    "evictd_lag_seconds_count": set(),
}


def need_yaml(test):
    if yaml is None:
        test.fail("python3-yaml is not installed (apt-get install python3-yaml; deploy/install-deps.sh installs it)")


def evictd_bin():
    """The evictd binary to exercise, or None: $EVICTD_BIN, else build/evictd."""
    for cand in (os.environ.get("EVICTD_BIN"), os.path.join(ROOT, "build", "evictd")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def readme_setting_default(name):
    """The default of a setting in the README's settings table (`| `name` | default | ...`)."""
    m = re.search(r"^\|\s*`%s`\s*\|\s*([^|]+?)\s*\|" % re.escape(name), read(os.path.join(ROOT, "README.md")), re.M)
    if not m:
        raise AssertionError("README.md has no settings-table row for %s" % name)
    return m.group(1).strip("` ")


def seconds(value):
    """A systemd time span ("15s", "1min 30s", "90") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        if unit not in units:
            raise AssertionError("unsupported time unit in %r" % value)
        total += float(num) * units[unit]
    return total


# ---------------------------------------------------------------- parsers

def parse_unit(path):
    """A systemd unit file as {section: [(key, value), ...]} (comments dropped, continuations joined)."""
    sections, cur, pending = {}, None, ""
    for raw in read(path).splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        cur.append((key.strip(), value.strip()))
    return sections


def unit_values(sections, section, key):
    return [v for k, v in sections.get(section, []) if k == key]


def unit_value(sections, section, key):
    vals = unit_values(sections, section, key)
    return vals[-1] if vals else None


def parse_dockerfile(path):
    """Stages of a Dockerfile: [{"name", "base", "instrs": [(INSTR, args)]}], continuations joined."""
    lines, buf = [], ""
    for raw in read(path).splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue  # a comment inside a continued instruction
        if s.endswith("\\"):
            buf += s[:-1].strip() + " "
            continue
        lines.append((buf + s).strip())
        buf = ""
    stages = []
    for line in lines:
        instr, _, args = line.partition(" ")
        instr, args = instr.upper(), args.strip()
        if instr == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "base": words[0], "instrs": []})
        else:
            stages[-1]["instrs"].append((instr, args))
    return stages


def stage_chain(stages, stage):
    """The stage and the stages it builds FROM, nearest first, ending at an external image."""
    by_name = {s["name"]: s for s in stages if s["name"]}
    chain = [stage]
    while chain[-1]["base"] in by_name:
        chain.append(by_name[chain[-1]["base"]])
    return chain


def exec_form(args):
    """A Dockerfile ENTRYPOINT/CMD argument as a list (JSON exec form, else shell words)."""
    try:
        v = json.loads(args)
        if isinstance(v, list):
            return v
    except ValueError:
        pass
    return shlex.split(args)


def apt_packages(command):
    """The package names of every `apt-get install` in a shell command."""
    pkgs = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        if "apt-get" in words and "install" in words:
            for w in words[words.index("install") + 1:]:
                if not w.startswith("-"):
                    pkgs.append(w)
    return pkgs


def install_deps_packages():
    text = read(os.path.join(DEPLOY, "install-deps.sh"))
    m = re.search(r"^PACKAGES=\((.*?)^\)", text, re.S | re.M)
    body = "\n".join(line.split("#", 1)[0] for line in m.group(1).splitlines())
    return set(body.split())


def shell_commands(text):
    """Simple commands in shell text, split at newlines, &&, || and ;, comments dropped."""
    cmds = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;", line):
            if part.strip():
                cmds.append(part.strip())
    return cmds


def normalize_cmake(cmd):
    """A cmake command as words, independent of where the tree is and how parallel the build is:
    "$root/build" -> build, "$root" -> ., -jN dropped, output redirections dropped."""
    out = []
    words = shlex.split(cmd, comments=True)
    i = 0
    while i < len(words):
        w = words[i]
        i += 1
        if re.match(r"^(\d?>>?|&>|<)", w):
            if w in (">", ">>", "2>", "<", "&>"):
                i += 1  # the redirection's target is the next word
            continue
        if w.startswith("-j") or w == "--parallel":
            if w in ("-j", "--parallel") and i < len(words) and re.match(r"^\d+$|^\$", words[i]):
                i += 1
            continue
        w = re.sub(r"^\$\{?root\}?/", "", w)
        w = re.sub(r"^\$\{?root\}?$", ".", w)
        out.append(w)
    return out


def metrics_txt():
    """deploy/grafana/metrics.txt as {name: (type, set of labels)}."""
    out = {}
    for line in read(METRICS_TXT).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise AssertionError("metrics.txt: expected NAME TYPE LABELS, got %r" % line)
        name, typ, labels = parts
        out[name] = (typ, set() if labels == "-" else set(labels.split(",")))
    return out


PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "ceil", "floor", "round", "sort", "sort_desc", "time", "vector", "scalar", "label_replace",
    "label_join", "absent", "changes", "resets", "sum_over_time", "avg_over_time", "max_over_time",
    "min_over_time", "last_over_time", "predict_linear", "timestamp", "le", "inf", "nan",
}


def promql_metric_names(expr):
    """Metric names a PromQL expression selects (identifiers outside {...}, [...] and strings that are
    not PromQL keywords, functions or grouping labels)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)      # strings
    e = re.sub(r"\{[^}]*\}", "{}", e)                   # label matchers
    e = re.sub(r"\[[^\]]*\]", "[]", e)                  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1()", e)
    e = re.sub(r"\$\w+", "", e)                          # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        if word.lower() in PROMQL_WORDS:
            continue
        if e[m.end():m.end() + 1] == "(":  # a function call
            continue
        names.add(word)
    return names


def promql_grouping_labels(expr):
    labels = set()
    for m in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    return labels


def dashboard_queries(dash):
    """(where, expr) for every PromQL query in a dashboard: panel targets (rows included) and
    templating queries (label_values(expr, label) yields expr)."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append(("panel %r" % p.get("title"), t["expr"]))
            walk(p.get("panels", []))
    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", q or "")
        if m:
            out.append(("variable %r" % v.get("name"), m.group(1)))
        elif q and not re.match(r"^\s*label_values\(\s*\w+\s*\)\s*$", q):
            out.append(("variable %r" % v.get("name"), q))
    return out


# ---------------------------------------------------------------- systemd

class SystemdUnit(unittest.TestCase):
    def setUp(self):
        self.unit = parse_unit(UNIT)

    def _verify_copy(self, tmp):
        """The unit copied into tmp with evictd's path pointing at an existing binary.

        `systemd-analyze verify` fails a unit whose ExecStart= (or any Exec*=) binary does not exist,
        and /usr/local/bin/evictd exists only on an installed host. The copy points those commands at
        the repository's build (or /bin/true when there is none); every other line is unchanged, and
        the copy keeps the name evictd.service."""
        target = evictd_bin() or "/bin/true"
        text = read(UNIT)
        self.assertIn(INSTALLED_BIN, text)
        path = os.path.join(tmp, "evictd.service")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(INSTALLED_BIN, target))
        return path

    def test_systemd_analyze_verify(self):
        sa = shutil.which("systemd-analyze")
        if not sa:
            self.skipTest("systemd-analyze is not installed here (Debian package systemd): "
                          "`systemd-analyze verify deploy/systemd/evictd.service` NOT run")
        with tempfile.TemporaryDirectory(prefix="evictd-unit-") as tmp:
            path = self._verify_copy(tmp)
            p = subprocess.run([sa, "verify", "--man=no", path], capture_output=True, text=True, timeout=120)
            out = (p.stdout + p.stderr).strip()
            # verify exits 0 on unknown keys and bad values ("Unknown key ..., ignoring"), so any line it
            # prints about this unit fails the test; lines about other units on the host are not ours.
            ours = [ln for ln in out.splitlines() if "evictd.service" in ln or tmp in ln]
            self.assertEqual(p.returncode, 0, "systemd-analyze verify failed:\n%s" % out)
            self.assertEqual(ours, [], "systemd-analyze verify complained:\n%s" % "\n".join(ours))

    def test_security_exposure(self):
        sa = shutil.which("systemd-analyze")
        if not sa:
            self.skipTest("systemd-analyze is not installed here: offline security analysis NOT run")
        with tempfile.TemporaryDirectory(prefix="evictd-unit-") as tmp:
            path = self._verify_copy(tmp)
            p = subprocess.run([sa, "security", "--offline=true", "--no-pager", path],
                               capture_output=True, text=True, timeout=120)
            m = re.search(r"Overall exposure level for evictd\.service:\s*([\d.]+)", p.stdout + p.stderr)
            if p.returncode != 0 and not m:
                if "offline" in (p.stderr or "") and ("unrecognized" in p.stderr or "Unknown" in p.stderr):
                    self.skipTest("this systemd-analyze has no `security --offline` (systemd < 252)")
                self.fail("systemd-analyze security failed:\n%s%s" % (p.stdout, p.stderr))
            self.assertTrue(m, p.stdout + p.stderr)
            # 0 is a fully locked-down unit, 10 an unprotected one; 1.2 when written.
            self.assertLessEqual(float(m.group(1)), 2.0, p.stdout)

    def test_service_directives(self):
        u = self.unit
        svc = lambda k: unit_value(u, "Service", k)  # noqa: E731
        self.assertEqual(svc("Type"), "simple")
        self.assertEqual(svc("ExecStart"), "%s run --config %s" % (INSTALLED_BIN, CONFIG_PATH))
        reload_cmds = unit_values(u, "Service", "ExecReload")
        self.assertEqual(reload_cmds[-1], "/bin/kill -HUP $MAINPID")
        for cmd in reload_cmds[:-1]:  # anything before the SIGHUP only checks the new config
            self.assertEqual(cmd, "%s check --config %s" % (INSTALLED_BIN, CONFIG_PATH))
        self.assertEqual(svc("EnvironmentFile"), "-/etc/evictd/evictd.env")
        expected = {
            "DynamicUser": "yes", "StateDirectory": "evictd", "ProtectSystem": "strict", "ProtectHome": "yes",
            "PrivateTmp": "yes", "NoNewPrivileges": "yes", "Restart": "on-failure", "KillSignal": "SIGTERM",
            "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes", "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "CapabilityBoundingSet": "",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        }
        for k, v in expected.items():
            self.assertEqual(svc(k), v, "[Service] %s=" % k)
        self.assertIn("@system-service", unit_values(u, "Service", "SystemCallFilter"))
        self.assertTrue(svc("RestartSec"), "RestartSec= sets the restart delay")
        self.assertIn("2", unit_values(u, "Service", "RestartPreventExitStatus") or [""],
                      "exit status 2 (config error) should not restart")
        self.assertTrue(unit_value(u, "Unit", "StartLimitIntervalSec") and unit_value(u, "Unit", "StartLimitBurst"),
                        "[Unit] StartLimitIntervalSec=/StartLimitBurst= bound the restarts")
        shutdown_s = int(readme_setting_default("shutdown_timeout_ms")) / 1000.0
        self.assertGreater(seconds(svc("TimeoutStopSec")), shutdown_s,
                           "TimeoutStopSec must exceed the default shutdown_timeout_ms")

    def test_state_directory_holds_default_dead_letter_file(self):
        default = readme_setting_default("dead_letter.path")
        self.assertEqual(os.path.dirname(default), "/var/lib/" + unit_value(self.unit, "Service", "StateDirectory"))
        m = re.search(r'"dead_letter":\s*\{"path":\s*"\$\{EVICTD_DEAD_LETTER:-([^}]*)\}"', read(ROUTEX))
        self.assertTrue(m and m.group(1) == default, "config/routex.json's dead-letter default is %s" % default)

    def test_env_example_names_the_configs_secrets(self):
        env = {}
        for line in read(ENV_EXAMPLE).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                self.assertRegex(line, r"^[A-Z_][A-Z0-9_]*=", "EnvironmentFile lines are NAME=value")
                k, _, v = line.partition("=")
                env[k] = v
        required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", read(ROUTEX)))  # no default: must be set
        self.assertIn("DATABASE_URL", required)
        for name in required | {"REDIS_PASSWORD"}:
            self.assertIn(name, env, "%s is missing from %s" % (name, ENV_EXAMPLE))


# ---------------------------------------------------------------- Docker

class Dockerfile(unittest.TestCase):
    EXPECTED_RUNTIME = {"libuv1", "libpq5", "libhiredis0.14", "libjansson4", "ca-certificates"}

    def setUp(self):
        self.stages = parse_dockerfile(DOCKERFILE)
        self.build = self.stages[0]
        self.final = self.stages[-1]

    def runs(self, stage):
        return [a for i, a in stage["instrs"] if i == "RUN"]

    def test_stages_and_images(self):
        self.assertGreaterEqual(len(self.stages), 2, "multi-stage")
        self.assertEqual(self.build["base"], "debian:bookworm")
        self.assertEqual(self.build["name"], "build")
        chain = stage_chain(self.stages, self.final)
        self.assertEqual(chain[-1]["base"], "debian:bookworm-slim")
        self.assertNotIn("build", [s["name"] for s in chain], "the final image must not be the build stage")
        instrs = [x for s in reversed(chain) for x in s["instrs"]]
        users = [a for i, a in instrs if i == "USER"]
        self.assertTrue(users, "USER is set")
        self.assertNotIn(users[-1].split(":")[0], ("0", "root"), "non-root user")
        entry = [a for i, a in instrs if i == "ENTRYPOINT"][-1]
        cmd = [a for i, a in instrs if i == "CMD"][-1]
        self.assertEqual(os.path.basename(exec_form(entry)[0]), "evictd")
        self.assertEqual(exec_form(cmd), ["run", "--config", CONFIG_PATH])
        copies = [a for i, a in instrs if i == "COPY"]
        self.assertTrue(any(a.startswith("--from=build ") and a.endswith(INSTALLED_BIN) for a in copies), copies)
        for d in ("config/", "sql/"):
            self.assertTrue(any(a.split()[0] == d for a in copies), "the image carries %s" % d)

    def test_final_stage_installs_only_runtime_libraries(self):
        chain = stage_chain(self.stages, self.final)
        pkgs = set()
        for s in chain:
            for r in self.runs(s):
                pkgs |= set(apt_packages(r))
        self.assertEqual(pkgs, self.EXPECTED_RUNTIME)

    def test_build_stage_packages_match_install_deps(self):
        pkgs = set()
        for r in self.runs(self.build):
            pkgs |= set(apt_packages(r))
        self.assertTrue(pkgs)
        self.assertEqual(pkgs - install_deps_packages(), set(),
                         "build-stage packages missing from deploy/install-deps.sh")

    def test_build_commands_are_the_readmes(self):
        """Every cmake command of the build stage is one that README.md, deploy/demo.sh or tests/run
        runs (the README's documented build paths), up to the tree's path and -j."""
        known = set()
        for src in ("README.md", "deploy/demo.sh", "tests/run"):
            text = read(os.path.join(ROOT, src))
            for cmd in shell_commands(text):
                cmd = re.sub(r"^\$\s+", "", cmd)
                if cmd.startswith("cmake "):
                    known.add(tuple(normalize_cmake(cmd)))
        ours = [tuple(normalize_cmake(c)) for r in self.runs(self.build) for c in shell_commands(r)
                if c.startswith("cmake ")]
        self.assertTrue(any(c[:2] == ("cmake", "-S") for c in ours), "a configure step")
        self.assertTrue(any(c[:2] == ("cmake", "--build") for c in ours), "a build step")
        for c in ours:
            self.assertIn(c, known, "Dockerfile runs `%s`, which no README/demo/tests command does" % " ".join(c))
        for r in self.runs(self.build):
            for c in shell_commands(r):
                w = shlex.split(c)
                self.assertTrue(w[0] in ("cmake", "apt-get", "rm") or "apt-get" in w[:3],
                                "unexpected build-stage command %r: keep the build the README's" % c)


class DockerBuildOutsideDocker(unittest.TestCase):
    """Runs the Dockerfile's build stage here: its COPYs into a temp dir, its RUN commands (all but
    the apt-get package installs, which install-deps.sh covers) there, verbatim."""

    built = None
    error = None

    @classmethod
    def setUpClass(cls):
        if os.environ.get("EVD_DEPLOY_SKIP_BUILD") == "1":
            return
        stages = parse_dockerfile(DOCKERFILE)
        build = stages[0]
        cls.tmp = tempfile.mkdtemp(prefix="evictd-docker-build-")
        workdir = cls.tmp
        log = []
        for instr, args in build["instrs"]:
            if instr == "WORKDIR":
                workdir = os.path.join(cls.tmp, args.lstrip("/"))
                os.makedirs(workdir, exist_ok=True)
            elif instr == "COPY":
                words = shlex.split(args)
                assert not any(w.startswith("--") for w in words), "unexpected COPY flags in build stage"
                *srcs, dest = words
                for src in srcs:
                    s = os.path.join(ROOT, src)
                    d = os.path.join(workdir, dest)
                    if os.path.isdir(s):
                        shutil.copytree(s, d, dirs_exist_ok=True,
                                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                    else:
                        os.makedirs(d if dest.endswith("/") else os.path.dirname(d), exist_ok=True)
                        shutil.copy2(s, os.path.join(d, os.path.basename(src)) if dest.endswith("/") else d)
            elif instr == "RUN":
                if "apt-get" in args:
                    continue
                t0 = time.monotonic()
                p = subprocess.run(["/bin/sh", "-c", args], cwd=workdir, capture_output=True, text=True, timeout=1200)
                log.append("$ %s  (%.0fs, exit %d)" % (args, time.monotonic() - t0, p.returncode))
                if p.returncode != 0:
                    cls.error = "RUN %s failed (exit %d):\n%s\n%s" % (args, p.returncode, p.stdout[-4000:], p.stderr[-4000:])
                    return
        # The binary the final stage copies out of the build stage.
        final_copy = [a for s in stages[1:] for i, a in s["instrs"] if i == "COPY" and a.startswith("--from=build ")]
        src = shlex.split(final_copy[0])[1]
        cls.built = os.path.join(cls.tmp, src.lstrip("/"))
        cls.log = log

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "tmp", None):
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        if os.environ.get("EVD_DEPLOY_SKIP_BUILD") == "1":
            self.skipTest("EVD_DEPLOY_SKIP_BUILD=1: the Dockerfile's build commands were NOT run")
        if self.error:
            self.fail(self.error)

    def test_build_commands_produce_the_binary(self):
        self.assertTrue(os.path.isfile(self.built) and os.access(self.built, os.X_OK),
                        "no binary at %s after:\n%s" % (self.built, "\n".join(self.log)))
        p = subprocess.run([self.built, "--version"], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0)
        self.assertRegex(p.stdout, r"^evictd \d+\.\d+\.\d+")
        sys.stderr.write("\n  " + "\n  ".join(self.log) + "\n")

    def test_final_stage_libraries_are_the_binarys(self):
        """The Debian packages owning the binary's DT_NEEDED libraries are the final stage's
        (libc6 comes with the base image; ca-certificates is for libpq's TLS)."""
        if not shutil.which("readelf") or not shutil.which("dpkg"):
            self.skipTest("readelf or dpkg missing")
        p = subprocess.run(["readelf", "-d", self.built], capture_output=True, text=True, timeout=30, check=True)
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", p.stdout)
        ldd = subprocess.run(["ldd", self.built], capture_output=True, text=True, timeout=30).stdout
        where = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
        pkgs = {}
        for so in needed:
            path = where.get(so)
            self.assertTrue(path, "ldd does not resolve %s" % so)
            cands = [path, os.path.realpath(path)]
            cands += [c[4:] if c.startswith("/usr/") else "/usr" + c for c in list(cands)]
            owner = None
            for c in cands:
                q = subprocess.run(["dpkg", "-S", c], capture_output=True, text=True, timeout=30)
                if q.returncode == 0:
                    owner = q.stdout.split(":")[0].strip()
                    break
            self.assertTrue(owner, "no Debian package owns %s" % path)
            pkgs[so] = owner
        final = set()
        stages = parse_dockerfile(DOCKERFILE)
        for s in stage_chain(stages, stages[-1]):
            for i, a in s["instrs"]:
                if i == "RUN":
                    final |= set(apt_packages(a))
        libs = set(pkgs.values()) - {"libc6"}
        self.assertEqual(libs, final - {"ca-certificates"}, "NEEDED: %s" % pkgs)


# ---------------------------------------------------------------- Compose

class Compose(unittest.TestCase):
    def setUp(self):
        need_yaml(self)
        with open(COMPOSE, encoding="utf-8") as f:
            self.doc = yaml.safe_load(f)
        self.services = self.doc["services"]
        self.base = os.path.dirname(COMPOSE)

    def resolve(self, rel):
        return os.path.normpath(os.path.join(self.base, rel))

    def test_services(self):
        for name in ("postgres", "redis", "evictd"):
            self.assertIn(name, self.services)
            self.assertIn("healthcheck", self.services[name], "%s has a health check" % name)
            self.assertTrue(self.services[name]["healthcheck"].get("test"))
        self.assertEqual(self.services["postgres"]["image"], "postgres:15")
        self.assertEqual(self.services["redis"]["image"], "redis:7")

    def test_evictd_service(self):
        ev = self.services["evictd"]
        build = ev["build"]
        self.assertEqual(self.resolve(build["context"]), ROOT, "the build context is the repository root")
        self.assertEqual(os.path.join(ROOT, build["dockerfile"]), DOCKERFILE)
        env = ev["environment"]
        for k in ("DATABASE_URL", "REDIS_URL", "REDIS_PASSWORD"):
            self.assertIn(k, env)
            self.assertIn("${%s" % k, read(ROUTEX), "config/routex.json reads %s" % k)
        self.assertTrue(env["DATABASE_URL"].startswith("postgresql://evictd:"), "evictd logs in as sql/role.sql's role")
        mounts = {v.split(":")[1]: self.resolve(v.split(":")[0]) for v in ev["volumes"] if v.startswith(".")}
        self.assertEqual(mounts.get(CONFIG_PATH), ROUTEX, "config/routex.json is mounted at %s" % CONFIG_PATH)
        named = {v.split(":")[1]: v.split(":")[0] for v in ev["volumes"] if not v.startswith((".", "/"))}
        self.assertIn(os.path.dirname(readme_setting_default("dead_letter.path")), named, "dead letters on a volume")
        for dep, cond in (("postgres", "service_healthy"), ("redis", "service_healthy"),
                          ("evictd-init", "service_completed_successfully")):
            self.assertEqual(ev["depends_on"][dep]["condition"], cond)
        self.assertTrue(ev.get("read_only"))
        self.assertIn("ALL", ev.get("cap_drop", []))
        self.assertGreater(seconds(ev["stop_grace_period"]), int(readme_setting_default("shutdown_timeout_ms")) / 1000)

    def test_bind_mounts_and_targets_exist(self):
        stage_names = {s["name"] for s in parse_dockerfile(DOCKERFILE)}
        for name, svc in self.services.items():
            for v in svc.get("volumes", []):
                src = v.split(":")[0]
                if src.startswith("."):
                    self.assertTrue(os.path.exists(self.resolve(src)), "%s mounts missing %s" % (name, src))
            b = svc.get("build")
            if isinstance(b, dict) and b.get("target"):
                self.assertIn(b["target"], stage_names, "%s builds a stage the Dockerfile lacks" % name)

    def test_init_script_against_real_servers(self):
        """The evictd-init command, with its container paths mapped to the repository, run against a
        throwaway PostgreSQL and Redis; then evictd connects as the role it created, passes
        `check --connect` and deletes a key for a committed write."""
        sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
        os.environ.setdefault("EVICTD_HARNESS_REEXEC", "1")  # never re-exec this script from harness
        try:
            import harness
        except Exception as exc:  # noqa: BLE001
            self.skipTest("integration harness unavailable (%s): compose setup NOT run" % exc)
        binary = evictd_bin()
        if not binary:
            self.skipTest("no evictd binary (build it, or set EVICTD_BIN): compose setup NOT run")
        init = self.services["evictd-init"]
        self.assertEqual(init["entrypoint"], ["/bin/sh", "-ec"])
        script = init["command"][0] if isinstance(init["command"], list) else init["command"]
        mounts = {v.split(":")[1]: self.resolve(v.split(":")[0]) for v in init["volumes"]}
        script = script.replace("$$", "$")  # compose's escape for a literal $
        tmp = tempfile.mkdtemp(prefix="evictd-compose-init-")
        self.addCleanup(shutil.rmtree, tmp, True)
        for container_path, host_path in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            script = script.replace(container_path, host_path)
        script = script.replace("/usr/share/evictd/sql/", os.path.join(ROOT, "sql") + "/")
        script = script.replace("/tmp/watch.sql", os.path.join(tmp, "watch.sql"))
        script = re.sub(r"(?m)^(\s*)evictd ", lambda m: m.group(1) + shlex.quote(binary) + " ", script)
        self.assertNotRegex(script, r"/usr/share/|/docker-init/|/etc/evictd", "unmapped container path")
        psql_dir = harness._pg_bindir()
        redis_pw = "compose-redis-pw"
        with harness.Postgres() as pg, harness.Redis(extra_args=("--requirepass", redis_pw)) as rd:
            env = dict(os.environ, PATH=psql_dir + os.pathsep + os.environ.get("PATH", ""),
                       PGHOST="127.0.0.1", PGPORT=str(pg.port), PGUSER="postgres", PGDATABASE="postgres",
                       DATABASE_URL=pg.dsn(), EVICTD_DB_PASSWORD="compose-evictd-pw")
            env.pop("PGPASSWORD", None)
            for attempt in (1, 2):  # compose runs it on every `up`: it must be idempotent
                p = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=180)
                self.assertEqual(p.returncode, 0, "init run %d failed:\n%s\n%s" % (attempt, p.stdout, p.stderr))
            run_env = dict(os.environ, DATABASE_URL=pg.dsn(user="evictd"), REDIS_URL=rd.url(1),
                           REDIS_PASSWORD=redis_pw, EVICTD_DEAD_LETTER=os.path.join(tmp, "dead-letter.jsonl"))
            p = subprocess.run([binary, "check", "--connect", "--config", ROUTEX], env=run_env,
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, "check --connect as role evictd:\n%s\n%s" % (p.stdout, p.stderr))
            r = rd.client(db=1, password=redis_pw)
            logpath = os.path.join(tmp, "evictd.log")
            with open(logpath, "wb") as log:
                proc = subprocess.Popen([binary, "run", "--config", ROUTEX], env=run_env, stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT)
            try:
                harness.wait_until(lambda: "msg=connected" in read(logpath), timeout=15, what="evictd to connect")
                r.set("routex:1:products_list", "[...]")
                pg.psql("INSERT INTO products (name) VALUES ('crate')")
                harness.wait_until(lambda: not r.exists("routex:1:products_list"), timeout=15,
                                   what="evictd (as role evictd) to delete routex:1:products_list")
            finally:
                proc.terminate()
                rc = proc.wait(timeout=30)
            self.assertEqual(rc, 0, read(logpath))
            self.assertNotIn("compose-evictd-pw", read(logpath))
            self.assertNotIn(redis_pw, read(logpath))


# ---------------------------------------------------------------- Kubernetes

class Kubernetes(unittest.TestCase):
    def setUp(self):
        need_yaml(self)
        with open(K8S, encoding="utf-8") as f:
            self.docs = [d for d in yaml.safe_load_all(f) if d]
        self.kinds = {d["kind"]: d for d in self.docs}
        self.assertEqual(set(self.kinds), {"ConfigMap", "Secret", "Deployment"})
        spec = self.kinds["Deployment"]["spec"]["template"]["spec"]
        self.pod = spec
        self.containers = {c["name"]: c for c in spec["containers"]}
        self.evictd = self.containers["evictd"]
        self.config_text = self.kinds["ConfigMap"]["data"]["config.json"]
        self.config = json.loads(self.config_text)

    def port_number(self, port):
        if isinstance(port, int):
            return port
        return {p["name"]: p["containerPort"] for p in self.evictd["ports"]}[port]

    def test_sidecar_layout(self):
        self.assertGreaterEqual(len(self.containers), 2, "the app container and the evictd sidecar")
        self.assertEqual(self.kinds["Deployment"]["apiVersion"], "apps/v1")
        d = self.kinds["Deployment"]["spec"]
        self.assertEqual(d["selector"]["matchLabels"].items() - d["template"]["metadata"]["labels"].items(), set())
        self.assertEqual(self.evictd["args"][:3], ["run", "--config", CONFIG_PATH])

    def test_probes(self):
        live, ready = self.evictd["livenessProbe"]["httpGet"], self.evictd["readinessProbe"]["httpGet"]
        self.assertEqual(live["path"], "/healthz")
        self.assertEqual(ready["path"], "/readyz")
        self.assertEqual(self.port_number(live["port"]), HTTP_PORT)
        self.assertEqual(self.port_number(ready["port"]), HTTP_PORT)
        host, _, port = self.config["http"]["listen"].rpartition(":")
        self.assertEqual(int(port), HTTP_PORT)
        self.assertEqual(host, "0.0.0.0", "the kubelet probes the pod IP: listen on all addresses")

    def test_configmap_is_routex_plus_http(self):
        ref = json.loads(read(ROUTEX))
        self.assertEqual({k: v for k, v in self.config.items() if k != "http"}, ref,
                         "the ConfigMap's config drifted from config/routex.json")
        binary = evictd_bin()
        if binary:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "config.json")
                with open(path, "w") as f:
                    f.write(self.config_text)
                env = dict(os.environ, DATABASE_URL="postgresql://evictd@db.invalid/routex")
                p = subprocess.run([binary, "check", "--config", path], env=env, capture_output=True, text=True,
                                   timeout=30)
                self.assertEqual(p.returncode, 0, "evictd check rejects the ConfigMap's config:\n" + p.stderr)

    def test_secrets_config_and_state_wiring(self):
        secret_keys = set(self.kinds["Secret"].get("stringData", {})) | set(self.kinds["Secret"].get("data", {}))
        env = {e["name"]: e for e in self.evictd["env"]}
        for name in ("DATABASE_URL", "REDIS_PASSWORD"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            self.assertEqual(ref["name"], self.kinds["Secret"]["metadata"]["name"])
            self.assertIn(ref["key"], secret_keys)
        self.assertNotRegex(self.config_text, r"://[^/@\"]+:[^/@\"]+@", "no password in a URL in the ConfigMap")
        for m in re.finditer(r'"password"\s*:\s*"([^"]*)"', self.config_text):
            self.assertRegex(m.group(1), r"^\$\{[A-Z_]+(:-)?\}$", "passwords come from the environment")
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        mounts = {m["mountPath"]: m for m in self.evictd["volumeMounts"]}
        cfg_mount = mounts[os.path.dirname(CONFIG_PATH)]
        self.assertEqual(volumes[cfg_mount["name"]]["configMap"]["name"], self.kinds["ConfigMap"]["metadata"]["name"])
        dl_dir = os.path.dirname(readme_setting_default("dead_letter.path"))
        self.assertIn("emptyDir", volumes[mounts[dl_dir]["name"]], "dead letters on an emptyDir")

    def test_resources_and_security(self):
        res = self.evictd["resources"]
        for kind in ("requests", "limits"):
            self.assertIn("cpu", res[kind])
            self.assertIn("memory", res[kind])
        sc = self.evictd["securityContext"]
        self.assertTrue(sc["runAsNonRoot"] or self.pod.get("securityContext", {}).get("runAsNonRoot"))
        self.assertTrue(sc["readOnlyRootFilesystem"])
        self.assertFalse(sc["allowPrivilegeEscalation"])
        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
        stages = parse_dockerfile(DOCKERFILE)
        users = [a for s in reversed(stage_chain(stages, stages[-1])) for i, a in s["instrs"] if i == "USER"]
        self.assertEqual(str(sc["runAsUser"]), users[-1].split(":")[0], "runAsUser is the image's USER")


# ---------------------------------------------------------------- Grafana

class Grafana(unittest.TestCase):
    def setUp(self):
        with open(DASHBOARD, encoding="utf-8") as f:
            self.dash = json.load(f)
        self.metrics = metrics_txt()

    def all_panels(self):
        out = []

        def walk(ps):
            for p in ps:
                out.append(p)
                walk(p.get("panels", []))
        walk(self.dash["panels"])
        return out

    def test_dashboard_shape(self):
        self.assertGreaterEqual(self.dash["schemaVersion"], 36)
        self.assertTrue(self.dash.get("uid") and self.dash.get("title"))
        ds = [v for v in self.dash["templating"]["list"] if v["type"] == "datasource"]
        self.assertEqual(len(ds), 1)
        self.assertEqual(ds[0]["query"], "prometheus")
        ref = "${%s}" % ds[0]["name"]
        panels = self.all_panels()
        ids = [p["id"] for p in panels]
        self.assertEqual(len(ids), len(set(ids)), "panel ids are unique")
        cells = {}
        for p in panels:
            if p["type"] != "row":
                self.assertEqual(p["datasource"]["uid"], ref, p["title"])
                self.assertTrue(p["targets"], p["title"])
                for t in p["targets"]:
                    self.assertEqual(t["datasource"]["uid"], ref, p["title"])
            g = p["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    self.assertNotIn((x, y), cells, "%r overlaps %r" % (p["title"], cells.get((x, y))))
                    cells[(x, y)] = p["title"]
        titles = " ".join(p["title"].lower() for p in panels)
        for word in ("lag", "changes", "retries", "dead letters", "backlog", "reconnects", "deletions"):
            self.assertIn(word, titles)

    def test_metrics_txt_lists_the_issue_metrics(self):
        for name, labels in ISSUE_METRICS.items():
            self.assertIn(name, self.metrics)
            self.assertEqual(self.metrics[name][1], labels, name)
        for name, (typ, _) in self.metrics.items():
            self.assertRegex(name, r"^evictd_[a-z0-9_]+$")
            self.assertIn(typ, ("counter", "gauge", "histogram", "summary"))
            if typ == "counter":
                self.assertTrue(name.endswith("_total"), name)

    def test_dashboard_queries_only_listed_metrics(self):
        queries = dashboard_queries(self.dash)
        self.assertGreater(len(queries), 10)
        used = set()
        for where, expr in queries:
            names = promql_metric_names(expr)
            self.assertTrue(names, "%s: no metric in %r" % (where, expr))
            for n in names:
                self.assertIn(n, self.metrics, "%s queries %s, which metrics.txt does not list" % (where, n))
            used |= names
            available = set().union(*(self.metrics[n][1] for n in names)) | {"instance", "job"}
            for label in promql_grouping_labels(expr):
                self.assertIn(label, available, "%s groups by %r, which %s lack" % (where, label, sorted(names)))
        self.assertEqual(set(self.metrics) - used, set(), "metrics.txt entries no panel shows")

    def test_metric_extraction_self_check(self):
        e = ('histogram_quantile(0.99, sum by (le) (rate(evictd_lag_seconds_bucket{job=~"$job"}[$__rate_interval])))'
             ' / on (instance) sum(evictd_pending)')
        self.assertEqual(promql_metric_names(e), {"evictd_lag_seconds_bucket", "evictd_pending"})
        self.assertEqual(promql_grouping_labels(e), {"le"})


class InstallDeps(unittest.TestCase):
    def test_packages_for_these_tests(self):
        pkgs = install_deps_packages()
        self.assertIn("python3-yaml", pkgs)
        self.assertIn("systemd", pkgs, "systemd-analyze")


# ---------------------------------------------------------------- runner

def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    sys.stdout.flush()
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
