"""Benchmark app: the smallest WSGI hello."""


def application(environ, start_response):
    body = b"hello\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [body]
