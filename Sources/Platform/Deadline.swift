/// A point on the monotonic clock by which something must be done, with the budget it was
/// given (for messages that say how long was allowed).
public struct Deadline: Sendable {
    public let nanos: UInt64
    public let budgetSeconds: Double

    public init(secondsFromNow seconds: Double) {
        budgetSeconds = seconds
        nanos = MonotonicClock.nanoseconds &+ UInt64(seconds * 1e9)
    }

    /// Milliseconds left, rounded up so that a poll does not return just before the deadline;
    /// 0 once it has passed.
    public var remainingMillis: Int32 {
        let now = MonotonicClock.nanoseconds
        guard now < nanos else { return 0 }
        return Int32(clamping: (nanos - now + 999_999) / 1_000_000)
    }

    public var hasPassed: Bool { MonotonicClock.nanoseconds >= nanos }
}
