#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

public enum SocketError: Error, CustomStringConvertible, Equatable {
    /// The peer closed the connection (EOF), `partial` bytes into a read.
    case closed(partial: Int)
    /// The kernel truncated the ancillary data (more fds than room): every fd that did arrive was closed.
    case truncatedControl
    /// More fds arrived for one message (over several reads) than a message may carry.
    case tooManyFDs(Int)
    /// A path that does not fit in sockaddr_un.
    case pathTooLong(String)
    case system(SystemError)
    /// A deadline passed before the operation (`sendmsg`, `recvmsg`) was complete: the peer
    /// stopped reading, or stopped sending mid-message.
    case timedOut(operation: String, seconds: Double, done: Int, total: Int)
    /// The cancel fd became readable (the owner is stopping) while waiting on the peer.
    case cancelled

    public var description: String {
        switch self {
        case .closed(let n): return n == 0 ? "peer closed the connection" : "peer closed the connection after \(n) bytes of a message"
        case .truncatedControl: return "ancillary data truncated (too many fds); received fds closed"
        case .tooManyFDs(let n): return "\(n) fds for one message, more than \(UnixSocket.maxFDsPerMessage); received fds closed"
        case .pathTooLong(let p): return "socket path too long (max 107 bytes): \(p)"
        case .system(let e): return e.description
        case .timedOut(let op, let seconds, let done, let total):
            let verb = op == "sendmsg" ? "sent" : "received"
            return "\(op): deadline of \(seconds) s passed with \(done) of \(total) bytes \(verb)"
        case .cancelled: return "cancelled: the daemon is stopping"
        }
    }
}

/// Unix stream sockets that carry fds with SCM_RIGHTS.
public enum UnixSocket {
    /// Largest number of fds one vhost-user message may carry, plus slack so that an excess
    /// is seen (and its fds closed) rather than truncated silently.
    public static let maxFDsPerMessage = 16

    static func withAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) throws(SocketError) -> R {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else { throw .pathTooLong(path) }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    static func makeSocket(nonBlocking: Bool = false) throws(SocketError) -> FileDescriptor {
        let type = CVDPA_SOCK_STREAM | CVDPA_SOCK_CLOEXEC | (nonBlocking ? CVDPA_SOCK_NONBLOCK : 0)
        do {
            let raw = try syscallRetrying("socket") { socket(AF_UNIX, Int32(type), 0) }
            return FileDescriptor(owning: raw)
        } catch { throw .system(error) }
    }

    /// Binds and listens on `path`. The caller decides beforehand what to do with an existing file.
    public static func listen(path: String, backlog: Int32 = 8) throws(SocketError) -> FileDescriptor {
        let fd = try makeSocket()
        let r = try withAddress(path) { addr, len in bind(fd.raw, addr, len) }
        if r < 0 { throw .system(SystemError("bind(\(path))", errno: cvdpa_errno())) }
        if Glibc.listen(fd.raw, backlog) < 0 { throw .system(SystemError("listen(\(path))", errno: cvdpa_errno())) }
        return fd
    }

    /// Connects to the listener at `path`. With `nonBlocking`, a listener whose backlog is full
    /// (one that never accepts) fails at once with EAGAIN instead of holding the caller until it
    /// accepts; a unix connect either completes at once or fails, so there is nothing to wait for.
    /// The returned fd is in blocking mode either way.
    public static func connect(path: String, nonBlocking: Bool = false) throws(SocketError) -> FileDescriptor {
        let fd = try makeSocket(nonBlocking: nonBlocking)
        while true {
            let r = try withAddress(path) { addr, len in connectRaw(fd.raw, addr, len) }
            if r == 0 { break }
            let e = cvdpa_errno()
            if e == EINTR { continue }
            throw .system(SystemError("connect(\(path))", errno: e))
        }
        if nonBlocking {
            do { try setBlocking(fd, true) } catch { throw .system(error) }
        }
        return fd
    }

    @inline(never)
    static func connectRaw(_ fd: Int32, _ addr: UnsafePointer<sockaddr>, _ len: socklen_t) -> Int32 {
        Glibc.connect(fd, addr, len)
    }

    /// Sets or clears O_NONBLOCK.
    public static func setBlocking(_ fd: borrowing FileDescriptor, _ blocking: Bool) throws(SystemError) {
        let flags = try syscallRetrying("fcntl(F_GETFL)") { fcntl(fd.raw, F_GETFL) }
        let wanted = blocking ? flags & ~O_NONBLOCK : flags | O_NONBLOCK
        if wanted != flags { try syscallRetrying("fcntl(F_SETFL)") { fcntl(fd.raw, F_SETFL, wanted) } }
    }

    /// Waits until `fd` has `events` (POLLIN or POLLOUT) ready, the deadline passes (throws
    /// `.timedOut` with `done`/`total` for the message), or `cancel` becomes readable (throws
    /// `.cancelled`).
    static func waitReady(_ fd: Int32, events: Int16, deadline: Deadline, cancel: Int32?,
                          operation: String, done: Int, total: Int) throws(SocketError) {
        // A negative fd in the second slot is ignored by poll (no cancel fd).
        var pfds = [pollfd(fd: fd, events: events, revents: 0), pollfd(fd: cancel ?? -1, events: Int16(POLLIN), revents: 0)]
        while true {
            let left = deadline.remainingMillis
            if left == 0 { throw .timedOut(operation: operation, seconds: deadline.budgetSeconds, done: done, total: total) }
            let r = pollRaw(&pfds, left)
            if r < 0 {
                let e = cvdpa_errno()
                if e == EINTR { continue }
                throw .system(SystemError("poll", errno: e))
            }
            if pfds[1].revents != 0 { throw .cancelled }
            // Readiness, or an error/hangup that the next call reports with its errno.
            if pfds[0].revents != 0 { return }
        }
    }

    // Safety: `&pfds` passes the array's storage for the duration of the call only.
    @inline(never)
    static func pollRaw(_ pfds: inout [pollfd], _ timeout: Int32) -> Int32 {
        poll(&pfds, nfds_t(pfds.count), timeout)
    }

    public static func accept(_ listener: borrowing FileDescriptor) throws(SystemError) -> FileDescriptor {
        let raw = try syscallRetrying("accept4") { cvdpa_accept4(listener.raw, Int32(CVDPA_SOCK_CLOEXEC)) }
        return FileDescriptor(owning: raw)
    }

    /// Sets SO_RCVTIMEO so that a peer that stops mid-message cannot hold a reader forever: a
    /// blocking receive then fails with EAGAIN after `seconds` (at least 1 ms; 0 would mean never).
    public static func setReceiveTimeout(_ fd: borrowing FileDescriptor, seconds: Double) throws(SystemError) {
        let s = seconds.isNaN ? 0.001 : min(max(seconds, 0.001), Double(Int32.max))
        let whole = s.rounded(.down)
        var tv = timeval(tv_sec: Int(whole), tv_usec: Int((s - whole) * 1_000_000))
        try syscallRetrying("setsockopt(SO_RCVTIMEO)") {
            setsockopt(fd.raw, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        }
    }

    /// Shuts the connection down in both directions (the fd stays open): the peer reads EOF.
    /// ENOTCONN (the peer had already gone) is thrown like any other failure.
    public static func shutdown(_ fd: borrowing FileDescriptor) throws(SystemError) {
        try syscallRetrying("shutdown") { Glibc.shutdown(fd.raw, Int32(SHUT_RDWR)) }
    }

    /// What a connected socket shows without reading anything.
    public enum PeerState: Equatable, Sendable {
        /// Bytes wait to be read.
        case dataWaiting
        /// Nothing to read now; the peer is still connected.
        case quiet
        /// The peer closed or reset the connection.
        case closed
    }

    /// Looks at the socket without taking anything from it (one byte peeked, non-blocking).
    public static func peerState(_ fd: borrowing FileDescriptor) throws(SystemError) -> PeerState {
        var byte: UInt8 = 0
        while true {
            let n = recvRaw(fd.raw, &byte, 1, Int32(MSG_PEEK) | Int32(CVDPA_MSG_DONTWAIT))
            if n > 0 { return .dataWaiting }
            if n == 0 { return .closed }
            let e = cvdpa_errno()
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return .quiet }
            if e == ECONNRESET || e == EPIPE { return .closed }
            throw SystemError("recv(MSG_PEEK)", errno: e)
        }
    }
}
