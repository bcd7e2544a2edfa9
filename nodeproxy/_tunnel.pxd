# Declarations for nodeproxy/_tunnel.pyx: OpenSSL's C API, the extra nghttp2 calls it uses, and the
# layout of its handles (TLS connections and the CONNECT streams multiplexed over them).

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from nodeproxy._posix cimport *  # the C API, declared once
from nodeproxy._sockets cimport *  # now_ns, set_reset_on_close, sock_error, set_tcp_options
from nodeproxy._h2 cimport (
    nghttp2_data_provider,
    nghttp2_data_source_read_callback,
    nghttp2_data_source,
    nghttp2_frame,
    nghttp2_frame_hd,
    nghttp2_nv,
    nghttp2_option,
    nghttp2_session,
    nghttp2_session_callbacks,
    nghttp2_settings_entry,
)


cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL_METHOD:
        pass
    ctypedef struct X509:
        pass
    ctypedef struct X509_STORE:
        pass
    ctypedef struct X509_STORE_CTX:
        pass
    ctypedef struct EVP_PKEY:
        pass
    ctypedef struct BIO:
        pass
    enum:
        SSL_ERROR_NONE
        SSL_ERROR_SSL
        SSL_ERROR_WANT_READ
        SSL_ERROR_WANT_WRITE
        SSL_ERROR_SYSCALL
        SSL_ERROR_ZERO_RETURN
        SSL_VERIFY_PEER
        SSL_VERIFY_FAIL_IF_NO_PEER_CERT
        SSL_MODE_ENABLE_PARTIAL_WRITE
        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
        TLS1_3_VERSION
        X509_V_OK
    const SSL_METHOD *TLS_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *method)
    void SSL_CTX_free(SSL_CTX *ctx)
    int SSL_CTX_up_ref(SSL_CTX *ctx)
    int SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version)
    int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *s)
    int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t n)
    long SSL_CTX_set_mode(SSL_CTX *ctx, long mode)
    int SSL_CTX_use_certificate(SSL_CTX *ctx, X509 *x)
    int SSL_CTX_add1_chain_cert(SSL_CTX *ctx, X509 *x)
    int SSL_CTX_use_PrivateKey(SSL_CTX *ctx, EVP_PKEY *pkey)
    int SSL_CTX_check_private_key(const SSL_CTX *ctx)
    X509_STORE *SSL_CTX_get_cert_store(const SSL_CTX *ctx)
    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    int SSL_set_fd(SSL *ssl, int fd)
    void SSL_set_connect_state(SSL *ssl)
    void SSL_set_accept_state(SSL *ssl)
    int SSL_do_handshake(SSL *ssl)
    int SSL_read(SSL *ssl, void *buf, int num)
    int SSL_write(SSL *ssl, const void *buf, int num)
    int SSL_get_error(const SSL *ssl, int ret)
    int SSL_shutdown(SSL *ssl)
    long SSL_get_verify_result(const SSL *ssl)
    void SSL_set0_wbio(SSL *ssl, BIO *wbio)
    int SSL_set_ex_data(SSL *ssl, int idx, void *data)
    void SSL_CTX_set_read_ahead(SSL_CTX *ctx, int yes)
    void SSL_CTX_set_default_read_buffer_len(SSL_CTX *ctx, size_t len)


cdef extern from "<errno.h>" nogil:
    enum:
        EPROTO
        ENOENT


cdef extern from "<openssl/x509.h>" nogil:
    int X509_STORE_add_cert(X509_STORE *store, X509 *x)
    void X509_free(X509 *x)
    const char *X509_verify_cert_error_string(long n)


cdef extern from "<openssl/pem.h>" nogil:
    X509 *PEM_read_bio_X509(BIO *bp, X509 **x, void *cb, void *u)
    EVP_PKEY *PEM_read_bio_PrivateKey(BIO *bp, EVP_PKEY **x, void *cb, void *u)
    void EVP_PKEY_free(EVP_PKEY *pkey)
    BIO *BIO_new_mem_buf(const void *buf, int len)
    int BIO_free(BIO *b)
    ctypedef struct BIO_METHOD:
        pass
    const BIO_METHOD *BIO_s_mem()
    BIO *BIO_new(const BIO_METHOD *method)
    int BIO_read(BIO *b, void *data, int dlen)
    size_t BIO_ctrl_pending(BIO *b)


cdef extern from "<openssl/err.h>" nogil:
    unsigned long ERR_get_error()
    unsigned long ERR_peek_last_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)
    void ERR_clear_error()


cdef extern from "nghttp2/nghttp2.h" nogil:
    # What _h2.pxd does not declare.
    ctypedef ssize_t (*nghttp2_data_source_read_length_callback)(
        nghttp2_session *session, uint8_t frame_type, int32_t stream_id, int32_t session_remote_window_size,
        int32_t stream_remote_window_size, uint32_t remote_max_frame_size, void *user_data) noexcept
    void nghttp2_session_callbacks_set_data_source_read_length_callback(
        nghttp2_session_callbacks *cbs, nghttp2_data_source_read_length_callback cb)
    enum:
        NGHTTP2_FLAG_ACK
    ctypedef struct nghttp2_ping:
        nghttp2_frame_hd hd
        uint8_t opaque_data[8]
    int nghttp2_submit_ping(nghttp2_session *session, uint8_t flags, const uint8_t *opaque_data)


# X.509-SVID checks of a peer's leaf certificate, run inside OpenSSL's verification (so a failed check
# fails the handshake with an alert, like a bad chain): exactly one URI SAN, spiffe://<trust domain>/<path>
# with the SPIFFE ID rules, leaf not a CA, digitalSignature without keyCertSign/cRLSign, an EKU (when
# present) with serverAuth and clientAuth, and, when the caller expects one, exactly that identity.
cdef extern from *:
    """
    #include <string.h>
    #include <openssl/ssl.h>
    #include <openssl/x509v3.h>

    #define NP_ID_MAX 1024
    #define NP_TD_MAX 256

    enum np_svid_error {
        NP_SVID_OK = 0,
        NP_SVID_NO_URI_SAN = 1,
        NP_SVID_MULTIPLE_URI_SANS = 2,
        NP_SVID_BAD_URI = 3,
        NP_SVID_WRONG_TRUST_DOMAIN = 4,
        NP_SVID_LEAF_IS_CA = 5,
        NP_SVID_BAD_KEY_USAGE = 6,
        NP_SVID_BAD_EKU = 7,
        NP_SVID_UNEXPECTED_IDENTITY = 8,
        NP_SVID_NO_CERTIFICATE = 9,
    };

    /* What the verify callback needs and what it found, one per TLS connection (ex_data slot). */
    struct np_peer_check {
        char trust_domain[NP_TD_MAX];
        char expected[NP_ID_MAX];      /* empty: any identity of the trust domain */
        char identity[NP_ID_MAX];      /* the peer's SPIFFE ID once verified */
        int svid_error;
    };

    static int np_check_ex_index = -1;

    static int np_spiffe_char_ok(unsigned char c, int path) {
        if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_')
            return 1;
        return path && c >= 'A' && c <= 'Z';
    }

    /* The SPIFFE ID rules: lowercase trust domain [a-z0-9.-_], path segments [a-zA-Z0-9.-_], no empty,
       "." or ".." segment, no query or fragment (those characters are not allowed at all). */
    static int np_spiffe_id_check(const char *id, size_t n, const char *trust_domain) {
        const char *scheme = "spiffe://";
        size_t at = 9, td_start, seg;
        if (n <= at || memcmp(id, scheme, at) != 0) return NP_SVID_BAD_URI;
        td_start = at;
        while (at < n && id[at] != '/') {
            if (!np_spiffe_char_ok((unsigned char)id[at], 0)) return NP_SVID_BAD_URI;
            at++;
        }
        if (at == td_start || at == n) return NP_SVID_BAD_URI;
        if (at - td_start != strlen(trust_domain) || memcmp(id + td_start, trust_domain, at - td_start) != 0)
            return NP_SVID_WRONG_TRUST_DOMAIN;
        while (at < n) {  /* at: a '/' */
            seg = ++at;
            while (at < n && id[at] != '/') {
                if (!np_spiffe_char_ok((unsigned char)id[at], 1)) return NP_SVID_BAD_URI;
                at++;
            }
            if (at == seg) return NP_SVID_BAD_URI;
            if ((at - seg == 1 && id[seg] == '.') || (at - seg == 2 && id[seg] == '.' && id[seg + 1] == '.'))
                return NP_SVID_BAD_URI;
        }
        return NP_SVID_OK;
    }

    static int np_svid_check(X509 *leaf, struct np_peer_check *check) {
        GENERAL_NAMES *names;
        int i, count = 0, rc;
        const unsigned char *uri = NULL;
        int uri_len = 0;
        uint32_t usage, xusage;
        if (leaf == NULL) return NP_SVID_NO_CERTIFICATE;
        if (X509_check_ca(leaf) != 0) return NP_SVID_LEAF_IS_CA;
        usage = X509_get_key_usage(leaf);  /* UINT32_MAX when the extension is absent */
        if (usage == UINT32_MAX || !(usage & KU_DIGITAL_SIGNATURE) || (usage & (KU_KEY_CERT_SIGN | KU_CRL_SIGN)))
            return NP_SVID_BAD_KEY_USAGE;
        if (X509_get_extension_flags(leaf) & EXFLAG_XKUSAGE) {
            xusage = X509_get_extended_key_usage(leaf);
            if (!(xusage & XKU_SSL_SERVER) || !(xusage & XKU_SSL_CLIENT)) return NP_SVID_BAD_EKU;
        }
        names = X509_get_ext_d2i(leaf, NID_subject_alt_name, NULL, NULL);
        if (names == NULL) return NP_SVID_NO_URI_SAN;
        for (i = 0; i < sk_GENERAL_NAME_num(names); i++) {
            const GENERAL_NAME *name = sk_GENERAL_NAME_value(names, i);
            if (name->type == GEN_URI) {
                count++;
                uri = ASN1_STRING_get0_data(name->d.uniformResourceIdentifier);
                uri_len = ASN1_STRING_length(name->d.uniformResourceIdentifier);
            }
        }
        if (count == 0) rc = NP_SVID_NO_URI_SAN;
        else if (count > 1) rc = NP_SVID_MULTIPLE_URI_SANS;
        else if (uri_len <= 0 || uri_len >= NP_ID_MAX || memchr(uri, 0, uri_len) != NULL) rc = NP_SVID_BAD_URI;
        else rc = np_spiffe_id_check((const char *)uri, (size_t)uri_len, check->trust_domain);
        if (rc == NP_SVID_OK) {
            memcpy(check->identity, uri, uri_len);
            check->identity[uri_len] = 0;
            if (check->expected[0] && strcmp(check->expected, check->identity) != 0)
                rc = NP_SVID_UNEXPECTED_IDENTITY;
        }
        GENERAL_NAMES_free(names);
        return rc;
    }

    /* OpenSSL calls this for every certificate of the peer's chain, after its own checks (preverify). */
    static int np_verify_callback(int preverify_ok, X509_STORE_CTX *store) {
        SSL *ssl;
        struct np_peer_check *check;
        if (!preverify_ok) return 0;
        if (X509_STORE_CTX_get_error_depth(store) != 0) return 1;
        ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
        check = ssl ? SSL_get_ex_data(ssl, np_check_ex_index) : NULL;
        if (check == NULL) {
            X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
            return 0;
        }
        check->svid_error = np_svid_check(X509_STORE_CTX_get_current_cert(store), check);
        if (check->svid_error != NP_SVID_OK) {
            X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
            return 0;
        }
        return 1;
    }

    static void np_set_verify(SSL_CTX *ctx, int server) {
        SSL_CTX_set_verify(ctx, server ? (SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT) : SSL_VERIFY_PEER,
                           np_verify_callback);
    }

    static const unsigned char np_alpn_h2[] = {2, 'h', '2'};

    static int np_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                              const unsigned char *in, unsigned int inlen, void *arg) {
        /* HBONE speaks HTTP/2 only: a client that offers ALPN without h2 is refused. */
        if (SSL_select_next_proto((unsigned char **)out, outlen, np_alpn_h2, sizeof(np_alpn_h2), in, inlen)
                != OPENSSL_NPN_NEGOTIATED)
            return SSL_TLSEXT_ERR_ALERT_FATAL;
        return SSL_TLSEXT_ERR_OK;
    }

    static int np_set_alpn(SSL_CTX *ctx, int server) {
        if (server) {
            SSL_CTX_set_alpn_select_cb(ctx, np_alpn_select, NULL);
            return 0;
        }
        return SSL_CTX_set_alpn_protos(ctx, np_alpn_h2, sizeof(np_alpn_h2));  /* 0 on success */
    }

    /* The write side of a TLS connection: OpenSSL appends each record here (a BIO of our own, so the
       record is copied once, into the buffer the engine send()s from: a memory BIO would need a second
       copy out of it). The engine drains it with send(); off..len is what the socket has not taken. */
    struct np_wire {
        unsigned char *data;
        size_t off;
        size_t len;
        size_t cap;
    };

    static BIO_METHOD *np_wire_method = NULL;

    static int np_wire_write(BIO *b, const char *in, int inlen) {
        struct np_wire *w = BIO_get_data(b);
        size_t n = (size_t)inlen, held, want;
        unsigned char *grown;
        if (w == NULL || inlen < 0) return -1;
        if (w->cap - w->len < n) {
            held = w->len - w->off;
            if (w->off > 0 && w->cap - held >= n) {
                memmove(w->data, w->data + w->off, held);
            } else {
                want = w->cap ? w->cap * 2 : 262144;
                while (want - held < n) want *= 2;
                grown = malloc(want);
                if (grown == NULL) return -1;
                if (held) memcpy(grown, w->data + w->off, held);
                free(w->data);
                w->data = grown;
                w->cap = want;
            }
            w->off = 0;
            w->len = held;
        }
        memcpy(w->data + w->len, in, n);
        w->len += n;
        return inlen;
    }

    static long np_wire_ctrl(BIO *b, int cmd, long num, void *ptr) {
        struct np_wire *w = BIO_get_data(b);
        switch (cmd) {
        case BIO_CTRL_FLUSH: return 1;  /* the engine sends when it is ready to */
        case BIO_CTRL_WPENDING:
        case BIO_CTRL_PENDING: return w ? (long)(w->len - w->off) : 0;
        default: return 0;
        }
    }

    static int np_wire_init(void) {
        if (np_wire_method != NULL) return 0;
        np_wire_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "nodeproxy tunnel wire");
        if (np_wire_method == NULL || !BIO_meth_set_write(np_wire_method, np_wire_write)
                || !BIO_meth_set_ctrl(np_wire_method, np_wire_ctrl))
            return -1;
        return 0;
    }

    static BIO *np_wire_bio(struct np_wire *w) {
        BIO *b = np_wire_method ? BIO_new(np_wire_method) : NULL;
        if (b == NULL) return NULL;
        BIO_set_data(b, w);
        BIO_set_init(b, 1);
        return b;
    }

    static int np_check_index(void) {
        if (np_check_ex_index < 0)
            np_check_ex_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
        return np_check_ex_index;
    }

    static const char *np_svid_reason(int e) {
        switch (e) {
        case NP_SVID_NO_URI_SAN: return "peer certificate has no URI SAN";
        case NP_SVID_MULTIPLE_URI_SANS: return "peer certificate has more than one URI SAN";
        case NP_SVID_BAD_URI: return "peer URI SAN is not a valid SPIFFE ID";
        case NP_SVID_WRONG_TRUST_DOMAIN: return "peer SPIFFE ID is not in our trust domain";
        case NP_SVID_LEAF_IS_CA: return "peer leaf certificate is a CA";
        case NP_SVID_BAD_KEY_USAGE: return "peer leaf key usage is not an SVID's";
        case NP_SVID_BAD_EKU: return "peer leaf extended key usage lacks serverAuth or clientAuth";
        case NP_SVID_UNEXPECTED_IDENTITY: return "peer SPIFFE ID is not the expected one";
        case NP_SVID_NO_CERTIFICATE: return "peer sent no certificate";
        default: return "";
        }
    }
    """
    enum:
        NP_ID_MAX
        NP_TD_MAX
        NP_SVID_OK
    struct np_peer_check:
        char trust_domain[256]
        char expected[1024]
        char identity[1024]
        int svid_error
    struct np_wire:
        unsigned char *data
        size_t off
        size_t len
        size_t cap
    int np_wire_init() nogil
    BIO *np_wire_bio(np_wire *w) nogil
    int np_check_index() nogil
    void np_set_verify(SSL_CTX *ctx, int server) nogil
    int np_set_alpn(SSL_CTX *ctx, int server) nogil
    const char *np_svid_reason(int e) nogil
    int np_spiffe_id_check(const char *id, size_t n, const char *trust_domain) nogil


# -- handles -----------------------------------------------------------------------------------------

cdef enum:
    KIND_TLS = 1           # epoll data.ptr kinds: the first int of every handle says which it is
    KIND_STREAM = 2
    KIND_LISTENER = 3
    EVENTS_PER_WAIT = 256
    READ_BUF = 131072      # decrypted records gathered before one nghttp2 feed (then one send per stream)
    RECORD_MAX = 16384     # plaintext of one TLS record
    TLS_OUT_FILL = 262144  # framed bytes encrypted per flush round before the socket gets them
    SMALL_FRAME = 4096     # frames below this are gathered (one record for several); larger ones go as is
    WIRE_HIGH = 524288     # encrypted bytes waiting for the socket above which no more are produced
    MAX_FRAME = 65536      # SETTINGS_MAX_FRAME_SIZE both ways: 64 KiB DATA frames, one recv() each
    TLS_READS_PER_TURN = 32
    AUTHORITY_MAX = 256
    FORWARDED_MAX = 128
    REASON_MAX = 256
    PLAIN_BUF_KEEP = 262144  # a drained to_plain buffer larger than this is freed, not kept for reuse
    SCAN_INTERVAL_NS = 250000000  # deadlines (handshake, connect, pool idle) are checked this often
    # Draining, inbound: the final GOAWAY follows the shutdown notice once the peer acknowledged the PING
    # sent with it (every stream it opened before seeing the notice has arrived by then), or after this
    # long without that acknowledgement.
    DRAIN_NOTICE_NS = 1000000000
    # Outbound: a stream the peer refused unprocessed (REFUSED_STREAM, or above a GOAWAY's last stream)
    # before it sent a byte is tried again on another connection at most this many times.
    STREAM_RETRIES = 3


cdef enum TlsState:
    T_CONNECTING = 0       # client: TCP connect in progress
    T_HANDSHAKING = 1
    T_OPEN = 2             # handshake done, HTTP/2 session up
    T_CLOSING = 3          # GOAWAY sent or received, or retired by draining: no new streams; closes when
                           # the last one ends (Engine.closing_tls counts these)


cdef enum DrainStage:
    DRAIN_NONE = 0
    DRAIN_NOTICE = 1       # inbound: shutdown notice (GOAWAY 2^31-1) and a PING sent; streams still taken
    DRAIN_FINAL = 2        # inbound: GOAWAY with the last processed stream sent (the state is T_CLOSING)


cdef enum StreamState:
    S_WAIT_TLS = 0         # outbound: queued on a TLS connection that is not open yet
    S_REQUESTED = 1        # outbound: CONNECT sent, waiting for the 2xx
    S_AWAIT_DECISION = 2   # inbound: posted to Python, waiting for allow/deny
    S_CONNECTING = 3       # inbound: allowed, connecting to the local pod
    S_OPEN = 4             # relaying


# How a stream ended (records to Python; nodeproxy.proxy.tunnel.StreamEnding mirrors them).
cdef enum Ending:
    END_CLOSED = 0           # both directions finished (END_STREAM both ways, FIN both ways)
    END_PLAIN_RESET = 1      # the plain side (client pod, or local pod inbound) failed; the stream was reset
    END_PEER_RESET = 2       # the tunnel peer reset the stream; the plain side got an RST
    END_TUNNEL_FAILED = 3    # the TLS connection failed or closed (handshake, verification, I/O); err
                             # ECONNREFUSED: outbound, the peer refused it unprocessed and it could not be
                             # tried again (bytes had gone out, or STREAM_RETRIES tries were spent)
    END_REFUSED = 4          # outbound: the peer answered non-2xx; inbound: Python denied it
    END_CONNECT_FAILED = 5   # inbound: the local pod could not be reached (503 to the peer)
    END_ABORTED = 6          # the engine stopped while the stream was live
    END_LOCAL_RESOURCES = 7  # memory or descriptors ran short here


cdef enum RecordKind:
    REC_INBOUND = 1          # a CONNECT stream arrived; Python answers allow/deny
    REC_STREAM_DONE = 2
    REC_TLS_FAILED = 3       # a TLS connection failed to establish, or was rejected
    REC_TLS_OPEN = 4         # a TLS connection was established (peer identity)


ctypedef struct Buf:
    unsigned char *data
    size_t off
    size_t len
    size_t cap


cdef struct Stream
cdef struct TlsConn
cdef struct Engine


cdef struct TlsConn:
    int kind                 # KIND_TLS
    uint64_t id
    Engine *engine           # for the nghttp2 callbacks (the session's user_data is the connection)
    int fd
    SSL *ssl
    nghttp2_session *session
    TlsState state
    bint server
    bint readable
    bint write_blocked       # SSL_write wants the socket writable
    bint dirty               # on the engine's flush list
    bint dead
    uint32_t peer_ip         # network order
    uint16_t peer_port
    int ident                # client: the identity slot; -1 on the server side
    uint32_t generation      # client: the identity's certificate generation it was made with
    uint32_t nstreams
    uint32_t peer_max_streams
    bint retired             # client: draining began after it was made; takes no new stream
    DrainStage drain_stage   # server: how far its graceful shutdown went
    int64_t drain_deadline_ns  # server: the final GOAWAY goes at the latest then (DRAIN_NOTICE_NS)
    int64_t deadline_ns      # connect + handshake deadline
    int64_t idle_since_ns    # when its last stream ended (client pool idle timeout)
    Stream *streams
    TlsConn *prev
    TlsConn *next
    TlsConn *dirty_next
    TlsConn *grave_next
    unsigned char *out       # frames gathered for one SSL_write
    size_t out_len
    size_t out_cap
    np_wire wire             # records OpenSSL wrote (through np_wire_bio) that the socket has not taken
    np_peer_check check
    # The header block being received (one at a time: HEADERS and CONTINUATION are contiguous).
    int32_t hdr_stream
    int hdr_status
    bint hdr_bad
    char hdr_method[16]
    char hdr_authority[256]  # AUTHORITY_MAX
    char hdr_forwarded[128]  # FORWARDED_MAX
    bint hdr_authorized_seen  # an x-nodeproxy-authorized field arrived (a second one is malformed)
    bint hdr_l7_checked      # ... and its value was exactly "l7"


cdef struct Stream:
    int kind                 # KIND_STREAM
    uint64_t id              # outbound: Python's conn_id; inbound: the engine's key
    bint outbound
    int fd                   # the plain socket: the client pod's (outbound) or the local pod's (inbound)
    TlsConn *t
    int32_t stream_id        # -1 until the HTTP/2 stream exists
    StreamState state
    bint plain_writable
    bint plain_eof           # the plain side sent FIN (we sent END_STREAM)
    bint h2_eof              # the tunnel peer sent END_STREAM
    bint plain_shut          # we shut the plain socket's write side (after h2_eof and flushing)
    bint deferred            # the data source is deferred until the plain socket is readable
    bint h2_closed           # nghttp2 closed the stream
    bint dead
    Buf to_plain             # DATA received and not yet written to the plain socket
    uint64_t bytes_up        # plain -> tunnel
    uint64_t bytes_down      # tunnel -> plain
    int status
    int failed_side          # 0 none, 1 plain, 2 tunnel
    int err
    int64_t deadline_ns
    char authority[256]      # AUTHORITY_MAX
    char forwarded[128]      # FORWARDED_MAX: the value of the `forwarded` field (for=<source ip>)
    bint l7_checked          # the CONNECT carries / carried `x-nodeproxy-authorized: l7`
    bint announce_open       # outbound: write one 0x00 byte to the plain socket when the CONNECT gets a 2xx
    uint8_t retries          # outbound: times the stream was refused unprocessed and tried again
    Stream *prev             # the TLS connection's list
    Stream *next
    Stream *await_next       # inbound: the list waiting for Python's decision
    Stream *grave_next


ctypedef struct Listener:
    int kind                 # KIND_LISTENER
    int fd


ctypedef struct Adoption:
    uint64_t conn_id
    int fd
    uint32_t peer_ip
    uint16_t peer_port
    int ident
    char authority[256]
    char forwarded[128]
    char expected[1024]      # NP_ID_MAX
    bint l7_checked          # send `x-nodeproxy-authorized: l7` with the CONNECT
    bint announce_open       # see Stream.announce_open


ctypedef struct Answer:
    uint64_t key
    bint allow
    uint32_t dst_ip
    uint16_t dst_port
    uint32_t bind_ip         # 0: connect from the node's own address
    int status               # the deny status (403 by default)


ctypedef struct Record:
    int kind
    uint64_t id
    uint64_t tls_id
    bint outbound
    int ending
    int err
    int status
    uint64_t bytes_up
    uint64_t bytes_down
    uint32_t peer_ip
    uint16_t peer_port
    bint l7_checked          # INBOUND: the CONNECT carried `x-nodeproxy-authorized: l7`
    # Text fields last: _init_record zeroes everything before `identity`.
    char identity[1024]      # NP_ID_MAX
    char authority[256]
    char forwarded[128]
    char reason[256]         # REASON_MAX


ctypedef struct Ident:
    SSL_CTX *ctx             # a reference of our own (SSL_CTX_up_ref)
    uint32_t generation


cdef class TlsContext:
    cdef SSL_CTX *ctx
    cdef readonly bint server
    cdef readonly str trust_domain


cdef struct Engine:
    int epfd
    int wake_fd
    int notify_fd
    bint stopping
    bint drain_requested     # under lock: begin_draining() was called
    bint draining            # engine thread: it took the request (see _begin_draining)
    pthread_mutex_t lock
    bint woken
    char trust_domain[256]   # NP_TD_MAX
    uint32_t stream_window
    uint32_t connection_window
    uint32_t max_streams
    int64_t handshake_timeout_ns
    int64_t connect_timeout_ns
    int64_t pool_idle_ns
    int64_t now_ns
    int64_t scanned_ns
    uint64_t next_tls_id
    uint64_t next_key
    nghttp2_session_callbacks *callbacks
    nghttp2_option *option
    # Under lock: shared with the Python side.
    Ident *idents
    size_t nidents
    SSL_CTX *server_ctx
    Adoption *adopts
    size_t adopts_len
    size_t adopts_cap
    Answer *answers
    size_t answers_len
    size_t answers_cap
    Record *records
    size_t records_len
    size_t records_cap
    Listener listener
    # Engine thread only.
    bint accept_pending      # accept() failed for want of descriptors: the scan retries
    TlsConn *conns
    TlsConn *dirty
    TlsConn *tls_graveyard
    Stream *stream_graveyard
    Stream *awaiting
    int64_t live_streams
    int64_t live_tls
    int64_t closing_tls      # of live_tls: those in T_CLOSING
    unsigned char rbuf[131072]  # READ_BUF


cdef class TunnelWorker:
    cdef Engine *e
    cdef bint closed
    cdef dict ident_slots     # identity (str) -> slot in Engine.idents
    cdef readonly str trust_domain

    cdef int _push(self, void **items, size_t *length, size_t *capacity, size_t size,
                   const void *item) noexcept nogil
