"""roost demo: a large response streamed slowly, chunk by chunk (no Content-Length).

Query: ?chunks=N (default 40) of 64 KiB, one every 50 ms.
"""
import time
from urllib.parse import parse_qs

CHUNK = 64 * 1024


def application(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        chunks = max(1, min(int(query.get("chunks", ["40"])[0]), 10000))
    except ValueError:
        chunks = 40
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        for i in range(chunks):
            line = ("chunk %d of %d\n" % (i + 1, chunks)).encode("ascii")
            yield line + b"." * (CHUNK - len(line) - 1) + b"\n"
            time.sleep(0.05)
    return body()
