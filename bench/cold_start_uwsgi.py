#!/usr/bin/env python3
"""Cold start of uWSGI's Emperor with on-demand vassals (socket activation, `idle` and
`die-on-idle`), behind its HTTP router: the peer of bench/cold_start.py, measured the
same way (wait until the vassal exited, then time one request on a fresh connection).

  apt-get install -y uwsgi uwsgi-plugin-python3 python3-flask
  python3 bench/cold_start_uwsgi.py [--runs 30]          # as root; vassals run as nobody
"""
import argparse
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    cold_starts, free_port, install_app, print_cold_start_header, print_cold_starts,
    require_root, timed_get, wait_port, workspace)

VASSAL = """[uwsgi]
plugins = python3
wsgi-file = {app}
processes = 1
idle = 1
die-on-idle = true
uid = nobody
gid = nogroup
disable-logging = true
"""


def vassal_running(ini):
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/cmdline" % name, "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if ini.encode() in args and b"--emperor" not in args:
                return True
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    require_root()
    work = workspace()
    vassals, sockets = os.path.join(work, "vassals"), os.path.join(work, "sockets")
    os.makedirs(vassals)
    os.makedirs(sockets)
    os.chmod(sockets, 0o777)
    apps = {"hello": install_app(work, "hello.py"), "flask": install_app(work, "flask_app.py")}
    for name, app in apps.items():
        with open(os.path.join(vassals, name + ".ini"), "w") as f:
            f.write(VASSAL.format(app=app))
    procs = [subprocess.Popen(["uwsgi", "--emperor", vassals, "--emperor-on-demand-directory",
                               sockets, "--emperor-throttle", "1", "--die-on-term"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    ports = {}
    try:
        deadline = time.time() + 20
        while not all(os.path.exists(os.path.join(sockets, n + ".socket")) for n in apps):
            if time.time() > deadline:
                sys.exit("the Emperor made no on-demand sockets")
            time.sleep(0.05)
        for name in apps:
            ports[name] = free_port()
            procs.append(subprocess.Popen(
                ["uwsgi", "--master", "--plugins", "http", "--http", "127.0.0.1:%d" % ports[name],
                 "--http-to", os.path.join(sockets, name + ".socket"), "--die-on-term"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, name + "-router.log"), "w")))
            try:
                wait_port(ports[name])
            except OSError:
                sys.exit(open(os.path.join(work, name + "-router.log")).read()[-2000:])
        print_cold_start_header()
        for name in apps:
            ini, port = name + ".ini", ports[name]
            # The Emperor needs a moment to put the vassal back in on-demand mode; a
            # request in that window waits about 800 ms. A long-idle site is past it.
            times = cold_starts(args.runs, lambda: vassal_running(ini),
                                lambda: timed_get(port), settle=2.0)
            print_cold_starts(name, times)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
