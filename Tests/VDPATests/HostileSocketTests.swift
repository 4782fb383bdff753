#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import Logging
import Platform
import Synchronization
import VhostUser
import XCTest
@testable import VDPA

// Hostile input classes 7 (no thread can be held hostage) and 8 (socket paths), over real
// sockets. Each test shows the attack and asserts that the port (or control) thread stays
// responsive; docs/TESTING.md lists them, scripts/mutation-check shows each one failing
// without its fix.

private let pollRDHUP = Int16(0x2000)  // POLLRDHUP, hidden by Glibc without _GNU_SOURCE

/// True once the peer has closed its end of `fd` (hang-up), even with unread data queued.
func peerHangsUp(_ fd: Int32, within seconds: Double) -> Bool {
    let deadline = Deadline(secondsFromNow: seconds)
    var pfd = pollfd(fd: fd, events: pollRDHUP, revents: 0)
    while true {
        let left = deadline.remainingMillis
        let r = poll(&pfd, 1, left)
        if r > 0, pfd.revents & (Int16(POLLHUP | POLLERR) | pollRDHUP) != 0 { return true }
        if r < 0 && errno != EINTR { return false }
        if left == 0 { return false }
    }
}

/// Bytes we sent on `fd` that the peer has not read yet (SIOCOUTQ).
func unreadByPeer(_ fd: Int32) -> Int32 {
    var n: Int32 = 0
    _ = ioctl(fd, UInt(0x5411), &n)  // TIOCOUTQ == SIOCOUTQ
    return n
}

/// Bytes queued for us to read on `fd` (SIOCINQ).
func queuedForUs(_ fd: Int32) -> Int32 {
    var n: Int32 = 0
    _ = ioctl(fd, UInt(0x541B), &n)  // FIONREAD == SIOCINQ
    return n
}

/// The scheduler state ('R', 'S', ...) of this process's thread named `name`, if there is one.
func threadState(named name: String) -> Character? {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
    for t in tasks {
        guard let comm = try? String(contentsOfFile: "/proc/self/task/\(t)/comm", encoding: .utf8),
              comm.trimmingCharacters(in: .whitespacesAndNewlines) == name,
              let stat = try? String(contentsOfFile: "/proc/self/task/\(t)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { continue }
        return stat[stat.index(close, offsetBy: 2)]
    }
    return nil
}

/// Runs `body` on its own thread and says whether it returned within `seconds`. If it did not,
/// `unblock` runs (removing what holds it) and `body` is waited for before returning false.
func returns(within seconds: Double, _ body: @escaping @Sendable () -> Void, unblock: () -> Void) -> Bool {
    let done = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        body()
        done.signal()
    }
    if done.wait(timeout: .now() + seconds) == .success { return true }
    unblock()
    _ = done.wait(timeout: .now() + 30)
    return false
}

/// A frontend that sends `first` at once, then the rest of `bytes` one byte per `interval`,
/// until stopped (a slow-loris: every read sees progress, the message never ends in time).
final class Dribbler: Sendable {
    let fd: Int32
    private let stopSignal = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    let sentCount = Atomic<Int>(0)

    init(path: String, bytes: [UInt8], first: Int, interval: Double = 1.0) throws {
        fd = try UnixSocket.connect(path: path).take()
        // Safety: the pointer is used only for this one send() call inside the closure.
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, first, Int32(MSG_NOSIGNAL)) }
        sentCount.store(first, ordering: .relaxed)
        Thread.detachNewThread { [self] in
            for i in first..<bytes.count {
                if stopSignal.wait(timeout: .now() + interval) == .success { break }
                var b = bytes[i]
                if send(fd, &b, 1, Int32(MSG_NOSIGNAL)) != 1 { break }
                sentCount.store(i + 1, ordering: .relaxed)
            }
            finished.signal()
        }
    }

    private let stopped = Atomic<Bool>(false)

    /// Stops dribbling and closes the connection (once; later calls do nothing).
    func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        stopSignal.signal()
        finished.wait()
        Glibc.close(fd)
    }
}

final class HostileSocketTests: XCTestCase {
    var dir = ""
    var daemon: Daemon?
    var socketPath: String { dir + "/vdpa0.sock" }
    var controlPath: String { dir + "/control.sock" }
    var port: VDPA.Port { daemon!.ports[0] }
    static let idleTimeout = 3.0
    static let maxControlClients = 3
    /// A stop that is not held by any peer returns at once; this leaves room for a loaded machine.
    static let stopBound = 2.0

    var logger: Logger {
        var l = Logger(label: "test")
        l.logLevel = .critical
        return l
    }

    override func setUpWithError() throws {
        dir = "/tmp/vdpa-hsock-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let d = try Daemon(specs: [PortSpec(id: "vdpa0", socketPath: dir + "/vdpa0.sock"),
                                   PortSpec(id: "vdpa1", socketPath: dir + "/vdpa1.sock")],
                           controlPath: dir + "/control.sock", logger: logger,
                           controlOptions: ControlOptions(maxClients: Self.maxControlClients, idleTimeoutSeconds: Self.idleTimeout))
        try d.start()
        daemon = d
    }

    override func tearDown() {
        if let d = daemon {
            let start = Date()
            d.stop()
            XCTAssertLessThan(Date().timeIntervalSince(start), 5, "daemon shutdown took too long")
        }
        daemon = nil
        try? FileManager.default.removeItem(atPath: dir)
    }

    func waitFor(_ what: String, seconds: Double = 5, file: StaticString = #filePath, line: UInt = #line, _ condition: () -> Bool) {
        let deadline = Date().addingTimeInterval(seconds)
        while !condition() && Date() < deadline { usleep(10_000) }
        XCTAssertTrue(condition(), "timed out waiting for \(what)", file: file, line: line)
    }

    /// A new, well-formed frontend on `path` gets an answer.
    func assertFrontendWorks(_ path: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let f = try RawFrontend(path: path)
        try f.request(.getFeatures)
        let r = try XCTUnwrap(try f.reply(), "no reply to GET_FEATURES on \(path)", file: file, line: line)
        XCTAssertEqual(r.0.request, VhostUserRequest.getFeatures.rawValue, file: file, line: line)
    }

    /// The other port answers while port 0 is under attack.
    func assertOtherPortUndisturbed(file: StaticString = #filePath, line: UInt = #line) throws {
        try assertFrontendWorks(dir + "/vdpa1.sock", file: file, line: line)
    }

    // MARK: class 7: deadlines on the vhost-user port

    /// Half a header, then one byte a second: every read makes progress, so a per-read timeout
    /// never fires. The whole message is due 5 s after its first byte.
    func testDribblingFrontendIsCutAtTheMessageDeadline() throws {
        let message = VhostUserCodec.encodeRequest(.setFeatures, payload: .u64(1 << 32))  // 20 bytes: 14 s at 1 byte/s
        let start = Date()
        let d = try Dribbler(path: socketPath, bytes: message, first: 6)
        defer { d.stop() }
        try assertOtherPortUndisturbed()
        XCTAssertTrue(peerHangsUp(d.fd, within: Port.messageTimeoutSeconds + 3),
                      "a frontend dribbling one byte a second kept its message open past the deadline")
        XCTAssertLessThan(d.sentCount.load(ordering: .relaxed), message.count, "the message must not have completed")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(start), Port.messageTimeoutSeconds - 0.5, "cut before the deadline")
        waitFor("disconnect") { port.status.connection == "listening" }
        let err = port.status.lastError ?? ""
        XCTAssertTrue(err.contains("deadline"), "lastError should say the deadline passed: \(err)")
        try assertFrontendWorks(socketPath)
    }

    /// stop() returns at once while a frontend holds a message open, not when the peer lets go.
    func testStopReturnsWhileAFrontendDribbles() throws {
        let message = VhostUserCodec.encodeRequest(.setFeatures, payload: .u64(1 << 32))
        let d = try Dribbler(path: socketPath, bytes: message, first: 6)
        // The port has read the first bytes: it is inside the message, waiting for the rest.
        waitFor("the port to read the first bytes") { unreadByPeer(d.fd) == 0 && port.status.connection == "connected" }
        let daemon = self.daemon!
        self.daemon = nil
        let start = Date()
        XCTAssertTrue(returns(within: Self.stopBound, { daemon.stop() }, unblock: { d.stop() }),
                      "daemon.stop() was held by a frontend that never finishes its message")
        XCTAssertLessThan(Date().timeIntervalSince(start), 5)
        XCTAssertTrue(peerHangsUp(d.fd, within: 1), "the connection closes with the daemon")
        d.stop()
    }

    /// Sends requests that need replies and never reads, until the port stops taking requests
    /// (no room for 500 ms: it is stuck on a reply). Returns the number of requests sent.
    func floodWithoutReading(_ fd: borrowing FileDescriptor, max: Int = 200_000) throws -> Int {
        try UnixSocket.setBlocking(fd, false)
        let one = VhostUserCodec.encodeRequest(.getFeatures, payload: .none)
        var sent = 0
        while sent < max {
            let n = try UnixSocket.sendAvailable(fd, one)
            if n == 0 {
                var pfd = pollfd(fd: fd.raw, events: Int16(POLLOUT), revents: 0)
                if poll(&pfd, 1, 500) == 1 && pfd.revents & Int16(POLLOUT) != 0 { continue }
                break
            }
            XCTAssertEqual(n, one.count)
            sent += 1
        }
        return sent
    }

    /// A frontend that sends many requests needing replies and never reads them is
    /// disconnected once a reply has waited the reply deadline; the port serves the next one.
    func testFrontendThatNeverReadsRepliesIsDisconnected() throws {
        let fd = try UnixSocket.connect(path: socketPath)
        waitFor("connection") { port.status.connection == "connected" }
        let sent = try floodWithoutReading(fd)
        XCTAssertGreaterThan(sent, 100)
        try assertOtherPortUndisturbed()
        let closed = peerHangsUp(fd.raw, within: Port.replyTimeoutSeconds + 5)
        XCTAssertTrue(closed, "a frontend that never reads its replies held the port thread")
        _ = consume fd  // without the fix, this is what frees the port thread
        waitFor("disconnect") { port.status.connection == "listening" }
        if closed {
            let err = port.status.lastError ?? ""
            XCTAssertTrue(err.contains("sending reply") && err.contains("deadline"), "lastError: \(err)")
        }
        try assertFrontendWorks(socketPath)
    }

    /// stop() returns at once while the port waits for a frontend to read its replies.
    func testStopReturnsWhileAFrontendIgnoresReplies() throws {
        let fd = try UnixSocket.connect(path: socketPath)
        waitFor("connection") { port.status.connection == "connected" }
        _ = try floodWithoutReading(fd)
        // The port thread sleeps although requests wait for it: it waits for room for a reply.
        var sleeps = 0
        waitFor("the port thread to wait on a reply") {
            if unreadByPeer(fd.raw) > 0 && threadState(named: "port-vdpa0") == "S" { sleeps += 1 } else { sleeps = 0 }
            return sleeps >= 3
        }
        let daemon = self.daemon!
        self.daemon = nil
        let raw = fd.raw
        XCTAssertTrue(returns(within: Self.stopBound, { daemon.stop() }, unblock: { _ = shutdown(raw, Int32(SHUT_RDWR)) }),
                      "daemon.stop() was held by a frontend that does not read its replies")
        _ = consume fd
    }

    /// Client mode: a frontend that listens but never accepts (its backlog full) cannot hold the
    /// port thread in connect(); the port reports it, retries, and connects once there is room.
    func testClientConnectToAFrontendThatNeverAccepts() throws {
        let frontendPath = dir + "/frontend.sock"
        let listener = try UnixSocket.listen(path: frontendPath, backlog: 0)
        var fillers: [Int32] = []
        defer { for f in fillers { Glibc.close(f) } }
        while fillers.count < 16, let f = try? UnixSocket.connect(path: frontendPath, nonBlocking: true) { fillers.append(f.take()) }
        XCTAssertLessThan(fillers.count, 16, "the backlog should be full")
        let client = try Port(spec: PortSpec(id: "c0", socketPath: frontendPath, client: true), device: nil, logger: logger)
        try client.start()
        waitFor("the port to report the failed connect") { client.status.lastError?.contains("connect") ?? false }
        XCTAssertEqual(client.status.connection, "connecting")
        // Room in the backlog: the port connects on its next try, and serves the frontend.
        for f in fillers { Glibc.close(f) }
        fillers = []
        var pfd = pollfd(fd: listener.raw, events: Int16(POLLIN), revents: 0)
        while poll(&pfd, 1, 0) == 1 { _ = try UnixSocket.accept(listener) }  // the fillers' queued connections
        XCTAssertEqual(poll(&pfd, 1, 8000), 1, "the port did not connect once the backlog had room")
        let backend = try UnixSocket.accept(listener)
        try UnixSocket.setReceiveTimeout(backend, seconds: 5)
        try UnixSocket.send(backend, VhostUserCodec.encodeRequest(.getFeatures, payload: .none))
        var header = [UInt8](repeating: 0, count: 12)
        var fds = ReceivedFDs()
        try header.withUnsafeMutableBytes { try UnixSocket.receiveExactly(backend, into: $0, fds: &fds) }
        XCTAssertEqual(header.withUnsafeBytes { VhostUserCodec.decodeReplyHeader($0)?.request }, VhostUserRequest.getFeatures.rawValue)
        XCTAssertTrue(returns(within: Self.stopBound, { client.stop() }, unblock: {}))
        _ = consume backend
        _ = consume listener
    }

    /// Client mode: stop() returns at once while the frontend's backlog is full.
    func testStopReturnsWhileClientConnectCannotComplete() throws {
        let frontendPath = dir + "/frontend.sock"
        let listener = try UnixSocket.listen(path: frontendPath, backlog: 0)
        var fillers: [Int32] = []
        defer { for f in fillers { Glibc.close(f) } }
        while fillers.count < 16, let f = try? UnixSocket.connect(path: frontendPath, nonBlocking: true) { fillers.append(f.take()) }
        let client = try Port(spec: PortSpec(id: "c0", socketPath: frontendPath, client: true), device: nil, logger: logger)
        try client.start()
        let raw = listener.raw
        // Unblocking: accepting one queued connection makes room, which wakes a blocked connect().
        XCTAssertTrue(returns(within: Self.stopBound, { client.stop() }, unblock: { _ = Glibc.close(Glibc.accept(raw, nil, nil)) }),
                      "Port.stop() was held by a connect() to a frontend that never accepts")
        _ = consume listener
    }

    // MARK: class 7: the control socket

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

    // MARK: class 8: socket paths

    func requireRoot() throws {
        guard geteuid() == 0 else { throw XCTSkip("needs root to make files owned by another user") }
    }

    func startFails(_ socket: String, file: StaticString = #filePath, line: UInt = #line) -> String? {
        do {
            let d = try Daemon(specs: [PortSpec(id: "p", socketPath: socket)], controlPath: nil, logger: logger)
            do { try d.start() } catch { return "\(error)" }
            d.stop()
            return nil
        } catch {
            XCTFail("\(error)", file: file, line: line)
            return nil
        }
    }

    func makeDir(_ path: String, mode: mode_t, owner: uid_t? = nil) throws {
        XCTAssertEqual(mkdir(path, 0o700), 0, path)
        XCTAssertEqual(chmod(path, mode), 0, path)  // mkdir's mode is masked by the umask
        if let owner { XCTAssertEqual(chown(path, owner, owner), 0, path) }
    }

    /// A symlink someone else planted on the socket's path is not followed (neither to create
    /// directories nor to bind); root's own symlinks (like /var/run -> /run) are.
    func testPlantedSymlinkInTheSocketPathIsNotFollowed() throws {
        try requireRoot()
        daemon?.stop()
        daemon = nil
        try makeDir(dir + "/elsewhere", mode: 0o755)
        XCTAssertEqual(symlink(dir + "/elsewhere", dir + "/planted"), 0)
        XCTAssertEqual(lchown(dir + "/planted", 65534, 65534), 0)
        let err = startFails(dir + "/planted/sub/p.sock")
        XCTAssertNotNil(err, "a socket was created through a symlink owned by another user")
        XCTAssertTrue(err?.contains(dir + "/planted") ?? false, "the error names the symlink: \(err ?? "")")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/elsewhere/sub"), "a directory was created through the symlink")
        // Control: a symlink owned by root is followed.
        XCTAssertEqual(symlink(dir + "/elsewhere", dir + "/ours"), 0)
        XCTAssertNil(startFails(dir + "/ours/p.sock"))
        // A symlink at the socket path itself is neither followed nor removed.
        XCTAssertEqual(symlink(dir + "/elsewhere/target", dir + "/elsewhere/q.sock"), 0)
        XCTAssertTrue(startFails(dir + "/elsewhere/q.sock")?.contains("not a socket") ?? false)
        var st = stat()
        XCTAssertEqual(lstat(dir + "/elsewhere/q.sock", &st), 0)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFLNK)
    }

    /// A socket directory (or a directory above it) that others can write to and that is not
    /// sticky is refused with an error naming it; a sticky one (like /tmp) is accepted.
    func testDirectoryWritableByOthersIsRefused() throws {
        daemon?.stop()
        daemon = nil
        try makeDir(dir + "/world", mode: 0o777)
        try makeDir(dir + "/group", mode: 0o775)
        try makeDir(dir + "/sticky", mode: 0o1777)
        for d in [dir + "/world", dir + "/group"] {
            let err = startFails(d + "/p.sock")
            XCTAssertNotNil(err, "a socket was created in \(d), writable by others")
            XCTAssertTrue(err?.contains(d) ?? false && err?.contains("writable") ?? false, "error: \(err ?? "")")
        }
        let below = startFails(dir + "/world/sub/p.sock")
        XCTAssertTrue(below?.contains(dir + "/world ") ?? false, "a directory above the socket's is checked too: \(below ?? "")")
        XCTAssertNil(startFails(dir + "/sticky/p.sock"), "a sticky directory is fine")
    }

    /// A live socket at the port's path whose listener never accepts (backlog full): the
    /// daemon refuses to take it over, and the check does not hang start-up in connect().
    func testLiveSocketWithFullBacklogIsRefusedWithoutHanging() throws {
        daemon?.stop()
        daemon = nil
        let path = dir + "/busy.sock"
        let listener = try UnixSocket.listen(path: path, backlog: 0)
        var fillers: [Int32] = []
        defer { for f in fillers { Glibc.close(f) } }
        while fillers.count < 16, let f = try? UnixSocket.connect(path: path, nonBlocking: true) { fillers.append(f.take()) }
        let result = Mutex<String?>(nil)
        let raw = listener.raw
        let log = logger
        XCTAssertTrue(returns(within: Self.stopBound, {
            do {
                let d = try Daemon(specs: [PortSpec(id: "p", socketPath: path)], controlPath: nil, logger: log)
                do { try d.start(); d.stop() } catch { result.withLock { $0 = "\(error)" } }
            } catch { result.withLock { $0 = "unexpected: \(error)" } }
        }, unblock: { _ = Glibc.close(Glibc.accept(raw, nil, nil)) }), "start-up hung probing a live socket that never accepts")
        let err = result.withLock { $0 } ?? ""
        XCTAssertTrue(err.contains("in use"), "error: \(err)")
        _ = consume listener
    }

    /// A socket directory owned by another user is refused.
    func testDirectoryOwnedByAnotherUserIsRefused() throws {
        try requireRoot()
        daemon?.stop()
        daemon = nil
        try makeDir(dir + "/theirs", mode: 0o755, owner: 65534)
        let err = startFails(dir + "/theirs/p.sock")
        XCTAssertNotNil(err, "a socket was created in a directory owned by another user")
        XCTAssertTrue(err?.contains(dir + "/theirs") ?? false && err?.contains("owned by uid 65534") ?? false, "error: \(err ?? "")")
    }

    /// An attacker who swaps the socket path for a symlink as soon as the socket appears cannot
    /// redirect the mode or group to another file: they are set before the socket is visible.
    /// Removing the socket at stop leaves whatever is at the path now alone.
    func testSocketModeAndGroupCannotBeRedirectedBySwappingThePath() throws {
        daemon?.stop()
        daemon = nil
        let victim = dir + "/victim"
        XCTAssertTrue(FileManager.default.createFile(atPath: victim, contents: Data("x".utf8)))
        XCTAssertEqual(chmod(victim, 0o600), 0)
        let path = dir + "/p.sock"
        let group: gid_t = getgid() == 0 ? 1 : getgid()
        let (listener, file) = try createListeningSocket(path, ownership: SocketOwnership(group: group, mode: 0o666)) {
            // The attacker: take the socket away and put a symlink to the victim in its place.
            XCTAssertEqual(rename(path, path + ".moved"), 0)
            XCTAssertEqual(symlink(victim, path), 0)
        }
        var st = stat()
        XCTAssertEqual(stat(victim, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600, "the socket's mode was applied to the victim through the symlink")
        XCTAssertEqual(st.st_gid, getgid(), "the socket's group was applied to the victim through the symlink")
        XCTAssertEqual(stat(path + ".moved", &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o666, "the socket itself has its mode")
        XCTAssertEqual(st.st_gid, group)
        file.remove()
        XCTAssertEqual(lstat(path, &st), 0, "removing our socket must not remove what is at the path now")
        _ = listener
    }
}
