#if canImport(Glibc)
import Glibc
#endif

/// An errno value with a Swift name, so that callers outside `Platform` can say which failure
/// they expect (`error.code == .wouldBlock`) without importing Glibc.
public struct Errno: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// EINTR: a signal interrupted the call.
    public static let interrupted = Errno(rawValue: EINTR)
    /// EAGAIN (EWOULDBLOCK on Linux): a non-blocking call found nothing to do now.
    public static let wouldBlock = Errno(rawValue: EAGAIN)
    /// ENOENT: no such file or directory.
    public static let noSuchFile = Errno(rawValue: ENOENT)
    /// ECONNREFUSED: nobody listens on the socket.
    public static let connectionRefused = Errno(rawValue: ECONNREFUSED)
    /// EPIPE: the peer closed its end.
    public static let brokenPipe = Errno(rawValue: EPIPE)
    /// ECONNRESET: the peer reset the connection.
    public static let connectionReset = Errno(rawValue: ECONNRESET)
    /// ENOTCONN: the socket is not (or no longer) connected.
    public static let notConnected = Errno(rawValue: ENOTCONN)
    /// EINVAL: an argument is out of range.
    public static let invalidArgument = Errno(rawValue: EINVAL)

    public var description: String { String(cString: strerror(rawValue)) }
}

extension SystemError {
    /// The errno, named.
    public var code: Errno { Errno(rawValue: errno) }

    public init(_ call: String, _ code: Errno) { self.init(call, errno: code.rawValue) }

    /// The peer went away (EPIPE or ECONNRESET).
    public var isPeerGone: Bool { code == .brokenPipe || code == .connectionReset }
}
