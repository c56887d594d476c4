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
- Every answer is JSON (but /docs and /metrics), errors included:
  ``{"detail": "..."}``. Bad input is a 400 (not a JSON object) or a 422
  (a field breaks a rule) and publishes nothing.
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
6. The service describing and measuring itself: /openapi.json built from
   ROUTES, /docs (Swagger UI), /metrics (Prometheus) and the event log.
"""

import collections
import contextlib
import decimal
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
import ssl
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
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


# ===========================================================================
# 1. The API: route handlers and the routing table
# ===========================================================================
# A handler takes the server (for its publisher) and the raw request body, and
# returns the JSON object of a 200 answer, or raises HTTPError (section 2) for
# any other status.

def health(server, body):
    """Liveness: answers while the process serves, broker or not."""
    return {"status": "ok"}


def service_info(server, body):
    """The service's name and version."""
    return {"service": "payment", "version": __version__}


def create_intent(server, body):
    """Create a fake payment intent for an order (touches no broker)."""
    payment = parse_payment(body)                       # 400 / 422
    return {"payment_id": f"pay_{payment.order_id}",
            "client_secret": f"secret_{payment.order_id}"}


def mock_succeed(server, body):
    """Publish payment.succeeded to Kafka; 200 once the broker acknowledged it."""
    payment = parse_payment(body)                       # 400 / 422
    publish_observed(server, payment)                   # 503 unless Kafka acknowledged it
    return {"status": "ok"}


# The service describing and measuring itself (section 6 builds the answers).

def openapi_document(server, body):
    """This API as an OpenAPI 3.1 document, built from ROUTES."""
    return api_document_answer()


def swagger_ui(server, body):
    """Swagger UI for /openapi.json: try the API from a browser."""
    return swagger_ui_answer(server)


def metrics(server, body):
    """Prometheus metrics: requests, durations, events, broker, connections."""
    return server.metrics.answer(server)


# path -> {method: handler}. This table is the routing: the request handler
# looks requests up in it (404 for an unknown path, 405 with Allow for a known
# path and another method), main() prints it at start-up and /openapi.json
# describes it.
ROUTES = {
    "/health": {"GET": health, "HEAD": health},
    "/payment/health": {"GET": health, "HEAD": health},
    "/v1/_info": {"GET": service_info, "HEAD": service_info},
    "/payment/v1/payments/create-intent": {"POST": create_intent},
    "/payment/v1/payments/mock-succeed": {"POST": mock_succeed},
    "/openapi.json": {"GET": openapi_document, "HEAD": openapi_document},
    "/docs": {"GET": swagger_ui, "HEAD": swagger_ui},
    "/metrics": {"GET": metrics, "HEAD": metrics},
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
    """obj[name] as a JSON integer from 1 to 2**63-1 (not a bool, fraction or string), else 422.

    A whole number written with a fraction or exponent (2.0, 2e0) is that
    integer, as JSON Schema counts it (the STRICT_JSON decoder makes it an int).
    """
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
# literal of any length; and exact where json.loads rounds: a whole number
# written as 2.0 or 2e0 is the int 2 (JSON Schema's "integer", which
# /openapi.json promises), read without rounding through a float.

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


def _parse_number(literal):
    """A literal with a fraction or exponent: the int it equals if it is whole,
    else a float (which require_int64 refuses). Decimal reads it exactly; the
    magnitude is checked before any rounding, so 1e999999999 costs nothing."""
    try:
        value = decimal.Decimal(literal)
    except decimal.InvalidOperation:            # an exponent past even Decimal's range
        return float(literal)                   # inf or 0.0: refused either way
    if value.is_zero():
        return 0
    if value.adjusted() >= len(str(MAX_ID)):    # 10**19 or more: past every field's range
        return -(MAX_ID + 1) if value < 0 else MAX_ID + 1
    if value != value.to_integral_value():
        return float(literal)
    return int(value)


STRICT_JSON = json.JSONDecoder(
    parse_int=_parse_int,
    parse_float=_parse_number,
    parse_constant=_reject_constant,            # NaN, Infinity, -Infinity
    object_pairs_hook=_object_without_duplicate_keys,
)


# ===========================================================================
# 3. Kafka: publish, then answer 200 only on the broker's acknowledgement
# ===========================================================================

class BrokerUnavailable(HTTPError):
    """The event was not acknowledged by the broker (503). reason, for the
    metrics: timeout, broker_refused, unreachable, too_many_pending,
    producer_starting or stopping."""

    def __init__(self, detail, reason):
        super().__init__(503, detail)
        self.reason = reason


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
    made groups of 4-6 records and were no faster, and so was a pipeline
    with two groups in flight. Most of what was left was not Kafka at all
    but the GIL passing between threads on two CPUs: on one CPU (PIN_CPU,
    section 5) mock-succeed reaches 1.0-1.3 of the ceiling. There, py-spy
    finds kafka-python's sender thread holding the GIL a third of the time
    (two fifths of that in its pure-Python CRC32C) and send() a sixth.
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

        Returns the record's RecordMetadata (topic, partition, offset: the
        event log shows them). Raises BrokerUnavailable (503) on any Kafka
        error, when the event is not acknowledged within the bound, and at
        once past the pending bound.
        """
        deadline = time.monotonic() + self._timeout_s
        key, value = payment_succeeded_record(payment)
        if not self._started.wait(_remaining(deadline)):
            raise BrokerUnavailable("the Kafka producer is still starting", "producer_starting")
        if self._closed:
            raise BrokerUnavailable("the Kafka producer is closed; the service is stopping",
                                    "stopping")
        self._take_pending_slot()                            # 503 at once past the bound
        # 1. send(), 2. flush(), 3. this record's own acknowledgement: the
        #    publisher thread does them for this record and all others
        #    waiting with it (_send_group, _flush_and_settle), and settles this one.
        publication = _Publication(key, value, deadline)
        self._waiting.put(publication)
        if not publication.wait():                           # the deadline passed
            raise self._refusal(self._timeout_error())
        if isinstance(publication.outcome, Exception):       # a Kafka error for this record
            raise self._refusal(publication.outcome)
        return publication.outcome     # 200: the RecordMetadata of this very record

    def _refusal(self, exc):
        """The 503 for a Kafka error, saying what happened: no ack in time, a
        refusal by the broker, or no connection."""
        kafka_errors = sys.modules["kafka.errors"]
        name = type(exc).__name__
        if isinstance(exc, kafka_errors.KafkaTimeoutError):
            return BrokerUnavailable(
                f"Kafka did not acknowledge the event within {self._timeout_s:g} s ({name})",
                "timeout")
        if isinstance(exc, kafka_errors.BrokerResponseError):
            return BrokerUnavailable(f"the Kafka broker refused the event: {name}", "broker_refused")
        return BrokerUnavailable(f"Kafka could not be reached to deliver the event: {name}",
                                 "unreachable")

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
        state. The metrics and the event log line are written by the request
        itself, from what publish() returns or raises (publish_observed)."""
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
                    f"{self._pending} events are already waiting for the broker; try again later",
                    "too_many_pending")
            self._pending += 1

    def _free_pending_slot(self, _outcome=None, count=1):
        with self._lock:
            self._pending -= count

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


def make_producer(bootstrap, timeout_s, **settings):
    """One KafkaProducer for the whole service, bounded by timeout_s everywhere.

    It returns at once even with no broker up (api_version is given) and
    connects on first use. Idempotence is off: an idempotent kafka-python
    producer never recovers from an expired batch or a restarted broker,
    and this service must heal by itself. Delivery is at-least-once.

    kafka-python is imported here and in EventPublisher.start(), not at the
    top: importing it takes longer than all the rest of start-up, so main()
    does it once the server already answers.

    settings: more KafkaProducer keyword arguments, such as the security ones
    kafka_client_settings() reads (section 4).
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
        **settings,
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
    ("PIN_CPU", "auto", "run every thread on one CPU: auto (the one it starts on), a number, or off"),
    ("ACCESS_LOG", "1", "one line per request on stderr; 0 turns it off"),
    ("EVENT_LOG", "1", "one line per acknowledged event (partition, offset); 0 turns it off"),
    ("SWAGGER_UI_URL", "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5",
     "where /docs loads Swagger UI's assets from"),
    ("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    ("KAFKA_SSL_CAFILE", "", "PEM file of the CAs the broker's certificate is checked against"),
    ("KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols)"),
    ("KAFKA_SASL_USERNAME", "", "SASL user name"),
    ("KAFKA_SASL_PASSWORD", "", "SASL password (never printed)"),
    ("KAFKA_CLIENT_ID", "payment-service", "the client id the broker sees"),
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
    kafka_client: "KafkaClientSettings"   # TLS, SASL, client id: kafka_client_settings()
    event_log: bool             # issue 11: one line per acknowledged event
    swagger_ui_url: str         # issue 11: where /docs loads Swagger UI from
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    pin_cpu: object             # "auto", "off" or a CPU number: pin_to_one_cpu() (section 5)


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
        kafka_client=kafka_client_settings(environ),
        event_log=switch("EVENT_LOG", text("EVENT_LOG")),
        swagger_ui_url=text("SWAGGER_UI_URL"),
        header_timeout_s=number("HEADER_TIMEOUT_S", float, 0.1, MAX_TIMEOUT_S),
        body_timeout_s=number("BODY_TIMEOUT_S", float, 0.1, MAX_TIMEOUT_S),
        max_connections=number("MAX_CONNECTIONS", int, 1, 10**6),
        pin_cpu=cpu_choice(text("PIN_CPU")),
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


def cpu_choice(text):
    """PIN_CPU: "auto", "off", or the number of a CPU this process may run on."""
    value = text.strip().lower()
    if value in ("auto", "off"):
        return value
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not (value.isascii() and value.isdigit() and int(value) in allowed):
        cpus = ", ".join(map(str, allowed)) or "none: not supported here"
        raise SystemExit(f"PIN_CPU={text!r} is not auto, off or a CPU this process may "
                         f"run on ({cpus})")
    return int(value)


def switch(name, text):
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise SystemExit(f"{name}={text!r} is not one of 1, 0, true, false, yes, no, on, off")
    return value in ("1", "true", "yes", "on")


# -- Kafka beyond localhost: TLS and SASL (issue 12) ---------------------------
# Managed and secured clusters want TLS, SASL credentials, or both. These
# settings become keyword arguments of the one KafkaProducer; a combination
# that cannot work stops the service at start-up with one line naming the
# setting, rather than as 503s later. The password is never printed.

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SASL_SETTINGS = ("KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")


class Secret(str):
    """A password: the real text for kafka-python, '***' wherever it is shown
    (repr, str, format), so no log line, traceback or repr(Config) holds it."""

    def __repr__(self):
        return "'***'"

    def __str__(self):
        return "***"

    def __format__(self, spec):
        return format("***", spec)


class KafkaClientSettings(NamedTuple):
    producer_settings: dict     # extra KafkaProducer keyword arguments
    description: str            # for the start-up line: protocol, mechanism, user


def kafka_client_settings(environ):
    """The security settings (KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_CAFILE,
    KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD) and
    KAFKA_CLIENT_ID, checked together. An empty value counts as unset.
    A bad combination raises SystemExit with one line naming the setting."""
    def setting(name):
        return environ.get(name, "").strip()

    protocol = setting("KAFKA_SECURITY_PROTOCOL").upper() or DEFAULTS["KAFKA_SECURITY_PROTOCOL"]
    if protocol not in SECURITY_PROTOCOLS:
        raise SystemExit(f"KAFKA_SECURITY_PROTOCOL={setting('KAFKA_SECURITY_PROTOCOL')!r} "
                         f"is not one of {', '.join(SECURITY_PROTOCOLS)}")
    client_id = setting("KAFKA_CLIENT_ID") or DEFAULTS["KAFKA_CLIENT_ID"]
    if len(client_id) > 255 or not client_id.isprintable():
        raise SystemExit("KAFKA_CLIENT_ID must be at most 255 printable characters")
    settings = {"security_protocol": protocol, "client_id": client_id}
    description = protocol

    uses_tls = protocol in ("SSL", "SASL_SSL")
    cafile = setting("KAFKA_SSL_CAFILE")
    if cafile and not uses_tls:
        raise SystemExit(f"KAFKA_SSL_CAFILE is set but KAFKA_SECURITY_PROTOCOL={protocol} "
                         f"does not use TLS; use SSL or SASL_SSL, or unset KAFKA_SSL_CAFILE")
    if cafile:
        check_ca_file(cafile)
        settings["ssl_cafile"] = cafile
        description += f" (CA file {cafile})"

    given = [name for name in SASL_SETTINGS if setting(name)]
    if not protocol.startswith("SASL_"):
        if given:
            raise SystemExit(f"{given[0]} is set but KAFKA_SECURITY_PROTOCOL={protocol} "
                             f"does not use SASL; use SASL_SSL or SASL_PLAINTEXT, "
                             f"or unset {given[0]}")
        return KafkaClientSettings(settings, description)

    for name in SASL_SETTINGS:
        if name not in given:
            raise SystemExit(f"{name} is required when KAFKA_SECURITY_PROTOCOL={protocol}")
    mechanism = setting("KAFKA_SASL_MECHANISM").upper()
    if mechanism not in SASL_MECHANISMS:
        raise SystemExit(f"KAFKA_SASL_MECHANISM={setting('KAFKA_SASL_MECHANISM')!r} "
                         f"is not one of {', '.join(SASL_MECHANISMS)}")
    username = setting("KAFKA_SASL_USERNAME")
    if not username.isprintable():
        raise SystemExit("KAFKA_SASL_USERNAME must be printable characters")
    password = environ["KAFKA_SASL_PASSWORD"]          # taken as given: spaces count
    if "\0" in password:
        raise SystemExit("KAFKA_SASL_PASSWORD must not contain a NUL character")
    settings.update(sasl_mechanism=mechanism, sasl_plain_username=username,
                    sasl_plain_password=Secret(password))
    description += f", {mechanism} as user {username!r}"
    return KafkaClientSettings(settings, description)


def check_ca_file(path):
    """SystemExit unless path is a readable file of PEM certificates: the CAs
    (or the broker's own self-signed certificate) the broker is checked against."""
    try:
        context = ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise SystemExit(f"KAFKA_SSL_CAFILE={path!r}: no such file") from None
    except (ssl.SSLError, ValueError):            # read, but no certificate in it
        context = None                            # (SSLError is an OSError: first)
    except OSError as exc:                        # PermissionError, IsADirectoryError, ...
        reason = exc.strerror or type(exc).__name__
        raise SystemExit(f"KAFKA_SSL_CAFILE={path!r} cannot be read: {reason}") from None
    if context is None or not context.cert_store_stats()["x509"]:   # e.g. only a CRL
        raise SystemExit(f"KAFKA_SSL_CAFILE={path!r} is not a PEM certificate file")


def usage():
    """What --help prints: how to run the service, and its settings."""
    width = max(len(name) for name, _, _ in SETTINGS)
    rows = "\n".join(f"  {name:<{width}}  {default or '-':<15}  {meaning}"
                     for name, default, meaning in SETTINGS)
    return (f"payment-service {__version__}: a mock payment processor that publishes "
            f"{EVENT_TYPE} events to Kafka.\n\n"
            f"usage: [VARIABLE=value ...] python payment_service.py\n\n"
            f"Settings, read from the environment at start-up:\n"
            f"  {'variable':<{width}}  {'default':<15}  meaning\n{rows}\n")


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

    cpu = pin_to_one_cpu(config.pin_cpu)       # before any thread starts: they inherit it
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
    configure_observability(server, config, access_log)      # section 6

    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"payment-service {__version__} routes:\n{format_routes(ROUTES)}", flush=True)
    print(f"listening on http://{host}:{server.server_port} "
          f"(Kafka {config.kafka_bootstrap} over {config.kafka_client.description}, "
          f"topic {TOPIC})", flush=True)
    if cpu is not None:
        print(f"every thread runs on CPU {cpu} (PIN_CPU=off lets them spread)", flush=True)
    # Serve first, then import kafka-python and make the producer: /health
    # answers within ~60 ms of start; mock-succeed waits for the producer.
    threading.Thread(target=server.serve_forever, args=(0.1,), name="http-accept",
                     daemon=True).start()
    failed = []

    def start_publisher():          # off the main thread: importing kafka-python takes a while
        warn_if_unresolvable(config.kafka_bootstrap)
        for attempt in itertools.count():
            try:
                return publisher.start(make_producer(
                    config.kafka_bootstrap, config.kafka_timeout_s,
                    **config.kafka_client.producer_settings))
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
    server.event_log.close()
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
        self.path = ""
        self.request_version = "HTTP/1.1"   # until the request line says otherwise
        if self.server.stopping:
            return
        try:
            raw = self.rfile.readline(MAX_LINE_BYTES + 1)
            if raw in (b"\r\n", b"\n"):     # RFC 9112 2.2: one empty line before a request
                raw = self.rfile.readline(MAX_LINE_BYTES + 1)   # is ignored; two are a 400
        except RequestTimeout as exc:   # bytes trickled in, no request line by the deadline
            self.started = time.perf_counter()
            self.send_json(exc.status, {"detail": exc.detail})
            self.wfile.flush()
            return
        if not raw.endswith(b"\n") and len(raw) <= MAX_LINE_BYTES:
            return                      # closed, or idle past the timeout: close
        self.started = time.perf_counter()      # for the request duration metric
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
        if type(payload) is Document:       # /openapi.json, /docs, /metrics (section 6)
            content_type, body = payload
        else:
            content_type, body = "application/json", json.dumps(payload).encode()
        if self.body_unread or self.server.stopping:
            self.close_connection = True   # unread bytes would be taken for the next request
        self.drain_on_close = self.close_connection and status >= 400
        date, log_time = self.server.timestamps.now()
        self.send_response_only(status)
        self.send_header("Server", self.server_version)
        self.send_header("Date", date)
        self.send_header("Content-Type", content_type)
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
        self.server.metrics.count_request(self, status)

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
        self.metrics, self.event_log = Metrics(), EventLog()     # section 6; main() configures
        self.swagger_ui_url = SWAGGER_UI_CDN                     # the event log and this
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
            if self._queued > QUEUED_AHEAD:    # the connection threads fell behind
                time.sleep(0.001)               # let them run (see QUEUED_AHEAD)

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

# Connections accepted but not yet taken by a thread, past which the accept
# loop sleeps 1 ms after each accept. With every thread on one CPU
# (PIN_CPU), an accept loop that never blocks kept the GIL for CPython's
# whole 5 ms switch interval at a time: under a flood of idle connections the
# threads fell 200 connections behind, none of them could be closed to make
# room (only connections a thread serves can), and fresh clients got 503s.
QUEUED_AHEAD = 32

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


# -- performance: one CPU for the whole process ---------------------------------
# CPython runs the Python code of one thread at a time (the GIL), and a
# mock-succeed passes it between threads several times: its connection thread,
# the publisher, kafka-python's sender. Spread over two CPUs, each pass woke a
# thread on the other CPU, and under mock-succeed the GIL sat unheld ~45 % of
# the time while the process burned a whole CPU, a fifth of it in the kernel
# (py-spy, perf). On one CPU a pass is a plain context switch. compare.py,
# before and after, same machine: mock-succeed 0.73 and 0.83 of the
# kafka-python ceiling, then 1.05, 1.08, 1.13 and 1.24; GET /health 14,000 ->
# 22,000-30,000 req/s; a new connection per request 3,900 -> 8,300-9,200.
# The kernel's network work still runs on any CPU. Which CPU matters little
# (0 and 1 each won rounds here). "auto" keeps the one the process started
# on, where the kernel put it, so instances on one host spread out rather
# than all taking the same CPU; PIN_CPU=N chooses one.

def pin_to_one_cpu(choice):
    """Confine this process to one CPU (see above); the CPU, or None for "off"
    and where the OS has no CPU affinity."""
    if choice == "off" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    cpu = current_cpu() if choice == "auto" else choice
    if cpu not in allowed:
        cpu = max(allowed)
    try:
        os.sched_setaffinity(0, {cpu})  # this thread; threads started later inherit it
    except OSError as exc:              # a sandbox that forbids it: run as the OS likes
        log.warning("PIN_CPU=%s: cannot keep the threads on CPU %d (%s); they spread",
                    choice, cpu, exc.strerror or exc)
        return None
    return cpu


def current_cpu():
    """The CPU this thread runs on now (Linux's /proc), or None."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            return int(f.read().rpartition(b")")[2].split()[36])    # field 39: processor
    except (OSError, ValueError, IndexError):
        return None


# -- performance: a buffered access log and a per-second clock ------------------

class AccessLog:
    """Log lines on stderr, written by a thread of their own a few times a second.

    A request only appends its line to a deque (atomic, no lock): one
    unbuffered write per request cost about a fifth of the throughput, and
    even a buffered file's write() took ~20 % of the request threads' time
    under load (its lock, contended by 32 threads; measured with py-spy).
    A line shows up at most flush_interval_s late; past MAX_QUEUED lines (an
    stderr that blocks) the request that finds them writes them itself, so
    nothing is dropped and memory stays bounded.
    """

    MAX_QUEUED = 10_000

    def __init__(self, fd=2, flush_interval_s=0.2, enabled=True):
        self.enabled = enabled
        self._lines = collections.deque()
        self._stop = threading.Event()
        self._write_lock = threading.Lock()     # one writer at a time keeps lines whole
        if enabled:
            self._out = open(fd, "ab", buffering=0, closefd=False)
            threading.Thread(target=self._flush_periodically, args=(flush_interval_s,),
                             name="access-log-flusher", daemon=True).start()

    def write(self, line):
        self._lines.append(line)
        if len(self._lines) > self.MAX_QUEUED:
            self.flush()

    def _flush_periodically(self, interval_s):
        while not self._stop.wait(interval_s):
            self.flush()

    def flush(self):
        with self._write_lock:
            lines = self._lines
            taken = [lines.popleft() for _ in range(len(lines))]
            if not taken:
                return
            data = "\n".join(taken).encode("utf-8", "backslashreplace") + b"\n"
            try:
                while data:                     # an unbuffered write may be partial
                    written = self._out.write(data)
                    if not written:
                        return
                    data = data[written:]
            except (OSError, ValueError):       # stderr gone: nothing better to do
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


# ===========================================================================
# 6. The service describing and measuring itself (issue 11): the API
#    document, Swagger UI, Prometheus metrics and the event log
# ===========================================================================
# Hooks elsewhere, one or two lines each: the handlers in section 1 (described
# here in API_NOTES), mock_succeed() calling publish_observed(),
# publish() returning the record's metadata, send_json() sending a Document as
# is and counting the request, handle_one_request() noting the start time,
# PaymentHTTPServer.__init__ and main() (configure_observability).

import bisect
import html

SWAGGER_UI_CDN = DEFAULTS["SWAGGER_UI_URL"]


class Document(NamedTuple):
    """An answer that is not a JSON object built per request: sent as is."""
    content_type: str
    body: bytes


# -- the API document: ROUTES, API_NOTES and section 2's rules ----------------

STATUS_OK = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}

# What the document says of each handler beyond its docstring (the summary):
# answer, the JSON schema of its 200 body (or media_type for a non-JSON one);
# payment_body, it reads a Payment (400/422 and the body's 408/411/413/415);
# publishes, it waits for Kafka (503). A handler in ROUTES without notes here
# stops build_api_document() (and a test), so the two cannot drift apart.
API_NOTES = {
    health: {"answer": STATUS_OK},
    service_info: {"answer": {
        "type": "object", "required": ["service", "version"],
        "properties": {"service": {"const": "payment"}, "version": {"const": __version__}}}},
    create_intent: {"payment_body": True, "answer": {
        "type": "object", "required": ["payment_id", "client_secret"],
        "properties": {"payment_id": {"type": "string", "pattern": "^pay_[0-9]+$"},
                       "client_secret": {"type": "string", "pattern": "^secret_[0-9]+$"}}}},
    mock_succeed: {"answer": STATUS_OK, "payment_body": True, "publishes": True},
    openapi_document: {"answer": {"type": "object", "required": ["openapi", "info", "paths"]}},
    swagger_ui: {"media_type": "text/html"},
    metrics: {"media_type": PROMETHEUS_TEXT},
}


def api_notes(handler):
    """API_NOTES[handler] with the defaults filled in."""
    return {"answer": None, "media_type": "application/json", "payment_body": False,
            "publishes": False, **API_NOTES[handler]}



INT64_RULE = ("a JSON integer (not a boolean, fraction or string); a whole number "
              "written as 2.0 or 2e0 is that integer")
PAYMENT_SCHEMA = {
    "type": "object",
    "description": "Unknown keys are allowed and ignored.",
    "required": ["order_id", "amount_cents", "currency"],
    "properties": {
        "order_id": {"type": "integer", "minimum": 1, "maximum": MAX_ID,
                     "description": INT64_RULE},
        "amount_cents": {"type": "integer", "minimum": 1, "maximum": MAX_ID,
                         "description": INT64_RULE},
        # minLength/maxLength too: a Python-flavoured '$' also matches before a final newline.
        "currency": {"type": "string", "minLength": 3, "maxLength": 3, "pattern": "^[A-Za-z]{3}$",
                     "description": "three ASCII letters, any case; upper-cased in the event"},
    },
    "additionalProperties": True,
}
PAYMENT_EXAMPLE = {"order_id": 123, "amount_cents": 25998, "currency": "USD"}
ERROR_SCHEMA = {"type": "object", "required": ["detail"],
                "properties": {"detail": {"type": "string"}}}


def error_statuses(method, handler):
    """{status: when} for every error answer a request to this operation can get."""
    errors = {
        400: "a malformed request line or header line",
        408: "the request head did not arrive within HEADER_TIMEOUT_S of its first byte",
        404: "no route for the path (only paths missing from this document)",
        405: "a method the path does not have (only methods missing from this "
             "document); Allow lists the path's methods",
        414: f"a request line longer than {MAX_LINE_BYTES} bytes",
        431: f"a header line longer than {MAX_LINE_BYTES} bytes, or more than "
             f"{MAX_HEADERS} header fields",
        500: "an unexpected error (the traceback goes to the server's log)",
        503: "MAX_CONNECTIONS connections are held and every one is inside a request",
        505: "an HTTP version other than 1.0 or 1.1",
    }
    if method == "POST":                        # dispatch() reads a body for every POST
        errors.update({
            400: errors[400] + "; Content-Length not a non-negative integer",
            408: errors[408] + ", or the body not within BODY_TIMEOUT_S",
            411: "no Content-Length (chunked bodies included)",
            413: f"a body larger than {MAX_BODY_BYTES} bytes",
            415: "a Content-Type other than application/json (parameters allowed)",
        })
    if api_notes(handler)["payment_body"]:
        errors[400] += ("; the body is not a UTF-8 JSON object (or is nested too deeply, "
                        "holds NaN or Infinity, or a duplicate key)")
        errors[422] = "a field is missing, of the wrong type or out of range"
    if api_notes(handler)["publishes"]:
        errors[503] += ("; Kafka did not acknowledge the event within KAFKA_TIMEOUT_S, or "
                        "MAX_PENDING_EVENTS events are already waiting for it")
    return dict(sorted(errors.items()))


def operation_id(method, path):
    return "_".join(filter(None, [method.lower(), *"".join(
        c if c.isalnum() else " " for c in path).split()]))


def describe_operation(path, method, handler):
    head = method == "HEAD"                    # a HEAD answer has the headers, no body

    def answer(description, media_type, schema, headers=None):
        response = {"description": description}
        if headers:
            response["headers"] = headers
        if not head:
            response["content"] = {media_type: {"schema": schema}}
        return response

    api = api_notes(handler)
    summary, _, _ = (handler.__doc__ or handler.__name__).partition("\n")
    ok_media = api["media_type"]
    ok_schema = api["answer"] if ok_media == "application/json" else {"type": "string"}
    responses = {"200": answer("OK", ok_media, ok_schema)}
    for status, when in error_statuses(method, handler).items():
        allow = {"Allow": {"required": True, "schema": {"type": "string"},
                           "description": "the methods the path has, comma-separated"}}
        responses[str(status)] = answer(f"{http.HTTPStatus(status).phrase}: {when}",
                                        "application/json", {"$ref": "#/components/schemas/Error"},
                                        allow if status == 405 else None)
    operation = {"operationId": operation_id(method, path), "summary": summary.strip(),
                 "description": f"Handler: {handler.__name__}" + (" (HEAD: the GET answer's "
                                "headers, no body)" if head else ""),
                 "responses": responses}
    if api["payment_body"]:
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Payment"}, "example": PAYMENT_EXAMPLE}}}
    return operation


def build_api_document(routes):
    """The OpenAPI 3.1 document of every route in routes."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "payment-service", "version": __version__,
                 "description": "\n\n".join(__doc__.split("\n\n")[i] for i in (0, 3))},
        "paths": {path: {method.lower(): describe_operation(path, method, handler)
                         for method, handler in methods.items()}
                  for path, methods in routes.items()},
        "components": {"schemas": {"Payment": PAYMENT_SCHEMA, "Error": ERROR_SCHEMA}},
    }


_api_document = None


def api_document_answer():
    global _api_document
    if _api_document is None:                  # built once: ROUTES does not change
        _api_document = Document("application/json",
                                 json.dumps(build_api_document(ROUTES)).encode())
    return _api_document


def swagger_ui_answer(server):
    """The page FastAPI serves at /docs, with Swagger UI from server.swagger_ui_url."""
    assets = html.escape(server.swagger_ui_url.rstrip("/"), quote=True)
    page = f"""<!DOCTYPE html>
<html>
<head>
<link type="text/css" rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
<title>payment-service {__version__} - Swagger UI</title>
</head>
<body>
<div id="swagger-ui">
</div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>
const ui = SwaggerUIBundle({{
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    presets: [
        SwaggerUIBundle.presets.apis,
        SwaggerUIBundle.SwaggerUIStandalonePreset
    ],
}})
</script>
</body>
</html>
"""
    return Document("text/html; charset=utf-8", page.encode())


# -- metrics: plain counters, rendered on scrape ------------------------------
# The request path (count_request) is a perf_counter(), two dict look-ups, a
# bisect and three plain increments: about a microsecond (measured in-process;
# +1.4 us with a lock) against the ~40 us of CPU a request costs, socket calls
# included. It takes no lock: every dict and list operation is atomic under the
# GIL, so the worst a race can do is lose one increment, when the interpreter
# switches threads (every 5 ms at most) exactly between a counter's read and
# its write, a window of a few bytecodes: negligible for a Prometheus counter,
# and nothing breaks. The event counters (a publish costs ~300 us) and the
# scrape's copies do take the lock, so events are counted exactly.

UNMATCHED = "unmatched"         # the route label of every path not in ROUTES
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                     "CONNECT"})   # any other method is counted as "other"
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
# Why an event was refused (503). The broker's state turns to 0 on the last three.
REFUSAL_REASONS = ("producer_starting", "too_many_pending", "timeout", "broker_refused",
                   "unreachable", "stopping")
BROKER_FAILURES = frozenset({"timeout", "broker_refused", "unreachable"})


class Histogram:
    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # per bucket, the last one +Inf
        self.sum = 0.0

    def observe(self, value):                   # under Metrics._lock
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self, name, labels):
        """Cumulative _bucket lines, then _sum and _count."""
        lines, total = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            total += count
            lines.append(f'{name}_bucket{{{labels}le="{bound}"}} {total}')
        plain = labels.rstrip(",")
        lines.append(f"{name}_sum{{{plain}}} {self.sum!r}" if plain else f"{name}_sum {self.sum!r}")
        lines.append(f"{name}_count{{{plain}}} {total}" if plain else f"{name}_count {total}")
        return lines


class Metrics:
    """The service's counters, rendered in Prometheus text format 0.0.4."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests = {}                      # (route, method, status) -> count
        self._durations = {route: Histogram(REQUEST_BUCKETS) for route in (*ROUTES, UNMATCHED)}
        self._acknowledged = 0
        self._refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self._publish = {outcome: Histogram(PUBLISH_BUCKETS)
                         for outcome in ("acknowledged", "refused")}
        self._broker_available = 1               # the last outcome's; 1 until one says otherwise

    def count_request(self, handler, status, _now=time.perf_counter, _bucket=bisect.bisect_left):
        """One answered request (send_json calls this). The fast path: a request
        whose (path, method, status) was seen before is found as it is. No lock:
        see the note above the class."""
        seconds = _now() - handler.started
        key = (handler.path, handler.command, status)
        requests = self._requests
        count = requests.get(key)
        if count is None:                        # first time, or a path/method to bound
            key = self._bounded(*key)
            count = requests.get(key, 0)
        requests[key] = count + 1
        durations = self._durations[key[0]]
        durations.counts[_bucket(durations.bounds, seconds)] += 1
        durations.sum += seconds

    def _bounded(self, path, method, status):
        """The (route, method, status) labels of a request: bounded sets only."""
        route = path.partition("?")[0] if method else UNMATCHED   # "": no request line
        if route not in self._durations:
            route = UNMATCHED
        return route, method if method in METHODS else "other", status

    def count_event(self, seconds, refusal=None):
        """One publish: acknowledged (refusal None) or refused for that reason."""
        with self._lock:
            if refusal is None:
                self._acknowledged += 1
                self._broker_available = 1
                self._publish["acknowledged"].observe(seconds)
            else:
                self._refused[refusal] += 1
                if refusal in BROKER_FAILURES:
                    self._broker_available = 0
                self._publish["refused"].observe(seconds)

    def answer(self, server):
        """The /metrics answer."""
        with self._lock:
            requests = sorted(self._requests.items(), key=lambda item: (*item[0][:2], item[0][2]))
            durations = {route: _copy_histogram(h) for route, h in self._durations.items()}
            publish = {outcome: _copy_histogram(h) for outcome, h in self._publish.items()}
            acknowledged, refused = self._acknowledged, dict(self._refused)
            broker_available = self._broker_available
        out = []

        def family(name, kind, help_text, lines):
            out.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines))

        family("payment_http_requests_total", "counter",
               "HTTP requests answered, by route (unmatched: a path not in the routing "
               "table), method (other: an unknown one) and status.",
               [f'payment_http_requests_total{{route="{route}",method="{method}",'
                f'status="{status}"}} {count}' for (route, method, status), count in requests])
        family("payment_http_request_duration_seconds", "histogram",
               "Time from reading the request line to the answer written, by route.",
               [line for route, h in durations.items()
                for line in h.samples("payment_http_request_duration_seconds", f'route="{route}",')])
        family("payment_events_acknowledged_total", "counter",
               "payment.succeeded events acknowledged by Kafka (answered 200).",
               [f"payment_events_acknowledged_total {acknowledged}"])
        family("payment_events_refused_total", "counter",
               "payment.succeeded events not acknowledged (answered 503), by reason.",
               [f'payment_events_refused_total{{reason="{reason}"}} {count}'
                for reason, count in refused.items()])
        family("payment_publish_duration_seconds", "histogram",
               "Time from publishing an event to its acknowledgement or refusal, by outcome.",
               [line for outcome, h in publish.items()
                for line in h.samples("payment_publish_duration_seconds", f'outcome="{outcome}",')])
        family("payment_events_pending", "gauge",
               "Events sent to Kafka and not yet acknowledged or failed.",
               [f"payment_events_pending {server.publisher.pending}"])
        family("payment_kafka_broker_available", "gauge",
               "1 if the last publish was acknowledged, 0 if Kafka failed it.",
               [f"payment_kafka_broker_available {broker_available}"])
        family("payment_http_connections_open", "gauge",
               "Client connections open now.",
               [f"payment_http_connections_open {len(server._connections)}"])
        family("payment_build_info", "gauge", "The service's version (the value is always 1).",
               [f'payment_build_info{{version="{__version__}"}} 1'])
        return Document(PROMETHEUS_TEXT, ("\n".join(out) + "\n").encode())


def _copy_histogram(h):
    copy = Histogram(h.bounds)
    copy.counts, copy.sum = list(h.counts), h.sum
    return copy


def publish_observed(server, payment):
    """publisher.publish(payment), counted in the metrics and written to the
    event log; returns its RecordMetadata, raises its BrokerUnavailable."""
    started = time.perf_counter()
    try:
        metadata = server.publisher.publish(payment)
    except BrokerUnavailable as exc:
        server.metrics.count_event(time.perf_counter() - started, exc.reason)
        raise
    server.metrics.count_event(time.perf_counter() - started)
    server.event_log.acknowledged(payment, metadata, server.timestamps)
    return metadata


# -- the event log: each acknowledged event and its place in Kafka -------------

class EventLog:
    """One line per acknowledged event, through an AccessLog writer (buffered)."""

    def __init__(self, writer=None, owns_writer=False):
        self._writer = writer                   # None: off
        self._owns_writer = owns_writer

    def acknowledged(self, payment, metadata, timestamps):
        if self._writer is None:
            return
        self._writer.write(
            f"[{timestamps.now()[1]}] event acknowledged: {EVENT_TYPE} "
            f"order_id={payment.order_id} amount_cents={payment.amount_cents} "
            f"currency={payment.currency} topic={getattr(metadata, 'topic', TOPIC)} "
            f"partition={getattr(metadata, 'partition', '?')} "
            f"offset={getattr(metadata, 'offset', '?')}")

    def close(self):
        if self._owns_writer:
            self._writer.close()


def configure_observability(server, config, access_log):
    """main(): the event log (through the access log's writer when that is on)
    and where /docs loads Swagger UI from."""
    server.swagger_ui_url = config.swagger_ui_url
    if config.event_log:
        if access_log.enabled:
            server.event_log = EventLog(access_log)
        else:
            server.event_log = EventLog(AccessLog(), owns_writer=True)


if __name__ == "__main__":
    main()
