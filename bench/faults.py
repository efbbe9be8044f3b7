#!/usr/bin/env python3
"""Faults under load: clients load several sites while a worker is killed with SIGKILL
every 100 ms, sites are added through the registry, and a loaded site's limits change
(pids.max and memory.max, lowered and raised in turn: each change renews its workers,
and a lowered pids.max waits for the old ones). Checks that failed requests
never outnumber the requests that can have been on a killed worker (one per kill, as
each worker has one slot), that every request the node answered with a 5xx was on a
worker that was killed (the access log names each request's worker pid), that the
node never stops answering, that every registry write made during the run is
present afterwards, and that the node keeps no pipe of a worker that is gone (each
worker prints into a pipe the node reads), and that the changed site's last limits
are in its registry row and, as root with cgroups, in force. The clients send GETs,
small form POSTs and 8 KiB POSTs, each with an id the app notes in its error log as
it begins the request: a request the node sent to another worker because the killed
one had not read it must never have been begun twice.

With --fork-servers, s1 preloads its app (its workers fork from its template), and
every 1.5 s the zygote or s1's template is killed in turn, with every worker it forked:
those count as killed too.

  cargo build --release && python3 bench/faults.py [--seconds 60] [--fork-servers]  # as root
"""
import argparse
import collections
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ROOST, free_port, install_app, processes, require_root, serve, workspace)


# What s0's limits are set to in turn: pids.max, memory.max.
LIMITS = [(24, 192 << 20), (64, 256 << 20)]


def cgroup_value(node, site, name):
    """A site's cgroup file's value (whichever hierarchy has it), or None."""
    for root, dirs, files in os.walk("/sys/fs/cgroup"):
        if root.endswith("/%s/%s" % (node, site)) and name in files:
            with open(os.path.join(root, name)) as f:
                return f.read().strip()
    return None


def parent_of(pid):
    """The parent pid from /proc/<pid>/stat, or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def comm_of(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def stop(pid):
    """SIGSTOP, and a wait (a second at most) until it is stopped or gone."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].startswith(" T"):
                    return
        except OSError:
            return
        time.sleep(0.01)


def stopped_with_descendants(pid, loader):
    """Stops the fork server `pid` and every template below it (so that none forks a
    worker unseen), then returns it and every process running `loader` below it."""
    stopped, servers = set(), [pid]
    while servers:
        for server in servers:
            stop(server)
        stopped.update(servers)
        workers, zygotes = processes(loader)
        parents = {p: parent_of(p) for p in workers + zygotes}
        found = [pid]
        for p in found:
            found.extend(c for c, parent in parents.items() if parent == p)
        servers = [p for p in found if p not in stopped and comm_of(p) == "roost-template"]
    return found


def fork_server(zygotes, node_pid, template):
    """The node's zygote, or (template) a site's template, among the zygote-mode
    processes; None if there is none now."""
    for pid in zygotes:
        comm = comm_of(pid)
        if template and comm == "roost-template":
            return pid
        if not template and comm not in ("roost-template", "roost-spare") \
                and parent_of(pid) == node_pid:
            return pid
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--fork-servers", action="store_true",
                        help="also kill the zygote and a preloading site's template")
    args = parser.parse_args()
    require_root()
    work = workspace()
    app = install_app(work, "once.py")
    reg = "sqlite:" + os.path.join(work, "registry.db")

    def set_limits(name, pids, memory):
        subprocess.run([ROOST, "--registry", reg, "site", "set", name, "--pids-max", str(pids),
                        "--memory-max", str(memory)], check=True, stdout=subprocess.DEVNULL)

    def add(name, *extra):
        subprocess.run([ROOST, "--registry", reg, "site", "add", name, "--host", name + ".bench",
                        "--entry", app, "--user", "nobody"] + list(extra), check=True,
                       stdout=subprocess.DEVNULL)

    for i in range(args.sites):
        add("s%d" % i, *(["--preload", "true"] if args.fork_servers and i == 1 else []))
    port = free_port()
    run = os.path.join(work, "run")
    node = serve(reg, port, work, "faults")
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0, "kills": 0, "zygote": 0, "template": 0}
    killed = set()

    def client(seed):
        rng = random.Random(seed)
        sent = 0
        while not stop.is_set():
            host = "s%d.bench" % rng.randrange(args.sites)
            sent += 1
            ident = "%d-%d" % (seed, sent)
            # Mostly GETs; some small form POSTs (one packet, sent again if no worker
            # read them), some of 8 KiB (never sent again, nor the request after).
            kind = rng.random()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                if kind < 0.7:
                    conn.request("GET", "/?id=" + ident, headers={"Host": host})
                else:
                    pad = "x" * (100 if kind < 0.9 else 8192)
                    conn.request("POST", "/", body="id=%s&pad=%s" % (ident, pad),
                                 headers={"Host": host,
                                          "Content-Type": "application/x-www-form-urlencoded"})
                r = conn.getresponse()
                r.read()
                conn.close()
                good = r.status == 200
            except OSError:
                good = False
            with lock:
                counts["ok" if good else "failed"] += 1

    try:
        time.sleep(1)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        loader = os.path.join(run, "loader.py")
        added = []
        end = time.time() + args.seconds
        rng = random.Random(7)
        tick = 0
        changes = 0
        while time.time() < end:
            workers, zygotes = processes(loader)
            victims, server = [], None
            if args.fork_servers and tick % 15 == 14:  # every 1.5 s
                server = ("zygote", "template")[(tick // 15) % 2]
                pid = fork_server(zygotes, node.pid, server == "template")
                if pid:
                    victims = stopped_with_descendants(pid, loader)
            elif workers:
                victims = [rng.choice(workers)]
            if victims:
                # Each worker killed (with its fork server or alone) can fail the request
                # on it.
                hit = sum(1 for p in victims if comm_of(p) == "roost-worker")
                try:
                    os.kill(victims[0], signal.SIGKILL)
                    killed.update(victims)
                    counts["kills"] += hit
                    if server:
                        counts[server] += 1
                except ProcessLookupError:
                    pass
            tick += 1
            if tick % 20 == 0:  # every 2 s, a registry write
                name = "added%d" % len(added)
                add(name)
                added.append(name)
            elif tick % 10 == 0:  # and between those, a change of s0's limits
                set_limits("s0", *LIMITS[changes % len(LIMITS)])
                changes += 1
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        listed = subprocess.run([ROOST, "--registry", reg, "site", "list"], check=True,
                                capture_output=True, text=True).stdout
        missing = [n for n in added if n not in listed]
        served = []
        for name in added:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/", headers={"Host": name + ".bench"})
            served.append(conn.getresponse().status)
            conn.close()
        # Every 5xx the node gave must name a worker that was killed.
        misattributed, answered_5xx, sent_again = [], 0, 0
        begun = collections.Counter()
        logs = os.path.join(work, "logs")
        for site in os.listdir(logs):
            for name in ("error.log", "error.log.old"):
                try:
                    with open(os.path.join(logs, site, name)) as f:
                        text = f.read()
                except FileNotFoundError:
                    continue
                # Requests a killed worker never read, which the node sent to another.
                sent_again += text.count("ended before it read a request")
                begun.update(m.group(1) for m in re.finditer(r"began (\S+)", text))
            with open(os.path.join(logs, site, "access.log")) as f:
                for line in f:
                    fields = line.rsplit(" ", 2)
                    status = line.split('"')[2].split()[0]
                    if status.startswith("5"):
                        answered_5xx += 1
                        pid = fields[-1].strip()
                        if not pid.isdigit() or int(pid) not in killed:
                            misattributed.append(line.strip())
        begun_twice = sorted(i for i, n in begun.items() if n > 1)
        # s0's last limits: in its row, and in its cgroup once the workers a lowered
        # pids.max waits for have gone.
        pids, memory = LIMITS[(changes - 1) % len(LIMITS)]
        shown = json.loads(subprocess.run([ROOST, "--registry", reg, "site", "show", "s0",
                                           "--json"], check=True, capture_output=True,
                                          text=True).stdout)
        limits_kept = (shown["pids_max"], shown["memory_max"]) == (pids, memory)
        # (A lowered one waits for the workers it replaces, which may be starting.)
        waited = time.time() + 10
        while True:
            cgroup_pids = cgroup_value("roost-bench-faults", "s0", "pids.max")
            if cgroup_pids in (None, str(pids)) or time.time() > waited:
                break
            time.sleep(0.1)
        # The node holds three pipes per live worker of one slot (its output, both
        # ends of its slot's inbox) and one per zygote spare: a killed worker's end
        # with it. Counted once the killed workers are reaped.
        time.sleep(2)
        live = processes(loader)[0]
        pipes = sum(1 for fd in os.listdir("/proc/%d/fd" % node.pid)
                    if os.readlink("/proc/%d/fd/%s" % (node.pid, fd)).startswith("pipe:"))
    finally:
        node.terminate()
        node.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    print("requests ok      %d" % counts["ok"])
    print("requests failed  %d" % counts["failed"])
    print("workers killed   %d" % counts["kills"])
    if args.fork_servers:
        print("  with them: %d zygotes, %d templates" % (counts["zygote"], counts["template"]))
    print("5xx answered     %d (on a worker not killed: %d)" % (answered_5xx, len(misattributed)))
    for line in misattributed[:5]:
        print("  " + line)
    print("sent again       %d (a killed worker had not read them)" % sent_again)
    print("begun twice      %d (requests an app began more than once)" % len(begun_twice))
    for ident in begun_twice[:5]:
        print("  " + ident)
    print("sites added      %d (missing afterwards: %d; answering 200: %d)"
          % (len(added), len(missing), served.count(200)))
    print("node's pipes     %d, for %d live workers" % (pipes, len(live)))
    print("limit changes    %d (the last in the registry: %s; pids.max in force: %s)"
          % (changes, "yes" if limits_kept else "NO", cgroup_pids or "no pids cgroup"))
    bad = (counts["failed"] > counts["kills"] or missing or misattributed or begun_twice
           or served.count(200) != len(added) or pipes > 3 * len(live) + 8
           or not limits_kept or cgroup_pids not in (None, str(pids)))
    print("RESULT", "FAIL" if bad else "PASS")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
