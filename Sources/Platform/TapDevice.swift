#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// A Linux TAP interface (/dev/net/tun, IFF_TAP | IFF_NO_PI), non-blocking: one Ethernet frame
/// per read or write.
public final class TapDevice: Sendable {
    private let fd: FileDescriptor
    /// The interface's name as the kernel chose it.
    public let name: String
    /// For epoll registration; owned here.
    public var raw: Int32 { fd.raw }

    /// Opens /dev/net/tun and attaches it to interface `name` (created if absent; at most 15
    /// bytes are kept).
    public init(name: String) throws(SystemError) {
        let raw = try syscallRetrying("open(/dev/net/tun)") { open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC) }
        let fd = FileDescriptor(owning: raw)
        var out = [CChar](repeating: 0, count: 16)
        guard cvdpa_tap_attach(fd.raw, name, &out) == 0 else { throw SystemError("ioctl(TUNSETIFF, \(name))", errno: cvdpa_errno()) }
        self.name = String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        self.fd = fd
    }

    /// Reads one frame into `buffer` (`capacity` bytes; a longer frame is cut to it, as the
    /// kernel does). Returns its length, or nil when no frame is waiting. Retries EINTR.
    @inline(never)
    public func receive(into buffer: UnsafeMutableRawPointer, capacity: Int) throws(SystemError) -> Int? {
        while true {
            let n = read(fd.raw, buffer, capacity)
            if n >= 0 { return n }
            let e = cvdpa_errno()
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return nil }
            throw SystemError("read(tap \(name))", errno: e)
        }
    }

    /// Writes one frame. Returns false when the kernel did not take it whole (its queue is full,
    /// the interface is down): the caller counts a link error. Retries EINTR.
    @inline(never)
    public func send(_ frame: UnsafeRawPointer, length: Int) -> Bool {
        while true {
            let n = write(fd.raw, frame, length)
            if n == length { return true }
            if n < 0 && cvdpa_errno() == EINTR { continue }
            return false
        }
    }
}
