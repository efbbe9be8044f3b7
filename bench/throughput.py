#!/usr/bin/env python3
"""Throughput and latency of a hello and a Flask WSGI app under wrk (keep-alive, 50
connections, 2 threads), roost beside the peers installed here, in the same run, 2
worker processes each. During every load a canary opens a fresh connection every 100 ms
for one request: its latency shows whether newcomers are starved. Each server gets
--runs loads; the report has the median and every run (the spread).

Peers run when installed (bench/install_peers.sh installs them all): gunicorn and
granian (pip, in a virtualenv on Debian's python3), uWSGI behind its HTTP router, mod_wsgi in daemon mode under Apache, and
Passenger under Apache (Debian). Workers of roost, uWSGI, mod_wsgi and Passenger run as
nobody.

  cargo build --release && bench/install_peers.sh
  python3 bench/throughput.py [--apps hello,flask] [--runs 3] [--json] > tp.json   # root
  python3 bench/chart.py throughput tp.json throughput.png
"""
import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ROOST, ROOT, apache_conf, free_port, passenger_app, passenger_settings, peer_tool,
    wait_port, workspace)


def roost(work, port, app, threads):
    db = os.path.join(work, "roost-%s-%d.db" % (app, threads))
    for leftover in (db, db + "-wal", db + "-shm"):  # a fresh registry at every start
        if os.path.exists(leftover):
            os.remove(leftover)
    reg = "sqlite:" + db
    subprocess.run([ROOST, "--registry", reg, "site", "add", "hello", "--host", "hello.bench",
                    "--entry", os.path.join(work, app + ".py"), "--user", "nobody",
                    "--processes-max", "2", "--processes-min", "2", "--threads", str(threads)],
                   check=True, stdout=subprocess.DEVNULL)
    return ([ROOST, "--registry", reg, "serve", "--listen", "127.0.0.1:%d" % port,
             "--cgroup-name", "roost-bench-tp", "--log-dir", os.path.join(work, "logs"),
             "--run-dir", os.path.join(work, "run"), "--tmp-dir", os.path.join(work, "tmp")]
            + (["--preload", "flask"] if app == "flask_app" else []))


APACHE_WORKERS = """StartServers 2
ServerLimit 4
ThreadsPerChild 50
MaxRequestWorkers 200
"""
MOD_WSGI_CONF = APACHE_WORKERS + """WSGIDaemonProcess hello processes=2 threads=1 user=nobody group=nogroup
WSGIProcessGroup hello
WSGIApplicationGroup %{{GLOBAL}}
WSGIScriptAlias / {work}/{app}.py
<Directory {work}>
  Require all granted
</Directory>
"""

def apache(work, port, app):
    conf = os.path.join(work, "apache-%d.conf" % port)
    with open(conf, "w") as f:
        f.write(apache_conf(work, port, ["mpm_event", "authz_core", "wsgi"],
                            MOD_WSGI_CONF.format(work=work, app=app)))
    return ["/usr/sbin/apache2", "-f", conf, "-DFOREGROUND"]


def passenger(work, port, app):
    served = passenger_app(os.path.join(work, "passenger-" + app), work, app)
    conf = os.path.join(work, "passenger-%d.conf" % port)
    with open(conf, "w") as f:
        f.write(apache_conf(work, port, ["mpm_event", "authz_core", "passenger"],
                            APACHE_WORKERS + passenger_settings(2, 2) + served))
    return ["/usr/sbin/apache2", "-f", conf, "-DFOREGROUND"]


SERVERS = {
    "roost (2 workers x 1 thread)": lambda w, p, a: roost(w, p, a, 1),
    "roost (2 workers x 4 threads)": lambda w, p, a: roost(w, p, a, 4),
    "gunicorn (2 sync workers)": lambda w, p, a: [
        peer_tool("gunicorn"), "-w", "2", "-b", "127.0.0.1:%d" % p, "--chdir", w,
        "--error-logfile", "/dev/null", "%s:application" % a],
    "granian (2 workers)": lambda w, p, a: [
        peer_tool("granian"), "--interface", "wsgi", "--workers", "2", "--host",
        "127.0.0.1", "--port", str(p), "--working-dir", w, "--log-level", "error",
        "%s:application" % a],
    "uwsgi (HTTP router, 2 processes)": lambda w, p, a: [
        "uwsgi", "--plugins", "python3,http", "--http", "127.0.0.1:%d" % p, "--wsgi-file",
        os.path.join(w, a + ".py"), "--processes", "2", "--master", "--die-on-term",
        "--http-keepalive", "--disable-logging", "--uid", "nobody", "--gid", "nogroup"],
    "mod_wsgi (daemon mode, 2 processes)": apache,
    "passenger (Apache, 2 processes)": passenger,
}
PEER_BINARIES = {"gunicorn": peer_tool("gunicorn"), "granian": peer_tool("granian"),
                 "uwsgi": "uwsgi", "mod_wsgi": "/usr/sbin/apache2", "passenger": "/usr/sbin/apache2"}
PEER_FILES = {"mod_wsgi": "/usr/lib/apache2/modules/mod_wsgi.so",
              "passenger": "/usr/lib/apache2/modules/mod_passenger.so"}
APPS = {"hello": "hello", "flask": "flask_app"}


def installed(name):
    """Whether the server of this SERVERS entry is installed here."""
    peer = name.split()[0]
    binary = PEER_BINARIES.get(peer)
    if binary and not shutil.which(binary):
        return False
    return peer not in PEER_FILES or os.path.exists(PEER_FILES[peer])


@contextlib.contextmanager
def serving(command, work, app):
    """Runs one of SERVERS on `app` (a module in `work`) until the block ends; gives its
    port, once it answers and has had a second to settle."""
    port = free_port()
    server = subprocess.Popen(command(work, port, app), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=work)
    try:
        wait_port(port)
        time.sleep(1)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def canary(port, stop, out):
    while not stop.is_set():
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers={"Host": "hello.bench", "Connection": "close"})
            conn.getresponse().read()
            conn.close()
            out.append((time.perf_counter() - start) * 1000)
        except OSError:
            out.append(10000.0)
        time.sleep(0.1)


def wrk(port, seconds):
    text = subprocess.run(["wrk", "-t2", "-c50", "-d%ds" % seconds, "-H", "Host: hello.bench",
                           "http://127.0.0.1:%d/" % port], check=True, capture_output=True,
                          text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return rps, int(errors.group(1)) if errors else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--apps", default="hello,flask")
    parser.add_argument("--only", default="", help="servers whose name contains this text")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (roost's sites run as nobody)")
    work = workspace()
    for module in APPS.values():
        shutil.copy(os.path.join(ROOT, "bench", "apps", module + ".py"), work)
    report = {}
    try:
        for app in args.apps.split(","):
            report[app] = measure_app(APPS[app], args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))


def measure_app(app, args, work):
    """Every installed server on one app: {server: its figures}."""
    report = {}
    for name, command in SERVERS.items():
        if args.only not in name:
            continue
        if not installed(name):
            print("skipping %s: not installed" % name, file=sys.stderr)
            continue
        with serving(command, work, app) as port:
            wrk(port, 1)  # warm up
            rates, latencies, errors = [], [], 0
            for _ in range(args.runs):
                stop, out = threading.Event(), []
                t = threading.Thread(target=canary, args=(port, stop, out))
                t.start()
                rps, errs = wrk(port, args.seconds)
                stop.set()
                t.join()
                rates.append(rps)
                latencies.extend(out)
                errors += errs
            latencies.sort()
            report[name] = {
                "req_per_s_median": statistics.median(rates),
                "req_per_s_runs": rates,
                "canary_p50_ms": statistics.median(latencies),
                "canary_p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)],
                "errors": errors,
            }
            print("%-6s %-36s %8.0f req/s (%.0f-%.0f)  canary p50 %6.2f ms  p99 %7.2f ms"
                  % (app, name, report[name]["req_per_s_median"], min(rates), max(rates),
                     report[name]["canary_p50_ms"], report[name]["canary_p99_ms"]),
                  file=sys.stderr, flush=True)
    return report


if __name__ == "__main__":
    main()
