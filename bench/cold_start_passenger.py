#!/usr/bin/env python3
"""Cold start of Phusion Passenger (Apache module, Debian's libapache2-mod-passenger),
apps shut down after 1 s idle (PassengerPoolIdleTime 1): the peer of
bench/cold_start.py, measured the same way (wait until the app's process exited, then
time one request on a fresh connection). App processes run as nobody.

  apt-get install -y apache2 libapache2-mod-passenger python3-flask
  python3 bench/cold_start_passenger.py [--runs 30]          # as root
"""
import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    ROOT, apache_conf, cold_starts, free_port, passenger_app, passenger_settings,
    pids_with_cwd, print_cold_start_header, print_cold_starts, require_root, timed_get,
    wait_port, workspace)

VHOST = """<VirtualHost 127.0.0.1:{port}>
  ServerName {name}.bench
{served}</VirtualHost>
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    require_root()
    work = workspace()
    port = free_port()
    # Idle apps stop after 1 s: a cold start from zero processes, as roost's.
    conf = passenger_settings(0, 4) + "PassengerPoolIdleTime 1\n"
    apps = {}
    for name, source in (("hello", "hello.py"), ("flask", "flask_app.py")):
        app = os.path.join(work, name)
        served = passenger_app(app, app, source[:-3])
        shutil.copy(os.path.join(ROOT, "bench", "apps", source), os.path.join(app, source))
        conf += VHOST.format(port=port, name=name, served=served)
        apps[name] = app
    with open(os.path.join(work, "apache.conf"), "w") as f:
        f.write(apache_conf(work, port, ["mpm_event", "authz_core", "passenger"], conf))
    server = subprocess.Popen(["/usr/sbin/apache2", "-f", os.path.join(work, "apache.conf"),
                               "-DFOREGROUND"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        print_cold_start_header()
        for name, app in apps.items():
            timed_get(port, name + ".bench")  # Passenger's own start-up is not the app's
            times = cold_starts(args.runs, lambda: pids_with_cwd(app),
                                lambda: timed_get(port, name + ".bench"), settle=0.5)
            print_cold_starts(name, times)
    finally:
        subprocess.run(["/usr/sbin/apache2", "-f", os.path.join(work, "apache.conf"), "-k", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
