"""roost demo: a form that echoes what was posted to it."""
import html
from urllib.parse import parse_qsl

FORM = """<!doctype html>
<title>roost echo</title>
<h1>Echo</h1>
<form method="post">
  <input name="message" placeholder="say something">
  <button>Send</button>
</form>
%s
"""


def application(environ, start_response):
    echoed = ""
    if environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        fields = parse_qsl(environ["wsgi.input"].read(length).decode("utf-8", "replace"))
        items = "".join("<li><b>%s</b>: %s</li>" % (html.escape(k), html.escape(v))
                        for k, v in fields)
        echoed = "<h2>You sent</h2><ul>%s</ul>" % (items or "<li>nothing</li>")
    body = (FORM % echoed).encode("utf-8")
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
