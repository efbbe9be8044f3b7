"""Helpers the benchmark scripts share: ports, waiting, and reading /proc."""
import http.client
import os
import shutil
import statistics
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The roost binary the scripts run: the release build, or $ROOST_BIN (to compare two).
ROOST = os.environ.get("ROOST_BIN") or os.path.join(ROOT, "target", "release", "roost")
# gunicorn and Granian live in a virtualenv on Debian's python3 and its Flask
# (install_peers.sh), the interpreter roost's, uWSGI's, mod_wsgi's and Passenger's
# workers run: a peer on another Python or Flask would measure that instead.
PEERS_VENV = os.environ.get("ROOST_BENCH_PEERS", "/opt/roost-bench/peers")


def peer_tool(name):
    """The path of a pip-installed peer's command (gunicorn, granian)."""
    return os.path.join(PEERS_VENV, "bin", name)


def require_root():
    if os.geteuid() != 0:
        sys.exit("run as root: the sites run as nobody")


def require_build():
    if not os.path.exists(ROOST):
        sys.exit("build first: cargo build --release (or point ROOST_BIN at a roost binary)")


# As root, a node's workers see their own TMPDIR as /tmp and /var/tmp, and refuse a
# site whose code lies below them: benchmarks keep their sites elsewhere.
ROOT_WORKSPACES = "/var/lib/roost-bench"


def workspace():
    """A temporary folder every site user can traverse (not below /tmp as root)."""
    base = None
    if os.geteuid() == 0:
        os.makedirs(ROOT_WORKSPACES, mode=0o755, exist_ok=True)
        base = ROOT_WORKSPACES
    work = tempfile.mkdtemp(dir=base)
    os.chmod(work, 0o755)
    return work


def install_app(work, app, folder="apps"):
    """Copies bench/apps/<app> into <work>/<folder>/ (traversable); returns its path."""
    apps = os.path.join(work, folder)
    os.makedirs(apps, exist_ok=True)
    os.chmod(apps, 0o755)
    return shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps", app), apps)


APACHE_HEAD = """ServerName localhost
ServerRoot {work}
Listen 127.0.0.1:{port}
PidFile {work}/apache.pid
ErrorLog {work}/apache-error.log
User nobody
Group nogroup
"""


# Debian's stock Apache loads mod_reqtimeout with these limits (reqtimeout.conf): a
# client gets 20 s for its headers, 40 s if it keeps sending 500 bytes a second.
APACHE_REQTIMEOUT = """RequestReadTimeout header=20-40,minrate=500
RequestReadTimeout body=10,minrate=500
"""


def apache_conf(work, port, modules, body):
    """A configuration of Apache's own for one benchmark (its files in `work`, listening
    on 127.0.0.1:port, children as nobody), loading mod_<name>.so for each of
    `modules` and mod_reqtimeout with Debian's limits, then `body`."""
    loads = "".join("LoadModule %s_module /usr/lib/apache2/modules/mod_%s.so\n" % (m, m)
                    for m in list(modules) + ["reqtimeout"])
    return APACHE_HEAD.format(work=work, port=port) + loads + APACHE_REQTIMEOUT + body


PASSENGER_SETTINGS = """PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini
PassengerDefaultRuby /usr/bin/ruby
PassengerPython /usr/bin/python3
PassengerMinInstances {min_instances}
PassengerMaxPoolSize {max_pool}
PassengerDefaultUser nobody
PassengerDefaultGroup nogroup
# This machine reaches no network: no phoning home.
PassengerDisableSecurityUpdateCheck on
PassengerDisableAnonymousTelemetry on
"""
PASSENGER_APP = """PassengerAppRoot {root}
PassengerAppType wsgi
PassengerStartupFile passenger_wsgi.py
<Directory {root}/public>
  Require all granted
</Directory>
"""


def passenger_settings(min_instances, max_pool):
    """Passenger's server-wide directives (Debian's package), apps as nobody."""
    return PASSENGER_SETTINGS.format(min_instances=min_instances, max_pool=max_pool)


def passenger_app(root, module_dir, module):
    """An app root for Passenger at `root` whose startup file imports `application`
    from `module` in `module_dir`; returns the directives that serve it."""
    os.makedirs(os.path.join(root, "public"), exist_ok=True)
    for d in (root, os.path.join(root, "public")):
        os.chmod(d, 0o755)
    with open(os.path.join(root, "passenger_wsgi.py"), "w") as f:
        f.write("import sys\nsys.path.insert(0, %r)\nfrom %s import application\n"
                % (module_dir, module))
    return "DocumentRoot %s/public\n" % root + PASSENGER_APP.format(root=root)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, limit=20.0):
    """Waits until something accepts connections on 127.0.0.1:port."""
    deadline = time.time() + limit
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def register(registry, app, sites, idle_timeout="5s"):
    """Adds the sites through the CLI once, then copies that row for the rest (the CLI
    validates each write; 1,000 runs of it would only measure process start-up)."""
    subprocess.run([ROOST, "--registry", "sqlite:" + registry, "site", "add", "s0", "--host",
                    "s0.bench", "--entry", app, "--user", "nobody", "--idle-timeout",
                    idle_timeout],
                   check=True, stdout=subprocess.DEVNULL)
    db = sqlite3.connect(registry)
    cols = [r[1] for r in db.execute("PRAGMA table_info(sites)") if r[1] not in ("name", "updated_at")]
    for i in range(1, sites):
        db.execute("INSERT INTO sites (name, %s) SELECT ?, %s FROM sites WHERE name = 's0'"
                   % (", ".join(cols), ", ".join(cols)), ("s%d" % i,))
        db.execute("INSERT INTO hosts (host, site, position) VALUES (?, ?, 0)",
                   ("s%d.bench" % i, "s%d" % i))
    db.commit()
    db.close()


def many_sites(sites, name, max_workers):
    """A workspace with `sites` sites of bench/apps/pid.py (s<N>.bench, as nobody) and a
    node serving them with at most `max_workers` workers: (workspace, port, node)."""
    work = workspace()
    app = install_app(work, "pid.py")
    registry = os.path.join(work, "registry.db")
    register(registry, app, sites)
    port = free_port()
    return work, port, serve(registry, port, work, name, "--max-workers", str(max_workers))


def serve(registry, port, work, name, *options):
    """Starts `roost serve` on 127.0.0.1:port, with its logs and run folder in `work`
    and a cgroup folder of its own (roost-bench-<name>)."""
    if ":" not in registry:
        registry = "sqlite:" + registry
    return subprocess.Popen([ROOST, "--registry", registry, "serve", "--listen",
                             "127.0.0.1:%d" % port, "--cgroup-name", "roost-bench-" + name,
                             "--log-dir", os.path.join(work, "logs"),
                             "--run-dir", os.path.join(work, "run"),
                             "--tmp-dir", os.path.join(work, "tmp")] + list(options),
                            stderr=subprocess.DEVNULL)


def pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def site_cgroups_anon_kib(node_pid, name):
    """What `--max-worker-memory` counts: the anonymous memory of every site cgroup of
    the node started by serve(..., name) (`anon` of v2's memory.stat, `rss` of v1's),
    in KiB; 0 without a memory cgroup."""
    try:
        with open("/proc/%d/cgroup" % node_pid) as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    total = 0
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount, key = "/sys/fs/cgroup", "anon"
        elif "memory" in controllers.split(","):
            mount, key = "/sys/fs/cgroup/memory", "rss"
        else:
            continue
        # The node sits in <its cgroup>/roost-bench-<name>/node on v2, in its own
        # cgroup on v1; its sites' cgroups are <its cgroup>/roost-bench-<name>/<site>.
        own = path.rsplit("/roost-bench-%s/" % name, 1)[0].rstrip("/")
        base = os.path.join(mount + own, "roost-bench-" + name)
        for site in (os.listdir(base) if os.path.isdir(base) else []):
            try:
                with open(os.path.join(base, site, "memory.stat")) as f:
                    for stat in f:
                        k, _, v = stat.partition(" ")
                        if k == key:
                            total += int(v) // 1024
            except OSError:
                pass
    return total


def status_field(pid, field):
    """A number of /proc/PID/status (VmRSS in KiB, Threads); 0 once the process is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid):
    """How many descriptors a process holds; 0 once it is gone."""
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return 0


def processes(loader):
    """(workers, zygotes) running a node's loader."""
    workers, zygotes = [], []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                args = f.read().split(b"\0")
            with open("/proc/%s/comm" % name) as f:
                comm = f.read().strip()
        except OSError:
            continue
        if loader.encode() not in args:
            continue
        if b"zygote" in args and comm != "roost-worker":
            zygotes.append(int(name))
        else:
            workers.append(int(name))
    return workers, zygotes


def get_once(port, host=None, timeout=60):
    """One GET / on a fresh connection: (status, body). OSError when it fails."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def timed_get(port, host=None, timeout=60):
    """Seconds for one GET / on a fresh connection, body included; it must be a 200."""
    start = time.perf_counter()
    status, body = get_once(port, host, timeout)
    elapsed = time.perf_counter() - start
    if status != 200:
        raise RuntimeError("%s answered %d: %r" % (host or port, status, body[:200]))
    return elapsed


def pids_with_cwd(directory):
    """Processes whose working directory is `directory` (a site's or an app's folder)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink("/proc/%s/cwd" % name) == directory:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def cold_starts(runs, running, request, settle=0.0, limit=60.0):
    """`runs` cold starts in ms: each waits until `running()` is false (the app's last
    process exited), then `settle` seconds, then times `request()` (seconds)."""
    times = []
    for _ in range(runs):
        deadline = time.time() + limit
        while running():
            if time.time() > deadline:
                raise RuntimeError("the app never went idle")
            time.sleep(0.01)
        time.sleep(settle)
        times.append(request() * 1000)
    return times


def print_cold_start_header():
    print("%-8s %8s %8s %8s %8s" % ("app", "p50 ms", "p10", "p90", "max"))


def print_cold_starts(name, milliseconds):
    """One row: p50, p10, p90 and max of a list of cold starts in ms."""
    ms = sorted(milliseconds)
    q = statistics.quantiles(ms, n=10)
    print("%-8s %8.2f %8.2f %8.2f %8.2f" % (name, statistics.median(ms), q[0], q[-1], ms[-1]))


class Ksmd:
    """The kernel's same-page merging daemon, running at `pages_to_scan` pages per
    20 ms wake-up while in the `with` block; its settings are put back after."""
    DIR = "/sys/kernel/mm/ksm"

    def __init__(self, pages_to_scan):
        self.settings = [("pages_to_scan", str(pages_to_scan)), ("sleep_millisecs", "20"),
                         ("run", "1")]
        self.saved = []

    def __enter__(self):
        for name, value in self.settings:
            path = os.path.join(self.DIR, name)
            with open(path) as f:
                self.saved.append((path, f.read().strip()))
            with open(path, "w") as f:
                f.write(value)
        return self

    def __exit__(self, *_):
        for path, value in reversed(self.saved):
            with open(path, "w") as f:
                f.write(value)

    @staticmethod
    def cpu_seconds():
        """CPU time ksmd (a kernel thread) has used so far."""
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open("/proc/%s/comm" % name) as f:
                    if f.read().strip() != "ksmd":
                        continue
                with open("/proc/%s/stat" % name) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        sys.exit("no ksmd thread: this kernel has no KSM")

    def full_scans(self):
        with open(os.path.join(self.DIR, "full_scans")) as f:
            return int(f.read())

    def settle(self, passes=3, limit=1800.0):
        """Waits until ksmd has scanned everything marked `passes` more times (a page
        is merged once two passes found it unchanged); returns the seconds it took."""
        start, target = time.time(), self.full_scans() + passes
        while self.full_scans() < target:
            if time.time() - start > limit:
                sys.exit("ksmd did not finish %d passes in %.0f s" % (passes, limit))
            time.sleep(0.5)
        return time.time() - start
