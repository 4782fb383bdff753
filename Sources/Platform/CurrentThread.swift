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
}
