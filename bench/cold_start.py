#!/usr/bin/env python3
"""Cold start: time from a request to its complete response for a site with no live
worker, for a hello app and a Flask app, under each way roost starts workers:

  plain    a fresh interpreter per worker (--spawn plain)
  zygote   forked from the stdlib-preloaded zygote (the default)
  preload  forked from a zygote that preloaded flask (--preload flask)
  *-nocg   the same with --no-cgroups, to show what joining the cgroups costs
  *-ksm    the same with --ksm (same-page merging; start ksmd to see its effect)
  *shared-tmp  the same with --shared-tmp (no mount and IPC namespaces per worker)

Each cold start waits until the site's previous worker has exited (idle_timeout
100ms), then times one request over a fresh connection. Run as root (sites run as
`nobody`), with a release build and python3-flask installed:

  cargo build --release && apt-get install -y python3-flask
  python3 bench/cold_start.py [--runs 30] [--json]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ROOST, ROOT, cold_starts, free_port, pids_with_cwd, require_build, require_root, timed_get,
    wait_port, workspace)

APPS = {"hello": "hello.py", "flask": "flask_app.py"}
MODES = {
    "plain": ["--spawn", "plain"],
    "zygote": ["--spawn", "zygote"],
    "preload": ["--spawn", "zygote", "--preload", "flask"],
    # The same without cgroups: on a cgroup v1 host, moving a new process into its
    # site's cgroups costs the kernel an RCU grace period (several ms) per cold start.
    "zygote-nocg": ["--spawn", "zygote", "--no-cgroups"],
    "preload-nocg": ["--spawn", "zygote", "--preload", "flask", "--no-cgroups"],
    # Without spare forks: the zygote forks only when asked (spares are on by default).
    "nospare-nocg": ["--spawn", "zygote", "--zygote-spares", "0", "--no-cgroups"],
    "nospare": ["--spawn", "zygote", "--zygote-spares", "0"],
    # Workers under the normal scheduling policy instead of SCHED_BATCH.
    "nobatch": ["--spawn", "zygote", "--no-batch-workers"],
    # Zygotes and workers marked for same-page merging (start ksmd first to see its
    # effect: echo 1 > /sys/kernel/mm/ksm/run).
    "ksm": ["--spawn", "zygote", "--ksm"],
    "preload-ksm": ["--spawn", "zygote", "--preload", "flask", "--ksm"],
    # Workers that see the host's /tmp, /var/tmp and /dev/shm: what a worker's own
    # mount and IPC namespaces cost its start (they are on by default as root).
    "shared-tmp": ["--spawn", "zygote", "--shared-tmp"],
    "preload-shared-tmp": ["--spawn", "zygote", "--preload", "flask", "--shared-tmp"],
}


def run_mode(mode, runs, work):
    registry = "sqlite:" + os.path.join(work, mode + ".db")
    dirs = {}
    for site, app in APPS.items():
        d = os.path.join(work, "apps", site)
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        shutil.copy(os.path.join(ROOT, "bench", "apps", app), d)
        dirs[site] = d
        subprocess.run([ROOST, "--registry", registry, "site", "add", site,
                        "--host", site + ".bench", "--entry", os.path.join(d, app),
                        "--user", "nobody", "--idle-timeout", "100ms"],
                       check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    node = subprocess.Popen(
        [ROOST, "--registry", registry, "serve", "--listen", "127.0.0.1:%d" % port,
         "--cgroup-name", "roost-bench-cold", "--log-dir", os.path.join(work, "logs-" + mode),
         "--run-dir", os.path.join(work, "run-" + mode),
         "--tmp-dir", os.path.join(work, "tmp-" + mode)] + MODES[mode],
        stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        results = {}
        for site, d in dirs.items():
            host = site + ".bench"
            timed_get(port, host)  # the zygote's own start is not a site's cold start
            times = [t / 1000 for t in cold_starts(runs, lambda: pids_with_cwd(d),
                                                    lambda: timed_get(port, host))]
            warm = [timed_get(port, host) for _ in range(runs)]
            results[site] = {"cold": times, "warm": warm}
        return results
    finally:
        node.terminate()
        node.wait(timeout=30)


def summary(samples):
    ms = sorted(t * 1000 for t in samples)
    q = statistics.quantiles(ms, n=10)
    return {"p50": statistics.median(ms), "p10": q[0], "p90": q[-1], "min": ms[0], "max": ms[-1],
            "n": len(ms)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    require_build()
    work = workspace()
    report = {}
    try:
        for mode in args.modes.split(","):
            print("measuring %s ..." % mode, file=sys.stderr, flush=True)
            raw = run_mode(mode, args.runs, work)
            report[mode] = {site: {k: summary(v) for k, v in r.items()} for site, r in raw.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("%-12s %-6s %-5s %8s %8s %8s %8s" % ("mode", "app", "start", "p50 ms", "p10", "p90", "max"))
    for mode, sites in report.items():
        for site, kinds in sites.items():
            for kind, s in kinds.items():
                print("%-12s %-6s %-5s %8.2f %8.2f %8.2f %8.2f" % (
                    mode, site, kind, s["p50"], s["p10"], s["p90"], s["max"]))


if __name__ == "__main__":
    main()
