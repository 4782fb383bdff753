#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// poll(2) on one fd, for waits outside an epoll loop (a test frontend, the daemon's main thread).
public enum Poll {
    /// Readable (POLLIN). Errors and hang-ups are always reported.
    public static let readable = Int16(POLLIN)
    /// Room to write (POLLOUT).
    public static let writable = Int16(POLLOUT)
    /// The peer shut down its writing side (POLLRDHUP, hidden by Glibc without _GNU_SOURCE).
    public static let peerClosed = Int16(0x2000)

    /// Waits until `fd` has one of `events`, an error or a hang-up, or `deadline` passes (nil: no
    /// limit). Returns the events that came (never 0), or nil when the deadline passed first. The
    /// fd is polled at least once, so a deadline already past asks "is it ready now?". EINTR is
    /// retried with the time left.
    public static func wait(_ fd: Int32, for events: Int16 = readable, until deadline: Deadline?) throws(SystemError) -> Int16? {
        var pfd = pollfd(fd: fd, events: events, revents: 0)
        while true {
            let left = deadline?.remainingMillis ?? -1
            let r = pollRaw(&pfd, left)
            if r > 0 { return pfd.revents }
            if r == 0 {
                // remainingMillis rounds up, so poll may end a hair before the deadline: go again.
                if left == 0 || deadline?.hasPassed ?? false { return nil }
                continue
            }
            let e = cvdpa_errno()
            if e == EINTR { continue }
            throw SystemError("poll", errno: e)
        }
    }

    /// Whether `fd` becomes readable (or hangs up) by `deadline` (nil: waits as long as it takes).
    public static func waitReadable(_ fd: Int32, until deadline: Deadline?) throws(SystemError) -> Bool {
        try wait(fd, for: readable, until: deadline) != nil
    }

    // Safety: `&pfd` points at the caller's local pollfd for the duration of the call only.
    @inline(never)
    static func pollRaw(_ pfd: inout pollfd, _ timeout: Int32) -> Int32 {
        poll(&pfd, 1, timeout)
    }
}
