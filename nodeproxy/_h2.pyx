# cython: language_level=3
"""Sans-IO HTTP/2 sessions on libnghttp2 (see _h2.pxd for the design and the C API)."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from nodeproxy.proxy import http_events as ev

# Defaults, documented where they are defined (peers' values in ../shared/reference.md).
cdef enum:
    _MAX_CONCURRENT_STREAMS = 100  # Envoy's and ztunnel's
    _STREAM_WINDOW = 1 << 20       # 1 MiB: one stream fills several Gb/s at lab RTTs (Envoy: 64 KiB)
    _CONNECTION_WINDOW = 8 << 20   # 8 MiB: bounds what one connection can make us buffer
    _MAX_HEADER_LIST_SIZE = 65536  # decoded bytes of one header block (Envoy: 60 KiB)
    _MAX_HEADER_FIELDS = 100       # Envoy's
    _MAX_EMPTY_FRAMES = 100        # CVE-2019-9518: DATA frames with no payload and no END_STREAM
    _RESET_BURST = 1000            # CVE-2023-44487 / CVE-2025-8671: resets either way, bucket size
    _RESET_RATE = 100              # ... refilled per second
    _MAX_OUTBOUND_ACK = 1000       # PING/SETTINGS acks queued while the peer does not read (9512/9515)
    _MAX_CONTINUATIONS = 8         # CONTINUATION frames per header block (CVE-2024-28182)
    _MAX_SETTINGS_ENTRIES = 32     # entries in one SETTINGS frame

DEFAULT_MAX_CONCURRENT_STREAMS = _MAX_CONCURRENT_STREAMS
DEFAULT_STREAM_WINDOW = _STREAM_WINDOW
DEFAULT_CONNECTION_WINDOW = _CONNECTION_WINDOW
DEFAULT_MAX_HEADER_LIST_SIZE = _MAX_HEADER_LIST_SIZE
DEFAULT_MAX_HEADER_FIELDS = _MAX_HEADER_FIELDS
DEFAULT_MAX_EMPTY_FRAMES = _MAX_EMPTY_FRAMES
DEFAULT_RESET_BURST = _RESET_BURST
DEFAULT_RESET_RATE = _RESET_RATE

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

cdef enum:
    FIELD_HEADER = 8  # two u32 lengths before each stored field


cdef int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef void h2_default_limits(h2_limits *limits) noexcept nogil:
    limits.max_concurrent_streams = _MAX_CONCURRENT_STREAMS
    limits.stream_window = _STREAM_WINDOW
    limits.connection_window = _CONNECTION_WINDOW
    limits.max_header_list_size = _MAX_HEADER_LIST_SIZE
    limits.max_header_fields = _MAX_HEADER_FIELDS
    limits.max_empty_frames = _MAX_EMPTY_FRAMES
    limits.reset_burst = _RESET_BURST
    limits.reset_rate = _RESET_RATE


# -- arena and event queue --------------------------------------------------------------------------------

cdef int _arena_reserve(h2_core *core, size_t extra) noexcept nogil:
    cdef size_t want = core.arena_len + extra
    cdef size_t cap = core.arena_cap if core.arena_cap else 4096
    cdef uint8_t *grown
    if want <= core.arena_cap:
        return 0
    while cap < want:
        cap *= 2
    grown = <uint8_t*>realloc(core.arena, cap)
    if grown == NULL:
        core.oom = True
        return -1
    core.arena, core.arena_cap = grown, cap
    return 0


cdef h2_event *_push_event(h2_core *core, int kind, int32_t stream_id) noexcept nogil:
    cdef h2_event *grown
    cdef size_t cap
    if core.nevents == core.events_cap:
        cap = core.events_cap * 2 if core.events_cap else 64
        grown = <h2_event*>realloc(core.events, cap * sizeof(h2_event))
        if grown == NULL:
            core.oom = True
            return NULL
        core.events, core.events_cap = grown, cap
    cdef h2_event *e = &core.events[core.nevents]
    core.nevents += 1
    e.kind, e.stream_id = kind, stream_id
    e.code, e.last_stream_id, e.off, e.len, e.nfields = 0, 0, 0, 0, 0
    return e


cdef void h2_clear_events(h2_core *core) noexcept nogil:
    core.nevents = 0
    # A header block still being received keeps its bytes; move them to the front.
    if core.block_stream and core.block_off < core.arena_len:
        memmove(core.arena, core.arena + core.block_off, core.arena_len - core.block_off)
        core.arena_len -= core.block_off
        core.block_off = 0
    else:
        core.arena_len = 0
        core.block_off = 0


cdef inline void _put_u32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef inline uint32_t _get_u32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef void h2_field_next(const h2_core *core, size_t *cursor, const uint8_t **name, size_t *namelen,
                        const uint8_t **value, size_t *valuelen) noexcept nogil:
    cdef const uint8_t *p = core.arena + cursor[0]
    namelen[0] = _get_u32(p)
    valuelen[0] = _get_u32(p + 4)
    name[0] = p + FIELD_HEADER
    value[0] = p + FIELD_HEADER + namelen[0]
    cursor[0] += FIELD_HEADER + namelen[0] + valuelen[0]


# -- guards -----------------------------------------------------------------------------------------------

cdef bint _take_reset_token(h2_core *core) noexcept nogil:
    """Token bucket over RST_STREAM frames in either direction: Rapid Reset (the client resets) and
    MadeYouReset (the client makes us reset) both show up here."""
    cdef int64_t now = _now_ns()
    core.reset_tokens += (now - core.reset_refilled_ns) / 1e9 * core.limits.reset_rate
    if core.reset_tokens > core.limits.reset_burst:
        core.reset_tokens = core.limits.reset_burst
    core.reset_refilled_ns = now
    if core.reset_tokens < 1.0:
        return False
    core.reset_tokens -= 1.0
    return True


cdef void _calm_down(h2_core *core) noexcept nogil:
    nghttp2_session_terminate_session(core.session, NGHTTP2_ENHANCE_YOUR_CALM)


# -- nghttp2 callbacks (C only, no GIL, never fail silently: a failure becomes a stream or session error) --

cdef int _on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame,
                           void *user_data) noexcept nogil:
    cdef h2_core *core = <h2_core*>user_data
    core.block_stream = frame.hd.stream_id
    core.block_off = core.arena_len
    core.block_fields = 0
    core.block_too_large = False
    core.block_flags = 0
    if frame.hd.type == NGHTTP2_HEADERS and frame.headers.cat == NGHTTP2_HCAT_REQUEST:
        core.block_flags |= H2_BLOCK_REQUEST
    return 0


cdef int _on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                    size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                    void *user_data) noexcept nogil:
    cdef h2_core *core = <h2_core*>user_data
    cdef size_t need = FIELD_HEADER + namelen + valuelen
    if core.block_too_large:
        return 0
    core.block_fields += 1
    # Both limits bound memory against HPACK bombs: a 1-byte index can expand to a 4 KiB entry.
    if (core.block_fields > core.limits.max_header_fields
            or core.arena_len - core.block_off + need > core.limits.max_header_list_size):
        core.block_too_large = True
        core.arena_len = core.block_off
        return 0
    if _arena_reserve(core, need) < 0:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    cdef uint8_t *p = core.arena + core.arena_len
    _put_u32(p, <uint32_t>namelen)
    _put_u32(p + 4, <uint32_t>valuelen)
    memcpy(p + FIELD_HEADER, name, namelen)
    memcpy(p + FIELD_HEADER + namelen, value, valuelen)
    core.arena_len += need
    if namelen == 7 and name[0] == b':' and name[1] == b's' and name[2] == b't':  # :status
        core.block_flags |= H2_BLOCK_HAS_STATUS
    return 0


cdef int _on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                        void *user_data) noexcept nogil:
    cdef h2_core *core = <h2_core*>user_data
    cdef h2_event *e
    cdef int32_t sid = frame.hd.stream_id
    cdef bint end_stream = (frame.hd.flags & NGHTTP2_FLAG_END_STREAM) != 0
    if frame.hd.type == NGHTTP2_HEADERS:
        if core.block_too_large:
            core.block_stream = 0
            e = _push_event(core, H2_EV_HEADERS_TOO_LARGE, sid)
            return 0 if e != NULL else NGHTTP2_ERR_CALLBACK_FAILURE
        e = _push_event(core, H2_EV_HEADERS, sid)
        if e == NULL:
            return NGHTTP2_ERR_CALLBACK_FAILURE
        e.off, e.len, e.nfields = core.block_off, core.arena_len - core.block_off, core.block_fields
        e.code = core.block_flags | (H2_BLOCK_END_STREAM if end_stream else 0)
        core.block_stream = 0
        if end_stream and _push_event(core, H2_EV_END_STREAM, sid) == NULL:
            return NGHTTP2_ERR_CALLBACK_FAILURE
    elif frame.hd.type == NGHTTP2_DATA:
        if frame.hd.length == 0 and not end_stream:
            core.empty_frames += 1
            if core.empty_frames > core.limits.max_empty_frames:
                _calm_down(core)
                return 0
        if end_stream and _push_event(core, H2_EV_END_STREAM, sid) == NULL:
            return NGHTTP2_ERR_CALLBACK_FAILURE
    elif frame.hd.type == NGHTTP2_RST_STREAM:
        if not _take_reset_token(core):
            _calm_down(core)
        if frame.rst_stream.error_code == NGHTTP2_NO_ERROR:
            # The stream closes with NO_ERROR, which on_stream_close does not report, yet the peer
            # abandoned it (a client cancelling a request may use code 0): the application must know.
            e = _push_event(core, H2_EV_RESET, sid)
            if e == NULL:
                return NGHTTP2_ERR_CALLBACK_FAILURE
    elif frame.hd.type == NGHTTP2_GOAWAY:
        e = _push_event(core, H2_EV_GOAWAY, 0)
        if e == NULL:
            return NGHTTP2_ERR_CALLBACK_FAILURE
        e.code, e.last_stream_id = frame.goaway.error_code, frame.goaway.last_stream_id
    return 0


cdef int _on_frame_send(nghttp2_session *session, const nghttp2_frame *frame,
                        void *user_data) noexcept nogil:
    cdef h2_core *core = <h2_core*>user_data
    if frame.hd.type == NGHTTP2_RST_STREAM and not _take_reset_token(core):
        _calm_down(core)
    return 0


cdef int _on_invalid_frame(nghttp2_session *session, const nghttp2_frame *frame, int lib_error_code,
                           void *user_data) noexcept nogil:
    # nghttp2 already answered with RST_STREAM or GOAWAY as RFC 9113 says; the reset shows up as an
    # H2_EV_RESET when the stream closes. A malformed header block must not leave a half block behind.
    cdef h2_core *core = <h2_core*>user_data
    if frame.hd.type == NGHTTP2_HEADERS and core.block_stream == frame.hd.stream_id:
        core.arena_len = core.block_off
        core.block_stream = 0
    return 0


cdef int _on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
                        size_t length, void *user_data) noexcept nogil:
    cdef h2_core *core = <h2_core*>user_data
    cdef h2_event *e
    if length == 0:
        return 0
    if core.nevents and core.events[core.nevents - 1].kind == H2_EV_DATA \
            and core.events[core.nevents - 1].stream_id == stream_id \
            and core.events[core.nevents - 1].off + core.events[core.nevents - 1].len == core.arena_len \
            and core.block_stream == 0:
        e = &core.events[core.nevents - 1]  # coalesce consecutive chunks of one stream
    else:
        e = _push_event(core, H2_EV_DATA, stream_id)
        if e == NULL:
            return NGHTTP2_ERR_CALLBACK_FAILURE
        e.off = core.arena_len
    if _arena_reserve(core, length) < 0:
        return NGHTTP2_ERR_CALLBACK_FAILURE
    memcpy(core.arena + core.arena_len, data, length)
    core.arena_len += length
    e.len += length
    return 0


cdef h2_stream_out *_new_stream_out(h2_core *core) noexcept nogil:
    cdef h2_stream_out *out = <h2_stream_out*>malloc(sizeof(h2_stream_out))
    if out == NULL:
        return NULL
    memset(out, 0, sizeof(h2_stream_out))
    out.next = core.outs
    if core.outs != NULL:
        core.outs.prev = out
    core.outs = out
    return out


cdef void _free_stream_out(h2_core *core, h2_stream_out *out) noexcept nogil:
    if out == NULL:
        return
    if out.prev != NULL:
        out.prev.next = out.next
    else:
        core.outs = out.next
    if out.next != NULL:
        out.next.prev = out.prev
    free(out.buf)
    free(out.trailers)
    free(out)


cdef int _on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                          void *user_data) noexcept nogil:
    cdef h2_core *core = <h2_core*>user_data
    cdef h2_event *e
    _free_stream_out(core, <h2_stream_out*>nghttp2_session_get_stream_user_data(session, stream_id))
    nghttp2_session_set_stream_user_data(session, stream_id, NULL)
    if error_code != NGHTTP2_NO_ERROR:
        e = _push_event(core, H2_EV_RESET, stream_id)
        if e == NULL:
            return NGHTTP2_ERR_CALLBACK_FAILURE
        e.code = error_code
    return 0


cdef ssize_t _read_body(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                        uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept nogil:
    cdef h2_stream_out *out = <h2_stream_out*>source.ptr
    cdef size_t n = out.len - out.off
    if n > length:
        n = length
    memcpy(buf, out.buf + out.off, n)
    out.off += n
    if out.off == out.len:
        out.off = out.len = 0
        if out.end_requested:
            data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
            if out.trailers != NULL:
                if _submit_stored_trailers(session, stream_id, out) != 0:
                    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
                data_flags[0] |= NGHTTP2_DATA_FLAG_NO_END_STREAM
        elif n == 0:
            out.deferred = True
            return NGHTTP2_ERR_DEFERRED
    return <ssize_t>n


cdef int _submit_stored_trailers(nghttp2_session *session, int32_t stream_id,
                                 h2_stream_out *out) noexcept nogil:
    cdef nghttp2_nv *nva = <nghttp2_nv*>malloc((out.ntrailers + 1) * sizeof(nghttp2_nv))
    cdef size_t cursor = 0
    cdef uint32_t i
    cdef int rc
    if nva == NULL:
        return -1
    for i in range(out.ntrailers):
        nva[i].namelen = _get_u32(out.trailers + cursor)
        nva[i].valuelen = _get_u32(out.trailers + cursor + 4)
        nva[i].name = out.trailers + cursor + FIELD_HEADER
        nva[i].value = nva[i].name + nva[i].namelen
        nva[i].flags = NGHTTP2_NV_FLAG_NONE
        cursor += FIELD_HEADER + nva[i].namelen + nva[i].valuelen
    rc = nghttp2_submit_trailer(session, stream_id, nva, out.ntrailers)  # nghttp2 copies the fields
    free(nva)
    return rc


# -- the session ------------------------------------------------------------------------------------------

cdef int h2_core_init(h2_core *core, bint server, const h2_limits *limits) noexcept nogil:
    cdef nghttp2_session_callbacks *cbs = NULL
    cdef nghttp2_option *opt = NULL
    cdef nghttp2_settings_entry iv[5]
    cdef int rc
    memset(core, 0, sizeof(h2_core))
    core.server = server
    core.limits = limits[0]
    core.reset_tokens = limits.reset_burst
    core.reset_refilled_ns = _now_ns()
    rc = nghttp2_session_callbacks_new(&cbs)
    if rc != 0:
        return rc
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, _on_begin_headers)
    nghttp2_session_callbacks_set_on_header_callback(cbs, _on_header)
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, _on_frame_recv)
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, _on_frame_send)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, _on_data_chunk)
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, _on_stream_close)
    nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cbs, _on_invalid_frame)
    rc = nghttp2_option_new(&opt)
    if rc != 0:
        nghttp2_session_callbacks_del(cbs)
        return rc
    # Credit goes back to the peer only once the application forwarded the bytes (h2_consume): a slow
    # upstream then throttles the downstream peer instead of growing our buffers.
    nghttp2_option_set_no_auto_window_update(opt, 1)
    nghttp2_option_set_peer_max_concurrent_streams(opt, limits.max_concurrent_streams)
    nghttp2_option_set_max_outbound_ack(opt, _MAX_OUTBOUND_ACK)
    nghttp2_option_set_max_settings(opt, _MAX_SETTINGS_ENTRIES)
    nghttp2_option_set_stream_reset_rate_limit(opt, limits.reset_burst, limits.reset_rate)
    nghttp2_option_set_max_continuations(opt, _MAX_CONTINUATIONS)
    if server:
        rc = nghttp2_session_server_new2(&core.session, cbs, core, opt)
    else:
        rc = nghttp2_session_client_new2(&core.session, cbs, core, opt)
    nghttp2_option_del(opt)
    nghttp2_session_callbacks_del(cbs)
    if rc != 0:
        core.session = NULL
        return rc
    iv[0].settings_id, iv[0].value = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams
    iv[1].settings_id, iv[1].value = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, limits.stream_window
    iv[2].settings_id, iv[2].value = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_size
    iv[3].settings_id, iv[3].value = NGHTTP2_SETTINGS_ENABLE_PUSH, 0
    rc = nghttp2_submit_settings(core.session, NGHTTP2_FLAG_NONE, iv, 3 if server else 4)
    if rc == 0:
        rc = nghttp2_session_set_local_window_size(core.session, NGHTTP2_FLAG_NONE, 0,
                                                   <int32_t>limits.connection_window)
    return rc


cdef void h2_core_free(h2_core *core) noexcept nogil:
    # nghttp2_session_del calls no on_stream_close, so the send buffers are freed from our own list.
    while core.outs != NULL:
        _free_stream_out(core, core.outs)
    if core.session != NULL:
        nghttp2_session_del(core.session)
        core.session = NULL
    free(core.events)
    free(core.arena)
    core.events, core.arena = NULL, NULL
    core.nevents = core.events_cap = core.arena_len = core.arena_cap = 0


cdef ssize_t h2_recv(h2_core *core, const uint8_t *data, size_t length) noexcept nogil:
    cdef ssize_t rc
    if core.fatal:
        return core.fatal
    rc = nghttp2_session_mem_recv(core.session, data, length)
    if rc < 0:
        core.fatal = <int>rc
        if rc != NGHTTP2_ERR_FLOODED:
            # Tell the peer why (a GOAWAY is queued unless the peer is not reading anyway).
            nghttp2_session_terminate_session(core.session, NGHTTP2_PROTOCOL_ERROR)
    elif core.oom:
        core.fatal = NGHTTP2_ERR_NOMEM
        nghttp2_session_terminate_session(core.session, NGHTTP2_INTERNAL_ERROR)
        return NGHTTP2_ERR_NOMEM
    return rc


cdef ssize_t h2_pull(h2_core *core, const uint8_t **data) noexcept nogil:
    cdef ssize_t n = nghttp2_session_mem_send(core.session, data)
    if n < 0 and not core.fatal:
        core.fatal = <int>n
    return n


cdef int32_t h2_send_headers(h2_core *core, int32_t stream_id, const nghttp2_nv *nva, size_t nvlen,
                             bint end_stream) noexcept nogil:
    """A request (client, stream_id < 0), a response or an informational head (server). Unless the
    message ends here, a body provider is attached that sends what h2_send_data queues."""
    cdef nghttp2_data_provider provider
    cdef h2_stream_out *out = NULL
    cdef int32_t rc
    if stream_id > 0 and nvlen and nva[0].namelen == 7 and nva[0].valuelen == 3 and nva[0].value[0] == b'1':
        # Informational (1xx, :status first): a HEADERS frame that neither ends the stream nor
        # starts the body.
        return nghttp2_submit_headers(core.session, NGHTTP2_FLAG_END_HEADERS, stream_id, NULL, nva, nvlen,
                                      NULL)
    if not end_stream:
        out = _new_stream_out(core)
        if out == NULL:
            return NGHTTP2_ERR_NOMEM
        out.provider_attached = True
        provider.source.ptr = out
        provider.read_callback = _read_body
    if stream_id < 0:
        rc = nghttp2_submit_request(core.session, NULL, nva, nvlen, &provider if out else NULL, out)
        if rc > 0 and out != NULL:
            out.stream_id = rc
    else:
        if out != NULL:
            out.stream_id = stream_id
        rc = nghttp2_submit_response(core.session, stream_id, nva, nvlen, &provider if out else NULL)
        if rc == 0 and out != NULL:
            nghttp2_session_set_stream_user_data(core.session, stream_id, out)
    if rc < 0:
        _free_stream_out(core, out)
    return rc


cdef h2_stream_out *_out_for(h2_core *core, int32_t stream_id) noexcept nogil:
    """The send buffer of a stream. A request's stream exists in nghttp2 only once its HEADERS went out,
    so until then (a connection still connecting) its buffer is found in the core's own list."""
    cdef h2_stream_out *out = <h2_stream_out*>nghttp2_session_get_stream_user_data(core.session, stream_id)
    if out != NULL:
        return out
    out = core.outs
    while out != NULL and out.stream_id != stream_id:
        out = out.next
    return out


cdef int h2_send_data(h2_core *core, int32_t stream_id, const uint8_t *data, size_t length,
                      bint end_stream) noexcept nogil:
    cdef h2_stream_out *out = _out_for(core, stream_id)
    cdef size_t cap
    cdef uint8_t *grown
    if out == NULL or not out.provider_attached or out.end_requested:
        return NGHTTP2_ERR_STREAM_CLOSED
    if length:
        if out.off and out.len + length > out.cap:
            memmove(out.buf, out.buf + out.off, out.len - out.off)
            out.len -= out.off
            out.off = 0
        if out.len + length > out.cap:
            cap = out.cap if out.cap else 16384
            while cap < out.len + length:
                cap *= 2
            grown = <uint8_t*>realloc(out.buf, cap)
            if grown == NULL:
                return NGHTTP2_ERR_NOMEM
            out.buf, out.cap = grown, cap
        memcpy(out.buf + out.len, data, length)
        out.len += length
    out.end_requested = end_stream
    if out.deferred:
        out.deferred = False
        return nghttp2_session_resume_data(core.session, stream_id)
    return 0


cdef int h2_send_trailers(h2_core *core, int32_t stream_id, const nghttp2_nv *nva, size_t nvlen) noexcept nogil:
    cdef h2_stream_out *out = _out_for(core, stream_id)
    cdef size_t total = 0, i, at = 0
    if out == NULL or not out.provider_attached or out.end_requested:
        return NGHTTP2_ERR_STREAM_CLOSED
    for i in range(nvlen):
        total += FIELD_HEADER + nva[i].namelen + nva[i].valuelen
    out.trailers = <uint8_t*>malloc(total if total else 1)
    if out.trailers == NULL:
        return NGHTTP2_ERR_NOMEM
    for i in range(nvlen):
        _put_u32(out.trailers + at, <uint32_t>nva[i].namelen)
        _put_u32(out.trailers + at + 4, <uint32_t>nva[i].valuelen)
        memcpy(out.trailers + at + FIELD_HEADER, nva[i].name, nva[i].namelen)
        memcpy(out.trailers + at + FIELD_HEADER + nva[i].namelen, nva[i].value, nva[i].valuelen)
        at += FIELD_HEADER + nva[i].namelen + nva[i].valuelen
    out.trailers_len, out.ntrailers = total, <uint32_t>nvlen
    return h2_send_data(core, stream_id, NULL, 0, True)


cdef size_t h2_pending(h2_core *core, int32_t stream_id) noexcept nogil:
    cdef h2_stream_out *out = _out_for(core, stream_id)
    return 0 if out == NULL else out.len - out.off


cdef int h2_consume(h2_core *core, int32_t stream_id, size_t length) noexcept nogil:
    cdef int rc = nghttp2_session_consume(core.session, stream_id, length)
    # The stream may have closed meanwhile; its bytes still count against the connection window.
    if rc == NGHTTP2_ERR_INVALID_ARGUMENT:
        return 0
    return rc


cdef int h2_reset(h2_core *core, int32_t stream_id, uint32_t error_code) noexcept nogil:
    return nghttp2_submit_rst_stream(core.session, NGHTTP2_FLAG_NONE, stream_id, error_code)


cdef int h2_goaway(h2_core *core, uint32_t error_code) noexcept nogil:
    if error_code == NGHTTP2_NO_ERROR:
        # Graceful: in-flight streams finish; the last stream id is the last one we processed.
        return nghttp2_submit_goaway(core.session, NGHTTP2_FLAG_NONE,
                                     nghttp2_session_get_last_proc_stream_id(core.session),
                                     error_code, NULL, 0)
    return nghttp2_session_terminate_session(core.session, error_code)


cdef int h2_wants(h2_core *core) noexcept nogil:
    if core.session == NULL:
        return 0
    return ((1 if nghttp2_session_want_read(core.session) else 0)
            | (2 if nghttp2_session_want_write(core.session) else 0))


cdef bint h2_can_open_stream(h2_core *core) noexcept nogil:
    return core.fatal == 0 and nghttp2_session_check_request_allowed(core.session) != 0


cdef uint32_t h2_peer_max_streams(h2_core *core) noexcept nogil:
    return nghttp2_session_get_remote_settings(core.session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS)


# -- Python API -------------------------------------------------------------------------------------------

class H2Error(Exception):
    """A call the session refused (the nghttp2 error text says why)."""


cdef tuple _fields(h2_core *core, size_t off, uint32_t n):
    cdef size_t cursor = off
    cdef const uint8_t *name
    cdef const uint8_t *value
    cdef size_t namelen, valuelen
    cdef uint32_t i
    cdef list out = []
    for i in range(n):
        h2_field_next(core, &cursor, &name, &namelen, &value, &valuelen)
        out.append(((<const char*>name)[:namelen], (<const char*>value)[:valuelen]))
    return tuple(out)


cdef class _NvArray:
    """Header fields as an nghttp2_nv array; keeps the Python bytes alive while nghttp2 copies them."""

    cdef nghttp2_nv *nva
    cdef size_t n
    cdef list keep

    def __cinit__(self, headers):
        cdef size_t i = 0
        cdef bytes name, value
        self.keep = [(bytes(k), bytes(v)) for k, v in headers]
        self.n = len(self.keep)
        self.nva = <nghttp2_nv*>malloc((self.n + 1) * sizeof(nghttp2_nv))
        if self.nva == NULL:
            raise MemoryError()
        for name, value in self.keep:
            self.nva[i].name = <uint8_t*><char*>name
            self.nva[i].namelen = len(name)
            self.nva[i].value = <uint8_t*><char*>value
            self.nva[i].valuelen = len(value)
            self.nva[i].flags = NGHTTP2_NV_FLAG_NONE
            i += 1

    def __dealloc__(self):
        free(self.nva)


cdef _check(int rc, str what):
    if rc < 0:
        raise H2Error(f"{what}: {nghttp2_strerror(rc).decode()}")
    return rc


cdef class H2Connection:
    """One HTTP/2 connection, server or client side, without I/O: `receive_data(bytes)` returns events
    (nodeproxy.proxy.http_events), `data_to_send()` returns the bytes to write. Received DATA counts
    against the flow-control windows until `acknowledge_received_data` (unless auto_acknowledge)."""

    cdef h2_core core
    cdef readonly bint client_side
    cdef public bint auto_acknowledge
    cdef set _requests_seen

    def __cinit__(self, *, bint client_side=False, bint auto_acknowledge=False,
                  int max_concurrent_streams=DEFAULT_MAX_CONCURRENT_STREAMS,
                  int stream_window=DEFAULT_STREAM_WINDOW,
                  int connection_window=DEFAULT_CONNECTION_WINDOW,
                  int max_header_list_size=DEFAULT_MAX_HEADER_LIST_SIZE,
                  int max_header_fields=DEFAULT_MAX_HEADER_FIELDS,
                  int max_empty_frames=DEFAULT_MAX_EMPTY_FRAMES,
                  int reset_burst=DEFAULT_RESET_BURST, int reset_rate=DEFAULT_RESET_RATE):
        cdef h2_limits limits
        if not (1 <= max_concurrent_streams and 65535 <= stream_window < 2**31
                and 65535 <= connection_window < 2**31 and max_header_fields >= 1):
            raise ValueError("HTTP/2 limits out of range")
        limits.max_concurrent_streams = max_concurrent_streams
        limits.stream_window = stream_window
        limits.connection_window = connection_window
        limits.max_header_list_size = max_header_list_size
        limits.max_header_fields = max_header_fields
        limits.max_empty_frames = max_empty_frames
        limits.reset_burst = reset_burst
        limits.reset_rate = reset_rate
        self.client_side = client_side
        self.auto_acknowledge = auto_acknowledge
        self._requests_seen = set()
        _check(h2_core_init(&self.core, not client_side, &limits), "creating the HTTP/2 session")

    def __dealloc__(self):
        h2_core_free(&self.core)

    @property
    def fatal_error(self) -> str | None:
        return nghttp2_strerror(self.core.fatal).decode() if self.core.fatal else None

    @property
    def want_read(self) -> bool:
        return bool(nghttp2_session_want_read(self.core.session))

    @property
    def want_write(self) -> bool:
        return bool(nghttp2_session_want_write(self.core.session))

    def receive_data(self, data: bytes) -> list:
        cdef const uint8_t *buf = <const uint8_t*><const char*>data
        cdef size_t length = len(data)
        cdef ssize_t rc
        with nogil:
            rc = h2_recv(&self.core, buf, length)
        events = self._take_events()
        if rc < 0:
            reason = nghttp2_strerror(<int>rc).decode()
            events.append(ev.ProtocolErrored(400, f"HTTP/2 connection error: {reason}"))
        return events

    def take_events(self) -> list:
        """Events that arose while sending (a stream we reset closes once its RST_STREAM is out)."""
        return self._take_events()

    cdef list _take_events(self):
        cdef size_t i
        cdef h2_event *e
        cdef list out = []
        for i in range(self.core.nevents):
            e = &self.core.events[i]
            if e.kind == H2_EV_HEADERS:
                out.append(self._head_event(e))
            elif e.kind == H2_EV_DATA:
                out.append(ev.DataReceived(e.stream_id, (<const char*>self.core.arena + e.off)[:e.len]))
                if self.auto_acknowledge:
                    h2_consume(&self.core, e.stream_id, e.len)
            elif e.kind == H2_EV_END_STREAM:
                out.append(ev.MessageEnded(e.stream_id))
            elif e.kind == H2_EV_RESET:
                out.append(ev.StreamReset(e.stream_id, e.code))
            elif e.kind == H2_EV_GOAWAY:
                out.append(ev.ConnectionClosed(e.last_stream_id, e.code))
            elif e.kind == H2_EV_HEADERS_TOO_LARGE:
                out.append(ev.ProtocolErrored(431, "header block over the field count or size limit",
                                              stream_id=e.stream_id))
        h2_clear_events(&self.core)
        return out

    cdef object _head_event(self, h2_event *e):
        fields = _fields(&self.core, e.off, e.nfields)
        pseudo = {k: v for k, v in fields if k[:1] == b":"}
        regular = tuple((k, v) for k, v in fields if k[:1] != b":")
        if e.code & H2_BLOCK_HAS_STATUS:
            return ev.ResponseReceived(e.stream_id, int(pseudo[b":status"]), regular, http_version=b"2")
        if e.code & H2_BLOCK_REQUEST and e.stream_id not in self._requests_seen:
            self._requests_seen.add(e.stream_id)
            return ev.RequestReceived(
                e.stream_id,
                method=pseudo.get(b":method", b""),
                target=pseudo.get(b":path", b""),
                authority=pseudo.get(b":authority", b""),
                headers=regular,
                http_version=b"2",
                scheme=pseudo.get(b":scheme", b""),
            )
        return ev.TrailersReceived(e.stream_id, regular)

    def data_to_send(self) -> bytes:
        cdef const uint8_t *chunk
        cdef ssize_t n
        parts = []
        while True:
            n = h2_pull(&self.core, &chunk)
            if n <= 0:
                break
            parts.append((<const char*>chunk)[:n])
        return b"".join(parts)

    def send_headers(self, stream_id: int | None, headers, end_stream: bool = False) -> int:
        """Client: stream_id None starts a request and returns its id. Server: a response on stream_id
        (an informational 1xx head when :status starts with 1). Pseudo-header fields come first."""
        cdef _NvArray nv = _NvArray(headers)
        cdef int32_t sid = -1 if stream_id is None else stream_id
        return _check(h2_send_headers(&self.core, sid, nv.nva, nv.n, end_stream), "sending headers")

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        cdef const uint8_t *buf = <const uint8_t*><const char*>data
        _check(h2_send_data(&self.core, stream_id, buf, len(data), end_stream), "sending data")

    def end_stream(self, stream_id: int) -> None:
        _check(h2_send_data(&self.core, stream_id, NULL, 0, True), "ending the stream")

    def send_trailers(self, stream_id: int, headers) -> None:
        cdef _NvArray nv = _NvArray(headers)
        _check(h2_send_trailers(&self.core, stream_id, nv.nva, nv.n), "sending trailers")

    def pending(self, stream_id: int) -> int:
        return h2_pending(&self.core, stream_id)

    def acknowledge_received_data(self, stream_id: int, length: int) -> None:
        _check(h2_consume(&self.core, stream_id, length), "acknowledging data")

    def reset_stream(self, stream_id: int, error_code: int = NGHTTP2_CANCEL) -> None:
        _check(h2_reset(&self.core, stream_id, error_code), "resetting the stream")

    def close_connection(self, error_code: int = 0) -> None:
        _check(h2_goaway(&self.core, error_code), "sending GOAWAY")

    def remote_window(self, stream_id: int = 0) -> int:
        if stream_id:
            return nghttp2_session_get_stream_remote_window_size(self.core.session, stream_id)
        return nghttp2_session_get_remote_window_size(self.core.session)
