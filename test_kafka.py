"""The service against Apache Kafka, started from its jars by conftest.py.

The contract (200 only after the acknowledgement, the exact record, 503 within
KAFKA_TIMEOUT_S while the broker is killed or paused, recovery) against each
version in KAFKA_VERSIONS; a three-broker cluster; Kafka's own TLS and SASL.
"""

import time

import pytest
from kafka.partitioner.default import murmur2

import payment_service as ps
from conftest import (BOUND_S, SLACK_S, SUCCEED, Stream, assert_no_secret_and_no_traceback,
                      assert_on_topic, assert_outage_answered_503, kafka_records, payment_body,
                      record_of, request, unique_order_id, wait_for_leaders, wait_until)

pytestmark = pytest.mark.xdist_group("kafka")


# ===========================================================================
# The contract, against one broker of each version
# ===========================================================================

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
    """Clients streaming mock-succeeds while the broker goes away (begin) for
    three times the bound and comes back (end); (results, outage start, outage end)."""
    stream = Stream(svc.base, clients=4)
    try:
        wait_until(lambda: len(stream.oks()) > 20, 30, "traffic before the outage")
        begin()
        started = time.monotonic()
        time.sleep(BOUND_S * 3)
    finally:
        end()
    ended = time.monotonic()
    try:
        wait_until(lambda: any(r[3] > ended for r in stream.oks()), 60,
                   "a 200 after the broker came back")
        time.sleep(0.5)
    finally:
        results = stream.stop()
    return results, started, ended


def test_killed_broker_503s_within_the_bound_and_the_service_recovers(spawn, apache_kafka):
    svc = spawn(apache_kafka.bootstrap)

    def restart():                          # the same node, ports and data, as a restart is
        apache_kafka.node.start()
        wait_for_leaders(apache_kafka.bootstrap)

    results, killed, restarted = outage(svc, apache_kafka, apache_kafka.kill, restart)
    during = assert_outage_answered_503(results, killed, restarted)
    assert all("Kafka" in r[2] for r in during)
    assert any(r[1] == 200 and r[3] > restarted for r in results)      # recovered by itself
    assert_on_topic(apache_kafka.bootstrap, [r for r in results if r[1] == 200])
    assert svc.stop()[0] == 0
    assert_no_secret_and_no_traceback(svc.output)


def test_paused_broker_503s_within_the_bound_and_the_service_recovers(spawn, apache_kafka):
    svc = spawn(apache_kafka.bootstrap)
    results, paused, resumed = outage(svc, apache_kafka, apache_kafka.pause, apache_kafka.resume)
    during = assert_outage_answered_503(results, paused, resumed)
    assert all("Kafka" in r[2] for r in during)
    assert_on_topic(apache_kafka.bootstrap, [r for r in results if r[1] == 200])
    assert svc.stop()[0] == 0
    assert_no_secret_and_no_traceback(svc.output)
