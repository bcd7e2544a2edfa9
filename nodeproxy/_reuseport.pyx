# cython: language_level=3
"""Least-loaded SO_REUSEPORT balancing: an SK_REUSEPORT eBPF program that sends each new connection to
the least loaded worker, built and loaded with raw bpf(2) calls (no libbpf, no compiler).

The kernel spreads the connections of a SO_REUSEPORT group over its sockets by 4-tuple hash. That is
fair for many short connections, but a few long bulk flows can land on one worker while another idles
(iperf3 -P 4 over two workers: 3 + 1 or 4 + 0 more than half the time). The program (attached to the
group, so it also runs for TPROXY's listener lookup, which passes the SYN to the reuseport selection)
sends each new connection to the worker with the lowest load, a tie to the lowest index (as Envoy's
exact_balance), and counts it there at once:

    pick = argmin over i of (load[i], i)
    bpf_sk_select_reuseport(sockets[pick]);  on success load[pick] += 1 (atomic)

`load` is a BPF_F_MMAPABLE array (per worker a u64 load and the worker's index, see program()): the
supervisor maps it before forking, so each worker sets its own load with a plain memory write
(LoadTable.set: its live connection count), and the program's increments cover the connections the
kernel has handed out that the worker has not accepted yet. If anything fails in the program (a socket
missing from the array) it returns SK_PASS without a selection and the kernel falls back to its hash.
"""

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memset, strlen
from libc.stdint cimport uint64_t

import os as _os
from collections.abc import Sequence


cdef long _bpf(int cmd, bpf_attr *attr) noexcept nogil:
    return syscall(SYS_bpf, cmd, attr, sizeof(bpf_attr))


cdef int _create_map(uint32_t map_type, uint32_t value_size, uint32_t entries, uint32_t flags,
                     bytes name) except -1:
    cdef bpf_attr attr
    cdef int fd
    memset(&attr, 0, sizeof(attr))
    attr.map_type = map_type
    attr.key_size = 4
    attr.value_size = value_size
    attr.max_entries = entries
    attr.map_flags = flags
    attr.map_name[:len(name)] = name
    fd = <int>_bpf(BPF_MAP_CREATE, &attr)
    if fd < 0:
        err = errno
        raise OSError(err, f"bpf(BPF_MAP_CREATE, {name.decode()}): {_os.strerror(err)}")
    return fd


cdef int _put_socket(int map_fd, uint32_t index, int sock_fd) except -1:
    cdef bpf_attr attr
    cdef uint64_t value = <uint64_t>sock_fd
    memset(&attr, 0, sizeof(attr))
    attr.map_fd = map_fd
    attr.key = <uint64_t>&index
    attr.value = <uint64_t>&value
    attr.flags = BPF_ANY
    if _bpf(BPF_MAP_UPDATE_ELEM, &attr) < 0:
        err = errno
        raise OSError(err, f"socket {sock_fd} into the reuseport array: {_os.strerror(err)}"
                           " (is it a listening SO_REUSEPORT socket?)")
    return 0


# -- the program --------------------------------------------------------------------------------------

def _alu64_reg(op, dst, src):
    return (BPF_ALU64 | op | BPF_X, dst, src, 0, 0)


def _alu64_imm(op, dst, imm):
    return (BPF_ALU64 | op | BPF_K, dst, 0, 0, imm)


def _load(size, dst, src, off):
    return (BPF_LDX | size | BPF_MEM, dst, src, off, 0)


def _store(size, dst, off, src):
    return (BPF_STX | size | BPF_MEM, dst, src, off, 0)


def _map_fd(dst, fd):
    """A 64-bit immediate load of a map: two instruction slots."""
    return [(BPF_LD | BPF_DW | BPF_IMM, dst, BPF_PSEUDO_MAP_FD, 0, fd), (0, 0, 0, 0, 0)]


def _jump(op, dst, label, imm=0, src=None):
    """A conditional jump to `label` (resolved in _assemble); src=None compares with imm."""
    return ("jump", BPF_JMP | op | (BPF_K if src is None else BPF_X), dst, src or 0, label, imm)


def _call(helper):
    return (BPF_JMP | BPF_CALL, 0, 0, 0, helper)


def program(int workers, int load_fd, int sock_fd):
    """The instructions of the least-loaded program for `workers` sockets, as (code, dst, src, off, imm)
    tuples. The loop over the workers is unrolled, and each candidate is the single number
    load << INDEX_BITS | index, so the minimum is both the least load and, among equals, the lowest
    index. The index is read from the table (LoadTable stores each worker's own), not from the code: a
    constant would let the verifier tell every path apart, and its work would grow with n squared.
    Registers: r6 context, r7 the running minimum; stack -4 the key being read, -8 the chosen key."""
    if not 2 <= workers <= MAX_WORKERS:
        raise ValueError(f"{workers} workers: the program balances 2..{MAX_WORKERS}")
    R0, R1, R2, R3, R4, R6, R7, FP = 0, 1, 2, 3, 4, 6, 7, 10
    code = [
        _alu64_reg(BPF_MOV, R6, R1),
        _alu64_imm(BPF_MOV, R7, -1),                             # no candidate yet: u64 max
    ]
    for index in range(workers):
        code += [
            (BPF_ST | BPF_W | BPF_MEM, FP, 0, -4, index),
            _alu64_reg(BPF_MOV, R2, FP),
            _alu64_imm(BPF_ADD, R2, -4),
            *_map_fd(R1, load_fd),
            _call(BPF_FUNC_map_lookup_elem),                     # &load[index]
            _jump(BPF_JEQ, R0, f"next{index}"),
            _load(BPF_DW, R1, R0, 0),                            # load[index]
            _alu64_imm(BPF_LSH, R1, INDEX_BITS),
            _load(BPF_DW, R2, R0, 8),                            # index, as the table stores it
            _alu64_imm(BPF_AND, R2, (1 << INDEX_BITS) - 1),
            _alu64_reg(BPF_OR, R1, R2),
            _jump(BPF_JGE, R1, f"next{index}", src=R7),
            _alu64_reg(BPF_MOV, R7, R1),
            ("label", f"next{index}"),
        ]
    code += [
        _jump(BPF_JEQ, R7, "pass", imm=-1),                      # no load readable: the kernel's hash
        _alu64_imm(BPF_AND, R7, (1 << INDEX_BITS) - 1),
        _store(BPF_W, FP, -8, R7),
        _alu64_reg(BPF_MOV, R1, R6),
        *_map_fd(R2, sock_fd),
        _alu64_reg(BPF_MOV, R3, FP),
        _alu64_imm(BPF_ADD, R3, -8),
        _alu64_imm(BPF_MOV, R4, 0),
        _call(BPF_FUNC_sk_select_reuseport),
        _jump(BPF_JNE, R0, "pass"),                              # not selected: the kernel's hash decides
        _alu64_reg(BPF_MOV, R2, FP),
        _alu64_imm(BPF_ADD, R2, -8),
        *_map_fd(R1, load_fd),
        _call(BPF_FUNC_map_lookup_elem),
        _jump(BPF_JEQ, R0, "pass"),
        _alu64_imm(BPF_MOV, R1, 1),
        (BPF_STX | BPF_DW | BPF_ATOMIC, R0, R1, 0, BPF_ADD),     # lock load[pick] += 1
        ("label", "pass"),
        _alu64_imm(BPF_MOV, R0, SK_PASS),
        (BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
    ]
    return _assemble(code)


def _assemble(code):
    labels = {}
    pc = 0
    for insn in code:
        if insn[0] == "label":
            labels[insn[1]] = pc
        else:
            pc += 1
    out = []
    for insn in code:
        if insn[0] == "label":
            continue
        if insn[0] == "jump":
            _, opcode, dst, src, label, imm = insn
            out.append((opcode, dst, src, labels[label] - (len(out) + 1), imm))
        else:
            out.append(insn)
    return out


cdef int _load_program(list insns) except -1:
    cdef bpf_attr attr
    cdef bpf_insn *code = <bpf_insn*>PyMem_Malloc(len(insns) * sizeof(bpf_insn))
    cdef char *log = <char*>PyMem_Malloc(VERIFIER_LOG_SIZE)
    cdef bytes license = b"GPL"
    cdef int fd, i
    if code == NULL or log == NULL:
        PyMem_Free(code)
        PyMem_Free(log)
        raise MemoryError()
    try:
        memset(code, 0, len(insns) * sizeof(bpf_insn))
        for i, (opcode, dst, src, off, imm) in enumerate(insns):
            code[i].code = opcode
            code[i].dst_reg = dst
            code[i].src_reg = src
            code[i].off = off
            code[i].imm = imm
        # Without a log first: a log buffer the verifier fills up fails the load (ENOSPC). Only when the
        # program is refused is it loaded again with the log, for the verifier's reason.
        for log_level in (0, 1):
            log[0] = 0
            memset(&attr, 0, sizeof(attr))
            attr.prog_type = BPF_PROG_TYPE_SK_REUSEPORT
            attr.expected_attach_type = BPF_SK_REUSEPORT_SELECT
            attr.insn_cnt = len(insns)
            attr.insns = <uint64_t>code
            attr.license = <uint64_t><char*>license
            if log_level:
                attr.log_level = log_level
                attr.log_size = VERIFIER_LOG_SIZE
                attr.log_buf = <uint64_t>log
            attr.prog_name[:13] = b"np_least_load"
            fd = <int>_bpf(BPF_PROG_LOAD, &attr)
            if fd >= 0:
                return fd
            err = errno
        # The verifier writes a NUL-terminated text; the buffer's bytes after it were never initialized.
        log[VERIFIER_LOG_SIZE - 1] = 0
        detail = log[:strlen(log)].decode("ascii", "replace").strip()
        raise OSError(err, f"bpf(BPF_PROG_LOAD): {_os.strerror(err)}; verifier: "
                           f"{detail[max(0, len(detail) - 2000):]}")
    finally:
        PyMem_Free(code)
        PyMem_Free(log)


cdef class LoadTable:
    """Per-worker load shared with the kernel program: an mmap of the BPF array, so a write is a store.

    Create it in the process that forks the workers, before forking: the mapping is MAP_SHARED, so the
    workers' writes reach the same array. LoadTable(n) builds the maps and, for n >= 2, loads the
    program; add_listener() puts worker i's listener into the program's array and attaches the program
    to the listener's SO_REUSEPORT group (again for every listener, so a group rebuilt after all its
    sockets closed gets it too). Raises OSError when the kernel refuses (no CAP_BPF/CAP_SYS_ADMIN, a
    kernel without SK_REUSEPORT programs); the listeners then keep the kernel's hash.
    """

    def __cinit__(self, int workers):
        self.load_map_fd = -1
        self.sock_map_fd = -1
        self.prog_fd = -1
        self.loads = NULL
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"{workers} workers: a load table has 1..{MAX_WORKERS}")
        self.workers = workers
        cdef long page = sysconf(_SC_PAGESIZE)
        cdef void *mapped
        try:
            self.load_map_fd = _create_map(BPF_MAP_TYPE_ARRAY, LOAD_VALUE_SIZE, workers, BPF_F_MMAPABLE,
                                           b"np_worker_load")
            self.mapped_size = ((workers * LOAD_VALUE_SIZE + page - 1) // page) * page
            mapped = mmap(NULL, self.mapped_size, PROT_READ | PROT_WRITE, MAP_SHARED, self.load_map_fd, 0)
            if mapped == MAP_FAILED:
                err = errno
                raise OSError(err, f"mmap of the load table: {_os.strerror(err)}")
            self.loads = <uint64_t*>mapped
            for index in range(workers):
                self.loads[index * LOAD_WORDS] = 0
                self.loads[index * LOAD_WORDS + 1] = index
            if workers >= 2:  # with one worker there is nothing to balance
                self.sock_map_fd = _create_map(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 8, workers, 0,
                                               b"np_listeners")
                self.prog_fd = _load_program(program(workers, self.load_map_fd, self.sock_map_fd))
        except BaseException:
            self.close()
            raise

    @property
    def balancing(self):
        """True when a program balances the listeners (two workers or more)."""
        return self.prog_fd >= 0

    def add_listener(self, int worker, int listen_fd):
        """Make `listen_fd` (a listening SO_REUSEPORT socket) worker `worker`'s listener, replacing a
        previous one (a dead worker's socket leaves the array when it closes), and attach the program
        to its group. Does nothing with one worker."""
        if not 0 <= worker < self.workers:
            raise IndexError(worker)
        if self.loads == NULL:
            raise ValueError("load table is closed")
        if self.prog_fd < 0:
            return
        _put_socket(self.sock_map_fd, worker, listen_fd)
        if setsockopt(listen_fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, &self.prog_fd,
                      sizeof(self.prog_fd)) < 0:
            err = errno
            raise OSError(err, f"SO_ATTACH_REUSEPORT_EBPF: {_os.strerror(err)}")

    def set(self, int worker, long long load):
        """Worker `worker`'s current load (its live connections); the program adds the connections the
        kernel hands it in the meantime. Out-of-range workers raise IndexError."""
        if self.loads == NULL:
            raise ValueError("load table is closed")
        if not 0 <= worker < self.workers:
            raise IndexError(worker)
        self.loads[worker * LOAD_WORDS] = <uint64_t>(load if load > 0 else 0)

    def get(self, int worker):
        if self.loads == NULL:
            raise ValueError("load table is closed")
        if not 0 <= worker < self.workers:
            raise IndexError(worker)
        return self.loads[worker * LOAD_WORDS]

    def snapshot(self):
        """Every worker's load, in worker order."""
        return [self.get(i) for i in range(self.workers)]

    def close(self):
        """Unmap the table and close the descriptors. An attached program stays (the kernel holds it and
        its maps) until the last socket of the group is closed."""
        if self.loads != NULL:
            munmap(self.loads, self.mapped_size)
            self.loads = NULL
        for fd in (self.prog_fd, self.sock_map_fd, self.load_map_fd):
            if fd >= 0:
                close(fd)
        self.prog_fd = self.sock_map_fd = self.load_map_fd = -1

    def __dealloc__(self):
        if self.loads != NULL:
            munmap(self.loads, self.mapped_size)
        for fd in (self.prog_fd, self.sock_map_fd, self.load_map_fd):
            if fd >= 0:
                close(fd)


def attach_least_loaded(listen_fds):
    """Balance new connections over the SO_REUSEPORT listeners `listen_fds` (all bound to one address,
    listening; index i is worker i) by load, and return the LoadTable the workers update."""
    if not isinstance(listen_fds, Sequence) or not listen_fds:
        raise ValueError("attach_least_loaded needs the listeners' descriptors, one per worker")
    cdef LoadTable table = LoadTable(len(listen_fds))
    try:
        for index, fd in enumerate(listen_fds):
            table.add_listener(index, fd)
    except BaseException:
        table.close()
        raise
    return table
