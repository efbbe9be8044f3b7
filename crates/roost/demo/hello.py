"""roost demo: the smallest WSGI application."""
import os


def application(environ, start_response):
    body = ("Hello from roost!\nsite: hello   worker pid: %d   path: %s\n"
            % (os.getpid(), environ["PATH_INFO"])).encode("utf-8")
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
