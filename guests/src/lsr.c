/* lsr: a small `ls -R`-like walker, the tlslab reference workload.
 *
 * Exercises: opendir/readdir/closedir, lstat (statx in glibc 2.36), readlink,
 * malloc/strdup/free, qsort, printf/snprintf, errno + strerror, and one
 * __thread variable of its own (a per-thread recursion depth) so that our own
 * code contains negative %gs accesses in the default build.
 *
 * Output is deterministic: entries are sorted with qsort (strcmp), and no
 * pointers, times, inode numbers or pids are printed.
 *
 * Usage: lsr [DIR]      (default ".")
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct entry {
    char *name;
    char type;          /* d f l c b p s ? */
    long long size;
    char *target;       /* symlink target, or NULL */
    int err;            /* errno from lstat/readlink, 0 if fine */
};

static __thread int depth;         /* own TLS variable: -ve %gs access */
static __thread int max_depth;
static unsigned long n_dirs, n_files, n_links, n_other, n_errors;
static unsigned long long total_bytes;

static char type_char(mode_t m)
{
    if (S_ISDIR(m)) return 'd';
    if (S_ISREG(m)) return 'f';
    if (S_ISLNK(m)) return 'l';
    if (S_ISCHR(m)) return 'c';
    if (S_ISBLK(m)) return 'b';
    if (S_ISFIFO(m)) return 'p';
    if (S_ISSOCK(m)) return 's';
    return '?';
}

static int cmp_entry(const void *a, const void *b)
{
    const struct entry *x = a, *y = b;
    return strcmp(x->name, y->name);
}

static void walk(const char *path)
{
    DIR *d;
    struct dirent *de;
    struct entry *ents = NULL;
    size_t n = 0, cap = 0, i;
    char child[4096];

    depth++;
    if (depth > max_depth)
        max_depth = depth;

    printf("%s:\n", path);
    d = opendir(path);
    if (!d) {
        printf("  !opendir: %s\n", strerror(errno));
        n_errors++;
        depth--;
        return;
    }
    errno = 0;
    while ((de = readdir(d)) != NULL) {
        struct stat st;
        struct entry *e;
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            ents = realloc(ents, cap * sizeof *ents);
            if (!ents) {
                perror("realloc");
                exit(1);
            }
        }
        e = &ents[n++];
        e->name = strdup(de->d_name);
        e->target = NULL;
        e->size = 0;
        e->err = 0;
        snprintf(child, sizeof child, "%s/%s", path, de->d_name);
        if (lstat(child, &st) != 0) {
            e->err = errno;
            e->type = '?';
            continue;
        }
        e->type = type_char(st.st_mode);
        e->size = (long long)st.st_size;
        if (e->type == 'l') {
            char buf[4096];
            ssize_t len = readlink(child, buf, sizeof buf - 1);
            if (len < 0) {
                e->err = errno;
            } else {
                buf[len] = '\0';
                e->target = strdup(buf);
            }
        }
        errno = 0;
    }
    if (errno != 0) {
        printf("  !readdir: %s\n", strerror(errno));
        n_errors++;
    }
    closedir(d);

    qsort(ents, n, sizeof *ents, cmp_entry);

    for (i = 0; i < n; i++) {
        struct entry *e = &ents[i];
        if (e->err) {
            printf("  %c %s !%s\n", e->type, e->name, strerror(e->err));
            n_errors++;
        } else if (e->type == 'f') {
            printf("  f %s %lld\n", e->name, e->size);
            n_files++;
            total_bytes += (unsigned long long)e->size;
        } else if (e->type == 'l') {
            printf("  l %s -> %s\n", e->name, e->target);
            n_links++;
        } else if (e->type == 'd') {
            printf("  d %s\n", e->name);
            n_dirs++;
        } else {
            printf("  %c %s\n", e->type, e->name);
            n_other++;
        }
    }
    putchar('\n');

    for (i = 0; i < n; i++) {
        if (ents[i].type == 'd' && !ents[i].err) {
            snprintf(child, sizeof child, "%s/%s", path, ents[i].name);
            walk(child);
        }
    }
    for (i = 0; i < n; i++) {
        free(ents[i].name);
        free(ents[i].target);
    }
    free(ents);
    depth--;
}

int main(int argc, char **argv)
{
    const char *root = argc > 1 ? argv[1] : ".";
    walk(root);
    printf("total: %lu dirs, %lu files, %lu links, %lu other, %lu errors, "
           "%llu bytes, depth %d\n",
           n_dirs, n_files, n_links, n_other, n_errors, total_bytes, max_depth);
    return 0;
}
