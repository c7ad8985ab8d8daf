/*
 * tasks.c: the guest's tasks, processes, program images and fault sites.
 * A task is traced from its first instruction; its record (struct thread)
 * holds its TLS slots and signal state, and is found by tid. Clone, fork and
 * vfork events create tasks and processes (inheriting the creator's slots and
 * handlers), exec events start a new image, exits end them. Counts are kept
 * per process and per image, fault sites per image (see main.c's overview).
 */
#include "supervisor.h"

#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

/* the record of task tid (create: a new one if there is none; NULL when the table is full) */
struct thread *thread_of(struct supervisor *sv, pid_t tid, int create) {
    struct thread *threads = sv->threads;
    pid_t *tids = sv->tids;
    if (tid <= 0) return NULL;
    if (tids[sv->last_thread] == tid) return &threads[sv->last_thread];
    for (int i = 0; i < MAX_THREADS; i++)
        if (tids[i] == tid) return &threads[sv->last_thread = i];
    if (!create) return NULL;
    for (int i = 0; i < MAX_THREADS; i++)
        if (!threads[i].alive) {
            memset(&threads[i], 0, sizeof threads[i]);
            threads[i].tid = tids[i] = tid;
            threads[i].alive = 1;
            threads[i].proc = -1;
            threads[i].last_fault_eip = NO_FAULT_EIP;
            sv->nthreads_seen++;
            return &threads[sv->last_thread = i];
        }
    return NULL;
}

static void set_tid(struct supervisor *sv, struct thread *t, pid_t tid) {
    t->tid = sv->tids[t - sv->threads] = tid;
}

/* a new program image of process proc (its index in images[]) */
static int image_new(struct supervisor *sv, int proc, const char *program_) {
    char program[sizeof sv->images[0].program];
    snprintf(program, sizeof program, "%s", program_ ? program_ : ""); /* it may point into images[] */
    if (sv->nimages == sv->cap_images) {
        int cap = sv->cap_images ? 2 * sv->cap_images : 64;
        struct image *n = realloc(sv->images, cap * sizeof *n);
        if (!n) die_setup(sv, "malloc", ENOMEM);
        sv->images = n;
        sv->cap_images = cap;
    }
    struct image *im = &sv->images[sv->nimages];
    memset(im, 0, sizeof *im);
    im->proc = proc;
    im->pid = sv->procs[proc].pid;
    memcpy(im->program, program, sizeof im->program);
    return sv->nimages++;
}

/* the image t runs now (-1: none) */
int image_of(const struct supervisor *sv, const struct thread *t) {
    return t->proc >= 0 ? sv->procs[t->proc].image : -1;
}

/* the fault site at eip in an image, created if new (NULL: the table is full) */
struct site *site_of(struct supervisor *sv, int image, uint32_t eip) {
    uint32_t h = (eip * 2654435761u ^ (uint32_t)image * 0x9E3779B9u) & (SITE_CAP - 1);
    for (int i = 0; i < SITE_CAP; i++) {
        struct site *s = &sv->sites[(h + i) & (SITE_CAP - 1)];
        if (!s->used) {
            s->used = 1; s->eip = eip; s->image = image; s->off_min = INT64_MAX; s->off_max = INT64_MIN;
            return s;
        }
        if (s->eip == eip && s->image == image) return s;
    }
    return NULL;
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
    char buf[1024];
    const char *v = proc_status_field(tid, "Tgid", buf, sizeof buf);
    return v ? atoi(v) : -1;
}

/* PTRACE_EVENT_CLONE/FORK/VFORK of parent, new task c: it belongs to a new
 * process (fork, vfork, clone without CLONE_THREAD) or to parent's; it copies
 * (or, with CLONE_SIGHAND, shares) the handlers and copies the blocked mask
 * and the parent's TLS slots as they are now (see adopt_new_thread) */
static void inherit_from_creator(struct supervisor *sv, struct thread *parent, struct thread *c, uint64_t flags,
                                 int new_proc) {
    c->blocked_segv = parent->blocked_segv;
    if ((flags & CLONE_SIGHAND) && parent->st) { c->st = parent->st; c->st->refs++; }
    else {
        c->st = sigtab_new(sv, parent->st);
        if (c->st && (flags & CLONE_CLEAR_SIGHAND_)) sigtab_flush(c->st, 0);
    }
    memcpy(c->slots, parent->slots, sizeof c->slots);
    if (new_proc) {
        struct proc *pp = parent->proc >= 0 ? &sv->procs[parent->proc] : NULL;
        struct proc *np = &sv->procs[sv->nprocs];
        memset(np, 0, sizeof *np);
        np->pid = c->tid;
        np->ppid = pp ? pp->pid : parent->tid;
        np->image = -1;
        c->proc = sv->nprocs++;
        np->image = image_new(sv, c->proc, pp && pp->image >= 0 ? sv->images[pp->image].program : "");
        /* online-patch: the child's memory is a copy, patched sites included (or, CLONE_VM: the same) */
        patch_fork(sv, pp, np, (flags & CLONE_VM) != 0);
        if (flags & CLONE_VM) { np->shared_mm = 1; if (pp) pp->shared_mm = 1; }
    } else {
        c->proc = parent->proc;
    }
    if (c->proc >= 0) { sv->procs[c->proc].live++; sv->procs[c->proc].tasks++; }
    c->sig_ready = 1;
}

/* t is gone (exit or killed; status -1: vanished without a report, e.g. the
 * old leader at a non-leader's execve) */
void thread_gone(struct supervisor *sv, struct thread *t, int status) {
    if (t->st && --t->st->refs < 0) t->st->refs = 0;
    t->st = NULL;
    if (t->proc >= 0) {
        struct proc *p = &sv->procs[t->proc];
        p->live--;
        if (t->tid == p->pid && status != -1) {
            p->exited = 1;
            if (WIFEXITED(status)) p->status = WEXITSTATUS(status);
            else {
                p->status = -1;
                p->sig = WTERMSIG(status);
                if (sv->stopping && p->sig == SIGKILL) p->killed = 1;
            }
        }
    }
    t->alive = 0;
    sv->tids[t - sv->threads] = 0;
}

#define AT_IGNORE_ 1u   /* auxv: an entry to skip */
/* auxv entry types of the host kernel's that the model does not provide */
static const uint32_t model_lacks[] = {32 /* AT_SYSINFO */, 33 /* AT_SYSINFO_EHDR */, 51 /* AT_MINSIGSTKSZ */,
                                       27 /* AT_RSEQ_FEATURE_SIZE */, 28 /* AT_RSEQ_ALIGN */};

static int model_lacks_auxv(uint32_t type) {
    for (size_t i = 0; i < sizeof model_lacks / sizeof model_lacks[0]; i++)
        if (type == model_lacks[i]) return 1;
    return 0;
}

/* --model-env, at the exec stop: hide the auxv entries the Unicorn model does
 * not provide (vDSO: AT_SYSINFO, AT_SYSINFO_EHDR; AT_MINSIGSTKSZ; AT_RSEQ_*)
 * by turning them into AT_IGNORE. Without the vDSO, static glibc builds no
 * link_map for it (calloc/malloc at start-up) -- which shifts malloc's state
 * and with it the number of %gs faults. */
static void hide_auxv(struct supervisor *sv, pid_t tid) {
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, tid, 0, &r) < 0) return;
    if (r.cs != USER32_CS) return; /* not an i386 image (a guest may exec a 64-bit program): its own layout */
    uint32_t sp = (uint32_t)r.rsp, argc;
    if (read_mem(tid, sp, &argc, 4) < 0) return;
    uint32_t p = sp + 4 + 4 * (argc + 1), v = 1;
    for (int k = 0; k < 4096 && v; k++, p += 4)  /* envp up to NULL */
        if (read_mem(tid, p, &v, 4) < 0) return;
    for (int k = 0; k < 64; k++, p += 8) {
        uint32_t av[2];
        if (read_mem(tid, p, av, 8) < 0 || av[0] == 0) break;
        if (model_lacks_auxv(av[0])) {
            uint32_t ignore = AT_IGNORE_;
            if (write_mem(tid, p, &ignore, 4) == 0) sv->auxv_hidden++;
        }
    }
}

/* PTRACE_EVENT_EXEC of t (w: the tid that reports it): a new program in t's
 * process -- no TLS yet, handlers reset as the kernel does, a new image. A
 * non-leader's execve takes the leader's tid, the old leader vanishing
 * unreported. Returns the task that now runs the new program. */
struct thread *exec_event(struct supervisor *sv, struct thread *t, pid_t w) {
    unsigned long former = 0;
    if (ptrace(PTRACE_GETEVENTMSG, w, 0, &former) == 0 && former && (pid_t)former != w) {
        struct thread *o = thread_of(sv, (pid_t)former, 0);
        if (o && o != t) {
            thread_gone(sv, t, -1);
            set_tid(sv, o, w);
            t = o;
        }
    }
    if (sv->opt.model_env) hide_auxv(sv, w);
    if (t->st) sigtab_flush(t->st, 1);
    memset(t->slots, 0, sizeof t->slots); /* a new program: no TLS yet */
    t->stepping = 0;
    t->last_fault_eip = NO_FAULT_EIP;
    t->last_fault_flipped = 0;
    t->rate_stepping = t->rate_syscall = t->rate_prev_valid = t->rate_marked = 0;
    if (sv->cp) { /* a new image of this process: a new address space, online-rate's clock starts again */
        sv->cp->rate_has_last = 0;
        sv->cp->rate_tid = 0;
        sv->cp->rate_steps = 0;
        patch_exec(sv->cp); /* online-patch: no twin, no patched site yet */
        char path[64], prog[512];
        snprintf(path, sizeof path, "/proc/%d/exe", w);
        ssize_t k = readlink(path, prog, sizeof prog - 1);
        prog[k > 0 ? k : 0] = 0;
        sv->cp->image = image_new(sv, t->proc, prog);
    }
    if (w == sv->child_pid && sv->t_exec == 0) sv->t_exec = now_s();
    return t;
}

/* PTRACE_EVENT_CLONE/FORK/VFORK of t (w): record the new task, in a new
 * process or in t's. Beyond --max-procs processes or MAX_THREADS tasks the
 * run stops; then t is resumed here and 1 returned (0: the caller resumes
 * t). A new task whose first stop came first (held) is adopted and resumed. */
int clone_event(struct supervisor *sv, struct thread *t, pid_t w, int event) {
    unsigned long ctid = 0;
    int known;
    uint64_t flags = clone_flags(t, &known);
    if (ptrace(PTRACE_GETEVENTMSG, w, 0, &ctid) != 0 || ctid == 0) return 0;
    if (event == PTRACE_EVENT_CLONE) sv->clones++; else sv->forks++;
    if (event == PTRACE_EVENT_VFORK) sv->vforks++;
    int new_proc = event != PTRACE_EVENT_CLONE || !(flags & CLONE_THREAD);
    if (event == PTRACE_EVENT_CLONE && !known) new_proc = tgid_of((pid_t)ctid) == (pid_t)ctid;
    struct thread *c = NULL;
    if (new_proc && sv->nprocs >= sv->opt.max_procs) begin_stop(sv, "max_procs");
    else if (!(c = thread_of(sv, (pid_t)ctid, 1))) begin_stop(sv, "too many tasks");
    if (sv->stopping) { ptrace(PTRACE_CONT, w, 0, 0); return 1; }
    if (event == PTRACE_EVENT_VFORK) flags |= CLONE_VM;
    inherit_from_creator(sv, t, c, flags, new_proc);
    if (c->held) { /* its first stop came first and waited for this */
        struct proc *save = sv->cp;
        sv->cp = c->proc >= 0 ? &sv->procs[c->proc] : NULL;
        adopt_new_thread(sv, c);
        sv->cp = save;
        c->held = 0;
        if (ptrace(PTRACE_CONT, c->tid, 0, 0) < 0 && errno != ESRCH) die_setup(sv, "ptrace resume", errno);
    }
    return 0;
}

/* an image's file mappings (/proc/PID/maps, paths as the supervisor sees
 * them), read at its process's exit or before its execve: "objects" of the
 * image in the JSON (the main process's last image also as the top-level
 * "objects"), so that fault sites can be named by (object, file offset)
 * whatever the load addresses */
void record_objects(struct supervisor *sv, pid_t pid, int img) {
    char path[64], line[4352];
    if (img < 0) return;
    struct image *im = &sv->images[img];
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
