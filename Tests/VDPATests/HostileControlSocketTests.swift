#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Platform
import VhostUser
import XCTest
@testable import VDPA

/// Hostile input class 7 on the control socket: one thread serves every control client and none
/// can block it (replies never block, a client limit, an idle timeout); the socket has its own
/// mode and group (shared set-up: HostileSocketSupport.swift).
final class HostileControlSocketTests: DaemonSocketTestCase {
    func controlClient() throws -> FileDescriptor {
        let fd = try UnixSocket.connect(path: controlPath)
        try UnixSocket.setReceiveTimeout(fd, seconds: 5)
        return fd
    }

    /// Reads one line (up to 64 KiB) or nil on EOF/timeout.
    func readLine(_ fd: borrowing FileDescriptor) -> String? {
        var out: [UInt8] = []
        var b: UInt8 = 0
        while out.count < 65536 {
            let n = recv(fd.raw, &b, 1, 0)
            if n <= 0 { return nil }
            if b == 0x0A { return String(decoding: out, as: UTF8.self) }
            out.append(b)
        }
        return nil
    }

    /// A control client that sends requests and never reads the replies cannot block the control
    /// thread: another client is answered, and the hostile one is closed.
    func testControlClientThatNeverReadsDoesNotBlockOthers() throws {
        let hostile = try controlClient()
        try UnixSocket.setBlocking(hostile, false)
        let line = Array(#"{"command":"status"}"#.utf8) + [0x0A]
        var sent = 0
        while sent < 20_000, try UnixSocket.sendAvailable(hostile, line) == line.count { sent += 1 }
        waitFor("the server to start answering") { queuedForUs(hostile.raw) > 0 }
        let reply = try? ControlClient.request("status", controlPath: controlPath)
        XCTAssertNotNil(reply, "a control client that never reads blocked the control thread")
        let closed = peerHangsUp(hostile.raw, within: Self.idleTimeout + 5)
        XCTAssertTrue(closed, "the client that never reads was not closed")
        _ = consume hostile  // without the fix, this is what frees the control thread
    }

    /// A control client that keeps sending requests and never reads is closed once its unread
    /// replies pass the limit, while it is still sending (the buffer is bounded; the idle timeout
    /// has nothing to do with it).
    func testControlClientPilingUpRepliesIsClosed() throws {
        let hostile = try controlClient()
        try UnixSocket.setBlocking(hostile, false)
        let line = Array(#"{"command":"status"}"#.utf8) + [0x0A]
        let perReply = try ControlClient.request("status", controlPath: controlPath).count + 1
        // Enough requests for several times the limit of unread replies.
        let needed = 4 * ControlOptions().maxUnreadReplyBytes / perReply
        var sent = 0
        var closedWhileSending = false
        while sent < needed {
            let n: Int
            do { n = try UnixSocket.sendAvailable(hostile, line) } catch {
                closedWhileSending = true  // EPIPE/ECONNRESET: the server closed us
                break
            }
            if n == 0 {
                // The server reads whatever it is sent; room comes back at once unless it closed us.
                if peerHangsUp(hostile.raw, within: 0) { closedWhileSending = true; break }
                var pfd = pollfd(fd: hostile.raw, events: Int16(POLLOUT), revents: 0)
                _ = poll(&pfd, 1, 1000)
                continue
            }
            XCTAssertEqual(n, line.count)
            sent += 1
        }
        XCTAssertTrue(closedWhileSending, "a client sent \(sent) requests and left every reply unread without being closed")
        XCTAssertNotNil(try? ControlClient.request("status", controlPath: controlPath), "the control socket serves others")
        _ = consume hostile
    }

    /// Clients beyond --control-max-clients get an error line and are closed; once one leaves,
    /// a new client is served.
    func testControlClientsBeyondTheLimitAreRefused() throws {
        var held: [SharedFD] = []
        for _ in 0..<Self.maxControlClients {
            let c = try controlClient()
            try UnixSocket.send(c, Array(#"{"command":"status"}"#.utf8) + [0x0A])
            XCTAssertNotNil(readLine(c), "a client within the limit is served")
            held.append(SharedFD(c))
        }
        let extra = try controlClient()
        let refusal = readLine(extra)
        XCTAssertTrue(refusal?.contains("too many control clients") ?? false, "refusal line: \(refusal ?? "none")")
        XCTAssertTrue(peerHangsUp(extra.raw, within: 2), "the refused client is closed")
        held.removeLast()
        waitFor("a new client to be served after one left") {
            (try? ControlClient.request("status", controlPath: controlPath)).map { !String(decoding: $0, as: UTF8.self).contains("too many") } ?? false
        }
        _ = consume extra
    }

    /// A control client that sends nothing (or half a line) for the idle timeout is closed.
    func testIdleControlClientIsClosed() throws {
        let silent = try controlClient()
        let half = try controlClient()
        try UnixSocket.send(half, Array(#"{"comm"#.utf8))
        XCTAssertTrue(peerHangsUp(silent.raw, within: Self.idleTimeout + 3), "a silent control client was kept")
        XCTAssertTrue(peerHangsUp(half.raw, within: 2), "a client idle after half a line was kept")
        XCTAssertNotNil(try? ControlClient.request("status", controlPath: controlPath))
    }

    /// The control socket has its own mode (default 0600) and group, whatever --socket-mode says.
    func testControlSocketHasItsOwnModeAndGroup() throws {
        daemon?.stop()
        daemon = nil
        var st = stat()
        do {
            let d = try Daemon(specs: [PortSpec(id: "p", socketPath: dir + "/p.sock")], controlPath: controlPath, logger: logger)
            try d.start(ownership: SocketOwnership(mode: 0o666))
            XCTAssertEqual(stat(controlPath, &st), 0)
            XCTAssertEqual(st.st_mode & 0o777, 0o600, "control socket mode by default")
            XCTAssertEqual(stat(dir + "/p.sock", &st), 0)
            XCTAssertEqual(st.st_mode & 0o777, 0o666, "port socket mode")
            d.stop()
        }
        let group: gid_t = getgid() == 0 ? 1 : getgid()
        let d = try Daemon(specs: [PortSpec(id: "p", socketPath: dir + "/p.sock")], controlPath: controlPath, logger: logger,
                           controlOptions: ControlOptions(ownership: SocketOwnership(group: group, mode: 0o640)))
        try d.start(ownership: SocketOwnership(mode: 0o666))
        defer { d.stop() }
        XCTAssertEqual(stat(controlPath, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o640)
        XCTAssertEqual(st.st_gid, group)
    }
}
