#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// An owned file descriptor: closed exactly once, when the owner goes away,
/// unless ownership is handed on with `take()`.
public struct FileDescriptor: ~Copyable, Sendable {
    public let raw: Int32

    /// Takes ownership of `raw`.
    public init(owning raw: Int32) {
        precondition(raw >= 0, "FileDescriptor needs a valid fd")
        self.raw = raw
    }

    /// Gives up ownership without closing; the caller now owns the number.
    public consuming func take() -> Int32 {
        let r = raw
        discard self
        return r
    }

    /// Duplicates the descriptor (close-on-exec).
    public borrowing func duplicate() throws(SystemError) -> FileDescriptor {
        let r = try syscallRetrying("fcntl(F_DUPFD_CLOEXEC)") { fcntl(raw, F_DUPFD_CLOEXEC, 0) }
        return FileDescriptor(owning: r)
    }

    deinit {
        _ = close(raw)
    }
}

/// A reference-counted owner of one fd, for fds that several holders share
/// (a session and a device thread, say). The fd closes when the last holder lets go.
public final class SharedFD: Sendable, CustomStringConvertible {
    // Sendable: the fd number is immutable and only closed in deinit, once.
    private let fd: FileDescriptor

    public init(_ fd: consuming FileDescriptor) { self.fd = fd }

    public var raw: Int32 { fd.raw }

    /// Lends the owned descriptor to `body` (which must not close it).
    public func withFD<R: ~Copyable, E: Error>(_ body: (borrowing FileDescriptor) throws(E) -> R) throws(E) -> R {
        try body(fd)
    }
    public var description: String { "fd \(fd.raw)" }
}

/// File descriptors received in one message. Each is owned here until taken;
/// whatever is not taken is closed when this goes away.
public struct ReceivedFDs: ~Copyable {
    private var fds: [Int32]

    public init() { fds = [] }
    public init(owning fds: [Int32]) { self.fds = fds }

    public var count: Int { fds.reduce(0) { $0 + ($1 >= 0 ? 1 : 0) } }
    public var isEmpty: Bool { count == 0 }

    /// Takes ownership of the fd at `index`; nil if absent or already taken.
    public mutating func take(_ index: Int) -> FileDescriptor? {
        guard index >= 0, index < fds.count, fds[index] >= 0 else { return nil }
        let r = fds[index]
        fds[index] = -1
        return FileDescriptor(owning: r)
    }

    /// Takes ownership of more fds, after those already held.
    public mutating func adopt(_ more: [Int32]) {
        fds.append(contentsOf: more)
    }

    /// Closes every fd not yet taken.
    public mutating func closeAll() {
        for i in fds.indices where fds[i] >= 0 {
            _ = close(fds[i])
            fds[i] = -1
        }
    }

    deinit {
        for fd in fds where fd >= 0 { _ = close(fd) }
    }
}
