# cython: language_level=3
"""C declarations for nodeproxy._reuseport: the bpf(2) syscall, its attribute union and instruction
format (linux/bpf.h), and the socket option that attaches a program to a SO_REUSEPORT group."""

from libc.stdint cimport uint8_t, int16_t, int32_t, uint32_t, uint64_t


cdef extern from "<linux/bpf.h>" nogil:
    # One BPF instruction; dst_reg and src_reg are 4-bit fields.
    struct bpf_insn:
        uint8_t code
        uint8_t dst_reg
        uint8_t src_reg
        int16_t off
        int32_t imm

    # Only the members of the anonymous structs this module sets (C reaches them directly).
    union bpf_attr:
        uint32_t map_type
        uint32_t key_size
        uint32_t value_size
        uint32_t max_entries
        uint32_t map_flags
        char map_name[16]
        uint32_t map_fd
        uint64_t key
        uint64_t value
        uint64_t flags
        uint32_t prog_type
        uint32_t insn_cnt
        uint64_t insns
        uint64_t license
        uint32_t log_level
        uint32_t log_size
        uint64_t log_buf
        char prog_name[16]
        uint32_t expected_attach_type

    struct sk_reuseport_md:
        uint32_t hash

    enum:
        BPF_MAP_CREATE
        BPF_MAP_UPDATE_ELEM
        BPF_PROG_LOAD
        BPF_MAP_TYPE_ARRAY
        BPF_MAP_TYPE_REUSEPORT_SOCKARRAY
        BPF_PROG_TYPE_SK_REUSEPORT
        BPF_SK_REUSEPORT_SELECT
        BPF_F_MMAPABLE
        BPF_ANY
        BPF_PSEUDO_MAP_FD
        SK_PASS
        BPF_FUNC_map_lookup_elem
        BPF_FUNC_sk_select_reuseport
        # instruction classes, sizes, modes, operations, sources (linux/bpf_common.h)
        BPF_LD
        BPF_LDX
        BPF_ST
        BPF_STX
        BPF_ALU64
        BPF_JMP
        BPF_W
        BPF_DW
        BPF_IMM
        BPF_MEM
        BPF_ATOMIC
        BPF_ADD
        BPF_RSH
        BPF_LSH
        BPF_OR
        BPF_AND
        BPF_MOD
        BPF_MOV
        BPF_K
        BPF_X
        BPF_JA
        BPF_JEQ
        BPF_JGE
        BPF_JLT
        BPF_JNE
        BPF_CALL
        BPF_EXIT


cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_bpf


cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)
    int close(int fd)
    long sysconf(int name)
    enum:
        _SC_PAGESIZE


cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED


cdef extern from "<sys/socket.h>" nogil:
    int setsockopt(int fd, int level, int name, const void *value, unsigned int length)
    enum:
        SOL_SOCKET


cdef extern from "<errno.h>" nogil:
    int errno


cdef extern from *:
    """
    #include <stddef.h>
    #include <linux/bpf.h>
    #ifndef SO_ATTACH_REUSEPORT_EBPF
    #define SO_ATTACH_REUSEPORT_EBPF 52
    #endif
    #define NP_HASH_OFFSET ((int)offsetof(struct sk_reuseport_md, hash))
    """
    enum:
        SO_ATTACH_REUSEPORT_EBPF
        NP_HASH_OFFSET


cdef enum:
    # Per worker two u64: its load, and its own index (the program reads the index from the map rather
    # than from its code, so the verifier sees an unknown value and prunes: linear, not quadratic, work).
    LOAD_VALUE_SIZE = 16
    LOAD_WORDS = 2
    VERIFIER_LOG_SIZE = 65536
    INDEX_BITS = 8        # a candidate is load << INDEX_BITS | index
    MAX_WORKERS = 256     # 1 << INDEX_BITS (relay.threads allows 64)


cdef class LoadTable:
    cdef readonly int workers
    cdef int load_map_fd
    cdef int sock_map_fd
    cdef int prog_fd
    cdef uint64_t *loads
    cdef size_t mapped_size
