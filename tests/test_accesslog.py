"""Access log: every record is one whole JSON line, also with several processes writing to one file or
pipe under load (issue 6, defect 12)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from nodeproxy import netns
from nodeproxy.accesslog import (
    ERROR,
    INFO,
    MAX_LINE,
    WARNING,
    AccessLog,
    AtomicLineLoggerFactory,
    FixedLevel,
    prepare_fd,
    structlog_level,
)
from nodeproxy.lab import Lab, stop_process
from tests.conftest import running_lab, start_proxy

LOAD_SECONDS = 3
RECORDS_PER_WRITER = 5000


def parse_lines(text: str) -> list[dict[str, object]]:
    """Every line must be one JSON object; the failure names the first line that is not."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise AssertionError(f"line {number} is not one JSON record ({err}): {line[:300]!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records


ACCESS_EVENTS = frozenset({"connection closed", "connection refused", "upstream connect failed"})


def parse_access_log(text: str) -> list[dict[str, object]]:
    """The daemon's log, where only access-log records are known to be written whole: every line must be
    whole JSON objects, and an access-log record always ends its line (it is written with its newline
    in one write()). Other lines may still be glued: structlog's PrintLogger writes a message and its
    newline separately when stderr is unbuffered (PYTHONUNBUFFERED), until daemon.configure_logging
    uses accesslog.AtomicLineLoggerFactory; daemon_logs_atomically() says when parse_lines applies."""
    decoder = json.JSONDecoder()
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        position = 0
        while position < len(line):
            try:
                record, end = decoder.raw_decode(line, position)
            except json.JSONDecodeError as err:
                raise AssertionError(f"line {number} holds a broken record ({err}): {line[:300]!r}") from None
            assert isinstance(record, dict), line
            if record.get("event") in ACCESS_EVENTS and end != len(line):
                raise AssertionError(
                    f"line {number}: an access-log record is glued to the next: {line[:300]!r}"
                )
            records.append(record)
            position = end
    return records


def daemon_logs_atomically() -> bool:
    """Whether the daemon writes its structlog lines with one write() each (AtomicLineLoggerFactory)."""
    from nodeproxy import daemon

    daemon.configure_logging("info")
    try:
        return isinstance(structlog.get_config()["logger_factory"], AtomicLineLoggerFactory)
    finally:
        structlog.reset_defaults()


def _write_records(fd: int, writer: int) -> None:
    log = AccessLog(fd)
    for i in range(RECORDS_PER_WRITER):
        fields = log.connection_fields(
            writer * RECORDS_PER_WRITER + i, ("10.0.0.1", i), ("10.96.0.10", 80), "web", None
        )
        if i % 3:
            log.closed(fields, "closed", 0, i, 2 * i, 0.5, 1)
        else:
            log.refused(
                fields, 'reason with "quotes", a \\ and non-ASCII: \u00e9\u6f22 ' + "x" * (i % 700), 0
            )


def _fork_writers(fd: int, writers: int) -> list[int]:
    pids = []
    for writer in range(writers):
        pid = os.fork()
        if pid == 0:
            try:
                _write_records(fd, writer)
            finally:
                os._exit(0)
        pids.append(pid)
    return pids


def test_records_from_several_processes_stay_whole_on_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    pids = _fork_writers(write_fd, 3)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as reader:
        while chunk := reader.read(1 << 16):
            chunks.append(chunk)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    records = parse_lines(b"".join(chunks).decode())
    assert len(records) == 3 * RECORDS_PER_WRITER
    assert len({r["conn"] for r in records}) == 3 * RECORDS_PER_WRITER


def test_records_from_several_processes_stay_whole_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    # Two separate open descriptions without O_APPEND would overwrite each other: prepare_fd sets it.
    fds = [os.open(path, os.O_WRONLY | os.O_CREAT, 0o644) for _ in range(2)]
    pids = [pid for fd in fds for pid in _fork_writers(fd, 1)]
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    for fd in fds:
        assert os.get_blocking(fd)
        os.close(fd)
    records = parse_lines(path.read_text())
    assert len(records) == 2 * RECORDS_PER_WRITER


def test_record_fields_and_bounded_length() -> None:
    read_fd, write_fd = os.pipe()
    log = AccessLog(write_fd)
    fields = log.connection_fields(
        7, ("10.244.1.10", 40000), ("10.96.0.10", 80), "w\u00e9b\n", ("10.244.1.100", 8080)
    )
    log.closed(fields, "closed", 0, 10, 20, 1.23456, 1)
    log.refused(fields, "\u6f22" * 5000, 2)  # escapes to 6 bytes a character: far over PIPE_BUF uncut
    log.connect_failed(fields, 111)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        raw = reader.read()
    lines = raw.decode().splitlines()
    assert all(len(line) + 1 <= MAX_LINE for line in lines)
    closed, refused, failed = parse_lines(raw.decode())
    assert closed["event"] == "connection closed" and closed["level"] == "info"
    assert closed["src"] == "10.244.1.10:40000" and closed["dst"] == "10.96.0.10:80"
    assert closed["service"] == "w\u00e9b\n" and closed["upstream"] == "10.244.1.100:8080"
    assert closed["bytes_up"] == 10 and closed["bytes_down"] == 20 and closed["duration_ms"] == 1.235
    assert str(closed["timestamp"]).endswith("Z") and len(str(closed["timestamp"])) == 27
    assert refused["event"] == "connection refused"
    assert failed["level"] == "warning" and failed["error"] == os.strerror(111)


def test_warnings_only_and_disabled() -> None:
    read_fd, write_fd = os.pipe()
    level = FixedLevel(WARNING)
    quiet = AccessLog(write_fd, level=level)
    fields = quiet.connection_fields(1, ("10.0.0.1", 1), ("10.0.0.2", 2), None, None)
    quiet.closed(fields, "closed", 0, 0, 0, 0.0, 1)
    quiet.connect_failed(fields, 110)
    AccessLog(write_fd, enabled=False).connect_failed(fields, 110)
    level.threshold = INFO  # a run-time change (the admin API) applies to the next record
    quiet.closed(fields, "closed", 0, 0, 0, 0.0, 1)
    level.threshold = ERROR
    quiet.connect_failed(fields, 110)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        records = parse_lines(reader.read().decode())
    assert [r["event"] for r in records] == ["upstream connect failed", "connection closed"]
    assert records[0]["service"] is None and records[0]["upstream"] is None


def test_the_level_follows_the_daemons_run_time_filter() -> None:
    """daemon.configure_logging filters with a processor whose level changes at run time (or, in older
    versions, with a filtering bound logger): the access log follows either."""
    from nodeproxy import daemon

    try:
        daemon.configure_logging("warning")
        level = structlog_level()
        assert level.threshold == WARNING
        if hasattr(daemon, "LOG_LEVEL"):
            daemon.LOG_LEVEL.set("info")
            assert level.threshold == INFO
    finally:
        structlog.reset_defaults()
        if hasattr(daemon, "LOG_LEVEL"):
            daemon.LOG_LEVEL.set("info")


def test_atomic_line_logger_for_structlog(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("w") as file:
        logger = AtomicLineLoggerFactory(file)()
        logger.info('{"event":"a"}')
        logger.error('{"event":"b"}')
    assert [r["event"] for r in parse_lines(path.read_text())] == ["a", "b"]


def test_prepare_fd_sets_append_only_on_regular_files(tmp_path: Path) -> None:
    import fcntl

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    read_fd, write_fd = os.pipe()
    try:
        prepare_fd(fd)
        prepare_fd(write_fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        assert not fcntl.fcntl(write_fd, fcntl.F_GETFL) & os.O_APPEND
    finally:
        for each in (fd, read_fd, write_fd):
            os.close(each)


# -- the daemon under load ----------------------------------------------------------------------------


@pytest.fixture
def two_client_lab() -> Iterator[Lab]:
    with running_lab(clients=2) as lab:
        yield lab


def wrk_close_load(lab: Lab) -> int:
    """Connection: close load from every client pod for LOAD_SECONDS; returns the requests made."""
    loads = [
        subprocess.Popen(
            netns.exec_argv(
                pod.ns,
                [
                    "wrk",
                    "-t1",
                    "-c16",
                    f"-d{LOAD_SECONDS}s",
                    "-H",
                    "Connection: close",
                    "http://10.96.0.10:80/",
                ],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pod in lab.client_pods
    ]
    requests = 0
    for load in loads:
        output = load.communicate(timeout=LOAD_SECONDS + 30)[0]
        found = [line for line in output.splitlines() if "requests in" in line]
        assert found, output
        requests += int(found[0].split()[0])
    return requests


@dataclass
class PipedProxy:
    """The daemon with stdout and stderr on one pipe (as under journald or a container runtime)."""

    proc: subprocess.Popen[bytes]
    config_path: Path
    chunks: list[bytes]
    reader: threading.Thread

    def output(self) -> str:
        return b"".join(self.chunks).decode()


def start_proxy_on_a_pipe(lab: Lab, tmp: Path, config_yaml: str) -> PipedProxy:
    config_path, ready = tmp / "config.yaml", tmp / "ready"
    config_path.write_text(config_yaml)
    argv = [
        sys.executable,
        "-m",
        "nodeproxy",
        "run",
        "--config",
        str(config_path),
        "--ready-file",
        str(ready),
    ]
    proc = lab.spawn(lab.node_ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stream = proc.stdout
    assert stream is not None
    chunks: list[bytes] = []

    def read_all() -> None:
        while chunk := os.read(stream.fileno(), 1 << 16):
            chunks.append(chunk)

    piped = PipedProxy(proc, config_path, chunks, threading.Thread(target=read_all))
    piped.reader.start()
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            piped.reader.join(10)
            raise RuntimeError(f"nodeproxy did not become ready:\n{piped.output()[-4000:]}")
        time.sleep(0.05)
    return piped


@pytest.mark.netns
@pytest.mark.parametrize("output", ["file", "pipe"])
def test_loaded_daemon_log_of_two_workers_is_one_json_record_per_line(
    two_client_lab: Lab, tmp_path: Path, output: str
) -> None:
    lab = two_client_lab
    config_yaml = lab.config_yaml(extra="relay:\n  threads: 2\n")
    piped: PipedProxy | None = None
    if output == "file":
        proxy = start_proxy(lab, tmp_path, config_yaml)
        proc, config_path = proxy.proc, proxy.config_path
    else:
        piped = start_proxy_on_a_pipe(lab, tmp_path, config_yaml)
        proc, config_path = piped.proc, piped.config_path
    try:
        requests = wrk_close_load(lab)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        stop_process(proc)
        if piped is not None:
            piped.reader.join(10)
        subprocess.run(
            netns.exec_argv(
                lab.node_ns, [sys.executable, "-m", "nodeproxy", "cleanup", "--config", str(config_path)]
            ),
            capture_output=True,
        )
    assert requests > 1000  # enough load for two workers to write at the same time
    text = piped.output() if piped is not None else proxy.log()
    records = parse_lines(text) if daemon_logs_atomically() else parse_access_log(text)
    closed = [r for r in records if r.get("event") == "connection closed"]
    # wrk's connections still open at the end are counted when the daemon stops them.
    assert len(closed) >= requests, (len(closed), requests)
    workers = {int(str(r["conn"])) % 2 for r in closed}
    assert workers == {0, 1}, "both workers logged connections"


@pytest.mark.parametrize("threshold", [INFO, WARNING, ERROR])
@pytest.mark.parametrize(
    ("status", "flags"), [(200, "-"), (404, "-"), (503, "-"), (0, "-"), (200, "URX"), (429, "RL")]
)
def test_request_wanted_says_whether_request_writes_a_record(threshold: int, status: int, flags: str) -> None:
    """The HTTP engine asks request_wanted() before it gathers a request's fields: it must agree with
    request() on every level, status and flag (and say no for a disabled log)."""
    read_fd, write_fd = os.pipe()
    try:
        log = AccessLog(write_fd, level=FixedLevel(threshold))
        fields = log.http_request_fields(1, ("10.0.0.1", 1), ("10.96.0.10", 80), "web", ("10.0.0.2", 8080))
        log.request(1, fields, "GET", "web", "/", "default", status, flags, 0, 0, 2, 0.1, 0.2, 0.3, 1, False)
        assert not AccessLog(write_fd, enabled=False).request_wanted(status, flags)
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        written = parse_lines(reader.read().decode())
    assert log.request_wanted(status, flags) == bool(written)
