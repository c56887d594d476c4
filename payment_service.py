"""payment-service: a mock payment processor for an e-commerce demo stack.

It creates fake payment intents and, on request, publishes a
``payment.succeeded`` event to Kafka, for local mocking, teaching and demos.
One module on the standard library (``http.server`` and ``json``) plus
kafka-python. Run it with::

    KAFKA_BOOTSTRAP=localhost:9092 python payment_service.py

Guarantees:
- mock-succeed answers 200 only after the broker acknowledged that very event
  (acks=all). A 503 means it was not acknowledged within KAFKA_TIMEOUT_S; the
  event may still arrive later (at-least-once), so consumers dedupe by order_id.
- Every answer is JSON, errors included: ``{"detail": "..."}``. Bad input is a
  400 (not a JSON object) or a 422 (a field breaks a rule) and publishes nothing.
- Waits are bounded: no request waits for Kafka longer than KAFKA_TIMEOUT_S.

Reading guide (the file is the lesson, top to bottom):
1. The API: the route handlers and ROUTES, the routing table.
2. Validation: what makes a request a 400 or a 422.
3. Kafka: publish() (send, flush, then wait for this record's ack), then the
   bound on pending events, the broker-state log and the producer's settings.
4. Configuration and main(): the environment, read once, and start-up.
5. The HTTP plumbing: why http.server needs a little help, the request handler
   (dispatch, send_json) and the server, then the hardening and the
   performance measures, each with what it bought.
"""

import contextlib
import email.utils
import errno
import http.server
import importlib.util
import io
import ipaddress
import itertools
import json
import logging
import os
import queue
import re
import selectors
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import NamedTuple

try:
    import resource                 # POSIX only
except ImportError:
    resource = None

__version__ = "1.0.0"

log = logging.getLogger("payment_service")

TOPIC = "payment.events"
EVENT_TYPE = "payment.succeeded"
MAX_ID = 2**63 - 1              # order_id and amount_cents fit a signed 64-bit integer
MAX_BODY_BYTES = 64 * 1024
MAX_LINE_BYTES = 64 * 1024      # request line and each header line
MAX_HEADERS = 100


# ===========================================================================
# 1. The API: route handlers and the routing table
# ===========================================================================
# A handler takes the server (for its publisher) and the raw request body, and
# returns the JSON object of a 200 answer, or raises HTTPError (section 2) for
# any other status.

def health(server, body):
    return {"status": "ok"}


def service_info(server, body):
    return {"service": "payment", "version": __version__}


def create_intent(server, body):
    payment = parse_payment(body)                       # 400 / 422
    return {"payment_id": f"pay_{payment.order_id}",
            "client_secret": f"secret_{payment.order_id}"}


def mock_succeed(server, body):
    payment = parse_payment(body)                       # 400 / 422
    server.publisher.publish(payment)                   # 503 unless Kafka acknowledged it
    return {"status": "ok"}


# path -> {method: handler}. This table is the routing: the request handler
# looks requests up in it (404 for an unknown path, 405 with Allow for a known
# path and another method) and main() prints it at start-up.
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


# ===========================================================================
# 2. Validation: 400 for a body that is not a JSON object, 422 for bad fields
# ===========================================================================

class HTTPError(Exception):
    """An error answer: a status, a message for the client, extra headers."""

    def __init__(self, status, detail, headers=()):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = tuple(headers)


class Payment(NamedTuple):
    order_id: int
    amount_cents: int
    currency: str      # three ASCII letters, upper-cased


def parse_payment(body):
    """The Payment in a POST body, or HTTPError 400/422. Unknown keys are ignored."""
    obj = parse_json_object(body)
    return Payment(
        order_id=require_int64(obj, "order_id"),
        amount_cents=require_int64(obj, "amount_cents"),
        currency=require_currency(obj),
    )


def parse_json_object(body):
    """Decode a request body that must be a UTF-8 JSON object (else 400)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "body must be UTF-8 encoded JSON") from None
    try:
        value = STRICT_JSON.decode(text)
    except RecursionError:
        raise HTTPError(400, "body is nested too deeply to parse") from None
    except ValueError as exc:                   # JSONDecodeError is a ValueError
        raise HTTPError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HTTPError(400, "body must be a JSON object")
    return value


def require_int64(obj, name):
    """obj[name] as a JSON integer from 1 to 2**63-1 (not a bool, float or string), else 422."""
    if name not in obj:
        raise HTTPError(422, f"{name}: field required")
    value = obj[name]
    if type(value) is not int:                  # bool is an int subclass: excluded
        raise HTTPError(422, f"{name}: must be a JSON integer")
    if not 1 <= value <= MAX_ID:
        raise HTTPError(422, f"{name}: must be between 1 and {MAX_ID}")
    return value


def require_currency(obj):
    """obj["currency"] as three ASCII letters, upper-cased, else 422."""
    if "currency" not in obj:
        raise HTTPError(422, "currency: field required")
    value = obj["currency"]
    if not (type(value) is str and len(value) == 3 and value.isascii() and value.isalpha()):
        raise HTTPError(422, "currency: must be a string of exactly three ASCII letters")
    return value.upper()


# The JSON decoder behind parse_json_object: stricter than json.loads, which
# takes NaN and Infinity, keeps the last of duplicate keys, and runs int() on a
# literal of any length.

def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _object_without_duplicate_keys(pairs):
    """A duplicate key is a 400: an ambiguous amount is worse than a rejected one."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


# Integer literals longer than this are out of range for every field; turning
# them into a value just past the range avoids int() on thousands of digits
# (and Python's limit on int string length).
_LONGEST_INT_LITERAL = len(str(-MAX_ID)) + 1


def _parse_int(literal):
    if len(literal) <= _LONGEST_INT_LITERAL:
        return int(literal)
    return -(MAX_ID + 1) if literal.startswith("-") else MAX_ID + 1


STRICT_JSON = json.JSONDecoder(
    parse_int=_parse_int,
    parse_constant=_reject_constant,            # NaN, Infinity, -Infinity
    object_pairs_hook=_object_without_duplicate_keys,
)


# ===========================================================================
# 3. Kafka: publish, then answer 200 only on the broker's acknowledgement
# ===========================================================================

class BrokerUnavailable(HTTPError):
    """The event was not acknowledged by the broker (503)."""

    def __init__(self, detail):
        super().__init__(503, detail)


def payment_succeeded_record(payment):
    """The Kafka key and value (both bytes) announcing that a payment succeeded."""
    value = {
        "type": EVENT_TYPE,
        "order_id": payment.order_id,
        "amount_cents": payment.amount_cents,
        "currency": payment.currency,
    }
    return str(payment.order_id).encode(), json.dumps(value).encode()


class EventPublisher:
    """Publishes payment events and waits, within a bound, for the broker's ack."""

    def __init__(self, timeout_s, max_pending):
        self._timeout_s = timeout_s
        self._max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._broker_ok = True     # last outcome, so the log shows changes, not every 503
        self._producer = None
        self._started = threading.Event()

    def publish(self, payment):
        """Send the event, flush, and return once the broker acknowledged it.

        Raises BrokerUnavailable (503) when that does not happen within the bound.
        """
        deadline = time.monotonic() + self._timeout_s
        key, value = payment_succeeded_record(payment)
        if not self._started.wait(_remaining(deadline)):
            raise BrokerUnavailable("the Kafka producer is still starting")
        self._take_pending_slot()                            # 503 at once past the bound
        try:
            # 1. send(): queue the record; returns a future for this record.
            future = self._producer.send(TOPIC, key=key, value=value)
        except self._kafka_error as exc:                     # no metadata in time, ...
            self._free_pending_slot()
            self._note_broker_state(ok=False, reason=exc)
            raise BrokerUnavailable(f"Kafka is unavailable: {exc}") from None
        future.add_both(self._free_pending_slot)
        try:
            # 2. flush(): push it to the broker now rather than after linger_ms.
            self._producer.flush(timeout=_remaining(deadline))
            # 3. future.get(): this record's own outcome. A flush alone returns
            #    quietly even when the record failed, so only the ack means 200.
            future.get(timeout=_remaining(deadline))
        except self._kafka_error as exc:
            self._note_broker_state(ok=False, reason=exc)
            raise BrokerUnavailable(self._failure_detail(exc)) from None
        self._note_broker_state(ok=True)

    def _failure_detail(self, exc):
        """What the 503 says happened: no ack in time, a refusal, or no connection."""
        kafka_errors = sys.modules["kafka.errors"]
        name = type(exc).__name__
        if isinstance(exc, kafka_errors.KafkaTimeoutError):
            return f"Kafka did not acknowledge the event within {self._timeout_s:g} s ({name})"
        if isinstance(exc, kafka_errors.BrokerResponseError):
            return f"the Kafka broker refused the event: {name}"
        return f"Kafka could not be reached to deliver the event: {name}"

    # -- the pending bound: a long outage must not pile events up in memory ---

    @property
    def pending(self):
        """Records sent and not yet acknowledged or failed."""
        return self._pending

    def _take_pending_slot(self):
        with self._lock:
            if self._pending >= self._max_pending:
                raise BrokerUnavailable(
                    f"{self._pending} events are already waiting for the broker; try again later")
            self._pending += 1

    def _free_pending_slot(self, _outcome=None):
        with self._lock:
            self._pending -= 1

    # -- the broker's state, logged when it changes (not once per 503) -------
    # With hysteresis: "unavailable" at the first failure, "again" only once
    # no failure came for RECOVERED_AFTER_S, so a flapping broker logs one
    # pair of lines per outage, not one per request (was 1,080-2,440 a minute).

    RECOVERED_AFTER_S = 10.0
    _last_failure = float("-inf")

    def _note_broker_state(self, ok, reason=None):
        if ok:
            if self._broker_ok or time.monotonic() - self._last_failure < self.RECOVERED_AFTER_S:
                return
        else:
            self._last_failure = time.monotonic()
            if not self._broker_ok:
                return
        with self._lock:
            if ok == self._broker_ok:
                return
            self._broker_ok = ok
        if ok:
            log.warning("Kafka acknowledges events again (no failure for %g s)",
                        self.RECOVERED_AFTER_S)
        else:
            log.warning("Kafka is unavailable (%s); mock-succeed answers 503 until it is back",
                        reason)

    # -- start and close -------------------------------------------------------

    def start(self, producer):
        """Publish through this producer from now on. Requests that came
        earlier wait for this, within their bound."""
        from kafka.errors import KafkaError

        self._kafka_error = KafkaError
        self._producer = producer
        self._started.set()

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


# The broker API version kafka-python assumes before it has asked the broker.
# Giving one keeps KafkaProducer() from blocking 30 s when no broker is up;
# each connection still negotiates down to what its broker supports.
KAFKA_API_VERSION = (3, 9)


def make_producer(bootstrap, timeout_s):
    """One KafkaProducer for the whole service, bounded by timeout_s everywhere.

    It returns at once even with no broker up (api_version is given) and
    connects on first use. Idempotence is off: an idempotent kafka-python
    producer never recovers from an expired batch or a restarted broker,
    and this service must heal by itself. Delivery is at-least-once.

    kafka-python is imported here and in EventPublisher.start(), not at the
    top: importing it takes longer than all the rest of start-up, so main()
    does it once the server already answers.
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


# ===========================================================================
# 4. Configuration and main()
# ===========================================================================

# The settings: (variable, default, meaning). config_from_env() reads them and
# `python payment_service.py --help` prints them.
SETTINGS = [
    ("KAFKA_BOOTSTRAP", "kafka:9092", "Kafka bootstrap servers, host:port[,host:port]"),
    ("HOST", "127.0.0.1", "address to listen on (the image sets 0.0.0.0)"),
    ("PORT", "8000", "port to listen on (0: any free port)"),
    ("KAFKA_TIMEOUT_S", "5", "the longest mock-succeed waits for the broker; then 503"),
    ("MAX_PENDING_EVENTS", "1000", "events waiting for the broker at most; past it, 503 at once"),
    ("IDLE_TIMEOUT_S", "5", "an idle keep-alive connection is closed after this"),
    ("HEADER_TIMEOUT_S", "10", "a request head must arrive within this of its first byte; else 408"),
    ("BODY_TIMEOUT_S", "10", "a request body must arrive within this; else 408"),
    ("MAX_CONNECTIONS", "1000", "connections held at most (idle ones closed first; then 503)"),
    ("ACCESS_LOG", "1", "one line per request on stderr; 0 turns it off"),
]
DEFAULTS = {name: default for name, default, _ in SETTINGS}


class Config(NamedTuple):
    kafka_bootstrap: str
    host: str
    port: int
    kafka_timeout_s: float
    max_pending_events: int
    idle_timeout_s: float
    access_log: bool
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_connections: int = 1000


MAX_TIMEOUT_S = 3600.0


def config_from_env(environ):
    """Read the settings once; a malformed value stops the service with a
    one-line message naming the setting (SystemExit: exit code 1)."""
    def text(name):
        return environ.get(name, DEFAULTS[name])

    def number(name, kind, minimum, maximum):
        try:
            value = kind(text(name))
        except ValueError:
            raise SystemExit(f"{name}={text(name)!r} is not a{'n' * (kind is int)} "
                             f"{'integer' if kind is int else 'number'}") from None
        if not minimum <= value <= maximum:         # NaN and inf fail here too
            raise SystemExit(f"{name}={text(name)!r} must be from {minimum:g} to {maximum:g}")
        return value

    return Config(
        kafka_bootstrap=bootstrap_servers(text("KAFKA_BOOTSTRAP")),
        host=ip_address(text("HOST")),
        port=number("PORT", int, 0, 65535),
        kafka_timeout_s=number("KAFKA_TIMEOUT_S", float, 0.1, MAX_TIMEOUT_S),
        max_pending_events=number("MAX_PENDING_EVENTS", int, 1, 10**6),
        idle_timeout_s=number("IDLE_TIMEOUT_S", float, 0.1, MAX_TIMEOUT_S),
        access_log=switch("ACCESS_LOG", text("ACCESS_LOG")),
        header_timeout_s=number("HEADER_TIMEOUT_S", float, 0.1, MAX_TIMEOUT_S),
        body_timeout_s=number("BODY_TIMEOUT_S", float, 0.1, MAX_TIMEOUT_S),
        max_connections=number("MAX_CONNECTIONS", int, 1, 10**6),
    )


def bootstrap_servers(text):
    """KAFKA_BOOTSTRAP as host:port[,host:port...], port 1-65535 ([v6]:port too)."""
    for server in text.split(","):
        host, colon, port = server.strip(" ").rpartition(":")
        if not (colon and host and port.isascii() and port.isdigit()
                and 1 <= int(port) <= 65535) or _BAD_HOST.search(host):
            raise SystemExit(f"KAFKA_BOOTSTRAP={text!r}: {server!r} is not host:port "
                             f"(port 1-65535; several are separated by commas)")
    return text


_BAD_HOST = re.compile(r"[\s/@?#]")


def ip_address(text):
    """HOST as an IPv4 or IPv6 address (no names: they resolve differently per host)."""
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise SystemExit(f"HOST={text!r} is not an IP address "
                         f"(0.0.0.0 or :: for every address, 127.0.0.1 or ::1 for this host)") from None


def switch(name, text):
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise SystemExit(f"{name}={text!r} is not one of 1, 0, true, false, yes, no, on, off")
    return value in ("1", "true", "yes", "on")


def usage():
    """What --help prints: how to run the service, and its settings."""
    width = max(len(name) for name, _, _ in SETTINGS)
    rows = "\n".join(f"  {name:<{width}}  {default:<10}  {meaning}"
                     for name, default, meaning in SETTINGS)
    return (f"payment-service {__version__}: a mock payment processor that publishes "
            f"{EVENT_TYPE} events to Kafka.\n\n"
            f"usage: [VARIABLE=value ...] python payment_service.py\n\n"
            f"Settings, read from the environment at start-up:\n"
            f"  {'variable':<{width}}  {'default':<10}  meaning\n{rows}\n")


def warn_if_unresolvable(bootstrap):
    """Say once, at start-up, when a bootstrap host has no address: the
    default kafka:9092 only resolves inside Docker Compose."""
    for server in bootstrap.split(","):
        host = server.strip().rpartition(":")[0].strip("[]")
        try:
            socket.getaddrinfo(host, None)
        except (socket.gaierror, UnicodeError):
            log.warning("KAFKA_BOOTSTRAP host %r does not resolve: mock-succeed answers 503 "
                        "until it does (outside Docker Compose, try KAFKA_BOOTSTRAP=localhost:9092)",
                        host)


def main():
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(usage(), end="")
        return
    # SIGTERM and SIGINT only set this; the main thread only ever waits on it,
    # so they act in every state, start-up included.
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    config = config_from_env(os.environ)
    if importlib.util.find_spec("kafka") is None:
        raise SystemExit("kafka-python is not installed: pip install -r requirements.txt")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every failed reconnect while a broker is down; the
    # publisher logs each change of the broker's state instead.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)

    raise_descriptor_limit()
    access_log = AccessLog(enabled=config.access_log)
    publisher = EventPublisher(config.kafka_timeout_s, config.max_pending_events)
    try:
        server = PaymentHTTPServer((config.host, config.port), publisher,
                                   config.idle_timeout_s, access_log, config.max_connections,
                                   config.header_timeout_s, config.body_timeout_s)
    except OSError as exc:
        raise SystemExit(f"HOST={config.host} PORT={config.port}: cannot listen there: "
                         f"{exc.strerror or exc}") from None

    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"payment-service {__version__} routes:\n{format_routes(ROUTES)}", flush=True)
    print(f"listening on http://{host}:{server.server_port} "
          f"(Kafka {config.kafka_bootstrap}, topic {TOPIC})", flush=True)
    # Serve first, then import kafka-python and make the producer: /health
    # answers within ~60 ms of start; mock-succeed waits for the producer.
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http-accept",
                     daemon=True).start()
    failed = []

    def start_publisher():          # off the main thread: importing kafka-python takes a while
        warn_if_unresolvable(config.kafka_bootstrap)
        for attempt in itertools.count():
            try:
                return publisher.start(make_producer(config.kafka_bootstrap,
                                                     config.kafka_timeout_s))
            except RuntimeError as exc:     # its thread cannot start (a pids limit): retry
                if attempt == 0:
                    log.warning("the Kafka producer cannot start its thread (%s); "
                                "retrying every second", exc)
                if stop_requested.wait(1.0):
                    return
            except Exception as exc:        # an absent broker is not one of these
                failed.append(f"the Kafka producer could not be created: "
                              f"{type(exc).__name__}: {exc}")
                return stop_requested.set()

    threading.Thread(target=start_publisher, name="kafka-start", daemon=True).start()

    stop_requested.wait()
    print("stopping: finishing in-flight requests", flush=True)
    server.stop(grace_s=config.kafka_timeout_s + 1)
    publisher.close(timeout_s=2.0)
    access_log.close()
    if failed:
        raise SystemExit(failed[0])
    print("stopped", flush=True)


# ===========================================================================
# 5. The HTTP plumbing
# ===========================================================================
# Everything above is the service. What follows makes http.server fit to face
# real clients. Out of the box, BaseHTTPRequestHandler speaks HTTP/1.0, answers
# errors with an HTML page, answers 501 for a method it has no do_<METHOD> for,
# parses headers leniently through the email package, waits forever on a
# silent client and listens with a backlog of 5. Here every request goes
# through dispatch() and the routing table (so a known path with another
# method is a 405, not a 501), every answer is JSON sent by send_json(), the
# request head is read with limits, and every wait has a deadline. Then come
# the hardening measures (a bound on connections and threads, deadlines for
# the request head and body, what happens out of threads or descriptors) and
# the performance measures, each with the figure it bought.

class PaymentRequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive requests dispatched through ROUTES."""

    protocol_version = "HTTP/1.1"
    server_version = f"payment-service/{__version__}"
    sys_version = ""
    wbufsize = -1                    # buffer each answer and send it in one write
    disable_nagle_algorithm = True   # no 40 ms Nagle/delayed-ACK stall

    def handle_one_request(self):
        """Read one request, dispatch it, send its answer."""
        self.close_connection = True
        self.body_unread = False
        self.requestline = ""
        self.command = ""
        self.request_version = "HTTP/1.1"   # until the request line says otherwise
        if self.server.stopping:
            return
        try:
            raw = self.rfile.readline(MAX_LINE_BYTES + 1)
            if raw in (b"\r\n", b"\n"):     # RFC 9112 2.2: one empty line before a request
                raw = self.rfile.readline(MAX_LINE_BYTES + 1)   # is ignored; two are a 400
        except RequestTimeout as exc:   # bytes trickled in, no request line by the deadline
            self.send_json(exc.status, {"detail": exc.detail})
            self.wfile.flush()
            return
        if not raw.endswith(b"\n") and len(raw) <= MAX_LINE_BYTES:
            return                      # closed, or idle past the timeout: close
        self.send_json(*self.dispatch(raw))
        self.wfile.flush()
        if not self.close_connection:
            self.server.end_request(self)

    def dispatch(self, raw_requestline):
        """Read the rest of the request and run its handler: (status, payload, headers)."""
        try:
            self.read_request_head(raw_requestline)
            handler = self.find_handler()
            body = self.read_body() if self.command == "POST" else b""
            return 200, handler(self.server, body), ()
        except HTTPError as exc:
            return exc.status, {"detail": exc.detail}, exc.headers
        except CLIENT_GONE_ERRORS:
            raise
        except Exception:
            log.exception("unexpected error answering %r", self.requestline)
            self.close_connection = True
            return 500, {"detail": "internal server error"}, ()

    def find_handler(self):
        """The handler ROUTES has for this path and method (the query string is
        ignored), or HTTPError 404 / 405 with Allow."""
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

    def send_json(self, status, payload, extra_headers=()):
        """Send one JSON answer: status line, headers and body in one write."""
        body = json.dumps(payload).encode()
        if self.body_unread or self.server.stopping:
            self.close_connection = True   # unread bytes would be taken for the next request
        self.drain_on_close = self.close_connection and status >= 400
        date, log_time = self.server.timestamps.now()
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
        self.log_access(status, len(body), log_time)

    def send_error(self, code, message=None, explain=None):
        """http.server's HTML error page, as JSON (kept for any inherited path)."""
        self.close_connection = True
        self.send_json(code, {"detail": message or self.responses.get(code, ("error",))[0]})

    def log_access(self, status, size, log_time):
        access_log = self.server.access_log
        if access_log.enabled:
            access_log.write(
                f'{self.client_address[0]} - - [{log_time}] '
                f'"{self.requestline.translate(_CONTROL_CHARS)}" {status} {size}')

    # -- the connection's life -------------------------------------------------

    def setup(self):
        # StreamRequestHandler.setup, with the input read through a
        # DeadlineReader (see "hardening: deadlines" below).
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        set_socket_timeouts(self.connection, self.server.idle_timeout_s)
        self.reader = DeadlineReader(self.connection, self.server.idle_timeout_s,
                                     self.server.header_timeout_s)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = self.connection.makefile("wb", self.wbufsize)
        self.in_request = False         # between a complete request head and its answer
        self.evicted = False            # closed by the server to make room, or by stop()
        self.drain_on_close = False
        self.server.track(self)

    def handle(self):
        self.close_connection = True
        try:
            super().handle()
        except CLIENT_GONE_ERRORS:
            pass                        # the client left or went quiet: close quietly

    def finish(self):
        self.server.untrack(self)
        try:
            super().finish()
        except OSError:                 # the client went away while we flushed
            return
        if self.drain_on_close:
            drain_input(self.connection)

    # -- hardening: the request head and body, read strictly and with limits --
    # As RFC 9112 says: only SP and HTAB are whitespace (str.split() and strip()
    # without arguments also take \xa0, \x85, VT, FF, ...), a bare CR or a NUL
    # in a field is a 400, an absolute-form target routes by its path, and
    # Connection is a list of tokens.

    def read_request_head(self, raw):
        """Parse the request line and the header fields: 400, 414, 431, 505."""
        if len(raw) > MAX_LINE_BYTES:
            raise HTTPError(414, f"request line longer than {MAX_LINE_BYTES} bytes")
        self.requestline = raw.decode("latin-1").rstrip("\r\n")
        words = self.requestline.split(" ")
        if len(words) != 3 or "" in words:          # not single spaces: SP/HTAB runs
            words = _SP_HTAB_RUN.split(self.requestline.strip(" \t"))
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            raise HTTPError(400, "malformed request line")
        self.command, target, self.request_version = words
        if self.request_version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        if target[:1] != "/" and target[:7].lower() in ("http://", "https:/"):
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        self.path = target                          # absolute-form: routed by its path
        self.headers = self.read_headers()
        connection = self.headers.get("connection")
        if connection is not None:          # a list of tokens: "notclosed" is not "close"
            connection = {token.strip(" \t").lower() for token in connection.split(",")}
        if self.request_version == "HTTP/1.1":
            self.close_connection = connection is not None and "close" in connection
        else:
            self.close_connection = connection is None or "keep-alive" not in connection
        if "transfer-encoding" in self.headers or self.headers.get("content-length", "0") != "0":
            self.body_unread = True
        self.reader.done()
        self.server.begin_request(self)             # from here on, never evicted

    def read_headers(self):
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
            field = _FIELD_LINE.fullmatch(line)     # name ":" OWS value OWS CRLF
            if field is None:
                raise HTTPError(400, "malformed header line")
            name = field[1].decode("ascii").lower()
            value = field[2].rstrip(b" \t").decode("latin-1")
            if name == "content-length" and headers.get(name, value) != value:
                raise HTTPError(400, "conflicting Content-Length headers")
            if name == "connection" and name in headers:
                value = f"{headers[name]}, {value}"     # a list: the fields combine
            headers[name] = value

    def read_body(self):
        """The POST body, after the framing and Content-Type checks: 408, 411, 413, 415."""
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
                content_type.partition(";")[0].strip(" \t").lower() != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        length = int(length_text)
        if self.headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        self.reader.await_body(self.server.body_timeout_s)
        try:
            body = self.rfile.read(length) or b""     # None or short: timed out or closed
        except TimeoutError:                          # the settimeout() fallback
            body = b""
        finally:
            self.reader.done()
        if len(body) < length:
            raise HTTPError(408, f"body not received in full: nothing came for "
                                 f"{self.server.idle_timeout_s:g} s")
        self.body_unread = False
        return body


_SP_HTAB_RUN = re.compile(r"[ \t]+")
# A header field line (RFC 9112 5): a token, a colon, the value between
# optional SP/HTAB; a bare CR, LF or NUL anywhere makes it no match (400).
# Possessive quantifiers (Python 3.11) keep it linear on a 64 KiB line.
_FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]++):[ \t]*+([^\r\n\x00]*+)\r?\n")

# What a client that vanished or stalled past the idle timeout raises mid-I/O.
CLIENT_GONE_ERRORS = (ConnectionError, TimeoutError, BlockingIOError)


class PaymentHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, within a bound; a deep listen backlog; a graceful stop."""

    request_queue_size = 4096   # the default of 5 drops connections under load, and a
                                # full backlog drops a fresh client's SYN (1 s to retry)
    daemon_threads = True       # a stuck connection cannot keep the process alive;
                                # stop() waits for in-flight requests instead
    spare_thread_s = 10.0       # how long a thread without a connection lives on

    def __init__(self, address, publisher, idle_timeout_s=5.0, access_log=None,
                 max_connections=1000, header_timeout_s=10.0, body_timeout_s=10.0):
        self.publisher = publisher
        self.idle_timeout_s = idle_timeout_s
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.access_log = access_log or AccessLog(enabled=False)
        self.timestamps = TimestampCache()
        self.stopping = False
        self.max_connections = connection_bound(max_connections)
        self._connections = {}      # handler -> None, the longest waiting first
        self._connections_lock = threading.Lock()
        self._queued = 0            # accepted connections not yet taken by a thread
        self._connection_threads = 0           # connection threads alive
        self._spare_threads = 0     # of those, threads waiting for a connection
        self._threads_peak = 0      # most connection threads since memory was last released
        self._handoff = queue.SimpleQueue()      # (socket, address) for a thread
        self._thread_shortage = None             # ThreadShortage while threads cannot start
        self._accept_paused_at = None            # when accept() last ran out of descriptors
        self._deferring = 0.0                    # since when TCP_DEFER_ACCEPT is on (at the bound)
        self._refused = Refuser()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, PaymentRequestHandler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name (socket.getfqdn), which
        # can stall start-up for seconds on a machine without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def track(self, handler):
        with self._connections_lock:
            self._connections[handler] = None

    def untrack(self, handler):
        with self._connections_lock:
            self._connections.pop(handler, None)

    def handle_error(self, request, client_address):
        log.exception("unexpected error on the connection from %s", client_address[0])

    def stop(self, grace_s):
        """Stop accepting; close at once every connection not inside a request
        (idle, or still sending its head); let requests being handled finish."""
        self.stopping = True
        self.shutdown()
        self.server_close()
        deadline = time.monotonic() + grace_s
        while True:
            with self._connections_lock:
                waiting = []
                for handler in self._connections:       # as _evictable(), for all of them
                    if not handler.in_request and not handler.evicted:
                        handler.evicted = True
                        if handler.in_request:
                            handler.evicted = False
                        else:
                            waiting.append(handler)
                left = len(self._connections)
            for handler in waiting:
                _shutdown_quietly(handler.connection)
            if not left or time.monotonic() >= deadline:
                self._refused.close()
                return not left
            time.sleep(0.02)

    # -- hardening: a bound on connections and threads -------------------------
    # Each connection keeps its thread (the fastest path for keep-alive: no
    # handoff per request), and threads are what run out: memory (about
    # 35 KiB each), a container's pids limit, file descriptors. So at most
    # max_connections are held. At the bound a new client still gets its
    # answer at once: the connection that has waited longest without being
    # inside a request (idle between keep-alive requests, or not done sending
    # its head) is closed to make room, as nginx frees idle keep-alive
    # connections; only when every one is inside a request does the newcomer
    # get a 503 with Connection: close (uvicorn's --limit-concurrency). And
    # connections that send nothing wait in the kernel meanwhile (below).
    # Before: 10,000 idle connections, replaced as they closed, made 10,005
    # threads, fresh clients failed from t=13 s and none was answered after;
    # after: at most 1,020 threads, 57 of 57 fresh clients answered during the
    # 30 s and 6 of 6 after, RSS back to 38 MiB (33 before).

    def begin_request(self, handler):
        """The handler has read a whole request head: no longer evicted.

        No lock on this path: the handler sets in_request and then reads
        evicted; _evictable() sets evicted and then reads in_request. One of
        the two sees the other's write; only then is the lock needed."""
        handler.in_request = True
        if handler.evicted:
            with self._connections_lock:        # _evictable() has decided by now
                if handler.evicted:
                    raise ConnectionAbortedError("closed to make room for another connection")

    def end_request(self, handler):
        """Answered; the connection waits for its next request, last in line."""
        with self._connections_lock:
            handler.in_request = False
            if self._connections.pop(handler, 0) is None:
                self._connections[handler] = None

    def _defer_silent_connections(self, on, held):
        """At the bound, new connections that send nothing wait in the kernel
        (TCP_DEFER_ACCEPT, nginx's "deferred"), not in the accept queue: a
        flood of 10,000 idle connections otherwise keeps the backlog full and
        fresh clients' SYNs are dropped. Off below half the bound, after 30 s at least."""
        self._deferring = time.monotonic() if on else 0.0
        if on:
            log.warning("%d connections, the most this server holds (MAX_CONNECTIONS): closing "
                        "idle ones to make room; new ones that send nothing wait", held)
        else:
            log.warning("%d connections: below half of MAX_CONNECTIONS again", held)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT,
                                       max(int(self.idle_timeout_s), 1) if on else 0)

    def _evictable(self):
        """The connection waiting longest outside a request, marked evicted, or None."""
        for handler in self._connections:
            if not handler.in_request and not handler.evicted:
                handler.evicted = True
                if handler.in_request:          # its request began meanwhile: keep it
                    handler.evicted = False
                    continue
                del self._connections[handler]
                return handler
        return None

    # -- performance: reuse connection threads ---------------------------------
    # Starting a thread per connection (the accept loop waits for each new
    # thread to run) costs more than the request itself: a thread whose
    # connection closed waits spare_thread_s for the next one instead.

    def process_request(self, request, client_address):
        """Give the connection to a spare or new thread, within the bound."""
        victim = start = None
        with self._connections_lock:
            bound, thread_cap = self._bounds()
            held = len(self._connections) + self._queued
            if self._deferring:
                if held < bound // 2 and time.monotonic() - self._deferring > 30:
                    self._defer_silent_connections(False, held)
            elif held >= bound:
                self._defer_silent_connections(True, held)
            if held >= bound:
                victim = self._evictable()
                if victim is None:
                    self._refuse(request, f"{len(self._connections)} requests are "
                                          f"being handled, the most this server takes")
                    return
            self._queued += 1
            if self._queued > self._spare_threads and self._connection_threads < thread_cap:
                self._connection_threads += 1
                self._threads_peak = max(self._threads_peak, self._connection_threads)
                start = True
        if victim is not None:
            _shutdown_quietly(victim.connection)
        if start:
            try:
                threading.Thread(target=self._serve_connections, name="connection",
                                 daemon=True).start()
            except RuntimeError as exc:          # "can't start new thread": pids, memory
                with self._connections_lock:
                    self._connection_threads -= 1
                    self._queued -= 1
                    self._threads_ran_out(exc)
                    self._refuse(request, "the server cannot start a thread for "
                                          "another connection now")
                return
            if self._thread_shortage is not None:
                self._threads_started_again()
        self._handoff.put((request, client_address))

    def _serve_connections(self):
        """Serve handed-over connections until none comes for spare_thread_s."""
        while True:
            with self._connections_lock:
                self._spare_threads += 1
            try:
                request, client_address = self._handoff.get(timeout=self.spare_thread_s)
            except queue.Empty:
                with self._connections_lock:
                    try:        # handed one just as the wait ended?
                        request, client_address = self._handoff.get_nowait()
                    except queue.Empty:
                        request = None
                        self._spare_threads -= 1
                        self._connection_threads -= 1
                        shrunk = self._connection_threads * 2 < self._threads_peak
                        if shrunk:      # threads halved since the peak: memory back
                            self._threads_peak = self._connection_threads
                    else:
                        self._spare_threads -= 1
                        self._queued -= 1
                if request is None:
                    if shrunk:
                        release_free_memory()
                    return
            else:
                with self._connections_lock:
                    self._spare_threads -= 1
                    self._queued -= 1
            self.process_request_thread(request, client_address)

    def _refuse(self, sock, detail):
        """503 and Connection: close, without a thread (the lock is held)."""
        self._refused.answer(sock, detail, self.timestamps.now()[0])

    # -- hardening: out of threads or descriptors, degrade ---------------------
    # A thread that cannot start (a pids limit, docker --pids-limit) used to
    # print a traceback per connection and fail 20 of 22 fresh clients; now
    # the connection is refused with a 503, the bound drops to the connections
    # held (so newcomers are served by closing idle ones) and is tried again
    # every 5 s. accept() failing with EMFILE used to spin the accept loop at
    # 99 % CPU; now it pauses 0.5 s (as nginx does) and closes idle
    # connections. Each logs one warning per episode and one line at its end.

    def _bounds(self):
        """(the bound on connections, the cap on connection threads) right now."""
        shortage = self._thread_shortage
        if shortage is not None and time.monotonic() < shortage.retry_at:
            return shortage.bound, shortage.threads
        return self.max_connections, self.max_connections + THREADS_WINDING_DOWN

    def _threads_ran_out(self, exc):
        shortage = self._thread_shortage
        bound = max(len(self._connections), 1)
        if shortage is None:
            log.warning("cannot start a thread (%s) with %d connection threads: serving at "
                        "most %d connections until threads start again",
                        exc, self._connection_threads, bound)
            shortage = self._thread_shortage = ThreadShortage(time.monotonic())
        shortage.bound, shortage.threads = bound, max(self._connection_threads, 1)
        shortage.retry_at = time.monotonic() + 5.0
        shortage.refused += 1

    def _threads_started_again(self):
        with self._connections_lock:
            shortage, self._thread_shortage = self._thread_shortage, None
        if shortage is not None:
            log.warning("threads start again after %.1f s (%d connections refused); "
                        "serving up to %d connections", time.monotonic() - shortage.since,
                        shortage.refused, self.max_connections)

    def server_activate(self):
        super().server_activate()
        self.socket.setblocking(False)      # for the accept batches below

    def _handle_request_noblock(self):
        """Accept every connection waiting, up to 64, not one per wake-up of
        serve_forever(): under a flood of connections the backlog otherwise
        fills, and a fresh client whose SYN is dropped waits 1 s to retry."""
        for _ in range(64):
            try:
                request, client_address = self.get_request()
            except OSError:                 # none waiting (or out of descriptors)
                return
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)

    def get_request(self):
        try:
            request = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._descriptors_ran_out(exc)
            raise               # no connection this round
        if self._accept_paused_at is not None:
            log.warning("accepting connections again after %.1f s without file descriptors",
                        time.monotonic() - self._accept_paused_at)
            self._accept_paused_at = None
        return request

    def _descriptors_ran_out(self, exc):
        if self._accept_paused_at is None:
            self._accept_paused_at = time.monotonic()
            log.warning("out of file descriptors (%s) with %d connections: pausing accept() "
                        "for 0.5 s at a time and closing idle connections",
                        exc.strerror, len(self._connections))
        with self._connections_lock:
            victims = [v for v in (self._evictable() for _ in range(8)) if v is not None]
        for victim in victims:
            _shutdown_quietly(victim.connection)
        time.sleep(0.5)


def release_free_memory():
    """Give the C heap's free pages back to the system (glibc's malloc_trim).

    Memory freed by a thousand exited threads stays in the heap: after a
    flood RSS stayed at 85-133 MiB (23-37 before); called once the threads
    have halved, it goes back to within a few MiB of the baseline."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (ImportError, OSError, AttributeError):     # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None

THREADS_WINDING_DOWN = 16   # threads past the bound: ones whose evicted connection is closing


class ThreadShortage:
    """An episode of threads failing to start: the lowered bound and when to retry."""

    def __init__(self, since):
        self.since = since
        self.bound = self.threads = 1
        self.retry_at = since
        self.refused = 0


def connection_bound(max_connections):
    """max_connections, lowered to leave descriptors and threads to spare
    under RLIMIT_NOFILE and the pids cgroup's limit (logged when lowered)."""
    limits = []
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE) if resource else (-1, -1)
    if soft >= 0 and soft != resource.RLIM_INFINITY:
        limits.append((soft - DESCRIPTORS_TO_SPARE, f"RLIMIT_NOFILE is {soft}"))
    pids_max = pids_limit()
    if pids_max is not None:
        limits.append((pids_max - THREADS_TO_SPARE, f"the pids cgroup allows {pids_max} tasks"))
    bound, why = min(limits, default=(max_connections, ""))
    if bound >= max_connections:
        return max_connections
    bound = max(bound, 1)
    log.warning("MAX_CONNECTIONS=%d lowered to %d: %s", max_connections, bound, why)
    return bound


DESCRIPTORS_TO_SPARE = 100  # the listener, Kafka, logs, refused connections closing
THREADS_TO_SPARE = 50       # Kafka, the accept loop, the log flusher, other processes


def pids_limit():
    """pids.max of this process's cgroup (v1 or v2), or None when unlimited or unknown."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers in ("pids", ""):
            base = "/sys/fs/cgroup/pids" if controllers == "pids" else "/sys/fs/cgroup"
            try:
                with open(f"{base}{path.rstrip('/')}/pids.max") as f:
                    text = f.read().strip()
            except OSError:
                continue
            return int(text) if text.isdigit() else None
    return None


def raise_descriptor_limit():
    """Raise the soft RLIMIT_NOFILE to the hard one: each connection takes one."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


class Refuser:
    """Answers 503 on connections the server takes no more of, without a thread
    per connection: the answer goes out at once, then one thread reads and
    drops what the client still sends (closing a socket with unread input
    makes the kernel send a reset, which can destroy the answer) and closes
    it within a second."""

    max_sockets = 64            # past this, close at once
    linger_s = 1.0

    def __init__(self):
        self._new = queue.SimpleQueue()
        self._handed = self._closed = 0     # one writer each: the accept loop, the closer
        self._thread = threading.Thread(target=self._linger, name="refused-closer", daemon=True)
        self._thread.start()

    def answer(self, sock, detail, date):
        body = json.dumps({"detail": detail}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nServer: payment-service/{__version__}\r\n"
                f"Date: {date}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            sock.send(head.encode() + body, socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._handed - self._closed >= self.max_sockets:
            sock.close()
            return
        self._handed += 1
        self._new.put(sock)

    def _linger(self):
        selector = selectors.DefaultSelector()
        deadlines = {}
        while True:
            try:
                while True:
                    sock = self._new.get(block=not deadlines)
                    if sock is None:
                        return
                    selector.register(sock, selectors.EVENT_READ)
                    deadlines[sock] = time.monotonic() + self.linger_s
            except queue.Empty:
                pass
            ready = {key.fileobj for key, _ in selector.select(0.05)}
            now = time.monotonic()
            for sock in list(deadlines):
                if sock in ready:
                    try:
                        if sock.recv(65536, socket.MSG_DONTWAIT):
                            continue
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                elif now < deadlines[sock]:
                    continue
                selector.unregister(sock)
                del deadlines[sock]
                sock.close()
                self._closed += 1

    def close(self):
        self._new.put(None)


class RequestTimeout(HTTPError):
    """The request head or body did not arrive by its deadline (408)."""

    def __init__(self, detail):
        super().__init__(408, detail)


# -- hardening: deadlines for the request head and body ------------------------
# The kernel's receive timeout (IDLE_TIMEOUT_S) ends a read that waits too
# long, but a client sending a byte every 3 s never lets one wait that long:
# it held a thread ~50 h for a head and 54 s for a body. So the whole head
# must arrive within HEADER_TIMEOUT_S of its first byte (nginx's
# client_header_timeout) and the whole body within BODY_TIMEOUT_S, else 408.
# A read waiting on a deadline shorter than the idle timeout shortens the
# socket's timeout to it; a client sending promptly never pays for this.

class DeadlineReader(io.RawIOBase):
    """The connection's input, read under the idle timeout and a deadline."""

    def __init__(self, sock, idle_timeout_s, header_timeout_s):
        self._sock = sock
        self._idle_timeout_s = idle_timeout_s
        self._header_timeout_s = header_timeout_s
        self._shortened = False     # the socket's timeout was cut to meet the deadline
        self.done()

    def readable(self):
        return True

    def done(self):
        """The head or body is in. Next comes a request head: the idle timeout
        until its first byte, then HEADER_TIMEOUT_S for all of it."""
        self._deadline = None       # monotonic time the head or body must be in by
        self._arm_s = self._header_timeout_s    # the deadline starts at the first byte
        self._what = _HEAD
        if self._shortened:
            set_socket_timeouts(self._sock, self._idle_timeout_s)
            self._shortened = False

    def await_body(self, body_timeout_s):
        """The body: BODY_TIMEOUT_S from the first read that finds it not yet buffered."""
        self._deadline = None
        self._arm_s = body_timeout_s
        self._what = _BODY

    def readinto(self, buffer):
        if self._what is _BODY and self._arm_s is not None:
            self._start_deadline()
        deadline = self._deadline
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._expired()
            if remaining < self._idle_timeout_s:
                set_socket_timeouts(self._sock, max(remaining, 0.001))
                self._shortened = True
        try:
            count = self._sock.recv_into(buffer)
        except (BlockingIOError, TimeoutError):     # the kernel's or settimeout()'s timeout
            if deadline is not None and time.monotonic() >= deadline:
                raise self._expired() from None
            return None                             # idle: looks like the end of the input
        if count and self._arm_s is not None:
            self._start_deadline()
        return count

    def _start_deadline(self):
        self._timeout_s, self._arm_s = self._arm_s, None
        self._deadline = time.monotonic() + self._timeout_s

    def _expired(self):
        return RequestTimeout(f"{self._what} not received in full within {self._timeout_s:g} s")


_HEAD, _BODY = "request head", "body"


def _shutdown_quietly(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def drain_input(sock, max_bytes=1024 * 1024, max_s=1.0):
    """After an error answer, read and drop what the client still sends, briefly.

    Closing a socket that has unread input makes the kernel send a reset,
    which can destroy the answer before the client has read it.
    """
    deadline = time.monotonic() + max_s
    try:
        sock.shutdown(socket.SHUT_WR)
        set_socket_timeouts(sock, max_s)
        while max_bytes > 0 and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return
            max_bytes -= len(chunk)
    except OSError:
        pass


# -- performance: socket timeouts in the kernel --------------------------------

# SO_RCVTIMEO/SO_SNDTIMEO take a struct timeval on Linux; elsewhere (Windows
# takes a DWORD of milliseconds) the same bytes would mean something else.
KERNEL_SOCKET_TIMEOUTS = sys.platform.startswith("linux")


def set_socket_timeouts(sock, seconds):
    """Make a recv or send that waits longer than seconds fail.

    On Linux this is done in the kernel: socket.settimeout() makes Python
    poll() before every recv and send, which cost about a quarter of the
    throughput under load. A timed-out read then looks to the file object like
    the end of the data (readline returns a line without its newline), and the
    connection closes. Elsewhere settimeout() does it, and a timed-out read
    raises TimeoutError, which closes the connection the same way.
    """
    if not KERNEL_SOCKET_TIMEOUTS:
        sock.settimeout(seconds)
        return
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


# -- performance: a buffered access log and a per-second clock ------------------

class AccessLog:
    """Buffered log lines on stderr, flushed a few times a second.

    One unbuffered write per request cost about a fifth of the throughput;
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


class TimestampCache:
    """The Date header and the access-log time, formatted once per second, not per request."""

    def __init__(self):
        self._second = None
        self._stamps = ("", "")

    def now(self):
        now = int(time.time())
        if now != self._second:
            self._stamps = (email.utils.formatdate(now, usegmt=True),
                            time.strftime("%d/%b/%Y %H:%M:%S", time.localtime(now)))
            self._second = now
        return self._stamps


if __name__ == "__main__":
    main()
