/*
 * descriptors.c: the descriptor side of the supervisor. Xen's arithmetic
 * (truncate, the expand-down twin, the access check) is the shared core's
 * (tc_truncate, tc_flip, tc_check in tlslab/x86/_core.c); here struct
 * user_desc is converted to its tc_descriptor and back. And the guest's TLS
 * installs: set_thread_area and modify_ldt seen at their seccomp stop and
 * their exit, the descriptors a new task inherits or gets from CLONE_SETTLS,
 * and the per-slot states (truncated expand-up, its expand-down twin,
 * online-probe's empty descriptor) that the strategies switch between.
 *
 * Only the TLS slots of the GDT (entries 12..14) can be rewritten by a
 * tracer; LDT descriptors (modify_ldt) are truncated by rewriting the
 * struct user_desc in guest memory at syscall entry -- refused (EPERM) when
 * another task shares that memory, which could put the guest's request back
 * before the kernel copies it. At set_thread_area's exit every TLS entry is
 * compared with what was installed there (the entry number in guest memory
 * is only a hint: another thread can rewrite it).
 */
#include "supervisor.h"


/* struct user_desc's flags and the core's descriptor fields (the kernel's
 * fill_ldt: type = accessed | !read_exec_only << 1 | contents << 2; S = 1,
 * DPL = 3). Flag bits above lm are not the descriptor's: kept from shape. */
void udesc_to_core(const struct udesc *u, tc_descriptor *d) {
    memset(d, 0, sizeof *d);
    d->base = u->base;
    d->limit = u->limit & 0xFFFFF;
    d->accessed = 1;
    d->rw = !(u->flags & F_ROX);
    d->dc = F_CONTENTS(u->flags) & 1;
    d->executable = F_CONTENTS(u->flags) >> 1;
    d->s = 1;
    d->dpl = 3;
    d->present = !(u->flags & F_NP);
    d->avl = !!(u->flags & F_USEABLE);
    d->l = !!(u->flags & F_LM);
    d->db = u->flags & F_32;
    d->granularity = !!(u->flags & F_PAGES);
}

static struct udesc udesc_from_core(const struct udesc *shape, const tc_descriptor *d) {
    struct udesc u = *shape;
    u.limit = d->limit & 0xFFFFF;
    u.flags = (shape->flags & ~0xFFu) | (d->db ? F_32 : 0) | (uint32_t)(d->dc | d->executable << 1) << 1 |
              (d->rw ? 0 : F_ROX) | (d->granularity ? F_PAGES : 0) | (d->present ? 0 : F_NP) |
              (d->avl ? F_USEABLE : 0) | (d->l ? F_LM : 0);
    return u;
}

/* Xen's truncation of what the guest asked for (tc_truncate) */
static struct udesc truncate_desc(const struct udesc *requested, uint32_t hv) {
    tc_descriptor d, out;
    udesc_to_core(requested, &d);
    tc_truncate(&d, hv, &out);
    return udesc_from_core(requested, &out);
}

/* Xen's flip (tc_flip) of the slot's current form, for a size-byte access at
 * off: 1 when the slot's other form admits it (the expand-down twin or the
 * truncated expand-up form: tc_flip computes exactly the descriptors
 * adopt_slot keeps, see there), 0 when the fault is genuine. */
int slot_flip_admits(const struct slot *sl, uint32_t hv, uint32_t off, uint32_t size) {
    tc_descriptor from, to;
    udesc_to_core(sl->state == ST_DOWN ? &sl->dn : &sl->up, &from);
    return tc_flip(&from, off, size, hv, &to);
}

/* the descriptor of a managed slot in state st */
const struct udesc *slot_desc(const struct slot *s, int st) {
    return st == ST_DOWN ? &s->dn : st == ST_EMPTY ? &s->empty : &s->up;
}

/* one entry of the JSON's "tls" list (buffered in sv->tlslog) */
static void log_tls(struct supervisor *sv, pid_t tid, const char *how, const struct udesc *req,
                    const struct udesc *inst, const struct udesc *dn) {
    FILE *log = sv->tlslog;
    fprintf(log, "%s{\"pid\":%d,\"tid\":%d,\"how\":\"%s\",\"requested\":[%u,%u,%u,%u],\"installed\":[%u,%u,%u,%u]",
            sv->total.tls_installs + sv->total.ldt_installs > 1 ? "," : "", sv->cp ? sv->cp->pid : 0, tid, how,
            req->entry, req->base, req->limit, req->flags, inst->entry, inst->base, inst->limit, inst->flags);
    if (dn) fprintf(log, ",\"expand_down\":[%u,%u,%u,%u]", dn->entry, dn->base, dn->limit, dn->flags);
    fprintf(log, "}");
}

/* Record what the guest installed in a GDT TLS slot and, if truncating, install the truncated form. */
static void adopt_slot(struct supervisor *sv, struct thread *t, int entry, const struct udesc *requested,
                       const char *how) {
    struct slot *s = &t->slots[entry - TLS_FIRST];
    /* online-site's streak belongs to the slot, not to the descriptor in it
     * (the model keys it by (vCPU, selector)): a new install keeps it. A
     * probe in progress ends: the model drops its record at the slot's next
     * fault, the descriptor being no longer the empty one */
    int64_t streak_site = s->streak_site;
    uint64_t streak = s->streak;
    memset(s, 0, sizeof *s);
    s->valid = 1;
    s->streak_site = streak_site;
    s->streak = streak;
    s->requested = *requested;
    s->requested.entry = entry;
    s->up = s->requested;
    COUNT(sv, tls_installs);
    if (sv->opt.strategy->truncating) {
        s->up = truncate_desc(&s->requested, sv->opt.hv_start);
        if (memcmp(&s->up, &s->requested, sizeof s->up) && set_area(t->tid, &s->up) < 0)
            die_setup(sv, "PTRACE_SET_THREAD_AREA", errno);
        /* Managed: a truncated flat segment (expand-up), which Xen's flip turns
         * into its expand-down twin for an offset above its limit. The twin is
         * computed once here, by tc_flip itself (offset 0xFFFFFFFF is above
         * every truncated limit; size 0: no access to admit); tc_flip of the
         * twin gives back exactly s->up, so slot_flip_admits's verdicts are
         * about these two descriptors. An expand-down request is never
         * managed (tc_flip would take the empty expand-down descriptor at
         * base 0 for a twin) */
        tc_descriptor up, dn;
        udesc_to_core(&s->up, &up);
        if (!up.dc && tc_flip(&up, 0xFFFFFFFFu, 0, sv->opt.hv_start, &dn)) {
            s->managed = 1;
            s->dn = udesc_from_core(&s->up, &dn);
            /* online-probe's empty descriptor (online.probe_descriptor): expand-down,
             * limit 0xFFFFF in pages, 32-bit, present -- it admits no offset at all, so
             * every access faults and none reaches the hypervisor hole. Linux's
             * set_thread_area takes contents 0 and 1 (data), so it can be installed */
            s->empty = s->up;
            s->empty.flags = (s->empty.flags & ~(F_CONTENTS_MASK | F_NP)) | F_EXPAND_DOWN | F_32 | F_PAGES;
            s->empty.limit = 0xFFFFF;
        }
    }
    log_tls(sv, t->tid, how, &s->requested, &s->up, s->managed ? &s->dn : NULL);
}

/* install state st in the slot (a descriptor write that settles the fault:
 * the instruction restarts) */
void install_state(struct supervisor *sv, struct thread *t, struct slot *sl, int st) {
    if (set_area(t->tid, slot_desc(sl, st)) < 0) die_setup(sv, "PTRACE_SET_THREAD_AREA", errno);
    sl->state = st;
    COUNT(sv, switches);
}

static int same_desc(const struct udesc *a, const struct udesc *b) {
    return a->base == b->base && (a->limit & 0xFFFFF) == (b->limit & 0xFFFFF) && (a->flags & 0x7F) == (b->flags & 0x7F);
}

/* Does entry e of t hold what the supervisor knows is there: the slot's installed form, online-patch's
 * twin, or nothing? (Else the guest installed it: adopt it.) */
static int entry_is_known(struct supervisor *sv, const struct thread *t, int e, const struct udesc *cur) {
    const struct slot *s = &t->slots[e - TLS_FIRST];
    if (s->valid) return same_desc(cur, s->managed ? slot_desc(s, s->state) : &s->up);
    if (!cur->base && !cur->limit && (cur->flags & F_NP)) return 1; /* empty */
    return e == FS_ENTRY && sv->opt.strategy->patches && patch_inherited_twin(sv, t);
}

/* syscall-exit of set_thread_area / modify_ldt */
void finish_tls_syscall(struct supervisor *sv, struct thread *t) {
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return;
    int32_t ret = (int32_t)r.rax;
    if (t->sta_is_ldt) {
        if (t->sta_is_ldt == 2) /* restore the guest's own request in its memory */
            write_mem(t->tid, t->sta_ptr, &t->ldt_saved, 16);
        if (t->sta_is_ldt == 3) { /* refused at its seccomp stop (start_tls_syscall) */
            r.rax = (unsigned long long)(long long)-EPERM;
            if (ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0 && errno != ESRCH) die_setup(sv, "PTRACE_SETREGS", errno);
        }
        return;
    }
    if (ret != 0) return;
    uint32_t raw[4];
    /* the entry the guest's struct names now: where the install went, unless another thread of the guest
     * rewrote the struct meanwhile -- so every entry is compared with what was installed there below */
    if (read_mem(t->tid, t->sta_ptr, raw, sizeof raw) == 0 && (int)raw[0] >= TLS_FIRST &&
        (int)raw[0] < TLS_FIRST + TLS_SLOTS) {
        int entry = (int)raw[0];
        struct udesc req;
        if (get_area(t->tid, entry, &req) < 0) die_setup(sv, "PTRACE_GET_THREAD_AREA", errno);
        adopt_slot(sv, t, entry, &req, "set_thread_area");
        if (sv->opt.strategy->patches) patch_tls_installed(sv, t, entry);
    }
    for (int e = TLS_FIRST; e < TLS_FIRST + TLS_SLOTS; e++) {
        struct udesc cur;
        if (get_area(t->tid, e, &cur) < 0) {
            if (errno == ESRCH) return; /* killed meanwhile (another thread's exit_group) */
            die_setup(sv, "PTRACE_GET_THREAD_AREA", errno);
        }
        if (entry_is_known(sv, t, e, &cur)) continue;
        adopt_slot(sv, t, e, &cur, "set_thread_area");
        if (sv->opt.strategy->patches) patch_tls_installed(sv, t, e);
    }
}

/* seccomp stop of set_thread_area / modify_ldt: an LDT descriptor is truncated in guest memory here */
void start_tls_syscall(struct supervisor *sv, struct thread *t) {
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return;
    sv->seccomp_stops++;
    t->in_sta = 1;
    t->sta_is_ldt = 0;
    if ((uint32_t)r.orig_rax == NR32_MODIFY_LDT) {
        t->sta_is_ldt = 1;
        t->sta_ptr = (uint32_t)r.rcx;
        uint32_t func = (uint32_t)r.rbx;
        const struct proc *p = t->proc >= 0 ? &sv->procs[t->proc] : NULL;
        if ((func == 1 || func == 0x11) && sv->opt.strategy->truncating &&
            (!p || p->live > 1 || p->shared_mm || in_shared_mapping(t->tid, t->sta_ptr, 16))) {
            /* the descriptor is truncated in guest memory before the kernel reads it: another task sharing
             * that memory (a thread, a CLONE_VM child, a MAP_SHARED page) could put the untruncated one back
             * in between. Refused (EPERM) */
            r.orig_rax = (unsigned long long)-1; /* skip the call; finish_tls_syscall gives it -EPERM */
            if (ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0 && errno != ESRCH) die_setup(sv, "PTRACE_SETREGS", errno);
            t->sta_is_ldt = 3;
            sv->ldt_refused++;
        } else if ((func == 1 || func == 0x11) && sv->opt.strategy->truncating) {
            uint32_t raw[4];
            if (read_mem(t->tid, t->sta_ptr, raw, 16) == 0) {
                struct udesc req = {raw[0], raw[1], raw[2], raw[3]}, tr = truncate_desc(&req, sv->opt.hv_start);
                COUNT(sv, ldt_installs);
                tr.limit |= req.limit & ~0xFFFFFu;
                if (memcmp(&tr, &req, sizeof tr)) {
                    uint32_t out[4] = {tr.entry, tr.base, tr.limit, tr.flags};
                    if (write_mem(t->tid, t->sta_ptr, out, 16) == 0) {
                        t->ldt_saved = req;
                        t->sta_is_ldt = 2;
                        sv->ldt_truncated++;
                    }
                }
                log_tls(sv, t->tid, "modify_ldt", &req, &tr, NULL);
            }
        }
    } else {
        t->sta_ptr = (uint32_t)r.rbx;
        if (sv->opt.strategy->patches) patch_tls_request(sv, t);
    }
}

/* A new task (fork, vfork, clone), stopped before its first instruction,
 * after its creator's event (inherit_from_creator copied the creator's slots as
 * they were at the clone: the creator has not run since, or we copied them
 * at its event stop). A slot the kernel still holds as inherited keeps the
 * creator's state (truncated, or flipped: the child inherits the GDT TLS
 * entries as they were); any other descriptor -- CLONE_SETTLS, which the
 * kernel installs untruncated -- is adopted and truncated here, with
 * PTRACE_SET_THREAD_AREA on the new tid, before it runs any code. */
void adopt_new_thread(struct supervisor *sv, struct thread *t) {
    t->adopted = 1;
    int twin_inherited = sv->opt.strategy->patches && patch_inherited_twin(sv, t); /* online-patch's entry 13 */
    for (int e = TLS_FIRST; e < TLS_FIRST + TLS_SLOTS; e++) {
        struct slot *ts = &t->slots[e - TLS_FIRST];
        struct udesc d;
        if (e == FS_ENTRY && twin_inherited) continue; /* the twin: patch_new_thread */
        if (get_area(t->tid, e, &d) < 0) continue;
        if (!d.base && !d.limit && (d.flags & F_NP)) { memset(ts, 0, sizeof *ts); continue; } /* empty */
        /* a probe in progress stays its creator's: an empty descriptor inherited
         * here is an orphan, restored at the new task's first fault */
        ts->probing = 0;
        if (ts->valid) {
            struct udesc cur = ts->managed ? *slot_desc(ts, ts->state) : ts->up;
            if (cur.base == d.base && (cur.limit & 0xFFFFF) == (d.limit & 0xFFFFF) &&
                (cur.flags & 0x7F) == (d.flags & 0x7F))
                continue; /* inherited as it was */
        }
        adopt_slot(sv, t, e, &d, "clone");
    }
    if (sv->opt.strategy->patches) patch_new_thread(sv, t);
}
