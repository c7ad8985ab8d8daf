/*
 * decode.h: the faulting instruction as the supervisor sees it, and its
 * emulation. Both are the shared x86 core's (tlslab/x86/_core.c, whose
 * specification is tlslab.x86): decode.c only converts between the ptrace
 * registers and the core's, and gives tc_emulate memory callbacks that apply
 * the supervisor's safety checks and reach the tracee's memory.
 */
#ifndef TLSLAB_SUPERVISOR_DECODE_H
#define TLSLAB_SUPERVISOR_DECODE_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/user.h>

#include "_core.h"

/* insn.seg: no segment override prefix (else the override's TC_ES..TC_GS) */
#define SEG_NONE -1

/* A faulting instruction. When the core decodes it (has_mem) it can be
 * emulated, and the access's offset and size are known; otherwise miss says
 * what it is (the step fallback runs it) and only seg is known. */
struct insn {
    tc_insn core;   /* tc_decode's record, valid when has_mem */
    int has_mem;    /* tc_decode said TC_DECODE_OK */
    int seg;        /* the segment override prefix: TC_FS, TC_GS, another TC_*, or SEG_NONE */
    uint32_t off;   /* the memory operand's offset (tc_effective_offset, registers before the instruction) */
    uint32_t size;  /* bytes accessed there (core.memory_size) */
    int len;        /* length in bytes, 0: unknown */
    char miss[32];  /* why the core does not emulate it ("": it does) */
};

/* an emulated access: the guest's task, the faulting segment register and
 * the descriptor the guest asked for there (the access must fit it), the
 * hypervisor start (no access through it reaches it); why: the reason when
 * emulate refuses */
struct ctx {
    pid_t tid;
    int seg;
    tc_descriptor requested;
    uint32_t hv_start;
    char why[160];
};

/* Decode with the core (n bytes at b) and compute the offset from regs. */
void decode(const uint8_t *b, int n, const struct user_regs_struct *r, struct insn *in);
/* Emulate a decoded instruction (in->has_mem) with the core: 0 done
 * (registers, EFLAGS and EIP updated in r), -1 refused (c->why: deliver SIGSEGV). */
int emulate(struct ctx *c, const struct insn *in, struct user_regs_struct *r);
/* The ptrace registers as the core's (eax..edi, eip, eflags). */
void core_regs(const struct user_regs_struct *r, tc_regs *out);

/* The legacy prefixes in front of code[0..n) (at most 14): how many; the
 * last repeat prefix (0xF2, 0xF3, or 0), an address-size prefix (0x67) and a
 * lock prefix (0xF0) seen. For the instructions the core does not decode
 * that the supervisor must recognise: cpuid (cpuid.c), repeated string
 * instructions (rate.c). */
struct prefixes { int count, rep, addr16, lock; };
struct prefixes legacy_prefixes(const uint8_t *code, int n);

#endif
