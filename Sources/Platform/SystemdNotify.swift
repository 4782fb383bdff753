#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// The systemd service notification protocol (sd_notify(3)), without libsystemd: datagrams of
/// `KEY=VALUE` lines to the unix socket named by NOTIFY_SOCKET (a path, or `@name` for the
/// abstract namespace). Without NOTIFY_SOCKET (not run by systemd as `Type=notify`) it does
/// nothing.
public enum SystemdNotify {
    /// The socket systemd listens on, from the environment, or nil.
    public static var socketPath: String? {
        guard let p = getenv("NOTIFY_SOCKET") else { return nil }
        let s = String(cString: p)
        return s.isEmpty ? nil : s
    }

    /// Sends `state` (e.g. "READY=1\nMAINPID=123") to NOTIFY_SOCKET. Returns false when there is
    /// none; throws when it cannot be reached.
    @discardableResult
    public static func send(_ state: String) throws(SystemError) -> Bool {
        guard let path = socketPath else { return false }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        let abstract = bytes.first == UInt8(ascii: "@")
        if abstract { bytes[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity, bytes.first == 0 || bytes.first == UInt8(ascii: "/") else {
            throw SystemError("NOTIFY_SOCKET=\(path): not an absolute path or @abstract name that fits a unix socket address", errno: EINVAL)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            if !abstract { raw[bytes.count] = 0 }
        }
        // An abstract address's length counts exactly its name; a path's, the whole structure.
        let length = abstract ? socklen_t(MemoryLayout<sa_family_t>.size + bytes.count) : socklen_t(MemoryLayout<sockaddr_un>.size)
        let fd = socket(AF_UNIX, CVDPA_SOCK_DGRAM | CVDPA_SOCK_CLOEXEC, 0)
        guard fd >= 0 else { throw SystemError("socket(AF_UNIX, SOCK_DGRAM) for NOTIFY_SOCKET", errno: errno) }
        defer { close(fd) }
        let message = Array(state.utf8)
        let sent = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                message.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sa, length) }
            }
        }
        guard sent == message.count else { throw SystemError("sendto NOTIFY_SOCKET=\(path)", errno: errno) }
        return true
    }
}
