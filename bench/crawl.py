#!/usr/bin/env python3
"""A crawler visits every site of a node once, as search engines and vulnerability
scanners visit every site of a shared host: N registered sites (`pid.py`, as nobody,
the default idle timeout of 60 s), each asked for / once, in order, by a few clients
on fresh connections. Every visit starts a worker, which then stays idle until its
idle timeout. The script reports how long the crawl took, its errors, and the most
workers alive at once with their memory (the sum of their PSS and of their RSS, and the
anonymous memory of the sites' cgroups, which the node's `--max-worker-memory` counts:
what the workers made for themselves, not what they share), sampled every 0.5 s until
the workers have gone, then how long the node takes to stop (each site visited removes
its TMPDIR and cgroups). Options after `--` go to `roost serve` (a budget, say).

  cargo build --release && python3 bench/crawl.py [--sites 2000] [--json] [-- --max-worker-memory 1GiB]
"""
import argparse
import json
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (free_port, get_once, install_app, processes, pss_kib,  # noqa: E402
                    site_cgroups_anon_kib,
                    register, require_root, serve, status_field, wait_port, workspace)


def crawl(port, sites, clients):
    """Visits s0 … s<sites-1> once each; (seconds, statuses other than 200)."""
    hosts = iter(["s%d.bench" % k for k in range(sites)])
    lock, failed = threading.Lock(), []

    def client():
        while True:
            with lock:
                host = next(hosts, None)
            if host is None:
                return
            try:
                status = get_once(port, host)[0]
            except OSError as exc:
                status = str(exc)
            if status != 200:
                with lock:
                    failed.append((host, status))
    start = time.time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.time() - start, failed


def error_log_tail(work, site, lines=5):
    try:
        with open(os.path.join(work, "logs", site, "error.log")) as f:
            return f.read().splitlines()[-lines:]
    except OSError as exc:
        return ["(%s)" % exc]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("serve_options", nargs="*", help="after --: options of roost serve")
    args = parser.parse_args()
    require_root()
    work = workspace()
    node = None
    try:
        app = install_app(work, "pid.py")
        registry = os.path.join(work, "registry.db")
        register(registry, app, args.sites, idle_timeout="60s")
        port = free_port()
        node = serve(registry, port, work, "crawl", *args.serve_options)
        wait_port(port, 120)
        loader = os.path.join(work, "run", "loader.py")
        peak = {"workers": 0, "pss_kib": 0, "rss_kib": 0, "cgroups_kib": 0}
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                workers = processes(loader)[0]
                pss = sum(pss_kib(pid) for pid in workers)
                rss = sum(status_field(pid, "VmRSS") for pid in workers)
                peak["workers"] = max(peak["workers"], len(workers))
                peak["pss_kib"] = max(peak["pss_kib"], pss)
                peak["rss_kib"] = max(peak["rss_kib"], rss)
                peak["cgroups_kib"] = max(peak["cgroups_kib"],
                                          site_cgroups_anon_kib(node.pid, "crawl"))
                time.sleep(0.5)
        sampler = threading.Thread(target=sample)
        sampler.start()
        seconds, failed = crawl(port, args.sites, args.clients)
        # The workers go at their idle timeout; the peak may come after the crawl.
        deadline = time.time() + 90
        while processes(loader)[0] and time.time() < deadline:
            time.sleep(1)
        sampling.set()
        sampler.join()
        node_rss = status_field(node.pid, "VmRSS")
        # A stop ends every site: each removes its TMPDIR and cgroups.
        stopping = time.time()
        node.terminate()
        node.wait(timeout=300)
        stop_seconds = time.time() - stopping
        row = {"sites": args.sites, "serve_options": args.serve_options,
               "crawl_seconds": round(seconds, 1), "errors": len(failed),
               "first_errors": failed[:5], "peak_workers": peak["workers"],
               "peak_workers_pss_mib": round(peak["pss_kib"] / 1024, 1),
               "peak_workers_rss_mib": round(peak["rss_kib"] / 1024, 1),
               "peak_site_cgroups_anon_mib": round(peak["cgroups_kib"] / 1024, 1),
               "node_rss_mib": round(node_rss / 1024, 1), "stop_seconds": round(stop_seconds, 1)}
        if args.json:
            print(json.dumps(row, indent=2))
        else:
            print("%d sites crawled in %.1f s (%s), %d errors; at most %d workers at once, "
                  "PSS %.1f MiB, RSS %.1f MiB, their cgroups' own %.1f MiB; node RSS %.1f MiB; "
                  "stopped in %.1f s"
                  % (row["sites"], row["crawl_seconds"], " ".join(args.serve_options) or "defaults",
                     row["errors"], row["peak_workers"], row["peak_workers_pss_mib"],
                     row["peak_workers_rss_mib"], row["peak_site_cgroups_anon_mib"],
                     row["node_rss_mib"], row["stop_seconds"]))
            for host, status in row["first_errors"]:
                print("  %s: %s; the end of its error log:" % (host, status))
                for line in error_log_tail(work, host.split(".")[0]):
                    print("    " + line)
    finally:
        if node is not None:
            node.terminate()
            node.wait(timeout=120)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
