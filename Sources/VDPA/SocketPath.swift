#if canImport(Glibc)
import Glibc
#endif
import Platform

/// Who owns the sockets the daemon creates and with which mode (QEMU often runs as another user).
public struct SocketOwnership: Sendable, Equatable {
    public var group: gid_t?
    public var mode: mode_t?
    public init(group: gid_t? = nil, mode: mode_t? = nil) { self.group = group; self.mode = mode }
}

public struct SocketPathError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// Makes `path` ready to bind: creates its directory, replaces a stale socket left by a dead
/// process, and refuses a live one or a file that is not a socket.
public func prepareSocketPath(_ path: String) throws(SocketPathError) {
    guard path.utf8.count < 108 else { throw SocketPathError(message: "socket path too long (max 107 bytes): \(path)") }
    if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
        let dir = String(path[..<slash])
        try makeDirectories(dir)
    }
    var st = stat()
    guard lstat(path, &st) == 0 else { return }
    guard (st.st_mode & S_IFMT) == S_IFSOCK else {
        throw SocketPathError(message: "\(path) exists and is not a socket; refusing to replace it")
    }
    do {
        _ = try UnixSocket.connect(path: path)
        throw SocketPathError(message: "\(path) is in use by a running process; refusing to take it over")
    } catch let e as SocketPathError {
        throw e
    } catch {
        // Nobody listens: a stale socket from a dead daemon. Replace it.
        guard unlink(path) == 0 || errno == ENOENT else {
            throw SocketPathError(message: "cannot remove stale socket \(path): \(String(cString: strerror(errno)))")
        }
    }
}

func makeDirectories(_ dir: String) throws(SocketPathError) {
    var current = dir.hasPrefix("/") ? "" : "."
    for part in dir.split(separator: "/") {
        current += "/" + part
        if mkdir(current, 0o755) != 0 && errno != EEXIST {
            throw SocketPathError(message: "cannot create directory \(current): \(String(cString: strerror(errno)))")
        }
    }
}

/// Applies `--socket-group` / `--socket-mode` to a bound socket file.
public func applyOwnership(_ path: String, _ ownership: SocketOwnership) throws(SocketPathError) {
    if let g = ownership.group, chown(path, UInt32.max, g) != 0 {
        throw SocketPathError(message: "cannot set group \(g) on \(path): \(String(cString: strerror(errno)))")
    }
    if let m = ownership.mode, chmod(path, m) != 0 {
        throw SocketPathError(message: "cannot set mode \(String(m, radix: 8)) on \(path): \(String(cString: strerror(errno)))")
    }
}
