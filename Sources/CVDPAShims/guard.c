// The SIGBUS guard (see CVDPAGuard.h). Everything the handler touches is a lock-free atomic in a
// static table, and it calls only mmap, write and sigaction: all async-signal-safe.
#define _GNU_SOURCE
#include "CVDPAGuard.h"
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <errno.h>
#include <pthread.h>

#define SLOTS 4096

struct guard_slot {
    _Atomic uintptr_t start;   /* 0 = free */
    _Atomic uintptr_t end;
    _Atomic size_t page;
    _Atomic int fd;
    _Atomic uint64_t faults;
};

static struct guard_slot slots[SLOTS];
static _Atomic uint64_t total_faults;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static int install_result;

static void on_sigbus(int sig, siginfo_t *info, void *uctx) {
    (void)uctx;
    uintptr_t addr = (uintptr_t)info->si_addr;
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t start = atomic_load_explicit(&slots[i].start, memory_order_acquire);
        if (start == 0 || addr < start) continue;
        uintptr_t end = atomic_load_explicit(&slots[i].end, memory_order_relaxed);
        if (addr >= end) continue;
        size_t page = atomic_load_explicit(&slots[i].page, memory_order_relaxed);
        uintptr_t at = addr & ~(uintptr_t)(page - 1);
        if (at < start) at = start;
        int saved = errno;
        void *p = mmap((void *)at, page, PROT_READ | PROT_WRITE,
                       MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) { errno = saved; break; }
        atomic_fetch_add_explicit(&slots[i].faults, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&total_faults, 1, memory_order_relaxed);
        int fd = atomic_load_explicit(&slots[i].fd, memory_order_relaxed);
        if (fd >= 0) {
            uint64_t one = 1;
            ssize_t w = write(fd, &one, sizeof one);
            (void)w;
        }
        errno = saved;
        return;
    }
    /* Not a guest mapping: the fault is a real bug. Restore the default and let it recur. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
}

static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    install_result = sigaction(SIGBUS, &sa, NULL);
}

int cvdpa_guard_install(void) {
    pthread_once(&install_once, install);
    return install_result;
}

int cvdpa_guard_register(void *start, size_t length, size_t page_size, int notify_fd) {
    if (start == NULL || length == 0 || page_size == 0 || (page_size & (page_size - 1)) != 0) return -1;
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t expected = 0;
        /* Claim the slot with a placeholder so no other thread takes it, fill it in, then publish
           the real start (release) for the handler's acquire load. */
        if (!atomic_compare_exchange_strong(&slots[i].start, &expected, (uintptr_t)1)) continue;
        atomic_store_explicit(&slots[i].end, 0, memory_order_relaxed);
        atomic_store_explicit(&slots[i].page, page_size, memory_order_relaxed);
        atomic_store_explicit(&slots[i].fd, notify_fd, memory_order_relaxed);
        atomic_store_explicit(&slots[i].faults, 0, memory_order_relaxed);
        atomic_store_explicit(&slots[i].end, (uintptr_t)start + length, memory_order_relaxed);
        atomic_store_explicit(&slots[i].start, (uintptr_t)start, memory_order_release);
        return i;
    }
    return -1;
}

void cvdpa_guard_unregister(int slot) {
    if (slot < 0 || slot >= SLOTS) return;
    atomic_store_explicit(&slots[slot].fd, -1, memory_order_relaxed);
    atomic_store_explicit(&slots[slot].end, 0, memory_order_relaxed);
    atomic_store_explicit(&slots[slot].start, 0, memory_order_release);
}

uint64_t cvdpa_guard_faults(int slot) {
    if (slot < 0 || slot >= SLOTS) return 0;
    return atomic_load_explicit(&slots[slot].faults, memory_order_relaxed);
}

uint64_t cvdpa_guard_total_faults(void) {
    return atomic_load_explicit(&total_faults, memory_order_relaxed);
}
