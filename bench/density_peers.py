#!/usr/bin/env python3
"""Density of the peers, the other half of bench/density.py: 50 sites, each visited
once, as the peers host them (one resident process per site, held forever):

  mod_wsgi  Apache 2.4 (event MPM), one `WSGIDaemonProcess processes=1 threads=1` per
            site, a virtual host per site
  uWSGI     an Emperor with one vassal per site (`processes = 1`, no master), each on
            its own HTTP socket

With `--ksm PAGES`, uWSGI is measured again with its own `ksm` option (each vassal
registers its memory with the kernel's same-page merging after every request) while
ksmd scans PAGES pages per 20 ms, after ksmd's third full pass over the marked memory: the peer that can
merge, beside `bench/density.py --ksm`.

PSS (from /proc/<pid>/smaps_rollup) of the per-site processes (mod_wsgi's daemons,
uWSGI's vassals), and of the server's own processes (Apache's, the Emperor). Sites run
as nobody. Flask rows use the same Flask app as roost's (bench/apps/flask_app.py).

  bench/install_peers.sh && python3 bench/density_peers.py [--sites 50] [--ksm 1000] [--json]
"""
import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ROOT, Ksmd, apache_conf, free_port, pss_kib, require_root, wait_port, workspace)

APPS = {"hello": "hello.py", "flask": "flask_app.py"}
APACHE_SITE = """<VirtualHost 127.0.0.1:{port}>
  ServerName s{i}.bench
  WSGIDaemonProcess s{i} processes=1 threads=1 user=nobody group=nogroup display-name=roost-bench-wsgi-s{i}
  WSGIProcessGroup s{i}
  WSGIApplicationGroup %{{GLOBAL}}
  WSGIScriptAlias / {app}
  <Directory {dir}>
    Require all granted
  </Directory>
</VirtualHost>
"""
VASSAL = """[uwsgi]
plugins = python3,http
http-socket = 127.0.0.1:{port}
wsgi-file = {app}
processes = 1
uid = nobody
gid = nogroup
disable-logging = true
"""


def get(port, host):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/", headers={"Host": host})
    r = conn.getresponse()
    r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError("%s:%d answered %d" % (host, port, r.status))


def visit(port, host, limit=60.0):
    """One 200 from the site, retrying while its process is still starting."""
    deadline = time.time() + limit
    while True:
        try:
            return get(port, host)
        except (OSError, RuntimeError):
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def descendants(root):
    """Every process below `root`, from /proc/<pid>/stat."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    stat = f.read()
            except OSError:
                continue
            parent[int(name)] = int(stat[stat.rfind(")") + 2:].split()[1])
    found, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def comm(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def site_folder(work, app, i):
    d = os.path.join(work, "sites", "s%d" % i)
    os.makedirs(d, exist_ok=True)
    os.chmod(os.path.dirname(d), 0o755)
    os.chmod(d, 0o755)
    return shutil.copy(os.path.join(ROOT, "bench", "apps", APPS[app]), d)


def mod_wsgi(work, app, sites):
    port = free_port()
    body = ""
    for i in range(sites):
        path = site_folder(work, app, i)
        body += APACHE_SITE.format(port=port, i=i, app=path, dir=os.path.dirname(path))
    conf = apache_conf(work, port, ["mpm_event", "authz_core", "wsgi"], body)
    conf_path = os.path.join(work, "apache.conf")
    with open(conf_path, "w") as f:
        f.write(conf)
    server = subprocess.Popen(["/usr/sbin/apache2", "-f", conf_path, "-DFOREGROUND"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        for i in range(sites):
            visit(port, "s%d.bench" % i)
        time.sleep(1)
        procs = descendants(server.pid)
        daemons = [p for p in procs if "roost-bench-wsgi-" in comm(p)]
        own = [server.pid] + [p for p in procs if p not in daemons]
        return {"site_processes": len(daemons),
                "sites_pss_kib": sum(pss_kib(p) for p in daemons),
                "server_pss_kib": sum(pss_kib(p) for p in own)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def uwsgi(work, app, sites, ksm=None):
    vassals = os.path.join(work, "vassals")
    os.makedirs(vassals)
    ports = []
    for i in range(sites):
        path = site_folder(work, app, i)
        port = free_port()
        ports.append(port)
        with open(os.path.join(vassals, "s%d.ini" % i), "w") as f:
            f.write(VASSAL.format(port=port, app=path) + ("ksm = 1\n" if ksm else ""))
    server = subprocess.Popen(["uwsgi", "--emperor", vassals, "--die-on-term",
                               "--disable-logging"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for i, port in enumerate(ports):
            visit(port, "s%d.bench" % i)
        time.sleep(1)
        vassal_pids = descendants(server.pid)
        took = ksm.settle() if ksm else None
        return {"site_processes": len(vassal_pids), "settle_s": took,
                "sites_pss_kib": sum(pss_kib(p) for p in vassal_pids),
                "server_pss_kib": pss_kib(server.pid)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def uwsgi_merged(work, app, sites, pages):
    with Ksmd(pages) as ksm:
        return uwsgi(work, app, sites, ksm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--ksm", type=int, metavar="PAGES",
                        help="measure uWSGI again with its ksm option, ksmd scanning PAGES pages per 20 ms")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    require_root()
    report = {}
    peers = [("mod_wsgi", mod_wsgi), ("uwsgi", uwsgi)]
    if args.ksm:
        peers.append(("uwsgi-ksm", lambda work, app, sites: uwsgi_merged(work, app, sites, args.ksm)))
    for peer, measure in peers:
        for app in APPS:
            print("measuring %s, %s ..." % (peer, app), file=sys.stderr, flush=True)
            work = workspace()
            try:
                report["%s %s" % (peer, app)] = measure(work, app, args.sites)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, r in report.items():
        print("%-15s %3d site processes  PSS %7.1f MiB (%.2f MiB/site)  server %6.1f MiB"
              % (name, r["site_processes"], r["sites_pss_kib"] / 1024,
                 r["sites_pss_kib"] / 1024 / args.sites, r["server_pss_kib"] / 1024))


if __name__ == "__main__":
    main()
