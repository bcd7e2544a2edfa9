# C-level API of nodeproxy/_h1.pyx: a sans-IO HTTP/1.1 codec (RFC 9112, RFC 9110 §5) for the engine thread.
#
# Every function here is `noexcept nogil`, allocates nothing and touches no Python object. Parsers work on
# the caller's byte buffer and describe what they found as spans: offsets from the start of the buffer
# passed, so they stay valid when the caller moves those bytes as a block (the resumable parse state too).
# `cimport nodeproxy._h1` / `from nodeproxy._h1 cimport ...` from another .pyx gets these functions.
#
# Re-entrant: the functions keep no state outside the structs the caller passes (the character tables are
# constant after import), so any number of threads may use them on different structs at once.
#
# Strict by default: anything RFC 9112/9110 lets a recipient reject is rejected (see _h1.pyx for the list
# of rules, each with the `error` string it reports). Errors are final for the connection: the engine
# answers `error_status` (400, 431, 501, 505; 502 for a broken upstream response) and closes.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef enum:
    # Defaults for h1_limits (Envoy's: request head 60 KiB, 100 fields).
    H1_DEFAULT_MAX_HEAD_BYTES = 61440
    H1_DEFAULT_MAX_FIELDS = 100
    # Capacity of h1_head.fields; h1_limits.max_fields above this is treated as this.
    H1_FIELDS_CAP = 128
    # Longest chunk-size line (size, extensions, CRLF) h1_body_feed accepts; longer -> 400.
    H1_MAX_CHUNK_LINE = 4096
    # Room h1_chunk_header needs: 16 hex digits and CRLF.
    H1_CHUNK_HEADER_MAX = 18
    # h1_serialize_head never writes more than head.head_len + H1_SERIALIZE_SLACK + the added fields
    # (name + value + 4 each) + opts.target_len: one ' ' per field after the colon (H1_FIELDS_CAP), the
    # framing, Connection and TE lines.
    H1_SERIALIZE_SLACK = 256


cdef enum h1_method:
    # h1_head.method_id: the methods whose semantics the codec or the engine needs; anything else is OTHER.
    H1_METHOD_OTHER = 0
    H1_METHOD_GET = 1
    H1_METHOD_HEAD = 2
    H1_METHOD_POST = 3
    H1_METHOD_PUT = 4
    H1_METHOD_DELETE = 5
    H1_METHOD_CONNECT = 6
    H1_METHOD_OPTIONS = 7
    H1_METHOD_TRACE = 8
    H1_METHOD_PATCH = 9


cdef enum h1_target_form:
    # RFC 9112 §3.2: which form the request-target has.
    H1_TARGET_ORIGIN = 0     # /path?query
    H1_TARGET_ABSOLUTE = 1   # http://authority/path?query
    H1_TARGET_AUTHORITY = 2  # host:port (CONNECT only)
    H1_TARGET_ASTERISK = 3   # * (OPTIONS only)


cdef enum h1_body_kind:
    H1_BODY_NONE = 0         # no body (or an empty one): the message ends with its head
    H1_BODY_LENGTH = 1       # Content-Length bytes
    H1_BODY_CHUNKED = 2      # chunked transfer coding, optional trailer section
    H1_BODY_UNTIL_CLOSE = 3  # response only: the body runs until the server closes


cdef enum h1_framing:
    # h1_serialize_opts.framing: which framing field the serialized head carries.
    H1_FRAMING_AS_PARSED = 0  # chunked -> "Transfer-Encoding: chunked"; Content-Length -> one normalized
                              # "Content-Length: N"; neither -> nothing (raw body bytes are relayed as is)
    H1_FRAMING_NONE = 1       # no framing field (no body, or until-close)
    H1_FRAMING_CHUNKED = 2    # "Transfer-Encoding: chunked" (the caller chunk-encodes the body)
    H1_FRAMING_LENGTH = 3     # "Content-Length: <opts.content_length>"


ctypedef struct h1_limits:
    uint32_t max_head_bytes  # H1_DEFAULT_MAX_HEAD_BYTES: a longer head -> 431
    uint32_t max_fields      # H1_DEFAULT_MAX_FIELDS: more field lines -> 431 (capped at H1_FIELDS_CAP)


ctypedef struct h1_span:
    uint32_t off  # offset into the buffer that was parsed
    uint32_t len


ctypedef struct h1_field:
    h1_span name   # as received (case preserved; compare case-insensitively)
    h1_span value  # leading and trailing whitespace removed


ctypedef struct h1_head:
    # --- resume state: h1_head_init() before the first parse call of each message; keep it between calls
    uint32_t scanned         # internal: where the next unparsed line starts
    uint32_t parse_flags     # internal: state of the field checks between calls
    # --- start line
    h1_span method           # request: the method token
    uint8_t method_id        # request: h1_method
    h1_span target           # request: the whole request-target
    uint8_t target_form      # request: h1_target_form
    h1_span path             # request: path part of origin-/absolute-form ("*" for asterisk-form; empty
                             #          for authority-form, and for an absolute-form target without a
                             #          path, which means "/")
    h1_span query            # request: the query without '?' (len 0 if none)
    h1_span authority        # request: authority of an absolute-/authority-form target, else the Host value
    uint16_t status          # response: 100..599
    h1_span reason           # response: reason phrase (may be empty)
    uint8_t version_minor    # 0 or 1 (HTTP/1.0, HTTP/1.1); other versions are rejected (505 / 502)
    uint32_t head_len        # bytes of the head, start line to the final CRLF inclusive (leading empty
                             # lines skipped before a request line count too); the body starts here
    # --- field lines, in order
    uint32_t nfields
    h1_field fields[H1_FIELDS_CAP]
    # --- what framing and the engine need (computed while parsing)
    int64_t content_length   # -1 when absent
    bint chunked             # Transfer-Encoding present with chunked as its (only allowed) final coding
    bint has_transfer_encoding
    bint conn_close          # Connection: close
    bint conn_keep_alive     # Connection: keep-alive
    bint conn_upgrade        # Connection lists "upgrade"
    h1_span upgrade          # value of the Upgrade field (len 0 if absent)
    h1_span host             # value of the Host field (len 0 if absent or empty)
    bint has_host
    bint expect_continue     # Expect: 100-continue
    bint te_trailers         # TE lists "trailers"
    # --- error (when a parse call returns -1)
    uint16_t error_status    # 400, 431, 501, 505 for requests; 502 for responses
    const char *error        # static string naming the rule broken ("content-length with transfer-encoding")
    uint32_t error_off       # offset in the buffer where the error was found


ctypedef struct h1_body:
    # Body framing state machine; set up by h1_body_for_request / h1_body_for_response. All fields are
    # internal except the ones marked.
    uint8_t kind             # h1_body_kind (read-only for the caller)
    uint8_t state            # internal
    bint ended               # read-only: the message (body and trailers) is complete
    uint64_t remaining       # bytes left in a Content-Length body or in the current chunk
    uint64_t total           # read-only: payload bytes seen so far
    uint32_t max_trailer_bytes  # H1_DEFAULT_MAX_HEAD_BYTES; the caller may lower it after setup
    uint32_t max_trailer_fields  # H1_DEFAULT_MAX_FIELDS; the caller may lower it after setup
    uint16_t error_status    # 400 (request) or 502 (response) once h1_body_feed returned -1
    const char *error
    bint is_response         # internal: which error status to use
    uint32_t scan            # internal: trailer bytes already checked (the trailer section is not consumed
    uint32_t count           # internal: trailer field lines counted    until it is complete)


ctypedef struct h1_chunk:
    # What one h1_body_feed call found in the bytes it consumed.
    h1_span data      # payload bytes (len 0 if the consumed bytes were framing only)
    h1_span trailers  # the trailer field lines, each with its CRLF, without the final empty line (len 0
                      # if none); parse them with h1_parse_trailers(buf + trailers.off, trailers.len, ...)
    bint ended        # the message ended within the consumed bytes (after data and trailers)


ctypedef struct h1_field_ref:
    # A field given by pointers (for fields to add or names to remove in h1_serialize_head).
    const unsigned char *name
    uint32_t name_len
    const unsigned char *value  # ignored for removals
    uint32_t value_len


ctypedef struct h1_serialize_opts:
    const h1_field_ref *add      # fields appended after the forwarded ones (may be NULL when nadd == 0)
    uint32_t nadd
    const h1_field_ref *remove   # names (case-insensitive) not forwarded (may be NULL when nremove == 0)
    uint32_t nremove
    uint8_t framing              # h1_framing
    int64_t content_length       # for H1_FRAMING_LENGTH
    bint upgrading               # keep Upgrade and send "Connection: upgrade"
    bint keep_te_trailers        # send "TE: trailers" when the head's TE listed trailers (HTTP/2, gRPC)
    bint conn_close              # send "Connection: close"
    const unsigned char *target  # request: forward this request-target instead of the parsed one
    uint32_t target_len          #          (e.g. origin-form for an absolute-form target); NULL = keep


# Set the h1_limits defaults.
cdef void h1_limits_default(h1_limits *lim) noexcept nogil

# Reset `head` for a new message. Must be called before the first h1_parse_* call of each message.
cdef void h1_head_init(h1_head *head) noexcept nogil

# Parse a request head at the start of buf[0:len] (the bytes of this message received so far; buf must
# start where the message starts). Pointers are never NULL (buf may be when len is 0). Returns:
#    1  head complete: all spans and flags of `out` are set, out.head_len bytes belong to the head;
#    0  need more bytes: call again with the same `out` and buf holding these bytes plus more (complete
#       lines are checked once and never again; only the memchr for the LF of the line still incomplete
#       repeats, which max_head_bytes bounds);
#   -1  error: out.error_status / out.error / out.error_off say why; the connection is done.
# A head longer than lim.max_head_bytes (complete or not) is error 431; more than lim.max_fields field
# lines is 431. Leading empty lines (CRLF) before the request line are skipped (at most 4; RFC 9112
# §2.2). Once a call returned 1 or -1, later calls with the same `out` return the same (h1_head_init
# starts the next message).
cdef int h1_parse_request(const unsigned char *buf, size_t len, const h1_limits *lim,
                          h1_head *out) noexcept nogil

# The same for a response head (status line instead of request line). Every error has error_status 502
# (a proxy answers its client 502 when the upstream breaks the protocol).
cdef int h1_parse_response(const unsigned char *buf, size_t len, const h1_limits *lim,
                           h1_head *out) noexcept nogil

# Parse a trailer section's field lines (each ending in CRLF, as h1_chunk.trailers spans them) into
# out.nfields / out.fields (spans relative to `buf`). Returns 1 or -1 (error as for h1_parse_request).
# Only the field fields of `out` are meaningful afterwards.
cdef int h1_parse_trailers(const unsigned char *buf, size_t len, const h1_limits *lim,
                           h1_head *out) noexcept nogil

# Quick check of the first bytes of a connection for `auto` ports: 1 they start an HTTP/1.x request line
# (token method, SP, a target, SP "HTTP/1."), 0 not enough bytes to tell yet, -1 not HTTP/1.
cdef int h1_sniff_request(const unsigned char *buf, size_t len) noexcept nogil

# RFC 9112 §9.3: may the connection carry another message after this one? (HTTP/1.1 unless
# "Connection: close"; HTTP/1.0 only with "Connection: keep-alive".) For a response, an until-close body
# also ends the connection: check h1_body.kind too.
cdef bint h1_should_keep_alive(const h1_head *head) noexcept nogil

# Set up body framing for a parsed request (RFC 9112 §6.3): chunked, Content-Length, or none.
cdef void h1_body_for_request(h1_body *body, const h1_head *head) noexcept nogil

# Set up body framing for a parsed response: none for a response to HEAD, 1xx, 204, 304, or a 2xx to
# CONNECT (`request_method_connect` non-zero); else chunked, Content-Length, or until-close.
cdef void h1_body_for_response(h1_body *body, const h1_head *head, bint request_was_head,
                               int request_method_connect) noexcept nogil

# Consume body bytes buf[0:len] (which start right after what was consumed before). Returns the number of
# bytes consumed (0..len) or -1 on error (body.error_status / body.error). `out` tells where the payload
# bytes of the consumed range are (at most one contiguous span per call: call again with the rest),
# where the trailer section is, and whether the message ended. The consumed bytes never cut a chunk-size
# line or a trailer section: those are consumed whole or not at all, so the unconsumed rest (to be fed
# again with more bytes appended) stays below H1_MAX_CHUNK_LINE or max_trailer_bytes. Once the message
# ended, returns 0 (the following bytes belong to the next message). Returns 0 with nothing consumed
# only when more bytes are needed or the message ended. An error found after some bytes were consumed in
# the same call is returned by the next call (with the bad bytes still unconsumed), so `out` never loses
# the payload that came before it.
cdef ssize_t h1_body_feed(h1_body *body, const unsigned char *buf, size_t len,
                          h1_chunk *out) noexcept nogil

# The peer closed the connection: 1 if that ends the message cleanly (until-close body, or the message
# already ended), -1 if the message is truncated (body.error set).
cdef int h1_body_eof(h1_body *body) noexcept nogil

# Serialize a head to forward (RFC 9110 §7.6.1): the request line (method, target, "HTTP/1.1") or status
# line ("HTTP/1.1", status, reason) of `head` parsed from `src`, then its fields minus the hop-by-hop ones
# (Connection, Keep-Alive, Proxy-Connection, TE, Transfer-Encoding, Upgrade, every field named in
# Connection except Host) and Content-Length, minus opts.remove, then the framing field opts.framing asks
# for, then "Connection" / "Upgrade" / "TE: trailers" as the opts ask, then opts.add, then CRLF.
# Returns the number of bytes written into dst[0:cap], -1 if cap is too small, or -2 if an added field
# has an invalid name (not a token) or value (CR, LF, NUL or another control character); on a negative
# return nothing usable was written. The fields of `head` must have passed h1_parse_* (not re-checked).
# A request is sent as HTTP/1.1 with the parsed method and target (or opts.target); the caller replaces
# Host through opts.remove / opts.add when it rewrites an absolute-form target (RFC 9112 §3.2.2).
cdef ssize_t h1_serialize_head(const unsigned char *src, const h1_head *head, bint is_request,
                               const h1_serialize_opts *opts, unsigned char *dst,
                               size_t cap) noexcept nogil

# Write the chunk-size line for a chunk of `size` payload bytes ("1a2b\r\n"; size 0 gives the last-chunk
# line "0\r\n") into dst, which has room for H1_CHUNK_HEADER_MAX bytes. Returns the bytes written. The
# chunk's payload follows, then "\r\n" (for size > 0); after the last chunk come the trailer fields and
# "\r\n" (h1_serialize_trailers writes both).
cdef size_t h1_chunk_header(uint64_t size, unsigned char *dst) noexcept nogil

# Serialize the end of a chunked body: "0\r\n", the fields of `trailers` (spans into `src`, e.g. from
# h1_parse_trailers) minus the ones a head would not forward either (hop-by-hop, framing) and opts.remove,
# then opts.add, then "\r\n". Only opts.add / nadd / remove / nremove are used. Returns the bytes written,
# -1 if cap is too small, -2 for an invalid added field. `trailers` may be NULL (no fields).
cdef ssize_t h1_serialize_trailers(const unsigned char *src, const h1_head *trailers,
                                   const h1_serialize_opts *opts, unsigned char *dst,
                                   size_t cap) noexcept nogil

# Can HTTP/1.1 carry this field as is (RFC 9110 §5.1, §5.5)? The name is a token and the value holds no
# control character but HTAB (so no CR, LF, NUL) and no leading or trailing SP / HTAB. For fields coming
# from elsewhere (HTTP/2, config) before they are written into an HTTP/1.1 head.
cdef bint h1_field_is_valid(const unsigned char *name, size_t name_len, const unsigned char *value,
                            size_t value_len) noexcept nogil
