import Platform
import Synchronization
import VhostUser

#if _endian(big)
#error("DirtyLogBuffer reads the byte-ordered log as little-endian u64 words")
#endif

/// The dirty-page log a frontend shares with SET_LOG_BASE: a memfd holding one bit per 4 KiB
/// guest page, from guest-physical address 0 (vhost-user.rst, "Migration":
/// `log[page / 8] |= 1 << page % 8`). The bitmap starts `offset` bytes into the memfd.
///
/// All reads and clears are atomic per 64-bit word, because the backend sets bits concurrently.
public final class DirtyLogBuffer: @unchecked Sendable {
    // @unchecked Sendable: stored properties are immutable; the bitmap is only touched through
    // Atomic<UInt64> operations, which is what the backend in the other process does too.

    public static let pageSize: UInt64 = 4096

    /// Size of the bitmap in bytes (a multiple of 8): what SET_LOG_BASE's `size` field carries.
    public let size: UInt64
    /// Where the bitmap starts inside the memfd: SET_LOG_BASE's `offset` field.
    public let offset: UInt64
    private let memfd: FileDescriptor
    private let mapping: MemoryMapping

    /// Bytes of log needed for guest RAM that ends at `ramEndGPA`: one bit per page, rounded up to
    /// whole bytes and then to whole u64 words (QEMU's vhost_get_log_size does the same).
    public static func requiredSize(ramEndGPA: UInt64) -> UInt64 {
        let pages = (ramEndGPA + pageSize - 1) / pageSize
        let bytes = (pages + 7) / 8
        return max(8, (bytes + 7) / 8 * 8)
    }

    /// A zeroed log covering guest-physical addresses `0..<ramEndGPA`.
    public init(ramEndGPA: UInt64, offset: UInt64 = 0, name: String = "vhost-log") throws(FrontendError) {
        guard offset % 8 == 0, offset <= 1 << 30 else { throw .invalidArgument("log offset \(offset) must be 8-aligned and small") }
        size = Self.requiredSize(ramEndGPA: ramEndGPA)
        self.offset = offset
        guard size <= UInt64(Int.max) - offset else { throw .invalidArgument("log too large") }
        do {
            memfd = try makeMemfd(name: name, size: Int(offset + size))
            mapping = try MemoryMapping(fd: memfd, offset: 0, length: Int(offset + size))
        } catch { throw .system(error) }
    }

    /// A log covering every region of `ram`.
    public convenience init(covering ram: [GuestRAM], offset: UInt64 = 0) throws(FrontendError) {
        try self.init(ramEndGPA: ram.endGPA, offset: offset)
    }

    /// The memfd (still owned here): pass it with SET_LOG_BASE.
    public var fd: Int32 { memfd.raw }
    /// The log description SET_LOG_BASE carries.
    public var logDescription: LogDescription { LogDescription(size: size, offset: offset) }
    /// Number of pages the log can describe.
    public var pageCapacity: UInt64 { size * 8 }
    private var wordCount: Int { Int(size / 8) }

    private func word(_ i: Int) -> UnsafePointer<Atomic<UInt64>> {
        precondition(i >= 0 && i < wordCount)
        // Safety: i < wordCount keeps the word inside the mapping; offset is 8-aligned and the
        // mapping page-aligned, so the word is aligned; Atomic<UInt64> has UInt64's layout.
        return UnsafePointer((mapping.base + Int(offset) + 8 * i).assumingMemoryBound(to: Atomic<UInt64>.self))
    }

    /// Whether the page `page` (guest-physical address / 4096) is marked.
    public func isDirty(page: UInt64) -> Bool {
        guard page < pageCapacity else { return false }
        // Little-endian: byte page/8 bit page%8 is bit page%64 of u64 word page/64.
        let w = word(Int(page / 64)).pointee.load(ordering: .acquiring)
        return w & (1 << (page % 64)) != 0
    }

    /// Whether any page overlapping `[gpa, gpa+length)` is marked.
    public func isDirty(gpa: UInt64, length: UInt64 = 1) -> Bool {
        guard length > 0 else { return false }
        let first = gpa / Self.pageSize, last = (gpa + length - 1) / Self.pageSize
        return (first...last).contains { isDirty(page: $0) }
    }

    /// Marked page numbers, ascending.
    public func dirtyPages() -> [UInt64] {
        var out: [UInt64] = []
        for i in 0..<wordCount {
            let w = word(i).pointee.load(ordering: .acquiring)
            if w != 0 { Self.appendPages(of: w, word: i, to: &out) }
        }
        return out
    }

    /// Clears the whole log.
    public func clearLog() {
        for i in 0..<wordCount { word(i).pointee.store(0, ordering: .releasing) }
    }

    /// Reads and clears atomically word by word, as QEMU's log sync does: a bit the backend
    /// sets concurrently is either returned now or left for the next call, never lost.
    public func takeDirtyPages() -> [UInt64] {
        var out: [UInt64] = []
        for i in 0..<wordCount {
            let w = word(i).pointee.exchange(0, ordering: .acquiringAndReleasing)
            if w != 0 { Self.appendPages(of: w, word: i, to: &out) }
        }
        return out
    }

    /// Marks a page, as a backend would (for tests of the decoding, or of code reading the log).
    public func markDirty(page: UInt64) {
        precondition(page < pageCapacity, "page \(page) outside the log (\(pageCapacity) pages)")
        word(Int(page / 64)).pointee.bitwiseOr(1 << (page % 64), ordering: .releasing)
    }

    /// The raw bitmap bytes (a snapshot; not atomic as a whole).
    public func bytes() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(Int(size))
        for i in 0..<wordCount {
            let w = word(i).pointee.load(ordering: .acquiring)
            for b in 0..<8 { out.append(UInt8(truncatingIfNeeded: w >> (8 * UInt64(b)))) }
        }
        return out
    }

    static func appendPages(of w: UInt64, word i: Int, to out: inout [UInt64]) {
        var bits = w
        while bits != 0 {
            let b = UInt64(bits.trailingZeroBitCount)
            out.append(UInt64(i) * 64 + b)
            bits &= bits - 1
        }
    }
}
