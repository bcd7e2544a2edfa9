# cython: language_level=3
"""Drives the C API of nodeproxy._h1 through a cimport, the way the L7 engine does (built by
tests/test_h1_capi.py). Each function returns plain Python values for the test to check."""

from libc.stdint cimport uint64_t
from libc.string cimport memset

from nodeproxy._h1 cimport *


def parse_again(bytes raw, bint is_request):
    """Parse a head, then call the parser again with the same h1_head: (first, second, head_len)."""
    cdef h1_limits lim
    cdef h1_head head
    cdef const unsigned char *p = raw
    cdef int first, second
    h1_limits_default(&lim)
    h1_head_init(&head)
    if is_request:
        first = h1_parse_request(p, len(raw), &lim, &head)
        second = h1_parse_request(p, len(raw), &lim, &head)
    else:
        first = h1_parse_response(p, len(raw), &lim, &head)
        second = h1_parse_response(p, len(raw), &lim, &head)
    return first, second, head.head_len


def relay_body(bytes head_raw, bytes body_raw, list cuts, bint is_response=False):
    """Feed a body the way the engine does: bytes arrive in pieces cut at `cuts`, the unconsumed rest is
    kept and fed again with the next piece. Returns (payload, trailer spans' bytes, forwarded bytes,
    ended, largest unconsumed rest, error or None)."""
    cdef h1_limits lim
    cdef h1_head head
    cdef h1_body body
    cdef h1_chunk chunk
    cdef const unsigned char *hp = head_raw
    cdef const unsigned char *bp
    cdef ssize_t r
    cdef bytes pending = b""
    cdef bytes window
    h1_limits_default(&lim)
    h1_head_init(&head)
    if is_response:
        assert h1_parse_response(hp, len(head_raw), &lim, &head) == 1
        h1_body_for_response(&body, &head, False, 0)
    else:
        assert h1_parse_request(hp, len(head_raw), &lim, &head) == 1
        h1_body_for_request(&body, &head)
    payload = []
    trailers = []
    forwarded = []
    largest_rest = 0
    bounds = sorted({c for c in cuts if 0 < c < len(body_raw)}) + [len(body_raw)]
    start = 0
    for end in bounds:
        pending += body_raw[start:end]
        start = end
        while pending:
            window = pending
            bp = window
            r = h1_body_feed(&body, bp, len(window), &chunk)
            if r < 0:
                error = body.error.decode()
                return b"".join(payload), trailers, b"".join(forwarded), False, largest_rest, error
            if chunk.data.len:
                payload.append(window[chunk.data.off:chunk.data.off + chunk.data.len])
            if chunk.trailers.len:
                trailers.append(window[chunk.trailers.off:chunk.trailers.off + chunk.trailers.len])
            forwarded.append(window[:r])
            pending = window[r:]
            if chunk.ended or r == 0:
                break
        largest_rest = max(largest_rest, len(pending))
        if body.ended:
            break
    return b"".join(payload), trailers, b"".join(forwarded), bool(body.ended), largest_rest, None


def eof_after(bytes head_raw, bytes body_raw, bint is_response):
    """h1_body_eof after feeding body_raw whole: (result, error or None)."""
    cdef h1_limits lim
    cdef h1_head head
    cdef h1_body body
    cdef h1_chunk chunk
    cdef const unsigned char *hp = head_raw
    cdef const unsigned char *bp = body_raw
    h1_limits_default(&lim)
    h1_head_init(&head)
    if is_response:
        assert h1_parse_response(hp, len(head_raw), &lim, &head) == 1
        h1_body_for_response(&body, &head, False, 0)
    else:
        assert h1_parse_request(hp, len(head_raw), &lim, &head) == 1
        h1_body_for_request(&body, &head)
    assert h1_body_feed(&body, bp, len(body_raw), &chunk) >= 0
    result = h1_body_eof(&body)
    return result, body.error.decode() if body.error != NULL else None


def serialize_with_capacity(bytes raw, size_t cap):
    """h1_serialize_head into a buffer of exactly `cap` bytes followed by guard bytes: (result, output,
    guard bytes intact)."""
    cdef h1_limits lim
    cdef h1_head head
    cdef h1_serialize_opts opts
    cdef const unsigned char *p = raw
    cdef unsigned char out[8192]
    cdef ssize_t r
    assert cap + 64 <= sizeof(out)
    h1_limits_default(&lim)
    h1_head_init(&head)
    assert h1_parse_request(p, len(raw), &lim, &head) == 1
    memset(&opts, 0, sizeof(opts))
    opts.conn_close = True
    memset(out, 0xA5, sizeof(out))
    r = h1_serialize_head(p, &head, True, &opts, out, cap)
    guard_intact = all(out[i] == 0xA5 for i in range(cap, cap + 64))
    return r, bytes(out[:r]) if r > 0 else b"", guard_intact


def chunk_header_bytes(uint64_t size):
    cdef unsigned char out[H1_CHUNK_HEADER_MAX]
    return out[:h1_chunk_header(size, out)]


def constants():
    return {
        "max_head_bytes": H1_DEFAULT_MAX_HEAD_BYTES,
        "max_fields": H1_DEFAULT_MAX_FIELDS,
        "fields_cap": H1_FIELDS_CAP,
        "max_chunk_line": H1_MAX_CHUNK_LINE,
        "sizeof_head": sizeof(h1_head),
    }
