#!/usr/bin/env python3
"""What registered sites cost while nobody visits them: for each count of sites, a node
is started on a registry of that many, and the script reports how long it took to
serve the last site, the node's memory (RSS, PSS), its open descriptors, the kernel
memory that came with it (slab and per-CPU allocations, from /proc/meminfo: a visited
site's cgroups live there; other work on the machine adds noise), the node's CPU while
idle, the cold start of a site's first visit (its cgroups are made then) beside a later
one, how long a site added through the CLI takes to answer, and the CPU a registry change
costs the node besides reading and checking the registry: mostly its main thread's,
which puts the new set of sites in place, and apart, that of the thread that reads and
checks the registry (`registry-watch`, every site at each change); then the tail latency of
back-to-back requests to a warm site, quiet, while the CLI reads a site every 0.25 s
(the control: the CLI's own CPU), and while it changes one every 0.25 s (requests are
served on the runtime's worker threads, which should not wait for the change).

  cargo build --release && python3 bench/registered.py [--sites 1000,5000] [--json]   # as root
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOST, free_port, get_once, install_app, open_fds, pss_kib,  # noqa: E402
                    register, require_root, serve, status_field, timed_get, wait_port,
                    workspace)


def meminfo_kib(*fields):
    """The sum of /proc/meminfo's `fields`, in KiB."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            if name in fields:
                total += int(value.split()[0])
    return total


def kernel_kib():
    """The kernel's slab and per-CPU allocations, in KiB."""
    return meminfo_kib("Slab"), meminfo_kib("Percpu")


def cpu_seconds(pid, leave_out=None, only=None):
    """CPU time of a process's threads, but those named `leave_out`, or of those named
    `only`."""
    total = 0
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            stat = open("/proc/%d/task/%s/stat" % (pid, task)).read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        if name != leave_out and only in (None, name):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def latency_tail(port, host, seconds):
    """p99.9 and max (ms) of back-to-back GETs on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times, stop = [], time.time() + seconds
    while time.time() < stop:
        start = time.perf_counter()
        conn.request("GET", "/", headers={"Host": host})
        conn.getresponse().read()
        times.append((time.perf_counter() - start) * 1000)
    conn.close()
    times.sort()
    return [round(times[int(len(times) * 0.999)], 2), round(times[-1], 2)]


def set_processes_max(registry, site):
    subprocess.run([ROOST, "--registry", "sqlite:" + registry, "site", "set", site,
                    "--processes-max", "3"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def show(registry, site):
    subprocess.run([ROOST, "--registry", "sqlite:" + registry, "site", "show", site],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def latency_tail_while(port, host, seconds, action):
    """[`latency_tail`] while `action(k)` runs every 0.25 s, k = 0, 1, ..."""
    stop = threading.Event()

    def act():
        k = 0
        while not stop.is_set():
            action(k)
            k += 1
            time.sleep(0.25)
    actor = threading.Thread(target=act)
    actor.start()
    try:
        return latency_tail(port, host, seconds)
    finally:
        stop.set()
        actor.join()


def measure(count, options):
    work = workspace()
    app = install_app(work, "pid.py")
    registry = os.path.join(work, "registry.db")
    register(registry, app, count)
    port = free_port()
    before = kernel_kib()
    started = time.time()
    node = serve(registry, port, work, "registered", *options)
    try:
        wait_port(port, 300)
        last = "s%d.bench" % (count - 1)
        while get_once(port, last)[0] != 200:
            time.sleep(0.1)
        ready = time.time() - started
        time.sleep(8)  # the last site's worker exits at its idle timeout (5 s)
        kernel = [after - then for after, then in zip(kernel_kib(), before)]
        cpu = cpu_seconds(node.pid)
        time.sleep(5)
        idle_cpu = cpu_seconds(node.pid) - cpu
        # Cold starts of sites never visited (their cgroups are made now), then of the
        # same sites again once their workers have gone (cgroups already there).
        visited = ["s%d.bench" % k for k in range(min(10, count - 1))]
        first = [timed_get(port, host) * 1000 for host in visited]
        time.sleep(8)
        again = [timed_get(port, host) * 1000 for host in visited]
        time.sleep(8)
        added = time.time()
        subprocess.run([ROOST, "--registry", "sqlite:" + registry, "site", "add", "new",
                        "--host", "new.bench", "--entry", app, "--user", "nobody"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while get_once(port, "new.bench")[0] != 200:
            time.sleep(0.01)
        added = time.time() - added
        changes = 10
        cpu_before = cpu_seconds(node.pid, leave_out="registry-watch")
        watch_before = cpu_seconds(node.pid, only="registry-watch")
        for k in range(changes):
            set_processes_max(registry, "s%d" % k)
            time.sleep(0.5)
        per_change = (cpu_seconds(node.pid, leave_out="registry-watch") - cpu_before) / changes
        # The thread that reads the registry: every site at each change.
        watch_per_change = (cpu_seconds(node.pid, only="registry-watch") - watch_before) / changes
        # Does a change hold up requests? Those to a warm site: quiet; while the CLI
        # reads a site every 0.25 s (the CLI's own cost on these cores, the control);
        # while it changes one every 0.25 s.
        quiet = latency_tail(port, "new.bench", 5)
        reading = latency_tail_while(port, "new.bench", 5, lambda k: show(registry, "s1"))
        during = latency_tail_while(port, "new.bench", 5,
                                    lambda k: set_processes_max(registry, "s%d" % (changes + k)))
        return {"sites": count, "seconds_to_serve_the_last": round(ready, 2),
                "node_rss_kib": status_field(node.pid, "VmRSS"), "node_pss_kib": pss_kib(node.pid),
                "node_fds": open_fds(node.pid),
                "kernel_slab_kib": kernel[0], "kernel_percpu_kib": kernel[1], "idle_cpu_seconds_in_5": round(idle_cpu, 3),
                "first_visit_ms_p50": round(statistics.median(first), 2),
                "later_cold_start_ms_p50": round(statistics.median(again), 2),
                "seconds_for_an_added_site_to_answer": round(added, 3),
                "change_cpu_ms": round(per_change * 1000, 1),
                "change_read_cpu_ms": round(watch_per_change * 1000, 1),
                "latency_p999_max_ms_quiet": quiet, "latency_p999_max_ms_during_reads": reading,
                "latency_p999_max_ms_during_changes": during}
    finally:
        node.terminate()
        node.wait(timeout=120)
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="1000,5000,10000",
                        help="counts of registered sites, comma-separated")
    parser.add_argument("--no-cgroups", action="store_true", help="the node runs without cgroups")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    rows = []
    for count in (int(c) for c in args.sites.split(",")):
        row = measure(count, ["--no-cgroups"] if args.no_cgroups else [])
        rows.append(row)
        if not args.json:
            print("%6d sites: last served after %.2f s; node RSS %.1f MiB, PSS %.1f MiB, %d fds; "
                  "kernel slab +%.1f MiB, per-CPU +%.1f MiB; idle CPU %.3f s in 5 s; a first visit "
                  "%.2f ms, a later cold start %.2f ms (p50); a site added answers "
                  "after %.3f s; a change costs the node %.1f ms of CPU besides reading it, %.1f ms "
                  "reading it; "
                  "requests' p99.9/max %s ms quiet, %s ms during CLI reads, %s ms during changes"
                  % (count, row["seconds_to_serve_the_last"], row["node_rss_kib"] / 1024,
                     row["node_pss_kib"] / 1024, row["node_fds"], row["kernel_slab_kib"] / 1024, row["kernel_percpu_kib"] / 1024,
                     row["idle_cpu_seconds_in_5"], row["first_visit_ms_p50"],
                     row["later_cold_start_ms_p50"], row["seconds_for_an_added_site_to_answer"],
                     row["change_cpu_ms"], row["change_read_cpu_ms"], "/".join(map(str, row["latency_p999_max_ms_quiet"])),
                     "/".join(map(str, row["latency_p999_max_ms_during_reads"])),
                     "/".join(map(str, row["latency_p999_max_ms_during_changes"]))),
                  flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
