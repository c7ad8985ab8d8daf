/* tlslab x86 decode-ahead: see _ahead.h. Each function names the Python it
 * mirrors (tlslab/x86/decode.py, tlslab/x86/ahead.py); the tables come from
 * them (_optable.h), and tests/test_ahead_differential.py holds the two to
 * exact agreement. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "_ahead.h"
#include "_optable.h"

#define M32 0xFFFFFFFFu
#define MAX_INSN 15u

size_t tc_decode_cache_size(void) { return sizeof(tc_decode_cache); }
size_t tc_walk_memo_size(void) { return sizeof(tc_walk_memo); }

void tc_walk_memo_stats(const tc_walk_memo *memo, uint64_t *hits, uint64_t *misses) {
    *hits = memo->hits;
    *misses = memo->misses;
}

void tc_decode_cache_stats(const tc_decode_cache *cache, uint64_t *hits, uint64_t *misses) {
    *hits = cache->hits;
    *misses = cache->misses;
}

const char *tc_mnemonic_name(uint16_t mn) { return mn < TC_MN_COUNT ? TC_MN_NAMES[mn] : "?"; }

/* ---------------------------------------------------------------- decoder */

#define TAKE(var, count)                       \
    do {                                       \
        int status_ = tc_need(&c, (count));       \
        if (status_) return status_;           \
        (var) = tc_take(&c, (count));             \
    } while (0)

static int32_t sext(uint32_t value, unsigned bytes) {
    unsigned bits = 8 * bytes;
    if (bits >= 32) return (int32_t)value;
    value &= (1u << bits) - 1;
    return (value >> (bits - 1)) ? (int32_t)(value - (1u << bits)) : (int32_t)value;
}

/* decode.operand_code_size from the code's size letter: 0 for None */
static unsigned letter_size(char letter, unsigned osz) {
    switch (letter) {
    case 'v': case 'z': return osz;
    case 'p': return osz + 2;
    case 'b': return 1;
    case 'w': return 2;
    case 'd': return 4;
    case 'q': return 8;
    default: return 0;
    }
}

/* decode._reg_name as (kind, number) */
static uint8_t reg_kind(unsigned size) { return size == 1 ? 1 : size == 2 ? 2 : 4; }

/* 1 + the index of opcode's group in TC_GROUP_KEYS, 0: not a group */
static unsigned group_of(uint32_t opcode) {
    if (opcode < 0x100) return TC_GROUP_OF_ONE[opcode];
    if ((opcode & 0xFFFFFF00u) == 0x0F00u) return TC_GROUP_OF_TWO[opcode & 0xFF];
    return 0;
}

static const tc_opentry *group_slot(uint32_t opcode, unsigned group, uint8_t modrm) {
    unsigned slot = (modrm >> 3) & 7;
    if ((modrm >> 6) == 3)
        for (unsigned i = 0; i < TC_REGFORM_COUNT; i++)
            if (TC_REGFORM[i].opcode == opcode && TC_REGFORM[i].slot == slot) return &TC_REGFORM[i].entry;
    const tc_opentry *e = &TC_GROUP_SLOTS[group - 1][slot];
    return e->mn ? e : NULL;
}

/* decode._decode */
int tc_decode_full(const uint8_t *code, size_t n, uint32_t address, tc_full_insn *out) {
    tc_cursor c = {code, n, 0};
    memset(out, 0, sizeof *out);
    out->address = address;
    out->mem.base = out->mem.index = out->mem2.base = out->mem2.index = -1;
    int seg = -1, opsz = 0, adsz = 0, lock = 0, rep = 0;
    uint32_t b;
    /* prefix byte -> 1 + segment (es..gs), 7 operand size, 8 address size, 9 lock, 10 rep, 11 repne */
    static const uint8_t PREFIX[256] = {[0x26] = 1 + TC_ES, [0x2E] = 1 + TC_CS, [0x36] = 1 + TC_SS,
                                        [0x3E] = 1 + TC_DS, [0x64] = 1 + TC_FS, [0x65] = 1 + TC_GS,
                                        [0x66] = 7, [0x67] = 8, [0xF0] = 9, [0xF3] = 10, [0xF2] = 11};
    for (;;) {                                  /* 1. prefixes */
        int status = tc_need(&c, 1);
        if (status) return status;
        b = code[c.pos];
        uint8_t kind = PREFIX[b];
        if (!kind) break;
        if (kind <= 6) seg = kind - 1;
        else if (kind == 7) opsz = 1;
        else if (kind == 8) adsz = 1;
        else if (kind == 9) lock = 1;
        else rep = kind == 10;
        c.pos++;
    }
    unsigned osz = opsz ? 2 : 4;

    const tc_opentry *entry = NULL;            /* 2. opcode -> entry */
    uint32_t opcode;
    TAKE(b, 1);
    if (b == 0x0F) {
        uint32_t b2;
        TAKE(b2, 1);
        if (b2 == 0x38 || b2 == 0x3A) {
            uint32_t b3;
            TAKE(b3, 1);
            opcode = 0x0F0000u | b2 << 8 | b3;
            entry = b2 == 0x3A ? &TC_SSE_3A : &TC_SSE_38;
        } else {
            opcode = 0x0F00u | b2;
            entry = TC_TWO_BYTE[b2].mn ? &TC_TWO_BYTE[b2] : NULL;
        }
    } else {
        opcode = b;
        entry = TC_ONE_BYTE[b].mn ? &TC_ONE_BYTE[b] : NULL;
    }
    unsigned group = entry ? 0 : group_of(opcode);
    if (group) {
        int status = tc_need(&c, 1);
        if (status) return status;
        entry = group_slot(opcode, group, code[c.pos]);
        if (!entry) return TC_DECODE_INVALID;
    }
    if (!entry) return TC_DECODE_UNSUPPORTED;

    uint8_t modrm = 0;                          /* 3. ModRM / SIB / displacement */
    if (entry->has_modrm) {
        uint32_t v;
        TAKE(v, 1);
        modrm = (uint8_t)v;
        unsigned mod = modrm >> 6, rm = modrm & 7;
        if (mod == 3) {
            if (entry->memory_only) return TC_DECODE_INVALID;
            out->rm_kind = reg_kind(entry->rm_op >= 0 ? letter_size(entry->letter[entry->rm_op], osz) : osz);
            out->rm_num = (uint8_t)rm;
        } else if (adsz) {
            static const int8_t BASE16[8] = {3, 3, 5, 5, 6, 7, 5, 3};   /* bx bx bp bp si di bp bx */
            static const int8_t INDEX16[8] = {6, 7, 6, 7, -1, -1, -1, -1};
            int8_t base = BASE16[rm], index = INDEX16[rm];
            int32_t disp = 0;
            if (mod == 0 && rm == 6) {
                TAKE(v, 2);
                base = -1;
                disp = sext(v, 2);
            } else if (mod != 0) {
                TAKE(v, mod);
                disp = sext(v, mod);
            }
            out->mem = (tc_mem){1, (uint8_t)(seg >= 0 ? seg : (base == 5 ? TC_SS : TC_DS)), seg >= 0, 16,
                                base, index, 1, disp};
        } else {
            int8_t base, index = -1;
            unsigned scale = 1;
            if (rm == 4) {
                uint32_t sib;
                TAKE(sib, 1);
                scale = 1u << (sib >> 6);
                unsigned idx = (sib >> 3) & 7;
                index = idx == 4 ? -1 : (int8_t)idx;
                if (index < 0) scale = 1;
                unsigned base_num = sib & 7;
                base = (base_num == 5 && mod == 0) ? -1 : (int8_t)base_num;
            } else {
                base = (rm == 5 && mod == 0) ? -1 : (int8_t)rm;
            }
            int32_t disp = 0;
            if (mod == 1) {
                TAKE(v, 1);
                disp = sext(v, 1);
            } else if (mod == 2 || base < 0) {
                TAKE(v, 4);
                disp = (int32_t)v;
            }
            out->mem = (tc_mem){1, (uint8_t)(seg >= 0 ? seg : ((base == 4 || base == 5) ? TC_SS : TC_DS)),
                                seg >= 0, 32, base, index, (uint8_t)scale, disp};
        }
    }

    unsigned operand_size = opsz ? entry->operand_size16 : entry->operand_size32;   /* 4. operands */
    for (unsigned i = 0; i < entry->nops; i++) {
        char kind = entry->kind[i], letter = entry->letter[i];
        uint8_t special = entry->special[i];
        uint32_t v;
        if (special == 1) {                     /* AL */
            if (!out->reg_kind) { out->reg_kind = 1; out->reg_num = 0; }
        } else if (special == 2) {              /* eAX */
            if (!out->reg_kind) { out->reg_kind = reg_kind(osz); out->reg_num = 0; }
        } else if (kind == 'G') {
            out->reg_kind = reg_kind(letter_size(letter, osz));
            out->reg_num = (modrm >> 3) & 7;
        } else if (special == 4) {              /* Sw */
            unsigned num = (modrm >> 3) & 7;
            if (num >= 6) return TC_DECODE_INVALID;
            out->reg_kind = TC_REG_SEGMENT;
            out->reg_num = (uint8_t)num;
        } else if (kind == 'Z') {
            out->reg_kind = reg_kind(letter_size(letter, osz));
            out->reg_num = opcode & 7;
        } else if (special == 3) {              /* Ibs */
            TAKE(v, 1);
            uint32_t mask = operand_size >= 4 ? M32 : (1u << (8 * operand_size)) - 1;
            out->immediate = (uint32_t)sext(v, 1) & mask;
            out->has_immediate = 1;
        } else if (kind == 'I') {
            unsigned size = letter_size(letter, osz);
            TAKE(v, size);
            if (!out->has_immediate) { out->immediate = v; out->has_immediate = 1; }
            else { out->immediate2 = v; out->has_immediate2 = 1; }
        } else if (kind == 'J') {
            unsigned size = letter_size(letter, osz);
            TAKE(v, size);
            out->immediate = (uint32_t)sext(v, size);
            out->has_immediate = 1;
        } else if (kind == 'O') {
            unsigned size = adsz ? 2 : 4;
            TAKE(v, size);
            out->mem = (tc_mem){1, (uint8_t)(seg >= 0 ? seg : TC_DS), seg >= 0, adsz ? 16 : 32, -1, -1, 1,
                                sext(v, size)};
        } else if (special == 5) {              /* Ap */
            TAKE(v, osz);
            out->immediate = v;
            out->has_immediate = 1;
            TAKE(v, 2);
            out->immediate2 = v;
            out->has_immediate2 = 1;
        } else if (kind == 'X' || kind == 'Y') {
            tc_mem m = kind == 'X'
                ? (tc_mem){1, (uint8_t)(seg >= 0 ? seg : TC_DS), seg >= 0, adsz ? 16 : 32, 6, -1, 1, 0}
                : (tc_mem){1, TC_ES, 0, adsz ? 16 : 32, 7, -1, 1, 0};
            if (!out->mem.present) out->mem = m;
            else out->mem2 = m;
        }
    }
    out->is_string = entry->string;
    /* movs/cmps: the (overridable) source in mem, es:[edi] in mem2 */
    if (out->mem2.present && out->mem.segment == TC_ES && out->mem.base == 7 && !out->mem.overridden &&
        entry->kind[0] == 'Y') {
        tc_mem t = out->mem;
        out->mem = out->mem2;
        out->mem2 = t;
    }

    out->length = (uint8_t)c.pos;
    if (entry->branch && out->has_immediate) {
        uint32_t mask = osz == 2 ? 0xFFFFu : M32;
        out->branch_target = (address + out->length + out->immediate) & mask;
        out->has_branch_target = 1;
    }
    out->memory_size = (entry->mem_op >= 0 && out->mem.present) ? (uint8_t)letter_size(entry->letter[entry->mem_op], osz) : 0;
    uint16_t mn = entry->mn;
    if (mn == TC_MN_lea || mn == TC_MN_nop || mn == TC_MN_Q_hint_nop) out->memory_size = 0;
    if (opsz && TC_WORD_SPELLING[mn]) mn = TC_WORD_SPELLING[mn];
    if (rep)
        for (unsigned i = 0; i < TC_F3_COUNT; i++)
            if (TC_F3_SPELLING[i].opcode == opcode && TC_F3_SPELLING[i].mn == mn) { mn = TC_F3_SPELLING[i].spelled; break; }
    if (lock) {
        char first = entry->nops ? entry->kind[0] : 0;
        if (!TC_LOCKABLE[mn] || !out->mem.present || (first != 'E' && first != 'M')) return TC_DECODE_INVALID;
    }
    out->opcode = opcode;
    out->mn = mn;
    out->entry = entry;
    out->operand_size = (uint8_t)operand_size;
    return TC_DECODE_OK;
}

/* ------------------------------------------------------------------- walk */

/* A register's state on a path: not written on it (read the fault-time value), known, or unknown. */
enum { R_INPUT = 0, R_KNOWN = 1, R_UNKNOWN = 2 };

struct word { uint32_t address, value; uint8_t known; };

/* One store on a path (_Path.store, or call's return address): it makes every word whose four bytes it
 * overlaps unknown, and the word at `address` known when it wrote exactly that word with a known value.
 * `exact`: it touches only the word at `address` (call's push of its return address, as ahead.walk
 * records it). */
struct store_entry { uint32_t address, value; uint8_t size, known, exact; };

struct path {
    uint8_t state[8];
    uint32_t value[8];
    struct store_entry *stored; /* the stores on this path, oldest first */
    uint32_t nstored, capstored;
    uint8_t memory_unknown;
    uint32_t *seen;           /* addresses decoded on this path */
    uint32_t nseen, capseen;
    uint32_t address, count;
};

struct walk {
    const tc_guest_reader *guest;
    const tc_regs *regs;
    struct word *inputs;      /* memory words read, cached (ahead._Inputs.word) */
    uint32_t ninputs, capinputs;
    int oom;
    uint8_t reg_mask;         /* registers read at their fault-time value (bit n: eax..edi) */
    uint8_t code_failed;      /* an instruction did not decode (code that may be mapped later) */
};

static int grow(void **array, uint32_t *cap, uint32_t want, size_t item) {
    if (want <= *cap) return 1;
    uint32_t cap2 = *cap ? *cap * 2 : 16;
    while (cap2 < want) cap2 *= 2;
    void *p = realloc(*array, (size_t)cap2 * item);
    if (!p) return 0;
    *array = p;
    *cap = cap2;
    return 1;
}

static void path_free(struct path *p) {
    free(p->stored);
    free(p->seen);
}

static int path_copy(struct walk *w, const struct path *from, struct path *to) {
    *to = *from;
    to->stored = NULL; to->capstored = 0;
    to->seen = NULL; to->capseen = 0;
    if (!grow((void **)&to->stored, &to->capstored, from->nstored, sizeof *to->stored) ||
        !grow((void **)&to->seen, &to->capseen, from->nseen, sizeof *to->seen)) {
        path_free(to);
        w->oom = 1;
        return 0;
    }
    if (from->nstored) memcpy(to->stored, from->stored, from->nstored * sizeof *to->stored);
    if (from->nseen) memcpy(to->seen, from->seen, from->nseen * sizeof *to->seen);
    return 1;
}

/* _Inputs.word: the guest's word, read once per walk */
static int input_word(struct walk *w, uint32_t address, uint32_t *value) {
    for (uint32_t i = 0; i < w->ninputs; i++)
        if (w->inputs[i].address == address) { *value = w->inputs[i].value; return w->inputs[i].known; }
    uint32_t v = 0;
    int ok = w->guest->word(w->guest->ctx, address, &v) ? 1 : 0;
    if (!grow((void **)&w->inputs, &w->capinputs, w->ninputs + 1, sizeof *w->inputs)) { w->oom = 1; return 0; }
    w->inputs[w->ninputs++] = (struct word){address, v, (uint8_t)ok};
    *value = v;
    return ok;
}

/* _Path.reg for a 32-bit register number: 1 and *value when known */
static int reg32(struct walk *w, const struct path *p, unsigned num, uint32_t *value) {
    if (p->state[num] == R_UNKNOWN) return 0;
    if (p->state[num] == R_INPUT) w->reg_mask |= (uint8_t)(1u << num);
    *value = p->state[num] == R_KNOWN ? p->value[num] : w->regs->gpr[num];
    return 1;
}

/* _Path.reg for an operand register: only whole 32-bit registers are tracked */
static int reg_value(struct walk *w, const struct path *p, uint8_t kind, uint8_t num, uint32_t *value) {
    if (kind != 4) return 0;
    return reg32(w, p, num, value);
}

static void set32(struct path *p, unsigned num, int known, uint32_t value) {
    p->state[num] = known ? R_KNOWN : R_UNKNOWN;
    p->value[num] = known ? value : 0;
}

/* _Path.set_reg: a partial write makes the whole register unknown; segment registers are not tracked */
static void set_reg(struct path *p, uint8_t kind, uint8_t num, int known, uint32_t value) {
    if (kind == 1) set32(p, num & 3, 0, 0);
    else if (kind == 2) set32(p, num, 0, 0);
    else if (kind == 4) set32(p, num, known, value);
}

/* _Path.address */
static int address_of(struct walk *w, const struct path *p, const tc_mem *m, uint32_t *out) {
    if (m->address_size != 32) return 0;
    uint32_t v = (uint32_t)m->displacement, r;
    if (m->base >= 0) {
        if (!reg32(w, p, (unsigned)m->base, &r)) return 0;
        v += r;
    }
    if (m->index >= 0) {
        if (!reg32(w, p, (unsigned)m->index, &r)) return 0;
        v += r * m->scale;
    }
    *out = v;
    return 1;
}

/* _Path.stored[address]: the newest store touching the word at `address` decides it. 1: a store touched it
 * (*known, *value say what it left there); 0: none did. */
static int stored_word(const struct path *p, uint32_t address, int *known, uint32_t *value) {
    for (uint32_t i = p->nstored; i-- > 0;) {
        const struct store_entry *e = &p->stored[i];
        int touches = e->exact ? e->address == address
                               : (uint32_t)(address - e->address + 3u) < (uint32_t)(e->size + 3u);
        if (touches) {
            *known = e->known && e->address == address;
            *value = *known ? e->value : 0;
            return 1;
        }
    }
    return 0;
}

static void stored_add(struct walk *w, struct path *p, uint32_t address, unsigned size, int known, uint32_t value,
                       int exact) {
    if (!grow((void **)&p->stored, &p->capstored, p->nstored + 1, sizeof *p->stored)) { w->oom = 1; return; }
    p->stored[p->nstored++] = (struct store_entry){address, known ? value : 0, (uint8_t)size,
                                                   (uint8_t)(known && (exact || size == 4)), (uint8_t)exact};
}

/* _Path.load */
static int load(struct walk *w, struct path *p, uint32_t address, uint32_t *value) {
    int known;
    if (stored_word(p, address, &known, value)) return known;
    if (p->memory_unknown) return 0;
    return input_word(w, address, value);
}

/* _Path.store: every word the store overlaps becomes unknown, then a 4-byte one is known */
static void store(struct walk *w, struct path *p, uint32_t address, unsigned size, int known, uint32_t value) {
    stored_add(w, p, address, size, known, value, 0);
}

/* operand i is the accumulator by name (AL, eAX) */
static int is_accumulator(const tc_full_insn *in, unsigned i) {
    return i < in->entry->nops && (in->entry->special[i] == 1 || in->entry->special[i] == 2);
}

/* _Path.source */
static int source(struct walk *w, struct path *p, const tc_full_insn *in, unsigned i, uint32_t *value) {
    if (i >= in->entry->nops) return 0;
    char kind = in->entry->kind[i];
    if (kind == 'I') { *value = in->immediate; return in->has_immediate; }
    if (kind == 'G' || kind == 'Z' || is_accumulator(in, i))
        return reg_value(w, p, in->reg_kind, in->reg_num, value);
    if (kind == 'E') {
        if (in->rm_kind) return reg_value(w, p, in->rm_kind, in->rm_num, value);
        if (in->mem.present && in->mem.segment != TC_FS && in->mem.segment != TC_GS && in->operand_size == 4) {
            uint32_t a;
            if (!address_of(w, p, &in->mem, &a)) return 0;
            return load(w, p, a, value);
        }
    }
    return 0;
}

/* ahead._destination: 1 and (kind, num) when the first operand names a register */
static int destination(const tc_full_insn *in, uint8_t *kind, uint8_t *num) {
    if (!in->entry->nops) return 0;
    char first = in->entry->kind[0];
    if (first == 'G' || first == 'Z' || is_accumulator(in, 0)) {
        *kind = in->reg_kind; *num = in->reg_num;
        return in->reg_kind != TC_REG_NONE;
    }
    if (first == 'E' && in->rm_kind) {
        *kind = in->rm_kind; *num = in->rm_num;
        return 1;
    }
    return 0;
}

/* ahead._memory_write */
static void memory_write(struct walk *w, struct path *p, const tc_full_insn *in, int known, uint32_t value) {
    if (in->mem.segment == TC_FS || in->mem.segment == TC_GS) return;
    uint32_t a;
    if (!address_of(w, p, &in->mem, &a)) return;
    unsigned size = in->memory_size ? in->memory_size : in->operand_size ? in->operand_size : 4;
    store(w, p, a, size, known, value);
}

static int is_jcc(const tc_full_insn *in) {
    uint32_t op = in->opcode;
    int condition = (op >= 0x70 && op <= 0x7F) || (op >= 0x0F80 && op <= 0x0F8F) || (op >= 0x0F40 && op <= 0x0F4F) ||
                    (op >= 0x0F90 && op <= 0x0F9F);
    return condition && TC_MN_NAMES[in->mn][0] == 'j';
}

/* ahead._apply */
static void apply(struct walk *w, struct path *p, const tc_full_insn *in) {
    uint16_t m = in->mn;
    if (TC_MN_NAMES[m][0] == '?' && !TC_WALK_NOT_AN_ACCESS[m]) {
        for (unsigned r = 0; r < 8; r++) set32(p, r, 0, 0);
        return;
    }
    if (in->is_string) {
        set32(p, 1, 0, 0); set32(p, 6, 0, 0); set32(p, 7, 0, 0); set32(p, 0, 0, 0);
        if (in->entry->nops && in->entry->kind[0] == 'Y') p->memory_unknown = 1;
        return;
    }
    for (unsigned r = 0; r < 8; r++)
        if (TC_WALK_IMPLICIT[m] >> r & 1) set32(p, r, 0, 0);
    uint8_t dkind = 0, dnum = 0;
    int has_dest = destination(in, &dkind, &dnum);
    int push = m == TC_MN_push, pop = m == TC_MN_pop, leave = m == TC_MN_leave;
    uint32_t esp, ebp, v;
    if ((push || pop || leave) && in->operand_size != 4) {
        set32(p, 4, 0, 0);
        if (pop && has_dest) set_reg(p, dkind, dnum, 0, 0);
        if (leave) set32(p, 5, 0, 0);
        return;
    }
    if (push) {
        int known = source(w, p, in, 0, &v);
        if (reg32(w, p, 4, &esp)) {
            set32(p, 4, 1, esp - 4);
            store(w, p, esp - 4, 4, known, v);
        }
        return;
    }
    if (pop) {
        int known = 0;
        v = 0;
        if (reg32(w, p, 4, &esp)) {
            known = load(w, p, esp, &v);
            set32(p, 4, 1, esp + 4);
        } else {
            set32(p, 4, 0, 0);
        }
        if (has_dest) set_reg(p, dkind, dnum, known, v);
        else if (in->mem.present) memory_write(w, p, in, known, v);
        return;
    }
    if (leave) {
        if (reg32(w, p, 5, &ebp)) {
            int known = load(w, p, ebp, &v);
            set32(p, 4, 1, ebp + 4);
            set32(p, 5, known, v);
        } else {
            set32(p, 4, 0, 0);
            set32(p, 5, 0, 0);
        }
        return;
    }
    if (m == TC_MN_xchg || m == TC_MN_xadd || m == TC_MN_cmpxchg) {
        if (in->reg_kind) set_reg(p, in->reg_kind, in->reg_num, 0, 0);
        if (in->rm_kind) set_reg(p, in->rm_kind, in->rm_num, 0, 0);
        for (unsigned i = 0; i < in->entry->nops; i++)
            if (is_accumulator(in, i)) set32(p, 0, 0, 0);
        if (in->mem.present) memory_write(w, p, in, 0, 0);
        return;
    }
    if (TC_WALK_NO_REGISTER_WRITE[m] || (TC_WALK_NOT_AN_ACCESS[m] && m != TC_MN_lea) || is_jcc(in)) return;
    if (!has_dest) {
        if (in->mem.present) {
            int known = 0;
            v = 0;
            if (m == TC_MN_mov && in->operand_size == 4) known = source(w, p, in, 1, &v);
            memory_write(w, p, in, known, v);
        }
        return;
    }
    if (in->operand_size != 4) {
        set_reg(p, dkind, dnum, 0, 0);
        return;
    }
    if (m == TC_MN_mov) {
        int known = source(w, p, in, 1, &v);
        set_reg(p, dkind, dnum, known, v);
    } else if (m == TC_MN_lea) {
        int known = in->mem.present && address_of(w, p, &in->mem, &v);
        set_reg(p, dkind, dnum, known, v);
    } else if (TC_WALK_ALU[m]) {
        if ((m == TC_MN_xor || m == TC_MN_sub) && in->reg_kind && in->reg_kind == in->rm_kind &&
            in->reg_num == in->rm_num) {
            set_reg(p, dkind, dnum, 1, 0);
        } else {
            uint32_t a = 0, b = 0;
            int known = reg_value(w, p, dkind, dnum, &a) && source(w, p, in, 1, &b);
            uint32_t r = m == TC_MN_add ? a + b : m == TC_MN_sub ? a - b : m == TC_MN_and ? (a & b)
                       : m == TC_MN_or ? (a | b) : (a ^ b);
            set_reg(p, dkind, dnum, known, r);
        }
    } else if (m == TC_MN_inc || m == TC_MN_dec) {
        uint32_t a = 0;
        int known = reg_value(w, p, dkind, dnum, &a);
        set_reg(p, dkind, dnum, known, m == TC_MN_inc ? a + 1 : a - 1);
    } else {
        set_reg(p, dkind, dnum, 0, 0);
    }
}

/* ahead._gs_sign: +1 / -1, 0 (cannot be computed), 2 (no %gs access) */
static int gs_sign(struct walk *w, const struct path *p, const tc_full_insn *in) {
    if (TC_WALK_NOT_AN_ACCESS[in->mn]) return 2;
    const tc_mem *mems[2] = {&in->mem, &in->mem2};
    for (int i = 0; i < 2; i++) {
        if (mems[i]->present && mems[i]->segment == TC_GS) {
            uint32_t a;
            if (!address_of(w, p, mems[i], &a)) return 0;
            return (a & 0x80000000u) ? -1 : 1;
        }
    }
    return 2;
}

static int seen_has(const struct path *p, uint32_t address) {
    for (uint32_t i = 0; i < p->nseen; i++)
        if (p->seen[i] == address) return 1;
    return 0;
}

/* The instruction at address: from the reader's decode cache when it has one, else decoded into *buf.
 * NULL: no instruction there (nothing executable, or bytes that do not decode). */
static const tc_full_insn *decode_at(const tc_guest_reader *g, uint32_t address, tc_full_insn *buf) {
    tc_decode_cache *cache = g->cache;
    struct tc_decode_slot *slot = NULL;
    if (cache) {
        slot = &cache->slots[(address ^ address >> 12) & (TC_DECODE_CACHE_SLOTS - 1)];
        if (slot->valid && slot->insn.address == address) {
            cache->hits++;
            return &slot->insn;
        }
    }
    uint8_t bytes[MAX_INSN];
    size_t n = g->code(g->ctx, address, bytes, MAX_INSN);
    if (n == 0 || tc_decode_full(bytes, n, address, buf) != TC_DECODE_OK) return NULL;
    if (slot) {
        slot->insn = *buf;
        slot->valid = 1;
        cache->misses++;
    }
    return buf;
}

/* ahead.walk; `save`: where to record what it read, for the memo (NULL: nowhere) */
static int walk_fresh(const tc_guest_reader *guest, const tc_regs *regs, int sign, double threshold,
                      uint32_t budget, uint32_t *walked_out, struct tc_memo_entry *save) {
    struct walk w = {guest, regs, NULL, 0, 0, 0, 0, 0};
    if (save) save->valid = 0;
    uint32_t walked = 0;
    *walked_out = 0;
    tc_full_insn first_buf, here_buf;
    const tc_full_insn *first_insn = decode_at(guest, regs->eip, &first_buf);
    if (!first_insn) return TC_AHEAD_UNKNOWN;
    const tc_full_insn insn = *first_insn;
    uint16_t m0 = insn.mn;
    if (m0 == TC_MN_jmp || m0 == TC_MN_call || m0 == TC_MN_ret || m0 == TC_MN_retf || insn.has_branch_target ||
        TC_WALK_STOP[m0]) {
        if (save) *save = (struct tc_memo_entry){.valid = 1, .verdict = TC_AHEAD_UNKNOWN};
        return TC_AHEAD_UNKNOWN;
    }

    struct path *pending = NULL;
    uint32_t npending = 0, cappending = 0;
    int seen_long = 0, seen_short = 0, verdict = -2;
    struct path first;
    memset(&first, 0, sizeof first);
    apply(&w, &first, &insn);
    first.address = insn.address + insn.length;
    first.count = 1;
    if (!grow((void **)&pending, &cappending, 1, sizeof *pending)) { free(w.inputs); path_free(&first); return TC_AHEAD_NO_MEMORY; }
    pending[npending++] = first;

    while (npending && !w.oom) {
        struct path p = pending[--npending];
        int end = TC_AHEAD_UNKNOWN;
        uint32_t address = p.address, count = p.count;
        for (;;) {
            if ((double)count > threshold) { end = TC_AHEAD_LONG; break; }
            if (walked >= budget || seen_has(&p, address)) break;
            walked++;
            if (!grow((void **)&p.seen, &p.capseen, p.nseen + 1, sizeof *p.seen)) { w.oom = 1; break; }
            p.seen[p.nseen++] = address;
            const tc_full_insn *here_p = decode_at(guest, address, &here_buf);
            if (!here_p) { w.code_failed = 1; break; }
            const tc_full_insn here = *here_p;
            int s = gs_sign(&w, &p, &here);
            if (s != 2) {
                if (s == 0) break;
                if (s != sign) { end = TC_AHEAD_SHORT; break; }
                count++;
            }
            uint16_t m = here.mn;
            uint32_t after = address + here.length, esp, target;
            if (TC_WALK_STOP[m]) break;
            if (m == TC_MN_ret) {
                if (!reg32(&w, &p, 4, &esp) || !load(&w, &p, esp, &target)) break;
                set32(&p, 4, 1, esp + 4 + (here.has_immediate ? here.immediate : 0));
                address = target;
                continue;
            }
            if (m == TC_MN_call || m == TC_MN_jmp) {
                if (!here.has_branch_target) break;
                if (m == TC_MN_call && reg32(&w, &p, 4, &esp)) {
                    set32(&p, 4, 1, esp - 4);
                    stored_add(&w, &p, esp - 4, 4, 1, after, 1);
                }
                address = here.branch_target;
                continue;
            }
            if (here.has_branch_target) {          /* conditional: both ways, the branch taken first */
                apply(&w, &p, &here);
                struct path fork;
                if (!path_copy(&w, &p, &fork)) break;
                fork.address = after;
                fork.count = count;
                if (!grow((void **)&pending, &cappending, npending + 1, sizeof *pending)) {
                    path_free(&fork);
                    w.oom = 1;
                    break;
                }
                pending[npending++] = fork;
                address = here.branch_target;
                continue;
            }
            apply(&w, &p, &here);
            address = after;
        }
        path_free(&p);
        if (w.oom) break;
        seen_long |= end == TC_AHEAD_LONG;
        seen_short |= end == TC_AHEAD_SHORT;
        if (end == TC_AHEAD_UNKNOWN || (seen_long && seen_short)) { verdict = TC_AHEAD_UNKNOWN; break; }
    }
    for (uint32_t i = 0; i < npending; i++) path_free(&pending[i]);
    free(pending);
    *walked_out = walked;
    int result = w.oom ? TC_AHEAD_NO_MEMORY
               : verdict == TC_AHEAD_UNKNOWN ? TC_AHEAD_UNKNOWN : seen_long ? TC_AHEAD_LONG : TC_AHEAD_SHORT;
    if (save && !w.oom && !w.code_failed && w.ninputs <= TC_MEMO_WORDS) {
        save->verdict = result;
        save->walked = walked;
        save->reg_mask = w.reg_mask;
        for (unsigned r = 0; r < 8; r++) save->regs[r] = (w.reg_mask >> r & 1) ? regs->gpr[r] : 0;
        save->nwords = w.ninputs;
        for (uint32_t i = 0; i < w.ninputs; i++)
            save->words[i] = (struct tc_memo_word){w.inputs[i].address, w.inputs[i].value, w.inputs[i].known};
        save->valid = 1;
    }
    free(w.inputs);
    return result;
}

/* A memo entry serves while every input it read still reads the same: the walk is a function of them
 * (and of the code, which the owner of the memo drops it with). */
static int memo_holds(const tc_guest_reader *guest, const tc_regs *regs, const struct tc_memo_entry *e) {
    for (unsigned r = 0; r < 8; r++)
        if ((e->reg_mask >> r & 1) && regs->gpr[r] != e->regs[r]) return 0;
    for (uint32_t i = 0; i < e->nwords; i++) {
        uint32_t v = 0;
        int known = guest->word(guest->ctx, e->words[i].address, &v) ? 1 : 0;
        if ((uint32_t)known != e->words[i].known || (known && v != e->words[i].value)) return 0;
    }
    return 1;
}

int tc_lookahead(const tc_guest_reader *guest, const tc_regs *regs, int sign, double threshold,
                 uint32_t budget, uint32_t *walked, uint32_t *reused) {
    *reused = 0;
    tc_walk_memo *memo = guest->memo;
    if (!memo) return walk_fresh(guest, regs, sign, threshold, budget, walked, NULL);
    uint32_t eip = regs->eip;
    struct tc_memo_entry *e = &memo->slots[(eip ^ eip >> 12 ^ (uint32_t)(sign < 0)) & (TC_MEMO_SLOTS - 1)];
    if (e->valid && e->eip == eip && e->sign == sign && e->threshold == threshold && e->budget == budget &&
        memo_holds(guest, regs, e)) {
        memo->hits++;
        *reused = 1;
        *walked = 0;
        return e->verdict;
    }
    struct tc_memo_entry fresh;
    int verdict = walk_fresh(guest, regs, sign, threshold, budget, walked, &fresh);
    if (fresh.valid && verdict >= 0) {
        fresh.eip = eip;
        fresh.sign = sign;
        fresh.threshold = threshold;
        fresh.budget = budget;
        *e = fresh;
    }
    memo->misses++;
    return verdict;
}

/* ------------------------------------------------------------ region map */

static const tc_region *region_at(const tc_region_map *map, uint32_t address) {
    const tc_region *h = map->hint < map->count ? &map->regions[map->hint] : NULL;
    if (h && address >= h->start && (uint64_t)address < (uint64_t)h->start + h->size) return h;
    uint32_t lo = 0, hi = map->count;
    while (lo < hi) {                          /* the last region starting at or below address */
        uint32_t mid = (lo + hi) / 2;
        if (map->regions[mid].start <= address) lo = mid + 1;
        else hi = mid;
    }
    if (!lo) return NULL;
    const tc_region *r = &map->regions[lo - 1];
    if ((uint64_t)address >= (uint64_t)r->start + r->size) return NULL;
    ((tc_region_map *)map)->hint = lo - 1;     /* a cache of the last region found: not an input */
    return r;
}

/* [address, address + n) lies in one region with rights prot: that region, else NULL */
static const tc_region *within(const tc_region_map *map, uint32_t address, size_t n, uint32_t prot) {
    const tc_region *r = region_at(map, address);
    if (r && (r->prot & prot) && (uint64_t)address + n <= (uint64_t)r->start + r->size) return r;
    return NULL;
}

static int has_prot(const tc_region_map *map, uint32_t address, uint32_t prot) {
    const tc_region *r = region_at(map, address);
    return r && (r->prot & prot);
}

/* n bytes at address, across regions; 0 when a byte of them is in no region (a gap: nothing read) */
static int copy_out(const tc_region_map *map, uint32_t address, uint8_t *buf, size_t n) {
    for (size_t i = 0; i < n;) {
        const tc_region *r = region_at(map, address + (uint32_t)i);
        if (!r) return 0;
        uint32_t offset = address + (uint32_t)i - r->start;
        size_t chunk = r->size - offset;
        if (chunk > n - i) chunk = n - i;
        memcpy(buf + i, r->host + offset, chunk);
        i += chunk;
    }
    return 1;
}

/* lookahead.Lookahead.ahead's code_at: executable bytes at both ends, below the hypervisor */
size_t tc_regions_code(void *ctx, uint32_t address, uint8_t *buf, size_t n) {
    const tc_region_map *map = ctx;
    uint64_t room = address < map->below ? (uint64_t)map->below - address : 0;
    if (n > room) n = (size_t)room;
    const tc_region *r = n ? within(map, address, n, 4) : NULL;
    if (r) {                                   /* the common case: all of it in one executable region */
        memcpy(buf, r->host + (address - r->start), n);
        return n;
    }
    while (n > 0 && !(has_prot(map, address, 4) && has_prot(map, address + (uint32_t)n - 1, 4))) n--;
    return n && copy_out(map, address, buf, n) ? n : 0;
}

/* lookahead.Lookahead.ahead's read_word */
int tc_regions_word(void *ctx, uint32_t address, uint32_t *value) {
    const tc_region_map *map = ctx;
    if ((uint64_t)address + 4 > map->below) return 0;
    uint8_t b[4];
    const tc_region *r = within(map, address, 4, 1);
    if (r) memcpy(b, r->host + (address - r->start), 4);
    else if (!(has_prot(map, address, 1) && has_prot(map, address + 3, 1) && copy_out(map, address, b, 4)))
        return 0;
    *value = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    return 1;
}

int tc_lookahead_regions(const tc_region_map *map, const tc_regs *regs, int sign, double threshold,
                         uint32_t budget, uint32_t *walked, uint32_t *reused) {
    tc_guest_reader reader = {tc_regions_code, tc_regions_word, (void *)map, map->cache, map->memo};
    return tc_lookahead(&reader, regs, sign, threshold, budget, walked, reused);
}

/* The price of a walk: one walk (as the run makes it: the decode cache as the run left it), timed on the
 * monotonic clock. A repetition would find every instruction in the cache, so walks are timed once each;
 * tc_clock_overhead_ns gives what reading the clock twice adds, for the caller to subtract. */
int tc_lookahead_regions_timed(const tc_region_map *map, const tc_regs *regs, int sign, double threshold,
                               uint32_t budget, uint32_t *walked, uint32_t *reused, uint64_t *elapsed_ns) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int verdict = tc_lookahead_regions(map, regs, sign, threshold, budget, walked, reused);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    *elapsed_ns = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000u + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
    return verdict;
}

static int compare_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The median time between two back-to-back clock readings, over 1001 pairs. */
double tc_clock_overhead_ns(void) {
    enum { PAIRS = 1001 };
    static uint64_t d[PAIRS];
    struct timespec t0, t1;
    for (int i = 0; i < PAIRS; i++) {
        clock_gettime(CLOCK_MONOTONIC, &t0);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        d[i] = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000u + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
    }
    qsort(d, PAIRS, sizeof d[0], compare_u64);
    return (double)d[PAIRS / 2];
}

/* The decoder alone: a linear sweep over code[0..n) `rounds` times (a byte that does not decode is
 * skipped), timed. *decodes: instructions decoded; returns nanoseconds for all of them. */
uint64_t tc_decode_sweep_ns(const uint8_t *code, size_t n, uint32_t rounds, uint64_t *decodes) {
    struct timespec t0, t1;
    uint64_t count = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (uint32_t r = 0; r < rounds; r++) {
        for (size_t off = 0; off < n;) {
            tc_full_insn in;
            size_t left = n - off < MAX_INSN ? n - off : MAX_INSN;
            off += tc_decode_full(code + off, left, (uint32_t)off, &in) == TC_DECODE_OK ? in.length : 1;
            count++;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    *decodes = count;
    return (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000u + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
}
