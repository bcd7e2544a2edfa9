# cython: language_level=3
"""The node-to-node mTLS tunnel of nodeproxy (HBONE-style): HTTP/2 CONNECT streams over TLS 1.3.

One TunnelWorker is an epoll loop on its own thread that never takes the GIL. Record encryption and
decryption run here, in OpenSSL's C API (the kernel has no kTLS), and HTTP/2 is libnghttp2.

Outbound: Python hands over a captured client socket with the peer node (address, port 15008), the
destination authority "podip:port", the source workload's identity and its pod address (adopt()). The
engine takes a pooled TLS connection to that peer made with that identity's certificate (one pool per
(peer, identity, expected peer identity); at most max_streams streams per connection, and a connection
made before the identity's certificate was rotated takes no new stream), or opens one: TLS 1.3, the
peer's chain verified against the trust bundle by OpenSSL and its leaf checked as an X.509-SVID of our
trust domain (and as the expected identity when one is given). Each client connection is one CONNECT
stream (`:authority` the destination, `forwarded: for=<source ip>`, and `x-nodeproxy-authorized: l7`
when the caller says it applied the destination's L7 policies to every request on it); the client's
bytes follow at once (the peer holds them until it decided, and drops them on a refusal), the peer's
after its 2xx. The client's FIN becomes END_STREAM and the peer's END_STREAM a FIN (half-close both
ways); an error on either side resets the other (RST_STREAM / TCP RST).

Inbound: the listening socket given to listen() (15008) accepts TLS 1.3 with a client certificate
required and verified the same way. Each CONNECT stream is posted to Python as an INBOUND record (peer
identity, authority, forwarded, l7_checked; a repeated `forwarded` or `x-nodeproxy-authorized` field is a
malformed request, 400); Python answers allow (connect to the local pod, bound transparently to
the original source address like the L4 relay) or deny (an HTTP status, 403 by default, then RST).

Flow control: every stream's receive window is stream_window and every connection's is
connection_window (4 MiB and 16 MiB by default, ztunnel's), and DATA is credited back only once its bytes
were written to the plain socket, so a slow reader holds at most its window here and stalls nobody else.
Bytes from a plain socket are read straight into nghttp2's frame buffer (the data source reads the
socket), frames are gathered into 64 KiB before SSL_write so records are full 16 KiB ones.

Draining (begin_draining()): inbound connections send HTTP/2's graceful shutdown (GOAWAY with the largest
stream id and a PING, then, once the PING is acknowledged, GOAWAY NO_ERROR with the last stream processed),
finish their streams and close; outbound ones made before take no new stream and close when idle. A peer's
GOAWAY is honoured the same way: that connection takes no new stream. A stream the peer refused unprocessed
(REFUSED_STREAM, or above its GOAWAY's last stream id) is sent again, on another connection after a
GOAWAY, as long as none of the client's bytes went with it (at most STREAM_RETRIES times); otherwise it
ends TUNNEL_FAILED with ECONNREFUSED.

Ownership: a socket passed to adopt() belongs to the engine from then on. Every adopted connection and
every INBOUND stream ends with exactly one STREAM_DONE record. Only the engine thread touches TlsConn and
Stream structs; Python reaches the engine through mutex-protected queues and an eventfd each way.
"""

from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset, strcmp, strlen

from nodeproxy._h2 cimport (
    NGHTTP2_CANCEL,
    NGHTTP2_DATA,
    NGHTTP2_DATA_FLAG_EOF,
    NGHTTP2_ERR_DEFERRED,
    NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE,
    NGHTTP2_FLAG_END_STREAM,
    NGHTTP2_FLAG_NONE,
    NGHTTP2_GOAWAY,
    NGHTTP2_HCAT_REQUEST,
    NGHTTP2_HCAT_RESPONSE,
    NGHTTP2_HEADERS,
    NGHTTP2_INTERNAL_ERROR,
    NGHTTP2_NO_ERROR,
    NGHTTP2_NV_FLAG_NONE,
    NGHTTP2_PING,
    NGHTTP2_PROTOCOL_ERROR,
    NGHTTP2_REFUSED_STREAM,
    NGHTTP2_SETTINGS,
    NGHTTP2_SETTINGS_ENABLE_PUSH,
    NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
    NGHTTP2_SETTINGS_MAX_FRAME_SIZE,
    NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS,
    nghttp2_option_del,
    nghttp2_option_new,
    nghttp2_option_set_no_auto_window_update,
    nghttp2_session_callbacks_del,
    nghttp2_session_callbacks_new,
    nghttp2_session_callbacks_set_on_begin_headers_callback,
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback,
    nghttp2_session_callbacks_set_on_frame_recv_callback,
    nghttp2_session_callbacks_set_on_frame_send_callback,
    nghttp2_session_callbacks_set_on_header_callback,
    nghttp2_session_callbacks_set_on_stream_close_callback,
    nghttp2_session_check_request_allowed,
    nghttp2_session_client_new2,
    nghttp2_session_consume,
    nghttp2_session_del,
    nghttp2_session_get_last_proc_stream_id,
    nghttp2_session_get_remote_settings,
    nghttp2_session_get_stream_user_data,
    nghttp2_session_mem_recv,
    nghttp2_session_mem_send,
    nghttp2_session_resume_data,
    nghttp2_session_server_new2,
    nghttp2_session_set_local_window_size,
    nghttp2_session_set_stream_user_data,
    nghttp2_session_want_read,
    nghttp2_session_want_write,
    nghttp2_strerror,
    nghttp2_submit_goaway,
    nghttp2_submit_request,
    nghttp2_submit_response,
    nghttp2_submit_rst_stream,
    nghttp2_submit_settings,
    nghttp2_submit_shutdown_notice,
)

import os as _os

# Record kinds and stream endings, for Python (nodeproxy.proxy.tunnel mirrors them).
INBOUND = REC_INBOUND
STREAM_DONE = REC_STREAM_DONE
TLS_FAILED = REC_TLS_FAILED
TLS_OPEN = REC_TLS_OPEN
CLOSED = END_CLOSED
PLAIN_RESET = END_PLAIN_RESET
PEER_RESET = END_PEER_RESET
TUNNEL_FAILED = END_TUNNEL_FAILED
REFUSED = END_REFUSED
CONNECT_FAILED = END_CONNECT_FAILED
ABORTED = END_ABORTED
LOCAL_RESOURCES = END_LOCAL_RESOURCES

# TLS 1.3 suites in our order of preference: AES-128-GCM first (AES-NI makes it the cheapest per byte
# here, and record crypto is the tunnel's main cost), then the other two TLS 1.3 mandatory-to-offer ones.
cdef const char *_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# The CONNECT field by which the sending node proxy says it applied the destination's L7 policies to
# every request on the stream (adopt(l7_checked=True)); any other value means no such claim.
cdef const char *_AUTHORIZED_FIELD = "x-nodeproxy-authorized"
cdef const char *_AUTHORIZED_L7 = "l7"
_SPIFFE_ID_MAX = NP_ID_MAX - 1
# The opaque data of the PING sent with a draining connection's shutdown notice (its ACK ends the notice).
cdef const char *_DRAIN_PING = "np-drain"
assert strlen(_DRAIN_PING) == 8  # a PING's opaque data is exactly 8 bytes (RFC 9113 6.7)

# What the buffer sizes rely on: a read batch holds at least one whole record (the loop stops when the
# next one might not fit), and the socket backlog bound lets a full production round through.
assert READ_BUF >= 2 * RECORD_MAX and WIRE_HIGH >= TLS_OUT_FILL and SMALL_FRAME < RECORD_MAX
assert MAX_FRAME <= 16777215  # SETTINGS_MAX_FRAME_SIZE's limit (RFC 9113 6.5.2)

cdef enum:
    SIDE_NONE = 0
    SIDE_PLAIN = 1
    SIDE_TUNNEL = 2


# -- small helpers -----------------------------------------------------------------------------------

cdef bint _copy_text(char *dst, size_t cap, const void *src, size_t n) noexcept nogil:
    """NUL-terminated copy; False (and an empty dst) if it does not fit."""
    if n >= cap:
        dst[0] = 0
        return False
    memcpy(dst, src, n)
    dst[n] = 0
    return True


cdef int _buf_append(Buf *b, const void *p, size_t n) noexcept nogil:
    cdef size_t held = b.len - b.off
    cdef size_t want
    cdef unsigned char *grown
    if b.cap - b.len < n:
        if b.off > 0 and b.cap - held >= n:
            memcpy(b.data, b.data + b.off, held)  # regions do not overlap: held <= off here or none
        else:
            want = b.cap * 2 if b.cap else 65536
            while want < held + n:
                want *= 2
            grown = <unsigned char*>malloc(want)
            if grown == NULL:
                return -1
            if held:
                memcpy(grown, b.data + b.off, held)
            free(b.data)
            b.data = grown
            b.cap = want
        b.off = 0
        b.len = held
    memcpy(b.data + b.len, p, n)
    b.len += n
    return 0


cdef inline size_t _held(Buf *b) noexcept nogil:
    return b.len - b.off


cdef int _parse_ipv4(str text, sockaddr_in *out, int port) except -1:
    cdef bytes raw = text.encode("ascii")
    memset(out, 0, sizeof(sockaddr_in))
    out.sin_family = AF_INET
    out.sin_port = htons(<unsigned short>port)
    if inet_pton(AF_INET, raw, &out.sin_addr) != 1:
        raise ValueError(f"not an IPv4 address: {text!r}")
    return 0


cdef str _format_ipv4(uint32_t addr):
    cdef char buf[16]
    cdef in_addr a
    a.s_addr = addr
    inet_ntop(AF_INET, &a, buf, sizeof(buf))
    return buf.decode("ascii")


cdef str _openssl_error(str what):
    cdef char buf[256]
    cdef unsigned long code = ERR_get_error()
    if code == 0:
        return what
    ERR_error_string_n(code, buf, sizeof(buf))
    ERR_clear_error()
    return f"{what}: {buf.decode('utf-8', 'replace')}"


cdef inline void _nv(nghttp2_nv *nv, const char *name, const char *value) noexcept nogil:
    nv.name = <uint8_t*>name
    nv.namelen = strlen(name)
    nv.value = <uint8_t*>value
    nv.valuelen = strlen(value)
    nv.flags = NGHTTP2_NV_FLAG_NONE


cdef inline bint _is(const uint8_t *p, size_t n, const char *lit) noexcept nogil:
    cdef size_t k = strlen(lit)
    cdef size_t i
    if n != k:
        return False
    for i in range(n):
        if p[i] != <uint8_t>lit[i]:
            return False
    return True


# -- TLS contexts ------------------------------------------------------------------------------------

cdef class TlsContext:
    """An OpenSSL SSL_CTX for one identity: its certificate chain and key, the trust bundle, TLS 1.3 only,
    the peer verified (chain by OpenSSL, then the X.509-SVID checks of _tunnel.pxd against trust_domain),
    ALPN h2. server=True requires a client certificate. Immutable: rotation makes a new one."""

    def __cinit__(self, bytes cert_chain_pem, bytes key_pem, bytes trust_bundle_pem, str trust_domain,
                  bint server):
        cdef BIO *bio = NULL
        cdef X509 *x = NULL
        cdef EVP_PKEY *key = NULL
        cdef X509_STORE *store
        cdef int trusted = 0, chain = 0
        cdef bytes td = trust_domain.encode("ascii")
        if not 0 < len(td) < NP_TD_MAX or np_spiffe_id_check(b"spiffe://" + td + b"/x", len(td) + 11, td) != NP_SVID_OK:
            raise ValueError(f"not a SPIFFE trust domain: {trust_domain!r}")
        self.server = server
        self.trust_domain = trust_domain
        ERR_clear_error()
        self.ctx = SSL_CTX_new(TLS_method())
        if self.ctx == NULL:
            raise MemoryError(_openssl_error("SSL_CTX_new"))
        if (SSL_CTX_set_min_proto_version(self.ctx, TLS1_3_VERSION) != 1
                or SSL_CTX_set_ciphersuites(self.ctx, _CIPHERSUITES) != 1):
            raise ValueError(_openssl_error("TLS 1.3 setup"))
        # No session tickets: every connection is verified in full (a resumed one would skip the peer's
        # current certificate), and the server saves writing them.
        SSL_CTX_set_num_tickets(self.ctx, 0)
        SSL_CTX_set_mode(self.ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
        # Read ahead into a 64 KiB buffer: several records per read() instead of two reads per record
        # (header, then body); the engine reads until SSL_read wants more, so nothing waits in it.
        SSL_CTX_set_read_ahead(self.ctx, 1)
        SSL_CTX_set_default_read_buffer_len(self.ctx, READ_BUF)
        bio = BIO_new_mem_buf(<const char*>cert_chain_pem, len(cert_chain_pem))
        if bio == NULL:
            raise MemoryError()
        try:
            x = PEM_read_bio_X509(bio, NULL, NULL, NULL)
            if x == NULL:
                raise ValueError(_openssl_error("no certificate in cert_chain_pem"))
            if SSL_CTX_use_certificate(self.ctx, x) != 1:
                X509_free(x)
                raise ValueError(_openssl_error("certificate"))
            X509_free(x)
            while True:
                x = PEM_read_bio_X509(bio, NULL, NULL, NULL)
                if x == NULL:
                    break
                chain += 1
                if SSL_CTX_add1_chain_cert(self.ctx, x) != 1:
                    X509_free(x)
                    raise ValueError(_openssl_error("intermediate certificate"))
                X509_free(x)
            ERR_clear_error()  # the end of the PEM stream is reported as an error
        finally:
            BIO_free(bio)
        bio = BIO_new_mem_buf(<const char*>key_pem, len(key_pem))
        if bio == NULL:
            raise MemoryError()
        try:
            key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL)
            if key == NULL:
                raise ValueError(_openssl_error("no private key in key_pem"))
            if SSL_CTX_use_PrivateKey(self.ctx, key) != 1:
                EVP_PKEY_free(key)
                raise ValueError(_openssl_error("private key"))
            EVP_PKEY_free(key)
            if SSL_CTX_check_private_key(self.ctx) != 1:
                raise ValueError(_openssl_error("the private key does not match the certificate"))
        finally:
            BIO_free(bio)
        store = SSL_CTX_get_cert_store(self.ctx)
        bio = BIO_new_mem_buf(<const char*>trust_bundle_pem, len(trust_bundle_pem))
        if bio == NULL:
            raise MemoryError()
        try:
            while True:
                x = PEM_read_bio_X509(bio, NULL, NULL, NULL)
                if x == NULL:
                    break
                if X509_STORE_add_cert(store, x) != 1:
                    X509_free(x)
                    raise ValueError(_openssl_error("trust bundle certificate"))
                X509_free(x)
                trusted += 1
            ERR_clear_error()
        finally:
            BIO_free(bio)
        if trusted == 0:
            raise ValueError("the trust bundle holds no certificate")
        np_set_verify(self.ctx, server)
        if np_set_alpn(self.ctx, server) != 0:
            raise ValueError(_openssl_error("ALPN"))
        if np_check_index() < 0 or np_wire_init() < 0:
            raise MemoryError("SSL_get_ex_new_index / BIO_meth_new")

    def __dealloc__(self):
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)


# -- nghttp2 callbacks (engine thread; the session's user_data is its TlsConn) -------------------------

cdef int _on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame,
                           void *user_data) noexcept nogil:
    cdef TlsConn *t = <TlsConn*>user_data
    t.hdr_stream = frame.hd.stream_id
    t.hdr_status = 0
    t.hdr_bad = False
    t.hdr_method[0] = 0
    t.hdr_authority[0] = 0
    t.hdr_forwarded[0] = 0
    t.hdr_authorized_seen = False
    t.hdr_l7_checked = False
    return 0


cdef int _on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                    size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                    void *user_data) noexcept nogil:
    cdef TlsConn *t = <TlsConn*>user_data
    cdef size_t i
    if frame.hd.stream_id != t.hdr_stream:
        return 0
    if _is(name, namelen, ":method"):
        if not _copy_text(t.hdr_method, sizeof(t.hdr_method), value, valuelen):
            t.hdr_bad = True
    elif _is(name, namelen, ":authority"):
        if not _copy_text(t.hdr_authority, sizeof(t.hdr_authority), value, valuelen):
            t.hdr_bad = True
    elif _is(name, namelen, "forwarded"):
        # One field only: a second one (or one too long) is not something our peers send.
        if t.hdr_forwarded[0] != 0 or not _copy_text(t.hdr_forwarded, sizeof(t.hdr_forwarded), value, valuelen):
            t.hdr_bad = True
    elif _is(name, namelen, _AUTHORIZED_FIELD):
        # Like `forwarded`: one field only (a second one makes the request malformed, 400); a value
        # other than "l7" is no claim at all, so the stream is judged as plain L4.
        if t.hdr_authorized_seen:
            t.hdr_bad = True
        t.hdr_authorized_seen = True
        t.hdr_l7_checked = _is(value, valuelen, _AUTHORIZED_L7)
    elif _is(name, namelen, ":status"):
        if valuelen != 3:
            t.hdr_status = -1
        else:
            t.hdr_status = 0
            for i in range(3):
                if not 48 <= value[i] <= 57:
                    t.hdr_status = -1
                    break
                t.hdr_status = t.hdr_status * 10 + (value[i] - 48)
    return 0


cdef int _on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept nogil:
    cdef TlsConn *t = <TlsConn*>user_data
    cdef Engine *e = t.engine
    cdef Stream *s
    if frame.hd.type == NGHTTP2_HEADERS:
        if t.server and frame.headers.cat == NGHTTP2_HCAT_REQUEST:
            _inbound_head(e, t, frame.hd.stream_id)
        elif not t.server and frame.headers.cat == NGHTTP2_HCAT_RESPONSE:
            s = <Stream*>nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
            if s != NULL and not s.dead:
                _outbound_response(e, s, t.hdr_status)
    elif frame.hd.type == NGHTTP2_SETTINGS:
        t.peer_max_streams = nghttp2_session_get_remote_settings(session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS)
        if t.server and e.draining and not frame.hd.flags & NGHTTP2_FLAG_ACK:
            # Accepted while draining: the notice goes once the peer's first flight (its SETTINGS, then
            # the streams it queued before the handshake ended) is here. Sent at the handshake, it would
            # reach the peer before that flight went, and turn those streams away.
            _drain_notice(e, t)
    elif frame.hd.type == NGHTTP2_GOAWAY:
        # No new stream goes on this connection; nghttp2 closes the streams the peer will not process
        # (REFUSED_STREAM: _on_stream_close tries them again elsewhere when that is safe).
        _set_closing(e, t)
    elif (frame.hd.type == NGHTTP2_PING and frame.hd.flags & NGHTTP2_FLAG_ACK and t.drain_stage == DRAIN_NOTICE
            and memcmp((<const nghttp2_ping*>frame).opaque_data, _DRAIN_PING, 8) == 0):
        # The peer has read our shutdown notice: every stream it opened before that has arrived.
        _drain_final(e, t)
    if (frame.hd.type == NGHTTP2_DATA or frame.hd.type == NGHTTP2_HEADERS) and frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
        s = <Stream*>nghttp2_session_get_stream_user_data(session, frame.hd.stream_id)
        if s != NULL and not s.dead:
            s.h2_eof = True
            _flush_plain(e, s)
    return 0


cdef int _on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) noexcept nogil:
    # A refusal (HEADERS with END_STREAM on a stream nobody relays) is out: reset the request side too,
    # so the peer stops sending and the stream stops counting against the concurrency limit.
    cdef TlsConn *t = <TlsConn*>user_data
    if (t.server and frame.hd.type == NGHTTP2_HEADERS and frame.hd.flags & NGHTTP2_FLAG_END_STREAM
            and nghttp2_session_get_stream_user_data(session, frame.hd.stream_id) == NULL):
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame.hd.stream_id, NGHTTP2_NO_ERROR)
    return 0


cdef int _on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
                        size_t length, void *user_data) noexcept nogil:
    cdef TlsConn *t = <TlsConn*>user_data
    cdef Stream *s = <Stream*>nghttp2_session_get_stream_user_data(session, stream_id)
    cdef ssize_t n
    if s == NULL or s.dead or s.plain_shut:
        nghttp2_session_consume(session, stream_id, length)  # nobody will take them: credit them back
        return 0
    if s.state == S_OPEN and s.plain_writable and _held(&s.to_plain) == 0:
        # The common case: straight from the decrypted record to the plain socket, no copy.
        n = send(s.fd, data, length, MSG_NOSIGNAL)
        if n < 0:
            if errno != EAGAIN and errno != EINTR:
                nghttp2_session_consume(session, stream_id, length)
                s.failed_side = SIDE_PLAIN
                _stream_reset(t.engine, s, END_PLAIN_RESET, errno, NGHTTP2_CANCEL)
                return 0
            s.plain_writable = errno == EINTR
            n = 0
        if n > 0:
            s.bytes_down += n
            nghttp2_session_consume(session, stream_id, n)
            data += n
            length -= n
    if length > 0 and _buf_append(&s.to_plain, data, length) < 0:
        nghttp2_session_consume(session, stream_id, length)
        _stream_reset(t.engine, s, END_LOCAL_RESOURCES, ENOMEM, NGHTTP2_INTERNAL_ERROR)
    return 0


cdef int _on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                          void *user_data) noexcept nogil:
    cdef TlsConn *t = <TlsConn*>user_data
    cdef Stream *s = <Stream*>nghttp2_session_get_stream_user_data(session, stream_id)
    if s == NULL or s.dead:
        return 0
    s.h2_closed = True
    if (error_code == NGHTTP2_REFUSED_STREAM and s.outbound and s.state == S_REQUESTED
            and s.failed_side == SIDE_NONE):
        # The peer did not process it (RFC 9113 8.7: REFUSED_STREAM, or above its GOAWAY's last stream).
        _outbound_refused(t.engine, s)
        return 0
    if error_code != NGHTTP2_NO_ERROR or not (s.h2_eof and s.plain_eof):
        # Reset (by the peer, or by nghttp2 after our data source failed): the plain side gets an RST.
        if s.failed_side == SIDE_PLAIN:
            _stream_finish(t.engine, s, END_PLAIN_RESET, s.err)
        else:
            _stream_finish(t.engine, s, END_PEER_RESET, 0)
        return 0
    _maybe_done(t.engine, s)
    return 0


cdef ssize_t _read_length(nghttp2_session *session, uint8_t frame_type, int32_t stream_id,
                          int32_t session_remote_window_size, int32_t stream_remote_window_size,
                          uint32_t remote_max_frame_size, void *user_data) noexcept nogil:
    # DATA frames as large as the peer allows (MAX_FRAME between our engines) instead of nghttp2's
    # 16 KiB: one recv() from the plain socket per frame; nghttp2 clamps this to the windows.
    return remote_max_frame_size if remote_max_frame_size > 0 else 1


cdef inline bint _may_send(Stream *s) noexcept nogil:
    # Outbound bytes follow the CONNECT at once, without waiting for the 2xx: that saves a round trip per
    # connection, and the peer holds them (within the stream window) until it decided, dropping them on
    # a refusal. Inbound, the pod's bytes exist only once it is connected.
    return s.state == S_OPEN or (s.outbound and s.state == S_REQUESTED)


cdef ssize_t _read_plain(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                         uint32_t *data_flags, nghttp2_data_source *source, void *user_data) noexcept nogil:
    # The DATA source of a stream: read the plain socket straight into nghttp2's frame buffer. Called only
    # while the peer's window is open, so the plain socket is read only as fast as the peer takes it.
    cdef Stream *s = <Stream*>nghttp2_session_get_stream_user_data(session, stream_id)
    cdef ssize_t n
    if s == NULL or s.dead:
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
    if not _may_send(s):
        s.deferred = True  # inbound: resumed once the pod is connected
        return NGHTTP2_ERR_DEFERRED
    while True:
        n = recv(s.fd, buf, length, 0)
        if n >= 0 or errno != EINTR:
            break
    if n > 0:
        s.bytes_up += n
        return n
    if n == 0:
        s.plain_eof = True
        data_flags[0] |= NGHTTP2_DATA_FLAG_EOF
        return 0
    if errno == EAGAIN:
        s.deferred = True  # the socket's next readable edge resumes it
        return NGHTTP2_ERR_DEFERRED
    # nghttp2 resets the stream (INTERNAL_ERROR) and then closes it: _on_stream_close finishes it.
    s.failed_side = SIDE_PLAIN
    s.err = errno
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE


# -- stream handling (engine thread) -----------------------------------------------------------------

cdef void _mark_dirty(Engine *e, TlsConn *t) noexcept nogil:
    if not t.dirty and not t.dead:
        t.dirty = True
        t.dirty_next = e.dirty
        e.dirty = t


cdef void _post(Engine *e, Record *r) noexcept nogil:
    cdef Record *grown
    cdef bint was_empty
    cdef uint64_t one = 1
    pthread_mutex_lock(&e.lock)
    if e.records_len == e.records_cap:
        grown = <Record*>realloc(e.records, (e.records_cap * 2 + 16) * sizeof(Record))
        if grown == NULL:
            pthread_mutex_unlock(&e.lock)  # out of memory: this record is lost, nothing leaks
            return
        e.records = grown
        e.records_cap = e.records_cap * 2 + 16
    was_empty = e.records_len == 0
    memcpy(&e.records[e.records_len], r, sizeof(Record))
    e.records_len += 1
    pthread_mutex_unlock(&e.lock)
    if was_empty:
        write(e.notify_fd, &one, sizeof(one))


cdef void _init_record(Record *r, int kind) noexcept nogil:
    # Only the fixed fields and the first byte of each text: a Record is ~1.5 KiB, mostly text room.
    memset(r, 0, <size_t>(<char*>&r.identity - <char*>r))
    r.kind = kind
    r.identity[0] = 0
    r.authority[0] = 0
    r.forwarded[0] = 0
    r.reason[0] = 0


cdef void _record_tls(Engine *e, TlsConn *t, int kind, int err, const char *reason) noexcept nogil:
    cdef Record r
    _init_record(&r, kind)
    r.tls_id = t.id
    r.outbound = not t.server
    r.err = err
    r.peer_ip = t.peer_ip
    r.peer_port = t.peer_port
    _copy_text(r.identity, sizeof(r.identity), t.check.identity, strlen(t.check.identity))
    if reason != NULL:
        if not _copy_text(r.reason, sizeof(r.reason), reason, strlen(reason)):
            _copy_text(r.reason, sizeof(r.reason), reason, sizeof(r.reason) - 1)
    _post(e, &r)


cdef int _flush_plain(Engine *e, Stream *s) noexcept nogil:
    """Write what the tunnel delivered to the plain socket; -1 if the stream ended."""
    cdef ssize_t n
    cdef TlsConn *t = s.t
    if s.state != S_OPEN:
        return 0
    while _held(&s.to_plain) > 0 and s.plain_writable:
        n = send(s.fd, s.to_plain.data + s.to_plain.off, _held(&s.to_plain), MSG_NOSIGNAL)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                s.plain_writable = False
                break
            s.failed_side = SIDE_PLAIN
            _stream_reset(e, s, END_PLAIN_RESET, errno, NGHTTP2_CANCEL)
            return -1
        s.to_plain.off += n
        s.bytes_down += n
        if t != NULL and t.session != NULL:
            # Credit only what left: the peer may send as much again (flow control end to end).
            nghttp2_session_consume(t.session, s.stream_id, n)
            _mark_dirty(e, t)
    if _held(&s.to_plain) == 0:
        s.to_plain.off = s.to_plain.len = 0
        if s.to_plain.cap > PLAIN_BUF_KEEP:
            free(s.to_plain.data)
            s.to_plain.data = NULL
            s.to_plain.cap = 0
    _maybe_done(e, s)
    return -1 if s.dead else 0


cdef void _maybe_done(Engine *e, Stream *s) noexcept nogil:
    if s.dead or s.state != S_OPEN:
        return
    if s.h2_eof and not s.plain_shut and _held(&s.to_plain) == 0:
        # Half-close: the peer finished sending, so finish the plain socket's direction.
        shutdown(s.fd, SHUT_WR)
        s.plain_shut = True
    if s.h2_closed and s.plain_shut and s.plain_eof:
        _stream_finish(e, s, END_CLOSED, 0)


cdef void _unlink_stream(Engine *e, TlsConn *t, Stream *s) noexcept nogil:
    """Take the stream off its TLS connection's list; a connection left without streams is idle from now."""
    if s.prev != NULL:
        s.prev.next = s.next
    else:
        t.streams = s.next
    if s.next != NULL:
        s.next.prev = s.prev
    t.nstreams -= 1
    if t.nstreams == 0:
        t.idle_since_ns = e.now_ns
    s.t = NULL


cdef void _stream_finish(Engine *e, Stream *s, int ending, int err) noexcept nogil:
    """The stream is over: close its plain socket (FIN when CLOSED, else RST), post STREAM_DONE."""
    cdef TlsConn *t = s.t
    cdef Stream **link
    cdef Record r
    cdef size_t held
    if s.dead:
        return
    s.dead = True
    if s.fd >= 0:
        epoll_ctl(e.epfd, EPOLL_CTL_DEL, s.fd, NULL)
        set_reset_on_close(s.fd, ending != END_CLOSED)
        close(s.fd)
        s.fd = -1
    if t != NULL:
        if t.session != NULL and s.stream_id > 0:
            nghttp2_session_set_stream_user_data(t.session, s.stream_id, NULL)
            held = _held(&s.to_plain)
            if held > 0:
                nghttp2_session_consume(t.session, s.stream_id, held)  # the connection's credit back
            _mark_dirty(e, t)
        _unlink_stream(e, t, s)
    if s.state == S_AWAIT_DECISION:
        link = &e.awaiting
        while link[0] != NULL:
            if link[0] == s:
                link[0] = s.await_next
                break
            link = &link[0].await_next
    free(s.to_plain.data)
    s.to_plain.data = NULL
    _init_record(&r, REC_STREAM_DONE)
    r.id = s.id
    r.outbound = s.outbound
    r.ending = ending
    r.err = err
    r.status = s.status
    r.bytes_up = s.bytes_up
    r.bytes_down = s.bytes_down
    _post(e, &r)
    e.live_streams -= 1
    s.grave_next = e.stream_graveyard
    e.stream_graveyard = s


cdef void _stream_reset(Engine *e, Stream *s, int ending, int err, uint32_t code) noexcept nogil:
    cdef TlsConn *t = s.t
    if s.dead:
        return
    if t != NULL and t.session != NULL and s.stream_id > 0 and not s.h2_closed:
        nghttp2_submit_rst_stream(t.session, NGHTTP2_FLAG_NONE, s.stream_id, code)
        _mark_dirty(e, t)
    _stream_finish(e, s, ending, err)


cdef void _outbound_response(Engine *e, Stream *s, int status) noexcept nogil:
    cdef TlsConn *t = s.t
    if s.state != S_REQUESTED:
        return
    if 100 <= status < 200:
        return  # informational; the final answer follows
    s.status = status
    if not 200 <= status < 300:
        _stream_reset(e, s, END_REFUSED, 0, NGHTTP2_CANCEL)
        return
    s.state = S_OPEN
    if s.announce_open:
        # The first byte the plain side reads: the stream reached the pod. Nothing was written to this
        # socket before (no DATA precedes the HEADERS), so its send buffer takes the byte whole; not
        # through to_plain, whose bytes are credited to the peer's window as they leave.
        if send(s.fd, b"\0", 1, MSG_NOSIGNAL) != 1:
            s.failed_side = SIDE_PLAIN
            _stream_reset(e, s, END_PLAIN_RESET, errno if errno else EIO, NGHTTP2_CANCEL)
            return
    if s.deferred:
        s.deferred = False
        nghttp2_session_resume_data(t.session, s.stream_id)
    _mark_dirty(e, t)


cdef void _respond(Engine *e, Stream *s, int status) noexcept nogil:
    """Answer an inbound CONNECT: 2xx with the pod socket as the DATA source, else the status alone
    (END_STREAM; _on_frame_send follows it with RST_STREAM NO_ERROR once it is out: submitted now,
    nghttp2 would drop the HEADERS in favour of the RST)."""
    cdef TlsConn *t = s.t
    cdef nghttp2_nv nv[1]
    cdef char text[4]
    cdef nghttp2_data_provider provider
    if t == NULL or t.session == NULL or s.h2_closed:
        return
    if not 100 <= status <= 599:
        status = 500
    text[0] = <char>(48 + status // 100)
    text[1] = <char>(48 + status // 10 % 10)
    text[2] = <char>(48 + status % 10)
    text[3] = 0
    _nv(&nv[0], ":status", text)
    s.status = status
    if 200 <= status < 300:
        provider.source.ptr = s
        provider.read_callback = _read_plain
        nghttp2_submit_response(t.session, s.stream_id, nv, 1, &provider)
    else:
        nghttp2_submit_response(t.session, s.stream_id, nv, 1, NULL)
    _mark_dirty(e, t)


cdef void _inbound_head(Engine *e, TlsConn *t, int32_t stream_id) noexcept nogil:
    cdef Stream *s
    cdef Record r
    cdef nghttp2_nv nv[1]
    if t.hdr_stream != stream_id or t.hdr_bad or strcmp(t.hdr_method, "CONNECT") != 0 or t.hdr_authority[0] == 0:
        # Only CONNECT streams are tunnels (nghttp2 already checked a CONNECT's pseudo-headers).
        _nv(&nv[0], ":status", "400" if t.hdr_bad or t.hdr_authority[0] == 0 else "405")
        nghttp2_submit_response(t.session, stream_id, nv, 1, NULL)
        _mark_dirty(e, t)
        return
    if e.stopping or t.state != T_OPEN:
        nghttp2_submit_rst_stream(t.session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_REFUSED_STREAM)
        _mark_dirty(e, t)
        return
    s = <Stream*>calloc(1, sizeof(Stream))
    if s == NULL:
        nghttp2_submit_rst_stream(t.session, NGHTTP2_FLAG_NONE, stream_id, NGHTTP2_REFUSED_STREAM)
        _mark_dirty(e, t)
        return
    s.kind = KIND_STREAM
    e.next_key += 1
    s.id = e.next_key
    s.fd = -1
    s.t = t
    s.stream_id = stream_id
    s.state = S_AWAIT_DECISION
    s.deadline_ns = e.now_ns + e.handshake_timeout_ns  # Python answers within this, or 503
    memcpy(s.authority, t.hdr_authority, sizeof(s.authority))
    memcpy(s.forwarded, t.hdr_forwarded, sizeof(s.forwarded))
    s.l7_checked = t.hdr_l7_checked
    s.next = t.streams
    if t.streams != NULL:
        t.streams.prev = s
    t.streams = s
    t.nstreams += 1
    e.live_streams += 1
    s.await_next = e.awaiting
    e.awaiting = s
    nghttp2_session_set_stream_user_data(t.session, stream_id, s)
    _init_record(&r, REC_INBOUND)
    r.id = s.id
    r.tls_id = t.id
    r.peer_ip = t.peer_ip
    r.peer_port = t.peer_port
    memcpy(r.identity, t.check.identity, sizeof(r.identity))
    memcpy(r.authority, s.authority, sizeof(r.authority))
    memcpy(r.forwarded, s.forwarded, sizeof(r.forwarded))
    r.l7_checked = s.l7_checked
    _post(e, &r)


# -- TLS connections (engine thread) -----------------------------------------------------------------

cdef TlsConn *_new_tls(Engine *e, int fd, bint server, SSL_CTX *ctx) noexcept nogil:
    cdef TlsConn *t = <TlsConn*>calloc(1, sizeof(TlsConn))
    cdef epoll_event ev
    if t == NULL:
        return NULL
    cdef BIO *wbio
    t.ssl = SSL_new(ctx)
    # Records are read from the socket by OpenSSL (read-ahead) but written into t.wire, which _wire_send
    # empties with few large send()s: a socket BIO costs one write() per 16 KiB record.
    wbio = np_wire_bio(&t.wire)
    if t.ssl == NULL or wbio == NULL or SSL_set_fd(t.ssl, fd) != 1:
        if t.ssl != NULL:
            SSL_free(t.ssl)
        if wbio != NULL:
            BIO_free(wbio)
        free(t)
        return NULL
    SSL_set0_wbio(t.ssl, wbio)  # the SSL owns it from now on
    t.kind = KIND_TLS
    t.engine = e
    e.next_tls_id += 1
    t.id = e.next_tls_id
    t.fd = fd
    t.server = server
    t.ident = -1
    t.peer_max_streams = e.max_streams
    t.hdr_stream = -1
    memcpy(t.check.trust_domain, e.trust_domain, sizeof(t.check.trust_domain))
    SSL_set_ex_data(t.ssl, np_check_index(), &t.check)
    if server:
        SSL_set_accept_state(t.ssl)
    else:
        SSL_set_connect_state(t.ssl)
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    ev.data.ptr = t
    if epoll_ctl(e.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
        SSL_free(t.ssl)
        free(t)
        return NULL
    t.next = e.conns
    if e.conns != NULL:
        e.conns.prev = t
    e.conns = t
    e.live_tls += 1
    return t


cdef void _set_closing(Engine *e, TlsConn *t) noexcept nogil:
    """No new stream on t; it closes once its last one ended (_tls_flush, or the scan)."""
    if t.state != T_CLOSING and not t.dead:
        t.state = T_CLOSING
        e.closing_tls += 1


cdef void _drain_notice(Engine *e, TlsConn *t) noexcept nogil:
    """Start an open inbound connection's graceful shutdown: GOAWAY with the largest stream id (the
    peer opens no new stream; those on the way are still taken) and a PING; the final GOAWAY follows
    its ACK (_on_frame_recv) or DRAIN_NOTICE_NS (the scan)."""
    if t.drain_stage != DRAIN_NONE or t.state != T_OPEN or t.session == NULL:
        return
    t.drain_stage = DRAIN_NOTICE
    t.drain_deadline_ns = e.now_ns + DRAIN_NOTICE_NS
    if (nghttp2_submit_shutdown_notice(t.session) != 0
            or nghttp2_submit_ping(t.session, NGHTTP2_FLAG_NONE, <const uint8_t*>_DRAIN_PING) != 0):
        _drain_final(e, t)  # out of memory: no notice, straight to the final word
        return
    _mark_dirty(e, t)


cdef void _drain_final(Engine *e, TlsConn *t) noexcept nogil:
    """GOAWAY NO_ERROR with the last stream this side processed: the peer knows every stream above it
    can go elsewhere; the ones below finish, then the connection closes."""
    if t.drain_stage == DRAIN_FINAL or t.session == NULL:
        return
    t.drain_stage = DRAIN_FINAL
    _set_closing(e, t)  # a stream arriving from now on is refused (REFUSED_STREAM: the peer retries it)
    if nghttp2_submit_goaway(t.session, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(t.session),
                             NGHTTP2_NO_ERROR, NULL, 0) != 0:
        # Out of memory: the peer learns it when the connection closes after its last stream (the scan
        # sends the GOAWAY then); meanwhile new streams are refused one by one.
        return
    _mark_dirty(e, t)


cdef void _retire_idle(Engine *e, TlsConn *t) noexcept nogil:
    """Close an open connection without streams, saying goodbye first."""
    nghttp2_submit_goaway(t.session, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, NULL, 0)
    if _tls_flush(e, t) == 0:
        _tls_close(e, t)


cdef void _begin_draining(Engine *e) noexcept nogil:
    """Inbound connections start their graceful shutdown (and connections accepted from now on do so as
    soon as they open); outbound ones made so far take no new stream and close when idle (now, for those
    without streams). The listener is still served, and adoptions still work, on new connections."""
    cdef TlsConn *t = e.conns
    cdef TlsConn *next
    e.draining = True
    while t != NULL:
        next = t.next
        if t.dead:
            pass
        elif t.server:
            _drain_notice(e, t)  # one still handshaking: at its first SETTINGS
        else:
            t.retired = True
            if t.state >= T_OPEN:
                _set_closing(e, t)
                if t.nstreams == 0:
                    _retire_idle(e, t)
        t = next


cdef void _tls_close(Engine *e, TlsConn *t) noexcept nogil:
    """Release a TLS connection; its streams (if any are left) are reset as TUNNEL_FAILED."""
    cdef TlsConn **link
    while t.streams != NULL:
        _stream_finish(e, t.streams, END_TUNNEL_FAILED, ECONNRESET)
    if t.dead:
        return
    if t.state == T_CLOSING:
        e.closing_tls -= 1
    t.dead = True
    if t.dirty:
        link = &e.dirty
        while link[0] != NULL:
            if link[0] == t:
                link[0] = t.dirty_next
                break
            link = &link[0].dirty_next
        t.dirty = False
    epoll_ctl(e.epfd, EPOLL_CTL_DEL, t.fd, NULL)
    if t.session != NULL:
        nghttp2_session_del(t.session)
        t.session = NULL
    SSL_free(t.ssl)
    t.ssl = NULL
    close(t.fd)
    t.fd = -1
    free(t.out)
    t.out = NULL
    free(t.wire.data)
    t.wire.data = NULL
    if t.prev != NULL:
        t.prev.next = t.next
    else:
        e.conns = t.next
    if t.next != NULL:
        t.next.prev = t.prev
    e.live_tls -= 1
    t.grave_next = e.tls_graveyard
    e.tls_graveyard = t


cdef void _tls_fail(Engine *e, TlsConn *t, int err, const char *reason) noexcept nogil:
    if t.dead:
        return
    if t.ssl != NULL:
        _wire_send(t)  # best effort: the alert OpenSSL wrote, so the peer learns why
    if t.state < T_OPEN or t.nstreams > 0:
        _record_tls(e, t, REC_TLS_FAILED, err, reason)
    _tls_close(e, t)


cdef void _fail_reason(TlsConn *t, char *out, size_t cap, const char *fallback) noexcept nogil:
    """Why a handshake or TLS read failed, in words: our SVID check, OpenSSL's verification, or its error
    queue (e.g. the peer's alert), in that order."""
    cdef long verify
    cdef unsigned long code
    if t.check.svid_error != NP_SVID_OK:
        _copy_text(out, cap, np_svid_reason(t.check.svid_error), strlen(np_svid_reason(t.check.svid_error)))
        return
    verify = SSL_get_verify_result(t.ssl)
    if verify != X509_V_OK:
        snprintf(out, cap, "certificate verification failed: %s", X509_verify_cert_error_string(verify))
        return
    code = ERR_peek_last_error()
    if code != 0:
        ERR_error_string_n(code, out, cap)
        return
    _copy_text(out, cap, fallback, strlen(fallback))


cdef int _wire_send(TlsConn *t) noexcept nogil:
    """Send the records OpenSSL wrote until the socket pushes back (write_blocked) or none is left;
    -1 (errno set) if the socket failed."""
    cdef ssize_t n
    while t.wire.off < t.wire.len:
        n = send(t.fd, t.wire.data + t.wire.off, t.wire.len - t.wire.off, MSG_NOSIGNAL)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                t.write_blocked = True
                return 0
            return -1
        t.wire.off += n
    t.wire.off = t.wire.len = 0
    return 0


cdef inline size_t _wire_backlog(TlsConn *t) noexcept nogil:
    return t.wire.len - t.wire.off


cdef int _ssl_write_all(TlsConn *t, const uint8_t *p, size_t n) noexcept nogil:
    """Encrypt p[:n] into t.wire (which never pushes back): a record or a few per SSL_write call."""
    cdef int rc
    cdef size_t done = 0
    while done < n:
        ERR_clear_error()
        rc = SSL_write(t.ssl, p + done, <int>(n - done))
        if rc <= 0:
            return -1
        done += <size_t>rc
    return 0


cdef int _handshake(Engine *e, TlsConn *t) noexcept nogil:
    cdef int rc, err
    cdef char reason[256]
    ERR_clear_error()
    rc = SSL_do_handshake(t.ssl)
    err = SSL_get_error(t.ssl, rc) if rc != 1 else SSL_ERROR_NONE
    if (rc == 1 or err == SSL_ERROR_WANT_READ) and _wire_send(t) < 0:
        snprintf(reason, sizeof(reason), "send failed during the TLS handshake: errno %d", errno)
        _tls_fail(e, t, errno, reason)
        return -1
    if rc == 1:
        return _open_session(e, t)
    if err == SSL_ERROR_WANT_READ:
        t.readable = False
        return 0
    _fail_reason(t, reason, sizeof(reason), "connection closed during the TLS handshake")
    _tls_fail(e, t, errno if err == SSL_ERROR_SYSCALL and errno != 0 else EPROTO, reason)
    return -1


cdef int _open_session(Engine *e, TlsConn *t) noexcept nogil:
    cdef nghttp2_settings_entry settings[4]
    cdef int rc, n = 3
    cdef Stream *s
    cdef Stream *next
    if t.server:
        rc = nghttp2_session_server_new2(&t.session, e.callbacks, t, e.option)
    else:
        rc = nghttp2_session_client_new2(&t.session, e.callbacks, t, e.option)
    if rc != 0:
        t.session = NULL
        _tls_fail(e, t, ENOMEM, "nghttp2 session")
        return -1
    t.state = T_OPEN
    t.idle_since_ns = e.now_ns
    t.readable = True  # records that arrived with the handshake's last flight raise no new edge
    settings[0].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
    settings[0].value = e.max_streams
    settings[1].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
    settings[1].value = e.stream_window
    settings[2].settings_id = NGHTTP2_SETTINGS_MAX_FRAME_SIZE
    settings[2].value = MAX_FRAME
    if not t.server:
        settings[3].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
        settings[3].value = 0
        n = 4
    if (nghttp2_submit_settings(t.session, NGHTTP2_FLAG_NONE, settings, n) != 0
            or nghttp2_session_set_local_window_size(t.session, NGHTTP2_FLAG_NONE, 0,
                                                     <int32_t>e.connection_window) != 0):
        _tls_fail(e, t, ENOMEM, "nghttp2 settings")
        return -1
    _record_tls(e, t, REC_TLS_OPEN, 0, NULL)
    s = t.streams
    while s != NULL:
        next = s.next
        if s.state == S_WAIT_TLS and _submit_connect(e, s) < 0 and t.dead:
            return -1
        s = next
    if t.retired:
        _set_closing(e, t)  # draining began while it was opening: it carries the streams it had, only
    _mark_dirty(e, t)
    return 0


cdef int _submit_connect(Engine *e, Stream *s) noexcept nogil:
    cdef TlsConn *t = s.t
    cdef nghttp2_nv nv[4]
    cdef size_t n = 2
    cdef nghttp2_data_provider provider
    cdef int32_t sid
    _nv(&nv[0], ":method", "CONNECT")
    _nv(&nv[1], ":authority", s.authority)
    if s.forwarded[0] != 0:
        _nv(&nv[n], "forwarded", s.forwarded)
        n += 1
    if s.l7_checked:
        _nv(&nv[n], _AUTHORIZED_FIELD, _AUTHORIZED_L7)
        n += 1
    provider.source.ptr = s
    provider.read_callback = _read_plain
    sid = nghttp2_submit_request(t.session, NULL, nv, n, &provider, s)
    if sid < 0:
        _stream_finish(e, s, END_LOCAL_RESOURCES if sid == -901 else END_TUNNEL_FAILED, ENOMEM)
        return -1
    s.stream_id = sid
    s.state = S_REQUESTED
    _mark_dirty(e, t)
    return 0


cdef int _tls_read(Engine *e, TlsConn *t) noexcept nogil:
    """Decrypt and feed nghttp2 until the socket is drained (or the turn's budget is spent); -1 if t ended.

    Records are gathered up to READ_BUF before nghttp2 sees them, so a stream's DATA reaches its plain
    socket in one send() per batch rather than one per 16 KiB record."""
    cdef int rc, err = SSL_ERROR_NONE, turns = TLS_READS_PER_TURN
    cdef size_t filled
    cdef ssize_t fed
    cdef char reason[256]
    while t.readable and turns > 0 and not t.dead:
        turns -= 1
        filled = 0
        err = SSL_ERROR_NONE
        ERR_clear_error()
        while filled + RECORD_MAX <= READ_BUF:
            rc = SSL_read(t.ssl, e.rbuf + filled, <int>(READ_BUF - filled))
            if rc > 0:
                filled += <size_t>rc
                continue
            err = SSL_get_error(t.ssl, rc)
            if err == SSL_ERROR_WANT_READ:
                t.readable = False
                err = SSL_ERROR_NONE
            break
        if filled > 0:
            fed = nghttp2_session_mem_recv(t.session, e.rbuf, filled)
            if fed < 0:
                # nghttp2 queued a GOAWAY: send it if the socket takes it, then give up the connection.
                _tls_flush(e, t)
                if not t.dead:
                    _tls_fail(e, t, EPROTO, nghttp2_strerror(<int>fed))
                return -1
        if err == SSL_ERROR_WANT_WRITE or err == SSL_ERROR_NONE:
            continue
        if err == SSL_ERROR_ZERO_RETURN or (err == SSL_ERROR_SYSCALL and errno == 0):
            _tls_fail(e, t, ECONNRESET, "the peer closed the TLS connection")
        else:
            _fail_reason(t, reason, sizeof(reason), "TLS read failed")
            _tls_fail(e, t, errno if err == SSL_ERROR_SYSCALL else EPROTO, reason)
        return -1
    return 0  # the caller flushes what this produced (WINDOW_UPDATEs, answers, DATA freed by them)


cdef int _out_append(TlsConn *t, const uint8_t *p, size_t n) noexcept nogil:
    cdef size_t want
    cdef unsigned char *grown
    if t.out_cap - t.out_len < n:
        want = t.out_cap * 2 if t.out_cap else RECORD_MAX
        while want - t.out_len < n:
            want *= 2
        grown = <unsigned char*>realloc(t.out, want)
        if grown == NULL:
            return -1
        t.out = grown
        t.out_cap = want
    memcpy(t.out + t.out_len, p, n)
    t.out_len += n
    return 0


cdef int _tls_flush(Engine *e, TlsConn *t) noexcept nogil:
    """Frame what nghttp2 has to send, encrypt it and send it, until the socket pushes back (then at most
    about WIRE_HIGH encrypted bytes wait here) or nothing is left; -1 if t ended.

    Large frames (DATA) are encrypted where nghttp2 framed them; small ones (WINDOW_UPDATE, HEADERS,
    short DATA) are gathered first so that several share one record."""
    cdef ssize_t n
    cdef size_t produced
    cdef bint failed
    cdef const uint8_t *p
    cdef char reason[256]
    if t.dead or t.state < T_OPEN or t.session == NULL:
        return 0
    while True:
        if _wire_send(t) < 0:
            snprintf(reason, sizeof(reason), "send failed: errno %d", errno)
            _tls_fail(e, t, errno, reason)
            return -1
        if t.write_blocked or _wire_backlog(t) >= WIRE_HIGH:
            return 0
        produced = 0
        failed = False
        while produced < TLS_OUT_FILL:
            n = nghttp2_session_mem_send(t.session, &p)
            if n < 0:
                _tls_fail(e, t, EPROTO, nghttp2_strerror(<int>n))
                return -1
            if n == 0:
                break
            produced += <size_t>n
            if <size_t>n < SMALL_FRAME:
                if t.out_len + <size_t>n > RECORD_MAX:
                    failed = _ssl_write_all(t, t.out, t.out_len) < 0
                    t.out_len = 0
                    if failed:
                        break
                if _out_append(t, p, <size_t>n) < 0:
                    _tls_fail(e, t, ENOMEM, "out of memory framing TLS output")
                    return -1
                continue
            if t.out_len > 0:
                failed = _ssl_write_all(t, t.out, t.out_len) < 0
                t.out_len = 0
                if failed:
                    break
            if _ssl_write_all(t, p, <size_t>n) < 0:
                failed = True
                break
        if not failed and t.out_len > 0:
            failed = _ssl_write_all(t, t.out, t.out_len) < 0
            t.out_len = 0
        if failed:
            _fail_reason(t, reason, sizeof(reason), "TLS write failed")
            _tls_fail(e, t, ENOMEM, reason)
            return -1
        if produced == 0:
            break
    if (t.nstreams == 0 and nghttp2_session_want_read(t.session) == 0
            and nghttp2_session_want_write(t.session) == 0):
        # A GOAWAY went one way or the other and every stream is done: nghttp2's (closed once END_STREAM
        # went both ways) and ours (which may still be writing the last bytes to the plain socket).
        _tls_close(e, t)
        return -1
    return 0


cdef void _tls_io(Engine *e, TlsConn *t) noexcept nogil:
    if t.state == T_HANDSHAKING:
        if _handshake(e, t) < 0 or t.state == T_HANDSHAKING:
            return
    if t.state >= T_OPEN:
        if _tls_read(e, t) < 0:
            return
        _mark_dirty(e, t)


cdef void _tls_event(Engine *e, TlsConn *t, uint32_t events) noexcept nogil:
    cdef int err
    cdef char reason[64]
    if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        t.readable = True
    if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        t.write_blocked = False
    if t.state == T_CONNECTING:
        err = sock_error(t.fd) if events & (EPOLLERR | EPOLLHUP) else 0
        if err != 0:
            snprintf(reason, sizeof(reason), "connect failed: errno %d", err)
            _tls_fail(e, t, err, reason)
            return
        if not events & EPOLLOUT:
            return
        t.state = T_HANDSHAKING
    _tls_io(e, t)


# -- plain socket events -----------------------------------------------------------------------------

cdef void _stream_event(Engine *e, Stream *s, uint32_t events) noexcept nogil:
    cdef int err
    if s.state == S_CONNECTING:
        # Inbound: the connect to the local pod finished (or failed).
        err = sock_error(s.fd) if events & (EPOLLERR | EPOLLHUP) else 0
        if err != 0:
            _respond(e, s, 503)
            _stream_finish(e, s, END_CONNECT_FAILED, err)
            return
        if not events & EPOLLOUT:
            return
        s.state = S_OPEN
        s.plain_writable = True
        _respond(e, s, 200)
        _flush_plain(e, s)  # what the peer sent before the answer
        return
    if events & EPOLLERR:
        err = sock_error(s.fd)
        if err != 0:
            s.failed_side = SIDE_PLAIN
            _stream_reset(e, s, END_PLAIN_RESET, err, NGHTTP2_CANCEL)
            return
    if events & (EPOLLOUT | EPOLLHUP):
        s.plain_writable = True
        if _flush_plain(e, s) < 0:
            return
    if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP) and s.deferred and _may_send(s) and not s.h2_closed:
        s.deferred = False
        nghttp2_session_resume_data(s.t.session, s.stream_id)
        _mark_dirty(e, s.t)


cdef void _apply_answer(Engine *e, Answer *a) noexcept nogil:
    cdef Stream *s = e.awaiting
    cdef Stream **link = &e.awaiting
    cdef sockaddr_in dst, src
    cdef int fd, one = 1, rc, err
    cdef epoll_event ev
    while s != NULL and s.id != a.key:
        link = &s.await_next
        s = s.await_next
    if s == NULL:
        return  # the stream ended meanwhile (the peer reset it)
    link[0] = s.await_next
    s.await_next = NULL
    if not a.allow:
        s.state = S_OPEN  # no longer awaiting; it ends right here
        _respond(e, s, a.status)
        _stream_finish(e, s, END_REFUSED, 0)
        return
    memset(&dst, 0, sizeof(dst))
    dst.sin_family = AF_INET
    dst.sin_port = htons(a.dst_port)
    dst.sin_addr.s_addr = a.dst_ip
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    rc = 0 if fd >= 0 else -1
    if rc == 0 and a.bind_ip != 0:
        # Transparent, like the L4 relay: the pod sees the original source address.
        memset(&src, 0, sizeof(src))
        src.sin_family = AF_INET
        src.sin_addr.s_addr = a.bind_ip
        rc = setsockopt(fd, IPPROTO_IP, IP_TRANSPARENT, &one, sizeof(one))
        if rc == 0:
            rc = setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one))
        if rc == 0:
            rc = bind(fd, <sockaddr*>&src, sizeof(src))
    if rc == 0:
        rc = set_reset_on_close(fd, True)
    if rc == 0:
        rc = set_tcp_options(fd)
    if rc == 0:
        rc = connect(fd, <sockaddr*>&dst, sizeof(dst))
        if rc < 0 and errno == EINPROGRESS:
            rc = 0
    if rc == 0:
        s.fd = fd
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.ptr = s
        rc = epoll_ctl(e.epfd, EPOLL_CTL_ADD, fd, &ev)
    err = errno
    if rc < 0:
        if fd >= 0:
            close(fd)
        s.fd = -1
        s.state = S_OPEN
        _respond(e, s, 503)
        _stream_finish(e, s, END_CONNECT_FAILED, err)
        return
    s.state = S_CONNECTING
    s.deadline_ns = e.now_ns + e.connect_timeout_ns


# -- the engine loop ---------------------------------------------------------------------------------

cdef void _adopt(Engine *e, Adoption *a) noexcept nogil:
    cdef Stream *s = <Stream*>calloc(1, sizeof(Stream))
    cdef epoll_event ev
    cdef Record r
    if s == NULL:
        set_reset_on_close(a.fd, True)
        close(a.fd)
        _init_record(&r, REC_STREAM_DONE)
        r.id = a.conn_id
        r.outbound = True
        r.ending = END_LOCAL_RESOURCES
        r.err = ENOMEM
        _post(e, &r)
        return
    s.kind = KIND_STREAM
    s.id = a.conn_id
    s.outbound = True
    s.fd = a.fd
    s.stream_id = -1
    s.state = S_WAIT_TLS
    s.plain_writable = True
    memcpy(s.authority, a.authority, sizeof(s.authority))
    memcpy(s.forwarded, a.forwarded, sizeof(s.forwarded))
    s.l7_checked = a.l7_checked
    s.announce_open = a.announce_open
    e.live_streams += 1
    # The client socket resets if anything goes wrong from here on (it carries SO_LINGER {1, 0}).
    set_reset_on_close(s.fd, True)
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    ev.data.ptr = s
    if epoll_ctl(e.epfd, EPOLL_CTL_ADD, s.fd, &ev) < 0:
        _stream_finish(e, s, END_LOCAL_RESOURCES, errno)
        return
    _place_outbound(e, s, a.peer_ip, a.peer_port, a.ident, a.expected)


cdef void _place_outbound(Engine *e, Stream *s, uint32_t peer_ip, uint16_t peer_port, int ident,
                          const char *expected) noexcept nogil:
    """Put a stream without a connection (new, or refused by the peer) on a pooled connection to the peer,
    or on a new one; the CONNECT goes out now if the connection is open, else once it is."""
    cdef TlsConn *t = _pooled(e, peer_ip, peer_port, ident, expected)
    cdef int err = 0
    if t == NULL:
        t = _dial(e, peer_ip, peer_port, ident, expected, &err)
        if t == NULL:
            _stream_finish(e, s, END_TUNNEL_FAILED if err != ENOMEM and err != EMFILE and err != ENFILE
                           else END_LOCAL_RESOURCES, err)
            return
    s.t = t
    s.prev = NULL
    s.next = t.streams
    if t.streams != NULL:
        t.streams.prev = s
    t.streams = s
    t.nstreams += 1
    if t.state == T_OPEN:
        _submit_connect(e, s)


cdef TlsConn *_dial(Engine *e, uint32_t peer_ip, uint16_t peer_port, int ident, const char *expected,
                    int *err) noexcept nogil:
    """A new client connection to the peer with the identity's current certificate (connecting); NULL
    with *err set if it cannot be started."""
    cdef SSL_CTX *ctx = NULL
    cdef uint32_t generation = 0
    cdef sockaddr_in peer
    cdef TlsConn *t = NULL
    cdef int fd
    pthread_mutex_lock(&e.lock)
    if 0 <= ident < <int>e.nidents and e.idents[ident].ctx != NULL:
        ctx = e.idents[ident].ctx
        SSL_CTX_up_ref(ctx)
        generation = e.idents[ident].generation
    pthread_mutex_unlock(&e.lock)
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd >= 0 and ctx != NULL:
        memset(&peer, 0, sizeof(peer))
        peer.sin_family = AF_INET
        peer.sin_port = htons(peer_port)
        peer.sin_addr.s_addr = peer_ip
        if set_tcp_options(fd) < 0 or (connect(fd, <sockaddr*>&peer, sizeof(peer)) < 0 and errno != EINPROGRESS):
            err[0] = errno
        else:
            t = _new_tls(e, fd, False, ctx)
            err[0] = ENOMEM
    else:
        err[0] = errno if fd < 0 else ENOENT
    if ctx != NULL:
        SSL_CTX_free(ctx)  # SSL_new took its own reference
    if t == NULL:
        if fd >= 0:
            close(fd)
        return NULL
    t.state = T_CONNECTING
    t.peer_ip = peer_ip
    t.peer_port = peer_port
    t.ident = ident
    t.generation = generation
    t.deadline_ns = e.now_ns + e.connect_timeout_ns + e.handshake_timeout_ns
    _copy_text(t.check.expected, sizeof(t.check.expected), expected, strlen(expected))
    return t


cdef TlsConn *_pooled(Engine *e, uint32_t peer_ip, uint16_t peer_port, int ident,
                      const char *expected) noexcept nogil:
    """An open (or opening) connection to the same peer with the same identity's current certificate
    and the same expected peer identity, with room for one more stream; NULL if there is none. Draining
    retired every connection made before it began (their streams go on; new ones take new connections)."""
    cdef TlsConn *t = e.conns
    cdef uint32_t generation = 0
    cdef uint32_t limit
    pthread_mutex_lock(&e.lock)
    if 0 <= ident < <int>e.nidents:
        generation = e.idents[ident].generation
    pthread_mutex_unlock(&e.lock)
    while t != NULL:
        if (not t.server and not t.dead and not t.retired and t.state < T_CLOSING and t.peer_ip == peer_ip
                and t.peer_port == peer_port and t.ident == ident and t.generation == generation
                and strcmp(t.check.expected, expected) == 0):
            limit = t.peer_max_streams if t.peer_max_streams < e.max_streams else e.max_streams
            if t.nstreams < limit and (t.session == NULL or nghttp2_session_check_request_allowed(t.session)):
                return t
        t = t.next
    return NULL


cdef void _outbound_refused(Engine *e, Stream *s) noexcept nogil:
    """The peer turned an outbound stream away unprocessed (nghttp2 is closing it with REFUSED_STREAM).
    Before any byte of the client's left, it is tried again on another connection (the CONNECT carries
    nothing else); afterwards those bytes are gone, so it ends as TUNNEL_FAILED, err ECONNREFUSED (the
    client socket gets an RST, and the HTTP engine sees a connect failure)."""
    cdef TlsConn *old = s.t
    if s.bytes_up > 0 or s.retries >= STREAM_RETRIES or e.stopping:
        _stream_finish(e, s, END_TUNNEL_FAILED, ECONNREFUSED)
        return
    # Off the refusing connection (it is left open for its other streams, or closes when they end).
    nghttp2_session_set_stream_user_data(old.session, s.stream_id, NULL)
    _unlink_stream(e, old, s)
    _mark_dirty(e, old)
    s.prev = s.next = NULL
    s.stream_id = -1
    s.state = S_WAIT_TLS
    s.h2_closed = False
    s.deferred = False
    s.plain_eof = False  # a FIN read already is read again (recv keeps returning 0)
    s.retries += 1
    _place_outbound(e, s, old.peer_ip, old.peer_port, old.ident, old.check.expected)


cdef void _accept(Engine *e) noexcept nogil:
    cdef sockaddr_in peer
    cdef socklen_t plen
    cdef int fd
    cdef SSL_CTX *ctx = NULL
    cdef TlsConn *t
    cdef int err
    while True:
        plen = sizeof(peer)
        # Under the lock: stop_listening() returns only once no accept() uses the socket any more.
        pthread_mutex_lock(&e.lock)
        if e.listener.fd < 0:
            e.accept_pending = False
            pthread_mutex_unlock(&e.lock)
            return
        fd = accept4(e.listener.fd, <sockaddr*>&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        err = errno
        if fd >= 0:
            ctx = e.server_ctx
            if ctx != NULL:
                SSL_CTX_up_ref(ctx)
        pthread_mutex_unlock(&e.lock)
        if fd < 0:
            if err == EINTR or err == ECONNABORTED:
                continue
            # EAGAIN: drained. EMFILE and the like: the scan tries again (the edge will not come back).
            e.accept_pending = err != EAGAIN
            return
        if ctx == NULL or set_tcp_options(fd) < 0:
            set_reset_on_close(fd, True)
            close(fd)  # no server certificate yet: nobody can be served
            if ctx != NULL:
                SSL_CTX_free(ctx)
            continue
        t = _new_tls(e, fd, True, ctx)
        SSL_CTX_free(ctx)
        if t == NULL:
            set_reset_on_close(fd, True)
            close(fd)
            continue
        t.state = T_HANDSHAKING
        t.peer_ip = peer.sin_addr.s_addr
        t.peer_port = ntohs(peer.sin_port)
        t.deadline_ns = e.now_ns + e.handshake_timeout_ns


cdef void _flush_dirty(Engine *e) noexcept nogil:
    cdef TlsConn *t = e.dirty
    cdef TlsConn *next
    e.dirty = NULL
    while t != NULL:
        next = t.dirty_next
        t.dirty = False
        t.dirty_next = NULL
        if not t.dead and t.state >= T_OPEN:
            if t.readable and _tls_read(e, t) < 0:
                t = next
                continue
            if _tls_flush(e, t) == 0 and t.readable and not t.dead:
                _mark_dirty(e, t)  # its read budget ran out: more next turn, after the others
        t = next


cdef void _scan(Engine *e) noexcept nogil:
    """Deadlines: connect + handshake, Python's decisions, pod connects, idle pooled connections."""
    cdef TlsConn *t = e.conns
    cdef TlsConn *next
    cdef Stream *s
    cdef Stream *snext
    cdef uint32_t current
    e.scanned_ns = e.now_ns
    if e.accept_pending:
        _accept(e)
    while t != NULL:
        next = t.next
        if t.nstreams == 0 and t.out_len == 0 and t.wire.off == t.wire.len:
            # A connection without streams keeps no buffers.
            free(t.out)
            t.out = NULL
            t.out_cap = 0
            free(t.wire.data)
            t.wire.data = NULL
            t.wire.off = t.wire.len = t.wire.cap = 0
        if t.state < T_OPEN:
            if e.now_ns > t.deadline_ns:
                _tls_fail(e, t, ETIMEDOUT, "TLS connect or handshake timed out")
            t = next
            continue
        if t.drain_stage == DRAIN_NOTICE and e.now_ns > t.drain_deadline_ns:
            _drain_final(e, t)  # the PING was not acknowledged in time
        elif (t.server and e.draining and t.drain_stage == DRAIN_NONE
                and e.now_ns - t.idle_since_ns > DRAIN_NOTICE_NS):
            _drain_notice(e, t)  # accepted while draining, and the peer sent no SETTINGS
        s = t.streams
        while s != NULL:
            snext = s.next
            if s.state == S_AWAIT_DECISION and e.now_ns > s.deadline_ns:
                s.state = S_OPEN
                _respond(e, s, 503)
                _stream_finish(e, s, END_CONNECT_FAILED, ETIMEDOUT)
            elif s.state == S_CONNECTING and e.now_ns > s.deadline_ns:
                _respond(e, s, 504)
                _stream_finish(e, s, END_CONNECT_FAILED, ETIMEDOUT)
            s = snext
        if not t.server and t.nstreams == 0:
            current = t.generation
            pthread_mutex_lock(&e.lock)
            if 0 <= t.ident < <int>e.nidents:
                current = e.idents[t.ident].generation
            pthread_mutex_unlock(&e.lock)
            if (current != t.generation or t.state == T_CLOSING or e.draining
                    or e.now_ns - t.idle_since_ns > e.pool_idle_ns):
                # Idle past the pool timeout, made with a certificate since rotated, or draining (a
                # draining worker keeps no idle connection to a peer): say goodbye.
                _retire_idle(e, t)
        elif t.server and t.nstreams == 0 and (t.state == T_CLOSING
                                               or e.now_ns - t.idle_since_ns > 2 * e.pool_idle_ns):
            # The client closes its idle pooled connections after pool_idle; one that does not (gone
            # without a FIN, or not one of ours) is let go after twice that.
            _retire_idle(e, t)
        t = next


cdef void _take_submissions(Engine *e) noexcept nogil:
    cdef Adoption *adopts
    cdef Answer *answers
    cdef size_t nadopts, nanswers, i
    cdef uint64_t counter
    cdef Record r
    cdef bint drain
    read(e.wake_fd, &counter, sizeof(counter))
    pthread_mutex_lock(&e.lock)
    drain = e.drain_requested
    adopts, nadopts = e.adopts, e.adopts_len
    answers, nanswers = e.answers, e.answers_len
    e.adopts = NULL
    e.adopts_len = e.adopts_cap = 0
    e.answers = NULL
    e.answers_len = e.answers_cap = 0
    pthread_mutex_unlock(&e.lock)
    for i in range(nadopts):
        if e.stopping:
            set_reset_on_close(adopts[i].fd, True)
            close(adopts[i].fd)
            _init_record(&r, REC_STREAM_DONE)  # every adopted socket gets its one STREAM_DONE
            r.id = adopts[i].conn_id
            r.outbound = True
            r.ending = END_ABORTED
            _post(e, &r)
        else:
            _adopt(e, &adopts[i])
    for i in range(nanswers):
        _apply_answer(e, &answers[i])
    free(adopts)
    free(answers)
    if drain and not e.draining and not e.stopping:
        _begin_draining(e)  # after the adoptions handed over before begin_draining()


cdef void _bury(Engine *e) noexcept nogil:
    cdef TlsConn *t
    cdef Stream *s
    while e.stream_graveyard != NULL:
        s = e.stream_graveyard
        e.stream_graveyard = s.grave_next
        free(s)
    while e.tls_graveyard != NULL:
        t = e.tls_graveyard
        e.tls_graveyard = t.grave_next
        free(t)


cdef void _close_all(Engine *e) noexcept nogil:
    cdef Stream *s
    cdef TlsConn *t
    _take_submissions(e)
    while e.conns != NULL:
        t = e.conns
        while t.streams != NULL:
            s = t.streams
            if t.session != NULL and s.stream_id > 0 and not s.h2_closed:
                nghttp2_submit_rst_stream(t.session, NGHTTP2_FLAG_NONE, s.stream_id, NGHTTP2_CANCEL)
            _stream_finish(e, s, END_ABORTED, 0)
        if t.session != NULL:
            nghttp2_submit_goaway(t.session, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, NULL, 0)
            _tls_flush(e, t)  # best effort: the peer learns the streams were cancelled
        if not t.dead:
            _tls_close(e, t)
    pthread_mutex_lock(&e.lock)
    if e.listener.fd >= 0:
        epoll_ctl(e.epfd, EPOLL_CTL_DEL, e.listener.fd, NULL)
        e.listener.fd = -1
    pthread_mutex_unlock(&e.lock)


cdef void _loop(Engine *e) noexcept nogil:
    cdef epoll_event events[EVENTS_PER_WAIT]
    cdef int n, i, kind
    cdef void *ptr
    while not e.stopping:
        n = epoll_wait(e.epfd, events, EVENTS_PER_WAIT, 0 if e.dirty != NULL else SCAN_INTERVAL_NS // 1000000)
        if n < 0 and errno != EINTR:
            break
        e.now_ns = now_ns()
        for i in range(n if n > 0 else 0):
            ptr = events[i].data.ptr
            if ptr == NULL:
                _take_submissions(e)
                continue
            kind = (<int*>ptr)[0]
            if kind == KIND_TLS:
                if not (<TlsConn*>ptr).dead:
                    _tls_event(e, <TlsConn*>ptr, events[i].events)
            elif kind == KIND_STREAM:
                if not (<Stream*>ptr).dead:
                    _stream_event(e, <Stream*>ptr, events[i].events)
            else:
                _accept(e)
        _flush_dirty(e)
        if e.now_ns - e.scanned_ns >= SCAN_INTERVAL_NS:
            _scan(e)
            _flush_dirty(e)
        _bury(e)
    _close_all(e)
    _bury(e)


# -- the Python face ---------------------------------------------------------------------------------

cdef class TunnelWorker:
    """One tunnel engine thread. Call run() on a dedicated thread; the rest from the Python loop."""

    def __cinit__(self, int notify_fd, str trust_domain, uint32_t stream_window=4194304,
                  uint32_t connection_window=16777216, uint32_t max_streams=100,
                  int64_t handshake_timeout_ms=10000, int64_t connect_timeout_ms=5000,
                  int64_t pool_idle_timeout_ms=30000):
        """notify_fd: an eventfd written when records are ready (one write per batch).

        Defaults: 4 MiB stream and 16 MiB connection receive windows and 100 streams per connection
        (ztunnel's HBONE pool); a peer must connect and finish the TLS handshake within 5 s + 10 s (and
        Python must decide an inbound stream within 10 s, else 503); a connect to a local pod times out
        after 5 s (504); a pooled connection without streams is closed after 30 s.
        """
        cdef bytes td = trust_domain.encode("ascii")
        cdef epoll_event ev
        if not 65535 <= stream_window <= 2147483647 or not 65535 <= connection_window <= 2147483647:
            raise ValueError("windows must be 65535 .. 2^31-1 bytes")
        if max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if handshake_timeout_ms <= 0 or connect_timeout_ms <= 0 or pool_idle_timeout_ms <= 0:
            raise ValueError("timeouts must be positive")
        if not 0 < len(td) < NP_TD_MAX:
            raise ValueError(f"bad trust domain {trust_domain!r}")
        self.ident_slots = {}
        self.e = <Engine*>calloc(1, sizeof(Engine))
        if self.e == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.e.lock, NULL)
        self.e.epfd = -1
        self.e.wake_fd = -1
        self.e.listener.kind = KIND_LISTENER
        self.e.listener.fd = -1
        self.e.notify_fd = notify_fd
        memcpy(self.e.trust_domain, <const char*>td, len(td))
        self.e.stream_window = stream_window
        self.e.connection_window = connection_window
        self.e.max_streams = max_streams
        self.e.handshake_timeout_ns = handshake_timeout_ms * 1000000
        self.e.connect_timeout_ns = connect_timeout_ms * 1000000
        self.e.pool_idle_ns = pool_idle_timeout_ms * 1000000
        self.e.now_ns = now_ns()
        self.e.scanned_ns = self.e.now_ns
        if nghttp2_session_callbacks_new(&self.e.callbacks) != 0 or nghttp2_option_new(&self.e.option) != 0:
            raise MemoryError()
        nghttp2_session_callbacks_set_on_begin_headers_callback(self.e.callbacks, _on_begin_headers)
        nghttp2_session_callbacks_set_on_header_callback(self.e.callbacks, _on_header)
        nghttp2_session_callbacks_set_on_frame_recv_callback(self.e.callbacks, _on_frame_recv)
        nghttp2_session_callbacks_set_on_frame_send_callback(self.e.callbacks, _on_frame_send)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(self.e.callbacks, _on_data_chunk)
        nghttp2_session_callbacks_set_on_stream_close_callback(self.e.callbacks, _on_stream_close)
        nghttp2_session_callbacks_set_data_source_read_length_callback(self.e.callbacks, _read_length)
        # Credit DATA only once written to the plain socket (nghttp2_session_consume).
        nghttp2_option_set_no_auto_window_update(self.e.option, 1)
        self.e.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.e.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.e.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.e.wake_fd < 0:
            raise OSError(errno, "eventfd")
        ev.events = EPOLLIN
        ev.data.ptr = NULL  # NULL marks the wake-up eventfd
        if epoll_ctl(self.e.epfd, EPOLL_CTL_ADD, self.e.wake_fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")
        self.trust_domain = trust_domain

    def __dealloc__(self):
        cdef size_t i
        cdef Engine *e = self.e
        if e == NULL:
            return
        for i in range(e.adopts_len):
            set_reset_on_close(e.adopts[i].fd, True)
            close(e.adopts[i].fd)
        for i in range(e.nidents):
            if e.idents[i].ctx != NULL:
                SSL_CTX_free(e.idents[i].ctx)
        if e.server_ctx != NULL:
            SSL_CTX_free(e.server_ctx)
        free(e.idents)
        free(e.adopts)
        free(e.answers)
        free(e.records)
        if e.callbacks != NULL:
            nghttp2_session_callbacks_del(e.callbacks)
        if e.option != NULL:
            nghttp2_option_del(e.option)
        if e.epfd >= 0:
            close(e.epfd)
        if e.wake_fd >= 0:
            close(e.wake_fd)
        pthread_mutex_destroy(&e.lock)
        free(e)

    @property
    def live_streams(self):
        """Streams the engine owns now (outbound and inbound, in any state)."""
        return self.e.live_streams

    @property
    def tls_connections(self):
        """TLS connections open now (pooled client ones and accepted ones, handshaking included)."""
        return self.e.live_tls

    @property
    def closing_connections(self):
        """Of tls_connections, those that take no new stream and close when their last one ends (a GOAWAY
        went one way or the other, or draining retired them)."""
        return self.e.closing_tls

    @property
    def draining(self):
        """begin_draining() was called."""
        return bool(self.e.drain_requested)

    # -- called from Python ------------------------------------------------------------------------

    def set_identity(self, str identity, TlsContext context):
        """Use `context` (a client TlsContext) for new connections made for `identity` (a SPIFFE ID).

        Rotation: connections made with the previous context take no new stream; their streams flow on
        until they end, then the connection closes. New streams open a connection with `context`."""
        cdef Ident *grown
        cdef SSL_CTX *old
        cdef size_t slot
        if context.server or context.trust_domain != self.trust_domain:
            raise ValueError("set_identity takes a client TlsContext of this worker's trust domain")
        if len(identity.encode("utf-8")) > _SPIFFE_ID_MAX:
            raise ValueError("identity too long")
        SSL_CTX_up_ref(context.ctx)
        pthread_mutex_lock(&self.e.lock)
        if identity in self.ident_slots:
            slot = self.ident_slots[identity]
        else:
            grown = <Ident*>realloc(self.e.idents, (self.e.nidents + 1) * sizeof(Ident))
            if grown == NULL:
                pthread_mutex_unlock(&self.e.lock)
                SSL_CTX_free(context.ctx)
                raise MemoryError()
            self.e.idents = grown
            slot = self.e.nidents
            self.e.idents[slot].ctx = NULL
            self.e.idents[slot].generation = 0
            self.e.nidents += 1
            self.ident_slots[identity] = slot
        old = self.e.idents[slot].ctx
        self.e.idents[slot].ctx = context.ctx
        self.e.idents[slot].generation += 1
        pthread_mutex_unlock(&self.e.lock)
        if old != NULL:
            SSL_CTX_free(old)  # live connections made with it hold their own references

    def has_identity(self, str identity):
        return identity in self.ident_slots

    def set_server_context(self, TlsContext context):
        """Use `context` (a server TlsContext) for connections accepted from now on."""
        cdef SSL_CTX *old
        if not context.server or context.trust_domain != self.trust_domain:
            raise ValueError("set_server_context takes a server TlsContext of this worker's trust domain")
        SSL_CTX_up_ref(context.ctx)
        pthread_mutex_lock(&self.e.lock)
        old = self.e.server_ctx
        self.e.server_ctx = context.ctx
        pthread_mutex_unlock(&self.e.lock)
        if old != NULL:
            SSL_CTX_free(old)

    def listen(self, int listen_fd):
        """Serve inbound tunnels on a listening socket (non-blocking; the caller keeps owning it)."""
        cdef epoll_event ev
        cdef int flags, rc, err
        flags = fcntl(listen_fd, F_GETFL)
        if flags < 0 or (not flags & O_NONBLOCK and fcntl(listen_fd, F_SETFL, flags | O_NONBLOCK) < 0):
            raise OSError(errno, _os.strerror(errno))
        ev.events = EPOLLIN | EPOLLET
        ev.data.ptr = &self.e.listener
        pthread_mutex_lock(&self.e.lock)
        if self.e.listener.fd >= 0:
            pthread_mutex_unlock(&self.e.lock)
            raise RuntimeError("already listening")
        rc = epoll_ctl(self.e.epfd, EPOLL_CTL_ADD, listen_fd, &ev)
        err = errno
        if rc == 0:
            self.e.listener.fd = listen_fd
        pthread_mutex_unlock(&self.e.lock)
        if rc < 0:
            raise OSError(err, _os.strerror(err))

    def stop_listening(self):
        """Accept no more tunnels on the listening socket given to listen(); idempotent. On return the
        engine no longer touches that socket, so the caller may close it (a draining worker does: closed,
        it leaves its SO_REUSEPORT group and the kernel hands peers' new connections to the other
        sockets). Connections accepted before go on."""
        pthread_mutex_lock(&self.e.lock)
        if self.e.listener.fd >= 0:
            epoll_ctl(self.e.epfd, EPOLL_CTL_DEL, self.e.listener.fd, NULL)
            self.e.listener.fd = -1
        pthread_mutex_unlock(&self.e.lock)

    def adopt(self, uint64_t conn_id, int client_fd, str peer_ip, int peer_port, str authority,
              str identity, str source_ip=None, str peer_identity=None, bint l7_checked=False,
              bint announce_open=False):
        """Tunnel a client socket to `authority` ("podip:port") through the node at peer_ip:peer_port,
        as `identity` (set_identity() first). source_ip goes to the peer as `forwarded: for=<ip>`;
        peer_identity, if given, is the only SPIFFE ID the peer may present; l7_checked adds
        `x-nodeproxy-authorized: l7` (this node applied the destination's L7 policies to every request
        on the connection); announce_open writes one 0x00 byte to the client socket when the CONNECT is
        answered 2xx, before any byte of the pod's (the HTTP engine waits for it: until then the
        connection counts as connecting, and a tunnel that cannot open is a connect failure). On return
        the socket belongs to the engine; on an exception it stays with the caller. Ends with one
        STREAM_DONE record."""
        cdef Adoption a
        cdef sockaddr_in peer, src
        cdef bytes raw_authority = authority.encode("ascii")
        cdef bytes raw_forwarded = b""
        cdef bytes raw_expected = peer_identity.encode("utf-8") if peer_identity is not None else b""
        cdef int flags
        if self.e.stopping:
            raise RuntimeError("tunnel worker is stopping")
        if identity not in self.ident_slots:
            raise KeyError(f"no certificate for identity {identity!r}")
        if not 0 < peer_port < 65536:
            raise ValueError(f"bad peer port {peer_port}")
        _parse_ipv4(peer_ip, &peer, peer_port)
        if source_ip is not None:
            _parse_ipv4(source_ip, &src, 0)
            raw_forwarded = b"for=" + source_ip.encode("ascii")
        if not 0 < len(raw_authority) < AUTHORITY_MAX or len(raw_expected) > _SPIFFE_ID_MAX:
            raise ValueError("authority or peer identity too long")
        memset(&a, 0, sizeof(a))
        a.conn_id = conn_id
        a.fd = client_fd
        a.peer_ip = peer.sin_addr.s_addr
        a.peer_port = <uint16_t>peer_port
        a.ident = self.ident_slots[identity]
        memcpy(a.authority, <const char*>raw_authority, len(raw_authority))
        memcpy(a.forwarded, <const char*>raw_forwarded, len(raw_forwarded))
        memcpy(a.expected, <const char*>raw_expected, len(raw_expected))
        a.l7_checked = l7_checked
        a.announce_open = announce_open
        flags = fcntl(client_fd, F_GETFL)
        if flags < 0 or (not flags & O_NONBLOCK and fcntl(client_fd, F_SETFL, flags | O_NONBLOCK) < 0):
            raise OSError(errno, _os.strerror(errno))
        if self._push(<void**>&self.e.adopts, &self.e.adopts_len, &self.e.adopts_cap, sizeof(Adoption), &a) < 0:
            raise MemoryError()

    def answer(self, list answers):
        """Answer INBOUND records: [(key, allow, dst_ip, dst_port, bind_ip, deny_status)]. allow: connect
        to dst_ip:dst_port (from bind_ip, transparently, unless it is None) and answer 200 once connected
        (503 if the connect fails, 504 if it times out); deny: answer deny_status and reset the stream.
        Answers for streams that ended meanwhile are dropped."""
        cdef Answer a
        cdef sockaddr_in dst, src
        for item in answers:
            memset(&a, 0, sizeof(a))
            a.key = item[0]
            a.allow = bool(item[1])
            a.status = item[5]
            if not a.allow and not 400 <= a.status <= 599:
                raise ValueError(f"deny status {a.status} is not 4xx/5xx")
            if a.allow:
                if not 0 < item[3] < 65536:
                    raise ValueError(f"bad port {item[3]}")
                _parse_ipv4(item[2], &dst, item[3])
                a.dst_ip = dst.sin_addr.s_addr
                a.dst_port = <uint16_t>item[3]
                if item[4] is not None:
                    _parse_ipv4(item[4], &src, 0)
                    a.bind_ip = src.sin_addr.s_addr
            if self._push(<void**>&self.e.answers, &self.e.answers_len, &self.e.answers_cap, sizeof(Answer), &a) < 0:
                raise MemoryError()

    def drain(self):
        """Take the records, in the order the engine posted them:

        (INBOUND, key, tls_id, peer_identity, authority, forwarded, peer_ip, peer_port, l7_checked):
        answer it (l7_checked: the CONNECT carried `x-nodeproxy-authorized: l7`, once);
        (STREAM_DONE, id, outbound, ending, err, status, bytes_up, bytes_down): id is adopt()'s conn_id
        (outbound) or the INBOUND key; bytes_up went plain -> tunnel, bytes_down tunnel -> plain;
        (TLS_FAILED, tls_id, outbound, peer_ip, peer_port, reason): a handshake failed or was rejected,
        or an established connection failed while it carried streams;
        (TLS_OPEN, tls_id, outbound, peer_ip, peer_port, peer_identity).
        """
        cdef list out = []
        cdef Record *batch
        cdef Record *r
        cdef size_t n, i
        pthread_mutex_lock(&self.e.lock)
        batch, n = self.e.records, self.e.records_len
        self.e.records = NULL
        self.e.records_len = self.e.records_cap = 0
        pthread_mutex_unlock(&self.e.lock)
        try:
            for i in range(n):
                r = &batch[i]
                if r.kind == REC_INBOUND:
                    out.append((REC_INBOUND, r.id, r.tls_id, r.identity.decode("utf-8", "replace"),
                                r.authority.decode("latin-1"), r.forwarded.decode("latin-1"),
                                _format_ipv4(r.peer_ip), r.peer_port, bool(r.l7_checked)))
                elif r.kind == REC_STREAM_DONE:
                    out.append((REC_STREAM_DONE, r.id, bool(r.outbound), r.ending, r.err, r.status,
                                r.bytes_up, r.bytes_down))
                elif r.kind == REC_TLS_FAILED:
                    out.append((REC_TLS_FAILED, r.tls_id, bool(r.outbound), _format_ipv4(r.peer_ip),
                                r.peer_port, r.reason.decode("utf-8", "replace")))
                else:
                    out.append((REC_TLS_OPEN, r.tls_id, bool(r.outbound), _format_ipv4(r.peer_ip),
                                r.peer_port, r.identity.decode("utf-8", "replace")))
        finally:
            free(batch)
        return out

    def begin_draining(self):
        """Stop taking new streams on the connections there are, without cutting a stream; idempotent.

        Inbound: every connection sends the graceful shutdown (GOAWAY NO_ERROR with the largest stream
        id, and a PING; once the peer acknowledged it, or after 1 s, GOAWAY NO_ERROR with the last stream
        it processed), serves the streams it has, and closes once they ended. The peer opens its next
        streams on a new connection (to whichever process the listening port hands it to). Connections
        accepted from now on (the listener is still served: a peer may be handed this process's socket
        until its owner closes it) get the same at once, after the streams in their first flight.
        Outbound: the connections made so far take no new stream; idle ones close now, busy ones when
        their last stream ends. Adoptions go on working, on new connections (a draining worker may
        still tunnel connections it accepted), which close as soon as they are idle."""
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.e.lock)
        self.e.drain_requested = True
        pthread_mutex_unlock(&self.e.lock)
        write(self.e.wake_fd, &one, sizeof(one))

    def stop(self):
        """Ask run() to return; live streams are reset (ABORTED) and connections closed."""
        cdef uint64_t one = 1
        self.e.stopping = True
        write(self.e.wake_fd, &one, sizeof(one))

    def run(self):
        """The engine loop; returns after stop(). Runs without the GIL.

        SIGPIPE is blocked on this thread: OpenSSL writes to its sockets with write(), which has no
        MSG_NOSIGNAL, and a peer that went away must end one connection, not the process."""
        cdef sigset_t pipe_signal
        cdef int rc
        if self.closed:
            raise RuntimeError("tunnel worker already ran")
        sigemptyset(&pipe_signal)
        sigaddset(&pipe_signal, SIGPIPE)
        rc = pthread_sigmask(SIG_BLOCK, &pipe_signal, NULL)
        if rc != 0:
            raise OSError(rc, "pthread_sigmask")
        with nogil:
            _loop(self.e)
        self.closed = True

    cdef int _push(self, void **items, size_t *length, size_t *capacity, size_t size,
                   const void *item) noexcept nogil:
        """Append to a submission queue under the lock; the first item of a batch wakes the loop."""
        cdef void *grown
        cdef bint first
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.e.lock)
        if length[0] == capacity[0]:
            grown = realloc(items[0], (capacity[0] * 2 + 16) * size)
            if grown == NULL:
                pthread_mutex_unlock(&self.e.lock)
                return -1
            items[0] = grown
            capacity[0] = capacity[0] * 2 + 16
        memcpy(<char*>items[0] + length[0] * size, item, size)
        first = self.e.adopts_len + self.e.answers_len == 0
        length[0] += 1
        pthread_mutex_unlock(&self.e.lock)
        if first:
            write(self.e.wake_fd, &one, sizeof(one))
        return 0
