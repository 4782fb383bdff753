#if canImport(Glibc)
import Glibc
#endif

/// Permission bits of a file (mode_t), e.g. 0o660.
public typealias FileMode = mode_t
/// A group id (gid_t).
public typealias GroupID = gid_t

/// The system's groups (/etc/group, NSS), looked up in a thread-safe way (getgrnam_r).
public enum Groups {
    /// The id of the group named `name`; nil when there is no such group.
    public static func id(named name: String) throws(SystemError) -> GroupID? {
        var size = max(sysconf(Int32(_SC_GETGR_R_SIZE_MAX)), 1024)
        while true {
            var entry = group()
            var found: UnsafeMutablePointer<group>?
            let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
            defer { buffer.deallocate() }
            // getgrnam_r returns the error number itself (not -1 and errno).
            let r = getgrnam_r(name, &entry, buffer, size, &found)
            if r == ERANGE && size < 1 << 24 {
                size *= 2
                continue
            }
            // "Not found" is r == 0 with found == nil; some NSS modules answer ENOENT instead.
            if r == 0 || r == ENOENT || r == ESRCH { return found == nil ? nil : entry.gr_gid }
            throw SystemError("getgrnam_r(\(name))", errno: r)
        }
    }
}
