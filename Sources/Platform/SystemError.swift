#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// A failed system call: which call, and the errno it left.
public struct SystemError: Error, CustomStringConvertible, Equatable, Sendable {
    public let call: String
    public let errno: Int32

    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    public var description: String {
        "\(call): \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

/// Runs a syscall wrapper, retries EINTR, and turns -1 into a thrown `SystemError`.
/// `@inline(never)` keeps ARC traffic from running between the call and the errno read.
@inline(never)
@discardableResult
public func syscallRetrying(_ name: String, _ body: () -> Int) throws(SystemError) -> Int {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = cvdpa_errno()
        if e == EINTR { continue }
        throw SystemError(name, errno: e)
    }
}

@inline(never)
@discardableResult
public func syscallRetrying(_ name: String, _ body: () -> Int32) throws(SystemError) -> Int32 {
    Int32(try syscallRetrying(name) { () -> Int in Int(body()) })
}
