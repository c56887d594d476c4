#!/usr/bin/env python3
"""Follow one mock-succeed request through payment_service.py: which definitions and
how many distinct lines of the file run for it, in the lesson alone and in the full
service (every thread's, the publisher's and the log writer's included).

usage: .venv/bin/python bench/follow_a_request.py

The producer is the tests' FakeProducer (conftest.py), so no broker is needed: the
lines a request runs in payment_service.py are the same as with one.
"""
import http.client
import json
import os
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from conftest import FakeProducer  # noqa: E402


def follow(module, make_server):
    """(definitions, distinct lines) of module's file that one mock-succeed runs,
    through the server make_server() returns (its threads started after the tracer)."""
    ran, following = set(), threading.Event()

    def tracer(frame, event, arg):
        if following.is_set() and frame.f_code.co_filename == module.__file__:
            ran.add((frame.f_code.co_qualname, frame.f_lineno))
        return tracer

    threading.settrace(tracer)          # the threads started from here on
    server = make_server()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    conn.request("GET", "/health", headers={"Host": "x"})     # the connection's thread
    conn.getresponse().read()
    body = json.dumps({"order_id": 1, "amount_cents": 2, "currency": "USD"}).encode()
    following.set()
    conn.request("POST", "/payment/v1/payments/mock-succeed", body,
                 {"Content-Type": "application/json"})
    assert conn.getresponse().read() == b'{"status": "ok"}'
    time.sleep(0.5)                     # the log writer's turn
    following.clear()
    server.shutdown()
    return {name for name, _ in ran}, {line for _, line in ran}


def main():
    import payment_service as full

    source = open(full.__file__).read().splitlines(keepends=True)
    end = next(i for i, line in enumerate(source) if line.startswith("#")
               and "end of the lesson" in line)
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "lesson.py"), "w") as f:
        f.writelines(source[:end])
    sys.path.insert(0, folder)
    import lesson

    def lesson_server():
        server = lesson.http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                       lesson.PaymentRequestHandler)
        config = lesson.read_config({})
        server.routes, server.publisher = lesson.ROUTES, lesson.Publisher(FakeProducer(), config)
        return server

    def full_server():
        config = full.read_config({"PORT": "0"}, full.ALL_SETTINGS)
        publisher = full.GroupCommitPublisher(config)
        server = full.build_server(config, publisher, full.LogWriter(devnull.fileno()))
        publisher.start(FakeProducer())
        return server

    with open(os.devnull, "w") as devnull:
        results = {"the lesson": follow(lesson, lesson_server),
                   "the full service": follow(full, full_server)}
    for name, (definitions, lines) in results.items():
        print(f"{name}: {len(definitions)} definitions, {len(lines)} distinct lines, "
              f"lines {min(lines)}-{max(lines)} of the file")


if __name__ == "__main__":
    main()
