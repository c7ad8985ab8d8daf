/*
 * patch.c: online-patch on the CPU. The rule is the model's
 * (tlslab/hypervisor/strategies/online_patch.py, its specification, and the
 * fs-twin ABI of rewrite.py): at the first fault of a site with a negative
 * %gs offset, where the rewrite safety policy allows, rewrite the
 * instruction's gs prefix (0x65) to fs (0x64) so that it reaches the
 * thread's TCB through %fs, which holds the expand-down twin of the TCB's
 * truncated descriptor; every other fault is online-probe's (online.c).
 *
 * Where the model and Linux differ, and what is done here:
 *  - TLS slots. The model's GDT TLS slots are i386's 6..8 (twin in 7,
 *    %fs = 0x3b); an i386 task on x86-64 has entries 12..14, so the twin is
 *    in entry 13 and %fs = 0x6b (FS_ENTRY, FS_SELECTOR).
 *  - Threads. Linux keeps a TLS array per thread, so each thread gets the
 *    twin of its own TCB once, when it is created (the model, one vCPU,
 *    rewrites slot 7 at every switch between threads with different TCBs:
 *    more descriptor writes there, the same faults).
 *  - set_thread_area with entry -1 gives the first slot the *guest* has not
 *    requested, in the model; the kernel would skip the twin's entry. So
 *    the request is pointed at that slot at its seccomp stop, and a guest
 *    install over the twin is noticed as in the model.
 *  - Pages. A patch is written through /proc/PID/mem, which copies a
 *    private file page before writing (FOLL_FORCE on a MAP_PRIVATE
 *    mapping): the file and other processes keep their bytes, as the
 *    model's page_sharing "private". A forked child inherits the patched
 *    copy, and the parent's patch table with it; an exec starts afresh.
 *  - The safety policy reads /proc/PID/maps at each patch attempt: the
 *    mapping that holds the prefix byte, the executable's device and inode
 *    (/proc/PID/exe), and paths as the chrooted guest sees them (the view's
 *    prefix removed). "auto" is "lib" for a process with a program
 *    interpreter (AT_BASE in /proc/PID/auxv) and "exe" otherwise. The
 *    model's "exe" rule asks whether the byte is inside a PT_LOAD segment's
 *    file bytes; here whether it is in a mapping of the executable's file
 *    (they differ only for bytes past p_filesz in the last page of a
 *    segment, where no instruction is).
 *  - Shared mappings. The model has no shared executable mapping; here a
 *    site in one is never patched (a write there is the file's, and
 *    /proc/PID/mem refuses a read-only one).
 *  - Threads overlap. A thread that met a site after another thread faulted
 *    there, before that fault was answered with the patch, faults too: its
 *    stop shows the rewritten bytes and an offset the twin admits, and it is
 *    restarted (faulted-before-the-patch). The model's one vCPU has no such
 *    overlap.
 * Restoring a site checks that the byte is still the rewritten code (the
 * same file and offset mapped there, the byte still 0x64), as the model does.
 * Counters: the model's names (by_kind: fs-twin-installed, "not patched:
 * WHY", unpatched-mixed-site, ...; patches; descriptor writes), kept in
 * online.kinds and online.patches.
 */
#include "supervisor.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define PATCH_DIR "/lib" /* patchpolicy.DEFAULT_PATCH_DIR */
static const char *const policy_names[] = {"auto", "lib", "exe", "all", "none"};

void count_kind(struct supervisor *sv, const char *key) {
    struct online *on = &sv->online;
    for (int i = 0; i < on->nkinds; i++)
        if (!strcmp(on->kinds[i].key, key)) { on->kinds[i].n++; return; }
    if (on->nkinds < KIND_CAP) {
        snprintf(on->kinds[on->nkinds].key, sizeof on->kinds[0].key, "%s", key);
        on->kinds[on->nkinds++].n = 1;
    } else {
        on->kinds_lost++;
    }
}

int parse_patch_policy(const char *v) {
    for (int i = 0; i < (int)(sizeof policy_names / sizeof *policy_names); i++)
        if (!strcmp(v, policy_names[i])) return i;
    return -1;
}

/* ------------------------------------------------------------ per process */
static struct patchspace *space(struct supervisor *sv, struct thread *t) {
    if (t->proc < 0) return NULL;
    struct proc *p = &sv->procs[t->proc];
    if (!p->ps) {
        p->ps = calloc(1, sizeof *p->ps);
        if (!p->ps) die_setup(sv, "malloc (patch state)", ENOMEM);
        p->ps->refs = 1;
        p->ps->auto_policy = -1;
    }
    return p->ps;
}

/* room for at least n + 1 entries of `each` bytes in *v */
static void grow(struct supervisor *sv, void **v, size_t *cap, size_t n, size_t each) {
    if (n < *cap) return;
    size_t c = *cap ? 2 * *cap : 32;
    while (c <= n) c *= 2;
    void *m = realloc(*v, c * each);
    if (!m) die_setup(sv, "malloc (patch sites)", ENOMEM);
    *v = m;
    *cap = c;
}

/* A new process: a fork's memory is a copy of its parent's, and so is the patch state; a child that
 * shares its parent's memory (vfork, clone with CLONE_VM) shares it, since a patch either of them makes
 * is in both (each keeps its own descriptors: the ABI fields describe both while neither changes %fs). */
void patch_fork(struct supervisor *sv, struct proc *parent, struct proc *child, int shared_mm) {
    if (!parent || !parent->ps) return;
    if (shared_mm) {
        child->ps = parent->ps;
        child->ps->refs++;
        return;
    }
    struct patchspace *c = malloc(sizeof *c);
    if (!c) die_setup(sv, "malloc (patch state)", ENOMEM);
    *c = *parent->ps;
    c->sites = NULL; c->mixed = NULL;
    c->cap_sites = c->cap_mixed = 0;
    c->refs = 1;
    if (c->nsites) {
        grow(sv, (void **)&c->sites, &c->cap_sites, c->nsites, sizeof *c->sites);
        memcpy(c->sites, parent->ps->sites, c->nsites * sizeof *c->sites);
    }
    if (c->nmixed) {
        grow(sv, (void **)&c->mixed, &c->cap_mixed, c->nmixed, sizeof *c->mixed);
        memcpy(c->mixed, parent->ps->mixed, c->nmixed * sizeof *c->mixed);
    }
    child->ps = c;
}

void patch_exec(struct proc *p) {
    if (!p || !p->ps) return;
    if (--p->ps->refs > 0) { p->ps = NULL; return; } /* a vfork child's exec: the parent keeps it */
    free(p->ps->sites);
    free(p->ps->mixed);
    free(p->ps);
    p->ps = NULL;
}

static int find_site(const struct patchspace *ps, uint32_t eip) {
    for (size_t i = 0; i < ps->nsites; i++)
        if (ps->sites[i].eip == eip) return (int)i;
    return -1;
}

static int is_mixed(const struct patchspace *ps, uint32_t eip) {
    for (size_t i = 0; i < ps->nmixed; i++)
        if (ps->mixed[i] == eip) return 1;
    return 0;
}

static void set_conflict(struct patchspace *ps, const char *why) {
    if (ps->has_conflict) return;
    ps->has_conflict = 1;
    snprintf(ps->conflict, sizeof ps->conflict, "%s", why);
}

/* ------------------------------------------------------------ the fs twin */
/* A ptrace request on a task failed: a task killed meanwhile (another thread's exit_group) is ESRCH,
 * and whatever it was for no longer matters; anything else ends the run. Returns 0. */
static int task_gone(struct supervisor *sv, const char *what) {
    if (errno != ESRCH) die_setup(sv, what, errno);
    return 0;
}

/* rewrite._is_flat_tcb: glibc's TCB request, present 32-bit page-granular expand-up data, limit 0xFFFFF */
static int flat_tcb(const struct udesc *u) {
    return (u->flags & F_32) && (u->flags & F_PAGES) && !(u->flags & F_NP) && F_CONTENTS(u->flags) == 0 &&
           (u->limit & 0xFFFFF) == 0xFFFFF;
}

/* the twin of a TCB slot: its expand-down form (Xen's flip of the truncated descriptor), in entry 13 */
static int twin_of(const struct slot *tcb, struct udesc *out) {
    if (!tcb->valid || !tcb->managed) return 0;
    *out = tcb->dn;
    out->entry = FS_ENTRY;
    return 1;
}

/* FsTwinABI.install: the twin of t's TCB slot tcb_entry in entry 13 and %fs loaded; 0 (conflict set) if not */
static int install_twin(struct supervisor *sv, struct thread *t, struct patchspace *ps, int tcb_entry) {
    struct user_regs_struct r;
    char why[160];
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return task_gone(sv, "PTRACE_GETREGS");
    uint32_t fs = (uint32_t)r.fs & 0xFFFF;
    if (fs && fs != FS_SELECTOR) {
        snprintf(why, sizeof why, "guest already holds selector %#x in %%fs", fs);
        set_conflict(ps, why);
        return 0;
    }
    if (t->slots[FS_ENTRY - TLS_FIRST].valid) {
        snprintf(why, sizeof why, "GDT TLS slot %d is already in use by the guest", FS_ENTRY);
        set_conflict(ps, why);
        return 0;
    }
    struct udesc twin;
    if (!twin_of(&t->slots[tcb_entry - TLS_FIRST], &twin)) {
        set_conflict(ps, "no expand-down twin exists for the %gs descriptor");
        return 0;
    }
    /* the selector first: PTRACE_SET_THREAD_AREA of the entry a stopped task's %fs selects also sets its
     * saved %fs base, which an x86-64 kernel with FSGSBASE restores at the switch (not the GDT's) */
    r.fs = FS_SELECTOR;
    if (ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0) return task_gone(sv, "PTRACE_SETREGS");
    if (set_area(t->tid, &twin) < 0) return task_gone(sv, "PTRACE_SET_THREAD_AREA");
    COUNT(sv, switches);
    ps->installed = 1;
    ps->tcb_entry = tcb_entry;
    t->twin_base = twin.base;
    t->has_twin = 1;
    sv->online.count.desc_writes++;
    count_kind(sv, "fs-twin-installed");
    return 1;
}

/* a thread's twin follows its TCB (FsTwinABI._set_twin): a descriptor write when it changes */
static void set_twin(struct supervisor *sv, struct thread *t, struct patchspace *ps, const char *kind) {
    struct udesc twin, cur;
    if (!twin_of(&t->slots[ps->tcb_entry - TLS_FIRST], &twin)) {
        set_conflict(ps, "no expand-down twin exists for the running thread's %gs descriptor");
        return;
    }
    t->twin_base = twin.base;
    t->has_twin = 1;
    if (get_area(t->tid, FS_ENTRY, &cur) == 0 && !memcmp(&cur, &twin, sizeof cur)) return;
    if (set_area(t->tid, &twin) < 0) { task_gone(sv, "PTRACE_SET_THREAD_AREA"); return; }
    COUNT(sv, switches);
    sv->online.count.desc_writes++;
    count_kind(sv, kind);
}

/* seccomp stop of set_thread_area: an entry -1 request gets the first slot the guest itself has not
 * requested (the model's choice), which may be the twin's */
void patch_tls_request(struct supervisor *sv, struct thread *t) {
    struct patchspace *ps = space(sv, t);
    if (!ps || !ps->installed) return;
    uint32_t entry;
    if (read_mem(t->tid, t->sta_ptr, &entry, 4) < 0 || entry != 0xFFFFFFFFu) return;
    for (int e = TLS_FIRST; e < TLS_FIRST + TLS_SLOTS; e++)
        if (!t->slots[e - TLS_FIRST].valid) {
            if (e == FS_ENTRY) {
                uint32_t v = FS_ENTRY;
                write_mem(t->tid, t->sta_ptr, &v, 4);
            }
            return;
        }
}

/* FsTwinABI._on_set_thread_area, after the guest's install in `entry` was adopted */
void patch_tls_installed(struct supervisor *sv, struct thread *t, int entry) {
    struct patchspace *ps = space(sv, t);
    if (!ps) return;
    const struct slot *s = &t->slots[entry - TLS_FIRST];
    if (entry == FS_ENTRY) {
        char why[160];
        snprintf(why, sizeof why, "guest installed its own descriptor in GDT TLS slot %d (the %%fs slot of the "
                 "rewrite ABI)", FS_ENTRY);
        if (ps->installed || !ps->has_conflict) set_conflict(ps, why);
        return;
    }
    if (ps->has_conflict || !s->valid || !flat_tcb(&s->requested)) return;
    if (!ps->installed) install_twin(sv, t, ps, entry);
    else if (entry == ps->tcb_entry) set_twin(sv, t, ps, "fs-twin-replaced");
}

/* a new task: in a new process it has its creator's twin (a fork's copy); a new thread of a process with
 * the twin gets the twin of its own TCB (CLONE_SETTLS), or none if it has no TCB to mirror */
void patch_new_thread(struct supervisor *sv, struct thread *t) {
    struct patchspace *ps = space(sv, t);
    if (!ps || !ps->installed || ps->has_conflict) return;
    const struct slot *tcb = &t->slots[ps->tcb_entry - TLS_FIRST];
    if (tcb->valid && flat_tcb(&tcb->requested)) { set_twin(sv, t, ps, "fs-twin-switched"); return; }
    char why[160];
    snprintf(why, sizeof why, "thread %d's TLS slot %d holds no TCB descriptor for the %%fs twin to mirror", t->tid,
             ps->tcb_entry);
    set_conflict(ps, why);
    struct udesc cur;
    if (get_area(t->tid, FS_ENTRY, &cur) == 0 && !(cur.flags & F_NP)) {
        struct udesc empty = cur; /* online.probe_descriptor: admits no offset */
        empty.flags = (empty.flags & ~(F_CONTENTS_MASK | F_NP)) | F_EXPAND_DOWN | F_32 | F_PAGES;
        empty.limit = 0xFFFFF;
        if (set_area(t->tid, &empty) < 0) { task_gone(sv, "PTRACE_SET_THREAD_AREA"); return; }
        sv->online.count.desc_writes++;
    }
    t->has_twin = 0;
}

/* Does a new task, before its own TLS slots are read, hold in entry 13 exactly the twin its creator
 * had (the twin of the creator's TCB slot, which it inherited)? Then adopt_new_thread leaves entry 13
 * to patch_new_thread. Anything else there -- a CLONE_SETTLS aimed at entry 13, a twin of a conflicted
 * process that was emptied -- is adopted (truncated) like any guest descriptor. */
int patch_inherited_twin(struct supervisor *sv, const struct thread *t) {
    if (t->proc < 0 || !sv->procs[t->proc].ps) return 0;
    const struct patchspace *ps = sv->procs[t->proc].ps;
    struct udesc cur, twin;
    if (!ps->installed || t->slots[FS_ENTRY - TLS_FIRST].valid) return 0;
    if (!twin_of(&t->slots[ps->tcb_entry - TLS_FIRST], &twin) || get_area(t->tid, FS_ENTRY, &cur) < 0) return 0;
    return cur.base == twin.base && (cur.limit & 0xFFFFF) == (twin.limit & 0xFFFFF) &&
           (cur.flags & 0x7F) == (twin.flags & 0x7F);
}

/* does the faulting thread's twin admit the decoded access (so the #GP came from the gs form)? */
static int twin_admits(const struct fault *f) {
    struct udesc cur;
    tc_descriptor d;
    if (get_area(f->t->tid, FS_ENTRY, &cur) < 0) return 0;
    udesc_to_core(&cur, &d);
    return tc_check(&d, f->in.off, f->in.size ? f->in.size : 1, 0) == TC_ACCESS_ALLOWED;
}

/* FsTwinABI.check: why %fs is no longer the twin's in t's process (NULL: it is) */
static const char *abi_check(struct supervisor *sv, struct thread *t, struct patchspace *ps, uint32_t fs) {
    char why[160];
    (void)sv;
    if (ps->has_conflict) return ps->conflict;
    if (!ps->installed) return NULL;
    const struct slot *tcb = &t->slots[ps->tcb_entry - TLS_FIRST];
    if (fs != FS_SELECTOR) {
        snprintf(why, sizeof why, "guest loaded selector %#x into %%fs (the ABI's is %#x)", fs, FS_SELECTOR);
        set_conflict(ps, why);
    } else if (!t->has_twin) {
        set_conflict(ps, "GDT TLS slot 13 no longer holds the %fs twin");
    } else if (tcb->valid && tcb->requested.base != t->twin_base) {
        snprintf(why, sizeof why, "the running thread's %%gs base %#x is not the %%fs twin's %#x (its TLS slot %d "
                 "holds no TCB to mirror)", tcb->requested.base, t->twin_base, ps->tcb_entry);
        set_conflict(ps, why);
    }
    return ps->has_conflict ? ps->conflict : NULL;
}

/* /proc/PID/maps: the mapping holding addr (its perms, dev:inode, path as the guest sees it) */
struct mapping {
    int found, exec, write, shared;
    unsigned long dev_major, dev_minor, inode;
    unsigned long long offset; /* the file offset of the address asked about */
    char path[4096];
};

static struct mapping mapping_at(struct supervisor *sv, pid_t pid, uint32_t addr) {
    struct mapping m = {0};
    char path[64], line[4352];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "r");
    if (!f) return m;
    while (fgets(line, sizeof line, f)) {
        unsigned long long lo, hi, off;
        char perms[8];
        unsigned long maj, min, ino;
        int n = 0;
        if (sscanf(line, "%llx-%llx %7s %llx %lx:%lx %lu %n", &lo, &hi, perms, &off, &maj, &min, &ino, &n) < 7)
            continue;
        if (addr < lo || addr >= hi) continue;
        m.found = 1;
        m.exec = perms[2] == 'x';
        m.write = perms[1] == 'w';
        m.shared = perms[3] == 's';
        m.dev_major = maj; m.dev_minor = min; m.inode = ino;
        m.offset = off + (addr - lo);
        char *name = n ? line + n : line + strlen(line);
        name[strcspn(name, "\n")] = 0;
        const char *view = sv->opt.view_dir;
        size_t vl = view ? strlen(view) : 0;
        while (vl && view[vl - 1] == '/') vl--;
        if (vl && !strncmp(name, view, vl) && (name[vl] == '/' || !name[vl])) name += vl;
        snprintf(m.path, sizeof m.path, "%s", name);
        break;
    }
    fclose(f);
    return m;
}

/* --------------------------------------------------------------- patching */
static int poke_byte(pid_t tid, uint32_t addr, uint8_t b) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/mem", tid);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = pwrite(fd, &b, 1, (off_t)addr);
    close(fd);
    return n == 1 ? 0 : -1;
}

/* rewrite._unpatch / OnlinePatchStrategy._restore: the site gets its gs prefix back (unless the guest
 * rewrote that byte itself: then it is only forgotten) and is mixed from then on */
static void restore_site(struct supervisor *sv, struct thread *t, struct patchspace *ps, int i, const char *kind) {
    uint32_t eip = ps->sites[i].eip, prefix = ps->sites[i].prefix;
    uint8_t now = 0;
    struct mapping m = mapping_at(sv, t->tid, prefix);
    if (!m.found || m.shared || m.inode != ps->sites[i].inode || m.dev_major != ps->sites[i].dev_major ||
        m.dev_minor != ps->sites[i].dev_minor || m.offset != ps->sites[i].offset) {
        /* the guest unmapped or replaced the page: what is there now is not the code we rewrote */
        count_kind(sv, "rewritten-site-remapped-by-the-guest");
    } else if (read_mem(t->tid, prefix, &now, 1) < 0 || now != 0x64) {
        count_kind(sv, "rewritten-byte-changed-by-the-guest");
    } else if (poke_byte(t->tid, prefix, 0x65) < 0) {
        count_kind(sv, "rewritten-byte-not-writable-now"); /* the task is gone, or the page with it */
    } else {
        count_kind(sv, kind);
    }
    ps->sites[i] = ps->sites[--ps->nsites];
    grow(sv, (void **)&ps->mixed, &ps->cap_mixed, ps->nmixed, sizeof *ps->mixed);
    ps->mixed[ps->nmixed++] = eip;
}

static void stop_patching(struct supervisor *sv, struct thread *t, struct patchspace *ps) {
    while (ps->nsites) restore_site(sv, t, ps, (int)ps->nsites - 1, "unpatched-fs-not-the-twin");
    count_kind(sv, "patching-stopped: %fs not the twin's");
}

/* objects.has_writable_shared_mapping: any writable shared mapping of the file (dev:inode) */
static int writable_shared(pid_t pid, const struct mapping *m) {
    char path[64], line[4352];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        char perms[8];
        unsigned long maj, min, ino;
        if (sscanf(line, "%*x-%*x %7s %*x %lx:%lx %lu", perms, &maj, &min, &ino) < 4) continue;
        found = ino == m->inode && maj == m->dev_major && min == m->dev_minor && perms[1] == 'w' && perms[3] == 's';
    }
    fclose(f);
    return found;
}

static int is_exe(pid_t pid, const struct mapping *m) {
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/proc/%d/exe", pid);
    if (stat(path, &st) < 0) return 0;
    return st.st_ino == m->inode && major(st.st_dev) == m->dev_major && minor(st.st_dev) == m->dev_minor;
}

/* effective_policy: auto is lib for a process with a program interpreter (AT_BASE != 0), else exe */
static int resolve_policy(struct supervisor *sv, struct thread *t, struct patchspace *ps) {
    if (sv->opt.patch_policy != PP_AUTO) return sv->opt.patch_policy;
    if (ps->auto_policy < 0) {
        char path[64];
        uint32_t av[2 * 64];
        snprintf(path, sizeof path, "/proc/%d/auxv", t->tid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t n = fd >= 0 ? read(fd, av, sizeof av) : -1;
        if (fd >= 0) close(fd);
        int base = 0;
        for (ssize_t i = 0; i + 1 < n / 4; i += 2)
            if (av[i] == 7 /* AT_BASE */) base = av[i + 1] != 0;
        ps->auto_policy = base ? PP_LIB : PP_EXE;
    }
    return ps->auto_policy;
}

static int under_patch_dir(const char *path) {
    size_t n = strlen(PATCH_DIR);
    return !strncmp(path, PATCH_DIR, n) && (path[n] == '/' || !path[n]);
}

/* rewrite.patch_allowed for the one byte at addr: NULL if allowed, else why not (in why) */
static const char *patch_refused(struct supervisor *sv, struct thread *t, struct patchspace *ps, uint32_t addr,
                                 char *why, size_t n, struct mapping *mp) {
    int policy = resolve_policy(sv, t, ps);
    if (policy == PP_NONE) return "patch policy none";
    *mp = mapping_at(sv, t->tid, addr);
    const struct mapping m = *mp;
    if (!m.found || !m.exec) return "not in an executable mapping";
    /* a write to a shared mapping is a write to its file (and /proc/PID/mem refuses a read-only one): the
     * model has no shared executable mappings; private copies are the only pages online-patch writes */
    if (m.shared) return "in a shared mapping (patches go to private copies only)";
    if (policy == PP_ALL) return NULL;
    if (policy == PP_EXE)
        return m.inode && is_exe(t->tid, &m) ? NULL
                                              : "not in the executable's file-backed mapping (patch policy exe)";
    if (!m.inode || m.path[0] != '/') return "not in one file mapping (patch policy lib)";
    if (is_exe(t->tid, &m)) return "the executable, not a library (patch policy lib)";
    const char *base = strrchr(m.path, '/') + 1;
    if (!under_patch_dir(m.path)) {
        snprintf(why, n, "%s was mapped from outside %s (patch policy lib)", base, PATCH_DIR);
        return why;
    }
    if (writable_shared(t->tid, &m)) {
        snprintf(why, n, "%s has a writable shared mapping (not safe to patch)", base);
        return why;
    }
    return NULL;
}

/* the "not patched: WHY" kind: the reason up to its first " (" (the model's why.split(" (")[0]) */
static void count_not_patched(struct supervisor *sv, const char *why) {
    char key[sizeof sv->online.kinds[0].key];
    const char *cut = strstr(why, " (");
    int len = cut ? (int)(cut - why) : (int)strlen(why);
    snprintf(key, sizeof key, "not patched: %.*s", len, why);
    for (char *c = key; *c; c++) /* file names are the guest's: printable ASCII only in the JSON's keys */
        if (*c < 0x20 || *c > 0x7E) *c = '?';
    count_kind(sv, key);
}

/* rewrite._try_patch: NULL when the site was rewritten, else why not */
static const char *try_patch(struct supervisor *sv, struct fault *f, struct patchspace *ps, char *why, size_t n) {
    struct thread *t = f->t;
    if (!ps->installed) {
        if (!install_twin(sv, t, ps, f->entry)) {
            snprintf(why, n, "no %%fs twin (%s)", ps->conflict);
            return why;
        }
        /* %fs is the twin's now: the registers an emulation writes back must say so */
        if (ptrace(PTRACE_GETREGS, t->tid, 0, &f->regs) < 0) {
            task_gone(sv, "PTRACE_GETREGS");
            return "the task is gone";
        }
    }
    uint8_t b[16];
    int len = fetch_insn(t->tid, f->eip, b);
    struct prefixes p = legacy_prefixes(b, len);
    int seg_at = -1;
    for (int i = 0; i < p.count; i++)
        if (b[i] == 0x26 || b[i] == 0x2E || b[i] == 0x36 || b[i] == 0x3E || b[i] == 0x64 || b[i] == 0x65) seg_at = i;
    if (seg_at < 0 || b[seg_at] != 0x65) return "no gs override prefix to rewrite";
    uint32_t addr = f->eip + (uint32_t)seg_at;
    static struct mapping m; /* 4 KiB of path: not on the stack of every fault */
    const char *refused = patch_refused(sv, t, ps, addr, why, n, &m);
    if (refused) return refused;
    if (poke_byte(t->tid, addr, 0x64) < 0) return "cannot write the guest's code"; /* the task is gone */
    grow(sv, (void **)&ps->sites, &ps->cap_sites, ps->nsites, sizeof *ps->sites);
    ps->sites[ps->nsites].eip = f->eip;
    ps->sites[ps->nsites].prefix = addr;
    ps->sites[ps->nsites].dev_major = m.dev_major;
    ps->sites[ps->nsites].dev_minor = m.dev_minor;
    ps->sites[ps->nsites].inode = m.inode;
    ps->sites[ps->nsites++].offset = m.offset;
    sv->online.patches++;
    return NULL;
}

/* OnlinePatchStrategy.before_decode (and null_selector_fault), at every %fs/%gs fault of a guest under
 * online-patch, before the slot checks: the ABI checked, patching stopped where %fs is no longer the
 * twin's, a %fs fault at a rewritten site restored. Returns the signal to deliver (0: restart) or -1:
 * the usual path (the slot's strategy: online_patch_fault). */
int patch_trap(struct supervisor *sv, struct fault *f, uint32_t sel) {
    struct patchspace *ps = space(sv, f->t);
    if (!ps) return -1;
    const char *conflict = abi_check(sv, f->t, ps, (uint32_t)f->regs.fs & 0xFFFF);
    int was_patched = find_site(ps, f->eip) >= 0;
    if (conflict && ps->nsites) {
        if (f->in.seg == TC_FS && !(sel & ~3u) && was_patched) count_kind(sv, "null-%fs-at-a-rewritten-site");
        stop_patching(sv, f->t, ps);
    }
    if (f->in.seg != TC_FS) return -1;
    if (was_patched) {
        int i = find_site(ps, f->eip);
        if (i >= 0 && f->in.has_mem && (f->in.off & 0x80000000u) && f->t->has_twin && !conflict &&
            twin_admits(f)) {
            /* a negative offset, which the twin admits: this thread faulted on the gs form before another
             * thread's fault at the site was answered with the patch (their stops are reported in turn;
             * the model's one vCPU has no such overlap). It runs the rewritten form now */
            count_kind(sv, "faulted-before-the-patch");
            return 0;
        }
        if (i >= 0) restore_site(sv, f->t, ps, i, "unpatched-mixed-site"); /* a +ve offset: both signs */
        return 0; /* the restored gs prefix takes it */
    }
    if (!conflict && ps->installed) { /* natively %fs is null here: the guest's own fault */
        sv->online.refused++;
        count_kind(sv, "refused-fs");
        record_delivery(sv, f->site, f->eip, "online-patch refuses: the guest used %fs while it held the "
                                             "hypervisor's twin");
        return SIGSEGV;
    }
    return -1;
}

/* online-patch's answer to a fault on a managed slot (OnlinePatchStrategy.step): a negative %gs offset at
 * a site never mixed, with the twin usable, is patched; everything else is online-probe's */
int online_patch_fault(struct supervisor *sv, struct fault *f) {
    if (f->in.seg != TC_GS) return online_emulate(sv, f);
    struct patchspace *ps = space(sv, f->t);
    if (ps && f->in.has_mem && (f->in.off & 0x80000000u) && !is_mixed(ps, f->eip) && !ps->has_conflict) {
        char buf[256];
        const char *why;
        if (!ps->installed && f->slot->state != ST_UP) why = "no %fs twin yet"; /* expand-down or empty now */
        else why = try_patch(sv, f, ps, buf, sizeof buf);
        if (!why) return 0;
        count_not_patched(sv, why);
    }
    return online_probe_fault(sv, f);
}
