/* The real node's sandbox ("pause") process: it holds a pod's namespaces, reaps
 * orphans and exits on SIGINT or SIGTERM. Built static (`gcc -static`) into a
 * FROM-scratch image by `cargo xtask cluster up`, so containerd never pulls one. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal) {
  (void)signal;
  _exit(0);
}

static void reap(int signal) {
  (void)signal;
  while (waitpid(-1, 0, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction action = {0};
  action.sa_handler = stop;
  sigaction(SIGINT, &action, 0);
  sigaction(SIGTERM, &action, 0);
  action.sa_handler = reap;
  action.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &action, 0);
  for (;;) {
    pause();
  }
}
