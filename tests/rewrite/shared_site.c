/* One %gs site used with both signs by two processes that share its page (tests/test_rewrite.py).
 *
 * The child reaches a __thread variable through the site (a negative offset: rewrite patches the
 * site's page-cache page, so the parent's copy is rewritten too); then the parent reads its TCB's
 * self pointer through the same site (offset 0: the rewritten %fs form faults, and the site is
 * un-patched for everyone); then the child uses it with the negative offset again. Pipes order the
 * three steps. Prints what each side read; exits 0 when both were right. */
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

__thread int tls_value = 42;

__attribute__((noinline)) static int through_gs(int offset) {
    int v;
    __asm__ volatile("movl %%gs:(%1), %0" : "=r"(v) : "r"(offset));
    return v;
}

int main(void) {
    int offset, to_child[2], to_parent[2];
    char token;
    __asm__("movl $tls_value@ntpoff, %0" : "=r"(offset));
    if (pipe(to_child) || pipe(to_parent)) return 2;
    pid_t pid = fork();
    if (pid < 0) return 2;
    if (pid == 0) {
        int first = through_gs(offset);
        write(to_parent[1], "a", 1);
        read(to_child[0], &token, 1);
        int second = through_gs(offset);
        printf("child: %d %d\n", first, second);
        fflush(stdout);
        write(to_parent[1], "b", 1);
        _exit(first == 42 && second == 42 ? 0 : 1);
    }
    read(to_parent[0], &token, 1);
    int self1 = through_gs(0) != 0;
    write(to_child[1], "c", 1);
    read(to_parent[0], &token, 1);
    int self2 = through_gs(0) != 0;
    int status;
    waitpid(pid, &status, 0);
    printf("parent: %d %d, child exit %d\n", self1, self2, WEXITSTATUS(status));
    return self1 && self2 && WEXITSTATUS(status) == 0 ? 0 : 1;
}
