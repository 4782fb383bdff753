#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// A netlink socket (AF_NETLINK, SOCK_RAW): one datagram per send, one per receive. Extended
/// acknowledgements are asked for (NETLINK_EXT_ACK, so the kernel says why it refused) with the
/// request's payload left out of them (NETLINK_CAP_ACK). The messages themselves are the
/// caller's (the VDUSE module encodes generic netlink).
public struct NetlinkSocket: ~Copyable {
    private let fd: FileDescriptor
    /// Safety: 64 KiB owned by this socket alone, allocated in init and freed once in deinit.
    private let buffer: UnsafeMutableRawBufferPointer

    /// Opens a socket for netlink `protocolFamily` (e.g. NETLINK_GENERIC).
    public init(protocolFamily: Int32) throws(SystemError) {
        let raw = try syscallRetrying("socket(AF_NETLINK)") {
            socket(CVDPA_AF_NETLINK, Int32(SOCK_RAW.rawValue) | CVDPA_SOCK_CLOEXEC, protocolFamily)
        }
        let owned = FileDescriptor(owning: raw)
        var one: Int32 = 1
        for (option, name) in [(CVDPA_NETLINK_EXT_ACK, "NETLINK_EXT_ACK"), (CVDPA_NETLINK_CAP_ACK, "NETLINK_CAP_ACK")] {
            // Safety: &one points at a local Int32 for the call only.
            try syscallRetrying("setsockopt(\(name))") {
                setsockopt(raw, CVDPA_SOL_NETLINK, option, &one, socklen_t(MemoryLayout<Int32>.size))
            }
        }
        fd = owned
        buffer = .allocate(byteCount: 65536, alignment: 8)
    }

    deinit { buffer.deallocate() }

    /// Sends one message to the kernel (destination port 0).
    public func send(_ message: [UInt8]) throws(SystemError) {
        let n = try syscallRetrying("send(netlink)") {
            // Safety: the array's bytes are valid for the call.
            message.withUnsafeBytes { Glibc.send(fd.raw, $0.baseAddress, $0.count, 0) }
        }
        guard n == message.count else { throw SystemError("send(netlink): \(n) of \(message.count) bytes", errno: EMSGSIZE) }
    }

    /// Receives one datagram (which may hold several messages), waiting until `deadline`;
    /// nil when the deadline passed first. A datagram longer than 64 KiB is an error.
    public func receive(until deadline: Deadline) throws(SystemError) -> [UInt8]? {
        guard try Poll.waitReadable(fd.raw, until: deadline) else { return nil }
        let n = try syscallRetrying("recv(netlink)") {
            // Safety: recv writes at most buffer.count bytes into the buffer allocated in init.
            recv(fd.raw, buffer.baseAddress, buffer.count, Int32(MSG_TRUNC) | CVDPA_MSG_DONTWAIT)
        }
        guard n <= buffer.count else { throw SystemError("recv(netlink): a \(n)-byte datagram", errno: EMSGSIZE) }
        return Array(buffer[0..<n])
    }
}
