import DeviceFramework
import Logging
import Platform
import SoftNIC
import Virtio
import XCTest
@testable import VDUSE

/// The SoftNIC behind the request loop, as the kernel would drive it, without the kernel: a fake
/// device's IOTLB holds memfds, the test plays the driver on rings inside them, kicks through the
/// kick eventfd the device gave the "kernel", and sees interrupts as VDUSE_VQ_INJECT_IRQ calls.
/// The buffers' IOTLB entries are told to the device by no message (as virtio_vdpa's bounce
/// buffer is not): the first access misses and must be mapped on demand.
final class VDUSEDataPathTests: XCTestCase {
    var dev: FakeVDUSEDevice!
    var nic: SoftNIC!
    var tlb: VDUSEIOTLB!
    var worker: ConfinedWorker<VDUSEServer>!
    var rings: TestMemory!
    var rxBuffers: TestMemory!
    var txBuffers: TestMemory!
    var rx: DriverSplitRing!
    var tx: DriverSplitRing!
    let ringsIOVA: UInt64 = 0x4000_0000
    let rxIOVA: UInt64 = 0
    let txIOVA: UInt64 = 0x10_0000

    override func setUpWithError() throws {
        dev = try FakeVDUSEDevice()
        tlb = try VDUSEIOTLB(device: dev, name: "dp", logger: quietLogger)
        let interrupts = VDUSEInterrupts(device: dev)
        nic = try SoftNIC(portID: "vduse-dp-\(getpid())", queuePairs: 1, link: .loopback, guestMAC: nil, raiser: interrupts,
                          missResolver: tlb, logger: quietLogger)
        var kicks: [SharedFD] = []
        for _ in 0..<2 { kicks.append(SharedFD(try EventFD.make())) }
        let config = VDUSEDeviceConfig(mac: [2, 0, 0, 0, 0, 1], queuePairs: 1)
        let server = VDUSEServer(name: "dp", device: dev, nic: nic, iotlb: tlb, interrupts: interrupts, kicks: kicks,
                                 offeredFeatures: config.features, maxQueueSize: 256, logger: quietLogger)
        worker = try ConfinedWorker(name: "vduse-dp")
        try worker.start(server)

        rings = try TestMemory(size: 64 << 10)
        rxBuffers = try TestMemory(size: 64 << 10)
        txBuffers = try TestMemory(size: 64 << 10)
        dev.map(ringsIOVA, size: 64 << 10, file: rings.file)
        dev.map(rxIOVA, size: 64 << 10, file: rxBuffers.file)
        dev.map(txIOVA, size: 64 << 10, file: txBuffers.file)
        func ring(_ i: Int) throws -> DriverSplitRing {
            let off = i * 0x4000
            let iova = ringsIOVA + UInt64(off)
            return try DriverSplitRing(size: 64, eventIdx: false, descriptorTable: rings.base + off, descriptorTableGPA: iova,
                                       avail: rings.base + off + 0x1000, availGPA: iova + 0x1000,
                                       used: rings.base + off + 0x2000, usedGPA: iova + 0x2000)
        }
        rx = try ring(0)
        tx = try ring(1)
        for i in 0..<2 {
            let iova = ringsIOVA + UInt64(i) * 0x4000
            dev.queues.withLock {
                $0[i] = VDUSEQueueInfo(size: 64, descriptorIOVA: iova, driverIOVA: iova + 0x1000, deviceIOVA: iova + 0x2000,
                                       availIndex: 0, ready: true)
            }
        }
        dev.features.withLock { $0 = VirtioFeature.version1 | VirtioFeature.accessPlatform }
    }

    override func tearDown() {
        worker.stop()
        nic.close()
    }

    func frame(_ n: Int) -> [UInt8] {
        [0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00] + (0..<(n - 14)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
    }

    /// A frame the driver sends on TX comes back on RX (loopback): both buffers' entries are
    /// mapped on the first miss, the interrupts are raised by ioctl, and GET_VQ_STATE answers
    /// where each ring stands.
    func testLoopbackThroughMissesAndInjectedInterrupts() throws {
        XCTAssertTrue(try dev.setStatus(15, id: 1).ok)
        XCTAssertTrue(eventually { dev.injected.withLock { $0.count } == 2 }, "one interrupt per ring after DRIVER_OK")
        dev.injected.withLock { $0.removeAll() }
        XCTAssertEqual(tlb.ranges, [ringsIOVA...(ringsIOVA + 0xffff)], "only the rings' entry, at DRIVER_OK")

        XCTAssertNotNil(rx.addChain([DriverBuffer(gpa: rxIOVA + 0x1000, length: 2048, isWritable: true)]))
        rx.publish()
        let f = frame(60)
        (txBuffers.base + 0x800).initializeMemory(as: UInt8.self, repeating: 0, count: 12)
        f.withUnsafeBytes { (txBuffers.base + 0x800 + 12).copyMemory(from: $0.baseAddress!, byteCount: f.count) }
        let txHead = try XCTUnwrap(tx.addChain([DriverBuffer(gpa: txIOVA + 0x800, length: UInt32(12 + f.count), isWritable: false)]))
        tx.publish()
        let kick = try XCTUnwrap(dev.kicks.withLock { $0[1] })
        XCTAssertTrue(EventFD.signal(kick))

        XCTAssertTrue(eventually { rx.hasUsed && tx.hasUsed }, "the frame went round")
        XCTAssertEqual(try tx.popUsed(), UsedElement(id: UInt32(txHead), length: 0))
        let used = try XCTUnwrap(try rx.popUsed())
        XCTAssertEqual(used.length, UInt32(12 + f.count))
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: rxBuffers.base + 0x1000 + 12, count: f.count)), f)
        XCTAssertEqual(rxBuffers.base.load(fromByteOffset: 0x1000 + 10, as: UInt16.self), 1, "num_buffers")
        XCTAssertEqual(tlb.ranges.count, 3, "both buffer entries mapped on demand")
        XCTAssertEqual(tlb.resolvedMisses.load(ordering: .relaxed), 2)
        XCTAssertTrue(eventually { Set(dev.injected.withLock { $0 }) == [0, 1] }, "\(dev.injected.withLock { $0 })")
        let c = nic.counters()
        XCTAssertEqual(c[0].packets, 1)
        XCTAssertEqual(c[1].packets, 1)
        XCTAssertNil(c[0].error)

        // GET_VQ_STATE: each ring stopped where it stands.
        XCTAssertEqual(try dev.queueState(1, id: 2), .init(id: 2, ok: true, availIndex: 1))
        XCTAssertEqual(try dev.queueState(0, id: 3), .init(id: 3, ok: true, availIndex: 1))
        // A stopped ring is served no more.
        XCTAssertNotNil(tx.addChain([DriverBuffer(gpa: txIOVA + 0x800, length: UInt32(12 + f.count), isWritable: false)]))
        tx.publish()
        _ = nic.serviceUntilIdle()
        XCTAssertFalse(tx.hasUsed)
    }

    /// A buffer at an IOVA the kernel has no entry for: the miss maps nothing and the ring
    /// faults, naming the address (the engine does not loop on it).
    func testUnmappedBufferFaultsTheRing() throws {
        XCTAssertTrue(try dev.setStatus(15, id: 1).ok)
        XCTAssertNotNil(tx.addChain([DriverBuffer(gpa: 0x7000_0000, length: 100, isWritable: false)]))
        tx.publish()
        XCTAssertTrue(EventFD.signal(try XCTUnwrap(dev.kicks.withLock { $0[1] })))
        XCTAssertTrue(eventually { nic.counters()[1].error != nil })
        XCTAssertTrue(nic.counters()[1].error?.contains("0x70000000") ?? false, "\(nic.counters()[1].error ?? "")")
        XCTAssertEqual(tlb.resolvedMisses.load(ordering: .relaxed), 0)
        XCTAssertGreaterThanOrEqual(tlb.misses.load(ordering: .relaxed), 1)
    }
}
