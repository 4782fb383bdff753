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

enum { FREE = 0, CLAIMED = 1, LIVE = 2 };

struct guard_slot {
    _Atomic int state;         /* FREE, CLAIMED (being filled or emptied), LIVE (the handler's) */
    _Atomic uintptr_t start;
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
    /* Only a page beyond the end of the file (BUS_ADRERR) is the frontend shrinking it; an I/O
       error or an alignment fault is not absorbed. */
    int ours = info->si_code == BUS_ADRERR;
    for (int i = 0; ours && i < SLOTS; i++) {
        if (atomic_load_explicit(&slots[i].state, memory_order_acquire) != LIVE) continue;
        uintptr_t start = atomic_load_explicit(&slots[i].start, memory_order_relaxed);
        uintptr_t end = atomic_load_explicit(&slots[i].end, memory_order_relaxed);
        if (addr < start || addr >= end) continue;
        size_t page = atomic_load_explicit(&slots[i].page, memory_order_relaxed);
        /* The mapping starts and ends on `page` boundaries (registration checks it), so the
           replaced page lies inside it. */
        uintptr_t at = addr & ~(uintptr_t)(page - 1);
        if (at < start || at + page > end) break;
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
    if ((uintptr_t)start % page_size != 0 || length % page_size != 0) return -1;
    for (int i = 0; i < SLOTS; i++) {
        int expected = FREE;
        /* Claim the slot (the handler ignores it until LIVE), fill it in, then publish it with
           release ordering for the handler's acquire load. */
        if (!atomic_compare_exchange_strong(&slots[i].state, &expected, CLAIMED)) continue;
        atomic_store_explicit(&slots[i].start, (uintptr_t)start, memory_order_relaxed);
        atomic_store_explicit(&slots[i].end, (uintptr_t)start + length, memory_order_relaxed);
        atomic_store_explicit(&slots[i].page, page_size, memory_order_relaxed);
        atomic_store_explicit(&slots[i].fd, notify_fd, memory_order_relaxed);
        atomic_store_explicit(&slots[i].faults, 0, memory_order_relaxed);
        atomic_store_explicit(&slots[i].state, LIVE, memory_order_release);
        return i;
    }
    return -1;
}

void cvdpa_guard_unregister(int slot) {
    if (slot < 0 || slot >= SLOTS) return;
    /* Out of the handler's sight first, then emptied, then free for the next registration. */
    atomic_store_explicit(&slots[slot].state, CLAIMED, memory_order_release);
    atomic_store_explicit(&slots[slot].fd, -1, memory_order_relaxed);
    atomic_store_explicit(&slots[slot].start, 0, memory_order_relaxed);
    atomic_store_explicit(&slots[slot].end, 0, memory_order_relaxed);
    atomic_store_explicit(&slots[slot].state, FREE, memory_order_release);
}

uint64_t cvdpa_guard_faults(int slot) {
    if (slot < 0 || slot >= SLOTS) return 0;
    return atomic_load_explicit(&slots[slot].faults, memory_order_relaxed);
}

uint64_t cvdpa_guard_total_faults(void) {
    return atomic_load_explicit(&total_faults, memory_order_relaxed);
}

/* Thread interrupts (see CVDPAGuard.h). glibc keeps the first real-time signals for itself and
   moves SIGRTMIN past them; SIGRTMIN + 4 is free for applications. */
static pthread_once_t interrupt_once = PTHREAD_ONCE_INIT;
static int interrupt_result;

static void on_interrupt(int sig) { (void)sig; }

static void install_interrupt(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_interrupt;
    sa.sa_flags = 0; /* no SA_RESTART: a blocked read or write returns EINTR */
    sigemptyset(&sa.sa_mask);
    interrupt_result = sigaction(SIGRTMIN + 4, &sa, NULL);
}

int cvdpa_interrupt_signal(void) { return SIGRTMIN + 4; }

int cvdpa_interrupt_install(void) {
    pthread_once(&interrupt_once, install_interrupt);
    return interrupt_result;
}

int cvdpa_thread_interrupt(unsigned long thread) {
    return pthread_kill((pthread_t)thread, SIGRTMIN + 4);
}
