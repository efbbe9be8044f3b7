"""roost: the app a zygote's spare children practise on before their order comes
(loader.py, warm_up), so that a new worker's first load and request do not pay the
copy-on-write page faults. Written by the node next to the loader."""


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
