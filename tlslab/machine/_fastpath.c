/*
 * tlslab machine fast path: the per-access and per-block work that would cost
 * several microseconds per event as Python callbacks (docs/measurements.md#hook-costs: a Python
 * callback plus reg_read(EIP) costs ~5 us; a ~1.6 M-instruction guest makes
 * ~12,000 fs/gs accesses and ~300,000 block entries).
 *
 * This file holds no x86 semantics of its own. Whether (descriptor, offset,
 * size, write) is allowed is the shared native core's segment check
 * (tlslab/x86/_core.c: tc_check, held to tlslab.x86.segcheck by
 * tests/test_core_differential.py; the ptrace supervisor uses the same core).
 * The rest is a memo in front of Python:
 *   - which segment an instruction at EIP uses, and whether a fault there may
 *     be settled here                           -> asked once per site
 *   - how many instructions a translation block has -> asked once per block
 *   - what the strategy's flip rule gives        -> asked once per key
 * and counters.
 *
 * Window mechanism (see tlslab/machine/layout.py): the base Unicorn sees for
 * fs/gs points into a window region above guest user space where every guest
 * region is aliased, as an MMIO region with *no* permissions whose read and
 * write callbacks (fp_mmio_read/fp_mmio_write) reach the guest's own buffer.
 * Unicorn (2.1.4, cputlb.c load/store helpers) asks the READ_PROT /
 * WRITE_PROT hook, fp_on_prot, about every access to such a region *before*
 * it happens -- MMIO pages never get a fast-path TLB entry -- and the hook
 * decides it: true lets it through to the callbacks, false raises
 * READ_PROT/WRITE_PROT for this very access, and Unicorn stops precisely at
 * the instruction with nothing of it done (tested for
 * mov/add/inc/pop/push/xchg/cmpxchg). The guest's own page rights (mprotect)
 * are checked here too, from the alias table.
 *
 * Why not UC_HOOK_MEM_READ/WRITE: with any such hook installed, however
 * ranged, Unicorn sends *every* guest load and store through its slow path
 * (tcg-target.inc.c: tcg_uc_has_hookmem), which cost a third of the guest's
 * speed; a PROT hook costs nothing where it does not fire. And why MMIO, not a
 * second RAM mapping of the buffer: a RAM page with no read permission asks
 * the hook once and is then read from the TLB unchecked (measured); an MMIO
 * page asks every time. The hypervisor pages are RAM with no permissions: a
 * write always asks; a read is let through for the GDT page only (Xen maps it
 * read-only), so a TLB entry can never open anything else; the host flushes
 * the TLB after its own accesses there, and maps the entry stub only while it
 * enters ring 3 (VCpu.enter_user_mode: a page Unicorn executed from was
 * readable afterwards without asking).
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_core.h"

typedef int (*reg_read_fn)(void *uc, int regid, void *value);
/* how the instruction at eip uses segments, packed 4 bits each (tlslab.x86.segusage):
 * fs/gs prefix (0 none), read register, write register, second read register (15 none) */
typedef int (*classify_site_fn)(uint32_t eip);
/* 1 = allowed, 0 = segment violation */
typedef int (*verdict_fn)(int slot, uint32_t generation, uint32_t offset, int size, int write);
typedef uint32_t (*block_icount_fn)(uint32_t address, uint32_t size);
/* settling by flip: the flipped descriptor's generation * 2 + (1 if it is expand-down), or -1 when
 * the strategy would not flip (a genuine fault: Python decides) */
typedef int64_t (*flip_target_fn)(int slot, uint32_t generation, uint32_t offset, int size);
typedef int (*emu_stop_fn)(void *uc);

#define SEG_FS 4
#define SEG_GS 5

#define SITE_SLOTS (1u << 15)
#define FLIP_SLOTS (1u << 14)
#define GENERATION_SLOTS 4096u  /* descriptors the core checks directly; later ones ask Python (segcheck) */
#define VERDICT_SLOTS (1u << 16)
#define BLOCK_SLOTS (1u << 18)
/* A two-way front for `blocks` (16 KB: L1-sized, a few TLB entries): the 4 MB table alone cost a
 * cache or TLB miss on almost every guest block (perf on lsr [4k]: half the block hook's samples
 * on that one load), while a program's hot blocks are few (there, 99 % of lookups hit the front). */
#define BLOCK_CACHE_BITS 11
#define BLOCK_CACHE_SLOTS (1u << BLOCK_CACHE_BITS)
#define ALIAS_SLOTS 8192
#define CLOCK_EVERY 65536u     /* guest instructions between clock reads (about 2 ms at 40 M/s) */

/* Settling faults in the hook (issue 14 item 2): the strategies whose answer to a #GP the hook can
 * give without leaving Unicorn. Everything else, and every fault these decline, goes to Python. */
enum { SETTLE_OFF = 0, SETTLE_EMULATE = 1, SETTLE_FLIP = 2 };
/* per-site bits from classify_site (bits 20..), computed in Python by the strategy's own rules */
#define SITE_SETTLE_EMULATE (1u << 20)
#define SITE_SETTLE_FLIP (1u << 21)
#define SITE_SETTLE_STACK_WRITE (1u << 22)  /* the instruction also pushes (push, call): ss:[esp - size] */
#define SITE_SETTLE_STACK_READ (1u << 23)   /* the instruction also pops (pop): ss:[esp] */
#define SITE_SETTLE_ACCESSES_SHIFT 24
#define UC_PROT_EXEC_ 4u

enum { EXIT_NONE = 0, EXIT_SEGMENT_VIOLATION = 1, EXIT_KERNEL_ACCESS = 2, EXIT_TABLE_FULL = 3, EXIT_PAGE_FAULT = 4 };

/* One window per GDT TLS slot: the slot's descriptor is installed in Unicorn's
 * GDT with base real_base + shift, so whichever of fs/gs loads it reaches the
 * window. The hook reads the selector to find the slot. */
struct window {
    uint32_t real_base;     /* the base the guest's descriptor holds */
    uint32_t user_top;      /* first linear address above guest user space */
    uint32_t base;          /* the base Unicorn uses for the slot (in the window) */
    uint32_t generation;    /* interned id of the slot's current descriptor */
    int32_t slot;           /* GDT index, 0 = unused */
    int32_t pad;
    int32_t emulate_generation; /* settling by emulation: the descriptor the emulator applies (what the
                                 * guest asked for), -1 = none */
    int32_t changed;        /* a settled flip changed `generation`: Python's copy is stale until it reads it */
};

/* Access statistics per segment register (fs, gs). */
struct seg_stats {
    int32_t last_sign;      /* +1 / -1 / 0: sign of the previous access */
    int32_t pad;
    uint64_t accesses, negative, positive, sign_changes;
    /* optional sign-run trace: runs[i] = +length or -length; the current run
     * is not yet stored (run_length). NULL = tracing off. */
    int32_t *runs;
    uint32_t runs_capacity, runs_count;
    uint32_t run_length, runs_dropped;
};

/* Segment registers, numbered as in x86 encodings. */
enum { R_ES = 0, R_CS = 1, R_SS = 2, R_DS = 3, R_FS = 4, R_GS = 5, R_NONE = 15 };

struct site {
    uint32_t eip;           /* 0 = empty slot */
    int32_t seg;            /* the fs/gs prefix (SEG_FS / SEG_GS) or 0: for statistics */
    uint8_t read_seg, write_seg, second_read_seg, stale;  /* register each access uses; stale: code patched */
    uint32_t rmw;           /* the explicit operand is read then written: check the write at the read */
    uint32_t settle;        /* SETTLE_* bits: may a fault here be settled in the hook (from Python, per strategy) */
    uint32_t settle_accesses;  /* accesses an emulation of this instruction performs (Python's count) */
    uint64_t accesses, reads, writes, negative, positive, violations;
    uint32_t min_offset, max_offset;   /* as signed 32-bit, compared signed */
};

/* An entry of the front (block_cache): 8 bytes, so that two ways share a cache line. A block whose
 * size or count does not fit 16 bits (none does: Unicorn's blocks are far shorter) is never cached. */
struct block_front {
    uint32_t address;
    uint16_t size, icount;  /* all zero = empty (an empty block counts 0 instructions, so a lookup of
                             * one that lands on an empty entry still gets its count) */
};

struct block {
    uint32_t address, size; /* size 0 = empty slot */
    uint32_t icount, pad;
};

/* What the hook settled since Python last looked (Python adds it to the strategy's and the
 * machine's counters after every run) and how it may settle. */
struct settle {
    int32_t mode;              /* SETTLE_OFF / SETTLE_EMULATE / SETTLE_FLIP */
    int32_t segments;          /* 1 << R_FS | 1 << R_GS: registers whose faults the strategy fixes */
    int32_t regid_ss, regid_esp;
    uint32_t flat_ss;          /* the flat user data selector: a stack through it is emulated flat */
    int32_t pad2;
    flip_target_fn flip_target;
    uint64_t faults[2];        /* settled faults on fs, gs */
    uint64_t emulated_accesses, flips_down, flips_up, segment_loads;
    uint32_t pending_eip, pending_linear;  /* an emulated read-modify-write: its write half is let through */
    int32_t pending, pad;
};

struct exit_info {
    int32_t kind;
    int32_t seg;
    uint32_t eip, offset, linear;
    int32_t size, write;
};

/* hypervisor = 0: an alias of guest memory (perms = the guest's rights to the mirrored pages);
 * hypervisor = 1: the hypervisor pages (GDT, entry stub). */
struct alias_region { uint32_t start, size, perms, hypervisor; };

struct fastpath {
    void *uc;
    reg_read_fn reg_read;
    int32_t regid_eip;
    int32_t nwindows;
    int32_t regid_seg[6];             /* unicorn register ids of es, cs, ss, ds, fs, gs */
    int32_t regid_esi, regid_edi;
    classify_site_fn classify_site;
    verdict_fn verdict;
    block_icount_fn block_icount;
    /* The block counter, laid out as Unicorn's inline counter reads it (uc_tlslab_inline_counter,
     * third_party/unicorn): instructions at +0, count_limit at +8, the current block at +16..+24.
     * Translated code (or fp_on_block's fast path under a stock Unicorn) only adds a block's count
     * while instructions < count_limit; at or past it fp_on_block's general case runs. So
     * count_limit is never above the budget or the next clock read, and whoever changes what the
     * general case decides by (the budget, budget_first, split_bytes, the deadline) sets it to 0. */
    uint64_t instructions;      /* counted at block entry, corrected on precise stops */
    uint64_t count_limit;
    uint32_t cur_block_address, cur_block_size, cur_block_icount, pad;
    uint64_t verdict_misses, site_misses, block_misses;
    uint32_t last_eip, last_linear;   /* read-modify-write: one access, two events */
    uint32_t hv_lo, hv_hi;            /* hypervisor pages (GDT): plain reads allowed */
    int32_t host_access, pad2;        /* set while Python makes Unicorn read the GDT */
    int32_t last_was_read, nalias;
    /* Wall-clock limit, read every CLOCK_EVERY instructions. Unicorn's own
     * emu_start timeout starts a watcher thread per call that polls every few
     * microseconds: with one emu_start per guest syscall or fault that thread
     * costs more than the guest (measured ~2.8x) and takes the other core
     * away from a second bench worker. */
    emu_stop_fn emu_stop;
    uint64_t deadline_ns;             /* CLOCK_MONOTONIC (Python's time.monotonic_ns); 0 = none */
    uint64_t clock_check_at;          /* read the clock when instructions reach this (with deadline_ns) */
    uint32_t budget_hit, pad5;
    /* Instruction budget (a scheduler quantum): stop before the first block
     * that starts at or beyond it, without counting that block; 0 = none. */
    uint64_t budget_end;
    /* Set when a run resumes inside the block a fault stopped (after the faulting instruction, or
     * at it): that resumption is not a block boundary of the program, and a fault settled in the
     * hook has none there, so it is not preempted (VCpu.run). */
    uint32_t budget_first, pad3;
    struct settle settle;
    struct exit_info exit;
    struct window windows[3];
    struct seg_stats stats[2];  /* [0] = fs, [1] = gs */
    struct site sites[SITE_SLOTS];
    uint64_t verdict_keys[VERDICT_SLOTS];   /* key + 1, 0 = empty */
    uint8_t verdict_values[VERDICT_SLOTS];
    struct block blocks[BLOCK_SLOTS];
    struct alias_region alias[ALIAS_SLOTS];   /* sorted by start */
    uint64_t flip_keys[FLIP_SLOTS];           /* key + 1, 0 = empty: (generation, offset, size) */
    int64_t flip_values[FLIP_SLOTS];
    tc_descriptor generations[GENERATION_SLOTS];   /* the descriptor behind each generation number */
    uint8_t generation_known[GENERATION_SLOTS];
    /* An unaligned store to MMIO is retried byte by byte after the hook allowed it whole, and
     * Unicorn asks the WRITE_PROT hook again for each byte (cputlb.c store_helper; reads are not
     * asked again): those `split_bytes` one-byte writes inside [split_lo, split_hi) are the same
     * store, neither judged nor counted again. */
    uint32_t split_lo, split_hi, split_bytes, pad4;
    struct block_front block_cache[BLOCK_CACHE_SLOTS];   /* front of `blocks`, same entries */
};

size_t fp_sizeof(void) { return sizeof(struct fastpath); }

/* the inline counter's area (uc_tlslab_inline_counter) is &fp->instructions */
_Static_assert(offsetof(struct fastpath, count_limit) == offsetof(struct fastpath, instructions) + 8, "area+8");
_Static_assert(offsetof(struct fastpath, cur_block_address) == offsetof(struct fastpath, instructions) + 16, "area+16");
_Static_assert(offsetof(struct fastpath, cur_block_size) == offsetof(struct fastpath, instructions) + 20, "area+20");
_Static_assert(offsetof(struct fastpath, cur_block_icount) == offsetof(struct fastpath, instructions) + 24, "area+24");

/* The layout Python's ctypes mirrors (fastpath.py) must match, checked when
 * the library loads: a field moved here without its mirror would otherwise
 * corrupt memory silently. One row per field of every mirrored struct, plus a
 * row with field NULL giving the struct's size. struct block and alias_region
 * are filled only from C, so Python has no mirror of them to check. */
struct fp_layout_row { const char *type, *field; size_t offset, size; };
#define FP_FIELD(T, f) { #T, #f, offsetof(struct T, f), sizeof(((struct T *)0)->f) }
#define FP_SIZE(T) { #T, NULL, 0, sizeof(struct T) }
static const struct fp_layout_row fp_layout_rows[] = {
    FP_SIZE(exit_info),
    FP_FIELD(exit_info, kind), FP_FIELD(exit_info, seg), FP_FIELD(exit_info, eip), FP_FIELD(exit_info, offset),
    FP_FIELD(exit_info, linear), FP_FIELD(exit_info, size), FP_FIELD(exit_info, write),
    FP_SIZE(window),
    FP_FIELD(window, real_base), FP_FIELD(window, user_top), FP_FIELD(window, base), FP_FIELD(window, generation),
    FP_FIELD(window, slot), FP_FIELD(window, pad), FP_FIELD(window, emulate_generation),
    FP_FIELD(window, changed),
    FP_SIZE(seg_stats),
    FP_FIELD(seg_stats, last_sign), FP_FIELD(seg_stats, pad), FP_FIELD(seg_stats, accesses),
    FP_FIELD(seg_stats, negative), FP_FIELD(seg_stats, positive), FP_FIELD(seg_stats, sign_changes),
    FP_FIELD(seg_stats, runs), FP_FIELD(seg_stats, runs_capacity), FP_FIELD(seg_stats, runs_count),
    FP_FIELD(seg_stats, run_length), FP_FIELD(seg_stats, runs_dropped),
    FP_SIZE(settle),
    FP_FIELD(settle, mode), FP_FIELD(settle, segments), FP_FIELD(settle, regid_ss), FP_FIELD(settle, regid_esp),
    FP_FIELD(settle, flat_ss), FP_FIELD(settle, pad2), FP_FIELD(settle, flip_target), FP_FIELD(settle, faults),
    FP_FIELD(settle, emulated_accesses), FP_FIELD(settle, flips_down), FP_FIELD(settle, flips_up),
    FP_FIELD(settle, segment_loads), FP_FIELD(settle, pending_eip), FP_FIELD(settle, pending_linear),
    FP_FIELD(settle, pending), FP_FIELD(settle, pad),
    FP_SIZE(site),
    FP_FIELD(site, eip), FP_FIELD(site, seg), FP_FIELD(site, read_seg), FP_FIELD(site, write_seg),
    FP_FIELD(site, second_read_seg), FP_FIELD(site, stale), FP_FIELD(site, rmw), FP_FIELD(site, settle),
    FP_FIELD(site, settle_accesses), FP_FIELD(site, accesses),
    FP_FIELD(site, reads), FP_FIELD(site, writes), FP_FIELD(site, negative), FP_FIELD(site, positive),
    FP_FIELD(site, violations), FP_FIELD(site, min_offset), FP_FIELD(site, max_offset),
    FP_SIZE(fastpath),
    FP_FIELD(fastpath, uc), FP_FIELD(fastpath, reg_read), FP_FIELD(fastpath, regid_eip), FP_FIELD(fastpath, nwindows),
    FP_FIELD(fastpath, regid_seg), FP_FIELD(fastpath, regid_esi), FP_FIELD(fastpath, regid_edi),
    FP_FIELD(fastpath, classify_site), FP_FIELD(fastpath, verdict), FP_FIELD(fastpath, block_icount),
    FP_FIELD(fastpath, instructions), FP_FIELD(fastpath, count_limit), FP_FIELD(fastpath, cur_block_address), FP_FIELD(fastpath, cur_block_size),
    FP_FIELD(fastpath, cur_block_icount), FP_FIELD(fastpath, pad), FP_FIELD(fastpath, verdict_misses),
    FP_FIELD(fastpath, site_misses), FP_FIELD(fastpath, block_misses),
    FP_FIELD(fastpath, last_eip), FP_FIELD(fastpath, last_linear),
    FP_FIELD(fastpath, hv_lo), FP_FIELD(fastpath, hv_hi), FP_FIELD(fastpath, host_access), FP_FIELD(fastpath, pad2),
    FP_FIELD(fastpath, last_was_read), FP_FIELD(fastpath, nalias), FP_FIELD(fastpath, emu_stop),
    FP_FIELD(fastpath, deadline_ns), FP_FIELD(fastpath, clock_check_at), FP_FIELD(fastpath, budget_hit),
    FP_FIELD(fastpath, pad5),
    FP_FIELD(fastpath, budget_end), FP_FIELD(fastpath, budget_first), FP_FIELD(fastpath, pad3),
    FP_FIELD(fastpath, settle), FP_FIELD(fastpath, exit), FP_FIELD(fastpath, windows), FP_FIELD(fastpath, stats),
    FP_FIELD(fastpath, sites), FP_FIELD(fastpath, verdict_keys), FP_FIELD(fastpath, verdict_values),
    FP_FIELD(fastpath, blocks), FP_FIELD(fastpath, alias), FP_FIELD(fastpath, flip_keys),
    FP_FIELD(fastpath, flip_values), FP_FIELD(fastpath, generations), FP_FIELD(fastpath, generation_known),
    FP_FIELD(fastpath, split_lo), FP_FIELD(fastpath, split_hi), FP_FIELD(fastpath, split_bytes),
    FP_FIELD(fastpath, pad4), FP_FIELD(fastpath, block_cache),
};

/* Row i of the table: 1 and its values, or 0 past the end. */
int fp_layout(int i, const char **type, const char **field, size_t *offset, size_t *size)
{
    if (i < 0 || (size_t)i >= sizeof fp_layout_rows / sizeof fp_layout_rows[0])
        return 0;
    *type = fp_layout_rows[i].type;
    *field = fp_layout_rows[i].field;
    *offset = fp_layout_rows[i].offset;
    *size = fp_layout_rows[i].size;
    return 1;
}

/* Python keeps this sorted list of alias regions in step with guest mappings. */
int fp_set_aliases(struct fastpath *fp, const uint32_t *starts, const uint32_t *sizes, const uint32_t *perms,
                   const uint32_t *hypervisor, int n)
{
    if (n > ALIAS_SLOTS)
        return -1;
    for (int i = 0; i < n; i++) {
        fp->alias[i].start = starts[i];
        fp->alias[i].size = sizes[i];
        fp->alias[i].perms = perms[i];
        fp->alias[i].hypervisor = hypervisor[i];
    }
    fp->nalias = n;
    return 0;
}

static inline uint32_t mix32(uint64_t key)
{
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (uint32_t)key;
}

/* Store what classify_site says about the instruction at eip (tlslab.x86.segusage). */
static void classify(struct fastpath *fp, struct site *s, uint32_t eip)
{
    int usage = fp->classify_site(eip);
    s->seg = usage & 15;
    s->read_seg = (usage >> 4) & 15;
    s->write_seg = (usage >> 8) & 15;
    s->second_read_seg = (usage >> 12) & 15;
    s->rmw = (usage >> 16) & 1;
    s->settle = (uint32_t)usage & (SITE_SETTLE_EMULATE | SITE_SETTLE_FLIP | SITE_SETTLE_STACK_WRITE |
                                   SITE_SETTLE_STACK_READ);
    s->settle_accesses = ((uint32_t)usage >> SITE_SETTLE_ACCESSES_SHIFT) & 15;
    s->stale = 0;
}

static struct site *find_site(struct fastpath *fp, uint32_t eip)
{
    uint32_t i = mix32(eip) & (SITE_SLOTS - 1);
    for (uint32_t n = 0; n < SITE_SLOTS; n++, i = (i + 1) & (SITE_SLOTS - 1)) {
        struct site *s = &fp->sites[i];
        if (s->eip == eip && s->seg != -1) {
            if (s->stale)  /* the code was patched: ask again, keep the counters */
                classify(fp, s, eip);
            return s;
        }
        if (s->eip == 0 && s->seg == -1) {
            fp->site_misses++;
            s->eip = eip;
            classify(fp, s, eip);
            s->min_offset = 0x7fffffff;
            s->max_offset = 0x80000000u;
            return s;
        }
    }
    return NULL;
}

void fp_reset_sites(struct fastpath *fp)
{
    memset(fp->sites, 0, sizeof fp->sites);
    for (uint32_t i = 0; i < SITE_SLOTS; i++)
        fp->sites[i].seg = -1;
}

/* The slots of the site table in use, in table order, up to `cap` (the count in use is returned):
 * Python reads those records only, instead of copying the whole table at every process exit. */
uint32_t fp_used_sites(const struct fastpath *fp, uint32_t *out, uint32_t cap)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < SITE_SLOTS; i++) {
        if (fp->sites[i].eip == 0)
            continue;
        if (n < cap)
            out[n] = i;
        n++;
    }
    return n;
}

/* Code in [lo, hi) changed: sites whose instruction may overlap it are re-classified. */
void fp_forget_sites(struct fastpath *fp, uint32_t lo, uint32_t hi)
{
    uint32_t from = lo > 15 ? lo - 15 : 0;
    for (uint32_t i = 0; i < SITE_SLOTS; i++) {
        struct site *s = &fp->sites[i];
        if (s->seg != -1 && s->eip >= from && s->eip < hi)
            s->stale = 1;
    }
}

void fp_reset_verdicts(struct fastpath *fp)
{
    memset(fp->verdict_keys, 0, sizeof fp->verdict_keys);
}

void fp_reset_blocks(struct fastpath *fp)
{
    memset(fp->blocks, 0, sizeof fp->blocks);
    memset(fp->block_cache, 0, sizeof fp->block_cache);
}

/* The flip rule's answers are a pure function of (descriptor, offset, size): memoised here. */
void fp_reset_flips(struct fastpath *fp)
{
    memset(fp->flip_keys, 0, sizeof fp->flip_keys);
}

static int64_t lookup_flip(struct fastpath *fp, int slot, uint32_t generation, uint32_t offset, int size)
{
    uint64_t key = ((uint64_t)(generation & 0xffffff) << 40) ^ ((uint64_t)(slot & 15) << 36) ^
                   ((uint64_t)(size & 15) << 32) ^ offset;
    uint32_t i = mix32(key) & (FLIP_SLOTS - 1);
    for (uint32_t n = 0; n < 64; n++, i = (i + 1) & (FLIP_SLOTS - 1)) {
        if (fp->flip_keys[i] == key + 1)
            return fp->flip_values[i];
        if (fp->flip_keys[i] == 0) {
            int64_t v = fp->settle.flip_target(slot, generation, offset, size);
            fp->flip_keys[i] = key + 1;
            fp->flip_values[i] = v;
            return v;
        }
    }
    return fp->settle.flip_target(slot, generation, offset, size);
}

/* Python interned a descriptor (8 bytes as in the GDT) under `generation`: the core checks it here. */
void fp_set_generation(struct fastpath *fp, uint32_t generation, uint64_t raw)
{
    if (generation >= GENERATION_SLOTS)
        return;
    tc_descriptor_decode(raw, &fp->generations[generation]);
    fp->generation_known[generation] = 1;
}

static int lookup_verdict(struct fastpath *fp, int seg, uint32_t generation,
                          uint32_t offset, int size, int write)
{
    if (generation < GENERATION_SLOTS && fp->generation_known[generation])
        return tc_check(&fp->generations[generation], offset, (uint32_t)size, write) == TC_ACCESS_ALLOWED;
    uint64_t key = ((uint64_t)(generation & 0xffffff) << 40) ^ ((uint64_t)(seg & 7) << 37) ^
                   ((uint64_t)(write & 1) << 36) ^ ((uint64_t)(size & 15) << 32) ^ offset;
    uint32_t i = mix32(key) & (VERDICT_SLOTS - 1);
    for (uint32_t n = 0; n < 64; n++, i = (i + 1) & (VERDICT_SLOTS - 1)) {
        if (fp->verdict_keys[i] == key + 1)
            return fp->verdict_values[i];
        if (fp->verdict_keys[i] == 0) {
            fp->verdict_misses++;
            int v = fp->verdict(seg, generation, offset, size, write);
            fp->verdict_keys[i] = key + 1;
            fp->verdict_values[i] = (uint8_t)v;
            return v;
        }
    }
    /* probe sequence exhausted: ask without memoising (correct, just slower) */
    fp->verdict_misses++;
    return fp->verdict(seg, generation, offset, size, write);
}

static struct alias_region *alias_at(struct fastpath *fp, uint32_t linear)
{
    int lo = 0, hi = fp->nalias - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        struct alias_region *r = &fp->alias[mid];
        if (linear < r->start) hi = mid - 1;
        else if (linear - r->start >= r->size) lo = mid + 1;
        else return r;
    }
    return NULL;
}

/* Refuse the access in flight (fp_on_prot then says no). The first refusal of a run records the
 * exit; later ones in the same translation block (possible after a store that Unicorn could not stop
 * precisely) are refused too, but keep the first record. */
static void refuse(struct fastpath *fp, int kind)
{
    if (fp->exit.kind == EXIT_NONE)
        fp->exit.kind = kind;
}

/* May the guest's page rights let this access through? Both ends: an access
 * may straddle two regions with different rights (Unicorn asks about a split
 * access once, for the whole of it). */
static int page_rights_allow(struct fastpath *fp, uint32_t linear, int size, int write)
{
    uint32_t need = write ? 2u /* UC_PROT_WRITE */ : 1u /* UC_PROT_READ */;
    struct alias_region *a = alias_at(fp, linear);
    struct alias_region *b = alias_at(fp, linear + (uint32_t)size - 1);
    if (a == NULL || b == NULL)
        return 1;  /* not mapped: Unicorn raises the unmapped error itself */
    return (a->hypervisor || (a->perms & need)) && (b->hypervisor || (b->perms & need));
}

/* The MMIO callbacks of an alias region: the access was judged and allowed by fp_on_prot; perform
 * it on the guest's buffer (user = its host address; x86 hosts are little-endian, as the guest). */
uint64_t fp_mmio_read(void *uc, uint64_t offset, unsigned size, void *user)
{
    uint64_t value = 0;
    (void)uc;
    memcpy(&value, (const uint8_t *)user + offset, size <= 8 ? size : 8);
    return value;
}

void fp_mmio_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *user)
{
    (void)uc;
    memcpy((uint8_t *)user + offset, &value, size <= 8 ? size : 8);
}

/* The window a segment register's current selector points at, or NULL for a
 * flat (or null) segment. */
static struct window *window_of(struct fastpath *fp, void *uc, int reg, uint32_t *selector_out)
{
    uint32_t selector = 0;
    fp->reg_read(uc, fp->regid_seg[reg], &selector);
    selector &= 0xffff;
    *selector_out = selector;
    if (selector & 4)
        return NULL;  /* LDT selectors: no windows (never reached: no LDT is set up) */
    int slot = (int)(selector >> 3);
    for (int k = 0; k < fp->nwindows; k++)
        if (fp->windows[k].slot == slot && slot != 0)
            return &fp->windows[k];
    return NULL;
}

/* May the segment check let this access through the descriptor `generation`? The read of a
 * read-modify-write through the register it writes with is refused if the write would be: the CPU
 * checks write permission before reading (*write_refused says that was the reason). */
static int judge(struct fastpath *fp, const struct site *site, const struct window *w, uint32_t generation,
                 int reg, uint32_t offset, int size, int write, int *write_refused)
{
    if (!lookup_verdict(fp, w->slot, generation, offset, size, write))
        return 0;
    if (!write && site->rmw && reg == site->write_seg &&
        !lookup_verdict(fp, w->slot, generation, offset, size, 1)) {
        *write_refused = 1;
        return 0;
    }
    return 1;
}

/* May an emulator perform this access in guest memory? The guest's page rights allow it, and a
 * write does not touch code (Python's emulator drops translations there: not settled here). */
static int emulator_may_touch(struct fastpath *fp, uint32_t linear, int size, int write)
{
    uint32_t need = write ? 2u /* UC_PROT_WRITE */ : 1u /* UC_PROT_READ */;
    struct alias_region *a = alias_at(fp, linear);
    struct alias_region *b = alias_at(fp, linear + (uint32_t)size - 1);
    if (a == NULL || b == NULL || a->hypervisor || b->hypervisor)
        return 0;
    if (!(a->perms & need) || !(b->perms & need))
        return 0;
    return !write || !((a->perms | b->perms) & UC_PROT_EXEC_);
}

/* The implicit stack access of a push, call or pop through fs/gs, as an emulator would make it:
 * through a flat %ss only, inside guest user space, with the guest's page rights (looked up through
 * the slot's window, which aliases every guest region), never writing code. */
static int stack_access_ok(struct fastpath *fp, void *uc, const struct site *site, const struct window *w,
                           int size)
{
    int push = (site->settle & SITE_SETTLE_STACK_WRITE) != 0;
    if (!push && !(site->settle & SITE_SETTLE_STACK_READ))
        return 1;
    uint32_t ss = 0, esp = 0;
    fp->reg_read(uc, fp->settle.regid_ss, &ss);
    fp->reg_read(uc, fp->settle.regid_esp, &esp);
    if ((ss & 0xffff) != fp->settle.flat_ss)
        return 0;
    uint32_t at = push ? esp - (uint32_t)size : esp;
    uint32_t last = at + (uint32_t)size - 1;
    if ((push && at > esp) || last < at || last >= w->user_top)
        return 0;
    return emulator_may_touch(fp, at + (w->base - w->real_base), size, push);
}

enum { NOT_SETTLED, SETTLED_EMULATED, SETTLED_FLIPPED };

/* A refused fs/gs access: can the strategy's answer be given here, without leaving Unicorn?
 *
 * emulate: the emulator would perform the access through the descriptor the guest asked for
 * (w->emulate_generation), refusing the hypervisor hole and anything outside guest user space. The
 * window aliases guest memory at exactly that linear address, so letting the access through *is*
 * the emulated access, and the CPU then completes the instruction and moves EIP past it. Only
 * instructions whose every access is this one explicit operand are settled (Python marks them per
 * site), so nothing else of the instruction escapes the check.
 *
 * flip: the strategy's flip rule (memoised) gives the new descriptor; it has the same base, so
 * Unicorn's view of the slot does not change, only the descriptor the hook judges by. The caller
 * judges the access again under it, as the restarted instruction would be.
 *
 * Anything else -- another strategy, an instruction form not marked, a genuine fault, an access the
 * emulator would refuse -- is NOT_SETTLED: refused as before, and Python's strategy decides. */
static int settle_fault(struct fastpath *fp, void *uc, const struct site *site, struct window *w, int reg,
                        uint32_t eip, uint32_t linear, uint32_t offset, uint32_t real_linear, int size, int write)
{
    struct settle *st = &fp->settle;
    if (st->mode == SETTLE_OFF || (reg != R_FS && reg != R_GS) || !(st->segments & (1 << reg)))
        return NOT_SETTLED;
    if (st->mode == SETTLE_EMULATE) {
        int rmw_read = !write && site->rmw && reg == site->write_seg;
        int write_refused = 0;
        uint32_t last = real_linear + (uint32_t)size - 1;
        if (!(site->settle & SITE_SETTLE_EMULATE) || site->settle_accesses == 0 || w->emulate_generation < 0)
            return NOT_SETTLED;
        if (!judge(fp, site, w, (uint32_t)w->emulate_generation, reg, offset, size, write, &write_refused))
            return NOT_SETTLED;
        if (real_linear >= w->user_top || last >= w->user_top || last < real_linear)
            return NOT_SETTLED;
        if (!emulator_may_touch(fp, linear, size, write) || (rmw_read && !emulator_may_touch(fp, linear, size, 1)))
            return NOT_SETTLED;
        if (!stack_access_ok(fp, uc, site, w, size))
            return NOT_SETTLED;
        st->faults[reg == R_GS]++;
        st->emulated_accesses += site->settle_accesses;
        if (rmw_read) {
            st->pending = 1;
            st->pending_eip = eip;
            st->pending_linear = linear;
        }
        return SETTLED_EMULATED;
    }
    if (!(site->settle & SITE_SETTLE_FLIP))
        return NOT_SETTLED;
    int64_t flipped = lookup_flip(fp, w->slot, w->generation, offset, size);
    if (flipped < 0)
        return NOT_SETTLED;
    w->generation = (uint32_t)(flipped >> 1);
    w->changed = 1;
    st->faults[reg == R_GS]++;
    if (flipped & 1)
        st->flips_down++;
    else
        st->flips_up++;
    for (int r = R_FS; r <= R_GS; r++) {
        /* the way back to the guest reloads every register holding the slot (VCpu.set_descriptor) */
        uint32_t selector = 0;
        fp->reg_read(uc, fp->regid_seg[r], &selector);
        selector &= 0xffff;
        if (selector && !(selector & 4) && (int)(selector >> 3) == w->slot)
            st->segment_loads++;
    }
    return SETTLED_FLIPPED;
}

/* Judge one access to the watched region (above guest user space); refuse() it or let it be. */
static void judge_access(struct fastpath *fp, void *uc, uint32_t linear, int size, int write)
{
    uint32_t eip = 0;
    fp->reg_read(uc, fp->regid_eip, &eip);
    if (fp->settle.pending) {
        fp->settle.pending = 0;
        if (write && eip == fp->settle.pending_eip && linear == fp->settle.pending_linear)
            return;  /* the write half of a read-modify-write emulated at its read */
    }
    struct site *site = find_site(fp, eip);
    if (fp->exit.kind != EXIT_NONE) {
        /* a refusal is pending in this block: refuse everything else too */
        refuse(fp, fp->exit.kind);
        return;
    }
    fp->exit.eip = eip;
    fp->exit.size = size;
    fp->exit.write = write;
    if (site == NULL) {
        refuse(fp, EXIT_TABLE_FULL);
        return;
    }
    int reg = write ? site->write_seg : site->read_seg;
    uint32_t selector = 0;
    struct window *w = window_of(fp, uc, reg, &selector);
    if (!write && site->second_read_seg != R_NONE) {
        /* cmps: the first read is through `reg` at esi, the second through es at edi */
        uint32_t esi = 0;
        fp->reg_read(uc, fp->regid_esi, &esi);
        uint32_t base = w ? w->base : 0;
        if (linear - base != esi) {
            reg = site->second_read_seg;
            w = window_of(fp, uc, reg, &selector);
        }
    }
    fp->exit.seg = reg;
    if (w == NULL && !write && linear >= fp->hv_lo && linear < fp->hv_hi)
        return;  /* descriptor-table reads by the CPU itself (segment loads), or the guest
                  * reading its read-only GDT, as Xen maps it */
    if (w == NULL) {
        /* a flat (or null) segment: a plain access into the region above
         * guest user space (guest kernel / hypervisor) */
        fp->exit.linear = linear;
        fp->exit.offset = linear;
        refuse(fp, EXIT_KERNEL_ACCESS);
        return;
    }
    /* Unicorn computed linear = window base + offset (mod 2^32), so the
     * offset is exact wherever in the hooked region the access landed. */
    uint32_t offset = linear - w->base;
    uint32_t real_linear = offset + w->real_base;
    fp->exit.offset = offset;
    fp->exit.linear = real_linear;
    int write_refused = 0;
    int allowed = judge(fp, site, w, w->generation, reg, offset, size, write, &write_refused);
    if (!allowed) {
        site->violations++;
        int settled = settle_fault(fp, uc, site, w, reg, eip, linear, offset, real_linear, size, write);
        if (settled == SETTLED_EMULATED)
            return;
        if (settled == SETTLED_FLIPPED) {
            write_refused = 0;
            allowed = judge(fp, site, w, w->generation, reg, offset, size, write, &write_refused);
            if (!allowed)
                site->violations++;  /* the restarted instruction faults again: Python's turn */
        }
    }
    if (!allowed) {
        if (write_refused)
            fp->exit.write = 1;  /* #GP at the read of a read-modify-write, for its write */
        refuse(fp, EXIT_SEGMENT_VIOLATION);
        return;
    }
    if (real_linear >= w->user_top || real_linear + (uint32_t)size - 1 >= w->user_top ||
        real_linear + (uint32_t)size - 1 < real_linear) {
        /* the segment admits it, but no guest page is there */
        refuse(fp, EXIT_PAGE_FAULT);
        return;
    }
    if (!page_rights_allow(fp, linear, size, write) ||
        (!write && site->rmw && reg == site->write_seg && !page_rights_allow(fp, linear, size, 1))) {
        /* the segment admits it, but the guest's page rights do not (mprotect) */
        if (!write && site->rmw)
            fp->exit.write = 1;
        refuse(fp, EXIT_PAGE_FAULT);
        return;
    }
    /* the write half of a read-modify-write is the same access */
    int same_access = write && fp->last_was_read && fp->last_eip == eip && fp->last_linear == linear;
    fp->last_eip = eip;
    fp->last_linear = linear;
    fp->last_was_read = !write;
    if (write) site->writes++; else site->reads++;
    if (same_access || (reg != R_FS && reg != R_GS))
        return;  /* statistics are about %fs/%gs accesses */
    int32_t soff = (int32_t)offset;
    int sign = soff < 0 ? -1 : 1;
    struct seg_stats *st = &fp->stats[reg == R_GS];
    st->accesses++;
    if (sign < 0) st->negative++; else st->positive++;
    if (st->last_sign != 0 && st->last_sign != sign) {
        st->sign_changes++;
        if (st->runs) {
            if (st->runs_count < st->runs_capacity)
                st->runs[st->runs_count++] = st->last_sign * (int32_t)st->run_length;
            else
                st->runs_dropped++;
        }
        st->run_length = 0;
    }
    st->run_length++;
    st->last_sign = sign;
    site->accesses++;
    if (sign < 0) site->negative++; else site->positive++;
    if (soff < (int32_t)site->min_offset) site->min_offset = (uint32_t)soff;
    if (soff > (int32_t)site->max_offset) site->max_offset = (uint32_t)soff;
}

/* UC_HOOK_MEM_READ_PROT | UC_HOOK_MEM_WRITE_PROT over the watched region: every access to an alias
 * (MMIO, no permissions) or a hypervisor page, before it happens. true = let it through. */
bool fp_on_prot(void *uc, int type, uint64_t address, int size, int64_t value, void *user)
{
    struct fastpath *fp = user;
    uint32_t linear = (uint32_t)address;
    int write = type == 22; /* UC_MEM_WRITE_PROT in unicorn.h */
    (void)value;
    if (fp->host_access)
        return true;  /* the host (not the guest) is loading a segment register or entering ring 3 */
    if (fp->split_bytes) {
        if (write && size == 1 && linear >= fp->split_lo && linear < fp->split_hi) {
            fp->split_bytes--;
            return true;  /* one byte of a store judged whole (see split_bytes) */
        }
        fp->split_bytes = 0;
    }
    judge_access(fp, uc, linear, size, write);
    if (fp->exit.kind != EXIT_NONE)
        return false;
    if (write && size > 1 && (linear & (uint32_t)(size - 1))) {
        fp->split_lo = linear;
        fp->split_hi = linear + (uint32_t)size;
        fp->split_bytes = (uint32_t)size;
        fp->count_limit = 0;   /* the next block resets split_bytes: the general case */
    }
    return true;
}

static inline void front_fill(struct block_front *f, uint32_t a, uint32_t size, uint32_t icount)
{
    if (size <= 0xffff && icount <= 0xffff) {
        f->address = a;
        f->size = (uint16_t)size;
        f->icount = (uint16_t)icount;
    }
}

/* The block table behind the front (`block_cache`): the second way, then the table (asking Python
 * once per block), refilling the front's first way. */
static __attribute__((noinline)) uint32_t block_icount_slow(struct fastpath *fp, struct block_front *front,
                                                            uint32_t a, uint32_t size)
{
    if (front[1].size == size && front[1].address == a) {
        struct block_front hit = front[1];
        front[1] = front[0];
        front[0] = hit;
        return hit.icount;
    }
    front[1] = front[0];
    front[0] = (struct block_front){0, 0, 0};   /* whole: a stale address or count must not match later */
    uint32_t i = mix32(((uint64_t)a << 20) ^ size) & (BLOCK_SLOTS - 1);
    for (uint32_t n = 0; n < 256; n++, i = (i + 1) & (BLOCK_SLOTS - 1)) {
        struct block *b = &fp->blocks[i];
        if (b->size == size && b->address == a) {
            front_fill(&front[0], a, size, b->icount);
            return b->icount;
        }
        if (b->size == 0) {
            fp->block_misses++;
            b->address = a;
            b->size = size;
            b->icount = fp->block_icount(a, size);
            front_fill(&front[0], a, size, b->icount);
            return b->icount;
        }
    }
    fp->block_misses++;
    return fp->block_icount(a, size);  /* table full: asked every time, still exact */
}

static inline struct block_front *block_front_of(struct fastpath *fp, uint32_t a, uint32_t size)
{
    return &fp->block_cache[(((a ^ size) * 0x9E3779B1u) >> (32 - BLOCK_CACHE_BITS)) & ~1u];
}

/* The instruction count up to which blocks may be counted without on_block_general: the
 * budget's end and the next clock read, whichever is first. */
static uint64_t next_count_limit(const struct fastpath *fp)
{
    uint64_t limit = UINT64_MAX;
    uint64_t budget_end = __atomic_load_n(&fp->budget_end, __ATOMIC_RELAXED);
    uint64_t clock_check_at = __atomic_load_n(&fp->clock_check_at, __ATOMIC_RELAXED);
    if (budget_end && budget_end < limit)
        limit = budget_end;
    if (__atomic_load_n(&fp->deadline_ns, __ATOMIC_RELAXED) && clock_check_at < limit)
        limit = clock_check_at;
    return limit;
}

/* The block hook's general case: instructions at or past count_limit (a time slice to watch, a
 * clock read due, or something set count_limit to 0), or, under a stock Unicorn, the count not in
 * the front's first way. A block stopped by the time slice does not run now: it is not counted
 * (it is, when it does run). It ends by setting count_limit, the point up to which the common case
 * may count on its own. */
static __attribute__((noinline)) void on_block_general(struct fastpath *fp, void *uc, uint32_t a, uint32_t size)
{
    struct block_front *front = block_front_of(fp, a, size);
    uint32_t icount = (front[0].size == size && front[0].address == a)
        ? front[0].icount : block_icount_slow(fp, front, a, size);
    int first = fp->budget_first;
    fp->budget_first = 0;
    fp->split_bytes = 0;
    if (fp->budget_end && !first && fp->instructions >= fp->budget_end) {
        fp->budget_hit = 1;
        fp->budget_end = 0;
        fp->count_limit = 0;
        fp->emu_stop(uc);
        return;
    }
    if (fp->deadline_ns && fp->instructions >= fp->clock_check_at) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        fp->clock_check_at = fp->instructions + CLOCK_EVERY;
        if ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec >= fp->deadline_ns)
            fp->emu_stop(uc);  /* emu_start returns with no error and no exit: the run loop's TIMEOUT */
    }
    fp->instructions += icount;
    fp->cur_block_address = a;
    fp->cur_block_size = size;
    fp->cur_block_icount = icount;
    fp->count_limit = next_count_limit(fp);
    /* request_stop_all (another thread, on Ctrl-C) sets deadline_ns, clock_check_at and then
     * count_limit = 0; had it done so between the read above and the store, the store undid it.
     * Look again after a full fence (this path is rare: a clock read is due every CLOCK_EVERY). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t again = next_count_limit(fp);
    if (again < fp->count_limit)
        fp->count_limit = again;
}

/* UC_HOOK_BLOCK, or the slow call of Unicorn's inline counter: count retired instructions a block
 * at a time. As a hook it runs for every guest block (Unicorn calls it directly from translated
 * code), so the common case -- below count_limit and the count in the front's first way -- is a
 * leaf with a few loads and stores, the same work the inline counter does in translated code;
 * everything else is on_block_general. */
void fp_on_block(void *uc, uint64_t address, uint32_t size, void *user)
{
    struct fastpath *fp = user;
    uint32_t a = (uint32_t)address;
    const struct block_front *front = block_front_of(fp, a, size);
    if (__builtin_expect(front[0].size != size || front[0].address != a || fp->instructions >= fp->count_limit, 0)) {
        on_block_general(fp, uc, a, size);
        return;
    }
    uint32_t icount = front[0].icount;
    fp->instructions += icount;
    fp->cur_block_address = a;
    fp->cur_block_size = size;
    fp->cur_block_icount = icount;
}
