"""payment-service: a mock payment processor for an e-commerce demo stack.

It creates fake payment intents and, on request, publishes a
``payment.succeeded`` event to Kafka, for local mocking, teaching and demos.
One module on the standard library (``http.server`` and ``json``) plus
kafka-python; run it with ``python payment_service.py``.

Reading order: constants; request validation; the Kafka publisher; the route
handlers and the routing table (ROUTES); the access log; the HTTP layer (a
BaseHTTPRequestHandler subclass and a ThreadingHTTPServer subclass); and
``main()`` last, which reads the environment and owns every live resource.

Delivery semantics: mock-succeed answers 200 only after the broker acknowledged
the event (acks=all). A 503 means it was not acknowledged within
KAFKA_TIMEOUT_S; the event may still arrive later (at-least-once), so consumers
dedupe by order_id.
"""

import email.utils
import http.server
import json
import logging
import os
import queue
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import NamedTuple

__version__ = "1.0.0"

log = logging.getLogger("payment_service")

TOPIC = "payment.events"
EVENT_TYPE = "payment.succeeded"
MAX_ID = 2**63 - 1              # order_id and amount_cents fit a signed 64-bit integer
MAX_BODY_BYTES = 64 * 1024
MAX_LINE_BYTES = 64 * 1024      # request line and each header line
MAX_HEADERS = 100
# The broker API version kafka-python assumes before it has asked the broker.
# Giving one keeps KafkaProducer() from blocking 30 s when no broker is up;
# each connection still negotiates down to what its broker supports.
KAFKA_API_VERSION = (3, 9)


# ---------------------------------------------------------------------------
# Errors and request validation
# ---------------------------------------------------------------------------

class HTTPError(Exception):
    """An error answer: a status, a message for the client, extra headers."""

    def __init__(self, status, detail, headers=()):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = tuple(headers)


class BrokerUnavailable(HTTPError):
    """The event was not acknowledged by the broker in time (503)."""

    def __init__(self, detail):
        super().__init__(503, detail)


class Payment(NamedTuple):
    order_id: int
    amount_cents: int
    currency: str      # three ASCII letters, upper-cased


# Integer literals longer than this are out of range for every field; turning
# them into a value just past the range avoids int() on thousands of digits
# (and Python's limit on int string length).
_LONGEST_INT_LITERAL = len(str(-MAX_ID)) + 1


def _parse_int(literal):
    if len(literal) <= _LONGEST_INT_LITERAL:
        return int(literal)
    return -(MAX_ID + 1) if literal.startswith("-") else MAX_ID + 1


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _object_without_duplicate_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


_JSON_DECODER = json.JSONDecoder(
    parse_int=_parse_int,
    parse_constant=_reject_constant,            # NaN, Infinity, -Infinity
    object_pairs_hook=_object_without_duplicate_keys,
)


def parse_json_object(body):
    """Decode a request body that must be a UTF-8 JSON object (else 400)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "body must be UTF-8 encoded JSON") from None
    try:
        value = _JSON_DECODER.decode(text)
    except RecursionError:
        raise HTTPError(400, "body is nested too deeply to parse") from None
    except ValueError as exc:                   # JSONDecodeError is a ValueError
        raise HTTPError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HTTPError(400, "body must be a JSON object")
    return value


def _required_id(obj, name):
    if name not in obj:
        raise HTTPError(422, f"{name}: field required")
    value = obj[name]
    if type(value) is not int:                  # bool is an int subclass: excluded
        raise HTTPError(422, f"{name}: must be a JSON integer")
    if not 1 <= value <= MAX_ID:
        raise HTTPError(422, f"{name}: must be between 1 and {MAX_ID}")
    return value


def _required_currency(obj):
    if "currency" not in obj:
        raise HTTPError(422, "currency: field required")
    value = obj["currency"]
    if not (type(value) is str and len(value) == 3 and value.isascii() and value.isalpha()):
        raise HTTPError(422, "currency: must be a string of exactly three ASCII letters")
    return value.upper()


def parse_payment(body):
    """The Payment in a POST body, or HTTPError 400/422. Unknown keys are ignored."""
    obj = parse_json_object(body)
    return Payment(
        order_id=_required_id(obj, "order_id"),
        amount_cents=_required_id(obj, "amount_cents"),
        currency=_required_currency(obj),
    )


def event_record(payment):
    """The Kafka key and value (both bytes) announcing that a payment succeeded."""
    value = {
        "type": EVENT_TYPE,
        "order_id": payment.order_id,
        "amount_cents": payment.amount_cents,
        "currency": payment.currency,
    }
    return str(payment.order_id).encode(), json.dumps(value).encode()


# ---------------------------------------------------------------------------
# Kafka
# ---------------------------------------------------------------------------

# kafka-python is imported by make_producer() and EventPublisher.start(), not
# at the top: importing it takes longer than all the rest of start-up, so
# main() does it once the server already answers.

def make_producer(bootstrap, timeout_s):
    """One KafkaProducer for the whole service, bounded by timeout_s everywhere.

    It returns at once even with no broker up (api_version is given) and
    connects on first use. Idempotence is off: an idempotent kafka-python
    producer never recovers from an expired batch or a restarted broker,
    and this service must heal by itself. Delivery is at-least-once.
    """
    from kafka import KafkaProducer

    timeout_ms = int(timeout_s * 1000)
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        api_version=KAFKA_API_VERSION,
        acks="all",
        enable_idempotence=False,
        linger_ms=0,
        max_block_ms=timeout_ms,          # send() waiting for topic metadata
        request_timeout_ms=timeout_ms,    # a broker that stopped answering
        delivery_timeout_ms=timeout_ms,   # retries of a record end with its request
        reconnect_backoff_max_ms=1000,    # notice a returning broker within a second
        metrics_enabled=False,            # nothing reads them; they cost CPU per record
    )


class EventPublisher:
    """Publishes payment events and waits, within a bound, for the broker's ack.

    Records not yet acknowledged are counted; past max_pending (a long outage)
    new events are refused at once with a 503 instead of piling up in memory.
    Requests that come before start() wait for it, within the same bound.
    """

    def __init__(self, timeout_s, max_pending):
        self._timeout_s = timeout_s
        self._max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._broker_ok = True     # last outcome, so the log shows changes, not every 503
        self._producer = None
        self._started = threading.Event()

    def start(self, producer):
        """Publish through this producer from now on."""
        from kafka.errors import KafkaError

        self._kafka_error = KafkaError
        self._producer = producer
        self._started.set()

    @property
    def pending(self):
        return self._pending

    def _reserve(self):
        with self._lock:
            if self._pending >= self._max_pending:
                raise BrokerUnavailable(
                    f"{self._pending} events are already waiting for the broker; try again later")
            self._pending += 1

    def _release(self, _outcome=None):
        with self._lock:
            self._pending -= 1

    def publish(self, payment):
        """Send the event, flush, and return once the broker acknowledged it.

        Raises BrokerUnavailable when that does not happen within the bound.
        """
        deadline = time.monotonic() + self._timeout_s
        key, value = event_record(payment)
        if not self._started.wait(_remaining(deadline)):
            raise BrokerUnavailable("the Kafka producer is still starting")
        self._reserve()
        try:
            future = self._producer.send(TOPIC, key=key, value=value)
        except self._kafka_error as exc:
            self._release()
            self._note_broker_state(ok=False, reason=exc)
            raise BrokerUnavailable(
                f"Kafka is unavailable: {exc}") from None
        future.add_both(self._release)
        try:
            self._producer.flush(timeout=_remaining(deadline))
            future.get(timeout=_remaining(deadline))
        except self._kafka_error as exc:
            self._note_broker_state(ok=False, reason=exc)
            raise BrokerUnavailable(
                f"Kafka did not acknowledge the event within {self._timeout_s:g} s: "
                f"{type(exc).__name__}") from None
        self._note_broker_state(ok=True)

    def _note_broker_state(self, ok, reason=None):
        if ok != self._broker_ok:
            self._broker_ok = ok
            if ok:
                log.warning("Kafka acknowledges events again")
            else:
                log.warning("Kafka is unavailable (%s); mock-succeed answers 503 until it is back",
                            reason)

    def close(self, timeout_s):
        """Deliver what is still pending, within timeout_s, and close."""
        if self._producer is None:
            return
        try:
            self._producer.close(timeout=timeout_s)
        except self._kafka_error:
            log.warning("closing with %d events not acknowledged by Kafka", self._pending)


def _remaining(deadline):
    return max(deadline - time.monotonic(), 0.001)


# ---------------------------------------------------------------------------
# Route handlers and the routing table
# ---------------------------------------------------------------------------
# A handler takes the server (for its publisher) and the raw request body, and
# returns the JSON object of a 200 answer or raises HTTPError.

def health(server, body):
    return {"status": "ok"}


def service_info(server, body):
    return {"service": "payment", "version": __version__}


def create_intent(server, body):
    payment = parse_payment(body)
    return {"payment_id": f"pay_{payment.order_id}",
            "client_secret": f"secret_{payment.order_id}"}


def mock_succeed(server, body):
    payment = parse_payment(body)
    server.publisher.publish(payment)
    return {"status": "ok"}


# path -> {method: handler}. This table is the routing: it is what the request
# handler looks up and what main() prints.
ROUTES = {
    "/health": {"GET": health, "HEAD": health},
    "/payment/health": {"GET": health, "HEAD": health},
    "/v1/_info": {"GET": service_info, "HEAD": service_info},
    "/payment/v1/payments/create-intent": {"POST": create_intent},
    "/payment/v1/payments/mock-succeed": {"POST": mock_succeed},
}


def format_routes(routes):
    """The routing table as text, one 'METHOD  PATH  handler' line per route."""
    rows = [(method, path, handler.__name__)
            for path, methods in routes.items() for method, handler in methods.items()]
    width = max(len(path) for _, path, _ in rows)
    return "\n".join(f"  {method:<5} {path:<{width}}  {name}" for method, path, name in rows)


# ---------------------------------------------------------------------------
# Access log
# ---------------------------------------------------------------------------

class AccessLog:
    """Buffered log lines on stderr, flushed a few times a second.

    One unbuffered write per request costs about a fifth of the throughput;
    a line shows up at most flush_interval_s late.
    """

    def __init__(self, fd=2, flush_interval_s=0.2, enabled=True):
        self.enabled = enabled
        self._stop = threading.Event()
        if enabled:
            self._out = open(fd, "ab", buffering=64 * 1024, closefd=False)
            threading.Thread(target=self._flush_periodically, args=(flush_interval_s,),
                             name="access-log-flusher", daemon=True).start()

    def write(self, line):
        self._out.write(line.encode("utf-8", "backslashreplace") + b"\n")

    def _flush_periodically(self, interval_s):
        while not self._stop.wait(interval_s):
            self.flush()

    def flush(self):
        try:
            self._out.flush()
        except (OSError, ValueError):   # stderr gone: nothing better to do
            pass

    def close(self):
        self._stop.set()
        if self.enabled:
            self.flush()


_CONTROL_CHARS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


class _Clock:
    """The Date header and the access-log time, computed once per second."""

    def __init__(self):
        self._second = None
        self._stamps = ("", "")

    def stamps(self):
        now = int(time.time())
        if now != self._second:
            self._stamps = (email.utils.formatdate(now, usegmt=True),
                            time.strftime("%d/%b/%Y %H:%M:%S", time.localtime(now)))
            self._second = now
        return self._stamps


# ---------------------------------------------------------------------------
# HTTP layer
# ---------------------------------------------------------------------------

class PaymentRequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive requests dispatched through ROUTES.

    BaseHTTPRequestHandler's own request parsing goes through the email
    package and answers errors in HTML; this reads the request line and
    headers itself, with limits, and every answer is JSON with an exact
    Content-Length. All methods go through the routing table, so a known
    path with an unknown method is a 405, not http.server's 501.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"payment-service/{__version__}"
    sys_version = ""
    wbufsize = -1                    # buffer each answer and send it in one write
    disable_nagle_algorithm = True   # no 40 ms Nagle/delayed-ACK stall

    def setup(self):
        super().setup()
        _set_kernel_timeouts(self.connection, self.server.idle_timeout_s)
        self.busy = False
        self.drain_on_close = False
        self.server.track(self)

    def finish(self):
        self.server.untrack(self)
        try:
            super().finish()
        except OSError:                 # the client went away while we flushed
            return
        if self.drain_on_close:
            _drain_input(self.connection)

    def handle(self):
        self.close_connection = True
        try:
            super().handle()
        except _CLIENT_GONE:
            pass                        # the client left or went quiet: close quietly

    # -- reading one request ------------------------------------------------

    def handle_one_request(self):
        self.close_connection = True
        self.body_unread = False
        self.requestline = ""
        self.command = ""
        self.request_version = "HTTP/1.1"   # until the request line says otherwise
        raw = self.rfile.readline(MAX_LINE_BYTES + 1)
        if not raw.endswith(b"\n") and len(raw) <= MAX_LINE_BYTES:
            return                      # closed, or idle past the timeout: close
        self.busy = True
        try:
            self._answer(*self._respond_to(raw))
        finally:
            self.busy = False
        self.wfile.flush()

    def _respond_to(self, raw_requestline):
        """Read the rest of the request and run it: (status, payload, headers)."""
        try:
            self._read_head(raw_requestline)
            handler = self._route()
            body = self._read_body() if self.command == "POST" else b""
            return 200, handler(self.server, body), ()
        except HTTPError as exc:
            return exc.status, {"detail": exc.detail}, exc.headers
        except _CLIENT_GONE:
            raise
        except Exception:
            log.exception("unexpected error answering %r", self.requestline)
            self.close_connection = True
            return 500, {"detail": "internal server error"}, ()

    def _read_head(self, raw):
        if len(raw) > MAX_LINE_BYTES:
            raise HTTPError(414, f"request line longer than {MAX_LINE_BYTES} bytes")
        self.requestline = raw.decode("latin-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            raise HTTPError(400, "malformed request line")
        self.command, self.path, self.request_version = words
        if self.request_version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        self.headers = self._read_headers()
        connection = self.headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        if "transfer-encoding" in self.headers or self.headers.get("content-length", "0") != "0":
            self.body_unread = True

    def _read_headers(self):
        """Header fields as {lower-case name: value}; limits give 431, junk 400."""
        headers = {}
        while True:
            line = self.rfile.readline(MAX_LINE_BYTES + 1)
            if len(line) > MAX_LINE_BYTES:
                raise HTTPError(431, f"header line longer than {MAX_LINE_BYTES} bytes")
            if line in (b"\r\n", b"\n"):
                return headers
            if not line.endswith(b"\n"):
                raise ConnectionAbortedError("closed or timed out in the middle of the headers")
            if len(headers) >= MAX_HEADERS:
                raise HTTPError(431, f"more than {MAX_HEADERS} header fields")
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip() or " " in name:
                raise HTTPError(400, "malformed header line")
            name, value = name.lower(), value.strip()
            if name == "content-length" and headers.get(name, value) != value:
                raise HTTPError(400, "conflicting Content-Length headers")
            headers[name] = value

    def _route(self):
        path = self.path.partition("?")[0]
        methods = ROUTES.get(path)
        if methods is None:
            raise HTTPError(404, f"no route for path {path[:200]!r}")
        handler = methods.get(self.command)
        if handler is None:
            allow = ", ".join(methods)
            raise HTTPError(405, f"method {self.command} not allowed; use {allow}",
                            headers=[("Allow", allow)])
        return handler

    def _read_body(self):
        """The POST body, after the framing and Content-Type checks."""
        if "transfer-encoding" in self.headers:
            raise HTTPError(411, "Content-Length required; chunked bodies are not accepted")
        length_text = self.headers.get("content-length")
        if length_text is None:
            raise HTTPError(411, "Content-Length required")
        if not (length_text.isascii() and length_text.isdigit()):
            raise HTTPError(400, "Content-Length must be a non-negative integer")
        if len(length_text) > 7 or int(length_text) > MAX_BODY_BYTES:
            raise HTTPError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        content_type = self.headers.get("content-type")
        if content_type is not None and \
                content_type.partition(";")[0].strip().lower() != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        length = int(length_text)
        if self.headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        body = self.rfile.read(length) or b""     # None or short: timed out or closed
        if len(body) < length:
            raise HTTPError(408, f"body not received in full within "
                                 f"{self.server.idle_timeout_s:g} s")
        self.body_unread = False
        return body

    # -- answering ----------------------------------------------------------

    def _answer(self, status, payload, extra_headers):
        """Send one JSON answer: status line, headers and body in one write."""
        body = json.dumps(payload).encode()
        if self.body_unread or self.server.stopping:
            self.close_connection = True   # unread bytes would be taken for the next request
        self.drain_on_close = self.close_connection and status >= 400
        date, log_time = self.server.clock.stamps()
        self.send_response_only(status)
        self.send_header("Server", self.server_version)
        self.send_header("Date", date)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra_headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._log_access(status, len(body), log_time)

    def send_error(self, code, message=None, explain=None):
        """http.server's error page, as JSON (kept for any inherited path)."""
        self.close_connection = True
        self._answer(code, {"detail": message or self.responses.get(code, ("error",))[0]}, ())

    def _log_access(self, status, size, log_time):
        access_log = self.server.access_log
        if access_log.enabled:
            access_log.write(
                f'{self.client_address[0]} - - [{log_time}] '
                f'"{self.requestline.translate(_CONTROL_CHARS)}" {status} {size}')


# What a client that vanished or stalled past the idle timeout raises mid-I/O.
_CLIENT_GONE = (ConnectionError, TimeoutError, BlockingIOError)


def _set_kernel_timeouts(sock, seconds):
    """Make a recv or send that waits longer than seconds fail, in the kernel.

    socket.settimeout() would do the same but makes Python poll() before every
    recv and send, which costs about a quarter of the throughput under load.
    A timed-out read looks to the file object like the end of the data
    (readline returns a line without its newline), and the connection closes.
    """
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _drain_input(sock, max_bytes=1024 * 1024, max_s=1.0):
    """After an error answer, read and drop what the client still sends, briefly.

    Closing a socket that has unread input makes the kernel send a reset,
    which can destroy the answer before the client has read it.
    """
    deadline = time.monotonic() + max_s
    try:
        sock.shutdown(socket.SHUT_WR)
        _set_kernel_timeouts(sock, max_s)
        while max_bytes > 0 and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return
            max_bytes -= len(chunk)
    except OSError:
        pass


class PaymentHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, a deep listen backlog, and a graceful stop.

    Threads are reused: a thread whose connection closed waits a while for the
    next one instead of exiting, since starting a thread per connection (the
    accept loop waits for each new thread to run) costs more than the request.
    """

    request_queue_size = 1024   # the default of 5 drops connections under load
    daemon_threads = True       # a stuck connection cannot keep the process alive;
                                # stop() waits for in-flight requests instead
    spare_thread_s = 10.0       # how long a thread without a connection lives on

    def __init__(self, address, publisher, idle_timeout_s=5.0, access_log=None):
        self.publisher = publisher
        self.idle_timeout_s = idle_timeout_s
        self.access_log = access_log or AccessLog(enabled=False)
        self.clock = _Clock()
        self.stopping = False
        self._connections = set()
        self._connections_lock = threading.Lock()
        self._spare_threads = 0
        self._handoff = queue.SimpleQueue()      # (socket, address) for a spare thread
        super().__init__(address, PaymentRequestHandler)

    def process_request(self, request, client_address):
        with self._connections_lock:
            if self._spare_threads:
                self._spare_threads -= 1
                self._handoff.put((request, client_address))
                return
        threading.Thread(target=self._serve_connections, args=(request, client_address),
                         name="connection", daemon=True).start()

    def _serve_connections(self, request, client_address):
        """Serve this connection, then each one handed over, until none comes."""
        while True:
            self.process_request_thread(request, client_address)
            with self._connections_lock:
                self._spare_threads += 1
            try:
                request, client_address = self._handoff.get(timeout=self.spare_thread_s)
            except queue.Empty:
                with self._connections_lock:
                    try:        # handed one just as the wait ended?
                        request, client_address = self._handoff.get_nowait()
                    except queue.Empty:
                        self._spare_threads -= 1
                        return

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name (socket.getfqdn), which
        # can stall start-up for seconds on a machine without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def track(self, handler):
        with self._connections_lock:
            self._connections.add(handler)

    def untrack(self, handler):
        with self._connections_lock:
            self._connections.discard(handler)

    def handle_error(self, request, client_address):
        log.exception("unexpected error on the connection from %s", client_address[0])

    def stop(self, grace_s):
        """Stop accepting, close idle connections, let in-flight requests finish."""
        self.stopping = True
        self.shutdown()
        self.server_close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._connections_lock:
                handlers = list(self._connections)
            if not handlers:
                return True
            for handler in handlers:
                if not handler.busy:
                    _shutdown_quietly(handler.connection)
            time.sleep(0.02)
        return False


def _shutdown_quietly(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ---------------------------------------------------------------------------
# Configuration and main
# ---------------------------------------------------------------------------

class Config(NamedTuple):
    kafka_bootstrap: str
    host: str
    port: int
    kafka_timeout_s: float
    max_pending_events: int
    idle_timeout_s: float
    access_log: bool


def config_from_env(environ):
    """Read the settings once; a malformed value stops the service with a message."""
    def number(name, default, kind, minimum):
        text = environ.get(name, str(default))
        try:
            value = kind(text)
        except ValueError:
            raise SystemExit(f"{name}={text!r} is not a {kind.__name__}") from None
        if not value >= minimum:
            raise SystemExit(f"{name}={text!r} must be at least {minimum}")
        return value

    return Config(
        kafka_bootstrap=environ.get("KAFKA_BOOTSTRAP", "kafka:9092"),
        host=environ.get("HOST", "0.0.0.0"),
        port=number("PORT", 8000, int, 0),
        kafka_timeout_s=number("KAFKA_TIMEOUT_S", 5.0, float, 0.1),
        max_pending_events=number("MAX_PENDING_EVENTS", 1000, int, 1),
        idle_timeout_s=number("IDLE_TIMEOUT_S", 5.0, float, 0.1),
        access_log=environ.get("ACCESS_LOG", "1").lower() not in ("0", "false", "no", "off"),
    )


def main():
    config = config_from_env(os.environ)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every failed reconnect while a broker is down; the
    # publisher logs each change of the broker's state instead.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)

    access_log = AccessLog(enabled=config.access_log)
    publisher = EventPublisher(config.kafka_timeout_s, config.max_pending_events)
    server = PaymentHTTPServer((config.host, config.port), publisher,
                               config.idle_timeout_s, access_log)

    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())

    print(f"payment-service {__version__} routes:\n{format_routes(ROUTES)}", flush=True)
    print(f"listening on http://{config.host}:{server.server_port} "
          f"(Kafka {config.kafka_bootstrap}, topic {TOPIC})", flush=True)
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http-accept").start()
    publisher.start(make_producer(config.kafka_bootstrap, config.kafka_timeout_s))

    stop_requested.wait()
    print("stopping: finishing in-flight requests", flush=True)
    server.stop(grace_s=config.kafka_timeout_s + 1)
    publisher.close(timeout_s=2.0)
    access_log.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
