/*
 * lookahead.c: online-lookahead, the rule of
 * tlslab/hypervisor/strategies/online_lookahead.py (its specification), with
 * the walk the model runs (tlslab/x86/_ahead.c: tc_lookahead) over the
 * tracee's memory instead of the model's host buffers:
 *
 *   - code and words are read with process_vm_readv (code through
 *     fetch_insn, which falls back on PEEKTEXT for execute-only pages, as the
 *     model reads code with PROT_EXEC alone); the page rights they need
 *     (executable code, readable words, as in the model) come from
 *     /proc/<tid>/maps, read whole once per walk (the supervisor does not see
 *     the guest's mappings change between faults; a mapping's name is the
 *     guest's to choose, so lines are read whole, never in pieces);
 *   - no decode cache and no memo (both are dropped in the model whenever
 *     code or mappings change, which the supervisor cannot tell): every fault
 *     walks afresh. The memo changes no decision in the model
 *     (tests/test_online_lookahead.py), so the decisions are the model's;
 *     only the count of instructions decoded differs (no reuses here);
 *   - the bound: the model reads nothing at or above the hypervisor's start,
 *     and maps nothing there. On this host a 32-bit task's stack lies above
 *     it (as decode.c says of the emulator's stack accesses), so the walk
 *     reads up to 4 GiB and the tracee's own page rights judge: the return
 *     addresses the model reads on its stack are read on the real one.
 *
 * The decision: long (every path shows more than 2F/E same-sign accesses):
 * flip; short (every path ends at the other sign within it): emulate;
 * unknown: what emulate does (emulate a negative offset, flip back on a
 * positive one). %fs: emulate, as every online rule.
 */
#include <fcntl.h>
#include <unistd.h>

#include "supervisor.h"
#include "_ahead.h"

struct tracee_memory {
    pid_t tid;
    int loaded;
    size_t n, cap;
    struct { uint32_t start, end, prot; } *maps;   /* start..end (exclusive), PROT_READ 1, PROT_EXEC 4 */
    struct supervisor *sv;
};

/* /proc/<tid>/maps: every mapping below 4 GiB with its r and x rights */
static void load_maps(struct tracee_memory *m) {
    char path[64], *line = NULL;
    size_t size = 0;
    m->loaded = 1;
    m->n = 0;
    snprintf(path, sizeof path, "/proc/%d/maps", (int)m->tid);
    FILE *fp = fopen(path, "r");
    if (!fp) return;                 /* nothing readable: every walk answers unknown */
    while (getline(&line, &size, fp) > 0) {   /* whole lines: a long file name cannot start a fake one */
        unsigned long long lo, hi;
        char perms[8];
        if (sscanf(line, "%llx-%llx %7s", &lo, &hi, perms) != 3 || lo >= (1ull << 32)) continue;
        if (hi > (1ull << 32)) hi = 1ull << 32;
        if (m->n == m->cap) {
            size_t cap = m->cap ? 2 * m->cap : 64;
            void *p = realloc(m->maps, cap * sizeof *m->maps);
            if (!p) die_setup(m->sv, "malloc (lookahead maps)", ENOMEM);
            m->maps = p;
            m->cap = cap;
        }
        m->maps[m->n].start = (uint32_t)lo;
        m->maps[m->n].end = (uint32_t)(hi - 1) + 1u;   /* 0 when the mapping ends at 4 GiB */
        m->maps[m->n].prot = (perms[0] == 'r' ? 1u : 0u) | (perms[2] == 'x' ? 4u : 0u);
        m->n++;
    }
    free(line);
    fclose(fp);
}

static int has_prot(struct tracee_memory *m, uint32_t address, uint32_t prot) {
    if (!m->loaded) load_maps(m);
    for (size_t i = 0; i < m->n; i++) {
        uint64_t end = m->maps[i].end ? m->maps[i].end : (1ull << 32);
        if (address >= m->maps[i].start && address < end) return (m->maps[i].prot & prot) != 0;
    }
    return 0;
}

/* lookahead.guest_readers' code_at: executable bytes at both ends */
static size_t tracee_code(void *ctx, uint32_t address, uint8_t *buf, size_t n) {
    struct tracee_memory *m = ctx;
    uint64_t room = (1ull << 32) - address;
    if (n > room) n = (size_t)room;
    while (n > 0 && !(has_prot(m, address, 4) && has_prot(m, address + (uint32_t)n - 1, 4))) n--;
    uint8_t bytes[16];               /* fetch_insn's buffer: up to 16 */
    if (n == 0 || n > 15 || fetch_insn(m->tid, address, bytes) < (int)n) return 0;
    memcpy(buf, bytes, n);
    return n;
}

/* lookahead.guest_readers' read_word: a readable 32-bit word */
static int tracee_word(void *ctx, uint32_t address, uint32_t *value) {
    struct tracee_memory *m = ctx;
    uint8_t b[4];
    if ((uint64_t)address + 4 > (1ull << 32)) return 0;
    if (!(has_prot(m, address, 1) && has_prot(m, address + 3, 1))) return 0;
    if (read_mem(m->tid, address, b, 4) < 0) return 0;
    *value = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    return 1;
}

/* online-lookahead (LookaheadStrategy.decide) */
int online_lookahead_fault(struct supervisor *sv, struct fault *f) {
    struct online *on = &sv->online;
    if (f->in.seg != TC_GS) return online_emulate(sv, f);
    int sign = access_sign(f->slot, &f->in);
    tc_regs regs;
    core_regs(&f->regs, &regs);
    struct tracee_memory mem = {.tid = f->t->tid, .sv = sv};
    tc_guest_reader reader = {tracee_code, tracee_word, &mem, NULL, NULL};
    uint32_t walked = 0, reused = 0;
    int verdict = sign ? tc_lookahead(&reader, &regs, sign, on->threshold, on->budget, &walked, &reused)
                       : TC_AHEAD_UNKNOWN;   /* an offset the decoder could not compute: as emulate */
    free(mem.maps);
    if (verdict == TC_AHEAD_NO_MEMORY) die_setup(sv, "malloc (lookahead walk)", ENOMEM);
    on->count.lookahead_instructions += walked;
    if (verdict == TC_AHEAD_LONG) {
        on->count.ahead_flip++;
        return online_flip(sv, f);
    }
    if (verdict == TC_AHEAD_SHORT) {
        on->count.ahead_emulate++;
        return online_emulate(sv, f);
    }
    if (sign > 0) {
        on->count.flip_back++;
        return online_flip(sv, f);
    }
    return online_emulate(sv, f);
}
