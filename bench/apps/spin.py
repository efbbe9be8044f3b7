"""Benchmark app: /spin burns CPU for ?ms= milliseconds (default 200); / is a hello."""
import time
from urllib.parse import parse_qs


def application(environ, start_response):
    if environ["PATH_INFO"] == "/spin":
        ms = int(parse_qs(environ["QUERY_STRING"]).get("ms", ["200"])[0])
        end = time.perf_counter() + ms / 1000
        n = 0
        while time.perf_counter() < end:
            n += 1
        body = b"spun %d\n" % n
    else:
        body = b"hello\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
