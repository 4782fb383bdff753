#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import Dispatch
import Synchronization

/// Control operations for a thread that owns its state: callers post a closure and wait until the
/// thread has run it between two units of its own work. `ConfinedWorker` (the DMA engine's and the
/// relay's thread) is built on it; use that rather than a mailbox and a thread of one's own.
///
/// No caller waits forever. Once the owner thread has ended (`close`), posting fails at once and
/// closures still queued are released without running. An owner that does not get to a post in
/// time is taken to be blocked in a system call on a frontend's fd (one the frontend made
/// blocking again after handing it over): it is interrupted (a signal without SA_RESTART, so the
/// call returns EINTR and the owner gives up on it), and the caller waits once more. If it still
/// does not answer, the post fails, and later posts fail at once until the owner drains again.
public final class Mailbox<Target: AnyObject>: Sendable {
    private final class Ticket: Sendable {
        let done = DispatchSemaphore(value: 0)
        let ran = Atomic<Bool>(false)
    }
    private struct Queue {
        var items: [(@Sendable (Target) -> Void, Ticket)] = []
        var closed = false
    }
    private let queue = Mutex(Queue())
    private let pending = Atomic<Bool>(false)
    /// Completed drain passes, and the pass count at which a post last gave up: while they are
    /// equal the owner has made no progress since, and posts fail at once.
    private let drains = Atomic<UInt64>(0)
    private let gaveUpAt = Atomic<UInt64>(.max)
    /// The owner's pthread (0 until `ownerStarted`).
    private let owner = Atomic<UInt>(0)
    /// Set when the owner was interrupted; the owner takes it (`takeInterrupted`) before it drains.
    private let interrupted = Atomic<Bool>(false)
    /// Signalled for every post: the owner thread sleeps on it with its other events.
    public let wake: SharedFD

    public init() throws(SystemError) {
        guard cvdpa_interrupt_install() == 0 else { throw SystemError("sigaction(interrupt)", errno: cvdpa_errno()) }
        wake = SharedFD(try EventFD.make())
    }

    /// Called by the owner thread when it starts, so that a stuck owner can be interrupted.
    public func ownerStarted() { owner.store(UInt(pthread_self()), ordering: .releasing) }

    /// Runs `body` on the owner thread and waits for it: at most `timeoutSeconds`, then the owner
    /// is interrupted and given as long again (owners apply posts between batches that take
    /// microseconds). Returns false when the owner has ended (`body` not run) or did not answer
    /// (`body` may still run later; the caller must treat the operation as failed).
    @discardableResult
    public func perform(timeoutSeconds: Double = 1, _ body: @escaping @Sendable (Target) -> Void) -> Bool {
        // Priority inheritance: a real-time caller (the port thread answering a LOG_ALL toggle,
        // see CurrentThread.withRealTimePriority) lends its priority to the owner until the post
        // has run, so that an owner waiting for a CPU behind other threads runs it at once.
        let boost = inheritPriority()
        defer { if let boost { _ = boost.saved.apply(to: boost.thread) } }
        let drainsBefore = drains.load(ordering: .acquiring)
        if gaveUpAt.load(ordering: .acquiring) == drainsBefore {
            // Still stuck since the last give-up: fail at once, but interrupt the owner again (it
            // may have blocked anew after the last interrupt).
            interruptOwner()
            return false
        }
        let ticket = Ticket()
        let queued = queue.withLock { q -> Bool in
            guard !q.closed else { return false }
            q.items.append((body, ticket))
            return true
        }
        guard queued else { return false }
        // Release pairs with the owner's acquire in `hasPending`: it then sees the queued item.
        pending.store(true, ordering: .releasing)
        EventFD.signal(wake.raw)
        if ticket.done.wait(timeout: .now() + timeoutSeconds) == .success { return ticket.ran.load(ordering: .acquiring) }
        interruptOwner()
        if ticket.done.wait(timeout: .now() + timeoutSeconds) == .success { return ticket.ran.load(ordering: .acquiring) }
        // Stuck since before this post (compared with the count read before posting, so a drain
        // that happens right now is seen as progress, not mistaken for none).
        gaveUpAt.store(drainsBefore, ordering: .releasing)
        return false
    }

    /// Raises the owner to the caller's real-time priority if the caller has one and the owner's
    /// is lower; returns what to restore (nil: nothing changed).
    private func inheritPriority() -> (thread: pthread_t, saved: ThreadScheduling)? {
        let ownerThread = owner.load(ordering: .acquiring)
        guard ownerThread != 0, let mine = CurrentThread.realTimePriority else { return nil }
        let thread = pthread_t(ownerThread)
        guard let saved = ThreadScheduling.of(thread), (saved.realTimePriority ?? 0) < mine,
              ThreadScheduling(policy: SCHED_FIFO, priority: mine).apply(to: thread) else { return nil }
        return (thread, saved)
    }

    /// Interrupts the owner thread out of a blocking system call (it then takes `takeInterrupted`
    /// before it drains); nothing happens before `ownerStarted`.
    public func interruptOwner() {
        let thread = owner.load(ordering: .acquiring)
        guard thread != 0 else { return }
        interrupted.store(true, ordering: .releasing)
        _ = cvdpa_thread_interrupt(thread)
    }

    /// Whether the owner was interrupted since it last asked (owner thread, before `drain`): it
    /// should then stop using the fds that blocked it.
    public func takeInterrupted() -> Bool { interrupted.exchange(false, ordering: .acquiring) }

    /// Whether something was posted since the last `drain` (owner thread, once per loop).
    public var hasPending: Bool { pending.load(ordering: .acquiring) }

    /// Runs what was posted (owner thread).
    public func drain(_ target: Target) {
        pending.store(false, ordering: .relaxed)
        let items = queue.withLock { q -> [(@Sendable (Target) -> Void, Ticket)] in
            let w = q.items
            q.items.removeAll()
            return w
        }
        for (body, ticket) in items {
            body(target)
            ticket.ran.store(true, ordering: .releasing)
            ticket.done.signal()
        }
        // Counted after the items ran: a caller that gave up while one of them was blocked sees
        // progress only once the owner is free again.
        drains.add(1, ordering: .releasing)
    }

    /// The owner thread is ending: later posts fail at once; queued ones are released unrun.
    public func close() {
        // No interrupt may be aimed at this thread once it has ended (its id can be reused).
        owner.store(0, ordering: .releasing)
        let items = queue.withLock { q -> [(@Sendable (Target) -> Void, Ticket)] in
            q.closed = true
            let w = q.items
            q.items.removeAll()
            return w
        }
        for (_, ticket) in items { ticket.done.signal() }
    }

    public var isClosed: Bool { queue.withLock { $0.closed } }
}
