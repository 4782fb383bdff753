#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// An epoll instance with a preallocated event buffer, so waiting allocates nothing.
public struct Epoll: ~Copyable {
    public struct Event: Sendable {
        public let token: UInt64
        public let events: UInt32
        public var readable: Bool { events & (CVDPA_EPOLLIN | CVDPA_EPOLLHUP | CVDPA_EPOLLERR) != 0 }
        public var writable: Bool { events & CVDPA_EPOLLOUT != 0 }
        public var hangup: Bool { events & (CVDPA_EPOLLHUP | CVDPA_EPOLLERR | CVDPA_EPOLLRDHUP) != 0 }
    }

    public static let readable: UInt32 = CVDPA_EPOLLIN
    public static let readHangup: UInt32 = CVDPA_EPOLLRDHUP
    public static let writable: UInt32 = CVDPA_EPOLLOUT

    private let fd: FileDescriptor
    private let buffer: UnsafeMutablePointer<epoll_event>
    private let capacity: Int

    public init(capacity: Int = 64) throws(SystemError) {
        let raw = try syscallRetrying("epoll_create1") { epoll_create1(Int32(EPOLL_CLOEXEC)) }
        fd = FileDescriptor(owning: raw)
        self.capacity = capacity
        buffer = .allocate(capacity: capacity)
    }

    deinit { buffer.deallocate() }

    public func add(_ target: Int32, events: UInt32 = CVDPA_EPOLLIN, token: UInt64) throws(SystemError) {
        var ev = epoll_event()
        ev.events = events
        ev.data.u64 = token
        try syscallRetrying("epoll_ctl(ADD)") { epoll_ctl(fd.raw, EPOLL_CTL_ADD, target, &ev) }
    }

    /// Changes the events watched on `target` (and its token).
    public func modify(_ target: Int32, events: UInt32, token: UInt64) throws(SystemError) {
        var ev = epoll_event()
        ev.events = events
        ev.data.u64 = token
        try syscallRetrying("epoll_ctl(MOD)") { epoll_ctl(fd.raw, EPOLL_CTL_MOD, target, &ev) }
    }

    public func remove(_ target: Int32) {
        // Fails only when `target` is not watched (ENOENT) or not open (EBADF). Callers remove an
        // fd before they close it, so neither happens in this tree; there is nothing to report.
        _ = epoll_ctl(fd.raw, EPOLL_CTL_DEL, target, nil)
    }

    /// Waits up to `timeoutMillis` (-1 = forever) and calls `body` for each ready event.
    /// Returns the number of events. EINTR counts as zero events.
    @discardableResult
    public func wait(timeoutMillis: Int32, _ body: (Event) throws -> Void) throws -> Int {
        let n = epoll_wait(fd.raw, buffer, Int32(capacity), timeoutMillis)
        if n < 0 {
            let e = cvdpa_errno()
            if e == EINTR { return 0 }
            throw SystemError("epoll_wait", errno: e)
        }
        for i in 0..<Int(n) {
            try body(Event(token: buffer[i].data.u64, events: buffer[i].events))
        }
        return Int(n)
    }
}
