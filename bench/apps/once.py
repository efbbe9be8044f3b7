"""Benchmark app of bench/faults.py: notes each request's id in the error log as it
begins the request (after reading the body of a POST), then answers with its worker's
pid. A request the node sends to another worker must be one no worker began: no id is
ever noted twice."""
import os


def application(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        text = environ["wsgi.input"].read(length).decode("latin-1")
    else:
        text = environ["QUERY_STRING"]
    ident = text.partition("id=")[2].partition("&")[0]
    # One write of one line: the node's output thread takes it whole.
    os.write(2, ("began %s\n" % ident).encode())
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
