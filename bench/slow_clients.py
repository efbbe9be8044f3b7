#!/usr/bin/env python3
"""Slow clients against roost and the peers, each with 2 worker processes of one thread:
a few clients that upload a body a byte a second, or ask for a large response (8 or
256 MiB) and never read it, or 1,000 connections that send their headers a byte at a
time (slowloris), while a probe makes one ordinary request every half second. Reports
how many probes were answered 200 within 5 s, and their median latency, beside a run
with no attack. A server whose workers wait on slow clients answers none while they
last.

  cargo build --release && bench/install_peers.sh
  python3 bench/slow_clients.py [--clients 4] [--seconds 20] [--json]     # as root
"""
import argparse
import http.client
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, require_build, require_root, workspace  # noqa: E402
import throughput  # noqa: E402

APP = "body"
PROBE_EVERY = 0.5
PROBE_TIMEOUT = 5.0


def slow_upload(port, stop):
    """A form post sent a byte a second: the body never completes while the run lasts."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /upload HTTP/1.1\r\nHost: hello.bench\r\nContent-Length: 100000\r\n\r\n")
    try:
        while not stop.wait(1.0):
            s.sendall(b"x")
    except OSError:
        pass
    finally:
        s.close()


def slow_reader(mib):
    """A client that asks for `mib` MiB and never reads a byte of it."""
    def attack(port, stop):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /download?mib=%d HTTP/1.1\r\nHost: hello.bench\r\n\r\n" % mib)
        stop.wait()
        s.close()
    return attack


SLOWLORIS_CONNECTIONS = 250  # per client: 1,000 with the default 4


def slowloris(port, stop):
    """Connections that send a request's headers a byte every 2 s and never finish them;
    one that the server closes is opened again."""
    def connect():
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: hello.bench\r\n")
        return s
    conns = [connect() for _ in range(SLOWLORIS_CONNECTIONS)]
    while not stop.wait(2.0):
        for i, s in enumerate(conns):
            try:
                s.sendall(b"X")
            except OSError:
                s.close()
                conns[i] = connect()
    for s in conns:
        s.close()


ATTACKS = {"no attack": lambda port, stop: stop.wait(), "slow uploads": slow_upload,
           "unread 8 MiB": slow_reader(8), "unread 256 MiB": slow_reader(256),
           "slowloris": slowloris}


def probe(port, stop, out):
    while not stop.is_set():
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT)
            conn.request("GET", "/", headers={"Host": "hello.bench", "Connection": "close"})
            ok = conn.getresponse().status == 200
            conn.close()
        except OSError:
            ok = False
        out.append((ok, (time.perf_counter() - start) * 1000))
        stop.wait(max(PROBE_EVERY - (time.perf_counter() - start), 0))


def run_attack(command, work, attack, args):
    with throughput.serving(command, work, APP) as port:
        stop, out = threading.Event(), []
        attackers = [threading.Thread(target=ATTACKS[attack], args=(port, stop))
                     for _ in range(args.clients)]
        for t in attackers:
            t.start()
        time.sleep(1)  # the slow clients are in before the first probe
        prober = threading.Thread(target=probe, args=(port, stop, out))
        prober.start()
        time.sleep(args.seconds)
        stop.set()
        prober.join()
        for t in attackers:
            t.join()
    answered = [ms for ok, ms in out if ok]
    return {"probes": len(out), "answered": len(answered),
            "p50_ms": statistics.median(answered) if answered else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="slow clients per attack")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--only", default="", help="servers whose name contains this text")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    require_build()
    # The slowloris clients' sockets.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = workspace()
    shutil.copy(os.path.join(ROOT, "bench", "apps", APP + ".py"), work)
    report = {}
    try:
        for name, command in throughput.SERVERS.items():
            if args.only not in name or "4 threads" in name:
                continue
            if not throughput.installed(name):
                print("skipping %s: not installed" % name, file=sys.stderr)
                continue
            report[name] = {}
            for attack in ATTACKS:
                r = run_attack(command, work, attack, args)
                report[name][attack] = r
                print("%-36s %-17s %3d of %3d probes answered%s" % (
                    name, attack, r["answered"], r["probes"],
                    ", p50 %.1f ms" % r["p50_ms"] if r["answered"] else ""),
                    file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
