#!/usr/bin/env python3
"""Many sites, few of them busy: 1,000 registered sites, 200 of them visited in a Zipf
pattern (s = 1.1) by 8 concurrent clients, on a node whose budget allows 100 workers.
Reports worker and node memory (PSS), latency p50/p99, the share of cold starts (a
request answered by a worker pid new for its site) and errors.

  cargo build --release && python3 bench/zipf.py [--requests 6000] [--json]   # as root
"""
import argparse
import bisect
import json
import os
import random
import shutil
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import get_once, many_sites, processes, pss_kib, require_root, wait_port  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--visited", type=int, default=200)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-workers", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    work, port, node = many_sites(args.sites, "zipf", args.max_workers)
    run = os.path.join(work, "run")
    weights = [1 / (k ** 1.1) for k in range(1, args.visited + 1)]
    cumulative = []
    total = 0
    for w in weights:
        total += w
        cumulative.append(total)
    rng = random.Random(42)
    plan = [bisect.bisect(cumulative, rng.random() * total) for _ in range(args.requests)]
    lock = threading.Lock()
    latencies, errors, seen, cold = [], [], {}, [0]
    peak_workers = [0]

    def client(part):
        for site in part:
            host = "s%d.bench" % site
            start = time.perf_counter()
            try:
                status, body = get_once(port, host)
            except OSError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            elapsed = time.perf_counter() - start
            with lock:
                if status != 200:
                    errors.append("%s %d" % (host, status))
                    continue
                latencies.append(elapsed)
                pids = seen.setdefault(site, set())
                if body not in pids:
                    pids.add(body)
                    cold[0] += 1

    try:
        wait_port(port)
        time.sleep(1)  # the first registry load of 1,000 sites
        print("running %d requests ..." % args.requests, file=sys.stderr, flush=True)
        threads = [threading.Thread(target=client, args=(plan[i::args.clients],))
                   for i in range(args.clients)]
        started = time.time()
        for t in threads:
            t.start()
        loader = os.path.join(run, "loader.py")
        while any(t.is_alive() for t in threads):
            peak_workers[0] = max(peak_workers[0], len(processes(loader)[0]))
            time.sleep(0.2)
        duration = time.time() - started
        workers, zygotes = processes(loader)
        ms = sorted(t * 1000 for t in latencies)
        report = {
            "requests": args.requests,
            "errors": len(errors),
            "cold_share": cold[0] / max(len(latencies), 1),
            "p50_ms": statistics.median(ms),
            "p99_ms": ms[int(len(ms) * 0.99) - 1],
            "req_per_s": len(latencies) / duration,
            "peak_workers": peak_workers[0],
            "workers_at_end": len(workers),
            "workers_pss_mib": sum(pss_kib(p) for p in workers) / 1024,
            "zygote_pss_mib": sum(pss_kib(p) for p in zygotes) / 1024,
            "node_pss_mib": pss_kib(node.pid) / 1024,
            "first_errors": errors[:5],
        }
    finally:
        node.terminate()
        node.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            print("%-16s %s" % (k, round(v, 3) if isinstance(v, float) else v))


if __name__ == "__main__":
    main()
