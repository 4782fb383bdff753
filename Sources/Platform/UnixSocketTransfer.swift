#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// Moving bytes over a unix stream socket, with fds attached (SCM_RIGHTS): blocking, by a
/// deadline (daemon threads), or only what the socket takes now (the control server).
extension UnixSocket {
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
