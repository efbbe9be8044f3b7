#!/usr/bin/env bash
# Installs what the benchmarks need beside roost, from Debian and PyPI only:
# wrk and hyperfine; mod_wsgi (daemon mode) and Passenger under Apache; uWSGI with its
# python3 and HTTP router plugins; Flask; gunicorn and Granian (in a virtualenv on
# Debian's python3, which sees Debian's Flask: every server runs the same interpreter
# and Flask); matplotlib for the charts (bench/chart.py). Run as root on Debian 12.
set -euo pipefail
if [[ $EUID -ne 0 ]]; then
    echo "run as root: it installs Debian packages" >&2
    exit 1
fi
echo "== Debian packages"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    wrk hyperfine python3-flask python3-pip python3-venv \
    apache2 libapache2-mod-wsgi-py3 libapache2-mod-passenger \
    uwsgi uwsgi-plugin-python3 >/dev/null
# Apache is started by the scripts with their own configuration, never as a service.
systemctl disable --now apache2 >/dev/null 2>&1 || service apache2 stop >/dev/null 2>&1 || true
echo "== PyPI packages"
PIP=(python3 -m pip install --quiet)
if python3 -m pip install --help | grep -q -- --break-system-packages; then
    PIP+=(--break-system-packages)
fi
"${PIP[@]}" matplotlib
PEERS=${ROOST_BENCH_PEERS:-/opt/roost-bench/peers}
/usr/bin/python3 -m venv --system-site-packages "$PEERS"
"$PEERS/bin/pip" install --quiet gunicorn granian
echo "== installed"
for tool in wrk hyperfine apache2 uwsgi "$PEERS/bin/gunicorn" "$PEERS/bin/granian"; do
    printf '%-10s %s\n' "${tool##*/}" "$(command -v "$tool" || echo MISSING)"
done
"$PEERS/bin/python" -c 'import sys, flask; print("peers on python", sys.version.split()[0], "flask", flask.__file__)'
python3 -c 'import matplotlib; print("matplotlib", matplotlib.__version__, "for the charts")'
