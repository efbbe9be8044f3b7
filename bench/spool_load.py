#!/usr/bin/env python3
"""The spool under load: slow clients ask one site for large responses and read none of
them, so the node spools them to disk, while wrk loads a hello site on the same node.
Reports the hello site's throughput and p99 with and without the slow clients (runs
alternate), and how fast the slow clients then drain what was spooled.

  cargo build --release && python3 bench/spool_load.py [--clients 20] [--mib 64]   # as root
"""
import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ROOST, free_port, install_app, require_build, require_root, wait_port, workspace)


def slow_clients(port, count, mib):
    """Clients that ask for `mib` MiB each and read nothing for now."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /download?mib=%d HTTP/1.1\r\nHost: big.bench\r\n"
                  b"Connection: close\r\n\r\n" % mib)
        socks.append(s)
    return socks


def drain(socks):
    """Reads every slow client's response to its end; the bytes read."""
    total = 0
    for s in socks:
        s.settimeout(60)
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            total += len(data)
        s.close()
    return total


def spool_files(pid):
    """The node's unlinked temporary files: its spools."""
    fds = "/proc/%d/fd" % pid
    return sum(1 for fd in os.listdir(fds)
               if os.readlink(os.path.join(fds, fd)).endswith("(deleted)"))


def one_run(work, clients, mib, seconds):
    port = free_port()
    node = subprocess.Popen(
        [ROOST, "--registry", "sqlite:" + os.path.join(work, "registry.db"), "serve",
         "--listen", "127.0.0.1:%d" % port, "--cgroup-name", "roost-bench-spool",
         "--log-dir", os.path.join(work, "logs"), "--run-dir", os.path.join(work, "run"),
         "--tmp-dir", os.path.join(work, "tmp"), "--response-buffer", "16MiB"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        socks = slow_clients(port, clients, mib)
        time.sleep(3)  # the node reads the responses and spools them
        spooled = spool_files(node.pid)
        out = subprocess.run(["wrk", "-t2", "-c50", "-d%ds" % seconds, "--latency", "-H",
                              "Host: hello.bench", "http://127.0.0.1:%d/" % port],
                             check=True, capture_output=True, text=True).stdout
        started = time.perf_counter()
        drained = drain(socks)
        took = time.perf_counter() - started
    finally:
        node.terminate()
        node.wait()
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p99": re.search(r"99%\s+(\S+)", out).group(1), "spool_files": spooled,
            "drained_mib": drained / 2**20, "drain_s": took}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    require_root()
    require_build()
    work = workspace()
    try:
        hello, body = install_app(work, "hello.py"), install_app(work, "body.py")
        reg = "sqlite:" + os.path.join(work, "registry.db")
        # The hello site's two workers are kept warm: its p99 is not a cold start's.
        for name, host, app, procs in (("hello", "hello.bench", hello, ["2", "2"]),
                                       ("big", "big.bench", body, ["4", "0"])):
            subprocess.run([ROOST, "--registry", reg, "site", "add", name, "--host", host,
                            "--entry", app, "--user", "nobody", "--processes-max", procs[0],
                            "--processes-min", procs[1]],
                           check=True, stdout=subprocess.DEVNULL)
        rates = {0: [], args.clients: []}
        for _ in range(args.rounds):
            for clients in rates:
                r = one_run(work, clients, args.mib, args.seconds)
                rates[clients].append(r["rps"])
                print("%2d slow clients: %2d spool files, hello %6.0f req/s, p99 %s; drained "
                      "%5.0f MiB in %4.1f s" % (clients, r["spool_files"], r["rps"], r["p99"],
                                                r["drained_mib"], r["drain_s"]), flush=True)
        for clients, runs in rates.items():
            print("median with %d slow clients: %.0f req/s" % (clients, statistics.median(runs)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
