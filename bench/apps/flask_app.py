"""Benchmark app: a small Flask application (Debian's python3-flask or pip's)."""
from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    return "hello from flask\n"


application = app
