/*
 * report.c: the JSON summary (--json PATH), written once at the end of the
 * run or at a set-up failure: totals, per-process and per-image counts, the
 * TLS installs, every fault site, and (online strategies) the model's
 * counters. tlslab/hw/backend.py reads it; its field names are an interface.
 */
#include "supervisor.h"

#include <unistd.h>

void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 0x20) fprintf(f, "\\u%04x", *s);
        else fputc(*s, f);
    }
    fputc('"', f);
}

void write_json(struct supervisor *sv) {
    const struct options *opt = &sv->opt;
    const struct counters *tot = &sv->total;
    const struct online *on = &sv->online;
    if (!opt->json_path) return;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", opt->json_path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fflush(sv->tlslog);
    fprintf(f, "{\"version\":1,\"strategy\":\"%s\",\"hv_start\":%u,\"cpu\":%d,", opt->strategy->name,
            opt->hv_start, opt->cpu);
    fprintf(f, "\"error\":");
    if (sv->setup_error) {
        char buf[300];
        snprintf(buf, sizeof buf, "%s: %s", sv->setup_error, strerror(sv->setup_errno));
        json_str(f, buf);
        fprintf(f, ",\"error_stage\":");
        json_str(f, sv->setup_error);
        fprintf(f, ",\"error_errno\":%d", sv->setup_errno);
    } else fprintf(f, "null");
    fprintf(f, ",\"status\":");
    if (sv->exit_status >= 0) fprintf(f, "%d", sv->exit_status); else fprintf(f, "null");
    fprintf(f, ",\"signal\":%d,\"timed_out\":%s", sv->exit_signal, sv->timed_out ? "true" : "false");
    fprintf(f, ",\"stopped\":");
    if (sv->stop_reason) json_str(f, sv->stop_reason); else fprintf(f, "null");
    fprintf(f, ",\"orphans_killed\":%llu", (unsigned long long)sv->orphans_killed);
    fprintf(f, ",\"max_procs\":%d,\"processes_started\":%d,\"killed_tasks\":%llu,\"group_stops\":%llu,\"vforks\":%llu",
            opt->max_procs, sv->nprocs, (unsigned long long)sv->killed_tasks, (unsigned long long)tot->group_stops,
            (unsigned long long)sv->vforks);
    fprintf(f, ",\"wall_ns\":%.0f,\"run_ns\":%.0f", (sv->t_end - sv->t_fork) * 1e9,
            (sv->t_end - (sv->t_exec > 0 ? sv->t_exec : sv->t_fork)) * 1e9);
    fprintf(f, ",\"faults\":%llu,\"emulated\":%llu,\"stepped\":%llu,\"to_expand_down\":%llu,"
               "\"to_expand_up\":%llu,\"delivered\":%llu,\"descriptor_switches\":%llu,"
               "\"seccomp_stops\":%llu,\"tls_installs\":%llu,\"ldt_installs\":%llu,\"ldt_truncated\":%llu,"
               "\"ldt_refused\":%llu,\"signals_passed\":%llu,\"other_sigsegv\":%llu,\"clones\":%llu,\"forks\":%llu,\"threads\":%d,"
               "\"model_env\":%s,\"auxv_hidden\":%llu,\"handler_ns\":%.0f,"
               "\"cpuid\":{\"table\":%llu,\"images\":%llu,\"refused\":%llu,\"answered\":%llu,\"unlisted\":%llu}",
            (unsigned long long)tot->faults, (unsigned long long)tot->emulated, (unsigned long long)tot->stepped,
            (unsigned long long)tot->to_down, (unsigned long long)tot->to_up, (unsigned long long)tot->delivered,
            (unsigned long long)tot->switches, (unsigned long long)sv->seccomp_stops,
            (unsigned long long)tot->tls_installs, (unsigned long long)tot->ldt_installs,
            (unsigned long long)sv->ldt_truncated, (unsigned long long)sv->ldt_refused,
            (unsigned long long)tot->signals_passed,
            (unsigned long long)tot->other_segv, (unsigned long long)sv->clones, (unsigned long long)sv->forks,
            sv->nthreads_seen,
            opt->model_env ? "true" : "false", (unsigned long long)sv->auxv_hidden, sv->handler_s * 1e9,
            (unsigned long long)sv->ncpuid, (unsigned long long)sv->cpuid_images,
            (unsigned long long)sv->cpuid_refused, (unsigned long long)sv->cpuid_answered,
            (unsigned long long)sv->cpuid_unlisted);
    fprintf(f, ",\"signal_syscalls\":%llu,\"sigsegv_restores\":%llu,\"sigsegv_handler_restores\":%llu,"
               "\"sigsegv_mask_restores\":%llu,\"restore_failures\":%llu,\"signals_requeued\":%llu,"
               "\"restore_ns\":%.0f",
            (unsigned long long)sv->signal_syscalls, (unsigned long long)tot->segv_restores,
            (unsigned long long)sv->segv_handler_restores, (unsigned long long)sv->segv_mask_restores,
            (unsigned long long)sv->restore_failures, (unsigned long long)sv->signals_requeued, sv->restore_s * 1e9);
    if (opt->strategy->online) {
        /* the model's counters for the same run: by_kind (only the kinds that
         * occurred, as the model's dict) and descriptor_writes; "unknown_sign":
         * faults whose offset the decoder could not compute (the model always
         * can; see probe_fault) */
        const char *kind[] = {"emulate", "flip", "probe", "probe-flip", "probe-end", "probe-orphan",
                              "site-marked-hot", "ahead-flip", "ahead-emulate", "flip-back",
                              "lookahead-instructions", "mode-flip", "mode-emulate"};
        uint64_t nk[] = {on->count.emulate, on->count.flip, on->count.probe, on->count.probe_flip,
                         on->count.probe_end, on->count.probe_orphan, on->count.marked_hot, on->count.ahead_flip,
                         on->count.ahead_emulate, on->count.flip_back, on->count.lookahead_instructions,
                         on->count.mode_flip, on->count.mode_emulate};
        fprintf(f, ",\"online\":{\"emulate_ns\":%.17g,\"flip_ns\":%.17g,\"threshold\":%.17g,"
                   "\"probe_cap\":%llu,\"sites\":%llu,\"descriptor_writes\":%llu,\"unknown_sign\":%llu,"
                   "\"rate_steps\":%llu,"
                   "\"by_kind\":{",
                on->emulate_ns, on->flip_ns, on->threshold, (unsigned long long)on->probe_cap,
                (unsigned long long)on->nsites,
                (unsigned long long)on->count.desc_writes, (unsigned long long)on->count.unknown_sign,
                (unsigned long long)on->rate_steps_total);
        int firstk = 1;
        for (size_t k = 0; k < sizeof nk / sizeof nk[0]; k++)
            if (nk[k]) {
                fprintf(f, "%s\"%s\":%llu", firstk ? "" : ",", kind[k], (unsigned long long)nk[k]);
                firstk = 0;
            }
        for (int k = 0; k < on->nkinds; k++) { /* online-patch's kinds (patch.c), some with text */
            fprintf(f, "%s", firstk ? "" : ",");
            json_str(f, on->kinds[k].key);
            fprintf(f, ":%llu", (unsigned long long)on->kinds[k].n);
            firstk = 0;
        }
        fprintf(f, "},\"patches\":%llu,\"refused\":%llu,\"kinds_lost\":%llu}", (unsigned long long)on->patches,
                (unsigned long long)on->refused, (unsigned long long)on->kinds_lost);
    }
    fprintf(f, ",\"first_delivered\":");
    json_str(f, sv->first_delivered);
    fprintf(f, ",\"decoder_misses\":{");
    for (int i = 0; i < sv->nmisses; i++) {
        if (i) fputc(',', f);
        json_str(f, sv->misses[i].key);
        fprintf(f, ":%llu", (unsigned long long)sv->misses[i].n);
    }
    {
        const struct image *mi = sv->nprocs && sv->procs[0].image >= 0 ? &sv->images[sv->procs[0].image] : NULL;
        fprintf(f, "},\"objects\":[%.*s]", mi ? (int)mi->objects_len : 0, mi && mi->objects ? mi->objects : "");
    }
    fprintf(f, ",\"processes\":[");
    for (int i = 0; i < sv->nprocs; i++) {
        const struct proc *p = &sv->procs[i];
        const struct counters *c = &p->c;
        fprintf(f, "%s{\"pid\":%d,\"ppid\":%d,\"program\":", i ? "," : "", p->pid, p->ppid);
        json_str(f, p->image >= 0 ? sv->images[p->image].program : "");
        fprintf(f, ",\"images\":[");
        int first_im = 1;
        for (int k = 0; k < sv->nimages; k++)
            if (sv->images[k].proc == i) { fprintf(f, "%s%d", first_im ? "" : ",", k); first_im = 0; }
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
    for (int k = 0; k < sv->nimages; k++) {
        const struct image *im = &sv->images[k];
        fprintf(f, "%s{\"pid\":%d,\"program\":", k ? "," : "", im->pid);
        json_str(f, im->program);
        fprintf(f, ",\"faults\":%llu,\"objects\":[%.*s]}", (unsigned long long)im->faults, (int)im->objects_len,
                im->objects ? im->objects : "");
    }
    fprintf(f, "]");
    fprintf(f, ",\"chroot\":");
    if (opt->overlay_dir) {
        char r[4096];
        snprintf(r, sizeof r, "%s/root", opt->view_dir);
        json_str(f, r);
    } else if (opt->chroot_dir) {
        json_str(f, opt->view_dir ? opt->view_dir : opt->chroot_dir);
    } else fprintf(f, "null");
    fprintf(f, ",\"jail\":\"%s\"",
            opt->overlay_dir ? "overlay" : opt->chroot_dir ? (opt->view_dir ? "view" : "chroot") : "none");
    fprintf(f, ",\"uid\":%ld,\"gid\":%ld", opt->guest_uid, opt->guest_gid);
    fprintf(f, ",\"tls\":[%.*s],\"sites\":[", (int)sv->tlslog_len, sv->tlslog_buf ? sv->tlslog_buf : "");
    int first = 1;
    for (int i = 0; sv->sites && i < SITE_CAP; i++) {
        struct site *s = &sv->sites[i];
        if (!s->used) continue;
        fprintf(f, "%s{\"eip\":%u,\"image\":%d,\"pid\":%d,\"segment\":\"%s\",\"faults\":%llu,\"emulated\":%llu,\"stepped\":%llu,"
                   "\"to_expand_down\":%llu,\"to_expand_up\":%llu,\"delivered\":%llu,\"negative\":%llu,"
                   "\"positive\":%llu,\"min_offset\":%lld,\"max_offset\":%lld,\"bytes\":\"",
                first ? "" : ",", s->eip, s->image, s->image >= 0 ? sv->images[s->image].pid : 0,
                s->seg == TC_FS ? "fs" : s->seg == TC_GS ? "gs" : "?",
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
    rename(tmp, opt->json_path);
}
