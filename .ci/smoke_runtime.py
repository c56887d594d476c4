"""Run payment_service.py from the current (runtime-only) venv and try each endpoint.

Standard library only: it proves the service needs nothing beyond requirements.txt.
No broker runs here, so mock-succeed must answer 503 within the bound.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = b'{"order_id": 123, "amount_cents": 25998, "currency": "USD"}'


def call(base, path, body=None):
    req = urllib.request.Request(base + path, data=body,
                                 headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def main():
    installed = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"],
                               capture_output=True, text=True, check=True).stdout.split()
    extra = [p for p in installed if not p.lower().startswith(("kafka-python==", "pip==", "setuptools=="))]
    assert not extra, f"runtime venv holds more than requirements.txt: {extra}"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port), HOST="127.0.0.1", KAFKA_BOOTSTRAP="127.0.0.1:9",
               KAFKA_TIMEOUT_S="1")
    proc = subprocess.Popen([sys.executable, "payment_service.py"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        checks = [
            (call(base, "/health"), (200, {"status": "ok"})),
            (call(base, "/payment/health"), (200, {"status": "ok"})),
            (call(base, "/v1/_info")[0], 200),
            (call(base, "/payment/v1/payments/create-intent", BODY),
             (200, {"payment_id": "pay_123", "client_secret": "secret_123"})),
            (call(base, "/payment/v1/payments/mock-succeed", BODY)[0], 503),
        ]
        for got, want in checks:
            assert got == want, (got, want)
            print("ok:", got)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    print(out)
    assert proc.returncode == 0, proc.returncode
    print("runtime venv: service ran and stopped cleanly")


if __name__ == "__main__":
    main()
