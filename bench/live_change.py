#!/usr/bin/env python3
"""A site added to and removed from a running server, beside the peers that host many
sites: how long until the new site answers (and the removed one no longer does), and
what each change costs a neighbour under load.

Each server hosts `--sites` hello sites (s0 ... as nobody) and is warm; a client
requests s0 back to back on a keep-alive connection all along (a connection the
server closes is opened again and the request retried once, as clients do; it fails
only if the retry fails too). Every `--pause` seconds a site is added, `--rounds`
times, then the added sites are removed one by one, the way each server is told:

  roost     `roost site add`, `roost site rm` (the CLI writes the registry; the node
            reads it)
  mod_wsgi  Apache 2.4 (event MPM), a virtual host and `WSGIDaemonProcess` per site
            (as bench/density_peers.py) after a first, catch-all one that serves
            nothing (else Apache answers an unknown name with its first site): the
            configuration rewritten with the site or without it, then a graceful
            restart (SIGUSR1, `apachectl graceful`)
  uWSGI     an Emperor with a vassal per site on its own HTTP socket: the vassal's
            file written into the vassals folder, or deleted (the Emperor's default
            scan, every 3 s; `--emperor-freq`)

For each change: the time from the command to the new site's first 200, or to the
removed site's first 404 or refused connection (polled every 10 ms on fresh
connections), and the neighbour's requests from the command to one second after
that: how many, how many failed, the slowest, against its slowest in the quiet second
before the command.

  bench/install_peers.sh && python3 bench/live_change.py [--sites 50] [--rounds 3] [--json]
"""
import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOST, apache_conf, free_port, get_once, install_app, register,  # noqa: E402
                    require_build, require_root, serve, wait_port, workspace)
from density_peers import APACHE_SITE, VASSAL, site_folder, visit  # noqa: E402


class Neighbour(threading.Thread):
    """Back-to-back GETs to one site on a keep-alive connection: (start, seconds, ok)
    for each request."""

    def __init__(self, port, host):
        super().__init__(daemon=True)
        self.port, self.host = port, host
        self.done = []
        self.stop = threading.Event()

    def run(self):
        conn = None
        while not self.stop.is_set():
            start = time.perf_counter()
            ok = False
            for _ in range(2):
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                    conn.request("GET", "/", headers={"Host": self.host})
                    response = conn.getresponse()
                    response.read()
                    ok = response.status == 200
                    break
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = None
            self.done.append((start, time.perf_counter() - start, ok))

    def between(self, start, end):
        return [(t, s, ok) for t, s, ok in self.done if start <= t < end]


def answered(port, host):
    """The status `host` answers on a fresh connection, None when refused."""
    try:
        return get_once(port, host, timeout=10)[0]
    except OSError:
        return None


def seconds_until(start, port, host, done, limit=120.0):
    """Seconds from `start` until `done(status)` for `host`, polled every 10 ms."""
    while time.perf_counter() - start < limit:
        if done(answered(port, host)):
            return time.perf_counter() - start
        time.sleep(0.01)
    raise RuntimeError("%s did not change within %.0f s" % (host, limit))


def served(status):
    return status == 200


def gone(status):
    return status in (None, 404)


def run_changes(server, sites, rounds, pause):
    """Adds `rounds` sites to the running `server`, then removes them, while the
    neighbour loads s0: {"adds": [...], "removes": [...]}."""
    port, host = server.neighbour
    neighbour = Neighbour(port, host)
    neighbour.start()
    results = {"adds": [], "removes": []}
    changes = [("adds", server.add, served, sites + k) for k in range(rounds)]
    changes += [("removes", server.remove, gone, sites + k) for k in range(rounds)]
    try:
        for kind, change, done, i in changes:
            time.sleep(pause)
            start = time.perf_counter()
            took = seconds_until(start, *change(i), done)
            end = start + took + 1.0
            time.sleep(max(0.0, end - time.perf_counter()))
            during = neighbour.between(start, end)
            quiet = neighbour.between(start - 1.0, start)
            result = {
                "ms": round(took * 1000, 1),
                "neighbour_requests": len(during),
                "neighbour_failed": sum(1 for _, _, ok in during if not ok),
                "neighbour_max_ms": round(max(s for _, s, _ in during) * 1000, 1),
                "neighbour_quiet_max_ms": round(max(s for _, s, _ in quiet) * 1000, 1),
            }
            results[kind].append(result)
            print("  %s: s%d %s after %.1f ms; neighbour: %d requests, %d failed, slowest "
                  "%.1f ms (quiet: %.1f ms)" % (
                      server.name, i, "served" if kind == "adds" else "gone", result["ms"],
                      len(during), result["neighbour_failed"], result["neighbour_max_ms"],
                      result["neighbour_quiet_max_ms"]), file=sys.stderr, flush=True)
    finally:
        neighbour.stop.set()
        neighbour.join(timeout=60)
    return results


class Roost:
    name = "roost"

    def __init__(self, work, sites):
        self.app = install_app(work, "hello.py")
        self.registry = os.path.join(work, "registry.db")
        register(self.registry, self.app, sites, idle_timeout="60s")
        port = free_port()
        self.process = serve(self.registry, port, work, "live-change")
        wait_port(port)
        visit(port, "s0.bench")
        self.neighbour = (port, "s0.bench")

    def add(self, i):
        subprocess.run([ROOST, "--registry", "sqlite:" + self.registry, "site", "add",
                        "s%d" % i, "--host", "s%d.bench" % i, "--entry", self.app,
                        "--user", "nobody"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return self.neighbour[0], "s%d.bench" % i

    def remove(self, i):
        subprocess.run([ROOST, "--registry", "sqlite:" + self.registry, "site", "rm",
                        "s%d" % i], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return self.neighbour[0], "s%d.bench" % i

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


# Apache's first virtual host answers the names no other has: here, with a 404.
CATCH_ALL = """<VirtualHost 127.0.0.1:{port}>
  ServerName catch-all.invalid
  DocumentRoot {empty}
</VirtualHost>
"""


class ModWsgi:
    name = "mod_wsgi"

    def __init__(self, work, sites):
        self.work = work
        self.port = free_port()
        empty = os.path.join(work, "empty")
        os.makedirs(empty)
        self.catch_all = CATCH_ALL.format(port=self.port, empty=empty)
        self.sites = {i: self.site(i) for i in range(sites)}
        self.conf = os.path.join(work, "apache.conf")
        self.write()
        self.process = subprocess.Popen(["/usr/sbin/apache2", "-f", self.conf, "-DFOREGROUND"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        for i in range(sites):
            visit(self.port, "s%d.bench" % i)
        self.neighbour = (self.port, "s0.bench")

    def site(self, i):
        path = site_folder(self.work, "hello", i)
        return APACHE_SITE.format(port=self.port, i=i, app=path, dir=os.path.dirname(path))

    def write(self):
        body = self.catch_all + "".join(self.sites.values())
        with open(self.conf, "w") as f:
            f.write(apache_conf(self.work, self.port, ["mpm_event", "authz_core", "wsgi"],
                                body))

    def add(self, i):
        self.sites[i] = self.site(i)
        return self.reload(i)

    def remove(self, i):
        del self.sites[i]
        return self.reload(i)

    def reload(self, i):
        self.write()
        self.process.send_signal(signal.SIGUSR1)  # apachectl graceful
        return self.port, "s%d.bench" % i

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


class Uwsgi:
    name = "uWSGI"

    def __init__(self, work, sites):
        self.work = work
        self.vassals = os.path.join(work, "vassals")
        os.makedirs(self.vassals)
        ports = [self.vassal(i) for i in range(sites)]
        self.process = subprocess.Popen(["uwsgi", "--emperor", self.vassals, "--die-on-term",
                                         "--disable-logging"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i, port in enumerate(ports):
            visit(port, "s%d.bench" % i)
        self.neighbour = (ports[0], "s0.bench")
        self.ports = dict(enumerate(ports))

    def vassal(self, i):
        """Writes site i's vassal file whole (a rename), returns its port."""
        port = free_port()
        path = site_folder(self.work, "hello", i)
        ini = os.path.join(self.vassals, "s%d.ini" % i)
        with open(ini + ".tmp", "w") as f:
            f.write(VASSAL.format(port=port, app=path))
        os.rename(ini + ".tmp", ini)
        return port

    def add(self, i):
        self.ports[i] = self.vassal(i)
        return self.ports[i], "s%d.bench" % i

    def remove(self, i):
        os.unlink(os.path.join(self.vassals, "s%d.ini" % i))
        return self.ports.pop(i), "s%d.bench" % i

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


SERVERS = {"roost": Roost, "mod_wsgi": ModWsgi, "uwsgi": Uwsgi}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=3.0,
                        help="seconds between adds (the neighbour's quiet time)")
    parser.add_argument("--only", choices=sorted(SERVERS), action="append")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    require_build()
    rows = []
    for key in args.only or ["roost", "mod_wsgi", "uwsgi"]:
        work = workspace()
        print("%s: %d sites" % (key, args.sites), file=sys.stderr, flush=True)
        server = SERVERS[key](work, args.sites)
        try:
            row = run_changes(server, args.sites, args.rounds, args.pause)
        finally:
            server.stop()
        row.update(server=server.name, sites=args.sites)
        for kind in ("adds", "removes"):
            done = row[kind]
            row[kind + "_ms_median"] = statistics.median(c["ms"] for c in done)
            row[kind + "_neighbour_failed"] = sum(c["neighbour_failed"] for c in done)
            for field in ("neighbour_max_ms", "neighbour_quiet_max_ms"):
                row["%s_%s_median" % (kind, field)] = statistics.median(c[field] for c in done)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| server (%d sites) | change | the site served / gone after (median) | "
          "neighbour's failed requests | neighbour's slowest during / before (median) |"
          % args.sites)
    print("|---|---|---|---|---|")
    for r in rows:
        for kind, name in (("adds", "add"), ("removes", "remove")):
            print("| %s | %s | %.1f ms | %d | %.1f / %.1f ms |" % (
                r["server"], name, r[kind + "_ms_median"], r[kind + "_neighbour_failed"],
                r[kind + "_neighbour_max_ms_median"],
                r[kind + "_neighbour_quiet_max_ms_median"]))


if __name__ == "__main__":
    main()
