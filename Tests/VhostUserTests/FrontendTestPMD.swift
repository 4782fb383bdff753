#if canImport(Glibc)
import Glibc
#endif
import Foundation
import XCTest

/// A `dpdk-testpmd` process running DPDK's vhost PMD as a vhost-user server, for interop tests.
/// Its stdin is a pipe kept open (non-interactive testpmd exits when stdin reaches EOF);
/// stdout and stderr go to a log file that failures quote.
final class FrontendTestPMD {
    let socketPath: String
    let logPath: String
    let filePrefix: String
    private let process = Process()
    private let stdinPipe = Pipe()

    /// Finds `dpdk-testpmd`: $DPDK_TESTPMD if set (a path; a missing one means "absent"),
    /// else on PATH and in /usr/bin.
    static func locate() -> String? {
        if let given = ProcessInfo.processInfo.environment["DPDK_TESTPMD"] {
            return access(given, X_OK) == 0 ? given : nil
        }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        for dir in path.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/local/bin"] {
            let candidate = dir + "/dpdk-testpmd"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// Skips (XCTSkip) when testpmd is absent, unless VDPA_REQUIRE_PEERS=1, where that is a failure.
    static func requireBinary() throws -> String {
        if let p = locate() { return p }
        if ProcessInfo.processInfo.environment["VDPA_REQUIRE_PEERS"] == "1" {
            throw XCTSkipFailure("dpdk-testpmd is not installed and VDPA_REQUIRE_PEERS=1")
        }
        throw XCTSkip("dpdk-testpmd not installed (apt-get install dpdk-dev); set VDPA_REQUIRE_PEERS=1 to make this a failure")
    }

    init(binary: String, tag: String, forwardMode: String = "rxonly") throws {
        let pid = getpid()
        let unique = "\(pid)-\(tag)"
        socketPath = "/tmp/fe-\(unique).sock"
        logPath = NSTemporaryDirectory() + "fe-testpmd-\(unique).log"
        filePrefix = "fe-\(unique)"
        unlink(socketPath)
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = [
            "-l", "0-1", "--main-lcore", "0", "--no-huge", "-m", "1024", "--no-pci",
            "--file-prefix=\(filePrefix)", "--vdev", "net_vhost0,iface=\(socketPath),queues=1",
            // --no-mlockall is a testpmd option, not an EAL one: it goes after "--".
            "--", "--no-mlockall", "--forward-mode=\(forwardMode)", "-a", "--total-num-mbufs=16384",
        ]
        process.standardInput = stdinPipe
        process.standardOutput = log
        process.standardError = log
        try process.run()
    }

    var isRunning: Bool { process.isRunning }

    /// The last `lines` lines of testpmd's output.
    func logTail(_ lines: Int = 40) -> String {
        let text = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "(no log)"
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Stops testpmd: EOF on stdin (its clean exit), then SIGTERM, then SIGKILL; always reaps it
    /// and removes its socket and runtime directory (and its log if `removeLog`, i.e. the test
    /// passed). Safe to call more than once.
    func stop(removeLog: Bool = false) {
        if process.isRunning {
            try? stdinPipe.fileHandleForWriting.close()
            if !waitExit(seconds: 5) { process.terminate() }
            if !waitExit(seconds: 3) { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        unlink(socketPath)
        try? FileManager.default.removeItem(atPath: "/var/run/dpdk/\(filePrefix)")
        if removeLog { unlink(logPath) }
    }

    private func waitExit(seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        return !process.isRunning
    }

    deinit { stop() }
}

/// XCTSkip's counterpart that fails the test instead (thrown errors fail XCTest tests).
struct XCTSkipFailure: Error, CustomStringConvertible {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}
