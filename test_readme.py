"""The README's console examples, run in README order against a live service and broker.

Every ```console block of README.md is run, top to bottom, and what each command
prints (stdout and stderr together, as a terminal shows them) must be what the README
shows under it. The examples of the docs/ files are run the same way, each file on its
own from a fresh service (test_docs_console_examples_print_what_the_docs_show). So when the service's words
change, these tests fail until the documents say the same.

How a console block is read:
  - A line starting with `$ ` is a command. It continues on the next line while a line
    ends with `\\`; a command holding a here-document (`<<'PY'`, `<<EOF`) continues
    through the line that ends the here-document.
  - The lines after a command, up to the next command or the end of the block, are its
    expected output, compared line by line: exactly, but for a `Date:` header line,
    which matches any `Date:` line. Trailing whitespace (an HTTP header's CR) is ignored.
  - A line `# (...)` before the block's first command states what the block needs, as
    the text around it tells the reader to set it up. Items are separated by `; `:
        fresh service              a service just started (so its counts start at 0)
        no broker                  a service just started with no broker to reach
        started with NAME=value    a service just started with these settings (one or
                                   more NAME=value; the rest are the defaults)
    The test then starts a service so (for `no broker`, pointed at a closed port), and
    that state holds for the blocks after it until the next state line, as it would
    for a reader; an unknown item fails the test. The file starts in the quick start's
    state: one broker (Tansu, in memory, empty at the start) and one service with the
    default settings. So counts accumulate in the file's order.

What the test changes in the commands before running them (with `bash -c`, in the
repository's folder, a 60 s bound each): `localhost:8000` becomes the service's
address and `localhost:9092` the broker's, both on free loopback ports, and
`.venv/bin/python` becomes the interpreter running the tests (which has
kafka-python). The expected output is used as written.

The service is payment_service.py run as users run it (test_payment_service's
ServiceProcess) and the broker a Tansu of this test's own, never
PAYMENT_TEST_KAFKA_BOOTSTRAP's: the quick start reads the topic from its start.
"""

import difflib
import os
import re
import signal
import subprocess
import sys
from typing import NamedTuple

import pytest

from conftest import ServiceProcess, Tansu, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
COMMAND_TIMEOUT_S = 60
# The README's run command sets no KAFKA_TIMEOUT_S; ServiceProcess would set the tests'
# shorter one. No example's output depends on it unless a state line sets it.
DEFAULT_KAFKA_TIMEOUT_S = "5"
STATE_LINE = re.compile(r"# \((?P<items>.*)\)")
SETTING = re.compile(r"[A-Z][A-Z0-9_]*=\S+")
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<word>\w+)\1")


class Example(NamedTuple):
    line: int              # where the command starts in the file, 1-based
    command: str
    expected: list


class Block(NamedTuple):
    line: int
    state: tuple           # the items of its `# (...)` line; () for the quick start's
    examples: list


# ---------------------------------------------------------------------------
# Reading the console blocks
# ---------------------------------------------------------------------------

def console_blocks(path):
    """Every ```console block of the file, in order, as Blocks."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```console":
            start = i + 1
            end = start
            while lines[end].strip() != "```":
                end += 1
            blocks.append(parse_block(lines[start:end], first_line=start + 1))
            i = end
        i += 1
    return blocks


def parse_block(lines, first_line):
    state, examples, i = (), [], 0
    while i < len(lines) and not lines[i].startswith("$ "):
        match = STATE_LINE.fullmatch(lines[i].strip())
        assert match, f"line {first_line + i}: before the first command, only a `# (...)` line"
        state = tuple(item.strip() for item in match["items"].split(";"))
        i += 1
    while i < len(lines):
        start = i
        command = [lines[i][2:]]
        heredoc = HEREDOC.search(lines[i])
        while command[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i])
            heredoc = heredoc or HEREDOC.search(lines[i])
        if heredoc:
            while lines[i] != heredoc["word"]:
                i += 1
                assert i < len(lines), f"line {first_line + start}: here-document never ends"
                command.append(lines[i])
        i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        examples.append(Example(first_line + start, "\n".join(command), expected))
    return Block(first_line, state, examples)


def service_for(state):
    """(no_broker, settings) for a block's state items; unknown items fail."""
    no_broker, settings = False, {}
    for item in state:
        if item == "no broker":
            no_broker = True
        elif item == "fresh service":
            pass
        elif item.startswith("started with ") and all(
                SETTING.fullmatch(word) for word in item[len("started with "):].split()):
            settings.update(word.split("=", 1) for word in item[len("started with "):].split())
        else:
            raise AssertionError(f"unknown state {item!r}: see test_readme's docstring")
    return no_broker, settings


# ---------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------

def rewrite(command, service_port, broker_port):
    return (command.replace("localhost:8000", f"127.0.0.1:{service_port}")
                   .replace("localhost:9092", f"127.0.0.1:{broker_port}")
                   .replace(".venv/bin/python", sys.executable))


def run(command):
    """What the command prints, stdout and stderr together, as lines."""
    proc = subprocess.Popen(["bash", "-c", command], cwd=HERE, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[no exit within {COMMAND_TIMEOUT_S} s: killed]".encode()
    return [line.rstrip() for line in out.decode("utf-8", "replace").splitlines()]


def same(expected, actual):
    if len(expected) != len(actual):
        return False
    return all(e == a or (e.startswith("Date: ") and a.startswith("Date: "))
               for e, a in zip((line.rstrip() for line in expected), actual))


class Services:
    """The quick start's service and broker, and the services blocks ask for."""

    def __init__(self):
        self.tansu = Tansu().start()
        self.started = []
        try:
            self.current = self.start(self.tansu.port), self.tansu.port
        except BaseException:
            self.close()
            raise

    def start(self, broker_port, **settings):
        env = {"KAFKA_TIMEOUT_S": DEFAULT_KAFKA_TIMEOUT_S, **settings}
        svc = ServiceProcess(f"127.0.0.1:{broker_port}", **env)
        self.started.append(svc)
        return svc

    def for_block(self, block):
        """(service, broker port the commands are pointed at) for this block."""
        if block.state:
            no_broker, settings = service_for(block.state)
            broker_port = free_port() if no_broker else self.tansu.port   # nothing listens there
            for svc in self.started:
                svc.kill()
            self.current = self.start(broker_port, **settings), broker_port
        return self.current

    def close(self):
        for svc in self.started:
            svc.kill()
        self.tansu.kill()


def run_console_examples(path):
    """Run every console example of the file in order; fail listing each mismatch."""
    name = os.path.relpath(path, HERE)
    blocks = console_blocks(path)
    assert blocks, f"{name} has no console example"
    services = Services()
    failures, count = [], 0
    try:
        for block in blocks:
            service, broker_port = services.for_block(block)
            for example in block.examples:
                count += 1
                actual = [line.replace(f"127.0.0.1:{broker_port}", "localhost:9092")  # as shown
                          for line in run(rewrite(example.command, service.port, broker_port))]
                if not same(example.expected, actual):
                    diff = "\n".join(difflib.unified_diff(
                        example.expected, actual, f"{name} (what it shows)", "what it printed",
                        lineterm=""))
                    failures.append(f"{name}:{example.line}: $ {example.command}\n{diff}")
    finally:
        services.close()
    if failures:
        raise AssertionError(f"{len(failures)} of {count} console examples in {name} print "
                             f"something else:\n\n" + "\n\n".join(failures))


def test_parse_reads_commands_continuations_heredocs_outputs_and_states():
    block = parse_block([
        "# (no broker; started with KAFKA_TIMEOUT_S=1 ACCESS_LOG=0)",
        "$ curl a \\",
        "    b",
        "out 1",
        "out 2",
        "$ python - <<'PY'",
        "print(1)",
        "PY",
        "1",
        "$ true",
    ], first_line=10)
    assert block.state == ("no broker", "started with KAFKA_TIMEOUT_S=1 ACCESS_LOG=0")
    assert service_for(block.state) == (True, {"KAFKA_TIMEOUT_S": "1", "ACCESS_LOG": "0"})
    assert block.examples == [Example(11, "curl a \\\n    b", ["out 1", "out 2"]),
                              Example(15, "python - <<'PY'\nprint(1)\nPY", ["1"]),
                              Example(19, "true", [])]
    with pytest.raises(AssertionError, match="unknown state"):
        service_for(("a broker of its own",))
    assert same(["Date: Thu, 26 Nov 2026 09:33:35 GMT", "x"], ["Date: Mon, 1 Dec 2031", "x"])
    assert not same(["Server: a"], ["Server: b"]) and not same(["a"], ["a", "b"])


def test_a_document_that_shows_other_words_fails(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text("```console\n$ curl -s -w '\\n' localhost:8000/health\n"
                        '{"status": "fine"}\n```\n')
    with pytest.raises(AssertionError) as failure:
        run_console_examples(str(document))
    assert '-{"status": "fine"}\n+{"status": "ok"}' in str(failure.value)


def test_readme_console_examples_print_what_the_readme_shows():
    run_console_examples(os.path.join(HERE, "README.md"))


DOCS = sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(HERE, "docs"))
              if name.endswith(".md")) if os.path.isdir(os.path.join(HERE, "docs")) else []


@pytest.mark.parametrize("name", [name for name in DOCS
                                  if console_blocks(os.path.join(HERE, name))])
def test_docs_console_examples_print_what_the_docs_show(name):
    run_console_examples(os.path.join(HERE, name))
