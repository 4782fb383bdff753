#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// eventfd helpers: create, signal, drain. Used for kicks, calls and wake-ups.
public enum EventFD {
    public static func make(nonBlocking: Bool = true) throws(SystemError) -> FileDescriptor {
        var flags = CVDPA_EFD_CLOEXEC
        if nonBlocking { flags |= CVDPA_EFD_NONBLOCK }
        let raw = try syscallRetrying("eventfd") { eventfd(0, Int32(flags)) }
        return FileDescriptor(owning: raw)
    }

    /// Adds 1 to the counter. An eventfd whose counter is saturated (EAGAIN) is already signalled.
    @inline(never)
    public static func signal(_ fd: Int32) {
        var one: UInt64 = 1
        while write(fd, &one, 8) < 0 && cvdpa_errno() == EINTR {}
    }

    /// Reads and clears the counter; returns 0 when it was not signalled (non-blocking fd).
    @inline(never)
    @discardableResult
    public static func drain(_ fd: Int32) -> UInt64 {
        var value: UInt64 = 0
        while true {
            let r = read(fd, &value, 8)
            if r == 8 { return value }
            if r < 0 && cvdpa_errno() == EINTR { continue }
            return 0
        }
    }
}
