import Glibc

/// Runs a program and waits for it, with posix_spawn and waitpid. Not Foundation's `Process`: in a
/// fresh network namespace (loopback down) it logged "Could not create wakeup socket pair for
/// CFSocket" and `waitUntilExit` never returned.
enum Command {
    struct Failed: Error, CustomStringConvertible {
        let description: String
    }

    /// Runs `argv` (argv[0] a path) and returns its standard output; throws unless it exits 0.
    @discardableResult
    static func run(_ argv: [String]) throws(Failed) -> [UInt8] {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw Failed(description: "pipe: \(String(cString: strerror(errno)))") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_addclose(&actions, fds[0])
        // The C strings live until the end of this function; posix_spawn copies them into the child.
        let cargs = argv.map { strdup($0) }
        defer { cargs.forEach { free($0) } }
        var pid: pid_t = 0
        let r = (cargs + [nil]).withUnsafeBufferPointer { a in
            posix_spawn(&pid, argv[0], &actions, nil, UnsafeMutablePointer(mutating: a.baseAddress!), environ)
        }
        close(fds[1])
        defer { close(fds[0]) }
        guard r == 0 else { throw Failed(description: "\(argv[0]): \(String(cString: strerror(r)))") }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fds[0], &chunk, chunk.count)
            if n > 0 { out += chunk[0..<n]; continue }
            if n < 0 && errno == EINTR { continue }
            break
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // WIFEXITED && WEXITSTATUS == 0 (C macros): the low 7 bits 0 (no signal), then the exit code.
        guard status & 0x7F == 0 && (status >> 8) & 0xFF == 0 else {
            throw Failed(description: "\(argv.joined(separator: " ")) failed (wait status \(status))")
        }
        return out
    }
}
