# cython: language_level=3
"""Times the C API of nodeproxy._h1 through a cimport, as the L7 engine calls it (built by
bench/h1_codec.py). Thread CPU time, so a busy shared machine inflates the figures less than wall time."""

from posix.time cimport clock_gettime, timespec

from nodeproxy._h1 cimport *


cdef extern from "<time.h>" nogil:
    enum:
        CLOCK_THREAD_CPUTIME_ID


cdef double _cpu_seconds() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def parse_request(bytes raw, long iterations):
    """CPU seconds per h1_head_init + h1_parse_request of a complete head."""
    cdef const unsigned char *p = raw
    cdef size_t length = len(raw)
    cdef h1_limits lim
    cdef h1_head head
    cdef long i
    cdef long complete = 0
    cdef double start, end
    h1_limits_default(&lim)
    with nogil:
        start = _cpu_seconds()
        for i in range(iterations):
            h1_head_init(&head)
            complete += h1_parse_request(p, length, &lim, &head)
        end = _cpu_seconds()
    if complete != iterations:
        raise ValueError("the head does not parse")
    return (end - start) / iterations


def serialize_request(bytes raw, long iterations):
    """CPU seconds per h1_serialize_head of a parsed head (hop-by-hop fields dropped)."""
    cdef const unsigned char *p = raw
    cdef h1_limits lim
    cdef h1_head head
    cdef h1_serialize_opts opts
    cdef unsigned char out[65536]
    cdef long i
    cdef ssize_t written = 0
    cdef double start, end
    h1_limits_default(&lim)
    h1_head_init(&head)
    if h1_parse_request(p, len(raw), &lim, &head) != 1:
        raise ValueError("the head does not parse")
    opts.add = NULL
    opts.nadd = 0
    opts.remove = NULL
    opts.nremove = 0
    opts.framing = H1_FRAMING_AS_PARSED
    opts.content_length = -1
    opts.upgrading = False
    opts.keep_te_trailers = False
    opts.conn_close = False
    opts.target = NULL
    opts.target_len = 0
    with nogil:
        start = _cpu_seconds()
        for i in range(iterations):
            written = h1_serialize_head(p, &head, True, &opts, out, sizeof(out))
        end = _cpu_seconds()
    if written <= 0:
        raise ValueError("serialization failed")
    return (end - start) / iterations


def frame_chunked(bytes body, long iterations):
    """CPU seconds per chunked body framed with h1_body_feed (the body fed whole)."""
    cdef const unsigned char *p = body
    cdef size_t total = len(body)
    cdef h1_head head
    cdef h1_body framing
    cdef h1_chunk chunk
    cdef long i
    cdef size_t pos
    cdef ssize_t consumed
    cdef double start, end
    h1_head_init(&head)
    head.chunked = True
    with nogil:
        start = _cpu_seconds()
        for i in range(iterations):
            h1_body_for_request(&framing, &head)
            pos = 0
            while not framing.ended:
                consumed = h1_body_feed(&framing, p + pos, total - pos, &chunk)
                if consumed <= 0:
                    break
                pos += consumed
        end = _cpu_seconds()
    if not framing.ended:
        raise ValueError("the body does not frame")
    return (end - start) / iterations
