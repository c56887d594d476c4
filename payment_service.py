"""payment-service: a mock payment processor for an e-commerce demo stack.

It creates fake payment intents and, on request, publishes a ``payment.succeeded``
event to Kafka, for local mocking, teaching and demos.

The top of this file, down to "end of the lesson", is the whole service in its
plainest form: ``python3 payment_service.py --lesson`` serves it alone, as does this
top saved as lesson.py (``python3 lesson.py --lesson``). Below, layers fit the same
service for hostile clients, speed and operations by subclassing the lesson's classes:
every request of the full service (``python3 payment_service.py``) runs its steps.

HTTP in brief. A client opens a TCP connection and writes a request: a request
line, header fields, an empty line, then Content-Length bytes of body::

    POST /payment/v1/payments/mock-succeed HTTP/1.1
    Host: localhost:8000
    Content-Type: application/json
    Content-Length: 59

    {"order_id": 123, "amount_cents": 25998, "currency": "USD"}

The server answers a status line ("HTTP/1.1 200 OK"), header fields and a body; the
connection stays open for the next request (keep-alive). A status's first digit is its
class: 2xx done, 4xx the client's mistake, 5xx the server's trouble (503: retry later).
http.server reads the head; our handler routes it, checks the body and answers JSON.

Kafka in brief. A broker is a Kafka server; brokers keep records, each a key and a
value (bytes; JSON here), in topics split into partitions: records with one key go
to one partition, in order, each at its offset. The broker's acknowledgement (ack)
says every in-sync replica (copy) of the partition has the record: only then is the
event safe. send() buffers a record and returns a future (an object that will hold
the outcome); flush() sends the buffer and waits; the future then holds the outcome.
"""

import contextlib
import http.server
import ipaddress
import json
import os
import re
import sys
import time
from collections import namedtuple
from typing import Callable, NamedTuple

__version__ = "1.2.0"

MAX_ID = 2**63 - 1              # ids and amounts fit a signed 64-bit integer (Kafka's, Java's)
MAX_BODY_BYTES = 64 * 1024
TOPIC = "payment.events"


# -- The body's rules: each field's type, range or length, pattern and meaning ----
class Field(NamedTuple):
    """A body field's rule: an int from low to high, or a str of low to high characters
    matching pattern (whole); meaning: what it is, for people (and 422 messages)."""
    kind: type
    low: int
    high: int
    meaning: str
    pattern: re.Pattern = None
    convert: Callable = None    # applied to a valid value (str.upper: "usd" -> "USD")


PAYMENT = {
    "order_id": Field(int, 1, MAX_ID, "the order's id"),
    "amount_cents": Field(int, 1, MAX_ID, "the amount in cents"),
    "currency": Field(str, 3, 3, "a string of exactly three ASCII letters",
                      re.compile("[A-Za-z]{3}"), str.upper),
}


# -- Routes: f(server, the body's checked fields) -> a 200's JSON object, or HTTPError --
def health(server, fields):
    """Liveness: answers while the process serves, broker or not."""
    return {"status": "ok"}


def service_info(server, fields):
    """The service's name and version."""
    return {"service": "payment", "version": __version__}


def create_intent(server, payment):
    """Create a fake payment intent for an order (touches no broker)."""
    return {"payment_id": f"pay_{payment['order_id']}",
            "client_secret": f"secret_{payment['order_id']}"}


def mock_succeed(server, payment):
    """Publish payment.succeeded to Kafka; 200 once the broker acknowledged it."""
    server.publisher.publish(Event("payment.succeeded", payment["order_id"], payment))
    return {"status": "ok"}                         # publish() raised a 503 if not


class Route(NamedTuple):
    """An endpoint's contract, written once: the function that answers, the body's field
    rules (it gets the checked fields), publishes: a 503 if Kafka does not ack its event."""
    function: Callable
    body: dict = None
    publishes: bool = False


# path -> {method: Route}: the routing (404, 405 elsewhere), printed at start-up.
ROUTES = {
    "/health": {"GET": Route(health), "HEAD": Route(health)},
    "/payment/health": {"GET": Route(health), "HEAD": Route(health)},
    "/v1/_info": {"GET": Route(service_info), "HEAD": Route(service_info)},
    "/payment/v1/payments/create-intent": {"POST": Route(create_intent, PAYMENT)},
    "/payment/v1/payments/mock-succeed": {"POST": Route(mock_succeed, PAYMENT, publishes=True)},
}


def format_routes(routes):
    """The routing table as text, one 'METHOD  PATH  function' line per route."""
    width = max(map(len, routes))
    return "\n".join(f"  {method:<5} {path:<{width}}  {route.function.__name__}"
                     for path, methods in routes.items() for method, route in methods.items())


# -- Checking a body: 400 if it is not a JSON object, 422 for a bad field --------
class HTTPError(Exception):
    """An error answer: a status, a message for the client, extra headers."""

    def __init__(self, status, detail, headers=()):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, tuple(headers)


def parse_body(body, fields, decoder=json.JSONDecoder()):
    """The fields of a UTF-8 JSON object body, each checked by its Field rule; unknown
    keys are ignored. Else HTTPError: 400 if the body is not a JSON object, 422 naming
    the field and its rule."""
    try:
        obj = decoder.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, "body must be UTF-8 encoded JSON") from None
    except RecursionError:
        raise HTTPError(400, "body is nested too deeply to parse") from None
    except ValueError as exc:                   # JSONDecodeError, or a number past int()'s digits
        raise HTTPError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, "body must be a JSON object")
    checked = {}
    for name, (kind, low, high, meaning, pattern, convert) in fields.items():
        value = obj.get(name, obj)              # obj itself: the field is missing
        if value is obj:
            raise HTTPError(422, f"{name}: field required")
        if kind is int:
            if type(value) is not int:          # bool is an int subclass: excluded
                raise HTTPError(422, f"{name}: must be a JSON integer")
            if not low <= value <= high:
                raise HTTPError(422, f"{name}: must be between {low} and {high}")
        elif not (type(value) is kind and low <= len(value) <= high
                  and (pattern is None or pattern.fullmatch(value))):
            raise HTTPError(422, f"{name}: must be {meaning}")
        checked[name] = convert(value) if convert else value
    return checked


# -- Kafka: one event, sent, flushed, then this record's own acknowledgement ------
class Event(NamedTuple):
    """A Kafka record, built once for the producer and every observer: key "<id>"."""
    type: str
    id: int
    data: dict

    def record(self):
        """What producer.send() takes besides the topic: value {"type": type, **data}."""
        value = json.dumps({"type": self.type, **self.data})
        return {"key": str(self.id).encode(), "value": value.encode()}


class BrokerUnavailable(HTTPError):
    """The event was not acknowledged: 503, Retry-After; reason names why in a word."""
    def __init__(self, detail, reason, retry_after_s=1):
        super().__init__(503, detail, [("Retry-After", str(retry_after_s))])
        self.reason = reason


def make_producer(config, **settings):
    """The one KafkaProducer, every wait bounded by KAFKA_TIMEOUT_S. No idempotence: kafka-
    python's never recovers from an expired batch or a restarted broker: at-least-once."""
    from kafka import KafkaProducer             # here, not on top: it imports slowly

    timeout_ms = int(config.kafka_timeout_s * 1000)
    return KafkaProducer(bootstrap_servers=config.kafka_bootstrap, acks="all",
                         api_version=(3, 9),              # no wait to ask the broker
                         enable_idempotence=False,
                         max_block_ms=timeout_ms,         # send() waiting for metadata
                         request_timeout_ms=timeout_ms,   # a broker that stopped answering
                         delivery_timeout_ms=timeout_ms + settings.get("linger_ms", 0),
                         reconnect_backoff_max_ms=1000,   # see a broker back within 1 s
                         **settings)


class Publisher:
    """Publishes events through one producer; 200 only on the ack."""

    def __init__(self, producer, config):
        self.producer, self.timeout_s = producer, config.kafka_timeout_s

    def publish(self, event):
        """Send, flush, return this record's RecordMetadata once acknowledged; else 503."""
        deadline = time.monotonic() + self.timeout_s
        try:
            future = self.producer.send(TOPIC, **event.record())    # 1. buffer it
            self.producer.flush(timeout=remaining(deadline))        # 2. push it out now
            return future.get(timeout=remaining(deadline))          # 3. its own ack
        except sys.modules["kafka.errors"].KafkaError as exc:  # imported by the producer
            raise self.refusal(exc) from None

    def refusal(self, exc):
        """The 503 for a Kafka error: no ack in time, refused, or unreachable."""
        name, errors = type(exc).__name__, sys.modules["kafka.errors"]
        if isinstance(exc, errors.KafkaTimeoutError):
            return BrokerUnavailable(f"Kafka did not acknowledge the event within "
                                     f"{self.timeout_s:g} s ({name})", "timeout")
        if isinstance(exc, errors.BrokerResponseError):
            return BrokerUnavailable(f"the Kafka broker refused the event: {name}",
                                     "broker_refused")
        return BrokerUnavailable(f"Kafka could not be reached to deliver the event: {name}",
                                 "unreachable")


def remaining(deadline):
    """Seconds left until a time.monotonic() deadline (a little, once past)."""
    return max(deadline - time.monotonic(), 0.001)


# -- The request handler: dispatch through the routes, answer JSON ----------------
class PaymentRequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive requests dispatched through the routes."""

    protocol_version = "HTTP/1.1"       # keep the connection open between requests
    server_version, sys_version = f"payment-service/{__version__}", ""
    timeout = 120                       # close a silent connection (seconds)
    json_decoder = json.JSONDecoder()   # how bodies are decoded (the layers' is stricter)

    def do_request(self):
        """Every method: dispatch() finds the route (404, or 405 for another method)."""
        self.send_json(*self.dispatch())

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_request

    def dispatch(self):
        """Run the route for this request: (status, JSON object, extra headers)."""
        try:
            route = self.find_route()
            body = self.read_body() if self.command == "POST" else b""
            fields = parse_body(body, route.body, self.json_decoder) if route.body else None
            return 200, route.function(self.server, fields), ()
        except HTTPError as exc:
            return exc.status, {"detail": exc.detail}, exc.headers
        except (ConnectionError, TimeoutError):
            raise                                   # the client went away: no one to answer
        except Exception:
            self.log_error("unexpected error answering %r", self.requestline)
            return 500, {"detail": "internal server error"}, ()

    def find_route(self):
        """The Route for this path (query aside) and method: else 404, or 405 + Allow."""
        path = self.path.partition("?")[0]
        methods = self.server.routes.get(path)
        if methods is None:
            raise HTTPError(404, f"no route for path {path[:200]!r}")
        route = methods.get(self.command)
        if route is None:
            allow = ", ".join(methods)
            raise HTTPError(405, f"method {self.command} not allowed; use {allow}",
                            [("Allow", allow)])
        return route

    def read_body(self):
        """The POST body: 415 unless it is JSON; the connection closes unless it is read."""
        keep_open = not self.close_connection
        length = self.body_length()
        content_type = self.headers.get("content-type", "application/json")
        if content_type.partition(";")[0].strip(" \t").lower() != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        body = self.read_exactly(length)
        self.close_connection = not keep_open
        return body

    def body_length(self):
        """Content-Length: 411 without it, 400 if not a number, 413 past MAX_BODY_BYTES."""
        length = self.headers.get("content-length")
        if length is None:
            raise HTTPError(411, "Content-Length required")
        self.close_connection = True        # until it is read: its bytes are no request
        if not (length.isascii() and length.isdigit()):
            raise HTTPError(400, "Content-Length must be a non-negative integer")
        if len(length) > 7 or int(length) > MAX_BODY_BYTES:    # int() refuses 5,000 digits
            raise HTTPError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        return int(length)

    def read_exactly(self, length):
        """length bytes of body; 408 if the client stops sending before."""
        body = self.rfile.read(length) or b""
        if len(body) < length:
            raise HTTPError(408, "body not received in full")
        return body

    def send_json(self, status, payload, headers=()):
        """Send one answer with a JSON body."""
        self.send_body(status, "application/json", json.dumps(payload).encode(), headers)

    def send_body(self, status, content_type, body, headers=()):
        """Status line, header fields, then the body (none for HEAD)."""
        self.send_response(status)                  # also logs the request
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (400, 414, 501, 505, ...) as JSON, not HTML."""
        self.close_connection = True
        self.send_json(code, {"detail": message or self.responses[code][0]})


# -- Configuration: each setting named once: (name, default, parse, meaning), where
# parse(name, text) returns the value or stops start-up with one line (SystemExit) --
def number(kind, low, high):
    """A parse function for an int or float setting from low to high (not NaN)."""
    def parse(name, text):
        with contextlib.suppress(ValueError):
            if low <= kind(text) <= high:
                return kind(text)
        raise SystemExit(f"{name}={text!r} is not a{'n integer' if kind is int else ' number'} "
                         f"from {low} to {high}")
    return parse


def bootstrap_servers(name, text):
    """host:port[,host:port...], port 1-65535 ([v6]:port too)."""
    for server in text.split(","):
        host, _, port = server.strip(" ").rpartition(":")
        if not (host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535) \
                or re.search(r"[\s/@?#]", host):
            raise SystemExit(f"{name}={text!r}: {server!r} is not host:port "
                             f"(port 1-65535; several are separated by commas)")
    return text


def ip_address(name, text):
    """An IPv4 or IPv6 address (no host names: they resolve differently per host)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(text.strip("[]")))
    raise SystemExit(f"{name}={text!r} is not an IP address (0.0.0.0 or :: for every "
                     f"address, 127.0.0.1 or ::1 for this host)")


SETTINGS = [
    ("KAFKA_BOOTSTRAP", "kafka:9092", bootstrap_servers,
     "Kafka bootstrap servers, host:port[,host:port]"),
    ("HOST", "127.0.0.1", ip_address, "address to listen on (the image sets 0.0.0.0)"),
    ("PORT", "8000", number(int, 0, 65535), "port to listen on (0: any free port)"),
    ("KAFKA_TIMEOUT_S", "5", number(float, 0.1, 3600),
     "the longest mock-succeed waits for the broker; then 503"),
]


def read_config(environ, settings=SETTINGS):
    """Every setting, read once and checked: config.kafka_timeout_s for KAFKA_TIMEOUT_S."""
    config = namedtuple("Config", [setting[0].lower() for setting in settings])
    return config(*(parse(n, environ.get(n, default)) for n, default, parse, _ in settings))


def banner(config, routes, port, kafka=None):
    """The start-up lines: the routes, the address, the broker (kafka: more words on it)."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    return (f"payment-service {__version__} routes:\n{format_routes(routes)}\n"
            f"listening on http://{host}:{port} (Kafka {kafka or config.kafka_bootstrap}, "
            f"topic {TOPIC})")


def main():
    """The lesson's service: a thread per connection; Ctrl-C stops it."""
    config = read_config(os.environ)
    producer = make_producer(config)
    server = http.server.ThreadingHTTPServer((config.host, config.port), PaymentRequestHandler)
    server.routes, server.publisher = ROUTES, Publisher(producer, config)
    print(banner(config, ROUTES, server.server_port), flush=True)
    with server, contextlib.suppress(KeyboardInterrupt):   # Ctrl-C ends serve_forever()
        server.serve_forever()
    producer.close(timeout=config.kafka_timeout_s)


if __name__ == "__main__" and sys.argv[1:] == ["--lesson"]:
    main()


# ================================ end of the lesson ================================

# Everything above is the service. Below are layers that make it fit for
# hostile clients, speed and operations: they plug into the lesson by
# subclassing (the request handler, the server, the publisher) and by adding
# routes, observers and settings, and the entry point at the bottom puts them
# together. Each starts with a banner: what it adds and what promise it keeps.

import bisect
import collections
import decimal
import email.utils
import errno
import functools
import html
import importlib.util
import io
import itertools
import logging
import queue
import select
import selectors
import signal
import socket
import socketserver
import ssl
import struct
import threading

try:
    import resource                 # POSIX only
except ImportError:
    resource = None

log = logging.getLogger("payment_service")

MAX_HEAD_BYTES = 32 * 1024      # request line and header fields (docs/limits.md says why)
MAX_HEADERS = 100
SLOW_GRACE_S = 1.0              # an answer left unread for twice this closes the connection
SLOW_AFTER_S = 0.25             # at MAX_CONNECTIONS, a body or answer this old may be closed
SEND_BUFFER_BYTES = 32 * 1024   # per connection (the kernel doubles it)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


# ===========================================================================
# Layer 1. Strict HTTP: RFC 9112 parsing, a budget for the head, deadlines
# ===========================================================================
# Keeps "every answer is JSON, bad input a clear 4xx, and no client holds a
# thread or memory past a bound" (README: Endpoints; docs/limits.md). A head
# fits MAX_HEAD_BYTES and arrives within HEADER_TIMEOUT_S of its first byte; a
# body, by Content-Length or chunked, fits MAX_BODY_BYTES within BODY_TIMEOUT_S
# (no rate rule: pauses are a client's own); a trusted proxy names the client.

class DeadlineReader(io.RawIOBase):
    """The connection's input under the idle timeout and a deadline, checked
    around each read: a client sending a byte now and then never waits long."""

    def __init__(self, sock, idle_timeout_s, header_timeout_s):
        self._sock, self._idle_s, self._header_s = sock, idle_timeout_s, header_timeout_s
        self._shortened = self.evicted = False
        self.done()

    def readable(self):
        return True

    def done(self):
        """The head or body is in; the next head's deadline starts at its first byte."""
        self._deadline = self.body_since = None
        self._what, self._timeout_s = "request head", self._header_s
        if self._shortened:
            set_socket_timeouts(self._sock, self._idle_s)
            self._shortened = False

    def await_body(self, timeout_s):
        self._what, self._timeout_s, self.body_since = "body", timeout_s, time.monotonic()
        self._deadline = self.body_since + timeout_s

    def readinto(self, buffer):
        deadline = self._deadline
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._expired()
            if left < self._idle_s:
                set_socket_timeouts(self._sock, left)
                self._shortened = True
        try:
            count = self._sock.recv_into(buffer)
        except (BlockingIOError, TimeoutError):     # the kernel's or settimeout()'s timeout
            if deadline is not None and time.monotonic() >= deadline:
                raise self._expired() from None
            return None                             # idle: the file object sees no data
        if not count and self.evicted and self.body_since is not None:
            raise HTTPError(503, "closed to make room for a newcomer", [("Retry-After", "1")])
        if count and self._deadline is None:        # a head's first byte
            self._deadline = time.monotonic() + self._timeout_s
        return count

    def _expired(self):
        return HTTPError(408, f"{self._what} not received in full within {self._timeout_s:g} s")


KERNEL_SOCKET_TIMEOUTS = sys.platform.startswith("linux")   # a timeval means that only here


def set_socket_timeouts(sock, receive_s, send_s=None):
    """Make a recv (or a send, send_s) waiting longer fail: in the kernel where
    it can (SO_RCVTIMEO), since settimeout() adds a poll() before every call."""
    if not KERNEL_SOCKET_TIMEOUTS:
        return sock.settimeout(receive_s)
    for option, seconds in ((socket.SO_RCVTIMEO, receive_s), (socket.SO_SNDTIMEO, send_s)):
        if seconds is not None:
            sock.setsockopt(socket.SOL_SOCKET, option, struct.pack(
                "ll", int(seconds), int(seconds % 1 * 1_000_000)))


# A header field line (RFC 9112 5): token, colon, value; no bare CR, LF or NUL.
# Possessive quantifiers keep the match linear.
FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]++):[ \t]*+([^\r\n\x00]*+)\r?\n")
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,8})[ \t]*(?:;[^\r\n]*)?\r?\n")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")     # HTAB aside
LIST_FIELDS = frozenset({"connection", "transfer-encoding", "x-forwarded-for", "host"})
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n"
CLIENT_GONE = (ConnectionError, TimeoutError, BlockingIOError)


# json.loads takes NaN, keeps the last of duplicate keys, and reads numbers through
# int() of any length or a float; this decoder refuses the first two (400) and reads
# a whole number written 2.0 or 2e0 as that integer, and one past 19 digits as out of range.
def _refuse(name):
    raise ValueError(f"{name} is not valid JSON")


def _object_without_duplicate_keys(pairs):
    """A duplicate key is a 400: an ambiguous amount is worse than a refused one."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _parse_number(literal):
    """The int a literal equals if whole (2.0, 2e0), else a float; past 10**19, out of range."""
    if literal.isdigit() and len(literal) < 19:     # the common case, the quick way
        return int(literal)
    try:
        value = decimal.Decimal(literal)
    except decimal.InvalidOperation:            # past even Decimal's exponent range
        return float(literal)
    if value.is_zero():
        return 0
    if value.adjusted() >= len(str(MAX_ID)):    # more digits than any int64 has
        return -(MAX_ID + 1) if value < 0 else MAX_ID + 1
    return int(value) if value == value.to_integral_value() else float(literal)


STRICT_JSON = json.JSONDecoder(parse_int=_parse_number, parse_float=_parse_number,
                               parse_constant=_refuse,
                               object_pairs_hook=_object_without_duplicate_keys)


class StrictRequestHandler(PaymentRequestHandler):
    """The lesson's handler, reading requests by RFC 9112 with limits and deadlines.
    Its steps are the lesson's: each override below calls the lesson's step it extends
    (by name, as socketserver does: super() costs a thousand instructions a call), and
    the head is written through cheap send_response/send_header/end_headers."""

    json_decoder = STRICT_JSON

    def setup(self):
        # Nagle off, a small send buffer and the kernel timeouts come from the
        # listening socket (server_activate): accepted sockets inherit them on Linux.
        self.connection = self.request
        if not KERNEL_SOCKET_TIMEOUTS:
            self.connection.settimeout(self.server.idle_timeout_s)
        self.reader = DeadlineReader(self.connection, self.server.idle_timeout_s,
                                     self.server.header_timeout_s)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = self.connection.makefile("wb", -1)     # an answer leaves in one write
        self.in_request = self.evicted = self.linger = False
        self.writing_since = None
        self.server.track(self)

    def handle(self):
        self.close_connection = True
        with contextlib.suppress(*CLIENT_GONE):     # the client left or went quiet
            super().handle()

    def finish(self):
        try:                            # untracked last: its descriptors count till then
            super().finish()
            if self.linger:             # input still coming: closing now would reset
                self.server.lingerer.add(self.connection.dup(), half_close=bool(self.command))
        except OSError as exc:          # the client left, or no descriptor to linger: counted
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.server.refusals.began("no_descriptor", f"no descriptor to linger: {exc}")
        finally:
            self.server.untrack(self)

    def handle_one_request(self):
        """Read one request within the head's budget and deadline; answer it."""
        self.close_connection, self.body_unread = True, False
        self.requestline = self.command = self.path = ""
        self.request_version, self.client = "HTTP/1.1", self.client_address[0]
        self.headers = {}
        if self.server.stopping:
            return
        try:
            raw = self.rfile.readline(MAX_HEAD_BYTES + 1)
            if raw in (b"\r\n", b"\n"):     # RFC 9112 2.2: one empty line first is ignored
                raw = self.rfile.readline(MAX_HEAD_BYTES + 1)
        except HTTPError as exc:            # bytes trickled in, no request line in time
            self.started = time.perf_counter()
            return self.send_error(exc.status, exc.detail)
        if not raw.endswith(b"\n") and len(raw) <= MAX_HEAD_BYTES:
            return                          # closed, or idle past the timeout
        self.started = time.perf_counter()
        if raw == HTTP2_PREFACE:
            self.requestline, self.linger = "PRI * HTTP/2.0", True
            self.wfile.write(http2_refusal(self.rfile))
            return self.log_request(0, 0)
        self.raw_requestline = raw
        self.do_request()
        if not self.close_connection:
            self.server.end_request(self)

    def busy_since(self):
        """Since when an answer waits unread (its send buffer full) or a body arrives, or None."""
        return self.writing_since if self.writing_since is not None else self.reader.body_since

    def dispatch(self):
        try:
            self.parse_request()
        except HTTPError as exc:
            return exc.status, {"detail": exc.detail}, exc.headers
        if self.command == "OPTIONS" and self.allowed_origin() and \
                "access-control-request-method" in self.headers:
            return self.preflight() or PaymentRequestHandler.dispatch(self)
        return PaymentRequestHandler.dispatch(self)

    def allowed_origin(self):
        """This request's Origin if CORS_ALLOW_ORIGINS lets its pages call (else None)."""
        allowed, origin = self.server.cors_origins, self.headers.get("origin")
        if allowed and origin and (allowed == "*" or origin in allowed):
            return "*" if allowed == "*" else origin
        return None

    def preflight(self):
        """A browser asking whether its page may call this path: 204 with what it may
        send (None for a path without routes: 404 as usual)."""
        methods = self.server.routes.get(self.path.partition("?")[0])
        return methods and (204, None, [
            ("Access-Control-Allow-Methods", ", ".join(methods)),
            ("Access-Control-Allow-Headers",
             self.headers.get("access-control-request-headers") or "Content-Type"),
            ("Access-Control-Max-Age", "600")])

    def parse_request(self):
        """The request line and header fields, strictly: 400, 414, 431, 505."""
        raw = self.raw_requestline
        if len(raw) > MAX_HEAD_BYTES:
            raise HTTPError(414, f"request line longer than {MAX_HEAD_BYTES} bytes")
        self.requestline = line = raw.decode("latin-1").rstrip("\r\n")
        if not line.isprintable() and CONTROL_CHARS.search(line):
            raise HTTPError(400, "control characters in the request line")
        words = line.split(" ")
        if len(words) != 3 or "" in words:          # RFC 9112 3: SP/HTAB runs allowed
            words = re.split(r"[ \t]+", line.strip(" \t"))
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            raise HTTPError(400, "malformed request line")
        self.command, target, self.request_version = words
        if self.request_version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        if target[:1] != "/" and target[:7].lower() in ("http://", "https:/"):
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        self.path = target                          # absolute-form: routed by its path
        self.headers = headers = self.read_fields(MAX_HEAD_BYTES - len(raw))
        if self.request_version == "HTTP/1.1" and ("host" not in headers or "," in headers["host"]):
            raise HTTPError(400, "an HTTP/1.1 request needs exactly one Host header field")
        if "connection" in headers:
            tokens = {t.strip(" \t").lower() for t in headers["connection"].split(",")}
            self.close_connection = ("close" in tokens if self.request_version == "HTTP/1.1"
                                     else "keep-alive" not in tokens)
        else:
            self.close_connection = self.request_version == "HTTP/1.0"
        self.body_unread = "transfer-encoding" in headers or \
            headers.get("content-length", "0") != "0"
        if "x-forwarded-for" in headers and self.server.trusts(self.client):
            self.client = self.server.forwarded_client(headers["x-forwarded-for"]) or self.client
        self.reader.done()
        self.server.begin_request(self)             # from here on, not evicted as idle

    def read_fields(self, budget):
        """Header (or trailer) fields as {lower-case name: value} within budget bytes.
        A list field's lines join with ", "; of others, the first counts."""
        fields = {}
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(budget + 1)
            budget -= len(line)
            if budget < 0:
                raise HTTPError(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            if line in (b"\r\n", b"\n"):
                return fields
            if not line.endswith(b"\n"):
                raise ConnectionAbortedError("closed or timed out in the middle of the head")
            field = FIELD_LINE.fullmatch(line)
            if field is None:
                raise HTTPError(400, "malformed header line")
            name, value = field[1].decode().lower(), field[2].rstrip(b" \t").decode("latin-1")
            if name not in fields:
                fields[name] = value
            elif name in LIST_FIELDS:
                fields[name] += ", " + value
            elif name == "content-length" and value != fields[name]:
                raise HTTPError(400, "conflicting Content-Length headers")
        raise HTTPError(431, f"more than {MAX_HEADERS} header fields")

    def body_length(self):
        """Content-Length, or None for a chunked body (not both: smuggling); 400, 501."""
        coding = self.headers.get("transfer-encoding")
        if coding is None and "content-length" not in self.headers:
            raise HTTPError(411, "Content-Length required (or Transfer-Encoding: chunked)")
        if coding is None:
            return PaymentRequestHandler.body_length(self)
        if "content-length" in self.headers:
            raise HTTPError(400, "Content-Length and Transfer-Encoding together")
        if coding.strip(" \t").lower() != "chunked":
            raise HTTPError(501, "the only transfer coding accepted is chunked")
        return None

    def read_exactly(self, length):
        """The body within BODY_TIMEOUT_S, once a client that asked is told to send it
        (Expect: 100-continue)."""
        if self.headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        self.reader.await_body(self.server.body_timeout_s)
        try:
            body = (self.read_chunked() if length is None else
                    PaymentRequestHandler.read_exactly(self, length))
        finally:
            self.reader.done()
        self.body_unread = False
        return body

    def read_chunked(self):
        """A chunked body (RFC 9112 7.1): size line, data, CRLF; trailers dropped."""
        body = bytearray()
        while size_line := CHUNK_SIZE_LINE.fullmatch(self.rfile.readline(1024)):
            size = int(size_line[1], 16)
            if len(body) + size > MAX_BODY_BYTES:
                raise HTTPError(413, f"body larger than {MAX_BODY_BYTES} bytes")
            if size == 0:
                self.read_fields(MAX_HEAD_BYTES)    # the trailer section
                return bytes(body)
            body += PaymentRequestHandler.read_exactly(self, size)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                break
        raise HTTPError(400, "malformed chunked body")

    def send_json(self, status, payload, headers=()):
        if type(payload) is Document:               # /openapi.json, /docs, /metrics
            return self.send_body(status, *payload, headers)
        if status == 204:                           # a CORS preflight: no body
            return self.send_body(status, "", b"", headers)
        return PaymentRequestHandler.send_json(self, status, payload, headers)

    def send_body(self, status, content_type, body, headers=()):
        """The lesson's answer, written in one write and observed; a client not
        taking it is evictable meanwhile."""
        if self.body_unread or self.server.draining:
            self.close_connection = True    # unread bytes would be taken for a request
        self.linger = self.close_connection and (self.body_unread or status >= 400)
        self.writing_since = time.monotonic()
        PaymentRequestHandler.send_body(self, status, content_type, body, headers)
        self.wfile.flush()
        self.writing_since = None
        self.log_request(status, len(body))

    # The head, without http.server's per-header bookkeeping (a twentieth of its cost).
    def send_response(self, code, message=None):
        self._head = [status_lines(code)]
        if self.server.cors_origins and self.command and (origin := self.allowed_origin()):
            self._head.append(f"Access-Control-Allow-Origin: {origin}\r\n"
                              "Access-Control-Expose-Headers: Retry-After, Allow\r\n" +
                              (origin != "*") * "Vary: Origin\r\n")
        self._no_content = code == 204

    def send_header(self, keyword, value):
        if not (self._no_content and keyword.startswith("Content-")):   # RFC 9110 8.6
            self._head.append(f"{keyword}: {value}\r\n")

    def end_headers(self):
        if self.close_connection:
            self._head.append("Connection: close\r\n\r\n")
        else:
            self._head.append("Connection: keep-alive\r\n\r\n" if self.request_version ==
                              "HTTP/1.0" else "\r\n")
        self.wfile.write("".join(self._head).encode("latin-1"))

    def log_request(self, code="-", size="-"):
        """An answer: to the server's observers (the metrics, the access log)."""
        for observer in self.server.observers:
            observer(self, code, size)

    def log_error(self, format, *args):
        log.error("client %s: " + format, self.client, *args, exc_info=True)


def http2_refusal(rfile):
    """An HTTP/2 client's answer: SETTINGS, then HTTP_1_1_REQUIRED on its first
    stream (RST_STREAM: curl then retries over HTTP/1.1), or on the whole
    connection (GOAWAY) when no request comes among its first frames."""
    def frame(kind, stream, payload):
        return len(payload).to_bytes(3, "big") + bytes([kind, 0]) + struct.pack(">I", stream) \
            + payload

    with contextlib.suppress(HTTPError, *CLIENT_GONE):
        if rfile.read(8) == b"\r\nSM\r\n\r\n":         # the rest of the preface
            for _ in range(8):
                head = rfile.read(9)
                length = int.from_bytes(head[:3], "big")
                if len(head) < 9 or length > 16384 or len(rfile.read(length)) < length:
                    break
                if head[3] == 1:                                # HEADERS: a request
                    stream = struct.unpack(">I", head[5:])[0] & 0x7FFFFFFF
                    return frame(4, 0, b"") + frame(3, stream, struct.pack(">I", 0xD))
    return frame(4, 0, b"") + frame(7, 0, struct.pack(">II", 0, 0xD))


def status_lines(status):
    """An answer's status line, Server and Date: how every answer starts."""
    return (f"HTTP/1.1 {status} {PaymentRequestHandler.responses[status][0]}\r\n"
            f"Server: {PaymentRequestHandler.server_version}\r\nDate: {clock()[0]}\r\n")


def head_bytes(status, content_type, length, headers=(), connection=None):
    """An answer's head, for an answer written without a handler (the bound's 503)."""
    lines = [f"Content-Type: {content_type}", f"Content-Length: {length}",
             *(f"{name}: {value}" for name, value in headers),
             *([f"Connection: {connection}"] if connection else [])]
    return (status_lines(status) + "\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def clock():
    """(the Date header, the log's time), formatted once a second, not per request."""
    return _clock(int(time.time()))


@functools.lru_cache(maxsize=1)
def _clock(second):
    return (email.utils.formatdate(second, usegmt=True),
            time.strftime("%d/%b/%Y %H:%M:%S", time.localtime(second)))


# ===========================================================================
# Layer 2. The bound: connections, threads and memory a client can hold
# ===========================================================================
# Keeps "fresh clients are answered during floods of idle, slow or hostile
# connections, within the descriptors, tasks and memory the container allows,
# and a stop answers what is in flight" (README: More; docs/limits.md). Each
# connection keeps a thread, so at most max_connections are held. At the bound
# the connection waiting longest outside a request (idle, or sending its head),
# else the oldest body or unread answer, makes room for a newcomer (as nginx
# frees idle keep-alive connections); only when there is none, it gets a 503.

class PaymentHTTPServer(http.server.ThreadingHTTPServer):
    """Threads per connection within a bound, reused; a deep backlog; a graceful stop."""

    request_queue_size = 4096   # a full backlog drops a fresh client's SYN (1 s to retry)
    daemon_threads = True       # stop() waits for in-flight requests instead
    spare_thread_s = 10.0       # how long a thread without a connection lives on
    queued_ahead = 32           # connections waiting for a thread past which accept yields

    def __init__(self, config, publisher, routes):
        self.publisher, self.routes, self.trusted_proxies = publisher, routes, \
            config.forwarded_allow_ips
        self.idle_timeout_s, self.cors_origins = config.idle_timeout_s, config.cors_allow_origins
        self.header_timeout_s, self.body_timeout_s = config.header_timeout_s, config.body_timeout_s
        self.observers = []         # f(handler, status, size) for each answer
        self.draining = False       # a stop is coming: health says 503, connections close
        self.stopping = False       # no more requests
        self.max_connections = connection_bound(config.max_connections)
        self._connections = {}      # handler -> None, the longest waiting first
        self._lock = threading.Lock()
        self._queued = self._spare = self._thread_count = self._threads_peak = 0
        self._closing = 0           # evicted, and their threads not yet done with them
        self._closed = threading.Condition(self._lock)
        self._handoff = queue.SimpleQueue()
        self.refusals = Episodes("refusing connections", "accepting connections again")
        self.lingerer = Lingerer()
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), StrictRequestHandler)

    def server_bind(self):      # HTTPServer's looks the host name up: start-up can stall
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def server_activate(self):
        """Listen; what every connection needs is set here once: accepted sockets
        inherit it on Linux (else setup() sets the timeouts itself)."""
        super().server_activate()
        self.socket.setblocking(False)      # for the accept batches below
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)  # no 40 ms stall
        # A client not reading its answers fills a small buffer soon, not megabytes
        # of kernel memory later; taking nothing for 2 * SLOW_GRACE_S, it is below any rate.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        if KERNEL_SOCKET_TIMEOUTS:
            set_socket_timeouts(self.socket, self.idle_timeout_s, 2 * SLOW_GRACE_S)

    def handle_error(self, request, client_address):
        log.exception("unexpected error on the connection from %s", client_address[0])

    def shutdown_request(self, request):
        request.close()     # not shutdown(): the Lingerer's copy decides when input ends

    def trusts(self, address):
        return self.trusted_proxies == "*" or any(
            ipaddress.ip_address(address) in network for network in self.trusted_proxies)

    def forwarded_client(self, forwarded_for):
        """X-Forwarded-For's right-most untrusted address (uvicorn's rule), stopping at a non-IP."""
        client = None
        for hop in reversed(forwarded_for.split(",")):
            try:
                address = str(ipaddress.ip_address(hop.strip(" \t")[:64].partition("%")[0]))
            except ValueError:
                return client
            if not self.trusts(client := address):
                return client
        return client

    def track(self, handler):
        with self._lock:
            self._connections[handler] = None

    def untrack(self, handler):
        with self._lock:
            if self._connections.pop(handler, 0) is not None:    # it was evicted
                self._closing -= 1
                self._closed.notify()

    def begin_request(self, handler):
        """A whole head is in: no longer evicted as idle. No lock: the handler
        sets in_request, then reads evicted; _evictable() does the reverse."""
        handler.in_request = True
        if handler.evicted:
            with self._lock:
                if handler.evicted:
                    raise ConnectionAbortedError("closed to make room for another connection")

    def end_request(self, handler):
        """Answered; the connection waits for its next request, last in line."""
        with self._lock:
            handler.in_request = False
            if self._connections.pop(handler, 0) is None:
                self._connections[handler] = None

    def _evictable(self, busy=True):
        """With the lock held: the one to close for a newcomer (idle first, else busy), or None."""
        oldest, since = None, time.monotonic() - SLOW_AFTER_S    # busy: the oldest, past this
        for handler in self._connections:
            if handler.evicted:
                continue
            if not handler.in_request:
                handler.evicted = True
                if not handler.in_request:      # its request did not begin meanwhile
                    break
                handler.evicted = False
            started = busy and handler.busy_since()
            if started and started < since:
                oldest, since = handler, started
        else:
            if oldest is None:
                return None
            handler, handler.evicted = oldest, True
            handler.reader.evicted = handler.writing_since is None    # a body: answer 503
        del self._connections[handler]
        self._closing += 1
        return handler

    def _handle_request_noblock(self):
        """Accept every connection waiting, up to 64 per wake-up: under a flood
        the backlog otherwise fills, and a fresh client's SYN is dropped."""
        for _ in range(64):
            try:
                request, client_address = self.get_request()
            except OSError:                     # none waiting, or no descriptor
                return
            self.process_request(request, client_address)
            if self._queued > self.queued_ahead:    # on one CPU the threads starved
                time.sleep(0.001)
            if self._closing > 8:       # let the evicted close before more descriptors come
                with self._lock:
                    self._closed.wait_for(lambda: self._closing <= 8, timeout=0.5)

    def process_request(self, request, client_address):
        """Hand the connection to a spare or new thread; make room, or refuse."""
        victim = start = None
        with self._lock:            # descriptors: lingering sockets make room first
            self.lingerer.shed(len(self._connections) + self._queued + len(self.lingerer.ends)
                               + 1 - self.max_connections - Lingerer.spare)
            if len(self._connections) + self._queued >= self.max_connections:
                victim = self._evictable()
                if victim is None:
                    return self.refuse(request, "max_connections", f"{len(self._connections)} "
                                       f"requests are being handled, the most this server takes")
            self._queued += 1
            if self._queued > self._spare and self._thread_count < self.max_connections + 16:
                self._thread_count += 1
                self._threads_peak = max(self._threads_peak, self._thread_count)
                start = True
        if victim is not None:      # a body's reader sees its input end, and answers 503
            shutdown_quietly(victim.connection, read_only=victim.reader.evicted)
        try:
            if start:
                threading.Thread(target=self._serve_connections, name="connection",
                                 daemon=True).start()
        except RuntimeError:                    # "can't start new thread": pids, memory
            with self._lock:
                self._thread_count -= 1
                self._queued -= 1
                self.max_connections = max(len(self._connections), 1)
                return self.refuse(request, "no_thread", "the server cannot start a thread for "
                                   "another connection now", f"cannot start a thread with "
                                   f"{self._thread_count} threads: at most "
                                   f"{self.max_connections} connections from now on")
        self._handoff.put((request, client_address))

    def _serve_connections(self):
        """Serve handed-over connections until none comes for spare_thread_s;
        once the threads have halved since their peak, give memory back."""
        while True:
            with self._lock:
                self._spare += 1
            try:
                request, client_address = self._handoff.get(timeout=self.spare_thread_s)
            except queue.Empty:
                with self._lock:
                    try:                        # handed one just as the wait ended?
                        request, client_address = self._handoff.get_nowait()
                    except queue.Empty:
                        self._spare -= 1
                        self._thread_count -= 1
                        if self._thread_count * 2 >= self._threads_peak:
                            return
                        self._threads_peak = self._thread_count
                        break
            with self._lock:
                self._spare -= 1
                self._queued -= 1
            self.process_request_thread(request, client_address)
        with contextlib.suppress(ImportError, OSError, AttributeError):
            import ctypes                       # glibc keeps the exited threads' memory
            ctypes.CDLL(None).malloc_trim(0)

    def refuse(self, sock, reason, detail, log_detail=None):
        """503 and Connection: close, without a thread (the lock may be held)."""
        self.refusals.began(reason, log_detail or f"{reason}: {detail}")
        body = json.dumps({"detail": detail}).encode()
        with contextlib.suppress(OSError):
            sock.send(head_bytes(503, "application/json", len(body), [("Retry-After", "1")],
                                 "close") + body, socket.MSG_DONTWAIT)
        self.lingerer.add(sock)

    def get_request(self):
        """accept(); out of descriptors, close idle connections, pause 0.5 s (as nginx does)."""
        try:
            accepted = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.refusals.began("no_descriptor", f"out of file descriptors ({exc.strerror}) "
                                    f"with {len(self._connections)} connections: accept() pauses")
                with self._lock:
                    victims = [v for v in (self._evictable() for _ in range(8)) if v is not None]
                for victim in victims:
                    shutdown_quietly(victim.connection)
                time.sleep(0.5)
            raise
        self.refusals.ended()
        return accepted

    def stop(self, grace_s):
        """Stop accepting; close the connections not inside a request at once;
        let requests being handled finish within grace_s. True if all did."""
        self.stopping = self.draining = True
        self.shutdown()
        self.server_close()
        deadline = time.monotonic() + grace_s
        while True:
            with self._lock:
                closing = list(iter(lambda: self._evictable(busy=False), None))
                left = len(self._connections)
            for handler in closing:
                shutdown_quietly(handler.connection)
            if not left or time.monotonic() >= deadline:
                self.lingerer.stopped = True
                return not left
            time.sleep(0.02)


def shutdown_quietly(sock, read_only=False):
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD if read_only else socket.SHUT_RDWR)


class Lingerer:
    """Closes connections after their last answer, one thread for all, reading
    and dropping what the client still sends first (nginx's lingering close):
    closed with input unread, a socket sends a reset that can destroy the answer."""

    most, linger_s, quiet_s = 256, 10.0, 1.0    # nginx: lingering_time 30 s, _timeout 5 s
    spare = 16          # sockets past the connection bound (its 503s): descriptors are counted

    def __init__(self):
        self.ends, self.stopped = {}, False     # socket -> (end, quiet until); stopped: ends it
        self._selector, self._added = selectors.DefaultSelector(), threading.Condition()
        threading.Thread(target=self._run, name="lingering-close", daemon=True).start()

    def add(self, sock, half_close=True):
        """Linger on sock; half_close: send its end of input first (not to an HTTP/2
        client, which takes that for an empty reply rather than retrying)."""
        if len(self.ends) >= self.most:         # past this, close at once
            return sock.close()
        if half_close:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        with self._added:
            self._selector.register(sock, selectors.EVENT_READ)
            self.ends[sock] = (time.monotonic() + self.linger_s, time.monotonic() + self.quiet_s)
            self._added.notify()

    def shed(self, count):
        """Close the count oldest now: a newcomer needs their descriptors."""
        if count > 0:
            with self._added:
                for sock in list(itertools.islice(self.ends, count)):
                    self._close(sock)

    def _close(self, sock):
        self._selector.unregister(sock)
        del self.ends[sock]
        sock.close()

    def _run(self):
        while not self.stopped:
            with self._added:
                self._added.wait_for(lambda: self.ends or self.stopped, timeout=1.0)
            ready = {key.fileobj for key, _ in self._selector.select(0.05)}
            with self._added:
                now = time.monotonic()
                for sock, (end, quiet_until) in list(self.ends.items()):
                    if sock in ready and now < end:
                        try:
                            if sock.recv(65536, socket.MSG_DONTWAIT):
                                self.ends[sock] = (end, now + self.quiet_s)
                                continue
                        except BlockingIOError:
                            continue
                        except OSError:
                            pass
                    elif now < min(end, quiet_until):
                        continue
                    self._close(sock)


class Episodes:
    """A condition logged once when it begins and once when it has been over
    for over_after_s, not once per event; counted by reason for /metrics."""

    over_after_s = 10.0

    def __init__(self, began, ended):
        self.words = (began, ended)
        self.counts = collections.Counter()
        self.on, self._last, self._lock = False, float("-inf"), threading.Lock()

    def began(self, reason, detail=None):
        self.counts[reason] += 1
        self._last = time.monotonic()
        if not self.on:
            with self._lock:
                began, self.on = not self.on, True
            if began:
                log.warning("%s (%s)", self.words[0], detail or reason)

    def ended(self):
        if self.on and time.monotonic() - self._last >= self.over_after_s:
            with self._lock:
                ended, self.on = self.on, False
            if ended:
                log.warning("%s (no failure for %g s)", self.words[1], self.over_after_s)


# The most one held connection costs: its thread's stack and state, a head and
# a body at their limits, buffers (measured in bench/README.md).
CONNECTION_BYTES = 256 * 1024
BASELINE_BYTES = 64 * 1024 * 1024   # the process serving nothing, Kafka included


def connection_bound(max_connections):
    """max_connections, lowered to what this process's descriptors, tasks and
    memory can carry (one warning when lowered)."""
    limits, soft = [], resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource else -1
    if soft != -1:      # RLIM_INFINITY
        limits.append((soft - len(os.listdir("/dev/fd")) - 16 - Lingerer.spare,
                       f"RLIMIT_NOFILE is {soft}"))
    pids = cgroup_limit("pids", "pids.max")
    if pids is not None:
        limits.append((pids - len(os.listdir("/proc/self/task")) - 8,
                       f"the pids cgroup allows {pids} tasks"))
    memory = cgroup_limit("memory", "memory.max") or cgroup_limit("memory", "memory.limit_in_bytes")
    if memory is not None and memory < 2**60:
        limits.append(((memory * 3 // 4 - BASELINE_BYTES) // CONNECTION_BYTES,
                       f"the memory cgroup allows {memory // 2**20} MiB"))
    bound, why = min(limits, default=(max_connections, ""))
    if bound < max_connections:
        log.warning("MAX_CONNECTIONS=%d lowered to %d: %s", max_connections, max(bound, 1), why)
    return max(min(bound, max_connections), 1)


def cgroup_limit(controller, file_name):
    """A limit of this process's cgroup (v1 or v2), or None when unlimited or unknown."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/cgroup") as f:
            for line in f.read().splitlines():
                _, controllers, path = line.split(":", 2)
                if controller in controllers.split(",") or not controllers:
                    base = f"/sys/fs/cgroup/{controller}" if controllers else "/sys/fs/cgroup"
                    with contextlib.suppress(OSError), \
                            open(f"{base}{path.rstrip('/')}/{file_name}") as limit:
                        text = limit.read().strip()
                        return int(text) if text.isdigit() else None
    return None


# ===========================================================================
# Layer 3. Speed: the group commit, one CPU, the log writer
# ===========================================================================
# Keeps "200 only on this record's own acknowledgement, 503 within KAFKA_TIMEOUT_S, at most
# MAX_PENDING_EVENTS waiting" (README: Delivery guarantees) at the kafka-python ceiling
# (bench/README.md): the lesson's three steps, once per group of waiting records.

class GroupCommit:
    """The producer under the lesson's publish(): send() queues the record for one publisher
    thread, which sends every record waiting, flushes once and settles each from its own
    future; flush() waits for the caller's record to settle; send()'s future holds the
    outcome. At most max_pending wait; until start(producer), sends wait for it."""

    notes = None        # a KafkaNotes: why Kafka fails, from kafka-python's log

    def __init__(self, timeout_s, max_pending):
        self.timeout_s, self.max_pending, self.producer = timeout_s, max_pending, None
        self.pending = 0            # records queued or sent, not yet acknowledged or failed
        self.broker = Episodes("Kafka is unavailable; mock-succeed answers 503 until it is "
                               "back", "Kafka acknowledges events again")
        self._lock, self._started = threading.Lock(), threading.Event()
        self._waiting = queue.SimpleQueue()     # _Publication, then None to stop the thread
        self._mine = threading.local()          # the calling thread's last record
        self._closed = self.reached = False
        self.stop_by = float("inf")             # a stop's end: no wait goes past it

    def start(self, producer):
        self.producer = producer
        self._thread = threading.Thread(target=self._run, name="kafka-publisher", daemon=True)
        self._thread.start()
        self._started.set()

    def send(self, topic, **record):
        deadline = min(time.monotonic() + self.timeout_s, self.stop_by)
        if self.producer is None and not self._started.wait(remaining(deadline)):
            raise BrokerUnavailable("the Kafka producer is still starting", "producer_starting")
        if not self.reached:                # until a broker acknowledged something
            self._refuse_if_unreachable()
        if self._closed or time.monotonic() >= self.stop_by:
            raise BrokerUnavailable("the Kafka producer is closed; the service is stopping",
                                    "stopping")
        with self._lock:
            if self.pending >= self.max_pending:
                raise BrokerUnavailable(f"{self.pending} events are already waiting for the "
                                        f"broker; try again later", "too_many_pending")
            self.pending += 1
        self._mine.publication = publication = _Publication(topic, record, deadline)
        self._waiting.put(publication)
        return publication

    def flush(self, timeout=None):
        """Wait until the caller's record is settled, within timeout; a broker that was
        never reached and cannot be now ends the wait sooner (checked four times a second)."""
        settled = self._mine.publication.settled
        deadline = min(time.monotonic() + timeout, self.stop_by)
        while not settled.acquire(timeout=min(0.25, remaining(deadline))):
            if not self.reached:
                self._refuse_if_unreachable()
            if time.monotonic() >= deadline:
                raise self._timeout_error()

    def _refuse_if_unreachable(self):
        """503 at once while no broker was ever reached and none can be now."""
        if self.notes and not self.producer._metadata.brokers() and (
                why := self.notes.unreachable(within_s=2.0)):
            self.broker.began("unreachable", f"Kafka is unreachable: {why}")
            raise BrokerUnavailable(f"Kafka is unreachable: {why}", "unreachable")

    def _run(self):
        """The publisher thread: take every record waiting and commit them; again."""
        while True:
            group = [self._waiting.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    group.append(self._waiting.get_nowait())
            stop, group = group[-1] is None, [p for p in group if p is not None]
            try:
                self._commit(group)
            except Exception as exc:                # a bug: fail the group, keep the thread
                log.exception("publishing %d events failed", len(group))
                for publication in group:
                    if publication.outcome is None:
                        self._settle(publication, exc)
            if stop:
                return

    def _commit(self, group):
        """1. send() each record, 2. flush() once, 3. settle each from its own future."""
        sent, kafka_error = [], sys.modules["kafka.errors"].KafkaError
        for publication in group:
            if time.monotonic() >= publication.deadline:    # its request had its 503
                self._settle(publication, self._timeout_error())
                continue
            try:
                publication.future = self.producer.send(publication.topic, **publication.record)
                sent.append(publication)
            except kafka_error as exc:                      # no metadata in time, ...
                self._settle(publication, exc)
        if not sent:
            return
        flush_error = None
        try:                        # the whole group in one produce request
            self.producer.flush(timeout=remaining(sent[-1].deadline))
        except kafka_error as exc:
            flush_error = exc
        for publication in sent:    # a flush returns quietly when a record failed
            future = publication.future
            self._settle(publication, (future.value if future.succeeded() else future.exception)
                         if future.is_done else flush_error or self._timeout_error())

    def _settle(self, publication, outcome):
        """Answer its request, note the broker's state; free its slot once the producer is done."""
        future = publication.future
        if future is None or future.is_done:
            self._free_slot()
        else:                                       # still in the producer's buffer
            future.add_both(self._free_slot)
        if isinstance(outcome, Exception):          # logged as its 503 says it
            self.broker.began(type(outcome).__name__, self.refusal(outcome).detail)
        else:
            self.reached = True
            self.broker.ended()
        publication.outcome = outcome
        publication.settled.release()

    def _free_slot(self, _outcome=None):
        with self._lock:
            self.pending -= 1

    def _timeout_error(self):
        return sys.modules["kafka.errors"].KafkaTimeoutError(
            f"no acknowledgement within {self.timeout_s:g} s")

    def close(self, timeout):
        """Deliver what is still pending, within timeout, and close."""
        if self.producer is not None:
            deadline, self._closed = time.monotonic() + timeout, True
            self._waiting.put(None)             # after every record already waiting
            self._thread.join(remaining(deadline))
            try:
                self.producer.close(timeout=remaining(deadline))
            except sys.modules["kafka.errors"].KafkaError:
                log.warning("closing with %d events not acknowledged by Kafka", self.pending)


class _Publication:
    """One record on its way through the publisher thread: the future send() returns."""

    __slots__ = ("topic", "record", "deadline", "future", "outcome", "settled")

    def __init__(self, topic, record, deadline):
        self.topic, self.record, self.deadline = topic, record, deadline
        self.future = self.outcome = None
        self.settled = threading.Lock()     # held until settled: the cheapest wake-up
        self.settled.acquire()

    def get(self, timeout=None):
        """Its RecordMetadata once settled (flush() waited for that), or its error."""
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class GroupCommitPublisher(Publisher):
    """The lesson's Publisher over a GroupCommit; observers(event, seconds, its outcome)."""

    def __init__(self, config):
        super().__init__(GroupCommit(config.kafka_timeout_s, config.max_pending_events), config)
        self.observers = []
        self.start, self.close = self.producer.start, self.producer.close
        self.producer.refusal = self.refusal        # its outage line says what the 503 says

    @property
    def pending(self):
        return self.producer.pending

    def refusal(self, exc):
        """The lesson's 503; for a timeout, of the error kafka-python last retried on."""
        if self.producer.notes and isinstance(exc, sys.modules["kafka.errors"].KafkaTimeoutError):
            exc = self.producer.notes.retried_on(within_s=self.timeout_s) or exc
        return Publisher.refusal(self, exc)

    def publish(self, event):
        started = time.perf_counter()
        try:
            outcome = Publisher.publish(self, event)
        except BrokerUnavailable as exc:
            outcome = exc
        for observer in self.observers:
            observer(event, time.perf_counter() - started, outcome)
        if isinstance(outcome, BrokerUnavailable):
            raise outcome
        return outcome


class KafkaNotes(logging.Handler):
    """kafka-python's log, read, not printed: it reconnects and retries by itself, then
    says only "timeout"; these notes keep why, for the 503s and an outage's one line."""

    def __init__(self, bootstrap):
        super().__init__(logging.WARNING)
        self.servers = [server.strip() for server in bootstrap.split(",")]
        self.failed, self.retried, self._probed = {}, (-1e9, None), -1e9   # {server: (when, why)}

    def emit(self, record):
        with contextlib.suppress(Exception):    # a line kafka-python words otherwise
            if record.msg.startswith("Bootstrap connection to %s failed"):     # bootstrap-N
                self.note(self.servers[int(record.args[0].rpartition("-")[2])],
                          connection_error(record.args[1]))
            elif record.msg.startswith("%s: Got error produce response"):
                self.retried = (time.monotonic(), getattr(sys.modules["kafka.errors"],
                                                          record.args[3]))

    def note(self, server, why):
        at, known = self.failed.get(server, (-1e9, ""))        # it may close after saying why
        keep = why == CLOSED and time.monotonic() - at < 10
        self.failed[server] = (time.monotonic(), known if keep else
                               f"could not connect to {server}: {why}")

    def unreachable(self, within_s):
        """Why no bootstrap server can be reached, each having failed within_s ago (kafka-
        python's attempts, a TCP connect at most once a second); else a false value."""
        now = time.monotonic()
        for server in self.servers if now - self._probed >= 1.0 else ():
            self._probed, (host, _, port) = now, server.rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), 0.5).close()
            except (socket.gaierror, UnicodeError):
                self.note(server, f"host {host!r} does not resolve")
            except OSError as exc:
                self.note(server, (exc.strerror or str(exc)).lower())
        failures = [self.failed.get(server, (-1e9, "")) for server in self.servers]
        return all(now - at < within_s for at, _ in failures) and "; ".join(w for _, w in failures)

    def retried_on(self, within_s):
        return self.retried[1]() if time.monotonic() - self.retried[0] < within_s else None


CLOSED = "the broker closed the connection (a wrong protocol, SASL user or password?)"


def connection_error(exc):
    """kafka-python's connection error in words: 'connection refused', 'TLS handshake ...'."""
    text = str(exc.args[0] if exc.args else exc)
    if refused := re.fullmatch(r"(\d+) E[A-Z]+", text):
        return os.strerror(int(refused[1])).lower()
    if text.startswith("Handshake failed: "):
        return "TLS handshake failed: " + re.sub(r"^\[SSL: \w+\] | \(_ssl\.c:\d+\)$", "", text[18:])
    return f"SASL login refused: {text}" if "Sasl" in type(exc).__name__ else (
        CLOSED if text == "socket disconnected" else text)


GROUP_LINGER_MS = 5     # the sender may hold a record this long unasked; a flush sends at once


def cpu_choice(name, text):
    """PIN_CPU: "auto" (the CPU it starts on), "off", or a CPU it may run on (bench/README.md)."""
    value = text.strip().lower()
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if value in ("auto", "off") or value.isascii() and value.isdigit() and int(value) in allowed:
        return value if value in ("auto", "off") else int(value)
    raise SystemExit(f"{name}={text!r} is not auto, off or a CPU this process may run on "
                     f"({', '.join(map(str, allowed)) or 'none: not supported here'})")


def pin_to_one_cpu(choice):
    """Confine this process to one CPU; the CPU, or None ("off", or no affinity here)."""
    if choice == "off" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    cpu = current_cpu() if choice == "auto" else choice
    cpu = cpu if cpu in allowed else max(allowed)
    try:
        os.sched_setaffinity(0, {cpu})  # threads started later inherit it
        return cpu
    except OSError as exc:              # a sandbox that forbids it: run as the OS likes
        log.warning("PIN_CPU=%s: cannot keep the threads on CPU %d (%s); they spread",
                    choice, cpu, exc.strerror or exc)


def current_cpu():
    """The CPU this thread runs on now (Linux's /proc), or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/thread-self/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[36])    # field 39: processor


class LogWriter(logging.Handler):
    """Lines for stdout or stderr (also a logging handler), written by a thread
    of their own a few times a second: a request only appends to a deque. An
    output that takes nothing costs lines (counted, then said), never a request."""

    most_queued = 10_000
    chunk = 4096                # PIPE_BUF: a pipe that polls writable takes it whole

    def __init__(self, fd=2, interval_s=0.2):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._fd, self._lines, self.dropped = fd, collections.deque(), 0
        self._stop, self._wake = threading.Event(), threading.Event()
        self._flushing = threading.Lock()       # its thread's, and start-up's or close()'s
        self._thread = threading.Thread(target=self._run, args=(interval_s,),
                                        name=f"log-writer-{fd}", daemon=True)
        self._thread.start()

    def write(self, line):
        queued = len(self._lines)
        if queued < self.most_queued:
            self._lines.append(line)
            if queued > self.most_queued // 4 and not self._wake.is_set():
                self._wake.set()                # write them now, not at the next interval
        else:
            self.dropped += 1

    def emit(self, record):
        self.write(self.format(record))

    def _run(self, interval_s):
        while not self._stop.is_set():
            self._wake.wait(interval_s)
            self._wake.clear()
            self.flush(interval_s)

    def flush(self, wait_s=0.0):
        """Write what is queued while the output takes it within wait_s."""
        with self._flushing:
            lines = [self._lines.popleft() for _ in range(len(self._lines))]
            if self.dropped:
                lines.append(f"{self.dropped} log lines dropped: the output could not take them")
                self.dropped = 0
            data = "".join(f"{line}\n" for line in lines).encode("utf-8", "backslashreplace")
            poller, start = select.poll(), 0
            poller.register(self._fd, select.POLLOUT)
            while start < len(data):
                if not poller.poll(wait_s * 1000):
                    self.dropped += data.count(b"\n", start)
                    return
                end = data.rfind(b"\n", start, start + self.chunk) + 1 or start + self.chunk
                try:                            # whole lines, no copy of the rest
                    start += os.write(self._fd, memoryview(data)[start:end])
                except BlockingIOError:
                    continue
                except OSError:                 # the output is gone: nothing better to do
                    return

    def close(self, wait_s=1.0):
        self._stop.set()
        self._wake.set()
        self._thread.join(wait_s)
        self.flush(wait_s)
        super().close()


def access_log(writer):
    """A server observer writing a Common Log Format line per answer: the client as a
    trusted proxy names it, the request line cut to 1,000 characters, each field escaped
    (C0, C1, DEL: no terminal control, no line split)."""
    def observe(handler, status, size):
        line, client = handler.requestline, handler.client
        if len(line) > 1000:
            line = f"{line[:1000]}... ({len(line)} characters)"
        if not (line.isascii() and line.isprintable()) or '"' in line or "\\" in line:
            line = line.encode("unicode_escape").decode("ascii").replace('"', '\\"')
        if not client.isprintable():
            client = client.encode("unicode_escape").decode("ascii")
        writer.write(f'{client} - - [{clock()[1]}] "{line}" {status} {size}')
    return observe


# ===========================================================================
# Layer 4. Self-description: /openapi.json, /docs, /metrics, the event log
# ===========================================================================
# Keeps "the API document is derived from the routing table and rules, so it cannot drift, and
# the metrics count every answer and event exactly" (README: More; docs/observability.md).

class Document(NamedTuple):
    """An answer that is not a JSON object built per request: sent as is."""
    content_type: str
    body: bytes


def openapi_document(server, body):
    """This API as an OpenAPI 3.1 document, built from the routing table."""
    if getattr(server, "api_document", None) is None:      # built once: routes are fixed
        server.api_document = Document("application/json",
                                       json.dumps(build_api_document(server.routes)).encode())
    return server.api_document


def swagger_ui(server, body):
    """Swagger UI for /openapi.json: try the API from a browser."""
    assets = html.escape(server.swagger_ui_url.rstrip("/"), quote=True)
    return Document("text/html; charset=utf-8", f"""<!DOCTYPE html>
<html><head><title>payment-service {__version__} - Swagger UI</title>
<link type="text/css" rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]}})</script>
</body></html>
""".encode())


def metrics(server, body):
    """Prometheus metrics: requests, durations, events, broker, connections."""
    return server.metrics.answer(server)


SELF_DESCRIPTION_ROUTES = {path: {"GET": Route(function), "HEAD": Route(function)}
                           for path, function in [("/openapi.json", openapi_document),
                                                  ("/docs", swagger_ui), ("/metrics", metrics)]}
ALL_ROUTES = {**ROUTES, **SELF_DESCRIPTION_ROUTES}
STATUS_OK = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
# A 200's JSON schema, or a non-JSON answer's media type, by function (default: a JSON object).
ANSWERS = {
    "health": STATUS_OK, "mock_succeed": STATUS_OK,
    "service_info": {"type": "object", "required": ["service", "version"], "properties": {
        "service": {"const": "payment"}, "version": {"const": __version__}}},
    "create_intent": {"type": "object", "required": ["payment_id", "client_secret"], "properties": {
        "payment_id": {"type": "string", "pattern": "^pay_[0-9]+$"},
        "client_secret": {"type": "string", "pattern": "^secret_[0-9]+$"}}},
    "openapi_document": {"type": "object", "required": ["openapi", "info", "paths"]},
    "swagger_ui": "text/html", "metrics": PROMETHEUS_TEXT}
EXAMPLES = {"Payment": {"order_id": 123, "amount_cents": 25998, "currency": "USD"}}


def field_schema(rule):
    """A Field's JSON schema: exactly what parse_body() accepts."""
    if rule.kind is int:
        return {"type": "integer", "minimum": rule.low, "maximum": rule.high, "description":
                f"{rule.meaning}: a JSON integer (not a boolean, fraction or string); a whole "
                f"number written as 2.0 or 2e0 is that integer" + (rule.high > 2**53) * (
                    "; past 2**53 (9007199254740992) a JavaScript client's JSON.parse rounds "
                    "it (read it as a BigInt there)")}
    # the lengths too: a Python-flavoured '$' also matches before a final newline
    return {"type": "string", "minLength": rule.low, "maxLength": rule.high,
            **({"pattern": f"^{rule.pattern.pattern}$"} if rule.pattern else {}),
            "description": rule.meaning + (rule.convert is str.upper) * "; upper-cased"}


def body_name(fields):
    """A body's name in the document: its rules' name here (PAYMENT: Payment)."""
    return next(name.title().replace("_", "") for name, value in globals().items()
                if value is fields)


def body_schema(fields):
    return {"type": "object", "description": "Unknown keys are allowed and ignored.",
            "required": list(fields), "additionalProperties": True,
            "properties": {name: field_schema(rule) for name, rule in fields.items()}}


def error_statuses(method, route):
    """{status: when} for every error answer a request to this operation can get."""
    post, body, health = method == "POST", bool(route.body), route.function.__name__ == "health"
    errors = {
        400: "a malformed request line or header line, control characters in the request "
             "line, or an HTTP/1.1 request without exactly one Host" + post * (
                 "; Content-Length not a non-negative integer, both Content-Length and "
                 "Transfer-Encoding, or a malformed chunked body") + body * (
                 "; the body is not a UTF-8 JSON object (or is nested too deeply, "
                 "holds NaN or Infinity, or a duplicate key)"),
        404: "no route for the path (only paths missing from this document)",
        405: "a method the path does not have (only methods missing from this document); "
             "Allow lists the path's methods",
        408: "the request head did not arrive within HEADER_TIMEOUT_S of its first byte" +
             post * ", or the body not within BODY_TIMEOUT_S of its start (whatever its pauses)",
        411: post * "neither Content-Length nor Transfer-Encoding: chunked",
        413: post * f"a body larger than {MAX_BODY_BYTES} bytes",
        414: f"a request line longer than {MAX_HEAD_BYTES} bytes",
        415: post * "a Content-Type other than application/json (parameters allowed)",
        422: body * "a field is missing, of the wrong type or out of range",
        431: f"a request head larger than {MAX_HEAD_BYTES} bytes, or more than {MAX_HEADERS} "
             f"header fields",
        500: "an unexpected error (the traceback goes to the server's log)",
        501: post * "a transfer coding other than chunked",
        503: "MAX_CONNECTIONS connections are held, none idle, sending a body or not reading" +
             health * "; the service is stopping (SHUTDOWN_DELAY_S)" + route.publishes * (
                 "; Kafka did not acknowledge the event within KAFKA_TIMEOUT_S, or "
                 "MAX_PENDING_EVENTS events are already waiting for it") +
             ". Retry-After says when to try again (seconds)",
        505: "an HTTP version other than 1.0 or 1.1"}
    return {status: when for status, when in errors.items() if when}


def describe_operation(method, route, operation_id):
    """The OpenAPI operation object of one route."""
    function = route.function
    answer = ANSWERS.get(function.__name__, {"type": "object"})
    error = {"$ref": "#/components/schemas/Error"}
    headers = {405: ("Allow", "the methods the path has, comma-separated"),
               503: ("Retry-After", "seconds to wait before trying again")}

    def response(status, description, media_type, schema):
        return {"description": description, **({"headers": {headers[status][0]: {
                    "required": True, "schema": {"type": "string"},
                    "description": headers[status][1]}}} if status in headers else {}),
                **({} if method == "HEAD" else {"content": {media_type: {"schema": schema}}})}

    responses = {"200": response(200, "OK", answer, {"type": "string"}) if isinstance(answer, str)
                 else response(200, "OK", "application/json", answer)}
    for status, when in error_statuses(method, route).items():
        responses[str(status)] = response(status, f"{http.HTTPStatus(status).phrase}: {when}",
                                          "application/json", error)
    operation = {"operationId": operation_id, "tags": ["payments" if route.body else "service"],
                 "summary": (function.__doc__ or function.__name__).partition("\n")[0].strip(),
                 "description": f"Handler: {function.__name__}" + (method == "HEAD") * (
                     " (HEAD: the GET answer's headers, no body)"),
                 "responses": responses}
    if route.body:
        name = body_name(route.body)
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"},
            **({"example": EXAMPLES[name]} if name in EXAMPLES else {})}}}
    return operation


def operation_ids(routes):
    """{(path, method): a short unique operationId}: a POST by its last path segment (createIntent),
    others by method and as few last segments as tell them apart (getHealth, getPaymentHealth)."""
    ids, taken = {}, set()
    for path, method in sorted(((p, m) for p, ms in routes.items() for m in ms),
                               key=lambda pm: pm[0].count("/")):
        segments = path.strip("/").split("/")
        for count in range(1, len(segments) + 1):
            words = re.findall("[A-Za-z0-9]+", " ".join(segments[-count:]))
            name = "".join(word.title() for word in words)
            name = name[0].lower() + name[1:] if method == "POST" else method.lower() + name
            if name not in taken or count == len(segments):
                break
        ids[path, method] = name
        taken.add(name)
    return ids


def build_api_document(routes):
    """The OpenAPI 3.1 document of every route in routes."""
    ids = operation_ids(routes)
    schemas = {body_name(r.body): body_schema(r.body)
               for methods in routes.values() for r in methods.values() if r.body}
    return {"openapi": "3.1.0",
            "info": {"title": "payment-service", "version": __version__,
                     "description": __doc__.split("\n\n")[1]},
            "tags": [{"name": "payments", "description": "Payment intents and their events"},
                     {"name": "service", "description": "Health, version and self-description"}],
            "paths": {path: {method.lower(): describe_operation(method, route, ids[path, method])
                             for method, route in methods.items()}
                      for path, methods in routes.items()},
            "components": {"schemas": {**schemas, "Error": {
                "type": "object", "required": ["detail"],
                "properties": {"detail": {"type": "string"}}}}}}


UNMATCHED = "unmatched"         # the route label of every path not in the routes
METHODS = frozenset("GET HEAD POST PUT DELETE PATCH OPTIONS TRACE CONNECT".split())  # else "other"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EVENT_REFUSALS = ("producer_starting", "too_many_pending", "timeout", "broker_refused",
                  "unreachable", "stopping")
BROKER_FAILURES = frozenset({"timeout", "broker_refused", "unreachable"})
CONNECTION_REFUSALS = ("max_connections", "no_thread", "no_descriptor")


class Histogram:
    """How many values fell in each bucket of BUCKETS (then +Inf), and their sum."""

    def __init__(self, counts=(0,) * (len(BUCKETS) + 1), total=0.0):
        self.counts, self.sum = list(counts), total

    def observe(self, value):
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def samples(self, label):
        """Cumulative _bucket samples, then _sum and _count (each less the metric's name)."""
        totals = list(itertools.accumulate(self.counts))
        return [*(f'_bucket{{{label},le="{bound}"}} {total}'
                  for bound, total in zip((*map(repr, BUCKETS), "+Inf"), totals)),
                f"_sum{{{label}}} {self.sum!r}", f"_count{{{label}}} {totals[-1]}"]


class Metrics:
    """Exact counters (each update holds the lock; bench/README.md has its cost) for /metrics."""

    def __init__(self, routes):
        self._lock = threading.Lock()
        self._requests = collections.Counter()      # (route, method, status) -> count
        self._durations = {route: Histogram() for route in (*routes, UNMATCHED)}
        self._events = collections.Counter()        # "acknowledged" or a refusal reason
        self._publish = {"acknowledged": Histogram(), "refused": Histogram()}
        self._broker_available = 1                  # the last outcome's

    def observe_request(self, handler, status, size):
        """A server observer: one answer."""
        seconds = time.perf_counter() - handler.started
        path = handler.path.partition("?")[0]
        route = path if handler.command and path in self._durations else UNMATCHED
        method = handler.command if handler.command in METHODS else "other"
        with self._lock:
            self._requests[route, method, status] += 1
            self._durations[route].observe(seconds)

    def observe_event(self, event, seconds, outcome):
        """A publisher observer: one event acknowledged or refused."""
        refused = isinstance(outcome, BrokerUnavailable)
        with self._lock:
            self._events[outcome.reason if refused else "acknowledged"] += 1
            self._publish["refused" if refused else "acknowledged"].observe(seconds)
            if not refused or outcome.reason in BROKER_FAILURES:
                self._broker_available = int(not refused)

    def answer(self, server):
        """The /metrics answer: a consistent copy under the lock, rendered outside it."""
        with self._lock:
            requests, events = sorted(self._requests.items()), self._events.copy()
            durations = {r: Histogram(h.counts, h.sum) for r, h in self._durations.items()}
            publish = {o: Histogram(h.counts, h.sum) for o, h in self._publish.items()}
            broker_available = self._broker_available
        families = [
            ("payment_http_requests_total", "counter",
             "HTTP requests answered, by route (unmatched: a path not in the routing table), "
             "method (other: an unknown one) and status.",
             [f'{{route="{r}",method="{m}",status="{s}"}} {n}' for (r, m, s), n in requests]),
            ("payment_http_request_duration_seconds", "histogram", "Time from reading the "
             "request line to the answer written, by route.",
             [s for r, h in durations.items() for s in h.samples(f'route="{r}"')]),
            ("payment_http_connections_refused_total", "counter", "Connections answered 503 "
             "and closed without a request being read, by reason.",
             [f'{{reason="{r}"}} {server.refusals.counts[r]}' for r in CONNECTION_REFUSALS]),
            ("payment_events_acknowledged_total", "counter", "Events acknowledged by Kafka "
             "(answered 200); the event log names each one.", [f" {events['acknowledged']}"]),
            ("payment_events_refused_total", "counter", "Events not acknowledged (answered 503), "
             "by reason.", [f'{{reason="{r}"}} {events[r]}' for r in EVENT_REFUSALS]),
            ("payment_publish_duration_seconds", "histogram", "Time from publishing an event "
             "to its acknowledgement or refusal, by outcome.",
             [s for o, h in publish.items() for s in h.samples(f'outcome="{o}"')]),
            ("payment_events_pending", "gauge", "Events sent to Kafka and not yet "
             "acknowledged or failed.", [f" {server.publisher.pending}"]),
            ("payment_kafka_broker_available", "gauge", "1 if the last publish was "
             "acknowledged, 0 if Kafka failed it.", [f" {broker_available}"]),
            ("payment_http_connections_open", "gauge", "Client connections open now.",
             [f" {len(server._connections)}"]),
            ("payment_build_info", "gauge", "The service's version (the value is always 1).",
             [f'{{version="{__version__}"}} 1'])]
        lines = []
        for name, kind, help_text, values in families:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                      *(name + value for value in values)]
        return Document(PROMETHEUS_TEXT, ("\n".join(lines) + "\n").encode())


def event_log_observer(writer):
    """A publisher observer: a log line for each acknowledged event and its place in Kafka."""
    def observe(event, seconds, outcome):
        if not isinstance(outcome, BrokerUnavailable):
            fields = " ".join([f"{name}={value}" for name, value in event.data.items()])
            writer.write(f"[{clock()[1]}] event acknowledged: {event.type} {fields} topic="
                         f"{outcome.topic} partition={outcome.partition} offset={outcome.offset}")
    return observe


# ===========================================================================
# Layer 5. Kafka beyond localhost: TLS and SASL
# ===========================================================================
# Keeps "settings that cannot work together stop start-up with one line naming the setting,
# not 503s later; the password is never printed" (README: Configuration; docs/kafka-security.md).

class Secret(str):
    """A password: the real text for kafka-python, '***' wherever it is shown."""

    def __repr__(self):
        return "'***'"

    def __str__(self):
        return "***"

    def __format__(self, spec):
        return format("***", spec)


def one_of(*values):
    """A parse function for a setting that is one of values (any case; empty: unset)."""
    def parse(name, text):
        if text.strip() and text.strip().upper() not in values:
            raise SystemExit(f"{name}={text!r} is not one of {', '.join(values)}")
        return text.strip().upper()
    return parse


def printable(name, text):
    if len(text.strip()) > 255 or not text.isprintable():
        raise SystemExit(f"{name} must be at most 255 printable characters")
    return text.strip()


def secret(name, text):
    if "\0" in text:
        raise SystemExit(f"{name} must not contain a NUL character")
    return Secret(text)                 # as given: spaces count


def ca_file(name, path):
    """A readable file of PEM certificates to check the broker's certificate against."""
    if not path.strip():
        return ""
    try:
        if ssl.create_default_context(cafile=path.strip()).cert_store_stats()["x509"]:
            return path.strip()
    except FileNotFoundError:
        raise SystemExit(f"{name}={path!r}: no such file") from None
    except (ssl.SSLError, ValueError):      # no certificate in it (SSLError is an OSError: first)
        pass
    except OSError as exc:                  # PermissionError, IsADirectoryError, ...
        raise SystemExit(f"{name}={path!r} cannot be read: "
                         f"{exc.strerror or type(exc).__name__}") from None
    raise SystemExit(f"{name}={path!r} is not a PEM certificate file")


# Settings that only some protocols use: (kafka-python's keyword, what it needs, those protocols)
SASL_PROTOCOLS = ("SASL_SSL", "SASL_PLAINTEXT")
PROTOCOL_SETTINGS = {
    "KAFKA_SSL_CAFILE": ("ssl_cafile", "TLS", ("SSL", "SASL_SSL")),
    "KAFKA_SASL_MECHANISM": ("sasl_mechanism", "SASL", SASL_PROTOCOLS),
    "KAFKA_SASL_USERNAME": ("sasl_plain_username", "SASL", SASL_PROTOCOLS),
    "KAFKA_SASL_PASSWORD": ("sasl_plain_password", "SASL", SASL_PROTOCOLS)}


def kafka_client_settings(config):
    """(KafkaProducer keyword arguments, start-up words): the security settings, checked."""
    protocol = config.kafka_security_protocol or "PLAINTEXT"
    settings = {"security_protocol": protocol, "client_id": config.kafka_client_id}
    for name, (keyword, needs, protocols) in PROTOCOL_SETTINGS.items():
        value = getattr(config, name.lower())
        if value and protocol not in protocols:
            raise SystemExit(f"{name} is set but KAFKA_SECURITY_PROTOCOL={protocol} does not "
                             f"use {needs}; use {' or '.join(protocols)}, or unset {name}")
        if not value and needs == "SASL" and protocol in protocols:     # SASL needs all three
            raise SystemExit(f"{name} is required when KAFKA_SECURITY_PROTOCOL={protocol}")
        if value:
            settings[keyword] = value
    words = protocol + (f" (CA file {config.kafka_ssl_cafile})" if config.kafka_ssl_cafile else "")
    if protocol in SASL_PROTOCOLS:
        words += f", {config.kafka_sasl_mechanism} as user {config.kafka_sasl_username!r}"
    return settings, words


# ===========================================================================
# The entry point: the layers put together
# ===========================================================================
# What `python3 payment_service.py` runs. Settings are read once, in serve();
# each is named once, in the lesson's SETTINGS or in LAYER_SETTINGS.

def switch(name, text):
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise SystemExit(f"{name}={text!r} is not one of 1, 0, true, false, yes, no, on, off")
    return value in ("1", "true", "yes", "on")


def networks(name, text):
    """FORWARDED_ALLOW_IPS: "*", or addresses and networks separated by commas."""
    try:
        return "*" if text.strip() == "*" else [ipaddress.ip_network(part.strip(), strict=False)
                                                for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"{name}={text!r} is not *, nor IP addresses or networks "
                         f"separated by commas") from None


def origins(name, text):
    """CORS_ALLOW_ORIGINS: "" (no CORS headers), "*", or scheme://host[:port] origins."""
    listed = [part.strip().rstrip("/") for part in text.split(",") if part.strip()]
    if text.strip() == "*" or all(re.fullmatch(r"https?://[^/\s,*]+", o) for o in listed):
        return "*" if text.strip() == "*" else frozenset(listed)
    raise SystemExit(f"{name}={text!r} is not *, nor origins such as http://localhost:5173 "
                     f"separated by commas")


LAYER_SETTINGS = [
    ("MAX_PENDING_EVENTS", "1000", number(int, 1, 10**6),
     "events waiting for the broker at most; past it, 503 at once"),
    ("IDLE_TIMEOUT_S", "120", number(float, 0.1, 3600),
     "an idle keep-alive connection is closed after this (longer than a proxy's)"),
    ("HEADER_TIMEOUT_S", "10", number(float, 0.1, 3600),
     "a request head must arrive within this of its first byte; else 408"),
    ("BODY_TIMEOUT_S", "10", number(float, 0.1, 3600),
     "a request body must arrive within this; else 408"),
    ("MAX_CONNECTIONS", "1000", number(int, 1, 10**6),
     "connections held at most (idle and slow ones closed first; then 503)"),
    ("SHUTDOWN_DELAY_S", "0", number(float, 0, 3600),
     "after SIGTERM, health answers 503 this long while all else is served; then stop"),
    ("FORWARDED_ALLOW_IPS", "127.0.0.1", networks,
     "proxies whose X-Forwarded-For names the client (addresses, networks or *)"),
    ("PIN_CPU", "auto", cpu_choice,
     "run every thread on one CPU: auto (the one it starts on), a number, or off"),
    ("ACCESS_LOG", "1", switch, "one line per request on stderr; 0 turns it off"),
    ("EVENT_LOG", "1", switch, "one line per acknowledged event (partition, offset); 0: off"),
    ("SWAGGER_UI_URL", "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5", lambda name, text: text,
     "where /docs loads Swagger UI's assets from"),
    ("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", one_of("PLAINTEXT", "SSL", "SASL_PLAINTEXT",
                                                    "SASL_SSL"),
     "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    ("KAFKA_SSL_CAFILE", "", ca_file,
     "PEM file of the CAs the broker's certificate is checked against"),
    ("KAFKA_SASL_MECHANISM", "", one_of("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
     "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols)"),
    ("KAFKA_SASL_USERNAME", "", printable, "SASL user name"),
    ("KAFKA_SASL_PASSWORD", "", secret, "SASL password (never printed)"),
    ("KAFKA_CLIENT_ID", "payment-service", printable, "the client id the broker sees"),
    ("CORS_ALLOW_ORIGINS", "", origins,
     "origins whose pages may call the API from a browser: * or a comma-separated list")]
ALL_SETTINGS = SETTINGS + LAYER_SETTINGS


def usage():
    """What --help prints: how to run the service, and its settings."""
    width = max(len(name) for name, *_ in ALL_SETTINGS)
    return (f"payment-service {__version__}: a mock payment processor that publishes "
            f"payment events to Kafka.\n\nusage: [VARIABLE=value ...] python3 "
            f"payment_service.py [--help]\n\nSettings, read from the environment at start-up:\n"
            f"  {'variable':<{width}}  {'default':<15}  meaning\n" +
            "".join(f"  {name:<{width}}  {default or '-':<15}  {meaning}\n"
                    for name, default, _, meaning in ALL_SETTINGS))


def unhealthy_when_stopping(health):
    """health, but 503 once a stop is coming: a load balancer takes the instance out first."""
    @functools.wraps(health)
    def route(server, body):
        if server.draining:
            raise HTTPError(503, "the service is stopping", [("Retry-After", "1")])
        return health(server, body)
    return route


def build_server(config, publisher, log_writer):
    """The layers put together: the server, its routes and its observers."""
    routes = {path: {method: route._replace(function=unhealthy_when_stopping(health))
                     if route.function is health else route for method, route in methods.items()}
              for path, methods in ALL_ROUTES.items()}
    server = PaymentHTTPServer(config, publisher, routes)
    server.swagger_ui_url, server.metrics = config.swagger_ui_url, Metrics(routes)
    server.observers.append(server.metrics.observe_request)
    publisher.observers.append(server.metrics.observe_event)
    if config.access_log:
        server.observers.append(access_log(log_writer))
    if config.event_log:
        publisher.observers.append(event_log_observer(log_writer))
    return server


def start_publisher(publisher, config, producer_settings, stop):
    """Make the producer (slow to import: the server answers meanwhile) and start publishing."""
    if why := publisher.producer.notes.unreachable(within_s=2.0):   # kafka:9092: Compose's
        publisher.producer.broker.began("unreachable", f"Kafka is unreachable: {why}")
    for attempt in itertools.count():
        try:
            return publisher.start(make_producer(config, linger_ms=GROUP_LINGER_MS,
                                                 metrics_enabled=False, **producer_settings))
        except RuntimeError as exc:         # its thread cannot start (a pids limit): retry
            if attempt == 0:
                log.warning("the Kafka producer cannot start its thread (%s); "
                            "retrying every second", exc)
            if stop.wait(1.0):
                return
        except Exception as exc:            # an absent broker is not one of these
            stop.failure = f"the Kafka producer could not be created: {type(exc).__name__}: {exc}"
            return stop.set()


def serve(argv):
    """The full service: settings, the layers, start-up lines, serve, stop on a signal."""
    if argv in (["-h"], ["--help"]):
        return print(usage(), end="")
    if argv:                                    # as argparse does: one line, exit code 2
        print(f"payment_service.py: unknown argument {argv[0]!r} (the settings are "
              f"environment variables: --help lists them)", file=sys.stderr)
        raise SystemExit(2)
    # SIGTERM and SIGINT only set stop, which the main thread waits on: they act at any time.
    stop = threading.Event()
    stop.failure = None
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    config = read_config(os.environ, ALL_SETTINGS)
    producer_settings, security = kafka_client_settings(config)
    if importlib.util.find_spec("kafka") is None:
        raise SystemExit("kafka-python is not installed: pip install -r requirements.txt")
    cpu = pin_to_one_cpu(config.pin_cpu)       # before any thread starts: they inherit it
    stdout, stderr = LogWriter(1), LogWriter(2)
    logging.basicConfig(level=logging.WARNING, handlers=[stderr])
    if resource is not None:                    # each connection takes a descriptor
        with contextlib.suppress(ValueError, OSError):
            hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard_limit, hard_limit))
    publisher = GroupCommitPublisher(config)
    publisher.producer.notes = notes = KafkaNotes(config.kafka_bootstrap)   # kafka-python's
    logging.getLogger("kafka").propagate = False    # log: read, not printed (an outage's
    logging.getLogger("kafka").addHandler(notes)    # one line is ours)
    try:
        server = build_server(config, publisher, stderr)
    except OSError as exc:
        raise SystemExit(f"HOST={config.host} PORT={config.port}: cannot listen there: "
                         f"{exc.strerror or exc}") from None
    stdout.write(banner(config, server.routes, server.server_port,
                        f"{config.kafka_bootstrap} over {security}"))
    if cpu is not None:
        stdout.write(f"every thread runs on CPU {cpu} (PIN_CPU=off lets them spread)")
    stderr.flush(wait_s=1.0)                    # start-up warnings before "listening on"
    stdout.flush(wait_s=1.0)
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http-accept",
                     daemon=True).start()
    threading.Thread(target=start_publisher, args=(publisher, config, producer_settings, stop),
                     name="kafka-start", daemon=True).start()
    while not stop.wait(1.0):       # a signal another thread took wakes no endless wait
        continue
    server.draining = True
    if config.shutdown_delay_s and not stop.failure:
        stdout.write(f"stopping in {config.shutdown_delay_s:g} s: health answers 503 meanwhile")
        stop.clear()
        stop.wait(config.shutdown_delay_s)          # a second signal ends it
    stdout.write("stopping: finishing in-flight requests")
    publisher.producer.stop_by = time.monotonic() + config.kafka_timeout_s   # answered by then
    server.stop(grace_s=config.kafka_timeout_s + 1)
    publisher.close(1.0)
    stderr.close()
    if stop.failure:
        raise SystemExit(stop.failure)
    stdout.write("stopped")
    stdout.close()


if __name__ == "__main__" and sys.argv[1:] != ["--lesson"]:    # the lesson ran above
    serve(sys.argv[1:])
