#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// The monotonic clock (CLOCK_MONOTONIC): time stamps and sleeps that wall-clock changes do not move.
public enum MonotonicClock {
    /// Nanoseconds since an arbitrary start (boot); only differences mean anything.
    public static var nanoseconds: UInt64 { cvdpa_monotonic_ns() }

    /// Sleeps the calling thread for `seconds` (negative or NaN: not at all). A signal does not
    /// cut it short: nanosleep is resumed with the time it reports left.
    public static func sleep(seconds: Double) {
        guard seconds > 0 else { return }
        let whole = min(seconds.rounded(.down), Double(Int32.max))
        var request = timespec(tv_sec: Int(whole), tv_nsec: Int((seconds - whole) * 1e9))
        var left = timespec()
        // nanosleep fails only with EINTR (resumed here), EFAULT or EINVAL (impossible with these
        // locals and tv_nsec below 1e9), so there is no error to report.
        while nanosleep(&request, &left) != 0 && cvdpa_errno() == EINTR { request = left }
    }
}
