#!/usr/bin/env python3
"""The overhead roost's front adds over calling a worker directly: the same hello app,
one worker with one slot, one request at a time (so every microsecond of the path
shows), for the same time:

  direct   target/release/examples/direct_worker: a native client speaking the frame
           protocol on the worker's own socket (no HTTP, no front, no pool)
  front    wrk -t1 -c1 (keep-alive) through roost: HTTP parsing, routing, the pool's
           checkout, the hop to the worker and back, the HTTP response

Mean round trip of each, and the difference: the front's cost per request. Medians of
--runs runs. As root (the site runs as nobody), with wrk:

  cargo build --release --example direct_worker && cargo build --release
  python3 bench/front_overhead.py [--seconds 5] [--runs 3] [--json]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ROOST, ROOT, free_port, install_app, require_root, serve, timed_get, wait_port, workspace)

DIRECT = os.path.join(ROOT, "target", "release", "examples", "direct_worker")
LOADER = os.path.join(ROOT, "crates", "roost", "python", "loader.py")


def direct(app, seconds):
    out = subprocess.run([DIRECT, LOADER, app, str(seconds)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)["mean_us"]


def through_front(port, seconds):
    text = subprocess.run(["wrk", "-t1", "-c1", "-d%ds" % seconds, "-H", "Host: hello.bench",
                           "http://127.0.0.1:%d/" % port], check=True, capture_output=True,
                          text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    return 1e6 / rps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    for binary, how in ((ROOST, "cargo build --release"),
                        (DIRECT, "cargo build --release --example direct_worker")):
        if not os.path.exists(binary):
            sys.exit("build first: " + how)
    work = workspace()
    app = install_app(work, "hello.py")
    registry = "sqlite:" + os.path.join(work, "r.db")
    subprocess.run([ROOST, "--registry", registry, "site", "add", "hello", "--host", "hello.bench",
                    "--entry", app, "--user", "nobody", "--processes-max", "1",
                    "--processes-min", "1"], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    node = serve(registry, port, work, "overhead")
    runs = {"direct_us": [], "front_us": []}
    try:
        wait_port(port)
        timed_get(port, "hello.bench")
        for i in range(args.runs):
            print("run %d/%d ..." % (i + 1, args.runs), file=sys.stderr, flush=True)
            runs["direct_us"].append(direct(app, args.seconds))
            runs["front_us"].append(through_front(port, args.seconds))
    finally:
        node.terminate()
        node.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    d, f = statistics.median(runs["direct_us"]), statistics.median(runs["front_us"])
    report = dict(runs, direct_median_us=d, front_median_us=f, overhead_us=f - d)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("direct to the worker   %8.1f us per request (runs: %s)"
          % (d, ", ".join("%.1f" % x for x in runs["direct_us"])))
    print("through roost's front  %8.1f us per request (runs: %s)"
          % (f, ", ".join("%.1f" % x for x in runs["front_us"])))
    print("the front's cost       %8.1f us per request (%.0f%% of the round trip)"
          % (f - d, 100 * (f - d) / f))


if __name__ == "__main__":
    main()
