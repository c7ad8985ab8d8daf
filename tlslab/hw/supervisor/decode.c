/*
 * decode.c: the decoder of the %fs/%gs instruction forms the supervisor
 * meets, ALU operations on the host CPU, and the emulator that performs an
 * access for the guest (process_vm_readv/writev) and updates its registers.
 * Kept together and behind decode.h so that the shared core
 * (tlslab/x86/_core.c, issue 14) can replace it in one place.
 */
#include "supervisor.h"

static uint32_t reg32(const struct user_regs_struct *r, int n) {
    switch (n & 7) {
    case 0: return (uint32_t)r->rax; case 1: return (uint32_t)r->rcx;
    case 2: return (uint32_t)r->rdx; case 3: return (uint32_t)r->rbx;
    case 4: return (uint32_t)r->rsp; case 5: return (uint32_t)r->rbp;
    case 6: return (uint32_t)r->rsi; default: return (uint32_t)r->rdi;
    }
}

static unsigned long long *regp(struct user_regs_struct *r, int n) {
    switch (n & 7) {
    case 0: return &r->rax; case 1: return &r->rcx; case 2: return &r->rdx; case 3: return &r->rbx;
    case 4: return &r->rsp; case 5: return &r->rbp; case 6: return &r->rsi; default: return &r->rdi;
    }
}

static uint32_t get_reg(const struct user_regs_struct *r, int n, int size) {
    if (size == 1) return n < 4 ? reg32(r, n) & 0xFF : (reg32(r, n - 4) >> 8) & 0xFF;
    if (size == 2) return reg32(r, n) & 0xFFFF;
    return reg32(r, n);
}

static void set_reg(struct user_regs_struct *r, int n, int size, uint32_t v) {
    if (size == 1) {
        unsigned long long *p = regp(r, n & 3);
        uint32_t cur = (uint32_t)*p;
        cur = n < 4 ? (cur & ~0xFFu) | (v & 0xFF) : (cur & ~0xFF00u) | ((v & 0xFF) << 8);
        *p = cur;
    } else if (size == 2) {
        unsigned long long *p = regp(r, n);
        *p = ((uint32_t)*p & ~0xFFFFu) | (v & 0xFFFF);
    } else {
        *regp(r, n) = v;
    }
}

/* one-byte opcodes with a ModRM byte (i386) */
static int has_modrm1(int op) {
    if (op < 0x40) return (op & 7) < 4;
    switch (op) {
    case 0x62: case 0x63: case 0x69: case 0x6B: case 0xC0: case 0xC1: case 0xC4: case 0xC5:
    case 0xC6: case 0xC7: case 0xD0: case 0xD1: case 0xD2: case 0xD3: case 0xF6: case 0xF7:
    case 0xFE: case 0xFF: return 1;
    }
    if (op >= 0x80 && op <= 0x8F) return 1;
    if (op >= 0xD8 && op <= 0xDF) return 1;
    return 0;
}

static int has_modrm2(int op) {
    if (op >= 0x10 && op <= 0x17) return 1;
    if (op >= 0x18 && op <= 0x1F) return 1;
    if (op >= 0x28 && op <= 0x2F) return 1;
    if (op >= 0x40 && op <= 0x7F) return op != 0x77;
    if (op >= 0x90 && op <= 0x9F) return 1;
    switch (op) {
    case 0x00: case 0x01: case 0x02: case 0x03: case 0xA3: case 0xA4: case 0xA5: case 0xAB: case 0xAC:
    case 0xAD: case 0xAE: case 0xAF: return 1;
    }
    if (op >= 0xB0 && op <= 0xC7) return 1;
    if (op >= 0xD0) return op != 0xFF;
    return 0;
}

void decode(const uint8_t *b, int n, const struct user_regs_struct *r, struct insn *in) {
    memset(in, 0, sizeof *in);
    in->seg = SEG_NONE;
    int i = 0;
    for (; i < n && i < 14; i++) {
        uint8_t p = b[i];
        if (p == 0x66) in->opsize16 = 1;
        else if (p == 0x67) in->addr16 = 1;
        else if (p == 0xF0) in->lock = 1;
        else if (p == 0xF2 || p == 0xF3) in->rep = p;
        else if (p == 0x26 || p == 0x2E || p == 0x36 || p == 0x3E) in->seg = SEG_OTHER;
        else if (p == 0x64) in->seg = SEG_FS;
        else if (p == 0x65) in->seg = SEG_GS;
        else break;
    }
    if (i >= n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
    int two = 0, op = b[i++];
    if (op == 0x0F) {
        if (i >= n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
        two = 1; op = b[i++];
        if (op == 0x38 || op == 0x3A) { snprintf(in->miss, sizeof in->miss, "0f %02x", op); return; }
    }
    int osz = in->opsize16 ? 2 : 4;
    int modrm = two ? has_modrm2(op) : has_modrm1(op);
    int mod = 0, reg = 0, rm = 0;
    if (!two && op >= 0xA0 && op <= 0xA3) { /* moffs */
        if (in->addr16) { snprintf(in->miss, sizeof in->miss, "67 %02x", op); return; }
        if (i + 4 > n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
        memcpy(&in->off, b + i, 4); i += 4;
        in->has_mem = 1;
        in->size = (op & 1) ? osz : 1;
        in->kind = op < 0xA2 ? K_MOV_LOAD : K_MOV_STORE;
        in->reg = 0;
        in->len = i; in->known_len = 1;
        return;
    }
    if (!modrm) { snprintf(in->miss, sizeof in->miss, two ? "0f %02x" : "%02x", op); return; }
    if (i >= n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
    uint8_t m = b[i++];
    mod = m >> 6; reg = (m >> 3) & 7; rm = m & 7;
    in->reg = reg;
    if (mod == 3) { snprintf(in->miss, sizeof in->miss, "%s%02x reg-form", two ? "0f " : "", op); return; }
    if (in->addr16) { snprintf(in->miss, sizeof in->miss, "67 %s%02x", two ? "0f " : "", op); return; }
    uint32_t ea = 0;
    if (rm == 4) {
        if (i >= n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
        uint8_t sib = b[i++];
        int sc = sib >> 6, idx = (sib >> 3) & 7, base = sib & 7;
        if (base == 5 && mod == 0) {
            if (i + 4 > n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
            uint32_t d; memcpy(&d, b + i, 4); i += 4; ea = d;
        } else {
            ea = reg32(r, base);
            if (base == 4 && !two && op == 0x8F) in->uses_esp_after_pop = 1;
        }
        if (idx != 4) ea += reg32(r, idx) << sc;
    } else if (rm == 5 && mod == 0) {
        if (i + 4 > n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
        uint32_t d; memcpy(&d, b + i, 4); i += 4; ea = d;
    } else {
        ea = reg32(r, rm);
        if (rm == 4 && !two && op == 0x8F) in->uses_esp_after_pop = 1;
    }
    if (mod == 1) {
        if (i + 1 > n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
        ea += (uint32_t)(int32_t)(int8_t)b[i++];
    } else if (mod == 2) {
        if (i + 4 > n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
        uint32_t d; memcpy(&d, b + i, 4); i += 4; ea += d;
    }
    in->off = ea;
    in->has_mem = 1;
    in->size = osz; /* default guess of the access size, refined below */

    /* immediates */
    int immsz = 0;
    if (!two) {
        if (op == 0x80 || op == 0x82 || op == 0x83 || op == 0xC6 || op == 0x6B || op == 0xC0 || op == 0xC1)
            immsz = 1;
        else if (op == 0x81 || op == 0xC7 || op == 0x69) immsz = osz;
        else if (op == 0xF6 && reg < 2) immsz = 1;
        else if (op == 0xF7 && reg < 2) immsz = osz;
    } else if ((op >= 0x70 && op <= 0x73) || op == 0xA4 || op == 0xAC || op == 0xBA || op == 0xC2 ||
               (op >= 0xC4 && op <= 0xC6)) {
        immsz = 1;
    }
    if (i + immsz > n) { snprintf(in->miss, sizeof in->miss, "truncated"); return; }
    if (immsz == 1) in->imm = (uint32_t)(int32_t)(int8_t)b[i];
    else if (immsz == 2) in->imm = (uint32_t)(b[i] | b[i + 1] << 8);
    else if (immsz == 4) memcpy(&in->imm, b + i, 4);
    i += immsz;
    in->len = i;
    in->known_len = 1;

    /* semantics we perform */
    if (!two) {
        if (op < 0x40 && (op & 7) < 4) {
            in->alu = op >> 3;
            in->size = (op & 1) ? osz : 1;
            in->kind = (op & 2) ? K_ALU_RM : K_ALU_MR;
            return;
        }
        switch (op) {
        case 0x80: case 0x81: case 0x82: case 0x83:
            in->alu = reg; in->size = (op == 0x81 || op == 0x83) ? osz : 1; in->kind = K_ALU_MI;
            if (op == 0x83 && osz == 2) in->imm &= 0xFFFF;
            return;
        case 0x84: case 0x85: in->size = (op & 1) ? osz : 1; in->kind = K_TEST_MR; return;
        case 0x86: case 0x87: in->size = (op & 1) ? osz : 1; in->kind = K_XCHG; return;
        case 0x88: case 0x89: in->size = (op & 1) ? osz : 1; in->kind = K_MOV_STORE; return;
        case 0x8A: case 0x8B: in->size = (op & 1) ? osz : 1; in->kind = K_MOV_LOAD; return;
        case 0x8F: if (reg == 0) { in->kind = K_POP; return; } break;
        case 0xC6: case 0xC7:
            if (reg == 0) { in->size = (op & 1) ? osz : 1; in->kind = K_MOV_IMM; return; }
            break;
        case 0xF6: case 0xF7:
            if (reg < 2) { in->size = (op & 1) ? osz : 1; in->kind = K_TEST_MI; return; }
            break;
        case 0xFE: case 0xFF:
            in->size = (op & 1) ? osz : 1;
            if (reg == 0) { in->kind = K_INC; return; }
            if (reg == 1) { in->kind = K_DEC; return; }
            if (op == 0xFF && reg == 2 && !in->opsize16) { in->kind = K_CALL; return; }
            if (op == 0xFF && reg == 4 && !in->opsize16) { in->kind = K_JMP; return; }
            if (op == 0xFF && reg == 6) { in->kind = K_PUSH; return; }
            break;
        }
        snprintf(in->miss, sizeof in->miss, "%02x /%d", op, reg);
        return;
    }
    switch (op) {
    case 0xB6: case 0xBE: in->srcsize = 1; in->size = 1; in->kind = op == 0xB6 ? K_MOVZX : K_MOVSX; return;
    case 0xB7: case 0xBF: in->srcsize = 2; in->size = 2; in->kind = op == 0xB7 ? K_MOVZX : K_MOVSX; return;
    case 0xB0: case 0xB1: in->size = (op & 1) ? osz : 1; in->kind = K_CMPXCHG; return;
    case 0xC0: case 0xC1: in->size = (op & 1) ? osz : 1; in->kind = K_XADD; return;
    }
    snprintf(in->miss, sizeof in->miss, "0f %02x", op);
}

/* ----------------------------------------------------- ALU on the host CPU */
/* The guest's arithmetic flags go in, the host CPU computes result and flags:
 * exactly what the hardware would have done (32/16/8-bit ops behave the same
 * in 64-bit mode). The red zone is skipped before pushing. */
#define ASM_OP2(OPC, T, C)                                                                         \
    do {                                                                                           \
        T x = (T)a, y = (T)b;                                                                      \
        __asm__ volatile("sub $128,%%rsp\n\tpush %[f]\n\tpopfq\n\t" OPC " %[y],%[x]\n\t"           \
                         "pushfq\n\tpop %[f]\n\tadd $128,%%rsp"                                    \
                         : [x] "+" C(x), [f] "+r"(f)                                               \
                         : [y] C(y)                                                                \
                         : "cc", "memory");                                                        \
        res = x;                                                                                   \
    } while (0)
#define ASM_OP1(OPC, T, C)                                                                         \
    do {                                                                                           \
        T x = (T)a;                                                                                \
        __asm__ volatile("sub $128,%%rsp\n\tpush %[f]\n\tpopfq\n\t" OPC " %[x]\n\t"                \
                         "pushfq\n\tpop %[f]\n\tadd $128,%%rsp"                                    \
                         : [x] "+" C(x), [f] "+r"(f)                                               \
                         :                                                                         \
                         : "cc", "memory");                                                        \
        res = x;                                                                                   \
    } while (0)
#define BY_SIZE2(OPC)                                                                              \
    do {                                                                                           \
        if (size == 1) ASM_OP2(OPC, uint8_t, "q");                                                \
        else if (size == 2) ASM_OP2(OPC, uint16_t, "r");                                          \
        else ASM_OP2(OPC, uint32_t, "r");                                                         \
    } while (0)
#define BY_SIZE1(OPC)                                                                              \
    do {                                                                                           \
        if (size == 1) ASM_OP1(OPC, uint8_t, "q");                                                \
        else if (size == 2) ASM_OP1(OPC, uint16_t, "r");                                          \
        else ASM_OP1(OPC, uint32_t, "r");                                                         \
    } while (0)

#define ARITH 0x8D5u /* CF PF AF ZF SF OF */

/* op: 0 add 1 or 2 adc 3 sbb 4 and 5 sub 6 xor 7 cmp, 8 test, 9 inc, 10 dec */
static uint32_t alu(int op, int size, uint32_t a, uint32_t b, uint32_t *eflags) {
    uint64_t f = 0x2 | (*eflags & ARITH);
    uint32_t res = a;
    switch (op) {
    case 0: BY_SIZE2("add"); break;
    case 1: BY_SIZE2("or"); break;
    case 2: BY_SIZE2("adc"); break;
    case 3: BY_SIZE2("sbb"); break;
    case 4: BY_SIZE2("and"); break;
    case 5: BY_SIZE2("sub"); break;
    case 6: BY_SIZE2("xor"); break;
    case 7: BY_SIZE2("cmp"); res = a; break;
    case 8: BY_SIZE2("test"); res = a; break;
    case 9: BY_SIZE1("inc"); break;
    case 10: BY_SIZE1("dec"); break;
    }
    uint32_t mask = (op == 9 || op == 10) ? (ARITH & ~1u) : ARITH;
    *eflags = (*eflags & ~mask) | ((uint32_t)f & mask);
    return res;
}

/* ------------------------------------------------------------- emulate */

static int access_ok(struct ctx *c, uint32_t off, int size, int write, uint32_t *lin) {
    if (!desc_admits(c->requested, off, size, write)) {
        snprintf(c->why, sizeof c->why, "offset %#x outside the requested segment", off);
        return 0;
    }
    uint64_t linear = ((uint64_t)c->requested->base + off) & 0xFFFFFFFFu;
    uint64_t last = linear + size - 1;
    if (last > 0xFFFFFFFFu || last >= c->hv_start) {
        snprintf(c->why, sizeof c->why, "DISALLOWING UNSAFE ACCESS to %#llx", (unsigned long long)linear);
        return 0;
    }
    *lin = (uint32_t)linear;
    return 1;
}

static int gread(struct ctx *c, uint32_t off, int size, uint32_t *v) {
    uint32_t lin;
    if (!access_ok(c, off, size, 0, &lin)) return -1;
    *v = 0;
    if (read_mem(c->tid, lin, v, size) < 0) {
        snprintf(c->why, sizeof c->why, "page fault reading %#x", lin);
        return -1;
    }
    return 0;
}

static int gwrite(struct ctx *c, uint32_t off, int size, uint32_t v) {
    uint32_t lin;
    if (!access_ok(c, off, size, 1, &lin)) return -1;
    if (write_mem(c->tid, lin, &v, size) < 0) {
        snprintf(c->why, sizeof c->why, "page fault writing %#x", lin);
        return -1;
    }
    return 0;
}

static uint32_t sext(uint32_t v, int size) {
    return size == 1 ? (uint32_t)(int32_t)(int8_t)v : size == 2 ? (uint32_t)(int32_t)(int16_t)v : v;
}

int emulate(struct ctx *c, const struct insn *in, struct user_regs_struct *r) {
    uint32_t m, v, ef = (uint32_t)r->eflags;
    int s = in->size;
    uint32_t next = (uint32_t)r->rip + in->len;
    switch (in->kind) {
    case K_MOV_LOAD:
        if (gread(c, in->off, s, &m)) return -1;
        set_reg(r, in->reg, s, m);
        break;
    case K_MOV_STORE:
        if (gwrite(c, in->off, s, get_reg(r, in->reg, s))) return -1;
        break;
    case K_MOV_IMM:
        if (gwrite(c, in->off, s, in->imm)) return -1;
        break;
    case K_MOVZX: case K_MOVSX: {
        if (gread(c, in->off, in->srcsize, &m)) return -1;
        if (in->kind == K_MOVSX) m = sext(m, in->srcsize);
        set_reg(r, in->reg, in->opsize16 ? 2 : 4, m);
        break;
    }
    case K_ALU_MR: case K_ALU_RM: case K_ALU_MI: case K_TEST_MR: case K_TEST_MI: {
        if (gread(c, in->off, s, &m)) return -1;
        int op = in->alu;
        uint32_t a, b;
        if (in->kind == K_ALU_RM) { a = get_reg(r, in->reg, s); b = m; }
        else if (in->kind == K_ALU_MR) { a = m; b = get_reg(r, in->reg, s); }
        else if (in->kind == K_TEST_MR) { op = 8; a = m; b = get_reg(r, in->reg, s); }
        else if (in->kind == K_TEST_MI) { op = 8; a = m; b = in->imm; }
        else { a = m; b = in->imm; }
        v = alu(op, s, a, b, &ef);
        if (op != 7 && op != 8) {
            if (in->kind == K_ALU_RM) set_reg(r, in->reg, s, v);
            else if (gwrite(c, in->off, s, v)) return -1;
        }
        break;
    }
    case K_INC: case K_DEC:
        if (gread(c, in->off, s, &m)) return -1;
        v = alu(in->kind == K_INC ? 9 : 10, s, m, 0, &ef);
        if (gwrite(c, in->off, s, v)) return -1;
        break;
    case K_XCHG:
        if (gread(c, in->off, s, &m)) return -1;
        if (gwrite(c, in->off, s, get_reg(r, in->reg, s))) return -1;
        set_reg(r, in->reg, s, m);
        break;
    case K_CMPXCHG: {
        if (gread(c, in->off, s, &m)) return -1;
        uint32_t acc = get_reg(r, 0, s);
        alu(7, s, acc, m, &ef);
        if (ef & 0x40) { if (gwrite(c, in->off, s, get_reg(r, in->reg, s))) return -1; }
        else { if (gwrite(c, in->off, s, m)) return -1; set_reg(r, 0, s, m); }
        break;
    }
    case K_XADD: {
        if (gread(c, in->off, s, &m)) return -1;
        uint32_t rv = get_reg(r, in->reg, s);
        v = alu(0, s, m, rv, &ef);
        if (gwrite(c, in->off, s, v)) return -1;
        set_reg(r, in->reg, s, m);
        break;
    }
    case K_PUSH: {
        if (gread(c, in->off, s, &m)) return -1;
        uint32_t sp = (uint32_t)r->rsp - s;
        if (write_mem(c->tid, sp, &m, s) < 0) { snprintf(c->why, sizeof c->why, "push: stack fault"); return -1; }
        r->rsp = sp;
        break;
    }
    case K_POP: {
        uint32_t sp = (uint32_t)r->rsp;
        int ps = in->opsize16 ? 2 : 4;
        m = 0;
        if (read_mem(c->tid, sp, &m, ps) < 0) { snprintf(c->why, sizeof c->why, "pop: stack fault"); return -1; }
        uint32_t off = in->off + (in->uses_esp_after_pop ? ps : 0);
        if (gwrite(c, off, ps, m)) return -1;
        r->rsp = sp + ps;
        break;
    }
    case K_CALL: case K_JMP:
        if (gread(c, in->off, 4, &m)) return -1;
        if (in->kind == K_CALL) {
            uint32_t sp = (uint32_t)r->rsp - 4;
            if (write_mem(c->tid, sp, &next, 4) < 0) { snprintf(c->why, sizeof c->why, "call: stack fault"); return -1; }
            r->rsp = sp;
        }
        next = m;
        break;
    default:
        return -1;
    }
    r->eflags = (r->eflags & ~0xFFFFFFFFull) | ef;
    r->rip = next;
    return 0;
}
