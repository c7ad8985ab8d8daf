/* tlslab x86 core: see _core.h. Each section names the tlslab.x86 function it
 * mirrors; tests/test_core_differential.py holds the two to exact agreement. */
#include "_core.h"

#define U32_MAX 0xFFFFFFFFu
#define PAGE_SIZE 0x1000u
#define LIMIT_FIELD_MAX 0xFFFFFu
#define MAX_INSN_LENGTH 15u

/* ------------------------------------------------------------ descriptors */

uint64_t tc_descriptor_encode(const tc_descriptor *d) {
    uint64_t type = (uint64_t)(d->accessed & 1) | (uint64_t)(d->rw & 1) << 1 | (uint64_t)(d->dc & 1) << 2 |
                    (uint64_t)(d->executable & 1) << 3;
    return (uint64_t)(d->limit & 0xFFFF) | (uint64_t)(d->base & 0xFFFFFF) << 16 | type << 40 |
           (uint64_t)(d->s & 1) << 44 | (uint64_t)(d->dpl & 3) << 45 | (uint64_t)(d->present & 1) << 47 |
           (uint64_t)((d->limit >> 16) & 0xF) << 48 | (uint64_t)(d->avl & 1) << 52 |
           (uint64_t)(d->l & 1) << 53 | (uint64_t)(d->db & 1) << 54 | (uint64_t)(d->granularity & 1) << 55 |
           (uint64_t)(d->base >> 24) << 56;
}

void tc_descriptor_decode(uint64_t raw, tc_descriptor *out) {
    out->base = (uint32_t)((raw >> 16) & 0xFFFFFF) | (uint32_t)((raw >> 56) & 0xFF) << 24;
    out->limit = (uint32_t)(raw & 0xFFFF) | (uint32_t)((raw >> 48) & 0xF) << 16;
    out->accessed = (uint8_t)(raw >> 40 & 1);
    out->rw = (uint8_t)(raw >> 41 & 1);
    out->dc = (uint8_t)(raw >> 42 & 1);
    out->executable = (uint8_t)(raw >> 43 & 1);
    out->s = (uint8_t)(raw >> 44 & 1);
    out->dpl = (uint8_t)(raw >> 45 & 3);
    out->present = (uint8_t)(raw >> 47 & 1);
    out->avl = (uint8_t)(raw >> 52 & 1);
    out->l = (uint8_t)(raw >> 53 & 1);
    out->db = (uint8_t)(raw >> 54 & 1);
    out->granularity = (uint8_t)(raw >> 55 & 1);
}

uint32_t tc_effective_limit(const tc_descriptor *d) {
    uint32_t field = d->limit & LIMIT_FIELD_MAX;
    return d->granularity ? (field << 12 | 0xFFF) : field;
}

/* SegmentDescriptor's derived properties: the type bits mean different things
 * for code and data, so every caller goes through these names. */
static int is_data(const tc_descriptor *d) { return d->s && !d->executable; }
static int is_expand_down(const tc_descriptor *d) { return is_data(d) && d->dc; }
static int is_readable(const tc_descriptor *d) { return d->s && (!d->executable || d->rw); }
static int is_writable(const tc_descriptor *d) { return is_data(d) && d->rw; }
static uint32_t upper_bound(const tc_descriptor *d) { return d->db ? U32_MAX : 0xFFFF; }

/* segcheck._flat: base 0, 4 GiB expand-up; the CPU skips the wrap check (segcheck's doc). */
static int is_flat(const tc_descriptor *d) { return d->base == 0 && tc_effective_limit(d) == U32_MAX; }

/* segcheck.check_data_access. */
int tc_check(const tc_descriptor *d, uint32_t offset, uint32_t size, int write) {
    if (size == 0) return TC_ACCESS_BAD_SIZE;
    if (!d->present) return TC_ACCESS_NOT_PRESENT;
    if (!is_readable(d)) return TC_ACCESS_NOT_DATA;
    if (write && !is_writable(d)) return TC_ACCESS_NOT_WRITABLE;
    /* 64-bit on purpose: an access whose last byte wraps past 4 GiB is a fault */
    uint64_t last = (uint64_t)offset + size - 1;
    uint64_t limit = tc_effective_limit(d);
    if (!is_expand_down(d))
        return (last > limit && !is_flat(d)) ? TC_ACCESS_BEYOND_LIMIT : TC_ACCESS_ALLOWED;
    if (offset <= limit) return TC_ACCESS_AT_OR_BELOW_LIMIT;
    if (last > upper_bound(d)) return TC_ACCESS_ABOVE_UPPER_BOUND;
    return TC_ACCESS_ALLOWED;
}

/* segcheck.valid_offset_interval's emptiness test, for expand-down segments. */
static int expand_down_admits_nothing(const tc_descriptor *d) {
    return tc_effective_limit(d) >= upper_bound(d);
}

/* xen._unusable: no limit keeps the segment out of Xen; install it not present. */
static void make_unusable(tc_descriptor *out) { out->present = 0; }

/* xen._truncate_expand_up */
static void truncate_expand_up(tc_descriptor *out, uint32_t hv) {
    if (out->base >= hv) { make_unusable(out); return; }
    uint32_t max_limit = hv - 1 - out->base;
    if (tc_effective_limit(out) <= max_limit) return;
    if (!out->granularity) { out->limit = max_limit; return; } /* below the old 20-bit limit */
    if (max_limit < 0xFFF) { make_unusable(out); return; }   /* not even one page fits */
    out->limit = (max_limit - 0xFFF) >> 12;
}

/* xen._truncate_expand_down: raising the limit trims only the low end, so the
 * top byte must already be below Xen. */
static void truncate_expand_down(tc_descriptor *out, uint32_t hv) {
    if (expand_down_admits_nothing(out)) return;
    uint32_t upper = upper_bound(out);
    uint32_t last_linear = out->base + upper; /* mod 2**32 */
    if (last_linear >= hv) { make_unusable(out); return; }
    uint64_t first_safe = upper > last_linear ? (uint64_t)upper - last_linear : 0;
    if ((uint64_t)tc_effective_limit(out) + 1 >= first_safe) return;
    uint64_t needed = first_safe - 1; /* smallest acceptable effective limit */
    if (out->granularity) { out->limit = (uint32_t)(needed >> 12); return; }
    if (needed > LIMIT_FIELD_MAX) { make_unusable(out); return; }
    out->limit = (uint32_t)needed;
}

/* xen.truncate */
void tc_truncate(const tc_descriptor *d, uint32_t hypervisor_start, tc_descriptor *out) {
    *out = *d;
    out->limit &= LIMIT_FIELD_MAX;
    if (!d->present || !d->s) return; /* not present, or a system segment: passed through */
    if (is_expand_down(d)) truncate_expand_down(out, hypervisor_start);
    else truncate_expand_up(out, hypervisor_start);
}

/* xen.truncated_flat_limit: -1 for Python's None (not one page fits below Xen). */
static int64_t truncated_flat_limit(uint32_t base, uint32_t hv) {
    if ((uint64_t)base > (uint64_t)hv - PAGE_SIZE) return -1;
    return (int64_t)(((uint64_t)hv - base) >> 12) - 1;
}

/* xen.expand_down_flat_limit: the twin whose offsets wrap to everything below the base. */
static uint32_t expand_down_flat_limit(uint32_t base) {
    return (uint32_t)(((0x100000000ull - (base & ~0xFFFu)) >> 12) - 1);
}

/* xen.looks_like_truncated_flat */
static int looks_like_truncated_flat(const tc_descriptor *d, uint32_t hv) {
    if (!(d->present && is_data(d) && d->db && d->granularity && d->dpl == 3)) return 0;
    int64_t expand_up_limit = truncated_flat_limit(d->base, hv);
    if (expand_up_limit < 0) return 0;
    uint32_t field = d->limit & LIMIT_FIELD_MAX;
    if (is_expand_down(d)) return field == expand_down_flat_limit(d->base);
    return (int64_t)field == expand_up_limit;
}

/* xen.flip */
int tc_flip(const tc_descriptor *d, uint32_t offset, uint32_t size, uint32_t hypervisor_start,
            tc_descriptor *out) {
    if (!looks_like_truncated_flat(d, hypervisor_start)) return 0;
    tc_descriptor flipped = *d;
    if (is_expand_down(d)) {
        if (offset > tc_effective_limit(d)) return 0; /* a genuine fault above the base */
        flipped.dc = 0;
        flipped.limit = (uint32_t)truncated_flat_limit(d->base, hypervisor_start);
    } else {
        if (offset <= tc_effective_limit(d)) return 0;
        flipped.dc = 1;
        flipped.limit = expand_down_flat_limit(d->base);
    }
    /* without this check an offset inside Xen's own area would flip back and forth */
    if (size != 0 && tc_check(&flipped, offset, size, 0) != TC_ACCESS_ALLOWED) return 0;
    *out = flipped;
    return 1;
}

/* ---------------------------------------------------------------- decoder */

/* Operand widths as the opcode map spells them: b, w, and v (2 or 4 by 66). */
enum width { W_BYTE, W_WORD, W_VWORD };
/* Immediates: Ib (zero-extended), Ibs (sign-extended to the operand size), Iz (2 or 4). */
enum immediate_kind { IMM_NONE, IMM_B, IMM_BS, IMM_Z };

/* One supported (opcode, ModRM.reg) form; the SDM opcode map, for just these forms. */
struct form_entry {
    uint16_t opcode;    /* one byte, or 0x0Fxx */
    int8_t slot;        /* ModRM.reg for group opcodes, -1: any */
    uint8_t kind, alu_op, form;
    uint8_t width;      /* of the operation (decode.Instruction.operand_size) */
    uint8_t mem_width;  /* of the memory operand: differs for movzx/movsx */
    uint8_t immediate;
    uint8_t lockable;   /* decode.LOCKABLE with a memory destination */
    uint8_t moffs;      /* A0-A3: no ModRM, a 32-bit absolute offset */
};

#define FORM(op, slot, kind, alu, form, w, mw, imm, lock) {op, slot, kind, alu, form, w, mw, imm, lock, 0}
/* 00-3F: Eb,Gb  Ev,Gv  Gb,Eb  Gv,Ev for one ALU operation; cmp takes no LOCK */
#define ALU_ROW(op0, alu)                                                                       \
    FORM(op0 + 0, -1, TC_KIND_ALU, alu, TC_FORM_MEM_REG, W_BYTE, W_BYTE, IMM_NONE, alu != TC_CMP), \
    FORM(op0 + 1, -1, TC_KIND_ALU, alu, TC_FORM_MEM_REG, W_VWORD, W_VWORD, IMM_NONE, alu != TC_CMP), \
    FORM(op0 + 2, -1, TC_KIND_ALU, alu, TC_FORM_REG_MEM, W_BYTE, W_BYTE, IMM_NONE, 0),          \
    FORM(op0 + 3, -1, TC_KIND_ALU, alu, TC_FORM_REG_MEM, W_VWORD, W_VWORD, IMM_NONE, 0)
/* group 1, one /reg slot across 80 (Eb,Ib) 81 (Ev,Iz) 82 (80's alias) 83 (Ev,Ibs) */
#define ALU_IMM(alu)                                                                            \
    FORM(0x80, alu, TC_KIND_ALU, alu, TC_FORM_MEM_IMM, W_BYTE, W_BYTE, IMM_B, alu != TC_CMP),   \
    FORM(0x81, alu, TC_KIND_ALU, alu, TC_FORM_MEM_IMM, W_VWORD, W_VWORD, IMM_Z, alu != TC_CMP), \
    FORM(0x82, alu, TC_KIND_ALU, alu, TC_FORM_MEM_IMM, W_BYTE, W_BYTE, IMM_B, alu != TC_CMP),   \
    FORM(0x83, alu, TC_KIND_ALU, alu, TC_FORM_MEM_IMM, W_VWORD, W_VWORD, IMM_BS, alu != TC_CMP)
/* a byte/vword pair (op even: byte) of one kind and form */
#define PAIR(op, slot, kind, form, imm_v, lock)                                                 \
    FORM(op, slot, kind, 0, form, W_BYTE, W_BYTE, (imm_v) == IMM_NONE ? IMM_NONE : IMM_B, lock), \
    FORM(op + 1, slot, kind, 0, form, W_VWORD, W_VWORD, imm_v, lock)

static const struct form_entry FORMS[] = {
    ALU_ROW(0x00, TC_ADD), ALU_ROW(0x08, TC_OR), ALU_ROW(0x10, TC_ADC), ALU_ROW(0x18, TC_SBB),
    ALU_ROW(0x20, TC_AND), ALU_ROW(0x28, TC_SUB), ALU_ROW(0x30, TC_XOR), ALU_ROW(0x38, TC_CMP),
    ALU_IMM(TC_ADD), ALU_IMM(TC_OR), ALU_IMM(TC_ADC), ALU_IMM(TC_SBB),
    ALU_IMM(TC_AND), ALU_IMM(TC_SUB), ALU_IMM(TC_XOR), ALU_IMM(TC_CMP),
    PAIR(0x84, -1, TC_KIND_TEST, TC_FORM_MEM_REG, IMM_NONE, 0),
    PAIR(0x86, -1, TC_KIND_XCHG, TC_FORM_MEM_REG, IMM_NONE, 1),
    PAIR(0x88, -1, TC_KIND_MOV, TC_FORM_MEM_REG, IMM_NONE, 0),
    PAIR(0x8A, -1, TC_KIND_MOV, TC_FORM_REG_MEM, IMM_NONE, 0),
    FORM(0x8F, 0, TC_KIND_POP, 0, TC_FORM_MEM, W_VWORD, W_VWORD, IMM_NONE, 0),
    {0xA0, -1, TC_KIND_MOV, 0, TC_FORM_REG_MEM, W_BYTE, W_BYTE, IMM_NONE, 0, 1},
    {0xA1, -1, TC_KIND_MOV, 0, TC_FORM_REG_MEM, W_VWORD, W_VWORD, IMM_NONE, 0, 1},
    {0xA2, -1, TC_KIND_MOV, 0, TC_FORM_MEM_REG, W_BYTE, W_BYTE, IMM_NONE, 0, 1},
    {0xA3, -1, TC_KIND_MOV, 0, TC_FORM_MEM_REG, W_VWORD, W_VWORD, IMM_NONE, 0, 1},
    PAIR(0xC6, 0, TC_KIND_MOV, TC_FORM_MEM_IMM, IMM_Z, 0),
    PAIR(0xF6, 0, TC_KIND_TEST, TC_FORM_MEM_IMM, IMM_Z, 0),
    PAIR(0xF6, 1, TC_KIND_TEST, TC_FORM_MEM_IMM, IMM_Z, 0), /* /1: undocumented alias of /0 */
    PAIR(0xF6, 2, TC_KIND_NOT, TC_FORM_MEM, IMM_NONE, 1),
    PAIR(0xF6, 3, TC_KIND_NEG, TC_FORM_MEM, IMM_NONE, 1),
    PAIR(0xFE, 0, TC_KIND_INC, TC_FORM_MEM, IMM_NONE, 1),
    PAIR(0xFE, 1, TC_KIND_DEC, TC_FORM_MEM, IMM_NONE, 1),
    FORM(0xFF, 2, TC_KIND_CALL, 0, TC_FORM_MEM, W_VWORD, W_VWORD, IMM_NONE, 0),
    FORM(0xFF, 4, TC_KIND_JMP, 0, TC_FORM_MEM, W_VWORD, W_VWORD, IMM_NONE, 0),
    FORM(0xFF, 6, TC_KIND_PUSH, 0, TC_FORM_MEM, W_VWORD, W_VWORD, IMM_NONE, 0),
    PAIR(0x0FB0, -1, TC_KIND_CMPXCHG, TC_FORM_MEM_REG, IMM_NONE, 1),
    PAIR(0x0FC0, -1, TC_KIND_XADD, TC_FORM_MEM_REG, IMM_NONE, 1),
    FORM(0x0FB6, -1, TC_KIND_MOVZX, 0, TC_FORM_REG_MEM, W_VWORD, W_BYTE, IMM_NONE, 0),
    FORM(0x0FB7, -1, TC_KIND_MOVZX, 0, TC_FORM_REG_MEM, W_VWORD, W_WORD, IMM_NONE, 0),
    FORM(0x0FBE, -1, TC_KIND_MOVSX, 0, TC_FORM_REG_MEM, W_VWORD, W_BYTE, IMM_NONE, 0),
    FORM(0x0FBF, -1, TC_KIND_MOVSX, 0, TC_FORM_REG_MEM, W_VWORD, W_WORD, IMM_NONE, 0),
};
#define FORM_COUNT (sizeof FORMS / sizeof FORMS[0])

/* Opcodes whose form depends on ModRM.reg (an opcode group). */
static int is_group(uint16_t opcode) {
    switch (opcode) {
    case 0x80: case 0x81: case 0x82: case 0x83: case 0x8F: case 0xC6: case 0xC7:
    case 0xF6: case 0xF7: case 0xFE: case 0xFF: return 1;
    default: return 0;
    }
}

static const struct form_entry *find_form(uint16_t opcode, int slot) {
    for (size_t i = 0; i < FORM_COUNT; i++)
        if (FORMS[i].opcode == opcode && (FORMS[i].slot < 0 || FORMS[i].slot == slot)) return &FORMS[i];
    return 0;
}

#define TAKE(rd, count, dst)                                   \
    do {                                                       \
        int status_ = tc_need(rd, count);                         \
        if (status_ != TC_DECODE_OK) return fail(out, status_); \
        dst = tc_take(rd, count);                                 \
    } while (0)

static int fail(tc_insn *out, int status) {
    out->kind = TC_KIND_NONE;
    return status;
}

static uint32_t size_mask(uint32_t size) { return size >= 4 ? U32_MAX : (1u << (8 * size)) - 1; }

static uint32_t sign_extend(uint32_t value, uint32_t size) {
    if (size == 1) return (uint32_t)(int32_t)(int8_t)(uint8_t)value;
    if (size == 2) return (uint32_t)(int32_t)(int16_t)(uint16_t)value;
    return value;
}

static uint8_t width_bytes(uint8_t width, int operand_size_override) {
    if (width == W_BYTE) return 1;
    if (width == W_WORD) return 2;
    return operand_size_override ? 2 : 4;
}

static int is_segment_prefix(uint8_t b, uint8_t *segment) {
    switch (b) {
    case 0x26: *segment = TC_ES; return 1;
    case 0x2E: *segment = TC_CS; return 1;
    case 0x36: *segment = TC_SS; return 1;
    case 0x3E: *segment = TC_DS; return 1;
    case 0x64: *segment = TC_FS; return 1;
    case 0x65: *segment = TC_GS; return 1;
    default: return 0;
    }
}

/* The memory operand (ModRM, SIB, displacement); 32-bit addressing only. */
static int decode_modrm_memory(tc_cursor *rd, tc_insn *out) {
    uint32_t modrm, sib, disp;
    TAKE(rd, 1, modrm);
    out->has_modrm = 1;
    out->modrm = (uint8_t)modrm;
    uint8_t mod = (uint8_t)(modrm >> 6), rm = modrm & 7;
    out->reg = (modrm >> 3) & 7;
    if (mod == 3) return fail(out, TC_DECODE_UNSUPPORTED); /* register operand: no memory to emulate */
    out->index = -1;
    out->scale = 1;
    if (rm == 4) {
        TAKE(rd, 1, sib);
        out->has_sib = 1;
        out->sib = (uint8_t)sib;
        uint8_t index = (sib >> 3) & 7, base = sib & 7;
        if (index != 4) {
            out->index = (int8_t)index;
            out->scale = (uint8_t)(1u << (sib >> 6));
        }
        out->base = (base == 5 && mod == 0) ? -1 : (int8_t)base;
    } else {
        out->base = (rm == 5 && mod == 0) ? -1 : (int8_t)rm;
    }
    if (mod == 1) {
        TAKE(rd, 1, disp);
        out->displacement = (int32_t)sign_extend(disp, 1);
    } else if (mod == 2 || out->base < 0) {
        TAKE(rd, 4, disp);
        out->displacement = (int32_t)disp;
    } else {
        out->displacement = 0;
    }
    return TC_DECODE_OK;
}

/* decode.decode, restricted to the forms in FORMS with a memory operand. */
int tc_decode(const uint8_t *code, size_t n, tc_insn *out) {
    tc_cursor rd = {code, n, 0};
    tc_insn insn = {0};
    int address_size_override = 0;
    uint8_t segment = 0;
    uint32_t byte;
    int status;

    insn.base = insn.index = -1;
    insn.scale = 1;
    /* 1. legacy prefixes; the last segment override wins, F2/F3 cancel each other */
    for (;;) {
        if ((status = tc_need(&rd, 1)) != TC_DECODE_OK) return fail(out, status);
        byte = code[rd.pos];
        if (is_segment_prefix((uint8_t)byte, &segment)) {
            insn.segment = segment;
            insn.segment_overridden = 1;
        } else if (byte == 0x66) insn.operand_size_override = 1;
        else if (byte == 0x67) address_size_override = 1;
        else if (byte == 0xF0) insn.lock = 1;
        else if (byte == 0xF3) { insn.rep = 1; insn.repne = 0; }
        else if (byte == 0xF2) { insn.repne = 1; insn.rep = 0; }
        else break;
        rd.pos++;
    }
    insn.prefix_count = (uint8_t)rd.pos;
    /* semantics.supported refuses 16-bit addressing: so does the core */
    if (address_size_override) return fail(out, TC_DECODE_UNSUPPORTED);

    /* 2. opcode -> form (groups resolved through ModRM.reg, peeked) */
    uint32_t opcode;
    TAKE(&rd, 1, opcode);
    if (opcode == 0x0F) {
        TAKE(&rd, 1, byte);
        opcode = 0x0F00 | byte;
    }
    int slot = -1;
    if (is_group((uint16_t)opcode)) {
        if ((status = tc_need(&rd, 1)) != TC_DECODE_OK) return fail(out, status);
        slot = (code[rd.pos] >> 3) & 7;
    }
    const struct form_entry *form = find_form((uint16_t)opcode, slot);
    if (!form) return fail(out, TC_DECODE_UNSUPPORTED);
    insn.opcode = (uint16_t)opcode;
    insn.kind = form->kind;
    insn.alu_op = form->alu_op;
    insn.form = form->form;
    insn.operand_size = width_bytes(form->width, insn.operand_size_override);
    insn.memory_size = width_bytes(form->mem_width, insn.operand_size_override);

    /* 3. the memory operand */
    if (form->moffs) {
        uint32_t moffs;
        TAKE(&rd, 4, moffs);
        insn.displacement = (int32_t)moffs;
        insn.reg = 0; /* the accumulator */
    } else {
        if ((status = decode_modrm_memory(&rd, &insn)) != TC_DECODE_OK) return fail(out, status);
    }
    if (!insn.segment_overridden)
        insn.segment = (insn.base == 4 || insn.base == 5) ? TC_SS : TC_DS; /* esp/ebp-based: ss */

    /* 4. immediate */
    uint32_t imm;
    switch (form->immediate) {
    case IMM_B:
        TAKE(&rd, 1, imm);
        insn.immediate = imm;
        insn.has_immediate = 1;
        break;
    case IMM_BS:
        TAKE(&rd, 1, imm);
        insn.immediate = sign_extend(imm, 1) & size_mask(insn.operand_size);
        insn.has_immediate = 1;
        break;
    case IMM_Z:
        TAKE(&rd, insn.operand_size, imm);
        insn.immediate = imm;
        insn.has_immediate = 1;
        break;
    default:
        break;
    }
    insn.length = (uint8_t)rd.pos;
    /* LOCK is checked once the length is known, as decode.py does (#UD) */
    if (insn.lock && !form->lockable) return fail(out, TC_DECODE_INVALID);

    /* 5. what an emulation touches: one read (the operand, or pop's stack slot)
     * unless the form only stores, one write unless it only reads (push and
     * call write the stack) */
    int only_stores = insn.kind == TC_KIND_MOV && insn.form != TC_FORM_REG_MEM;
    int only_reads = insn.form == TC_FORM_REG_MEM || insn.kind == TC_KIND_TEST || insn.kind == TC_KIND_JMP ||
                     (insn.kind == TC_KIND_ALU && insn.alu_op == TC_CMP);
    int uses_stack = insn.kind == TC_KIND_PUSH || insn.kind == TC_KIND_POP || insn.kind == TC_KIND_CALL;
    insn.only_explicit_memory = !uses_stack;
    insn.reads = !only_stores;
    insn.writes = !only_reads;
    *out = insn;
    return TC_DECODE_OK;
}

static const char *const ALU_NAMES[8] = {"add", "or", "adc", "sbb", "and", "sub", "xor", "cmp"};
static const char *const KIND_NAMES[TC_KIND_COUNT] = {
    [TC_KIND_NONE] = "", [TC_KIND_MOV] = "mov", [TC_KIND_MOVZX] = "movzx", [TC_KIND_MOVSX] = "movsx",
    [TC_KIND_ALU] = "alu", [TC_KIND_TEST] = "test", [TC_KIND_INC] = "inc", [TC_KIND_DEC] = "dec",
    [TC_KIND_NOT] = "not", [TC_KIND_NEG] = "neg", [TC_KIND_XCHG] = "xchg", [TC_KIND_CMPXCHG] = "cmpxchg",
    [TC_KIND_XADD] = "xadd", [TC_KIND_PUSH] = "push", [TC_KIND_POP] = "pop", [TC_KIND_CALL] = "call",
    [TC_KIND_JMP] = "jmp",
};

const char *tc_mnemonic(const tc_insn *insn) {
    if (insn->kind >= TC_KIND_COUNT) return "";
    if (insn->kind == TC_KIND_ALU) return ALU_NAMES[insn->alu_op & 7];
    return KIND_NAMES[insn->kind];
}

/* ------------------------------------------------------------- emulation */

uint32_t tc_effective_offset(const tc_insn *insn, const tc_regs *regs) {
    uint32_t offset = (uint32_t)insn->displacement;
    if (insn->base >= 0) offset += regs->gpr[insn->base & 7];
    if (insn->index >= 0) offset += regs->gpr[insn->index & 7] * insn->scale;
    return offset;
}

/* Register n of size bytes; 8-bit numbers 4-7 are ah ch dh bh. */
static uint32_t get_reg(const tc_regs *r, unsigned n, uint32_t size) {
    n &= 7;
    if (size == 1) return n < 4 ? r->gpr[n] & 0xFF : (r->gpr[n - 4] >> 8) & 0xFF;
    return r->gpr[n & 7] & size_mask(size);
}

static void set_reg(tc_regs *r, unsigned n, uint32_t size, uint32_t value) {
    n &= 7;
    if (size == 1) {
        unsigned shift = n < 4 ? 0 : 8;
        uint32_t *full = &r->gpr[n & 3];
        *full = (*full & ~(0xFFu << shift)) | (value & 0xFF) << shift;
    } else if (size == 2) {
        r->gpr[n & 7] = (r->gpr[n & 7] & 0xFFFF0000u) | (value & 0xFFFF);
    } else {
        r->gpr[n & 7] = value;
    }
}

static uint32_t even_parity(uint32_t byte) {
    byte &= 0xFF;
    byte ^= byte >> 4;
    byte ^= byte >> 2;
    byte ^= byte >> 1;
    return !(byte & 1);
}

/* semantics._szp */
static uint32_t szp_flags(uint32_t result, uint32_t size) {
    uint32_t flags = even_parity(result) ? TC_PF : 0;
    if (result == 0) flags |= TC_ZF;
    if (result >> (8 * size - 1) & 1) flags |= TC_SF;
    return flags;
}

/* semantics._add: a and b already masked to size */
static uint32_t add_with_flags(uint32_t a, uint32_t b, uint32_t carry, uint32_t size, uint32_t *flags) {
    uint64_t full = (uint64_t)a + b + carry;
    uint32_t r = (uint32_t)full & size_mask(size);
    uint32_t f = szp_flags(r, size) | ((a ^ b ^ r) & TC_AF);
    if (full >> (8 * size)) f |= TC_CF;
    if (((a ^ r) & (b ^ r)) >> (8 * size - 1) & 1) f |= TC_OF;
    *flags = f;
    return r;
}

/* semantics._sub */
static uint32_t sub_with_flags(uint32_t a, uint32_t b, uint32_t borrow, uint32_t size, uint32_t *flags) {
    uint32_t r = (a - b - borrow) & size_mask(size);
    uint32_t f = szp_flags(r, size) | ((a ^ b ^ r) & TC_AF);
    if ((uint64_t)a < (uint64_t)b + borrow) f |= TC_CF;
    if (((a ^ b) & (a ^ r)) >> (8 * size - 1) & 1) f |= TC_OF;
    *flags = f;
    return r;
}

/* semantics._alu; and/or/xor/test: CF = OF = AF = 0 (AF undefined; QEMU's choice) */
static uint32_t alu_with_flags(int op, uint32_t a, uint32_t b, uint32_t eflags, uint32_t size, uint32_t *flags) {
    uint32_t carry = eflags & TC_CF, r;
    switch (op) {
    case TC_ADD: return add_with_flags(a, b, 0, size, flags);
    case TC_ADC: return add_with_flags(a, b, carry, size, flags);
    case TC_SUB: case TC_CMP: return sub_with_flags(a, b, 0, size, flags);
    case TC_SBB: return sub_with_flags(a, b, carry, size, flags);
    case TC_AND: r = a & b; break;
    case TC_OR: r = a | b; break;
    default: r = a ^ b; break; /* TC_XOR */
    }
    *flags = szp_flags(r, size);
    return r;
}

static void set_flags(tc_regs *r, uint32_t flags, uint32_t written) {
    r->eflags = (r->eflags & ~written) | (flags & written);
}

/* Memory through the caller's callbacks, values masked as semantics._Exec does. */
struct memory {
    const tc_memory_ops *ops;
    void *ctx;
};

static int load(const struct memory *m, int segment, uint32_t offset, uint32_t size, uint32_t *value) {
    uint32_t v = 0;
    if (!m->ops->read || m->ops->read(m->ctx, segment, offset, size, &v) != 0) return -1;
    *value = v & size_mask(size);
    return 0;
}

static int store(const struct memory *m, int segment, uint32_t offset, uint32_t size, uint32_t value) {
    if (!m->ops->write || m->ops->write(m->ctx, segment, offset, size, value & size_mask(size)) != 0)
        return -1;
    return 0;
}

#define LOAD(seg, off, size, dst) \
    do { if (load(&memory, seg, off, size, dst)) return TC_EMULATE_REFUSED; } while (0)
#define STORE(seg, off, size, value) \
    do { if (store(&memory, seg, off, size, value)) return TC_EMULATE_REFUSED; } while (0)

enum { ESP = 4 };

static int valid_size(uint32_t size) { return size == 1 || size == 2 || size == 4; }

/* semantics.execute. Works on a copy of the registers, committed only at the
 * end: a refused access returns with *regs untouched. Every form reads before
 * it writes memory and writes memory at most once, so a refusal also leaves
 * memory untouched. */
int tc_emulate(const tc_insn *in, tc_regs *regs, const tc_memory_ops *mem, void *ctx) {
    if (!in || !regs || !mem || in->kind == TC_KIND_NONE || in->kind >= TC_KIND_COUNT ||
        !valid_size(in->operand_size) || !valid_size(in->memory_size))
        return TC_EMULATE_UNSUPPORTED; /* not a record tc_decode produced */
    const struct memory memory = {mem, ctx};
    tc_regs r = *regs;
    const uint32_t size = in->operand_size, reg = in->reg;
    const int seg = in->segment;
    uint32_t offset = tc_effective_offset(in, &r);
    uint32_t next_eip = r.eip + in->length;
    uint32_t a, b, result, flags, esp;

    switch (in->kind) {
    case TC_KIND_MOV:
        if (in->form == TC_FORM_REG_MEM) {
            LOAD(seg, offset, size, &a);
            set_reg(&r, reg, size, a);
        } else {
            STORE(seg, offset, size, in->form == TC_FORM_MEM_IMM ? in->immediate : get_reg(&r, reg, size));
        }
        break;
    case TC_KIND_MOVZX: case TC_KIND_MOVSX:
        LOAD(seg, offset, in->memory_size, &a);
        set_reg(&r, reg, size, in->kind == TC_KIND_MOVSX ? sign_extend(a, in->memory_size) : a);
        break;
    case TC_KIND_ALU: case TC_KIND_TEST: {
        int op = in->kind == TC_KIND_TEST ? TC_AND : in->alu_op;
        if (in->form == TC_FORM_REG_MEM) {
            a = get_reg(&r, reg, size);
            LOAD(seg, offset, size, &b);
        } else {
            LOAD(seg, offset, size, &a);
            b = in->form == TC_FORM_MEM_IMM ? in->immediate : get_reg(&r, reg, size);
        }
        result = alu_with_flags(op, a, b, r.eflags, size, &flags);
        if (in->kind == TC_KIND_ALU && op != TC_CMP) {
            if (in->form == TC_FORM_REG_MEM) set_reg(&r, reg, size, result);
            else STORE(seg, offset, size, result);
        }
        set_flags(&r, flags, TC_STATUS_FLAGS);
        break;
    }
    case TC_KIND_INC: case TC_KIND_DEC:
        LOAD(seg, offset, size, &a);
        result = in->kind == TC_KIND_INC ? add_with_flags(a, 1, 0, size, &flags)
                                         : sub_with_flags(a, 1, 0, size, &flags);
        STORE(seg, offset, size, result);
        set_flags(&r, flags, TC_STATUS_FLAGS & ~TC_CF); /* inc/dec keep CF */
        break;
    case TC_KIND_NOT:
        LOAD(seg, offset, size, &a);
        STORE(seg, offset, size, ~a);
        break;
    case TC_KIND_NEG:
        LOAD(seg, offset, size, &a);
        result = sub_with_flags(0, a, 0, size, &flags);
        STORE(seg, offset, size, result);
        set_flags(&r, flags, TC_STATUS_FLAGS);
        break;
    case TC_KIND_XCHG:
        LOAD(seg, offset, size, &a);
        STORE(seg, offset, size, get_reg(&r, reg, size));
        set_reg(&r, reg, size, a);
        break;
    case TC_KIND_CMPXCHG: {
        LOAD(seg, offset, size, &a);
        b = get_reg(&r, 0, size); /* the accumulator */
        sub_with_flags(b, a, 0, size, &flags);
        if (a == b) {
            STORE(seg, offset, size, get_reg(&r, reg, size));
        } else {
            STORE(seg, offset, size, a); /* the locked cycle always writes back (SDM CMPXCHG) */
            set_reg(&r, 0, size, a);
        }
        set_flags(&r, flags, TC_STATUS_FLAGS);
        break;
    }
    case TC_KIND_XADD:
        LOAD(seg, offset, size, &a);
        result = add_with_flags(a, get_reg(&r, reg, size), 0, size, &flags);
        STORE(seg, offset, size, result);
        set_reg(&r, reg, size, a);
        set_flags(&r, flags, TC_STATUS_FLAGS);
        break;
    case TC_KIND_PUSH:
        LOAD(seg, offset, size, &a);
        esp = r.gpr[ESP] - size;
        STORE(TC_SS, esp, size, a);
        r.gpr[ESP] = esp;
        break;
    case TC_KIND_POP:
        esp = r.gpr[ESP];
        LOAD(TC_SS, esp, size, &a);
        r.gpr[ESP] = esp + size;
        /* the destination's address is computed with the incremented ESP (SDM POP) */
        STORE(seg, tc_effective_offset(in, &r), size, a);
        break;
    case TC_KIND_CALL:
        LOAD(seg, offset, size, &a);
        esp = r.gpr[ESP] - size;
        STORE(TC_SS, esp, size, next_eip);
        r.gpr[ESP] = esp;
        next_eip = a;
        break;
    case TC_KIND_JMP:
        LOAD(seg, offset, size, &a);
        next_eip = a;
        break;
    default:
        return TC_EMULATE_UNSUPPORTED;
    }
    r.eip = next_eip;
    *regs = r;
    return TC_EMULATE_OK;
}

/* ------------------------------------------------------------------ layout */

#define STRUCT_SIZE(type) {#type, 0, 0, (uint32_t)sizeof(type)}
#define FIELD(type, field) {#type, #field, (uint32_t)offsetof(type, field), (uint32_t)sizeof(((type *)0)->field)}

static const tc_field_layout LAYOUT[] = {
    STRUCT_SIZE(tc_descriptor),
    FIELD(tc_descriptor, base), FIELD(tc_descriptor, limit), FIELD(tc_descriptor, accessed),
    FIELD(tc_descriptor, rw), FIELD(tc_descriptor, dc), FIELD(tc_descriptor, executable),
    FIELD(tc_descriptor, s), FIELD(tc_descriptor, dpl), FIELD(tc_descriptor, present),
    FIELD(tc_descriptor, avl), FIELD(tc_descriptor, l), FIELD(tc_descriptor, db),
    FIELD(tc_descriptor, granularity),
    STRUCT_SIZE(tc_insn),
    FIELD(tc_insn, immediate), FIELD(tc_insn, displacement), FIELD(tc_insn, opcode),
    FIELD(tc_insn, length), FIELD(tc_insn, prefix_count), FIELD(tc_insn, kind), FIELD(tc_insn, alu_op),
    FIELD(tc_insn, form), FIELD(tc_insn, operand_size), FIELD(tc_insn, memory_size),
    FIELD(tc_insn, segment), FIELD(tc_insn, segment_overridden), FIELD(tc_insn, operand_size_override),
    FIELD(tc_insn, lock), FIELD(tc_insn, rep), FIELD(tc_insn, repne), FIELD(tc_insn, has_modrm),
    FIELD(tc_insn, modrm), FIELD(tc_insn, has_sib), FIELD(tc_insn, sib), FIELD(tc_insn, base),
    FIELD(tc_insn, index), FIELD(tc_insn, scale), FIELD(tc_insn, reg), FIELD(tc_insn, has_immediate),
    FIELD(tc_insn, only_explicit_memory), FIELD(tc_insn, reads), FIELD(tc_insn, writes),
    STRUCT_SIZE(tc_regs),
    FIELD(tc_regs, gpr), FIELD(tc_regs, eip), FIELD(tc_regs, eflags),
    STRUCT_SIZE(tc_memory_ops),
    FIELD(tc_memory_ops, read), FIELD(tc_memory_ops, write),
};

const tc_field_layout *tc_layout(uint32_t *count) {
    *count = (uint32_t)(sizeof LAYOUT / sizeof LAYOUT[0]);
    return LAYOUT;
}
