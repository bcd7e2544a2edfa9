# Small socket and clock helpers shared by the native engines (_fastpath, _l7, _tunnel): defined once
# here as inline functions, compiled into each module that cimports them. No _sockets module exists.

from libc.stdint cimport int64_t

from nodeproxy._posix cimport *  # the C API, declared once

cdef enum:
    # TCP keepalive on every relayed socket, so a peer that vanished without FIN or RST (a dead node)
    # does not pin a connection's descriptors forever: first probe after 2 min idle, dead after 4 more
    # unanswered probes 30 s apart. Kernel defaults (2 h, 75 s, 9) would hold a dead peer for 2 h 11 min.
    KEEPALIVE_IDLE_S = 120
    KEEPALIVE_INTERVAL_S = 30
    KEEPALIVE_PROBES = 4


cdef inline int64_t now_ns() noexcept nogil:
    """CLOCK_MONOTONIC in nanoseconds."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int set_reset_on_close(int fd, bint on) noexcept nogil:
    """SO_LINGER {1, 0}: close() sends RST instead of FIN, and so does the kernel when the process dies.
    Relayed sockets carry it from setup on, so a crash resets both peers instead of passing for a
    complete transfer; it is cleared just before a graceful close."""
    cdef linger lg
    lg.l_onoff = 1 if on else 0
    lg.l_linger = 0
    return setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


cdef inline int sock_error(int fd) noexcept nogil:
    """The socket's pending error (SO_ERROR), e.g. how a non-blocking connect ended."""
    cdef int err = 0
    cdef socklen_t n = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0:
        return errno
    return err


cdef inline int set_tcp_options(int fd) noexcept nogil:
    """No Nagle delay, and keepalive with the timings above."""
    cdef int one = 1, idle = KEEPALIVE_IDLE_S, interval = KEEPALIVE_INTERVAL_S, probes = KEEPALIVE_PROBES
    if setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0:
        return -1
    if setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0:
        return -1
    if setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) < 0:
        return -1
    if setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval)) < 0:
        return -1
    return setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof(probes))
