/*
 * supervisor.h: what the supervisor's files share. The i386 ABI numbers it
 * needs, the records it keeps (per TLS slot, task, process, program image and
 * fault site), the run's state in one struct (struct supervisor: every
 * function that changes the run is handed it), and each file's entry points.
 * What the supervisor does as a whole is described at the top of main.c.
 */
#ifndef TLSLAB_SUPERVISOR_H
#define TLSLAB_SUPERVISOR_H

#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/user.h>

#include "decode.h"

#ifndef PTRACE_GET_THREAD_AREA
#define PTRACE_GET_THREAD_AREA 25
#define PTRACE_SET_THREAD_AREA 26
#endif
#ifndef SI_KERNEL
#define SI_KERNEL 0x80
#endif

/* i386 system call numbers (the guest's, whatever the host's are) */
#define NR32_SET_THREAD_AREA 243
#define NR32_MODIFY_LDT 123
#define NR32_RSEQ 386
#define NR32_ARCH_PRCTL 384
#define ARCH_SET_CPUID_ 0x1012
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
#define SA32_RESETHAND 0x80000000u
#define SEGV_BIT (1u << (SIGSEGV - 1))
#define SIG32_DFL 0u
#define SIG32_IGN 1u
#define CLONE_CLEAR_SIGHAND_ 0x100000000ull
#define OVERLAY_SIZE "256m" /* --overlay: what the guest may write in all */
#define TLS_FIRST 12 /* GDT_ENTRY_TLS_MIN for 32-bit tasks on x86-64 */
#define USER32_CS 0x23 /* the code segment of i386 tasks on x86-64 */
#define TLS_SLOTS 3
#define FS_ENTRY (TLS_FIRST + 1) /* online-patch: the %fs twin's GDT entry (the model's slot 7) */
#define FS_SELECTOR ((FS_ENTRY << 3) | 3) /* 0x6b (the model's 0x3b) */
#define MAX_THREADS 4096 /* live tasks at once */
#define SITE_CAP 262144
#define MISS_CAP 64
#define NO_FAULT_EIP 0xFFFFFFFFu

/* ------------------------------------------------------------ descriptors */
struct udesc { /* struct user_desc, fields unpacked */
    uint32_t entry, base, limit;
    uint32_t flags; /* bit0 seg_32bit, 1-2 contents, 3 read_exec_only, 4 limit_in_pages,
                       5 seg_not_present, 6 useable, 7 lm */
};
#define F_32 1u
#define F_CONTENTS(f) (((f) >> 1) & 3u)
#define F_CONTENTS_MASK 6u
#define F_EXPAND_DOWN (1u << 1) /* contents 1: expand-down data */
#define F_ROX 8u
#define F_PAGES 16u
#define F_NP 32u
#define F_USEABLE 64u
#define F_LM 128u

/* a segment selector: its index in the GDT or LDT above bit 3; bit 2 says LDT */
#define SEL_INDEX_SHIFT 3
#define SEL_LDT 4u

/* what a managed slot holds now: the truncated expand-up form, its
 * expand-down twin, or (online-probe) the empty descriptor */
enum { ST_UP, ST_DOWN, ST_EMPTY };

struct slot {
    int valid;         /* the guest installed something here */
    int managed;       /* truncated flat segment that we flip/emulate for */
    int state;         /* ST_UP, ST_DOWN or ST_EMPTY: the descriptor installed now */
    struct udesc requested, up, dn, empty;
    /* online-site: the back-to-back streak of one site in this slot (the
     * model keeps it per (vCPU, selector); see online.c). A streak of 0
     * means none, whatever streak_site says (a zeroed slot) */
    int64_t streak_site; /* index in online.sites[] */
    uint64_t streak;
    /* online-probe: a probe in progress here (its sites: online.plists[thread][slot]) */
    int probing, probe_sign, probe_home, probe_away;
};

/* ------------------------------------------------------- tasks, processes */
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
    /* SIGSEGV disposition tracking (see signals.c) */
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
    uint32_t last_fault_eip; /* flip: where its last fault was (NO_FAULT_EIP: none since exec) */
    int rate_stepping;       /* online-rate: stepped for its process's clock (rate.c; if the process's rate_tid) */
    int rate_syscall;        /* online-rate: resumed to a syscall's exit stop while stepped: count its int $0x80 there */
    int rate_prev_valid;     /* online-rate: where its next step starts (rate.c: a repeated string instruction) */
    int rate_marked;         /* online-rate: rate_prev_* were read at this stop (a step report) */
    uint32_t rate_prev_eip, rate_prev_ecx;
    int last_fault_flipped;
    int has_twin;            /* online-patch: entry FS_ENTRY holds the twin of this thread's TCB (patch.c) */
    uint32_t twin_base;
    struct slot slots[TLS_SLOTS];
};

struct site {
    uint32_t eip;
    int image; /* index in images[]: one program image of one process */
    int used, seg; /* TC_FS or TC_GS */
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
/* online-patch's state in one address space (patch.c): the fs-twin ABI
 * (installed, or why %fs is not the twin's) and the rewritten and mixed sites */
struct patchspace {
    int refs;                                /* processes whose memory this describes (vfork: two) */
    int installed, tcb_entry, has_conflict, auto_policy;
    char conflict[192];
    /* site eip -> address of its rewritten prefix, and what was mapped there (dev, inode, file offset) */
    struct { uint32_t eip, prefix; unsigned long dev_major, dev_minor, inode; unsigned long long offset; } *sites;
    size_t nsites, cap_sites;
    uint32_t *mixed;                         /* sites un-patched: they serve both signs */
    size_t nmixed, cap_mixed;
};
struct proc {
    pid_t pid, ppid;
    struct patchspace *ps; /* online-patch (NULL: nothing yet) */
    int image;         /* current image (-1: the main process before its exec) */
    int live, tasks;   /* tasks alive now / created in it (the first included) */
    int exited, status, sig, killed;
    int shared_mm;     /* its memory is also another process's (clone with CLONE_VM, vfork) */
    struct counters c;
    /* online-rate's clock (rate.c): instructions retired since this address
     * space's last %gs fault, counted by single-stepping rate_tid up to
     * RATE_GAP_CAP; rate_has_last 0: no fault yet in this image */
    int rate_has_last;
    pid_t rate_tid;
    uint64_t rate_steps;
};
struct image {
    pid_t pid;
    int proc;
    char program[512]; /* /proc/PID/exe at the exec event (host path) */
    uint64_t faults;
    char *objects;     /* JSON fragments: its file mappings (record_objects), or NULL */
    size_t objects_len;
};

/* ------------------------------------------------------ online strategies */
/* an entry of the domain-wide site table (see online.c) */
struct osite {
    uint32_t eip;
    int sign, used, hot, has_estimate;
    int in_context;     /* an entry per (site, previous fault's site): ProbeStrategy's context keys */
    int ambiguous;      /* a site entry whose probes measured two different remaining runs */
    uint32_t prev;      /* in_context: the previous fault's eip */
    uint64_t seen, next_probe, estimate;
};
struct plist { uint32_t *v; size_t n, cap; }; /* pairs: site entry, context entry */
#define KIND_CAP 256

struct online {
    double emulate_ns, flip_ns, threshold; /* --emulate-ns, --flip-ns; 2 * flip_ns / emulate_ns */
    uint32_t budget;         /* online-lookahead: --budget, instructions decoded ahead per fault */
    uint64_t probe_cap;      /* int(threshold) + 1 */
    struct osite *sites;     /* SITE_CAP entries, open addressing; allocated for the online strategies */
    uint64_t nsites;
    uint32_t previous_fault; /* ProbeStrategy._previous: eip of the previous %gs fault decided */
    /* online-rate (RateStrategy): one mode for the domain, the fixed-point average gap, the dwell */
    int rate_flip_mode;
    int64_t rate_avg;
    uint64_t rate_dwell, rate_steps_total;
    /* the sites of the probe in progress in each thread's slot (indices in sites[]); indexed by
     * thread, not kept in struct slot, so that copying a creator's slots never shares a list */
    struct plist plists[MAX_THREADS][TLS_SLOTS];
    /* online-patch (patch.c): the model's by_kind keys that carry text, its patches and refusals */
    struct { char key[160]; uint64_t n; } kinds[KIND_CAP];
    int nkinds;
    uint64_t kinds_lost, patches, refused;
    /* what the model's counters.by_kind and descriptor_writes report, named as there */
    struct {
        uint64_t emulate, flip, probe, probe_flip, probe_end, probe_orphan, marked_hot, desc_writes,
            unknown_sign, ahead_flip, ahead_emulate, flip_back, lookahead_instructions, mode_flip, mode_emulate;
    } count;
};

/* ------------------------------------------------------------- strategies */
struct supervisor;

/* A #GP that the strategy answers: task t's access through its managed TLS
 * slot (GDT entry `entry`), the instruction decoded, its registers (the
 * emulator updates them), its site (NULL: the site table is full). */
struct fault {
    struct thread *t;
    struct slot *slot;
    struct site *site;
    struct insn in;
    struct user_regs_struct regs;
    uint32_t eip;
    int entry;
    int step; /* set by the handler: single-step the instruction (emulate's fallback) */
};

/* a strategy's answer to a fault: the signal to deliver (0: none, the fault is settled) */
typedef int (*fault_handler)(struct supervisor *sv, struct fault *f);

struct strategy {
    const char *name;         /* --strategy NAME, and "strategy" in the JSON */
    int traced;               /* runs under ptrace (all but untraced) */
    int truncating;           /* truncates the guest's TLS descriptors (and LDT entries) */
    int online;               /* tlslab.hypervisor.strategies.online: emulate or flip chosen per fault,
                               * from the prices --emulate-ns/--flip-ns; "online" in the JSON */
    int patches;              /* rewrites guest code (online-patch: patch.c) */
    fault_handler on_fault;   /* its answer to a #GP on a managed slot; NULL: none is ours */
};
enum { S_UNTRACED, S_NATIVE, S_EMULATE, S_FLIP, S_ONLINE_SITE, S_ONLINE_RATE, S_ONLINE_PROBE, S_ONLINE_LOOKAHEAD,
       S_ONLINE_PATCH, S_COUNT };
/* --patch-policy (online-patch), as tlslab.hypervisor.patchpolicy.PATCH_POLICIES */
enum { PP_AUTO, PP_LIB, PP_EXE, PP_ALL, PP_NONE };
extern const struct strategy strategies[S_COUNT]; /* faults.c */

/* ------------------------------------------------------------- the state */
/* The command line; fixed once the guest starts. */
struct options {
    const struct strategy *strategy;
    uint32_t hv_start;
    int cpu;
    const char *json_path, *cwd_path, *stdin_path, *stdout_path, *stderr_path;
    char *envv[256];
    int envc;
    double timeout_s;
    int step_only; /* emulate: use the step fallback for everything (testing) */
    int model_env; /* present the guest the Unicorn model's process environment (see jail.c) */
    int max_procs; /* processes the guest may start in all */
    /* root-filesystem runs (see run_child): chroot, a private mount namespace
     * for a data tree, the model's uid/gid, exec by descriptor; runs without a
     * root (static guests): --overlay, the data tree as a throwaway "/" */
    const char *chroot_dir, *view_dir, *mount_src, *mount_at, *overlay_dir, *exe_path, *scratch_dir;
    long guest_uid, guest_gid;
    int exec_fd;
    const char *cpuid_path; /* --cpuid PATH: answer the guest's cpuid from this table (cpuid.c) */
    int patch_policy;       /* --patch-policy: PP_AUTO .. PP_NONE */
};

/* Everything a run changes, in one place: one instance, made by main and
 * handed to every function that reads or changes the run. */
struct supervisor {
    struct options opt;
    FILE *trace; /* --trace PATH: one line per fault: eip offset */

    /* the main process and the run's clock */
    pid_t child_pid;
    int exit_status, exit_signal; /* its end (-1 and 0 until then) */
    double t_fork, t_exec, t_end;
    /* untraced: the child's clock just before its execve, in a page shared
     * across the fork -- the run starts there, not at the fork, so building the
     * jail is not counted as the guest's time (traced runs see the exec event) */
    volatile double *exec_clock;

    /* tasks (tasks.c): a fixed table; tids[i] = threads[i].tid while alive, else 0 (a dense scan) */
    struct thread threads[MAX_THREADS];
    pid_t tids[MAX_THREADS];
    int last_thread;   /* index of the last thread_of hit */
    int nthreads_seen;
    struct sigtab sigtabs[MAX_THREADS];
    struct proc *procs; /* max_procs + 1 entries: never reallocated */
    int nprocs;
    struct image *images;
    int nimages, cap_images;
    struct proc *cp;   /* the process whose event is being handled (NULL: none): COUNT's second target */
    struct site *sites; /* SITE_CAP entries, open addressing, keyed (image, eip) */

    /* what the JSON reports (report.c) */
    struct counters total; /* COUNT adds to these and to the process's own */
    uint64_t seccomp_stops, ldt_truncated, ldt_refused, clones, forks, vforks, auxv_hidden;
    uint64_t signal_syscalls, segv_handler_restores, segv_mask_restores, restore_failures, signals_requeued;
    double handler_s; /* time spent inside the fault handler */
    double restore_s; /* time spent restoring the guest's SIGSEGV disposition */
    struct { char key[32]; uint64_t n; } misses[MISS_CAP]; /* decoder misses by form */
    int nmisses;
    char first_delivered[512];
    FILE *tlslog; /* buffered JSON fragments of TLS installs */
    char *tlslog_buf;
    size_t tlslog_len;

    /* restore_segv: signals that arrived while the guest ran an injected syscall */
    int requeue[16], nrequeue;

    /* stopping the guest (stop.c): timeout, process limit, too many tasks, a signal to us */
    const char *stop_reason;
    volatile sig_atomic_t stopping, tick, timed_out, interrupted;
    uint64_t killed_tasks, orphans_killed;
    const char *setup_error; /* set-up failure (die_setup): stage and errno */
    int setup_errno;

    struct online online;

    /* cpuid.c: the table, and what answering from it took */
    struct cpuid_answer *cpuid;
    size_t ncpuid;
    uint64_t cpuid_answered, cpuid_unlisted, cpuid_images, cpuid_refused;
};

/* count an event in the totals and in the process being handled */
#define COUNT(sv, f) do { (sv)->total.f++; if ((sv)->cp) (sv)->cp->c.f++; } while (0)

/* tracee.c: reading and changing a stopped tracee */
double now_s(void);
int get_area(pid_t tid, int entry, struct udesc *out);
int set_area(pid_t tid, const struct udesc *d);
int read_mem(pid_t tid, uint32_t addr, void *buf, size_t n);
int write_mem(pid_t tid, uint32_t addr, const void *buf, size_t n);
int fetch_insn(pid_t tid, uint32_t eip, uint8_t *buf);
const char *proc_status_field(pid_t tid, const char *field, char *buf, size_t n);
int is_group_stop(pid_t tid);
int in_shared_mapping(pid_t tid, uint32_t addr, uint32_t n);

/* descriptors.c: struct user_desc for the core's descriptor arithmetic, and the guest's TLS installs */
void udesc_to_core(const struct udesc *u, tc_descriptor *d);
int slot_flip_admits(const struct slot *sl, uint32_t hv, uint32_t off, uint32_t size);
const struct udesc *slot_desc(const struct slot *s, int st);
void install_state(struct supervisor *sv, struct thread *t, struct slot *sl, int st);
void start_tls_syscall(struct supervisor *sv, struct thread *t);
void finish_tls_syscall(struct supervisor *sv, struct thread *t);
void adopt_new_thread(struct supervisor *sv, struct thread *t);

/* faults.c: the #GP path, the emulate and flip strategies */
int handle_segv(struct supervisor *sv, struct thread *t, int *step);
void end_step(struct supervisor *sv, struct thread *t);
void record_delivery(struct supervisor *sv, struct site *s, uint32_t eip, const char *why);
int access_sign(const struct slot *sl, const struct insn *in);
int emulate_fault(struct supervisor *sv, struct fault *f);
int flip_fault(struct supervisor *sv, struct fault *f);

/* online.c: the online-site and online-probe strategies */
int online_site_fault(struct supervisor *sv, struct fault *f);
int online_probe_fault(struct supervisor *sv, struct fault *f);
int online_emulate(struct supervisor *sv, struct fault *f);   /* emulate, counted as the model counts it */
int online_flip(struct supervisor *sv, struct fault *f);      /* flip, counted as the model counts it */
/* lookahead.c */
int online_lookahead_fault(struct supervisor *sv, struct fault *f);
/* rate.c: online-rate and its clock */
#define RATE_GAP_CAP 400 /* RateStrategy's RATE_GAP_CAP: instructions a gap is counted up to */
#define RATE_START 3200  /* RateStrategy's starting average: RATE_DENSE * 4 * RATE_WINDOW (fixed point) */
int online_rate_fault(struct supervisor *sv, struct fault *f);
int rate_counting(const struct supervisor *sv, const struct thread *t);
void rate_retired(struct supervisor *sv, struct thread *t, uint64_t n);
enum __ptrace_request rate_resume(struct supervisor *sv, struct thread *t, enum __ptrace_request resume);
int rate_trap(struct supervisor *sv, struct thread *t, pid_t w);

/* patch.c: online-patch */
void count_kind(struct supervisor *sv, const char *key);
int parse_patch_policy(const char *v);
void patch_fork(struct supervisor *sv, struct proc *parent, struct proc *child, int shared_mm);
void patch_exec(struct proc *p);
void patch_tls_request(struct supervisor *sv, struct thread *t);
void patch_tls_installed(struct supervisor *sv, struct thread *t, int entry);
void patch_new_thread(struct supervisor *sv, struct thread *t);
int patch_inherited_twin(struct supervisor *sv, const struct thread *t);
int patch_trap(struct supervisor *sv, struct fault *f, uint32_t sel);
int online_patch_fault(struct supervisor *sv, struct fault *f);

/* signals.c: the guest's SIGSEGV disposition */
struct sigtab *sigtab_new(struct supervisor *sv, const struct sigtab *copy);
void sigtab_flush(struct sigtab *s, int new_mm);
void start_sig_syscall(struct supervisor *sv, struct thread *t, const struct user_regs_struct *r);
void finish_sig_syscall(struct thread *t);
void note_delivery(struct thread *t, int sig);
int needs_restore(const struct thread *t);
int restore_segv(struct supervisor *sv, struct thread *t, int *gone);
int run_guest_syscall(struct supervisor *sv, struct thread *t, uint32_t nr, uint32_t a1, uint32_t a2, int32_t *ret,
                      int *gone);

/* cpuid.c: the model's cpuid answers, by CPUID faulting */
struct cpuid_answer { uint32_t leaf, subleaf, r[4]; };
void load_cpuid_table(struct supervisor *sv, const char *path);
int cpuid_image_start(struct supervisor *sv, struct thread *t, int *gone);
int cpuid_fault(struct supervisor *sv, struct thread *t, struct user_regs_struct *regs, const uint8_t *code, int n);

/* tasks.c: tasks, processes, program images, fault sites */
struct thread *thread_of(struct supervisor *sv, pid_t tid, int create);
int image_of(const struct supervisor *sv, const struct thread *t);
struct site *site_of(struct supervisor *sv, int image, uint32_t eip);
struct thread *exec_event(struct supervisor *sv, struct thread *t, pid_t w);
int clone_event(struct supervisor *sv, struct thread *t, pid_t w, int event);
void thread_gone(struct supervisor *sv, struct thread *t, int status);
void record_objects(struct supervisor *sv, pid_t pid, int img);

/* stop.c: ending the run */
void install_signal_handlers(struct supervisor *sv);
void sweep(struct supervisor *sv);
void begin_stop(struct supervisor *sv, const char *why);
void end_orphans(struct supervisor *sv);
__attribute__((noreturn)) void die_setup(struct supervisor *sv, const char *what, int err);

/* jail.c: the child, from fork to the guest's exec */
__attribute__((noreturn)) void run_child(struct supervisor *sv, int errfd, char **argv, const char *exe);

/* report.c: the JSON summary */
void json_str(FILE *f, const char *s);
void write_json(struct supervisor *sv);

#endif
