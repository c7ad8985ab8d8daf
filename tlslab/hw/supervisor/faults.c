/*
 * faults.c: the #GP path and the strategy table. A SIGSEGV stop with si_code
 * SI_KERNEL is a general protection fault; handle_segv decodes the faulting
 * instruction, counts the fault at its site, checks that it is an access
 * through a managed TLS slot and hands it (a struct fault) to the strategy's
 * handler in strategies[]: emulate_fault (perform the access, or single-step
 * it with the descriptor that admits it), flip_fault (switch the slot between
 * its truncated form and the expand-down twin and restart), or the online
 * strategies' choice between the two (online.c). Faults that are not ours
 * are delivered to the guest.
 */
#include "supervisor.h"


/* a form the core does not decode (or a step-only fault), counted by key */
static void note_miss(struct supervisor *sv, const char *key) {
    for (int i = 0; i < sv->nmisses; i++)
        if (!strcmp(sv->misses[i].key, key)) { sv->misses[i].n++; return; }
    if (sv->nmisses < MISS_CAP) {
        snprintf(sv->misses[sv->nmisses].key, sizeof sv->misses[sv->nmisses].key, "%s", key);
        sv->misses[sv->nmisses++].n = 1;
    }
}

/* a fault the guest gets (the first one's reason is reported) */
void record_delivery(struct supervisor *sv, struct site *s, uint32_t eip, const char *why) {
    COUNT(sv, delivered);
    if (s) s->delivered++;
    if (!sv->first_delivered[0]) snprintf(sv->first_delivered, sizeof sv->first_delivered, "eip %#x: %s", eip, why);
}

/* The sign of the faulting access's offset (its top bit, as the model's
 * `-1 if offset & 0x80000000 else 1`): +1, -1, or 0 when the offset is
 * unknown (a form the core does not decode).
 * Then the slot's state tells: only a negative offset faults on the
 * truncated expand-up form, only a positive one on the expand-down twin
 * (anything else is a genuine fault, refused on the way); on the empty
 * descriptor every access faults, so the sign stays unknown. */
int access_sign(const struct slot *sl, const struct insn *in) {
    if (in->has_mem) return (in->off & 0x80000000u) ? -1 : 1;
    return sl->state == ST_UP ? -1 : sl->state == ST_DOWN ? 1 : 0;
}

/* flip: the truncated expand-up form <-> its expand-down twin, and restart;
 * returns the signal to deliver (0: restart). Genuine faults are refused:
 * the other state must admit the access (tc_flip's check); for a form the
 * core does not decode, an instruction that faults in both states. */
int flip_fault(struct supervisor *sv, struct fault *f) {
    struct thread *t = f->t;
    struct slot *sl = f->slot;
    const struct insn *in = &f->in;
    int go_down = sl->state != ST_DOWN;
    if (in->has_mem) {
        if (!slot_flip_admits(sl, sv->opt.hv_start, in->off, in->size)) {
            record_delivery(sv, f->site, f->eip, "genuine fault: flipping does not admit the access");
            return SIGSEGV;
        }
    } else {
        note_miss(sv, in->miss);
        if (t->last_fault_eip == f->eip && t->last_fault_flipped) {
            t->last_fault_flipped = 0;
            record_delivery(sv, f->site, f->eip, "genuine fault: faulted in both states");
            return SIGSEGV;
        }
    }
    install_state(sv, t, sl, go_down ? ST_DOWN : ST_UP);
    if (go_down) { COUNT(sv, to_down); if (f->site) f->site->to_down++; }
    else { COUNT(sv, to_up); if (f->site) f->site->to_up++; }
    t->last_fault_eip = f->eip;
    t->last_fault_flipped = 1;
    return 0;
}

/* emulate: perform the access for the guest and advance EIP; returns the
 * signal to deliver (0: done). The core emulates (decode.c: the access must
 * fit the descriptor the guest asked for and stay below the hypervisor).
 * Forms the core does not decode (and every
 * form under --step-only) are single-stepped once with the descriptor that
 * admits the access's sign -- the expand-down twin for a negative offset
 * (only addresses below the base: nothing in the hypervisor hole), the
 * truncated expand-up form for a positive one -- and end_step then puts back
 * the slot's current state (f->step = 1). */
int emulate_fault(struct supervisor *sv, struct fault *f) {
    struct thread *t = f->t;
    struct slot *sl = f->slot;
    struct insn *in = &f->in;
    t->last_fault_flipped = 0;
    if (in->has_mem && !sv->opt.step_only) {
        struct ctx c = {.tid = t->tid, .seg = in->seg, .hv_start = sv->opt.hv_start};
        udesc_to_core(&sl->requested, &c.requested);
        if (emulate(&c, in, &f->regs) < 0) {
            record_delivery(sv, f->site, f->eip, c.why[0] ? c.why : "cannot emulate");
            return SIGSEGV;
        }
        if (ptrace(PTRACE_SETREGS, t->tid, 0, &f->regs) < 0) die_setup(sv, "PTRACE_SETREGS", errno);
        COUNT(sv, emulated);
        if (f->site) f->site->emulated++;
        return 0;
    }
    note_miss(sv, in->has_mem ? "step-only" : in->miss);
    const struct udesc *with = access_sign(sl, in) > 0 ? &sl->up : &sl->dn;
    if (set_area(t->tid, with) < 0) die_setup(sv, "PTRACE_SET_THREAD_AREA", errno);
    COUNT(sv, switches);
    t->stepping = 1;
    t->step_entry = f->entry;
    t->step_eip = f->eip;
    COUNT(sv, stepped);
    if (f->site) f->site->stepped++;
    f->step = 1;
    return 0;
}

/* after the single step: the slot's current state again (expand-up, the
 * twin, or the empty descriptor of a probe started at this fault) */
void end_step(struct supervisor *sv, struct thread *t) {
    struct slot *sl = &t->slots[t->step_entry - TLS_FIRST];
    if (set_area(t->tid, slot_desc(sl, sl->state)) < 0) die_setup(sv, "PTRACE_SET_THREAD_AREA", errno);
    COUNT(sv, switches);
    t->stepping = 0;
}

/* The strategies, indexed by S_*: what each does to the guest's descriptors
 * and its answer to a #GP on a managed slot. untraced and native answer none
 * (native runs traced with the descriptors as the guest asked, so a #GP there
 * is the guest's own). */
const struct strategy strategies[S_COUNT] = {
    [S_UNTRACED] = {"untraced", .traced = 0},
    [S_NATIVE] = {"native", .traced = 1},
    [S_EMULATE] = {"emulate", .traced = 1, .truncating = 1, .on_fault = emulate_fault},
    [S_FLIP] = {"flip", .traced = 1, .truncating = 1, .on_fault = flip_fault},
    [S_ONLINE_SITE] = {"online-site", .traced = 1, .truncating = 1, .online = 1,
                       .on_fault = online_site_fault},
    [S_ONLINE_RATE] = {"online-rate", .traced = 1, .truncating = 1, .online = 1,
                       .on_fault = online_rate_fault},
    [S_ONLINE_PROBE] = {"online-probe", .traced = 1, .truncating = 1, .online = 1,
                        .on_fault = online_probe_fault},
    [S_ONLINE_LOOKAHEAD] = {"online-lookahead", .traced = 1, .truncating = 1, .online = 1,
                            .on_fault = online_lookahead_fault},
    [S_ONLINE_PATCH] = {"online-patch", .traced = 1, .truncating = 1, .online = 1, .patches = 1,
                        .on_fault = online_patch_fault},
};

/* The fault's bookkeeping: the totals, its image, --trace, and its site
 * (the first fault there records the instruction bytes; b: n bytes fetched). */
static void count_fault(struct supervisor *sv, const struct fault *f, const uint8_t *b, int n) {
    const struct insn *in = &f->in;
    struct site *s = f->site;
    int image = image_of(sv, f->t);
    COUNT(sv, faults);
    if (image >= 0) sv->images[image].faults++;
    if (sv->trace) fprintf(sv->trace, "%#x %d\n", f->eip, in->has_mem ? (int32_t)in->off : 0);
    if (!s) return;
    s->faults++;
    s->seg = in->seg;
    if (!s->nbytes) { memcpy(s->bytes, b, n); s->nbytes = in->len ? in->len : n; }
    if (in->has_mem) {
        int64_t o = (int32_t)in->off;
        if (o < s->off_min) s->off_min = o;
        if (o > s->off_max) s->off_max = o;
        if (o < 0) s->neg++; else s->pos++;
    }
}

/* A SIGSEGV stop of t: a #GP through a managed TLS slot goes to the
 * strategy's handler; anything else is the guest's. Returns the signal to
 * deliver on resume (0 = suppress); *step = 1 to single-step. */
int handle_segv(struct supervisor *sv, struct thread *t, int *step) {
    const struct strategy *strategy = sv->opt.strategy;
    struct fault f = {.t = t};
    siginfo_t si;
    *step = 0;
    if (ptrace(PTRACE_GETSIGINFO, t->tid, 0, &si) < 0) return SIGSEGV;
    if (si.si_code != SI_KERNEL) { COUNT(sv, other_segv); return SIGSEGV; }
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &f.regs) < 0) return SIGSEGV;
    f.eip = (uint32_t)f.regs.rip;
    uint8_t b[16];
    int n = fetch_insn(t->tid, f.eip, b);
    if (sv->cpuid && cpuid_fault(sv, t, &f.regs, b, n)) return 0; /* CPUID faulting: the model's answer */
    if (!strategy->on_fault) { COUNT(sv, other_segv); return SIGSEGV; }
    decode(b, n, &f.regs, &f.in);
    if (f.in.seg != TC_FS && f.in.seg != TC_GS) { COUNT(sv, other_segv); return SIGSEGV; }
    uint32_t sel = (uint32_t)(f.in.seg == TC_FS ? f.regs.fs : f.regs.gs) & 0xFFFF;
    f.entry = sel >> SEL_INDEX_SHIFT;
    f.site = site_of(sv, image_of(sv, t), f.eip);
    count_fault(sv, &f, b, n);
    if (strategy->patches) { /* online-patch: the fs-twin ABI's checks, %fs faults at rewritten sites */
        int d = patch_trap(sv, &f, sel);
        if (d >= 0) return d;
    }
    if ((sel & SEL_LDT) || f.entry < TLS_FIRST || f.entry >= TLS_FIRST + TLS_SLOTS) {
        record_delivery(sv, f.site, f.eip, "segment is not a GDT TLS slot");
        return SIGSEGV;
    }
    f.slot = &t->slots[f.entry - TLS_FIRST];
    if (!f.slot->valid || !f.slot->managed) {
        record_delivery(sv, f.site, f.eip, "segment is not a truncated flat segment");
        return SIGSEGV;
    }
    int deliver = strategy->on_fault(sv, &f);
    *step = f.step;
    return deliver;
}
