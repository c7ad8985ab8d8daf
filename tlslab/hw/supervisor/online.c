/*
 * online.c: the online strategies (online-site, online-probe): the rules of
 * tlslab/hypervisor/strategies/online.py, which is their specification
 * (tests/test_hw_online.py checks that the decisions agree: faults per site
 * and the model's counters, reported under "online" in the JSON). The
 * threshold is computed here from the two prices the model weighs
 * (--emulate-ns, --flip-ns, passed with full precision) by the same double
 * expression, 2 * flip_ns / emulate_ns, so `streak > threshold`,
 * `estimate > threshold` and the probe cap int(threshold) + 1 compare exactly
 * as in Python. online-rate, which decides from the guest's instructions
 * between faults, is in rate.c.
 *
 * Sites are keyed (eip, sign) domain-wide as in the model: one table for
 * every thread, process and image (processes forked from one another share
 * code at the same addresses; a wrong guess costs time, never correctness).
 * online-probe also keys (eip, sign, previous fault's eip) entries in the same
 * table: a site whose probes measured two different remaining runs is
 * ambiguous, and there the context entry decides (ProbeStrategy docstring).
 * Per-slot state (the online-site streak, a probe in progress) is per thread
 * here, per (vCPU, selector) in the model: the same for single-threaded
 * guests. With threads they differ as the descriptors themselves do: Linux
 * keeps a TLS array per thread across switches, the model reloads the slot at
 * switches as XenLinux does (see main.c's overview); a new task starts with its
 * creator's streak and no probe record (its inherited empty descriptor is an
 * orphan: restored to the truncated expand-up form at its first fault).
 */
#include "supervisor.h"

#define REPROBE_FACTOR 8 /* online-probe: probe a site again after 8x, 64x, ... its faults */

/* the (eip, sign) entry of the domain-wide site table (in_context: the
 * (eip, sign, prev) entry), created if new */
static struct osite *oentry_of(struct supervisor *sv, uint32_t eip, int sign, int in_context, uint32_t prev) {
    uint32_t h = (eip * 2654435761u ^ (sign > 0 ? 0x9E3779B9u : 0u) ^ (in_context ? prev * 40503u + 1u : 0u))
                 & (SITE_CAP - 1);
    for (int i = 0; i < SITE_CAP; i++) {
        struct osite *o = &sv->online.sites[(h + i) & (SITE_CAP - 1)];
        if (!o->used) {
            /* the table is a decision input: a site without an entry cannot be decided as in the model */
            if (sv->online.nsites >= SITE_CAP - 1) die_setup(sv, "online site table full", ENOSPC);
            o->used = 1; o->eip = eip; o->sign = sign; o->in_context = in_context; o->prev = prev;
            sv->online.nsites++;
            return o;
        }
        if (o->eip == eip && o->sign == sign && o->in_context == in_context && (!in_context || o->prev == prev))
            return o;
    }
    die_setup(sv, "online site table full", ENOSPC);
}

static struct osite *osite_of(struct supervisor *sv, uint32_t eip, int sign) {
    return oentry_of(sv, eip, sign, 0, 0);
}

static void plist_add(struct supervisor *sv, struct plist *p, uint32_t site) {
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 64;
        uint32_t *v = realloc(p->v, cap * sizeof *v);
        if (!v) die_setup(sv, "malloc (probe sites)", ENOMEM);
        p->v = v;
        p->cap = cap;
    }
    p->v[p->n++] = site;
}

/* ProbeStrategy._learn: each (site, context) pair of the run learns how many
 * same-sign accesses followed it, itself included; a pair seen twice keeps its
 * first (longest) remainder. The model walks from the end into a dict and then
 * updates in the dict's order (pairs by their last occurrence, latest first);
 * a site given a value different from the one it had becomes ambiguous. The
 * same order here: a probe holds at most probe_cap pairs, so the quadratic
 * de-duplication is cheap. */
static void probe_learn(struct supervisor *sv, const struct plist *p) {
    size_t n = p->n / 2;
    size_t *order = malloc((n ? n : 1) * sizeof *order);   /* pair indices, in the model's dict order */
    uint64_t *value = malloc((n ? n : 1) * sizeof *value);
    if (!order || !value) die_setup(sv, "malloc (probe learn)", ENOMEM);
    size_t m = 0;
    for (size_t k = n; k-- > 0;) {
        size_t j = 0;
        while (j < m && !(p->v[2 * order[j]] == p->v[2 * k] && p->v[2 * order[j] + 1] == p->v[2 * k + 1])) j++;
        if (j == m) order[m++] = k;
        value[j] = n - k;   /* the earliest occurrence's remainder wins, as in the dict */
    }
    for (size_t j = 0; j < m; j++) {
        struct osite *site = &sv->online.sites[p->v[2 * order[j]]], *ctx = &sv->online.sites[p->v[2 * order[j] + 1]];
        if (site->has_estimate && site->estimate != value[j]) site->ambiguous = 1;
        site->estimate = value[j];
        site->has_estimate = 1;
        ctx->estimate = value[j];
        ctx->has_estimate = 1;
    }
    free(order);
    free(value);
}

/* ProbeStrategy._due: count a fault at this entry; its estimate, or -1 when it has none or is due a probe */
static int64_t probe_due(struct osite *o) {
    o->seen++;
    if (!o->has_estimate || o->seen >= o->next_probe) {
        o->next_probe = o->seen * REPROBE_FACTOR;
        return -1;
    }
    return (int64_t)o->estimate;
}

/* the sites of the probe in progress in the fault's slot */
static struct plist *probe_sites(struct supervisor *sv, const struct fault *f) {
    return &sv->online.plists[f->t - sv->threads][f->entry - TLS_FIRST];
}

/* The two answers the model's counters name: emulate (the access performed
 * for the guest) and flip (the slot's descriptor switched: a descriptor
 * write). Returns the signal to deliver. */
int online_emulate(struct supervisor *sv, struct fault *f) {
    sv->online.count.emulate++;
    return emulate_fault(sv, f);
}

int online_flip(struct supervisor *sv, struct fault *f) {
    int deliver = flip_fault(sv, f);
    if (!deliver) {
        sv->online.count.flip++;
        sv->online.count.desc_writes++;
    }
    return deliver;
}

/* a probe's end or an orphan's repair: state st installed in the slot (a
 * descriptor write of this kind) and the instruction restarts */
static int rewrite_slot(struct supervisor *sv, struct fault *f, int st, uint64_t *kind) {
    install_state(sv, f->t, f->slot, st);
    (*kind)++;
    sv->online.count.desc_writes++;
    return 0;
}

/* a fault with the empty descriptor installed (ProbeStrategy._in_probe) */
static int probe_fault(struct supervisor *sv, struct fault *f, int sign, uint32_t prev) {
    struct slot *sl = f->slot;
    struct plist *p = probe_sites(sv, f);
    f->t->last_fault_flipped = 0;
    /* the empty descriptor without our record (a task created during a
     * probe inherits its creator's slot, not its probe): the slot gets
     * what the policy gives it, the truncated expand-up form */
    if (!sl->probing) return rewrite_slot(sv, f, ST_UP, &sv->online.count.probe_orphan);
    if (sign == 0) {
        /* a form the decoder does not know, its offset unknown: the model
         * always knows it. End the probe as a fault of the other sign would
         * (the instruction restarts under the descriptor before the probe and
         * is decided again); a fault more than the model's, noted */
        sv->online.count.unknown_sign++;
        sign = -sl->probe_sign;
    }
    if (sign == sl->probe_sign) {
        plist_add(sv, p, (uint32_t)(osite_of(sv, f->eip, sign) - sv->online.sites));
        plist_add(sv, p, (uint32_t)(oentry_of(sv, f->eip, sign, 1, prev) - sv->online.sites));
        if (p->n / 2 >= sv->online.probe_cap) { /* the run already pays for a flip: flip, and restart */
            probe_learn(sv, p);
            sl->probing = 0;
            return rewrite_slot(sv, f, sl->probe_away, &sv->online.count.probe_flip);
        }
        return online_emulate(sv, f);
    }
    /* the other sign: the run ended. The slot gets its state from before the probe; restart */
    probe_learn(sv, p);
    sl->probing = 0;
    return rewrite_slot(sv, f, sl->probe_home, &sv->online.count.probe_end);
}

/* ProbeStrategy._start_probe: emulate this access, then install the empty
 * descriptor so that every following %gs access faults. No probe when a flip
 * would not admit the access (genuine: the model's flipped() is None) or the
 * emulation failed. A single-stepped access starts the probe before the
 * step: end_step installs the empty descriptor after it */
static int start_probe(struct supervisor *sv, struct fault *f, int sign, struct osite *o, struct osite *ctx) {
    struct slot *sl = f->slot;
    const struct insn *in = &f->in;
    int home = sl->state, away = home == ST_UP ? ST_DOWN : ST_UP;
    int flippable = !in->has_mem || slot_flip_admits(sl, sv->opt.hv_start, in->off, in->size);
    int deliver = online_emulate(sv, f);
    if (deliver || !flippable) return deliver;
    sl->state = ST_EMPTY;
    if (!f->step) {
        if (set_area(f->t->tid, &sl->empty) < 0) die_setup(sv, "PTRACE_SET_THREAD_AREA", errno);
        COUNT(sv, switches);
    }
    sv->online.count.desc_writes++;
    sl->probing = 1;
    sl->probe_sign = sign;
    sl->probe_home = home;
    sl->probe_away = away;
    struct plist *p = probe_sites(sv, f);
    p->n = 0;
    plist_add(sv, p, (uint32_t)(o - sv->online.sites));
    plist_add(sv, p, (uint32_t)(ctx - sv->online.sites));
    sv->online.count.probe++;
    return 0;
}

/* online-site (SiteStreakStrategy.decide): a positive offset (the slot is
 * flipped) flips back; a negative one at a hot site flips; otherwise the
 * streak of this site back to back in this slot grows, and beyond the
 * threshold the site becomes hot and the fault flips. %fs: no flip rule for
 * it, as in Xen 2004; emulate. */
int online_site_fault(struct supervisor *sv, struct fault *f) {
    if (f->in.seg != TC_GS) return online_emulate(sv, f);
    struct slot *sl = f->slot;
    int sign = access_sign(sl, &f->in);
    struct osite *o = osite_of(sv, f->eip, sign);
    if (sign > 0 || o->hot) return online_flip(sv, f);
    int64_t key = o - sv->online.sites;
    sl->streak = sl->streak_site == key ? sl->streak + 1 : 1;
    sl->streak_site = key;
    if ((double)sl->streak > sv->online.threshold) {
        o->hot = 1;
        sl->streak = 0;
        sv->online.count.marked_hot++;
        return online_flip(sv, f);
    }
    return online_emulate(sv, f);
}

/* online-probe (ProbeStrategy.decide): a fault inside a probe extends or ends
 * it; outside one, a site due a probe (no estimate yet, or seen enough times
 * since the last) starts one, else its estimated run decides: flip when it
 * is longer than the threshold, emulate otherwise. %fs: emulate, as above. */
int online_probe_fault(struct supervisor *sv, struct fault *f) {
    if (f->in.seg != TC_GS) return online_emulate(sv, f);
    struct slot *sl = f->slot;
    int sign = access_sign(sl, &f->in);
    uint32_t prev = sv->online.previous_fault;   /* the context key uses the fault before this one */
    sv->online.previous_fault = f->eip;
    if (sl->state == ST_EMPTY) return probe_fault(sv, f, sign, prev);
    struct osite *o = osite_of(sv, f->eip, sign);
    /* outside a probe any record of one is stale (the descriptor is no
     * longer the empty one; the model pops it here) */
    sl->probing = 0;
    int64_t estimate = probe_due(o);
    if (estimate >= 0 && o->ambiguous)   /* a site reached from several places: its context decides */
        estimate = probe_due(oentry_of(sv, f->eip, sign, 1, prev));
    if (estimate < 0) return start_probe(sv, f, sign, o, oentry_of(sv, f->eip, sign, 1, prev));
    if ((double)estimate > sv->online.threshold) return online_flip(sv, f);
    return online_emulate(sv, f);
}
