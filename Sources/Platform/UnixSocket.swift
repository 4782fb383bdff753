#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

public enum SocketError: Error, CustomStringConvertible, Equatable {
    /// The peer closed the connection (EOF), `partial` bytes into a read.
    case closed(partial: Int)
    /// The kernel truncated the ancillary data (more fds than room): every fd that did arrive was closed.
    case truncatedControl
    /// A path that does not fit in sockaddr_un.
    case pathTooLong(String)
    case system(SystemError)

    public var description: String {
        switch self {
        case .closed(let n): return n == 0 ? "peer closed the connection" : "peer closed the connection after \(n) bytes of a message"
        case .truncatedControl: return "ancillary data truncated (too many fds); received fds closed"
        case .pathTooLong(let p): return "socket path too long (max 107 bytes): \(p)"
        case .system(let e): return e.description
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

    static func makeSocket() throws(SocketError) -> FileDescriptor {
        do {
            let raw = try syscallRetrying("socket") { socket(AF_UNIX, Int32(CVDPA_SOCK_STREAM | CVDPA_SOCK_CLOEXEC), 0) }
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

    public static func connect(path: String) throws(SocketError) -> FileDescriptor {
        let fd = try makeSocket()
        while true {
            let r = try withAddress(path) { addr, len in Glibc.connect(fd.raw, addr, len) }
            if r == 0 { return fd }
            let e = cvdpa_errno()
            if e == EINTR { continue }
            throw .system(SystemError("connect(\(path))", errno: e))
        }
    }

    public static func accept(_ listener: borrowing FileDescriptor) throws(SystemError) -> FileDescriptor {
        let raw = try syscallRetrying("accept4") { cvdpa_accept4(listener.raw, Int32(CVDPA_SOCK_CLOEXEC)) }
        return FileDescriptor(owning: raw)
    }

    /// Sets SO_RCVTIMEO so that a peer that stops mid-message cannot hold a reader forever.
    public static func setReceiveTimeout(_ fd: borrowing FileDescriptor, seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        _ = setsockopt(fd.raw, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Sends all of `bytes`, with `fds` attached to the first segment.
    public static func send(_ fd: borrowing FileDescriptor, bytes: UnsafeRawBufferPointer, fds: [Int32] = []) throws(SocketError) {
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
                return sendmsg(fd.raw, &msg, Int32(CVDPA_MSG_NOSIGNAL))
            }
            if r < 0 {
                let e = cvdpa_errno()
                if e == EINTR { continue }
                throw .system(SystemError("sendmsg", errno: e))
            }
            sent += r
            if bytes.count == 0 { break }
        }
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
                let n = recvmsg(fd.raw, &msg, Int32(CVDPA_MSG_CMSG_CLOEXEC))
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
            return r
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

