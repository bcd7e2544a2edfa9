# cython: language_level=3
"""Sans-IO HTTP/1.1 codec: request and response heads, body framing, forwarded-head serializer.

The C API (declared and documented in _h1.pxd) is what the engine thread uses: no GIL, no allocation,
spans into the caller's buffer. H1RequestParser / H1ResponseParser wrap it for tests and slow paths and
speak the events of nodeproxy.proxy.http_events.

Strict by default. A request is rejected (status, then the `error` string reported) for:
  400 bare LF as a line terminator                "bare LF"
  400 bare CR anywhere in the head                "bare CR"
  400 more than 4 empty lines before the request line
  400 method not a token, or not followed by exactly one SP      "invalid method"
  400 request-target with a character outside VCHAR, or '#', or not matching its form
  400 HTTP-version not "HTTP/" DIGIT "." DIGIT; 505 a version other than 1.0 and 1.1
  400 whitespace after the start line or before a field line (obs-fold, RFC 9112 §5.2)
  400 field name not a token; whitespace between field name and colon (RFC 9112 §5.1)
  400 NUL, CR, LF or another control character (but HTAB) in a field value (RFC 9110 §5.5)
  400 Content-Length not a list of identical 1*DIGIT values below 2^63 (RFC 9110 §8.6)
  400 Content-Length with Transfer-Encoding; Transfer-Encoding in HTTP/1.0 (RFC 9112 §6.1, §6.3)
  400 Transfer-Encoding whose final coding is not chunked, chunked applied twice or with parameters
  501 Transfer-Encoding with an unknown coding, or a coding other than chunked (the proxy relays only
      chunked; RFC 9112 §6.1)
  400 missing Host in HTTP/1.1, more than one Host, Host with characters no authority has
  431 head longer than max_head_bytes, more than max_fields field lines
  400 (body) chunk size not exactly 1*HEXDIG, over 2^63-1, chunk extension off its grammar, chunk line
      over H1_MAX_CHUNK_LINE, chunk data not followed by CRLF, bad trailer field, trailer section too big
A response breaking any of these is error 502. Lenient only where an RFC asks for it or it is harmless:
empty list elements (RFC 9110 §5.6.1.2), BWS around ';' and '=' in chunk extensions (RFC 9112 §7.1.1),
up to 4 empty lines before a request line (§2.2), leading zeros in sizes, and a status line without the
SP before an empty reason phrase.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy, memset

from nodeproxy.proxy.http_events import (
    ConnectionClosed,
    DataReceived,
    MessageEnded,
    ProtocolErrored,
    RequestReceived,
    ResponseReceived,
    TrailersReceived,
)

# For Python: the limits' defaults and the enums of _h1.pxd.
DEFAULT_MAX_HEAD_BYTES = H1_DEFAULT_MAX_HEAD_BYTES
DEFAULT_MAX_FIELDS = H1_DEFAULT_MAX_FIELDS
FIELDS_CAP = H1_FIELDS_CAP
MAX_CHUNK_LINE = H1_MAX_CHUNK_LINE
SERIALIZE_SLACK = H1_SERIALIZE_SLACK
FRAMING_AS_PARSED = H1_FRAMING_AS_PARSED
FRAMING_NONE = H1_FRAMING_NONE
FRAMING_CHUNKED = H1_FRAMING_CHUNKED
FRAMING_LENGTH = H1_FRAMING_LENGTH

# Character classes, one bit each in CHAR_CLASS.
cdef enum:
    C_TCHAR = 1    # token (RFC 9110 §5.6.2)
    C_VALUE = 2    # field-vchar, SP, HTAB, obs-text: what a field value or reason phrase may hold
    C_TARGET = 4   # VCHAR but '#': what a request-target may hold (checked per form on top)
    C_HOST = 8     # reg-name / IP-literal / port characters: unreserved, sub-delims, '%', ':', '[', ']'
    C_QDTEXT = 16  # qdtext of a quoted-string

cdef enum:
    PF_START_DONE = 1    # the start line has been parsed
    PF_TE_OTHER = 2      # a known transfer coding other than chunked was seen
    PF_CONN_OTHER = 4    # Connection lists an option other than keep-alive and upgrade
    PF_NONE_NAMED = 8    # the head is complete and Connection names no field the serializer must check
    MAX_LEADING_EMPTY_LINES = 4
    # h1_body_feed looks at most this much per call, so spans fit uint32_t.
    MAX_FEED = 1 << 30

cdef enum:
    B_NONE = 0
    B_LENGTH = 1
    B_UNTIL_CLOSE = 2
    B_SIZE = 3
    B_DATA = 4
    B_DATA_CR = 5
    B_DATA_LF = 6
    B_TRAILERS = 7
    B_DONE = 8
    B_ERROR = 9

cdef unsigned char CHAR_CLASS[256]
cdef unsigned char LOWER[256]
cdef signed char HEX_VALUE[256]


cdef void _init_tables() noexcept:
    cdef int c
    cdef bytes tchar_extra = b"!#$%&'*+-.^_`|~"
    cdef bytes host_extra = b"-._~%!$&'()*+,;=:[]"
    for c in range(256):
        CHAR_CLASS[c] = 0
        LOWER[c] = c + 32 if 65 <= c <= 90 else c
        HEX_VALUE[c] = -1
        alnum = 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122
        if alnum or c in tchar_extra:
            CHAR_CLASS[c] |= C_TCHAR
        if c == 9 or 32 <= c <= 126 or c >= 128:
            CHAR_CLASS[c] |= C_VALUE
        if 33 <= c <= 126 and c != 35:
            CHAR_CLASS[c] |= C_TARGET
        if alnum or c in host_extra:
            CHAR_CLASS[c] |= C_HOST
        if c == 9 or c == 32 or c == 33 or 35 <= c <= 91 or 93 <= c <= 126 or c >= 128:
            CHAR_CLASS[c] |= C_QDTEXT
        if 48 <= c <= 57:
            HEX_VALUE[c] = c - 48
        elif 65 <= c <= 70:
            HEX_VALUE[c] = c - 55
        elif 97 <= c <= 102:
            HEX_VALUE[c] = c - 87


_init_tables()


# ---------------------------------------------------------------------------------------------- helpers

cdef inline int _fail(h1_head *out, uint16_t status, const char *why, size_t off) noexcept nogil:
    out.error_status = status
    out.error = why
    out.error_off = <uint32_t>off
    return -1


cdef inline int _fail_char(h1_head *out, unsigned char c, const char *generic, size_t off) noexcept nogil:
    # Name the two characters behind most smuggling tricks; anything else gets the caller's rule.
    if c == 13:
        return _fail(out, 400, b"bare CR", off)
    if c == 0:
        return _fail(out, 400, b"NUL character", off)
    return _fail(out, 400, generic, off)


cdef inline bint _is_ws(unsigned char c) noexcept nogil:
    return c == 32 or c == 9


cdef inline bint _ieq(const unsigned char *p, const char *lower_literal, size_t n) noexcept nogil:
    # Case-insensitive compare of p[0:n] with a lower-case literal of length n.
    cdef size_t i
    for i in range(n):
        if LOWER[p[i]] != <unsigned char>lower_literal[i]:
            return False
    return True


cdef inline bint _span_ieq(const unsigned char *a, size_t alen, const unsigned char *b,
                           size_t blen) noexcept nogil:
    cdef size_t i
    if alen != blen:
        return False
    for i in range(alen):
        if LOWER[a[i]] != LOWER[b[i]]:
            return False
    return True


cdef inline void _set_span(h1_span *s, size_t off, size_t n) noexcept nogil:
    s.off = <uint32_t>off
    s.len = <uint32_t>n


cdef inline size_t _skip_ws(const unsigned char *buf, size_t i, size_t end) noexcept nogil:
    while i < end and _is_ws(buf[i]):
        i += 1
    return i


cdef inline size_t _skip_token(const unsigned char *buf, size_t i, size_t end) noexcept nogil:
    while i < end and (CHAR_CLASS[buf[i]] & C_TCHAR):
        i += 1
    return i


cdef size_t _skip_quoted(const unsigned char *buf, size_t i, size_t end) noexcept nogil:
    # buf[i] is '"'. Returns the index after the closing quote, or 0 if the quoted-string is malformed
    # (0 can never be a valid end: the string starts at i >= 0 and is at least 2 bytes).
    cdef unsigned char c
    i += 1
    while i < end:
        c = buf[i]
        if c == 34:
            return i + 1
        if c == 92:
            if i + 1 >= end or not (CHAR_CLASS[buf[i + 1]] & C_VALUE):
                return 0
            i += 2
        elif CHAR_CLASS[c] & C_QDTEXT:
            i += 1
        else:
            return 0
    return 0


# ------------------------------------------------------------------------------------------ field lines

cdef inline size_t _skip_plain_words(const unsigned char *buf, size_t i, size_t end) noexcept nogil:
    # Skip 8 bytes at a time while none is a control character (< 0x20 or 0x7F): the common case of a
    # field value, checked without a table lookup per byte. The caller checks the rest byte by byte
    # (HTAB, which is valid, also stops the fast path). Exact: x - 0x20.. & ~x & 0x80.. is non-zero iff
    # some byte of x is below 0x20 (and likewise for a zero byte of x ^ 0x7F..).
    cdef uint64_t w, x
    cdef uint64_t ones = 0x0101010101010101ULL
    cdef uint64_t highs = 0x8080808080808080ULL
    while end - i >= 8:
        memcpy(&w, buf + i, 8)
        x = w ^ (ones * 0x7F)
        if ((w - ones * 0x20) & ~w & highs) | ((x - ones) & ~x & highs):
            break
        i += 8
    return i


cdef int _field_line(const unsigned char *buf, size_t a, size_t b, h1_field *f, h1_head *err,
                     bint first) noexcept nogil:
    # Check one field line buf[a:b] (CRLF excluded, not empty) and set its name/value spans.
    cdef size_t i = a
    cdef size_t vs, ve
    cdef unsigned char c
    if _is_ws(buf[a]):
        if first:
            return _fail(err, 400, b"whitespace between the start line and the first field", a)
        return _fail(err, 400, b"obs-fold (field line starting with whitespace)", a)
    i = _skip_token(buf, a, b)
    if i == b:
        return _fail(err, 400, b"field line without a colon", i)
    c = buf[i]
    if c != 58:
        if _is_ws(c):
            return _fail(err, 400, b"whitespace between field name and colon", i)
        return _fail_char(err, c, b"invalid character in field name", i)
    if i == a:
        return _fail(err, 400, b"empty field name", i)
    _set_span(&f.name, a, i - a)
    vs = _skip_ws(buf, i + 1, b)
    ve = b
    while ve > vs and _is_ws(buf[ve - 1]):
        ve -= 1
    i = _skip_plain_words(buf, vs, ve)
    while i < ve:
        c = buf[i]
        if not (CHAR_CLASS[c] & C_VALUE):
            return _fail_char(err, c, b"control character in field value", i)
        i += 1
    _set_span(&f.value, vs, ve - vs)
    return 0


cdef int _content_length(const unsigned char *buf, size_t i, size_t end, h1_head *out) noexcept nogil:
    # Content-Length = 1#DIGIT+; a list of identical values is one value (RFC 9110 §8.6).
    cdef int64_t value
    cdef size_t start
    cdef int d
    while True:
        i = _skip_ws(buf, i, end)
        start = i
        value = 0
        while i < end and 48 <= buf[i] <= 57:
            d = buf[i] - 48
            if value > (INT64_MAX - d) // 10:
                return _fail(out, 400, b"content-length overflows", i)
            value = value * 10 + d
            i += 1
        if i == start:
            return _fail(out, 400, b"invalid content-length", i)
        if out.content_length >= 0 and value != out.content_length:
            return _fail(out, 400, b"differing content-length values", start)
        out.content_length = value
        i = _skip_ws(buf, i, end)
        if i == end:
            return 0
        if buf[i] != 44:
            return _fail(out, 400, b"invalid content-length", i)
        i += 1


cdef int _transfer_encoding(const unsigned char *buf, size_t i, size_t end, h1_head *out) noexcept nogil:
    # transfer-coding list (RFC 9112 §7); several fields concatenate. chunked must come last, once.
    cdef size_t start, n, j
    cdef bint is_chunked, known
    out.has_transfer_encoding = True
    while True:
        while i < end and (_is_ws(buf[i]) or buf[i] == 44):
            i += 1
        if i == end:
            return 0
        start = i
        i = _skip_token(buf, i, end)
        n = i - start
        if n == 0:
            return _fail(out, 400, b"invalid transfer-encoding", i)
        is_chunked = n == 7 and _ieq(buf + start, b"chunked", 7)
        known = is_chunked or (n == 4 and _ieq(buf + start, b"gzip", 4)) \
            or (n == 7 and _ieq(buf + start, b"deflate", 7)) \
            or (n == 8 and _ieq(buf + start, b"compress", 8)) \
            or (n == 6 and _ieq(buf + start, b"x-gzip", 6)) \
            or (n == 10 and _ieq(buf + start, b"x-compress", 10))
        if not known:
            return _fail(out, 501, b"unknown transfer coding", start)
        if out.chunked:
            if is_chunked:
                return _fail(out, 400, b"chunked transfer coding applied twice", start)
            return _fail(out, 400, b"transfer coding after chunked", start)
        # transfer-parameters: *( OWS ";" OWS token "=" ( token / quoted-string ) )
        while True:
            j = _skip_ws(buf, i, end)
            if j == end or buf[j] != 59:
                break
            if is_chunked:
                return _fail(out, 400, b"parameters on the chunked coding", j)
            j = _skip_ws(buf, j + 1, end)
            i = _skip_token(buf, j, end)
            if i == j or i == end or buf[i] != 61:
                return _fail(out, 400, b"invalid transfer-encoding parameter", i)
            j = i + 1
            if j < end and buf[j] == 34:
                i = _skip_quoted(buf, j, end)
                if i == 0:
                    return _fail(out, 400, b"invalid transfer-encoding parameter", j)
            else:
                i = _skip_token(buf, j, end)
                if i == j:
                    return _fail(out, 400, b"invalid transfer-encoding parameter", j)
        i = _skip_ws(buf, i, end)
        if i < end and buf[i] != 44:
            return _fail(out, 400, b"invalid transfer-encoding", i)
        if is_chunked:
            out.chunked = True
        else:
            out.parse_flags |= PF_TE_OTHER


cdef int _connection(const unsigned char *buf, size_t i, size_t end, h1_head *out) noexcept nogil:
    cdef size_t start, n
    while True:
        while i < end and (_is_ws(buf[i]) or buf[i] == 44):
            i += 1
        if i == end:
            return 0
        start = i
        i = _skip_token(buf, i, end)
        n = i - start
        if n == 0:
            return _fail_char(out, buf[i], b"invalid connection option", i)
        if n == 10 and _ieq(buf + start, b"keep-alive", 10):
            out.conn_keep_alive = True
        elif n == 7 and _ieq(buf + start, b"upgrade", 7):
            out.conn_upgrade = True
        else:
            # Any other option may name a field to drop ("close" names the reserved field Close).
            out.parse_flags |= PF_CONN_OTHER
            if n == 5 and _ieq(buf + start, b"close", 5):
                out.conn_close = True
        i = _skip_ws(buf, i, end)
        if i < end and buf[i] != 44:
            return _fail(out, 400, b"invalid connection option", i)


cdef void _te(const unsigned char *buf, size_t i, size_t end, h1_head *out) noexcept nogil:
    # TE: look for the "trailers" member; the field itself is hop-by-hop and never forwarded as is.
    cdef size_t start
    while i < end:
        while i < end and (_is_ws(buf[i]) or buf[i] == 44):
            i += 1
        start = i
        i = _skip_token(buf, i, end)
        if i - start == 8 and _ieq(buf + start, b"trailers", 8):
            out.te_trailers = True
        while i < end and buf[i] != 44:
            i += 1


cdef inline bint _host_chars(const unsigned char *buf, size_t i, size_t end) noexcept nogil:
    while i < end:
        if not (CHAR_CLASS[buf[i]] & C_HOST):
            return False
        i += 1
    return True


cdef int _field_semantics(const unsigned char *buf, const h1_field *f, h1_head *out,
                          bint is_response) noexcept nogil:
    # The fields that decide framing, routing or the connection's fate.
    cdef const unsigned char *name = buf + f.name.off
    cdef uint32_t n = f.name.len
    cdef size_t vs = f.value.off
    cdef size_t ve = vs + f.value.len
    if n == 14 and _ieq(name, b"content-length", 14):
        return _content_length(buf, vs, ve, out)
    if n == 17 and _ieq(name, b"transfer-encoding", 17):
        return _transfer_encoding(buf, vs, ve, out)
    if n == 10 and _ieq(name, b"connection", 10):
        return _connection(buf, vs, ve, out)
    if is_response:
        return 0
    if n == 4 and _ieq(name, b"host", 4):
        if out.has_host:
            return _fail(out, 400, b"duplicate host", f.name.off)
        if not _host_chars(buf, vs, ve):
            return _fail(out, 400, b"invalid host", vs)
        out.has_host = True
        out.host = f.value
    elif n == 7 and _ieq(name, b"upgrade", 7):
        if out.upgrade.len == 0:
            out.upgrade = f.value
    elif n == 6 and _ieq(name, b"expect", 6):
        if ve - vs == 12 and _ieq(buf + vs, b"100-continue", 12):
            out.expect_continue = True
    elif n == 2 and _ieq(name, b"te", 2):
        _te(buf, vs, ve, out)
    return 0


# ------------------------------------------------------------------------------------------ start lines

cdef uint8_t _method_id(const unsigned char *m, size_t n) noexcept nogil:
    # Methods are case-sensitive (RFC 9110 §9.1).
    cdef const char *p = <const char *>m
    if n == 3:
        if p[0] == b'G' and p[1] == b'E' and p[2] == b'T':
            return H1_METHOD_GET
        if p[0] == b'P' and p[1] == b'U' and p[2] == b'T':
            return H1_METHOD_PUT
    elif n == 4:
        if p[0] == b'P' and p[1] == b'O' and p[2] == b'S' and p[3] == b'T':
            return H1_METHOD_POST
        if p[0] == b'H' and p[1] == b'E' and p[2] == b'A' and p[3] == b'D':
            return H1_METHOD_HEAD
    elif n == 5:
        if p[0] == b'P' and p[1] == b'A' and p[2] == b'T' and p[3] == b'C' and p[4] == b'H':
            return H1_METHOD_PATCH
        if p[0] == b'T' and p[1] == b'R' and p[2] == b'A' and p[3] == b'C' and p[4] == b'E':
            return H1_METHOD_TRACE
    elif n == 6:
        if p[0] == b'D' and p[1] == b'E' and p[2] == b'L' and p[3] == b'E' and p[4] == b'T' \
                and p[5] == b'E':
            return H1_METHOD_DELETE
    elif n == 7:
        if p[0] == b'C' and p[1] == b'O' and p[2] == b'N' and p[3] == b'N' and p[4] == b'E' \
                and p[5] == b'C' and p[6] == b'T':
            return H1_METHOD_CONNECT
        if p[0] == b'O' and p[1] == b'P' and p[2] == b'T' and p[3] == b'I' and p[4] == b'O' \
                and p[5] == b'N' and p[6] == b'S':
            return H1_METHOD_OPTIONS
    return H1_METHOD_OTHER


cdef int _version(const unsigned char *buf, size_t i, size_t end, h1_head *out,
                  uint16_t unsupported_status) noexcept nogil:
    # HTTP-version = "HTTP/" DIGIT "." DIGIT, and only 1.0 and 1.1 are spoken here.
    cdef const unsigned char *v = buf + i
    if end - i != 8 or v[0] != 72 or v[1] != 84 or v[2] != 84 or v[3] != 80 or v[4] != 47 \
            or not (48 <= v[5] <= 57) or v[6] != 46 or not (48 <= v[7] <= 57):
        return _fail(out, 400, b"invalid http version", i)
    if v[5] != 49 or v[7] > 49:
        return _fail(out, unsupported_status, b"http version not supported", i)
    out.version_minor = v[7] - 48
    return 0


cdef int _path_query(const unsigned char *buf, size_t i, size_t end, h1_head *out) noexcept nogil:
    # Split buf[i:end] (path-abempty [ "?" query ]) into out.path and out.query.
    cdef const unsigned char *q = <const unsigned char *>memchr(buf + i, 63, end - i)
    cdef size_t qi
    if q == NULL:
        _set_span(&out.path, i, end - i)
        _set_span(&out.query, end, 0)
    else:
        qi = q - buf
        _set_span(&out.path, i, qi - i)
        _set_span(&out.query, qi + 1, end - qi - 1)
    return 0


cdef int _authority_form(const unsigned char *buf, size_t a, size_t end, h1_head *out) noexcept nogil:
    # host ":" port, as CONNECT needs (RFC 9112 §3.2.3).
    cdef size_t i = end
    while i > a and 48 <= buf[i - 1] <= 57:
        i -= 1
    if i == end or i <= a + 1 or buf[i - 1] != 58 or not _host_chars(buf, a, i - 1):
        return _fail(out, 400, b"invalid authority-form request-target", a)
    out.target_form = H1_TARGET_AUTHORITY
    _set_span(&out.authority, a, end - a)
    _set_span(&out.path, a, 0)
    _set_span(&out.query, end, 0)
    return 0


cdef int _absolute_form(const unsigned char *buf, size_t a, size_t end, h1_head *out) noexcept nogil:
    # "http" / "https" "://" authority path-abempty [ "?" query ] (RFC 9112 §3.2.2); no userinfo.
    cdef size_t i = a
    cdef size_t auth
    if end - a >= 7 and _ieq(buf + a, b"http://", 7):
        auth = a + 7
    elif end - a >= 8 and _ieq(buf + a, b"https://", 8):
        auth = a + 8
    else:
        return _fail(out, 400, b"invalid request-target", a)
    i = auth
    while i < end and buf[i] != 47 and buf[i] != 63:
        i += 1
    if i == auth or not _host_chars(buf, auth, i):
        return _fail(out, 400, b"invalid authority in absolute-form request-target", auth)
    out.target_form = H1_TARGET_ABSOLUTE
    _set_span(&out.authority, auth, i - auth)
    return _path_query(buf, i, end, out)


cdef int _request_line(const unsigned char *buf, size_t a, size_t b, h1_head *out) noexcept nogil:
    cdef size_t i = _skip_token(buf, a, b)
    cdef size_t t
    if i == a or i == b or buf[i] != 32:
        if i == b:
            return _fail(out, 400, b"invalid method", i)
        return _fail_char(out, buf[i], b"invalid method", i)
    _set_span(&out.method, a, i - a)
    out.method_id = _method_id(buf + a, i - a)
    t = i + 1
    i = t
    while i < b and (CHAR_CLASS[buf[i]] & C_TARGET):
        i += 1
    if i == t or i == b or buf[i] != 32:
        if i == b:
            return _fail(out, 400, b"invalid request-target", i)
        return _fail_char(out, buf[i], b"invalid request-target", i)
    _set_span(&out.target, t, i - t)
    if _version(buf, i + 1, b, out, 505) < 0:
        return -1
    if out.method_id == H1_METHOD_CONNECT:
        return _authority_form(buf, t, i, out)
    if buf[t] == 47:
        out.target_form = H1_TARGET_ORIGIN
        return _path_query(buf, t, i, out)
    if i - t == 1 and buf[t] == 42:
        if out.method_id != H1_METHOD_OPTIONS:
            return _fail(out, 400, b"asterisk-form request-target without OPTIONS", t)
        out.target_form = H1_TARGET_ASTERISK
        _set_span(&out.path, t, 1)
        _set_span(&out.query, i, 0)
        return 0
    return _absolute_form(buf, t, i, out)


cdef int _status_line(const unsigned char *buf, size_t a, size_t b, h1_head *out) noexcept nogil:
    # HTTP-version SP 3DIGIT SP reason-phrase (RFC 9112 §4); "HTTP/1.1 200" without SP is accepted.
    cdef size_t i
    if b - a < 12 or buf[a + 8] != 32:
        return _fail(out, 400, b"invalid status line", a)
    if _version(buf, a, a + 8, out, 502) < 0:
        return -1
    for i in range(a + 9, a + 12):
        if not (48 <= buf[i] <= 57):
            return _fail(out, 400, b"invalid status code", i)
    out.status = (buf[a + 9] - 48) * 100 + (buf[a + 10] - 48) * 10 + (buf[a + 11] - 48)
    if out.status < 100 or out.status > 599:
        return _fail(out, 400, b"invalid status code", a + 9)
    if b == a + 12:
        _set_span(&out.reason, b, 0)
        return 0
    if buf[a + 12] != 32:
        return _fail(out, 400, b"invalid status line", a + 12)
    for i in range(a + 13, b):
        if not (CHAR_CLASS[buf[i]] & C_VALUE):
            return _fail_char(out, buf[i], b"control character in reason phrase", i)
    _set_span(&out.reason, a + 13, b - a - 13)
    return 0


# ------------------------------------------------------------------------------------------------ heads

cdef void h1_limits_default(h1_limits *lim) noexcept nogil:
    lim.max_head_bytes = H1_DEFAULT_MAX_HEAD_BYTES
    lim.max_fields = H1_DEFAULT_MAX_FIELDS


cdef void h1_head_init(h1_head *head) noexcept nogil:
    # Scalars only: fields[] entries are written before nfields counts them.
    head.scanned = 0
    head.parse_flags = 0
    head.method.off = head.method.len = 0
    head.method_id = H1_METHOD_OTHER
    head.target.off = head.target.len = 0
    head.target_form = H1_TARGET_ORIGIN
    head.path.off = head.path.len = 0
    head.query.off = head.query.len = 0
    head.authority.off = head.authority.len = 0
    head.status = 0
    head.reason.off = head.reason.len = 0
    head.version_minor = 1
    head.head_len = 0
    head.nfields = 0
    head.content_length = -1
    head.chunked = False
    head.has_transfer_encoding = False
    head.conn_close = False
    head.conn_keep_alive = False
    head.conn_upgrade = False
    head.upgrade.off = head.upgrade.len = 0
    head.host.off = head.host.len = 0
    head.has_host = False
    head.expect_continue = False
    head.te_trailers = False
    head.error_status = 0
    head.error = NULL
    head.error_off = 0


cdef int _finish_head(h1_head *out, bint is_response) noexcept nogil:
    # Rules over the whole head (RFC 9112 §6.1, §6.3; RFC 9110 §7.2).
    if not (out.parse_flags & PF_CONN_OTHER):
        out.parse_flags |= PF_NONE_NAMED  # Keep-Alive and Upgrade are dropped or kept by rule anyway
    if out.has_transfer_encoding:
        if out.content_length >= 0:
            return _fail(out, 400, b"content-length with transfer-encoding", 0)
        if out.version_minor == 0:
            return _fail(out, 400, b"transfer-encoding in an http/1.0 message", 0)
        if not out.chunked:
            return _fail(out, 400, b"transfer-encoding whose final coding is not chunked", 0)
        if out.parse_flags & PF_TE_OTHER:
            return _fail(out, 501, b"transfer coding other than chunked", 0)
    if is_response:
        return 1
    if not out.has_host and out.version_minor == 1:
        return _fail(out, 400, b"missing host", 0)
    if out.target_form == H1_TARGET_ORIGIN or out.target_form == H1_TARGET_ASTERISK:
        out.authority = out.host
    if out.version_minor == 0:
        out.expect_continue = False
    return 1


cdef inline int _need_more(size_t len, uint32_t max_head, h1_head *out) noexcept nogil:
    if len >= max_head:
        return _fail(out, 431, b"head larger than the limit", max_head)
    return 0


cdef int _parse_head(const unsigned char *buf, size_t len, const h1_limits *lim, h1_head *out,
                     bint is_response) noexcept nogil:
    # Line by line: each complete line is checked once and never looked at again; only the memchr over
    # the incomplete last line repeats when bytes trickle in. out.scanned is where that line starts.
    cdef uint32_t max_head = lim.max_head_bytes
    cdef uint32_t max_fields = lim.max_fields if lim.max_fields < H1_FIELDS_CAP else H1_FIELDS_CAP
    cdef size_t limit = len if len < max_head else max_head
    cdef size_t pos = out.scanned
    cdef size_t p
    cdef int empty_lines = 0
    cdef const unsigned char *lf
    cdef h1_field *f
    if out.error_status:
        return -1
    if out.head_len:
        return 1
    if not (out.parse_flags & PF_START_DONE):
        pos = 0
        if not is_response:
            while pos + 1 < limit and buf[pos] == 13 and buf[pos + 1] == 10:
                pos += 2
                empty_lines += 1
                if empty_lines > MAX_LEADING_EMPTY_LINES:
                    return _fail(out, 400, b"too many empty lines before the request line", pos)
        lf = <const unsigned char *>memchr(buf + pos, 10, limit - pos) if limit > pos else NULL
        if lf == NULL:
            return _need_more(len, max_head, out)
        p = lf - buf
        if p == pos or buf[p - 1] != 13:
            return _fail(out, 400, b"bare LF", p)
        if is_response:
            if _status_line(buf, pos, p - 1, out) < 0:
                return -1
        elif _request_line(buf, pos, p - 1, out) < 0:
            return -1
        out.parse_flags |= PF_START_DONE
        pos = p + 1
        out.scanned = <uint32_t>pos
    while True:
        lf = <const unsigned char *>memchr(buf + pos, 10, limit - pos) if limit > pos else NULL
        if lf == NULL:
            out.scanned = <uint32_t>pos
            return _need_more(len, max_head, out)
        p = lf - buf
        if p == pos or buf[p - 1] != 13:
            return _fail(out, 400, b"bare LF", p)
        if p - 1 == pos:
            out.scanned = <uint32_t>(p + 1)
            out.head_len = <uint32_t>(p + 1)
            return _finish_head(out, is_response)
        if out.nfields >= max_fields:
            return _fail(out, 431, b"too many header fields", pos)
        f = &out.fields[out.nfields]
        if _field_line(buf, pos, p - 1, f, out, out.nfields == 0) < 0:
            return -1
        out.nfields += 1
        if _field_semantics(buf, f, out, is_response) < 0:
            return -1
        pos = p + 1


cdef int h1_parse_request(const unsigned char *buf, size_t len, const h1_limits *lim,
                          h1_head *out) noexcept nogil:
    return _parse_head(buf, len, lim, out, False)


cdef int h1_parse_response(const unsigned char *buf, size_t len, const h1_limits *lim,
                           h1_head *out) noexcept nogil:
    cdef int r = _parse_head(buf, len, lim, out, True)
    if r < 0:
        out.error_status = 502
    return r


cdef int h1_parse_trailers(const unsigned char *buf, size_t len, const h1_limits *lim,
                           h1_head *out) noexcept nogil:
    cdef uint32_t max_fields = lim.max_fields if lim.max_fields < H1_FIELDS_CAP else H1_FIELDS_CAP
    cdef size_t pos = 0
    cdef size_t p
    cdef const unsigned char *lf
    h1_head_init(out)
    while pos < len:
        lf = <const unsigned char *>memchr(buf + pos, 10, len - pos)
        if lf == NULL:
            return _fail(out, 400, b"trailer field line without CRLF", len)
        p = lf - buf
        if p == pos or buf[p - 1] != 13:
            return _fail(out, 400, b"bare LF", p)
        if p - 1 == pos:
            return _fail(out, 400, b"empty line inside the trailer section", pos)
        if out.nfields >= max_fields:
            return _fail(out, 400, b"too many trailer fields", pos)
        if _field_line(buf, pos, p - 1, &out.fields[out.nfields], out, False) < 0:
            return -1
        out.nfields += 1
        pos = p + 1
    return 1


cdef int h1_sniff_request(const unsigned char *buf, size_t len) noexcept nogil:
    # Enough to tell an HTTP/1 client from TLS, SSH, the HTTP/2 preface or a binary protocol.
    cdef size_t start = 0
    cdef size_t i, target_start, k
    cdef const char *version = b"HTTP/1."
    cdef int empty_lines = 0
    while start < len and buf[start] == 13:  # the empty lines h1_parse_request skips
        if start + 1 == len:
            return 0
        if buf[start + 1] != 10 or empty_lines == MAX_LEADING_EMPTY_LINES:
            return -1
        start += 2
        empty_lines += 1
    i = _skip_token(buf, start, len)
    if i == len:
        return 0 if i - start <= 24 else -1
    if i == start or i - start > 24 or buf[i] != 32:
        return -1
    i += 1
    target_start = i
    while i < len and (CHAR_CLASS[buf[i]] & C_TARGET):
        i += 1
        if i - target_start > 8192:
            return 1  # a long URL: nothing else looks like this
    if i == len:
        return 0
    if i == target_start or buf[i] != 32:
        return -1
    i += 1
    for k in range(7):
        if i + k >= len:
            return 0
        if buf[i + k] != <unsigned char>version[k]:
            return -1
    return 1


cdef bint h1_should_keep_alive(const h1_head *head) noexcept nogil:
    if head.conn_close:
        return False
    return head.version_minor >= 1 or head.conn_keep_alive


# ------------------------------------------------------------------------------------------------ bodies

cdef void _body_init(h1_body *body, bint is_response) noexcept nogil:
    body.kind = H1_BODY_NONE
    body.state = B_DONE
    body.ended = True
    body.remaining = 0
    body.total = 0
    body.max_trailer_bytes = H1_DEFAULT_MAX_HEAD_BYTES
    body.max_trailer_fields = H1_DEFAULT_MAX_FIELDS
    body.error_status = 0
    body.error = NULL
    body.is_response = is_response
    body.scan = 0
    body.count = 0


cdef void _body_framed(h1_body *body, const h1_head *head) noexcept nogil:
    if head.chunked:
        body.kind = H1_BODY_CHUNKED
        body.state = B_SIZE
        body.ended = False
    elif head.content_length > 0:
        body.kind = H1_BODY_LENGTH
        body.state = B_LENGTH
        body.remaining = <uint64_t>head.content_length
        body.ended = False
    elif head.content_length == 0:
        body.kind = H1_BODY_LENGTH


cdef void h1_body_for_request(h1_body *body, const h1_head *head) noexcept nogil:
    _body_init(body, False)
    _body_framed(body, head)


cdef void h1_body_for_response(h1_body *body, const h1_head *head, bint request_was_head,
                               int request_method_connect) noexcept nogil:
    _body_init(body, True)
    if request_was_head or head.status < 200 or head.status == 204 or head.status == 304:
        return
    if request_method_connect and head.status < 300:
        return
    if head.chunked or head.content_length >= 0:
        _body_framed(body, head)
        return
    body.kind = H1_BODY_UNTIL_CLOSE
    body.state = B_UNTIL_CLOSE
    body.ended = False


cdef inline ssize_t _body_fail(h1_body *body, const char *why) noexcept nogil:
    body.state = B_ERROR
    body.error = why
    body.error_status = 502 if body.is_response else 400
    return -1


cdef ssize_t _chunk_size_line(h1_body *body, const unsigned char *p, size_t n,
                              uint64_t *size) noexcept nogil:
    # chunk-size [ chunk-ext ] CRLF, whole (RFC 9112 §7.1, §7.1.1). Returns its length, 0 if incomplete.
    cdef size_t lim = n if n < H1_MAX_CHUNK_LINE else H1_MAX_CHUNK_LINE
    cdef const unsigned char *lf = <const unsigned char *>memchr(p, 10, lim)
    cdef size_t q, e, i, j, digits_end
    cdef uint64_t value = 0
    cdef signed char d
    if lf == NULL:
        if n >= H1_MAX_CHUNK_LINE:
            return _body_fail(body, b"chunk-size line too long")
        return 0
    q = lf - p
    if q == 0 or p[q - 1] != 13:
        return _body_fail(body, b"bare LF in chunk-size line")
    e = q - 1
    i = 0
    while i < e:
        d = HEX_VALUE[p[i]]
        if d < 0:
            break
        if value > (<uint64_t>INT64_MAX >> 4):
            return _body_fail(body, b"chunk size overflows")
        value = (value << 4) | <uint64_t>d
        i += 1
    if i == 0:
        return _body_fail(body, b"invalid chunk size")
    # chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ), ext-val = token / quoted-string
    digits_end = i
    while i < e:
        j = _skip_ws(p, i, e)
        if j == e or p[j] != 59:
            if j == e:
                return _body_fail(body, b"whitespace at the end of the chunk-size line")
            if p[j] == 13:
                return _body_fail(body, b"bare CR in chunk-size line")
            if j == digits_end:
                return _body_fail(body, b"invalid chunk size")
            return _body_fail(body, b"invalid chunk extension")
        j = _skip_ws(p, j + 1, e)
        i = _skip_token(p, j, e)
        if i == j:
            return _body_fail(body, b"invalid chunk extension")
        j = _skip_ws(p, i, e)
        if j < e and p[j] == 61:
            j = _skip_ws(p, j + 1, e)
            if j < e and p[j] == 34:
                i = _skip_quoted(p, j, e)
                if i == 0:
                    return _body_fail(body, b"invalid chunk extension")
            else:
                i = _skip_token(p, j, e)
                if i == j:
                    return _body_fail(body, b"invalid chunk extension")
    size[0] = value
    return <ssize_t>(q + 1)


cdef ssize_t _trailer_section(h1_body *body, const unsigned char *p, size_t n) noexcept nogil:
    # *( field-line CRLF ) CRLF, whole. body.scan / body.count keep what earlier calls checked (the
    # caller feeds the same unconsumed bytes again with more appended). Returns the section's length.
    cdef size_t lim = n if n < body.max_trailer_bytes else body.max_trailer_bytes
    cdef size_t pos = body.scan
    cdef size_t q
    cdef const unsigned char *lf
    cdef h1_field scratch
    cdef int r
    while True:
        lf = <const unsigned char *>memchr(p + pos, 10, lim - pos) if lim > pos else NULL
        if lf == NULL:
            body.scan = <uint32_t>pos
            if n >= body.max_trailer_bytes:
                return _body_fail(body, b"trailer section larger than the limit")
            return 0
        q = lf - p
        if q == pos or p[q - 1] != 13:
            return _body_fail(body, b"bare LF in trailer section")
        if q - 1 == pos:
            return <ssize_t>(q + 1)
        if body.count >= body.max_trailer_fields:
            return _body_fail(body, b"too many trailer fields")
        r = _trailer_line(body, p, pos, q - 1, &scratch)
        if r < 0:
            return -1
        body.count += 1
        pos = q + 1


cdef int _trailer_line(h1_body *body, const unsigned char *p, size_t a, size_t b,
                       h1_field *scratch) noexcept nogil:
    cdef h1_head err
    if _field_line(p, a, b, scratch, &err, False) < 0:
        _body_fail(body, err.error)
        return -1
    return 0


cdef inline ssize_t _consumed_before_error(size_t i) noexcept nogil:
    # An error behind bytes consumed in the same call is reported by the next call (the state is
    # B_ERROR already), so the payload span before it is not lost.
    return <ssize_t>i if i > 0 else -1


cdef ssize_t h1_body_feed(h1_body *body, const unsigned char *buf, size_t len,
                          h1_chunk *out) noexcept nogil:
    cdef size_t i = 0
    cdef size_t n
    cdef ssize_t r
    cdef uint64_t size
    out.data.off = out.data.len = 0
    out.trailers.off = out.trailers.len = 0
    out.ended = False
    if body.state == B_ERROR:
        return -1
    if len > MAX_FEED:
        len = MAX_FEED
    while True:
        if body.state == B_DONE:
            out.ended = True
            return <ssize_t>i
        if body.state == B_LENGTH or body.state == B_DATA:
            if i == len or out.data.len > 0:
                return <ssize_t>i
            n = len - i
            if n > body.remaining:
                n = <size_t>body.remaining
            _set_span(&out.data, i, n)
            i += n
            body.remaining -= n
            body.total += n
            if body.remaining == 0:
                if body.state == B_LENGTH:
                    body.state = B_DONE
                    body.ended = True
                else:
                    body.state = B_DATA_CR
        elif body.state == B_UNTIL_CLOSE:
            if i < len:
                _set_span(&out.data, i, len - i)
                body.total += len - i
            return <ssize_t>len
        elif body.state == B_DATA_CR or body.state == B_DATA_LF:
            if i == len:
                return <ssize_t>i
            if buf[i] != (13 if body.state == B_DATA_CR else 10):
                _body_fail(body, b"chunk data not followed by CRLF")
                return _consumed_before_error(i)
            i += 1
            body.state = B_DATA_LF if body.state == B_DATA_CR else B_SIZE
        elif body.state == B_SIZE:
            r = _chunk_size_line(body, buf + i, len - i, &size)
            if r <= 0:
                return <ssize_t>i if r == 0 else _consumed_before_error(i)
            i += r
            if size == 0:
                body.state = B_TRAILERS
                body.scan = 0
                body.count = 0
            else:
                body.remaining = size
                body.state = B_DATA
        elif body.state == B_TRAILERS:
            r = _trailer_section(body, buf + i, len - i)
            if r <= 0:
                return <ssize_t>i if r == 0 else _consumed_before_error(i)
            if r > 2:
                _set_span(&out.trailers, i, r - 2)
            i += r
            body.state = B_DONE
            body.ended = True
        else:
            return <ssize_t>i


cdef int h1_body_eof(h1_body *body) noexcept nogil:
    if body.ended:
        return 1
    if body.state == B_UNTIL_CLOSE:
        body.state = B_DONE
        body.ended = True
        return 1
    if body.state != B_ERROR:
        _body_fail(body, b"connection closed before the end of the body")
    return -1


# ---------------------------------------------------------------------------------------- serializing

cdef inline bint _put(unsigned char *dst, size_t cap, size_t *pos, const unsigned char *src,
                      size_t n) noexcept nogil:
    if cap - pos[0] < n:
        return False
    memcpy(dst + pos[0], src, n)
    pos[0] += n
    return True


cdef inline bint _put_str(unsigned char *dst, size_t cap, size_t *pos, const char *s,
                          size_t n) noexcept nogil:
    return _put(dst, cap, pos, <const unsigned char *>s, n)


cdef inline bint _put_field(unsigned char *dst, size_t cap, size_t *pos, const unsigned char *name,
                            size_t name_len, const unsigned char *value, size_t value_len) noexcept nogil:
    """Append one `name: value` CRLF line; False when it does not fit."""
    return (_put(dst, cap, pos, name, name_len) and _put_str(dst, cap, pos, b": ", 2)
            and _put(dst, cap, pos, value, value_len) and _put_str(dst, cap, pos, b"\r\n", 2))


cdef bint _put_decimal(unsigned char *dst, size_t cap, size_t *pos, uint64_t value) noexcept nogil:
    cdef unsigned char digits[20]
    cdef int n = 0
    while True:
        digits[19 - n] = 48 + <unsigned char>(value % 10)
        value //= 10
        n += 1
        if value == 0:
            break
    return _put(dst, cap, pos, digits + 20 - n, n)


cdef bint _named_in_connection(const unsigned char *src, const h1_head *head, const unsigned char *name,
                               size_t nlen) noexcept nogil:
    # Is `name` one of the connection options (RFC 9110 §7.6.1)? Connection values passed parsing, so
    # they are comma-separated tokens.
    cdef uint32_t k
    cdef size_t i, end, start
    cdef const h1_field *f
    for k in range(head.nfields):
        f = &head.fields[k]
        if f.name.len != 10 or not _ieq(src + f.name.off, b"connection", 10):
            continue
        i = f.value.off
        end = i + f.value.len
        while i < end:
            while i < end and (_is_ws(src[i]) or src[i] == 44):
                i += 1
            start = i
            i = _skip_token(src, i, end)
            if _span_ieq(src + start, i - start, name, nlen):
                return True
            while i < end and src[i] != 44:
                i += 1
    return False


cdef bint _forwarded(const unsigned char *src, const h1_head *head, const h1_field *f,
                     const h1_serialize_opts *opts) noexcept nogil:
    cdef const unsigned char *name = src + f.name.off
    cdef uint32_t n = f.name.len
    cdef uint32_t k
    cdef bint is_upgrade = n == 7 and _ieq(name, b"upgrade", 7)
    if (n == 10 and (_ieq(name, b"connection", 10) or _ieq(name, b"keep-alive", 10))) \
            or (n == 16 and _ieq(name, b"proxy-connection", 16)) \
            or (n == 2 and _ieq(name, b"te", 2)) \
            or (n == 17 and _ieq(name, b"transfer-encoding", 17)) \
            or (n == 14 and _ieq(name, b"content-length", 14)):
        return False
    if is_upgrade and not opts.upgrading:
        return False
    for k in range(opts.nremove):
        if _span_ieq(name, n, opts.remove[k].name, opts.remove[k].name_len):
            return False
    # A client must not be able to strip Host (or, when upgrading, Upgrade) by naming it in Connection.
    if (n == 4 and _ieq(name, b"host", 4)) or is_upgrade or (head.parse_flags & PF_NONE_NAMED):
        return True
    return not _named_in_connection(src, head, name, n)


cdef bint h1_field_is_valid(const unsigned char *name, size_t name_len, const unsigned char *value,
                            size_t value_len) noexcept nogil:
    cdef size_t i
    if name_len == 0 or name == NULL or (value_len > 0 and value == NULL):
        return False
    if _skip_token(name, 0, name_len) != name_len:
        return False
    if value_len > 0 and (_is_ws(value[0]) or _is_ws(value[value_len - 1])):
        return False
    i = _skip_plain_words(value, 0, value_len)
    while i < value_len:
        if not (CHAR_CLASS[value[i]] & C_VALUE):
            return False
        i += 1
    return True


cdef bint _valid_added_field(const h1_field_ref *ref) noexcept nogil:
    cdef uint32_t i
    if ref.name_len == 0 or ref.name == NULL or (ref.value_len > 0 and ref.value == NULL):
        return False
    for i in range(ref.name_len):
        if not (CHAR_CLASS[ref.name[i]] & C_TCHAR):
            return False
    for i in range(ref.value_len):
        if not (CHAR_CLASS[ref.value[i]] & C_VALUE):
            return False
    return True


cdef ssize_t h1_serialize_head(const unsigned char *src, const h1_head *head, bint is_request,
                               const h1_serialize_opts *opts, unsigned char *dst,
                               size_t cap) noexcept nogil:
    cdef size_t pos = 0
    cdef uint32_t k
    cdef const h1_field *f
    cdef const h1_field_ref *ref
    cdef unsigned char status_digits[3]
    for k in range(opts.nadd):
        if not _valid_added_field(&opts.add[k]):
            return -2
    if opts.framing == H1_FRAMING_LENGTH and opts.content_length < 0:
        return -2
    if is_request:
        if not (_put(dst, cap, &pos, src + head.method.off, head.method.len)
                and _put_str(dst, cap, &pos, b" ", 1)):
            return -1
        if opts.target != NULL:
            if not _put(dst, cap, &pos, opts.target, opts.target_len):
                return -1
        elif not _put(dst, cap, &pos, src + head.target.off, head.target.len):
            return -1
        if not _put_str(dst, cap, &pos, b" HTTP/1.1\r\n", 11):
            return -1
    else:
        status_digits[0] = 48 + head.status // 100
        status_digits[1] = 48 + (head.status // 10) % 10
        status_digits[2] = 48 + head.status % 10
        if not (_put_str(dst, cap, &pos, b"HTTP/1.1 ", 9) and _put(dst, cap, &pos, status_digits, 3)
                and _put_str(dst, cap, &pos, b" ", 1)
                and _put(dst, cap, &pos, src + head.reason.off, head.reason.len)
                and _put_str(dst, cap, &pos, b"\r\n", 2)):
            return -1
    for k in range(head.nfields):
        f = &head.fields[k]
        if not _forwarded(src, head, f, opts):
            continue
        if not _put_field(dst, cap, &pos, src + f.name.off, f.name.len, src + f.value.off, f.value.len):
            return -1
    if opts.framing == H1_FRAMING_CHUNKED or (opts.framing == H1_FRAMING_AS_PARSED and head.chunked):
        if not _put_str(dst, cap, &pos, b"Transfer-Encoding: chunked\r\n", 28):
            return -1
    elif opts.framing == H1_FRAMING_LENGTH or (opts.framing == H1_FRAMING_AS_PARSED
                                               and head.content_length >= 0):
        if not (_put_str(dst, cap, &pos, b"Content-Length: ", 16)
                and _put_decimal(dst, cap, &pos, <uint64_t>(opts.content_length
                                                            if opts.framing == H1_FRAMING_LENGTH
                                                            else head.content_length))
                and _put_str(dst, cap, &pos, b"\r\n", 2)):
            return -1
    if opts.upgrading and opts.conn_close:
        if not _put_str(dst, cap, &pos, b"Connection: upgrade, close\r\n", 28):
            return -1
    elif opts.upgrading:
        if not _put_str(dst, cap, &pos, b"Connection: upgrade\r\n", 21):
            return -1
    elif opts.conn_close:
        if not _put_str(dst, cap, &pos, b"Connection: close\r\n", 19):
            return -1
    if opts.keep_te_trailers and head.te_trailers:
        if not _put_str(dst, cap, &pos, b"TE: trailers\r\n", 14):
            return -1
    for k in range(opts.nadd):
        ref = &opts.add[k]
        if not _put_field(dst, cap, &pos, ref.name, ref.name_len, ref.value, ref.value_len):
            return -1
    if not _put_str(dst, cap, &pos, b"\r\n", 2):
        return -1
    return <ssize_t>pos


cdef size_t h1_chunk_header(uint64_t size, unsigned char *dst) noexcept nogil:
    cdef const char *digits = b"0123456789abcdef"
    cdef int n = 1
    cdef int k
    while n < 16 and (size >> (4 * n)) != 0:
        n += 1
    for k in range(n):
        dst[n - 1 - k] = <unsigned char>digits[(size >> (4 * k)) & 15]
    dst[n] = 13
    dst[n + 1] = 10
    return <size_t>(n + 2)


cdef ssize_t h1_serialize_trailers(const unsigned char *src, const h1_head *trailers,
                                   const h1_serialize_opts *opts, unsigned char *dst,
                                   size_t cap) noexcept nogil:
    cdef size_t pos = 0
    cdef uint32_t k
    cdef const h1_field *f
    cdef const h1_field_ref *ref
    cdef h1_serialize_opts filter_opts
    for k in range(opts.nadd):
        if not _valid_added_field(&opts.add[k]):
            return -2
    # The same filter as for heads, never keeping Upgrade (it has no meaning in a trailer section).
    filter_opts = opts[0]
    filter_opts.upgrading = False
    if not _put_str(dst, cap, &pos, b"0\r\n", 3):
        return -1
    if trailers != NULL:
        for k in range(trailers.nfields):
            f = &trailers.fields[k]
            if not _forwarded(src, trailers, f, &filter_opts):
                continue
            if not _put_field(dst, cap, &pos, src + f.name.off, f.name.len, src + f.value.off, f.value.len):
                return -1
    for k in range(opts.nadd):
        ref = &opts.add[k]
        if not _put_field(dst, cap, &pos, ref.name, ref.name_len, ref.value, ref.value_len):
            return -1
    if not _put_str(dst, cap, &pos, b"\r\n", 2):
        return -1
    return <ssize_t>pos


# ------------------------------------------------------------------------------------------- Python API

cdef enum:
    S_HEAD = 0     # waiting for a head
    S_BODY = 1     # inside a body
    S_PAUSED = 2   # after CONNECT / an upgrade: the bytes that follow are not HTTP/1 (until resume())
    S_CLOSED = 3   # the connection is done (Connection: close, EOF); later bytes are ignored
    S_ERRORED = 4  # a protocol error was reported; later bytes are ignored


cdef tuple _fields(const unsigned char *base, const h1_head *head):
    cdef uint32_t k
    return tuple([
        (
            base[head.fields[k].name.off:head.fields[k].name.off + head.fields[k].name.len].lower(),
            base[head.fields[k].value.off:head.fields[k].value.off + head.fields[k].value.len],
        )
        for k in range(head.nfields)
    ])


cdef inline bytes _span_bytes(const unsigned char *base, h1_span s):
    return base[s.off:s.off + s.len]


cdef class _H1Parser:
    """Shared part of the request and response parsers: buffering, body framing, trailers."""

    cdef h1_limits _limits
    cdef h1_head _head
    cdef h1_head _trailers
    cdef h1_body _body
    cdef bytearray _buf
    cdef Py_ssize_t _pos
    cdef int _state
    cdef int _stream_id  # stream id of the message being parsed (or the last one)
    cdef bint _keep_alive
    cdef bint _tunnel_after

    def __init__(self, max_head_bytes: int = H1_DEFAULT_MAX_HEAD_BYTES,
                 max_fields: int = H1_DEFAULT_MAX_FIELDS) -> None:
        if not 0 < max_head_bytes <= 0x7FFFFFFF:
            raise ValueError(f"max_head_bytes must be in 1..2^31-1, not {max_head_bytes}")
        if not 0 < max_fields <= H1_FIELDS_CAP:
            raise ValueError(f"max_fields must be in 1..{H1_FIELDS_CAP}, not {max_fields}")
        self._limits.max_head_bytes = max_head_bytes
        self._limits.max_fields = max_fields
        h1_head_init(&self._head)
        self._buf = bytearray()
        self._pos = 0
        self._state = S_HEAD
        self._stream_id = 0
        self._keep_alive = True
        self._tunnel_after = False

    @property
    def should_keep_alive(self) -> bool:
        """May another message follow the last one on this connection (RFC 9112 §9.3)?"""
        return self._keep_alive and self._state not in (S_CLOSED, S_ERRORED)

    @property
    def paused(self) -> bool:
        """After CONNECT or an upgrade: the bytes that follow are the tunnel's (see trailing_data())."""
        return self._state == S_PAUSED

    @property
    def stream_id(self) -> int:
        return self._stream_id

    def trailing_data(self) -> bytes:
        """Take the buffered bytes not parsed as HTTP (after a pause: the tunnel's first bytes)."""
        data = bytes(self._buf[self._pos:])
        del self._buf[:]
        self._pos = 0
        return data

    def feed(self, data: bytes) -> list:
        """Parse more bytes; returns the events they complete."""
        cdef list events = []
        if self._state in (S_CLOSED, S_ERRORED):
            return events
        self._buf += data
        if self._state != S_PAUSED:
            self._run(events)
        return events

    def resume(self) -> list:
        """Leave the pause (the upgrade was refused): parse what was buffered as HTTP/1 again."""
        cdef list events = []
        if self._state == S_PAUSED:
            self._state = S_HEAD if self._keep_alive else S_CLOSED
            h1_head_init(&self._head)
            if self._state == S_HEAD:
                self._run(events)
        return events

    cdef void _run(self, list events) except *:
        cdef const unsigned char *base
        cdef size_t avail
        while self._state == S_HEAD or self._state == S_BODY:
            base = <const unsigned char *>PyByteArray_AS_STRING(self._buf) + self._pos
            avail = <size_t>(PyByteArray_GET_SIZE(self._buf) - self._pos)
            if self._state == S_HEAD:
                if avail == 0 or not self._head_step(base, avail, events):
                    break
            elif not self._body_step(base, avail, events):
                break
        if self._pos > 0:
            del self._buf[:self._pos]
            self._pos = 0

    cdef bint _head_step(self, const unsigned char *base, size_t avail, list events) except *:
        raise NotImplementedError

    cdef void _limit_trailers(self) noexcept:
        # Trailers obey the same limits as the head, so h1_parse_trailers takes whatever framing took.
        self._body.max_trailer_bytes = self._limits.max_head_bytes
        self._body.max_trailer_fields = self._limits.max_fields

    cdef bint _body_step(self, const unsigned char *base, size_t avail, list events) except *:
        cdef h1_chunk chunk
        cdef ssize_t r = h1_body_feed(&self._body, base, avail, &chunk)
        if r < 0:
            self._error(events, self._body.error_status, self._body.error, self._stream_id)
            return False
        if chunk.data.len:
            events.append(DataReceived(self._stream_id, _span_bytes(base, chunk.data)))
        if chunk.trailers.len:
            if h1_parse_trailers(base + chunk.trailers.off, chunk.trailers.len, &self._limits,
                                 &self._trailers) < 0:
                self._error(events, self._body.error_status or 400, self._trailers.error, self._stream_id)
                return False
            events.append(TrailersReceived(self._stream_id,
                                           _fields(base + chunk.trailers.off, &self._trailers)))
        self._pos += r
        if chunk.ended:
            self._message_ended(events)
            return self._state == S_HEAD
        return r > 0

    cdef void _message_ended(self, list events) except *:
        events.append(MessageEnded(self._stream_id))
        h1_head_init(&self._head)
        if self._tunnel_after:
            self._state = S_PAUSED
        elif self._keep_alive:
            self._state = S_HEAD
        else:
            self._state = S_CLOSED
            events.append(ConnectionClosed(last_stream_id=self._stream_id))

    cdef void _error(self, list events, int status, const char *why, int stream_id) except *:
        self._state = S_ERRORED
        self._keep_alive = False
        events.append(ProtocolErrored(status, why.decode("ascii") if why != NULL else "protocol error",
                                      stream_id))

    def feed_eof(self) -> list:
        """The peer closed its side: end an until-close body, or report a truncated message."""
        cdef list events = []
        if self._state == S_BODY:
            if h1_body_eof(&self._body) < 0:
                self._error(events, self._body.error_status, self._body.error, self._stream_id)
                return events
            events.append(MessageEnded(self._stream_id))
        elif self._state == S_HEAD and PyByteArray_GET_SIZE(self._buf) > self._pos:
            self._error(events, self._truncated_head_status(),
                        b"connection closed in the middle of a head", self._stream_id + 1)
            return events
        elif self._state == S_ERRORED:
            return events
        if self._state != S_CLOSED:
            events.append(ConnectionClosed(last_stream_id=self._stream_id))
        self._state = S_CLOSED
        self._keep_alive = False
        return events

    cdef int _truncated_head_status(self):
        return 400


cdef class H1RequestParser(_H1Parser):
    """Server side: parses requests (pipelined ones too: stream ids 1, 2, 3... in order)."""

    cdef bint _head_step(self, const unsigned char *base, size_t avail, list events) except *:
        cdef int r = h1_parse_request(base, avail, &self._limits, &self._head)
        cdef h1_head *head = &self._head
        if r == 0:
            return False
        if r < 0:
            self._error(events, head.error_status, head.error, self._stream_id + 1)
            return False
        self._stream_id += 1
        events.append(RequestReceived(
            self._stream_id,
            _span_bytes(base, head.method),
            _span_bytes(base, head.target),
            _span_bytes(base, head.authority),
            _fields(base, head),
            b"1.1" if head.version_minor == 1 else b"1.0",
        ))
        self._keep_alive = h1_should_keep_alive(head)
        self._tunnel_after = head.method_id == H1_METHOD_CONNECT or (head.upgrade.len > 0
                                                                     and head.conn_upgrade)
        self._pos += head.head_len
        h1_body_for_request(&self._body, head)
        self._limit_trailers()
        self._state = S_BODY
        return True


cdef class H1ResponseParser(_H1Parser):
    """Client side: parses the responses to the requests announced with expect_response(), in order."""

    cdef list _pending  # (stream id, method id) of the requests still waiting for a response
    cdef int _next_stream_id

    def __init__(self, max_head_bytes: int = H1_DEFAULT_MAX_HEAD_BYTES,
                 max_fields: int = H1_DEFAULT_MAX_FIELDS) -> None:
        super().__init__(max_head_bytes, max_fields)
        self._pending = []
        self._next_stream_id = 0

    def expect_response(self, method: bytes) -> int:
        """A request with this method was sent; returns its stream id (1, 2, 3...)."""
        self._next_stream_id += 1
        self._pending.append((self._next_stream_id, _method_id(method, len(method))))
        return self._next_stream_id

    cdef bint _head_step(self, const unsigned char *base, size_t avail, list events) except *:
        cdef int r
        cdef h1_head *head = &self._head
        cdef int method_id
        if not self._pending:
            self._error(events, 502, b"response without a request", self._stream_id + 1)
            return False
        self._stream_id, method_id = self._pending[0]
        r = h1_parse_response(base, avail, &self._limits, head)
        if r == 0:
            return False
        if r < 0:
            self._error(events, head.error_status, head.error, self._stream_id)
            return False
        events.append(ResponseReceived(
            self._stream_id,
            head.status,
            _fields(base, head),
            _span_bytes(base, head.reason),
            b"1.1" if head.version_minor == 1 else b"1.0",
        ))
        self._pos += head.head_len
        if head.status == 101:
            self._pending.pop(0)
            self._keep_alive = True
            self._state = S_PAUSED
            return False
        if head.status < 200:
            h1_head_init(head)  # informational: the final response follows for the same request
            return True
        self._pending.pop(0)
        h1_body_for_response(&self._body, head, method_id == H1_METHOD_HEAD,
                             method_id == H1_METHOD_CONNECT)
        self._limit_trailers()
        self._keep_alive = h1_should_keep_alive(head) and self._body.kind != H1_BODY_UNTIL_CLOSE
        self._tunnel_after = method_id == H1_METHOD_CONNECT and head.status < 300
        self._state = S_BODY
        return True

    cdef int _truncated_head_status(self):
        return 502


_TARGET_FORMS = {H1_TARGET_ORIGIN: "origin", H1_TARGET_ABSOLUTE: "absolute", H1_TARGET_AUTHORITY: "authority",
                 H1_TARGET_ASTERISK: "asterisk"}
_METHOD_IDS = {H1_METHOD_OTHER: "OTHER", H1_METHOD_GET: "GET", H1_METHOD_HEAD: "HEAD", H1_METHOD_POST: "POST",
               H1_METHOD_PUT: "PUT", H1_METHOD_DELETE: "DELETE", H1_METHOD_CONNECT: "CONNECT",
               H1_METHOD_OPTIONS: "OPTIONS", H1_METHOD_TRACE: "TRACE", H1_METHOD_PATCH: "PATCH"}


def head_info(raw: bytes, *, is_request: bool = True, max_head_bytes: int = H1_DEFAULT_MAX_HEAD_BYTES,
              max_fields: int = H1_DEFAULT_MAX_FIELDS) -> dict:
    """Everything h1_parse_request / h1_parse_response put in h1_head, as a dict (spans as bytes), for
    tests and debugging. {"result": 0} for an incomplete head; errors give result, error_status, error,
    error_off."""
    cdef h1_limits lim
    cdef h1_head *head = <h1_head *>PyMem_Malloc(sizeof(h1_head))
    cdef const unsigned char *src = raw
    cdef int r
    if head == NULL:
        raise MemoryError()
    try:
        lim.max_head_bytes = max_head_bytes
        lim.max_fields = max_fields
        h1_head_init(head)
        if is_request:
            r = h1_parse_request(src, len(raw), &lim, head)
        else:
            r = h1_parse_response(src, len(raw), &lim, head)
        if r < 0:
            return {"result": r, "error_status": head.error_status, "error": head.error.decode(),
                    "error_off": head.error_off}
        if r == 0:
            return {"result": 0}
        return {
            "result": r,
            "method": _span_bytes(src, head.method),
            "method_id": _METHOD_IDS[head.method_id],
            "target": _span_bytes(src, head.target),
            "target_form": _TARGET_FORMS[head.target_form],
            "path": _span_bytes(src, head.path),
            "query": _span_bytes(src, head.query),
            "authority": _span_bytes(src, head.authority),
            "status": head.status,
            "reason": _span_bytes(src, head.reason),
            "version_minor": head.version_minor,
            "head_len": head.head_len,
            "fields": [(_span_bytes(src, head.fields[k].name), _span_bytes(src, head.fields[k].value))
                       for k in range(head.nfields)],
            "content_length": head.content_length,
            "chunked": head.chunked,
            "has_transfer_encoding": head.has_transfer_encoding,
            "conn_close": head.conn_close,
            "conn_keep_alive": head.conn_keep_alive,
            "conn_upgrade": head.conn_upgrade,
            "upgrade": _span_bytes(src, head.upgrade),
            "host": _span_bytes(src, head.host),
            "has_host": head.has_host,
            "expect_continue": head.expect_continue,
            "te_trailers": head.te_trailers,
            "keep_alive": h1_should_keep_alive(head),
        }
    finally:
        PyMem_Free(head)


def field_is_valid(name: bytes, value: bytes) -> bool:
    """h1_field_is_valid: can HTTP/1.1 carry this field as is?"""
    return h1_field_is_valid(name, len(name), value, len(value))


def chunk_header(size: int) -> bytes:
    """The chunk-size line for a chunk of `size` bytes (h1_chunk_header)."""
    cdef unsigned char out[H1_CHUNK_HEADER_MAX]
    if not 0 <= size < 2**64:
        raise ValueError(f"chunk size out of range: {size}")
    return out[:h1_chunk_header(size, out)]


cdef h1_field_ref *_field_refs(list add_list, list remove_list) except NULL:
    """A PyMem block of refs: the added (name, value) pairs, then the removed names. The refs borrow the
    bytes objects' buffers: the lists must outlive them."""
    cdef Py_ssize_t nadd = len(add_list)
    cdef Py_ssize_t k
    cdef bytes name, value
    cdef h1_field_ref *refs = <h1_field_ref *>PyMem_Malloc(sizeof(h1_field_ref) * (nadd + len(remove_list) + 1))
    if refs == NULL:
        raise MemoryError()
    for k in range(nadd):
        name, value = add_list[k]
        refs[k].name = name
        refs[k].name_len = len(name)
        refs[k].value = value
        refs[k].value_len = len(value)
    for k in range(len(remove_list)):
        name = remove_list[k]
        refs[nadd + k].name = name
        refs[nadd + k].name_len = len(name)
        refs[nadd + k].value = NULL
        refs[nadd + k].value_len = 0
    return refs


def serialize_trailers(raw_fields: bytes, *, add: object = (), remove: object = ()) -> bytes:
    """Parse trailer field lines (each ending in CRLF) and serialize the end of a chunked body
    (h1_serialize_trailers); ValueError if they do not parse or an added field is invalid."""
    cdef h1_limits lim
    cdef h1_head *fields = <h1_head *>PyMem_Malloc(sizeof(h1_head))
    cdef h1_serialize_opts opts
    cdef h1_field_ref *refs = NULL
    cdef list add_list = [(bytes(n), bytes(v)) for n, v in add]
    cdef list remove_list = [bytes(n) for n in remove]
    cdef Py_ssize_t nadd = len(add_list)
    cdef bytearray out
    cdef ssize_t written
    cdef size_t cap
    cdef const unsigned char *src = raw_fields
    if fields == NULL:
        raise MemoryError()
    try:
        h1_limits_default(&lim)
        if h1_parse_trailers(src, len(raw_fields), &lim, fields) < 0:
            raise ValueError(fields.error.decode())
        refs = _field_refs(add_list, remove_list)
        memset(&opts, 0, sizeof(opts))
        opts.add = refs
        opts.nadd = nadd
        opts.remove = refs + nadd
        opts.nremove = len(remove_list)
        cap = len(raw_fields) + 8 + sum(len(n) + len(v) + 4 for n, v in add_list)
        out = bytearray(cap)
        written = h1_serialize_trailers(src, fields, &opts, <unsigned char *>PyByteArray_AS_STRING(out), cap)
        if written == -2:
            raise ValueError("invalid field to add")
        if written < 0:
            raise AssertionError("serialize_trailers: output capacity computed too small")
        return bytes(out[:written])
    finally:
        PyMem_Free(refs)
        PyMem_Free(fields)


def sniff_request(data: bytes) -> int:
    """1 if data starts like an HTTP/1.x request, 0 if it is too short to tell, -1 if it is not."""
    return h1_sniff_request(data, len(data))


def serialize_head(
    raw_head: bytes,
    *,
    is_request: bool = True,
    add: object = (),
    remove: object = (),
    framing: int = H1_FRAMING_AS_PARSED,
    content_length: int = -1,
    upgrading: bool = False,
    keep_te_trailers: bool = False,
    conn_close: bool = False,
    target: bytes | None = None,
) -> bytes:
    """Parse a head and serialize it for forwarding (h1_serialize_head); ValueError if it does not parse
    or an added field is invalid."""
    cdef h1_limits lim
    cdef h1_head *head = <h1_head *>PyMem_Malloc(sizeof(h1_head))
    cdef h1_serialize_opts opts
    cdef h1_field_ref *refs = NULL
    cdef list add_list = [(bytes(n), bytes(v)) for n, v in add]
    cdef list remove_list = [bytes(n) for n in remove]
    cdef bytearray out
    cdef ssize_t written
    cdef int r
    cdef size_t cap
    cdef const unsigned char *src = raw_head
    if head == NULL:
        raise MemoryError()
    try:
        h1_limits_default(&lim)
        h1_head_init(head)
        if is_request:
            r = h1_parse_request(src, len(raw_head), &lim, head)
        else:
            r = h1_parse_response(src, len(raw_head), &lim, head)
        if r != 1:
            raise ValueError(head.error.decode() if r < 0 else "incomplete head")
        refs = _field_refs(add_list, remove_list)
        opts.add = refs
        opts.nadd = len(add_list)
        opts.remove = refs + len(add_list)
        opts.nremove = len(remove_list)
        opts.framing = framing
        opts.content_length = content_length
        opts.upgrading = upgrading
        opts.keep_te_trailers = keep_te_trailers
        opts.conn_close = conn_close
        opts.target = <const unsigned char *>target if target is not None else NULL
        opts.target_len = len(target) if target is not None else 0
        cap = (len(raw_head) + H1_SERIALIZE_SLACK + sum(len(n) + len(v) + 4 for n, v in add_list)
               + (len(target) if target is not None else 0))
        out = bytearray(cap)
        written = h1_serialize_head(src, head, is_request, &opts,
                                    <unsigned char *>PyByteArray_AS_STRING(out), cap)
        if written == -2:
            raise ValueError("invalid field to add")
        if written < 0:
            raise AssertionError("serialize_head: output capacity computed too small")
        return bytes(out[:written])
    finally:
        PyMem_Free(refs)
        PyMem_Free(head)
