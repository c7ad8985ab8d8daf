/*
 * tlslab hw supervisor: run an unmodified static i386 program natively under
 * ptrace, with its TLS segment truncated below the hypervisor start the way
 * Xen (x86-32, 2004) truncated it, and answer the resulting #GP (SIGSEGV,
 * si_code SI_KERNEL) stops with one of the historical strategies:
 *
 *   untraced  fork + exec + wait, no ptrace (the native baseline)
 *   native    traced, descriptors installed as the guest asked (tracing cost)
 *   emulate   decode the faulting instruction, perform the access with
 *             process_vm_readv/writev, update registers, advance EIP.
 *             Forms the decoder does not know are single-stepped with the
 *             expand-down twin descriptor installed (the truncated form for
 *             a positive offset, which only the online strategies' states
 *             fault on) ("step" fallback: exact for any instruction, and as
 *             safe as flip), then the slot's state is put back
 *   flip      switch the descriptor between the truncated expand-up form and
 *             its expand-down twin (PTRACE_SET_THREAD_AREA) and restart
 *   online-site, online-probe
 *             emulate or flip, chosen per fault by the rules of
 *             tlslab/hypervisor/strategies/online.py (see "Online
 *             strategies"); online-probe also installs an empty descriptor
 *             that makes every %gs access fault while it measures a run
 *
 * A TLS #GP is a forced SIGSEGV, which resets a blocked or ignored SIGSEGV
 * (handler -> SIG_DFL, unblocked) before the tracer sees it; the supervisor
 * tracks the guest's intended disposition and puts it back after the faults it
 * absorbs (see "SIGSEGV disposition"), as on Xen, where the guest kernel's
 * signal code never sees them.
 *
 * The descriptor arithmetic is tlslab.x86.xen's (truncate, flip); the JSON
 * summary records every descriptor installed so the Python side checks they
 * agree. Only the TLS slots of the GDT (entries 12..14) can be rewritten by a
 * tracer; LDT descriptors (modify_ldt) are truncated by rewriting the
 * struct user_desc in guest memory at syscall entry.
 *
 * Processes and threads: every task the guest creates (fork, vfork, clone,
 * clone3) is traced from its first instruction (PTRACE_O_TRACEFORK/VFORK/
 * CLONE/EXEC/EXIT), and the seccomp filter, inherited across fork and exec,
 * brings every process's set_thread_area to us, so each new image's
 * set_thread_area(-1) is truncated like the first one. State is per task
 * (tid): its TLS slots, the step fallback, the SIGSEGV mask; a new task
 * inherits its creator's slots as they were at the clone (truncated, or
 * flipped), and a descriptor the kernel installed for CLONE_SETTLS -- as
 * asked, untruncated -- is truncated with PTRACE_SET_THREAD_AREA on the new
 * tid before it runs (adopt_new_thread). Faults are emulated in, or flipped
 * on, the faulting tid. Under flip a flipped descriptor is that thread's
 * alone: Linux keeps a TLS array per thread and reloads it into the GDT at
 * every context switch, so a flip neither leaks into another thread nor is
 * undone by switching away and back. XenLinux differs: its __switch_to
 * rewrites a GDT TLS slot (one update_descriptor, which re-truncates) only
 * when the incoming thread's copy differs from the outgoing one's, so a flip
 * reverts when switching between threads with different TLS bases and
 * survives between tasks with byte-identical slots
 * (docs/xenlinux-tls-context-switch.md). Counts are kept per process
 * ("processes") and in total; fault sites per program image ("images": one
 * per process and execve, with its mappings read before the execve or at
 * exit). The run ends with the main process: processes still running then
 * are killed ("orphans_killed"); at --timeout or beyond --max-procs
 * processes the whole tree is killed ("stopped").
 *
 * Output: a JSON summary (--json PATH). Exit status 0 when the guest ran (its
 * own status is in the JSON), 2 usage, 3 set-up failure (reason in the JSON).
 *
 * 64-bit host code only; build with plain `cc -O2`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <grp.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/ptrace.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef PTRACE_GET_THREAD_AREA
#define PTRACE_GET_THREAD_AREA 25
#define PTRACE_SET_THREAD_AREA 26
#endif
#ifndef SI_KERNEL
#define SI_KERNEL 0x80
#endif

#define NR32_SET_THREAD_AREA 243
#define NR32_MODIFY_LDT 123
#define NR32_RSEQ 386
#define NR32_SIGNAL 48
#define NR32_SIGACTION 67
#define NR32_SIGRETURN 119
#define NR32_CLONE 120
#define NR32_SIGPROCMASK 126
#define NR32_RT_SIGRETURN 173
#define NR32_RT_SIGACTION 174
#define NR32_RT_SIGPROCMASK 175
#define NR32_CLONE3 435
#define NR32_EXECVE 11
#define NR32_EXECVEAT 358
#define NR32_PTRACE 26
#define NR32_PROCESS_VM_READV 347
#define NR32_PROCESS_VM_WRITEV 348
#define NR32_PIDFD_SEND_SIGNAL 424
#define NR32_PIDFD_OPEN 434
#define NR32_PIDFD_GETFD 438
#define NR32_PROCESS_MADVISE 440
#define SA32_NODEFER 0x40000000u
#define OVERLAY_SIZE "256m" /* --overlay: what the guest may write in all */
#define SA32_RESETHAND 0x80000000u
#define SEGV_BIT (1u << (SIGSEGV - 1))
#define SIG32_DFL 0u
#define SIG32_IGN 1u
#define CLONE_CLEAR_SIGHAND_ 0x100000000ull
#define TLS_FIRST 12 /* GDT_ENTRY_TLS_MIN for 32-bit tasks on x86-64 */
#define TLS_SLOTS 3
#define MAX_THREADS 4096 /* live tasks at once */
#define SITE_CAP 262144
#define MISS_CAP 64

/* ------------------------------------------------------------------ types */
struct udesc { /* struct user_desc, fields unpacked */
    uint32_t entry, base, limit;
    uint32_t flags; /* bit0 seg_32bit, 1-2 contents, 3 read_exec_only, 4 limit_in_pages,
                       5 seg_not_present, 6 useable, 7 lm */
};
#define F_32 1u
#define F_CONTENTS(f) (((f) >> 1) & 3u)
#define F_ROX 8u
#define F_PAGES 16u
#define F_NP 32u

enum { S_UNTRACED, S_NATIVE, S_EMULATE, S_FLIP, S_ONLINE_SITE, S_ONLINE_PROBE, S_COUNT };
static const char *strategy_names[] = {"untraced", "native", "emulate", "flip", "online-site", "online-probe"};
/* strategies that truncate the guest's TLS descriptors and answer the faults */
#define TRUNCATING(s) ((s) >= S_EMULATE)
/* tlslab.hypervisor.strategies.online: emulate or flip, chosen per fault */
#define ONLINE(s) ((s) == S_ONLINE_SITE || (s) == S_ONLINE_PROBE)

/* what a managed slot holds now: the truncated expand-up form, its
 * expand-down twin, or (online-probe) the empty descriptor */
enum { ST_UP, ST_DOWN, ST_EMPTY };

struct slot {
    int valid;         /* the guest installed something here */
    int managed;       /* truncated flat segment that we flip/emulate for */
    int state;         /* ST_UP, ST_DOWN or ST_EMPTY: the descriptor installed now */
    struct udesc requested, up, dn, empty;
    /* online-site: the back-to-back streak of one site in this slot (the
     * model keeps it per (vCPU, selector); see "Online strategies"). A
     * streak of 0 means none, whatever streak_site says (a zeroed slot) */
    int64_t streak_site; /* index in osites[] */
    uint64_t streak;
    /* online-probe: a probe in progress here (its sites: plists[thread][slot]) */
    int probing, probe_sign, probe_home, probe_away;
};

/* The guest's own signal dispositions, as the i386 kernel's rt_sigaction
 * struct (handler, flags, restorer, 64-bit mask). One table per process
 * (threads share it: CLONE_SIGHAND), plus the cached address of an
 * `int $0x80` in that process's text (0: not looked up yet). */
struct ksa32 { uint32_t handler, flags, restorer, mask[2]; };
struct sigtab {
    struct ksa32 act[65];
    uint32_t int80;
    int refs; /* tasks using it (0: free) */
};

struct thread {
    pid_t tid;
    int proc;             /* index in procs[] (-1: creator's event not seen yet) */
    int adopted;          /* its inherited TLS slots were read (adopt_new_thread) */
    /* SIGSEGV disposition tracking (see "SIGSEGV disposition" below) */
    struct sigtab *st;    /* the process's handlers (NULL: not tracked) */
    int blocked_segv;     /* does the guest mean SIGSEGV to be blocked in this thread? */
    int sig_ready, held;  /* inherited from its creator / first stop held until then */
    int in_sig, sig_ok;   /* a traced signal syscall is in flight; its arguments were readable */
    uint32_t sig_nr, sig_arg, sig_out, sig_set;
    struct ksa32 sig_new;
    int alive, seen_stop, in_sta, sta_is_ldt;
    uint32_t sta_ptr;
    struct udesc ldt_saved; /* modify_ldt: the guest's own request, restored at exit */
    int stepping, step_entry;
    uint32_t step_eip;
    uint32_t last_fault_eip;
    int last_fault_flipped;
    struct slot slots[TLS_SLOTS];
};

struct site {
    uint32_t eip;
    int image; /* index in images[]: one program image of one process */
    int used, seg; /* 4 = fs, 5 = gs */
    uint64_t faults, emulated, stepped, to_down, to_up, delivered, neg, pos;
    int64_t off_min, off_max;
    uint8_t bytes[16];
    int nbytes;
};

/* Every process the guest creates (fork, vfork, clone without CLONE_THREAD)
 * and the main one: its counters (the same names as the totals; COUNT adds to
 * both) and its program images (one per execve; a forked child starts with a
 * copy of its parent's program). Threads share their process's entry. */
struct counters {
    uint64_t faults, emulated, stepped, to_down, to_up, delivered, switches, tls_installs, ldt_installs,
        signals_passed, other_segv, segv_restores, group_stops;
};
struct proc {
    pid_t pid, ppid;
    int image;         /* current image (-1: the main process before its exec) */
    int live, tasks;   /* tasks alive now / created in it (the first included) */
    int exited, status, sig, killed;
    struct counters c;
};
struct image {
    pid_t pid;
    int proc;
    char program[512]; /* /proc/PID/exe at the exec event (host path) */
    uint64_t faults;
    char *objects;     /* JSON fragments: its file mappings (record_objects), or NULL */
    size_t objects_len;
};

/* ------------------------------------------------------------------ state */
static int strategy = S_EMULATE;
static uint32_t hv_start = 0xFC000000u;
static int cpu = 0;
static const char *json_path, *cwd_path, *stdin_path, *stdout_path, *stderr_path;
static char *envv[256];
static int envc;
static double timeout_s;
static int step_only; /* emulate: use the step fallback for everything (testing) */
static int model_env; /* present the guest the Unicorn model's process environment (see below) */
/* root-filesystem runs (see run_child): chroot, a private mount namespace
 * for a data tree, the model's uid/gid, exec by descriptor; runs without a
 * root (static guests): --overlay, the data tree as a throwaway "/" */
static const char *chroot_dir, *view_dir, *mount_src, *mount_at, *overlay_dir, *exe_path;
static long guest_uid = -1, guest_gid = -1;
static int exec_fd;
static uint64_t auxv_hidden;
static double handler_s; /* time spent inside the fault handler */
static double restore_s;  /* time spent restoring the guest's SIGSEGV disposition */
static FILE *trace; /* --trace PATH: one line per fault: eip offset */

static struct thread threads[MAX_THREADS];
static int nthreads_seen;
static struct site *sites;
static uint64_t faults, emulated, stepped, to_down, to_up, delivered, switches, seccomp_stops,
    tls_installs, ldt_installs, ldt_truncated, signals_passed, other_segv, clones, forks, vforks, group_stops;
static uint64_t signal_syscalls, segv_restores, segv_handler_restores, segv_mask_restores, restore_failures,
    signals_requeued;
/* processes and images (see struct proc) */
static struct proc *procs;     /* max_procs + 1 entries: never reallocated */
static int nprocs, max_procs = 1024;
static struct image *images;
static int nimages, cap_images;
static struct proc *cp;        /* the process whose event is being handled (NULL: none) */
#define COUNT(f) do { (f)++; if (cp) cp->c.f++; } while (0)
/* stopping the guest (timeout, process limit, too many tasks): every task is killed */
static const char *stop_reason;
static volatile sig_atomic_t stopping, tick;
static uint64_t killed_tasks, orphans_killed;
static struct { char key[32]; uint64_t n; } misses[MISS_CAP];
static int nmisses;
static char first_delivered[512];
static FILE *tlslog; /* buffered JSON fragments of TLS installs */
static char *tlslog_buf;
static size_t tlslog_len;
static volatile sig_atomic_t timed_out;
static pid_t tids[MAX_THREADS]; /* tids[i] = threads[i].tid while alive, else 0 (a dense scan) */
static int last_thread;         /* index of the last thread_of hit */

/* Online strategies (online-site, online-probe): the rules of
 * tlslab/hypervisor/strategies/online.py, which is their specification
 * (tests/test_hw_online.py checks that the decisions agree: faults per site
 * and the model's counters, reported under "online" in the JSON). The
 * threshold is computed here from the two prices the model weighs
 * (--emulate-ns, --flip-ns, passed with full precision) by the same double
 * expression, 2 * flip_ns / emulate_ns, so `streak > threshold`,
 * `estimate > threshold` and the probe cap int(threshold) + 1 compare exactly
 * as in Python. online-rate decides from the guest's instruction count, which
 * a ptrace supervisor does not have: it is model-only (refused by backend.py).
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
 * switches as XenLinux does (see the header); a new task starts with its
 * creator's streak and no probe record (its inherited empty descriptor is an
 * orphan: restored to the truncated expand-up form at its first fault). */
#define REPROBE_FACTOR 8 /* online-probe: probe a site again after 8x, 64x, ... its faults */
struct osite {
    uint32_t eip;
    int sign, used, hot, has_estimate;
    int in_context;     /* an entry per (site, previous fault's site): ProbeStrategy's context keys */
    int ambiguous;      /* a site entry whose probes measured two different remaining runs */
    uint32_t prev;      /* in_context: the previous fault's eip */
    uint64_t seen, next_probe, estimate;
};
static struct osite *osites; /* SITE_CAP entries, open addressing; allocated for the online strategies */
static uint64_t nosites;
static double emulate_ns, flip_ns, threshold;
static uint64_t probe_cap;   /* int(threshold) + 1 */
static uint32_t previous_fault; /* ProbeStrategy._previous: eip of the previous %gs fault decided */
/* the sites of the probe in progress in each thread's slot (indices in osites[]); indexed by
 * thread, not kept in struct slot, so that copying a creator's slots never shares a list */
struct plist { uint32_t *v; size_t n, cap; }; /* pairs: site entry, context entry */
static struct plist plists[MAX_THREADS][TLS_SLOTS];
/* what the model's counters.by_kind and descriptor_writes report, named as there */
static uint64_t on_emulate, on_flip, on_probe, on_probe_flip, on_probe_end, on_probe_orphan, on_marked_hot,
    on_desc_writes, on_unknown_sign;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ----------------------------------------------------- descriptor policy */
/* Same arithmetic as tlslab.x86.xen.truncate / flip, on struct user_desc. */
static uint64_t eff_limit(const struct udesc *d) {
    return (d->flags & F_PAGES) ? ((uint64_t)(d->limit & 0xFFFFF) << 12 | 0xFFF) : (d->limit & 0xFFFFF);
}

static struct udesc truncate_desc(struct udesc d) {
    uint32_t hv = hv_start;
    d.limit &= 0xFFFFF;
    if (d.flags & F_NP) return d;
    if (F_CONTENTS(d.flags) == 1) { /* expand-down data */
        uint64_t lim = eff_limit(&d), upper = (d.flags & F_32) ? 0xFFFFFFFFu : 0xFFFFu;
        if (lim >= upper) return d; /* admits nothing */
        uint64_t last_linear = ((uint64_t)d.base + upper) & 0xFFFFFFFFu;
        if (last_linear >= hv) { d.flags |= F_NP; return d; }
        uint64_t first_safe = upper > last_linear ? upper - last_linear : 0;
        if (lim + 1 >= first_safe) return d;
        uint64_t needed = first_safe - 1;
        if (d.flags & F_PAGES) { d.limit = (uint32_t)(needed >> 12); return d; }
        if (needed > 0xFFFFF) { d.flags |= F_NP; return d; }
        d.limit = (uint32_t)needed;
        return d;
    }
    if (d.base >= hv) { d.flags |= F_NP; return d; }
    uint64_t max_limit = (uint64_t)hv - 1 - d.base;
    if (eff_limit(&d) <= max_limit) return d;
    if (!(d.flags & F_PAGES)) { d.limit = (uint32_t)max_limit; return d; }
    if (max_limit < 0xFFF) { d.flags |= F_NP; return d; }
    d.limit = (uint32_t)((max_limit - 0xFFF) >> 12);
    return d;
}

static int64_t truncated_flat_limit(uint32_t base) {
    if ((uint64_t)base > (uint64_t)hv_start - 0x1000) return -1;
    return (int64_t)(((uint64_t)hv_start - base) >> 12) - 1;
}

static uint32_t expand_down_flat_limit(uint32_t base) {
    return (uint32_t)(((0x100000000ull - (base & ~0xFFFu)) >> 12) - 1);
}

/* xen.looks_like_truncated_flat for the expand-up state */
static int looks_like_truncated_flat_up(const struct udesc *d) {
    if ((d->flags & F_NP) || (d->flags & 4) /* code */ || !(d->flags & F_32) || !(d->flags & F_PAGES))
        return 0;
    if (F_CONTENTS(d->flags) != 0) return 0;
    int64_t l = truncated_flat_limit(d->base);
    return l >= 0 && (int64_t)(d->limit & 0xFFFFF) == l;
}

/* check_data_access: may an access of size bytes at offset go through d? */
static int desc_admits(const struct udesc *d, uint32_t off, int size, int write) {
    if (d->flags & F_NP) return 0;
    int contents = F_CONTENTS(d->flags);
    if (contents & 2) { /* code: readable unless execute-only, never writable */
        if (write || (d->flags & F_ROX)) return 0;
    } else if (write && (d->flags & F_ROX)) return 0;
    uint64_t last = (uint64_t)off + size - 1;
    uint64_t lim = eff_limit(d);
    if (contents == 1) {
        uint64_t upper = (d->flags & F_32) ? 0xFFFFFFFFu : 0xFFFFu;
        return off > lim && last <= upper;
    }
    return last <= lim;
}

/* the descriptor of a managed slot in state st */
static const struct udesc *slot_desc(const struct slot *s, int st) {
    return st == ST_DOWN ? &s->dn : st == ST_EMPTY ? &s->empty : &s->up;
}

/* -------------------------------------------------------------- plumbing */
static void die_setup(const char *what, int err);

static int get_area(pid_t tid, int entry, struct udesc *out) {
    uint32_t raw[4];
    if (ptrace(PTRACE_GET_THREAD_AREA, tid, (void *)(long)entry, raw) < 0) return -1;
    out->entry = raw[0]; out->base = raw[1]; out->limit = raw[2]; out->flags = raw[3];
    return 0;
}

static int set_area(pid_t tid, const struct udesc *d) {
    uint32_t raw[4] = {d->entry, d->base, d->limit, d->flags};
    return ptrace(PTRACE_SET_THREAD_AREA, tid, (void *)(long)d->entry, raw) < 0 ? -1 : 0;
}

static int read_mem(pid_t tid, uint32_t addr, void *buf, size_t n) {
    struct iovec l = {buf, n}, r = {(void *)(uintptr_t)addr, n};
    return process_vm_readv(tid, &l, 1, &r, 1, 0) == (ssize_t)n ? 0 : -1;
}

static int write_mem(pid_t tid, uint32_t addr, const void *buf, size_t n) {
    struct iovec l = {(void *)buf, n}, r = {(void *)(uintptr_t)addr, n};
    return process_vm_writev(tid, &l, 1, &r, 1, 0) == (ssize_t)n ? 0 : -1;
}

/* instruction bytes: one process_vm_readv with the 15 bytes split at a page
 * boundary, so an unmapped next page still yields the bytes before it;
 * PEEKTEXT (which also reads execute-only pages) if that fails */
static int fetch_insn(pid_t tid, uint32_t eip, uint8_t *buf) {
    uint32_t first = 0x1000 - (eip & 0xFFF);
    if (first > 15) first = 15;
    struct iovec l = {buf, 15}, r[2] = {{(void *)(uintptr_t)eip, first},
                                        {(void *)(uintptr_t)(eip + first), 15 - first}};
    ssize_t got = process_vm_readv(tid, &l, 1, r, first < 15 ? 2 : 1, 0);
    if (got > 0) return (int)got;
    int n = 0;
    uint64_t a = eip & ~7ull;
    while (n < 15) {
        errno = 0;
        long w = ptrace(PTRACE_PEEKTEXT, tid, (void *)a, 0);
        if (errno) break;
        for (int i = 0; i < 8; i++) {
            uint64_t at = a + i;
            if (at >= eip && n < 16) buf[n++] = (uint8_t)((uint64_t)w >> (8 * i));
        }
        a += 8;
    }
    return n > 15 ? 15 : n;
}

static struct thread *thread_of(pid_t tid, int create) {
    if (tid <= 0) return NULL;
    if (tids[last_thread] == tid) return &threads[last_thread];
    for (int i = 0; i < MAX_THREADS; i++)
        if (tids[i] == tid) return &threads[last_thread = i];
    if (!create) return NULL;
    for (int i = 0; i < MAX_THREADS; i++)
        if (!threads[i].alive) {
            memset(&threads[i], 0, sizeof threads[i]);
            threads[i].tid = tids[i] = tid;
            threads[i].alive = 1;
            threads[i].proc = -1;
            threads[i].last_fault_eip = 0xFFFFFFFFu;
            nthreads_seen++;
            return &threads[last_thread = i];
        }
    return NULL;
}

static void set_tid(struct thread *t, pid_t tid) {
    t->tid = tids[t - threads] = tid;
}

static int image_new(int proc, const char *program_) {
    char program[sizeof images[0].program];
    snprintf(program, sizeof program, "%s", program_ ? program_ : ""); /* it may point into images[] */
    if (nimages == cap_images) {
        int cap = cap_images ? 2 * cap_images : 64;
        struct image *n = realloc(images, cap * sizeof *n);
        if (!n) die_setup("malloc", ENOMEM);
        images = n;
        cap_images = cap;
    }
    struct image *im = &images[nimages];
    memset(im, 0, sizeof *im);
    im->proc = proc;
    im->pid = procs[proc].pid;
    memcpy(im->program, program, sizeof im->program);
    return nimages++;
}

/* the image t runs now (-1: none) */
static int image_of(const struct thread *t) {
    return t->proc >= 0 ? procs[t->proc].image : -1;
}

static struct site *site_of(int image, uint32_t eip) {
    uint32_t h = (eip * 2654435761u ^ (uint32_t)image * 0x9E3779B9u) & (SITE_CAP - 1);
    for (int i = 0; i < SITE_CAP; i++) {
        struct site *s = &sites[(h + i) & (SITE_CAP - 1)];
        if (!s->used) {
            s->used = 1; s->eip = eip; s->image = image; s->off_min = INT64_MAX; s->off_max = INT64_MIN;
            return s;
        }
        if (s->eip == eip && s->image == image) return s;
    }
    return NULL;
}

static void note_miss(const char *key) {
    for (int i = 0; i < nmisses; i++)
        if (!strcmp(misses[i].key, key)) { misses[i].n++; return; }
    if (nmisses < MISS_CAP) {
        snprintf(misses[nmisses].key, sizeof misses[nmisses].key, "%s", key);
        misses[nmisses++].n = 1;
    }
}

static void log_tls(pid_t tid, const char *how, const struct udesc *req, const struct udesc *inst,
                    const struct udesc *dn) {
    fprintf(tlslog, "%s{\"pid\":%d,\"tid\":%d,\"how\":\"%s\",\"requested\":[%u,%u,%u,%u],\"installed\":[%u,%u,%u,%u]",
            tls_installs + ldt_installs > 1 ? "," : "", cp ? cp->pid : 0, tid, how, req->entry, req->base, req->limit,
            req->flags, inst->entry, inst->base, inst->limit, inst->flags);
    if (dn) fprintf(tlslog, ",\"expand_down\":[%u,%u,%u,%u]", dn->entry, dn->base, dn->limit, dn->flags);
    fprintf(tlslog, "}");
}

/* Record what the guest installed in a GDT TLS slot and, if truncating, install the truncated form. */
static void adopt_slot(struct thread *t, int entry, const struct udesc *requested, const char *how) {
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
    COUNT(tls_installs);
    if (TRUNCATING(strategy)) {
        s->up = truncate_desc(s->requested);
        if (memcmp(&s->up, &s->requested, sizeof s->up) && set_area(t->tid, &s->up) < 0)
            die_setup("PTRACE_SET_THREAD_AREA", errno);
        if (looks_like_truncated_flat_up(&s->up)) {
            s->managed = 1;
            s->dn = s->up;
            s->dn.flags = (s->dn.flags & ~6u) | (1u << 1); /* contents = 1: expand-down */
            s->dn.limit = expand_down_flat_limit(s->up.base);
            /* online-probe's empty descriptor (online.probe_descriptor): expand-down,
             * limit 0xFFFFF in pages, 32-bit, present -- it admits no offset at all, so
             * every access faults and none reaches the hypervisor hole. Linux's
             * set_thread_area takes contents 0 and 1 (data), so it can be installed */
            s->empty = s->up;
            s->empty.flags = (s->empty.flags & ~(6u | F_NP)) | (1u << 1) | F_32 | F_PAGES;
            s->empty.limit = 0xFFFFF;
        }
    }
    log_tls(t->tid, how, &s->requested, &s->up, s->managed ? &s->dn : NULL);
}

/* ------------------------------------------------------------- decoder */
enum { K_NONE, K_MOV_LOAD, K_MOV_STORE, K_MOV_IMM, K_MOVZX, K_MOVSX, K_ALU_MR, K_ALU_RM, K_ALU_MI,
       K_TEST_MR, K_TEST_MI, K_INC, K_DEC, K_PUSH, K_POP, K_CALL, K_JMP, K_XCHG, K_CMPXCHG, K_XADD };

struct insn {
    int len, seg, kind, alu, size, srcsize, reg, has_mem, known_len, lock, rep, addr16, opsize16;
    uint32_t off, imm;
    int uses_esp_after_pop;
    char miss[32];
};

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

/* Decode prefixes, opcode, ModRM/SIB/disp, immediate; compute the offset from regs. */
static void decode(const uint8_t *b, int n, const struct user_regs_struct *r, struct insn *in) {
    memset(in, 0, sizeof *in);
    in->seg = -1;
    int i = 0;
    for (; i < n && i < 14; i++) {
        uint8_t p = b[i];
        if (p == 0x66) in->opsize16 = 1;
        else if (p == 0x67) in->addr16 = 1;
        else if (p == 0xF0) in->lock = 1;
        else if (p == 0xF2 || p == 0xF3) in->rep = p;
        else if (p == 0x26 || p == 0x2E || p == 0x36 || p == 0x3E) in->seg = -2;
        else if (p == 0x64) in->seg = 4;
        else if (p == 0x65) in->seg = 5;
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
struct ctx {
    pid_t tid;
    struct slot *slot;
    int refused;
    char why[160];
};

static int access_ok(struct ctx *c, uint32_t off, int size, int write, uint32_t *lin) {
    if (!desc_admits(&c->slot->requested, off, size, write)) {
        snprintf(c->why, sizeof c->why, "offset %#x outside the requested segment", off);
        return 0;
    }
    uint64_t linear = ((uint64_t)c->slot->requested.base + off) & 0xFFFFFFFFu;
    uint64_t last = linear + size - 1;
    if (last > 0xFFFFFFFFu || last >= hv_start) {
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

/* returns 0 done, -1 refused (deliver SIGSEGV); registers updated in r */
static int emulate(struct ctx *c, const struct insn *in, struct user_regs_struct *r) {
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

/* ------------------------------------------------------------ set-up, JSON */
static const char *setup_error;
static int setup_errno;

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20) fprintf(f, "\\u%04x", *s);
        else fputc(*s, f);
    }
    fputc('"', f);
}

static pid_t child_pid;
static int exit_status = -1, exit_signal = 0;
static double t_fork, t_exec, t_end;
/* untraced: the child's clock just before its execve, in a page shared
 * across the fork -- the run starts there, not at the fork, so building the
 * jail is not counted as the guest's time (traced runs see the exec event) */
static volatile double *exec_clock;

static void write_json(void) {
    if (!json_path) return;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", json_path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fflush(tlslog);
    fprintf(f, "{\"version\":1,\"strategy\":\"%s\",\"hv_start\":%u,\"cpu\":%d,", strategy_names[strategy],
            hv_start, cpu);
    fprintf(f, "\"error\":");
    if (setup_error) {
        char buf[300];
        snprintf(buf, sizeof buf, "%s: %s", setup_error, strerror(setup_errno));
        json_str(f, buf);
        fprintf(f, ",\"error_stage\":");
        json_str(f, setup_error);
        fprintf(f, ",\"error_errno\":%d", setup_errno);
    } else fprintf(f, "null");
    fprintf(f, ",\"status\":");
    if (exit_status >= 0) fprintf(f, "%d", exit_status); else fprintf(f, "null");
    fprintf(f, ",\"signal\":%d,\"timed_out\":%s", exit_signal, timed_out ? "true" : "false");
    fprintf(f, ",\"stopped\":");
    if (stop_reason) json_str(f, stop_reason); else fprintf(f, "null");
    fprintf(f, ",\"orphans_killed\":%llu", (unsigned long long)orphans_killed);
    fprintf(f, ",\"max_procs\":%d,\"processes_started\":%d,\"killed_tasks\":%llu,\"group_stops\":%llu,\"vforks\":%llu",
            max_procs, nprocs, (unsigned long long)killed_tasks, (unsigned long long)group_stops,
            (unsigned long long)vforks);
    fprintf(f, ",\"wall_ns\":%.0f,\"run_ns\":%.0f", (t_end - t_fork) * 1e9,
            (t_end - (t_exec > 0 ? t_exec : t_fork)) * 1e9);
    fprintf(f, ",\"faults\":%llu,\"emulated\":%llu,\"stepped\":%llu,\"to_expand_down\":%llu,"
               "\"to_expand_up\":%llu,\"delivered\":%llu,\"descriptor_switches\":%llu,"
               "\"seccomp_stops\":%llu,\"tls_installs\":%llu,\"ldt_installs\":%llu,\"ldt_truncated\":%llu,"
               "\"signals_passed\":%llu,\"other_sigsegv\":%llu,\"clones\":%llu,\"forks\":%llu,\"threads\":%d,"
               "\"model_env\":%s,\"auxv_hidden\":%llu,\"handler_ns\":%.0f",
            (unsigned long long)faults, (unsigned long long)emulated, (unsigned long long)stepped,
            (unsigned long long)to_down, (unsigned long long)to_up, (unsigned long long)delivered,
            (unsigned long long)switches, (unsigned long long)seccomp_stops,
            (unsigned long long)tls_installs, (unsigned long long)ldt_installs,
            (unsigned long long)ldt_truncated, (unsigned long long)signals_passed,
            (unsigned long long)other_segv, (unsigned long long)clones, (unsigned long long)forks, nthreads_seen,
            model_env ? "true" : "false", (unsigned long long)auxv_hidden, handler_s * 1e9);
    fprintf(f, ",\"signal_syscalls\":%llu,\"sigsegv_restores\":%llu,\"sigsegv_handler_restores\":%llu,"
               "\"sigsegv_mask_restores\":%llu,\"restore_failures\":%llu,\"signals_requeued\":%llu,"
               "\"restore_ns\":%.0f",
            (unsigned long long)signal_syscalls, (unsigned long long)segv_restores,
            (unsigned long long)segv_handler_restores, (unsigned long long)segv_mask_restores,
            (unsigned long long)restore_failures, (unsigned long long)signals_requeued, restore_s * 1e9);
    if (ONLINE(strategy)) {
        /* the model's counters for the same run: by_kind (only the kinds that
         * occurred, as the model's dict) and descriptor_writes; "unknown_sign":
         * faults whose offset the decoder could not compute (the model always
         * can; see probe_fault) */
        const char *kind[] = {"emulate", "flip", "probe", "probe-flip", "probe-end", "probe-orphan",
                              "site-marked-hot"};
        uint64_t nk[] = {on_emulate, on_flip, on_probe, on_probe_flip, on_probe_end, on_probe_orphan,
                         on_marked_hot};
        fprintf(f, ",\"online\":{\"emulate_ns\":%.17g,\"flip_ns\":%.17g,\"threshold\":%.17g,"
                   "\"probe_cap\":%llu,\"sites\":%llu,\"descriptor_writes\":%llu,\"unknown_sign\":%llu,"
                   "\"by_kind\":{",
                emulate_ns, flip_ns, threshold, (unsigned long long)probe_cap, (unsigned long long)nosites,
                (unsigned long long)on_desc_writes, (unsigned long long)on_unknown_sign);
        int firstk = 1;
        for (size_t k = 0; k < sizeof nk / sizeof nk[0]; k++)
            if (nk[k]) {
                fprintf(f, "%s\"%s\":%llu", firstk ? "" : ",", kind[k], (unsigned long long)nk[k]);
                firstk = 0;
            }
        fprintf(f, "}}");
    }
    fprintf(f, ",\"first_delivered\":");
    json_str(f, first_delivered);
    fprintf(f, ",\"decoder_misses\":{");
    for (int i = 0; i < nmisses; i++) {
        if (i) fputc(',', f);
        json_str(f, misses[i].key);
        fprintf(f, ":%llu", (unsigned long long)misses[i].n);
    }
    {
        const struct image *mi = nprocs && procs[0].image >= 0 ? &images[procs[0].image] : NULL;
        fprintf(f, "},\"objects\":[%.*s]", mi ? (int)mi->objects_len : 0, mi && mi->objects ? mi->objects : "");
    }
    fprintf(f, ",\"processes\":[");
    for (int i = 0; i < nprocs; i++) {
        const struct proc *p = &procs[i];
        const struct counters *c = &p->c;
        fprintf(f, "%s{\"pid\":%d,\"ppid\":%d,\"program\":", i ? "," : "", p->pid, p->ppid);
        json_str(f, p->image >= 0 ? images[p->image].program : "");
        fprintf(f, ",\"images\":[");
        int first_im = 1;
        for (int k = 0; k < nimages; k++)
            if (images[k].proc == i) { fprintf(f, "%s%d", first_im ? "" : ",", k); first_im = 0; }
        fprintf(f, "],\"tasks\":%d,\"exited\":%s,\"status\":", p->tasks, p->exited ? "true" : "false");
        if (p->exited && p->status >= 0) fprintf(f, "%d", p->status); else fprintf(f, "null");
        fprintf(f, ",\"signal\":%d,\"killed\":%s,\"faults\":%llu,\"emulated\":%llu,\"stepped\":%llu,"
                   "\"flips\":%llu,\"to_expand_down\":%llu,\"to_expand_up\":%llu,\"delivered\":%llu,"
                   "\"descriptor_switches\":%llu,\"tls_installs\":%llu,\"ldt_installs\":%llu,"
                   "\"signals_passed\":%llu,\"other_sigsegv\":%llu,\"sigsegv_restores\":%llu,\"group_stops\":%llu}",
                p->sig, p->killed ? "true" : "false", (unsigned long long)c->faults,
                (unsigned long long)c->emulated, (unsigned long long)c->stepped,
                (unsigned long long)(c->to_down + c->to_up), (unsigned long long)c->to_down,
                (unsigned long long)c->to_up, (unsigned long long)c->delivered, (unsigned long long)c->switches,
                (unsigned long long)c->tls_installs, (unsigned long long)c->ldt_installs,
                (unsigned long long)c->signals_passed, (unsigned long long)c->other_segv,
                (unsigned long long)c->segv_restores, (unsigned long long)c->group_stops);
    }
    fprintf(f, "],\"images\":[");
    for (int k = 0; k < nimages; k++) {
        const struct image *im = &images[k];
        fprintf(f, "%s{\"pid\":%d,\"program\":", k ? "," : "", im->pid);
        json_str(f, im->program);
        fprintf(f, ",\"faults\":%llu,\"objects\":[%.*s]}", (unsigned long long)im->faults, (int)im->objects_len,
                im->objects ? im->objects : "");
    }
    fprintf(f, "]");
    fprintf(f, ",\"chroot\":");
    if (overlay_dir) {
        char r[4096];
        snprintf(r, sizeof r, "%s/root", view_dir);
        json_str(f, r);
    } else if (chroot_dir) json_str(f, view_dir ? view_dir : chroot_dir); else fprintf(f, "null");
    fprintf(f, ",\"jail\":\"%s\"", overlay_dir ? "overlay" : chroot_dir ? (view_dir ? "view" : "chroot") : "none");
    fprintf(f, ",\"uid\":%ld,\"gid\":%ld", guest_uid, guest_gid);
    fprintf(f, ",\"tls\":[%.*s],\"sites\":[", (int)tlslog_len, tlslog_buf ? tlslog_buf : "");
    int first = 1;
    for (int i = 0; sites && i < SITE_CAP; i++) {
        struct site *s = &sites[i];
        if (!s->used) continue;
        fprintf(f, "%s{\"eip\":%u,\"image\":%d,\"pid\":%d,\"segment\":\"%s\",\"faults\":%llu,\"emulated\":%llu,\"stepped\":%llu,"
                   "\"to_expand_down\":%llu,\"to_expand_up\":%llu,\"delivered\":%llu,\"negative\":%llu,"
                   "\"positive\":%llu,\"min_offset\":%lld,\"max_offset\":%lld,\"bytes\":\"",
                first ? "" : ",", s->eip, s->image, s->image >= 0 ? images[s->image].pid : 0, s->seg == 4 ? "fs" : s->seg == 5 ? "gs" : "?",
                (unsigned long long)s->faults, (unsigned long long)s->emulated, (unsigned long long)s->stepped,
                (unsigned long long)s->to_down, (unsigned long long)s->to_up,
                (unsigned long long)s->delivered, (unsigned long long)s->neg, (unsigned long long)s->pos,
                (long long)(s->off_min == INT64_MAX ? 0 : s->off_min),
                (long long)(s->off_max == INT64_MIN ? 0 : s->off_max));
        for (int k = 0; k < s->nbytes; k++) fprintf(f, "%02x", s->bytes[k]);
        fprintf(f, "\"}");
        first = 0;
    }
    fprintf(f, "]}\n");
    fflush(f);
    fsync(fileno(f));
    fclose(f);
    rename(tmp, json_path);
}

/* ------------------------------------------------ stopping the guest tree */
/* Every descendant of the supervisor, by a scan of /proc (ppid chains): what
 * the untraced strategy has to go by, and a second net under the tracees we
 * know (a child forked a moment ago, not yet reported). The supervisor is a
 * child subreaper, so orphaned guest processes stay its descendants. */
#define PH_CAP 131072
static pid_t ph_pid[PH_CAP], ph_ppid[PH_CAP];
static pid_t ph_parent(pid_t p) { /* -1: not seen */
    for (uint32_t h = ((uint32_t)p * 2654435761u) & (PH_CAP - 1);; h = (h + 1) & (PH_CAP - 1)) {
        if (!ph_pid[h]) return -1;
        if (ph_pid[h] == p) return ph_ppid[h];
    }
}
static int signal_descendants(int sig) {
    static pid_t pid_[65536], ppid_[65536];
    int n = 0, killed = 0;
    memset(ph_pid, 0, sizeof ph_pid);
    pid_t me = getpid();
    DIR *d = opendir("/proc");
    if (!d) return 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < 65536) {
        if (de->d_name[0] < '1' || de->d_name[0] > '9') continue;
        char path[300], buf[512];
        snprintf(path, sizeof path, "/proc/%s/stat", de->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t k = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (k <= 0) continue;
        buf[k] = 0;
        char *rp = strrchr(buf, ')');
        int pp;
        char st;
        if (!rp || sscanf(rp + 1, " %c %d", &st, &pp) != 2) continue;
        pid_[n] = atoi(de->d_name);
        ppid_[n] = pp;
        uint32_t h = ((uint32_t)pid_[n] * 2654435761u) & (PH_CAP - 1);
        while (ph_pid[h]) h = (h + 1) & (PH_CAP - 1);
        ph_pid[h] = pid_[n];
        ph_ppid[h] = pp;
        n++;
    }
    closedir(d);
    for (int i = 0; i < n; i++) {
        pid_t p = ppid_[i];
        for (int hop = 0; hop < 4096 && p > 1; hop++) {
            if (p == me) { if (kill(pid_[i], sig) == 0) killed++; break; }
            p = ph_parent(p);
        }
    }
    return killed;
}

/* SIGKILL every task we trace, and every descendant: those are first frozen
 * with SIGSTOP until a pass finds no more of them (an untraced fork bomb
 * forks faster than a scan kills; stopped, it cannot), then killed. Tracees
 * cannot outrun us: a new one stops before its first instruction. */
static void sweep(void) {
    for (int i = 0; i < MAX_THREADS; i++)
        if (tids[i]) kill(tids[i], SIGKILL);
    if (child_pid > 0) kill(child_pid, SIGKILL);
    int prev = -1;
    for (int pass = 0; pass < 64; pass++) {
        int n = signal_descendants(SIGSTOP);
        if (n == prev) break;
        prev = n;
    }
    signal_descendants(SIGKILL);
}

/* stop the run: the whole guest tree is killed (again every 100 ms until the
 * supervisor has no child and no tracee left) and the reason reported */
static void begin_stop(const char *why) {
    if (!stop_reason) stop_reason = why;
    if (stopping) return;
    stopping = 1;
    struct itimerval it = {{0, 100000}, {0, 100000}};
    setitimer(ITIMER_REAL, &it, NULL);
    sweep();
}

/* The main process is gone: processes it left behind are killed (the run
 * ends with its first process, as in the model) and counted ("orphans_killed";
 * their entries in "processes" say killed). Not a stop: the run is complete. */
static void end_orphans(void) {
    if (stopping) return;
    int left = 0;
    for (int i = 0; i < MAX_THREADS; i++) left += tids[i] != 0;
    if (strategy == S_UNTRACED) left = signal_descendants(0);
    if (!left) return;
    for (int i = 0; i < nprocs; i++) orphans_killed += procs[i].pid != child_pid && !procs[i].exited;
    if (strategy == S_UNTRACED) orphans_killed = (uint64_t)left;
    stopping = 1;
    struct itimerval it = {{0, 100000}, {0, 100000}};
    setitimer(ITIMER_REAL, &it, NULL);
    sweep();
}

static void die_setup(const char *what, int err) {
    setup_error = what;
    setup_errno = err;
    if (child_pid > 0) { stopping = 1; sweep(); }
    t_end = now_s();
    write_json();
    fprintf(stderr, "tlslab-hw-supervisor: %s: %s\n", what, strerror(err));
    exit(3);
}

static volatile sig_atomic_t interrupted;
static void on_term(int sig) { (void)sig; interrupted = 1; }

/* a stop report that is a group-stop, not a signal-delivery stop */
static int is_group_stop(pid_t tid) {
    siginfo_t si;
    return ptrace(PTRACE_GETSIGINFO, tid, 0, &si) < 0 && errno == EINVAL;
}

static void on_alarm(int sig) {
    (void)sig;
    if (!stopping) timed_out = 1;
    tick = 1;
}

/* --------------------------------------------------------------- child */
static void child_fail(int fd, const char *stage) {
    int e = errno;
    char buf[64];
    int n = snprintf(buf, sizeof buf, "%d %s", e, stage);
    if (write(fd, buf, n) < 0) {}
    _exit(127);
}

static int open_to(const char *path, int fd, int flags) {
    int f = open(path, flags, 0644);
    if (f < 0) return -1;
    if (f != fd) { if (dup2(f, fd) < 0) return -1; close(f); }
    return 0;
}

/* bind src read-only on dst (created: a directory or an empty file) */
static void bind_ro(int errfd, const char *src, const char *dst, int is_dir) {
    if (is_dir) {
        if (mkdir(dst, 0755) < 0) child_fail(errfd, "mkdir view entry");
    } else {
        int f = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (f < 0) child_fail(errfd, "create view entry");
        close(f);
    }
    if (mount(src, dst, NULL, MS_BIND | MS_REC, NULL) < 0) child_fail(errfd, "bind mount");
    if (mount(NULL, dst, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
        child_fail(errfd, "remount bind read-only");
}

/* Fill view directory dst (on the tmpfs) with src's entries: symlinks copied,
 * everything else bound read-only -- except the directory on the way to the
 * data tree's mount point `rest` (relative, no leading '/'), which is
 * replicated the same way one level down, and the mount point itself, where
 * the data tree is bound (replacing what the root has there; its parent must
 * exist in the root, as in the model). */
/* the view holds a symlink as the tree has it (its target text, not what it points to) */
static void copy_symlink(int errfd, const char *src, const char *dst, const char *what) {
    char link[4096];
    ssize_t k = readlink(src, link, sizeof link - 1);
    if (k < 0) child_fail(errfd, what);
    link[k] = 0;
    if (symlink(link, dst) < 0) child_fail(errfd, "symlink view entry");
}

static void populate(int errfd, const char *src, const char *dst, const char *rest) {
    char s2[4096], d2[4096], first[256] = "";
    const char *next = NULL;
    if (rest) {
        while (*rest == '/') rest++;
        const char *e = strchrnul(rest, '/');
        if ((size_t)(e - rest) >= sizeof first) { errno = ENAMETOOLONG; child_fail(errfd, "tree mount point"); }
        memcpy(first, rest, e - rest);
        first[e - rest] = 0;
        while (*e == '/') e++;
        next = *e ? e : NULL;
        if (!first[0] || !strcmp(first, ".") || !strcmp(first, "..")) {
            errno = EINVAL;
            child_fail(errfd, "tree mount point");
        }
    }
    int found = 0;
    DIR *d = opendir(src);
    if (!d) child_fail(errfd, "opendir root");
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        snprintf(s2, sizeof s2, "%s/%s", src, de->d_name);
        snprintf(d2, sizeof d2, "%s/%s", dst, de->d_name);
        struct stat st;
        if (lstat(s2, &st) < 0) child_fail(errfd, "lstat root entry");
        int on_path = first[0] && !strcmp(de->d_name, first);
        if (on_path && !next) continue; /* the mount point: the data tree goes here */
        if (on_path) {
            if (!S_ISDIR(st.st_mode)) { errno = ENOTDIR; child_fail(errfd, "tree mount point"); }
            if (mkdir(d2, st.st_mode & 07777) < 0) child_fail(errfd, "mkdir view entry");
            populate(errfd, s2, d2, next);
            found = 1;
            continue;
        }
        if (S_ISLNK(st.st_mode)) {
            copy_symlink(errfd, s2, d2, "readlink root entry");
            continue;
        }
        bind_ro(errfd, s2, d2, S_ISDIR(st.st_mode));
    }
    closedir(d);
    if (first[0] && next && !found) { errno = ENOENT; child_fail(errfd, "tree mount point"); }
    if (first[0] && !next) {
        snprintf(d2, sizeof d2, "%s/%s", dst, first);
        bind_ro(errfd, mount_src, d2, 1);
    }
}

/* --view: in a private mount namespace of the child (gone with the guest):
 * a tmpfs on view_dir holding read-only bind mounts of chroot_dir's entries
 * (see populate) and the data tree bound read-only at mount_at; the child
 * then chroots into view_dir. The tmpfs itself stays writable by root only
 * (mode 0755, like the root's own /), so a uid-1000 guest creating a file in
 * / gets EACCES as in the model and as in a plain chroot; it is discarded
 * with the namespace anyway. Neither the root filesystem nor the host's
 * mount table is touched. */
static void build_view(int errfd) {
    if (unshare(CLONE_NEWNS) < 0) child_fail(errfd, "unshare(CLONE_NEWNS)");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) child_fail(errfd, "mount private /");
    if (mount("tlslab-view", view_dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0)
        child_fail(errfd, "mount tmpfs view");
    populate(errfd, chroot_dir, view_dir, mount_src ? mount_at : NULL);
}

/* --overlay DIR --view EMPTYDIR (runs without a root filesystem): the guest
 * sees DIR as the model shows its data tree, and what it writes lands in a
 * private copy, as in the model's in-memory overlay -- never on the host. In
 * a private mount namespace (gone with the guest), on a size-bounded tmpfs on
 * EMPTYDIR: DIR bound read-only at lower/; an overlayfs of it at tree/
 * (upper/ and work/ on the tmpfs; upper/ gets DIR's mode, owner and times,
 * which the overlay's top directory shows); and root/, the guest's "/": each
 * top-level entry of the tree bound there (symlinks copied), so "/x" is the
 * tree's x as in the model, plus what the model mounts on its root: /dev
 * (null, zero, urandom, random bound read-only) and /proc/self/exe, a
 * symlink to --exe-path, the model's text (static glibc reads it at start-up
 * and mallocs its directory: without it malloc's fault counts change; no
 * procfs: its /proc/PID/root of another uid-1000 process would lead out).
 * The model hides dev and proc from the root's listing; a directory cannot,
 * so the working directory is the overlay itself, detached after root/ is
 * built (no path leads to it; ".." from it stays there, as from the model's
 * root): "." lists exactly the tree. Relative
 * option paths (cwd is the tmpfs) keep commas and colons in DIR out of the
 * mount options. Returns a descriptor of the tree for fchdir after chroot. */
static int build_overlay(int errfd) {
    static const char *devs[] = {"null", "zero", "urandom", "random"};
    char s2[4096], d2[4096];
    struct stat st;
    if (stat(overlay_dir, &st) < 0) child_fail(errfd, "stat data tree");
    if (!S_ISDIR(st.st_mode)) { errno = ENOTDIR; child_fail(errfd, "stat data tree"); }
    if (unshare(CLONE_NEWNS) < 0) child_fail(errfd, "unshare(CLONE_NEWNS)");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) child_fail(errfd, "mount private /");
    if (mount("tlslab-view", view_dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=" OVERLAY_SIZE) < 0)
        child_fail(errfd, "mount tmpfs view");
    if (chdir(view_dir) < 0) child_fail(errfd, "chdir view");
    if (mkdir("lower", 0700) < 0 || mkdir("upper", st.st_mode & 07777) < 0 || mkdir("work", 0700) < 0 ||
        mkdir("tree", 0700) < 0 || mkdir("root", 0755) < 0)
        child_fail(errfd, "mkdir view entry");
    if (mount(overlay_dir, "lower", NULL, MS_BIND, NULL) < 0) child_fail(errfd, "bind mount");
    if (mount(NULL, "lower", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
        child_fail(errfd, "remount bind read-only");
    if (chown("upper", st.st_uid, st.st_gid) < 0 || chmod("upper", st.st_mode & 07777) < 0)
        child_fail(errfd, "chown view entry");
    struct timespec ts[2] = {st.st_atim, st.st_mtim};
    if (utimensat(AT_FDCWD, "upper", ts, 0) < 0) child_fail(errfd, "utimensat view entry");
    if (mount("tlslab-tree", "tree", "overlay", MS_NOSUID | MS_NODEV, "lowerdir=lower,upperdir=upper,workdir=work") < 0)
        child_fail(errfd, "mount overlay");
    int have_dev = 0, have_proc = 0;
    DIR *d = opendir("tree");
    if (!d) child_fail(errfd, "opendir data tree");
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        snprintf(s2, sizeof s2, "tree/%s", de->d_name);
        snprintf(d2, sizeof d2, "root/%s", de->d_name);
        struct stat est;
        if (lstat(s2, &est) < 0) child_fail(errfd, "lstat tree entry");
        have_dev |= !strcmp(de->d_name, "dev");
        have_proc |= !strcmp(de->d_name, "proc");
        if (S_ISLNK(est.st_mode)) {
            copy_symlink(errfd, s2, d2, "readlink tree entry");
            continue;
        }
        if (S_ISDIR(est.st_mode) ? mkdir(d2, 0755) < 0 : mknod(d2, S_IFREG | 0644, 0) < 0)
            child_fail(errfd, "create view entry");
        if (mount(s2, d2, NULL, MS_BIND, NULL) < 0) child_fail(errfd, "bind mount");
    }
    closedir(d);
    if (!have_dev) {
        if (mkdir("root/dev", 0755) < 0) child_fail(errfd, "mkdir view entry");
        for (size_t k = 0; k < sizeof devs / sizeof devs[0]; k++) {
            snprintf(s2, sizeof s2, "/dev/%s", devs[k]);
            snprintf(d2, sizeof d2, "root/dev/%s", devs[k]);
            if (mknod(d2, S_IFREG | 0644, 0) < 0) child_fail(errfd, "create view entry");
            if (mount(s2, d2, NULL, MS_BIND, NULL) < 0) child_fail(errfd, "bind mount /dev");
            if (mount(NULL, d2, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC, NULL) < 0)
                child_fail(errfd, "remount bind read-only");
        }
    }
    if (!have_proc) {
        if (mkdir("root/proc", 0555) < 0 || mkdir("root/proc/self", 0555) < 0)
            child_fail(errfd, "mkdir view entry");
        if (symlink(exe_path ? exe_path : "/bin/prog", "root/proc/self/exe") < 0)
            child_fail(errfd, "symlink view entry");
    }
    int fd = open("tree", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) child_fail(errfd, "open data tree");
    if (umount2("tree", MNT_DETACH) < 0) child_fail(errfd, "detach data tree");
    return fd;
}

/* The guest's seccomp filter (every strategy). Traced strategies: i386
 * set_thread_area/modify_ldt, execve/execveat (the image's mappings before it
 * goes) and the syscalls that change the guest's signal dispositions or mask
 * (see "SIGSEGV disposition") stop for the tracer -- sigaction/sigprocmask
 * only when they change something (second argument non-NULL; signal(2)
 * always); rseq: ENOSYS under --model-env (the model refuses it). Every
 * strategy, the jail: the calls that reach into another process's memory or
 * take its descriptors (ptrace, process_vm_readv/writev, process_madvise,
 * pidfd_open/getfd/send_signal) fail with ENOSYS, as in the model, which has
 * none of them -- a uid-1000 guest could otherwise drive an unjailed host
 * process of the same uid -- also by their x86-64 numbers (a far jump to the
 * 64-bit code segment makes 64-bit calls). Everything else runs. Returns the
 * number of instructions. */
static int build_filter(struct sock_filter *f, int traced) {
    enum { TO_TRACE, TO_ERRNO, TO_ARG1 };
    struct { uint32_t nr; int to; } rules[24];
    int nrules = 0;
#define RULE(n, t) (rules[nrules].nr = (n), rules[nrules++].to = (t))
    if (traced) {
        RULE(NR32_SET_THREAD_AREA, TO_TRACE);
        RULE(NR32_MODIFY_LDT, TO_TRACE);
        if (model_env) RULE(NR32_RSEQ, TO_ERRNO);
        RULE(NR32_SIGNAL, TO_TRACE);
        RULE(NR32_SIGRETURN, TO_TRACE);
        RULE(NR32_RT_SIGRETURN, TO_TRACE);
        RULE(NR32_SIGACTION, TO_ARG1);
        RULE(NR32_RT_SIGACTION, TO_ARG1);
        RULE(NR32_SIGPROCMASK, TO_ARG1);
        RULE(NR32_EXECVE, TO_TRACE);
        RULE(NR32_EXECVEAT, TO_TRACE);
        RULE(NR32_RT_SIGPROCMASK, TO_ARG1);
    }
    RULE(NR32_PTRACE, TO_ERRNO);
    RULE(NR32_PROCESS_VM_READV, TO_ERRNO);
    RULE(NR32_PROCESS_VM_WRITEV, TO_ERRNO);
    RULE(NR32_PIDFD_SEND_SIGNAL, TO_ERRNO);
    RULE(NR32_PIDFD_OPEN, TO_ERRNO);
    RULE(NR32_PIDFD_GETFD, TO_ERRNO);
    RULE(NR32_PROCESS_MADVISE, TO_ERRNO);
#undef RULE
    /* the same calls' x86-64 numbers (and every x32 call): the child's own
     * execve, before the guest runs, is a 64-bit call and must pass */
    static const uint32_t x64[] = {101 /* ptrace */, 310, 311 /* process_vm_readv/writev */, 424, 434, 438, 440};
    int n64 = (int)(sizeof x64 / sizeof x64[0]);
    /* layout: arch check; i386: nr load, the rules, a jump to ALLOW; x86-64: nr load, the x32 test, its
     * rules, a jump to ALLOW; the ARG1 test (2), ALLOW, ERRNO, TRACE */
    int l_x64 = 3 + nrules + 1, l_arg1 = l_x64 + 2 + n64 + 1, l_allow = l_arg1 + 2, l_errno = l_allow + 1,
        l_trace = l_errno + 1, n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_I386, 0, l_x64 - n - 1);
    n++;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    for (int i = 0; i < nrules; i++, n++) {
        int to = rules[i].to == TO_TRACE ? l_trace : rules[i].to == TO_ERRNO ? l_errno : l_arg1;
        f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, rules[i].nr, to - n - 1, 0);
    }
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JA | BPF_K, l_allow - n - 1, 0, 0);
    n++;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, l_errno - n - 1, 0);
    n++;
    for (int i = 0; i < n64; i++, n++)
        f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, x64[i], l_errno - n - 1, 0);
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JA | BPF_K, l_allow - n - 1, 0, 0);
    n++;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1]));
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, l_allow - n - 1, l_trace - n - 1);
    n++;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE);
    return n;
}

static void run_child(int errfd, char **argv, const char *exe) {
    int xfd = -1;
    if (stdin_path && open_to(stdin_path, 0, O_RDONLY) < 0) child_fail(errfd, "stdin");
    if (stdout_path && open_to(stdout_path, 1, O_WRONLY | O_CREAT | O_TRUNC) < 0) child_fail(errfd, "stdout");
    if (stderr_path && open_to(stderr_path, 2, O_WRONLY | O_CREAT | O_TRUNC) < 0) child_fail(errfd, "stderr");
    /* a program outside the root: opened here, executed by descriptor after
     * chroot (the kernel then looks up its PT_INTERP inside the root) */
    if (exec_fd && (xfd = open(exe, O_RDONLY | O_CLOEXEC)) < 0) child_fail(errfd, "open program");
    /* no host daemon reachable (abstract unix sockets, the network: the
     * model has none) and no host SysV IPC objects */
    if ((overlay_dir || chroot_dir) && unshare(CLONE_NEWNET | CLONE_NEWIPC) < 0)
        child_fail(errfd, "unshare(CLONE_NEWNET|CLONE_NEWIPC)");
    if (overlay_dir) {
        int tree = build_overlay(errfd);
        if (chroot("root") < 0) child_fail(errfd, "chroot");
        if (fchdir(tree) < 0) child_fail(errfd, "chdir data tree");
        close(tree);
    } else if (chroot_dir) {
        if (view_dir) build_view(errfd);
        if (chroot(view_dir ? view_dir : chroot_dir) < 0) child_fail(errfd, "chroot");
        if (chdir("/") < 0) child_fail(errfd, "chdir /");
    }
    if (cwd_path && chdir(cwd_path) < 0) child_fail(errfd, "chdir");
    /* the model's guest runs as uid/gid 1000: drop root after chroot (no
     * supplementary groups), so the guest can write neither root nor host */
    if (guest_gid >= 0 || guest_uid >= 0) {
        /* a net under the process limit where the supervisor cannot count
         * (untraced): the unprivileged guest's uid may not have more than
         * max_procs processes at once (fork fails with EAGAIN) */
        struct rlimit rl = {(rlim_t)max_procs, (rlim_t)max_procs};
        if (guest_uid > 0 && setrlimit(RLIMIT_NPROC, &rl) < 0) child_fail(errfd, "setrlimit(RLIMIT_NPROC)");
        if (setgroups(0, NULL) < 0) child_fail(errfd, "setgroups");
        if (guest_gid >= 0 && setgid((gid_t)guest_gid) < 0) child_fail(errfd, "setgid");
        if (guest_uid >= 0 && setuid((uid_t)guest_uid) < 0) child_fail(errfd, "setuid");
    }
    /* --model-env: the model's address space is fixed and has nothing mapped
     * for gigabytes above its stack; the host's is randomised, its i386 stack
     * ending a random 0..8 MiB below 4 GiB. Programs that look for the end of
     * their stack (gnulib's c-stack: mincore probes up to the top of the
     * address space) then make a random number of failing calls. A 3 GiB user
     * space (the i386 3G/1G split of a 2004 Linux) without randomisation puts
     * the stack's end at 0xC0000000, GiBs below the top, as in the model.
     * Inherited by every process the guest starts (exec keeps it) */
    if (model_env && personality(PER_LINUX | ADDR_LIMIT_3GB | ADDR_NO_RANDOMIZE) < 0)
        child_fail(errfd, "personality");
    if (strategy != S_UNTRACED) {
        if (ptrace(PTRACE_TRACEME, 0, 0, 0) < 0) child_fail(errfd, "PTRACE_TRACEME");
        raise(SIGSTOP); /* the parent sets options before we go on */
    }
    struct sock_filter filt[64];
    struct sock_fprog prog = {(unsigned short)build_filter(filt, strategy != S_UNTRACED), filt};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) child_fail(errfd, "PR_SET_NO_NEW_PRIVS");
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) child_fail(errfd, "seccomp");
    envv[envc] = NULL;
    if (exec_clock) *exec_clock = now_s();
    if (xfd >= 0) syscall(SYS_execveat, xfd, "", argv, envv, AT_EMPTY_PATH);
    else execve(exe, argv, envv);
    child_fail(errfd, "execve");
}

/* ------------------------------------------------------------ fault path */
static void record_delivery(struct site *s, uint32_t eip, const char *why) {
    COUNT(delivered);
    if (s) s->delivered++;
    if (!first_delivered[0]) snprintf(first_delivered, sizeof first_delivered, "eip %#x: %s", eip, why);
}

/* The sign of the faulting access's offset (its top bit, as the model's
 * `-1 if offset & 0x80000000 else 1`): +1, -1, or 0 when the decoder could
 * not compute the offset (a form it does not know before the ModRM byte).
 * Then the slot's state tells: only a negative offset faults on the
 * truncated expand-up form, only a positive one on the expand-down twin
 * (anything else is a genuine fault, refused on the way); on the empty
 * descriptor every access faults, so the sign stays unknown. */
static int access_sign(const struct slot *sl, const struct insn *in) {
    if (in->has_mem) return (in->off & 0x80000000u) ? -1 : 1;
    return sl->state == ST_UP ? -1 : sl->state == ST_DOWN ? 1 : 0;
}

/* install state st in the slot (a descriptor write that settles the fault:
 * the instruction restarts) */
static void install_state(struct thread *t, struct slot *sl, int st) {
    if (set_area(t->tid, slot_desc(sl, st)) < 0) die_setup("PTRACE_SET_THREAD_AREA", errno);
    sl->state = st;
    COUNT(switches);
}

/* flip: the truncated expand-up form <-> its expand-down twin, and restart;
 * returns the signal to deliver (0: restart). Genuine faults are refused:
 * the other state must admit the access (xen.flip's check); for a form the
 * decoder does not know, an instruction that faults in both states. */
static int do_flip(struct thread *t, struct slot *sl, struct site *s, const struct insn *in, uint32_t eip) {
    int go_down = sl->state != ST_DOWN;
    const struct udesc *next = go_down ? &sl->dn : &sl->up;
    if (in->has_mem && !in->miss[0]) {
        if (!desc_admits(next, in->off, in->size, 0)) {
            record_delivery(s, eip, "genuine fault: flipping does not admit the access");
            return SIGSEGV;
        }
    } else {
        note_miss(in->miss[0] ? in->miss : "no memory operand");
        if (t->last_fault_eip == eip && t->last_fault_flipped) {
            t->last_fault_flipped = 0;
            record_delivery(s, eip, "genuine fault: faulted in both states");
            return SIGSEGV;
        }
    }
    install_state(t, sl, go_down ? ST_DOWN : ST_UP);
    if (go_down) { COUNT(to_down); if (s) s->to_down++; }
    else { COUNT(to_up); if (s) s->to_up++; }
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
static int do_emulate(struct thread *t, struct slot *sl, struct site *s, struct insn *in,
                      struct user_regs_struct *r, uint32_t eip, int entry, int *step) {
    t->last_fault_flipped = 0;
    if (!in->miss[0] && !step_only) {
        struct ctx c = {t->tid, sl, 0, ""};
        if (emulate(&c, in, r) < 0) {
            record_delivery(s, eip, c.why[0] ? c.why : "cannot emulate");
            return SIGSEGV;
        }
        if (ptrace(PTRACE_SETREGS, t->tid, 0, r) < 0) die_setup("PTRACE_SETREGS", errno);
        COUNT(emulated);
        if (s) s->emulated++;
        return 0;
    }
    note_miss(in->miss[0] ? in->miss : "step-only");
    const struct udesc *with = access_sign(sl, in) > 0 ? &sl->up : &sl->dn;
    if (set_area(t->tid, with) < 0) die_setup("PTRACE_SET_THREAD_AREA", errno);
    COUNT(switches);
    t->stepping = 1;
    t->step_entry = entry;
    t->step_eip = eip;
    COUNT(stepped);
    if (s) s->stepped++;
    *step = 1;
    return 0;
}

/* after the single step: the slot's current state again (expand-up, the
 * twin, or the empty descriptor of a probe started at this fault) */
static void end_step(struct thread *t) {
    struct slot *sl = &t->slots[t->step_entry - TLS_FIRST];
    if (set_area(t->tid, slot_desc(sl, sl->state)) < 0) die_setup("PTRACE_SET_THREAD_AREA", errno);
    COUNT(switches);
    t->stepping = 0;
}

/* ------------------------------------------------------ online strategies */
/* the (eip, sign) entry of the domain-wide site table (in_context: the
 * (eip, sign, prev) entry), created if new */
static struct osite *oentry_of(uint32_t eip, int sign, int in_context, uint32_t prev) {
    uint32_t h = (eip * 2654435761u ^ (sign > 0 ? 0x9E3779B9u : 0u) ^ (in_context ? prev * 40503u + 1u : 0u))
                 & (SITE_CAP - 1);
    for (int i = 0; i < SITE_CAP; i++) {
        struct osite *o = &osites[(h + i) & (SITE_CAP - 1)];
        if (!o->used) {
            /* the table is a decision input: a site without an entry cannot be decided as in the model */
            if (nosites >= SITE_CAP - 1) die_setup("online site table full", ENOSPC);
            o->used = 1; o->eip = eip; o->sign = sign; o->in_context = in_context; o->prev = prev;
            nosites++;
            return o;
        }
        if (o->eip == eip && o->sign == sign && o->in_context == in_context && (!in_context || o->prev == prev))
            return o;
    }
    die_setup("online site table full", ENOSPC);
    return NULL;
}

static struct osite *osite_of(uint32_t eip, int sign) { return oentry_of(eip, sign, 0, 0); }

static void plist_add(struct plist *p, uint32_t site) {
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 64;
        uint32_t *v = realloc(p->v, cap * sizeof *v);
        if (!v) die_setup("malloc (probe sites)", ENOMEM);
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
static void probe_learn(const struct plist *p) {
    size_t n = p->n / 2;
    size_t *order = malloc((n ? n : 1) * sizeof *order);   /* pair indices, in the model's dict order */
    uint64_t *value = malloc((n ? n : 1) * sizeof *value);
    if (!order || !value) die_setup("malloc (probe learn)", ENOMEM);
    size_t m = 0;
    for (size_t k = n; k-- > 0;) {
        size_t j = 0;
        while (j < m && !(p->v[2 * order[j]] == p->v[2 * k] && p->v[2 * order[j] + 1] == p->v[2 * k + 1])) j++;
        if (j == m) order[m++] = k;
        value[j] = n - k;   /* the earliest occurrence's remainder wins, as in the dict */
    }
    for (size_t j = 0; j < m; j++) {
        struct osite *site = &osites[p->v[2 * order[j]]], *ctx = &osites[p->v[2 * order[j] + 1]];
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

/* a fault with the empty descriptor installed (ProbeStrategy._in_probe) */
static int probe_fault(struct thread *t, struct slot *sl, struct site *s, struct insn *in,
                       struct user_regs_struct *r, uint32_t eip, int entry, int *step, int sign, uint32_t prev) {
    struct plist *p = &plists[t - threads][entry - TLS_FIRST];
    t->last_fault_flipped = 0;
    if (!sl->probing) {
        /* the empty descriptor without our record (a task created during a
         * probe inherits its creator's slot, not its probe): the slot gets
         * what the policy gives it, the truncated expand-up form */
        install_state(t, sl, ST_UP);
        on_probe_orphan++;
        on_desc_writes++;
        return 0;
    }
    if (sign == 0) {
        /* a form the decoder does not know, its offset unknown: the model
         * always knows it. End the probe as a fault of the other sign would
         * (the instruction restarts under the descriptor before the probe and
         * is decided again); a fault more than the model's, noted */
        on_unknown_sign++;
        sign = -sl->probe_sign;
    }
    if (sign == sl->probe_sign) {
        plist_add(p, (uint32_t)(osite_of(eip, sign) - osites));
        plist_add(p, (uint32_t)(oentry_of(eip, sign, 1, prev) - osites));
        if (p->n / 2 >= probe_cap) { /* the run already pays for a flip: flip, and restart */
            probe_learn(p);
            sl->probing = 0;
            install_state(t, sl, sl->probe_away);
            on_probe_flip++;
            on_desc_writes++;
            return 0;
        }
        on_emulate++;
        return do_emulate(t, sl, s, in, r, eip, entry, step);
    }
    /* the other sign: the run ended. The slot gets its state from before the probe; restart */
    probe_learn(p);
    sl->probing = 0;
    install_state(t, sl, sl->probe_home);
    on_probe_end++;
    on_desc_writes++;
    return 0;
}

/* ProbeStrategy._start_probe: emulate this access, then install the empty
 * descriptor so that every following %gs access faults. No probe when a flip
 * would not admit the access (genuine: the model's flipped() is None) or the
 * emulation failed. A single-stepped access starts the probe before the
 * step: end_step installs the empty descriptor after it */
static int start_probe(struct thread *t, struct slot *sl, struct site *s, struct insn *in,
                       struct user_regs_struct *r, uint32_t eip, int entry, int *step, int sign,
                       struct osite *o, struct osite *ctx) {
    int home = sl->state, away = home == ST_UP ? ST_DOWN : ST_UP;
    int flippable = !in->has_mem || desc_admits(slot_desc(sl, away), in->off, in->size, 0);
    on_emulate++;
    int deliver = do_emulate(t, sl, s, in, r, eip, entry, step);
    if (deliver || !flippable) return deliver;
    sl->state = ST_EMPTY;
    if (!*step) {
        if (set_area(t->tid, &sl->empty) < 0) die_setup("PTRACE_SET_THREAD_AREA", errno);
        COUNT(switches);
    }
    on_desc_writes++;
    sl->probing = 1;
    sl->probe_sign = sign;
    sl->probe_home = home;
    sl->probe_away = away;
    struct plist *p = &plists[t - threads][entry - TLS_FIRST];
    p->n = 0;
    plist_add(p, (uint32_t)(o - osites));
    plist_add(p, (uint32_t)(ctx - osites));
    on_probe++;
    return 0;
}

/* the online strategies' decision for a fault on a managed slot (OnlineStrategy.step
 * and the two decide() methods); returns the signal to deliver, *step as do_emulate */
static int online_fault(struct thread *t, struct slot *sl, struct site *s, struct insn *in,
                        struct user_regs_struct *r, uint32_t eip, int entry, int *step) {
    if (in->seg != 5) { /* %fs: no flip rule for it, as in Xen 2004; emulate */
        on_emulate++;
        return do_emulate(t, sl, s, in, r, eip, entry, step);
    }
    int sign = access_sign(sl, in);
    uint32_t prev = previous_fault;   /* the context key uses the fault before this one */
    if (strategy == S_ONLINE_PROBE) previous_fault = eip;
    if (sl->state == ST_EMPTY) return probe_fault(t, sl, s, in, r, eip, entry, step, sign, prev);
    struct osite *o = osite_of(eip, sign);
    int deliver;
    if (strategy == S_ONLINE_SITE) {
        /* SiteStreakStrategy: a positive offset (the slot is flipped) flips
         * back; a negative one at a hot site flips; otherwise the streak of
         * this site back to back in this slot grows, and beyond the
         * threshold the site becomes hot and the fault flips */
        if (sign > 0 || o->hot) {
            if (!(deliver = do_flip(t, sl, s, in, eip))) { on_flip++; on_desc_writes++; }
            return deliver;
        }
        int64_t key = o - osites;
        sl->streak = sl->streak_site == key ? sl->streak + 1 : 1;
        sl->streak_site = key;
        if ((double)sl->streak > threshold) {
            o->hot = 1;
            sl->streak = 0;
            on_marked_hot++;
            if (!(deliver = do_flip(t, sl, s, in, eip))) { on_flip++; on_desc_writes++; }
            return deliver;
        }
        on_emulate++;
        return do_emulate(t, sl, s, in, r, eip, entry, step);
    }
    /* ProbeStrategy.decide, outside a probe: any record of one is stale (the
     * descriptor is no longer the empty one; the model pops it here) */
    sl->probing = 0;
    int64_t estimate = probe_due(o);
    if (estimate >= 0 && o->ambiguous)   /* a site reached from several places: its context decides */
        estimate = probe_due(oentry_of(eip, sign, 1, prev));
    if (estimate < 0)
        return start_probe(t, sl, s, in, r, eip, entry, step, sign, o, oentry_of(eip, sign, 1, prev));
    if ((double)estimate > threshold) {
        if (!(deliver = do_flip(t, sl, s, in, eip))) { on_flip++; on_desc_writes++; }
        return deliver;
    }
    on_emulate++;
    return do_emulate(t, sl, s, in, r, eip, entry, step);
}

/* returns the signal to deliver on resume (0 = suppress); *step = 1 to single-step */
static int handle_segv(struct thread *t, int *step) {
    siginfo_t si;
    *step = 0;
    if (ptrace(PTRACE_GETSIGINFO, t->tid, 0, &si) < 0) return SIGSEGV;
    if (si.si_code != SI_KERNEL || strategy == S_NATIVE) { COUNT(other_segv); return SIGSEGV; }
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return SIGSEGV;
    uint32_t eip = (uint32_t)r.rip;
    uint8_t b[16];
    int n = fetch_insn(t->tid, eip, b);
    struct insn in;
    decode(b, n, &r, &in);
    if (in.seg != 4 && in.seg != 5) { COUNT(other_segv); return SIGSEGV; }
    uint32_t sel = (uint32_t)(in.seg == 4 ? r.fs : r.gs) & 0xFFFF;
    int entry = sel >> 3;
    struct site *s = site_of(image_of(t), eip);
    COUNT(faults);
    if (image_of(t) >= 0) images[image_of(t)].faults++;
    if (trace) fprintf(trace, "%#x %d\n", eip, in.has_mem ? (int32_t)in.off : 0);
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
        record_delivery(s, eip, "segment is not a GDT TLS slot");
        return SIGSEGV;
    }
    struct slot *sl = &t->slots[entry - TLS_FIRST];
    if (!sl->valid || !sl->managed) {
        record_delivery(s, eip, "segment is not a truncated flat segment");
        return SIGSEGV;
    }
    if (strategy == S_FLIP) return do_flip(t, sl, s, &in, eip);
    if (ONLINE(strategy)) return online_fault(t, sl, s, &in, &r, eip, entry, step);
    return do_emulate(t, sl, s, &in, &r, eip, entry, step);
}

/* syscall-exit of set_thread_area / modify_ldt */
static void finish_tls_syscall(struct thread *t) {
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return;
    int32_t ret = (int32_t)r.rax;
    if (t->sta_is_ldt) {
        if (t->sta_is_ldt == 2) /* restore the guest's own request in its memory */
            write_mem(t->tid, t->sta_ptr, &t->ldt_saved, 16);
        return;
    }
    if (ret != 0) return;
    uint32_t raw[4];
    if (read_mem(t->tid, t->sta_ptr, raw, sizeof raw) < 0) return;
    int entry = (int)raw[0];
    if (entry < TLS_FIRST || entry >= TLS_FIRST + TLS_SLOTS) return;
    struct udesc req;
    if (get_area(t->tid, entry, &req) < 0) die_setup("PTRACE_GET_THREAD_AREA", errno);
    adopt_slot(t, entry, &req, "set_thread_area");
}

static void start_tls_syscall(struct thread *t) {
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return;
    seccomp_stops++;
    t->in_sta = 1;
    t->sta_is_ldt = 0;
    if ((uint32_t)r.orig_rax == NR32_MODIFY_LDT) {
        t->sta_is_ldt = 1;
        t->sta_ptr = (uint32_t)r.rcx;
        uint32_t func = (uint32_t)r.rbx;
        if ((func == 1 || func == 0x11) && TRUNCATING(strategy)) {
            uint32_t raw[4];
            if (read_mem(t->tid, t->sta_ptr, raw, 16) == 0) {
                struct udesc req = {raw[0], raw[1], raw[2], raw[3]}, tr = truncate_desc(req);
                COUNT(ldt_installs);
                tr.limit |= req.limit & ~0xFFFFFu;
                if (memcmp(&tr, &req, sizeof tr)) {
                    uint32_t out[4] = {tr.entry, tr.base, tr.limit, tr.flags};
                    if (write_mem(t->tid, t->sta_ptr, out, 16) == 0) {
                        t->ldt_saved = req;
                        t->sta_is_ldt = 2;
                        ldt_truncated++;
                    }
                }
                log_tls(t->tid, "modify_ldt", &req, &tr, NULL);
            }
        }
    } else {
        t->sta_ptr = (uint32_t)r.rbx;
    }
}

/* A new task (fork, vfork, clone), stopped before its first instruction,
 * after its creator's event (inherit_signals copied the creator's slots as
 * they were at the clone: the creator has not run since, or we copied them
 * at its event stop). A slot the kernel still holds as inherited keeps the
 * creator's state (truncated, or flipped: the child inherits the GDT TLS
 * entries as they were); any other descriptor -- CLONE_SETTLS, which the
 * kernel installs untruncated -- is adopted and truncated here, with
 * PTRACE_SET_THREAD_AREA on the new tid, before it runs any code. */
static void adopt_new_thread(struct thread *t) {
    t->adopted = 1;
    for (int e = TLS_FIRST; e < TLS_FIRST + TLS_SLOTS; e++) {
        struct slot *ts = &t->slots[e - TLS_FIRST];
        struct udesc d;
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
        adopt_slot(t, e, &d, "clone");
    }
}

/* --model-env, at the exec stop: hide the auxv entries the Unicorn model does
 * not provide (vDSO: AT_SYSINFO, AT_SYSINFO_EHDR; AT_MINSIGSTKSZ; AT_RSEQ_*)
 * by turning them into AT_IGNORE. Without the vDSO, static glibc builds no
 * link_map for it (calloc/malloc at start-up) -- which shifts malloc's state
 * and with it the number of %gs faults. */
static void hide_auxv(pid_t tid) {
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, tid, 0, &r) < 0) return;
    if (r.cs != 0x23) return; /* not an i386 image (a guest may exec a 64-bit program): its own layout */
    uint32_t sp = (uint32_t)r.rsp, argc;
    if (read_mem(tid, sp, &argc, 4) < 0) return;
    uint32_t p = sp + 4 + 4 * (argc + 1), v = 1;
    for (int k = 0; k < 4096 && v; k++, p += 4)  /* envp up to NULL */
        if (read_mem(tid, p, &v, 4) < 0) return;
    for (int k = 0; k < 64; k++, p += 8) {
        uint32_t av[2];
        if (read_mem(tid, p, av, 8) < 0 || av[0] == 0) break;
        if (av[0] == 32 || av[0] == 33 || av[0] == 51 || av[0] == 27 || av[0] == 28) {
            uint32_t ignore = 1;
            if (write_mem(tid, p, &ignore, 4) == 0) auxv_hidden++;
        }
    }
}

/* ------------------------------------------------- SIGSEGV disposition */
/* A #GP in user mode is a forced SIGSEGV: if the guest has SIGSEGV blocked
 * or ignored, the kernel unblocks it and resets the handler to SIG_DFL
 * (force_sig_info_to_task) before we see the signal-delivery stop. On Xen the
 * TLS #GP goes to the hypervisor and the guest's disposition is untouched.
 * So the supervisor keeps what the guest means its disposition to be --
 *   - the handler table per process, from signal/sigaction/rt_sigaction
 *     (recorded at syscall exit when the change took effect), reset like
 *     the kernel at exec (handlers -> SIG_DFL, SIG_IGN kept, flags/masks
 *     cleared), SA_RESETHAND applied at delivery, copied at fork / shared
 *     by threads;
 *   - per thread, whether SIGSEGV is blocked, from sigprocmask /
 *     rt_sigprocmask, from handler entry (sa_mask, the signal itself unless
 *     SA_NODEFER) and from sigreturn (the mask saved in the signal frame,
 *     read at its seccomp stop; the kernel's SigBlk at its exit if the frame
 *     cannot be read). Not followed: the temporary masks of sigsuspend,
 *     pselect/ppoll/epoll_pwait (a handler run inside them starts from the
 *     mask before the call, here)
 * -- and, after suppressing a TLS fault of a thread whose SIGSEGV was blocked
 * or ignored (exactly the cases in which the kernel reset something),
 * restores it by making the thread execute rt_sigaction / rt_sigprocmask
 * (an `int $0x80` found in its text, arguments on its stack well below ESP,
 * registers and memory put back afterwards). Other guests pay nothing at
 * faults: the check is two loads. */
static int is_handler_fn(uint32_t h) { return h != SIG32_DFL && h != SIG32_IGN; }

static struct sigtab sigtabs[MAX_THREADS];

static struct sigtab *sigtab_new(const struct sigtab *copy) {
    for (int i = 0; i < MAX_THREADS; i++) {
        struct sigtab *s = &sigtabs[i];
        if (s->refs) continue;
        if (copy) *s = *copy;
        else memset(s, 0, sizeof *s);
        s->refs = 1;
        return s;
    }
    return NULL;
}

/* what exec (and clone3's CLONE_CLEAR_SIGHAND) does to the handlers */
static void sigtab_flush(struct sigtab *s, int new_mm) {
    for (int k = 1; k <= 64; k++) {
        struct ksa32 *a = &s->act[k];
        if (a->handler != SIG32_IGN) a->handler = SIG32_DFL;
        a->flags = a->restorer = a->mask[0] = a->mask[1] = 0;
    }
    if (new_mm) s->int80 = 0;
}

static int sigblk_segv(pid_t tid) { /* the kernel's view: is SIGSEGV blocked in tid? -1 unknown */
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/status", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strstr(buf, "\nSigBlk:");
    if (!p) return -1;
    return (int)((strtoull(p + 8, NULL, 16) >> (SIGSEGV - 1)) & 1);
}

/* seccomp stop of a signal syscall: read what it asks for (the kernel copies
 * its arguments right after this stop); it is recorded at the exit */
static void start_sig_syscall(struct thread *t, const struct user_regs_struct *r) {
    uint32_t nr = (uint32_t)r->orig_rax, b = (uint32_t)r->rbx, c = (uint32_t)r->rcx, d = (uint32_t)r->rdx,
             si = (uint32_t)r->rsi;
    signal_syscalls++;
    t->in_sig = 1;
    t->sig_nr = nr;
    t->sig_arg = b;
    t->sig_out = d;
    t->sig_ok = 0;
    memset(&t->sig_new, 0, sizeof t->sig_new);
    switch (nr) {
    case NR32_SIGNAL: /* kernel: SA_ONESHOT | SA_NOMASK, empty mask */
        t->sig_new.handler = c;
        t->sig_new.flags = SA32_RESETHAND | SA32_NODEFER;
        t->sig_out = 0;
        t->sig_ok = 1;
        break;
    case NR32_SIGACTION: { /* struct old_sigaction: handler, mask, flags, restorer */
        uint32_t o[4];
        if (c && read_mem(t->tid, c, o, sizeof o) == 0) {
            t->sig_new.handler = o[0];
            t->sig_new.mask[0] = o[1];
            t->sig_new.flags = o[2];
            t->sig_new.restorer = o[3];
            t->sig_ok = 1;
        }
        break;
    }
    case NR32_RT_SIGACTION:
        if (c && si == 8 && read_mem(t->tid, c, &t->sig_new, sizeof t->sig_new) == 0) t->sig_ok = 1;
        break;
    case NR32_SIGPROCMASK:
        if (c && b <= 2 && read_mem(t->tid, c, &t->sig_set, 4) == 0) t->sig_ok = 1;
        break;
    case NR32_RT_SIGPROCMASK:
        if (c && b <= 2 && si == 8 && read_mem(t->tid, c, &t->sig_set, 4) == 0) t->sig_ok = 1;
        break;
    default: { /* sigreturn, rt_sigreturn: the kernel restores the mask saved in the
                * signal frame (ia32: rt_sigframe at ESP-4, uc_sigmask at +252; sigframe
                * at ESP-8, sc.oldmask at +88); if that cannot be read, /proc at the exit */
        uint32_t sp = (uint32_t)r->rsp, m;
        if (read_mem(t->tid, nr == NR32_RT_SIGRETURN ? sp + 248 : sp + 80, &m, 4) == 0) {
            t->blocked_segv = (m & SEGV_BIT) != 0;
            t->in_sig = 0; /* done: no exit stop needed */
        }
        t->sig_ok = 1;
    }
    }
}

/* its syscall-exit stop: record the change if it took effect (success, or
 * EFAULT from writing the old value: the kernel applied the new one first) */
static void finish_sig_syscall(struct thread *t) {
    t->in_sig = 0;
    if (t->sig_nr == NR32_SIGRETURN || t->sig_nr == NR32_RT_SIGRETURN) {
        int b = sigblk_segv(t->tid);
        if (b >= 0) t->blocked_segv = b;
        return;
    }
    struct user_regs_struct r;
    if (!t->sig_ok || ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return;
    int32_t ret = (int32_t)r.rax;
    int took = t->sig_nr == NR32_SIGNAL ? !(ret < 0 && ret >= -4095)
                                        : ret == 0 || (ret == -EFAULT && t->sig_out != 0);
    if (!took) return;
    if (t->sig_nr == NR32_SIGNAL || t->sig_nr == NR32_SIGACTION || t->sig_nr == NR32_RT_SIGACTION) {
        if (t->st && t->sig_arg >= 1 && t->sig_arg <= 64) t->st->act[t->sig_arg] = t->sig_new;
        return;
    }
    int segv = (t->sig_set & SEGV_BIT) != 0;
    if (t->sig_arg == 0) { if (segv) t->blocked_segv = 1; }   /* SIG_BLOCK */
    else if (t->sig_arg == 1) { if (segv) t->blocked_segv = 0; } /* SIG_UNBLOCK */
    else t->blocked_segv = segv;                                /* SIG_SETMASK */
}

/* the tracer delivers sig: a handler runs with sa_mask (and sig unless SA_NODEFER) blocked */
static void note_delivery(struct thread *t, int sig) {
    if (!t->st || sig < 1 || sig > 64) return;
    struct ksa32 *a = &t->st->act[sig];
    if (!is_handler_fn(a->handler)) return;
    if ((a->mask[0] & SEGV_BIT) || (sig == SIGSEGV && !(a->flags & SA32_NODEFER))) t->blocked_segv = 1;
    if (a->flags & SA32_RESETHAND) a->handler = SIG32_DFL;
}

/* the clone flags of the clone/clone3 that parent (at its event stop) made; 0 for fork/vfork */
static uint64_t clone_flags(const struct thread *parent, int *known) {
    uint64_t flags = 0;
    struct user_regs_struct r;
    *known = 0;
    if (ptrace(PTRACE_GETREGS, parent->tid, 0, &r) == 0) {
        uint32_t nr = (uint32_t)r.orig_rax;
        if (nr == NR32_CLONE) { flags = (uint32_t)r.rbx; *known = 1; }
        else if (nr == NR32_CLONE3) *known = read_mem(parent->tid, (uint32_t)r.rbx, &flags, 8) == 0;
        else *known = 1; /* fork, vfork */
    }
    return flags;
}

/* is tid a thread of another task's group? (/proc: when the clone flags could not be read) */
static int tgid_of(pid_t tid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/status", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strstr(buf, "\nTgid:");
    return p ? atoi(p + 7) : -1;
}

/* PTRACE_EVENT_CLONE/FORK/VFORK of parent, new task c: it belongs to a new
 * process (fork, vfork, clone without CLONE_THREAD) or to parent's; it copies
 * (or, with CLONE_SIGHAND, shares) the handlers and copies the blocked mask
 * and the parent's TLS slots as they are now (see adopt_new_thread) */
static void inherit_signals(struct thread *parent, struct thread *c, uint64_t flags, int new_proc) {
    c->blocked_segv = parent->blocked_segv;
    if ((flags & CLONE_SIGHAND) && parent->st) { c->st = parent->st; c->st->refs++; }
    else {
        c->st = sigtab_new(parent->st);
        if (c->st && (flags & CLONE_CLEAR_SIGHAND_)) sigtab_flush(c->st, 0);
    }
    memcpy(c->slots, parent->slots, sizeof c->slots);
    if (new_proc) {
        struct proc *pp = parent->proc >= 0 ? &procs[parent->proc] : NULL;
        struct proc *np = &procs[nprocs];
        memset(np, 0, sizeof *np);
        np->pid = c->tid;
        np->ppid = pp ? pp->pid : parent->tid;
        np->image = -1;
        c->proc = nprocs++;
        np->image = image_new(c->proc, pp && pp->image >= 0 ? images[pp->image].program : "");
    } else {
        c->proc = parent->proc;
    }
    if (c->proc >= 0) { procs[c->proc].live++; procs[c->proc].tasks++; }
    c->sig_ready = 1;
}

/* t is gone (exit or killed; status -1: vanished without a report, e.g. the
 * old leader at a non-leader's execve) */
static void thread_gone(struct thread *t, int status) {
    if (t->st && --t->st->refs < 0) t->st->refs = 0;
    t->st = NULL;
    if (t->proc >= 0) {
        struct proc *p = &procs[t->proc];
        p->live--;
        if (t->tid == p->pid && status != -1) {
            p->exited = 1;
            if (WIFEXITED(status)) p->status = WEXITSTATUS(status);
            else {
                p->status = -1;
                p->sig = WTERMSIG(status);
                if (stopping && p->sig == SIGKILL) p->killed = 1;
            }
        }
    }
    t->alive = 0;
    tids[t - threads] = 0;
}

/* an `int $0x80` (cd 80, anywhere: execution does not care about
 * instruction boundaries) in an executable mapping of the tracee */
static uint32_t find_int80(pid_t tid) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/maps", tid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    uint32_t found = 0;
    static uint8_t buf[65536 + 1];
    while (!found && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3 || perms[2] != 'x' || hi > 0xFFFFFFFFul) continue;
        for (unsigned long a = lo; a < hi && !found; a += 65536) {
            size_t n = hi - a > 65536 ? 65536 : hi - a;
            if (read_mem(tid, (uint32_t)a, buf, n + (a + n < hi)) < 0) break;
            uint8_t *p = memmem(buf, n + (a + n < hi), "\xcd\x80", 2);
            if (p) found = (uint32_t)(a + (p - buf));
        }
    }
    fclose(f);
    return found;
}

static int requeue[16], nrequeue;

/* Make t execute `int $0x80` at `at` with these registers; single-step to the
 * syscall's exit. Signals that arrive meanwhile are re-sent afterwards.
 * Returns 0 (result in *ret), -1 failure, -2 the thread is gone (status in *gone). */
static int inject_syscall(struct thread *t, const struct user_regs_struct *base, uint32_t at, uint32_t nr,
                          uint32_t a1, uint32_t a2, uint32_t a3, uint32_t a4, int32_t *ret, int *gone) {
    struct user_regs_struct r = *base;
    r.rip = at;
    r.rax = nr; r.rbx = a1; r.rcx = a2; r.rdx = a3; r.rsi = a4;
    r.orig_rax = (unsigned long long)-1;
    if (ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0) return -1;
    if (ptrace(PTRACE_SINGLESTEP, t->tid, 0, 0) < 0) return -1;
    for (int guard = 0; guard < 256; guard++) {
        int st;
        pid_t w = waitpid(t->tid, &st, __WALL);
        if (w < 0) {
            if (errno == EINTR && !timed_out) continue;
            return -1;
        }
        if (WIFEXITED(st) || WIFSIGNALED(st)) { *gone = st; return -2; }
        if (!WIFSTOPPED(st)) continue;
        int sig = WSTOPSIG(st), ev = st >> 16;
        if (sig == SIGTRAP && !ev) { /* the step trap at the syscall's exit */
            if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return -1;
            if ((uint32_t)r.rip != at + 2) return -1;
            *ret = (int32_t)r.rax;
            return 0;
        }
        if (!ev && sig != (SIGTRAP | 0x80) && nrequeue < 16) requeue[nrequeue++] = sig;
        /* our own seccomp stop (rt_sigaction/rt_sigprocmask are traced) or a signal: go on */
        if (ptrace(PTRACE_SINGLESTEP, t->tid, 0, 0) < 0) return -1;
    }
    return -1;
}

static int needs_restore(const struct thread *t) {
    return t->st && (t->blocked_segv || t->st->act[SIGSEGV].handler == SIG32_IGN);
}

/* after suppressing a TLS fault of t (needs_restore(t)): put back what the
 * kernel's forced SIGSEGV changed. Returns 0, or -2 with *gone = wait status. */
static int restore_segv(struct thread *t, int *gone) {
    struct user_regs_struct saved;
    struct sigtab *s = t->st;
    int want_handler = s->act[SIGSEGV].handler != SIG32_DFL; /* the kernel set SIG_DFL */
    int want_mask = t->blocked_segv;                          /* the kernel unblocked it */
    int rc = 0;
    nrequeue = 0;
    COUNT(segv_restores);
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &saved) < 0) { restore_failures++; return 0; }
    uint8_t chk[2];
    if (!s->int80 || read_mem(t->tid, s->int80, chk, 2) < 0 || chk[0] != 0xcd || chk[1] != 0x80)
        s->int80 = find_int80(t->tid);
    /* scratch: 32 bytes well below ESP (i386 has no red zone; anything below
     * ESP is dead, but it is put back anyway); on ESP itself if that fails */
    uint32_t scratch = ((uint32_t)saved.rsp - 1024) & ~15u;
    uint8_t old[32], args[32] = {0};
    if (read_mem(t->tid, scratch, old, sizeof old) < 0) {
        scratch = (uint32_t)saved.rsp & ~3u;
        if (read_mem(t->tid, scratch, old, sizeof old) < 0) scratch = 0;
    }
    if (!s->int80 || !scratch) { restore_failures++; return 0; }
    memcpy(args, &s->act[SIGSEGV], sizeof s->act[SIGSEGV]); /* 20 bytes: struct sigaction */
    uint32_t set[2] = {SEGV_BIT, 0};
    memcpy(args + 24, set, 8);
    if (write_mem(t->tid, scratch, args, sizeof args) < 0) { restore_failures++; return 0; }
    int32_t ret = 0;
    if (want_handler) {
        rc = inject_syscall(t, &saved, s->int80, NR32_RT_SIGACTION, SIGSEGV, scratch, 0, 8, &ret, gone);
        if (rc == -2) return -2;
        if (rc == 0 && ret == 0) segv_handler_restores++;
        else restore_failures++;
    }
    if (want_mask) {
        rc = inject_syscall(t, &saved, s->int80, NR32_RT_SIGPROCMASK, 0 /* SIG_BLOCK */, scratch + 24, 0, 8,
                            &ret, gone);
        if (rc == -2) return -2;
        if (rc == 0 && ret == 0) segv_mask_restores++;
        else restore_failures++;
    }
    write_mem(t->tid, scratch, old, sizeof old);
    if (ptrace(PTRACE_SETREGS, t->tid, 0, &saved) < 0) die_setup("PTRACE_SETREGS", errno);
    for (int i = 0; i < nrequeue; i++) { /* signals that arrived meanwhile: pending again */
        syscall(SYS_tkill, t->tid, requeue[i]);
        signals_requeued++;
    }
    return 0;
}

/* an image's file mappings (/proc/PID/maps, paths as the supervisor sees
 * them), read at its process's exit or before its execve: "objects" of the
 * image in the JSON (the main process's last image also as the top-level
 * "objects"), so that fault sites can be named by (object, file offset)
 * whatever the load addresses */
static void record_objects(pid_t pid, int img) {
    char path[64], line[4352];
    if (img < 0) return;
    struct image *im = &images[img];
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *f = fopen(path, "r");
    if (!f) return;
    free(im->objects);
    im->objects = NULL;
    im->objects_len = 0;
    FILE *out = open_memstream(&im->objects, &im->objects_len);
    if (!out) { fclose(f); return; }
    int first = 1;
    while (fgets(line, sizeof line, f)) {
        unsigned long long lo, hi, off;
        char perms[8];
        int n = 0;
        if (sscanf(line, "%llx-%llx %7s %llx %*s %*s %n", &lo, &hi, perms, &off, &n) < 4 || !n) continue;
        char *name = line + n;
        name[strcspn(name, "\n")] = 0;
        if (name[0] != '/') continue; /* anonymous, [stack], [heap], ... */
        fprintf(out, "%s{\"start\":%llu,\"end\":%llu,\"offset\":%llu,\"perms\":", first ? "" : ",", lo, hi, off);
        json_str(out, perms);
        fprintf(out, ",\"path\":");
        json_str(out, name);
        fputc('}', out);
        first = 0;
    }
    fclose(f);
    fclose(out);
}

/* ----------------------------------------------------------------- main */
static void usage(void) {
    fprintf(stderr,
            "usage: tlslab-hw-supervisor [--strategy untraced|native|emulate|flip|online-site|online-probe]\n"
            "    [--emulate-ns NS --flip-ns NS] [--hv-start HEX]\n"
            "    [--cpu N|-1] [--cwd DIR] [--stdin PATH] [--stdout PATH] [--stderr PATH] [--env K=V]...\n"
            "    [--timeout SECONDS] [--max-procs N] [--step-only] [--model-env] [--trace PATH]\n"
            "    [--chroot DIR [--view EMPTYDIR [--mount-src DIR --mount-at PATH]]] [--uid N] [--gid N] [--exec-fd]\n"
            "    [--overlay DIR --view EMPTYDIR --exec-fd [--exe-path PATH]]\n"
            "    --json PATH -- EXE ARGV0 [ARGS...]\n"
            "  --chroot: the guest runs chrooted in DIR; --cwd is then a path inside it, and EXE too\n"
            "  unless --exec-fd (EXE is a host path, opened before chroot and executed by descriptor).\n"
            "  --view: in a private mount namespace, build DIR's view (read-only binds of DIR's top-level\n"
            "  entries on a tmpfs mounted on EMPTYDIR) with --mount-src bound read-only at --mount-at.\n"
            "  --overlay: the guest's cwd is DIR, / has DIR's top-level entries, /dev and /proc/self/exe\n"
            "  (-> --exe-path, default /bin/prog); its writes\n"
            "  go to a private overlay (tmpfs, " OVERLAY_SIZE ") in a private mount namespace built on EMPTYDIR;\n"
            "  no --cwd; EXE is a host path executed by descriptor.\n"
            "  --uid/--gid: drop to these ids (no supplementary groups) after chroot, before exec.\n"
            "  --max-procs: processes the guest may start in all (the first included, default 1024);\n"
            "  beyond it, as at --timeout, every guest task is killed (\"stopped\" in the JSON).\n"
            "  --emulate-ns/--flip-ns: the online strategies' prices (both > 0, required by them):\n"
            "  threshold = 2 * flip_ns / emulate_ns, as tlslab.hypervisor.strategies.online.\n");
    exit(2);
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) { i++; break; }
        if (i + 1 >= argc && strcmp(a, "--step-only") && strcmp(a, "--model-env") && strcmp(a, "--exec-fd"))
            usage();
        if (!strcmp(a, "--strategy")) {
            const char *v = argv[++i];
            int found = 0;
            for (int k = 0; k < S_COUNT; k++) if (!strcmp(v, strategy_names[k])) { strategy = k; found = 1; }
            if (!found) usage();
        } else if (!strcmp(a, "--emulate-ns")) emulate_ns = strtod(argv[++i], NULL);
        else if (!strcmp(a, "--flip-ns")) flip_ns = strtod(argv[++i], NULL);
        else if (!strcmp(a, "--hv-start")) hv_start = (uint32_t)strtoul(argv[++i], NULL, 0);
        else if (!strcmp(a, "--cpu")) cpu = atoi(argv[++i]);
        else if (!strcmp(a, "--cwd")) cwd_path = argv[++i];
        else if (!strcmp(a, "--stdin")) stdin_path = argv[++i];
        else if (!strcmp(a, "--stdout")) stdout_path = argv[++i];
        else if (!strcmp(a, "--stderr")) stderr_path = argv[++i];
        else if (!strcmp(a, "--json")) json_path = argv[++i];
        else if (!strcmp(a, "--timeout")) timeout_s = atof(argv[++i]);
        else if (!strcmp(a, "--step-only")) step_only = 1;
        else if (!strcmp(a, "--model-env")) model_env = 1;
        else if (!strcmp(a, "--trace")) { if (!(trace = fopen(argv[++i], "w"))) die_setup("--trace", errno); }
        else if (!strcmp(a, "--env")) { if (envc < 255) envv[envc++] = argv[++i]; else usage(); }
        else if (!strcmp(a, "--chroot")) chroot_dir = argv[++i];
        else if (!strcmp(a, "--view")) view_dir = argv[++i];
        else if (!strcmp(a, "--overlay")) overlay_dir = argv[++i];
        else if (!strcmp(a, "--exe-path")) exe_path = argv[++i];
        else if (!strcmp(a, "--mount-src")) mount_src = argv[++i];
        else if (!strcmp(a, "--mount-at")) mount_at = argv[++i];
        else if (!strcmp(a, "--uid")) guest_uid = atol(argv[++i]);
        else if (!strcmp(a, "--gid")) guest_gid = atol(argv[++i]);
        else if (!strcmp(a, "--exec-fd")) exec_fd = 1;
        else if (!strcmp(a, "--max-procs")) { if ((max_procs = atoi(argv[++i])) < 1) usage(); }
        else usage();
    }
    if (argc - i < 2) usage();
    if ((view_dir && !chroot_dir && !overlay_dir) || (mount_src && !view_dir) || (!mount_src != !mount_at)) usage();
    if (overlay_dir && (chroot_dir || !view_dir || mount_src || !exec_fd || cwd_path)) usage();
    if (ONLINE(strategy)) { /* the decision threshold, the model's expression on the model's prices */
        if (!(emulate_ns > 0 && emulate_ns <= 1e12 && flip_ns > 0 && flip_ns <= 1e12)) usage();
        threshold = 2 * flip_ns / emulate_ns;
        probe_cap = threshold < 1.8e19 ? (uint64_t)threshold + 1 : UINT64_MAX;
    }
    const char *exe = argv[i];
    char **gargv = argv + i + 1;

    sites = calloc(SITE_CAP, sizeof *sites);
    procs = calloc((size_t)max_procs + 1, sizeof *procs);
    tlslog = open_memstream(&tlslog_buf, &tlslog_len);
    if (ONLINE(strategy)) osites = calloc(SITE_CAP, sizeof *osites);
    if (!sites || !procs || !tlslog || (ONLINE(strategy) && !osites)) die_setup("malloc", ENOMEM);
    /* orphaned guest processes are re-parented to us, not to init: the run
     * waits for them and, when stopped, kills them (sweep) */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) die_setup("PR_SET_CHILD_SUBREAPER", errno);
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0) die_setup("sched_setaffinity", errno);
    }
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) die_setup("pipe", errno);
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm; /* no SA_RESTART: waitpid returns EINTR */
    sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = on_term; /* killed politely: the guest tree goes with us, reported */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    exec_clock = mmap(NULL, sizeof *exec_clock, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (exec_clock == MAP_FAILED) die_setup("mmap", errno);
    *exec_clock = 0;
    t_fork = now_s();
    child_pid = fork();
    if (child_pid < 0) die_setup("fork", errno);
    if (child_pid == 0) { close(pfd[0]); run_child(pfd[1], gargv, exe); }
    close(pfd[1]);
    if (timeout_s > 0) {
        struct itimerval it = {{0, 0}, {(long)timeout_s, (long)((timeout_s - (long)timeout_s) * 1e6)}};
        setitimer(ITIMER_REAL, &it, NULL);
    }

    int status = 0;
    if (strategy == S_UNTRACED) {
        t_exec = t_fork;
        for (;;) { /* until every descendant is gone (orphans come to us: subreaper) */
            if (interrupted && !stopping) begin_stop("supervisor interrupted");
            if (timed_out && !stopping) begin_stop("timeout");
            if (stopping && tick) { tick = 0; sweep(); }
            pid_t w = waitpid(-1, &status, 0);
            if (w < 0) {
                if (errno == EINTR) continue;
                if (errno == ECHILD) break;
                die_setup("waitpid", errno);
            }
            if (w == child_pid) {
                t_end = now_s();
                if (WIFEXITED(status)) exit_status = WEXITSTATUS(status);
                else if (WIFSIGNALED(status)) exit_signal = WTERMSIG(status);
                end_orphans();
            }
        }
        if (*exec_clock > 0) t_exec = *exec_clock;
    } else {
        /* initial SIGSTOP (or an early failure) */
        if (waitpid(child_pid, &status, 0) < 0) die_setup("waitpid", errno);
        if (!WIFSTOPPED(status)) goto child_failed;
        /* every task the guest creates is traced from its first instruction
         * (fork, vfork, clone: auto-attached, starting with a SIGSTOP), and
         * every exec is seen: they all inherit the seccomp filter, whose
         * RET_TRACE would fail their set_thread_area untraced */
        long opts = PTRACE_O_EXITKILL | PTRACE_O_TRACESECCOMP | PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE |
                    PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACEEXEC | PTRACE_O_TRACEEXIT;
        if (ptrace(PTRACE_SETOPTIONS, child_pid, 0, (void *)opts) < 0) die_setup("PTRACE_SETOPTIONS", errno);
        struct thread *main_t = thread_of(child_pid, 1);
        main_t->seen_stop = 1;
        main_t->adopted = 1;
        procs[0].pid = child_pid;
        procs[0].ppid = getpid();
        procs[0].image = -1; /* its first image starts at the exec */
        procs[0].live = procs[0].tasks = 1;
        nprocs = 1;
        main_t->proc = 0;
        /* the guest starts with the SIGSEGV disposition and mask we have (exec keeps SIG_IGN) */
        main_t->st = sigtab_new(NULL);
        {
            struct sigaction cur;
            sigset_t m;
            if (sigaction(SIGSEGV, NULL, &cur) == 0 && cur.sa_handler == SIG_IGN)
                main_t->st->act[SIGSEGV].handler = SIG32_IGN;
            if (sigprocmask(SIG_BLOCK, NULL, &m) == 0) main_t->blocked_segv = sigismember(&m, SIGSEGV) == 1;
        }
        main_t->sig_ready = 1;
        pid_t deferred_w = 0; /* a stop/exit the fault path consumed, to handle here */
        int deferred_status = 0;
        if (ptrace(PTRACE_CONT, child_pid, 0, 0) < 0) die_setup("PTRACE_CONT", errno);
        /* Events of all tasks, in the order the kernel reports them; no wait
         * is ever for one task only (but restore_segv's few single steps), so
         * a vfork parent -- suspended by the kernel until its child execs or
         * exits -- never holds up the child. Runs until no tracee and no
         * child is left: the main process's exit does not end the run while
         * processes it started still run. */
        for (;;) {
            if (interrupted && !stopping) begin_stop("supervisor interrupted");
            if (timed_out && !stopping) begin_stop("timeout");
            if (stopping && tick) { tick = 0; sweep(); }
            pid_t w;
            if (deferred_w) { w = deferred_w; status = deferred_status; deferred_w = 0; }
            else w = waitpid(-1, &status, __WALL);
            if (w < 0) {
                if (errno == EINTR) continue;
                if (errno == ECHILD) break;
                die_setup("waitpid", errno);
            }
            struct thread *t = thread_of(w, 0);
            cp = t && t->proc >= 0 ? &procs[t->proc] : NULL;
            if (WIFEXITED(status) || WIFSIGNALED(status)) {
                if (stopping && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) killed_tasks++;
                if (t) thread_gone(t, status);
                if (w == child_pid) {
                    if (t_exec == 0 && !stopping) goto child_failed;
                    t_end = now_s();
                    if (WIFEXITED(status)) exit_status = WEXITSTATUS(status);
                    else exit_signal = WTERMSIG(status);
                    end_orphans();
                }
                continue;
            }
            if (!WIFSTOPPED(status)) continue;
            if (!t) t = thread_of(w, 1);
            if (!t) begin_stop("too many tasks");
            if (stopping) { /* it was sent SIGKILL: let it go and die (also from an exit-event stop) */
                kill(w, SIGKILL);
                ptrace(PTRACE_CONT, w, 0, 0);
                continue;
            }
            int sig = WSTOPSIG(status), event = status >> 16, deliver = 0;
            enum __ptrace_request resume = PTRACE_CONT;
            if (sig == SIGTRAP && event == PTRACE_EVENT_EXEC) {
                /* a non-leader's execve: it takes the leader's tid, the old leader vanishes unreported */
                unsigned long former = 0;
                if (ptrace(PTRACE_GETEVENTMSG, w, 0, &former) == 0 && former && (pid_t)former != w) {
                    struct thread *o = thread_of((pid_t)former, 0);
                    if (o && o != t) {
                        thread_gone(t, -1);
                        set_tid(o, w);
                        t = o;
                    }
                }
                if (model_env) hide_auxv(w);
                if (t->st) sigtab_flush(t->st, 1);
                memset(t->slots, 0, sizeof t->slots); /* a new program: no TLS yet */
                t->stepping = 0;
                t->last_fault_eip = 0xFFFFFFFFu;
                t->last_fault_flipped = 0;
                if (cp) { /* a new image of this process */
                    char path[64], prog[512];
                    snprintf(path, sizeof path, "/proc/%d/exe", w);
                    ssize_t k = readlink(path, prog, sizeof prog - 1);
                    prog[k > 0 ? k : 0] = 0;
                    cp->image = image_new(t->proc, prog);
                }
                if (w == child_pid && t_exec == 0) t_exec = now_s();
            } else if (sig == SIGTRAP && event == PTRACE_EVENT_SECCOMP) {
                struct user_regs_struct sr;
                if (ptrace(PTRACE_GETREGS, w, 0, &sr) == 0) {
                    uint32_t nr = (uint32_t)sr.orig_rax;
                    if (nr == NR32_SET_THREAD_AREA || nr == NR32_MODIFY_LDT) start_tls_syscall(t);
                    else if (nr == NR32_EXECVE || nr == NR32_EXECVEAT) {
                        /* the image that may end here: its mappings, for naming its sites */
                        int img = image_of(t);
                        if (img >= 0 && images[img].faults) record_objects(w, img);
                    } else start_sig_syscall(t, &sr);
                    resume = t->in_sta || t->in_sig ? PTRACE_SYSCALL /* to its exit */ : PTRACE_CONT;
                }
            } else if (sig == (SIGTRAP | 0x80)) {
                if (t->in_sta) { t->in_sta = 0; finish_tls_syscall(t); }
                else if (t->in_sig) finish_sig_syscall(t);
            } else if (sig == SIGTRAP && (event == PTRACE_EVENT_CLONE || event == PTRACE_EVENT_FORK ||
                                          event == PTRACE_EVENT_VFORK)) {
                unsigned long ctid = 0;
                int known;
                uint64_t flags = clone_flags(t, &known);
                if (ptrace(PTRACE_GETEVENTMSG, w, 0, &ctid) == 0 && ctid > 0) {
                    if (event == PTRACE_EVENT_CLONE) clones++; else forks++;
                    if (event == PTRACE_EVENT_VFORK) vforks++;
                    int new_proc = event != PTRACE_EVENT_CLONE || !(flags & CLONE_THREAD);
                    if (event == PTRACE_EVENT_CLONE && !known) new_proc = tgid_of((pid_t)ctid) == (pid_t)ctid;
                    struct thread *c = NULL;
                    if (new_proc && nprocs >= max_procs) begin_stop("max_procs");
                    else if (!(c = thread_of((pid_t)ctid, 1))) begin_stop("too many tasks");
                    if (stopping) { ptrace(PTRACE_CONT, w, 0, 0); continue; }
                    inherit_signals(t, c, flags, new_proc);
                    if (c->held) { /* its first stop came first and waited for this */
                        struct proc *save = cp;
                        cp = c->proc >= 0 ? &procs[c->proc] : NULL;
                        adopt_new_thread(c);
                        cp = save;
                        c->held = 0;
                        if (ptrace(PTRACE_CONT, c->tid, 0, 0) < 0 && errno != ESRCH) die_setup("ptrace resume", errno);
                    }
                }
            } else if (sig == SIGTRAP && event == PTRACE_EVENT_EXIT) {
                /* its mappings, still there: the main process's always (the top-level
                 * "objects"), others' when they faulted (by the leader, else the first) */
                int img = image_of(t);
                if (img >= 0 && (w == child_pid ||
                                 (images[img].faults && (cp->pid == w || !images[img].objects))))
                    record_objects(w, img);
            } else if (sig == SIGTRAP && event) {
                /* other event stops (vfork-done): nothing to do */
            } else if (sig == SIGTRAP && t->stepping) {
                end_step(t);
            } else if ((sig == SIGSTOP || event == PTRACE_EVENT_STOP) && !t->seen_stop) {
                t->seen_stop = 1; /* first stop of a new task: it has run no code yet */
                if (!t->sig_ready) { t->held = 1; continue; } /* until its creator's clone event */
                if (!t->adopted) adopt_new_thread(t);
            } else if (event == PTRACE_EVENT_STOP || (!event && (sig == SIGSTOP || sig == SIGTSTP ||
                                                                  sig == SIGTTIN || sig == SIGTTOU) &&
                                                      is_group_stop(w))) {
                /* a group-stop report (not a signal to deliver): resume it. A traced
                 * task (PTRACE_TRACEME, not SEIZE) cannot be left in group-stop
                 * without blocking the supervisor's view of it: as under strace,
                 * job-control stops of guest processes do not stop them */
                COUNT(group_stops);
            } else if (sig == SIGSEGV) {
                int step = 0;
                if (t->stepping) { /* the stepped instruction faulted even expand-down */
                    end_step(t);
                    record_delivery(site_of(image_of(t), t->step_eip), t->step_eip, "step fallback faulted: genuine");
                    deliver = SIGSEGV;
                } else {
                    double h0 = now_s();
                    deliver = handle_segv(t, &step);
                    handler_s += now_s() - h0;
                    if (step) resume = PTRACE_SINGLESTEP;
                    if (deliver) t->last_fault_flipped = 0;
                    else if (needs_restore(t)) { /* the forced SIGSEGV reset the guest's disposition */
                        double r0 = now_s();
                        int gone = 0;
                        int rc = restore_segv(t, &gone);
                        restore_s += now_s() - r0;
                        if (rc == -2) { deferred_w = w; deferred_status = gone; continue; }
                    }
                }
            } else {
                deliver = sig;
                COUNT(signals_passed);
            }
            if (deliver) note_delivery(t, deliver);
            if (ptrace(resume, w, 0, (void *)(long)deliver) < 0 && errno != ESRCH)
                die_setup("ptrace resume", errno);
        }
    }
    {
        char buf[80];
        ssize_t k = read(pfd[0], buf, sizeof buf - 1);
        if (k > 0) {
            buf[k] = 0;
            static char stage[64];
            int e = atoi(buf);
            char *sp = strchr(buf, ' ');
            snprintf(stage, sizeof stage, "%s", sp ? sp + 1 : "child");
            exit_status = -1;
            die_setup(stage, e);
        }
    }
    if (t_end == 0) t_end = now_s();
    if (trace) fclose(trace);
    write_json();
    return 0;

child_failed: {
        char buf[80];
        ssize_t k = read(pfd[0], buf, sizeof buf - 1);
        static char stage[64];
        int e = EIO;
        snprintf(stage, sizeof stage, "child exited before exec");
        if (k > 0) {
            buf[k] = 0;
            e = atoi(buf);
            char *sp = strchr(buf, ' ');
            snprintf(stage, sizeof stage, "%s", sp ? sp + 1 : "child");
        }
        die_setup(stage, e);
    }
    return 3;
}
