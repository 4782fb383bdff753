// The SIGBUS guard for guest mappings. This is the one piece of logic in the C shim, because a
// signal handler must be async-signal-safe, which Swift code (ARC, allocation) cannot promise.
//
// A frontend shares its guest RAM and dirty log as files. If it shrinks such a file after the
// daemon mapped it, the daemon's next access to a page beyond the new end raises SIGBUS, which
// would kill the whole daemon (every port, every guest). Each guest mapping is registered here
// with an eventfd of the session that owns it. The handler recognises a fault inside a
// registered range (si_code BUS_ADRERR: beyond the end of the file), replaces the faulting page
// (of the mapping's page size: 4 KiB, or the huge page on hugetlbfs) with an anonymous zero page (the access then
// completes on throw-away memory), counts it, and signals the session's eventfd; the session's
// port then closes that connection. A SIGBUS outside every registered range is not ours: the
// default action is restored and the fault recurs, ending the process as before.
#ifndef CVDPA_GUARD_H
#define CVDPA_GUARD_H

#include <stddef.h>
#include <stdint.h>

/// Installs the process-wide SIGBUS handler (idempotent). Returns 0 or -1 with errno.
int cvdpa_guard_install(void);
/// Registers [start, start+length) with page size `page_size` (the mapping's: 4 KiB, or the huge
/// page size on hugetlbfs; `start` and `length` must be multiples of it); a fault there signals
/// eventfd `notify_fd`. Returns a slot number, or -1 when the arguments are not aligned or every
/// slot is taken.
int cvdpa_guard_register(void *start, size_t length, size_t page_size, int notify_fd);
/// Removes a registration. Call before unmapping the range (and before closing notify_fd).
void cvdpa_guard_unregister(int slot);
/// Faults handled in `slot` so far.
uint64_t cvdpa_guard_faults(int slot);
/// Faults handled in all slots since start (for tests and stats).
uint64_t cvdpa_guard_total_faults(void);


/// The signal `cvdpa_thread_interrupt` sends: a real-time signal whose handler does nothing and
/// is installed without SA_RESTART, so a thread blocked in a system call (a read or write on an
/// fd a frontend made blocking again) returns from it with EINTR.
int cvdpa_interrupt_signal(void);
/// Installs that handler (idempotent). Returns 0 or -1 with errno.
int cvdpa_interrupt_install(void);
/// Interrupts a blocking system call in `thread`. Returns pthread_kill's result.
int cvdpa_thread_interrupt(unsigned long thread);

#endif
