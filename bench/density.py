#!/usr/bin/env python3
"""Density: memory of 50 sites, each visited once, while their workers live and after
they went idle. Reports the proportional set size (PSS, from /proc/<pid>/smaps_rollup)
of the workers, of the zygotes that forked them, and of the node.

Run as root with a release build (and python3-flask for the Flask rows):

  cargo build --release && python3 bench/density.py [--sites 50] [--json]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import http.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ROOST, ROOT, free_port, processes, pss_kib, require_root, workspace)


def memory(loader, node_pid):
    """PSS of a node's workers, its zygotes (with their spares) and the node itself."""
    workers, zygotes = processes(loader)
    return {
        "workers": len(workers),
        "workers_pss_kib": sum(pss_kib(p) for p in workers),
        "zygotes_pss_kib": sum(pss_kib(p) for p in zygotes),
        "node_pss_kib": pss_kib(node_pid),
    }


def get(port, host):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/", headers={"Host": host})
    r = conn.getresponse()
    r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError("%s: %d" % (host, r.status))


def measure(app, sites, preload, work):
    reg = "sqlite:" + os.path.join(work, app + ".db")
    apps = os.path.join(work, "apps-" + app)
    os.makedirs(apps)
    os.chmod(apps, 0o755)
    src = os.path.join(ROOT, "bench", "apps", {"hello": "hello.py", "flask": "flask_app.py"}[app])
    for i in range(sites):
        d = os.path.join(apps, "s%d" % i)
        os.makedirs(d)
        os.chmod(d, 0o755)
        shutil.copy(src, d)
        subprocess.run([ROOST, "--registry", reg, "site", "add", "s%d" % i, "--host",
                        "s%d.bench" % i, "--entry", os.path.join(d, os.path.basename(src)),
                        "--user", "nobody", "--idle-timeout", "3s"], check=True,
                       stdout=subprocess.DEVNULL)
    port = free_port()
    run = os.path.join(work, "run-" + app)
    node = subprocess.Popen([ROOST, "--registry", reg, "serve", "--listen", "127.0.0.1:%d" % port,
                             "--cgroup-name", "roost-bench-density", "--log-dir",
                             os.path.join(work, "logs-" + app), "--run-dir", run] + preload,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            try:
                get(port, "s0.bench")
                break
            except (OSError, RuntimeError):
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        for i in range(sites):
            get(port, "s%d.bench" % i)
        loader = os.path.join(run, "loader.py")
        live = memory(loader, node.pid)
        deadline = time.time() + 30
        while processes(loader)[0] and time.time() < deadline:
            time.sleep(0.2)
        return {"live": live, "idle": memory(loader, node.pid)}
    finally:
        node.terminate()
        node.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    work = workspace()
    report = {}
    try:
        for app, preload in (("hello", []), ("flask", ["--preload", "flask"])):
            print("measuring %s ..." % app, file=sys.stderr, flush=True)
            report[app] = measure(app, args.sites, preload, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    n = args.sites
    for app, r in report.items():
        for phase in ("live", "idle"):
            m = r[phase]
            print("%-6s %-5s workers %3d  workers PSS %8.1f MiB (%.2f MiB/site)  zygote %6.1f MiB  node %6.1f MiB"
                  % (app, phase, m["workers"], m["workers_pss_kib"] / 1024,
                     m["workers_pss_kib"] / 1024 / n, m["zygotes_pss_kib"] / 1024,
                     m["node_pss_kib"] / 1024))


if __name__ == "__main__":
    main()
