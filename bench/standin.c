/* SPDX-License-Identifier: GPL-3.0-or-later
 *
 * standin: cheap stand-in QEMU processes for the vmstart benchmark.
 *
 * The daemons release a VM's leases when the connection whose peer pid equals
 * the registered owner pid closes (spec 4.6), so each simulated VM needs its own
 * process that connect()s.  Forking a Python worker costs ~1 ms of CPU per VM
 * (copy-on-write of the interpreter), which would make the client, not the
 * daemon, the bottleneck on 2 cores; forking this small program costs ~0.1 ms.
 *
 * usage: standin LOCK_SOCKET_PATH CONTROL_FD
 * Commands on CONTROL_FD (a UNIX stream socket), 5 bytes each:
 *   'S' 0 0 0 0   fork a child that connects to LOCK_SOCKET_PATH and sends the
 *                 connected socket back over CONTROL_FD (SCM_RIGHTS) with the
 *                 payload {int32 pid, int32 errno}; the child then sleeps.
 *   'K' <pid>     SIGKILL and reap that child, answer 'D'.
 * EOF on CONTROL_FD: kill and reap every child still alive, exit.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static int read_full(int fd, char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

static void child(int ctl, const struct sockaddr_un *sa)
{
    int32_t payload[2] = { (int32_t)getpid(), 0 };
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (const struct sockaddr *)sa, sizeof(*sa)) < 0)
        payload[1] = errno ? errno : EIO;

    struct iovec iov = { payload, sizeof(payload) };
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
    struct msghdr msg = { 0 };
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (payload[1] == 0) {
        memset(&u, 0, sizeof(u));
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof(u.buf);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &s, sizeof(int));
    }
    while (sendmsg(ctl, &msg, 0) < 0 && errno == EINTR)
        ;
    if (s >= 0)
        close(s);           /* the worker holds the connection from now on */
    for (;;)
        pause();            /* "QEMU" runs until SIGKILL */
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        static const char usage[] = "usage: standin LOCK_SOCKET_PATH CONTROL_FD\n";
        write(2, usage, sizeof(usage) - 1);
        return 2;
    }
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    strncpy(sa.sun_path, argv[1], sizeof(sa.sun_path) - 1);
    int ctl = atoi(argv[2]);

    char cmd[5];
    while (read_full(ctl, cmd, sizeof(cmd)) == 0) {
        if (cmd[0] == 'S') {
            pid_t pid = fork();
            if (pid == 0)
                child(ctl, &sa);
            if (pid < 0) {
                int32_t payload[2] = { -1, errno };
                write(ctl, payload, sizeof(payload));
            }
        } else if (cmd[0] == 'K') {
            int32_t pid;
            memcpy(&pid, cmd + 1, sizeof(pid));
            if (pid > 1) {
                kill(pid, SIGKILL);
                while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
                    ;
            }
            write(ctl, "D", 1);
        }
    }
    /* the worker went away: leave no stand-in behind */
    if (getpgrp() == getpid()) {    /* only when started as its own group leader */
        signal(SIGTERM, SIG_IGN);
        kill(0, SIGKILL);
    }
    return 0;
}
