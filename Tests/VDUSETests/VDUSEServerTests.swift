import CVDPAShims
import DeviceFramework
import Platform
import Synchronization
import Virtio
import XCTest
@testable import VDUSE

/// A device that records the operations the request loop asks of it.
final class RecordingDevice: VDPADevice, @unchecked Sendable {
    // @unchecked Sendable: everything mutable is behind a mutex.
    let ops = Mutex<[String]>([])
    let configs = Mutex<[VDPARingConfig]>([])
    let stopAt = Mutex<UInt16>(0)
    /// startRing of this ring index fails (a SoftNIC that cannot serve it).
    let failStart = Mutex<Int?>(nil)
    let virtioFeatures: UInt64 = VirtioNetFeatureSet.migratable
    let queuePairs = 1
    var summary: String { "recording" }

    func record(_ s: String) { ops.withLock { $0.append(s) } }
    func takeOps() -> [String] { ops.withLock { let o = $0; $0.removeAll(); return o } }

    func setFeatures(_ features: UInt64) throws(DeviceError) { record("features 0x\(String(features, radix: 16))") }
    func setMemory(_ memory: DeviceMemory) throws(DeviceError) { record("memory \(memory.regions.map { "0x\(String($0.gpa, radix: 16))" })") }
    func startRing(_ config: VDPARingConfig) throws(DeviceError) {
        if failStart.withLock({ $0 }) == config.index { record("start \(config.index) failed"); throw DeviceError("ring \(config.index) refused") }
        configs.withLock { $0.append(config) }
        record("start \(config.index) size \(config.size) base \(config.base)")
    }
    func setRingEnabled(_ index: Int, _ enabled: Bool) throws(DeviceError) { record("enable \(index)") }
    func setRingCall(_ index: Int, _ call: SharedFD?) throws(DeviceError) { record("call \(index)") }
    func stopRing(_ index: Int) throws(DeviceError) -> UInt16 { record("stop \(index)"); return stopAt.withLock { $0 } }
    func redirectUsedRing(_ index: Int, usedIOVA: UInt64?, mapping: IOVAMapping?, call: SharedFD?,
                          interruptEveryBatch: Bool) throws(DeviceError) -> UInt16 { record("redirect"); return 0 }
    func suspendRing(_ index: Int) throws(DeviceError) -> UInt16 { record("suspend"); return 0 }
    func unmapIOVA(_ iova: UInt64) throws(DeviceError) { record("unmap") }
    func migrationDone() {}
    func sendRARP(mac: [UInt8]) -> Bool { true }
    func counters() -> [QueueCounters] { [] }
    func reset() { record("reset") }
    func close() {}
}

/// The request loop on its thread, against a fake device (the test plays the kernel) and a
/// device that records what it is asked.
final class VDUSEServerTests: XCTestCase {
    var dev: FakeVDUSEDevice!
    var nic: RecordingDevice!
    var tlb: VDUSEIOTLB!
    var worker: ConfinedWorker<VDUSEServer>!
    var server: VDUSEServer!
    var ringMemory: TestMemory!
    let offered = VDUSEDeviceConfig(mac: [2, 0, 0, 0, 0, 1], queuePairs: 1).features

    override func setUpWithError() throws {
        dev = try FakeVDUSEDevice()
        nic = RecordingDevice()
        tlb = try VDUSEIOTLB(device: dev, name: "t", logger: quietLogger)
        var kicks: [SharedFD] = []
        for _ in 0..<2 { kicks.append(SharedFD(try EventFD.make())) }
        server = VDUSEServer(name: "t", device: dev, nic: nic, iotlb: tlb, interrupts: VDUSEInterrupts(device: dev), kicks: kicks,
                             offeredFeatures: offered, maxQueueSize: 256, logger: quietLogger)
        worker = try ConfinedWorker(name: "vduse-test")
        try worker.start(server)
        ringMemory = try TestMemory(size: 64 << 10)
        dev.map(0x8000_0000, size: 64 << 10, file: ringMemory.file)
    }

    override func tearDown() {
        worker.stop()
    }

    func program(ring i: Int, size: UInt32 = 64, base: UInt16 = 0, ready: Bool = true) {
        let at = 0x8000_0000 + UInt64(i) * 0x4000
        dev.queues.withLock {
            $0[i] = VDUSEQueueInfo(size: size, descriptorIOVA: at, driverIOVA: at + 0x1000, deviceIOVA: at + 0x2000,
                                   availIndex: base, ready: ready)
        }
    }

    /// A ring the SoftNIC cannot start after another one started: DRIVER_OK is refused and the
    /// ring that started is stopped again (nothing runs on a device whose driver was told no).
    func testFailedStartStopsWhatStarted() throws {
        dev.features.withLock { $0 = VirtioFeature.version1 }
        program(ring: 0, base: 0)
        program(ring: 1, base: 0)
        nic.failStart.withLock { $0 = 1 }
        XCTAssertEqual(try dev.setStatus(15, id: 1).ok, false)
        XCTAssertEqual(nic.takeOps(), ["features 0x100000000", "memory [\"0x80000000\"]", "start 0 size 64 base 0", "start 1 failed", "stop 0"])
    }

    func testDriverOKStartsTheReadyRingsAtTheDriversBase() throws {
        dev.features.withLock { $0 = VirtioFeature.version1 | VirtioFeature.accessPlatform | VirtioNetFeature.mrgRxbuf }
        program(ring: 0, base: 0)
        program(ring: 1, base: 300)
        for s: UInt8 in [1, 3, 11] { XCTAssertEqual(try dev.setStatus(s, id: UInt32(s)), .init(id: UInt32(s), ok: true, availIndex: 0)) }
        XCTAssertEqual(nic.takeOps(), [], "nothing before DRIVER_OK")
        XCTAssertEqual(try dev.setStatus(15, id: 20), .init(id: 20, ok: true, availIndex: 0))
        XCTAssertEqual(nic.takeOps(), ["features 0x300008000", "memory [\"0x80000000\"]", "start 0 size 64 base 0", "start 1 size 64 base 300"])
        let c = nic.configs.withLock { $0 }
        XCTAssertEqual(c.map(\.descGPA), [0x8000_0000, 0x8000_4000])
        XCTAssertEqual(c.map(\.usedGPA), [0x8000_2000, 0x8000_6000])
        XCTAssertTrue(c.allSatisfy { $0.call == nil && $0.enabled }, "interrupts go by ioctl")
        // Each ring's kick eventfd was given to the kernel, and is the one the ring waits on.
        let kicks = dev.kicks.withLock { $0 }
        XCTAssertEqual(kicks[0], c[0].kick?.raw)
        XCTAssertEqual(kicks[1], c[1].kick?.raw)
        XCTAssertNotEqual(kicks[0], kicks[1])
        // Once DRIVER_OK is answered, every started ring's interrupt is raised once.
        XCTAssertTrue(eventually { dev.injected.withLock { $0.sorted() } == [0, 1] })
        // The same status again starts nothing.
        XCTAssertEqual(try dev.setStatus(15, id: 21).ok, true)
        XCTAssertEqual(nic.takeOps(), [])
        XCTAssertEqual(server.currentStatus.load(ordering: .relaxed), 15)
    }

    /// GET_VQ_STATE stops a running ring and answers where it stopped (what vhost-vdpa takes as
    /// GET_VRING_BASE); asked again, it answers the same without stopping anything twice; a ring
    /// never started answers the base the driver set.
    func testQueueStateStopsTheRing() throws {
        program(ring: 0, base: 5)
        program(ring: 1, base: 9, ready: false)
        XCTAssertTrue(try dev.setStatus(15, id: 1).ok)
        _ = nic.takeOps()
        nic.stopAt.withLock { $0 = 42 }
        XCTAssertEqual(try dev.queueState(0, id: 2), .init(id: 2, ok: true, availIndex: 42))
        XCTAssertEqual(nic.takeOps(), ["stop 0"])
        XCTAssertEqual(try dev.queueState(0, id: 3), .init(id: 3, ok: true, availIndex: 42))
        XCTAssertEqual(nic.takeOps(), [], "stopped once")
        XCTAssertEqual(try dev.queueState(1, id: 4), .init(id: 4, ok: true, availIndex: 9), "not ready: the driver's base")
        XCTAssertEqual(try dev.queueState(2, id: 5), .init(id: 5, ok: false, availIndex: 0), "no such ring")
        // A reset: the device is reset and forgets the stopped position.
        XCTAssertTrue(try dev.setStatus(0, id: 6).ok)
        XCTAssertEqual(nic.takeOps(), ["reset"])
        XCTAssertEqual(tlb.ranges, [])
        XCTAssertEqual(try dev.queueState(0, id: 7).availIndex, 5, "after a reset: what the driver programs")
    }

    func testRefusals() throws {
        // Features the device does not offer: DRIVER_OK is refused, nothing starts.
        dev.features.withLock { $0 = VirtioFeature.ringPacked }
        program(ring: 0)
        XCTAssertEqual(try dev.setStatus(15, id: 1).ok, false)
        XCTAssertEqual(nic.takeOps(), [])
        // A ready ring whose size is not a power of two, or too large: DRIVER_OK is refused and
        // no ring runs (the driver sees the status without DRIVER_OK).
        dev.features.withLock { $0 = VirtioFeature.version1 }
        program(ring: 0, size: 100)
        program(ring: 1, size: 512)
        XCTAssertEqual(try dev.setStatus(15, id: 2).ok, false)
        XCTAssertEqual(nic.takeOps(), ["features 0x100000000"])
        // An unknown request type.
        XCTAssertEqual(try dev.send(FakeVDUSEDevice.request(type: 77, id: 3)).ok, false)
        // An inverted IOTLB range.
        XCTAssertEqual(try dev.updateIOTLB(10, 5, id: 4).ok, false)
        XCTAssertEqual(server.refused.load(ordering: .relaxed), 4, "two DRIVER_OKs, the unknown request, the inverted range")
    }

    /// UPDATE_IOTLB: the device gets the new memory before the answer; an update that changes
    /// nothing costs the device nothing.
    func testUpdateIOTLBGivesTheDeviceItsNewMemoryBeforeAnswering() throws {
        let more = try TestMemory(size: 4096)
        dev.map(0x1000, size: 4096, file: more.file)
        XCTAssertTrue(try dev.updateIOTLB(0, .max, id: 1).ok)
        XCTAssertEqual(nic.takeOps(), ["memory [\"0x80000000\", \"0x1000\"]"])
        XCTAssertTrue(try dev.updateIOTLB(0, .max, id: 2).ok)
        XCTAssertEqual(nic.takeOps(), [])
        dev.unmapAll()
        XCTAssertTrue(try dev.updateIOTLB(0, 0x1fff, id: 3).ok)
        XCTAssertEqual(nic.takeOps(), ["memory [\"0x80000000\"]"])
    }

    /// The kernel marks a device broken when a request went unanswered past its timeout (poll
    /// then shows EPOLLERR): the device is reset and the loop serves it no more.
    func testBrokenDeviceIsReset() throws {
        program(ring: 0)
        XCTAssertTrue(try dev.setStatus(15, id: 1).ok)
        _ = nic.takeOps()
        try worker.perform { $0.deviceBroken() }
        XCTAssertEqual(nic.takeOps(), ["reset"])
        XCTAssertTrue(server.broken.load(ordering: .relaxed))
    }

    /// A fake device's fd that reaches its end is not watched any more; the loop still stops.
    func testEndOfTheMessageFdEndsReadingNotTheLoop() throws {
        XCTAssertEqual(shutdown(dev.kernelFD, Int32(SHUT_WR)), 0)
        try worker.perform { _ in }
        XCTAssertTrue(worker.stop())
    }
}
