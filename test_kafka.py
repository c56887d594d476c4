"""The service against Apache Kafka, started from its jars by conftest.py.

The contract (200 only after the acknowledgement, the exact record, 503 within
KAFKA_TIMEOUT_S while the broker is killed or paused, recovery) against each
version in KAFKA_VERSIONS; a three-broker cluster; Kafka's own TLS and SASL.
"""

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from kafka.partitioner.default import murmur2

from conftest import (BOUND_S, HERE, KAFKA_VERSION, SECRET_PASSWORD, SLACK_S, SUCCEED, Stream,
                      assert_no_secret_and_no_traceback, assert_on_topic,
                      assert_outage_answered_503, assert_within_bound, consumer_settings,
                      free_port, kafka_records, payment_body, post_records, read_topic,
                      record_of, request, sasl_env, unique_order_id, wait_for_leaders,
                      wait_until)



# ===========================================================================
# The contract, against one broker of each version
# ===========================================================================

@pytest.mark.xdist_group("kafka")
def test_mock_succeed_200s_carry_exactly_their_record_on_apache_kafka(spawn, apache_kafka):
    svc = spawn(apache_kafka.bootstrap)
    order_ids = [unique_order_id() for _ in range(20)]
    for order_id in order_ids:
        answer = request(svc.base, "POST", SUCCEED, payment_body(order_id, 25998, "usd"))
        assert answer.status == 200 and answer.body == b'{"status": "ok"}', svc.output
    wanted = {str(order_id).encode() for order_id in order_ids}
    records = [r for r in kafka_records(apache_kafka.bootstrap) if r.key in wanted]
    assert sorted((r.key, r.value) for r in records) == sorted(
        record_of(order_id) for order_id in order_ids)               # each once, exact bytes
    for r in records:
        assert r.headers == []                                        # no headers
        assert r.partition == (murmur2(r.key) & 0x7fffffff) % 4       # the Java client's choice
    assert svc.stop()[0] == 0
    assert_no_secret_and_no_traceback(svc.output)


def outage(svc, apache_kafka, begin, end):
    """Clients streaming mock-succeeds while the broker goes away (begin) for three times
    the bound and comes back (end): every request during it a 503 naming Kafka within the
    bound, every 200 on the topic, the service stopped cleanly with no secret or traceback
    in its output; (results, outage start, outage end)."""
    stream = Stream(svc.base, clients=4)
    try:
        wait_until(lambda: len(stream.oks()) > 20, 30, "traffic before the outage")
        begin()
        started = time.monotonic()
        time.sleep(BOUND_S * 3)
    finally:
        ended = time.monotonic()                # its return begins
        end()
    try:
        wait_until(lambda: any(r[3] > ended for r in stream.oks()), 60,
                   "a 200 after the broker came back")
        time.sleep(0.5)
    finally:
        results = stream.stop()
    during = assert_outage_answered_503(results, started, ended)
    assert all("Kafka" in r[2] for r in during)
    assert_on_topic(apache_kafka.bootstrap, [r for r in results if r[1] == 200])
    assert svc.stop()[0] == 0
    assert_no_secret_and_no_traceback(svc.output)
    return results, started, ended


@pytest.mark.slow
@pytest.mark.xdist_group("kafka")
def test_killed_broker_503s_within_the_bound_and_the_service_recovers(spawn, apache_kafka):
    svc = spawn(apache_kafka.bootstrap)

    def restart():                          # the same node, ports and data, as a restart is
        apache_kafka.node.start()
        wait_for_leaders(apache_kafka.bootstrap)

    results, _, restarted = outage(svc, apache_kafka, apache_kafka.kill, restart)
    assert any(r[1] == 200 and r[3] > restarted for r in results)      # recovered by itself


@pytest.mark.slow
@pytest.mark.xdist_group("kafka")
def test_paused_broker_503s_within_the_bound_and_the_service_recovers(spawn, apache_kafka):
    svc = spawn(apache_kafka.bootstrap)
    outage(svc, apache_kafka, apache_kafka.pause, apache_kafka.resume)


# ===========================================================================
# A three-broker cluster: payment.events with replication factor 3, min.insync.replicas=2
# ===========================================================================
# conftest.CLUSTER_SETTINGS: a broker is fenced 3 s after its last heartbeat.

FENCE_S = 3.0


def refusals(results, since):
    """The 503s of requests answered after since: (count, seconds from since to the last)."""
    late = [r for r in results if r[1] == 503 and r[4] >= since]
    return len(late), max((r[4] - since for r in late), default=0.0)


def steady_again(stream, since, quiet_s=3.0):
    """True once every request started in the last quiet_s seconds (after since)
    has been answered 200 and none is older than the bound."""
    now = time.monotonic()
    if now - since < quiet_s:
        return False
    recent = [r for r in stream.results if r[3] >= now - quiet_s]
    answered = sum(1 for r in stream.results if r[3] >= now - BOUND_S - quiet_s)
    return recent and all(r[1] == 200 for r in recent) and answered >= len(recent)


def both(action, nodes):
    threads = [threading.Thread(target=action, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


@pytest.mark.slow
@pytest.mark.xdist_group("kafka_cluster")
def test_leader_killed_every_200_is_on_the_topic_and_the_503s_are_bounded(spawn, kafka_cluster):
    svc = spawn(kafka_cluster.bootstrap, ACCESS_LOG=0)
    stream = Stream(svc.base, clients=16)
    leaders = Counter(kafka_cluster.leaders().values())
    victim = kafka_cluster.broker(leaders.most_common(1)[0][0])
    try:
        wait_until(lambda: len(stream.oks()) > 100, 30, "traffic before the kill")
        victim.kill()
        killed = time.monotonic()
        time.sleep(FENCE_S + BOUND_S)
        wait_until(lambda: steady_again(stream, killed), 30,
                   "200s again with the leader dead (the service recovering by itself)")
    finally:
        results = stream.stop()
        victim.start()
    count, window_s = refusals(results, killed)
    slowest = max(r[4] - r[3] for r in results if r[4] >= killed)
    print(f"leader kill -9: {count} 503s of {len(results)} answers, "
          f"the last {window_s:.1f} s after the kill; the slowest answer {slowest:.2f} s")
    assert all(r[1] in (200, 503) for r in results), "no connection errors"
    assert_within_bound(results)
    # the dead leader's partitions refuse until it is fenced and others lead, then each
    # waiting request has had its bound
    assert window_s < FENCE_S + 2 * BOUND_S + SLACK_S
    assert_on_topic(kafka_cluster.bootstrap, [r for r in results if r[1] == 200])
    kafka_cluster.in_sync()
    assert svc.stop()[0] == 0


@pytest.mark.slow
@pytest.mark.xdist_group("kafka_cluster")
def test_two_of_three_brokers_stopped_is_503_not_enough_replicas_then_recovers(
        spawn, kafka_cluster):
    svc = spawn(kafka_cluster.bootstrap, ACCESS_LOG=0)
    stream = Stream(svc.base, clients=8)
    stopped_nodes = kafka_cluster.brokers[1:]
    try:
        wait_until(lambda: len(stream.oks()) > 50, 30, "traffic before the stop")
        both(lambda node: node.stop(), stopped_nodes)      # SIGTERM: a controlled shutdown
        stopped = time.monotonic()
        wait_until(lambda: any(r[3] > stopped for r in stream.results), 10, "answers")
        time.sleep(BOUND_S * 2)
        restarting = time.monotonic()
    finally:
        for node in stopped_nodes:
            node.start(wait=False)
    kafka_cluster.in_sync()
    back = time.monotonic()
    try:
        wait_until(lambda: any(r[3] > back for r in stream.oks()), 30, "a 200 once they are back")
        time.sleep(0.5)
    finally:
        results = stream.stop()
    count, window_s = refusals(results, stopped)
    print(f"two of three stopped: {count} 503s, the last {window_s:.1f} s after the stop; "
          f"brokers back and in sync {back - restarting:.1f} s after their restart")
    during = [r for r in results if r[3] > stopped and r[4] < restarting]
    assert during and all(r[1] == 503 for r in during), "a 200 without enough in-sync replicas"
    assert all("NotEnoughReplicas" in r[2] for r in during), {r[2] for r in during}
    assert not re.search(r"(\w+Error): \1", svc.output)           # no doubled names
    assert all(r[1] in (200, 503) for r in results), "no connection errors"
    assert_within_bound(results)
    assert_on_topic(kafka_cluster.bootstrap, [r for r in results if r[1] == 200])
    assert svc.stop()[0] == 0
    assert_no_secret_and_no_traceback(svc.output)


@pytest.mark.slow
@pytest.mark.xdist_group("kafka_cluster")
def test_rolling_restart_loses_no_acknowledged_event(spawn, kafka_cluster):
    svc = spawn(kafka_cluster.bootstrap, ACCESS_LOG=0)
    stream = Stream(svc.base, clients=4)
    windows = []
    try:
        wait_until(lambda: len(stream.oks()) > 50, 30, "traffic before the restarts")
        for node in kafka_cluster.brokers:
            began = time.monotonic()
            node.stop()                                      # SIGTERM, then back
            node.start()
            kafka_cluster.in_sync()
            windows.append(time.monotonic() - began)
        wait_until(lambda: steady_again(stream, began), 30, "200s after the last restart")
    finally:
        results = stream.stop()
    oks = [r for r in results if r[1] == 200]
    count, window_s = refusals(results, 0)
    print(f"rolling restart: {len(oks)} 200s, {count} 503s; each broker out of the "
          f"in-sync replicas for {', '.join(f'{w:.1f}' for w in windows)} s")
    assert all(r[1] in (200, 503) for r in results), "no connection errors"
    assert_within_bound(results)
    assert_on_topic(kafka_cluster.bootstrap, oks)                   # 0 events lost
    assert svc.stop()[0] == 0


# ===========================================================================
# Kafka's own TLS and SASL: one broker with SSL, SASL_SSL (SCRAM) and SASL_PLAINTEXT (PLAIN)
# ===========================================================================

def on_listener(secure_kafka, tls_files, listener, env):
    """(bootstrap, environment) for a service on one of the secure broker's listeners."""
    return secure_kafka.address(listener), {k: v.format(**vars(tls_files)) for k, v in env.items()}


ACCEPTED = {
    "ssl": ("SSL", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "{ca}"}),
    "sasl_ssl-scram-sha-512": ("SASL_SSL", dict(sasl_env("SCRAM-SHA-512", "SASL_SSL"),
                                                KAFKA_SSL_CAFILE="{ca}")),
    "sasl_ssl-scram-sha-256": ("SASL_SSL", dict(sasl_env("SCRAM-SHA-256", "SASL_SSL"),
                                                KAFKA_SSL_CAFILE="{ca}")),
    "sasl_plaintext-plain": ("SASL_PLAINTEXT", sasl_env("PLAIN")),
}


@pytest.mark.xdist_group("kafka")
@pytest.mark.parametrize("case", ACCEPTED)
def test_kafka_tls_and_sasl_listeners_acknowledge_the_events(spawn, secure_kafka, tls_files, case):
    bootstrap, env = on_listener(secure_kafka, tls_files, *ACCEPTED[case])
    svc = spawn(bootstrap, **env)
    results = post_records(svc, 3)
    assert [status for _, status, _ in results] == [200] * 3, svc.output
    records = [(r.key, r.value) for r in read_topic(bootstrap, **consumer_settings(env))]
    for order_id, _, _ in results:
        assert record_of(order_id) in records
    assert svc.stop()[0] == 0
    assert_no_secret_and_no_traceback(svc.output)


WRONG = "wrong-" + SECRET_PASSWORD          # still grepped for: contains the secret
# A broker refusing a SASL login answers why, then closes; kafka-python sees one or the other.
SASL_REFUSED = r"(SASL login refused|the broker closed the connection \(a wrong protocol)"
REFUSED = {
    "ssl-wrong-ca": ("SSL", {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "{other_ca}"},
                     r"TLS handshake failed: certificate verify failed"),
    "scram-sha-512-wrong-password": (
        "SASL_SSL", dict(sasl_env("SCRAM-SHA-512", "SASL_SSL", password=WRONG),
                         KAFKA_SSL_CAFILE="{ca}"), SASL_REFUSED),
    "scram-sha-256-unknown-user": (
        "SASL_SSL", dict(sasl_env("SCRAM-SHA-256", "SASL_SSL", user="nobody"),
                         KAFKA_SSL_CAFILE="{ca}"), SASL_REFUSED),
    "plain-wrong-password": ("SASL_PLAINTEXT", sasl_env("PLAIN", password=WRONG),
                             SASL_REFUSED),
    "plain-unknown-user": ("SASL_PLAINTEXT", sasl_env("PLAIN", user="nobody"),
                           SASL_REFUSED),
}


@pytest.mark.xdist_group("kafka")
@pytest.mark.parametrize("case", REFUSED)
def test_kafka_refusing_the_ca_password_or_user_is_a_named_503_and_one_line(
        spawn, secure_kafka, tls_files, case):
    listener, env, words = REFUSED[case]
    bootstrap, env = on_listener(secure_kafka, tls_files, listener, env)
    svc = spawn(bootstrap, **env)
    order_ids, answers = [unique_order_id() for _ in range(3)], []
    for order_id in order_ids:
        started = time.monotonic()
        answers.append(request(svc.base, "POST", SUCCEED, payment_body(order_id)))
        assert time.monotonic() - started < BOUND_S + SLACK_S
    assert [a.status for a in answers] == [503] * 3
    # the first may wait for kafka-python's first attempt and be a timeout
    reason = re.escape(f"Kafka is unreachable: could not connect to {bootstrap}: ") + words
    assert all(re.match(reason, a.json()["detail"]) for a in answers[1:]), [a.body for a in answers]
    assert svc.stop()[0] == 0
    warnings = [line for line in svc.output.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "Kafka" in warnings[0], svc.output
    keys = {r.key for r in read_topic(secure_kafka.bootstrap)}           # over PLAINTEXT
    assert not keys & {str(order_id).encode() for order_id in order_ids}
    assert_no_secret_and_no_traceback(svc.output + "".join(a.body.decode() for a in answers))


# ===========================================================================
# A broker that cannot be reached is named (issue 25)
# ===========================================================================

def test_a_refused_bootstrap_is_a_503_naming_it_at_once_and_one_warning(spawn):
    port = free_port()                                   # nothing listens there
    svc = spawn(f"localhost:{port}", KAFKA_TIMEOUT_S=10)  # answered within 1 s, not 10
    for _ in range(3):
        started = time.monotonic()
        answer = request(svc.base, "POST", SUCCEED, payment_body(unique_order_id()))
        assert time.monotonic() - started < 1.0 + SLACK_S
        assert answer.status == 503 and answer.json()["detail"] == (
            f"Kafka is unreachable: could not connect to localhost:{port}: connection refused")
    assert svc.stop()[0] == 0
    warnings = [line for line in svc.output.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, svc.output
    assert f"could not connect to localhost:{port}: connection refused" in warnings[0]
    assert not re.search(r"(\w+Error): \1", svc.output)           # no doubled names


@pytest.mark.xdist_group("kafka")
def test_one_bootstrap_server_down_of_two_fails_nothing_fast(spawn, secure_kafka):
    down = f"127.0.0.1:{free_port()}"
    svc = spawn(f"{down},{secure_kafka.bootstrap}")
    results = post_records(svc, 10)
    assert [status for _, status, _ in results] == [200] * 10, svc.output
    assert_on_topic(secure_kafka.bootstrap, [(order_id, 200) for order_id, _, _ in results])
    assert svc.stop()[0] == 0
    assert "WARNING" not in svc.output                     # not an outage


# ===========================================================================
# The README's Order-service consumer, against Apache Kafka
# ===========================================================================

def readme_consumer():
    with open(os.path.join(HERE, "README.md")) as f:
        found = re.search(r"```python\n(# order_service\.py.*?)```", f.read(), re.S)
    assert found, "the README's Order-service consumer example is gone"
    return found[1]


@pytest.mark.xdist_group("kafka")
@pytest.mark.parametrize("apache_kafka", [KAFKA_VERSION], indirect=True)
def test_readme_order_service_consumer_gets_each_order_once(spawn, apache_kafka, tmp_path):
    svc = spawn(apache_kafka.bootstrap)
    order_ids = [unique_order_id() for _ in range(3)]
    for order_id in order_ids + order_ids[:1]:             # the first one sent twice
        answer = request(svc.base, "POST", SUCCEED, payment_body(order_id, 1999, "EUR"))
        assert answer.status == 200
    script = tmp_path / "order_service.py"
    script.write_text(readme_consumer())
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, KAFKA_BOOTSTRAP=apache_kafka.bootstrap,
                                                IDLE_MS="4000"))
    print(f"the consumer group read the topic and went idle in {time.monotonic() - started:.1f} s")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    for order_id in order_ids:
        assert lines.count(f"order {order_id} paid: 1999 EUR") == 1, done.stdout
    assert len(lines) == len(set(lines))                   # every order once
    assert svc.stop()[0] == 0
