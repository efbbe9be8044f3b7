#!/usr/bin/env python3
"""Worker churn: does the node's memory stay flat while workers start and stop for
ever? Many sites on a node whose budget holds few workers, visited at random, so nearly
every request starts a worker and evicts another; with `--replace N`, N sites are also
removed from the registry and added again under a new name each round. Prints, after
each round, the node's memory (RSS and PSS), open descriptors and threads, and the most
fork servers (zygotes, their spares, templates) seen at once during the round with their
memory and descriptors then; and the node's growth per thousand worker starts between
the second round and the last (the first one fills the allocator's pools and the node's
tables). With `--preload`, every site imports its app once in a template of its own and
its workers fork from it, so templates churn too: outside the budget, which counts
workers, they must go with their site's last worker.

  cargo build --release && python3 bench/churn.py [--rounds 10] [--json]   # as root
"""
import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOST, get_once, many_sites, open_fds, processes, pss_kib,  # noqa: E402
                    require_root, status_field, wait_port)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--max-workers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000, help="per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--replace", type=int, default=0, metavar="N",
                        help="sites removed and added again (same host, new name) per round")
    parser.add_argument("--preload", action="store_true",
                        help="every site imports its app in a template and forks workers from it")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    work, port, node = many_sites(args.sites, "churn", args.max_workers)
    registry = os.path.join(work, "registry.db")
    loader = os.path.join(work, "run", "loader.py")
    if args.preload:
        db = sqlite3.connect(registry)
        db.execute("UPDATE sites SET preload = 1")
        db.commit()
        db.close()
    app = os.path.join(work, "apps", "pid.py")
    names = ["s%d" % i for i in range(args.sites)]

    def replace(rng, n):
        """Removes a site and adds it back under a new name, through the CLI."""
        i = rng.randrange(args.sites)
        roost = [ROOST, "--registry", "sqlite:" + registry, "site"]
        subprocess.run(roost + ["rm", names[i]], check=True, stdout=subprocess.DEVNULL)
        names[i] = "s%d-%d" % (i, n)
        subprocess.run(roost + ["add", names[i], "--host", "s%d.bench" % i, "--entry", app,
                                "--user", "nobody", "--idle-timeout", "5s",
                                "--preload", "true" if args.preload else "false"],
                       check=True, stdout=subprocess.DEVNULL)

    lock = threading.Lock()
    # A request between a replaced site's removal and its addition is answered 404,
    # rightly: counted apart from errors.
    errors, starts, gaps = [], [0], [0]
    last_pid = {}

    def client(sites):
        for site in sites:
            try:
                status, body = get_once(port, "s%d.bench" % site)
            except OSError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                if status == 404 and args.replace:
                    gaps[0] += 1
                elif status != 200:
                    errors.append("s%d %d" % (site, status))
                elif last_pid.get(site) != body:
                    last_pid[site] = body
                    starts[0] += 1

    rounds = []
    try:
        wait_port(port)
        time.sleep(1)
        rng = random.Random(7)
        for n in range(args.rounds):
            plan = [rng.randrange(args.sites) for _ in range(args.requests)]
            threads = [threading.Thread(target=client, args=(plan[i::args.clients],))
                       for i in range(args.clients)]
            started = time.time()
            for t in threads:
                t.start()
            for k in range(args.replace):
                replace(rng, n * args.replace + k)
            peak = (0, 0, 0)  # fork servers, their PSS and descriptors, at the most
            while any(t.is_alive() for t in threads):
                fork_servers = processes(loader)[1]
                peak = max(peak, (len(fork_servers), sum(pss_kib(p) for p in fork_servers),
                                  sum(open_fds(p) for p in fork_servers)))
                threads[0].join(timeout=1)
            rounds.append({"round": n + 1, "seconds": time.time() - started,
                           "worker_starts": starts[0], "errors": len(errors), "not_found": gaps[0],
                           "node_rss_kib": status_field(node.pid, "VmRSS"),
                           "node_pss_kib": pss_kib(node.pid), "node_fds": open_fds(node.pid),
                           "node_threads": status_field(node.pid, "Threads"),
                           "fork_servers": peak[0], "fork_server_pss_kib": peak[1],
                           "fork_server_fds": peak[2]})
            if not args.json:
                r = rounds[-1]
                print("round %2d  %6.1f s  %6d worker starts  %d errors  %d 404 while replaced  "
                      "node RSS %.2f MiB  PSS %.2f MiB  %d fds  %d threads  "
                      "at most %d fork servers: PSS %.2f MiB, %d fds"
                      % (r["round"], r["seconds"], r["worker_starts"], r["errors"], r["not_found"],
                         r["node_rss_kib"] / 1024, r["node_pss_kib"] / 1024, r["node_fds"],
                         r["node_threads"], r["fork_servers"], r["fork_server_pss_kib"] / 1024,
                         r["fork_server_fds"]), flush=True)
    finally:
        node.terminate()
        node.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    first, last = rounds[min(1, len(rounds) - 1)], rounds[-1]
    thousands = max(last["worker_starts"] - first["worker_starts"], 1) / 1000
    report = {
        "rounds": rounds,
        "rss_kib_per_1000_starts": (last["node_rss_kib"] - first["node_rss_kib"]) / thousands,
        "pss_kib_per_1000_starts": (last["node_pss_kib"] - first["node_pss_kib"]) / thousands,
        "sites_replaced": (last["round"] - first["round"]) * args.replace,
        "first_errors": errors[:5],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("growth from round %d to %d (%d worker starts, %d sites replaced): RSS %.1f KiB, "
              "PSS %.1f KiB per 1,000 worker starts; %d errors"
              % (first["round"], last["round"], last["worker_starts"] - first["worker_starts"],
                 report["sites_replaced"], report["rss_kib_per_1000_starts"],
                 report["pss_kib_per_1000_starts"], len(errors)))


if __name__ == "__main__":
    main()
