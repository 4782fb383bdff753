#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims

/// Why a window of a frontend's file could not be mapped.
public enum FileWindowError: Error, CustomStringConvertible, Equatable {
    case notRegularFile(mode: UInt32)
    case overflow(offset: UInt64, length: UInt64)
    case beyondEnd(offset: UInt64, length: UInt64, fileSize: UInt64)
    case noGuardSlot
    /// Not shared memory (a memfd, tmpfs or hugetlbfs file, or an allowed anonymous inode).
    case notSharedMemory(kind: String)
    case system(SystemError)

    public var description: String {
        switch self {
        case .notRegularFile(let mode):
            return "not a regular file (mode 0o\(String(mode, radix: 8))): guest memory and logs must be shared files"
        case .overflow(let o, let l): return "offset \(o) + length \(l) overflows"
        case .beyondEnd(let o, let l, let s): return "[\(o), +\(l)) lies beyond the end of the file (\(s) bytes)"
        case .noGuardSlot: return "too many guest mappings in the daemon (SIGBUS guard table full)"
        case .notSharedMemory(let kind):
            return "\(kind) is not shared memory (a memfd, tmpfs or hugetlbfs file): a device maps nothing else"
        case .system(let e): return e.description
        }
    }
}

/// A window [offset, offset+length) of a frontend's shared file, mapped read-write and shared.
/// Only the pages that cover the window are mapped (the offset rounded down to a page, the end
/// rounded up), never the file from its start. The file is checked first (`fstat`): a regular
/// file at least as long as the window. The mapping is registered with the SIGBUS guard: if the
/// frontend shrinks the file later, a fault in the window is absorbed and `notify` is signalled
/// instead of the daemon dying (CVDPAGuard.h).
public struct GuardedFileMapping: ~Copyable {
    private let mapping: MemoryMapping
    /// This mapping's slot in the SIGBUS guard (see `faults(inSlot:)`).
    public let slot: Int32
    private let notify: SharedFD?
    /// Host address of the window's first byte (`offset` in the file).
    public let pointer: UnsafeMutableRawPointer
    public let length: UInt64
    /// Bytes actually mapped (the window rounded out to whole pages).
    public var mappedBytes: Int { mapping.length }
    public var mappingBase: UnsafeMutableRawPointer { mapping.base }

    /// HUGETLBFS_MAGIC (linux/magic.h).
    static let hugetlbfsMagic: UInt64 = 0x9584_58f6

    public init(fd: borrowing FileDescriptor, offset: UInt64, length: UInt64, notify: SharedFD?) throws(FileWindowError) {
        let end = try Self.checkWindow(offset: offset, length: length)
        let fsType = cvdpa_fstatfs_type(fd.raw)
        guard fsType >= 0 else { throw .system(SystemError("fstatfs", errno: cvdpa_errno())) }
        let page = try Self.checkRegularFile(fd, end: end, offset: offset, length: length, fsType: UInt64(fsType))
        try self.init(mapping: fd, offset: offset, length: length, end: end, page: page, notify: notify)
    }

    /// TMPFS_MAGIC (memfds too) and ANON_INODE_FS_MAGIC (linux/magic.h).
    static let tmpfsMagic: UInt64 = 0x0102_1994
    static let anonInodeMagic: UInt64 = 0x0904_1934

    /// A window of a file that a device was pointed at (a VDUSE IOTLB entry): only shared memory
    /// is mapped, never a file whose pages the daemon's access could block on or write to disk
    /// (FUSE, NFS, a disk filesystem) or a device file. Accepted: a regular file on tmpfs (memfds)
    /// or hugetlbfs that holds the whole window (checked as in `init(fd:...)`), or an anonymous
    /// inode whose name (as /proc shows it, e.g. "anon_inode:[vduse-domain]") is in
    /// `anonymousInodes`: such a file has no size; a page its owner does not back raises SIGBUS,
    /// which the guard absorbs like a shrunk file's.
    public init(sharedMemoryOf fd: borrowing FileDescriptor, offset: UInt64, length: UInt64, notify: SharedFD?,
                anonymousInodes: Set<String>) throws(FileWindowError) {
        let end = try Self.checkWindow(offset: offset, length: length)
        let fsType = cvdpa_fstatfs_type(fd.raw)
        guard fsType >= 0 else { throw .system(SystemError("fstatfs", errno: cvdpa_errno())) }
        let page: UInt64
        switch UInt64(fsType) {
        case Self.tmpfsMagic, Self.hugetlbfsMagic:
            page = try Self.checkRegularFile(fd, end: end, offset: offset, length: length, fsType: UInt64(fsType))
        case Self.anonInodeMagic:
            let kind = EventFD.fileKind(fd.raw)
            guard anonymousInodes.contains(kind) else { throw .notSharedMemory(kind: "\(kind)") }
            page = UInt64(max(sysconf(Int32(_SC_PAGESIZE)), 4096))
        default:
            throw .notSharedMemory(kind: "\(EventFD.fileKind(fd.raw)) (filesystem type 0x\(String(UInt64(fsType), radix: 16)))")
        }
        try self.init(mapping: fd, offset: offset, length: length, end: end, page: page, notify: notify)
    }

    /// The window's end, checked: non-empty, no overflow, and far from the top of the offset type.
    private static func checkWindow(offset: UInt64, length: UInt64) throws(FileWindowError) -> UInt64 {
        guard length > 0 else { throw .overflow(offset: offset, length: length) }
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= UInt64(Int.max) / 2 else { throw .overflow(offset: offset, length: length) }
        return end
    }

    /// Checks that `fd` is a regular file holding [offset, end); returns the page size its
    /// mappings use.
    private static func checkRegularFile(_ fd: borrowing FileDescriptor, end: UInt64, offset: UInt64, length: UInt64,
                                         fsType: UInt64) throws(FileWindowError) -> UInt64 {
        var st = stat()
        guard fstat(fd.raw, &st) == 0 else { throw .system(SystemError("fstat", errno: cvdpa_errno())) }
        guard st.st_mode & S_IFMT == S_IFREG else { throw .notRegularFile(mode: UInt32(st.st_mode)) }
        let fileSize = UInt64(max(st.st_size, 0))
        guard end <= fileSize else { throw .beyondEnd(offset: offset, length: length, fileSize: fileSize) }
        // hugetlbfs maps whole huge pages only, and its st_blksize is the huge page size; on any
        // other filesystem st_blksize is an I/O hint (2 MiB on tmpfs with THP, more on network
        // filesystems), not a mapping granule, so the system page size is used there.
        let system = UInt64(max(sysconf(Int32(_SC_PAGESIZE)), 4096))
        var page = system
        if fsType == Self.hugetlbfsMagic {
            let huge = UInt64(max(st.st_blksize, 0))
            if huge > system && huge & (huge - 1) == 0 { page = huge }
        }
        return page
    }

    /// Maps the pages holding [offset, end) (checked by the caller) and registers them with the guard.
    private init(mapping fd: borrowing FileDescriptor, offset: UInt64, length: UInt64, end: UInt64, page: UInt64,
                 notify: SharedFD?) throws(FileWindowError) {
        let first = offset & ~(page - 1)
        // end <= Int.max / 2, so rounding up by less than a page cannot overflow.
        let last = (end + page - 1) & ~(page - 1)
        let m: MemoryMapping
        do { m = try MemoryMapping(fd: fd, offset: first, length: Int(last - first)) } catch { throw .system(error) }
        guard cvdpa_guard_install() == 0 else { throw .system(SystemError("sigaction(SIGBUS)", errno: cvdpa_errno())) }
        let s = cvdpa_guard_register(m.base, m.length, Int(page), notify?.raw ?? -1)
        guard s >= 0 else { throw .noGuardSlot }
        slot = s
        self.notify = notify
        // Safety: offset - first < page <= the mapped length, so the window starts inside the mapping.
        pointer = m.base + Int(offset - first)
        self.length = length
        mapping = m
    }

    /// SIGBUS faults absorbed in this mapping (the frontend shrank the file under it).
    public var faults: UInt64 { cvdpa_guard_faults(slot) }
    /// Faults absorbed in the mapping registered in `slot` (-1: none).
    public static func faults(inSlot slot: Int32) -> UInt64 { slot < 0 ? 0 : cvdpa_guard_faults(slot) }

    deinit {
        // Unregistered before the mapping (a stored property) is unmapped after this body.
        cvdpa_guard_unregister(slot)
    }
}

/// SIGBUS faults absorbed in guest mappings since the daemon started.
public var guardedMappingFaults: UInt64 { cvdpa_guard_total_faults() }
