#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// Plain file operations by path: reading a (/proc) file whole, removing a file, writing a sysfs
/// attribute, reading a link.
public enum FileSystem {
    /// Reads the file at `path` to its end. /proc files report a size of 0 and are produced as
    /// they are read, so this reads until EOF rather than trusting `fstat`.
    public static func readAll(_ path: String) throws(SystemError) -> [UInt8] {
        let fd = FileDescriptor(owning: try syscallRetrying("open(\(path))") { openRaw(path, O_RDONLY | O_CLOEXEC) })
        var out: [UInt8] = []
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
        defer { chunk.deallocate() }
        while true {
            // Safety: read writes at most chunk.count bytes into the chunk, allocated above.
            let n = try syscallRetrying("read(\(path))") { readRaw(fd.raw, chunk.baseAddress!, chunk.count) }
            if n == 0 { return out }
            out += chunk[0..<n]
        }
    }

    /// Reads the file at `path` whole, as UTF-8 text.
    public static func readText(_ path: String) throws(SystemError) -> String {
        String(decoding: try readAll(path), as: UTF8.self)
    }

    /// Removes the file at `path` (not a directory); returns false when there was none (ENOENT).
    @discardableResult
    public static func removeIfPresent(_ path: String) throws(SystemError) -> Bool {
        do throws(SystemError) {
            try syscallRetrying("unlink(\(path))") { unlinkRaw(path) }
            return true
        } catch where error.code == .noSuchFile {
            return false
        }
    }

    /// Writes `text` to the file at `path` in one write(2), without creating or truncating it:
    /// for sysfs attributes (a driver's `bind` and `unbind`), which act on each write.
    public static func writeAttribute(_ path: String, _ text: String) throws(SystemError) {
        let fd = FileDescriptor(owning: try syscallRetrying("open(\(path))") { openRaw(path, O_WRONLY | O_CLOEXEC) })
        let bytes = Array(text.utf8)
        let n = try syscallRetrying("write(\(path))") {
            // Safety: the array's bytes are valid for the call.
            bytes.withUnsafeBytes { writeRaw(fd.raw, $0.baseAddress!, $0.count) }
        }
        guard n == bytes.count else { throw SystemError("write(\(path)): \(n) of \(bytes.count) bytes", errno: EIO) }
    }

    /// The target of the symbolic link at `path`, or nil when there is no such link (ENOENT).
    public static func linkTarget(_ path: String) throws(SystemError) -> String? {
        var buffer = [UInt8](repeating: 0, count: 4096)
        do throws(SystemError) {
            let n = try syscallRetrying("readlink(\(path))") {
                // Safety: readlink writes at most count - 1 bytes into the array's buffer.
                buffer.withUnsafeMutableBytes { readlinkRaw(path, $0.baseAddress!, $0.count - 1) }
            }
            return String(decoding: buffer[0..<n], as: UTF8.self)
        } catch where error.code == .noSuchFile {
            return nil
        }
    }

    /// Whether something exists at `path` (a dangling link counts as absent).
    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    // Syscall wrappers: @inline(never) so nothing runs between the call and reading errno.
    // Safety: the String is bridged to a NUL-terminated C string valid for the call only.
    @inline(never) static func openRaw(_ p: String, _ flags: Int32) -> Int32 { open(p, flags) }
    @inline(never) static func unlinkRaw(_ p: String) -> Int32 { unlink(p) }
    // Safety: the caller passes a buffer of at least `n` writable bytes, valid for the call.
    @inline(never) static func readRaw(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ n: Int) -> Int { read(fd, p, n) }
    // Safety: the caller passes `n` readable bytes at `p`, valid for the call.
    @inline(never) static func writeRaw(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int { write(fd, p, n) }
    // Safety: the caller passes a buffer of at least `n` writable bytes, valid for the call.
    @inline(never) static func readlinkRaw(_ path: String, _ p: UnsafeMutableRawPointer, _ n: Int) -> Int {
        readlink(path, p.assumingMemoryBound(to: CChar.self), n)
    }
}
