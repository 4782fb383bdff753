import CVDPAShims
import DeviceFramework
import Glibc
import Platform
import Synchronization

/// The SoftNIC IOMMU's dirty bits: one bit per 4 KiB IOVA page of the guest's IOVA range
/// [0, reservedIOVABase), set by the device after every write it makes to guest memory while
/// tracking is on, and read-and-cleared by whoever folds them into the frontend's log. The model
/// of an IOMMU with hardware dirty bits (AMD/Intel second-stage page tables, Arm SMMUv3 HTTU) as
/// IOMMUFD exposes it: IOMMU_HWPT_SET_DIRTY_TRACKING and IOMMU_HWPT_GET_DIRTY_BITMAP.
///
/// Layout: one sparse anonymous MAP_NORESERVE mapping, 2^46 bytes of IOVA / 4 KiB = 2^34 bits =
/// 2 GiB of address space, indexed directly by IOVA page. Untouched pages cost nothing (a read maps
/// the shared zero page); only pages of bits that were ever set take memory (a 4 KiB page of bits
/// covers 128 MiB of IOVA). Being indexed by IOVA rather than per memory region, a memory-table
/// change cannot lose a bit: the bits of a region that went away stay where they are until read.
///
/// Threads: the DMA engine sets bits (atomic OR, releasing), any thread reads-and-clears them
/// (atomic exchange, acquiring); neither needs the engine to stop.
public final class IOMMUDirtyBitmap: @unchecked Sendable {
    // @unchecked Sendable: `words` is immutable and points at a mapping that lives until deinit;
    // every access to the words is an atomic operation.
    public static let pageShift: UInt64 = 12
    public static let pageSize: UInt64 = 1 << pageShift
    /// Pages covered: the guest's whole IOVA range.
    public static let pageCount: UInt64 = reservedIOVABase >> pageShift
    static let wordCount = Int(pageCount / 64)
    let words: UnsafeMutablePointer<Atomic<UInt64>>
    private let byteCount: Int

    public init() throws(SystemError) {
        byteCount = Self.wordCount * 8
        let p = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap of the IOMMU dirty bitmap (\(byteCount >> 20) MiB, sparse)", errno: cvdpa_errno()) }
        // Anonymous memory reads as zero: every Atomic<UInt64> starts as 0, which is its layout.
        words = p.bindMemory(to: Atomic<UInt64>.self, capacity: Self.wordCount)
    }

    deinit { munmap(UnsafeMutableRawPointer(words), byteCount) }

    /// Sets the bit of every page that [iova, iova + length) touches. Called after the bytes were
    /// written (release: a folder that sees the bit sees the bytes). Bits beyond the guest's IOVA
    /// range (the daemon's own mappings) are not kept: the frontend's log does not cover them.
    @inline(__always)
    public func mark(iova: UInt64, length: UInt64) {
        guard length > 0, iova < reservedIOVABase else { return }
        // The bytes are written before this call; the load below must not pass those stores
        // (x86 reorders a store with a later load): a fold that clears the bit in between would
        // otherwise leave a page whose new bytes no bit covers. One full fence per mark, only
        // while tracking is on.
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let end = min(reservedIOVABase, iova &+ length < iova ? reservedIOVABase : iova &+ length)
        var page = iova >> Self.pageShift
        let last = (end &- 1) >> Self.pageShift
        while page <= last {
            let w = page >> 6
            let lastInWord = min(last, (w << 6) | 63)
            let lo = page & 63
            let n = lastInWord - page + 1
            let bits: UInt64 = n == 64 ? .max : ((1 << n) &- 1) << lo
            // Safety: w < wordCount, because page <= last < pageCount.
            let word = words + Int(w)
            // Load first: a word whose bits are already set is not written (most marks hit a page
            // marked a moment ago), which keeps the cache line shared with a concurrent folder.
            if word.pointee.load(ordering: .relaxed) & bits != bits {
                word.pointee.bitwiseOr(bits, ordering: .releasing)
            }
            page = lastInWord &+ 1
        }
    }

    /// IOMMU_HWPT_GET_DIRTY_BITMAP's shape: ORs into `bitmap` the dirty bits of the pages of
    /// [iova, iova + length), bit i (bit i%64 of little-endian word i/64) for the page at
    /// iova + i * pageSize, and clears them in the device. `iova` and `length` must be multiples
    /// of `pageSize`, which must be 4 KiB (the only page size this IOMMU tracks); `bitmap` must
    /// hold length / pageSize bits rounded up to whole words. Returns the number of pages that
    /// were dirty. Pages beyond the guest's IOVA range are never dirty.
    public func readAndClear(iova: UInt64, length: UInt64, pageSize: UInt64,
                             into bitmap: UnsafeMutableRawBufferPointer) throws(DeviceError) -> UInt64 {
        guard pageSize == Self.pageSize else { throw DeviceError("dirty bitmap: page size \(pageSize): this IOMMU tracks 4096-byte pages only") }
        guard iova % pageSize == 0, length % pageSize == 0 else {
            throw DeviceError("dirty bitmap: iova 0x\(String(iova, radix: 16)) and length \(length) must be multiples of \(pageSize)")
        }
        let pages = length / pageSize
        let outWords = Int((pages + 63) / 64)
        guard bitmap.count >= outWords * 8, let out = bitmap.baseAddress else {
            throw DeviceError("dirty bitmap: \(bitmap.count) bytes cannot hold \(pages) bits")
        }
        guard pages > 0 else { return 0 }
        let first = iova >> Self.pageShift
        let limit = iova >= reservedIOVABase ? 0 : min(pages, Self.pageCount - first)
        var found: UInt64 = 0
        var i: UInt64 = 0  // output bit index
        while i < limit {
            let page = first + i
            let w = page >> 6
            let shift = page & 63
            let take = min(64 - shift, limit - i)  // bits of this device word in the range
            let mask: UInt64 = take == 64 ? .max : ((1 << take) &- 1) << shift
            // Safety: w < wordCount (page < pageCount).
            let word = words + Int(w)
            // Load first: an untouched page of bits stays the shared zero page (never written).
            var bits = word.pointee.load(ordering: .relaxed) & mask
            if bits != 0 {
                // Acquire pairs with the device's releasing OR: the bytes it wrote before setting
                // these bits are visible to whoever is given the bits. Only the range's bits clear.
                bits = word.pointee.bitwiseAnd(~mask, ordering: .acquiring).oldValue & mask
            }
            if bits != 0 {
                found &+= UInt64(bits.nonzeroBitCount)
                let v = bits >> shift  // bit 0 = output bit i
                let ow = Int(i >> 6), ob = i & 63
                // Safety: output bits i ..< i + take lie below pages, inside the outWords words checked above.
                let o = out.advanced(by: ow * 8)
                o.storeBytes(of: o.loadUnaligned(as: UInt64.self) | (v << ob), as: UInt64.self)
                if ob != 0 && v >> (64 - ob) != 0 {
                    let o2 = out.advanced(by: (ow + 1) * 8)
                    o2.storeBytes(of: o2.loadUnaligned(as: UInt64.self) | (v >> (64 - ob)), as: UInt64.self)
                }
            }
            i &+= take
        }
        return found
    }

    /// Whether a page's bit is set (tests).
    public func isDirty(page: UInt64) -> Bool {
        guard page < Self.pageCount else { return false }
        return (words + Int(page >> 6)).pointee.load(ordering: .relaxed) & (1 << (page & 63)) != 0
    }
}
