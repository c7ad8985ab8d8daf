/*
 * decode.c: the faulting instruction, decoded and emulated by the shared x86
 * core (tlslab/x86/_core.h: tc_decode, tc_effective_offset, tc_emulate).
 * What is here is the supervisor's side of that call: the ptrace registers
 * as the core's struct tc_regs and back, the memory callbacks (the access
 * must fit the descriptor the guest asked for and stay below the hypervisor;
 * the bytes move with process_vm_readv/writev), and, for an instruction the
 * core does not decode, its segment override and a name for the miss report.
 */
#include "supervisor.h"

static const char *const SEG_NAMES[6] = {"es", "cs", "ss", "ds", "fs", "gs"};

/* struct user_regs_struct's general registers in the core's order (eax..edi) */
static const size_t GPR_OFFSET[8] = {
    offsetof(struct user_regs_struct, rax), offsetof(struct user_regs_struct, rcx),
    offsetof(struct user_regs_struct, rdx), offsetof(struct user_regs_struct, rbx),
    offsetof(struct user_regs_struct, rsp), offsetof(struct user_regs_struct, rbp),
    offsetof(struct user_regs_struct, rsi), offsetof(struct user_regs_struct, rdi),
};

void core_regs(const struct user_regs_struct *r, tc_regs *out) {
    for (int i = 0; i < 8; i++)
        out->gpr[i] = (uint32_t)*(const unsigned long long *)((const char *)r + GPR_OFFSET[i]);
    out->eip = (uint32_t)r->rip;
    out->eflags = (uint32_t)r->eflags;
}

/* the registers the core changed (a 32-bit task: written zero-extended) */
static void from_core_regs(const tc_regs *in, struct user_regs_struct *r) {
    for (int i = 0; i < 8; i++) {
        unsigned long long *slot = (unsigned long long *)((char *)r + GPR_OFFSET[i]);
        if ((uint32_t)*slot != in->gpr[i]) *slot = in->gpr[i];
    }
    r->rip = in->eip;
    r->eflags = in->eflags;
}

/* An instruction the core does not decode: its segment override (the last
 * one wins, as in tc_decode) and what to call it in the miss report (the
 * opcode bytes, as "a4" or "0f 38"; "67 " first for 16-bit addressing). */
static void describe_miss(const uint8_t *b, int n, int status, struct insn *in) {
    int i = 0, addr16 = 0;
    for (; i < n && i < 15; i++) {
        switch (b[i]) {
        case 0x26: in->seg = TC_ES; continue;
        case 0x2E: in->seg = TC_CS; continue;
        case 0x36: in->seg = TC_SS; continue;
        case 0x3E: in->seg = TC_DS; continue;
        case 0x64: in->seg = TC_FS; continue;
        case 0x65: in->seg = TC_GS; continue;
        case 0x67: addr16 = 1; continue;
        case 0x66: case 0xF0: case 0xF2: case 0xF3: continue;
        }
        break;
    }
    if (status == TC_DECODE_TRUNCATED) snprintf(in->miss, sizeof in->miss, "truncated");
    else if (status == TC_DECODE_TOO_LONG) snprintf(in->miss, sizeof in->miss, "longer than 15 bytes");
    else if (i >= n) snprintf(in->miss, sizeof in->miss, "truncated");
    else if (b[i] == 0x0F && i + 1 < n)
        snprintf(in->miss, sizeof in->miss, "%s%s0f %02x", status == TC_DECODE_INVALID ? "lock " : "",
                 addr16 ? "67 " : "", b[i + 1]);
    else
        snprintf(in->miss, sizeof in->miss, "%s%s%02x", status == TC_DECODE_INVALID ? "lock " : "",
                 addr16 ? "67 " : "", b[i]);
}

void decode(const uint8_t *b, int n, const struct user_regs_struct *r, struct insn *in) {
    memset(in, 0, sizeof *in);
    in->seg = SEG_NONE;
    int status = tc_decode(b, n > 0 ? (size_t)n : 0, &in->core);
    if (status != TC_DECODE_OK) {
        describe_miss(b, n, status, in);
        return;
    }
    tc_regs regs;
    core_regs(r, &regs);
    in->has_mem = 1;
    in->seg = in->core.segment_overridden ? in->core.segment : SEG_NONE;
    in->off = tc_effective_offset(&in->core, &regs);
    in->size = in->core.memory_size;
    in->len = in->core.length;
}

/* The linear address of an access the core asks for, or -1 (c->why says
 * why). Through the faulting segment: the access must fit the descriptor
 * the guest asked for (tc_check) and end below the hypervisor. Through ss
 * (push, pop, call): the task's own stack segment, Linux's flat
 * __USER32_DS, which is not truncated on this host (a native i386 stack
 * lies above the hypervisor start); the tracee's page tables judge it. */
static int linear_of(struct ctx *c, int segment, uint32_t off, uint32_t size, int write, uint32_t *linear) {
    if (segment == TC_SS) {
        *linear = off;
        return 0;
    }
    if (segment != c->seg) {
        snprintf(c->why, sizeof c->why, "access through %s, not the faulting segment",
                 segment >= 0 && segment < 6 ? SEG_NAMES[segment] : "?");
        return -1;
    }
    if (tc_check(&c->requested, off, size, write) != TC_ACCESS_ALLOWED) {
        snprintf(c->why, sizeof c->why, "offset %#x outside the requested segment", off);
        return -1;
    }
    uint64_t lin = ((uint64_t)c->requested.base + off) & 0xFFFFFFFFu;
    uint64_t last = lin + size - 1;
    if (last > 0xFFFFFFFFu || last >= c->hv_start) {
        snprintf(c->why, sizeof c->why, "DISALLOWING UNSAFE ACCESS to %#llx", (unsigned long long)lin);
        return -1;
    }
    *linear = (uint32_t)lin;
    return 0;
}

static int read_cb(void *p, int segment, uint32_t off, uint32_t size, uint32_t *value) {
    struct ctx *c = p;
    uint32_t lin;
    if (linear_of(c, segment, off, size, 0, &lin)) return -1;
    *value = 0;
    if (read_mem(c->tid, lin, value, size) < 0) {
        snprintf(c->why, sizeof c->why, "page fault reading %#x", lin);
        return -1;
    }
    return 0;
}

static int write_cb(void *p, int segment, uint32_t off, uint32_t size, uint32_t value) {
    struct ctx *c = p;
    uint32_t lin;
    if (linear_of(c, segment, off, size, 1, &lin)) return -1;
    if (write_mem(c->tid, lin, &value, size) < 0) {
        snprintf(c->why, sizeof c->why, "page fault writing %#x", lin);
        return -1;
    }
    return 0;
}

static const tc_memory_ops TRACEE_MEMORY = {read_cb, write_cb};

struct prefixes legacy_prefixes(const uint8_t *code, int n) {
    struct prefixes p = {0, 0, 0, 0};
    for (; p.count < n && p.count < 14; p.count++) {
        uint8_t b = code[p.count];
        if (b == 0xF3 || b == 0xF2) p.rep = b;
        else if (b == 0x67) p.addr16 = 1;
        else if (b == 0xF0) p.lock = 1;
        else if (!(b == 0x66 || b == 0x26 || b == 0x2E || b == 0x36 || b == 0x3E || b == 0x64 || b == 0x65))
            break;
    }
    return p;
}

int emulate(struct ctx *c, const struct insn *in, struct user_regs_struct *r) {
    if (!in->has_mem) return -1;
    tc_regs regs;
    core_regs(r, &regs);
    if (tc_emulate(&in->core, &regs, &TRACEE_MEMORY, c) != TC_EMULATE_OK) return -1;
    from_core_regs(&regs, r);
    return 0;
}
