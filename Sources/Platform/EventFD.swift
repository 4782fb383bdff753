#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// eventfd helpers: create, signal, drain. Used for kicks, calls and wake-ups.
public enum EventFD {
    /// `semaphore` makes a semaphore-mode eventfd (each read takes 1): for tests of hostile fds.
    public static func make(nonBlocking: Bool = true, semaphore: Bool = false) throws(SystemError) -> FileDescriptor {
        var flags = CVDPA_EFD_CLOEXEC
        if nonBlocking { flags |= CVDPA_EFD_NONBLOCK }
        if semaphore { flags |= CVDPA_EFD_SEMAPHORE }
        let raw = try syscallRetrying("eventfd") { eventfd(0, Int32(flags)) }
        return FileDescriptor(owning: raw)
    }

    /// Adds 1 to the counter. An eventfd whose counter is saturated (EAGAIN) is already signalled.
    /// Not retried on EINTR: on the daemon's own and the frontend's (non-blocking) eventfds the
    /// call cannot sleep, so EINTR means a thread was interrupted out of a write to an eventfd a
    /// frontend made blocking again (`Mailbox`), and that write is given up.
    /// Returns false only when the write was interrupted: the fd was blocking (see
    /// `isNonBlocking`), the caller should stop using it.
    @inline(never)
    @discardableResult
    public static func signal(_ fd: Int32) -> Bool {
        var one: UInt64 = 1
        return write(fd, &one, 8) == 8 || cvdpa_errno() != EINTR
    }

    /// Whether `fd` is still non-blocking: a frontend shares the open file and can clear it.
    public static func isNonBlocking(_ fd: Int32) -> Bool {
        let flags = fcntl(fd, F_GETFL)
        return flags >= 0 && flags & O_NONBLOCK != 0
    }

    /// Reads and clears the counter; returns 0 when it was not signalled (non-blocking fd), or
    /// when the read was interrupted (see `signal`).
    @inline(never)
    @discardableResult
    public static func drain(_ fd: Int32) -> UInt64 {
        var value: UInt64 = 0
        return read(fd, &value, 8) == 8 ? value : 0
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
        // A semaphore eventfd reads 1 at a time: a level-triggered watch on it never goes quiet,
        // so the thread serving it would never sleep. Kernels since 6.4 show the mode in fdinfo.
        let info: String
        do { info = try FileSystem.readText("/proc/self/fdinfo/\(fd.raw)") } catch { throw .system(error) }
        if info.contains("eventfd-semaphore: 1") { throw .notAnEventFD(kind: "a semaphore-mode eventfd") }
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
            // Safety: the buffer has b.count bytes; readlink writes at most b.count - 1.
            readlink("/proc/self/fd/\(fd)", b.baseAddress!, b.count - 1)
        }
        guard n > 0 else { return "unknown (readlink failed: \(String(cString: strerror(cvdpa_errno()))))" }
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }
}
