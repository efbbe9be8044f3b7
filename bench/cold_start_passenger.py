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
    cold_starts, free_port, pids_with_cwd, print_cold_start_header, print_cold_starts,
    require_root, timed_get, wait_port, workspace)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = """ServerName localhost
ServerRoot {work}
Listen 127.0.0.1:{port}
PidFile {work}/apache.pid
ErrorLog {work}/error.log
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule passenger_module /usr/lib/apache2/modules/mod_passenger.so
User nobody
Group nogroup
PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini
PassengerDefaultRuby /usr/bin/ruby
PassengerPython /usr/bin/python3
PassengerPoolIdleTime 1
PassengerMinInstances 0
PassengerMaxPoolSize 4
PassengerDefaultUser nobody
PassengerDefaultGroup nogroup
# This machine reaches no network: no phoning home.
PassengerDisableSecurityUpdateCheck on
PassengerDisableAnonymousTelemetry on
"""
VHOST = """<VirtualHost 127.0.0.1:{port}>
  ServerName {name}.bench
  DocumentRoot {app}/public
  PassengerAppRoot {app}
  PassengerAppType wsgi
  PassengerStartupFile passenger_wsgi.py
  <Directory {app}/public>
    Require all granted
  </Directory>
</VirtualHost>
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    require_root()
    work = workspace()
    port = free_port()
    conf = HEAD.format(work=work, port=port)
    apps = {}
    for name, source in (("hello", "hello.py"), ("flask", "flask_app.py")):
        app = os.path.join(work, name)
        os.makedirs(os.path.join(app, "public"))
        for d in (app, os.path.join(app, "public")):
            os.chmod(d, 0o755)
        shutil.copy(os.path.join(ROOT, "bench", "apps", source), os.path.join(app, source))
        with open(os.path.join(app, "passenger_wsgi.py"), "w") as f:
            f.write("import sys\nsys.path.insert(0, %r)\nfrom %s import application\n"
                    % (app, source[:-3]))
        conf += VHOST.format(port=port, name=name, app=app)
        apps[name] = app
    with open(os.path.join(work, "apache.conf"), "w") as f:
        f.write(conf)
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
