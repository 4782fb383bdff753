#if canImport(Glibc)
import Glibc
#endif
import Platform
import XCTest

/// `Poll`, and the socket calls a frontend and the control client use: receive timeout,
/// shutdown, a peek at the peer's state.
final class SocketTests: XCTestCase {
    /// A connected pair of unix stream sockets.
    struct Pair: ~Copyable {
        let a: FileDescriptor
        let b: FileDescriptor
        init() throws {
            var fds: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
                throw SystemError("socketpair", errno: errno)
            }
            a = FileDescriptor(owning: fds[0])
            b = FileDescriptor(owning: fds[1])
        }
    }

    func testPollWaitsForReadableAndTellsADeadlineApart() throws {
        let e = try EventFD.make()
        let start = MonotonicClock.nanoseconds
        XCTAssertFalse(try Poll.waitReadable(e.raw, until: Deadline(secondsFromNow: 0.05)), "nothing signalled")
        XCTAssertGreaterThanOrEqual(MonotonicClock.nanoseconds - start, 50_000_000, "false only once the deadline passed")
        EventFD.signal(e.raw)
        XCTAssertTrue(try Poll.waitReadable(e.raw, until: Deadline(secondsFromNow: 0)), "a past deadline still polls once")
        XCTAssertTrue(try Poll.waitReadable(e.raw, until: nil))
        XCTAssertEqual(try Poll.wait(e.raw, for: Poll.writable, until: nil).map { $0 & Poll.writable }, Poll.writable)
    }

    /// An fd number that is not open is an event (POLLNVAL), not a wait: the caller's next call on
    /// it reports EBADF.
    func testPollOfAClosedFDReturnsAtOnce() throws {
        let raw = try EventFD.make().take()
        XCTAssertEqual(close(raw), 0)
        XCTAssertEqual(try Poll.wait(raw, until: nil).map { $0 & Int16(POLLNVAL) }, Int16(POLLNVAL))
    }

    func testPeerStateAndShutdown() throws {
        let p = try Pair()
        XCTAssertEqual(try UnixSocket.peerState(p.a), .quiet)
        try UnixSocket.send(p.b, [1, 2, 3])
        XCTAssertEqual(try UnixSocket.peerState(p.a), .dataWaiting)
        XCTAssertEqual(try UnixSocket.peerState(p.a), .dataWaiting, "peeking takes nothing")
        try UnixSocket.shutdown(p.b)
        XCTAssertEqual(try UnixSocket.peerState(p.a), .dataWaiting, "queued bytes come before the end")
        var fds = ReceivedFDs()
        var got = [UInt8](repeating: 0, count: 3)
        try got.withUnsafeMutableBytes { try UnixSocket.receiveExactly(p.a, into: $0, fds: &fds) }
        XCTAssertEqual(got, [1, 2, 3])
        XCTAssertEqual(try UnixSocket.peerState(p.a), .closed)
        XCTAssertThrowsError(try UnixSocket.peerState(try EventFD.make())) { error in
            XCTAssertEqual((error as? SystemError)?.call, "recv(MSG_PEEK)")
        }
    }

    func testShutdownOfWhatIsNotASocketIsNamed() throws {
        XCTAssertThrowsError(try UnixSocket.shutdown(try EventFD.make())) { error in
            XCTAssertEqual(error as? SystemError, SystemError("shutdown", errno: ENOTSOCK))
        }
    }

    /// A receive on a socket with a timeout gives up with EAGAIN after about that long.
    func testReceiveTimeoutEndsABlockingRead() throws {
        let p = try Pair()
        try UnixSocket.setReceiveTimeout(p.a, seconds: 0.1)
        var fds = ReceivedFDs()
        var got = [UInt8](repeating: 0, count: 1)
        let start = MonotonicClock.nanoseconds
        XCTAssertThrowsError(try got.withUnsafeMutableBytes { try UnixSocket.receiveExactly(p.a, into: $0, fds: &fds) }) { error in
            guard case .system(let e)? = error as? SocketError else { return XCTFail("\(error)") }
            XCTAssertEqual(e.code, .wouldBlock)
        }
        let waited = MonotonicClock.nanoseconds - start
        XCTAssertGreaterThanOrEqual(waited, 90_000_000)
        XCTAssertLessThan(waited, 2_000_000_000)
        XCTAssertThrowsError(try UnixSocket.setReceiveTimeout(try EventFD.make(), seconds: 1)) { error in
            XCTAssertEqual((error as? SystemError)?.call, "setsockopt(SO_RCVTIMEO)")
        }
    }
}
