/*
 * tlslab x86 decode-ahead: a decoder for every instruction tlslab.x86.decode
 * decodes (not only the fs/gs forms the core emulates), and the walk of
 * tlslab.x86.ahead over it. The Python is the specification; the tables are
 * generated from it (_optable.h, tlslab/x86/optable.py), and
 * tests/test_ahead_differential.py holds decoder and walk to exact agreement.
 *
 * Why in C: a walk decodes a few dozen instructions per fault, and the
 * workloads that matter take hundreds of thousands of faults; and a
 * hypervisor would run it in its #GP handler, so its price per decoded
 * instruction is a measurement of native code (benchmarks/lookahead_price.py).
 */
#ifndef TLSLAB_X86_AHEAD_H
#define TLSLAB_X86_AHEAD_H

#include "_core.h"

typedef struct tc_opentry {
    uint16_t mn;       /* enum tc_mnemonic (_optable.h); 0: no instruction */
    uint8_t nops;
    char ops[3][4];    /* operand codes as in tlslab.x86.opcodes ("Ev", "Ibs", "eAX") */
    /* derived from the codes by the Python decoder's functions (tlslab/x86/optable.py) */
    char kind[3];      /* the code's first letter */
    char letter[3];    /* its size letter (b w d q v z p x), 0: none */
    uint8_t special[3]; /* 1 AL, 2 eAX, 3 Ibs, 4 Sw, 5 Ap, 0: by kind and size */
    uint8_t has_modrm, memory_only;
    int8_t rm_op, mem_op; /* the operand naming ModRM r/m (E/M), memory (E/M/O/X/Y); -1: none */
    uint8_t string, branch;
    uint8_t operand_size32, operand_size16; /* decode._operand_size without / with the 66 prefix */
} tc_opentry;

/* A memory operand (decode.MemoryOperand). */
typedef struct tc_mem {
    uint8_t present;
    uint8_t segment;        /* enum tc_segment used: the override, else the default */
    uint8_t overridden;
    uint8_t address_size;   /* 16 or 32 */
    int8_t base, index;     /* register numbers (16-bit ones with 16-bit addressing), -1: none */
    uint8_t scale;
    int32_t displacement;
} tc_mem;

/* A register operand: kind 0 none, 1/2/4 a general register of that many bytes
 * (number in encoding order: al..bh, ax..di, eax..edi), 8 a segment register. */
enum { TC_REG_NONE = 0, TC_REG_SEGMENT = 8 };

typedef struct tc_full_insn {
    uint32_t address;
    uint32_t opcode;           /* 0x8b, 0x0fb6, 0x0f38xx */
    uint32_t immediate, immediate2, branch_target;
    uint8_t has_immediate, has_immediate2, has_branch_target;
    uint8_t length;
    uint16_t mn;               /* enum tc_mnemonic, spelled as decode spells it */
    uint8_t operand_size;      /* 1, 2 or 4 */
    uint8_t memory_size;       /* bytes accessed at mem, 0: none / unknown */
    uint8_t reg_kind, reg_num;
    uint8_t rm_kind, rm_num;
    uint8_t is_string;
    const tc_opentry *entry;   /* operand codes */
    tc_mem mem, mem2;
} tc_full_insn;

/* Decode one instruction at `address` from code[0..n) (at most 15 bytes looked at).
 * 0: decoded; otherwise a reason decode.DecodeError would give (enum tc_decode_status:
 * truncated, too long, invalid; unsupported for an opcode no table has). */
int tc_decode_full(const uint8_t *code, size_t n, uint32_t address, tc_full_insn *out);

const char *tc_mnemonic_name(uint16_t mn);

/* What the walk may read of the guest: code (up to n bytes of executable code
 * at address, copied into buf; how many) and 32-bit words (1 and *value, or 0
 * when the word is not readable). Both must refuse anything at or above the
 * hypervisor's start. */
/* Decoded instructions by address, for as long as the caller knows the code has not changed (it drops
 * the cache when the host changes guest code or the mappings change). Direct-mapped. */
#define TC_DECODE_CACHE_SLOTS 1024u
typedef struct tc_decode_cache {
    struct tc_decode_slot {
        tc_full_insn insn;
        uint32_t valid;
    } slots[TC_DECODE_CACHE_SLOTS];
    uint64_t hits, misses;
} tc_decode_cache;

size_t tc_decode_cache_size(void);   /* allocate zeroed: an empty cache */
void tc_decode_cache_stats(const tc_decode_cache *cache, uint64_t *hits, uint64_t *misses);

/* Walks by site and sign, each with what it read (the registers it used at their fault-time value, the
 * guest words): a later fault there whose inputs all read the same gets the same answer without a walk.
 * Keyed by threshold and budget too; valid while the code and mappings do not change (as the decode cache:
 * the owner drops both when the host changes code or the mappings change; a guest storing into its own
 * code is not seen, and an answer may then be stale: a prediction, never a correctness matter).
 * Direct-mapped; a walk that read more than TC_MEMO_WORDS words, or met code that did not decode, is not
 * kept. */
#define TC_MEMO_SLOTS 1024u
#define TC_MEMO_WORDS 16u
struct tc_memo_word { uint32_t address, value, known; };
struct tc_memo_entry {
    uint32_t eip, walked, valid, reg_mask, nwords, budget;
    int32_t sign, verdict;
    double threshold;
    uint32_t regs[8];
    struct tc_memo_word words[TC_MEMO_WORDS];
};
typedef struct tc_walk_memo {
    struct tc_memo_entry slots[TC_MEMO_SLOTS];
    uint64_t hits, misses;
} tc_walk_memo;

size_t tc_walk_memo_size(void);      /* allocate zeroed: an empty memo */
void tc_walk_memo_stats(const tc_walk_memo *memo, uint64_t *hits, uint64_t *misses);

typedef struct tc_guest_reader {
    size_t (*code)(void *ctx, uint32_t address, uint8_t *buf, size_t n);
    int (*word)(void *ctx, uint32_t address, uint32_t *value);
    void *ctx;
    tc_decode_cache *cache;    /* NULL: decode every time */
    tc_walk_memo *memo;        /* NULL: walk every time */
} tc_guest_reader;

enum tc_ahead_verdict { TC_AHEAD_UNKNOWN = 0, TC_AHEAD_LONG = 1, TC_AHEAD_SHORT = 2, TC_AHEAD_NO_MEMORY = -1 };

/* ahead.walk from the faulting instruction at regs->eip, whose %gs offset has
 * sign `sign` (+1/-1): the verdict, and in *walked the instructions decoded
 * ahead; *reused 1 when the reader's memo gave it (then nothing was decoded).
 * TC_AHEAD_NO_MEMORY: an allocation failed (nothing is known). */
int tc_lookahead(const tc_guest_reader *guest, const tc_regs *regs, int sign, double threshold,
                 uint32_t budget, uint32_t *walked, uint32_t *reused);

/* A reader over host buffers: the model's guest memory is a set of regions,
 * each a host buffer mapped at a guest address with page rights. */
typedef struct tc_region {
    uint32_t start, size;
    uint32_t prot;             /* PROT_READ 1 | PROT_WRITE 2 | PROT_EXEC 4 */
    const uint8_t *host;
} tc_region;

typedef struct tc_region_map {
    const tc_region *regions;  /* sorted by start, not overlapping */
    uint32_t count;
    uint64_t below;            /* the hypervisor's start: nothing at or above it is read (2^32: none) */
    uint32_t hint;             /* the walk's cache: the region it found last */
    tc_decode_cache *cache;    /* NULL: decode every time */
    tc_walk_memo *memo;        /* NULL: walk every time */
} tc_region_map;

size_t tc_regions_code(void *map, uint32_t address, uint8_t *buf, size_t n);
int tc_regions_word(void *map, uint32_t address, uint32_t *value);

/* tc_lookahead over a region map (the readers above). */
int tc_lookahead_regions(const tc_region_map *map, const tc_regs *regs, int sign, double threshold,
                         uint32_t budget, uint32_t *walked, uint32_t *reused);

/* tc_lookahead_regions, timed (CLOCK_MONOTONIC): *elapsed_ns, clock reading included. */
int tc_lookahead_regions_timed(const tc_region_map *map, const tc_regs *regs, int sign, double threshold,
                               uint32_t budget, uint32_t *walked, uint32_t *reused, uint64_t *elapsed_ns);
/* The median nanoseconds two back-to-back clock readings take (to subtract from the above). */
double tc_clock_overhead_ns(void);

/* The decoder alone, timed: a linear sweep over code[0..n) `rounds` times; ns for *decodes decodes. */
uint64_t tc_decode_sweep_ns(const uint8_t *code, size_t n, uint32_t rounds, uint64_t *decodes);

#endif
