#if canImport(Glibc)
import Glibc
#endif
import DeviceFramework
import Foundation
import Logging
import SoftNIC
@testable import VDPA
import VhostUser
import Virtio
import XCTest

/// The SoftNIC IOMMU's dirty bitmap (IOMMUFD's read-and-clear shape), the log's bulk OR, and the
/// port's fold over it.
final class IOMMUDirtyBitmapTests: XCTestCase {
    let page = IOMMUDirtyBitmap.pageSize

    /// Reads a range into a fresh bitmap; returns the pages found (as offsets from `iova`) and the count returned.
    func read(_ b: IOMMUDirtyBitmap, iova: UInt64, pages: UInt64) throws -> (pages: [UInt64], count: UInt64) {
        let words = Int((pages + 63) / 64)
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: words * 8, alignment: 8)
        defer { out.deallocate() }
        out.initializeMemory(as: UInt8.self, repeating: 0)
        let n = try b.readAndClear(iova: iova, length: pages * page, pageSize: page, into: out)
        var found: [UInt64] = []
        for i in 0..<pages where out.load(fromByteOffset: Int(i / 64) * 8, as: UInt64.self) & (1 << (i % 64)) != 0 { found.append(i) }
        return (found, n)
    }

    func testReadAndClearReturnsTheRangeOnlyAndClearsIt() throws {
        let b = try IOMMUDirtyBitmap()
        // Pages 99, 100 (a range crossing a page edge), 163, 200 and 5000.
        b.mark(iova: 99 * page + 4000, length: 200)
        b.mark(iova: 163 * page, length: 1)
        b.mark(iova: 200 * page + 4095, length: 1)
        b.mark(iova: 5000 * page, length: page)
        // A range starting off a 64-page word: pages 100 ..< 200 (the page at its end is outside).
        let r = try read(b, iova: 100 * page, pages: 100)
        XCTAssertEqual(r.pages, [0, 63])
        XCTAssertEqual(r.count, 2)
        XCTAssertTrue(b.isDirty(page: 99), "a page just before the range stays")
        XCTAssertTrue(b.isDirty(page: 200), "the page just after the range stays")
        XCTAssertFalse(b.isDirty(page: 100), "read and cleared")
        XCTAssertEqual(try read(b, iova: 100 * page, pages: 100).count, 0, "a second read finds nothing")
        XCTAssertEqual(try read(b, iova: 0, pages: 6000).pages, [99, 200, 5000])
        XCTAssertThrowsError(try read(b, iova: 1, pages: 1), "unaligned iova")
        XCTAssertThrowsError(try b.readAndClear(iova: 0, length: 8192, pageSize: 8192, into: UnsafeMutableRawBufferPointer(start: nil, count: 0)))
    }

    func testPagesAtTheEdgesOfTheIOVARange() throws {
        let b = try IOMMUDirtyBitmap()
        let last = IOMMUDirtyBitmap.pageCount - 1
        b.mark(iova: 0, length: 1)
        b.mark(iova: last * page, length: page * 4)  // runs past the guest's range: only the last page is kept
        b.mark(iova: reservedIOVABase + page, length: page)  // the daemon's own mappings: not tracked
        XCTAssertEqual(try read(b, iova: 0, pages: 1).pages, [0])
        XCTAssertEqual(try read(b, iova: (last - 63) * page, pages: 128).pages, [63], "nothing beyond the range")
        XCTAssertEqual(try read(b, iova: reservedIOVABase, pages: 64).count, 0)
    }

    /// The device sets bits while another thread reads and clears them: every bit set is read
    /// exactly once (none lost, none read twice).
    func testConcurrentMarksAndReadAndClearLoseNoBit() throws {
        let b = try IOMMUDirtyBitmap()
        let pages: UInt64 = 1 << 16
        var order = Array(0..<pages)
        order.shuffle()
        let done = DispatchSemaphore(value: 0)
        let shuffled = order
        Thread.detachNewThread {
            for p in shuffled { b.mark(iova: p * IOMMUDirtyBitmap.pageSize, length: 1) }
            done.signal()
        }
        var seen = [UInt8](repeating: 0, count: Int(pages))
        var total: UInt64 = 0
        var finished = false
        while true {
            if done.wait(timeout: .now()) == .success { finished = true }
            let r = try read(b, iova: 0, pages: pages)
            for p in r.pages { seen[Int(p)] += 1 }
            total += r.count
            if finished { break }
        }
        XCTAssertEqual(total, pages)
        XCTAssertTrue(seen.allSatisfy { $0 == 1 }, "\(seen.filter { $0 != 1 }.count) pages read other than once")
    }

    /// The log's bulk OR at any page offset, and the folder over regions of a 1 GiB and a 4 GiB
    /// guest: the pages folded land where they belong; the cost is printed (the period's basis).
    func testFoldIntoTheLogAndItsCost() throws {
        let b = try IOMMUDirtyBitmap()
        final class Device: DirtyTrackingDevice, @unchecked Sendable {
            let b: IOMMUDirtyBitmap
            init(_ b: IOMMUDirtyBitmap) { self.b = b }
            var dirtyPageSize: UInt64 { IOMMUDirtyBitmap.pageSize }
            func setDirtyTracking(enabled: Bool) throws(DeviceError) {}
            func readAndClearDirty(iova: UInt64, length: UInt64, pageSize: UInt64, into bitmap: UnsafeMutableRawBufferPointer) throws(DeviceError) -> UInt64 {
                try b.readAndClear(iova: iova, length: length, pageSize: pageSize, into: bitmap)
            }
        }
        for (name, regions) in [("1 GiB", [(UInt64(0), UInt64(1) << 30)]),
                                ("4 GiB", [(UInt64(0), UInt64(3) << 30), (UInt64(4) << 30, UInt64(1) << 30)])] {
            let end = regions.map { $0.0 + $0.1 }.max()!
            let logBytes = Int(DirtyLog.bytesNeeded(guestPhysEnd: end))
            let bits = UnsafeMutableRawPointer.allocate(byteCount: logBytes, alignment: 8)
            defer { bits.deallocate() }
            bits.initializeMemory(as: UInt8.self, repeating: 0, count: logBytes)
            let log = DirtyLog(unownedBase: bits, byteCount: logBytes)
            let stats = MigrationStatsTable()
            let folder = try DirtyFolder(device: Device(b), portID: "t", periodMillis: 0, skipFold: false, stats: stats,
                                         logger: Logger(label: "t"))
            try folder.setRegions(regions.map { GuestMemoryView.Region(gpa: $0.0, size: $0.1, host: 0) }, "test")
            try folder.enable()
            try folder.setLog(log, "test")
            var micros: [UInt64] = []
            var marked: [UInt64] = []
            for round in 0..<10 {
                // 1000 scattered pages per round, in every region (a busy NIC between two folds).
                marked = (0..<1000).map { i in
                    let r = regions[i % regions.count]
                    return (r.0 + (UInt64(i * 7919 + round * 13) * 4096) % r.1) >> 12
                }
                for p in marked { b.mark(iova: p << 12, length: 1) }
                try folder.fold("test")
                micros.append(stats.dirtyTracking.withLock { $0!.lastFoldMicros })
            }
            for p in marked { XCTAssertTrue(log.isMarked(page: p), "\(name): page \(p) not folded") }
            XCTAssertEqual(try read(b, iova: 0, pages: end >> 12).count, 0, "\(name): the device's bits were cleared")
            // An empty fold: the cost floor of the period.
            try folder.fold("test")
            let empty = stats.dirtyTracking.withLock { $0!.lastFoldMicros }
            print("fold of a \(name) guest, 1000 dirty pages: \(micros.map(String.init).joined(separator: " ")) µs; with none dirty: \(empty) µs")
            folder.close()
        }
        // The bulk OR at an unaligned page.
        let bits = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 8)
        defer { bits.deallocate() }
        bits.initializeMemory(as: UInt8.self, repeating: 0, count: 64)
        let log = DirtyLog(unownedBase: bits, byteCount: 64)
        var src: [UInt64] = [1 | 1 << 63, 1 << 5]
        let n = log.or(bitmap: &src, wordCount: 2, firstPage: 70)
        XCTAssertEqual(n, 3)
        XCTAssertEqual((0..<512).filter { log.isMarked(page: $0) }, [70, 133, 139])
    }
}
