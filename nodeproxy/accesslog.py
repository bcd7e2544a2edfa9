"""Access log and atomic log lines: one JSON object per line, each written with a single write().

Every process of the daemon (supervisor and workers) writes to the same stderr. A line written with more
than one write() can be split by another process's line (issue 6, defect 12), so every record here is
rendered completely first and then written with one os.write():

- to a pipe (journald, a container runtime, `| tee`), a write of at most PIPE_BUF bytes is atomic, so
  records are kept below PIPE_BUF (long free-text fields are truncated);
- to a regular file, the descriptor is switched to O_APPEND, so every write lands at the end as a whole
  even when several processes (or several open descriptions of the file) append to it.

Access-log records are rendered by hand rather than through structlog: a request's record is a few
string joins (about 4.3 us with the write to /dev/null), where the daemon's structlog chain with its
JSON renderer takes 12.9 us for the same fields (bench commands in docs/tracing.md). The keys are those
structlog's JSON renderer produced before (`event`, the connection's fields, `level`, `timestamp`), so
readers of the log see the same records. structlog still decides the rest: the daemon's other events,
and (through :func:`structlog_level`) the level a caller may hand an AccessLog.

What is written is set by :class:`AccessLogConfig` (output, sampling of successful records, initial
level) and, at run time, by :func:`set_level`. The fields of every record are listed in
docs/tracing.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import stat
import sys
import time
from random import random as _random
from typing import Annotated, Any, Final, Literal, Protocol, TextIO, cast

import structlog
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Records at most this long are written atomically to a pipe (POSIX guarantees PIPE_BUF >= 512; Linux 4096).
MAX_LINE = select.PIPE_BUF
# Free text (a refusal reason, an error message) is cut to this many characters, which keeps a record of
# the longest allowed names well below MAX_LINE.
MAX_TEXT = 512
_ENCODED_CACHE_LIMIT = 4096  # distinct service names / upstream addresses kept JSON-encoded


def prepare_fd(fd: int) -> None:
    """Make `fd` safe for appends from several processes: O_APPEND on a regular file; pipes, sockets and
    terminals need nothing (their atomicity is per write() below PIPE_BUF)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return  # a closed stderr: writes will fail and be counted as dropped
    if stat.S_ISREG(mode):
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not flags & os.O_APPEND:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)


def write_line(fd: int, line: bytes) -> bool:
    """Write one whole record (ending in a newline) with a single write(); False if it was dropped.

    A logger must never take the proxy down: a full non-blocking pipe or a closed stderr drops the record.
    A short write (a signal, or a record over MAX_LINE) is completed with further writes.
    """
    view = memoryview(line)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:  # EAGAIN (a full non-blocking pipe), EPIPE, EBADF, ENOSPC, EIO, ...
            return False
        view = view[written:]
    return True


class _Clock:
    """ISO 8601 UTC timestamps with microseconds, as structlog's TimeStamper(fmt="iso", utc=True) gives,
    formatting the date and time only once per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        ns = time.time_ns()  # integer arithmetic: a third cheaper than splitting a float
        second = ns // 1_000_000_000
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{ns // 1000 % 1_000_000:06d}Z"


def _text(value: str) -> str:
    """A JSON string literal for free text, cut to MAX_TEXT characters. Printable ASCII without '"' and
    a backslash (the usual case) is its own JSON string body: C-speed checks instead of json.dumps,
    which costs three times as much."""
    if (
        len(value) <= MAX_TEXT
        and value.isascii()
        and value.isprintable()
        and '"' not in value
        and "\\" not in value
    ):
        return f'"{value}"'
    return json.dumps(value[:MAX_TEXT])


# structlog's numeric levels (as logging's).
INFO = 20
WARNING = 30
ERROR = 40


class LevelSource(Protocol):
    """Where the current log level comes from: events below `threshold` are dropped (e.g. the daemon's
    LogLevel processor, whose level the admin API changes at run time)."""

    @property
    def threshold(self) -> int: ...


class FixedLevel:
    """A level that does not change."""

    def __init__(self, threshold: int = INFO) -> None:
        self.threshold = threshold


# Access-log levels by name; "off" is above every record's level.
LEVELS: Final[dict[str, int]] = {"debug": 10, "info": INFO, "warning": WARNING, "error": ERROR, "off": 100}


class SettableLevel:
    """A level changed at run time by name (:func:`set_level`)."""

    def __init__(self, name: str = "info") -> None:
        self.name = name
        self.threshold = LEVELS[name]

    def set(self, name: str) -> None:
        threshold = LEVELS.get(name)
        if threshold is None:
            raise ValueError(f"unknown access-log level {name!r} (one of {', '.join(LEVELS)})")
        self.name, self.threshold = name, threshold


# The access-log level of this process: the level of every AccessLog made without its own level source.
# "info" writes every record, "warning" only failures (see AccessLog), "off" none.
ACCESS_LEVEL: Final = SettableLevel("info")


def set_level(name: str) -> None:
    """Change the access-log level of this process at once (the admin API calls it in every worker):
    one of LEVELS. Raises ValueError for another name."""
    ACCESS_LEVEL.set(name)


def get_level() -> str:
    return ACCESS_LEVEL.name


def _output(value: str) -> str:
    if value in ("stdout", "stderr"):
        return value
    if not value.startswith("/") or "\0" in value or len(value) > 4095:
        raise ValueError("must be 'stdout', 'stderr' or an absolute file path")
    return value


class AccessLogConfig(BaseModel):
    """Where access-log records go and how many of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="False: no access-log records (as --no-access-log).")
    # Under systemd, stdout and stderr go to journald; a file is opened for appending (O_APPEND, so
    # every worker process's records land whole).
    output: Annotated[str, AfterValidator(_output)] = Field(
        default="stderr", description="'stdout', 'stderr' or an absolute file path."
    )
    # Failures (5xx, no response, any response flag, refused or failed connections) are always
    # written: sampling thins the successes only, which are the bulk and the least interesting.
    sampling: float = Field(
        default=100.0,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="Percent of successful requests and connections that get a record.",
    )
    level: Literal["debug", "info", "warning", "error", "off"] = Field(
        default="info",
        description="Initial access-log level (changeable at run time); warning: failures only.",
    )


def structlog_level() -> LevelSource:
    """The level structlog is configured with: the first processor with an integer `threshold` (the
    daemon's run-time LogLevel filter), else the fixed level of the configured bound logger."""
    for processor in structlog.get_config()["processors"]:
        if isinstance(getattr(processor, "threshold", None), int):
            return cast(LevelSource, processor)
    logger = structlog.get_logger("nodeproxy.access")
    for threshold in (INFO, WARNING, ERROR):
        if logger.is_enabled_for(threshold):
            return FixedLevel(threshold)
    return FixedLevel(ERROR + 10)


def open_output(output: str) -> tuple[int, bool]:
    """The descriptor for an AccessLogConfig.output and whether the caller owns it (a file it opened):
    stdout and stderr are used as they are (under systemd both go to journald); a file is opened for
    appending, created 0640 if missing."""
    # The descriptors themselves, not sys.stdout/sys.stderr, which a library or test may have replaced.
    if output == "stdout":
        return 1, False
    if output == "stderr":
        return 2, False
    return os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640), True


class AccessLog:
    """One JSON line per connection outcome (closed, refused, an upstream connect that failed) and per
    HTTP request.

    `enabled` False (the `--no-access-log` flag, `access_log.enabled`) makes every method return at once.
    `level` filters like the rest of the log and is read per record, so a run-time change applies at once
    (default: this process's ACCESS_LEVEL, see set_level). A record of a failure is a warning: a request
    with a 5xx status, no response or any response flag, a connection closed with a flag, refused, or
    whose upstream connect failed; every other record is info. `sampling` (percent) thins the info
    records only, so failures are always written.
    """

    def __init__(
        self,
        fd: int | None = None,
        enabled: bool = True,
        level: LevelSource | None = None,
        sampling: float = 100.0,
        *,
        owns_fd: bool = False,
    ) -> None:
        if not 0.0 <= sampling <= 100.0:
            raise ValueError(f"access-log sampling must be a percentage, not {sampling!r}")
        self.fd = sys.stderr.fileno() if fd is None else fd
        self.enabled = enabled
        self.level: LevelSource = level if level is not None else ACCESS_LEVEL
        self.dropped = 0  # records a full pipe or a closed stderr cost us
        self.sampled_out = 0  # info records that sampling skipped
        self._keep_below = sampling / 100.0
        self._sampling = sampling < 100.0
        self._owns_fd = owns_fd
        self._clock = _Clock()
        self._encoded: dict[str, str] = {}
        if enabled:
            prepare_fd(self.fd)

    @classmethod
    def from_config(
        cls, config: AccessLogConfig, enabled: bool = True, level: LevelSource | None = None
    ) -> AccessLog:
        """An access log as `config` says (output, sampling; its `level` is the process's, see
        set_level); `enabled` False (--no-access-log) overrides config.enabled. Raises OSError when the
        output file cannot be opened."""
        on = enabled and config.enabled
        if not on:
            return cls(enabled=False)
        fd, owned = open_output(config.output)
        return cls(fd, True, level, config.sampling, owns_fd=owned)

    def close(self) -> None:
        """Close the output file this log opened (stdout and stderr stay open)."""
        if self._owns_fd:
            self._owns_fd = False
            os.close(self.fd)

    @property
    def info_enabled(self) -> bool:
        return self.enabled and self.level.threshold <= INFO

    @property
    def warning_enabled(self) -> bool:
        """Whether any record could be written: callers test this before gathering a record's fields."""
        return self.enabled and self.level.threshold <= WARNING

    def request_wanted(self, status: int, flags: str) -> bool:
        """Whether the level lets request()'s record of a request with this status and flags through
        (sampling aside): callers test this before gathering its fields, so that at level warning a
        success costs no more than this."""
        return self.enabled and self.level.threshold <= (
            WARNING if status >= 500 or status == 0 or flags != "-" else INFO
        )

    def _keep(self, failure: bool) -> str | None:
        """The level name of a record that is written, None if the level or sampling skips it."""
        if not self.enabled:
            return None
        threshold = self.level.threshold
        if failure:
            return "warning" if threshold <= WARNING else None
        if threshold > INFO:
            return None
        if self._sampling and _random() >= self._keep_below:
            self.sampled_out += 1
            return None
        return "info"

    def _name(self, value: str | None) -> str:
        """JSON for a service name or upstream address; they repeat, so each is encoded once."""
        if value is None:
            return "null"
        encoded = self._encoded.get(value)
        if encoded is None:
            if len(self._encoded) >= _ENCODED_CACHE_LIMIT:
                self._encoded.clear()
            encoded = self._encoded[value] = json.dumps(value[:MAX_TEXT])
        return encoded

    def _emit(self, event: str, level: str, conn_fields: str, fields: str) -> None:
        line = (
            f'{{"event": "{event}", {conn_fields}{fields}, "level": "{level}", '
            f'"timestamp": "{self._clock.now()}"}}\n'
        ).encode()
        if len(line) > MAX_LINE:
            # Only names and texts full of escaped characters get here; keep the record whole and atomic.
            line = (
                json.dumps(
                    {
                        "event": event,
                        "truncated": line[:MAX_TEXT].decode("ascii", "replace"),
                        "level": level,
                        "timestamp": self._clock.now(),
                    }
                )
                + "\n"
            ).encode()
        if not write_line(self.fd, line):
            self.dropped += 1

    def _identities(
        self,
        source_workload: str | None,
        source_identity: str | None,
        destination_workload: str | None,
        destination_identity: str | None,
    ) -> str:
        """Workload names and identities (SPIFFE ids) known for a connection; only the known ones are
        written, so a record without any stays as short as before."""
        text = ""
        if source_workload is not None:
            text += f', "src_workload": {self._name(source_workload)}'
        if source_identity is not None:
            text += f', "src_identity": {self._name(source_identity)}'
        if destination_workload is not None:
            text += f', "dst_workload": {self._name(destination_workload)}'
        if destination_identity is not None:
            text += f', "dst_identity": {self._name(destination_identity)}'
        return text

    def connection_fields(
        self,
        conn_id: int,
        client: tuple[str, int],
        original: tuple[str, int],
        service: str | None,
        upstream: tuple[str, int] | None,
        *,
        source_workload: str | None = None,
        source_identity: str | None = None,
        destination_workload: str | None = None,
        destination_identity: str | None = None,
    ) -> str:
        """The fields every record about one connection starts with (addresses come from inet_ntop and
        config-validated endpoints, so they need no escaping beyond what _name does)."""
        upstream_text = self._name(f"{upstream[0]}:{upstream[1]}") if upstream is not None else "null"
        fields = (
            f'"conn": {conn_id}, "src": "{client[0]}:{client[1]}", "dst": "{original[0]}:{original[1]}", '
            f'"service": {self._name(service)}, "upstream": {upstream_text}'
        )
        if source_workload or source_identity or destination_workload or destination_identity:
            fields += self._identities(
                source_workload, source_identity, destination_workload, destination_identity
            )
        return fields

    def closed(
        self,
        conn_fields: str,
        ending: str,
        err: int,
        bytes_up: int,
        bytes_down: int,
        duration_ms: float,
        attempts: int,
        flags: str = "-",
    ) -> None:
        """A relayed connection ended; `flags`: Envoy-style response flags ("-": none), which make the
        record a failure."""
        level = self._keep(flags != "-")
        if level is not None:
            self._emit(
                "connection closed",
                level,
                conn_fields,
                f', "ending": "{ending}", "flags": {self._name(flags)}, "errno": {err}, '
                f'"bytes_up": {bytes_up}, "bytes_down": {bytes_down}, "duration_ms": {duration_ms:.3f}, '
                f'"attempts": {attempts}',
            )

    def refused(self, conn_fields: str, reason: str, attempts: int, flags: str = "-") -> None:
        """The proxy reset a connection it could not relay; `flags` says why (UO, UH, UF, NR, LR)."""
        level = self._keep(True)
        if level is not None:
            self._emit(
                "connection refused",
                level,
                conn_fields,
                f', "reason": {_text(reason)}, "flags": {self._name(flags)}, "attempts": {attempts}',
            )

    def connect_failed(self, conn_fields: str, err: int) -> None:
        level = self._keep(True)
        if level is not None:
            error = os.strerror(err) if err else "unknown error"
            self._emit(
                "upstream connect failed",
                level,
                conn_fields,
                f', "errno": {err}, "error": {_text(error)}',
            )

    def request(
        self,
        request_id: int,
        conn_fields: str,
        method: str | None,
        authority: str | None,
        path: str | None,
        route: str | None,
        status: int,
        flags: str,
        err: int,
        bytes_in: int,
        bytes_out: int,
        decide_ms: float,
        upstream_ms: float,
        duration_ms: float,
        attempts: int,
        reused: bool,
        grpc_status: int = -1,
        trace_id: str | None = None,
        x_request_id: str | None = None,
    ) -> None:
        """One finished HTTP request. `conn_fields` is http_request_fields(); method, authority, path and
        the x-request-id come from the client, so they are escaped and cut like free text. grpc_status
        -1 (none) and a missing trace or request id leave their keys out. A 5xx, no response (status 0)
        or any flag makes the record a failure."""
        level = self._keep(status >= 500 or status == 0 or flags != "-")
        if level is None:
            return
        tracing = ""
        if grpc_status >= 0:
            tracing = f', "grpc_status": {grpc_status}'
        if trace_id is not None:
            tracing += f', "trace_id": {_text(trace_id)}'  # hex digits from the Tracer: the fast path
        if x_request_id is not None:
            tracing += f', "request_id": {_text(x_request_id)}'
        self._emit(
            "request",
            level,
            f'"request": {request_id}, {conn_fields}',
            f', "method": {_optional_text(method)}, "authority": {_optional_text(authority)}, '
            f'"path": {_optional_text(path)}, "route": {self._name(route)}, "status": {status}, '
            f'"flags": {self._name(flags)}, "errno": {err}, "bytes_in": {bytes_in}, '
            f'"bytes_out": {bytes_out}, "decide_ms": {decide_ms:.3f}, "upstream_ms": {upstream_ms:.3f}, '
            f'"duration_ms": {duration_ms:.3f}, "attempts": {attempts}, '
            f'"reused": {"true" if reused else "false"}{tracing}',
        )

    def http_request_fields(
        self,
        conn_id: int,
        client: tuple[str, int] | None,
        original: tuple[str, int] | None,
        service: str | None,
        upstream: tuple[str, int] | None,
        *,
        source_workload: str | None = None,
        source_identity: str | None = None,
        destination_workload: str | None = None,
        destination_identity: str | None = None,
    ) -> str:
        """The connection fields of an HTTP request record; the connection may be gone (None)."""
        src = f'"{client[0]}:{client[1]}"' if client is not None else "null"
        dst = f'"{original[0]}:{original[1]}"' if original is not None else "null"
        upstream_text = self._name(f"{upstream[0]}:{upstream[1]}") if upstream is not None else "null"
        fields = (
            f'"conn": {conn_id}, "src": {src}, "dst": {dst}, "service": {self._name(service)}, '
            f'"upstream": {upstream_text}'
        )
        if source_workload or source_identity or destination_workload or destination_identity:
            fields += self._identities(
                source_workload, source_identity, destination_workload, destination_identity
            )
        return fields


def _optional_text(value: str | None) -> str:
    return "null" if value is None else _text(value)


class AtomicLineLogger:
    """A structlog logger writing each rendered message as one line with one write() (unlike
    PrintLogger, whose print() writes the message and the newline separately)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        prepare_fd(fd)

    def msg(self, message: str) -> None:
        line = (message + "\n").encode("utf-8", "backslashreplace")
        write_line(self.fd, line)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class AtomicLineLoggerFactory:
    """structlog logger_factory for AtomicLineLogger: `AtomicLineLoggerFactory(sys.stderr)`."""

    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file

    def __call__(self, *args: Any) -> AtomicLineLogger:
        file = self._file if self._file is not None else sys.stderr
        file.flush()  # anything print()ed before must not land after our lines
        return AtomicLineLogger(file.fileno())
