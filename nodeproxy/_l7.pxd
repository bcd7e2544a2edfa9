# Declarations for nodeproxy/_l7.pyx: the HTTP engine thread (HTTP/1.1), its C API and handle layouts.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from nodeproxy._h1 cimport h1_body, h1_field_ref, h1_head, h1_limits
from nodeproxy._h2 cimport h2_core, nghttp2_nv


from nodeproxy._posix cimport *  # the C API, declared once
from nodeproxy._sockets cimport now_ns, set_reset_on_close, sock_error


# -- engine constants ------------------------------------------------------------------------------

cdef enum:
    KIND_DOWN = 1          # epoll data.ptr points at a Down (first member `kind`)
    KIND_UP = 2            # ... at an Up
    EVENTS_PER_WAIT = 256
    IO_CHUNK = 65536       # one recv's worth of body bytes
    # Stop reading a side while its peer holds more unsent bytes than this (backpressure). Memory per
    # exchange is bounded by about HIGH_WATER + IO_CHUNK per direction.
    HIGH_WATER = 262144
    READS_PER_TURN = 16    # reads per exchange per wake-up before yielding to other connections
    SCAN_MS = 100          # timeouts (header, connect, idle, linger) are checked this often; per-try
                           # deadlines wake the loop when they are due
    LINGER_MS = 2000       # after a final response: how long unread client bytes are drained before close,
                           # so the close does not turn into an RST that destroys the response in flight
    POOL_BUCKETS = 1024    # hash buckets of the upstream pool table (chained)
    POOL_SWEEP_SCANS = 100 # empty pools are freed every this many scans (10 s)
    FLAG_TEXT_MAX = 16
    MESH_TOKEN_LEN = 16    # bytes of the secret in the PROXY v2 header to the mesh entry (set_mesh_entry)
    # PROXY protocol v2 header to the mesh entry: 12-byte signature, version/command, family, length (16
    # bytes), IPv4 addresses and ports (12), one TLV (type, 2-byte length) with the token.
    PROXY_V2_HEADER_LEN = 16 + 12 + 3 + MESH_TOKEN_LEN
    SNIFF_BYTES = 8192     # peeked to tell HTTP/1 from anything else; a longer request line counts as HTTP
    # HTTP/2 streams: response bytes held per stream, both before framing (Down.outb) and framed but not
    # yet within the client's window (the h2 core's stream buffer), stop reading the upstream above this.
    # With 100 streams a connection that never opens its window holds about 100 x (2 x 64 KiB + IO_CHUNK).
    H2_STREAM_HIGH_WATER = 65536
    H2_PREFACE_LEN = 24
    H2_UP_MAX_STREAMS = 100  # streams per upstream HTTP/2 connection before another one opens (Envoy: 100)
    H2_NV_MAX = 132        # pseudo-headers + H1_FIELDS_CAP fields of one translated head or trailer block


# Record kinds posted to Python (mirrored as module constants).
cdef enum RecordKind:
    REC_HEAD = 1             # a complete request head waits for a decision
    REC_DONE = 2             # a request ended (answered, failed or abandoned): status, bytes, timings, flags
    REC_ATTEMPT_FAILED = 3   # the upstream attempt failed before a response: decide again (or reply)
    REC_CONN_CLOSED = 4      # a downstream connection is gone (exactly one per adopted connection)
    REC_UPGRADED = 5         # after a 101: both sockets handed to Python for the L4 relay (then CONN_CLOSED)
    REC_NOT_HTTP = 6         # an `auto` connection is not HTTP/1 (or stayed silent): its socket, unread,
                             # goes back to Python for the L4 relay (then CONN_CLOSED)


# Response flags (Envoy's vocabulary) as bits in REC_DONE / REC_ATTEMPT_FAILED records.
cdef enum:
    FLAG_DPE = 1        # downstream protocol error
    FLAG_UF = 2         # upstream connect failure
    FLAG_UC = 4         # upstream connection reset / closed before the response completed
    FLAG_UT = 8         # upstream request (per try) timeout
    # 16: unused (a request head timeout is DPE, as docs/config.md lists it)
    FLAG_DC = 32        # downstream connection terminated before the response completed
    FLAG_UPE = 64       # upstream protocol error (a malformed response)
    FLAG_LR = 128       # a local reply decided in Python (its own flag text, e.g. NR, UH, is in the log)


cdef enum DownState:
    D_HEAD = 0         # reading / parsing a request head
    D_DECIDING = 1     # head posted to Python, waiting for its answer
    D_WAIT_CONN = 2    # forwarded, waiting for a pooled connection to free up (pool at max_conns)
    D_EXCHANGE = 3     # bound to an upstream: request body and response stream
    D_TUNNEL = 4       # after a 101: raw bytes both ways
    D_CLOSING = 5      # final bytes flushing, then FIN, then unread client bytes drained until EOF/linger
    D_H2 = 6           # an HTTP/2 connection: frames both ways; each stream is a child Down of its own
    D_HELD = 7         # a response head is held (hold_min_status): ATTEMPT_FAILED posted, up kept, nothing
                       # read or sent on either side until Python releases it, retries or replies


# Why an attempt failed (REC_ATTEMPT_FAILED's failure item; module constants FAIL_*).
cdef enum FailureKind:
    FAILURE_CONNECT = 1         # no connection: refused, unreachable, connect timeout, out of descriptors
    FAILURE_REFUSED_STREAM = 2  # HTTP/2 upstream: RST_STREAM(REFUSED_STREAM) or above a GOAWAY's last id
    FAILURE_RESET = 3           # closed / reset / malformed (flags UPE) after the head went, before a response
    FAILURE_TIMEOUT = 4         # try_timeout_ms passed before the response head
    FAILURE_HELD = 5            # a response head is held (status / grpc_status say which)


# What an Answer does.
cdef enum AnswerKind:
    ANSWER_FORWARD = 0
    ANSWER_REPLY = 1
    ANSWER_RELEASE = 2


cdef enum UpState:
    U_CONNECTING = 0
    U_BUSY = 1
    U_IDLE = 2


cdef struct Buf:
    # Bytes [off, len) are valid; capacity cap. Consumption moves off; compaction moves bytes to 0.
    unsigned char *data
    size_t off
    size_t len
    size_t cap


cdef struct Edits:
    # Header edits of one forward decision; one allocation holds the refs and the bytes they point at.
    h1_field_ref *req_add
    uint32_t nreq_add
    h1_field_ref *req_remove
    uint32_t nreq_remove
    h1_field_ref *resp_add
    uint32_t nresp_add
    h1_field_ref *resp_remove
    uint32_t nresp_remove


cdef struct Pool
cdef struct Up
cdef struct Down


cdef struct H2Up:
    # The HTTP/2 session of an upstream connection (Up.h2). Its streams are stream Ups (Up.h2_stream,
    # no socket): the exchange machine writes the request into one as HTTP/1.1 and reads the response
    # from it as HTTP/1.1, translated here, so an HTTP/1.1 or HTTP/2 client needs no other code.
    h2_core core
    Up *streams               # stream Ups (linked by sib_next / sib_prev)
    uint32_t nstreams
    bint goaway               # the server sent GOAWAY: no new stream here
    bint finished             # the session is over (error, EOF, GOAWAY with nothing left)


cdef struct H2Conn:
    # The HTTP/2 session of a downstream connection (Down.h2, state D_H2). Its streams are child Downs
    # (Down.parent): each runs the HTTP/1.1 exchange machine on a translated head and body, so routing,
    # pooling, retries and local replies are the same code for both protocols.
    h2_core core
    Down *streams             # child Downs (linked by sib_next / sib_prev)
    uint32_t nstreams
    bint goaway_sent
    bint peer_goaway
    bint finished             # the session is over: flush what is queued, then close


cdef struct Down:
    int kind                  # KIND_DOWN: must stay first
    int fd
    uint64_t conn_id
    uint32_t slot             # index in HttpWorker.slots; request ids are slot << 32 | per-slot sequence
    uint64_t request_id
    uint32_t source_ip        # network order; 0: connect upstream from the node's own address
    DownState state
    Buf inb                   # client bytes not yet consumed
    Buf outb                  # bytes for the client not yet sent
    Buf orig                  # the current request head as received (spans of `req` point into it)
    Buf fwd                   # the head to forward (kept for a retry on a fresh connection)
    bint readable
    bint writable
    bint rdhup                # EPOLLRDHUP seen: read on past a short read until recv returns 0
    bint peer_eof
    bint shut_wr
    h1_head req
    h1_body req_body
    bint request_open         # a head was posted and its REC_DONE not yet
    bint req_done             # the whole request (head, body, trailers) went upstream, or was abandoned
    bint req_abandoned        # the upstream stopped taking the request body (it may answer early)
    bint resp_head_sent
    bint resp_done
    bint method_head
    bint client_keep_alive
    bint close_after
    bint dechunk              # HTTP/1.0 client, chunked response: forward payload only, end by close
    bint head_idle            # D_HEAD between requests: the deadline is the keep-alive idle timeout
    bint sniffing             # `auto` port, first bytes not seen yet: peek, never read
    bint stale_retried        # a reused pooled connection failed before answering; retried once fresh
    # HTTP/2 (see H2Conn): h2 set on the connection's Down; parent, stream_id and the rest on a stream's.
    H2Conn *h2
    Down *parent
    Down *sib_next
    Down *sib_prev
    int32_t stream_id
    bint h2_chunked           # the request body is re-framed as chunked (no content-length was given)
    bint h2_req_ended         # the client ended its side (END_STREAM); the body's end went into inb
    bint h2_reset_by_peer     # the stream is closed on the client's side: nothing more to send on it
    bint h2_resp_head_done    # the response head went out as HEADERS
    bint h2_resp_done         # the whole response went to the h2 core (END_STREAM queued)
    bint h2_blocked           # emission waits for the stream's framed bytes to drain
    bint grpc                 # content-type application/grpc: local replies are gRPC trailers-only
    int grpc_status           # for a local reply decided in Python: the grpc-status it asked for (-1)
    uint64_t h2_owed          # DATA payload bytes received and not yet credited back (h2_consume)
    h1_head h2_resp           # the response head (then trailers) parsed back out of outb
    h1_body h2_resp_body
    uint32_t h2_reset_code    # the error code to reset the stream with when it fails (0: INTERNAL_ERROR)
    bint up_http2             # the current decision speaks HTTP/2 to the upstream
    bint up_via_mesh          # the current decision goes through the mesh entry (the mTLS tunnel)
    # Resilience, set by an 11-item forward (HttpWorker.answer); all off for the 8/9-item forms.
    bint resilient            # an attempt failing before the final response head posts ATTEMPT_FAILED and
                              # the request waits (D_DECIDING), instead of a local 502 UC / 504 UT
    uint16_t hold_min_status  # 0: hold nothing; else a final head with status >= this is held (D_HELD)
    uint32_t replay_limit     # bytes of the request body (as forwarded, chunk framing included) kept
    bint replayable           # every request body byte forwarded so far is in `replay`
    Buf replay                # copy of the forwarded request body, resent after the head on a retry
    int64_t t_sent_ns         # this attempt's head was handed to a connected upstream (0: not yet)
    int64_t response_ns       # head handed upstream -> final response head, of the attempt the client got
    int grpc_seen             # the grpc-status the client got (head or trailers), -1 if none
    Up *up
    Pool *waiting_pool
    Down *wait_next
    Down *wait_prev
    sockaddr_in dst
    Edits *edits
    int64_t try_timeout_ns
    int64_t deadline_ns       # header / idle / per-try / linger deadline (0: none), by state
    int64_t t_head_start_ns
    int64_t t_head_ns
    int64_t t_forward_ns
    int64_t t_resp_ns
    uint64_t req_body_bytes   # request bytes after the head sent upstream
    uint64_t resp_bytes       # response bytes (head and body) queued for the client
    uint16_t status
    uint32_t flags
    uint32_t attempts
    uint32_t requests         # request heads seen on this connection
    bint reused
    bint queued
    bint dead
    Down *ready_next
    Down *grave_next
    Down *prev
    Down *next


cdef struct Up:
    int kind                  # KIND_UP: must stay first
    int fd
    UpState state
    Pool *pool                # NULL once detached (a tunnel after 101)
    Down *down
    Buf inb
    Buf outb
    bint readable
    bint writable
    bint rdhup
    bint peer_eof
    bint shut_wr
    h1_head resp
    h1_body resp_body
    int64_t since_ns          # connect start (U_CONNECTING) or idle start (U_IDLE)
    bint mesh_header_sent     # via the mesh entry: the PROXY v2 header went out; U_CONNECTING until the
                              # tunnel's one-byte open announcement arrives (_mesh_opened)
    Up *idle_prev             # pool idle list: most recent at the head (LIFO), oldest at the tail
    Up *idle_next
    bint dead
    Up *grave_next
    Up *prev
    Up *next
    # HTTP/2 (see H2Up): h2 on a connection Up (listed in Pool.h2_head by pool_next / pool_prev); the
    # rest on a stream Up, whose conn is NULL once its connection is gone.
    H2Up *h2
    Up *pool_next
    Up *pool_prev
    bint h2_stream
    Up *conn
    Up *sib_next
    Up *sib_prev
    int32_t stream_id         # 0 until the request HEADERS are submitted
    bint h2_req_head_done
    bint h2_req_done          # the request's END_STREAM is queued
    bint h2_resp_chunked      # the response body is re-framed as chunked (no content-length)
    bint h2_resp_ended        # the server ended its side
    bint h2_reset             # the stream failed (reset by the server, refused, or its connection died)
    bint h2_head_ended        # the final response HEADERS carried END_STREAM (gRPC: trailers-only)
    bint h2_blocked           # the request body waits for the server's window
    uint32_t h2_reset_code
    uint64_t h2_owed          # response DATA bytes received and not yet credited back
    h1_head h2_req            # the request head parsed back out of outb
    h1_body h2_req_body


cdef struct Pool:
    # Upstream connections from one source address to one endpoint.
    uint32_t source_ip
    uint32_t dst_ip
    uint16_t dst_port
    bint via_mesh             # connections go to the mesh entry (PROXY v2 header naming source and dst)
    uint32_t conns            # open (connecting, busy or idle)
    uint32_t nidle
    Up *idle_head
    Up *idle_tail
    Down *wait_head           # requests waiting for a connection (pool at max_conns), FIFO
    Down *wait_tail
    Up *h2_head               # HTTP/2 connections (any state); they count in conns, never idle-listed
    Pool *hash_next


cdef struct Adoption:
    uint64_t conn_id
    int fd
    uint32_t source_ip
    int64_t sniff_ns          # > 0: an `auto` port; tell HTTP/1 from other bytes within this long


cdef struct Answer:
    uint64_t request_id
    bint forward
    sockaddr_in dst
    int64_t try_timeout_ns
    Edits *edits
    uint16_t status
    char flag[FLAG_TEXT_MAX]
    char *detail
    size_t detail_len
    int grpc_status           # local reply to a gRPC request over HTTP/2: HTTP 200 + this (-1: none)
    bint http2                # forward: speak HTTP/2 to the upstream
    bint via_mesh             # forward: through the mesh entry (the mTLS tunnel), see set_mesh_entry()
    AnswerKind kind
    bint resilient            # forward: the 11-item form (see Down.resilient)
    uint16_t hold_min_status
    uint32_t replay_limit
    char *fields              # reply: extra header lines, rendered "name: value\r\n..." (NULL: none)
    size_t fields_len


cdef struct Record:
    RecordKind kind
    uint64_t request_id
    uint64_t conn_id
    uint16_t status
    int err
    uint32_t flags
    uint64_t bytes_in         # REC_DONE: request body bytes; REC_CONN_CLOSED: requests on the connection
    uint64_t bytes_out
    int64_t decide_ns         # head complete -> answer taken
    int64_t upstream_ns       # forward -> response head
    int64_t total_ns          # first head byte -> response end
    uint32_t attempts
    bint reused
    FailureKind failure       # REC_ATTEMPT_FAILED
    int grpc_status           # REC_ATTEMPT_FAILED (held head), REC_DONE: -1 if none
    bint replayable           # REC_ATTEMPT_FAILED
    int64_t response_ns       # REC_ATTEMPT_FAILED, REC_DONE: head handed upstream -> response head / failure
    int client_fd             # REC_UPGRADED: the sockets now owned by whoever drains the record
    int upstream_fd
    unsigned char *head       # REC_HEAD: copy of the head bytes, in the block of `parsed` (never freed alone)
    h1_head *parsed           # REC_HEAD: spans into `head`; one allocation with it (freed by drain)


cdef class HttpWorker:
    cdef int epfd
    cdef int wake_fd
    cdef int notify_fd
    cdef bint stopping
    cdef bint hand_off_upgrades   # after a 101, give both sockets to Python (REC_UPGRADED), not tunnel
    cdef bint draining            # set by begin_draining(): every response closes its connection
    cdef bint drained_idle        # the idle connections were closed once draining began
    cdef bint closed
    cdef h1_limits limits
    cdef int64_t header_timeout_ns
    cdef int64_t idle_timeout_ns
    cdef int64_t connect_timeout_ns
    cdef int64_t pool_idle_timeout_ns
    cdef uint32_t pool_max_idle
    cdef uint32_t pool_max_conns
    cdef int64_t now_ns
    cdef int64_t next_scan_ns
    cdef int64_t next_try_ns       # earliest per-try deadline (0: none): the loop wakes for it, not SCAN_MS
    cdef int64_t live
    cdef int64_t upstreams
    cdef Down *downs
    cdef Up *ups
    cdef Down *ready
    cdef Down *down_graves
    cdef Up *up_graves
    cdef Pool *pools[POOL_BUCKETS]
    cdef int64_t npools
    cdef uint64_t scans
    cdef Down **slots
    cdef uint32_t *slot_seq
    cdef uint32_t *free_slots
    cdef uint32_t nslots
    cdef uint32_t nfree
    cdef pthread_mutex_t lock
    cdef Adoption *adopts
    cdef size_t adopts_len
    cdef size_t adopts_cap
    cdef Answer *answers
    cdef size_t answers_len
    cdef size_t answers_cap
    cdef Record *records
    cdef size_t records_len
    cdef size_t records_cap
    cdef bint mesh_entry_set       # set_mesh_entry() was called (once; read by the engine thread after)
    cdef sockaddr_in mesh_entry    # the mesh's local entry (loopback) that carries a connection into the tunnel
    cdef unsigned char mesh_token[MESH_TOKEN_LEN]  # proves to the entry that a connection is this engine's
    cdef object header_filter      # the frozenset drain() was last given (identity cache for header_names)
    cdef tuple header_names        # its names as lower-case bytes

    cdef int _push(self, void **items, size_t *length, size_t *capacity, size_t size,
                   const void *item) noexcept nogil
    cdef void *_take(self, void **items, size_t *length, size_t *capacity, size_t *taken) noexcept nogil
    cdef void _loop(self) noexcept nogil
    cdef void _take_submissions(self) noexcept nogil
    cdef void _adopt(self, Adoption *a) noexcept nogil
    cdef void _apply_answer(self, Answer *a) noexcept nogil
    cdef void _on_down_event(self, Down *d, uint32_t events) noexcept nogil
    cdef void _on_up_event(self, Up *u, uint32_t events) noexcept nogil
    cdef void _drive(self, Down *d) noexcept nogil
    cdef int _step(self, Down *d, int *budget) noexcept nogil
    cdef int _step_head(self, Down *d, int *budget) noexcept nogil
    cdef void _head_complete(self, Down *d) noexcept nogil
    cdef int _step_exchange(self, Down *d, int *budget) noexcept nogil
    cdef int _pump_request_body(self, Down *d, Up *u, int *budget) noexcept nogil
    cdef int _pump_response(self, Down *d, Up *u, int *budget) noexcept nogil
    cdef int _response_head(self, Down *d, Up *u) noexcept nogil
    cdef int _step_tunnel(self, Down *d, int *budget) noexcept nogil
    cdef void _hand_off(self, Down *d) noexcept nogil
    cdef int _sniff(self, Down *d) noexcept nogil
    cdef void _not_http(self, Down *d) noexcept nogil
    cdef Down *_new_down(self) noexcept nogil
    cdef void _start_h2(self, Down *d) noexcept nogil
    cdef int _step_h2(self, Down *d, int *budget) noexcept nogil
    cdef int _h2_events(self, Down *d) noexcept nogil
    cdef Down *_h2_stream(self, Down *d, int32_t stream_id) noexcept nogil
    cdef void _h2_request(self, Down *d, int32_t stream_id, size_t off, uint32_t nfields,
                          bint end_stream) noexcept nogil
    cdef void _h2_request_trailers(self, Down *s, size_t off, uint32_t nfields) noexcept nogil
    cdef void _h2_request_end(self, Down *s) noexcept nogil
    cdef int _h2_emit(self, Down *s) noexcept nogil
    cdef void _h2_credit(self, Down *s) noexcept nogil
    cdef void _h2_stream_gone(self, Down *s) noexcept nogil
    cdef void _h2_reply_direct(self, Down *d, int32_t stream_id, const char *status) noexcept nogil
    cdef void _h2u_acquire(self, Down *d, Pool *p, bint fresh) noexcept nogil
    cdef int _h2u_init(self, Up *c) noexcept nogil
    cdef int _h2u_send(self, Up *s) noexcept nogil
    cdef void _h2u_flush(self, Up *c) noexcept nogil
    cdef void _drive_h2u(self, Up *c) noexcept nogil
    cdef void _h2u_events(self, Up *c) noexcept nogil
    cdef void _h2u_response_head(self, Up *s, size_t off, uint32_t nfields, bint end_stream) noexcept nogil
    cdef void _h2u_credit(self, Up *s) noexcept nogil
    cdef void _h2u_fail(self, Up *c, int err) noexcept nogil
    cdef void _h2u_stream_closed(self, Up *s) noexcept nogil
    cdef int _tunnel_direction(self, Down *d, bint *src_readable, bint *src_rdhup, Buf *src_in,
                               bint *src_eof, int src_fd, int dst_fd, Buf *dst_out, bint *dst_writable, bint *dst_shut,
                               int *budget) noexcept nogil
    cdef int _step_closing(self, Down *d) noexcept nogil
    cdef void _forward(self, Down *d) noexcept nogil
    cdef void _acquire(self, Down *d, bint fresh) noexcept nogil
    cdef void _attach(self, Down *d, Up *u, bint reused) noexcept nogil
    cdef Up *_connect(self, Pool *p, int *err) noexcept nogil
    cdef Pool *_pool_for(self, uint32_t source_ip, sockaddr_in *dst, bint via_mesh) noexcept nogil
    cdef int _connect_done(self, Up *u, uint32_t events, int *err) noexcept nogil
    cdef int _mesh_opened(self, Up *u, int *err) noexcept nogil
    cdef void _pool_release(self, Up *u) noexcept nogil
    cdef void _pool_unwait(self, Down *d) noexcept nogil
    cdef void _serve_waiter(self, Pool *p) noexcept nogil
    cdef void _attempt_failed(self, Down *d, int err, uint32_t flag) noexcept nogil
    cdef void _post_attempt_failed(self, Down *d, int err, uint32_t flag, FailureKind failure, uint16_t status,
                                   int grpc_status) noexcept nogil
    cdef void _fail_attempt(self, Down *d, int err, uint32_t flag, FailureKind failure) noexcept nogil
    cdef void _set_try_deadline(self, Down *d) noexcept nogil
    cdef void _attempt_sent(self, Down *d) noexcept nogil
    cdef int _keep_replay(self, Down *d, const unsigned char *p, size_t n) noexcept nogil
    cdef void _discard_held(self, Down *d) noexcept nogil
    cdef void _release_held(self, Down *d) noexcept nogil
    cdef int _request_send_failed(self, Down *d, Up *u, int err) noexcept nogil
    cdef int _upstream_failed(self, Down *d, int err) noexcept nogil
    cdef void _end_exchange(self, Down *d) noexcept nogil
    cdef void _next_request(self, Down *d) noexcept nogil
    cdef void _local_reply(self, Down *d, uint16_t status, const char *flag, uint32_t flag_bit,
                           const char *detail, size_t detail_len, bint close_after) noexcept nogil
    cdef void _local_reply_fields(self, Down *d, uint16_t status, const char *flag, uint32_t flag_bit,
                                  const char *detail, size_t detail_len, const char *fields, size_t fields_len,
                                  bint close_after) noexcept nogil
    cdef void _start_closing(self, Down *d) noexcept nogil
    cdef void _release_down(self, Down *d, uint32_t flag, int err) noexcept nogil
    cdef void _close_up(self, Up *u, bint reset) noexcept nogil
    cdef void _post_done(self, Down *d, int err) noexcept nogil
    cdef void _post(self, Record *r) noexcept nogil
    cdef void _queue_ready(self, Down *d) noexcept nogil
    cdef void _unqueue(self, Down *d) noexcept nogil
    cdef void _run_ready(self) noexcept nogil
    cdef void _close_idle(self) noexcept nogil
    cdef void _sweep_pools(self) noexcept nogil
    cdef void _scan(self) noexcept nogil
    cdef void _bury(self) noexcept nogil
    cdef void _close_all(self) noexcept nogil
