"""roost: the app a zygote and its spare children practise on before any order comes
(loader.py, warm_up), so that a new worker's first load and request do not pay the
copy-on-write page faults, nor a framework's lazy set-up. Written by the node next to
the loader.

Where the runtime preloaded Flask, the practice app is a Flask app: what a Flask site's
first request does once per process (imports Flask defers, compiling its URL rules'
builders) then happens in the zygote, shared by every worker, and its pages are warm in
each spare. The zygote runs only the runtime's own, trusted packages: never a site's.
"""
import sys


def plain(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


def flask_app(flask):
    app = flask.Flask("_roost_warm_up")

    @app.route("/")
    def index():
        return "ok\n"

    return app


# What the practice ran on, for the zygote's READY message and the node's log.
KIND = "flask" if "flask" in sys.modules else "plain"
application = flask_app(sys.modules["flask"]) if KIND == "flask" else plain
