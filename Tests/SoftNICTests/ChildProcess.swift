#if canImport(Glibc)
import Glibc
#endif
import Foundation
import XCTest

/// Runs one test of this bundle again in a child process (the same xctest executable with a
/// filter), for checks that can crash the process or need a different environment (LD_PRELOAD).
/// The child sees `SOFTNIC_CHILD=<Class/test>` and takes the "inside" branch of the test.
enum ChildProcess {
    static let marker = "SOFTNIC_CHILD"

    struct Result {
        var exitStatus: Int32
        var signal: Int32?
        var timedOut: Bool
        var output: String
        var succeeded: Bool { !timedOut && signal == nil && exitStatus == 0 }
        /// The crashed thread's backtrace if the child crashed, else the output's tail.
        var excerpt: String {
            if let r = output.range(of: "Program crashed") {
                var text = String(output[r.lowerBound...].prefix(600))
                if let t = output.range(of: " crashed:\n") {
                    let start = output[..<t.lowerBound].lastIndex(of: "\n") ?? t.lowerBound
                    text += "\n...\n" + String(output[start...].prefix(2500))
                }
                return text
            }
            return String(output.suffix(3000))
        }
        var summary: String {
            if timedOut { return "child timed out" }
            if let signal { return "child killed by signal \(signal) (\(String(cString: strsignal(signal))))" }
            return "child exit status \(exitStatus)"
        }
    }

    /// Whether this process is the child started for `test` ("Class/method").
    static func isChild(_ test: String) -> Bool {
        ProcessInfo.processInfo.environment[marker] == test
    }

    /// "testFoo()" → "testFoo".
    static func name(_ function: String) -> String {
        function.hasSuffix("()") ? String(function.dropLast(2)) : function
    }

    /// The test executable this process runs.
    static var executable: String? {
        try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
    }

    /// Runs `SoftNICTests.<test>` in a child with extra environment; kills it after `timeout` seconds.
    static func run(test: String, environment extra: [String: String] = [:], timeout: Double = 60) throws -> Result {
        guard let exe = executable else { throw XCTSkip("cannot find the test executable") }
        let dir = NSTemporaryDirectory() + "softnic-child-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let logPath = dir + "/output.txt"
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))

        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = ["SoftNICTests.\(test)"]
        var env = ProcessInfo.processInfo.environment
        env[marker] = test
        for (k, v) in extra { env[k] = v }
        p.environment = env
        p.standardOutput = log
        p.standardError = log
        try p.run()
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        let timedOut = p.isRunning
        if timedOut {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
        }
        try? log.close()
        // A child that crashed never ran its tearDown: remove its daemon's socket directories.
        let prefix = "softnic-test-\(p.processIdentifier)-"
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/tmp")) ?? [] where name.hasPrefix(prefix) {
            try? FileManager.default.removeItem(atPath: "/tmp/" + name)
        }
        let output = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        let signaled = p.terminationReason == .uncaughtSignal
        return Result(exitStatus: signaled ? -1 : p.terminationStatus, signal: signaled ? p.terminationStatus : nil,
                      timedOut: timedOut, output: output)
    }
}
