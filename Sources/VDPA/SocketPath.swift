import Platform

/// Who owns the sockets the daemon creates and with which mode (QEMU often runs as another user).
public struct SocketOwnership: Sendable, Equatable {
    public var group: GroupID?
    public var mode: FileMode?
    public init(group: GroupID? = nil, mode: FileMode? = nil) { self.group = group; self.mode = mode }
}

public struct SocketPathError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// Splits a socket path into its directory and its name.
func splitSocketPath(_ path: String) throws(SocketPathError) -> (directory: String, name: String) {
    guard path.utf8.count < 108 else { throw SocketPathError(message: "socket path too long (max 107 bytes): \(path)") }
    guard let slash = path.lastIndex(of: "/") else { return (".", path) }
    let name = String(path[path.index(after: slash)...])
    guard !name.isEmpty, name != ".", name != ".." else { throw SocketPathError(message: "socket path \(path) does not name a file") }
    return (slash == path.startIndex ? "/" : String(path[..<slash]), name)
}

/// Makes `path` ready to bind and returns its directory, held open: creates the directory
/// without following symlinks planted by others, refuses a directory others can write to,
/// replaces a stale socket left by a dead process, and refuses a live one or a file that is not
/// a socket (a symlink included: it is never followed nor removed).
func openSocketDirectory(_ path: String) throws(SocketPathError) -> SocketDirectory {
    let (dirPath, name) = try splitSocketPath(path)
    let dir: SocketDirectory
    do { dir = try SocketDirectory.open(dirPath, create: true) } catch { throw SocketPathError(message: "\(path): \(error)") }
    do {
        switch try dir.entry(name) {
        case .absent:
            break
        case .other(let kind):
            throw SocketPathError(message: "\(path) exists and is not a socket (it is \(kind)); refusing to replace it")
        case .socket:
            if try dir.isListening(name) {
                throw SocketPathError(message: "\(path) is in use by a running process; refusing to take it over")
            }
            // Nobody listens: a stale socket from a dead daemon. Replace it (the entry itself).
            try dir.remove(name)
        }
    } catch let e as SocketPathError {
        throw e
    } catch {
        throw SocketPathError(message: "\(error)")
    }
    return dir
}

/// Makes `path` ready to bind (see `openSocketDirectory`).
public func prepareSocketPath(_ path: String) throws(SocketPathError) {
    _ = try openSocketDirectory(path)
}

/// A socket file the daemon created; removed at stop only if the entry is still that socket.
public final class SocketFile: Sendable {
    public let path: String
    private let directory: SocketDirectory
    private let name: String
    private let identity: SocketIdentity

    init(path: String, directory: consuming SocketDirectory, name: String, identity: SocketIdentity) {
        self.path = path
        self.directory = directory
        self.name = name
        self.identity = identity
    }

    public func remove() { directory.removeSocket(name, identity) }
}

/// Binds a listening socket at `path` with `ownership` (`--socket-group`, `--socket-mode`)
/// applied before the socket appears at `path` (see `SocketDirectory.bindListener`).
/// `afterPublish` is for tests: it runs once the socket is visible at `path`.
func createListeningSocket(_ path: String, ownership: SocketOwnership, backlog: Int32 = 8,
                           afterPublish: (() -> Void)? = nil) throws(SocketPathError) -> (SharedFD, SocketFile) {
    let name = try splitSocketPath(path).name
    let dir = try openSocketDirectory(path)
    var identity = SocketIdentity()
    let listener: FileDescriptor
    do {
        listener = try dir.bindListener(name, mode: ownership.mode, group: ownership.group, backlog: backlog,
                                        created: &identity, afterPublish: afterPublish)
    } catch { throw SocketPathError(message: "cannot listen on \(path): \(error)") }
    return (SharedFD(listener), SocketFile(path: path, directory: dir, name: name, identity: identity))
}
