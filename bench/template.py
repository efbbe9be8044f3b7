#!/usr/bin/env python3
"""Per-site preloading: what a site's template (`--preload true`) buys a Flask site.

  scale-out  time of a request that needs a new worker while the site's one worker is
             busy (processes.min 1 keeps that one): the new worker is imported afresh
             (forked from the zygote) or forked from the site's template
  memory     PSS of the site's processes (workers, template) with 4 live workers

each for: `zygote` (stdlib zygote, the app imported by every worker), `runtime` (flask
preloaded in the zygote), `template` (the site's template imports the app once) and
`runtime+template`. Run as root with a release build and python3-flask:

  cargo build --release && python3 bench/template.py [--runs 30] [--json]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import http.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ROOST, free_port, install_app, pids_with_cwd, pss_kib, require_build, require_root,
    timed_get, wait_port, workspace)

MODES = {
    "zygote": ([], "false"),
    "runtime": (["--preload", "flask"], "false"),
    "template": ([], "true"),
    "runtime+template": (["--preload", "flask"], "true"),
}


def busy(port, seconds):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/sleep?s=%s" % seconds, headers={"Host": "f.bench"})
    conn.getresponse().read()
    conn.close()


def roost(registry, *args):
    subprocess.run([ROOST, "--registry", registry] + list(args), check=True,
                   stdout=subprocess.DEVNULL)


def measure(mode, runs, work):
    node_flags, preload = MODES[mode]
    registry = "sqlite:" + os.path.join(work, mode + ".db")
    app = install_app(work, "flask_app.py", "apps-" + mode)
    directory = os.path.dirname(app)
    roost(registry, "site", "add", "f", "--host", "f.bench", "--entry", app, "--user", "nobody",
          "--processes-min", "1", "--processes-max", "4", "--idle-timeout", "100ms",
          "--preload", preload)
    port = free_port()
    node = subprocess.Popen(
        [ROOST, "--registry", registry, "serve", "--listen", "127.0.0.1:%d" % port,
         "--cgroup-name", "roost-bench-template", "--log-dir", os.path.join(work, "logs-" + mode),
         "--run-dir", os.path.join(work, "run-" + mode),
         "--tmp-dir", os.path.join(work, "tmp-" + mode)] + node_flags,
        stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        timed_get(port, "f.bench")
        base = len(pids_with_cwd(directory))  # one worker (+ the template)
        times = []
        for _ in range(runs):
            deadline = time.time() + 30
            while len(pids_with_cwd(directory)) > base:  # the extra worker went idle
                if time.time() > deadline:
                    raise RuntimeError("the extra worker never exited")
                time.sleep(0.01)
            holder = threading.Thread(target=busy, args=(port, 0.3))
            holder.start()
            time.sleep(0.05)
            times.append(timed_get(port, "f.bench") * 1000)
            holder.join()
        roost(registry, "site", "set", "f", "--processes-min", "4")
        deadline = time.time() + 30
        while len(pids_with_cwd(directory)) < base + 3:
            if time.time() > deadline:
                raise RuntimeError("processes.min 4 was not reached")
            time.sleep(0.05)
        time.sleep(0.5)
        pids = pids_with_cwd(directory)
        return {"scale_out_ms": times, "processes": len(pids),
                "pss_kib": sum(pss_kib(p) for p in pids)}
    finally:
        node.terminate()
        node.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    require_build()
    work = workspace()
    report = {}
    try:
        for mode in MODES:
            print("measuring %s ..." % mode, file=sys.stderr, flush=True)
            report[mode] = measure(mode, args.runs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("%-17s %10s %8s %8s   %9s %12s" % ("mode", "p50 ms", "p10", "p90", "processes",
                                             "PSS MiB"))
    for mode, r in report.items():
        ms = sorted(r["scale_out_ms"])
        q = statistics.quantiles(ms, n=10)
        print("%-17s %10.2f %8.2f %8.2f   %9d %12.1f" % (
            mode, statistics.median(ms), q[0], q[-1], r["processes"], r["pss_kib"] / 1024))


if __name__ == "__main__":
    main()
