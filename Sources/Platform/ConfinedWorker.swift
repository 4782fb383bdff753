import Dispatch
import Synchronization

/// State that one `ConfinedWorker` thread owns, and the loop that thread runs.
public protocol ConfinedTarget: AnyObject, Sendable {
    /// The thread's loop. It runs until `worker.stopRequested`, and between two units of its own
    /// work it calls `worker.runPending(self)` whenever `worker.hasPending` (and sleeps on
    /// `worker.wake` with its other events, so that a post wakes it). When it returns, the worker
    /// refuses every later operation.
    func run(on worker: ConfinedWorker<Self>)
    /// Called on the owner thread before it runs posted operations, when it was interrupted out
    /// of a system call since the last time (it was blocked on a frontend's fd that the frontend
    /// made blocking again after handing it over): it should stop using every fd that can block.
    func quarantineBlockingFDs()
}

/// Why `ConfinedWorker.perform` did not run an operation.
public enum WorkerError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The thread has ended, or `stop` was called: nothing runs on it any more.
    case stopped
    /// The thread did not get to the operation in time, even after it was interrupted. The
    /// operation may still run later (on the owner thread, like any other); the caller must treat
    /// it as failed. Later operations fail at once until the thread makes progress again.
    case unresponsive

    public var description: String {
        switch self {
        case .stopped: "its thread has stopped"
        case .unresponsive: "its thread does not answer (blocked on a frontend's fd?)"
        }
    }
}

/// One thread that owns a target's state (the DMA engine, the relay) and runs control operations
/// on it between two units of its own work: the thread, its `Mailbox`, the stop flag, and the
/// bounded stop. Every wait is bounded as `Mailbox` describes (a timeout, then an interrupt of
/// the stuck thread with a real-time signal and as long again, then failure; fail-fast until the
/// thread drains again; `quarantineBlockingFDs` after an interrupt).
public final class ConfinedWorker<Target: ConfinedTarget>: Sendable {
    private let mailbox: Mailbox<Target>
    private let thread = Mutex<OSThread?>(nil)
    /// Whether `start` made a thread (which closes the mailbox when its loop ends).
    private let started = Atomic<Bool>(false)
    /// Signalled once by the thread when its loop has returned.
    private let ended = DispatchSemaphore(value: 0)
    /// Set by `stop`, read by the loop: it ends at its next check.
    private let stopFlag = Atomic<Bool>(false)
    /// Set once `stop` was called (whatever its outcome): `perform` then fails at once.
    private let stopCalled = Atomic<Bool>(false)
    /// The thread's name (at most 15 bytes are kept by the kernel).
    public let name: String
    /// How long `perform` waits before it interrupts the thread, and once more after.
    public let timeoutSeconds: Double
    /// Signalled for every post: the owner sleeps on it with its other events.
    public var wake: SharedFD { mailbox.wake }

    public init(name: String, timeoutSeconds: Double = 1) throws(SystemError) {
        self.name = name
        self.timeoutSeconds = timeoutSeconds
        mailbox = try Mailbox()
    }

    /// Starts the thread, which runs `target.run(on:)`. Call once.
    public func start(_ target: Target) throws(SystemError) {
        let t = try OSThread(name: name) { [self] in
            mailbox.ownerStarted()
            target.run(on: self)
            mailbox.close()
            ended.signal()
        }
        // The thread is stored before `started` is set: a stop that sees `started` finds it.
        thread.withLock { $0 = t }
        started.store(true, ordering: .releasing)
    }

    /// Runs `body` on the owner thread between two units of its work, waits for it and returns its
    /// value. Throws `.stopped` at once when the thread has ended or `stop` was called, and
    /// `.unresponsive` when the thread did not answer (see `WorkerError`).
    public func perform<R: Sendable>(_ body: @escaping @Sendable (Target) -> R) throws(WorkerError) -> R {
        guard !stopCalled.load(ordering: .acquiring) else { throw .stopped }
        let result = Mutex<R?>(nil)
        let ran = mailbox.perform(timeoutSeconds: timeoutSeconds) { target in
            let value = body(target)
            result.withLock { $0 = value }
        }
        // `ran` is true only after the body stored its value (Mailbox releases after running it).
        guard ran, let value = result.withLock({ $0.take() }) else {
            throw mailbox.isClosed ? .stopped : .unresponsive
        }
        return value
    }

    /// Stops the thread: sets the stop flag (the loop ends at its next check; operations still
    /// queued are released unrun and fail as `.stopped`), wakes it, and waits for its loop to end,
    /// then joins it. Bounded like `perform`: after `timeoutSeconds` the thread is interrupted (out
    /// of a system call blocked on a frontend's fd) and given as long again; one that still has not
    /// ended is abandoned (it ends at its next check, or with the process) and the result is
    /// false: the caller should say so loudly. A later `stop` waits for it again. Operations fail
    /// at once from the moment `stop` is called.
    @discardableResult
    public func stop() -> Bool {
        stopCalled.store(true, ordering: .releasing)
        stopFlag.store(true, ordering: .releasing)
        guard started.load(ordering: .acquiring) else {
            // Never started: no thread will close the mailbox.
            mailbox.close()
            return true
        }
        guard let t = thread.withLock({ $0 }) else { return true }  // already stopped and joined
        EventFD.signal(mailbox.wake.raw)
        if ended.wait(timeout: .now() + timeoutSeconds) != .success {
            mailbox.interruptOwner()
            guard ended.wait(timeout: .now() + timeoutSeconds) == .success else { return false }
        }
        ended.signal()  // it stays ended: let any other waiting stop through too
        // Joined once: a concurrent or later stop finds no thread.
        if thread.withLock({ $0.take() }) != nil { t.join() }
        return true
    }

    // MARK: the owner thread

    /// Whether the loop should end (owner thread; set by `stop`).
    public var stopRequested: Bool { stopFlag.load(ordering: .acquiring) }

    /// Whether operations were posted since the last `runPending` (owner thread, once per pass).
    public var hasPending: Bool { mailbox.hasPending }

    /// Runs the posted operations (owner thread), after `target.quarantineBlockingFDs()` if the
    /// thread was interrupted since the last time.
    public func runPending(_ target: Target) {
        if mailbox.takeInterrupted() { target.quarantineBlockingFDs() }
        mailbox.drain(target)
    }
}
