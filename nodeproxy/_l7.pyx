# cython: language_level=3
"""The HTTP engine of nodeproxy: one HttpWorker per worker process, on its own thread, without the GIL.

Python hands it accepted client sockets (adopt). The engine reads them, parses request heads with the
_h1 codec and posts one REC_HEAD record per complete head (batched behind one eventfd write). Python
decides (nodeproxy.proxy.http) and answers in a batch: forward to an endpoint with header edits, or a
local reply. The engine then takes an upstream connection from its pool (per source address and
endpoint; LIFO, bounded, idle timeout) or connects a new one, transparently bound to the client pod's
address like the L4 relay, forwards the head and streams the body both ways (Content-Length, chunked
with trailers; never buffered whole: a side is not read while its peer holds HIGH_WATER unsent bytes),
forwards the response and posts a REC_DONE record with status, bytes, timings and flags. Pipelined
requests are handled one after the other, so their answers keep their order. After a 101 the two sockets
become a raw tunnel. Body bytes never reach Python.

HTTP/2 (h2c) through the same machine: a connection whose first bytes are the client preface (on any HTTP
port, `auto` included, so prior knowledge works on `http2`/`grpc` ports) gets an nghttp2 session (_h2);
each request stream becomes a child Down whose head and body are written into its input as HTTP/1.1 and
whose answer is framed back as HEADERS, DATA and trailers, so every stream is one REC_HEAD of the same
shape, decided and balanced on its own (at most 100 at once per connection). A forward with http2 set
goes to the upstream over a pool of h2c connections per (source, endpoint), each request one stream Up
translated the other way. Flow control holds both ways: a client's DATA is credited only once it left
for the upstream, a server's only once it left for the client, and a stream stops reading its source while
its framed bytes wait for the peer's window (H2_STREAM_HIGH_WATER), so a peer that never opens its window
holds a bounded amount per stream and stalls nobody else. RST_STREAM goes both ways (a client's cancels the
upstream request); GOAWAY is sent on draining and on idle, and a server's moves new requests to a new
connection. gRPC requests get local replies as HTTP 200 with grpc-status, trailers-only.

Retries (a forward's 11-item form): any failure of an attempt before the final response head (connect,
reset, refused stream, per-try timeout, a malformed response), and a final head at or above the forward's
hold_min_status (or a gRPC trailers-only error), comes back as REC_ATTEMPT_FAILED while the request waits;
Python answers with another forward (the head and the kept copy of the body, up to replay_limit bytes, go
to the new endpoint), a local reply, or a release of the held response. The engine keeps the mechanics
(what was sent, what is held, the timing), Python the policy (conditions, budgets, backoff, deadlines).

Ownership: a descriptor passed to adopt() belongs to the engine from then on; it is closed by the engine.
Every adopted connection ends with exactly one REC_CONN_CLOSED record; every REC_HEAD is followed by
exactly one REC_DONE for the same request id (possibly after REC_ATTEMPT_FAILED records, each of which
Python answers like a head). Only the worker thread touches Down/Up/Pool structs.
"""

from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset, strcmp, strlen

from nodeproxy._h1 cimport (
    H1_BODY_CHUNKED,
    H1_BODY_LENGTH,
    H1_BODY_NONE,
    H1_BODY_UNTIL_CLOSE,
    H1_FRAMING_AS_PARSED,
    H1_FRAMING_NONE,
    H1_METHOD_CONNECT,
    H1_METHOD_HEAD,
    H1_TARGET_ABSOLUTE,
    h1_body_eof,
    h1_body_feed,
    h1_body_for_request,
    h1_body_for_response,
    h1_chunk,
    h1_chunk_header,
    h1_field_is_valid,
    h1_parse_trailers,
    H1_CHUNK_HEADER_MAX,
    h1_head_init,
    h1_limits_default,
    h1_parse_request,
    h1_parse_response,
    h1_serialize_head,
    h1_serialize_opts,
    h1_should_keep_alive,
    h1_sniff_request,
    h1_span,
)
from nodeproxy._h2 cimport (
    H2_BLOCK_END_STREAM,
    H2_BLOCK_HAS_STATUS,
    H2_BLOCK_REQUEST,
    H2_EV_DATA,
    H2_EV_END_STREAM,
    H2_EV_GOAWAY,
    H2_EV_HEADERS,
    H2_EV_HEADERS_TOO_LARGE,
    H2_EV_RESET,
    NGHTTP2_CANCEL,
    NGHTTP2_INTERNAL_ERROR,
    NGHTTP2_NO_ERROR,
    NGHTTP2_NV_FLAG_NONE,
    NGHTTP2_REFUSED_STREAM,
    h2_can_open_stream,
    h2_clear_events,
    h2_consume,
    h2_core_free,
    h2_core_init,
    h2_default_limits,
    h2_event,
    h2_field_next,
    h2_goaway,
    h2_limits,
    h2_peer_max_streams,
    h2_pending,
    h2_pull,
    h2_recv,
    h2_reset,
    h2_send_data,
    h2_send_headers,
    h2_send_trailers,
    h2_wants,
)

import os as _os

HEAD = REC_HEAD
DONE = REC_DONE
ATTEMPT_FAILED = REC_ATTEMPT_FAILED
CONN_CLOSED = REC_CONN_CLOSED
UPGRADED = REC_UPGRADED
NOT_HTTP = REC_NOT_HTTP
HIGH_WATER_BYTES = HIGH_WATER
IO_CHUNK_BYTES = IO_CHUNK
MESH_TOKEN_BYTES = MESH_TOKEN_LEN
PROXY_V2_HEADER_BYTES = PROXY_V2_HEADER_LEN

# ATTEMPT_FAILED's failure item (see engine-retry semantics in HttpWorker.answer).
FAIL_CONNECT = FAILURE_CONNECT
FAIL_REFUSED_STREAM = FAILURE_REFUSED_STREAM
FAIL_RESET = FAILURE_RESET
FAIL_TIMEOUT = FAILURE_TIMEOUT
FAIL_HELD = FAILURE_HELD

# Response flag bits of DONE / ATTEMPT_FAILED records, by their Envoy names.
FLAGS = {
    "DPE": FLAG_DPE,
    "UF": FLAG_UF,
    "UC": FLAG_UC,
    "UT": FLAG_UT,
    "DC": FLAG_DC,
    "UPE": FLAG_UPE,
    "LR": FLAG_LR,
}


# -- byte buffers --------------------------------------------------------------------------------------

cdef int _reserve(Buf *b, size_t extra) noexcept nogil:
    """Make room for `extra` more bytes after b.len; -1 when out of memory."""
    cdef size_t held = b.len - b.off
    cdef size_t want
    cdef unsigned char *grown
    if b.cap - b.len >= extra:
        return 0
    if b.off > 0:
        if held:
            memmove(b.data, b.data + b.off, held)
        b.off = 0
        b.len = held
        if b.cap - b.len >= extra:
            return 0
    want = b.cap * 2 if b.cap else 4096
    while want - held < extra:
        want *= 2
    grown = <unsigned char*>realloc(b.data, want)
    if grown == NULL:
        return -1
    b.data = grown
    b.cap = want
    return 0


cdef int _append(Buf *b, const void *p, size_t n) noexcept nogil:
    if n == 0:
        return 0
    if _reserve(b, n) < 0:
        return -1
    memcpy(b.data + b.len, p, n)
    b.len += n
    return 0


cdef int _append_h1_fields(Buf *b, const h2_core *core, size_t cursor, uint32_t nfields) noexcept nogil:
    """Append an HTTP/2 field block from cursor as HTTP/1.1 `name: value` lines, leaving out pseudo-headers
    and fields HTTP/1.1 cannot carry; -1 when the buffer could not grow (the lines are then incomplete)."""
    cdef size_t namelen, valuelen
    cdef const uint8_t *name
    cdef const uint8_t *value
    cdef uint32_t i
    for i in range(nfields):
        h2_field_next(core, &cursor, &name, &namelen, &value, &valuelen)
        if (namelen and name[0] == b':') or not h1_field_is_valid(name, namelen, value, valuelen):
            continue
        if (_append(b, name, namelen) < 0 or _append(b, ": ", 2) < 0 or _append(b, value, valuelen) < 0
                or _append(b, "\r\n", 2) < 0):
            return -1
    return 0


cdef inline void _consume(Buf *b, size_t n) noexcept nogil:
    b.off += n
    if b.off >= b.len:
        b.off = 0
        b.len = 0


cdef inline size_t _held(Buf *b) noexcept nogil:
    return b.len - b.off


cdef void _free_buf(Buf *b) noexcept nogil:
    free(b.data)
    b.data = NULL
    b.off = b.len = b.cap = 0


cdef void _trim(Buf *b) noexcept nogil:
    # An empty buffer that grew for a large head or a burst goes back to the allocator.
    if b.len == 0 and b.cap > IO_CHUNK:
        _free_buf(b)


cdef ssize_t _recv_into(int fd, Buf *b, size_t limit, bint *readable, bint eof_pending) noexcept nogil:
    """recv into b (grown up to `limit` bytes held). >0 bytes read, 0 EOF, -2 would block or b is full,
    -1 error (errno).

    A read shorter than the room offered proves the socket drained, so readable is cleared without the
    extra recv that would fail with EAGAIN (as the L4 relay does); the next segment raises a new edge.
    With EPOLLRDHUP seen (eof_pending) a FIN may already wait behind the data and raise no new edge, so
    then reading goes on until recv says 0."""
    cdef size_t room
    cdef ssize_t n
    if b.cap - b.len < 4096 or b.len == b.cap:
        if _held(b) >= limit:
            return -2
        room = limit - _held(b)
        if _reserve(b, room if room < IO_CHUNK else IO_CHUNK) < 0:
            np_set_errno(ENOMEM)
            return -1
    room = b.cap - b.len
    if _held(b) + room > limit:
        room = limit - _held(b)
    n = recv(fd, b.data + b.len, room, 0)
    if n < 0:
        if errno == EAGAIN:
            readable[0] = False
            return -2
        if errno == EINTR:
            return -2
        return -1
    if 0 < n < <ssize_t>room and not eof_pending:
        readable[0] = False
    b.len += n
    return n


cdef ssize_t _flush(int fd, Buf *b, bint *writable) noexcept nogil:
    """Send what b holds; bytes sent, or -1 on a socket error (errno)."""
    cdef ssize_t n, total = 0
    while _held(b) > 0 and writable[0]:
        n = send(fd, b.data + b.off, _held(b), MSG_NOSIGNAL)
        if n < 0:
            if errno == EAGAIN:
                writable[0] = False
                break
            if errno == EINTR:
                continue
            return -1
        _consume(b, n)
        total += n
    if _held(b) == 0:
        _trim(b)
    return total


cdef int _send(int fd, Buf *out, bint *writable, const unsigned char *p, size_t n,
               bint connected) noexcept nogil:
    """Send p[0:n] now if nothing is queued before it, queue the rest; -1 on a socket error (errno)."""
    cdef ssize_t sent = 0
    if n == 0:
        return 0
    if connected and _held(out) == 0 and writable[0]:
        while True:
            sent = send(fd, p, n, MSG_NOSIGNAL)
            if sent >= 0:
                break
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                writable[0] = False
                sent = 0
                break
            return -1
    if <size_t>sent < n and _append(out, p + sent, n - sent) < 0:
        np_set_errno(ENOMEM)
        return -1
    return 0


cdef void _set_reset_on_close(int fd) noexcept nogil:
    if fd >= 0:  # an HTTP/2 stream has no socket of its own (its Down.fd is -1)
        set_reset_on_close(fd, True)


cdef const char *_reason(uint16_t status) noexcept nogil:
    if status == 400:
        return "Bad Request"
    if status == 403:
        return "Forbidden"
    if status == 404:
        return "Not Found"
    if status == 405:
        return "Method Not Allowed"
    if status == 408:
        return "Request Timeout"
    if status == 413:
        return "Content Too Large"
    if status == 429:
        return "Too Many Requests"
    if status == 431:
        return "Request Header Fields Too Large"
    if status == 501:
        return "Not Implemented"
    if status == 502:
        return "Bad Gateway"
    if status == 503:
        return "Service Unavailable"
    if status == 504:
        return "Gateway Timeout"
    if status == 505:
        return "HTTP Version Not Supported"
    if status == 200:
        return "OK"
    return "Error"


# PROXY protocol v2 (haproxy.org/download/2.9/doc/proxy-protocol.txt) to the mesh entry: the signature, and
# the TLV type (from the range left to applications) of the token that proves the sender is this engine.
cdef const unsigned char *_PROXY_V2_SIGNATURE = <const unsigned char*>"\r\n\r\n\x00\r\nQUIT\n"
cdef unsigned char PROXY_V2_TLV_TOKEN = 0xE0


cdef void _proxy_v2_header(unsigned char *out, uint32_t source_ip, uint32_t dst_ip, uint16_t dst_port,
                           const unsigned char *token) noexcept nogil:
    """PROXY_V2_HEADER_LEN bytes: PROXY, TCP over IPv4, source (port 0: a pooled connection carries many
    of the pod's connections) and destination as stored (network order), then the token TLV."""
    cdef uint16_t body = 12 + 3 + MESH_TOKEN_LEN
    memcpy(out, _PROXY_V2_SIGNATURE, 12)
    out[12] = 0x21  # version 2, command PROXY
    out[13] = 0x11  # AF_INET, SOCK_STREAM
    out[14] = body >> 8
    out[15] = body & 0xFF
    memcpy(out + 16, &source_ip, 4)
    memcpy(out + 20, &dst_ip, 4)
    out[24] = 0
    out[25] = 0
    memcpy(out + 26, &dst_port, 2)
    out[28] = PROXY_V2_TLV_TOKEN
    out[29] = 0
    out[30] = MESH_TOKEN_LEN
    memcpy(out + 31, token, MESH_TOKEN_LEN)


cdef uint32_t _hash_pool(uint32_t source_ip, uint32_t dst_ip, uint16_t port) noexcept nogil:
    cdef uint32_t h = source_ip * 2654435761u
    h ^= dst_ip * 2246822519u
    h ^= <uint32_t>port * 3266489917u
    return (h ^ (h >> 15)) & (POOL_BUCKETS - 1)


cdef int _parse_ipv4(str text, sockaddr_in *out, int port) except -1:
    cdef bytes raw = text.encode("ascii")
    memset(out, 0, sizeof(sockaddr_in))
    out.sin_family = AF_INET
    out.sin_port = htons(<unsigned short>port)
    if inet_pton(AF_INET, raw, &out.sin_addr) != 1:
        raise ValueError(f"not an IPv4 address: {text!r}")
    return 0


cdef bint _is_ipv4(str text, sockaddr_in *out, int port):
    try:
        _parse_ipv4(text, out, port)
    except (ValueError, UnicodeEncodeError):
        return False
    return True


cdef str _span_text(const unsigned char *base, h1_span s):
    # One allocation (slicing to bytes and decoding would make two); the codec admits only bytes a
    # latin-1 decode maps one to one.
    return PyUnicode_DecodeLatin1(<const char*>base + s.off, s.len, NULL)


cdef size_t _check_field_bytes(object value, bint is_name) except? 0:
    # A header edit reaches the upstream verbatim: CR, LF or NUL would split or smuggle fields.
    cdef bytes raw = value
    if is_name and (len(raw) == 0 or b":" in raw or b" " in raw):
        raise ValueError(f"invalid header name {raw!r}")
    if b"\r" in raw or b"\n" in raw or b"\0" in raw:
        raise ValueError(f"header {'name' if is_name else 'value'} {raw!r} has CR, LF or NUL")
    return len(raw)


cdef unsigned char *_fill_refs(h1_field_ref *ref, tuple items, unsigned char *cursor, bint with_values):
    cdef bytes name, value
    for item in items:
        name = item[0] if with_values else item
        ref.name, ref.name_len = cursor, len(name)
        memcpy(cursor, <const char*>name, len(name))
        cursor += len(name)
        ref.value, ref.value_len = NULL, 0
        if with_values:
            value = item[1]
            ref.value, ref.value_len = cursor, len(value)
            memcpy(cursor, <const char*>value, len(value))
            cursor += len(value)
        ref += 1
    return cursor


cdef Edits *_build_edits(tuple req_add, tuple req_remove, tuple resp_add, tuple resp_remove) except? NULL:
    """One allocation: the Edits header, the refs, then the bytes the refs point at. NULL if no edits."""
    cdef size_t nrefs = len(req_add) + len(req_remove) + len(resp_add) + len(resp_remove)
    cdef size_t nbytes = 0
    cdef size_t i
    cdef Edits *e
    cdef h1_field_ref *ref
    cdef unsigned char *cursor
    cdef bytes name, value
    if nrefs == 0:
        return NULL
    for name, value in req_add + resp_add:
        nbytes += _check_field_bytes(name, True) + _check_field_bytes(value, False)
    for name in req_remove + resp_remove:
        nbytes += _check_field_bytes(name, True)
    e = <Edits*>malloc(sizeof(Edits) + nrefs * sizeof(h1_field_ref) + nbytes)
    if e == NULL:
        raise MemoryError()
    ref = <h1_field_ref*>(<char*>e + sizeof(Edits))
    cursor = <unsigned char*>(<char*>ref + nrefs * sizeof(h1_field_ref))
    e.req_add, e.nreq_add = ref, len(req_add)
    e.req_remove, e.nreq_remove = e.req_add + len(req_add), len(req_remove)
    e.resp_add, e.nresp_add = e.req_remove + len(req_remove), len(resp_add)
    e.resp_remove, e.nresp_remove = e.resp_add + len(resp_add), len(resp_remove)
    cursor = _fill_refs(e.req_add, req_add, cursor, True)
    cursor = _fill_refs(e.resp_add, resp_add, cursor, True)
    cursor = _fill_refs(e.req_remove, req_remove, cursor, False)
    cursor = _fill_refs(e.resp_remove, resp_remove, cursor, False)
    return e


cdef const unsigned char *_H2_PREFACE = <const unsigned char*>"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


cdef int _preface_match(const unsigned char *p, size_t n) noexcept nogil:
    """1: p starts with the HTTP/2 client preface; 0: p is a proper prefix of it; -1: it is something else."""
    cdef size_t k = n if n < H2_PREFACE_LEN else H2_PREFACE_LEN
    if memcmp(p, _H2_PREFACE, k) != 0:
        return -1
    return 1 if n >= H2_PREFACE_LEN else 0


cdef int _grpc_status_for(uint16_t status, const char *flag) noexcept nogil:
    # Mirrors nodeproxy.proxy.http_route.grpc_status_for (tests compare both over every status) for the
    # replies the engine makes itself (502, 504, 400, ...).
    if status == 404:
        return 12  # UNIMPLEMENTED
    if status == 503 or status == 429 or strcmp(flag, "UF") == 0:
        return 14  # UNAVAILABLE
    if status == 408 or status == 504:
        return 4   # DEADLINE_EXCEEDED
    if status == 400 or status == 431 or status == 502:
        return 13  # INTERNAL
    return 2       # UNKNOWN


def grpc_status_for(int status, str flag):
    """The engine's own grpc-status for a local reply (for tests: it must agree with http_route's)."""
    cdef bytes raw = flag.encode("ascii")
    return _grpc_status_for(<uint16_t>status, raw)


cdef int _grpc_code(const unsigned char *p, size_t n) noexcept nogil:
    """A grpc-status value: 1 to 3 decimal digits (the codes are 0..16, larger ones are kept as sent);
    -1 if it is not a number."""
    cdef int code = 0
    cdef size_t i
    if n == 0 or n > 3:
        return -1
    for i in range(n):
        if not b'0' <= p[i] <= b'9':
            return -1
        code = code * 10 + (p[i] - 48)
    return code


cdef int _head_grpc_status(const unsigned char *base, const h1_head *h) noexcept nogil:
    """The grpc-status field of a parsed head (spans relative to base), -1 if none."""
    cdef uint32_t i
    for i in range(h.nfields):
        if h.fields[i].name.len == 11 and _is_name(base + h.fields[i].name.off, 11, "grpc-status"):
            return _grpc_code(base + h.fields[i].value.off, h.fields[i].value.len)
    return -1


cdef int _trailer_grpc_status(const unsigned char *p, size_t n) noexcept nogil:
    """The grpc-status among trailer field lines (each `name: value` CRLF, as h1_chunk.trailers spans
    them; the codec checked them already), -1 if none."""
    cdef size_t at = 0, end, colon, v, ve
    while at < n:
        end = at
        while end < n and p[end] != b'\n':
            end += 1
        colon = at
        while colon < end and p[colon] != b':':
            colon += 1
        if colon - at == 11 and _is_name(p + at, 11, "grpc-status"):
            v = colon + 1
            ve = end
            if ve > v and p[ve - 1] == b'\r':
                ve -= 1
            while v < ve and (p[v] == b' ' or p[v] == b'\t'):
                v += 1
            while ve > v and (p[ve - 1] == b' ' or p[ve - 1] == b'\t'):
                ve -= 1
            return _grpc_code(p + v, ve - v)
        at = end + 1
    return -1


cdef bint _name_wanted(const unsigned char *p, size_t n, tuple wanted):
    """Whether a field name (any case) is one of `wanted` (lower-case bytes)."""
    cdef bytes name
    cdef const unsigned char *w
    cdef size_t i
    for name in wanted:
        if <size_t>len(name) != n:
            continue
        w = <const unsigned char*>(<const char*>name)
        for i in range(n):
            if (p[i] | 0x20 if b'A' <= p[i] <= b'Z' else p[i]) != w[i]:
                break
        else:
            return True
    return False


cdef bytes _render_reply_fields(object fields):
    """A local reply's extra fields as `name: value` CRLF lines, checked like forward edits; the fields
    that frame the reply (content-length, transfer-encoding, connection) are the engine's."""
    cdef list lines = []
    cdef bytes name, value
    for name, value in fields:
        _check_field_bytes(name, True)
        _check_field_bytes(value, False)
        if name.lower() in (b"content-length", b"transfer-encoding", b"connection"):
            raise ValueError(f"a local reply's {name!r} is set by the engine")
        lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


cdef size_t _percent_encode(const char *src, size_t n, char *dst, size_t cap) noexcept nogil:
    # grpc-message: bytes outside 0x20..0x7E and '%' are percent-encoded (gRPC over HTTP/2 spec).
    cdef size_t i, at = 0
    cdef unsigned char c
    cdef const char *hexd = "0123456789ABCDEF"
    for i in range(n):
        c = <unsigned char>src[i]
        if 0x20 <= c <= 0x7E and c != b'%':
            if at + 1 >= cap:
                break
            dst[at] = <char>c
            at += 1
        else:
            if at + 3 >= cap:
                break
            dst[at] = b'%'
            dst[at + 1] = hexd[c >> 4]
            dst[at + 2] = hexd[c & 15]
            at += 3
    dst[at] = 0
    return at


cdef inline void _lower(unsigned char *p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if b'A' <= p[i] <= b'Z':
            p[i] += 32


cdef bint _is_name(const unsigned char *p, size_t n, const char *lower) noexcept nogil:
    # Case-insensitive comparison with a lower-case literal.
    cdef size_t i
    if n != strlen(lower):
        return False
    for i in range(n):
        if (p[i] | 0x20 if b'A' <= p[i] <= b'Z' else p[i]) != <unsigned char>lower[i]:
            return False
    return True


cdef bint _hop_by_hop(const unsigned char *p, size_t n) noexcept nogil:
    # Connection-specific fields that HTTP/2 forbids (RFC 9113 §8.2.2). Most fields are none of them:
    # the length alone tells (this runs for every field of every translated head).
    if n != 2 and n != 7 and n != 10 and n != 16 and n != 17:
        return False
    return (_is_name(p, n, "connection") or _is_name(p, n, "keep-alive") or _is_name(p, n, "proxy-connection")
            or _is_name(p, n, "transfer-encoding") or _is_name(p, n, "upgrade") or _is_name(p, n, "te"))


cdef inline void _nv(nghttp2_nv *nv, const void *name, size_t namelen, const void *value,
                     size_t valuelen) noexcept nogil:
    nv.name = <uint8_t*>name
    nv.namelen = namelen
    nv.value = <uint8_t*>value
    nv.valuelen = valuelen
    nv.flags = NGHTTP2_NV_FLAG_NONE


cdef class HttpWorker:
    """One HTTP engine thread: an epoll loop owning downstream connections and the upstream pools.

    Call run() on a dedicated thread; adopt(), answer(), drain() and stop() from the Python loop.
    """

    def __cinit__(
        self,
        int notify_fd,
        uint32_t max_head_bytes=61440,
        uint32_t max_fields=100,
        int64_t header_timeout_ms=10000,
        int64_t idle_timeout_ms=300000,
        int64_t connect_timeout_ms=1000,
        uint32_t pool_max_idle=256,
        uint32_t pool_max_conns=1024,
        int64_t pool_idle_timeout_ms=4000,
        bint hand_off_upgrades=False,
    ):
        """notify_fd: an eventfd written when records are ready (one write per batch).

        Defaults: request heads up to 60 KiB and 100 fields (Envoy's); a request head must arrive within
        10 s of its first byte or of the connection (408, Envoy's request_headers_timeout role); a client
        connection idle between requests is closed after 5 min; upstream connects time out after 1 s (the
        L4 relay's); per (source, endpoint) pool at most 256 idle (config http.upstream_pool_size) and
        1024 open connections (Envoy's circuit breaker default), idle ones closed after 4 s (below the 5 s
        keep-alive timeout of Node.js and Apache, so the backend rarely closes a connection we are about
        to reuse; 0 keeps them until the server closes them). hand_off_upgrades: after a 101, once no
        byte is in flight, post both sockets in an UPGRADED record (for the L4 splice relay) instead of
        relaying them here with copies.
        """
        self.epfd = -1
        self.wake_fd = -1
        pthread_mutex_init(&self.lock, NULL)
        if max_head_bytes < 1024 or max_fields < 1:
            raise ValueError("max_head_bytes must be >= 1024 and max_fields >= 1")
        if header_timeout_ms <= 0 or idle_timeout_ms <= 0 or connect_timeout_ms <= 0 or pool_idle_timeout_ms < 0:
            raise ValueError("timeouts must be positive (pool_idle_timeout_ms: 0 for none)")
        if pool_max_conns < 1:
            raise ValueError("pool_max_conns must be >= 1")
        self.notify_fd = notify_fd
        h1_limits_default(&self.limits)
        self.limits.max_head_bytes = max_head_bytes
        self.limits.max_fields = max_fields
        self.header_timeout_ns = header_timeout_ms * 1000000
        self.idle_timeout_ns = idle_timeout_ms * 1000000
        self.connect_timeout_ns = connect_timeout_ms * 1000000
        self.pool_idle_timeout_ns = pool_idle_timeout_ms * 1000000
        self.pool_max_idle = pool_max_idle
        self.hand_off_upgrades = hand_off_upgrades
        self.pool_max_conns = pool_max_conns
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wake_fd < 0:
            raise OSError(errno, "eventfd")
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.ptr = NULL  # NULL marks the wake-up eventfd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wake_fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")

    def __dealloc__(self):
        cdef size_t i
        for i in range(self.adopts_len):
            close(self.adopts[i].fd)
        for i in range(self.answers_len):
            free(self.answers[i].edits)
            free(self.answers[i].detail)
        for i in range(self.records_len):
            free(self.records[i].parsed)  # REC_HEAD: one block with the head bytes
            if self.records[i].kind == REC_UPGRADED or self.records[i].kind == REC_NOT_HTTP:
                close(self.records[i].client_fd)
                if self.records[i].upstream_fd >= 0:
                    close(self.records[i].upstream_fd)
        free(self.adopts)
        free(self.answers)
        free(self.records)
        free(self.slots)
        free(self.slot_seq)
        free(self.free_slots)
        if self.epfd >= 0:
            close(self.epfd)
        if self.wake_fd >= 0:
            close(self.wake_fd)
        pthread_mutex_destroy(&self.lock)

    @property
    def live_connections(self):
        """Downstream connections the engine owns now."""
        return self.live

    @property
    def pools(self):
        """Upstream pools (source address, endpoint) that hold or await a connection now."""
        return self.npools

    @property
    def upstream_connections(self):
        """Upstream connections open now (connecting, busy, idle in a pool, or tunnelling)."""
        return self.upstreams

    def debug_connections(self):
        """[(conn_id, state, readable, writable, peer_eof, client in, client out, upstream in, upstream out)]
        with the bytes each buffer holds. For tests and debugging only: it reads the engine thread's
        structures without a lock, so call it while the engine is quiet."""
        cdef Down *d = self.downs
        out = []
        while d != NULL:
            out.append((d.conn_id, d.state, d.readable, d.writable, d.peer_eof, _held(&d.inb), _held(&d.outb),
                        _held(&d.up.inb) if d.up != NULL else 0, _held(&d.up.outb) if d.up != NULL else 0))
            d = d.next
        return out

    # -- called from Python (any thread) ---------------------------------------------------------------

    def adopt(self, uint64_t conn_id, int client_fd, str source_ip=None, int64_t sniff_timeout_ms=0):
        """Take over an accepted client socket. source_ip: bind upstream connections to this address
        (IP_TRANSPARENT, the client pod's), None to connect from the node's own address.

        sniff_timeout_ms > 0 (an `auto` port): the first bytes are peeked, not read; unless they start an
        HTTP/1 request line within that time, the socket comes back untouched in a NOT_HTTP record.
        """
        cdef Adoption a
        cdef sockaddr_in src
        cdef int flags
        if self.stopping:
            raise RuntimeError("http worker is stopping")
        a.conn_id = conn_id
        a.fd = client_fd
        a.source_ip = 0
        a.sniff_ns = sniff_timeout_ms * 1000000 if sniff_timeout_ms > 0 else 0
        if source_ip is not None:
            _parse_ipv4(source_ip, &src, 0)
            a.source_ip = src.sin_addr.s_addr
        flags = fcntl(client_fd, F_GETFL)
        if flags < 0:
            raise OSError(errno, _os.strerror(errno))
        if not flags & O_NONBLOCK:
            # The loop must never block on a socket.
            fcntl(client_fd, F_SETFL, flags | O_NONBLOCK)
        if self._push(<void**>&self.adopts, &self.adopts_len, &self.adopts_cap, sizeof(Adoption), &a) < 0:
            raise MemoryError()

    def set_mesh_entry(self, str ip, int port, bytes token):
        """Where forwards with via_mesh go: the mesh's local entry at ip:port (loopback), which reads a
        PROXY v2 header naming the source pod and the endpoint, with `token` (MESH_TOKEN_LEN bytes, a
        secret of this process) in a TLV so that no other local process can use the entry to borrow a
        pod's identity. Once per engine: the engine thread reads these fields without the lock, after
        answer() (which takes it) has published them."""
        cdef sockaddr_in entry
        if len(token) != MESH_TOKEN_LEN:
            raise ValueError(f"the mesh token has {MESH_TOKEN_LEN} bytes, not {len(token)}")
        if not 0 < port < 65536:
            raise ValueError(f"mesh entry port {port} out of range")
        _parse_ipv4(ip, &entry, port)
        if self.mesh_entry_set:
            if (entry.sin_addr.s_addr != self.mesh_entry.sin_addr.s_addr or entry.sin_port != self.mesh_entry.sin_port
                    or memcmp(<const char*>token, self.mesh_token, MESH_TOKEN_LEN) != 0):
                raise ValueError("the mesh entry is set once per engine")
            return
        self.mesh_entry = entry
        memcpy(self.mesh_token, <const char*>token, MESH_TOKEN_LEN)
        pthread_mutex_lock(&self.lock)  # publishes the fields before any forward that uses them
        self.mesh_entry_set = True
        pthread_mutex_unlock(&self.lock)

    def answer(self, forwards, replies, releases=()):
        """Answer request heads (and failed attempts) in one batch.

        forwards: (request_id, ip, port, request_add, request_remove, response_add, response_remove,
        try_timeout_ms[, http2[, hold_min_status, replay_limit[, via_mesh]]]): add = ((name, value), ...) bytes pairs,
        remove = (name, ...) bytes; try_timeout_ms bounds the attempt's wait for the response head from its
        start, connect included (0 or less: none); http2 true speaks HTTP/2 (h2c) to the upstream.
        The 11-item form turns on retries: every failure of the attempt before the final response head
        (connect, reset, refused stream, per-try timeout, a malformed response) posts ATTEMPT_FAILED and
        the request waits for the next answer instead of a local 502/504; a final head with status >=
        hold_min_status (0: none), or an HTTP/2 trailers-only head with a grpc-status other than 0, is held
        (ATTEMPT_FAILED with FAIL_HELD) until a release, a forward (retry) or a reply; up to replay_limit
        bytes of the request body (as forwarded: chunk framing counts) are kept so that a forward after
        ATTEMPT_FAILED resends head and body. A retry of a request whose body was not kept is answered
        502 UC by the engine. via_mesh (12-item form) sends the request through the mesh entry given to
        set_mesh_entry() (the mTLS tunnel) instead of connecting to ip:port; its pool is separate.
        replies: (request_id, status, flag, detail[, grpc_status[, fields]]): a local reply with
        `x-nodeproxy-flags: flag`; grpc_status (0..16 or None) answers a gRPC request over HTTP/2 with HTTP
        200 and this grpc-status, trailers-only (without it the engine derives one from status and flag);
        fields: ((name, value), ...) bytes pairs added to the reply (framing fields excluded).
        releases: request ids whose held response goes on to the client unchanged.
        Answers for requests that ended meanwhile (the client left) are dropped by the engine.
        """
        cdef Answer a
        cdef bytes flag, detail, fields
        cdef int rc
        cdef list bad_endpoints = []
        cdef Py_ssize_t size
        for item in forwards:
            size = len(item)
            if size not in (8, 9, 11, 12):
                raise ValueError(f"a forward has 8, 9, 11 or 12 items, not {size}")
            memset(&a, 0, sizeof(a))
            a.request_id = item[0]
            a.kind = ANSWER_FORWARD
            a.forward = True
            if not 0 < item[2] < 65536 or not _is_ipv4(item[1], &a.dst, item[2]):
                # One bad endpoint must not cost the whole batch its answers.
                bad = f"endpoint {item[1]}:{item[2]} is not an IPv4 address and port"
                bad_endpoints.append((item[0], 502, "UF", bad))
                continue
            a.try_timeout_ns = <int64_t>item[7] * 1000000  # <= 0: none
            a.http2 = size > 8 and bool(item[8])
            if size == 12 and item[11]:
                if not self.mesh_entry_set:
                    raise ValueError("a forward through the mesh, but set_mesh_entry() was never called")
                a.via_mesh = True
            if size >= 11:
                # hold_min_status above 599 holds gRPC trailers-only errors only (no status reaches it).
                if not 0 <= item[9] <= 0xFFFF or not 0 <= item[10] <= 0xFFFFFFFF:
                    raise ValueError(f"hold_min_status {item[9]} or replay_limit {item[10]} out of range")
                a.resilient = True
                a.hold_min_status = item[9]
                a.replay_limit = item[10]
            a.edits = _build_edits(item[3], item[4], item[5], item[6])
            rc = self._push(<void**>&self.answers, &self.answers_len, &self.answers_cap, sizeof(Answer), &a)
            if rc < 0:
                free(a.edits)
                raise MemoryError()
        for item in list(replies) + bad_endpoints:
            memset(&a, 0, sizeof(a))
            a.request_id = item[0]
            a.kind = ANSWER_REPLY
            a.status = item[1]
            if not 200 <= a.status <= 599:
                raise ValueError(f"local reply status {a.status} out of range")
            flag = item[2].encode("ascii")
            if len(flag) >= FLAG_TEXT_MAX or not flag.isalnum():
                raise ValueError(f"bad response flag {item[2]!r}")
            memcpy(a.flag, <const char*>flag, len(flag))
            a.grpc_status = -1
            if len(item) > 4 and item[4] is not None:
                if not 0 <= item[4] <= 16:
                    raise ValueError(f"grpc-status {item[4]} out of range")
                a.grpc_status = item[4]
            fields = _render_reply_fields(item[5]) if len(item) > 5 else b""
            detail = item[3].encode("utf-8")
            # One block: the detail, then the rendered fields.
            a.detail = <char*>malloc(len(detail) + len(fields) + 1)
            if a.detail == NULL:
                raise MemoryError()
            memcpy(a.detail, <const char*>detail, len(detail))
            a.detail_len = len(detail)
            if len(fields):
                a.fields = a.detail + len(detail)
                memcpy(a.fields, <const char*>fields, len(fields))
                a.fields_len = len(fields)
            rc = self._push(<void**>&self.answers, &self.answers_len, &self.answers_cap, sizeof(Answer), &a)
            if rc < 0:
                free(a.detail)
                raise MemoryError()
        for request_id in releases:
            memset(&a, 0, sizeof(a))
            a.request_id = request_id
            a.kind = ANSWER_RELEASE
            if self._push(<void**>&self.answers, &self.answers_len, &self.answers_cap, sizeof(Answer), &a) < 0:
                raise MemoryError()

    def drain(self, header_names=True):
        """Take the records, in the order the engine posted them:

        (HEAD, request_id, conn_id, method, target, authority, path, query, headers) with headers a
        tuple of (lower-case name, value) str pairs (latin-1): all of them when header_names is True, none
        when False (routing that matches no header need not pay for them), or, for a frozenset of bytes
        names (any case), only the fields with those names;
        (DONE, request_id, conn_id, status, flags, err, bytes_in, bytes_out, decide_ns, upstream_ns,
        total_ns, attempts, reused, response_ns, grpc_status): response_ns from handing the request head
        to a connected upstream to the final response head of the attempt the client got (0: none),
        grpc_status the one the client got in the response head or trailers (-1: none);
        (ATTEMPT_FAILED, request_id, conn_id, err, flags, attempts, failure, status, grpc_status,
        replayable, response_ns): failure one of FAIL_*; status and grpc_status those of a held head
        (FAIL_HELD; else 0 and -1); replayable: every request body byte forwarded so far was kept (a
        request without a body always is); response_ns from handing the head upstream to the failure or
        the held head (0 if it never went);
        (UPGRADED, conn_id, request_id, client_fd, upstream_fd): the caller owns both sockets now;
        (NOT_HTTP, conn_id, client_fd): an `auto` connection that is not HTTP/1; the caller owns it;
        (CONN_CLOSED, conn_id, requests, err).
        """
        cdef list out = []
        cdef Record *batch
        cdef Record *r
        cdef size_t n, i, k
        cdef h1_head *h
        cdef const unsigned char *base
        cdef list headers
        cdef bint with_headers, filtered = False
        cdef tuple wanted = ()
        if isinstance(header_names, frozenset):
            if header_names is not self.header_filter:
                for name in header_names:
                    if not isinstance(name, bytes):
                        raise TypeError(f"header_names holds bytes, not {name!r}")
                # Compared with lower-case names: any case given matches (a name from the configuration
                # written `X-Env` must not make drain fail).
                self.header_names = tuple({name.lower() for name in header_names})
                self.header_filter = header_names
            wanted = self.header_names
            with_headers = filtered = True
        else:
            with_headers = bool(header_names)
        batch = <Record*>self._take(<void**>&self.records, &self.records_len, &self.records_cap, &n)
        try:
            for i in range(n):
                r = &batch[i]
                if r.kind == REC_HEAD:
                    h = r.parsed
                    base = r.head
                    headers = []
                    if filtered:
                        for k in range(h.nfields):
                            if _name_wanted(base + h.fields[k].name.off, h.fields[k].name.len, wanted):
                                headers.append((_span_text(base, h.fields[k].name).lower(),
                                                _span_text(base, h.fields[k].value)))
                    elif with_headers:
                        for k in range(h.nfields):
                            headers.append((_span_text(base, h.fields[k].name).lower(),
                                            _span_text(base, h.fields[k].value)))
                    out.append((REC_HEAD, r.request_id, r.conn_id, _span_text(base, h.method),
                                _span_text(base, h.target), _span_text(base, h.authority),
                                _span_text(base, h.path), _span_text(base, h.query), tuple(headers)))
                elif r.kind == REC_DONE:
                    out.append((REC_DONE, r.request_id, r.conn_id, r.status, r.flags, r.err, r.bytes_in,
                                r.bytes_out, r.decide_ns, r.upstream_ns, r.total_ns, r.attempts, r.reused,
                                r.response_ns, r.grpc_status))
                elif r.kind == REC_ATTEMPT_FAILED:
                    out.append((REC_ATTEMPT_FAILED, r.request_id, r.conn_id, r.err, r.flags, r.attempts,
                                r.failure, r.status, r.grpc_status, r.replayable, r.response_ns))
                elif r.kind == REC_UPGRADED:
                    out.append((REC_UPGRADED, r.conn_id, r.request_id, r.client_fd, r.upstream_fd))
                elif r.kind == REC_NOT_HTTP:
                    out.append((REC_NOT_HTTP, r.conn_id, r.client_fd))
                else:
                    out.append((REC_CONN_CLOSED, r.conn_id, r.bytes_in, r.err))
        finally:
            for i in range(n):
                free(batch[i].parsed)  # REC_HEAD: one block with the head bytes
            free(batch)
        return out

    def begin_draining(self):
        """Wind the connections down for a restart: every response from now on says `Connection: close`
        and its connection closes after it; connections idle between requests close now. Idempotent."""
        cdef uint64_t one = 1
        self.draining = True
        write(self.wake_fd, &one, sizeof(one))

    def stop(self):
        """Ask run() to return; live connections are closed."""
        cdef uint64_t one = 1
        self.stopping = True
        write(self.wake_fd, &one, sizeof(one))

    def run(self):
        """The engine loop; returns after stop(). Runs without the GIL."""
        if self.closed:
            raise RuntimeError("http worker already ran")
        with nogil:
            self._loop()
        self.closed = True

    # -- queues ----------------------------------------------------------------------------------------

    cdef int _push(self, void **items, size_t *length, size_t *capacity, size_t size,
                   const void *item) noexcept nogil:
        """Append to a submission queue under the lock; the first item of a batch wakes the loop."""
        cdef void *grown
        cdef bint first
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.lock)
        if length[0] == capacity[0]:
            grown = realloc(items[0], (capacity[0] * 2 + 64) * size)
            if grown == NULL:
                pthread_mutex_unlock(&self.lock)
                return -1
            items[0] = grown
            capacity[0] = capacity[0] * 2 + 64
        memcpy(<char*>items[0] + length[0] * size, item, size)
        first = self.adopts_len + self.answers_len == 0
        length[0] += 1
        pthread_mutex_unlock(&self.lock)
        if first:
            write(self.wake_fd, &one, sizeof(one))
        return 0

    cdef void *_take(self, void **items, size_t *length, size_t *capacity, size_t *taken) noexcept nogil:
        """Detach a whole queue under the lock; the caller owns (and frees) the returned array."""
        cdef void *batch
        pthread_mutex_lock(&self.lock)
        batch = items[0]
        taken[0] = length[0]
        items[0] = NULL
        length[0] = 0
        capacity[0] = 0
        pthread_mutex_unlock(&self.lock)
        return batch

    cdef void _post(self, Record *r) noexcept nogil:
        cdef Record *grown
        cdef bint was_empty
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.lock)
        if self.records_len == self.records_cap:
            grown = <Record*>realloc(self.records, (self.records_cap * 2 + 64) * sizeof(Record))
            if grown == NULL:
                pthread_mutex_unlock(&self.lock)
                free(r.parsed)  # REC_HEAD: one block with the head bytes
                if r.kind == REC_UPGRADED or r.kind == REC_NOT_HTTP:
                    close(r.client_fd)
                    if r.upstream_fd >= 0:
                        close(r.upstream_fd)
                return  # out of memory: the record is lost, nothing it owned leaks
            self.records = grown
            self.records_cap = self.records_cap * 2 + 64
        was_empty = self.records_len == 0
        self.records[self.records_len] = r[0]
        self.records_len += 1
        pthread_mutex_unlock(&self.lock)
        if was_empty:
            write(self.notify_fd, &one, sizeof(one))

    # -- the loop --------------------------------------------------------------------------------------

    cdef void _loop(self) noexcept nogil:
        cdef epoll_event events[EVENTS_PER_WAIT]
        cdef int n, i, timeout
        cdef uint64_t counter
        cdef int *kind
        cdef int64_t wait_ns
        while not self.stopping:
            timeout = 0 if self.ready != NULL else SCAN_MS
            if self.next_try_ns and timeout:
                # A per-try deadline comes before the next scan: wake for it (rounded up to a whole ms).
                wait_ns = self.next_try_ns - now_ns()
                if wait_ns < <int64_t>timeout * 1000000:
                    timeout = <int>((wait_ns + 999999) // 1000000) if wait_ns > 0 else 0
            n = epoll_wait(self.epfd, events, EVENTS_PER_WAIT, timeout)
            if n < 0:
                if errno == EINTR:
                    continue
                break
            self.now_ns = now_ns()
            for i in range(n):
                kind = <int*>events[i].data.ptr
                if kind == NULL:
                    read(self.wake_fd, &counter, sizeof(counter))
                    self._take_submissions()
                    if self.draining and not self.drained_idle:
                        self._close_idle()
                elif kind[0] == KIND_DOWN:
                    if not (<Down*>kind).dead:
                        self._on_down_event(<Down*>kind, events[i].events)
                elif not (<Up*>kind).dead:
                    self._on_up_event(<Up*>kind, events[i].events)
            self._run_ready()
            if self.now_ns >= self.next_scan_ns:
                self._scan()
                self.scans += 1
                if self.scans % POOL_SWEEP_SCANS == 0:
                    self._sweep_pools()
                self.next_scan_ns = self.now_ns + <int64_t>SCAN_MS * 1000000
            elif self.next_try_ns and self.now_ns >= self.next_try_ns:
                self._scan()  # an early scan for a per-try deadline
            self._bury()
        self._close_all()
        self._bury()

    cdef void _take_submissions(self) noexcept nogil:
        # Both queues under one lock: _push wakes the loop only when both were empty, so taking them
        # one after the other could strand an adoption queued in between (no wake-up would follow).
        cdef Adoption *adopts
        cdef Answer *answers
        cdef size_t nadopts, nanswers, i
        pthread_mutex_lock(&self.lock)
        adopts, nadopts = self.adopts, self.adopts_len
        answers, nanswers = self.answers, self.answers_len
        self.adopts, self.adopts_len, self.adopts_cap = NULL, 0, 0
        self.answers, self.answers_len, self.answers_cap = NULL, 0, 0
        pthread_mutex_unlock(&self.lock)
        for i in range(nadopts):
            self._adopt(&adopts[i])
        free(adopts)
        for i in range(nanswers):
            self._apply_answer(&answers[i])
        free(answers)

    cdef Down *_new_down(self) noexcept nogil:
        """A zeroed Down with a request slot, linked into self.downs; NULL when out of memory."""
        cdef Down *d = <Down*>calloc(1, sizeof(Down))
        cdef int64_t k
        cdef void *grown
        if d != NULL and self.nfree == 0:
            # Grow the slot table (request ids name a slot, so answers find their connection).
            grown = realloc(self.slots, (self.nslots * 2 + 64) * sizeof(Down*))
            if grown != NULL:
                self.slots = <Down**>grown
                grown = realloc(self.slot_seq, (self.nslots * 2 + 64) * sizeof(uint32_t))
            if grown != NULL:
                self.slot_seq = <uint32_t*>grown
                grown = realloc(self.free_slots, (self.nslots * 2 + 64) * sizeof(uint32_t))
            if grown != NULL:
                self.free_slots = <uint32_t*>grown
                for k in range(<int64_t>self.nslots * 2 + 64 - 1, <int64_t>self.nslots - 1, -1):
                    # Lowest slots on top of the free stack, so ids stay small.
                    self.slots[k] = NULL
                    self.slot_seq[k] = 0
                    self.free_slots[self.nfree] = <uint32_t>k
                    self.nfree += 1
                self.nslots = self.nslots * 2 + 64
        if d == NULL or self.nfree == 0:
            free(d)
            return NULL
        self.nfree -= 1
        d.slot = self.free_slots[self.nfree]
        self.slots[d.slot] = d
        d.kind = KIND_DOWN
        d.fd = -1
        d.grpc_status = -1
        d.next = self.downs
        if self.downs != NULL:
            self.downs.prev = d
        self.downs = d
        return d

    cdef void _adopt(self, Adoption *a) noexcept nogil:
        cdef Down *d = self._new_down()
        cdef epoll_event ev
        cdef Record r
        if d == NULL:
            _set_reset_on_close(a.fd)
            close(a.fd)
            memset(&r, 0, sizeof(r))
            r.kind = REC_CONN_CLOSED
            r.conn_id = a.conn_id
            r.err = ENOMEM
            self._post(&r)
            return
        d.fd = a.fd
        d.conn_id = a.conn_id
        d.source_ip = a.source_ip
        d.state = D_HEAD
        d.t_head_start_ns = self.now_ns
        d.deadline_ns = self.now_ns + self.header_timeout_ns
        if a.sniff_ns > 0:
            d.sniffing = True
            d.deadline_ns = self.now_ns + a.sniff_ns
        h1_head_init(&d.req)
        self.live += 1
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.ptr = d
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, d.fd, &ev) < 0:
            self._release_down(d, 0, errno)

    cdef void _apply_answer(self, Answer *a) noexcept nogil:
        cdef uint32_t slot = <uint32_t>(a.request_id >> 32)
        cdef Down *d = self.slots[slot] if slot < self.nslots else NULL
        if (d == NULL or d.request_id != a.request_id or not (d.state == D_DECIDING or d.state == D_HELD)
                or (a.kind == ANSWER_RELEASE and d.state != D_HELD)):
            free(a.edits)
            free(a.detail)
            return
        if a.kind == ANSWER_RELEASE:
            self._release_held(d)
            self._drive(d)
            return
        if d.state == D_HELD:
            self._discard_held(d)  # a retry or a local reply: the held response is dropped
        d.t_forward_ns = self.now_ns
        if a.kind == ANSWER_REPLY:
            d.grpc_status = a.grpc_status
            self._local_reply_fields(d, a.status, a.flag, FLAG_LR, a.detail, a.detail_len, a.fields,
                                     a.fields_len, False)
            free(a.detail)
            self._drive(d)
            return
        if d.edits != a.edits:
            free(d.edits)
        d.edits = a.edits
        d.dst = a.dst
        d.try_timeout_ns = a.try_timeout_ns
        d.up_http2 = a.http2
        d.up_via_mesh = a.via_mesh
        d.resilient = a.resilient
        d.hold_min_status = a.hold_min_status
        if d.attempts == 0:
            d.replay_limit = a.replay_limit  # the copy is kept from the first attempt on; it cannot grow later
        elif not d.replayable:
            # Body bytes went to an earlier attempt and were not kept: the request cannot be sent again.
            self._local_reply(d, 502, "UC", FLAG_UC, "request body not replayable for a retry", 39, True)
            self._drive(d)
            return
        else:
            # A retry: the earlier attempt's view of the request body (abandoned by a server that stopped
            # reading) does not carry over; the kept copy is resent and the rest streams from the client.
            d.req_abandoned = False
            d.req_done = d.req_body.kind == H1_BODY_NONE or d.req_body.ended
            d.close_after = False
            d.stale_retried = False
            d.h2_reset_code = 0
        self._forward(d)
        self._drive(d)

    # -- events ----------------------------------------------------------------------------------------

    cdef void _on_down_event(self, Down *d, uint32_t events) noexcept nogil:
        cdef int err
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            d.readable = True
        if events & (EPOLLRDHUP | EPOLLHUP):
            d.rdhup = True
        if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
            d.writable = True
        if events & EPOLLERR:
            err = sock_error(d.fd)
            if err != 0:
                self._release_down(d, FLAG_DC, err)
                return
        self._drive(d)

    cdef void _on_up_event(self, Up *u, uint32_t events) noexcept nogil:
        cdef int err, opened
        cdef Up *s
        cdef Down *d = u.down
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            u.readable = True
        if events & (EPOLLRDHUP | EPOLLHUP):
            u.rdhup = True
        if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
            u.writable = True
        if u.h2 != NULL:
            if u.state == U_CONNECTING:
                opened = self._connect_done(u, events, &err)
                if opened == 0:
                    return
                if opened < 0:
                    self._h2u_fail(u, err)
                    self._close_up(u, False)
                    return
                u.state = U_BUSY
                s = u.h2.streams
                while s != NULL:
                    if s.down != NULL:
                        self._attempt_sent(s.down)
                    s = s.sib_next
            self._drive_h2u(u)
            return
        if u.state == U_IDLE:
            # A pooled connection has nothing to say: any byte or EOF means it is no longer usable. (A late
            # EPOLLOUT edge, from the ACK of the last request, is harmless.)
            if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                self._close_up(u, False)
            return
        if u.state == U_CONNECTING:
            opened = self._connect_done(u, events, &err)
            if opened == 0:
                return
            if opened < 0:
                self._close_up(u, False)
                if d != NULL:
                    self._attempt_failed(d, err, FLAG_UF)
                return
            u.state = U_BUSY
            if d != NULL:
                self._attempt_sent(d)
        if d != NULL:
            self._drive(d)

    cdef void _drive(self, Down *d) noexcept nogil:
        cdef int budget = READS_PER_TURN
        while not d.dead and self._step(d, &budget) > 0:
            pass
        if d.dead:
            return
        if d.up != NULL and d.up.h2_stream:
            self._h2u_credit(d.up)  # the upstream's window, for response bytes that went on
        if d.parent != NULL:
            # A stream moved: credit what went upstream, and let its connection send the frames.
            self._h2_credit(d)
            self._queue_ready(d.parent)

    cdef int _step(self, Down *d, int *budget) noexcept nogil:
        """One round of work on a connection; >0 when something moved, 0 when it must wait, -1 gone."""
        cdef int progressed = 0, rc
        cdef ssize_t n
        cdef Up *u = d.up
        if _held(&d.outb) and d.writable:
            n = _flush(d.fd, &d.outb, &d.writable)
            if n < 0:
                self._release_down(d, FLAG_DC, errno)
                return -1
            progressed = n > 0
        if d.parent != NULL and _held(&d.outb):
            rc = self._h2_emit(d)
            if rc < 0:
                return -1
            progressed = progressed or rc > 0
        if u != NULL and u.h2_stream and _held(&u.outb):
            rc = self._h2u_send(u)
            progressed = progressed or rc > 0
        if u != NULL and u.state == U_BUSY and _held(&u.outb) and u.writable:
            n = _flush(u.fd, &u.outb, &u.writable)
            if n < 0:
                return self._request_send_failed(d, u, errno)
            progressed = progressed or n > 0
        if d.state == D_HEAD:
            rc = self._step_head(d, budget)
        elif d.state == D_EXCHANGE:
            rc = self._step_exchange(d, budget)
        elif d.state == D_TUNNEL:
            rc = self._step_tunnel(d, budget)
        elif d.state == D_CLOSING:
            rc = self._step_closing(d)
        elif d.state == D_H2:
            rc = self._step_h2(d, budget)
        else:
            rc = 0
        if rc < 0:
            return -1
        return progressed or rc

    # -- request heads ---------------------------------------------------------------------------------

    cdef int _step_head(self, Down *d, int *budget) noexcept nogil:
        cdef size_t avail
        cdef int rc, preface = -1
        cdef ssize_t n
        if d.sniffing:
            return self._sniff(d)
        if _held(&d.outb) > HIGH_WATER:
            return 0  # the client is not reading its answers: take no further pipelined request
        avail = _held(&d.inb)
        if avail > 0 and d.requests == 0 and d.parent == NULL:
            # HTTP/2 with prior knowledge (h2c): the client preface instead of a request line.
            preface = _preface_match(d.inb.data + d.inb.off, avail)
            if preface > 0:
                self._start_h2(d)
                return 1
        if avail > 0 and preface < 0:
            if d.head_idle:
                d.head_idle = False
                d.t_head_start_ns = self.now_ns
                d.deadline_ns = self.now_ns + self.header_timeout_ns
            rc = h1_parse_request(d.inb.data + d.inb.off, avail, &self.limits, &d.req)
            if rc > 0:
                self._head_complete(d)
                return 1
            if rc < 0:
                self._local_reply(d, d.req.error_status, "DPE", FLAG_DPE, d.req.error, strlen(d.req.error),
                                  True)
                return 1
        if d.peer_eof:
            if avail == 0:
                self._start_closing(d)  # a clean end between requests; flush what is still queued
                return 1
            self._release_down(d, FLAG_DC, 0)  # a partial head nobody will answer
            return -1
        if not d.readable:
            return 0
        if budget[0] <= 0:
            self._queue_ready(d)
            return 0
        budget[0] -= 1
        n = _recv_into(d.fd, &d.inb, self.limits.max_head_bytes + 1024, &d.readable, d.rdhup)
        if n > 0:
            return 1
        if n == 0:
            d.peer_eof = True
            return 1
        if n == -1:
            self._release_down(d, FLAG_DC, errno)
            return -1
        if _held(&d.inb) >= self.limits.max_head_bytes + 1024:
            # Cannot happen with the codec's own 431 check; kept so a full buffer never spins.
            self._local_reply(d, 431, "DPE", FLAG_DPE, "request head too large", 22, True)
            return 1
        return 0

    cdef int _sniff(self, Down *d) noexcept nogil:
        """`auto` port: peek at the first bytes (they stay in the socket for whoever relays it)."""
        cdef ssize_t n
        cdef int rc
        if not d.readable:
            return 0
        if _reserve(&d.inb, SNIFF_BYTES) < 0:
            self._release_down(d, 0, ENOMEM)
            return -1
        n = recv(d.fd, d.inb.data + d.inb.len, SNIFF_BYTES, MSG_PEEK)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                d.readable = errno == EINTR
                return 0
            self._release_down(d, 0, errno)
            return -1
        if n == 0:
            self._release_down(d, 0, 0)  # closed before saying anything
            return -1
        rc = _preface_match(d.inb.data + d.inb.len, n)
        if rc < 0:
            rc = h1_sniff_request(d.inb.data + d.inb.len, n)
        if rc > 0 or (rc == 0 and n == SNIFF_BYTES):
            d.sniffing = False  # HTTP/1: read it for real now
            d.deadline_ns = self.now_ns + self.header_timeout_ns
            return 1
        if rc < 0:
            self._not_http(d)
            return -1
        # Not enough to tell: the peeked bytes stay queued, and the next segment raises a new edge.
        d.readable = d.rdhup
        if d.rdhup:
            self._not_http(d)  # a FIN after a partial line: no HTTP request will come
            return -1
        return 0

    cdef void _not_http(self, Down *d) noexcept nogil:
        cdef Record r
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, d.fd, NULL)
        memset(&r, 0, sizeof(r))
        r.kind = REC_NOT_HTTP
        r.conn_id = d.conn_id
        r.client_fd = d.fd
        r.upstream_fd = -1
        d.fd = -1  # no longer ours
        self._post(&r)
        self._release_down(d, 0, 0)

    cdef void _head_complete(self, Down *d) noexcept nogil:
        cdef Record r
        cdef uint32_t head_len = d.req.head_len
        d.orig.off = d.orig.len = 0
        if _append(&d.orig, d.inb.data + d.inb.off, head_len) < 0:
            self._release_down(d, FLAG_DPE, ENOMEM)
            return
        _consume(&d.inb, head_len)
        d.t_head_ns = self.now_ns
        d.deadline_ns = 0
        d.method_head = d.req.method_id == H1_METHOD_HEAD
        d.client_keep_alive = h1_should_keep_alive(&d.req) and d.parent == NULL  # a stream: one request
        d.grpc_status = -1
        d.req_done = d.resp_head_sent = d.resp_done = d.close_after = d.dechunk = d.req_abandoned = False
        d.stale_retried = d.reused = False
        d.resilient = False
        d.hold_min_status = 0
        d.replay_limit = 0
        d.replayable = True
        d.replay.off = d.replay.len = 0
        d.t_sent_ns = d.response_ns = 0
        d.grpc_seen = -1
        d.req_body_bytes = d.resp_bytes = 0
        d.status = 0
        d.flags = 0
        d.attempts = 0
        self.slot_seq[d.slot] += 1
        d.request_id = (<uint64_t>d.slot << 32) | self.slot_seq[d.slot]
        d.request_open = True
        d.requests += 1
        h1_body_for_request(&d.req_body, &d.req)
        if d.req.method_id == H1_METHOD_CONNECT:
            # CONNECT tunnels belong on the L4 path; the mesh's HTTP ports do not proxy them.
            self._local_reply(d, 405, "DPE", FLAG_DPE, "CONNECT is not supported", 24, True)
            return
        memset(&r, 0, sizeof(r))
        r.kind = REC_HEAD
        r.request_id = d.request_id
        r.conn_id = d.conn_id
        # One block, the parsed head then its bytes: one malloc and one free (in the Python thread, where
        # a free into the engine thread's arena takes that arena's lock) instead of two per request.
        r.parsed = <h1_head*>malloc(sizeof(h1_head) + head_len)
        if r.parsed == NULL:
            self._release_down(d, 0, ENOMEM)
            return
        r.head = (<unsigned char*>r.parsed) + sizeof(h1_head)
        memcpy(r.head, d.orig.data, head_len)
        memcpy(r.parsed, &d.req, sizeof(h1_head))
        d.state = D_DECIDING
        self._post(&r)

    # -- forwarding ------------------------------------------------------------------------------------

    cdef void _forward(self, Down *d) noexcept nogil:
        """Serialize the head for the upstream (once per decision) and find it a connection."""
        cdef h1_serialize_opts opts
        cdef ssize_t n
        cdef size_t cap = d.req.head_len + 512
        memset(&opts, 0, sizeof(opts))
        if d.edits != NULL:
            opts.add, opts.nadd = d.edits.req_add, d.edits.nreq_add
            opts.remove, opts.nremove = d.edits.req_remove, d.edits.nreq_remove
            for n in range(d.edits.nreq_add):
                cap += d.edits.req_add[n].name_len + d.edits.req_add[n].value_len + 4
        opts.framing = H1_FRAMING_AS_PARSED
        opts.upgrading = d.req.conn_upgrade and d.req.upgrade.len > 0
        # gRPC needs "te: trailers" at the server (an HTTP/2 client's te can only be that, RFC 9113 §8.2.2).
        opts.keep_te_trailers = d.parent != NULL or d.up_http2
        d.fwd.off = d.fwd.len = 0
        if _reserve(&d.fwd, cap) < 0:
            self._release_down(d, 0, ENOMEM)
            return
        n = h1_serialize_head(d.orig.data, &d.req, True, &opts, d.fwd.data, d.fwd.cap)
        if n < 0:
            self._local_reply(d, 431, "DPE", FLAG_DPE, "request head too large to forward", 33, True)
            return
        d.fwd.len = n
        d.attempts += 1
        self._acquire(d, False)

    cdef void _acquire(self, Down *d, bint fresh) noexcept nogil:
        cdef Pool *p = self._pool_for(d.source_ip, &d.dst, d.up_via_mesh)
        cdef Up *u
        cdef int err = 0
        if p == NULL:
            self._attempt_failed(d, ENOMEM, FLAG_UF)
            return
        if d.up_http2:
            self._h2u_acquire(d, p, fresh)
            return
        if not fresh and p.idle_head != NULL:
            u = p.idle_head
            p.idle_head = u.idle_next
            if p.idle_head != NULL:
                p.idle_head.idle_prev = NULL
            else:
                p.idle_tail = NULL
            u.idle_next = u.idle_prev = NULL
            p.nidle -= 1
            u.state = U_BUSY
            self._attach(d, u, True)
            return
        if p.conns >= self.pool_max_conns:
            d.state = D_WAIT_CONN
            # The per-try timeout covers the wait for a connection too.
            self._set_try_deadline(d)
            d.waiting_pool = p
            d.wait_next = NULL
            d.wait_prev = p.wait_tail
            if p.wait_tail != NULL:
                p.wait_tail.wait_next = d
            else:
                p.wait_head = d
            p.wait_tail = d
            return
        u = self._connect(p, &err)
        if u == NULL:
            self._attempt_failed(d, err, FLAG_UF)
            return
        self._attach(d, u, False)

    cdef void _attach(self, Down *d, Up *u, bint reused) noexcept nogil:
        d.up = u
        u.down = d
        d.reused = reused
        if d.state == D_WAIT_CONN and d.resilient:
            pass  # the per-try timeout runs from the attempt's start, the wait for a connection included
        else:
            self._set_try_deadline(d)
        d.state = D_EXCHANGE
        h1_head_init(&u.resp)
        u.inb.off = u.inb.len = 0
        d.t_sent_ns = 0
        if u.h2_stream:
            if u.conn.state != U_CONNECTING:
                self._attempt_sent(d)
        elif u.state == U_BUSY:
            self._attempt_sent(d)
        # A retry (or a fresh try after a stale pooled connection) resends the body bytes kept so far;
        # the rest follows from the client's stream as usual.
        if _append(&u.outb, d.fwd.data, d.fwd.len) < 0 or _append(&u.outb, d.replay.data + d.replay.off,
                                                                   _held(&d.replay)) < 0:
            self._release_down(d, 0, ENOMEM)

    cdef Up *_connect(self, Pool *p, int *err) noexcept nogil:
        cdef int fd, one = 1, rc
        cdef sockaddr_in src, dst
        cdef epoll_event ev
        cdef Up *u
        if p.via_mesh and not self.mesh_entry_set:
            err[0] = EHOSTUNREACH  # answer() refuses such forwards; checked here too, it costs nothing
            return NULL
        fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            err[0] = errno
            return NULL
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        rc = 0
        if p.via_mesh:
            # The mesh entry (loopback) reads the header first and hands the socket to the tunnel, which
            # connects to the pod from the source pod's address at the peer node.
            rc = connect(fd, <sockaddr*>&self.mesh_entry, sizeof(self.mesh_entry))
            if rc < 0 and errno == EINPROGRESS:
                rc = 0
        elif p.source_ip != 0:
            memset(&src, 0, sizeof(src))
            src.sin_family = AF_INET
            src.sin_addr.s_addr = p.source_ip
            rc = setsockopt(fd, IPPROTO_IP, IP_TRANSPARENT, &one, sizeof(one))
            if rc == 0:
                # The port is chosen at connect() from the full 4-tuple, not reserved at bind().
                setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one))
                rc = bind(fd, <sockaddr*>&src, sizeof(src))
        if rc == 0 and not p.via_mesh:
            memset(&dst, 0, sizeof(dst))
            dst.sin_family = AF_INET
            dst.sin_addr.s_addr = p.dst_ip
            dst.sin_port = p.dst_port
            rc = connect(fd, <sockaddr*>&dst, sizeof(dst))
            if rc < 0 and errno == EINPROGRESS:
                rc = 0
        if rc < 0:
            err[0] = errno
            close(fd)
            return NULL
        u = <Up*>calloc(1, sizeof(Up))
        if u == NULL:
            err[0] = ENOMEM
            close(fd)
            return NULL
        u.kind = KIND_UP
        u.fd = fd
        u.state = U_CONNECTING
        u.pool = p
        u.since_ns = self.now_ns
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.ptr = u
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            err[0] = errno
            close(fd)
            free(u)
            return NULL
        p.conns += 1
        self.upstreams += 1
        u.next = self.ups
        if self.ups != NULL:
            self.ups.prev = u
        self.ups = u
        return u

    cdef int _connect_done(self, Up *u, uint32_t events, int *err) noexcept nogil:
        """An event on a connecting upstream (HTTP/1.1 or HTTP/2): 1 connected, 0 not yet, -1 failed
        (err). Via the mesh entry, connected means the tunnel to the pod is open (_mesh_opened)."""
        cdef int e = sock_error(u.fd)
        if e == 0 and not events & EPOLLOUT and not u.mesh_header_sent:
            return 0
        if e != 0 or events & (EPOLLHUP | EPOLLERR):
            err[0] = e if e else ECONNRESET
            return -1
        if u.pool.via_mesh:
            return self._mesh_opened(u, err)
        return 1

    cdef int _mesh_opened(self, Up *u, int *err) noexcept nogil:
        """A connection to the mesh entry counts as connected once the tunnel to the pod is open, so that
        a tunnel that cannot open is a connect failure (retried elsewhere by default), not a reset after
        the request. Once the TCP connect completes the PROXY v2 header goes out; the tunnel answers one
        0x00 byte when its CONNECT got a 2xx (nodeproxy.proxy.mesh_entry). 1: open; 0: wait (for the
        byte, under the connect timeout); -1: failed (err)."""
        cdef unsigned char header[PROXY_V2_HEADER_LEN]
        cdef unsigned char opened = 0xFF
        cdef ssize_t n
        cdef Pool *p = u.pool
        if not u.mesh_header_sent:
            _proxy_v2_header(header, p.source_ip, p.dst_ip, p.dst_port, self.mesh_token)
            n = send(u.fd, header, PROXY_V2_HEADER_LEN, MSG_NOSIGNAL)
            if n != PROXY_V2_HEADER_LEN:
                # A socket that just connected has an empty send buffer: the header fits whole, or the
                # connection is broken. There is no partial write to resume.
                err[0] = errno if n < 0 else EIO
                return -1
            u.mesh_header_sent = True
        n = recv(u.fd, &opened, 1, 0)
        if n == 1:
            if opened != 0:
                err[0] = EPROTO  # not the tunnel speaking: nothing after it can be trusted either
                return -1
            return 1
        if n == 0:
            err[0] = ECONNREFUSED  # closed without opening: the tunnel (or the entry) refused it
            return -1
        if errno == EAGAIN or errno == EINTR:
            return 0
        err[0] = errno
        return -1

    cdef Pool *_pool_for(self, uint32_t source_ip, sockaddr_in *dst, bint via_mesh) noexcept nogil:
        cdef uint32_t bucket = _hash_pool(source_ip, dst.sin_addr.s_addr, dst.sin_port)
        cdef Pool *p = self.pools[bucket]
        while p != NULL:
            if (p.source_ip == source_ip and p.dst_ip == dst.sin_addr.s_addr and p.dst_port == dst.sin_port
                    and p.via_mesh == via_mesh):
                return p
            p = p.hash_next
        p = <Pool*>calloc(1, sizeof(Pool))
        if p == NULL:
            return NULL
        p.source_ip = source_ip
        p.dst_ip = dst.sin_addr.s_addr
        p.dst_port = dst.sin_port
        p.via_mesh = via_mesh
        p.hash_next = self.pools[bucket]
        self.pools[bucket] = p
        self.npools += 1
        return p

    cdef void _pool_release(self, Up *u) noexcept nogil:
        """An upstream connection finished an exchange cleanly: to a waiting request, or idle (LIFO)."""
        cdef Pool *p = u.pool
        cdef Down *w
        u.down = NULL
        u.inb.off = u.inb.len = 0
        _trim(&u.inb)
        _trim(&u.outb)
        if p.wait_head != NULL:
            w = p.wait_head
            self._pool_unwait(w)
            self._attach(w, u, True)
            self._queue_ready(w)
            return
        u.state = U_IDLE
        u.since_ns = self.now_ns
        u.idle_prev = NULL
        u.idle_next = p.idle_head
        if p.idle_head != NULL:
            p.idle_head.idle_prev = u
        else:
            p.idle_tail = u
        p.idle_head = u
        p.nidle += 1
        if p.nidle > self.pool_max_idle:
            self._close_up(p.idle_tail, False)

    cdef void _pool_unwait(self, Down *d) noexcept nogil:
        cdef Pool *p = d.waiting_pool
        if p == NULL:
            return
        if d.wait_prev != NULL:
            d.wait_prev.wait_next = d.wait_next
        else:
            p.wait_head = d.wait_next
        if d.wait_next != NULL:
            d.wait_next.wait_prev = d.wait_prev
        else:
            p.wait_tail = d.wait_prev
        d.wait_next = d.wait_prev = NULL
        d.waiting_pool = NULL

    cdef void _serve_waiter(self, Pool *p) noexcept nogil:
        # A connection of a full pool closed: the first waiting request may open a new one.
        cdef Down *w
        cdef Up *u
        cdef int err = 0
        while p.wait_head != NULL and p.conns < self.pool_max_conns:
            w = p.wait_head
            self._pool_unwait(w)
            u = self._connect(p, &err)
            if u == NULL:
                self._attempt_failed(w, err, FLAG_UF)
            else:
                self._attach(w, u, False)
            self._queue_ready(w)

    cdef void _attempt_failed(self, Down *d, int err, uint32_t flag) noexcept nogil:
        """No usable upstream for this try: Python decides again (another endpoint, or a local reply)."""
        d.up = NULL
        self._post_attempt_failed(d, err, flag, FAILURE_CONNECT, 0, -1)

    cdef void _post_attempt_failed(self, Down *d, int err, uint32_t flag, FailureKind failure, uint16_t status,
                                   int grpc_status) noexcept nogil:
        """Post ATTEMPT_FAILED; the request waits in D_DECIDING (D_HELD for a held head, d.up kept)."""
        cdef Record r
        d.state = D_HELD if failure == FAILURE_HELD else D_DECIDING
        d.deadline_ns = 0
        d.flags |= flag
        memset(&r, 0, sizeof(r))
        r.kind = REC_ATTEMPT_FAILED
        r.request_id = d.request_id
        r.conn_id = d.conn_id
        r.err = err
        r.flags = flag
        r.attempts = d.attempts
        r.failure = failure
        r.status = status
        r.grpc_status = grpc_status
        r.replayable = d.replayable
        r.response_ns = self.now_ns - d.t_sent_ns if d.t_sent_ns else 0
        self._post(&r)

    cdef void _fail_attempt(self, Down *d, int err, uint32_t flag, FailureKind failure) noexcept nogil:
        """A resilient request's attempt failed before its final response head: drop the upstream (the
        connection is reset, an HTTP/2 stream cancelled) and let Python decide again."""
        cdef Up *u = d.up
        if u != NULL:
            d.up = NULL
            u.down = NULL
            self._close_up(u, True)
        if d.state == D_WAIT_CONN:
            self._pool_unwait(d)
        # The client may have sent more than this attempt took: what waits in d.inb stays for the retry.
        self._post_attempt_failed(d, err, flag, failure, 0, -1)

    cdef void _set_try_deadline(self, Down *d) noexcept nogil:
        """The attempt's per-try deadline from now; the loop wakes for the earliest one, not the next scan."""
        if d.try_timeout_ns <= 0:
            d.deadline_ns = 0
            return
        d.deadline_ns = self.now_ns + d.try_timeout_ns
        if self.next_try_ns == 0 or d.deadline_ns < self.next_try_ns:
            self.next_try_ns = d.deadline_ns

    cdef void _attempt_sent(self, Down *d) noexcept nogil:
        if d.t_sent_ns == 0:
            d.t_sent_ns = self.now_ns

    cdef int _keep_replay(self, Down *d, const unsigned char *p, size_t n) noexcept nogil:
        """Keep forwarded request body bytes for a retry while they fit replay_limit; past it the copy is
        freed and the request is no longer replayable. -1 when out of memory (the copy is dropped too)."""
        if not d.replayable:
            return 0
        if _held(&d.replay) + n > d.replay_limit or d.req.content_length > <int64_t>d.replay_limit:
            # A declared length over the limit is dropped at its first byte: it could never be kept whole.
            d.replayable = False
            _free_buf(&d.replay)
            return 0
        if d.replay.cap == 0 and 0 < d.req.content_length <= d.replay_limit:
            # The whole body in one allocation (a chunked one grows as it comes).
            if _reserve(&d.replay, <size_t>d.req.content_length) < 0:
                d.replayable = False
                return -1
        if _append(&d.replay, p, n) < 0:
            d.replayable = False
            _free_buf(&d.replay)
            return -1
        return 0

    cdef void _discard_held(self, Down *d) noexcept nogil:
        """Drop a held response. An HTTP/1.1 connection whose whole response is in (and whose request
        went whole) goes back to the pool; otherwise it is closed (an HTTP/2 stream reset unless it ended)."""
        cdef Up *u = d.up
        cdef h1_chunk chunk
        cdef size_t at, end
        cdef ssize_t n = 0
        d.state = D_DECIDING
        if u == NULL:
            return
        d.up = NULL
        u.down = NULL
        if (not u.h2_stream and d.req_done and not d.req_abandoned and not u.peer_eof and not u.rdhup
                and _held(&u.outb) == 0 and h1_should_keep_alive(&u.resp)):
            h1_body_for_response(&u.resp_body, &u.resp, d.method_head, d.req.method_id == H1_METHOD_CONNECT)
            at = u.inb.off + u.resp.head_len
            end = u.inb.len
            while not u.resp_body.ended and at < end:
                n = h1_body_feed(&u.resp_body, u.inb.data + at, end - at, &chunk)
                if n <= 0:
                    break
                at += n
            if u.resp_body.kind != H1_BODY_UNTIL_CLOSE and u.resp_body.ended and at == end and n >= 0:
                self._pool_release(u)
                return
        self._close_up(u, not (u.h2_stream and u.h2_resp_ended))

    cdef void _release_held(self, Down *d) noexcept nogil:
        """Send a held response on as if it had never been held."""
        cdef Up *u = d.up
        cdef int64_t response_ns = d.response_ns  # measured when the head came, not now
        d.hold_min_status = 0
        d.state = D_EXCHANGE
        if u == NULL:
            # Cannot happen: D_HELD keeps its upstream until the Down leaves that state.
            self._local_reply(d, 502, "UC", FLAG_UC, "held response lost", 18, True)
            return
        self._response_head(d, u)
        d.response_ns = response_ns

    cdef int _request_send_failed(self, Down *d, Up *u, int err) noexcept nogil:
        """The upstream stopped taking the request. A server may answer early (413, 401 to an upload) and
        close without reading the rest: stop sending, keep reading, and let that answer reach the client
        (the connection closes after it, as the rest of the request body can no longer be framed)."""
        if d.reused and not d.stale_retried and not d.resp_head_sent and _held(&u.inb) == 0 and d.replayable:
            # Most likely a stale pooled connection: retry fresh, with the body bytes sent so far (all kept).
            return self._upstream_failed(d, err)
        d.req_abandoned = True
        d.req_done = True
        d.close_after = True
        u.outb.off = u.outb.len = 0
        return 1

    cdef int _upstream_failed(self, Down *d, int err) noexcept nogil:
        """The upstream connection broke (error or EOF) before the exchange completed. Returns 1 if the
        connection goes on (retried or answered locally), -1 if the client connection is gone."""
        cdef Up *u = d.up
        # Nothing of the response came, and the request can be sent again as it was (the body bytes that
        # went are all kept: with no replay copy, only when none went).
        cdef bint untouched = not d.resp_head_sent and _held(&u.inb) == 0 and d.replayable
        cdef bint refused = u.h2_stream and u.h2_reset and u.h2_reset_code == NGHTTP2_REFUSED_STREAM
        if u.h2_stream and u.h2_reset:
            d.h2_reset_code = u.h2_reset_code  # an HTTP/2 client's stream is reset with the same code
        if d.resilient and refused and not d.resp_head_sent:
            # Never processed by the server: Python may retry anywhere (refused-stream condition).
            self._fail_attempt(d, err, FLAG_UC, FAILURE_REFUSED_STREAM)
            return 1
        if untouched and d.reused and not d.stale_retried:
            # A pooled connection the backend closed while idle (the race every keep-alive pool has):
            # nothing of the request body or the response moved, so send the head again on a fresh one.
            d.stale_retried = True
            d.up = NULL
            u.down = NULL
            self._close_up(u, False)
            self._acquire(d, True)
            return 1
        if d.resilient and not d.resp_head_sent:
            self._fail_attempt(d, err, FLAG_UC, FAILURE_RESET)
            return 1
        d.up = NULL
        u.down = NULL
        self._close_up(u, True)
        if not d.resp_head_sent:
            self._local_reply(d, 502, "UC", FLAG_UC, "upstream connection closed before the response", 46,
                              not d.req_done)
            return 1
        # Part of the response went out already: the client can only learn of the failure by a reset.
        d.flags |= FLAG_UC
        _set_reset_on_close(d.fd)
        self._release_down(d, 0, err)
        return -1

    # -- exchanges -------------------------------------------------------------------------------------

    cdef int _step_exchange(self, Down *d, int *budget) noexcept nogil:
        cdef Up *u = d.up
        cdef int progressed = 0, rc
        if u == NULL or u.state != U_BUSY:
            return 0
        if not d.req_done:
            rc = self._pump_request_body(d, u, budget)
            if rc < 0:
                return -1
            progressed = rc
            if d.up != u or d.state != D_EXCHANGE:
                return 1
        if not d.resp_done:
            rc = self._pump_response(d, u, budget)
            if rc < 0:
                return -1
            progressed = progressed or rc
            if d.up != u or d.state != D_EXCHANGE:
                return 1
        if d.resp_done:
            self._end_exchange(d)
            return 1
        return progressed

    cdef int _pump_request_body(self, Down *d, Up *u, int *budget) noexcept nogil:
        cdef size_t avail
        cdef ssize_t n
        cdef h1_chunk chunk
        cdef int progressed = 0, rc
        while True:
            if d.req_body.kind == H1_BODY_NONE or d.req_body.ended:
                d.req_done = True
                return 1
            if _held(&u.outb) > <size_t>(H2_STREAM_HIGH_WATER if u.h2_stream else HIGH_WATER):
                return progressed  # the upstream is slow: resumes when it drains (EPOLLOUT, or its window)
            avail = _held(&d.inb)
            if avail > 0:
                n = h1_body_feed(&d.req_body, d.inb.data + d.inb.off, avail, &chunk)
                if n < 0:
                    d.up = NULL
                    u.down = NULL
                    self._close_up(u, True)
                    if d.resp_head_sent:
                        self._release_down(d, FLAG_DPE, 0)
                        return -1
                    self._local_reply(d, d.req_body.error_status, "DPE", FLAG_DPE, d.req_body.error,
                                      strlen(d.req_body.error), True)
                    return 1
                if n > 0:
                    if d.replayable and self._keep_replay(d, d.inb.data + d.inb.off, n) < 0:
                        self._release_down(d, 0, ENOMEM)
                        return -1
                    rc = _send(u.fd, &u.outb, &u.writable, d.inb.data + d.inb.off, n, True)
                    # The parser took these bytes (and the replay copy has them): consumed even when the send
                    # failed, or a retry would feed and send them a second time.
                    _consume(&d.inb, n)
                    d.req_body_bytes += n
                    if rc < 0:
                        return self._request_send_failed(d, u, errno)
                    progressed = 1
                if d.req_body.ended:
                    d.req_done = True
                    return 1
                if n > 0:
                    continue
            if d.peer_eof:
                # The client left in the middle of its request body.
                self._release_down(d, FLAG_DC, 0)
                return -1
            if not d.readable:
                return progressed
            if budget[0] <= 0:
                self._queue_ready(d)
                return progressed
            budget[0] -= 1
            n = _recv_into(d.fd, &d.inb, IO_CHUNK + self.limits.max_head_bytes, &d.readable, d.rdhup)
            if n == 0:
                d.peer_eof = True
            elif n == -1:
                self._release_down(d, FLAG_DC, errno)
                return -1
            elif n == -2 and d.readable:
                return progressed  # the buffer is full of an incomplete chunk line or trailer: feed waits
            else:
                progressed = 1

    cdef int _pump_response(self, Down *d, Up *u, int *budget) noexcept nogil:
        cdef size_t avail
        cdef ssize_t n
        cdef h1_chunk chunk
        cdef int progressed = 0, rc
        while True:
            avail = _held(&u.inb)
            if not d.resp_head_sent:
                if avail > 0:
                    rc = h1_parse_response(u.inb.data + u.inb.off, avail, &self.limits, &u.resp)
                    if rc < 0:
                        if d.resilient:
                            self._fail_attempt(d, 0, FLAG_UPE, FAILURE_RESET)
                            return 1
                        d.up = NULL
                        u.down = NULL
                        self._close_up(u, True)
                        self._local_reply(d, 502, "UPE", FLAG_UPE, u.resp.error, strlen(u.resp.error),
                                          not d.req_done)
                        return 1
                    if rc > 0:
                        rc = self._response_head(d, u)
                        if rc <= 0 or d.resp_done or d.state != D_EXCHANGE:
                            return rc
                        progressed = 1
                        continue
            else:
                if _held(&d.outb) > <size_t>(H2_STREAM_HIGH_WATER if d.parent != NULL else HIGH_WATER):
                    return progressed  # the client is slow: resumes when it drains
                if avail > 0:
                    n = h1_body_feed(&u.resp_body, u.inb.data + u.inb.off, avail, &chunk)
                    if n < 0:
                        # A broken response body: the client cannot be told in-band any more.
                        d.flags |= FLAG_UPE
                        d.up = NULL
                        u.down = NULL
                        self._close_up(u, True)
                        _set_reset_on_close(d.fd)
                        self._release_down(d, 0, 0)
                        return -1
                    if n > 0:
                        if d.grpc and chunk.ended and chunk.trailers.len:
                            d.grpc_seen = _trailer_grpc_status(u.inb.data + u.inb.off + chunk.trailers.off,
                                                               chunk.trailers.len)
                        if d.dechunk:
                            rc = _send(d.fd, &d.outb, &d.writable, u.inb.data + u.inb.off + chunk.data.off,
                                       chunk.data.len, True)
                            d.resp_bytes += chunk.data.len
                        else:
                            rc = _send(d.fd, &d.outb, &d.writable, u.inb.data + u.inb.off, n, True)
                            d.resp_bytes += n
                        if rc < 0:
                            self._release_down(d, FLAG_DC, errno)
                            return -1
                        _consume(&u.inb, n)
                        progressed = 1
                    if u.resp_body.ended:
                        d.resp_done = True
                        return 1
                    if n > 0:
                        continue
            if u.peer_eof:
                if d.resp_head_sent and h1_body_eof(&u.resp_body) > 0:
                    d.resp_done = True  # an until-close body ends here
                    return 1
                return self._upstream_failed(d, ECONNRESET)
            if not u.readable:
                return progressed
            if budget[0] <= 0:
                self._queue_ready(d)
                return progressed
            budget[0] -= 1
            n = _recv_into(u.fd, &u.inb, IO_CHUNK + self.limits.max_head_bytes, &u.readable, u.rdhup)
            if n == 0:
                u.peer_eof = True
            elif n == -1:
                return self._upstream_failed(d, errno)
            elif n == -2 and u.readable:
                if not d.resp_head_sent and d.resilient:
                    self._fail_attempt(d, 0, FLAG_UPE, FAILURE_RESET)
                    return 1
                if not d.resp_head_sent:
                    d.up = NULL
                    u.down = NULL
                    self._close_up(u, True)
                    self._local_reply(d, 502, "UPE", FLAG_UPE, "response head too large", 23, not d.req_done)
                    return 1
                return progressed
            else:
                progressed = 1

    cdef int _response_head(self, Down *d, Up *u) noexcept nogil:
        """A complete response head in u.inb: forward it (1xx, 101, final). 1 to go on, -1 if d is gone."""
        cdef h1_serialize_opts opts
        cdef h1_field_ref keep_alive
        cdef h1_field_ref adds[2]
        cdef ssize_t n
        cdef uint16_t status = u.resp.status
        cdef uint32_t head_len = u.resp.head_len
        cdef size_t cap = head_len + 512
        cdef bint upgrade = status == 101
        cdef bint informational = 100 <= status < 200 and not upgrade
        cdef int grpc_status = -1
        memset(&opts, 0, sizeof(opts))
        if upgrade and not (d.req.conn_upgrade and d.req.upgrade.len > 0):
            if d.resilient:
                self._fail_attempt(d, 0, FLAG_UPE, FAILURE_RESET)
                return 1
            d.up = NULL
            u.down = NULL
            self._close_up(u, True)
            self._local_reply(d, 502, "UPE", FLAG_UPE, "101 to a request that did not ask to upgrade", 44,
                              True)
            return 1
        if not informational:
            d.response_ns = self.now_ns - d.t_sent_ns if d.t_sent_ns else 0
        if not informational and not upgrade:
            if d.grpc or (d.hold_min_status and u.h2_head_ended):
                grpc_status = _head_grpc_status(u.inb.data + u.inb.off, &u.resp)
            if d.hold_min_status and (status >= d.hold_min_status or (u.h2_head_ended and grpc_status > 0)):
                # Kept unread in u.inb (the parsed u.resp stays valid) until Python decides.
                self._post_attempt_failed(d, 0, 0, FAILURE_HELD, status, grpc_status)
                return 0
            if d.grpc:
                d.grpc_seen = grpc_status
        if not informational:
            h1_body_for_response(&u.resp_body, &u.resp, d.method_head, d.req.method_id == H1_METHOD_CONNECT)
            d.dechunk = d.req.version_minor == 0 and u.resp_body.kind == H1_BODY_CHUNKED
            if u.resp_body.kind == H1_BODY_UNTIL_CLOSE or d.dechunk:
                d.close_after = True  # the body ends when we close
            opts.framing = H1_FRAMING_NONE if d.dechunk else H1_FRAMING_AS_PARSED
            opts.upgrading = upgrade
            # A final answer before the whole request went up (an early 413, 401...): the rest of the
            # request body will not be forwarded, so this connection ends after the answer.
            d.close_after = d.close_after or self.draining or not d.req_done
            opts.conn_close = not upgrade and (d.close_after or not d.client_keep_alive)
            if d.edits != NULL:
                opts.remove, opts.nremove = d.edits.resp_remove, d.edits.nresp_remove
                opts.add, opts.nadd = d.edits.resp_add, d.edits.nresp_add
                for n in range(d.edits.nresp_add):
                    cap += d.edits.resp_add[n].name_len + d.edits.resp_add[n].value_len + 4
            if not opts.conn_close and not upgrade and d.req.version_minor == 0:
                # An HTTP/1.0 client keeps the connection only when told so.
                keep_alive.name, keep_alive.name_len = <const unsigned char*>"connection", 10
                keep_alive.value, keep_alive.value_len = <const unsigned char*>"keep-alive", 10
                if opts.nadd == 0:
                    opts.add, opts.nadd = &keep_alive, 1
                elif opts.nadd == 1:
                    adds[0] = opts.add[0]
                    adds[1] = keep_alive
                    opts.add, opts.nadd = adds, 2
                else:
                    opts.conn_close = True  # rare (1.0 client and several added fields): just close
                    d.close_after = True
        elif d.req.version_minor == 0:
            # 1xx never goes to an HTTP/1.0 client (RFC 9110 §15.2).
            _consume(&u.inb, head_len)
            h1_head_init(&u.resp)
            return 1
        if _reserve(&d.outb, cap) < 0:
            self._release_down(d, 0, ENOMEM)
            return -1
        n = h1_serialize_head(u.inb.data + u.inb.off, &u.resp, False, &opts, d.outb.data + d.outb.len,
                              d.outb.cap - d.outb.len)
        if n < 0:
            if d.resilient and not d.resp_head_sent:
                self._fail_attempt(d, 0, FLAG_UPE, FAILURE_RESET)
                return 1
            d.up = NULL
            u.down = NULL
            self._close_up(u, True)
            self._local_reply(d, 502, "UPE", FLAG_UPE, "response head too large", 23, True)
            return 1
        d.outb.len += n
        d.resp_bytes += n
        _consume(&u.inb, head_len)
        if informational:
            h1_head_init(&u.resp)
            return 1
        d.status = status
        d.resp_head_sent = True
        d.t_resp_ns = self.now_ns
        d.deadline_ns = 0
        if upgrade:
            # From here on both sockets carry the upgraded protocol: relay raw bytes until both ends close.
            self._post_done(d, 0)
            if u.pool != NULL:
                u.pool.conns -= 1
                self._serve_waiter(u.pool)
                u.pool = NULL
            d.state = D_TUNNEL
            return 1
        if u.resp_body.ended:
            # No body, or an empty Content-Length one (a gRPC trailers-only answer over HTTP/2 is one):
            # no body byte will come to end it.
            d.resp_done = True
        return 1

    cdef void _end_exchange(self, Down *d) noexcept nogil:
        cdef Up *u = d.up
        cdef bint reusable = (d.req_done and not d.req_abandoned and _held(&u.outb) == 0 and _held(&u.inb) == 0 and not u.peer_eof
                              and u.resp_body.kind != H1_BODY_UNTIL_CLOSE and h1_should_keep_alive(&u.resp))
        d.up = NULL
        u.down = NULL
        if not d.req_done:
            d.close_after = True  # the rest of the request body cannot be framed any more: end here
        self._post_done(d, 0)
        if reusable and not u.h2_stream:
            self._pool_release(u)
        else:
            self._close_up(u, False)
        self._next_request(d)

    cdef void _next_request(self, Down *d) noexcept nogil:
        free(d.edits)
        d.edits = NULL
        d.fwd.off = d.fwd.len = 0
        if d.replay.data != NULL:
            _free_buf(&d.replay)  # only requests with a body and a replay limit allocate it
        if d.close_after or not d.client_keep_alive:
            self._start_closing(d)
            return
        d.state = D_HEAD
        h1_head_init(&d.req)
        d.head_idle = True
        d.deadline_ns = self.now_ns + self.idle_timeout_ns
        _trim(&d.orig)
        _trim(&d.fwd)

    cdef void _post_done(self, Down *d, int err) noexcept nogil:
        cdef Record r
        memset(&r, 0, sizeof(r))
        r.kind = REC_DONE
        r.request_id = d.request_id
        r.conn_id = d.conn_id
        r.status = d.status
        r.err = err
        r.flags = d.flags
        r.bytes_in = d.req_body_bytes
        r.bytes_out = d.resp_bytes
        r.decide_ns = d.t_forward_ns - d.t_head_ns if d.t_forward_ns >= d.t_head_ns and d.t_head_ns else 0
        r.upstream_ns = d.t_resp_ns - d.t_forward_ns if d.t_resp_ns > d.t_forward_ns and d.t_forward_ns else 0
        r.total_ns = self.now_ns - d.t_head_start_ns
        r.attempts = d.attempts
        r.reused = d.reused
        r.response_ns = d.response_ns if d.resp_head_sent else 0  # a held head the client never got: 0
        r.grpc_status = d.grpc_seen
        d.request_open = False
        d.t_forward_ns = d.t_resp_ns = 0
        self._post(&r)

    cdef void _local_reply(self, Down *d, uint16_t status, const char *flag, uint32_t flag_bit,
                           const char *detail, size_t detail_len, bint close_after) noexcept nogil:
        """Answer the client ourselves: `status` with x-nodeproxy-flags: flag and `detail` as the body."""
        self._local_reply_fields(d, status, flag, flag_bit, detail, detail_len, NULL, 0, close_after)

    cdef void _local_reply_fields(self, Down *d, uint16_t status, const char *flag, uint32_t flag_bit,
                                  const char *detail, size_t detail_len, const char *fields, size_t fields_len,
                                  bint close_after) noexcept nogil:
        """_local_reply with extra header lines (`name: value` CRLF each, checked by answer())."""
        cdef char head[512]
        cdef char message[200]
        cdef int n
        cdef int grpc_status
        cdef Up *u = d.up
        if u != NULL:
            d.up = NULL
            u.down = NULL
            self._close_up(u, True)
        if d.state == D_WAIT_CONN:
            self._pool_unwait(d)
        if not d.request_open:
            # A reply to a head that never completed (bad input, timeout): still one DONE for the log.
            self.slot_seq[d.slot] += 1
            d.request_id = (<uint64_t>d.slot << 32) | self.slot_seq[d.slot]
            d.t_head_ns = 0
            d.req_body_bytes = 0
            d.resp_bytes = 0
            d.attempts = 0
            d.flags = 0
            d.reused = False
            d.response_ns = 0
            d.grpc_seen = -1
            d.request_open = True
        if d.state == D_HEAD:
            # No complete head (bad input, timeout): the connection's framing is lost.
            close_after = True
            d.method_head = False
        elif d.req_body.kind != H1_BODY_NONE and not d.req_done:
            close_after = True  # the unread request body cannot be skipped reliably
        close_after = close_after or d.close_after or not d.client_keep_alive or self.draining
        if d.parent != NULL and d.grpc:
            # gRPC over HTTP/2: HTTP 200 and the status in a trailers-only response (one HEADERS frame).
            grpc_status = d.grpc_status if d.grpc_status >= 0 else _grpc_status_for(status, flag)
            _percent_encode(detail, detail_len, message, sizeof(message))
            n = snprintf(head, sizeof(head),
                         "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: %d\r\n"
                         "grpc-message: %s\r\nx-nodeproxy-flags: %s\r\ncontent-length: 0\r\n",
                         grpc_status, message, flag)
            if (n < 0 or n >= <int>sizeof(head) or _append(&d.outb, head, n) < 0
                    or _append(&d.outb, fields, fields_len) < 0 or _append(&d.outb, "\r\n", 2) < 0):
                self._release_down(d, 0, ENOMEM)
                return
            d.resp_bytes += n + fields_len + 2
            d.grpc_seen = grpc_status
            d.status = 200
            d.flags |= flag_bit
            d.close_after = True
            self._post_done(d, 0)
            self._next_request(d)
            return
        n = snprintf(head, sizeof(head),
                     "HTTP/1.1 %u %s\r\ncontent-type: text/plain\r\ncontent-length: %u\r\n"
                     "x-nodeproxy-flags: %s\r\n%s",
                     <unsigned>status, _reason(status), <unsigned>(detail_len + 1), flag,
                     "connection: close\r\n" if close_after else "")
        if (n < 0 or n >= <int>sizeof(head) or _append(&d.outb, head, n) < 0
                or _append(&d.outb, fields, fields_len) < 0 or _append(&d.outb, "\r\n", 2) < 0):
            self._release_down(d, 0, ENOMEM)
            return
        d.resp_bytes += n + fields_len + 2
        if not d.method_head:
            if _append(&d.outb, detail, detail_len) < 0 or _append(&d.outb, "\n", 1) < 0:
                self._release_down(d, 0, ENOMEM)
                return
            d.resp_bytes += detail_len + 1
        d.status = status
        d.flags |= flag_bit
        d.close_after = close_after
        self._post_done(d, 0)
        self._next_request(d)

    cdef void _start_closing(self, Down *d) noexcept nogil:
        d.state = D_CLOSING
        # A stream's last bytes wait for the client's window, which a slow reader may open late.
        d.deadline_ns = self.now_ns + (self.idle_timeout_ns if d.parent != NULL else <int64_t>LINGER_MS * 1000000)
        if d.up != NULL:
            d.up.down = NULL
            self._close_up(d.up, False)
            d.up = NULL

    cdef int _step_closing(self, Down *d) noexcept nogil:
        cdef ssize_t n
        if _held(&d.outb):
            return 0  # still flushing the last answer
        if d.parent != NULL:
            self._release_down(d, 0, 0)  # a stream: its answer is with the h2 core, which sends it
            return -1
        if not d.shut_wr:
            shutdown(d.fd, SHUT_WR)
            d.shut_wr = True
        while not d.peer_eof and d.readable:
            # Drain what the client still sends, so our close is not an RST that destroys the answer.
            d.inb.off = d.inb.len = 0
            n = _recv_into(d.fd, &d.inb, IO_CHUNK, &d.readable, True)
            if n == 0 or n == -1:
                d.peer_eof = True
        if d.peer_eof:
            self._release_down(d, 0, 0)
            return -1
        return 0

    # -- tunnels (after 101) ---------------------------------------------------------------------------

    cdef int _step_tunnel(self, Down *d, int *budget) noexcept nogil:
        cdef Up *u = d.up
        cdef int a, b
        if u == NULL:
            self._release_down(d, 0, 0)
            return -1
        if (self.hand_off_upgrades and not (d.peer_eof or u.peer_eof or d.shut_wr or u.shut_wr)
                and _held(&d.inb) + _held(&d.outb) + _held(&u.inb) + _held(&u.outb) == 0):
            # Nothing in flight and both directions open: the splice relay can take over cleanly.
            self._hand_off(d)
            return -1
        a = self._tunnel_direction(d, &d.readable, &d.rdhup, &d.inb, &d.peer_eof, d.fd, u.fd, &u.outb,
                                   &u.writable, &u.shut_wr, budget)
        if a < 0:
            return -1
        b = self._tunnel_direction(d, &u.readable, &u.rdhup, &u.inb, &u.peer_eof, u.fd, d.fd, &d.outb,
                                   &d.writable, &d.shut_wr, budget)
        if b < 0:
            return -1
        if d.shut_wr and u.shut_wr:
            self._release_down(d, 0, 0)
            return -1
        return a or b

    cdef int _tunnel_direction(self, Down *d, bint *src_readable, bint *src_rdhup, Buf *src_in, bint *src_eof, int src_fd,
                               int dst_fd, Buf *dst_out, bint *dst_writable, bint *dst_shut,
                               int *budget) noexcept nogil:
        cdef ssize_t n
        cdef int progressed = 0
        while True:
            if _held(src_in):
                if _held(dst_out) > HIGH_WATER:
                    return progressed
                if _send(dst_fd, dst_out, dst_writable, src_in.data + src_in.off, _held(src_in), True) < 0:
                    self._release_down(d, 0, errno)
                    return -1
                _consume(src_in, _held(src_in))
                progressed = 1
            if src_eof[0]:
                if not dst_shut[0] and _held(dst_out) == 0:
                    shutdown(dst_fd, SHUT_WR)
                    dst_shut[0] = True
                    progressed = 1
                return progressed
            if not src_readable[0]:
                return progressed
            if budget[0] <= 0:
                self._queue_ready(d)
                return progressed
            budget[0] -= 1
            n = _recv_into(src_fd, src_in, IO_CHUNK, src_readable, src_rdhup[0])
            if n == 0:
                src_eof[0] = True
            elif n == -1:
                self._release_down(d, 0, errno)
                return -1
            elif n > 0:
                progressed = 1

    cdef void _hand_off(self, Down *d) noexcept nogil:
        cdef Up *u = d.up
        cdef Record r
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, d.fd, NULL)
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, u.fd, NULL)
        memset(&r, 0, sizeof(r))
        r.kind = REC_UPGRADED
        r.conn_id = d.conn_id
        r.request_id = d.request_id
        r.client_fd = d.fd
        r.upstream_fd = u.fd
        d.fd = -1  # no longer ours: release below closes neither
        u.fd = -1
        d.up = NULL
        u.down = NULL
        self._close_up(u, False)
        self._post(&r)
        self._release_down(d, 0, 0)

    # -- teardown --------------------------------------------------------------------------------------

    cdef void _release_down(self, Down *d, uint32_t flag, int err) noexcept nogil:
        """Close a client connection and everything it holds; post its last records."""
        cdef Record r
        cdef bint stream = d.parent != NULL
        if d.dead:
            return
        if d.h2 != NULL:
            d.h2.finished = True  # its streams go first, and need not be reset one by one
            while d.h2.streams != NULL:
                self._release_down(d.h2.streams, FLAG_DC, err)
        if d.up != NULL:
            d.up.down = NULL
            self._close_up(d.up, True)
            d.up = NULL
        self._pool_unwait(d)
        if d.request_open:
            d.flags |= flag
            self._post_done(d, err)
        if stream:
            self._h2_stream_gone(d)
        else:
            memset(&r, 0, sizeof(r))
            r.kind = REC_CONN_CLOSED
            r.conn_id = d.conn_id
            r.bytes_in = d.requests
            r.err = err
            self._post(&r)
        if d.fd >= 0:
            close(d.fd)
            d.fd = -1
        self.slots[d.slot] = NULL
        self.free_slots[self.nfree] = d.slot
        self.nfree += 1
        _free_buf(&d.inb)
        _free_buf(&d.outb)
        _free_buf(&d.orig)
        _free_buf(&d.fwd)
        _free_buf(&d.replay)
        free(d.edits)
        d.edits = NULL
        if d.queued:
            self._unqueue(d)
        if d.prev != NULL:
            d.prev.next = d.next
        else:
            self.downs = d.next
        if d.next != NULL:
            d.next.prev = d.prev
        if d.h2 != NULL:
            h2_core_free(&d.h2.core)
            free(d.h2)
            d.h2 = NULL
        if not stream:
            self.live -= 1
        d.dead = True
        d.grave_next = self.down_graves
        self.down_graves = d

    cdef void _close_up(self, Up *u, bint reset) noexcept nogil:
        cdef Pool *p = u.pool
        if u.dead:
            return
        if u.h2_stream:
            self._h2u_stream_closed(u)  # resets the stream unless it completed; the connection stays
            return
        if u.h2 != NULL:
            if not u.h2.finished or u.h2.streams != NULL:
                self._h2u_fail(u, ECONNRESET)  # no stream Up may keep a pointer to this connection
            if u.pool_prev != NULL:
                u.pool_prev.pool_next = u.pool_next
            elif p != NULL:
                p.h2_head = u.pool_next
            if u.pool_next != NULL:
                u.pool_next.pool_prev = u.pool_prev
            h2_core_free(&u.h2.core)
            free(u.h2)
            u.h2 = NULL
        if u.fd >= 0:
            if reset:
                _set_reset_on_close(u.fd)
            close(u.fd)
            u.fd = -1
        if p != NULL:
            if u.state == U_IDLE:
                if u.idle_prev != NULL:
                    u.idle_prev.idle_next = u.idle_next
                else:
                    p.idle_head = u.idle_next
                if u.idle_next != NULL:
                    u.idle_next.idle_prev = u.idle_prev
                else:
                    p.idle_tail = u.idle_prev
                p.nidle -= 1
            p.conns -= 1
        _free_buf(&u.inb)
        _free_buf(&u.outb)
        if u.prev != NULL:
            u.prev.next = u.next
        else:
            self.ups = u.next
        if u.next != NULL:
            u.next.prev = u.prev
        self.upstreams -= 1
        u.dead = True
        u.grave_next = self.up_graves
        self.up_graves = u
        if p != NULL and p.wait_head != NULL:
            self._serve_waiter(p)

    cdef void _queue_ready(self, Down *d) noexcept nogil:
        if not d.queued:
            d.queued = True
            d.ready_next = self.ready
            self.ready = d

    cdef void _unqueue(self, Down *d) noexcept nogil:
        cdef Down **link = &self.ready
        while link[0] != NULL:
            if link[0] == d:
                link[0] = d.ready_next
                break
            link = &link[0].ready_next
        d.queued = False
        d.ready_next = NULL

    cdef void _run_ready(self) noexcept nogil:
        cdef Down *d
        cdef Down *batch = self.ready
        self.ready = NULL
        while batch != NULL:
            d = batch
            batch = d.ready_next
            d.ready_next = NULL
            d.queued = False
            if not d.dead:
                self._drive(d)

    cdef void _close_idle(self) noexcept nogil:
        # Draining: a connection between requests (no byte of a next head yet) is closed at once.
        cdef Down *d = self.downs
        cdef Down *dn
        self.drained_idle = True
        while d != NULL:
            dn = d.next
            if d.state == D_HEAD and d.parent == NULL and _held(&d.inb) == 0 and (d.head_idle or d.requests == 0):
                self._start_closing(d)
                self._drive(d)
            elif d.state == D_H2:
                self._queue_ready(d)  # sends GOAWAY, closes once its streams are done
            d = dn

    cdef void _sweep_pools(self) noexcept nogil:
        # A pool with no connection and no waiter holds nothing: free it, so pods and endpoints that come
        # and go do not leave a Pool each behind. Only Ups (conns > 0) and waiting Downs point at a pool.
        cdef int i
        cdef Pool **link
        cdef Pool *p
        for i in range(POOL_BUCKETS):
            link = &self.pools[i]
            while link[0] != NULL:
                p = link[0]
                if p.conns == 0 and p.wait_head == NULL:
                    link[0] = p.hash_next
                    free(p)
                    self.npools -= 1
                else:
                    link = &p.hash_next

    cdef void _scan(self) noexcept nogil:
        # A linear walk every SCAN_MS: ~10 ns a connection, cheaper than timer bookkeeping per event.
        cdef Down *d = self.downs
        cdef Down *dn
        cdef Up *u = self.ups
        cdef Up *un
        cdef int64_t now = self.now_ns
        self.next_try_ns = 0  # recomputed below from the per-try deadlines still pending
        while u != NULL:
            un = u.next
            if u.h2 != NULL:
                if u.state == U_CONNECTING and now - u.since_ns >= self.connect_timeout_ns:
                    self._h2u_fail(u, ETIMEDOUT)
                    self._close_up(u, False)
                elif (u.h2.nstreams == 0 and self.pool_idle_timeout_ns > 0
                      and now - u.since_ns >= self.pool_idle_timeout_ns):
                    self._close_up(u, False)  # idle: nothing in flight to lose
            elif u.state == U_CONNECTING and now - u.since_ns >= self.connect_timeout_ns:
                d = u.down
                u.down = NULL
                self._close_up(u, False)
                if d != NULL:
                    d.up = NULL
                    self._attempt_failed(d, ETIMEDOUT, FLAG_UF)
            elif (u.state == U_IDLE and self.pool_idle_timeout_ns > 0
                  and now - u.since_ns >= self.pool_idle_timeout_ns):
                self._close_up(u, False)
            u = un
        d = self.downs
        while d != NULL:
            dn = d.next
            if not d.dead and d.deadline_ns != 0 and now >= d.deadline_ns:
                if d.state == D_HEAD:
                    if d.sniffing:
                        self._not_http(d)  # silent: a server-first protocol, for the L4 relay
                    elif d.head_idle:
                        self._release_down(d, 0, 0)  # keep-alive idle timeout: a quiet close
                    else:
                        self._local_reply(d, 408, "DPE", FLAG_DPE, "request head not received in time", 33, True)
                        self._drive(d)
                elif (d.state == D_WAIT_CONN or d.state == D_EXCHANGE and not d.resp_head_sent) and d.resilient:
                    self._fail_attempt(d, ETIMEDOUT, FLAG_UT, FAILURE_TIMEOUT)
                elif d.state == D_WAIT_CONN or d.state == D_EXCHANGE and not d.resp_head_sent:
                    self._local_reply(d, 504, "UT", FLAG_UT, "upstream did not answer in time", 31,
                                      not d.req_done)
                    self._drive(d)
                elif d.state == D_CLOSING:
                    self._release_down(d, 0, 0)
                elif d.state == D_H2:
                    # Idle (no stream) for the keep-alive timeout: a graceful GOAWAY, then close.
                    d.deadline_ns = 0
                    if not d.h2.goaway_sent:
                        h2_goaway(&d.h2.core, NGHTTP2_NO_ERROR)
                        d.h2.goaway_sent = True
                    self._drive(d)
                else:
                    d.deadline_ns = 0
            elif not d.dead and d.deadline_ns != 0 and (d.state == D_WAIT_CONN or d.state == D_EXCHANGE):
                if self.next_try_ns == 0 or d.deadline_ns < self.next_try_ns:
                    self.next_try_ns = d.deadline_ns  # a per-try deadline still to come
            d = dn

    cdef void _bury(self) noexcept nogil:
        # Freed only here: until the loop turn ends, a later event of the same batch may name them.
        cdef Down *d
        cdef Up *u
        while self.down_graves != NULL:
            d = self.down_graves
            self.down_graves = d.grave_next
            free(d)
        while self.up_graves != NULL:
            u = self.up_graves
            self.up_graves = u.grave_next
            free(u)

    cdef void _close_all(self) noexcept nogil:
        cdef int i
        cdef Pool *p
        self._take_submissions()  # queued adoptions are adopted, then closed below with the others
        while self.downs != NULL:
            if self.downs.fd >= 0:
                _set_reset_on_close(self.downs.fd)
            self._release_down(self.downs, FLAG_DC, 0)
        while self.ups != NULL:
            self._close_up(self.ups, False)
        for i in range(POOL_BUCKETS):
            while self.pools[i] != NULL:
                p = self.pools[i]
                self.pools[i] = p.hash_next
                free(p)

    # -- HTTP/2 downstream -------------------------------------------------------------------------------
    #
    # An HTTP/2 connection is a Down in state D_H2 holding an h2 core (H2Conn). Each request stream is a
    # child Down with no socket (fd -1): its request head and body are written into its inb as HTTP/1.1
    # (a request line and Host from the pseudo-headers, chunked framing unless content-length was given,
    # trailers as a chunked trailer section), and the HTTP/1.1 exchange machine runs on it unchanged:
    # the same head parser (so the same strict checks), one REC_HEAD each, the same pools, retries and
    # local replies. What it answers lands in its outb as HTTP/1.1 and is framed back as HEADERS, DATA
    # and trailers (_h2_emit). Flow control: DATA is credited (h2_consume) only once the bytes left the
    # stream's inb for the upstream, and a stream stops reading its upstream while its framed bytes wait
    # for the client's window, so memory per stream and per connection stays bounded.

    cdef void _start_h2(self, Down *d) noexcept nogil:
        cdef h2_limits lim
        cdef int one = 1
        cdef H2Conn *h = <H2Conn*>calloc(1, sizeof(H2Conn))
        if h == NULL:
            self._release_down(d, 0, ENOMEM)
            return
        h2_default_limits(&lim)
        # The translated head must fit the HTTP/1 limits it is parsed with.
        lim.max_header_fields = self.limits.max_fields
        if lim.max_header_list_size > self.limits.max_head_bytes:
            lim.max_header_list_size = self.limits.max_head_bytes
        if h2_core_init(&h.core, True, &lim) != 0:
            h2_core_free(&h.core)
            free(h)
            self._release_down(d, 0, ENOMEM)
            return
        d.h2 = h
        d.state = D_H2
        # Frames of many streams interleave in small writes: Nagle would hold them for the peer's ACK.
        setsockopt(d.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        d.deadline_ns = self.now_ns + self.idle_timeout_ns

    cdef int _step_h2(self, Down *d, int *budget) noexcept nogil:
        cdef H2Conn *h = d.h2
        cdef const uint8_t *frames
        cdef ssize_t n
        cdef int progressed = 0
        cdef Down *s
        while True:
            if self.draining and not h.goaway_sent and not h.finished:
                h2_goaway(&h.core, NGHTTP2_NO_ERROR)
                h.goaway_sent = True
            if _held(&d.inb) and not h.finished:
                n = h2_recv(&h.core, d.inb.data + d.inb.off, _held(&d.inb))
                if n < 0:
                    h.finished = True  # a connection error: the GOAWAY nghttp2 queued goes out, then close
                    d.inb.off = d.inb.len = 0
                else:
                    _consume(&d.inb, n)
                if self._h2_events(d) < 0:
                    return -1
                progressed = 1
            # Frames to send, while the client keeps reading them: gathered first, then written at once
            # (one small write per frame would meet Nagle and delayed ACKs: 40 ms stalls).
            while _held(&d.outb) < HIGH_WATER:
                n = h2_pull(&h.core, &frames)
                if n <= 0:
                    break
                if _append(&d.outb, frames, n) < 0:
                    self._release_down(d, 0, ENOMEM)
                    return -1
                progressed = 1
            if _held(&d.outb) and d.writable and _flush(d.fd, &d.outb, &d.writable) < 0:
                self._release_down(d, FLAG_DC, errno)
                return -1
            s = h.streams
            while s != NULL:
                if s.h2_blocked and h2_pending(&h.core, s.stream_id) < H2_STREAM_HIGH_WATER:
                    s.h2_blocked = False
                    self._queue_ready(s)
                s = s.sib_next
            if h.finished or h2_wants(&h.core) == 0 or ((h.goaway_sent or h.peer_goaway) and h.nstreams == 0):
                h.finished = True
                while h.streams != NULL:
                    self._release_down(h.streams, FLAG_DC, 0)
                self._start_closing(d)  # flushes the last frames (GOAWAY), then FIN, then drains
                return 1
            d.deadline_ns = self.now_ns + self.idle_timeout_ns if h.nstreams == 0 else 0
            if d.peer_eof:
                self._release_down(d, FLAG_DC if h.nstreams else 0, 0)
                return -1
            if not d.readable or _held(&d.outb) >= HIGH_WATER:
                # A client that does not read its frames (PING/SETTINGS acks included) is not read either.
                return progressed
            if budget[0] <= 0:
                self._queue_ready(d)
                return progressed
            budget[0] -= 1
            n = _recv_into(d.fd, &d.inb, IO_CHUNK, &d.readable, d.rdhup)
            if n == 0:
                d.peer_eof = True
            elif n == -1:
                self._release_down(d, FLAG_DC, errno)
                return -1
            elif n < 0:
                return progressed

    cdef Down *_h2_stream(self, Down *d, int32_t stream_id) noexcept nogil:
        # At most max_concurrent_streams (100) streams: a list walk is cheaper than a table to keep.
        cdef Down *s = d.h2.streams
        while s != NULL and s.stream_id != stream_id:
            s = s.sib_next
        return s

    cdef int _h2_events(self, Down *d) noexcept nogil:
        """Act on what h2_recv found. Streams with news are queued, not driven here, so a stream's
        failure cannot free what this walk still uses. -1 if d is gone."""
        cdef H2Conn *h = d.h2
        cdef h2_event *e
        cdef Down *s
        cdef size_t i
        cdef unsigned char line[H1_CHUNK_HEADER_MAX]
        cdef size_t k
        for i in range(h.core.nevents):
            e = &h.core.events[i]
            if e.kind == H2_EV_HEADERS:
                if e.code & H2_BLOCK_REQUEST:
                    self._h2_request(d, e.stream_id, e.off, e.nfields, (e.code & H2_BLOCK_END_STREAM) != 0)
                else:
                    s = self._h2_stream(d, e.stream_id)
                    if s != NULL:
                        self._h2_request_trailers(s, e.off, e.nfields)
            elif e.kind == H2_EV_DATA:
                s = self._h2_stream(d, e.stream_id)
                if s == NULL or s.h2_req_ended or s.state == D_CLOSING or (s.req_abandoned and not s.resilient):
                    h2_consume(&h.core, e.stream_id, e.len)  # nobody takes these bytes: credit them now
                    continue
                if s.h2_chunked:
                    k = h1_chunk_header(e.len, line)
                    if (_append(&s.inb, line, k) < 0 or _append(&s.inb, h.core.arena + e.off, e.len) < 0
                            or _append(&s.inb, "\r\n", 2) < 0):
                        self._release_down(s, 0, ENOMEM)
                        continue
                elif _append(&s.inb, h.core.arena + e.off, e.len) < 0:
                    self._release_down(s, 0, ENOMEM)
                    continue
                s.h2_owed += e.len
                self._queue_ready(s)
            elif e.kind == H2_EV_END_STREAM:
                s = self._h2_stream(d, e.stream_id)
                if s != NULL:
                    self._h2_request_end(s)
            elif e.kind == H2_EV_RESET:
                s = self._h2_stream(d, e.stream_id)
                if s != NULL:
                    # The client cancelled (or the stream broke the protocol): the upstream request ends too.
                    s.h2_reset_by_peer = True
                    self._release_down(s, FLAG_DC, 0)
            elif e.kind == H2_EV_GOAWAY:
                h.peer_goaway = True
            elif e.kind == H2_EV_HEADERS_TOO_LARGE:
                self._h2_reply_direct(d, e.stream_id, "431")
        h2_clear_events(&h.core)
        return 0

    cdef void _h2_request(self, Down *d, int32_t stream_id, size_t off, uint32_t nfields,
                          bint end_stream) noexcept nogil:
        """A request stream opened: a child Down with the head translated to HTTP/1.1 in its inb."""
        cdef H2Conn *h = d.h2
        cdef Down *s = self._new_down()
        cdef size_t cursor = off, namelen, valuelen, need = 64
        cdef const uint8_t *name
        cdef const uint8_t *value
        cdef const uint8_t *method = NULL
        cdef const uint8_t *path = NULL
        cdef const uint8_t *authority = NULL
        cdef size_t method_len = 0, path_len = 0, authority_len = 0
        cdef uint32_t i
        cdef size_t k
        cdef bint has_length = False, bad = False, cookies = False
        cdef Buf *b
        if s == NULL:
            h2_reset(&h.core, stream_id, NGHTTP2_REFUSED_STREAM)
            return
        s.conn_id = d.conn_id
        s.source_ip = d.source_ip
        s.parent = d
        s.stream_id = stream_id
        s.state = D_HEAD
        s.t_head_start_ns = self.now_ns
        s.deadline_ns = self.now_ns + self.header_timeout_ns
        h1_head_init(&s.req)
        h1_head_init(&s.h2_resp)
        s.sib_next = h.streams
        if h.streams != NULL:
            h.streams.sib_prev = s
        h.streams = s
        h.nstreams += 1
        d.requests += 1
        for i in range(nfields):
            h2_field_next(&h.core, &cursor, &name, &namelen, &value, &valuelen)
            need += namelen + valuelen + 4
            if namelen and name[0] == b':':
                if _is_name(name, namelen, ":method"):
                    method, method_len = value, valuelen
                elif _is_name(name, namelen, ":path"):
                    path, path_len = value, valuelen
                elif _is_name(name, namelen, ":authority"):
                    authority, authority_len = value, valuelen
            elif _is_name(name, namelen, "content-length"):
                has_length = True
            elif _is_name(name, namelen, "content-type"):
                s.grpc = (valuelen >= 16 and memcmp(value, "application/grpc", 16) == 0
                          and (valuelen == 16 or value[16] == b'+' or value[16] == b';'))
        if path == NULL:
            path, path_len = authority, authority_len  # CONNECT: authority-form (answered 405 later)
            need += authority_len  # written twice then: as the target and as host
        # need covers every line written below (each field's name, value and 4 bytes, 128 for the fixed
        # parts), so after this reserve the unchecked _append calls cannot fail.
        b = &s.inb
        if _reserve(b, need + 64) < 0:
            self._release_down(s, 0, ENOMEM)
            return
        if method == NULL or path == NULL or not h1_field_is_valid(<const unsigned char*>"x", 1, path, path_len):
            bad = True
        else:
            _append(b, method, method_len)
            _append(b, " ", 1)
            _append(b, path, path_len)
            _append(b, " HTTP/1.1\r\n", 11)
            if authority != NULL:
                if not h1_field_is_valid(<const unsigned char*>"host", 4, authority, authority_len):
                    bad = True
                _append(b, "host: ", 6)
                _append(b, authority, authority_len)
                _append(b, "\r\n", 2)
        cursor = off
        for i in range(nfields):
            h2_field_next(&h.core, &cursor, &name, &namelen, &value, &valuelen)
            if bad:
                break
            if namelen and name[0] == b':':
                continue
            if authority != NULL and _is_name(name, namelen, "host"):
                continue  # :authority wins (RFC 9113 §8.3.1); two Host lines would be rejected
            if _is_name(name, namelen, "cookie"):
                cookies = True
                continue  # joined into one field below (RFC 9113 §8.2.3)
            if not h1_field_is_valid(name, namelen, value, valuelen):
                bad = True  # a value HTTP/2 allowed but HTTP/1.1 cannot carry safely: never forwarded
                break
            _append(b, name, namelen)
            _append(b, ": ", 2)
            _append(b, value, valuelen)
            _append(b, "\r\n", 2)
        if cookies and not bad:
            _append(b, "cookie: ", 8)
            cursor = off
            k = 0
            for i in range(nfields):
                h2_field_next(&h.core, &cursor, &name, &namelen, &value, &valuelen)
                if _is_name(name, namelen, "cookie"):
                    if not h1_field_is_valid(name, namelen, value, valuelen):
                        bad = True
                        break
                    if k:
                        _append(b, "; ", 2)
                    _append(b, value, valuelen)
                    k += 1
            _append(b, "\r\n", 2)
        if bad:
            b.off = b.len = 0
            self._local_reply(s, 400, "DPE", FLAG_DPE, "a request field HTTP/1.1 cannot carry", 37, True)
            self._queue_ready(s)
            return
        if not end_stream and not has_length:
            _append(b, "transfer-encoding: chunked\r\n", 28)
            s.h2_chunked = True
        s.h2_req_ended = end_stream
        _append(b, "\r\n", 2)
        self._queue_ready(s)

    cdef void _h2_request_trailers(self, Down *s, size_t off, uint32_t nfields) noexcept nogil:
        # Trailers ride on a chunked body's trailer section; a content-length body cannot carry them.
        cdef H2Conn *h = s.parent.h2
        if s.h2_req_ended:
            return
        s.h2_req_ended = True
        if not s.h2_chunked or s.state == D_CLOSING or (s.req_abandoned and not s.resilient):
            return
        if (_append(&s.inb, "0\r\n", 3) < 0 or _append_h1_fields(&s.inb, &h.core, off, nfields) < 0
                or _append(&s.inb, "\r\n", 2) < 0):
            self._release_down(s, 0, ENOMEM)
            return
        self._queue_ready(s)

    cdef void _h2_request_end(self, Down *s) noexcept nogil:
        if s.h2_req_ended:
            return
        s.h2_req_ended = True
        if s.h2_chunked and s.state != D_CLOSING and not (s.req_abandoned and not s.resilient):
            if _append(&s.inb, "0\r\n\r\n", 5) < 0:
                self._release_down(s, 0, ENOMEM)
                return
        self._queue_ready(s)

    cdef void _h2_credit(self, Down *s) noexcept nogil:
        """Give the client back window for the DATA bytes that left this stream's inb (went upstream)."""
        cdef size_t held
        cdef uint64_t release
        if s.h2_owed == 0:
            return
        if s.state == D_CLOSING or (s.req_abandoned and not s.resilient):
            # Nobody will read the rest of this request body (a resilient request's retry still may).
            s.inb.off = s.inb.len = 0
        held = _held(&s.inb)
        # Held bytes include chunk framing, so owed - held never credits a byte still waiting here.
        release = s.h2_owed if held == 0 else (s.h2_owed - held if s.h2_owed > held else 0)
        if release:
            h2_consume(&s.parent.h2.core, s.stream_id, release)
            s.h2_owed -= release

    cdef int _h2_emit(self, Down *s) noexcept nogil:
        """Frame the HTTP/1.1 response bytes in s.outb as HEADERS / DATA / trailers on the stream.
        1 when something moved, 0 when it waits (more bytes, or the client's window), -1 if s is gone."""
        cdef h2_core *core = &s.parent.h2.core
        cdef nghttp2_nv nva[H2_NV_MAX]
        cdef char status_text[8]
        cdef unsigned char *base
        cdef size_t avail, nnv
        cdef ssize_t n
        cdef int rc, progressed = 0
        cdef uint32_t i
        cdef h1_chunk chunk
        cdef bint informational, ended
        cdef unsigned char *name_p
        while _held(&s.outb):
            base = s.outb.data + s.outb.off
            avail = _held(&s.outb)
            if s.h2_resp_done:
                s.outb.off = s.outb.len = 0  # cannot happen: the engine writes one response per stream
                return progressed
            if not s.h2_resp_head_done:
                rc = h1_parse_response(base, avail, &self.limits, &s.h2_resp)
                if rc == 0:
                    return progressed
                if rc < 0:
                    s.flags |= FLAG_UPE
                    self._release_down(s, 0, 0)
                    return -1
                # The HTTP/1.1 parser accepts exactly three status digits; :status relies on it.
                if snprintf(status_text, sizeof(status_text), "%u", <unsigned>s.h2_resp.status) != 3:
                    s.flags |= FLAG_UPE
                    self._release_down(s, 0, 0)
                    return -1
                _nv(&nva[0], ":status", 7, status_text, 3)
                nnv = 1
                for i in range(s.h2_resp.nfields):
                    if nnv >= H2_NV_MAX:
                        break
                    if _hop_by_hop(base + s.h2_resp.fields[i].name.off, s.h2_resp.fields[i].name.len):
                        continue
                    _lower(base + s.h2_resp.fields[i].name.off, s.h2_resp.fields[i].name.len)
                    _nv(&nva[nnv], base + s.h2_resp.fields[i].name.off, s.h2_resp.fields[i].name.len,
                        base + s.h2_resp.fields[i].value.off, s.h2_resp.fields[i].value.len)
                    nnv += 1
                informational = s.h2_resp.status < 200
                ended = False
                if not informational:
                    h1_body_for_response(&s.h2_resp_body, &s.h2_resp, s.method_head, 0)
                    # An empty Content-Length body ends with the head: no feed call would ever end it.
                    ended = s.h2_resp_body.kind == H1_BODY_NONE or (
                        s.h2_resp_body.kind == H1_BODY_LENGTH and s.h2_resp.content_length == 0)
                rc = h2_send_headers(core, s.stream_id, nva, nnv, ended)
                _consume(&s.outb, s.h2_resp.head_len)
                if rc < 0:
                    self._release_down(s, 0, 0)
                    return -1
                progressed = 1
                h1_head_init(&s.h2_resp)
                if not informational:
                    s.h2_resp_head_done = True
                    s.h2_resp_done = ended
                continue
            if h2_pending(core, s.stream_id) >= H2_STREAM_HIGH_WATER:
                s.h2_blocked = True  # the client's window is shut: its connection wakes us when it opens
                return progressed
            n = h1_body_feed(&s.h2_resp_body, base, avail, &chunk)
            if n < 0:
                self._release_down(s, 0, 0)
                return -1
            if n == 0:
                return progressed
            rc = 0
            if chunk.data.len:
                rc = h2_send_data(core, s.stream_id, base + chunk.data.off, chunk.data.len, False)
            if rc == 0 and chunk.ended:
                nnv = 0
                if chunk.trailers.len and h1_parse_trailers(base + chunk.trailers.off, chunk.trailers.len,
                                                            &self.limits, &s.h2_resp) > 0:
                    for i in range(s.h2_resp.nfields):
                        if nnv >= H2_NV_MAX:
                            break
                        name_p = base + chunk.trailers.off + s.h2_resp.fields[i].name.off
                        if _hop_by_hop(name_p, s.h2_resp.fields[i].name.len):
                            continue
                        _lower(name_p, s.h2_resp.fields[i].name.len)
                        _nv(&nva[nnv], name_p, s.h2_resp.fields[i].name.len,
                            base + chunk.trailers.off + s.h2_resp.fields[i].value.off,
                            s.h2_resp.fields[i].value.len)
                        nnv += 1
                if nnv:
                    rc = h2_send_trailers(core, s.stream_id, nva, nnv)
                else:
                    rc = h2_send_data(core, s.stream_id, NULL, 0, True)
                s.h2_resp_done = True
            _consume(&s.outb, n)
            if rc < 0:
                self._release_down(s, 0, 0)
                return -1
            progressed = 1
        return progressed

    cdef void _h2_stream_gone(self, Down *s) noexcept nogil:
        """Unlink a released stream from its connection; reset it unless it ended properly."""
        cdef Down *p = s.parent
        cdef H2Conn *h = p.h2
        if s.sib_prev != NULL:
            s.sib_prev.sib_next = s.sib_next
        else:
            h.streams = s.sib_next
        if s.sib_next != NULL:
            s.sib_next.sib_prev = s.sib_prev
        s.sib_next = s.sib_prev = NULL
        h.nstreams -= 1
        if not h.finished and not s.h2_reset_by_peer:
            if not s.h2_resp_done:
                h2_reset(&h.core, s.stream_id, s.h2_reset_code if s.h2_reset_code else NGHTTP2_INTERNAL_ERROR)
            # Answered before the request ended: no RST_STREAM(NO_ERROR) (RFC 9113 §8.1 allows one), as
            # nghttp2 would drop the answer's frames still queued; the rest of the body is credited and
            # dropped as it comes (the stream has no Down any more).
        if s.h2_owed and not h.finished:
            h2_consume(&h.core, s.stream_id, s.h2_owed)  # the connection window gets them back
        s.h2_owed = 0
        self._queue_ready(p)

    cdef void _h2_reply_direct(self, Down *d, int32_t stream_id, const char *status) noexcept nogil:
        # A request no stream Down exists for (its header block broke the limits): answered by the core.
        cdef nghttp2_nv nva[2]
        _nv(&nva[0], ":status", 7, status, strlen(status))
        _nv(&nva[1], "x-nodeproxy-flags", 17, "DPE", 3)
        if h2_send_headers(&d.h2.core, stream_id, nva, 2, True) < 0:
            h2_reset(&d.h2.core, stream_id, NGHTTP2_REFUSED_STREAM)

    # -- HTTP/2 upstream ---------------------------------------------------------------------------------
    #
    # A connection Up with an h2 core (client side) per (source, endpoint) pool, several when streams run
    # out or a GOAWAY came; each request is a stream Up attached to its Down like a pooled HTTP/1.1
    # connection: the exchange machine writes the request into the stream Up's outb as HTTP/1.1 and
    # reads the response from its inb as HTTP/1.1; _h2u_send and _h2u_events translate. Response DATA is
    # credited to the server only once the bytes left the stream Up's inb for the client.

    cdef void _h2u_acquire(self, Down *d, Pool *p, bint fresh) noexcept nogil:
        cdef Up *c = NULL
        cdef Up *best = NULL
        cdef Up *s
        cdef uint32_t limit
        cdef int err = 0
        if not fresh:
            c = p.h2_head
            while c != NULL:
                if not c.h2.goaway and not c.h2.finished and h2_can_open_stream(&c.h2.core):
                    limit = h2_peer_max_streams(&c.h2.core)
                    if limit > H2_UP_MAX_STREAMS:
                        limit = H2_UP_MAX_STREAMS
                    if c.h2.nstreams < limit:
                        break
                    if best == NULL or c.h2.nstreams < best.h2.nstreams:
                        best = c
                c = c.pool_next
        if c == NULL and p.conns >= self.pool_max_conns and best != NULL:
            c = best  # every connection is full and no new one may open: nghttp2 queues the stream
        if c == NULL:
            c = self._connect(p, &err)
            if c == NULL:
                self._attempt_failed(d, err, FLAG_UF)
                return
            c.h2 = <H2Up*>calloc(1, sizeof(H2Up))
            if c.h2 == NULL or self._h2u_init(c) != 0:
                self._close_up(c, True)
                self._attempt_failed(d, ENOMEM, FLAG_UF)
                return
            c.pool_next = p.h2_head
            if p.h2_head != NULL:
                p.h2_head.pool_prev = c
            p.h2_head = c
        s = <Up*>calloc(1, sizeof(Up))
        if s == NULL:
            self._attempt_failed(d, ENOMEM, FLAG_UF)
            return
        s.kind = KIND_UP
        s.fd = -1
        s.state = U_BUSY
        s.h2_stream = True
        s.conn = c
        h1_head_init(&s.h2_req)
        s.sib_next = c.h2.streams
        if c.h2.streams != NULL:
            c.h2.streams.sib_prev = s
        c.h2.streams = s
        c.h2.nstreams += 1
        self._attach(d, s, c.state != U_CONNECTING)

    cdef int _h2u_init(self, Up *c) noexcept nogil:
        cdef h2_limits lim
        h2_default_limits(&lim)
        lim.max_header_fields = self.limits.max_fields
        if lim.max_header_list_size > self.limits.max_head_bytes:
            lim.max_header_list_size = self.limits.max_head_bytes
        if h2_core_init(&c.h2.core, False, &lim) != 0:
            return -1
        return 0

    cdef int _h2u_send(self, Up *s) noexcept nogil:
        """Translate the HTTP/1.1 request bytes in s.outb into HEADERS / DATA / trailers on the stream.
        1 when something moved, 0 when it waits."""
        cdef Up *c = s.conn
        cdef h2_core *core
        cdef nghttp2_nv nva[H2_NV_MAX]
        cdef unsigned char *base
        cdef size_t avail, nnv
        cdef ssize_t n
        cdef int32_t sid
        cdef int rc, progressed = 0
        cdef uint32_t i, path_end
        cdef h1_chunk chunk
        cdef bint ended
        cdef unsigned char *name_p
        cdef h1_head *h = &s.h2_req
        if c == NULL or c.h2 == NULL or c.h2.finished or s.h2_reset or s.h2_req_done:
            s.outb.off = s.outb.len = 0  # nobody will take these bytes (the failure reaches the Down as EOF)
            return 0
        core = &c.h2.core
        while _held(&s.outb):
            base = s.outb.data + s.outb.off
            avail = _held(&s.outb)
            if not s.h2_req_head_done:
                rc = h1_parse_request(base, avail, &self.limits, h)
                if rc == 0:
                    break
                if rc < 0:
                    s.h2_reset = True  # cannot happen: the engine serialized this head itself
                    s.peer_eof = True
                    s.outb.off = s.outb.len = 0
                    break
                _nv(&nva[0], ":method", 7, base + h.method.off, h.method.len)
                _nv(&nva[1], ":scheme", 7, "http", 4)
                _nv(&nva[2], ":authority", 10, base + h.authority.off, h.authority.len)
                if h.target_form == H1_TARGET_ABSOLUTE:
                    path_end = h.query.off + h.query.len if h.query.len else h.path.off + h.path.len
                    if h.path.len:
                        _nv(&nva[3], ":path", 5, base + h.path.off, path_end - h.path.off)
                    else:
                        _nv(&nva[3], ":path", 5, "/", 1)
                else:
                    _nv(&nva[3], ":path", 5, base + h.target.off, h.target.len)
                nnv = 4
                for i in range(h.nfields):
                    if nnv >= H2_NV_MAX:
                        break
                    name_p = base + h.fields[i].name.off
                    if _is_name(name_p, h.fields[i].name.len, "host"):
                        continue
                    if _is_name(name_p, h.fields[i].name.len, "te"):
                        if h.te_trailers:
                            _nv(&nva[nnv], "te", 2, "trailers", 8)  # the only te HTTP/2 allows
                            nnv += 1
                        continue
                    if _hop_by_hop(name_p, h.fields[i].name.len):
                        continue
                    _lower(name_p, h.fields[i].name.len)
                    _nv(&nva[nnv], name_p, h.fields[i].name.len, base + h.fields[i].value.off,
                        h.fields[i].value.len)
                    nnv += 1
                h1_body_for_request(&s.h2_req_body, h)
                ended = s.h2_req_body.kind == H1_BODY_NONE or (
                    s.h2_req_body.kind == H1_BODY_LENGTH and h.content_length == 0)
                sid = h2_send_headers(core, -1, nva, nnv, ended)
                _consume(&s.outb, h.head_len)
                if sid < 0:
                    s.h2_reset = True
                    s.peer_eof = True
                    s.outb.off = s.outb.len = 0
                    break
                s.stream_id = sid
                s.h2_req_head_done = True
                s.h2_req_done = ended
                progressed = 1
                if ended:
                    s.outb.off = s.outb.len = 0
                    break
                continue
            if h2_pending(core, s.stream_id) >= H2_STREAM_HIGH_WATER:
                s.h2_blocked = True  # the server's window is shut: its connection wakes us
                break
            n = h1_body_feed(&s.h2_req_body, base, avail, &chunk)
            if n <= 0:
                break  # n < 0 cannot happen: the exchange machine validated this framing already
            rc = 0
            if chunk.data.len:
                rc = h2_send_data(core, s.stream_id, base + chunk.data.off, chunk.data.len, False)
            if rc == 0 and chunk.ended:
                nnv = 0
                if chunk.trailers.len and h1_parse_trailers(base + chunk.trailers.off, chunk.trailers.len,
                                                            &self.limits, h) > 0:
                    for i in range(h.nfields):
                        if nnv >= H2_NV_MAX:
                            break
                        name_p = base + chunk.trailers.off + h.fields[i].name.off
                        if _hop_by_hop(name_p, h.fields[i].name.len):
                            continue
                        _lower(name_p, h.fields[i].name.len)
                        _nv(&nva[nnv], name_p, h.fields[i].name.len, base + chunk.trailers.off + h.fields[i].value.off,
                            h.fields[i].value.len)
                        nnv += 1
                if nnv:
                    rc = h2_send_trailers(core, s.stream_id, nva, nnv)
                else:
                    rc = h2_send_data(core, s.stream_id, NULL, 0, True)
                s.h2_req_done = True
            _consume(&s.outb, n)
            progressed = 1
            if rc < 0:
                s.h2_reset = True
                s.peer_eof = True
                s.outb.off = s.outb.len = 0
                break
        if progressed:
            self._h2u_flush(c)
        return progressed

    cdef void _h2u_flush(self, Up *c) noexcept nogil:
        """Pull what the session has to send and write it, while the server takes it."""
        cdef const uint8_t *frames
        cdef ssize_t n
        if c.dead or c.h2 == NULL or c.state == U_CONNECTING:
            return  # frames wait in the core until the connection is up
        if _held(&c.outb) and c.writable:
            if _flush(c.fd, &c.outb, &c.writable) < 0:
                self._h2u_fail(c, errno)
                self._close_up(c, True)
                return
        while _held(&c.outb) < HIGH_WATER:
            n = h2_pull(&c.h2.core, &frames)
            if n <= 0:
                break
            if _append(&c.outb, frames, n) < 0:
                self._h2u_fail(c, ENOMEM)
                self._close_up(c, True)
                return
        if _held(&c.outb) and c.writable and _flush(c.fd, &c.outb, &c.writable) < 0:
            self._h2u_fail(c, errno)
            self._close_up(c, True)

    cdef void _drive_h2u(self, Up *c) noexcept nogil:
        cdef ssize_t n
        cdef Up *s
        cdef int err = 0
        while not c.dead:
            self._h2u_flush(c)
            if c.dead:
                return
            if not c.readable or c.peer_eof:
                break
            n = _recv_into(c.fd, &c.inb, IO_CHUNK, &c.readable, c.rdhup)
            if n == 0:
                c.peer_eof = True
                break
            if n == -1:
                err = errno
                break
            if n < 0:
                break
            n = h2_recv(&c.h2.core, c.inb.data + c.inb.off, _held(&c.inb))
            c.inb.off = c.inb.len = 0  # h2_recv takes everything or fails the session
            self._h2u_events(c)
            if n < 0:
                c.h2.finished = True
        if c.dead:
            return
        s = c.h2.streams
        while s != NULL:
            if s.h2_blocked and h2_pending(&c.h2.core, s.stream_id) < H2_STREAM_HIGH_WATER:
                s.h2_blocked = False
                if s.down != NULL:
                    self._queue_ready(s.down)
            s = s.sib_next
        if c.peer_eof or err != 0 or c.h2.finished or h2_wants(&c.h2.core) == 0:
            self._h2u_flush(c)  # a GOAWAY the session queued goes out if it can
            if not c.dead:
                self._h2u_fail(c, err if err else ECONNRESET)
                self._close_up(c, err != 0)
        elif c.h2.goaway and c.h2.nstreams == 0:
            self._close_up(c, False)

    cdef void _h2u_events(self, Up *c) noexcept nogil:
        """Response events: written into each stream Up's inb as HTTP/1.1; their Downs are queued."""
        cdef h2_core *core = &c.h2.core
        cdef h2_event *e
        cdef Up *s
        cdef Up *last = NULL  # stream Ups are only freed after this walk (events only queue Downs)
        cdef size_t i, k
        cdef unsigned char line[H1_CHUNK_HEADER_MAX]
        for i in range(core.nevents):
            e = &core.events[i]
            if e.kind == H2_EV_GOAWAY:
                c.h2.goaway = True  # streams above its last id come back as REFUSED_STREAM resets
                continue
            if last == NULL or last.stream_id != e.stream_id:
                # A stream's HEADERS, DATA and END_STREAM mostly come together: ask the list only once.
                last = c.h2.streams
                while last != NULL and last.stream_id != e.stream_id:
                    last = last.sib_next
            s = last
            if s == NULL:
                if e.kind == H2_EV_DATA:
                    h2_consume(core, e.stream_id, e.len)
                continue
            if e.kind == H2_EV_HEADERS:
                if e.code & H2_BLOCK_HAS_STATUS:
                    self._h2u_response_head(s, e.off, e.nfields, (e.code & H2_BLOCK_END_STREAM) != 0)
                elif s.h2_resp_chunked and not s.h2_resp_ended:
                    # Trailers (grpc-status...) as the chunked body's trailer section.
                    if (_append(&s.inb, "0\r\n", 3) < 0 or _append_h1_fields(&s.inb, core, e.off, e.nfields) < 0
                            or _append(&s.inb, "\r\n", 2) < 0):
                        s.h2_reset = True  # out of memory: the trailer section is incomplete
                        s.peer_eof = True
                    s.h2_resp_ended = True
            elif e.kind == H2_EV_DATA:
                if s.h2_resp_ended:
                    h2_consume(core, e.stream_id, e.len)
                    continue
                if s.h2_resp_chunked:
                    k = h1_chunk_header(e.len, line)
                    _append(&s.inb, line, k)
                    _append(&s.inb, core.arena + e.off, e.len)
                    _append(&s.inb, "\r\n", 2)
                else:
                    _append(&s.inb, core.arena + e.off, e.len)
                s.h2_owed += e.len
            elif e.kind == H2_EV_END_STREAM:
                if s.h2_resp_chunked and not s.h2_resp_ended:
                    _append(&s.inb, "0\r\n\r\n", 5)
                s.h2_resp_ended = True
            elif e.kind == H2_EV_RESET or e.kind == H2_EV_HEADERS_TOO_LARGE:
                s.h2_reset = True
                s.h2_reset_code = e.code if e.kind == H2_EV_RESET else NGHTTP2_INTERNAL_ERROR
                s.h2_req_done = True
                if not s.h2_resp_ended:
                    s.peer_eof = True  # the exchange machine sees a connection that broke
            if s.down != NULL:
                self._queue_ready(s.down)
        h2_clear_events(core)

    cdef void _h2u_response_head(self, Up *s, size_t off, uint32_t nfields, bint end_stream) noexcept nogil:
        cdef h2_core *core = &s.conn.h2.core
        cdef size_t cursor = off, namelen, valuelen
        cdef const uint8_t *name
        cdef const uint8_t *value
        cdef uint32_t i
        cdef unsigned status = 0
        cdef bint has_length = False
        cdef char line[64]
        cdef int n
        cdef bint failed
        for i in range(nfields):
            h2_field_next(core, &cursor, &name, &namelen, &value, &valuelen)
            if _is_name(name, namelen, ":status") and valuelen == 3:
                status = (value[0] - 48) * 100 + (value[1] - 48) * 10 + (value[2] - 48)
            elif _is_name(name, namelen, "content-length"):
                has_length = True
        if not 100 <= status <= 599:
            s.h2_reset = True
            s.peer_eof = True
            return
        n = snprintf(line, sizeof(line), "HTTP/1.1 %u %s\r\n", status, _reason(<uint16_t>status))
        failed = _append(&s.inb, line, n) < 0 or _append_h1_fields(&s.inb, core, off, nfields) < 0
        if status >= 200:
            s.h2_head_ended = end_stream
            if end_stream:
                if not has_length and status != 204 and status != 304:
                    failed = failed or _append(&s.inb, "content-length: 0\r\n", 19) < 0
                s.h2_resp_ended = True
            elif not has_length:
                failed = failed or _append(&s.inb, "transfer-encoding: chunked\r\n", 28) < 0
                s.h2_resp_chunked = True
        if failed or _append(&s.inb, "\r\n", 2) < 0:
            s.h2_reset = True
            s.peer_eof = True

    cdef void _h2u_credit(self, Up *s) noexcept nogil:
        cdef size_t held = _held(&s.inb)
        cdef uint64_t release
        if s.h2_owed == 0 or s.conn == NULL:
            return
        release = s.h2_owed if held == 0 else (s.h2_owed - held if s.h2_owed > held else 0)
        if release:
            h2_consume(&s.conn.h2.core, s.stream_id, release)
            s.h2_owed -= release
            self._h2u_flush(s.conn)

    cdef void _h2u_fail(self, Up *c, int err) noexcept nogil:
        """The connection is gone (or never came up): every stream on it fails."""
        cdef Up *s
        cdef Down *d
        cdef bint connecting = c.state == U_CONNECTING
        c.h2.finished = True
        while c.h2.streams != NULL:
            s = c.h2.streams
            c.h2.streams = s.sib_next
            s.sib_next = s.sib_prev = NULL
            s.conn = NULL
            s.h2_reset = True
            d = s.down
            if connecting and d != NULL:
                # Never connected: a connect failure Python may retry elsewhere, as for HTTP/1.1.
                s.down = NULL
                d.up = NULL
                self._h2u_stream_closed(s)
                self._attempt_failed(d, err, FLAG_UF)
            else:
                if not s.h2_resp_ended:
                    s.peer_eof = True
                if d != NULL:
                    self._queue_ready(d)
        c.h2.nstreams = 0

    cdef void _h2u_stream_closed(self, Up *s) noexcept nogil:
        """A stream Up is done with: reset the stream unless both sides ended; credit what it held."""
        cdef Up *c = s.conn
        if s.dead:
            return
        if c != NULL and not c.dead and c.h2 != NULL:
            if s.sib_prev != NULL:
                s.sib_prev.sib_next = s.sib_next
            else:
                c.h2.streams = s.sib_next
            if s.sib_next != NULL:
                s.sib_next.sib_prev = s.sib_prev
            c.h2.nstreams -= 1
            if s.stream_id > 0 and not c.h2.finished:
                if not s.h2_reset and not (s.h2_resp_ended and s.h2_req_done):
                    # The client went away or the exchange was cut short: the server stops working on it.
                    h2_reset(&c.h2.core, s.stream_id, NGHTTP2_CANCEL)
                if s.h2_owed:
                    h2_consume(&c.h2.core, s.stream_id, s.h2_owed)
            if c.h2.nstreams == 0:
                c.since_ns = self.now_ns  # idle from now on
            self._h2u_flush(c)
        s.conn = NULL
        s.h2_owed = 0
        if s.down != NULL:
            s.down.up = NULL
            s.down = NULL
        _free_buf(&s.inb)
        _free_buf(&s.outb)
        s.dead = True
        s.grave_next = self.up_graves
        self.up_graves = s
