#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// What a thread may do to itself: sleep, ask for real-time priority.
public enum CurrentThread {
    /// Sleeps the calling thread (`MonotonicClock.sleep`: resumed after a signal until the time
    /// has passed): for a back-off after an error that a loop must not spin on.
    public static func sleep(milliseconds: UInt32) { MonotonicClock.sleep(seconds: Double(milliseconds) / 1000) }

    /// Asks for SCHED_FIFO at `priority` for the calling thread; throws when the process lacks
    /// the privilege (EPERM) or the priority is out of range.
    public static func setRealTimePriority(_ priority: Int32) throws(SystemError) {
        var param = sched_param(sched_priority: priority)
        let r = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param)
        // pthread functions return the error number instead of setting errno.
        guard r == 0 else { throw SystemError("pthread_setschedparam(SCHED_FIFO, \(priority))", errno: r) }
    }

    /// The calling thread's SCHED_FIFO priority, or nil when it runs under another policy.
    public static var realTimePriority: Int32? { ThreadScheduling.of(pthread_self())?.realTimePriority }

    /// Runs `body` at SCHED_FIFO `priority` and restores the thread's policy after; runs it as is
    /// when the process may not raise it (no CAP_SYS_NICE) or the thread is already real-time.
    /// For short stretches a frontend waits on (the reply to a LOG_ALL toggle): the threads it
    /// asks to act inherit the priority through `ConfinedWorker.perform`.
    public static func withRealTimePriority<R, E: Error>(_ priority: Int32, _ body: () throws(E) -> R) throws(E) -> R {
        let me = pthread_self()
        guard let saved = ThreadScheduling.of(me), saved.realTimePriority == nil,
              ThreadScheduling(policy: SCHED_FIFO, priority: priority).apply(to: me) else { return try body() }
        defer { _ = saved.apply(to: me) }
        return try body()
    }
}

/// A thread's scheduling policy and priority, read and applied through pthread_(get|set)schedparam.
public struct ThreadScheduling: Sendable, Equatable {
    public var policy: Int32
    public var priority: Int32

    public init(policy: Int32, priority: Int32) {
        self.policy = policy
        self.priority = priority
    }

    /// The priority when the policy is SCHED_FIFO or SCHED_RR, nil otherwise.
    public var realTimePriority: Int32? { policy == SCHED_FIFO || policy == SCHED_RR ? priority : nil }

    /// `thread`'s policy, or nil if it cannot be read (the thread has ended).
    public static func of(_ thread: pthread_t) -> ThreadScheduling? {
        var policy: Int32 = 0
        var param = sched_param()
        guard pthread_getschedparam(thread, &policy, &param) == 0 else { return nil }
        return ThreadScheduling(policy: policy, priority: param.sched_priority)
    }

    /// Applies it to `thread`; false when not permitted or the thread has ended.
    @discardableResult
    public func apply(to thread: pthread_t) -> Bool {
        var param = sched_param(sched_priority: priority)
        return pthread_setschedparam(thread, policy, &param) == 0
    }
}
