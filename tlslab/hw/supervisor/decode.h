/*
 * decode.h: the supervisor's instruction decoder and emulator (decode.c).
 * Everything the supervisor knows about x86 instruction forms is behind this
 * header, so that it can be replaced in one place by the shared core
 * (tlslab/x86/_core.c, issue 14).
 */
#ifndef TLSLAB_SUPERVISOR_DECODE_H
#define TLSLAB_SUPERVISOR_DECODE_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/user.h>

struct udesc;

enum { K_NONE, K_MOV_LOAD, K_MOV_STORE, K_MOV_IMM, K_MOVZX, K_MOVSX, K_ALU_MR, K_ALU_RM, K_ALU_MI,
       K_TEST_MR, K_TEST_MI, K_INC, K_DEC, K_PUSH, K_POP, K_CALL, K_JMP, K_XCHG, K_CMPXCHG, K_XADD };

/* insn.seg: the segment override prefix (the segment register number for fs and gs) */
#define SEG_NONE -1  /* none */
#define SEG_OTHER -2 /* es, cs, ss or ds */
#define SEG_FS 4
#define SEG_GS 5

struct insn {
    int len, seg, kind, alu, size, srcsize, reg, has_mem, known_len, lock, rep, addr16, opsize16;
    uint32_t off, imm;
    int uses_esp_after_pop;
    char miss[32];
};

/* an emulated access: the guest's task, the segment as the guest asked for it
 * (the access must fit it) and the hypervisor start (no access reaches it);
 * why: the reason when emulate refuses */
struct ctx {
    pid_t tid;
    const struct udesc *requested;
    uint32_t hv_start;
    int refused;
    char why[160];
};

/* Decode prefixes, opcode, ModRM/SIB/disp, immediate; compute the offset from regs. */
void decode(const uint8_t *b, int n, const struct user_regs_struct *r, struct insn *in);
/* returns 0 done, -1 refused (deliver SIGSEGV); registers updated in r */
int emulate(struct ctx *c, const struct insn *in, struct user_regs_struct *r);

#endif
