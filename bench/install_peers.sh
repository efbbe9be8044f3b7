#!/usr/bin/env bash
# Installs what the benchmarks need beside roost, from Debian and PyPI only:
# wrk and hyperfine; mod_wsgi (daemon mode) and Passenger under Apache; uWSGI with its
# python3 and HTTP router plugins; Flask; gunicorn and Granian; matplotlib for the
# charts (bench/chart.py). Run as root on Debian 12.
set -euo pipefail
if [[ $EUID -ne 0 ]]; then
    echo "run as root: it installs Debian packages" >&2
    exit 1
fi
echo "== Debian packages"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    wrk hyperfine python3-flask python3-pip \
    apache2 libapache2-mod-wsgi-py3 libapache2-mod-passenger \
    uwsgi uwsgi-plugin-python3 >/dev/null
# Apache is started by the scripts with their own configuration, never as a service.
systemctl disable --now apache2 >/dev/null 2>&1 || service apache2 stop >/dev/null 2>&1 || true
echo "== PyPI packages"
PIP=(python3 -m pip install --quiet)
if python3 -m pip install --help | grep -q -- --break-system-packages; then
    PIP+=(--break-system-packages)
fi
"${PIP[@]}" gunicorn granian matplotlib
echo "== installed"
for tool in wrk hyperfine apache2 uwsgi gunicorn granian; do
    printf '%-10s %s\n' "$tool" "$(command -v "$tool" || echo MISSING)"
done
python3 -c 'import flask, matplotlib; print("flask", flask.__version__, "matplotlib", matplotlib.__version__)'
