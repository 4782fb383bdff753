#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import Platform

/// A Linux TAP interface (/dev/net/tun, IFF_TAP | IFF_NO_PI), non-blocking.
enum Tap {
    static func open(name: String) throws -> (fd: SharedFD, name: String) {
        let raw = Glibc.open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC)
        guard raw >= 0 else { throw SystemError("open(/dev/net/tun)", errno: errno) }
        let fd = FileDescriptor(owning: raw)
        var out = [CChar](repeating: 0, count: 16)
        let r = cvdpa_tap_attach(fd.raw, name, &out)
        guard r == 0 else { throw SystemError("TUNSETIFF(\(name))", errno: errno) }
        let actual = String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return (SharedFD(fd), actual)
    }
}
