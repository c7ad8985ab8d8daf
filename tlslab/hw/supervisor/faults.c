/*
 * faults.c: the #GP path. A SIGSEGV stop with si_code SI_KERNEL is a general
 * protection fault; handle_segv decodes the faulting instruction, counts the
 * fault at its site, checks that it is an access through a managed TLS slot
 * and answers it with the strategy's rule: emulate (perform the access, or
 * single-step it with the descriptor that admits it), flip (switch the slot
 * between its truncated form and the expand-down twin and restart), or the
 * online strategies' choice between the two (online.c). Faults that are not
 * ours are delivered to the guest.
 */
#include "supervisor.h"


/* a form the decoder does not know (or a step-only fault), counted by key */
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
 * `-1 if offset & 0x80000000 else 1`): +1, -1, or 0 when the decoder could
 * not compute the offset (a form it does not know before the ModRM byte).
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
 * the other state must admit the access (xen.flip's check); for a form the
 * decoder does not know, an instruction that faults in both states. */
int do_flip(struct supervisor *sv, struct thread *t, struct slot *sl, struct site *s, const struct insn *in, uint32_t eip) {
    int go_down = sl->state != ST_DOWN;
    const struct udesc *next = go_down ? &sl->dn : &sl->up;
    if (in->has_mem && !in->miss[0]) {
        if (!desc_admits(next, in->off, in->size, 0)) {
            record_delivery(sv, s, eip, "genuine fault: flipping does not admit the access");
            return SIGSEGV;
        }
    } else {
        note_miss(sv, in->miss[0] ? in->miss : "no memory operand");
        if (t->last_fault_eip == eip && t->last_fault_flipped) {
            t->last_fault_flipped = 0;
            record_delivery(sv, s, eip, "genuine fault: faulted in both states");
            return SIGSEGV;
        }
    }
    install_state(sv, t, sl, go_down ? ST_DOWN : ST_UP);
    if (go_down) { COUNT(sv, to_down); if (s) s->to_down++; }
    else { COUNT(sv, to_up); if (s) s->to_up++; }
    t->last_fault_eip = eip;
    t->last_fault_flipped = 1;
    return 0;
}

/* emulate: perform the access for the guest and advance EIP; returns the
 * signal to deliver (0: done). Forms the decoder does not know (and every
 * form under --step-only) are single-stepped once with the descriptor that
 * admits the access's sign -- the expand-down twin for a negative offset
 * (only addresses below the base: nothing in the hypervisor hole), the
 * truncated expand-up form for a positive one -- and end_step then puts back
 * the slot's current state (*step = 1). */
int do_emulate(struct supervisor *sv, struct thread *t, struct slot *sl, struct site *s, struct insn *in,
                      struct user_regs_struct *r, uint32_t eip, int entry, int *step) {
    t->last_fault_flipped = 0;
    if (!in->miss[0] && !sv->opt.step_only) {
        struct ctx c = {t->tid, &sl->requested, sv->opt.hv_start, 0, ""};
        if (emulate(&c, in, r) < 0) {
            record_delivery(sv, s, eip, c.why[0] ? c.why : "cannot emulate");
            return SIGSEGV;
        }
        if (ptrace(PTRACE_SETREGS, t->tid, 0, r) < 0) die_setup(sv, "PTRACE_SETREGS", errno);
        COUNT(sv, emulated);
        if (s) s->emulated++;
        return 0;
    }
    note_miss(sv, in->miss[0] ? in->miss : "step-only");
    const struct udesc *with = access_sign(sl, in) > 0 ? &sl->up : &sl->dn;
    if (set_area(t->tid, with) < 0) die_setup(sv, "PTRACE_SET_THREAD_AREA", errno);
    COUNT(sv, switches);
    t->stepping = 1;
    t->step_entry = entry;
    t->step_eip = eip;
    COUNT(sv, stepped);
    if (s) s->stepped++;
    *step = 1;
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


/* returns the signal to deliver on resume (0 = suppress); *step = 1 to single-step */
int handle_segv(struct supervisor *sv, struct thread *t, int *step) {
    siginfo_t si;
    *step = 0;
    if (ptrace(PTRACE_GETSIGINFO, t->tid, 0, &si) < 0) return SIGSEGV;
    if (si.si_code != SI_KERNEL || sv->opt.strategy == S_NATIVE) { COUNT(sv, other_segv); return SIGSEGV; }
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return SIGSEGV;
    uint32_t eip = (uint32_t)r.rip;
    uint8_t b[16];
    int n = fetch_insn(t->tid, eip, b);
    struct insn in;
    decode(b, n, &r, &in);
    if (in.seg != 4 && in.seg != 5) { COUNT(sv, other_segv); return SIGSEGV; }
    uint32_t sel = (uint32_t)(in.seg == 4 ? r.fs : r.gs) & 0xFFFF;
    int entry = sel >> 3;
    struct site *s = site_of(sv, image_of(sv, t), eip);
    COUNT(sv, faults);
    if (image_of(sv, t) >= 0) sv->images[image_of(sv, t)].faults++;
    if (sv->trace) fprintf(sv->trace, "%#x %d\n", eip, in.has_mem ? (int32_t)in.off : 0);
    if (s) {
        s->faults++;
        s->seg = in.seg;
        if (!s->nbytes) { memcpy(s->bytes, b, n); s->nbytes = in.known_len ? in.len : n; }
        if (in.has_mem) {
            int64_t o = (int32_t)in.off;
            if (o < s->off_min) s->off_min = o;
            if (o > s->off_max) s->off_max = o;
            if (o < 0) s->neg++; else s->pos++;
        }
    }
    if ((sel & 4) || entry < TLS_FIRST || entry >= TLS_FIRST + TLS_SLOTS) {
        record_delivery(sv, s, eip, "segment is not a GDT TLS slot");
        return SIGSEGV;
    }
    struct slot *sl = &t->slots[entry - TLS_FIRST];
    if (!sl->valid || !sl->managed) {
        record_delivery(sv, s, eip, "segment is not a truncated flat segment");
        return SIGSEGV;
    }
    if (sv->opt.strategy == S_FLIP) return do_flip(sv, t, sl, s, &in, eip);
    if (ONLINE(sv->opt.strategy)) return online_fault(sv, t, sl, s, &in, &r, eip, entry, step);
    return do_emulate(sv, t, sl, s, &in, &r, eip, entry, step);
}
