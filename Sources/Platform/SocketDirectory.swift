#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// Why a socket path cannot be used safely; the message names the path at fault.
public struct PathSafetyError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// What a directory entry is, looked at without following a symlink.
public enum DirectoryEntry: Equatable, Sendable {
    case absent
    case socket(device: UInt64, inode: UInt64)
    /// Anything else (a symlink, a regular file, a directory...): `kind` says which.
    case other(kind: String)
}

/// Which file a socket we created is (device and inode), so that it is removed only if it is
/// still that one.
public struct SocketIdentity: Sendable, Equatable {
    public var device: UInt64
    public var inode: UInt64
    public init(device: UInt64 = 0, inode: UInt64 = 0) { self.device = device; self.inode = inode }
}

/// A directory that sockets are created in, held open so that every operation on its entries
/// acts on this directory, whatever happens to the path that led here afterwards.
///
/// Opening it walks the path one component at a time from `/` (or the working directory) with
/// `openat(O_NOFOLLOW)`, creating missing directories (mode 0755). A symlink on the way is
/// followed only when root or this process's user owns it (so `/var/run -> /run` works and
/// a link someone else planted does not). Every directory on the way, and the socket directory
/// itself, must be trusted: owned by root or by us, and not writable by group or others unless
/// sticky (like /tmp), so nobody else can rename, replace or plant entries in it.
public struct SocketDirectory: ~Copyable, Sendable {
    public let path: String
    let fd: FileDescriptor

    public static func open(_ dir: String, create: Bool) throws(PathSafetyError) -> SocketDirectory {
        let absolute = dir.hasPrefix("/")
        var walked = absolute ? "/" : "."
        var current: FileDescriptor
        do {
            current = FileDescriptor(owning: try syscallRetrying("open(\(walked))") {
                openRaw(walked, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            })
        } catch { throw PathSafetyError("cannot open directory \(walked): \(error)") }
        try checkTrusted(current, walked)
        for part in dir.split(separator: "/") where part != "." {
            let name = String(part)
            walked = walked == "/" ? "/" + name : walked + "/" + name
            if create {
                let r = mkdiratRaw(current.raw, name, 0o755)
                if r != 0, case let e = cvdpa_errno(), e != EEXIST {
                    throw PathSafetyError("cannot create directory \(walked): \(SystemError("mkdir", errno: e))")
                }
            }
            current = try openComponent(in: current, name, walked)
            try checkTrusted(current, walked)
        }
        return SocketDirectory(path: dir.isEmpty ? "." : dir, fd: current)
    }

    /// Opens `name` in `parent` as a directory without following a symlink, unless the symlink
    /// is root's or ours (the parent is already trusted, so nobody else can swap it meanwhile).
    static func openComponent(in parent: borrowing FileDescriptor, _ name: String, _ walked: String) throws(PathSafetyError) -> FileDescriptor {
        let r = openatRaw(parent.raw, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if r >= 0 { return FileDescriptor(owning: r) }
        let e = cvdpa_errno()
        // O_NOFOLLOW|O_DIRECTORY on a symlink fails with ELOOP or ENOTDIR, depending on the kernel.
        guard e == ELOOP || e == ENOTDIR else {
            throw PathSafetyError("cannot open directory \(walked): \(SystemError("openat", errno: e))")
        }
        var st = stat()
        guard fstatatRaw(parent.raw, name, &st, AT_SYMLINK_NOFOLLOW) == 0, (st.st_mode & S_IFMT) == S_IFLNK else {
            throw PathSafetyError("\(walked) is not a directory")
        }
        guard st.st_uid == 0 || st.st_uid == geteuid() else {
            throw PathSafetyError("\(walked) is a symlink owned by uid \(st.st_uid) (not root or uid \(geteuid())); refusing to follow it")
        }
        let followed = openatRaw(parent.raw, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard followed >= 0 else {
            throw PathSafetyError("cannot open directory \(walked) (a symlink): \(SystemError("openat", errno: cvdpa_errno()))")
        }
        return FileDescriptor(owning: followed)
    }

    /// Owned by root or us, and not writable by group or others unless sticky.
    static func checkTrusted(_ fd: borrowing FileDescriptor, _ walked: String) throws(PathSafetyError) {
        var st = stat()
        guard fstat(fd.raw, &st) == 0 else {
            throw PathSafetyError("cannot stat directory \(walked): \(SystemError("fstat", errno: cvdpa_errno()))")
        }
        let me = geteuid()
        guard st.st_uid == 0 || st.st_uid == me else {
            throw PathSafetyError("socket directory \(walked) is owned by uid \(st.st_uid) (not root or uid \(me)); refusing to create sockets below it")
        }
        let mode = st.st_mode & 0o7777
        if mode & 0o022 != 0 && mode & mode_t(CVDPA_S_ISVTX) == 0 {
            throw PathSafetyError("socket directory \(walked) is writable by \(mode & 0o002 != 0 ? "others" : "its group") (mode 0\(String(mode, radix: 8))) and not sticky; refusing to create sockets below it")
        }
    }

    /// What `name` is, without following a symlink.
    public func entry(_ name: String) throws(PathSafetyError) -> DirectoryEntry {
        var st = stat()
        if fstatatRaw(fd.raw, name, &st, AT_SYMLINK_NOFOLLOW) != 0 {
            let e = cvdpa_errno()
            if e == ENOENT { return .absent }
            throw PathSafetyError("cannot stat \(path)/\(name): \(SystemError("fstatat", errno: e))")
        }
        switch st.st_mode & S_IFMT {
        case S_IFSOCK: return .socket(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        case S_IFLNK: return .other(kind: "a symlink")
        case S_IFDIR: return .other(kind: "a directory")
        case S_IFREG: return .other(kind: "a regular file")
        default: return .other(kind: "not a socket")
        }
    }

    /// A path that reaches `name` in this very directory (through /proc/self/fd), for the calls
    /// that take a path (bind, connect). Nil when it does not fit in sockaddr_un.
    func pinnedPath(_ name: String) -> String? {
        let p = "/proc/self/fd/\(fd.raw)/\(name)"
        return p.utf8.count < 108 ? p : nil
    }

    /// True when a process listens on the socket `name` (a non-blocking connect succeeds or finds
    /// the backlog full), false when nobody does (ECONNREFUSED: a stale socket). Any other
    /// failure is an error, so that a socket is never taken for stale when it was not probed.
    public func isListening(_ name: String) throws(PathSafetyError) -> Bool {
        guard let p = pinnedPath(name) else { throw PathSafetyError("socket name too long: \(name)") }
        do {
            _ = try UnixSocket.connect(path: p, nonBlocking: true)
            return true
        } catch {
            if case .system(let e) = error {
                if e.errno == EAGAIN { return true }
                if e.errno == ECONNREFUSED { return false }
            }
            throw PathSafetyError("cannot tell whether \(path)/\(name) is in use: \(error)")
        }
    }

    /// Removes the entry `name` itself (never what a symlink points to).
    public func remove(_ name: String) throws(PathSafetyError) {
        if unlinkatRaw(fd.raw, name, 0) != 0, case let e = cvdpa_errno(), e != ENOENT {
            throw PathSafetyError("cannot remove \(path)/\(name): \(SystemError("unlinkat", errno: e))")
        }
    }

    /// Removes `name` only if it is still the socket we created.
    public func removeSocket(_ name: String, _ created: SocketIdentity) {
        var st = stat()
        guard fstatatRaw(fd.raw, name, &st, AT_SYMLINK_NOFOLLOW) == 0, (st.st_mode & S_IFMT) == S_IFSOCK,
              UInt64(st.st_dev) == created.device, UInt64(st.st_ino) == created.inode else { return }
        _ = unlinkatRaw(fd.raw, name, 0)
    }

    /// Creates a listening socket at `name` that has `mode` and `group` from the moment it is
    /// visible there: it is bound in a private directory (0700, created here), given its mode
    /// and group there, where nobody else can reach it or swap it, and then renamed to `name`
    /// with RENAME_NOREPLACE. Nothing is ever done to `name` by path after it exists, so a
    /// symlink swapped in cannot redirect a chmod or chown. Returns the listener and the
    /// socket's identity in `created` (to remove it later only if it is still ours).
    /// `afterPublish` runs once the socket is at `name` (tests: an attacker acting then).
    public func bindListener(_ name: String, mode: mode_t?, group: gid_t?, backlog: Int32 = 8, created: inout SocketIdentity,
                             afterPublish: (() -> Void)? = nil) throws(PathSafetyError) -> FileDescriptor {
        guard !name.isEmpty, !name.contains("/") else { throw PathSafetyError("bad socket name '\(name)'") }
        var privateName = ""
        for attempt in 0..<8 {
            privateName = ".\(name).bind-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            if mkdiratRaw(fd.raw, privateName, 0o700) == 0 { break }
            let e = cvdpa_errno()
            if e != EEXIST || attempt == 7 {
                throw PathSafetyError("cannot create a private directory in \(path): \(SystemError("mkdirat", errno: e))")
            }
        }
        defer { _ = unlinkatRaw(fd.raw, privateName, AT_REMOVEDIR) }
        let privateDir = try Self.openComponent(in: fd, privateName, path + "/" + privateName)
        let staging = "s"
        var published = false
        defer { if !published { _ = unlinkatRaw(privateDir.raw, staging, 0) } }
        let listener: FileDescriptor
        do {
            listener = try UnixSocket.listen(path: "/proc/self/fd/\(privateDir.raw)/\(staging)", backlog: backlog)
        } catch { throw PathSafetyError("cannot listen on \(path)/\(name): \(error)") }
        // Mode and group while the socket is still private: fchmodat/fchownat name an entry in a
        // 0700 directory we just created, so no one else can have replaced it.
        if let group, fchownatRaw(privateDir.raw, staging, UInt32.max, group, AT_SYMLINK_NOFOLLOW) != 0 {
            throw PathSafetyError("cannot set group \(group) on \(path)/\(name): \(SystemError("fchownat", errno: cvdpa_errno()))")
        }
        if let mode, fchmodatRaw(privateDir.raw, staging, mode, 0) != 0 {
            throw PathSafetyError("cannot set mode 0\(String(mode, radix: 8)) on \(path)/\(name): \(SystemError("fchmodat", errno: cvdpa_errno()))")
        }
        var st = stat()
        guard fstatatRaw(privateDir.raw, staging, &st, AT_SYMLINK_NOFOLLOW) == 0 else {
            throw PathSafetyError("cannot stat the new socket for \(path)/\(name): \(SystemError("fstatat", errno: cvdpa_errno()))")
        }
        if cvdpa_renameat2(privateDir.raw, staging, fd.raw, name, CVDPA_RENAME_NOREPLACE) != 0 {
            let e = cvdpa_errno()
            throw PathSafetyError(e == EEXIST ? "\(path)/\(name) appeared while the socket was being created; refusing to replace it"
                                              : "cannot move the new socket to \(path)/\(name): \(SystemError("renameat2", errno: e))")
        }
        published = true
        afterPublish?()
        created = SocketIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        return listener
    }

    // Syscall wrappers: @inline(never) so nothing runs between the call and reading errno.
    // Safety: String arguments are bridged to NUL-terminated C strings valid for the call only;
    // `&st` points at a local stat for the call only.
    @inline(never) static func openRaw(_ p: String, _ flags: Int32) -> Int32 { Glibc.open(p, flags) }
    @inline(never) static func openatRaw(_ d: Int32, _ p: String, _ flags: Int32) -> Int32 { openat(d, p, flags) }
    @inline(never) static func mkdiratRaw(_ d: Int32, _ p: String, _ m: mode_t) -> Int32 { mkdirat(d, p, m) }
    @inline(never) func mkdiratRaw(_ d: Int32, _ p: String, _ m: mode_t) -> Int32 { mkdirat(d, p, m) }
    @inline(never) static func fstatatRaw(_ d: Int32, _ p: String, _ st: inout stat, _ flags: Int32) -> Int32 { fstatat(d, p, &st, flags) }
    @inline(never) func fstatatRaw(_ d: Int32, _ p: String, _ st: inout stat, _ flags: Int32) -> Int32 { fstatat(d, p, &st, flags) }
    @inline(never) func unlinkatRaw(_ d: Int32, _ p: String, _ flags: Int32) -> Int32 { unlinkat(d, p, flags) }
    @inline(never) func fchownatRaw(_ d: Int32, _ p: String, _ u: uid_t, _ g: gid_t, _ flags: Int32) -> Int32 { fchownat(d, p, u, g, flags) }
    @inline(never) func fchmodatRaw(_ d: Int32, _ p: String, _ m: mode_t, _ flags: Int32) -> Int32 { fchmodat(d, p, m, flags) }
}
