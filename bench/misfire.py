#!/usr/bin/env python3
"""Issue 23's five attacks, the figures of one server: ours (payment_service.py) or
the FastAPI peer under uvicorn (bench/fastapi_peer/), on loopback, each attack on a
fresh server and broker. The tests (test_limits.py, test_gateway.py,
test_payment_service.py) run the same attacks against ours and assert the outcome;
this prints the figures, for bench/README.md and for the peer.

usage: .venv/bin/python bench/misfire.py {ours,uvicorn} [--script FILE] [--only N[,N]]
           [--uvicorn PATH]

--script runs another payment_service.py (main's, to compare before and after);
--uvicorn is the uvicorn of `python3 bench/compare.py --venv-python`'s venv.
Attacks (N): 1 slow valid bodies at the bound, 2 a stop with slow mock-succeeds and the
broker paused, 3 pauses within the body timeout, 4 lingering sockets with
RLIMIT_NOFILE=200, 5 control bytes in X-Forwarded-For.
"""
import argparse
import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from conftest import (  # noqa: E402  (the project's test helpers)
    CREATE, SUCCEED, ServiceProcess, SlowSenders, Tansu, free_port, open_slow_clients,
    padded_payment_body, parse_raw_answers, payment_body, read_until_closed, request,
    unique_order_id, wait_for_port)
from test_gateway import FORGED_HOPS, answer_or_none  # noqa: E402
from test_payment_service import post_in_pieces  # noqa: E402


class Uvicorn(ServiceProcess):
    """The FastAPI peer under uvicorn, as ServiceProcess runs ours (env: its settings)."""

    def __init__(self, bootstrap, uvicorn, preexec_fn=None, args=()):
        self.port = free_port()
        self.base = ("127.0.0.1", self.port)
        self.proc = subprocess.Popen(
            [uvicorn, "app.main:app", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=os.path.join(HERE, "fastapi_peer"), env=dict(os.environ, KAFKA_BOOTSTRAP=bootstrap),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        self._output = []
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        wait_for_port(self.port)


def fresh_share(base, seconds):
    """Fresh GET /health clients for seconds: 'answered of tried' (a 200 within 2 s)."""
    tried = answered = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tried += 1
        started = time.monotonic()
        with contextlib.suppress(Exception):
            answered += (request(base, "GET", "/health", timeout_s=4).status == 200
                         and time.monotonic() - started <= 2)
        time.sleep(0.2)
    return f"{answered} of {tried} answered ({answered / tried:.0%})"


def attack_1(start):
    for count, settings in ((50, dict(MAX_CONNECTIONS=50)),
                            (20, dict(MAX_CONNECTIONS=20, BODY_TIMEOUT_S=4))):
        body = 2900 if count == 50 else 1000
        svc = start(**settings)
        senders = SlowSenders(svc.base, count, body_bytes=body, rate=300)
        time.sleep(1)
        share = fresh_share(svc.base, 10)
        statuses = senders.stop()
        print(f"1. {count} senders of {body} B at 300 B/s, {settings}: fresh clients {share}; "
              f"senders' answers {dict(statuses)}")
        svc.kill()
    svc = start(MAX_CONNECTIONS=50)
    senders = SlowSenders(svc.base, 40, body_bytes=2900, rate=300, again=False)
    print(f"1. below the bound, 40 senders of 2,900 B at 300 B/s, MAX_CONNECTIONS=50: "
          f"{dict(senders.wait(30))}")
    senders.stop()
    svc.kill()


def attack_2(start, broker):
    delay, kafka_timeout = 0.5, 4.0
    svc = start(SHUTDOWN_DELAY_S=delay, KAFKA_TIMEOUT_S=kafka_timeout)
    print("2. warm-up:", request(svc.base, "POST", SUCCEED, payment_body(unique_order_id())).status)
    svc.proc.send_signal(signal.SIGTERM)
    signalled, held = time.monotonic(), {}
    for _ in range(10):
        body = padded_payment_body(unique_order_id(), 1500)
        with contextlib.suppress(OSError):
            sock = socket.create_connection(svc.base, timeout=kafka_timeout + 5)
            sock.sendall((f"POST {SUCCEED} HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                          f"json\r\nContent-Length: {len(body)}\r\n\r\n").encode())
            held[sock] = body
    paused = False
    for sent in range(0, 1500, 40):
        time.sleep(max(0.0, signalled + 0.1 + sent / 400 - time.monotonic()))
        if not paused and time.monotonic() >= signalled + delay + 3.1:
            broker.pause()
            paused = True
        for sock, body in held.items():
            with contextlib.suppress(OSError):
                sock.sendall(body[sent:sent + 40])
    answers = [answer_or_none(sock) for sock in held]
    with contextlib.suppress(subprocess.TimeoutExpired):
        svc.proc.wait(30)
    exited = time.monotonic() - signalled
    broker.resume()
    print(f"2. {len(held)} held mock-succeeds, bodies done {delay + 3.35:g} s after SIGTERM "
          f"(SHUTDOWN_DELAY_S={delay:g}, KAFKA_TIMEOUT_S={kafka_timeout:g}): answers {answers}; "
          f"exit {svc.proc.poll()} after {exited:.1f} s (bound {delay + kafka_timeout + 3:g} s)")
    svc.kill()


def attack_3(start):
    svc = start(IDLE_TIMEOUT_S=5)
    for name, pieces in (("1,500 B with the head, pause 1.2 s", [(1500, 1.2), (548, 0)]),
                         ("pause 1.2 s after the head", [(0, 1.2), (2048, 0)]),
                         ("260 B/s, first piece with the head", [(26, 0.1)] * 20 + [(1528, 0)])):
        status, took = post_in_pieces(svc.base, padded_payment_body(7, 2048), pieces)
        print(f"3. a 2 KiB body, {name}: {status} after {took:.2f} s")
    svc.kill()


def attack_4(start):
    svc = start(ACCESS_LOG=0, preexec_fn=lambda: resource.setrlimit(
        resource.RLIMIT_NOFILE, (200, 200)))
    held, lingering, answered = open_slow_clients(svc.base, 40), [], []
    stop = threading.Event()

    def keep_sending():
        while not stop.wait(0.3):
            for sock in list(lingering):
                with contextlib.suppress(OSError):
                    sock.send(b"x" * 100, socket.MSG_DONTWAIT)

    threading.Thread(target=keep_sending, daemon=True).start()
    for i in range(300):
        with contextlib.suppress(OSError):
            sock = socket.create_connection(svc.base, timeout=5)
            sock.sendall(f"POST {CREATE} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                         f"\r\n".encode() + b"x" * 1000)
            lingering.append(sock)
        if i % 15 == 14:
            started = time.monotonic()
            try:
                answered.append(request(svc.base, "GET", "/health", timeout_s=4).status == 200
                                and time.monotonic() - started <= 2)
            except Exception:
                answered.append(False)
    stop.set()
    time.sleep(0.5)
    output = svc.output
    print(f"4. RLIMIT_NOFILE=200, 40 held, 300 lingering: fresh clients {sum(answered)} of "
          f"{len(answered)}; 'Too many open files' lines {output.count('Too many open files')}, "
          f"tracebacks {output.count('Traceback')}")
    for sock in lingering + held:
        sock.close()
    svc.kill()


def attack_5(start):
    svc, statuses = start(FORWARDED_ALLOW_IPS="*"), []
    for hops in FORGED_HOPS:
        head = (f"GET /health?probe=misfire HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {hops}\r\n"
                f"Connection: close\r\n\r\n")
        with socket.create_connection(svc.base, timeout=5) as sock:
            sock.sendall(head.encode("latin-1"))
            statuses.append((parse_raw_answers(read_until_closed(sock)) or [(None,)])[0][0])
    time.sleep(1)
    lines = [line for line in svc.output.splitlines() if "probe=misfire" in line]
    raw = re.findall(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\ufffd]", svc.output)
    clients = [line.split()[1] if line.startswith("INFO:") else line.split(" ", 1)[0]
               for line in lines]          # uvicorn's lines begin with INFO:
    print(f"5. {len(FORGED_HOPS)} forged X-Forwarded-For (answers {statuses}): {len(lines)} "
          f"log lines, {len(raw)} raw control bytes in the log; clients logged: {clients}")
    svc.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target", choices=["ours", "uvicorn"])
    ap.add_argument("--script", help="another payment_service.py to run as ours")
    ap.add_argument("--uvicorn", default="uvicorn")
    ap.add_argument("--only", default="1,2,3,4,5")
    args = ap.parse_args()
    for number in args.only.split(","):
        broker = Tansu().start()
        broker.create_topic()

        def start(preexec_fn=None, **env):
            if args.target == "uvicorn":
                forwarded = ["--proxy-headers", "--forwarded-allow-ips", "*"] \
                    if "FORWARDED_ALLOW_IPS" in env else []
                return Uvicorn(broker.bootstrap, args.uvicorn, preexec_fn, forwarded)
            return ServiceProcess(broker.bootstrap, preexec_fn=preexec_fn,
                                  argv=[sys.executable, args.script] if args.script else None,
                                  **env)
        try:
            attack = globals()[f"attack_{number}"]
            attack(start, broker) if number == "2" else attack(start)
        finally:
            broker.kill()


if __name__ == "__main__":
    main()
