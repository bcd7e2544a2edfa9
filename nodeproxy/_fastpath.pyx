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

from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

import os as _os

# Completion kinds, for Python (nodeproxy.proxy.relay.Ending mirrors them).
CLOSED = END_CLOSED
CLIENT_RESET = END_CLIENT_RESET
UPSTREAM_RESET = END_UPSTREAM_RESET
CONNECT_FAILED = END_CONNECT_FAILED
CONNECT_TIMEOUT = END_CONNECT_TIMEOUT
ABORTED = END_ABORTED
IDLE_TIMEOUT = END_IDLE_TIMEOUT
LOCAL_RESOURCES = END_LOCAL_RESOURCES

# Descriptor budget, for the listener: a connection holds at most this many fds at once (2 sockets and,
# while bytes are in flight, a pipe of 2 fds per direction); a worker holds WORKER_FDS of its own plus up
# to PIPE_POOL_FDS_MAX in empty pipes kept for reuse.
FDS_PER_CONNECTION_MAX = FDS_PER_CONN
WORKER_FDS = FDS_PER_WORKER
PIPE_POOL_FDS_MAX = 2 * PIPE_POOL_MAX


cdef bint _is_local_shortage(int err) noexcept nogil:
    # Errors that say this host ran out of something, not that a peer failed.
    return err == EMFILE or err == ENFILE or err == ENOMEM or err == ENOBUFS


cdef bint _resets_on_close(int fd) noexcept nogil:
    cdef linger lg
    cdef socklen_t n = sizeof(lg)
    if getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &n) < 0:
        return False
    return lg.l_onoff != 0 and lg.l_linger == 0


cdef int _set_nonblocking(int fd) noexcept nogil:
    # The loop must never block in recv or splice; accept_batch's sockets already are non-blocking.
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0:
        return -1
    if flags & O_NONBLOCK:
        return 0
    return fcntl(fd, F_SETFL, flags | O_NONBLOCK)


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
    for a TPROXY-diverted connection is the destination the client dialled. Every socket returned is
    non-blocking and carries SO_LINGER {1, 0} (inherited from a listener set up by set_socket_options, set
    here otherwise), so it can go to RelayWorker.connect(..., client_prepared=True). Raises OSError only when
    nothing could be accepted for a reason other than "no more pending" (e.g. EMFILE).
    """
    cdef list accepted = []
    cdef sockaddr_in peer, local
    cdef socklen_t plen, llen
    cdef int fd, err
    cdef bint inherits_linger = _resets_on_close(listen_fd)  # once a batch, not once a socket
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
        if not inherits_linger:
            set_reset_on_close(fd, True)
        llen = sizeof(local)
        getsockname(fd, <sockaddr*>&local, &llen)
        accepted.append((fd, _format_ipv4(&peer), ntohs(peer.sin_port),
                         _format_ipv4(&local), ntohs(local.sin_port)))
    return accepted


def set_socket_options(int fd):
    """TCP_NODELAY, TCP keepalive with nodeproxy's timings (KEEPALIVE_* in _sockets.pxd) and SO_LINGER
    {1, 0} (a crash resets, see _set_reset_on_close), for a listener.

    All three are inherited by every accepted socket, which saves setting them once a connection. The
    relay sets them itself on the upstream sockets it creates and on sockets given to adopt_established().
    """
    if set_tcp_options(fd) < 0 or set_reset_on_close(fd, True) < 0:
        raise OSError(errno, _os.strerror(errno))


def reset_and_close(int fd):
    """Close a socket with an RST (used when no upstream can be reached)."""
    set_reset_on_close(fd, True)
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
        self.grow_refused_ns = -GROW_RETRY_NS
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
        free(self.timers)
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
        """Connections still waiting for their upstream connect to finish."""
        return self.connecting

    @property
    def pipes_pooled(self):
        """Empty pipes kept for reuse (each holds two descriptors)."""
        return self.pipes_pooled

    # -- called from Python (any thread) ---------------------------------------------------------------

    def connect(self, uint64_t conn_id, int client_fd, str dst_ip, int dst_port, int timeout_ms,
                str bind_ip=None, int64_t idle_timeout_ms=0, bint client_prepared=False, bint wake=True):
        """Start a non-blocking connect to dst and relay client_fd <-> upstream once it is up.

        bind_ip makes the upstream connection transparent (IP_TRANSPARENT): the backend sees bind_ip, the
        client pod's address, as the source. idle_timeout_ms > 0 closes the connection (a FIN both ways,
        reported as IDLE_TIMEOUT) once nothing has moved in either direction for that long. Raises OSError
        if the connect fails at once; client_fd then stays with the caller. On success both sockets
        belong to the worker. Only the syscalls that must precede connect() run here, on the caller's
        thread; socket options are set on the relay thread. A client socket handed back after a failed
        connect is non-blocking and carries SO_LINGER {1, 0} (a close resets it).

        client_prepared=True says client_fd already is non-blocking and carries SO_LINGER {1, 0}, as every
        socket from accept_batch() does: the relay then spends no syscall on it. wake=False leaves the
        relay thread asleep until wake() (or a later connect with wake=True): one wake-up for a whole
        accept batch instead of one per connection.
        """
        cdef sockaddr_in dst, src
        cdef int fd, one = 1, rc, err
        cdef bint transparent = bind_ip is not None
        _parse_ipv4(dst_ip, &dst, dst_port)
        if transparent:
            _parse_ipv4(bind_ip, &src, 0)
        if self.stopping:
            raise RuntimeError("relay worker is stopping")
        with nogil:
            fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
            rc = 0 if fd >= 0 else -1
            if fd >= 0 and transparent:
                rc = setsockopt(fd, IPPROTO_IP, IP_TRANSPARENT, &one, sizeof(one))
                if rc == 0:
                    # The port is chosen at connect() from the full 4-tuple, not reserved at bind().
                    rc = setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one))
                if rc == 0:
                    rc = bind(fd, <sockaddr*>&src, sizeof(src))
            if rc == 0:
                rc = connect(fd, <sockaddr*>&dst, sizeof(dst))
                if rc < 0 and errno == EINPROGRESS:
                    rc = 0
            err = errno
            if rc < 0 and fd >= 0:
                close(fd)
        if rc < 0:
            raise OSError(err, _os.strerror(err))
        self._submit(conn_id, client_fd, fd, now_ns() + <int64_t>timeout_ms * 1000000,
                     idle_timeout_ms * 1000000 if idle_timeout_ms > 0 else 0, False, client_prepared, wake)

    def wake(self):
        """Wake the relay thread for submissions made with wake=False (a no-op when none wait)."""
        cdef uint64_t one = 1
        cdef bint needed
        pthread_mutex_lock(&self.lock)
        needed = self.subs_len > 0 and not self.woken
        if needed:
            self.woken = True  # only when signalled: `woken` promises a wake-up is on its way
        pthread_mutex_unlock(&self.lock)
        if needed:
            write(self.wake_fd, &one, sizeof(one))

    def adopt_established(self, uint64_t conn_id, int client_fd, int upstream_fd, int64_t idle_timeout_ms=0):
        """Relay an already connected socket pair, e.g. after an HTTP Upgrade was answered with 101.

        Both sockets belong to the worker from now on (it makes them non-blocking and sets nodeproxy's
        TCP options and SO_LINGER {1, 0} on them); the caller must have written out every byte it still
        held for either peer. The connection ends with a completion record like any other (never
        CONNECT_FAILED / CONNECT_TIMEOUT, so client_fd in it is -1). idle_timeout_ms as for connect().
        """
        if client_fd < 0 or upstream_fd < 0 or client_fd == upstream_fd:
            raise ValueError(f"two distinct open sockets are needed, got {client_fd} and {upstream_fd}")
        if self.stopping:
            raise RuntimeError("relay worker is stopping")
        self._submit(conn_id, client_fd, upstream_fd, 0,
                     idle_timeout_ms * 1000000 if idle_timeout_ms > 0 else 0, True, False, True)

    cdef int _submit(self, uint64_t conn_id, int client_fd, int upstream_fd, int64_t deadline,
                     int64_t idle_ns, bint established, bint client_prepared, bint wake) except -1:
        cdef Submission *grown
        cdef Submission *sub
        cdef uint64_t one = 1
        cdef bint needed = False
        pthread_mutex_lock(&self.lock)
        if self.subs_len == self.subs_cap:
            grown = <Submission*>realloc(self.subs, (self.subs_cap * 2 + 64) * sizeof(Submission))
            if grown == NULL:
                pthread_mutex_unlock(&self.lock)
                if not established:
                    close(upstream_fd)  # ours; client_fd stays with the caller, as for any raise
                raise MemoryError()
            self.subs = grown
            self.subs_cap = self.subs_cap * 2 + 64
        sub = &self.subs[self.subs_len]
        sub.id = conn_id
        sub.client_fd = client_fd
        sub.upstream_fd = upstream_fd
        sub.deadline_ns = deadline
        sub.idle_ns = idle_ns
        sub.established = established
        sub.client_prepared = client_prepared
        self.subs_len += 1
        self.total_accepted += 1
        if wake and not self.woken:
            # One wake-up per batch: the loop takes every queued submission at once.
            needed = self.woken = True
        pthread_mutex_unlock(&self.lock)
        if needed:
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
        """Ask run() to return; live connections are reset (reported as ABORTED)."""
        cdef uint64_t one = 1
        self.stopping = True
        write(self.wake_fd, &one, sizeof(one))

    def run(self):
        """The worker loop; returns after stop(). Runs without the GIL.

        SIGPIPE is blocked on this thread: send() passes MSG_NOSIGNAL, but splice() into a socket has no
        such flag, and a peer that went away must end one connection, not the process (whatever the
        process's SIGPIPE disposition is).
        """
        cdef sigset_t pipe_signal
        cdef int rc
        if self.closed:
            raise RuntimeError("relay worker already ran")
        sigemptyset(&pipe_signal)
        sigaddset(&pipe_signal, SIGPIPE)
        rc = pthread_sigmask(SIG_BLOCK, &pipe_signal, NULL)
        if rc != 0:
            raise OSError(rc, "pthread_sigmask")
        with nogil:
            self._loop()
        self.closed = True

    # -- worker thread, no GIL ---------------------------------------------------------------------

    cdef void _loop(self) noexcept nogil:
        cdef epoll_event events[EVENTS_PER_WAIT]
        cdef int n, i
        cdef uint64_t counter
        cdef Side *side
        while not self.stopping:
            n = epoll_wait(self.epfd, events, EVENTS_PER_WAIT, self._wait_timeout())
            if n < 0:
                if errno == EINTR:
                    continue
                break
            self.now_ns = now_ns()
            for i in range(n):
                side = <Side*>events[i].data.ptr
                if side == NULL:
                    read(self.wake_fd, &counter, sizeof(counter))
                    self._take_submissions()
                    continue
                if not side.conn.dead:
                    self._on_event(side.conn, side.index, events[i].events)
            self._run_ready()
            self._run_timers(self.now_ns)
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
        # The soonest timer is the heap's top: O(1), however many connections there are.
        cdef int64_t left
        if self.ready != NULL:
            return 0
        if self.timers_len == 0:
            return WAIT_MAX_MS
        left = (self.timers[0].timer_ns - now_ns()) // 1000000 + 1
        if left < 0:
            return 0
        return <int>left if left < WAIT_MAX_MS else WAIT_MAX_MS

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
        pthread_mutex_lock(&self.lock)
        self.woken = False  # before the queue is taken: a later submission must wake the loop again
        pthread_mutex_unlock(&self.lock)
        batch = <Submission*>self._take_queue(<void**>&self.subs, &self.subs_len, &self.subs_cap, &n)
        for i in range(n):
            self._adopt(&batch[i])
        free(batch)

    cdef void _adopt(self, Submission *s) noexcept nogil:
        cdef Conn *c = NULL
        cdef epoll_event ev
        cdef int k, err = 0
        # Socket setup runs here, off the Python thread. SO_LINGER {1, 0} first: from now on a dying
        # process resets both peers. The client socket inherited the TCP options from the listener.
        if not s.client_prepared and (set_reset_on_close(s.client_fd, True) < 0
                                      or _set_nonblocking(s.client_fd) < 0):
            err = errno
        elif set_reset_on_close(s.upstream_fd, True) < 0 or set_tcp_options(s.upstream_fd) < 0:
            err = errno
        elif s.established and (_set_nonblocking(s.upstream_fd) < 0 or set_tcp_options(s.client_fd) < 0):
            err = errno
        elif self._reserve_timer() < 0:
            err = ENOMEM
        else:
            c = <Conn*>calloc(1, sizeof(Conn))
            if c == NULL:
                err = ENOMEM
        if c == NULL:
            # Cannot take it on: reset both (a failed setsockopt on a socket means it is unusable).
            set_reset_on_close(s.client_fd, True)
            close(s.client_fd)
            close(s.upstream_fd)
            self._complete_raw(s.id, END_LOCAL_RESOURCES if _is_local_shortage(err) else END_CLIENT_RESET,
                               err, 0, 0, -1)
            return
        c.id = s.id
        c.fds[CLIENT] = s.client_fd
        c.fds[UPSTREAM] = s.upstream_fd
        c.idle_ns = s.idle_ns
        c.heap_at = -1
        c.active_ns = self.now_ns
        for k in range(2):
            c.sides[k].conn = c
            c.sides[k].index = k
            c.dirs[k].pipe_r = -1
            c.dirs[k].pipe_w = -1
        c.next = self.conns
        if self.conns != NULL:
            self.conns.prev = c
        self.conns = c
        self.live += 1
        if s.established:
            c.state = RELAYING
            if c.idle_ns > 0:
                self._timer_set(c, self.now_ns + c.idle_ns)
        else:
            c.state = CONNECTING
            self.connecting += 1
            self._timer_set(c, s.deadline_ns)
        for k in range(2):
            # Edge-triggered: ADD reports the current readiness once; afterwards only changes.
            ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
            ev.data.ptr = &c.sides[k]
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, c.fds[k], &ev) < 0:
                err = errno
                # ENOMEM or ENOSPC (max_user_watches) are this host's limits, not the peer's fault.
                self._finish(c, END_LOCAL_RESOURCES if err == ENOSPC or _is_local_shortage(err)
                             else (END_CLIENT_RESET if k == CLIENT else END_UPSTREAM_RESET), err)
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
                # A failed connect always raises EPOLLERR; a plain EPOLLOUT is a success, and needs no
                # SO_ERROR read to prove it.
                err = sock_error(c.fds[UPSTREAM]) if events & (EPOLLERR | EPOLLHUP) else 0
                if err != 0:
                    self._fail_connect(c, err, END_CONNECT_FAILED)
                elif events & EPOLLOUT:
                    self._start_relay(c)
            # Client events while connecting only set flags; its bytes wait in the socket buffer.
            return
        if events & EPOLLERR:
            err = sock_error(c.fds[index])
            if err != 0:
                self._abort(c, index, err)
                return
        self._pump_both(c)

    cdef void _start_relay(self, Conn *c) noexcept nogil:
        self._connect_done(c)
        self._pump_both(c)

    cdef void _connect_done(self, Conn *c) noexcept nogil:
        # The connect deadline no longer applies, whatever the outcome; the idle timer takes its place.
        c.state = RELAYING
        self.connecting -= 1
        c.active_ns = self.now_ns
        if c.idle_ns > 0:
            self._timer_set(c, self.now_ns + c.idle_ns)
        else:
            self._timer_clear(c)

    # -- pipes -------------------------------------------------------------------------------------

    cdef int _take_pipe(self, Direction *d) noexcept nogil:
        """Lend a pipe to `d`: 0, or the errno why there is none (EMFILE/ENFILE: copy without one)."""
        # A pipe is lent to a direction only while it holds bytes, so an idle connection costs two fds.
        cdef int p[2]
        cdef int *slot
        cdef int cap, err
        if self.pipes_pooled > 0:
            self.pipes_pooled -= 1
            slot = &self.pipe_pool[3 * self.pipes_pooled]
            d.pipe_r, d.pipe_w, d.pipe_cap = slot[0], slot[1], <size_t>slot[2]
            return 0
        if self.pipe_error != 0 and self.now_ns - self.pipe_refused_ns < GROW_RETRY_NS:
            # Refused a moment ago: do not pay a failing pipe2() for every 16 KiB copied meanwhile.
            return self.pipe_error
        if pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0:
            self.pipe_error = errno
            self.pipe_refused_ns = self.now_ns
            return self.pipe_error
        self.pipe_error = 0
        # The real size: 64 KiB by default, but without CAP_SYS_RESOURCE past fs.pipe-user-pages-soft
        # the kernel hands out 2-page pipes (1 page on kernels before 5.14).
        cap = fcntl(p[1], F_GETPIPE_SZ)
        if cap > 0 and <size_t>cap > self.pipe_size:
            cap = fcntl(p[1], F_SETPIPE_SZ, <int>self.pipe_size)
            if cap <= 0:
                cap = fcntl(p[1], F_GETPIPE_SZ)
        if cap <= 0:
            err = errno
            close(p[0])
            close(p[1])
            return err
        d.pipe_r, d.pipe_w, d.pipe_cap = p[0], p[1], <size_t>cap
        return 0

    cdef void _grow_pipe(self, Direction *d) noexcept nogil:
        # The last read filled half the pipe or more (pipe slots, not bytes, may run out first): a bulk
        # flow, so fewer, larger splices pay off (as ztunnel grows its copy buffers). Bounded by
        # pipe_size, the per-direction buffering limit. Past the user's pipe limits the kernel refuses
        # (EPERM); the pipe keeps its size and growing waits GROW_RETRY_NS.
        cdef int grown
        if self.now_ns - self.grow_refused_ns < GROW_RETRY_NS:
            return
        grown = fcntl(d.pipe_w, F_SETPIPE_SZ, <int>self.pipe_size)
        if grown > 0:
            d.pipe_cap = grown
        else:
            self.grow_refused_ns = self.now_ns

    cdef void _give_pipe(self, Direction *d) noexcept nogil:
        # Only an empty pipe is pooled: bytes left in a pooled pipe would reach another connection, or
        # make its first splice read fail with EAGAIN as if its socket were drained.
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

    # -- moving bytes ------------------------------------------------------------------------------

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
        cdef int turns = READS_PER_TURN, queued = 0, err
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
            if d.spill_len > 0:
                # Behind the pipe's bytes: only now that the pipe is empty.
                if self._send_spill(c, d, dst) < 0:
                    return -1
                if d.spill_len > 0:
                    return 0
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
            if d.bulk and d.pipe_r < 0:
                err = self._take_pipe(d)
                if err != 0:
                    if not _is_local_shortage(err):
                        self._abort(c, src, err)
                        return -1
                    # No pipe to be had (EMFILE/ENFILE): carry on through the copy buffer, not abort.
                    d.bulk = False
            if not d.bulk:
                if self._read_copy(c, d, src) < 0:
                    return -1
                continue
            # Only read into an empty pipe, so EAGAIN here means the socket is empty, not the pipe full.
            n = splice(c.fds[src], NULL, d.pipe_w, NULL, d.pipe_cap, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n < 0:
                if errno == EAGAIN:
                    # Checked, not assumed: a pipe holding bytes we lost count of would turn every
                    # later read into EAGAIN and stall the flow for good.
                    if ioctl(d.pipe_r, FIONREAD, &queued) < 0 or queued != 0:
                        self._finish_local(c, EIO)
                        return -1
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
                if n < BULK_EXIT and <size_t>n < d.pipe_cap:
                    d.bulk = False
                elif <size_t>n * 2 >= d.pipe_cap and d.pipe_cap < self.pipe_size:
                    self._grow_pipe(d)

    cdef int _read_copy(self, Conn *c, Direction *d, int src) noexcept nogil:
        """Small-message path: recv into the worker's buffer and send on at once.

        Two syscalls per message instead of splice's three: a recv shorter than the buffer proves the
        socket drained (a splice into a pipe cannot tell that from the pipe running out of slots), so
        no read has to fail with EAGAIN first. What the destination does not take is kept (_keep).
        """
        cdef int dst = 1 - src
        cdef ssize_t n, sent = 0
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
            return self._keep(c, d, src, self.scratch + sent, n - sent)
        return 0

    cdef int _keep(self, Conn *c, Direction *d, int src, const char *data, size_t length) noexcept nogil:
        """Hold bytes read but not sent: in the pipe as far as it takes them, the rest in the spill.

        Called with the pipe and the spill empty. A pipe may take less than asked (its real capacity
        can be one or two pages), and there may be no pipe at all (EMFILE): no byte is ever dropped.
        """
        cdef ssize_t kept = 0
        cdef int err = 0 if d.pipe_r >= 0 else self._take_pipe(d)
        if err == 0:
            kept = write(d.pipe_w, data, length)
            if kept < 0:
                if errno != EAGAIN:
                    self._finish_local(c, errno)
                    return -1
                kept = 0
            d.in_pipe += kept
            if d.in_pipe == 0:
                self._give_pipe(d)
        elif not _is_local_shortage(err):
            self._abort(c, src, err)
            return -1
        if <size_t>kept < length:
            if d.spill == NULL:
                d.spill = <char*>malloc(COPY_SIZE)
                if d.spill == NULL:
                    self._finish_local(c, ENOMEM)
                    return -1
            memcpy(d.spill, data + kept, length - kept)
            d.spill_off = 0
            d.spill_len = length - kept
        return 0

    cdef int _send_spill(self, Conn *c, Direction *d, int dst) noexcept nogil:
        cdef ssize_t sent
        if not c.writable[dst]:
            return 0
        sent = send(c.fds[dst], d.spill + d.spill_off, d.spill_len, MSG_NOSIGNAL)
        if sent < 0:
            if errno == EAGAIN:
                c.writable[dst] = False
                return 0
            if errno == EINTR:
                return 0
            self._abort(c, dst, errno)
            return -1
        d.bytes += sent
        d.spill_off += sent
        d.spill_len -= sent
        if d.spill_len == 0:
            free(d.spill)
            d.spill = NULL
            d.spill_off = 0
        return 0

    # -- ready list and timers -----------------------------------------------------------------------

    cdef void _queue_ready(self, Conn *c) noexcept nogil:
        if not c.queued:
            c.queued = True
            c.ready_prev = NULL
            c.ready_next = self.ready
            if self.ready != NULL:
                self.ready.ready_prev = c
            self.ready = c

    cdef void _unqueue(self, Conn *c) noexcept nogil:
        # Doubly linked: O(1), not a walk of the ready list.
        if c.ready_prev != NULL:
            c.ready_prev.ready_next = c.ready_next
        elif self.ready == c:
            self.ready = c.ready_next
        if c.ready_next != NULL:
            c.ready_next.ready_prev = c.ready_prev
        c.ready_prev = c.ready_next = NULL
        c.queued = False

    cdef void _run_ready(self) noexcept nogil:
        # Only the connections queued before this call: those that queue again wait for the next turn.
        cdef Conn *c = self.ready
        cdef Conn *later
        self.ready = NULL
        while c != NULL:
            later = c.ready_next
            c.queued = False
            c.ready_prev = c.ready_next = NULL
            if later != NULL:
                later.ready_prev = NULL
            if not c.dead and c.state == RELAYING:
                self._pump_both(c)
            c = later

    cdef int _reserve_timer(self) noexcept nogil:
        # Room for one more timer (a connection has at most one), so _timer_set cannot fail later.
        cdef Conn **grown
        cdef size_t cap
        if <size_t>self.live < self.timers_cap:
            return 0
        cap = self.timers_cap * 2 + 64
        grown = <Conn**>realloc(self.timers, cap * sizeof(Conn*))
        if grown == NULL:
            return -1
        self.timers = grown
        self.timers_cap = cap
        return 0

    cdef void _heap_put(self, size_t at, Conn *c) noexcept nogil:
        self.timers[at] = c
        c.heap_at = <ssize_t>at

    cdef void _timer_sift(self, size_t at) noexcept nogil:
        # Restore the heap order around `at`, up or down.
        cdef Conn *c = self.timers[at]
        cdef size_t parent, child
        while at > 0:
            parent = (at - 1) // 2
            if self.timers[parent].timer_ns <= c.timer_ns:
                break
            self._heap_put(at, self.timers[parent])
            at = parent
        while True:
            child = 2 * at + 1
            if child >= self.timers_len:
                break
            if child + 1 < self.timers_len and self.timers[child + 1].timer_ns < self.timers[child].timer_ns:
                child += 1
            if self.timers[child].timer_ns >= c.timer_ns:
                break
            self._heap_put(at, self.timers[child])
            at = child
        self._heap_put(at, c)

    cdef void _timer_set(self, Conn *c, int64_t when) noexcept nogil:
        c.timer_ns = when
        if c.heap_at < 0:
            # _reserve_timer made room when the connection was adopted.
            self._heap_put(self.timers_len, c)
            self.timers_len += 1
        self._timer_sift(<size_t>c.heap_at)

    cdef void _timer_clear(self, Conn *c) noexcept nogil:
        cdef size_t at
        cdef Conn *last
        if c.heap_at < 0:
            return
        at = <size_t>c.heap_at
        c.heap_at = -1
        self.timers_len -= 1
        if at == self.timers_len:
            return
        last = self.timers[self.timers_len]
        self._heap_put(at, last)
        self._timer_sift(at)

    cdef void _run_timers(self, int64_t now) noexcept nogil:
        # Only due timers are touched: O(log n) each, nothing per live connection. An idle timer is
        # not moved on each pump; when it fires early (the connection was active since) it is re-armed
        # from the last activity.
        cdef Conn *c
        while self.timers_len > 0 and self.timers[0].timer_ns <= now:
            c = self.timers[0]
            if c.state == CONNECTING:
                self._fail_connect(c, ETIMEDOUT, END_CONNECT_TIMEOUT)
            elif now - c.active_ns >= c.idle_ns:
                # A plain close: FIN to both peers, as Envoy's and HAProxy's idle timeouts do.
                self._finish(c, END_IDLE_TIMEOUT, ETIMEDOUT)
            else:
                self._timer_set(c, c.active_ns + c.idle_ns)

    # -- endings -----------------------------------------------------------------------------------

    cdef void _fail_connect(self, Conn *c, int err, int kind) noexcept nogil:
        # The client socket goes back to Python, untouched, so it can try another endpoint.
        cdef int client_fd = c.fds[CLIENT]
        cdef uint64_t conn_id = c.id
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, client_fd, NULL)
        c.fds[CLIENT] = -1
        self._release(c)  # first: Python may act on the record at once (see _finish)
        self._complete_raw(conn_id, kind, err, 0, 0, client_fd)

    cdef void _abort(self, Conn *c, int failed, int err) noexcept nogil:
        """One side failed: drop the connection; both sockets reset (SO_LINGER {1, 0} since setup)."""
        if _is_local_shortage(err):
            self._finish(c, END_LOCAL_RESOURCES, err)
        else:
            self._finish(c, END_CLIENT_RESET if failed == CLIENT else END_UPSTREAM_RESET, err)

    cdef void _finish_local(self, Conn *c, int err) noexcept nogil:
        self._finish(c, END_LOCAL_RESOURCES, err)

    cdef void _finish(self, Conn *c, int kind, int err) noexcept nogil:
        cdef int k
        cdef uint64_t conn_id = c.id, up = c.dirs[CLIENT].bytes, down = c.dirs[UPSTREAM].bytes
        if kind == END_CLOSED or kind == END_IDLE_TIMEOUT:
            # Graceful: the close sends FIN after every byte still queued, instead of an RST.
            for k in range(2):
                if c.fds[k] >= 0:
                    set_reset_on_close(c.fds[k], False)
        # Release before the record: Python may read it at once, and a connection it sees as ended must
        # hold nothing any more (sockets closed and out of the epoll set, pipes back in the pool).
        self._release(c)
        self._complete_raw(conn_id, kind, err, up, down, -1)

    cdef void _release(self, Conn *c) noexcept nogil:
        """Close everything the connection still holds and retire it (freed at the end of the loop turn)."""
        cdef int k
        if c.state == CONNECTING:
            c.state = RELAYING
            self.connecting -= 1
        self._timer_clear(c)
        for k in range(2):
            if c.fds[k] >= 0:
                # Explicitly: close() removes the fd from the epoll set only when no other descriptor
                # (a dup, a forked child) refers to the same socket; a stale entry would report events
                # for freed memory.
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fds[k], NULL)
                close(c.fds[k])
                c.fds[k] = -1
            self._give_pipe(&c.dirs[k])
            free(c.dirs[k].spill)
            c.dirs[k].spill = NULL
        if c.queued:
            self._unqueue(c)
        if c.prev != NULL:
            c.prev.next = c.next
        else:
            self.conns = c.next
        if c.next != NULL:
            c.next.prev = c.prev
        self.live -= 1
        c.dead = True
        c.grave_next = self.graveyard
        self.graveyard = c

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
        cdef int i
        self._take_submissions()
        for i in range(self.pipes_pooled):
            close(self.pipe_pool[3 * i])
            close(self.pipe_pool[3 * i + 1])
        self.pipes_pooled = 0
        while self.conns != NULL:
            # SO_LINGER {1, 0} has been on both sockets since setup: each peer gets an RST.
            self._finish(self.conns, END_ABORTED, 0)
