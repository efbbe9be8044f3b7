"""Benchmark app: a small Flask application (Debian's python3-flask or pip's).

/            a greeting
/sleep?s=N   answers after N seconds (keeps a worker busy)
"""
import time

from flask import Flask, request

app = Flask(__name__)


@app.route("/")
def hello():
    return "hello from flask\n"


@app.route("/sleep")
def sleep():
    time.sleep(float(request.args.get("s", "0.3")))
    return "slept\n"


application = app
