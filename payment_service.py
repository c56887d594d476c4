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
    """Publishes payment events and waits, within a bound, for the broker's ack.

    publish() is the lesson: send the record, flush, and answer 200 only on
    this record's own acknowledgement; 503 on any Kafka error or the deadline.

    The three steps run as a GROUP COMMIT. A request thread queues its record
    and waits for its outcome; one publisher thread takes every record waiting
    at that moment, sends them all, flushes once, then settles each request
    from its own record's future (_send_group, _flush_and_settle, _settle).
    Each record keeps its own outcome: one failing record is a 503 for its
    request only, and a request whose deadline passed is not sent at all.

    Why (issue 10, measured with 32 keep-alive connections): when each of the
    32 request threads did send/flush/get itself, they spent 79 % of their
    time in flush(), each flush woke kafka-python's sender thread, and a
    produce request carried 11.8 records; the service reached 0.42-0.55 of
    the kafka-python ceiling (compare.py: the same pattern, no HTTP). With
    the group commit (one flush per group, pending slots freed once per group
    rather than by a callback per record on the sender thread, and linger_ms
    so a group leaves in one produce request: 15.2 records instead of 9.0)
    it reached 0.56-0.81 of it (median of 4 runs 0.74) where the former code
    reached 0.45-0.67 (median 0.52), side by side on the same busy, shared
    machine. Two publisher threads (one sending while the other flushes)
    made groups of 4-6 records and were no faster. What is
    left is kafka-python's own CPU: its sender thread held the GIL ~63 % of
    the time (a fifth of that in its pure-Python CRC32C), send() ~25 %.
    """

    def __init__(self, timeout_s, max_pending):
        self._timeout_s = timeout_s
        self._max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()
        self._broker_ok = True     # last outcome, so the log shows changes, not every 503
        self._producer = None
        self._started = threading.Event()
        self._waiting = queue.SimpleQueue()     # _Publication, then None to stop the thread
        self._thread = None
        self._closed = False

    def publish(self, payment):
        """Send the event, flush, and return once the broker acknowledged it.

        Raises BrokerUnavailable (503) on any Kafka error, when the event is
        not acknowledged within the bound, and at once past the pending bound.
        """
        deadline = time.monotonic() + self._timeout_s
        key, value = payment_succeeded_record(payment)
        if not self._started.wait(_remaining(deadline)):
            raise BrokerUnavailable("the Kafka producer is still starting")
        if self._closed:
            raise BrokerUnavailable("the Kafka producer is closed; the service is stopping")
        self._take_pending_slot()                            # 503 at once past the bound
        # 1. send(), 2. flush(), 3. this record's own acknowledgement: the
        #    publisher thread does them for this record and all others
        #    waiting with it (_send_group, _flush_and_settle), and settles this one.
        publication = _Publication(key, value, deadline)
        self._waiting.put(publication)
        if not publication.wait():                           # the deadline passed
            raise BrokerUnavailable(self._failure_detail(self._timeout_error()))
        if isinstance(publication.outcome, Exception):       # a Kafka error for this record
            raise BrokerUnavailable(self._failure_detail(publication.outcome))
        # 200: publication.outcome is the RecordMetadata of this very record.

    def _failure_detail(self, exc):
        """What the 503 says happened: no ack in time, a refusal, or no connection."""
        kafka_errors = sys.modules["kafka.errors"]
        name = type(exc).__name__
        if isinstance(exc, kafka_errors.KafkaTimeoutError):
            return f"Kafka did not acknowledge the event within {self._timeout_s:g} s ({name})"
        if isinstance(exc, kafka_errors.BrokerResponseError):
            return f"the Kafka broker refused the event: {name}"
        return f"Kafka could not be reached to deliver the event: {name}"

    def _timeout_error(self):
        return sys.modules["kafka.errors"].KafkaTimeoutError(
            f"no acknowledgement within {self._timeout_s:g} s")

    # -- the group commit: the publisher thread -------------------------------

    def _run(self):
        """The publisher thread: take every record waiting, send them, flush,
        settle each; again, until close()."""
        while True:
            group = [self._waiting.get()]                    # wait for the first record
            while True:                                      # then take all the others
                try:
                    group.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            stop = group[-1] is None                         # FIFO: close() comes last
            group = [p for p in group if p is not None]
            sent = self._guarded(self._send_group, group, group)
            if sent:
                self._guarded(self._flush_and_settle, sent, group)
            if stop:
                return

    def _guarded(self, step, records, group):
        """Run a step; an unexpected error (a bug) fails the group, not the thread."""
        try:
            return step(records)
        except Exception as exc:
            log.exception("publishing %d events failed", len(group))
            for publication in group:
                if publication.outcome is None:
                    if publication.future is None:
                        self._free_pending_slot()
                    else:
                        publication.future.add_both(self._free_pending_slot)
                    self._settle(publication, exc)
            return []

    def _send_group(self, group):
        """1. send() every record of the group that still has a waiting request."""
        producer = self._producer
        sent = []
        for publication in group:
            if time.monotonic() >= publication.deadline:
                # its request already had its 503: do not send an event nobody waits for
                self._free_pending_slot()
                self._settle(publication, self._timeout_error())
                continue
            try:
                # send(): queue the record; returns a future for this record.
                publication.future = producer.send(
                    TOPIC, key=publication.key, value=publication.value)
            except self._kafka_error as exc:                 # no metadata in time, ...
                self._free_pending_slot()
                self._settle(publication, exc)
                continue
            sent.append(publication)
        return sent

    def _flush_and_settle(self, sent):
        """2. flush() once for the group, 3. settle each record from its own future."""
        flush_error = None
        try:
            # flush(): push the whole group to the broker now, in one produce
            # request rather than one per record, and wait for the answer
            # (within the deadline of the group's last record).
            self._producer.flush(timeout=_remaining(sent[-1].deadline))
        except self._kafka_error as exc:
            flush_error = exc
        done = 0
        for publication in sent:
            # this record's own outcome. A flush returns quietly even when a
            # record failed, so only the record's future, done once flush()
            # returned, means 200; not done means no ack in time.
            future = publication.future
            if future.is_done:
                done += 1
                outcome = future.value if future.succeeded() else future.exception
            else:                       # still in the producer: its slot is freed when done
                future.add_both(self._free_pending_slot)
                outcome = flush_error or self._timeout_error()
            self._settle(publication, outcome)
        self._free_pending_slot(count=done)     # one lock for the group, not a callback each

    def _settle(self, publication, outcome):
        """The one place where a record's outcome is known: its RecordMetadata
        (topic, partition, offset) or the exception, for every record,
        including those refused at send() and those expired before it. It
        answers the waiting request (if still waiting) and notes the broker's
        state; counters, a latency histogram (the request started at
        publication.deadline - timeout_s) and an event log line belong here."""
        failed = isinstance(outcome, Exception)
        self._note_broker_state(ok=not failed, reason=outcome if failed else None)
        publication.settle(outcome)

    # -- the pending bound: a long outage must not pile events up in memory ---

    @property
    def pending(self):
        """Records queued or sent and not yet acknowledged or failed."""
        return self._pending

    def _take_pending_slot(self):
        with self._lock:
            if self._pending >= self._max_pending:
                raise BrokerUnavailable(
                    f"{self._pending} events are already waiting for the broker; try again later")
            self._pending += 1

    def _free_pending_slot(self, _outcome=None, count=1):
        with self._lock:
            self._pending -= count

    # -- the broker's state, logged when it changes (not once per 503) -------

    def _note_broker_state(self, ok, reason=None):
        if ok != self._broker_ok:
            self._broker_ok = ok
            if ok:
                log.warning("Kafka acknowledges events again")
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
        self._thread = threading.Thread(target=self._run, name="kafka-publisher", daemon=True)
        self._thread.start()
        self._started.set()

    def close(self, timeout_s):
        """Deliver what is still pending, within timeout_s, and close."""
        if self._producer is None:
            return
        deadline = time.monotonic() + timeout_s
        self._closed = True
        self._waiting.put(None)            # after every record already waiting
        self._thread.join(_remaining(deadline))
        try:
            self._producer.close(timeout=_remaining(deadline))
        except self._kafka_error:
            log.warning("closing with %d events not acknowledged by Kafka", self._pending)


class _Publication:
    """One record on its way through the publisher thread, and its outcome."""

    __slots__ = ("key", "value", "deadline", "future", "outcome", "_settled")

    def __init__(self, key, value, deadline):
        self.key = key
        self.value = value
        self.deadline = deadline
        self.future = None                 # the producer's future, once sent
        self.outcome = None                # RecordMetadata or the exception, once settled
        self._settled = threading.Lock()   # held until settle(): the cheapest wake-up
        self._settled.acquire()

    def wait(self):
        """True once settled, False when the deadline passed first."""
        return self._settled.acquire(timeout=_remaining(self.deadline))

    def settle(self, outcome):
        self.outcome = outcome
        self._settled.release()


def _remaining(deadline):
    return max(deadline - time.monotonic(), 0.001)


# The broker API version kafka-python assumes before it has asked the broker.
# Giving one keeps KafkaProducer() from blocking 30 s when no broker is up;
# each connection still negotiates down to what its broker supports.
KAFKA_API_VERSION = (3, 9)


# How long kafka-python's sender may hold a record before sending it unasked.
# Every record is followed by a flush(), which sends at once whatever waits,
# so this never delays an event; it keeps the sender from sending the first
# records of a group on their own while the publisher thread still sends the
# rest (with 0, a group went out in several produce requests).
GROUP_LINGER_MS = 5


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
        linger_ms=GROUP_LINGER_MS,
        max_block_ms=timeout_ms,          # send() waiting for topic metadata
        request_timeout_ms=timeout_ms,    # a broker that stopped answering
        # retries of a record end with its request (kafka-python wants linger_ms on top)
        delivery_timeout_ms=timeout_ms + GROUP_LINGER_MS,
        reconnect_backoff_max_ms=1000,    # notice a returning broker within a second
        metrics_enabled=False,            # nothing reads them; they cost CPU per record
    )


# ===========================================================================
# 4. Configuration and main()
# ===========================================================================

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
    # Serve first, then import kafka-python and make the producer: /health
    # answers within ~60 ms of start; mock-succeed waits for the producer.
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http-accept").start()
    publisher.start(make_producer(config.kafka_bootstrap, config.kafka_timeout_s))

    stop_requested.wait()
    print("stopping: finishing in-flight requests", flush=True)
    server.stop(grace_s=config.kafka_timeout_s + 1)
    publisher.close(timeout_s=2.0)
    access_log.close()
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
        raw = self.rfile.readline(MAX_LINE_BYTES + 1)
        if not raw.endswith(b"\n") and len(raw) <= MAX_LINE_BYTES:
            return                      # closed, or idle past the timeout: close
        self.busy = True
        try:
            self.send_json(*self.dispatch(raw))
        finally:
            self.busy = False
        self.wfile.flush()

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
        super().setup()
        set_socket_timeouts(self.connection, self.server.idle_timeout_s)
        self.busy = False
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

    def read_request_head(self, raw):
        """Parse the request line and the header fields: 400, 414, 431, 505."""
        if len(raw) > MAX_LINE_BYTES:
            raise HTTPError(414, f"request line longer than {MAX_LINE_BYTES} bytes")
        self.requestline = raw.decode("latin-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            raise HTTPError(400, "malformed request line")
        self.command, self.path, self.request_version = words
        if self.request_version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        self.headers = self.read_headers()
        connection = self.headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        if "transfer-encoding" in self.headers or self.headers.get("content-length", "0") != "0":
            self.body_unread = True

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
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip() or " " in name:
                raise HTTPError(400, "malformed header line")
            name, value = name.lower(), value.strip()
            if name == "content-length" and headers.get(name, value) != value:
                raise HTTPError(400, "conflicting Content-Length headers")
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
                content_type.partition(";")[0].strip().lower() != "application/json":
            raise HTTPError(415, "Content-Type must be application/json")
        length = int(length_text)
        if self.headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        try:
            body = self.rfile.read(length) or b""     # None or short: timed out or closed
        except TimeoutError:                          # the settimeout() fallback
            body = b""
        if len(body) < length:
            raise HTTPError(408, f"body not received in full within "
                                 f"{self.server.idle_timeout_s:g} s")
        self.body_unread = False
        return body


# What a client that vanished or stalled past the idle timeout raises mid-I/O.
CLIENT_GONE_ERRORS = (ConnectionError, TimeoutError, BlockingIOError)


class PaymentHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, a deep listen backlog, and a graceful stop."""

    request_queue_size = 1024   # the default of 5 drops connections under load
    daemon_threads = True       # a stuck connection cannot keep the process alive;
                                # stop() waits for in-flight requests instead
    spare_thread_s = 10.0       # how long a thread without a connection lives on

    def __init__(self, address, publisher, idle_timeout_s=5.0, access_log=None):
        self.publisher = publisher
        self.idle_timeout_s = idle_timeout_s
        self.access_log = access_log or AccessLog(enabled=False)
        self.timestamps = TimestampCache()
        self.stopping = False
        self._connections = set()
        self._connections_lock = threading.Lock()
        self._spare_threads = 0
        self._handoff = queue.SimpleQueue()      # (socket, address) for a spare thread
        super().__init__(address, PaymentRequestHandler)

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

    # -- performance: reuse connection threads ---------------------------------
    # Starting a thread per connection (the accept loop waits for each new
    # thread to run) costs more than the request itself: a thread whose
    # connection closed waits spare_thread_s for the next one instead.

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
