# Declarations for nodeproxy/_fastpath.pyx: the C API it uses and the layout of its handles.

from libc.stdint cimport int64_t, uint32_t, uint64_t

from nodeproxy._posix cimport *  # the C API, declared once
from nodeproxy._sockets cimport *  # now_ns, set_reset_on_close, sock_error, set_tcp_options


# -- relay handles ---------------------------------------------------------------------------------

cdef enum:
    CLIENT = 0             # index of the client socket / the client -> upstream direction
    UPSTREAM = 1           # index of the upstream socket / the upstream -> client direction
    EVENTS_PER_WAIT = 256
    READS_PER_TURN = 16    # reads per direction per wake-up before yielding to other connections
    PIPE_POOL_MAX = 128    # empty pipes a worker keeps for reuse; idle connections hold no pipe
    COPY_SIZE = 16384      # reads below this size go through a copy buffer (recv/send), not splice
    BULK_EXIT = 4096       # a splice read shorter than this switches the direction back to copying
    # The most descriptors one relayed connection holds at once: its two sockets, plus a pipe (two fds)
    # per direction while that direction has bytes in flight.
    FDS_PER_CONN = 6
    # Descriptors a RelayWorker holds whatever its load: its epoll instance and its wake-up eventfd.
    FDS_PER_WORKER = 2
    GROW_RETRY_NS = 1000000000  # after the kernel refused a new pipe or a bigger one, try again after 1 s
    WAIT_MAX_MS = 60000         # longest epoll_wait with no timer due (stop() wakes the loop anyway)


cdef enum Ending:
    END_CLOSED = 0           # both directions finished with FIN
    END_CLIENT_RESET = 1     # the client side failed (RST or error); the upstream got an RST
    END_UPSTREAM_RESET = 2   # the upstream side failed; the client got an RST
    END_CONNECT_FAILED = 3   # upstream connect failed; client_fd is handed back to Python
    END_CONNECT_TIMEOUT = 4  # upstream connect timed out; client_fd is handed back to Python
    END_ABORTED = 5          # the worker stopped while the connection was live
    END_IDLE_TIMEOUT = 6     # no byte moved either way for the idle timeout; both sides got a FIN
    END_LOCAL_RESOURCES = 7  # the proxy ran short (descriptors, memory, socket buffers); both got an RST


cdef enum ConnState:
    CONNECTING = 0
    RELAYING = 1


ctypedef struct Direction:
    # Bytes flow src socket -> pipe -> dst socket; `in_pipe` is what the pipe holds now. Bytes that fit
    # neither the destination nor the pipe (a small pipe, or none to be had) wait in `spill`, behind
    # the pipe's bytes; nothing more is read while either holds bytes.
    int pipe_r
    int pipe_w
    size_t in_pipe
    size_t pipe_cap       # the pipe's real capacity (F_GETPIPE_SZ / F_SETPIPE_SZ), never assumed
    char *spill           # COPY_SIZE bytes, allocated only while needed
    size_t spill_off
    size_t spill_len
    uint64_t bytes
    bint bulk             # splice (zero copy) while reads fill the copy buffer; recv/send otherwise
    bint src_eof
    bint dst_shut


cdef struct Conn

ctypedef struct Side:
    # epoll's data.ptr for one socket of a connection.
    Conn *conn
    int index


cdef struct Conn:
    uint64_t id
    int fds[2]            # CLIENT, UPSTREAM
    Side sides[2]
    Direction dirs[2]     # dirs[CLIENT]: client -> upstream, dirs[UPSTREAM]: upstream -> client
    bint readable[2]
    bint writable[2]
    bint eof_pending[2]   # EPOLLRDHUP seen: keep reading past a short read until recv returns 0
    ConnState state
    int64_t idle_ns       # idle timeout (0: none)
    int64_t active_ns     # when the relay last pumped it (for the idle timeout)
    int64_t timer_ns      # when its timer fires: the connect deadline, or the idle check
    ssize_t heap_at       # its index in the worker's timer heap, -1 when it has no timer
    bint queued           # on the ready list (work left after its fairness budget)
    bint dead             # released: its fds are closed; freed at the end of the loop turn
    Conn *grave_next
    Conn *ready_prev
    Conn *ready_next
    Conn *prev            # the worker's list of every live connection (for stop())
    Conn *next


ctypedef struct Submission:
    uint64_t id
    int client_fd
    int upstream_fd
    int64_t deadline_ns   # connect deadline; unused when established
    int64_t idle_ns
    bint established      # adopt_established(): already connected, relay at once
    bint client_prepared  # client_fd is non-blocking and has SO_LINGER {1, 0} (from accept_batch)


ctypedef struct Completion:
    uint64_t id
    int kind
    int err
    uint64_t bytes_up
    uint64_t bytes_down
    int client_fd


cdef class RelayWorker:
    cdef int epfd
    cdef int wake_fd
    cdef int notify_fd
    cdef size_t pipe_size
    cdef bint stopping
    cdef bint closed
    cdef bint woken       # under lock: the loop was signalled and has not taken the queue since
    cdef Conn *conns      # every live connection
    cdef Conn *ready
    cdef Conn *graveyard  # released connections; events of the same epoll batch may still name them
    cdef Conn **timers    # binary min-heap on timer_ns: connect deadlines and idle checks
    cdef size_t timers_len
    cdef size_t timers_cap
    cdef int64_t connecting
    cdef int64_t live
    cdef uint64_t total_accepted
    cdef int64_t now_ns           # the loop's clock, read once per epoll_wait return
    cdef int64_t grow_refused_ns  # when the kernel last refused to grow a pipe (EPERM past the limits)
    cdef int64_t pipe_refused_ns  # when pipe2() last failed, and why (0: it did not)
    cdef int pipe_error
    cdef pthread_mutex_t lock
    cdef Submission *subs
    cdef size_t subs_len
    cdef size_t subs_cap
    cdef Completion *done
    cdef size_t done_len
    cdef size_t done_cap
    cdef int pipe_pool[3 * PIPE_POOL_MAX]   # (read fd, write fd, capacity) triples, all empty
    cdef int pipes_pooled
    cdef size_t copy_size
    cdef char scratch[COPY_SIZE]

    cdef int _submit(self, uint64_t conn_id, int client_fd, int upstream_fd, int64_t deadline,
                     int64_t idle_ns, bint established, bint client_prepared, bint wake) except -1
    cdef void _loop(self) noexcept nogil
    cdef int _wait_timeout(self) noexcept nogil
    cdef void *_take_queue(self, void **items, size_t *length, size_t *capacity, size_t *taken) noexcept nogil
    cdef void _take_submissions(self) noexcept nogil
    cdef void _adopt(self, Submission *s) noexcept nogil
    cdef void _on_event(self, Conn *c, int index, uint32_t events) noexcept nogil
    cdef void _start_relay(self, Conn *c) noexcept nogil
    cdef void _pump_both(self, Conn *c) noexcept nogil
    cdef int _pump(self, Conn *c, int src) noexcept nogil
    cdef int _send_spill(self, Conn *c, Direction *d, int dst) noexcept nogil
    cdef int _keep(self, Conn *c, Direction *d, int src, const char *data, size_t length) noexcept nogil
    cdef void _queue_ready(self, Conn *c) noexcept nogil
    cdef void _run_ready(self) noexcept nogil
    cdef int _reserve_timer(self) noexcept nogil
    cdef void _timer_set(self, Conn *c, int64_t when) noexcept nogil
    cdef void _timer_clear(self, Conn *c) noexcept nogil
    cdef void _timer_sift(self, size_t at) noexcept nogil
    cdef void _heap_put(self, size_t at, Conn *c) noexcept nogil
    cdef void _run_timers(self, int64_t now) noexcept nogil
    cdef void _fail_connect(self, Conn *c, int err, int kind) noexcept nogil
    cdef void _abort(self, Conn *c, int failed, int err) noexcept nogil
    cdef void _finish(self, Conn *c, int kind, int err) noexcept nogil
    cdef void _finish_local(self, Conn *c, int err) noexcept nogil
    cdef void _release(self, Conn *c) noexcept nogil
    cdef void _unqueue(self, Conn *c) noexcept nogil
    cdef void _complete_raw(self, uint64_t conn_id, int kind, int err, uint64_t up, uint64_t down,
                            int client_fd) noexcept nogil
    cdef void _close_all(self) noexcept nogil
    cdef void _bury(self) noexcept nogil
    cdef void _connect_done(self, Conn *c) noexcept nogil
    cdef int _take_pipe(self, Direction *d) noexcept nogil
    cdef void _give_pipe(self, Direction *d) noexcept nogil
    cdef void _grow_pipe(self, Direction *d) noexcept nogil
    cdef int _read_copy(self, Conn *c, Direction *d, int src) noexcept nogil
