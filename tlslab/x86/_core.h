/* tlslab x86 core: the per-fault work of both backends, in C.
 *
 * The segment check, Xen's truncate/flip rule, a decoder for the fs/gs
 * instruction forms a TLS fault comes from, and their emulation. Pure C99:
 * no globals, no ptrace, no Unicorn, no allocation; every function is a
 * function of its arguments, so the Unicorn fast path and the ptrace
 * supervisor can both call it from their fault handlers.
 *
 * tlslab.x86 (Python) is the specification. Each function names the Python
 * function it mirrors, and tests/test_core_differential.py runs both over
 * generated cases and asserts they agree exactly: where they differ, the C is
 * wrong.
 */
#ifndef TLSLAB_X86_CORE_H
#define TLSLAB_X86_CORE_H

#include <stddef.h>
#include <stdint.h>

/* Segment register numbers in encoding order (ModRM.reg of mov Sw). */
enum tc_segment { TC_ES = 0, TC_CS = 1, TC_SS = 2, TC_DS = 3, TC_FS = 4, TC_GS = 5 };

/* ------------------------------------------------------------ descriptors */

/* One code/data descriptor, field by field (tlslab.x86.descriptor.SegmentDescriptor).
 * Flags are 0 or 1. As in the SDM, rw means writable for data and readable for
 * code, dc means expand-down for data and conforming for code. */
typedef struct tc_descriptor {
    uint32_t base;
    uint32_t limit; /* the raw 20-bit field; G=1 scales it by 4 KiB (tc_effective_limit) */
    uint8_t accessed, rw, dc, executable, s, dpl, present, avl, l, db, granularity;
} tc_descriptor;

/* The 64-bit value the CPU reads from a GDT/LDT, and back (exact for all values). */
uint64_t tc_descriptor_encode(const tc_descriptor *d);
void tc_descriptor_decode(uint64_t raw, tc_descriptor *out);
/* Byte limit the CPU checks: (limit << 12) | 0xFFF with G=1, else limit. */
uint32_t tc_effective_limit(const tc_descriptor *d);

/* Verdict of tc_check, in segcheck.AccessFault's order; 0 = allowed. */
enum tc_access {
    TC_ACCESS_ALLOWED = 0,
    TC_ACCESS_NOT_PRESENT = 1,
    TC_ACCESS_NOT_DATA = 2,         /* system segment or execute-only code */
    TC_ACCESS_NOT_WRITABLE = 3,
    TC_ACCESS_BEYOND_LIMIT = 4,     /* expand-up: last byte beyond the limit (or wraps) */
    TC_ACCESS_AT_OR_BELOW_LIMIT = 5, /* expand-down: offset at or below the limit */
    TC_ACCESS_ABOVE_UPPER_BOUND = 6, /* expand-down: last byte above 0xFFFF/0xFFFFFFFF (or wraps) */
    TC_ACCESS_BAD_SIZE = -1         /* size 0: not an access (Python raises ValueError) */
};

/* segcheck.check_data_access: may a size-byte access at offset go through d? */
int tc_check(const tc_descriptor *d, uint32_t offset, uint32_t size, int write);

/* xen.truncate: the descriptor Xen installs when a guest asks for *d. */
void tc_truncate(const tc_descriptor *d, uint32_t hypervisor_start, tc_descriptor *out);

/* xen.flip (seg_fixup): 1 and the descriptor to install after a #GP at offset,
 * or 0 when the fault is genuine (Python's None). size 0 is Python's
 * size=None (no check that the flipped segment admits the whole access). */
int tc_flip(const tc_descriptor *d, uint32_t offset, uint32_t size, uint32_t hypervisor_start,
            tc_descriptor *out);

/* ---------------------------------------------------------------- decoder */

enum tc_decode_status {
    TC_DECODE_OK = 0,          /* a form the core decodes and emulates */
    TC_DECODE_TRUNCATED = 1,   /* the form needs more than the n bytes given */
    TC_DECODE_TOO_LONG = 2,    /* longer than 15 bytes (#GP) */
    TC_DECODE_INVALID = 3,     /* #UD: LOCK on a form that does not take it */
    TC_DECODE_UNSUPPORTED = 4  /* not a form the core handles (it may be valid x86) */
};

/* The decoders' byte cursor (this core's tc_decode and _ahead.c's tc_decode_full; decode._Reader):
 * running past 15 bytes is #GP, past the n bytes given is truncation. */
typedef struct tc_cursor {
    const uint8_t *code;
    size_t n, pos;
} tc_cursor;

/* 0 when count more bytes may be read, else TC_DECODE_TOO_LONG / TC_DECODE_TRUNCATED */
static inline int tc_need(const tc_cursor *c, size_t count) {
    if (c->pos + count > 15) return TC_DECODE_TOO_LONG;   /* 15 bytes: the longest instruction */
    if (c->pos + count > c->n) return TC_DECODE_TRUNCATED;
    return TC_DECODE_OK;
}

/* little-endian unsigned of count (1, 2 or 4) bytes; tc_need() first */
static inline uint32_t tc_take(tc_cursor *c, size_t count) {
    uint32_t value = 0;
    for (size_t i = 0; i < count; i++) value |= (uint32_t)c->code[c->pos + i] << (8 * i);
    c->pos += count;
    return value;
}

enum tc_kind {
    TC_KIND_NONE = 0,
    TC_KIND_MOV, TC_KIND_MOVZX, TC_KIND_MOVSX,
    TC_KIND_ALU,     /* alu_op says which */
    TC_KIND_TEST, TC_KIND_INC, TC_KIND_DEC, TC_KIND_NOT, TC_KIND_NEG,
    TC_KIND_XCHG, TC_KIND_CMPXCHG, TC_KIND_XADD,
    TC_KIND_PUSH, TC_KIND_POP, TC_KIND_CALL, TC_KIND_JMP,
    TC_KIND_COUNT
};

/* The eight classic ALU operations, in encoding order (opcode >> 3, group /reg). */
enum tc_alu_op { TC_ADD, TC_OR, TC_ADC, TC_SBB, TC_AND, TC_SUB, TC_XOR, TC_CMP };

/* Operand roles, destination first. The memory operand is always the
 * instruction's one explicit one (ModRM r/m, or moffs for A0-A3). */
enum tc_form {
    TC_FORM_MEM_REG = 0, /* E, G (moffs store: O, accumulator) */
    TC_FORM_REG_MEM = 1, /* G, E (moffs load: accumulator, O; movzx/movsx) */
    TC_FORM_MEM_IMM = 2, /* E, I */
    TC_FORM_MEM = 3      /* E alone (inc dec not neg push pop call jmp) */
};

typedef struct tc_insn {
    uint32_t immediate;    /* as used: Ibs sign-extended then masked to operand_size */
    int32_t displacement;  /* sign-extended disp8/disp32, or the moffs */
    uint16_t opcode;       /* 0x8b, or 0x0fb6 for two-byte opcodes (decode.Instruction.opcode) */
    uint8_t length;        /* bytes, prefixes included */
    uint8_t prefix_count;
    uint8_t kind;          /* enum tc_kind */
    uint8_t alu_op;        /* enum tc_alu_op, for TC_KIND_ALU */
    uint8_t form;          /* enum tc_form */
    uint8_t operand_size;  /* 1, 2 or 4 (decode.Instruction.operand_size) */
    uint8_t memory_size;   /* bytes accessed at the memory operand (movzx: 1 or 2) */
    uint8_t segment;       /* enum tc_segment actually used: the override, else ds or ss */
    uint8_t segment_overridden;
    uint8_t operand_size_override, lock, rep, repne; /* 66, F0, F3, F2 */
    uint8_t has_modrm, modrm, has_sib, sib;
    int8_t base;           /* register number 0-7 (eax..edi), -1: none */
    int8_t index;          /* register number 0-7, -1: none */
    uint8_t scale;         /* 1, 2, 4, 8 (1 without an index) */
    uint8_t reg;           /* the G register (ModRM.reg), 0 (the accumulator) for moffs */
    uint8_t has_immediate;
    /* What the Unicorn fast path needs to know before settling a fault in C: */
    uint8_t only_explicit_memory; /* every access goes through the memory operand (no stack) */
    uint8_t reads, writes;        /* memory accesses tc_emulate performs, stack included */
} tc_insn;

/* Decode one instruction from code[0..n); never reads code[n] or beyond,
 * never looks past 15 bytes. On TC_DECODE_OK *out is filled; otherwise
 * out->kind is TC_KIND_NONE and nothing else is promised. */
int tc_decode(const uint8_t *code, size_t n, tc_insn *out);

/* The mnemonic tlslab.x86.decode uses for a decoded instruction ("add", "movzx"...). */
const char *tc_mnemonic(const tc_insn *insn);

/* ------------------------------------------------------------- emulation */

/* The 32-bit register file: gpr in encoding order eax ecx edx ebx esp ebp esi edi. */
typedef struct tc_regs {
    uint32_t gpr[8];
    uint32_t eip;
    uint32_t eflags;
} tc_regs;

/* semantics.effective_offset: base + index * scale + displacement, mod 2**32,
 * from the registers as they are before the instruction. */
uint32_t tc_effective_offset(const tc_insn *insn, const tc_regs *regs);

/* Memory as the caller sees it: segment number and offset, size 1, 2 or 4,
 * value little-endian in the low bytes. Return 0 when done, anything else to
 * refuse (a limit, a page fault, an unsafe linear address: the caller's
 * checks). Stack accesses use TC_SS and ESP. */
typedef struct tc_memory_ops {
    int (*read)(void *ctx, int segment, uint32_t offset, uint32_t size, uint32_t *value);
    int (*write)(void *ctx, int segment, uint32_t offset, uint32_t size, uint32_t value);
} tc_memory_ops;

enum tc_emulate_status {
    TC_EMULATE_OK = 0,          /* registers, EFLAGS and EIP updated */
    TC_EMULATE_REFUSED = 1,     /* a callback refused: *regs untouched */
    TC_EMULATE_UNSUPPORTED = 2  /* not a decoded instruction: nothing done */
};

/* semantics.execute: perform insn, reads first and at most one write, then
 * registers; EIP advanced (or set by call/jmp). Accesses are made in the
 * order the Python makes them. */
int tc_emulate(const tc_insn *insn, tc_regs *regs, const tc_memory_ops *mem, void *ctx);

/* EFLAGS bits the emulation computes. */
#define TC_CF 0x001u
#define TC_PF 0x004u
#define TC_AF 0x010u
#define TC_ZF 0x040u
#define TC_SF 0x080u
#define TC_OF 0x800u
#define TC_STATUS_FLAGS (TC_CF | TC_PF | TC_AF | TC_ZF | TC_SF | TC_OF)

/* ------------------------------------------------------------------ layout */

/* Offsets and sizes of every public struct field (field NULL: the struct's
 * sizeof), so a binding can check its mirrors when it loads the library. */
typedef struct tc_field_layout {
    const char *structure;
    const char *field;
    uint32_t offset;
    uint32_t size;
} tc_field_layout;

const tc_field_layout *tc_layout(uint32_t *count);

#endif
