/*
 * main.c: the supervisor's command line, set-up and event loop.
 *
 * tlslab hw supervisor: run an unmodified static i386 program natively under
 * ptrace, with its TLS segment truncated below the hypervisor start the way
 * Xen (x86-32, 2004) truncated it, and answer the resulting #GP (SIGSEGV,
 * si_code SI_KERNEL) stops with one of the historical strategies:
 *
 *   untraced  fork + exec + wait, no ptrace (the native baseline)
 *   native    traced, descriptors installed as the guest asked (tracing cost)
 *   emulate   decode the faulting instruction, perform the access with
 *             process_vm_readv/writev, update registers, advance EIP (the
 *             shared x86 core's tc_decode and tc_emulate, as in the model).
 *             Forms the core does not emulate are single-stepped with the
 *             expand-down twin descriptor installed (the truncated form for
 *             a positive offset, which only the online strategies' states
 *             fault on) ("step" fallback: exact for any instruction, and as
 *             safe as flip), then the slot's state is put back
 *   flip      switch the descriptor between the truncated expand-up form and
 *             its expand-down twin (PTRACE_SET_THREAD_AREA) and restart
 *   online-site, online-rate, online-probe
 *             emulate or flip, chosen per fault by the rules of
 *             tlslab/hypervisor/strategies/online.py (see online.c; rate.c
 *             for online-rate and its clock: the guest single-stepped after
 *             each fault, up to a cap, to count the instructions between);
 *             online-probe also installs an empty descriptor
 *             that makes every %gs access fault while it measures a run
 *   online-lookahead
 *             emulate or flip, chosen per fault by the rule of
 *             tlslab/hypervisor/strategies/online_lookahead.py with the
 *             shared walk ahead of the fault (tlslab/x86/_ahead.c) over the
 *             tracee's memory (see lookahead.c)
 *   online-patch
 *             at the first fault of a negative-%gs site where the rewrite
 *             safety policy allows, rewrite its gs prefix to fs, %fs holding
 *             the expand-down twin of the thread's TCB descriptor in GDT
 *             entry 13 (tlslab/hypervisor/strategies/online_patch.py; see
 *             patch.c); elsewhere online-probe
 *
 * A TLS #GP is a forced SIGSEGV, which resets a blocked or ignored SIGSEGV
 * (handler -> SIG_DFL, unblocked) before the tracer sees it; the supervisor
 * tracks the guest's intended disposition and puts it back after the faults it
 * absorbs (signals.c), as on Xen, where the guest kernel's signal code never
 * sees them.
 *
 * The per-fault x86 work is the shared core's (tlslab/x86/_core.c, compiled
 * in; the Unicorn model's fast path calls the same code, and tlslab.x86 is its
 * specification, held to it by tests/test_core_differential.py): decoding the
 * fs/gs forms, the segment check (tc_check), Xen's truncation and flip
 * (tc_truncate, tc_flip) and emulation (tc_emulate). The JSON summary records
 * every descriptor installed so the Python side checks they agree.
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
 * Files, one concern each: main.c (this: options, set-up, the event loop),
 * tracee.c (reading and changing a stopped tracee), descriptors.c (struct
 * user_desc for the core's descriptor arithmetic, TLS installs, slot states),
 * decode.c/decode.h (the faulting instruction: the core's decoder and
 * emulator, with the ptrace registers and the tracee's memory behind them),
 * faults.c (the #GP path: emulate, flip),
 * online.c (online-site, online-probe), rate.c (online-rate and its
 * instruction clock), cpuid.c (the model's cpuid answers, by CPUID faulting), lookahead.c (online-lookahead: the walk over the
 * tracee's memory), patch.c (online-patch: the fs twin, the safety policy,
 * rewriting code), signals.c (the guest's SIGSEGV
 * disposition), tasks.c (tasks, processes, images, sites), stop.c (ending the
 * run), jail.c (the child until exec), report.c (the JSON summary); what they
 * share is in supervisor.h. The run's state is one struct supervisor.
 *
 * 64-bit host code only; tlslab/hw/build.py compiles every .c file here
 * together with the core's _core.c and the walk's _ahead.c, plain `cc -O2 -Wall`.
 */
#include "supervisor.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

/* the run's state: one instance, in static storage (its task tables take megabytes) */
static struct supervisor the_supervisor;

static void usage(void) {
    fprintf(stderr,
            "usage: tlslab-hw-supervisor [--strategy untraced|native|emulate|flip|online-site|online-rate|online-probe|\n"
            "    online-lookahead|online-patch] [--emulate-ns NS --flip-ns NS] [--budget N]\n"
            "    [--patch-policy auto|lib|exe|all|none] [--hv-start HEX]\n"
            "    [--cpu N|-1] [--cwd DIR] [--stdin PATH] [--stdout PATH] [--stderr PATH] [--env K=V]...\n"
            "    [--timeout SECONDS] [--max-procs N] [--step-only] [--model-env] [--cpuid TABLE] [--trace PATH]\n"
            "    [--chroot DIR [--view EMPTYDIR [--mount-src DIR --mount-at PATH [--scratch EMPTYDIR]] [--exe-path PATH]]]\n"
            "    [--uid N] [--gid N]\n"
            "    [--exec-fd]\n"
            "    [--overlay DIR --view EMPTYDIR --exec-fd [--exe-path PATH]]\n"
            "    --json PATH -- EXE ARGV0 [ARGS...]\n"
            "  --chroot: the guest runs chrooted in DIR; --cwd is then a path inside it, and EXE too\n"
            "  unless --exec-fd (EXE is a host path, opened before chroot and executed by descriptor).\n"
            "  --view: in a private mount namespace, build DIR's view (read-only binds of DIR's top-level\n"
            "  entries on a tmpfs mounted on EMPTYDIR) with --mount-src bound read-only at --mount-at (with\n"
            "  --scratch: a writable overlay of it whose writes go to a tmpfs on that EMPTYDIR), and\n"
            "  /dev and /proc/self/exe (-> --exe-path) where DIR has no dev or proc, as the model has them.\n"
            "  --overlay: the guest's cwd is DIR, / has DIR's top-level entries, /dev and /proc/self/exe\n"
            "  (-> --exe-path, default /bin/prog); its writes\n"
            "  go to a private overlay (tmpfs, " OVERLAY_SIZE ") in a private mount namespace built on EMPTYDIR;\n"
            "  no --cwd; EXE is a host path executed by descriptor.\n"
            "  --uid/--gid: drop to these ids (no supplementary groups) after chroot, before exec.\n"
            "  --max-procs: processes the guest may start in all (the first included, default 1024);\n"
            "  beyond it, as at --timeout, every guest task is killed (\"stopped\" in the JSON).\n"
            "  --emulate-ns/--flip-ns: the online strategies' prices (both > 0, required by them):\n"
            "  threshold = 2 * flip_ns / emulate_ns, as tlslab.hypervisor.strategies.online.\n"
            "  --budget: online-lookahead's instructions decoded ahead per fault, 1..4096 (default 32).\n"
            "  --patch-policy: where online-patch may rewrite code (default auto; see patch.c).\n"
            "  --cpuid: answer the guest's cpuid from TABLE (CPUID faulting; traced strategies; see cpuid.c).\n");
    exit(2);
}

/* The command line into sv->opt (and the online prices); returns the index of EXE in argv. */
static int parse_options(struct supervisor *sv, int argc, char **argv) {
    struct options *opt = &sv->opt;
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) { i++; break; }
        if (i + 1 >= argc && strcmp(a, "--step-only") && strcmp(a, "--model-env") && strcmp(a, "--exec-fd"))
            usage();
        if (!strcmp(a, "--strategy")) {
            const char *v = argv[++i];
            opt->strategy = NULL;
            for (int k = 0; k < S_COUNT; k++)
                if (!strcmp(v, strategies[k].name)) opt->strategy = &strategies[k];
            if (!opt->strategy) usage();
        } else if (!strcmp(a, "--emulate-ns")) sv->online.emulate_ns = strtod(argv[++i], NULL);
        else if (!strcmp(a, "--flip-ns")) sv->online.flip_ns = strtod(argv[++i], NULL);
        else if (!strcmp(a, "--cpuid")) opt->cpuid_path = argv[++i];
        else if (!strcmp(a, "--patch-policy")) { if ((opt->patch_policy = parse_patch_policy(argv[++i])) < 0) usage(); }
        else if (!strcmp(a, "--budget")) {
            long b = atol(argv[++i]);
            if (b < 1 || b > 4096) usage();
            sv->online.budget = (uint32_t)b;
        }
        else if (!strcmp(a, "--hv-start")) opt->hv_start = (uint32_t)strtoul(argv[++i], NULL, 0);
        else if (!strcmp(a, "--cpu")) opt->cpu = atoi(argv[++i]);
        else if (!strcmp(a, "--cwd")) opt->cwd_path = argv[++i];
        else if (!strcmp(a, "--stdin")) opt->stdin_path = argv[++i];
        else if (!strcmp(a, "--stdout")) opt->stdout_path = argv[++i];
        else if (!strcmp(a, "--stderr")) opt->stderr_path = argv[++i];
        else if (!strcmp(a, "--json")) opt->json_path = argv[++i];
        else if (!strcmp(a, "--timeout")) opt->timeout_s = atof(argv[++i]);
        else if (!strcmp(a, "--step-only")) opt->step_only = 1;
        else if (!strcmp(a, "--model-env")) opt->model_env = 1;
        else if (!strcmp(a, "--trace")) { if (!(sv->trace = fopen(argv[++i], "w"))) die_setup(sv, "--trace", errno); }
        else if (!strcmp(a, "--env")) { if (opt->envc < 255) opt->envv[opt->envc++] = argv[++i]; else usage(); }
        else if (!strcmp(a, "--chroot")) opt->chroot_dir = argv[++i];
        else if (!strcmp(a, "--view")) opt->view_dir = argv[++i];
        else if (!strcmp(a, "--overlay")) opt->overlay_dir = argv[++i];
        else if (!strcmp(a, "--exe-path")) opt->exe_path = argv[++i];
        else if (!strcmp(a, "--mount-src")) opt->mount_src = argv[++i];
        else if (!strcmp(a, "--mount-at")) opt->mount_at = argv[++i];
        else if (!strcmp(a, "--scratch")) opt->scratch_dir = argv[++i];
        else if (!strcmp(a, "--uid")) opt->guest_uid = atol(argv[++i]);
        else if (!strcmp(a, "--gid")) opt->guest_gid = atol(argv[++i]);
        else if (!strcmp(a, "--exec-fd")) opt->exec_fd = 1;
        else if (!strcmp(a, "--max-procs")) { if ((opt->max_procs = atoi(argv[++i])) < 1) usage(); }
        else usage();
    }
    if (argc - i < 2) usage();
    if ((opt->view_dir && !opt->chroot_dir && !opt->overlay_dir) || (opt->mount_src && !opt->view_dir) ||
        (!opt->mount_src != !opt->mount_at) || (opt->scratch_dir && !opt->mount_src))
        usage();
    if (opt->overlay_dir && (opt->chroot_dir || !opt->view_dir || opt->mount_src || !opt->exec_fd || opt->cwd_path))
        usage();
    if (opt->strategy->online) { /* the decision threshold, the model's expression on the model's prices */
        struct online *on = &sv->online;
        if (!on->budget) on->budget = 32;   /* tlslab.x86.ahead.BUDGET */
        on->rate_avg = RATE_START;          /* online-rate: RateStrategy's average starts "sparse" */
        if (!(on->emulate_ns > 0 && on->emulate_ns <= 1e12 && on->flip_ns > 0 && on->flip_ns <= 1e12)) usage();
        on->threshold = 2 * on->flip_ns / on->emulate_ns;
        on->probe_cap = on->threshold < 1.8e19 ? (uint64_t)on->threshold + 1 : UINT64_MAX;
    }
    return i;
}

/* at the top of both event loops: act on a signal to the supervisor or the
 * timeout, and kill the guest tree again at every tick while stopping */
static void check_stop(struct supervisor *sv) {
    if (sv->interrupted && !sv->stopping) begin_stop(sv, "supervisor interrupted");
    if (sv->timed_out && !sv->stopping) begin_stop(sv, "timeout");
    if (sv->stopping && sv->tick) { sv->tick = 0; sweep(sv); }
}

/* the main process's end: its status, and the orphans it leaves */
static void main_process_ended(struct supervisor *sv, int status) {
    sv->t_end = now_s();
    if (WIFEXITED(status)) sv->exit_status = WEXITSTATUS(status);
    else if (WIFSIGNALED(status)) sv->exit_signal = WTERMSIG(status);
    end_orphans(sv);
}

/* untraced: wait until every descendant is gone (orphans come to us: subreaper) */
static void run_untraced(struct supervisor *sv) {
    int status = 0;
    sv->t_exec = sv->t_fork;
    for (;;) {
        check_stop(sv);
        pid_t w = waitpid(-1, &status, 0);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == ECHILD) break;
            die_setup(sv, "waitpid", errno);
        }
        if (w == sv->child_pid) main_process_ended(sv, status);
    }
    if (*sv->exec_clock > 0) sv->t_exec = *sv->exec_clock;
}

/* the main task, at its first stop: traced from here on, with the SIGSEGV
 * disposition and mask the guest starts with (ours: exec keeps SIG_IGN) */
static void trace_main_task(struct supervisor *sv) {
    /* every task the guest creates is traced from its first instruction
     * (fork, vfork, clone: auto-attached, starting with a SIGSTOP), and
     * every exec is seen: they all inherit the seccomp filter, whose
     * RET_TRACE would fail their set_thread_area untraced */
    long opts = PTRACE_O_EXITKILL | PTRACE_O_TRACESECCOMP | PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE |
                PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACEEXEC | PTRACE_O_TRACEEXIT;
    if (ptrace(PTRACE_SETOPTIONS, sv->child_pid, 0, (void *)opts) < 0) die_setup(sv, "PTRACE_SETOPTIONS", errno);
    struct thread *main_t = thread_of(sv, sv->child_pid, 1);
    main_t->seen_stop = 1;
    main_t->adopted = 1;
    struct proc *p = &sv->procs[0];
    p->pid = sv->child_pid;
    p->ppid = getpid();
    p->image = -1; /* its first image starts at the exec */
    p->live = p->tasks = 1;
    sv->nprocs = 1;
    main_t->proc = 0;
    main_t->st = sigtab_new(sv, NULL);
    struct sigaction cur;
    sigset_t m;
    if (sigaction(SIGSEGV, NULL, &cur) == 0 && cur.sa_handler == SIG_IGN) main_t->st->act[SIGSEGV].handler = SIG32_IGN;
    if (sigprocmask(SIG_BLOCK, NULL, &m) == 0) main_t->blocked_segv = sigismember(&m, SIGSEGV) == 1;
    main_t->sig_ready = 1;
}

/* a stop/exit that restore_segv consumed while single-stepping, handled by the loop next */
struct deferred { pid_t w; int status; };

/* A SIGSEGV stop of t: the end of a single step that faulted, or a fault for
 * the strategy. Returns the signal to deliver; *resume becomes
 * PTRACE_SINGLESTEP for the step fallback. Returns -1 when t vanished during
 * restore_segv (its status is in *later). */
static int segv_stop(struct supervisor *sv, struct thread *t, pid_t w, enum __ptrace_request *resume,
                     struct deferred *later) {
    if (t->stepping) { /* the stepped instruction faulted even expand-down */
        end_step(sv, t);
        record_delivery(sv, site_of(sv, image_of(sv, t), t->step_eip), t->step_eip, "step fallback faulted: genuine");
        return SIGSEGV;
    }
    int step = 0;
    double h0 = now_s();
    uint64_t emulated = sv->total.emulated;
    int deliver = handle_segv(sv, t, &step);
    sv->handler_s += now_s() - h0;
    if (step) *resume = PTRACE_SINGLESTEP;
    else if (!deliver && sv->total.emulated != emulated) rate_retired(sv, t, 1); /* EIP advanced: it retired */
    if (deliver) t->last_fault_flipped = 0;
    else if (needs_restore(t)) { /* the forced SIGSEGV reset the guest's disposition */
        double r0 = now_s();
        int gone = 0;
        int rc = restore_segv(sv, t, &gone);
        sv->restore_s += now_s() - r0;
        if (rc == -2) { later->w = w; later->status = gone; return -1; }
    }
    return deliver;
}

/* Events of all tasks, in the order the kernel reports them; no wait is ever
 * for one task only (but restore_segv's few single steps), so a vfork parent
 * -- suspended by the kernel until its child execs or exits -- never holds up
 * the child. Runs until no tracee and no child is left: the main process's
 * exit does not end the run while processes it started still run. Returns
 * -1 when the child failed before its exec, else 0. */
static int run_traced(struct supervisor *sv) {
    int status = 0;
    /* initial SIGSTOP (or an early failure) */
    if (waitpid(sv->child_pid, &status, 0) < 0) die_setup(sv, "waitpid", errno);
    if (!WIFSTOPPED(status)) return -1;
    trace_main_task(sv);
    struct deferred later = {0, 0};
    if (ptrace(PTRACE_CONT, sv->child_pid, 0, 0) < 0) die_setup(sv, "PTRACE_CONT", errno);
    for (;;) {
        check_stop(sv);
        pid_t w;
        if (later.w) { w = later.w; status = later.status; later.w = 0; }
        else w = waitpid(-1, &status, __WALL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == ECHILD) break;
            die_setup(sv, "waitpid", errno);
        }
        struct thread *t = thread_of(sv, w, 0);
        sv->cp = t && t->proc >= 0 ? &sv->procs[t->proc] : NULL;
        if (WIFEXITED(status) || WIFSIGNALED(status)) {
            if (sv->stopping && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) sv->killed_tasks++;
            if (t) thread_gone(sv, t, status);
            if (w == sv->child_pid) {
                if (sv->t_exec == 0 && !sv->stopping) return -1;
                main_process_ended(sv, status);
            }
            continue;
        }
        if (!WIFSTOPPED(status)) continue;
        if (!t) t = thread_of(sv, w, 1);
        if (!t) begin_stop(sv, "too many tasks");
        if (sv->stopping) { /* it was sent SIGKILL: let it go and die (also from an exit-event stop) */
            kill(w, SIGKILL);
            ptrace(PTRACE_CONT, w, 0, 0);
            continue;
        }
        int sig = WSTOPSIG(status), event = status >> 16, deliver = 0;
        enum __ptrace_request resume = PTRACE_CONT;
        if (sig == SIGTRAP && event == PTRACE_EVENT_EXEC) {
            t = exec_event(sv, t, w);
            int gone = 0;
            if (sv->cpuid && cpuid_image_start(sv, t, &gone) == -2) { later.w = w; later.status = gone; continue; }
        } else if (sig == SIGTRAP && event == PTRACE_EVENT_SECCOMP) {
            struct user_regs_struct sr;
            if (ptrace(PTRACE_GETREGS, w, 0, &sr) == 0) {
                uint32_t nr = (uint32_t)sr.orig_rax;
                if (nr == NR32_SET_THREAD_AREA || nr == NR32_MODIFY_LDT) start_tls_syscall(sv, t);
                else if (nr == NR32_EXECVE || nr == NR32_EXECVEAT) {
                    /* the image that may end here: its mappings, for naming its sites */
                    int img = image_of(sv, t);
                    if (img >= 0 && sv->images[img].faults) record_objects(sv, w, img);
                } else start_sig_syscall(sv, t, &sr);
                resume = t->in_sta || t->in_sig ? PTRACE_SYSCALL /* to its exit */ : PTRACE_CONT;
            }
        } else if (sig == (SIGTRAP | 0x80)) {
            if (t->rate_syscall) { t->rate_syscall = 0; rate_retired(sv, t, 1); } /* its int $0x80 */
            if (t->in_sta) { t->in_sta = 0; finish_tls_syscall(sv, t); }
            else if (t->in_sig) finish_sig_syscall(t);
        } else if (sig == SIGTRAP && (event == PTRACE_EVENT_CLONE || event == PTRACE_EVENT_FORK ||
                                      event == PTRACE_EVENT_VFORK)) {
            if (clone_event(sv, t, w, event)) continue; /* stopping: t was resumed */
        } else if (sig == SIGTRAP && event == PTRACE_EVENT_EXIT) {
            /* its mappings, still there: the main process's always (the top-level
             * "objects"), others' when they faulted (by the leader, else the first) */
            int img = image_of(sv, t);
            if (img >= 0 && (w == sv->child_pid ||
                             (sv->images[img].faults && (sv->cp->pid == w || !sv->images[img].objects))))
                record_objects(sv, w, img);
        } else if (sig == SIGTRAP && event) {
            /* other event stops (vfork-done): nothing to do */
        } else if (sig == SIGTRAP && t->stepping) {
            end_step(sv, t);
            rate_retired(sv, t, 1); /* the instruction stepped for emulate's fallback */
        } else if (sig == SIGTRAP && !event && t->rate_stepping) {
            if ((deliver = rate_trap(sv, t, w))) COUNT(sv, signals_passed);
        } else if ((sig == SIGSTOP || event == PTRACE_EVENT_STOP) && !t->seen_stop) {
            t->seen_stop = 1; /* first stop of a new task: it has run no code yet */
            if (!t->sig_ready) { t->held = 1; continue; } /* until its creator's clone event */
            if (!t->adopted) adopt_new_thread(sv, t);
        } else if (event == PTRACE_EVENT_STOP || (!event && (sig == SIGSTOP || sig == SIGTSTP ||
                                                              sig == SIGTTIN || sig == SIGTTOU) &&
                                                  is_group_stop(w))) {
            /* a group-stop report (not a signal to deliver): resume it. A traced
             * task (PTRACE_TRACEME, not SEIZE) cannot be left in group-stop
             * without blocking the supervisor's view of it: as under strace,
             * job-control stops of guest processes do not stop them */
            COUNT(sv, group_stops);
        } else if (sig == SIGSEGV) {
            if ((deliver = segv_stop(sv, t, w, &resume, &later)) < 0) continue; /* gone: handled next */
        } else {
            deliver = sig;
            COUNT(sv, signals_passed);
        }
        if (deliver) note_delivery(t, deliver);
        if (t->rate_stepping) resume = rate_resume(sv, t, resume);
        if (ptrace(resume, w, 0, (void *)(long)deliver) < 0 && errno != ESRCH)
            die_setup(sv, "ptrace resume", errno);
    }
    return 0;
}

/* The child's report on errfd ("errno stage") of a failure before its exec:
 * a set-up failure of the run. Nothing to read: fine, unless the child is
 * known to have failed (failed: then "child exited before exec"). */
static void check_child_failure(struct supervisor *sv, int errfd, int failed) {
    static char stage[64]; /* die_setup keeps the pointer: it goes into the JSON */
    char buf[80];
    ssize_t k = read(errfd, buf, sizeof buf - 1);
    int e = EIO;
    snprintf(stage, sizeof stage, "child exited before exec");
    if (k > 0) {
        buf[k] = 0;
        e = atoi(buf);
        char *sp = strchr(buf, ' ');
        snprintf(stage, sizeof stage, "%s", sp ? sp + 1 : "child");
        sv->exit_status = -1;
    }
    if (k > 0 || failed) die_setup(sv, stage, e);
}

int main(int argc, char **argv) {
    struct supervisor *sv = &the_supervisor;
    sv->opt.strategy = &strategies[S_EMULATE];
    sv->opt.hv_start = 0xFC000000u;
    sv->opt.guest_uid = sv->opt.guest_gid = -1;
    sv->opt.max_procs = 1024;
    sv->exit_status = -1;
    int i = parse_options(sv, argc, argv);
    const char *exe = argv[i];
    char **gargv = argv + i + 1;

    sv->sites = calloc(SITE_CAP, sizeof *sv->sites);
    sv->procs = calloc((size_t)sv->opt.max_procs + 1, sizeof *sv->procs);
    if (sv->opt.cpuid_path && sv->opt.strategy->traced) load_cpuid_table(sv, sv->opt.cpuid_path);
    sv->tlslog = open_memstream(&sv->tlslog_buf, &sv->tlslog_len);
    int online = sv->opt.strategy->online;
    if (online) sv->online.sites = calloc(SITE_CAP, sizeof *sv->online.sites);
    if (!sv->sites || !sv->procs || !sv->tlslog || (online && !sv->online.sites)) die_setup(sv, "malloc", ENOMEM);
    /* orphaned guest processes are re-parented to us, not to init: the run
     * waits for them and, when stopped, kills them (sweep) */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) die_setup(sv, "PR_SET_CHILD_SUBREAPER", errno);
    if (sv->opt.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(sv->opt.cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0) die_setup(sv, "sched_setaffinity", errno);
    }
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) die_setup(sv, "pipe", errno);
    install_signal_handlers(sv);

    sv->exec_clock = mmap(NULL, sizeof *sv->exec_clock, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sv->exec_clock == MAP_FAILED) die_setup(sv, "mmap", errno);
    *sv->exec_clock = 0;
    sv->t_fork = now_s();
    sv->child_pid = fork();
    if (sv->child_pid < 0) die_setup(sv, "fork", errno);
    if (sv->child_pid == 0) { close(pfd[0]); run_child(sv, pfd[1], gargv, exe); }
    close(pfd[1]);
    if (sv->opt.timeout_s > 0) {
        double s = sv->opt.timeout_s;
        struct itimerval it = {{0, 0}, {(long)s, (long)((s - (long)s) * 1e6)}};
        setitimer(ITIMER_REAL, &it, NULL);
    }

    if (!sv->opt.strategy->traced) run_untraced(sv);
    else if (run_traced(sv) < 0) check_child_failure(sv, pfd[0], 1);
    check_child_failure(sv, pfd[0], 0);
    if (sv->t_end == 0) sv->t_end = now_s();
    if (sv->trace) fclose(sv->trace);
    write_json(sv);
    return 0;
}
