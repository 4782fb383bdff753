import Atomics
import Platform
import Synchronization

/// QEMU's dirty log: one bit per 4 KiB guest-physical page, page n at bit n%8 of byte n/8
/// (the same bit as bit n%64 of little-endian 64-bit word n/64). Bits are only ever set, with
/// atomic OR, because QEMU clears them concurrently while it migrates.
public final class DirtyLog: @unchecked Sendable {
    // @unchecked Sendable: `base`/`byteCount` are immutable; the bitmap is only touched with atomic
    // OR/loads; the mapping is released once, in deinit, after the last holder lets go.
    public static let pageShift: UInt64 = 12
    public static let pageSize: UInt64 = 1 << pageShift

    public let base: UnsafeMutableRawPointer
    public let byteCount: Int
    private let mapping: GuardedFileMapping?
    private let mappingBytes: Int
    private let guardSlot: Int32
    private let outOfRange = Atomic<UInt64>(0)
    private let marked = Atomic<UInt64>(0)

    /// Maps the log that SET_LOG_BASE passed: `size` bytes at `offset` in `fd` (only the pages
    /// that hold them). The offset must be 8-byte aligned, because marks are 64-bit atomic ORs;
    /// the file must be a regular file that long; `faultNotify` is signalled if it shrinks later.
    public init(fd: borrowing FileDescriptor, size: UInt64, offset: UInt64, faultNotify: SharedFD? = nil) throws(VhostUserError) {
        guard size > 0, size <= UInt64(Int.max) / 2 else {
            throw VhostUserError(.semantics, "SET_LOG_BASE", field: "mmap_size", "size \(size) is not mappable")
        }
        guard offset % 8 == 0 else {
            throw VhostUserError(.semantics, "SET_LOG_BASE", field: "mmap_offset", "\(offset) is not 8-byte aligned (the log is marked in 64-bit words)")
        }
        let m: GuardedFileMapping
        do { m = try GuardedFileMapping(fd: fd, offset: offset, length: size, notify: faultNotify) } catch {
            throw VhostUserError(.semantics, "SET_LOG_BASE", field: "fd", "log of \(size) bytes at offset \(offset): \(error)")
        }
        base = m.pointer
        byteCount = Int(size)
        mappingBytes = m.mappedBytes
        guardSlot = m.slot
        mapping = .some(m)
    }

    /// Bytes of address space the mapping takes (0 for a log over caller-owned memory).
    public var mappedBytes: Int { mappingBytes }
    /// SIGBUS faults absorbed in the log's mapping (the frontend shrank its file).
    public var faults: UInt64 { GuardedFileMapping.faults(inSlot: guardSlot) }

    /// A log over memory the caller owns and keeps alive (tests, fuzzing).
    public init(unownedBase: UnsafeMutableRawPointer, byteCount: Int) {
        precondition(UInt(bitPattern: unownedBase) % 8 == 0, "a dirty log is marked in 64-bit words: its base must be 8-byte aligned")
        base = unownedBase
        self.byteCount = byteCount
        mapping = nil
        mappingBytes = 0
        guardSlot = -1
    }

    /// Bytes of log needed to cover guest-physical addresses below `guestPhysEnd`.
    public static func bytesNeeded(guestPhysEnd: UInt64) -> UInt64 {
        let pages = (guestPhysEnd &+ pageSize &- 1) >> pageShift
        return (pages + 7) / 8
    }

    /// Pages covered by this log.
    public var pageCount: UInt64 { UInt64(byteCount) * 8 }

    /// Number of page marks that fell beyond the end of the log (each is an error: a write QEMU will not see).
    public var outOfRangeMarks: UInt64 { outOfRange.load(ordering: .relaxed) }
    /// Number of atomic OR operations that set at least one new bit (a cheap activity gauge).
    public var wordsTouched: UInt64 { marked.load(ordering: .relaxed) }

    /// Marks every page that [gpa, gpa+length) touches. Zero length marks nothing.
    public func mark(gpa: UInt64, length: UInt64) {
        guard length > 0 else { return }
        var batch = Batch(log: self)
        batch.mark(gpa: gpa, length: length)
        batch.flush()
    }

    /// Whether page `page` is set (for tests and the frontend side).
    public func isMarked(page: UInt64) -> Bool {
        guard page < pageCount else { return false }
        let byte = base.load(fromByteOffset: Int(page / 8), as: UInt8.self)
        return byte & (1 << UInt8(page % 8)) != 0
    }

    /// ORs `mask` into 64-page word `word`. Words that run past the end of the log are split into
    /// byte ORs for the part inside; bits beyond it are counted as out-of-range.
    @usableFromInline
    func orWord(_ word: UInt64, _ mask: UInt64) {
        guard mask != 0 else { return }
        let byteOffset = word &* 8
        if byteOffset &+ 8 <= UInt64(byteCount), word < UInt64(Int.max / 8) {
            // Safety: the 8 bytes at byteOffset lie inside the mapped log (checked above); the log
            // is 8-byte aligned (page-aligned mapping + an offset checked to be a multiple of 8).
            let p = (base + Int(byteOffset)).assumingMemoryBound(to: UnsafeAtomic<UInt64>.Storage.self)
            let atomic = UnsafeAtomic<UInt64>(at: p)
            // Relaxed suffices: the log carries no data; ordering against the used-index publish
            // is provided by the release store (or fence) the relay does after marking.
            let old = atomic.loadThenBitwiseOr(with: mask.littleEndian, ordering: Atomics.AtomicUpdateOrdering.relaxed)
            if old & mask != mask { marked.wrappingAdd(1, ordering: .relaxed) }
            return
        }
        var lost: UInt64 = 0
        for i in 0..<UInt64(8) {
            let byteMask = UInt8(truncatingIfNeeded: mask >> (8 * i))
            guard byteMask != 0 else { continue }
            let at = byteOffset &+ i
            if byteOffset < UInt64(byteCount), at < UInt64(byteCount) {
                // Safety: `at` is inside the mapped log (checked above).
                let p = (base + Int(at)).assumingMemoryBound(to: UnsafeAtomic<UInt8>.Storage.self)
                _ = UnsafeAtomic<UInt8>(at: p).loadThenBitwiseOr(with: byteMask, ordering: Atomics.AtomicUpdateOrdering.relaxed)
            } else {
                lost &+= UInt64(byteMask.nonzeroBitCount)
            }
        }
        if lost > 0 { outOfRange.wrappingAdd(lost, ordering: .relaxed) }
    }

    /// ORs a bitmap of `wordCount` little-endian 64-bit words into the log, bit 0 of word 0 for
    /// page `firstPage` (any page, aligned or not): how a device's dirty bitmap is folded in.
    /// Atomic per log word, like every mark; words that are zero cost a load. A release fence
    /// first: the bytes behind the bits (which the caller acquired from the device) are visible
    /// to a frontend that sees the bits. Returns the number of bits set in the bitmap.
    @discardableResult
    public func or(bitmap: UnsafeRawPointer, wordCount: Int, firstPage: UInt64) -> UInt64 {
        Synchronization.atomicMemoryFence(ordering: Synchronization.AtomicUpdateOrdering.releasing)
        var bits: UInt64 = 0
        let shift = firstPage & 63
        let base = firstPage >> 6
        var i = 0
        while i < wordCount {
            let v = UInt64(littleEndian: bitmap.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
            if v != 0 {
                bits &+= UInt64(v.nonzeroBitCount)
                let w = base &+ UInt64(i)
                orWord(w, v << shift)
                if shift != 0 { orWord(w &+ 1, v >> (64 - shift)) }
            }
            i += 1
        }
        return bits
    }

    /// Accumulates marks for the current 64-page word and ORs it once when marking moves on:
    /// one atomic operation per word, however many ranges fall in it. Allocates nothing.
    public struct Batch: ~Copyable {
        @usableFromInline let log: DirtyLog
        @usableFromInline var word: UInt64 = .max
        @usableFromInline var mask: UInt64 = 0

        public init(log: DirtyLog) { self.log = log }

        @inlinable
        public mutating func mark(gpa: UInt64, length: UInt64) {
            guard length > 0 else { return }
            let first = gpa >> DirtyLog.pageShift
            let (endAddr, overflow) = gpa.addingReportingOverflow(length - 1)
            let last = overflow ? (UInt64.max >> DirtyLog.pageShift) : endAddr >> DirtyLog.pageShift
            var page = first
            while true {
                let w = page >> 6
                let lastInWord = min(last, (w << 6) | 63)
                let lo = page & 63
                let hi = lastInWord & 63
                let bits: UInt64 = (hi - lo == 63) ? .max : (((1 as UInt64) << (hi - lo + 1)) - 1) << lo
                if w != word {
                    log.orWord(word, mask)
                    word = w
                    mask = 0
                }
                mask |= bits
                if lastInWord == last { break }
                page = lastInWord + 1
            }
        }

        /// Marks the whole 64-page words (aligned 256 KiB runs) that [gpa, gpa+length) touches and
        /// returns how many pages that newly covers in this batch: 0, with no bit arithmetic, when
        /// the range lies inside the word set last (the common case for buffers carved one after
        /// another from the same pages).
        @inlinable
        public mutating func markRuns(gpa: UInt64, length: UInt64) -> UInt64 {
            guard length > 0 else { return 0 }
            let first = gpa >> (DirtyLog.pageShift + 6)
            let (endAddr, overflow) = gpa.addingReportingOverflow(length - 1)
            let last = overflow ? (UInt64.max >> (DirtyLog.pageShift + 6)) : endAddr >> (DirtyLog.pageShift + 6)
            if first == word && last == word && mask == .max { return 0 }
            var added: UInt64 = 0
            var w = first
            while true {
                if w != word {
                    log.orWord(word, mask)
                    word = w
                    mask = 0
                }
                added &+= UInt64(64 - mask.nonzeroBitCount)
                mask = .max
                if w == last { break }
                w &+= 1
            }
            return added
        }

        /// ORs whatever is pending. Call before publishing what the marks cover.
        @inlinable
        public mutating func flush() {
            if word != .max { log.orWord(word, mask) }
            word = .max
            mask = 0
        }

        deinit {
            if word != .max { log.orWord(word, mask) }
        }
    }
}
