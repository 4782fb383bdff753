#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// A Linux TAP interface (/dev/net/tun, IFF_TAP | IFF_NO_PI), non-blocking: one Ethernet frame
/// per read or write. With `vnetHeader` (IFF_VNET_HDR) every frame read or written starts with a
/// virtio-net header of `setVnetHeaderSize` bytes, and the kernel does the offloads it
/// describes (checksums, segmentation); `setOffloads` says which ones the reader takes.
public final class TapDevice: Sendable {
    private let fd: FileDescriptor
    /// The interface's name as the kernel chose it.
    public let name: String
    /// For epoll registration; owned here.
    public var raw: Int32 { fd.raw }

    /// Opens /dev/net/tun and attaches it to interface `name` (created if absent; at most 15
    /// bytes are kept).
    public init(name: String, vnetHeader: Bool = false) throws(SystemError) {
        let raw = try syscallRetrying("open(/dev/net/tun)") { open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC) }
        let fd = FileDescriptor(owning: raw)
        var out = [CChar](repeating: 0, count: 16)
        guard cvdpa_tap_attach(fd.raw, name, &out, vnetHeader ? 1 : 0) == 0 else { throw SystemError("ioctl(TUNSETIFF, \(name))", errno: cvdpa_errno()) }
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

    /// TUNSETVNETHDRSZ: the virtio-net header's size (10, or 12 with num_buffers).
    public func setVnetHeaderSize(_ size: Int) throws(SystemError) {
        guard cvdpa_tap_set_vnet_hdr_size(fd.raw, Int32(size)) == 0 else {
            throw SystemError("ioctl(TUNSETVNETHDRSZ, \(size)) on tap \(name)", errno: cvdpa_errno())
        }
    }

    /// TUN_F_* bits for `setOffloads`.
    public static let offloadCsum = CVDPA_TUN_F_CSUM
    public static let offloadTSO4 = CVDPA_TUN_F_TSO4
    public static let offloadTSO6 = CVDPA_TUN_F_TSO6
    public static let offloadTSOECN = CVDPA_TUN_F_TSO_ECN
    public static let offloadUFO = CVDPA_TUN_F_UFO

    /// TUNSETOFFLOAD: the offloads the reader takes (frames with partial checksums, large
    /// segments); the kernel completes the rest before a frame is read.
    public func setOffloads(_ flags: UInt32) throws(SystemError) {
        guard cvdpa_tap_set_offload(fd.raw, flags) == 0 else {
            throw SystemError("ioctl(TUNSETOFFLOAD, 0x\(String(flags, radix: 16))) on tap \(name)", errno: cvdpa_errno())
        }
    }

    /// Reads one frame into the `count` buffers of `iov` (scattered). Returns its length, which is
    /// larger than the buffers when the frame was cut to them, or nil when no frame is waiting.
    /// Retries EINTR.
    @inline(never)
    public func receive(scattered iov: UnsafePointer<iovec>, count: Int) throws(SystemError) -> Int? {
        while true {
            let n = readv(fd.raw, iov, Int32(count))
            if n >= 0 { return n }
            let e = cvdpa_errno()
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return nil }
            throw SystemError("readv(tap \(name))", errno: e)
        }
    }

    /// Writes one frame gathered from the `count` buffers of `iov` (`length` bytes in all).
    /// Returns false when the kernel did not take it whole. Retries EINTR.
    @inline(never)
    public func send(gathered iov: UnsafePointer<iovec>, count: Int, length: Int) -> Bool {
        while true {
            let n = writev(fd.raw, iov, Int32(count))
            if n == length { return true }
            if n < 0 && cvdpa_errno() == EINTR { continue }
            return false
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
