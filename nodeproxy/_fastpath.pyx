# cython: language_level=3
"""The byte-moving core of nodeproxy.

Python decides where a connection goes; a RelayWorker then owns it: it finishes the non-blocking connect
to the chosen upstream and relays bytes both ways with splice(2) through a pipe per direction, on its own
epoll loop, on a thread that never takes the GIL. When a connection ends (or its connect fails, in which
case the client socket is handed back so Python can try another endpoint), the worker queues a completion
record and signals an eventfd that the asyncio loop watches.

Ownership: a file descriptor passed to RelayWorker.connect() belongs to the worker until it comes back in
a completion record (client_fd >= 0) or the worker closes it. Only the worker thread touches Conn structs.
"""

from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memset

import os as _os

# Completion kinds, for Python (nodeproxy.proxy.relay.Ending mirrors them).
CLOSED = END_CLOSED
CLIENT_RESET = END_CLIENT_RESET
UPSTREAM_RESET = END_UPSTREAM_RESET
CONNECT_FAILED = END_CONNECT_FAILED
CONNECT_TIMEOUT = END_CONNECT_TIMEOUT
ABORTED = END_ABORTED
IDLE_TIMEOUT = END_IDLE_TIMEOUT


cdef int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef void _set_reset_on_close(int fd) noexcept nogil:
    # SO_LINGER {1, 0}: close() sends RST instead of FIN, which is how a reset propagates.
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


cdef int _sock_error(int fd) noexcept nogil:
    cdef int err = 0
    cdef socklen_t n = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0:
        return errno
    return err


cdef int _parse_ipv4(str text, sockaddr_in *out, int port) except -1:
    cdef bytes raw = text.encode("ascii")
    memset(out, 0, sizeof(sockaddr_in))
    out.sin_family = AF_INET
    out.sin_port = htons(<unsigned short>port)
    if inet_pton(AF_INET, raw, &out.sin_addr) != 1:
        raise ValueError(f"not an IPv4 address: {text!r}")
    return 0


cdef str _format_ipv4(sockaddr_in *addr):
    cdef char buf[16]
    inet_ntop(AF_INET, &addr.sin_addr, buf, sizeof(buf))
    return buf.decode("ascii")


def accept_batch(int listen_fd, int max_batch=64):
    """Accept up to max_batch connections from a non-blocking listener.

    Returns [(fd, peer_ip, peer_port, orig_ip, orig_port)]; orig_* is the socket's local address, which
    for a TPROXY-diverted connection is the destination the client dialled. Raises OSError only when
    nothing could be accepted for a reason other than "no more pending" (e.g. EMFILE).
    """
    cdef list accepted = []
    cdef sockaddr_in peer, local
    cdef socklen_t plen, llen
    cdef int fd, err
    while len(accepted) < max_batch:
        plen = sizeof(peer)
        with nogil:
            fd = accept4(listen_fd, <sockaddr*>&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            err = errno
        if fd < 0:
            if err == EINTR or err == ECONNABORTED:
                continue
            if err == EAGAIN or accepted:
                break
            raise OSError(err, _os.strerror(err))
        llen = sizeof(local)
        getsockname(fd, <sockaddr*>&local, &llen)
        accepted.append((fd, _format_ipv4(&peer), ntohs(peer.sin_port),
                         _format_ipv4(&local), ntohs(local.sin_port)))
    return accepted


def set_socket_options(int fd):
    """TCP_NODELAY and TCP keepalive with nodeproxy's timings (KEEPALIVE_* in _fastpath.pxd).

    Set on the listener, both are inherited by every accepted socket.
    """
    cdef int one = 1, idle = KEEPALIVE_IDLE_S, interval = KEEPALIVE_INTERVAL_S, probes = KEEPALIVE_PROBES
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof(probes))


def reset_and_close(int fd):
    """Close a socket with an RST (used when no upstream can be reached)."""
    _set_reset_on_close(fd)
    close(fd)


cdef class RelayWorker:
    """One relay thread: an epoll loop owning a set of connections. Call run() on a dedicated thread."""

    def __cinit__(self, int notify_fd, size_t pipe_size=1048576):
        self.epfd = -1
        self.wake_fd = -1
        pthread_mutex_init(&self.lock, NULL)
        self.notify_fd = notify_fd
        self.pipe_size = pipe_size
        self.copy_size = COPY_SIZE if pipe_size >= COPY_SIZE else pipe_size
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.wake_fd < 0:
            raise OSError(errno, "eventfd")
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.ptr = NULL  # NULL marks the wake-up eventfd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wake_fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")

    def __dealloc__(self):
        cdef size_t i
        for i in range(self.subs_len):
            close(self.subs[i].client_fd)
            close(self.subs[i].upstream_fd)
        for i in range(self.done_len):
            if self.done[i].client_fd >= 0:
                close(self.done[i].client_fd)
        free(self.subs)
        free(self.done)
        if self.epfd >= 0:
            close(self.epfd)
        if self.wake_fd >= 0:
            close(self.wake_fd)
        pthread_mutex_destroy(&self.lock)

    @property
    def live_connections(self):
        """Connections the worker owns now (connecting or relaying)."""
        return self.live

    @property
    def connecting(self):
        return self.connecting

    # -- called from Python (any thread) ---------------------------------------------------------------

    def connect(self, uint64_t conn_id, int client_fd, str dst_ip, int dst_port, int timeout_ms,
                str bind_ip=None, int64_t idle_timeout_ms=0):
        """Start a non-blocking connect to dst and relay client_fd <-> upstream once it is up.

        bind_ip makes the upstream connection transparent (IP_TRANSPARENT): the backend sees bind_ip, the
        client pod's address, as the source. idle_timeout_ms > 0 closes the connection (a FIN both ways,
        reported as IDLE_TIMEOUT) once nothing has moved in either direction for that long. Raises OSError
        if the connect fails at once; client_fd then stays with the caller. On success both sockets
        belong to the worker.
        """
        cdef sockaddr_in dst, src
        cdef int fd, one = 1, rc, err, flags
        _parse_ipv4(dst_ip, &dst, dst_port)
        if bind_ip is not None:
            _parse_ipv4(bind_ip, &src, 0)
        if self.stopping:
            raise RuntimeError("relay worker is stopping")
        with nogil:
            fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
            err = errno
        if fd < 0:
            raise OSError(err, _os.strerror(err))
        set_socket_options(fd)  # the client socket inherited the same options from the listener
        flags = fcntl(client_fd, F_GETFL)
        if flags >= 0 and not flags & O_NONBLOCK:
            # The loop must never block in recv or splice; accept_batch's sockets already are non-blocking.
            fcntl(client_fd, F_SETFL, flags | O_NONBLOCK)
        with nogil:
            rc = 0
            if bind_ip is not None:
                rc = setsockopt(fd, IPPROTO_IP, IP_TRANSPARENT, &one, sizeof(one))
                if rc == 0:
                    # The port is chosen at connect() from the full 4-tuple, not reserved at bind().
                    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one))
                    rc = bind(fd, <sockaddr*>&src, sizeof(src))
            if rc == 0:
                rc = connect(fd, <sockaddr*>&dst, sizeof(dst))
                if rc < 0 and errno == EINPROGRESS:
                    rc = 0
            err = errno
        if rc < 0:
            close(fd)
            raise OSError(err, _os.strerror(err))
        self._submit(conn_id, client_fd, fd, _now_ns() + <int64_t>timeout_ms * 1000000,
                     idle_timeout_ms * 1000000 if idle_timeout_ms > 0 else 0)

    cdef int _submit(self, uint64_t conn_id, int client_fd, int upstream_fd, int64_t deadline,
                     int64_t idle_ns) except -1:
        cdef Submission *grown
        cdef uint64_t one = 1
        cdef bint first
        pthread_mutex_lock(&self.lock)
        if self.subs_len == self.subs_cap:
            grown = <Submission*>realloc(self.subs, (self.subs_cap * 2 + 64) * sizeof(Submission))
            if grown == NULL:
                pthread_mutex_unlock(&self.lock)
                close(upstream_fd)
                raise MemoryError()
            self.subs = grown
            self.subs_cap = self.subs_cap * 2 + 64
        self.subs[self.subs_len].id = conn_id
        self.subs[self.subs_len].client_fd = client_fd
        self.subs[self.subs_len].upstream_fd = upstream_fd
        self.subs[self.subs_len].deadline_ns = deadline
        self.subs[self.subs_len].idle_ns = idle_ns
        first = self.subs_len == 0
        self.subs_len += 1
        self.total_accepted += 1
        pthread_mutex_unlock(&self.lock)
        if first:
            # Only the first submission of a batch wakes the loop; it takes the whole batch at once.
            write(self.wake_fd, &one, sizeof(one))
        return 0

    def drain(self):
        """Take the completion records: [(conn_id, kind, errno, bytes_up, bytes_down, client_fd)].

        client_fd is >= 0 only for CONNECT_FAILED / CONNECT_TIMEOUT; the caller then owns it.
        """
        cdef list out = []
        cdef Completion *batch
        cdef size_t n, i
        batch = <Completion*>self._take_queue(<void**>&self.done, &self.done_len, &self.done_cap, &n)
        for i in range(n):
            out.append((batch[i].id, batch[i].kind, batch[i].err, batch[i].bytes_up, batch[i].bytes_down,
                        batch[i].client_fd))
        free(batch)
        return out

    def stop(self):
        """Ask run() to return; live connections are closed (reported as ABORTED)."""
        cdef uint64_t one = 1
        self.stopping = True
        write(self.wake_fd, &one, sizeof(one))

    def run(self):
        """The worker loop; returns after stop(). Runs without the GIL."""
        if self.closed:
            raise RuntimeError("relay worker already ran")
        with nogil:
            self._loop()
        self.closed = True

    # -- worker thread, no GIL ---------------------------------------------------------------------

    cdef void _loop(self) noexcept nogil:
        cdef epoll_event events[EVENTS_PER_WAIT]
        cdef int n, i, timeout
        cdef uint64_t counter
        cdef Side *side
        cdef Conn *c
        cdef int64_t now, next_deadline
        while not self.stopping:
            timeout = self._wait_timeout()
            n = epoll_wait(self.epfd, events, EVENTS_PER_WAIT, timeout)
            if n < 0:
                if errno == EINTR:
                    continue
                break
            self.now_ns = _now_ns()
            for i in range(n):
                side = <Side*>events[i].data.ptr
                if side == NULL:
                    read(self.wake_fd, &counter, sizeof(counter))
                    self._take_submissions()
                    continue
                if not side.conn.dead:
                    self._on_event(side.conn, side.index, events[i].events)
            self._run_ready()
            if self.connecting > 0:
                self._expire_connects(self.now_ns)
            if self.now_ns >= self.next_idle_scan_ns:
                self._expire_idle(self.now_ns)
                self.next_idle_scan_ns = self.now_ns + <int64_t>IDLE_SCAN_MS * 1000000
            self._bury()
        self._close_all()
        self._bury()

    cdef void _bury(self) noexcept nogil:
        # Freed only here: until the loop turn ends, a later event or the ready batch may point at it.
        cdef Conn *c
        while self.graveyard != NULL:
            c = self.graveyard
            self.graveyard = c.grave_next
            free(c)

    cdef int _wait_timeout(self) noexcept nogil:
        cdef Conn *c
        cdef int64_t soonest = -1, left
        if self.ready != NULL:
            return 0
        if self.connecting == 0:
            return 1000
        c = self.heads[CONNECTING_CONNS]
        while c != NULL:
            if soonest < 0 or c.deadline_ns < soonest:
                soonest = c.deadline_ns
            c = c.links[CONNECTING_CONNS].next
        left = (soonest - _now_ns()) // 1000000 + 1
        if left < 0:
            return 0
        return <int>left if left < 1000 else 1000

    cdef void *_take_queue(self, void **items, size_t *length, size_t *capacity,
                           size_t *taken) noexcept nogil:
        """Detach a whole queue under the lock; the caller owns (and frees) the returned array."""
        cdef void *batch
        pthread_mutex_lock(&self.lock)
        batch = items[0]
        taken[0] = length[0]
        items[0] = NULL
        length[0] = 0
        capacity[0] = 0
        pthread_mutex_unlock(&self.lock)
        return batch

    cdef void _take_submissions(self) noexcept nogil:
        cdef Submission *batch
        cdef size_t n, i
        batch = <Submission*>self._take_queue(<void**>&self.subs, &self.subs_len, &self.subs_cap, &n)
        for i in range(n):
            self._adopt(&batch[i])
        free(batch)

    cdef void _adopt(self, Submission *s) noexcept nogil:
        cdef Conn *c = <Conn*>calloc(1, sizeof(Conn))
        cdef epoll_event ev
        cdef int k
        if c == NULL:
            _set_reset_on_close(s.client_fd)
            close(s.client_fd)
            close(s.upstream_fd)
            self._complete_raw(s.id, END_CLIENT_RESET, 12, 0, 0, -1)  # ENOMEM
            return
        c.id = s.id
        c.fds[CLIENT] = s.client_fd
        c.fds[UPSTREAM] = s.upstream_fd
        c.state = CONNECTING
        c.deadline_ns = s.deadline_ns
        c.idle_ns = s.idle_ns
        for k in range(2):
            c.sides[k].conn = c
            c.sides[k].index = k
            c.dirs[k].pipe_r = -1
            c.dirs[k].pipe_w = -1
        self._link(c, ALL_CONNS)
        self._link(c, CONNECTING_CONNS)
        self.live += 1
        self.connecting += 1
        for k in range(2):
            # Edge-triggered: ADD reports the current readiness once; afterwards only changes.
            ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
            ev.data.ptr = &c.sides[k]
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, c.fds[k], &ev) < 0:
                self._fail_connect(c, errno, END_CONNECT_FAILED)
                return

    cdef void _on_event(self, Conn *c, int index, uint32_t events) noexcept nogil:
        cdef int err
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            c.readable[index] = True
        if events & (EPOLLRDHUP | EPOLLHUP):
            c.eof_pending[index] = True
        if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
            c.writable[index] = True
        if c.state == CONNECTING:
            if index == UPSTREAM:
                err = _sock_error(c.fds[UPSTREAM])
                if err != 0:
                    self._fail_connect(c, err, END_CONNECT_FAILED)
                elif events & EPOLLOUT:
                    self._start_relay(c)
            # Client events while connecting only set flags; its bytes wait in the socket buffer.
            return
        if events & EPOLLERR:
            err = _sock_error(c.fds[index])
            if err != 0:
                self._abort(c, index, err)
                return
        self._pump_both(c)

    cdef void _start_relay(self, Conn *c) noexcept nogil:
        self._connect_done(c)
        self._pump_both(c)

    cdef void _connect_done(self, Conn *c) noexcept nogil:
        # Off the connecting list, whatever the outcome.
        self._unlink(c, CONNECTING_CONNS)
        c.state = RELAYING
        self.connecting -= 1

    cdef int _take_pipe(self, Direction *d) noexcept nogil:
        # A pipe is lent to a direction only while it holds bytes, so an idle connection costs two fds.
        cdef int p[2]
        cdef int *slot
        if self.pipes_pooled > 0:
            self.pipes_pooled -= 1
            slot = &self.pipe_pool[3 * self.pipes_pooled]
            d.pipe_r, d.pipe_w, d.pipe_cap = slot[0], slot[1], <size_t>slot[2]
            return 0
        if pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0:
            return -1
        d.pipe_r, d.pipe_w, d.pipe_cap = p[0], p[1], PIPE_START
        if self.pipe_size < PIPE_START:
            d.pipe_cap = fcntl(p[1], F_SETPIPE_SZ, <int>self.pipe_size)
        return 0

    cdef void _grow_pipe(self, Direction *d) noexcept nogil:
        # The last read filled half the pipe or more (pipe slots, not bytes, may run out first): a bulk
        # flow, so fewer, larger splices pay off (as ztunnel grows its copy buffers). Bounded by
        # pipe_size, the per-direction buffering limit.
        cdef int grown = fcntl(d.pipe_w, F_SETPIPE_SZ, <int>self.pipe_size)
        if grown > 0:
            d.pipe_cap = grown

    cdef void _give_pipe(self, Direction *d) noexcept nogil:
        cdef int *slot
        if d.pipe_r < 0:
            return
        if d.in_pipe == 0 and self.pipes_pooled < PIPE_POOL_MAX:
            slot = &self.pipe_pool[3 * self.pipes_pooled]
            slot[0], slot[1], slot[2] = d.pipe_r, d.pipe_w, <int>d.pipe_cap
            self.pipes_pooled += 1
        else:
            close(d.pipe_r)
            close(d.pipe_w)
        d.pipe_r = -1
        d.pipe_w = -1
        d.in_pipe = 0

    cdef void _pump_both(self, Conn *c) noexcept nogil:
        c.active_ns = self.now_ns  # readiness or queued work counts as activity for the idle timeout
        if self._pump(c, CLIENT) < 0 or self._pump(c, UPSTREAM) < 0:
            return
        if c.dirs[CLIENT].dst_shut and c.dirs[UPSTREAM].dst_shut:
            self._finish(c, END_CLOSED, 0)

    cdef int _pump(self, Conn *c, int src) noexcept nogil:
        """Move bytes src -> dst until one side would block; -1 if the connection was torn down."""
        cdef int dst = 1 - src
        cdef Direction *d = &c.dirs[src]
        cdef ssize_t n
        cdef int turns = READS_PER_TURN
        while True:
            if d.in_pipe > 0:
                if not c.writable[dst]:
                    return 0
                n = splice(d.pipe_r, NULL, c.fds[dst], NULL, d.in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if n < 0:
                    if errno == EAGAIN:
                        c.writable[dst] = False
                        return 0
                    if errno == EINTR:
                        continue
                    self._abort(c, dst, errno)
                    return -1
                d.in_pipe -= n
                d.bytes += n
                if d.in_pipe == 0:
                    self._give_pipe(d)
                continue
            if d.src_eof:
                if not d.dst_shut:
                    # Half-close: the source finished sending, so finish the destination's direction.
                    shutdown(c.fds[dst], SHUT_WR)
                    d.dst_shut = True
                return 0
            if not c.readable[src]:
                return 0
            if turns == 0:
                self._queue_ready(c)
                return 0
            turns -= 1
            if not d.bulk:
                if self._read_copy(c, d, src) < 0:
                    return -1
                continue
            if d.pipe_r < 0 and self._take_pipe(d) < 0:
                self._abort(c, src, errno)
                return -1
            # Only read into an empty pipe, so EAGAIN here means the socket is empty, never the pipe full.
            n = splice(c.fds[src], NULL, d.pipe_w, NULL, d.pipe_cap, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n < 0:
                if errno == EAGAIN:
                    c.readable[src] = False
                    self._give_pipe(d)  # still empty: an idle direction holds no pipe
                    return 0
                if errno == EINTR:
                    continue
                self._abort(c, src, errno)
                return -1
            if n == 0:
                d.src_eof = True
                self._give_pipe(d)
            else:
                d.in_pipe = n
                if n < BULK_EXIT:
                    d.bulk = False
                elif <size_t>n * 2 >= d.pipe_cap and d.pipe_cap < self.pipe_size:
                    self._grow_pipe(d)

    cdef int _read_copy(self, Conn *c, Direction *d, int src) noexcept nogil:
        """Small-message path: recv into the worker's buffer and send on at once.

        Two syscalls per message instead of splice's three: a recv shorter than the buffer proves the
        socket drained (a splice into a pipe cannot tell that from the pipe running out of slots), so
        no read has to fail with EAGAIN first. What the destination does not take goes into the pipe.
        """
        cdef int dst = 1 - src
        cdef ssize_t n, sent = 0, kept
        n = recv(c.fds[src], self.scratch, self.copy_size, 0)
        if n < 0:
            if errno == EAGAIN:
                c.readable[src] = False
                return 0
            if errno == EINTR:
                return 0
            self._abort(c, src, errno)
            return -1
        if n == 0:
            d.src_eof = True
            return 0
        if <size_t>n == self.copy_size:
            d.bulk = True
        elif not c.eof_pending[src]:
            # Drained: the next segment to arrive raises a new edge. With EPOLLRDHUP seen, a FIN may
            # already be queued behind this data and raise no new edge, so read on until recv says 0.
            c.readable[src] = False
        if c.writable[dst]:
            sent = send(c.fds[dst], self.scratch, n, MSG_NOSIGNAL)
            if sent < 0:
                if errno != EAGAIN and errno != EINTR:
                    self._abort(c, dst, errno)
                    return -1
                c.writable[dst] = errno == EINTR
                sent = 0
        d.bytes += sent
        if sent < n:
            if d.pipe_r < 0 and self._take_pipe(d) < 0:
                self._abort(c, src, errno)
                return -1
            # An empty pipe holds at least copy_size bytes, so this write is never partial.
            kept = write(d.pipe_w, self.scratch + sent, n - sent)
            if kept != n - sent:
                self._abort(c, src, errno if kept < 0 else 5)  # EIO
                return -1
            d.in_pipe = kept
        return 0

    cdef void _link(self, Conn *c, int which) noexcept nogil:
        # Push to the front of list `which`: O(1), and order does not matter to any scan.
        cdef Conn *head = self.heads[which]
        c.links[which].prev = NULL
        c.links[which].next = head
        if head != NULL:
            head.links[which].prev = c
        self.heads[which] = c

    cdef void _unlink(self, Conn *c, int which) noexcept nogil:
        cdef Links *mine = &c.links[which]
        if mine.prev != NULL:
            mine.prev.links[which].next = mine.next
        else:
            self.heads[which] = mine.next
        if mine.next != NULL:
            mine.next.links[which].prev = mine.prev
        mine.prev = mine.next = NULL

    cdef void _queue_ready(self, Conn *c) noexcept nogil:
        if not c.queued:
            c.queued = True
            c.ready_next = self.ready
            self.ready = c

    cdef void _run_ready(self) noexcept nogil:
        cdef Conn *c
        cdef Conn *batch = self.ready
        self.ready = NULL
        while batch != NULL:
            c = batch
            batch = c.ready_next
            c.queued = False
            c.ready_next = NULL
            if not c.dead and c.state == RELAYING:
                self._pump_both(c)

    cdef void _expire_connects(self, int64_t now) noexcept nogil:
        cdef Conn *c = self.heads[CONNECTING_CONNS]
        cdef Conn *nxt
        while c != NULL:
            nxt = c.links[CONNECTING_CONNS].next
            if now >= c.deadline_ns:
                self._fail_connect(c, ETIMEDOUT, END_CONNECT_TIMEOUT)
            c = nxt

    cdef void _expire_idle(self, int64_t now) noexcept nogil:
        # A linear walk once a second: ~10 ns a connection, so 100k connections cost 1 ms a second,
        # less than a timer wheel's bookkeeping on every event would.
        cdef Conn *c = self.heads[ALL_CONNS]
        cdef Conn *nxt
        while c != NULL:
            nxt = c.links[ALL_CONNS].next
            if c.state == RELAYING and c.idle_ns > 0 and now - c.active_ns >= c.idle_ns:
                # A plain close: FIN to both peers, as Envoy's and HAProxy's idle timeouts do.
                self._finish(c, END_IDLE_TIMEOUT, ETIMEDOUT)
            c = nxt

    cdef void _fail_connect(self, Conn *c, int err, int kind) noexcept nogil:
        # The client socket goes back to Python, untouched, so it can try another endpoint.
        cdef int client_fd = c.fds[CLIENT]
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, client_fd, NULL)
        c.fds[CLIENT] = -1
        self._complete_raw(c.id, kind, err, 0, 0, client_fd)
        self._release(c)

    cdef void _abort(self, Conn *c, int failed, int err) noexcept nogil:
        """One side failed: reset the other side so the failure propagates, and drop the connection."""
        cdef int other = 1 - failed
        if c.fds[other] >= 0:
            _set_reset_on_close(c.fds[other])
        self._finish(c, END_CLIENT_RESET if failed == CLIENT else END_UPSTREAM_RESET, err)

    cdef void _finish(self, Conn *c, int kind, int err) noexcept nogil:
        self._complete_raw(c.id, kind, err, c.dirs[CLIENT].bytes, c.dirs[UPSTREAM].bytes, -1)
        self._release(c)

    cdef void _release(self, Conn *c) noexcept nogil:
        """Close everything the connection still holds and retire it (freed at the end of the loop turn)."""
        cdef int k
        if c.state == CONNECTING:
            self._connect_done(c)
        for k in range(2):
            if c.fds[k] >= 0:
                close(c.fds[k])  # closing also removes it from the epoll set
            self._give_pipe(&c.dirs[k])
        if c.queued:
            self._unqueue(c)
        self._unlink(c, ALL_CONNS)
        self.live -= 1
        c.dead = True
        c.grave_next = self.graveyard
        self.graveyard = c

    cdef void _unqueue(self, Conn *c) noexcept nogil:
        cdef Conn **link = &self.ready
        while link[0] != NULL:
            if link[0] == c:
                link[0] = c.ready_next
                return
            link = &link[0].ready_next

    cdef void _complete_raw(self, uint64_t conn_id, int kind, int err, uint64_t up, uint64_t down,
                            int client_fd) noexcept nogil:
        cdef Completion *grown
        cdef bint was_empty
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.lock)
        if self.done_len == self.done_cap:
            grown = <Completion*>realloc(self.done, (self.done_cap * 2 + 64) * sizeof(Completion))
            if grown == NULL:
                # Out of memory: the record is lost but the fd must not leak.
                pthread_mutex_unlock(&self.lock)
                if client_fd >= 0:
                    close(client_fd)
                return
            self.done = grown
            self.done_cap = self.done_cap * 2 + 64
        was_empty = self.done_len == 0
        self.done[self.done_len].id = conn_id
        self.done[self.done_len].kind = kind
        self.done[self.done_len].err = err
        self.done[self.done_len].bytes_up = up
        self.done[self.done_len].bytes_down = down
        self.done[self.done_len].client_fd = client_fd
        self.done_len += 1
        pthread_mutex_unlock(&self.lock)
        if was_empty:
            write(self.notify_fd, &one, sizeof(one))

    cdef void _close_all(self) noexcept nogil:
        cdef int k
        cdef int i
        cdef Conn *c
        self._take_submissions()
        for i in range(self.pipes_pooled):
            close(self.pipe_pool[3 * i])
            close(self.pipe_pool[3 * i + 1])
        self.pipes_pooled = 0
        while self.heads[ALL_CONNS] != NULL:
            c = self.heads[ALL_CONNS]
            for k in range(2):
                if c.fds[k] >= 0:
                    _set_reset_on_close(c.fds[k])
            self._finish(c, END_ABORTED, 0)
