#if canImport(Glibc)
import Glibc
#endif
import Platform
import Synchronization
import VhostUser

/// A scripted backend in a thread, for testing the frontend's message plumbing and errors
/// without a real backend. It connects (client mode) to a frontend listening at `path`.
final class FrontendFakeBackend: Sendable {
    enum Step: Sendable {
        /// Expect this request; then reply with (request number, payload), or not at all when nil.
        case expect(VhostUserRequest, reply: (UInt32, [UInt8])?)
        /// Close the connection (after reading the next message, if `afterReading`).
        case close(afterReading: Bool)
    }

    /// What the backend thread saw, shared with the test thread.
    final class Record: Sendable {
        let failures = Mutex<[String]>([])
        /// Requests received, in order.
        let received = Mutex<[VhostUserRequest]>([])
    }

    let record = Record()
    private let thread: OSThread

    init(path: String, script: [Step]) throws {
        let record = self.record
        thread = try OSThread(name: "fake-backend") {
            guard let sock = Self.connectRetrying(path) else {
                record.failures.withLock { $0.append("could not connect to \(path)") }
                return
            }
            do { try UnixSocket.setReceiveTimeout(sock, seconds: 5) } catch {
                record.failures.withLock { $0.append("setting the receive timeout: \(error)") }
                return
            }
            for step in script {
                switch step {
                case .expect(let want, let reply):
                    guard let got = Self.readRequest(sock) else {
                        record.failures.withLock { $0.append("connection ended before \(want.name)") }
                        return
                    }
                    record.received.withLock { $0.append(got) }
                    if got != want { record.failures.withLock { $0.append("expected \(want.name), got \(got.name)") } }
                    if let (code, payload) = reply {
                        var bytes = VhostUserHeader(request: code, flags: VhostUserHeader.version | VhostUserHeader.replyFlag,
                                                    size: UInt32(payload.count)).encode()
                        bytes.append(contentsOf: payload)
                        do { try bytes.withUnsafeBytes { try UnixSocket.send(sock, bytes: $0) } } catch {
                            record.failures.withLock { $0.append("send failed: \(error)") }
                        }
                    }
                case .close(let afterReading):
                    if afterReading, let got = Self.readRequest(sock) { record.received.withLock { $0.append(got) } }
                    return  // sock closes here
                }
            }
        }
    }

    func join() -> [String] {
        thread.join()
        return record.failures.withLock { $0 }
    }

    /// Connects, retrying for up to 5 s until the frontend listens.
    static func connectRetrying(_ path: String) -> FileDescriptor? {
        for _ in 0..<500 {
            if let f = try? UnixSocket.connect(path: path) { return f }
            usleep(10_000)
        }
        return nil
    }

    static func readRequest(_ sock: borrowing FileDescriptor) -> VhostUserRequest? {
        var header = [UInt8](repeating: 0, count: VhostUserHeader.size)
        var fds = ReceivedFDs()
        do {
            try header.withUnsafeMutableBytes { try UnixSocket.receiveExactly(sock, into: $0, fds: &fds) }
            let (request, h) = try header.withUnsafeBytes { try VhostUserCodec.decodeHeader($0) }
            var body = [UInt8](repeating: 0, count: Int(h.size))
            if h.size > 0 { try body.withUnsafeMutableBytes { try UnixSocket.receiveExactly(sock, into: $0, fds: &fds) } }
            return request
        } catch {
            return nil
        }
    }

    static func u64(_ v: UInt64) -> [UInt8] { VhostUserCodec.u64Payload(v) }
}
