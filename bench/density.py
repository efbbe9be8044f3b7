#!/usr/bin/env python3
"""Density: memory of 50 sites, each visited once, while their workers live and after
they went idle. Reports the proportional set size (PSS, from /proc/<pid>/smaps_rollup)
of the workers, of the zygotes that forked them, and of the node.

With `--ksm PAGES`, each app is measured a second time on a node started with `--ksm`
while the kernel's ksmd scans PAGES pages per 20 ms: the live figure is then taken
after ksmd's third full pass over the marked memory (a page merges once two passes
found it unchanged), and the report adds how long that took and the CPU time ksmd
used, while settling and afterwards (the steady cost of keeping the sites merged).

Run as root with a release build (and python3-flask for the Flask rows):

  cargo build --release && python3 bench/density.py [--sites 50] [--ksm 1000] [--json]
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
    ROOST, ROOT, Ksmd, free_port, processes, pss_kib, require_root, workspace)


def memory(loader, node_pid):
    """PSS of a node's workers, its zygotes (with their spares) and the node itself."""
    workers, zygotes = processes(loader)
    return {
        "workers": len(workers),
        "workers_pss_kib": sum(pss_kib(p) for p in workers),
        "zygotes_pss_kib": sum(pss_kib(p) for p in zygotes),
        "node_pss_kib": pss_kib(node_pid),
    }


def merged_memory(loader, node_pid, ksm):
    """memory() once ksmd has merged what it will, with how long that took and what
    ksmd cost: while settling, then over the next 20 s (its steady rescanning)."""
    cpu = ksm.cpu_seconds()
    took = ksm.settle()
    settling_cpu = ksm.cpu_seconds() - cpu
    cpu, start = ksm.cpu_seconds(), time.time()
    time.sleep(20)
    steady = (ksm.cpu_seconds() - cpu) / (time.time() - start)
    m = memory(loader, node_pid)
    m.update({"ksm_settings": dict(ksm.settings), "settle_s": round(took, 1),
              "ksmd_cpu_settling_s": round(settling_cpu, 2),
              "ksmd_cpu_steady_share": round(steady, 4)})
    return m


def get(port, host):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/", headers={"Host": host})
    r = conn.getresponse()
    r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError("%s: %d" % (host, r.status))


def measure(app, sites, preload, work, ksm=None):
    """Memory of `sites` sites of `app`, live then idle; with `ksm` (a Ksmd), of a node
    started with --ksm once merging has settled (the workers then stay live)."""
    name = app + ("-ksm" if ksm else "")
    reg = "sqlite:" + os.path.join(work, name + ".db")
    apps = os.path.join(work, "apps-" + name)
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
                        "--user", "nobody", "--idle-timeout", "60m" if ksm else "3s"], check=True,
                       stdout=subprocess.DEVNULL)
    port = free_port()
    run = os.path.join(work, "run-" + name)
    node = subprocess.Popen([ROOST, "--registry", reg, "serve", "--listen", "127.0.0.1:%d" % port,
                             "--cgroup-name", "roost-bench-density", "--log-dir",
                             os.path.join(work, "logs-" + name), "--run-dir", run,
                             "--tmp-dir", os.path.join(work, "tmp-" + name)] + preload
                            + (["--ksm"] if ksm else []),
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
        if ksm:
            return {"live": merged_memory(loader, node.pid, ksm), "idle": None}
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
    parser.add_argument("--ksm", type=int, metavar="PAGES",
                        help="measure again with --ksm, ksmd scanning PAGES pages per 20 ms")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    work = workspace()
    report = {}
    try:
        for app, preload in (("hello", []), ("flask", ["--preload", "flask"])):
            print("measuring %s ..." % app, file=sys.stderr, flush=True)
            report[app] = measure(app, args.sites, preload, work)
            if args.ksm:
                print("measuring %s with --ksm (waiting for ksmd) ..." % app,
                      file=sys.stderr, flush=True)
                with Ksmd(args.ksm) as ksm:
                    report[app + "-ksm"] = measure(app, args.sites, preload, work, ksm)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    n = args.sites
    for app, r in report.items():
        for phase in ("live", "idle"):
            m = r[phase]
            if m is None:
                continue
            if "settle_s" in m:
                print("%-9s ksmd settled in %.0f s using %.1f s of CPU, then %.1f %% of a core"
                      % (app, m["settle_s"], m["ksmd_cpu_settling_s"],
                         100 * m["ksmd_cpu_steady_share"]))
            print("%-9s %-5s workers %3d  workers PSS %8.1f MiB (%.2f MiB/site)  zygote %6.1f MiB  node %6.1f MiB"
                  % (app, phase, m["workers"], m["workers_pss_kib"] / 1024,
                     m["workers_pss_kib"] / 1024 / n, m["zygotes_pss_kib"] / 1024,
                     m["node_pss_kib"] / 1024))


if __name__ == "__main__":
    main()
