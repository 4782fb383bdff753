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

/// Why a frontend's fd cannot serve as a kick, call or error eventfd.
public enum EventFDCheckError: Error, CustomStringConvertible, Equatable {
    case notAnEventFD(kind: String)
    case system(SystemError)
    public var description: String {
        switch self {
        case .notAnEventFD(let kind): return "not an eventfd (it is \(kind))"
        case .system(let e): return e.description
        }
    }
}

extension EventFD {
    /// Checks that a frontend's fd is an eventfd and makes it non-blocking, so that no daemon
    /// thread can ever block on it: a read of an unsignalled counter and a write to a saturated
    /// one return EAGAIN instead. (O_NONBLOCK is a property of the open file, which the frontend
    /// shares: QEMU and DPDK create theirs non-blocking too.)
    public static func adoptFrontendFD(_ fd: borrowing FileDescriptor) throws(EventFDCheckError) {
        let kind = fileKind(fd.raw)
        guard kind == "anon_inode:[eventfd]" else { throw .notAnEventFD(kind: kind) }
        let flags = fcntl(fd.raw, F_GETFL)
        guard flags >= 0 else { throw .system(SystemError("fcntl(F_GETFL)", errno: cvdpa_errno())) }
        if flags & O_NONBLOCK == 0 {
            guard fcntl(fd.raw, F_SETFL, flags | O_NONBLOCK) == 0 else {
                throw .system(SystemError("fcntl(F_SETFL, O_NONBLOCK)", errno: cvdpa_errno()))
            }
        }
    }

    /// What /proc says `fd` is ("anon_inode:[eventfd]", "pipe:[123]", "socket:[456]", a path).
    static func fileKind(_ fd: Int32) -> String {
        var buffer = [UInt8](repeating: 0, count: 256)
        let n = buffer.withUnsafeMutableBufferPointer { b in
            readlink("/proc/self/fd/\(fd)", b.baseAddress!, b.count - 1)
        }
        guard n > 0 else { return "unknown (readlink failed: \(String(cString: strerror(cvdpa_errno()))))" }
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }
}
