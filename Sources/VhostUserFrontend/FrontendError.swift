import Platform
import VhostUser

/// Everything that can go wrong on the frontend side, each naming the request or address at fault.
public enum FrontendError: Error, CustomStringConvertible, Equatable {
    /// The backend's socket did not accept a connection within the timeout.
    case connectTimedOut(path: String, seconds: Double, lastError: String)
    /// No backend connected to our listening socket within the timeout (client-mode backends).
    case acceptTimedOut(path: String, seconds: Double)
    /// The backend closed the connection (EOF or reset) while we were doing `during`.
    case backendClosed(during: String)
    /// No (complete) message arrived within the timeout while we were doing `during`.
    case timedOut(during: String, seconds: Double)
    /// The backend's reply was not a well-formed reply to the request we sent.
    case malformedReply(request: String, reason: String)
    /// The backend acknowledged a request with a non-zero status (REPLY_ACK), i.e. it refused it.
    case rejected(request: String, status: UInt64)
    /// A step needs a feature (virtio or protocol) that was not negotiated.
    case notNegotiated(step: String, feature: String)
    /// A caller-supplied value that cannot be sent (too many regions, unaligned address, ...).
    case invalidArgument(String)
    /// A guest-physical range outside every region of the guest RAM in question.
    case unmappedAddress(gpa: UInt64, length: UInt64)
    /// A system call failed (socket, memfd, mmap, eventfd, poll).
    case system(SystemError)

    public var description: String {
        switch self {
        case .connectTimedOut(let path, let s, let last):
            return "could not connect to backend socket \(path) within \(s) s (last error: \(last))"
        case .acceptTimedOut(let path, let s):
            return "no backend connected to \(path) within \(s) s"
        case .backendClosed(let during):
            return "backend closed the connection (\(during))"
        case .timedOut(let during, let s):
            return "timed out after \(s) s (\(during))"
        case .malformedReply(let request, let reason):
            return "malformed reply to \(request): \(reason)"
        case .rejected(let request, let status):
            return "backend rejected \(request) (REPLY_ACK status \(status))"
        case .notNegotiated(let step, let feature):
            return "\(step) needs \(feature), which was not negotiated"
        case .invalidArgument(let what):
            return "invalid argument: \(what)"
        case .unmappedAddress(let gpa, let length):
            return "guest-physical range 0x\(String(gpa, radix: 16))+\(length) is not inside the guest RAM"
        case .system(let e):
            return e.description
        }
    }
}

extension Duration {
    /// Seconds as a Double, for error messages, deadlines and socket timeouts.
    var seconds: Double {
        let c = components
        return Double(c.seconds) + Double(c.attoseconds) / 1e18
    }
}
