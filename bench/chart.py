#!/usr/bin/env python3
"""PNG charts from the benchmarks' --json output (matplotlib: bench/install_peers.sh).

  python3 bench/throughput.py --json > tp.json && python3 bench/chart.py throughput tp.json tp.png
  python3 bench/cold_start.py --json > cs.json && python3 bench/chart.py cold_start cs.json cs.png
  python3 bench/front_overhead.py --json > fo.json
  python3 bench/chart.py front_overhead fo.json fo.png
  python3 bench/density.py --json > d.json && python3 bench/density_peers.py --json > dp.json
  python3 bench/chart.py density d.json dp.json density.png
  python3 bench/slow_clients.py --json > sc.json && python3 bench/chart.py slow_clients sc.json sc.png
  python3 bench/live_change.py --json > lc.json && python3 bench/chart.py live_change lc.json lc.png

throughput: requests per second per server (median, whiskers from the slowest to the
fastest run) beside the canary's p50 and p99. cold_start: p50 per mode and app, whiskers
from p10 to p90. front_overhead: mean round trip direct and through the front (median,
whiskers over the runs). density: PSS per site, live and idle, roost beside the peers
(whose processes never go idle). slow_clients: per attack, the share of the probe's
requests each server answered within 5 s, and their median latency. live_change: per
server, how long a site added took to answer and a site removed to be gone (median,
whiskers over the changes), and a neighbour's slowest request during them beside its
slowest just before.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bars(ax, labels, values, low, high, ylabel, title):
    """Bars with whiskers from `low` to `high`, each bar labelled with its value."""
    err = [[v - lo for v, lo in zip(values, low)], [hi - v for v, hi in zip(values, high)]]
    pos = range(len(labels))
    ax.bar(pos, values, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(list(pos))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for x, v in zip(pos, values):
        ax.annotate("{:,.0f}".format(v) if v >= 100 else "%.3g" % v, (x, v), ha="center",
                    va="bottom", fontsize=7)


def throughput(report, out):
    """One row of two charts per app ({app: {server: figures}})."""
    fig, axes = plt.subplots(len(report), 2, figsize=(13, 5 * len(report)), squeeze=False)
    for (left, right), (app, servers) in zip(axes, report.items()):
        names = list(servers)
        runs = [servers[n]["req_per_s_runs"] for n in names]
        bars(left, names, [servers[n]["req_per_s_median"] for n in names],
             [min(r) for r in runs], [max(r) for r in runs], "requests/s",
             "%s: throughput, wrk -c50 (median; whiskers: slowest to fastest run)" % app)
        p50 = [servers[n]["canary_p50_ms"] for n in names]
        p99 = [servers[n]["canary_p99_ms"] for n in names]
        bars(right, names, p50, p50, p99, "ms",
             "%s: canary latency during the load (p50; whisker up to p99)" % app)
        right.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def cold_start(report, out):
    rows = [(mode, app, s["cold"]) for mode, apps in report.items() for app, s in apps.items()]
    apps = sorted({app for _, app, _ in rows})
    fig, axes = plt.subplots(1, len(apps), figsize=(6 * len(apps), 5), squeeze=False)
    for ax, app in zip(axes[0], apps):
        mine = [(mode, s) for mode, a, s in rows if a == app]
        bars(ax, [m for m, _ in mine], [s["p50"] for _, s in mine], [s["p10"] for _, s in mine],
             [s["p90"] for _, s in mine], "ms", "cold start, %s app (p50; whiskers p10-p90)" % app)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def front_overhead(report, out):
    fig, ax = plt.subplots(figsize=(6, 5))
    runs = [report["direct_us"], report["front_us"]]
    bars(ax, ["directly on the worker's socket", "through roost's front"],
         [report["direct_median_us"], report["front_median_us"]], [min(r) for r in runs],
         [max(r) for r in runs], "µs per request",
         "one request at a time (median; whiskers: every run)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def density(roost, peers, out):
    """roost: bench/density.py --json; peers: bench/density_peers.py --json."""
    sites = roost["hello"]["live"]["workers"] or 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, app in zip(axes, ("hello", "flask")):
        labels = ["roost, live", "roost, idle"]
        values = [roost[app][phase]["workers_pss_kib"] / 1024 / sites for phase in ("live", "idle")]
        if app + "-ksm" in roost:
            labels.append("roost --ksm, live")
            values.append(roost[app + "-ksm"]["live"]["workers_pss_kib"] / 1024 / sites)
        for peer in ("mod_wsgi", "uwsgi", "uwsgi-ksm"):
            r = peers.get("%s %s" % (peer, app))
            if r:
                labels.append("%s (never idle)" % peer.replace("-ksm", " ksm"))
                values.append(r["sites_pss_kib"] / 1024 / sites)
        bars(ax, labels, values, values, values, "MiB (PSS) per site",
             "%s app: memory per site, %d sites" % (app, sites))
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def slow_clients(report, out):
    """{server: {attack: {probes, answered, p50_ms}}}: bars grouped by attack."""
    servers = list(report)
    attacks = list(report[servers[0]])
    width = 0.8 / len(servers)
    fig, (share, latency) = plt.subplots(2, 1, figsize=(13, 9))
    for k, server in enumerate(servers):
        pos = [a + (k - (len(servers) - 1) / 2) * width for a in range(len(attacks))]
        runs = [report[server][attack] for attack in attacks]
        answered = [100.0 * r["answered"] / max(r["probes"], 1) for r in runs]
        share.bar(pos, answered, width, label=server)
        for x, y, r in zip(pos, answered, runs):
            share.annotate("%d/%d" % (r["answered"], r["probes"]), (x, y), ha="center",
                           va="bottom", fontsize=6, rotation=90)
        # A server that answered no probe has no latency to show: no bar.
        latency.bar(pos, [r["p50_ms"] or float("nan") for r in runs], width, label=server)
    for ax in (share, latency):
        ax.set_xticks(list(range(len(attacks))))
        ax.set_xticklabels(attacks)
    share.set_ylabel("% of probes answered within 5 s")
    share.set_ylim(0, 125)
    share.set_title("an ordinary request every 0.5 s during each attack: answered", fontsize=10)
    share.legend(fontsize=7, ncol=3, loc="upper right")
    latency.set_ylabel("ms (p50 of those answered)")
    latency.set_yscale("log")
    latency.set_title("their median latency (no bar: none answered)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def live_change(report, out):
    """[{server, adds: [{ms, ...}], removes: [...], <kind>_ms_median,
    <kind>_neighbour_max_ms_median, <kind>_neighbour_quiet_max_ms_median}]."""
    labels = [r["server"] for r in report]
    fig, (changed, neighbour) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.4
    for k, (kind, name) in enumerate((("adds", "a site added: served"),
                                      ("removes", "a site removed: gone"))):
        pos = [x + (k - 0.5) * width for x in range(len(report))]
        medians = [r[kind + "_ms_median"] for r in report]
        spread = [[m - min(c["ms"] for c in r[kind]) for m, r in zip(medians, report)],
                  [max(c["ms"] for c in r[kind]) - m for m, r in zip(medians, report)]]
        changed.bar(pos, medians, width, yerr=spread, capsize=4, label=name)
        for x, v in zip(pos, medians):
            changed.annotate("{:,.0f}".format(v), (x, v), ha="center", va="bottom", fontsize=7)
    neighbour_bars = (("adds_neighbour_quiet_max_ms_median", "the second before an add"),
                      ("adds_neighbour_max_ms_median", "during an add"),
                      ("removes_neighbour_max_ms_median", "during a removal"))
    width = 0.8 / len(neighbour_bars)
    for k, (field, name) in enumerate(neighbour_bars):
        pos = [x + (k - (len(neighbour_bars) - 1) / 2) * width for x in range(len(report))]
        neighbour.bar(pos, [r[field] for r in report], width, label=name)
    for ax in (changed, neighbour):
        ax.set_xticks(list(range(len(report))))
        ax.set_xticklabels(labels)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    changed.set_ylabel("ms after the command (log, median)")
    changed.set_title("the change takes effect after", fontsize=10)
    neighbour.set_ylabel("ms (log, median over the changes)")
    neighbour.set_title("a neighbour under load: its slowest request", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv):
    kinds = {"throughput": throughput, "cold_start": cold_start,
             "front_overhead": front_overhead, "density": density,
             "slow_clients": slow_clients, "live_change": live_change}
    if len(argv) < 4 or argv[1] not in kinds:
        sys.exit(__doc__)
    reports = []
    for path in argv[2:-1]:
        with open(path) as f:
            reports.append(json.load(f))
    kinds[argv[1]](*reports, argv[-1])
    print("wrote", argv[-1])


if __name__ == "__main__":
    main(sys.argv)
