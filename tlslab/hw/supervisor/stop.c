/*
 * stop.c: ending the run. Stopping the guest tree (timeout, --max-procs, too
 * many tasks, the supervisor itself signalled): every task we trace and every
 * descendant is killed, again every 100 ms until none is left. Killing the
 * orphans the main process leaves behind. A set-up failure (die_setup):
 * the reason goes into the JSON, exit status 3.
 */
#include "supervisor.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/time.h>
#include <unistd.h>

/* Every descendant of the supervisor, by a scan of /proc (ppid chains): what
 * the untraced strategy has to go by, and a second net under the tracees we
 * know (a child forked a moment ago, not yet reported). The supervisor is a
 * child subreaper, so orphaned guest processes stay its descendants. */
#define SCAN_CAP 65536  /* processes looked at per scan */
#define PH_CAP 131072   /* pid -> ppid hash table */
struct proc_scan {      /* one scan's pid -> ppid table: scratch, rebuilt by each scan */
    pid_t pid[SCAN_CAP], ppid[SCAN_CAP];
    pid_t ph_pid[PH_CAP], ph_ppid[PH_CAP];
};

static pid_t ph_parent(const struct proc_scan *ps, pid_t p) { /* -1: not seen */
    for (uint32_t h = ((uint32_t)p * 2654435761u) & (PH_CAP - 1);; h = (h + 1) & (PH_CAP - 1)) {
        if (!ps->ph_pid[h]) return -1;
        if (ps->ph_pid[h] == p) return ps->ph_ppid[h];
    }
}

static int signal_descendants(int sig) {
    static struct proc_scan scan; /* 1.5 MB: too big for the stack; nothing in it outlives a call */
    struct proc_scan *ps = &scan;
    int n = 0, killed = 0;
    memset(ps->ph_pid, 0, sizeof ps->ph_pid);
    pid_t me = getpid();
    DIR *d = opendir("/proc");
    if (!d) return 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < SCAN_CAP) {
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
        ps->pid[n] = atoi(de->d_name);
        ps->ppid[n] = pp;
        uint32_t h = ((uint32_t)ps->pid[n] * 2654435761u) & (PH_CAP - 1);
        while (ps->ph_pid[h]) h = (h + 1) & (PH_CAP - 1);
        ps->ph_pid[h] = ps->pid[n];
        ps->ph_ppid[h] = pp;
        n++;
    }
    closedir(d);
    for (int i = 0; i < n; i++) {
        pid_t p = ps->ppid[i];
        for (int hop = 0; hop < 4096 && p > 1; hop++) {
            if (p == me) { if (kill(ps->pid[i], sig) == 0) killed++; break; }
            p = ph_parent(ps, p);
        }
    }
    return killed;
}

/* SIGKILL every task we trace, and every descendant: those are first frozen
 * with SIGSTOP until a pass finds no more of them (an untraced fork bomb
 * forks faster than a scan kills; stopped, it cannot), then killed. Tracees
 * cannot outrun us: a new one stops before its first instruction. */
void sweep(struct supervisor *sv) {
    for (int i = 0; i < MAX_THREADS; i++)
        if (sv->tids[i]) kill(sv->tids[i], SIGKILL);
    if (sv->child_pid > 0) kill(sv->child_pid, SIGKILL);
    int prev = -1;
    for (int pass = 0; pass < 64; pass++) {
        int n = signal_descendants(SIGSTOP);
        if (n == prev) break;
        prev = n;
    }
    signal_descendants(SIGKILL);
}

/* kill the guest tree now and again every 100 ms (the main loop's tick) */
static void kill_guest_tree(struct supervisor *sv) {
    sv->stopping = 1;
    struct itimerval it = {{0, 100000}, {0, 100000}};
    setitimer(ITIMER_REAL, &it, NULL);
    sweep(sv);
}

/* stop the run: the whole guest tree is killed (again every 100 ms until the
 * supervisor has no child and no tracee left) and the reason reported */
void begin_stop(struct supervisor *sv, const char *why) {
    if (!sv->stop_reason) sv->stop_reason = why;
    if (sv->stopping) return;
    kill_guest_tree(sv);
}

/* The main process is gone: processes it left behind are killed (the run
 * ends with its first process, as in the model) and counted ("orphans_killed";
 * their entries in "processes" say killed). Not a stop: the run is complete. */
void end_orphans(struct supervisor *sv) {
    if (sv->stopping) return;
    int untraced = !sv->opt.strategy->traced;
    int left = 0;
    for (int i = 0; i < MAX_THREADS; i++) left += sv->tids[i] != 0;
    if (untraced) left = signal_descendants(0);
    if (!left) return;
    for (int i = 0; i < sv->nprocs; i++)
        sv->orphans_killed += sv->procs[i].pid != sv->child_pid && !sv->procs[i].exited;
    if (untraced) sv->orphans_killed = (uint64_t)left;
    kill_guest_tree(sv);
}

void die_setup(struct supervisor *sv, const char *what, int err) {
    sv->setup_error = what;
    sv->setup_errno = err;
    if (sv->child_pid > 0) { sv->stopping = 1; sweep(sv); }
    sv->t_end = now_s();
    write_json(sv);
    fprintf(stderr, "tlslab-hw-supervisor: %s: %s\n", what, strerror(err));
    exit(3);
}

/* The signal handlers' way to the state: the one struct supervisor of the
 * process, set once by install_signal_handlers before any can run. */
static struct supervisor *signalled;

static void on_term(int sig) { (void)sig; signalled->interrupted = 1; }

static void on_alarm(int sig) {
    (void)sig;
    if (!signalled->stopping) signalled->timed_out = 1;
    signalled->tick = 1;
}

void install_signal_handlers(struct supervisor *sv) {
    signalled = sv;
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm; /* no SA_RESTART: waitpid returns EINTR */
    sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = on_term; /* killed politely: the guest tree goes with us, reported */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
}
