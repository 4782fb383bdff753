#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import DeviceFramework
import Platform
import Virtio
import XCTest
@testable import VDUSE

/// The IOTLB bookkeeping: kernel entries (a fake device's table of memfds) → windows → the
/// `DeviceMemory` the SoftNIC's IOMMU is built from.
final class VDUSEIOTLBTests: XCTestCase {
    func host(_ m: DeviceMemory, _ iova: UInt64, _ length: UInt64 = 1) -> UnsafeMutableRawPointer? {
        m.regions.withUnsafeBufferPointer { b in
            GuestMemoryView(base: b.baseAddress!, count: b.count).hostPointer(gpa: iova, length: length)
        }
    }

    func testMissMapsTheEntryAndTranslatesToItsBytes() throws {
        let dev = try FakeVDUSEDevice()
        let mem = try TestMemory(size: 64 << 10)
        dev.map(0x10_0000, size: 32 << 10, file: mem.file, offset: 16 << 10)
        let tlb = try VDUSEIOTLB(device: dev, name: "t", logger: quietLogger)
        XCTAssertTrue(tlb.snapshot().regions.isEmpty)
        mem.base.storeBytes(of: 0xC0FF_EE00_1234_5678, toByteOffset: (16 << 10) + 0x100, as: UInt64.self)
        let m = try XCTUnwrap(tlb.resolve(iova: 0x10_0100, length: 8))
        XCTAssertEqual(m.regions.count, 1)
        XCTAssertEqual(m.regions[0].gpa, 0x10_0000)
        XCTAssertEqual(m.regions[0].size, 32 << 10)
        let p = try XCTUnwrap(host(m, 0x10_0100, 8))
        XCTAssertEqual(p.load(as: UInt64.self), 0xC0FF_EE00_1234_5678, "the window shows the file at the entry's offset")
        p.storeBytes(of: 7, as: UInt64.self)
        XCTAssertEqual(mem.base.load(fromByteOffset: (16 << 10) + 0x100, as: UInt64.self), 7, "and writes reach it")
        XCTAssertNil(host(m, 0x10_0000 + (32 << 10)), "nothing past the entry")
        // Already mapped: no progress, so the ring would fault rather than spin.
        XCTAssertNil(tlb.resolve(iova: 0x10_0100, length: 8))
        XCTAssertNil(tlb.resolve(iova: 0x9000_0000, length: 8), "no entry there")
        XCTAssertEqual(tlb.misses.load(ordering: .relaxed), 3)
        XCTAssertEqual(tlb.resolvedMisses.load(ordering: .relaxed), 1)
    }

    func testEnsureMappedAndSnapshotOrder() throws {
        let dev = try FakeVDUSEDevice()
        let small = try TestMemory(size: 4096), big = try TestMemory(size: 1 << 20)
        dev.map(0x4000_0000, size: 4096, file: small.file)
        dev.map(0, size: 1 << 20, file: big.file)
        let tlb = try VDUSEIOTLB(device: dev, name: "t", logger: quietLogger)
        XCTAssertTrue(tlb.ensureMapped(iova: 0x4000_0000, length: 4096))
        XCTAssertTrue(tlb.ensureMapped(iova: 0x1000, length: 64))
        XCTAssertFalse(tlb.ensureMapped(iova: 0x4000_0800, length: 4096), "runs past the entry")
        XCTAssertEqual(tlb.ranges, [0...0xfffff, 0x4000_0000...0x4000_0fff])
        XCTAssertEqual(tlb.snapshot().regions.map(\.gpa), [0, 0x4000_0000], "largest first: buffers lie there")
        XCTAssertEqual(tlb.mappedBytes, (1 << 20) + 4096)
    }

    /// vhost-vdpa sends UPDATE_IOTLB for the whole range after every map change: windows the
    /// kernel still has as they were stay (the rings' host addresses do not move), changed ones
    /// are mapped again, removed ones go.
    func testUpdateKeepsWhatIsUnchanged() throws {
        let dev = try FakeVDUSEDevice()
        let a = try TestMemory(size: 8192), b = try TestMemory(size: 8192)
        dev.map(0x1000, size: 4096, file: a.file)
        dev.map(0x10000, size: 4096, file: b.file)
        let tlb = try VDUSEIOTLB(device: dev, name: "t", logger: quietLogger)
        XCTAssertTrue(tlb.update(first: 0, last: .max))
        let before = tlb.snapshot()
        XCTAssertFalse(tlb.update(first: 0, last: .max), "nothing changed")
        XCTAssertEqual(host(tlb.snapshot(), 0x1000), host(before, 0x1000), "the same window")
        // The second entry now maps the other half of its file; the first is gone.
        dev.unmapAll()
        dev.map(0x10000, size: 4096, file: b.file, offset: 4096)
        b.base.storeBytes(of: 0xAB, toByteOffset: 4096, as: UInt8.self)
        XCTAssertTrue(tlb.update(first: 0, last: .max))
        let after = tlb.snapshot()
        XCTAssertNil(host(after, 0x1000))
        XCTAssertEqual(host(after, 0x10000)?.load(as: UInt8.self), 0xAB)
        XCTAssertEqual(tlb.ranges, [0x10000...0x10fff])
        // An update of another range leaves these alone.
        dev.unmapAll()
        XCTAssertFalse(tlb.update(first: 0x20000, last: 0x2ffff))
        XCTAssertEqual(tlb.ranges, [0x10000...0x10fff])
        tlb.removeAll()
        XCTAssertEqual(tlb.ranges, [])
        XCTAssertEqual(tlb.mappedBytes, 0)
    }

    /// What a hostile driver could point the device at is refused: entries the device may not
    /// write, files that are not shared memory, entries past the end of their file, and more
    /// than the mapping limit.
    func testRefusesWhatIsNotPlainSharedMemory() throws {
        let dev = try FakeVDUSEDevice()
        let mem = try TestMemory(size: 8192)
        dev.map(0x1000, size: 4096, file: mem.file, permission: 1)  // read-only
        dev.map(0x3000, size: 4096, file: mem.file, permission: 2)  // write-only
        dev.map(0x5000, size: 16384, file: mem.file)  // past the end of an 8 KiB file
        dev.map(0x10000, size: 4096, file: SharedFD(try EventFD.make()))  // an eventfd
        var p: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&p), 0)
        close(p[1])
        dev.map(0x20000, size: 4096, file: SharedFD(FileDescriptor(owning: p[0])))  // a pipe
        // A regular file on a disk filesystem (beside the test binary): mappable, but a fault
        // there could wait for the disk, and the device's writes would go to it.
        var onDisk: [UInt64] = []
        let dir = try XCTUnwrap(FileSystem.linkTarget("/proc/self/exe")).split(separator: "/").dropLast().joined(separator: "/")
        let path = "/\(dir)/vduse-iotlb-test-\(getpid())"
        let raw = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        XCTAssertGreaterThanOrEqual(raw, 0, path)
        unlink(path)
        let disk = FileDescriptor(owning: raw)
        XCTAssertEqual(ftruncate(disk.raw, 8192), 0)
        if cvdpa_fstatfs_type(disk.raw) != 0x0102_1994 {  // not tmpfs here
            dev.map(0x30000, size: 4096, file: SharedFD(disk))
            onDisk = [0x30000]
        }
        let tlb = try VDUSEIOTLB(device: dev, name: "t", logger: quietLogger)
        for iova: UInt64 in [0x1000, 0x3000, 0x5000, 0x10000, 0x20000] + onDisk {
            XCTAssertNil(tlb.resolve(iova: iova, length: 8), "0x\(String(iova, radix: 16))")
        }
        XCTAssertEqual(tlb.ranges, [])
        // A limit on what is mapped in all.
        let limited = try VDUSEIOTLB(device: dev, name: "t", maxMappedBytes: 4096, logger: quietLogger)
        dev.unmapAll()
        dev.map(0x1000, size: 4096, file: mem.file)
        dev.map(0x2000, size: 4096, file: mem.file, offset: 4096)
        XCTAssertNotNil(limited.resolve(iova: 0x1000, length: 8))
        XCTAssertNil(limited.resolve(iova: 0x2000, length: 8), "over the limit")
        // A range that wraps around 2^64 is clamped, not trapped on.
        XCTAssertNil(limited.resolve(iova: .max - 2, length: 100))
    }

    /// A memfd shrunk under the device: the access faults onto a zero page (SIGBUS absorbed), the
    /// guard signals, and the window is dropped to be looked up again.
    func testSIGBUSInAWindowDropsIt() throws {
        let dev = try FakeVDUSEDevice()
        let mem = try TestMemory(size: 8192)
        dev.map(0x1000, size: 8192, file: mem.file)
        let tlb = try VDUSEIOTLB(device: dev, name: "t", logger: quietLogger)
        let m = try XCTUnwrap(tlb.resolve(iova: 0x1000, length: 1))
        _ = try mem.file.withFD { (fd: borrowing FileDescriptor) throws(SystemError) in
            try syscallRetrying("ftruncate") { ftruncate(fd.raw, 4096) }
        }
        let p = try XCTUnwrap(host(m, 0x2000, 8))
        XCTAssertEqual(p.load(as: UInt64.self), 0, "the faulting page is a zero page now")
        XCTAssertTrue(try Poll.waitReadable(tlb.faultNotify.raw, until: Deadline(secondsFromNow: 1)))
        XCTAssertEqual(tlb.dropFaulted(), [0x1000...0x2fff])
        XCTAssertEqual(tlb.ranges, [])
        XCTAssertEqual(tlb.dropFaulted(), [])
    }
}
