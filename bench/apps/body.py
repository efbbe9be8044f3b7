"""Benchmark app: a request body and a large response.

POST /upload        reads the whole body, answers its length
GET  /download?mib=N  streams N MiB
else                hello
"""


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/upload":
        size = len(environ["wsgi.input"].read())
        body = b"%d\n" % size
    elif path == "/download":
        mib = int(environ.get("QUERY_STRING", "").partition("mib=")[2] or "1")
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        block = b"x" * (1 << 20)
        return (block for _ in range(mib))
    else:
        body = b"hello\n"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
