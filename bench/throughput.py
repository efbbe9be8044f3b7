#!/usr/bin/env python3
"""Throughput and latency of a hello WSGI app under wrk (keep-alive, 50 connections,
2 threads), roost beside the peers installed here, in the same run, 2 worker processes
each. During every load a canary opens a fresh connection every 100 ms for one request:
its latency shows whether newcomers are starved.

Peers run when installed: gunicorn and granian (pip install gunicorn granian), uWSGI
behind its HTTP router (apt-get install uwsgi uwsgi-plugin-python3), and mod_wsgi in
daemon mode under Apache (apt-get install apache2 libapache2-mod-wsgi-py3). Passenger is
not scripted yet. Workers of roost, uWSGI and mod_wsgi run as nobody.

  cargo build --release && apt-get install -y wrk && python3 bench/throughput.py   # root
"""
import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOST = os.path.join(ROOT, "target", "release", "roost")


def roost(work, port, threads):
    reg = "sqlite:" + os.path.join(work, "roost-%d.db" % threads)
    subprocess.run([ROOST, "--registry", reg, "site", "add", "hello", "--host", "hello.bench",
                    "--entry", os.path.join(work, "hello.py"), "--user", "nobody",
                    "--processes-max", "2", "--processes-min", "2", "--threads", str(threads)],
                   check=True, stdout=subprocess.DEVNULL)
    return [ROOST, "--registry", reg, "serve", "--listen", "127.0.0.1:%d" % port,
            "--cgroup-name", "roost-bench-tp", "--log-dir", os.path.join(work, "logs"),
            "--run-dir", os.path.join(work, "run")]


APACHE_CONF = """
ServerName localhost
ServerRoot {work}
Listen 127.0.0.1:{port}
PidFile {work}/apache.pid
ErrorLog {work}/apache-error.log
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule wsgi_module /usr/lib/apache2/modules/mod_wsgi.so
User nobody
Group nogroup
StartServers 2
ServerLimit 4
ThreadsPerChild 50
MaxRequestWorkers 200
WSGIDaemonProcess hello processes=2 threads=1 user=nobody group=nogroup
WSGIProcessGroup hello
WSGIApplicationGroup %{{GLOBAL}}
WSGIScriptAlias / {work}/hello.py
<Directory {work}>
  Require all granted
</Directory>
"""


def apache(work, port):
    conf = os.path.join(work, "apache-%d.conf" % port)
    with open(conf, "w") as f:
        f.write(APACHE_CONF.format(work=work, port=port))
    return ["/usr/sbin/apache2", "-f", conf, "-DFOREGROUND"]


SERVERS = {
    "roost (2 workers x 1 thread)": lambda w, p: roost(w, p, 1),
    "roost (2 workers x 4 threads)": lambda w, p: roost(w, p, 4),
    "gunicorn (2 sync workers)": lambda w, p: [shutil.which("gunicorn") or "gunicorn", "-w", "2",
                                               "-b", "127.0.0.1:%d" % p, "--chdir", w,
                                               "--error-logfile", "/dev/null", "hello:application"],
    "granian (2 workers)": lambda w, p: [shutil.which("granian") or "granian", "--interface", "wsgi",
                                         "--workers", "2", "--host", "127.0.0.1", "--port", str(p),
                                         "--working-dir", w, "--log-level", "error", "hello:application"],
    "uwsgi (HTTP router, 2 processes)": lambda w, p: ["uwsgi", "--plugins", "python3,http", "--http",
                                                      "127.0.0.1:%d" % p, "--wsgi-file",
                                                      os.path.join(w, "hello.py"), "--processes", "2",
                                                      "--master", "--die-on-term", "--disable-logging", "--uid",
                                                      "nobody", "--gid", "nogroup"],
    "mod_wsgi (daemon mode, 2 processes)": apache,
}
PEER_BINARIES = {"gunicorn": "gunicorn", "granian": "granian", "uwsgi": "uwsgi",
                 "mod_wsgi": "/usr/sbin/apache2"}


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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (roost's sites run as nobody)")
    work = tempfile.mkdtemp()
    os.chmod(work, 0o755)
    shutil.copy(os.path.join(ROOT, "bench", "apps", "hello.py"), work)
    report = {}
    try:
        for name, command in SERVERS.items():
            peer = name.split()[0]
            binary = PEER_BINARIES.get(peer)
            if binary and not shutil.which(binary):
                print("skipping %s: not installed" % name, file=sys.stderr)
                continue
            port = free_port()
            server = subprocess.Popen(command(work, port), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, cwd=work)
            try:
                wait_port(port)
                time.sleep(1)
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
                print("%-32s %8.0f req/s  canary p50 %6.2f ms  p99 %7.2f ms"
                      % (name, report[name]["req_per_s_median"], report[name]["canary_p50_ms"],
                         report[name]["canary_p99_ms"]), file=sys.stderr, flush=True)
            finally:
                server.terminate()
                server.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
