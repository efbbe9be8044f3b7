"""roost loader: runs one site's WSGI application inside its own interpreter.

The node starts this file (embedded in the roost binary) with the site's python, with
one connected Unix stream socket per slot on file descriptors 3, 4, ..., then (for a
worker of one slot) its inbox pipe, and a pipe to the site's error log as stdout and
stderr.
Each slot serves one request at a time over the frame protocol of docs/protocol.md; a
slot's inbox may hold the requests that follow the one it is busy with. Standard
library only; must run on any python3 >= 3.8.

Usage: loader.py worker SLOTS (file PATH | module MODULE:CALLABLE) DIRECTORY
       loader.py template 1 (file PATH | module MODULE:CALLABLE) DIRECTORY  (python >= 3.9)
       loader.py zygote [MODULE,MODULE,... [SPARES [shared|private[:PROC_OPTIONS]
                                                  [LANDLOCK_SCOPES]]]]
                                                  (python >= 3.9; docs/protocol.md)

A template imports the app once, then forks the site's workers on the node's orders
over a SOCK_SEQPACKET control socket on fd 3 (the zygote's messages).
"""

import math
import os
import struct
import sys
import time

FRAME = struct.Struct(">BI")
HEADER_LEN = FRAME.size
PROTOCOL_VERSION = 3
INBOX_TAG_LEN = 8  # after each request in an inbox (docs/protocol.md, "Inbox")

# node -> worker
REQUEST_HEAD, REQUEST_BODY, REQUEST_END, REQUEST_ABORT = 0x01, 0x02, 0x03, 0x04
# worker -> node
READY, RESPONSE_HEAD, RESPONSE_BODY, RESPONSE_END, FATAL, RESPONSE_ABORT = (
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15)

# The limits of roost-wire (frame.rs, response.rs): the node kills a worker past them.
MAX_CHUNK = 1 << 20
MAX_REQUEST_HEAD = 1 << 20
MAX_RESPONSE_HEAD = 64 << 10
MAX_RESPONSE_HEADERS = 256
MAX_FATAL = 64 << 10
FIRST_SLOT_FD = 3
# Bytes asked of the kernel by one read of a slot: a usual request (head and end
# frames) arrives whole in one.
RECV_SIZE = 65536

END_FRAME = FRAME.pack(RESPONSE_END, 0)
REQUEST_END_FRAME = FRAME.pack(REQUEST_END, 0)
ABORT_FRAME = FRAME.pack(RESPONSE_ABORT, 0)
ERROR_BODY = b"Internal Server Error\n"


def log(message):
    """One line in the site's error log, in the style of Apache's."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    sys.stderr.write("[%s] [roost-loader] [pid %d] %s\n" % (stamp, os.getpid(), message))
    sys.stderr.flush()


class ProtocolError(Exception):
    """The node sent something this loader does not understand: the slot is closed."""


class ClientAbort(OSError):
    """The request body will never be complete (the client went away)."""


def frame(kind, payload=b""):
    return FRAME.pack(kind, len(payload)) + payload


def body_frames(data):
    """RESPONSE_BODY frames for data of any size."""
    if len(data) <= MAX_CHUNK:
        return FRAME.pack(RESPONSE_BODY, len(data)) + data
    view = memoryview(data)
    return b"".join(
        FRAME.pack(RESPONSE_BODY, len(view[i:i + MAX_CHUNK])) + view[i:i + MAX_CHUNK]
        for i in range(0, len(data), MAX_CHUNK))


def head_text(status, headers):
    """The RESPONSE_HEAD payload, before its encoding: status, then names and values."""
    fields = [status]
    for name, value in headers:
        fields.append(name)
        fields.append(value)
    return "\0".join(fields)


ERROR_HEAD = head_text("500 Internal Server Error", [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Content-Length", str(len(ERROR_BODY)))]).encode("latin-1")
ERROR_RESPONSE = frame(RESPONSE_HEAD, ERROR_HEAD) + body_frames(ERROR_BODY) + END_FRAME


class Input(object):
    """wsgi.input: the request body, read frame by frame from the slot as the app asks.

    Memory stays bounded by one frame (1 MiB) whatever the body's size.
    """

    __slots__ = ("_reader", "_buf", "_pos", "done", "aborted")

    def __init__(self, reader):
        self._reader = reader
        self._buf = b""
        self._pos = 0
        self.done = False
        self.aborted = False

    def _fill(self):
        """Reads the next body frame into the buffer; False at the end of the body."""
        if self.done:
            if self.aborted:
                raise ClientAbort("the request body was aborted by the client")
            return False
        kind, payload = self._reader.read_frame()
        if kind == REQUEST_BODY:
            self._buf, self._pos = payload, 0
            return True
        self.done = True
        if kind == REQUEST_END:
            return False
        if kind == REQUEST_ABORT:
            self.aborted = True
            raise ClientAbort("the request body was aborted by the client")
        raise ProtocolError("frame 0x%02x inside a request body" % kind)

    def read(self, size=-1):
        if size is None or size < 0:
            parts = [self._buf[self._pos:]]
            self._buf, self._pos = b"", 0
            while self._fill():
                parts.append(self._buf)
            self._buf = b""
            return b"".join(parts)
        parts = []
        while size > 0:
            available = len(self._buf) - self._pos
            if available == 0:
                if not self._fill():
                    break
                continue
            take = min(size, available)
            parts.append(self._buf[self._pos:self._pos + take])
            self._pos += take
            size -= take
        return b"".join(parts)

    def readline(self, size=-1):
        parts = []
        limit = size if size is not None and size >= 0 else None
        while limit is None or limit > 0:
            if self._pos >= len(self._buf):
                if not self._fill():
                    break
                continue
            end = self._buf.find(b"\n", self._pos)
            stop = len(self._buf) if end < 0 else end + 1
            if limit is not None:
                stop = min(stop, self._pos + limit)
                limit -= stop - self._pos
            parts.append(self._buf[self._pos:stop])
            self._pos = stop
            if parts[-1].endswith(b"\n"):
                break
        return b"".join(parts)

    def readlines(self, hint=None):
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    next = __next__

    def drain(self):
        """Skips what the app did not read, so the slot is clean for the next request."""
        try:
            while not self.done:
                self._fill()
        except ClientAbort:
            pass


class FileWrapper(object):
    """wsgi.file_wrapper; the loader sends regular files with os.sendfile."""

    def __init__(self, filelike, blksize=8192):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        return self

    def __next__(self):
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration

    next = __next__


class SlotReader(object):
    """The frames the node sends on one slot.

    The slot's socket is blocking, so a send is one system call. A read that would
    wait waits in poll() first: a thread blocked in a plain recv() on a Unix socket is
    woken each time the node reads what this worker sent (the kernel's write-space
    wake-up ignores the event mask), to find nothing and sleep again; poll() filters
    that wake-up out.
    """

    __slots__ = ("_sock", "_poll", "_buf", "_pos", "_inbox", "_either", "_early", "_readable")

    def __init__(self, sock, inbox=None):
        import select
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._buf = b""
        self._pos = 0
        self._inbox = inbox
        self._either = select.poll()
        self._either.register(sock, select.POLLIN)
        if inbox is not None:
            self._either.register(inbox, select.POLLIN)
        self._early = None  # a request taken from the inbox while the socket had one
        self._readable = False  # poll() just said the socket has something

    def next_request(self):
        """What to serve next: the head of a request taken from the inbox, or None to
        read the next request's frames from the slot's socket (it comes first: the
        node posts to the inbox only once the request before is written whole to the
        socket). Sleeps while neither has anything."""
        if self._early is not None:
            if self._pos < len(self._buf) or self._poll.poll(0):
                return None
            early, self._early = self._early, None
            return early
        if self._inbox is None or self._pos < len(self._buf):
            return None
        for fd, _events in self._either.poll(0) or self._either.poll():
            if fd != self._inbox:
                self._readable = True
                return None
        self._early = self._take_inbox()
        return self.next_request()

    def _take_inbox(self):
        """The head of the first request waiting in the inbox, or None. The node posts
        each request without a body (head and end frames, then its tag) as one packet
        of at most PIPE_BUF bytes (the pipe is in packet mode), and one read takes one
        whole."""
        try:
            data = os.read(self._inbox, RECV_SIZE)
        except BlockingIOError:
            return None  # the node read it back first
        if not data:
            # The node closed it (the slot closes too): stop watching it.
            self._either.unregister(self._inbox)
            self._inbox = None
            return None
        kind, length = FRAME.unpack_from(data) if len(data) >= HEADER_LEN else (None, 0)
        end = HEADER_LEN + length
        # The node's tag ends the packet; it is for the node's eyes only.
        if (kind != REQUEST_HEAD or len(data) != end + HEADER_LEN + INBOX_TAG_LEN
                or data[end:end + HEADER_LEN] != REQUEST_END_FRAME):
            raise ProtocolError("the inbox held %d bytes that are not one request without a body"
                                % len(data))
        return data[HEADER_LEN:end]

    def end_follows(self):
        """Takes a REQUEST_END already read, if it is next: a request without a body
        usually comes in one read with it, and its end needs no frame parsing then."""
        pos = self._pos
        if self._buf[pos:pos + HEADER_LEN] == REQUEST_END_FRAME:
            self._pos = pos + HEADER_LEN
            return True
        return False

    def read_frame(self):
        kind, length = FRAME.unpack(self._take(HEADER_LEN))
        limit = MAX_REQUEST_HEAD if kind == REQUEST_HEAD else MAX_CHUNK
        if length > limit:
            raise ProtocolError("frame 0x%02x of %d bytes is over the limit" % (kind, length))
        return kind, (self._take(length) if length else b"")

    def _take(self, n):
        """The next n bytes of the slot."""
        buf, pos = self._buf, self._pos
        end = pos + n
        if end > len(buf):
            buf, pos, end = self._fill(buf[pos:], n), 0, n
        self._buf, self._pos = buf, end
        return buf[pos:end]

    def _fill(self, have, n):
        """`have` and what follows on the slot, at least n bytes in all."""
        data = self._recv(max(n - len(have), RECV_SIZE))
        if not have and len(data) >= n:
            return data  # the usual case: one read brought all of it
        joined = bytearray(have)
        joined += data
        while len(joined) < n:
            joined += self._recv(max(n - len(joined), RECV_SIZE))
        return bytes(joined)

    def _recv(self, size):
        if self._readable:
            self._readable = False
        else:
            self._poll.poll()
        data = self._sock.recv(size)
        if not data:
            raise EOFError("the node closed the slot")
        return data


def check_header_text(what, text):
    if type(text) is not str:
        raise TypeError("%s must be a str, not %s" % (what, type(text).__name__))
    for bad in ("\0", "\r", "\n"):
        if bad in text:
            raise ValueError("%s %r contains a control character" % (what, text))


def check_latin1(what, text):
    """PEP 3333: a status and headers are str holding latin-1 only."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("%s %r is not latin-1, as PEP 3333 asks of response heads "
                         "(encode it: RFC 8187, or percent-encoding)" % (what, text)) from None


class Exchange(object):
    """One request on one slot: the state start_response and write() share."""

    __slots__ = ("sock", "head", "head_sent", "remaining", "head_request", "head_only",
                 "mid_frame", "ended")

    def __init__(self, sock, head_request):
        self.sock = sock
        self.head = None  # head_text() of the last start_response, encoded
        self.head_sent = False
        # True between a body frame's header and the end of its payload: no other
        # frame may follow until the payload is complete.
        self.mid_frame = False
        self.remaining = None  # bytes still allowed by Content-Length
        self.head_request = head_request
        # The response is over: its start_response and write() must not touch the
        # slot, which may carry another request's response by then.
        self.ended = False
        # No body goes out: a HEAD's, a 204's or a 304's (their Content-Length, if
        # any, describes no body that is sent).
        self.head_only = head_request

    def start_response(self, status, headers, exc_info=None):
        if self.ended:
            raise AssertionError("start_response of a response that has ended")
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.head is not None:
            raise AssertionError("start_response was already called without exc_info")
        check_header_text("status", status)
        if (len(status) < 4 or not status[:3].isascii() or not status[:3].isdigit()
                or status[3] != " " or not "200" <= status[:3] <= "599"):
            raise ValueError("status %r is not like '200 OK' (a code from 200 to 599)" % status)
        if type(headers) is not list:
            raise TypeError("headers must be a list, not %s" % type(headers).__name__)
        remaining = None
        for item in headers:
            if type(item) is not tuple or len(item) != 2:
                raise TypeError("each header must be a (name, value) tuple, got %r" % (item,))
            name, value = item
            if type(name) is not str or type(value) is not str:
                check_header_text("header name", name)
                check_header_text("header value", value)
            if len(name) == 14 and name.lower() == "content-length":
                # Digits only: int() would take "-1", "+5", " 5" and "5_0".
                if not (value.isascii() and value.isdigit() and len(value) <= 19) or (
                        remaining is not None and int(value) != remaining):
                    raise ValueError("Content-Length %r is not one decimal number" % value)
                remaining = int(value)
        head = head_text(status, headers)
        # One scan of the whole head for control characters; the culprit is looked
        # for only when there is one.
        if head.count("\0") != 2 * len(headers) or "\r" in head or "\n" in head:
            for name, value in headers:
                check_header_text("header name", name)
                check_header_text("header value", value)
        if len(headers) > MAX_RESPONSE_HEADERS:
            raise ValueError("%d response headers, more than the limit of %d"
                             % (len(headers), MAX_RESPONSE_HEADERS))
        try:
            head = head.encode("latin-1")
        except UnicodeEncodeError:
            for what, text in [("status", status)] + [("header", "%s: %s" % h) for h in headers]:
                check_latin1(what, text)
            raise
        if len(head) > MAX_RESPONSE_HEAD:
            raise ValueError("the response head is %d bytes, more than the limit of %d"
                             % (len(head), MAX_RESPONSE_HEAD))
        self.head = head
        self.remaining = remaining
        self.head_only = self.head_request or status[:3] in ("204", "304")
        return self.write

    def head_frame(self):
        if self.head is None:
            raise AssertionError("the application returned without calling start_response")
        self.head_sent = True
        return FRAME.pack(RESPONSE_HEAD, len(self.head)) + self.head

    def shortfall(self):
        """Bytes the declared Content-Length still wants, were the body to end now."""
        return 0 if self.head_only or self.remaining is None else self.remaining

    def check_whole(self, size):
        """Refuses a whole body of `size` bytes that is shorter than its Content-Length,
        before its head goes out: the node would refuse it too (a client would read
        the start of the next response as the rest of this one)."""
        missing = self.shortfall()
        if missing:
            raise ValueError("the response's Content-Length is %d, but its body has %d bytes"
                             % (size + missing, size))

    def end_frame(self):
        """The frame that ends a response whose head went out: an abort when the body
        fell short of its Content-Length, so that the client sees it broken."""
        missing = self.shortfall()
        if not missing:
            return END_FRAME
        log("the application sent %d bytes fewer than its Content-Length; "
            "the response was cut off" % missing)
        return ABORT_FRAME

    def clip(self, data):
        """Enforces a declared Content-Length: no byte beyond it is sent."""
        if self.remaining is None:
            return data
        if len(data) > self.remaining:
            log("application sent more than its Content-Length of bytes; the excess was dropped")
            data = data[:self.remaining]
        self.remaining -= len(data)
        return data

    def write(self, data):
        """The write() callable of start_response (legacy, unbuffered)."""
        if self.ended:
            raise AssertionError("write() of a response that has ended")
        if type(data) is not bytes:
            raise TypeError("write() takes bytes, not %s" % type(data).__name__)
        out = b"" if self.head_sent else self.head_frame()
        data = self.clip(data)
        if data and not self.head_only:
            out += body_frames(data)
        if out:
            self.sock.sendall(out)

    def send_file(self, wrapper):
        """Streams a regular file with sendfile; False if the file-like is not one, or
        the head already went out through write()."""
        if self.head_sent:
            return False
        try:
            fd = wrapper.filelike.fileno()
            offset = wrapper.filelike.tell()
            size = os.fstat(fd).st_size
        except (AttributeError, OSError, ValueError):
            return False
        import stat
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        left = max(size - offset, 0)
        if self.remaining is not None:
            left = min(left, self.remaining)
            self.remaining -= left
        self.check_whole(left)
        self.sock.sendall(self.head_frame())
        if self.head_only:
            return True
        while left > 0:
            chunk = min(left, MAX_CHUNK)
            self.sock.sendall(FRAME.pack(RESPONSE_BODY, chunk))
            self.mid_frame = True
            if self.sock.sendfile(wrapper.filelike, offset, chunk) != chunk:
                raise OSError("file %r shrank while being sent" % wrapper.filelike)
            self.mid_frame = False
            offset += chunk
            left -= chunk
        return True


class Worker(object):
    def __init__(self, app, base_environ):
        self.app = app
        self.base = base_environ

    def serve(self, sock, inbox=None):
        """Serves requests on one slot until the node closes it.

        A request may also come through the slot's inbox (docs/protocol.md, "Inbox")."""
        sock.setblocking(True)
        reader = SlotReader(sock, inbox)
        try:
            while True:
                head = reader.next_request()
                if head is not None:
                    self.handle(sock, reader, head, True)
                    continue
                try:
                    kind, payload = reader.read_frame()
                except EOFError:
                    return
                if kind != REQUEST_HEAD:
                    raise ProtocolError("expected a request head, got frame 0x%02x" % kind)
                self.handle(sock, reader, payload)
        except (ProtocolError, OSError, EOFError) as exc:
            if not isinstance(exc, (BrokenPipeError, ConnectionResetError, EOFError)):
                log("slot closed: %s" % exc)
        finally:
            sock.close()

    def handle(self, sock, reader, payload, bodiless=False):
        pairs = iter(payload.decode("latin-1").split("\0"))
        environ = dict(zip(pairs, pairs))
        environ.update(self.base)
        body = Input(reader)
        body.done = bodiless or reader.end_follows()
        environ["wsgi.input"] = body
        ex = Exchange(sock, environ["REQUEST_METHOD"] == "HEAD")
        try:
            self.run_app(ex, environ)
        finally:
            ex.ended = True
            body.drain()

    def run_app(self, ex, environ):
        result = None
        try:
            result = self.app(environ, ex.start_response)
            if type(result) is list and not ex.head_sent:
                # The common case: the whole response in one write.
                data = ex.clip(b"".join(result))
                ex.check_whole(len(data))
                head = ex.head_frame()
                if ex.head_only or not data:
                    ex.sock.sendall(head + END_FRAME)
                else:
                    ex.sock.sendall(head + body_frames(data) + END_FRAME)
                return
            if isinstance(result, FileWrapper) and ex.send_file(result):
                ex.sock.sendall(ex.end_frame())
                return
            for data in result:
                if type(data) is not bytes:
                    raise TypeError("the application yielded %s, not bytes" % type(data).__name__)
                if not data:
                    continue
                data = ex.clip(data)
                out = b"" if ex.head_sent else ex.head_frame()
                if ex.head_only:
                    ex.sock.sendall(out)
                    break
                if data:
                    out += body_frames(data)
                if ex.remaining == 0:
                    # The declared length is complete: stop iterating (PEP 3333), and
                    # the end goes with the last bytes, so a framework's one-chunk
                    # iterable (Flask's) is one write, like a list.
                    ex.sock.sendall(out + END_FRAME)
                    return
                ex.sock.sendall(out)
            if ex.head_sent:
                ex.sock.sendall(ex.end_frame())
            else:
                ex.check_whole(0)
                ex.sock.sendall(ex.head_frame() + END_FRAME)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except ClientAbort:
            if not ex.head_sent:
                ex.sock.sendall(ERROR_RESPONSE)
            else:
                ex.sock.sendall(ABORT_FRAME)
        except BaseException:
            # SystemExit and KeyboardInterrupt too: raised by the app in a request,
            # they are its errors (mod_wsgi's way), not the loader's end; in a slot's
            # thread, SystemExit would end the thread silently and take the slot.
            import traceback
            log("error in the application on %s %s:\n%s" % (
                environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                traceback.format_exc().rstrip()))
            if ex.mid_frame:
                # An abort frame now would be read as body bytes: the only honest end
                # is to close the slot (the node aborts the response, retires us).
                raise ProtocolError("the response broke off inside a body frame")
            ex.sock.sendall(ABORT_FRAME if ex.head_sent else ERROR_RESPONSE)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException:
                    import traceback
                    log("error in the application's close():\n%s" % traceback.format_exc().rstrip())


def exec_file(module_name, path, register=True):
    """The module a Python file defines, as mod_wsgi loads a WSGI script."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_app(kind, target, directory):
    # The site's folder comes first; the loader's own folder is not the site's business.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p not in (here, "")]
    sys.path.insert(0, directory)
    if kind == "file":
        module = exec_file("_roost_wsgi_app", target)
        name = "application"
    else:
        import importlib
        module_name, _, name = target.partition(":")
        module = importlib.import_module(module_name)
    app = getattr(module, name, None)
    if app is None:
        raise LookupError("%s defines no %r" % (target, name))
    if not callable(app):
        raise TypeError("%s:%s is not callable" % (target, name))
    return app


def run_worker(socks, inboxes, kind, target, directory, role="worker"):
    """Imports the app, then serves it on the slots (or, as a template, forks the
    workers that will) until the node closes them."""
    # stdout is a pipe to the error log, which Python buffers by blocks of 8 KiB: an
    # app's print() would show there only much later, or at the worker's exit.
    sys.stdout.reconfigure(line_buffering=True)
    started = time.perf_counter()
    try:
        os.chdir(directory)
        app = load_app(kind, target, directory)
    except BaseException:
        import traceback
        text = "cannot load the application %s:\n%s" % (target, traceback.format_exc().rstrip())
        log(text)
        if role == "worker":
            report = text.encode("utf-8", "replace")[-MAX_FATAL:]
            try:
                socks[0].sendall(frame(FATAL, report))
            except OSError:
                pass
        return 1
    import_micros = int((time.perf_counter() - started) * 1e6)
    if role == "template":
        return run_template(socks[0], app, import_micros)
    return serve(socks, inboxes, app, import_micros)


def slot_channels(fds, slots):
    """The slot sockets' descriptors and the inboxes' (a worker of one slot has one) among `fds`,
    which hold the sockets first."""
    if len(fds) == 2 * slots:
        return fds[:slots], fds[slots:]
    if len(fds) == slots:
        return fds, [None] * slots
    raise ValueError("expected %d slot sockets and as many inboxes, got %d descriptors"
                     % (slots, len(fds)))


def base_environ(slots):
    """The environ keys that are the same for every request of a worker."""
    return {
        "wsgi.version": (1, 0),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": slots > 1,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        "wsgi.input_terminated": True,
    }


def serve(socks, inboxes, app, import_micros):
    """Announces READY on every slot, serves until the slots close."""
    worker = Worker(app, base_environ(len(socks)))
    ready = frame(READY, struct.pack(">HIQ", PROTOCOL_VERSION, os.getpid(), import_micros))
    for sock in socks:
        sock.sendall(ready)
    if len(socks) == 1:
        worker.serve(socks[0], inboxes[0])
    else:
        import threading
        threads = [threading.Thread(target=worker.serve, args=pair, daemon=True)
                   for pair in zip(socks, inboxes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return 0


# ---------------------------------------------------------------------------------------
# Zygote mode: a warm, preloaded process (root when the node is root) that forks workers.
# It never imports or runs tenant code: each child becomes the site's user first.

ZYGOTE_CONTROL_FD = 3
# node -> zygote
Z_SPAWN, Z_RETIRE = 0x20, 0x25
# zygote -> node
Z_READY, Z_SPAWNED, Z_SPAWN_FAILED, Z_EXITED = 0x21, 0x22, 0x23, 0x24

# What a WSGI app commonly needs from the standard library; imported once, shared
# copy-on-write by every worker forked afterwards.
STDLIB_PRELOAD = (
    "base64", "binascii", "calendar", "cgi", "collections", "contextlib", "copy", "datetime",
    "decimal", "email.message", "email.parser", "email.utils", "functools", "hashlib", "hmac",
    "html", "http", "http.client", "http.cookies", "importlib.util", "inspect", "io", "json",
    "locale", "logging", "mimetypes", "pathlib", "pickle", "random", "re", "secrets", "shutil",
    "socket", "sqlite3", "string", "tempfile", "threading", "traceback", "typing",
    "urllib.parse", "uuid", "warnings", "wsgiref.headers", "wsgiref.util", "zlib",
    # What become_worker itself needs: loading a C extension in every child costs
    # milliseconds (dlopen), so the zygote loads them once.
    "ctypes", "resource", "signal", "site", "sysconfig",
)


def close_fds_except(keep):
    """Closes every descriptor above 2 not in `keep`: nothing of a fork server (its
    control socket above all) may reach the process it forked."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def pairs_encode(items):
    return "\0".join("%s\0%s" % kv for kv in items).encode("utf-8", "surrogateescape")


def pairs_decode(payload):
    parts = payload.decode("utf-8", "surrogateescape").split("\0")
    return list(zip(parts[0::2], parts[1::2]))


def preload(modules):
    import importlib
    failed = []
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:
                failed.append("%s (%s)" % (name, exc.__class__.__name__))
    return failed


_LIBC = []


def libc():
    """The C library through ctypes, opened once (in the zygote, before any fork)."""
    if not _LIBC:
        import ctypes
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


class ParentGone(Exception):
    """The zygote or template forking this worker exited before the worker was set up:
    the node's doing (it retired or lost that parent), not the app's: one line in the
    site's error log, no traceback."""


def tie_to_parent(parent_pid, parent):
    """From now on the worker dies with its parent (SIGKILL); ParentGone if the parent
    is gone already, since then the signal would never come."""
    import ctypes
    import signal as _signal
    PR_SET_PDEATHSIG = 1
    if libc().prctl(PR_SET_PDEATHSIG, int(_signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        raise ParentGone("the %s exited while it forked this worker" % parent)


MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
# What this process has made of its own: "namespaces" (mount and IPC), "proc" (its
# /proc), "landlock" (its domain). A spare makes them while it waits: they are the
# same for every site.
_OWN = set()


def libc_check(rc, what):
    if rc != 0:
        import ctypes
        errno = ctypes.get_errno()
        raise OSError(errno, "%s: %s" % (what, os.strerror(errno)))


def enter_own_namespaces(proc_options=None):
    """Still root: mount and IPC namespaces of this process's own, every mount private
    (nothing the host mounts later reaches it, and nothing mounted here the host); with
    `proc_options`, a /proc of its own that shows its user's processes only."""
    c = libc()
    if "namespaces" not in _OWN:
        CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
        libc_check(c.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
        libc_check(c.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        _OWN.add("namespaces")
    if proc_options and "proc" not in _OWN:
        libc_check(c.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                           proc_options.encode()), "mount its own /proc")
        _OWN.add("proc")


def enter_private_mounts(fields, proc_options):
    """Still root: the worker's own namespaces and /proc, with its TMPDIR on /tmp and
    /var/tmp and a tmpfs of its own on /dev/shm (the node's spawn/private_mounts.rs
    does the same for a plainly spawned worker)."""
    enter_own_namespaces(proc_options)
    c = libc()
    # The first bind is the source of the next: the TMPDIR may lie below /tmp.
    source = os.fsencode(fields["private.tmp"])
    for target in filter(None, fields["private.binds"].split(":")):
        libc_check(c.mount(source, os.fsencode(target), None, MS_BIND, None), "bind " + target)
        source = os.fsencode(target)
    shm = fields.get("private.shm")
    if shm:
        libc_check(c.mount(b"tmpfs", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV,
                           shm.encode()), "mount a tmpfs on /dev/shm")


# landlock_create_ruleset and landlock_restrict_self: one number on every architecture
# but alpha (the system call table shared since Linux 5.1).
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_RESTRICT_SELF = 444, 446


def enter_landlock_scope(scoped):
    """Still root: a Landlock domain of this process's own with these scopes (the
    node's spawn/landlock_scope.rs does the same for a plainly spawned worker): no
    abstract socket, signal or trace reaches a process outside it. A spare enters it
    while it waits: it is the same for every site (and mounts are still allowed in
    it, as it rules no file access)."""
    if "landlock" in _OWN:
        return
    import ctypes
    import struct
    # struct landlock_ruleset_attr: handled_access_fs, handled_access_net, scoped.
    attr = struct.pack("=QQQ", 0, 0, scoped)
    c = libc()
    fd = c.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)),
                   ctypes.c_uint32(0))
    if fd < 0:
        libc_check(fd, "landlock_create_ruleset")
    try:
        libc_check(c.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)),
                   "landlock_restrict_self")
        _OWN.add("landlock")
    finally:
        os.close(fd)


def name_process(name):
    """What ps and top show for a forked worker (its command line is the zygote's)."""
    try:
        import ctypes
        PR_SET_NAME = 15
        libc().prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except Exception:
        pass


class OwnSteps(object):
    """What every child of a zygote makes of its own, the same for every site (the
    zygote's arguments, docs/protocol.md): with `private` (a 1-tuple of the options of
    its own /proc, or of None), namespaces of its own; with `landlock_scopes` (the
    kernel's bit mask, 0 for none), a Landlock domain."""

    def __init__(self, private, landlock_scopes):
        self.private = private
        self.landlock_scopes = landlock_scopes

    def enter_ahead(self):
        """In a spare, while it waits: its order tries again, and fails with the
        reason."""
        if self.private:
            try:
                enter_own_namespaces(self.private[0])
            except OSError as exc:
                log("spare could not make its own namespaces: %r" % exc)
        if self.landlock_scopes:
            try:
                enter_landlock_scope(self.landlock_scopes)
            except OSError as exc:
                log("spare could not enter its Landlock domain: %r" % exc)


def become_worker(request, fds, zygote_pid, own):
    """In the forked child: the tenant steps of docs/security.md, then the app; `own`:
    the zygote's OwnSteps.

    Never returns: the process exits with the worker's status.
    """
    import resource
    step = "start"
    try:
        leave_fork_server()
        fields = dict(request)
        n_cgroup, n_slots = int(fields["cgroups"]), int(fields["slots"])
        log_fd, cgroup_fds = fds[0], fds[1:1 + n_cgroup]
        # The site's environment: never read by the zygote (docs/protocol.md).
        env_fd = fds[1 + n_cgroup]
        slot_fds, inboxes = slot_channels(fds[2 + n_cgroup:], n_slots)
        close_fds_except(set(fds))
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        step = "join the site's cgroup"
        for fd in cgroup_fds:
            os.write(fd, b"0")
            os.close(fd)
        step = "set rlimits"
        nofile = int(fields["nofile"])
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if own.private:
            step = "make /tmp, /var/tmp, /dev/shm and /proc its own"
            enter_private_mounts(fields, own.private[0])
        if own.landlock_scopes:
            step = "enter a Landlock domain of its own (abstract sockets, signals, traces)"
            enter_landlock_scope(own.landlock_scopes)
        if fields.get("sched") == "batch":
            step = "set the scheduling policy"
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        step = "setsid"
        os.setsid()
        step = "set the parent-death signal"
        tie_to_parent(zygote_pid, "zygote")
        if "uid" in fields:
            step = "drop privileges"
            uid, gid = int(fields["uid"]), int(fields["gid"])
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid, uid, gid, gid):
                raise OSError("credentials did not change as asked")
            try:
                os.setuid(0)
            except OSError:
                pass
            else:
                raise OSError("privileges could be regained")
            step = "set the parent-death signal after the drop"
            tie_to_parent(zygote_pid, "zygote")
        step = "chdir to the site's directory"
        os.chdir(fields["directory"])
        step = "set the environment"
        os.environ.clear()
        os.environ.update(pairs_decode(read_all(env_fd)))
        os.close(env_fd)
        venv = fields.get("venv")
        if venv:
            step = "activate the virtualenv"
            import site
            import sysconfig
            # Debian patches the default scheme to /usr/local; a venv has its own.
            scheme = "venv" if "venv" in sysconfig.get_scheme_names() else "posix_prefix"
            purelib = sysconfig.get_path("purelib", scheme, vars={"base": venv, "platbase": venv})
            # Layered above the runtime's packages: the site's own versions win.
            before = list(sys.path)
            site.addsitedir(purelib)
            sys.path[:] = [p for p in sys.path if p not in before] + before
            sys.prefix = sys.exec_prefix = venv
        import socket
        socks = [socket.socket(fileno=fd) for fd in slot_fds]
        name_process(b"roost-worker")
        step = "run the application"
        role = fields.get("role", "worker")
        if role not in ("worker", "template"):
            raise ValueError("unknown role %r" % role)
        code = run_worker(socks, inboxes, fields["kind"], fields["target"], fields["directory"],
                          role)
    except ParentGone as gone:
        try:
            os.write(2, ("roost: worker setup stopped: %s\n" % gone).encode())
        except OSError:
            pass
        code = 1
    except BaseException:
        import traceback
        try:
            os.write(2, ("roost: worker setup failed: cannot %s\n%s" % (
                step, traceback.format_exc())).encode("utf-8", "replace"))
        except OSError:
            pass
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def close_quietly(fds):
    """Closes the descriptors an order brought; the child has its own copies."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def report_exit(ctl, pid, status):
    """EXITED to the node; a node that is gone no longer needs it."""
    try:
        ctl.send(bytes([Z_EXITED]) + pairs_encode([("pid", pid), ("status", status)]))
    except OSError:
        pass


class Children(object):
    """A fork server's children: its loop reaps each one that exits and reports how
    (EXITED; the node watches pidfds, but only the parent knows the status).

    SIGCHLD only wakes the loop: its handler writes a byte to a pipe
    (signal.set_wakeup_fd) that the loop polls beside the control socket. A Python
    handler runs between bytecodes only, so one that reaped, as before, missed a
    SIGCHLD that came just before the loop blocked in recvmsg: the exit was reported
    with the next order, and the node took a killed start for the app failing. Reaping
    in the loop also sends every EXITED after the SPAWNED of its pid.
    """

    def __init__(self, ctl):
        import select
        import signal as _signal
        self.ctl = ctl
        self.wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The C handler that writes the byte is there only with a Python handler.
        _signal.signal(_signal.SIGCHLD, lambda signum, frame_: None)
        _signal.set_wakeup_fd(self.wake[1], warn_on_full_buffer=False)
        self.poller = select.poll()
        self.poller.register(ctl.fileno(), select.POLLIN)
        self.poller.register(self.wake[0], select.POLLIN)

    def next_order(self, timeout=None):
        """Waits until the control socket can be read (an order, or its end): True; or
        until `timeout` seconds have passed: False. Every child that exits meanwhile
        is reaped and reported."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ms = None
            if deadline is not None:
                # Rounded up: a wait rounded down to 0 ms would spin until the deadline.
                wait_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            ready = [fd for fd, _events in self.poller.poll(wait_ms)]
            if self.wake[0] in ready:
                self.reap()
            if self.ctl.fileno() in ready:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def reap(self, until_none_left=False):
        """Reports every child that has exited; `until_none_left` (a retired server),
        waits for the others to exit too. The wake-up bytes go first: an exit after
        the last waitpid writes another and wakes the loop again."""
        try:
            while os.read(self.wake[0], 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, 0 if until_none_left else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            report_exit(self.ctl, pid, status)


def leave_fork_server():
    """In a child of a fork server, first: SIGCHLD back to its default, and no wake-up
    descriptor (once the server's descriptors are closed, a signal would write into
    whatever took its number)."""
    import signal as _signal
    _signal.set_wakeup_fd(-1)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)


def send_spawned(ctl, req_id, pid):
    """SPAWNED with the child's pidfd, through which the node watches it."""
    import socket
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(ctl, [bytes([Z_SPAWNED]) + pairs_encode(
            [("id", req_id), ("pid", pid)])], [pidfd])
    finally:
        os.close(pidfd)


def send_spawn_failed(ctl, req_id, exc):
    """SPAWN_FAILED; False when the node can no longer be told."""
    try:
        ctl.send(bytes([Z_SPAWN_FAILED]) + pairs_encode(
            [("id", req_id), ("error", "%s: %s" % (exc.__class__.__name__, exc))]))
        return True
    except OSError:
        return False


# The node writes this WSGI app next to the loader for spares to practise on.
WARM_UP_APP = "warm_up.py"


def warm_up():
    """In the zygote once, then in each spare before its order: one practice load of a
    tiny app (a Flask one where Flask is preloaded: warm_up.py) and one practice request
    through the code every new worker runs first. A forked child pays a copy-on-write
    fault for each page it first writes to (reference counts); paid here, they are off
    the cold start (docs/benchmarks.md). Nothing of it stays: the module is not
    registered, the sockets are closed. Returns what it practised on ("plain",
    "flask"), or "none" without the practice app."""
    import socket
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), WARM_UP_APP)
    if not os.path.exists(path):
        return "none"
    practice = exec_file("_roost_warm_up", path, register=False)
    app = practice.application
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(REQUEST_END_FRAME)
        head = "\0".join(("REQUEST_METHOD", "GET", "PATH_INFO", "/", "QUERY_STRING", "",
                          "SERVER_PROTOCOL", "HTTP/1.1", "wsgi.url_scheme", "http"))
        Worker(app, base_environ(1)).handle(theirs, SlotReader(theirs), head.encode("latin-1"))
        # become_worker rewrites the environment: practise that too.
        os.environ["ROOST_WARM_UP"] = "1"
        del os.environ["ROOST_WARM_UP"]
    finally:
        ours.close()
        theirs.close()
    return practice.KIND


# How long the zygote waits after a spawn, for quiet, before it forks new spares.
SPARE_REFILL_DELAY = 0.05


class Spares(object):
    """Children forked ahead of need, each waiting on a private socket for its worker's
    order (the SPAWN payload and descriptors), so a spawn skips the fork itself.

    A spare has done nothing site-specific yet: it becomes a worker only when its order
    arrives, through the same become_worker steps as a freshly forked child.
    """

    def __init__(self, count, ctl, zygote_pid, own):
        self.count = count
        self.own = own
        self.ctl = ctl
        self.zygote_pid = zygote_pid
        self.ready = []  # (pid, socket to send the order on)

    def fill(self):
        import socket
        while len(self.ready) < self.count:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                # Never back into the zygote's loop, whatever happens (see zygote_main).
                try:
                    leave_fork_server()
                    name_process(b"roost-spare")
                    # Keep nothing of the zygote's while waiting: not its control
                    # socket, and not the sockets of a worker it was just handing out.
                    # Socket objects first (so nothing closes a reused number later),
                    # then the raw descriptors the zygote holds.
                    self.ctl.close()
                    ours.close()
                    for _, other in self.ready:
                        other.close()
                    close_fds_except({theirs.fileno()})
                    try:
                        warm_up()
                    except Exception as exc:
                        log("spare warm-up failed (the spare still serves): %r" % exc)
                    self.own.enter_ahead()
                    while True:
                        try:
                            msg, fds, _f, _a = socket.recv_fds(theirs, 1 << 16, 256)
                            break
                        except InterruptedError:
                            continue
                    if msg:
                        become_worker(pairs_decode(msg), fds, self.zygote_pid, self.own)
                finally:
                    os._exit(0)
            theirs.close()
            self.ready.append((pid, ours))

    def close(self):
        """Ends the spares: each reads end of file where its order would come."""
        for _, sock in self.ready:
            sock.close()
        self.ready = []

    def take(self, payload, fds):
        """Hands an order to a spare; its pid, or None when no spare could take it."""
        import socket
        while self.ready:
            pid, sock = self.ready.pop(0)
            try:
                socket.send_fds(sock, [payload], fds)
                return pid
            except OSError:
                continue  # that spare died; its exit is reported like any other
            finally:
                sock.close()
        return None


def zygote_main(preload_extra, spare_count, own):
    if sys.version_info < (3, 9):
        # socket.recv_fds, send_fds and os.pidfd_open arrived in 3.9: saying no before
        # READY makes the node spawn this interpreter's workers plainly instead.
        log("zygote mode needs python 3.9 or newer; this is %s" % sys.version.split()[0])
        return 3
    import signal as _signal
    import socket
    ctl = socket.socket(fileno=ZYGOTE_CONTROL_FD)
    started = time.perf_counter()
    failed = preload(STDLIB_PRELOAD + tuple(m for m in preload_extra if m))
    if failed:
        log("zygote could not preload: %s" % ", ".join(failed))
    libc()
    # Once here, so that what a framework sets up on its first request (and the modules
    # it imports then) is shared by every child instead of redone in each.
    try:
        practised = warm_up()
    except Exception as exc:
        practised = "failed"
        log("zygote warm-up failed (the zygote still serves): %r" % exc)
    # Move everything preloaded out of the collector's reach: a collection in a child
    # would touch (and so copy) every page the zygote shares with it.
    import gc
    gc.collect()
    gc.freeze()
    me = os.getpid()
    ctl.send(bytes([Z_READY]) + pairs_encode([
        ("pid", me), ("preload_us", int((time.perf_counter() - started) * 1e6)),
        ("python", sys.version.split()[0]), ("warm_up", practised)]))

    children = Children(ctl)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    spares = Spares(spare_count, ctl, me, own)
    spares.fill()
    # Every order is received into this one buffer, and cleared once its child has
    # it: a child starts with a copy of the zygote's memory, and what the zygote kept
    # of one site's order (its paths, its user) would be in the next site's worker,
    # freed but not cleared. Nothing else reads the order: the child decodes it.
    order = bytearray(ORDER_MAX)
    refill = False
    while True:
        if not children.next_order(SPARE_REFILL_DELAY if refill else None):
            # Quiet for a moment: refill the spares now. Forking right after a spawn
            # would take a CPU from the worker just handed out (a fork of the zygote
            # copies its page tables: about a millisecond).
            refill = False
            spares.fill()
            continue
        n, fds, truncated = receive_order(ctl, order)
        if n == 0 or order[0] == Z_RETIRE:
            # No site needs this zygote any more (or the node is gone): fork no more,
            # and exit once the workers have, so they keep their parent meanwhile.
            spares.close()
            children.reap(until_none_left=True)
            return 0
        req_id = "?"
        try:
            if order[0] != Z_SPAWN:
                raise ValueError("unknown zygote message 0x%02x" % order[0])
            req_id = order_id(order, n)
            if truncated:
                raise ValueError("an order longer than %d bytes" % ORDER_MAX)
            sys.stdout.flush()
            sys.stderr.flush()
            with memoryview(order) as view:
                pid = spares.take(view[1:n], fds)
            if pid is None:
                pid = os.fork()
            if pid == 0:
                # The child must never fall back into this loop: it would be a second
                # zygote, with root's rights, on the node's control socket.
                try:
                    become_worker(pairs_decode(bytes(order[1:n])), fds, me, own)
                finally:
                    os._exit(1)
            send_spawned(ctl, req_id, pid)
            # Refilled once the zygote has been quiet for SPARE_REFILL_DELAY.
            refill = spares.count > 0
        except Exception as exc:
            if not send_spawn_failed(ctl, req_id, exc):
                return 1
        finally:
            order[:n] = bytes(n)
            close_quietly(fds)


# The longest order a zygote takes: the node's are a few hundred bytes (the site's
# environment comes apart, in a memfd).
ORDER_MAX = 1 << 16
# Descriptors one order may bring.
ORDER_FDS_MAX = 256


def receive_order(sock, buf):
    """socket.recv_fds into `buf`, which is the message's only copy in this process:
    its length, its descriptors, and whether it was longer than `buf`."""
    import array
    import socket
    fds = array.array("i")
    n, ancdata, flags, _addr = sock.recvmsg_into(
        [buf], socket.CMSG_LEN(ORDER_FDS_MAX * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    return n, list(fds), bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))


def order_id(buf, n):
    """The `id` an order starts with (docs/protocol.md), read without the rest."""
    key_end = buf.find(b"\0", 1, n)
    value_end = buf.find(b"\0", key_end + 1, n)
    if key_end < 0 or buf[1:key_end] != b"id":
        raise ValueError("an order without its id first")
    return bytes(buf[key_end + 1:value_end if value_end >= 0 else n]).decode("ascii", "replace")


# ---------------------------------------------------------------------------------------
# Template mode: one site's app, imported once as the site user; workers fork from it.
# It speaks the zygote's messages, and is the site's own (untrusted) process.

def run_template(ctl, app, import_micros):
    if sys.version_info < (3, 9):
        log("a site template (preload) needs python 3.9 or newer; this is %s"
            % sys.version.split()[0])
        return 3
    import gc
    import socket
    name_process(b"roost-template")
    # Shared copy-on-write with every worker: keep the collector off these pages.
    gc.collect()
    gc.freeze()
    me = os.getpid()
    children = Children(ctl)
    ctl.send(bytes([Z_READY]) + pairs_encode([
        ("pid", me), ("import_us", import_micros), ("python", sys.version.split()[0])]))
    while True:
        children.next_order()
        msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 16, 256)
        if not msg or msg[0] == Z_RETIRE:
            break
        req_id = "?"
        try:
            if msg[0] != Z_SPAWN:
                raise ValueError("unknown template message 0x%02x" % msg[0])
            fields = dict(pairs_decode(msg[1:]))
            req_id = fields.get("id", "?")
            slots = int(fields["slots"])
            slot_channels(fds, slots)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = become_forked_worker(app, fds, slots, me)
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            send_spawned(ctl, req_id, pid)
        except Exception as exc:
            if not send_spawn_failed(ctl, req_id, exc):
                break
        finally:
            close_quietly(fds)
    # Retired (or the node is gone): no more forks; exit once the workers have, so the
    # ones still finishing a request keep their parent (their parent-death signal).
    children.reap(until_none_left=True)
    return 0


def become_forked_worker(app, fds, slots, template_pid):
    """In a child of the template: its own session, tied to the template, serving."""
    import socket
    try:
        leave_fork_server()
        close_fds_except(set(fds))
        os.setsid()
        tie_to_parent(template_pid, "template")
        name_process(b"roost-worker")
        slot_fds, inboxes = slot_channels(fds, slots)
        socks = [socket.socket(fileno=fd) for fd in slot_fds]
    except ParentGone as gone:
        log("worker setup stopped: %s" % gone)
        return 1
    except BaseException:
        import traceback
        log("worker setup failed after the template's fork:\n%s" % traceback.format_exc())
        return 1
    return serve(socks, inboxes, app, 0)


def main(argv):
    if len(argv) >= 2 and argv[1] == "zygote":
        preload = argv[2].split(",") if len(argv) > 2 else []
        spare_count = int(argv[3]) if len(argv) > 3 else 0
        kind, _, proc_options = (argv[4] if len(argv) > 4 else "shared").partition(":")
        private = (proc_options or None,) if kind == "private" else None
        landlock_scopes = int(argv[5]) if len(argv) > 5 else 0
        return zygote_main(preload, spare_count, OwnSteps(private, landlock_scopes))
    if len(argv) != 6 or argv[1] not in ("worker", "template") or argv[3] not in ("file", "module"):
        sys.stderr.write(__doc__)
        return 2
    role, slots, kind, target, directory = argv[1], int(argv[2]), argv[3], argv[4], argv[5]
    import socket
    socks = [socket.socket(fileno=FIRST_SLOT_FD + i) for i in range(slots)]
    # Inboxes follow the sockets, in a worker of one slot.
    inboxes = [FIRST_SLOT_FD + slots + i for i in range(slots)]
    try:
        import stat
        if role != "worker" or not stat.S_ISFIFO(os.fstat(inboxes[0]).st_mode):
            inboxes = [None] * slots
    except OSError:
        inboxes = [None] * slots
    return run_worker(socks, inboxes, kind, target, directory, role)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
