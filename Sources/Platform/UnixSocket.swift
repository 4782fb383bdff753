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

    /// Sends all of `bytes`, with `fds` attached to the first segment. Blocks while the peer does
    /// not read: daemon threads use `send(_:bytes:fds:deadline:cancel:)` instead.
    public static func send(_ fd: borrowing FileDescriptor, bytes: UnsafeRawBufferPointer, fds: [Int32] = []) throws(SocketError) {
        try sendAll(fd, bytes: bytes, fds: fds, deadline: nil, cancel: nil)
    }

    /// Sends all of `bytes` (fds attached to the first segment) by `deadline`, never blocking in
    /// the kernel: a peer that does not read its replies gets `.timedOut`, and `cancel` becoming
    /// readable ends the wait with `.cancelled`.
    public static func send(_ fd: borrowing FileDescriptor, bytes: UnsafeRawBufferPointer, fds: [Int32] = [],
                            deadline: Deadline, cancel: Int32? = nil) throws(SocketError) {
        try sendAll(fd, bytes: bytes, fds: fds, deadline: deadline, cancel: cancel)
    }

    /// Sends a whole byte array by `deadline` (see `send(_:bytes:fds:deadline:cancel:)`).
    public static func send(_ fd: borrowing FileDescriptor, _ data: [UInt8], fds: [Int32] = [],
                            deadline: Deadline, cancel: Int32? = nil) throws(SocketError) {
        var result: SocketError?
        // Safety: `bytes` is used only inside the closure; sendAll does not keep the pointer.
        data.withUnsafeBytes { bytes in
            do throws(SocketError) { try sendAll(fd, bytes: bytes, fds: fds, deadline: deadline, cancel: cancel) } catch { result = error }
        }
        if let result { throw result }
    }

    /// Sends what the socket takes now without blocking; returns the number of bytes sent
    /// (0 when the peer's buffer is full).
    public static func sendAvailable(_ fd: borrowing FileDescriptor, bytes: UnsafeRawBufferPointer) throws(SocketError) -> Int {
        while true {
            let r = sendRaw(fd.raw, bytes.baseAddress, bytes.count, Int32(CVDPA_MSG_NOSIGNAL | CVDPA_MSG_DONTWAIT))
            if r >= 0 { return r }
            let e = cvdpa_errno()
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return 0 }
            throw .system(SystemError("send", errno: e))
        }
    }

    /// Sends what the socket takes now of `data` without blocking (see `sendAvailable(_:bytes:)`).
    public static func sendAvailable(_ fd: borrowing FileDescriptor, _ data: [UInt8]) throws(SocketError) -> Int {
        var result: Result<Int, SocketError> = .success(0)
        // Safety: `bytes` is used only inside the closure; one send() call, pointer not kept.
        data.withUnsafeBytes { bytes in
            do throws(SocketError) { result = .success(try sendAvailable(fd, bytes: bytes)) } catch { result = .failure(error) }
        }
        return try result.get()
    }

    /// Receives what is there now without blocking: nil when nothing is (EAGAIN), 0 at EOF.
    /// Fds a peer attaches are discarded by the kernel (no control buffer is passed).
    public static func receiveAvailable(_ fd: borrowing FileDescriptor, into buffer: UnsafeMutableRawBufferPointer) throws(SocketError) -> Int? {
        while true {
            let r = recvRaw(fd.raw, buffer.baseAddress, buffer.count, Int32(CVDPA_MSG_DONTWAIT))
            if r >= 0 { return r }
            let e = cvdpa_errno()
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return nil }
            throw .system(SystemError("recv", errno: e))
        }
    }

    @inline(never)
    static func recvRaw(_ fd: Int32, _ p: UnsafeMutableRawPointer?, _ n: Int, _ flags: Int32) -> Int {
        recv(fd, p, n, flags)
    }

    @inline(never)
    static func sendRaw(_ fd: Int32, _ p: UnsafeRawPointer?, _ n: Int, _ flags: Int32) -> Int {
        Glibc.send(fd, p, n, flags)
    }

    static func sendAll(_ fd: borrowing FileDescriptor, bytes: UnsafeRawBufferPointer, fds: [Int32],
                        deadline: Deadline?, cancel: Int32?) throws(SocketError) {
        let flags = Int32(CVDPA_MSG_NOSIGNAL | (deadline == nil ? 0 : CVDPA_MSG_DONTWAIT))
        var sent = 0
        let controlLength = fds.isEmpty ? 0 : cvdpa_cmsg_space(fds.count * 4)
        let control = UnsafeMutableRawPointer.allocate(byteCount: max(controlLength, 1), alignment: 8)
        defer { control.deallocate() }
        control.initializeMemory(as: UInt8.self, repeating: 0, count: max(controlLength, 1))
        while sent < bytes.count || (sent == 0 && bytes.count == 0) {
            let remaining = bytes.count - sent
            var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress.map { $0 + sent }), iov_len: remaining)
            let r: Int = withUnsafeMutablePointer(to: &iov) { iovp in
                var msg = msghdr()
                msg.msg_iov = iovp
                msg.msg_iovlen = 1
                if sent == 0 && !fds.isEmpty {
                    msg.msg_control = control
                    msg.msg_controllen = controlLength
                    if let c = cvdpa_cmsg_firsthdr(&msg) {
                        c.pointee.cmsg_level = SOL_SOCKET
                        c.pointee.cmsg_type = Int32(CVDPA_SCM_RIGHTS)
                        c.pointee.cmsg_len = cvdpa_cmsg_len(fds.count * 4)
                        let data = UnsafeMutableRawPointer(cvdpa_cmsg_data(c)!)
                        for (i, f) in fds.enumerated() { data.storeBytes(of: f, toByteOffset: i * 4, as: Int32.self) }
                    }
                }
                return sendmsgRaw(fd.raw, &msg, flags)
            }
            if r < 0 {
                let e = cvdpa_errno()
                if e == EINTR { continue }
                if let deadline, e == EAGAIN || e == EWOULDBLOCK {
                    try waitReady(fd.raw, events: Int16(POLLOUT), deadline: deadline, cancel: cancel,
                                  operation: "sendmsg", done: sent, total: bytes.count)
                    continue
                }
                throw .system(SystemError("sendmsg", errno: e))
            }
            sent += r
            if bytes.count == 0 { break }
        }
    }

    @inline(never)
    static func sendmsgRaw(_ fd: Int32, _ msg: UnsafePointer<msghdr>, _ flags: Int32) -> Int {
        sendmsg(fd, msg, flags)
    }

    /// Sends a whole byte array (see `send(_:bytes:fds:)`).
    public static func send(_ fd: borrowing FileDescriptor, _ data: [UInt8], fds: [Int32] = []) throws(SocketError) {
        var result: SocketError?
        data.withUnsafeBytes { bytes in
            do throws(SocketError) { try send(fd, bytes: bytes, fds: fds) } catch { result = error }
        }
        if let result { throw result }
    }

    /// Receives up to `buffer.count` bytes once (one recvmsg), taking ownership of any fds that
    /// came with them. A truncated control message closes every fd that arrived and throws.
    /// Returns 0 bytes only when the peer closed the connection.
    public static func receive(_ fd: borrowing FileDescriptor, into buffer: UnsafeMutableRawBufferPointer,
                               fds: inout ReceivedFDs) throws(SocketError) -> Int {
        try receiveOnce(fd, into: buffer, fds: &fds, dontWait: false)
    }

    /// One recvmsg; with `dontWait`, EAGAIN (nothing there yet) is thrown as `.system`.
    static func receiveOnce(_ fd: borrowing FileDescriptor, into buffer: UnsafeMutableRawBufferPointer,
                            fds: inout ReceivedFDs, dontWait: Bool) throws(SocketError) -> Int {
        let flags = Int32(CVDPA_MSG_CMSG_CLOEXEC | (dontWait ? CVDPA_MSG_DONTWAIT : 0))
        let controlLength = cvdpa_cmsg_space(maxFDsPerMessage * 4)
        let control = UnsafeMutableRawPointer.allocate(byteCount: controlLength, alignment: 8)
        defer { control.deallocate() }
        while true {
            var iov = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
            var got: [Int32] = []
            var truncated = false
            let r: Int = withUnsafeMutablePointer(to: &iov) { iovp in
                var msg = msghdr()
                msg.msg_iov = iovp
                msg.msg_iovlen = 1
                msg.msg_control = control
                msg.msg_controllen = controlLength
                let n = recvmsgRaw(fd.raw, &msg, flags)
                if n < 0 { return n }
                truncated = (msg.msg_flags & Int32(CVDPA_MSG_CTRUNC)) != 0
                var c = cvdpa_cmsg_firsthdr(&msg)
                while let h = c {
                    if h.pointee.cmsg_level == SOL_SOCKET && h.pointee.cmsg_type == Int32(CVDPA_SCM_RIGHTS) {
                        let headerLength = cvdpa_cmsg_len(0)
                        let count = (Int(h.pointee.cmsg_len) - headerLength) / 4
                        let data = UnsafeRawPointer(cvdpa_cmsg_data(h)!)
                        for i in 0..<max(count, 0) { got.append(data.load(fromByteOffset: i * 4, as: Int32.self)) }
                    }
                    c = cvdpa_cmsg_nxthdr(&msg, h)
                }
                return n
            }
            if r < 0 {
                let e = cvdpa_errno()
                if e == EINTR { continue }
                throw .system(SystemError("recvmsg", errno: e))
            }
            if truncated {
                for f in got { _ = close(f) }
                throw .truncatedControl
            }
            fds.adopt(got)
            // A message read in many small pieces could otherwise bring 16 fds with each piece
            // and exhaust the daemon's fds (every port would suffer): the message's total is capped.
            if fds.count > maxFDsPerMessage {
                let n = fds.count
                fds.closeAll()
                throw .tooManyFDs(n)
            }
            return r
        }
    }

    @inline(never)
    static func recvmsgRaw(_ fd: Int32, _ msg: UnsafeMutablePointer<msghdr>, _ flags: Int32) -> Int {
        recvmsg(fd, msg, flags)
    }

    /// Reads exactly `buffer.count` bytes by `deadline`, collecting fds, never blocking in the
    /// kernel: bytes that trickle in slowly do not extend the deadline. EOF before the end throws
    /// `.closed`; `done` bytes were already received before this call (for the error's count,
    /// when a message is read in parts under one deadline), `total` is the whole message's size.
    public static func receiveExactly(_ fd: borrowing FileDescriptor, into buffer: UnsafeMutableRawBufferPointer,
                                      fds: inout ReceivedFDs, deadline: Deadline, cancel: Int32? = nil,
                                      done before: Int = 0, total: Int? = nil) throws(SocketError) {
        var done = 0
        while done < buffer.count {
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let n: Int
            do {
                n = try receiveOnce(fd, into: slice, fds: &fds, dontWait: true)
            } catch {
                if case .system(let e) = error, e.errno == EAGAIN || e.errno == EWOULDBLOCK {
                    try waitReady(fd.raw, events: Int16(POLLIN), deadline: deadline, cancel: cancel,
                                  operation: "recvmsg", done: before + done, total: total ?? before + buffer.count)
                    continue
                }
                throw error
            }
            if n == 0 { throw .closed(partial: done) }
            done += n
        }
    }

    /// Reads exactly `buffer.count` bytes, collecting fds. EOF before the end throws `.closed`.
    public static func receiveExactly(_ fd: borrowing FileDescriptor, into buffer: UnsafeMutableRawBufferPointer,
                                      fds: inout ReceivedFDs) throws(SocketError) {
        var done = 0
        while done < buffer.count {
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[done...])
            let n = try receive(fd, into: slice, fds: &fds)
            if n == 0 { throw .closed(partial: done) }
            done += n
        }
    }
}

