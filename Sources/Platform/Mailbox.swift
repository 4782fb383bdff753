import Dispatch
import Synchronization

/// Control operations for a thread that owns its state (the DMA engine, the relay): callers post
/// a closure and wait until the thread has run it between two units of its own work. Once the
/// thread has ended (`close`), posting fails at once instead of waiting forever, and closures
/// that were still queued are released without running.
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
    /// Set when a post timed out, cleared when the owner drains again: while the owner is stuck,
    /// further posts fail at once instead of each waiting out its timeout.
    private let stuck = Atomic<Bool>(false)
    /// Signalled for every post: the owner thread sleeps on it with its other events.
    public let wake: SharedFD

    public init() throws(SystemError) { wake = SharedFD(try EventFD.make()) }

    /// Runs `body` on the owner thread and waits for it, at most `timeoutSeconds` (owners apply
    /// posts between batches of microseconds). Returns false when the owner thread has ended
    /// (`body` not run) or did not get to it in time (then it may still run later): a wedged owner
    /// never holds its caller for long, and once one post timed out the next fail at once until
    /// the owner drains again.
    @discardableResult
    public func perform(timeoutSeconds: Double = 2, _ body: @escaping @Sendable (Target) -> Void) -> Bool {
        if stuck.load(ordering: .acquiring) { return false }
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
        guard ticket.done.wait(timeout: .now() + timeoutSeconds) == .success else {
            stuck.store(true, ordering: .releasing)
            return false
        }
        return ticket.ran.load(ordering: .acquiring)
    }

    /// Whether something was posted since the last `drain` (owner thread, once per loop).
    public var hasPending: Bool { pending.load(ordering: .acquiring) }

    /// Runs what was posted (owner thread).
    public func drain(_ target: Target) {
        pending.store(false, ordering: .relaxed)
        stuck.store(false, ordering: .releasing)
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
    }

    /// The owner thread is ending: later posts fail at once; queued ones are released unrun.
    public func close() {
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
