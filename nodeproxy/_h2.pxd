# cython: language_level=3
"""Sans-IO HTTP/2 session on libnghttp2: bytes in, events out, bytes to send.

libnghttp2 (Debian 1.52, with the Rapid Reset and CONTINUATION flood fixes backported) brings the frame
codec, HPACK, the stream state machine, flow control accounting and the RFC 9113 section 8 checks
(pseudo-headers, connection-specific fields, `te`, content-length against DATA). This module adds what a
proxy needs around it: an event queue that owns its bytes, per-stream send buffers that stream bodies
without copying them whole, receive-side flow control released only when the application says it forwarded
the bytes (so a slow upstream throttles the downstream peer instead of growing memory), and guards for the
DoS classes nghttp2 1.52 leaves to the application (empty-frame floods, header-list bombs, resets we are
made to send).

Everything below is `nogil` C state: the L7 engine thread drives an `h2_core` without the GIL, and the
Python class `H2Connection` in _h2.pyx is a thin wrapper over the same functions (for tests and slow paths).
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "nghttp2/nghttp2.h" nogil:
    ctypedef struct nghttp2_session:
        pass
    ctypedef struct nghttp2_session_callbacks:
        pass
    ctypedef struct nghttp2_option:
        pass

    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags

    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags

    ctypedef enum nghttp2_headers_category:
        NGHTTP2_HCAT_REQUEST
        NGHTTP2_HCAT_RESPONSE
        NGHTTP2_HCAT_PUSH_RESPONSE
        NGHTTP2_HCAT_HEADERS

    ctypedef struct nghttp2_headers:
        nghttp2_frame_hd hd
        nghttp2_headers_category cat

    ctypedef struct nghttp2_rst_stream:
        nghttp2_frame_hd hd
        uint32_t error_code

    ctypedef struct nghttp2_goaway:
        nghttp2_frame_hd hd
        int32_t last_stream_id
        uint32_t error_code

    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
        nghttp2_headers headers
        nghttp2_rst_stream rst_stream
        nghttp2_goaway goaway

    ctypedef union nghttp2_data_source:
        int fd
        void *ptr

    ctypedef ssize_t (*nghttp2_data_source_read_callback)(
        nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
        uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept

    ctypedef struct nghttp2_data_provider:
        nghttp2_data_source source
        nghttp2_data_source_read_callback read_callback

    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value

    ctypedef int (*nghttp2_on_begin_headers_callback)(
        nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept
    ctypedef int (*nghttp2_on_header_callback)(
        nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
        const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) noexcept
    ctypedef int (*nghttp2_on_frame_recv_callback)(
        nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept
    ctypedef int (*nghttp2_on_frame_send_callback)(
        nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept
    ctypedef int (*nghttp2_on_data_chunk_recv_callback)(
        nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data, size_t len,
        void *user_data) noexcept
    ctypedef int (*nghttp2_on_stream_close_callback)(
        nghttp2_session *session, int32_t stream_id, uint32_t error_code, void *user_data) noexcept
    ctypedef int (*nghttp2_on_invalid_frame_recv_callback)(
        nghttp2_session *session, const nghttp2_frame *frame, int lib_error_code, void *user_data) noexcept

    enum:
        NGHTTP2_DATA
        NGHTTP2_HEADERS
        NGHTTP2_RST_STREAM
        NGHTTP2_SETTINGS
        NGHTTP2_PING
        NGHTTP2_GOAWAY
        NGHTTP2_WINDOW_UPDATE
        NGHTTP2_CONTINUATION
        NGHTTP2_FLAG_NONE
        NGHTTP2_FLAG_END_STREAM
        NGHTTP2_FLAG_END_HEADERS
        NGHTTP2_NV_FLAG_NONE
        NGHTTP2_DATA_FLAG_EOF
        NGHTTP2_DATA_FLAG_NO_END_STREAM
        NGHTTP2_SETTINGS_HEADER_TABLE_SIZE
        NGHTTP2_SETTINGS_ENABLE_PUSH
        NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        NGHTTP2_SETTINGS_MAX_FRAME_SIZE
        NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        NGHTTP2_NO_ERROR
        NGHTTP2_PROTOCOL_ERROR
        NGHTTP2_INTERNAL_ERROR
        NGHTTP2_FLOW_CONTROL_ERROR
        NGHTTP2_REFUSED_STREAM
        NGHTTP2_CANCEL
        NGHTTP2_ENHANCE_YOUR_CALM
        NGHTTP2_ERR_DEFERRED
        NGHTTP2_ERR_CALLBACK_FAILURE
        NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        NGHTTP2_ERR_NOMEM
        NGHTTP2_ERR_FLOODED
        NGHTTP2_ERR_INVALID_ARGUMENT
        NGHTTP2_ERR_STREAM_CLOSED

    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks)
    void nghttp2_session_callbacks_set_on_begin_headers_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_begin_headers_callback cb)
    void nghttp2_session_callbacks_set_on_header_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_header_callback cb)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_frame_recv_callback cb)
    void nghttp2_session_callbacks_set_on_frame_send_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_frame_send_callback cb)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_data_chunk_recv_callback cb)
    void nghttp2_session_callbacks_set_on_stream_close_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_stream_close_callback cb)
    void nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(
        nghttp2_session_callbacks *cbs, nghttp2_on_invalid_frame_recv_callback cb)

    int nghttp2_option_new(nghttp2_option **option_ptr)
    void nghttp2_option_del(nghttp2_option *option)
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val)
    void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *option, uint32_t val)
    void nghttp2_option_set_max_outbound_ack(nghttp2_option *option, size_t val)
    void nghttp2_option_set_max_settings(nghttp2_option *option, size_t val)
    void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst, uint64_t rate)
    void nghttp2_option_set_max_continuations(nghttp2_option *option, size_t val)
    void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *option, size_t val)

    int nghttp2_session_server_new2(nghttp2_session **session_ptr, const nghttp2_session_callbacks *callbacks,
                                    void *user_data, const nghttp2_option *option)
    int nghttp2_session_client_new2(nghttp2_session **session_ptr, const nghttp2_session_callbacks *callbacks,
                                    void *user_data, const nghttp2_option *option)
    void nghttp2_session_del(nghttp2_session *session)
    ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const uint8_t *data, size_t inlen)
    ssize_t nghttp2_session_mem_send(nghttp2_session *session, const uint8_t **data_ptr)
    int nghttp2_session_want_read(nghttp2_session *session)
    int nghttp2_session_want_write(nghttp2_session *session)
    int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size)
    int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id)
    int nghttp2_session_set_local_window_size(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                                              int32_t window_size)
    int nghttp2_session_set_stream_user_data(nghttp2_session *session, int32_t stream_id, void *data)
    void *nghttp2_session_get_stream_user_data(nghttp2_session *session, int32_t stream_id)
    int nghttp2_session_terminate_session(nghttp2_session *session, uint32_t error_code)
    int nghttp2_session_get_stream_remote_window_size(nghttp2_session *session, int32_t stream_id)
    int nghttp2_session_get_remote_window_size(nghttp2_session *session)
    int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session)
    int nghttp2_session_check_request_allowed(nghttp2_session *session)
    uint32_t nghttp2_session_get_remote_settings(nghttp2_session *session, int settings_id)
    int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags, const nghttp2_settings_entry *iv,
                                size_t niv)
    int32_t nghttp2_submit_request(nghttp2_session *session, const void *pri_spec, const nghttp2_nv *nva,
                                   size_t nvlen, const nghttp2_data_provider *data_prd, void *stream_user_data)
    int nghttp2_submit_response(nghttp2_session *session, int32_t stream_id, const nghttp2_nv *nva,
                                size_t nvlen, const nghttp2_data_provider *data_prd)
    int32_t nghttp2_submit_headers(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                                   const void *pri_spec, const nghttp2_nv *nva, size_t nvlen,
                                   void *stream_user_data)
    int nghttp2_submit_trailer(nghttp2_session *session, int32_t stream_id, const nghttp2_nv *nva,
                               size_t nvlen)
    int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                                  uint32_t error_code)
    int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id,
                              uint32_t error_code, const uint8_t *opaque_data, size_t opaque_data_len)
    int nghttp2_submit_shutdown_notice(nghttp2_session *session)
    const char *nghttp2_strerror(int lib_error_code)
    int nghttp2_is_fatal(int lib_error_code)


# Event kinds of the queue (the Python wrapper maps them onto nodeproxy.proxy.http_events).
cdef enum H2EventKind:
    H2_EV_HEADERS = 1     # a complete header block: request, response (also 1xx) or trailers
    H2_EV_DATA = 2        # DATA payload (padding removed); acknowledge it with h2_consume once forwarded
    H2_EV_END_STREAM = 3  # the peer ended its side of the stream
    H2_EV_RESET = 4       # the stream closed with an error code (RST_STREAM either way, or a stream error)
    H2_EV_GOAWAY = 5      # the peer sent GOAWAY: no streams above last_stream_id will be processed
    H2_EV_HEADERS_TOO_LARGE = 6  # a header block broke the field-count or size limit (answer 431)

# Header-block flags of an H2_EV_HEADERS event.
cdef enum:
    H2_BLOCK_HAS_STATUS = 1   # carries :status (a response head, possibly informational)
    H2_BLOCK_END_STREAM = 2   # the block also ended the stream (a body-less message or trailers)
    H2_BLOCK_REQUEST = 4      # the first block of a peer-initiated stream (server side: a request)


cdef struct h2_event:
    int kind
    int32_t stream_id
    uint32_t code         # error code (RESET, GOAWAY), header flags (HEADERS)
    int32_t last_stream_id  # GOAWAY
    size_t off            # into h2_core.arena: DATA bytes, or the header block (see h2_field_at)
    size_t len
    uint32_t nfields


cdef struct h2_stream_out:
    # What is still to be sent on one stream: body bytes queued by the application, and whether the
    # stream ends (with or without trailers) once they are out. Owned by the core (listed in
    # h2_core.outs, since nghttp2_session_del calls no callback); freed when the stream closes.
    h2_stream_out *next
    h2_stream_out *prev
    int32_t stream_id      # set once known (a request's id comes back from h2_send_headers)
    uint8_t *buf
    size_t off
    size_t len
    size_t cap
    bint end_requested
    bint deferred          # the read callback said DEFERRED; h2_send_data resumes it
    bint provider_attached
    uint8_t *trailers      # encoded like header blocks in the arena; NULL when there are none
    size_t trailers_len
    uint32_t ntrailers


cdef struct h2_limits:
    uint32_t max_concurrent_streams   # SETTINGS_MAX_CONCURRENT_STREAMS we announce (100)
    uint32_t stream_window            # SETTINGS_INITIAL_WINDOW_SIZE we announce (1 MiB)
    uint32_t connection_window        # our connection receive window (8 MiB)
    uint32_t max_header_list_size     # decoded bytes of one header block (64 KiB)
    uint32_t max_header_fields        # fields of one header block (100)
    uint32_t max_empty_frames         # empty DATA / HEADERS-less frames tolerated per connection (100)
    uint32_t reset_burst              # RST_STREAM frames (sent or received) before rate limiting (1000)
    uint32_t reset_rate               # refill of that bucket per second (100)


cdef struct h2_core:
    nghttp2_session *session
    bint server
    h2_limits limits
    h2_event *events
    size_t nevents
    size_t events_cap
    uint8_t *arena
    size_t arena_len
    size_t arena_cap
    # The header block being received.
    int32_t block_stream
    size_t block_off
    uint32_t block_fields
    uint32_t block_flags
    bint block_too_large
    # Guards.
    uint32_t empty_frames
    double reset_tokens
    int64_t reset_refilled_ns
    h2_stream_out *outs      # every live send buffer, so h2_core_free frees them all
    int fatal                # the nghttp2 error that ended the session (0 while healthy)
    bint oom


cdef int h2_core_init(h2_core *core, bint server, const h2_limits *limits) noexcept nogil
cdef void h2_core_free(h2_core *core) noexcept nogil
cdef void h2_default_limits(h2_limits *limits) noexcept nogil
# Feed received bytes; returns bytes consumed or a negative nghttp2 error (fatal: the session is over,
# the GOAWAY it queued is still worth sending). Events accumulate until h2_clear_events.
cdef ssize_t h2_recv(h2_core *core, const uint8_t *data, size_t length) noexcept nogil
# Next chunk of bytes to send (valid until the next call); 0 when there is nothing to send.
cdef ssize_t h2_pull(h2_core *core, const uint8_t **data) noexcept nogil
cdef void h2_clear_events(h2_core *core) noexcept nogil
# Send a header block. stream_id < 0 (client side): a new request stream; returns its id.
cdef int32_t h2_send_headers(h2_core *core, int32_t stream_id, const nghttp2_nv *nva, size_t nvlen,
                             bint end_stream) noexcept nogil
cdef int h2_send_data(h2_core *core, int32_t stream_id, const uint8_t *data, size_t length,
                      bint end_stream) noexcept nogil
cdef int h2_send_trailers(h2_core *core, int32_t stream_id, const nghttp2_nv *nva, size_t nvlen) noexcept nogil
# Bytes queued on a stream and not yet framed (the engine stops reading the source above a bound).
cdef size_t h2_pending(h2_core *core, int32_t stream_id) noexcept nogil
# Release flow-control credit for bytes of DATA the application has forwarded.
cdef int h2_consume(h2_core *core, int32_t stream_id, size_t length) noexcept nogil
cdef int h2_reset(h2_core *core, int32_t stream_id, uint32_t error_code) noexcept nogil
cdef int h2_goaway(h2_core *core, uint32_t error_code) noexcept nogil
# Walk the fields of a header block: start with *cursor = event.off, call nfields times. A field is
# stored as [u32 name length][u32 value length][name][value].
cdef void h2_field_next(const h2_core *core, size_t *cursor, const uint8_t **name, size_t *namelen,
                        const uint8_t **value, size_t *valuelen) noexcept nogil
# Does the session still want to read (bit 1) or write (bit 2)? 0: it is over (both sides done with it).
cdef int h2_wants(h2_core *core) noexcept nogil
# Can a new request stream be opened (client side)? False after GOAWAY or when stream ids ran out.
cdef bint h2_can_open_stream(h2_core *core) noexcept nogil
# The peer's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited until its SETTINGS arrive: 0xffffffff).
cdef uint32_t h2_peer_max_streams(h2_core *core) noexcept nogil
