"""The benchmark's parsing and reporting, without running it (no wrk, broker or venv)."""
import pytest

import compare

WRK_KEEPALIVE = """\
Running 4s test @ http://127.0.0.1:40000/payment/v1/payments/mock-succeed
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.01ms    3.10ms  60.20ms   91.82%
    Req/Sec     2.05k   400.23     2.52k    80.00%
  Latency Distribution
     50%    7.40ms
     75%    8.35ms
     90%   10.89ms
     99%  850.00us
  16400 requests in 4.00s, 2.10MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:   4099.75
Transfer/sec:    537.00KB
"""


def test_parse_wrk_reads_rate_p99_answers_and_errors():
    r = compare.parse_wrk(WRK_KEEPALIVE)
    assert r == {"rps": 4099.75, "p99": 0.85, "ok": 16393, "bad": 7, "sockerr": 6}


def test_parse_wrk_refuses_output_it_does_not_know():
    with pytest.raises(RuntimeError, match="unexpected wrk output"):
        compare.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.parametrize("text, ms", [("850.00us", 0.85), ("7.40ms", 7.4),
                                      ("1.20s", 1200.0), ("1.00m", 60000.0)])
def test_to_ms(text, ms):
    assert compare.to_ms(text) == pytest.approx(ms)


def test_each_scenario_has_its_own_wrk_command():
    cmds = {s: compare.wrk_command("http://h", s, 4, 32, "post.lua") for s in compare.SCENARIOS}
    assert cmds["health"] == ["wrk", "-t2", "-c32", "-d4s", "--latency", "http://h/health"]
    assert cmds["succeed"][-3:] == ["-s", "post.lua", "http://h" + compare.SUCCEED]
    assert cmds["create_close"][1:3] == ["-t2", "-c8"]
    assert "Connection: close" in cmds["create_close"]
    assert cmds["create_c1"][1:3] == ["-t1", "-c1"]
    with pytest.raises(ValueError):
        compare.wrk_command("http://h", "nope", 4, 32, "post.lua")


def test_unknown_scenario_is_an_argument_error():
    with pytest.raises(SystemExit):
        compare.parse_args(["--only", "health,nope"])
    assert compare.parse_args(["--only", "succeed"]).only == ["succeed"]


def test_figures_are_key_value_pairs_floats_to_two_places():
    assert compare.format_figures({"health_rps_ratio": 2.2249, "lost_events": 0,
                                   "succeed_ceiling_rps": 6355}) == \
        "health_rps_ratio=2.22 lost_events=0 succeed_ceiling_rps=6355"
