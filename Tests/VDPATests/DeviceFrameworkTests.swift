import DeviceFramework
import Logging
import Platform
import Synchronization
import XCTest
import Virtio
@testable import VDPA
@testable import VhostUser

/// A second device driver, as small as the framework allows: it records the operations the port
/// asks of it. The binding and the migration switch are checked against it without a SoftNIC.
final class RecordingDevice: VDPADevice, @unchecked Sendable {
    // @unchecked Sendable: `ops` is behind a mutex; the rest is immutable.
    let ops = Mutex<[String]>([])
    let virtioFeatures: UInt64
    let queuePairs = 1
    var summary: String { "recording" }

    init(features: UInt64 = VirtioNetFeatureSet.migratable) { virtioFeatures = features }

    func record(_ s: String) { ops.withLock { $0.append(s) } }
    func take() -> [String] { ops.withLock { let o = $0; $0.removeAll(); return o } }

    func setFeatures(_ features: UInt64) throws(DeviceError) { record("features") }
    func setMemory(_ memory: DeviceMemory) throws(DeviceError) { record("memory") }
    func startRing(_ config: VDPARingConfig) throws(DeviceError) { record("start \(config.index) \(config.enabled)") }
    func setRingEnabled(_ index: Int, _ enabled: Bool) throws(DeviceError) { record("enable \(index) \(enabled)") }
    func setRingCall(_ index: Int, _ call: SharedFD?) throws(DeviceError) { record("call \(index)") }
    func stopRing(_ index: Int) throws(DeviceError) -> UInt16 { record("stop \(index)"); return 7 }
    func redirectUsedRing(_ index: Int, usedIOVA: UInt64?, mapping: IOVAMapping?, call: SharedFD?,
                          interruptEveryBatch: Bool) throws(DeviceError) -> UInt16 {
        record("redirect \(index) \(usedIOVA == nil ? "guest" : "mediated")")
        return 5
    }
    func suspendRing(_ index: Int) throws(DeviceError) -> UInt16 { record("suspend \(index)"); return 5 }
    func unmapIOVA(_ iova: UInt64) throws(DeviceError) { record("unmap") }
    func migrationDone() {}
    func sendRARP(mac: [UInt8]) -> Bool { true }
    func counters() -> [QueueCounters] { [] }
    func reset() { record("reset") }
    func close() {}
}

final class DeviceFrameworkTests: XCTestCase {
    var logger: Logger {
        var l = Logger(label: "test")
        l.logLevel = .critical
        return l
    }

    func testPortOffersItsDevicesMigratableFeaturesAndVhostUsersBits() throws {
        // A device that offers more than the relay can migrate (packed rings, checksum offload).
        let device = RecordingDevice(features: VirtioNetFeatureSet.migratable | VirtioFeature.ringPacked | VirtioNetFeature.csum)
        let port = try Port(spec: PortSpec(id: "p", socketPath: "/nonexistent/p.sock"), device: device, logger: logger)
        XCTAssertEqual(port.config.virtioFeatures, VirtioNetFeatureSet.migratable | BackendConfig.vhostUserFeatures)
        XCTAssertEqual(port.config.virtioFeatures & VirtioFeature.ringPacked, 0, "the relay walks split rings only")
        XCTAssertEqual(port.config.guestPhysLimit, reservedIOVABase, "guest memory stays below the daemon's IOVA range")
        // A device that offers less gets only what it offers.
        let small = RecordingDevice(features: VirtioFeature.version1)
        let p2 = try Port(spec: PortSpec(id: "q", socketPath: "/nonexistent/q.sock"), device: small, logger: logger)
        XCTAssertEqual(p2.config.virtioFeatures, VirtioFeature.version1 | BackendConfig.vhostUserFeatures)
    }

    func ring(_ i: Int, enabled: Bool = true, usedLogGPA: UInt64 = 0x3000) -> RingSetup {
        RingSetup(index: i, size: 64, descGPA: 0x1000, availGPA: 0x2000, usedGPA: 0x3000, usedLogGPA: usedLogGPA, base: 0,
                  kick: nil, call: nil, enabled: enabled)
    }

    /// What a port may offer of a virtio-net device: split rings with mergeable buffers, several
    /// queue pairs, MTU, EVENT_IDX, indirect descriptors, guest announce; never what QEMU keeps
    /// for itself with vhost-user (control queue, MAC, link status) nor what the relay cannot walk
    /// (packed rings).
    func testTheMigratableSet() {
        let m = VirtioNetFeatureSet.migratable
        for bit in [VirtioFeature.version1, VirtioNetFeature.mrgRxbuf, VirtioNetFeature.mq, VirtioNetFeature.mtu,
                    VirtioFeature.ringEventIdx, VirtioFeature.ringIndirectDesc, VirtioNetFeature.guestAnnounce] {
            XCTAssertNotEqual(m & bit, 0, describeFeatures(bit))
        }
        for bit in [VirtioNetFeature.ctrlVq, VirtioNetFeature.mac, VirtioNetFeature.status, VirtioFeature.ringPacked,
                    VirtioFeature.vhostLogAll, VirtioFeature.vhostUserProtocolFeatures] {
            XCTAssertEqual(m & bit, 0, describeFeatures(bit))
        }
    }

    /// A session made without the port's limit cannot hand a device guest memory over the
    /// daemon's own IOVA range: the binding refuses the table before the device sees it.
    func testBindingRefusesMemoryOverTheReservedIOVARange() throws {
        let device = RecordingDevice()
        let binding = DeviceBinding(device: device, portID: "t", relayMode: .event, migration: MigrationStatsTable(),
                                    testSwitches: TestSwitches(), logger: logger)
        let high = try MemoryRegion(MemoryRegionDescription(guestPhysAddr: reservedIOVABase - 0x1000, size: 0x2000,
                                                            userAddr: 0x1000_0000, mmapOffset: 0),
                                    fd: makeMemfd(name: "high", size: 0x2000))
        XCTAssertThrowsError(try binding.memoryTableChanged(GuestMemoryTable(regions: [high]))) { error in
            XCTAssertEqual((error as? VhostUserError)?.field, "guest_phys_addr")
        }
        XCTAssertEqual(device.take(), [], "the device never saw it")
        let low = try MemoryRegion(MemoryRegionDescription(guestPhysAddr: reservedIOVABase - 0x2000, size: 0x2000,
                                                           userAddr: 0x1000_0000, mmapOffset: 0),
                                   fd: makeMemfd(name: "low", size: 0x2000))
        try binding.memoryTableChanged(GuestMemoryTable(regions: [low]))
        XCTAssertEqual(device.take(), ["memory"], "up to the base is guest memory")
    }

    /// The used rings are marked at the log address the frontend gave with the log flag, not at
    /// the used ring's own address: a TX ring's whole used ring when it stops, a relayed RX ring's
    /// when the relay lets it go.
    func testUsedRingsAreMarkedAtTheirLogAddress() throws {
        let device = RecordingDevice()
        let binding = DeviceBinding(device: device, portID: "t", relayMode: .event, migration: MigrationStatsTable(),
                                    testSwitches: TestSwitches(), logger: logger)
        defer { binding.reset() }
        let log = try log()
        try binding.featuresChanged(VirtioFeature.version1 | VirtioFeature.vhostLogAll, ringsEnabled: [true, true])
        try binding.logChanged(log)
        try binding.vringStarted(ring(0, usedLogGPA: 0x7000))
        try binding.vringStarted(ring(1, usedLogGPA: 0x5000))
        XCTAssertEqual(binding.mode(ofRing: 0), .relay)
        _ = try binding.vringStopping(1)
        XCTAssertTrue(log.isMarked(page: 5), "TX used ring marked at its log address")
        _ = try binding.vringStopping(0)
        XCTAssertTrue(log.isMarked(page: 7), "relayed RX used ring marked at its log address")
        XCTAssertFalse(log.isMarked(page: 3), "never at the used ring's own address")
    }

    func log() throws -> DirtyLog {
        let fd = try makeMemfd(name: "test-log", size: 4096)
        return try DirtyLog(fd: fd, size: 4096, offset: 0)
    }

    /// LOG_ALL before the log: the running RX ring is held (the device disables it), then the log
    /// arrives and it is relayed (its used ring redirected to a mediated ring, enabled again), then
    /// logging ends and it goes back direct. Each mode is what status and stats report.
    func testRingModesThroughAMigrationWithTheLogLate() throws {
        let device = RecordingDevice()
        let stats = MigrationStatsTable()
        let binding = DeviceBinding(device: device, portID: "t", relayMode: .event, migration: stats,
                                    testSwitches: TestSwitches(), logger: logger)
        defer { binding.reset() }
        try binding.featuresChanged(VirtioFeature.version1, ringsEnabled: [true, true])
        try binding.vringStarted(ring(0))
        try binding.vringStarted(ring(1))
        XCTAssertEqual(device.take(), ["features", "memory", "start 0 true", "memory", "start 1 true"])
        XCTAssertEqual(binding.mode(ofRing: 0), .direct)

        try binding.featuresChanged(VirtioFeature.version1 | VirtioFeature.vhostLogAll, ringsEnabled: [true, true])
        XCTAssertEqual(device.take(), ["features", "enable 0 true", "enable 1 true", "enable 0 false"], "RX ring held disabled")
        XCTAssertEqual(binding.mode(ofRing: 0), .held)
        XCTAssertEqual(binding.mode(ofRing: 1), .direct, "TX rings stay direct")
        XCTAssertEqual(stats.snapshot[0]?.mode, .held)

        try binding.logChanged(try log())
        XCTAssertEqual(device.take(), ["redirect 0 mediated", "enable 0 true"])
        XCTAssertEqual(binding.mode(ofRing: 0), .relay)
        XCTAssertEqual(stats.snapshot[0]?.mode, .relay)
        XCTAssertEqual(stats.snapshot[0]?.switchovers, 1)

        try binding.featuresChanged(VirtioFeature.version1, ringsEnabled: [true, true])
        XCTAssertEqual(device.take(), ["features", "enable 0 true", "enable 1 true", "suspend 0", "redirect 0 guest", "unmap"])
        XCTAssertEqual(binding.mode(ofRing: 0), .direct)
        XCTAssertEqual(stats.snapshot[0]?.mode, .direct)
        XCTAssertEqual(stats.snapshot[0]?.switchovers, 2)
    }

    /// A ring held for the log takes the frontend's enable only once it is relayed; a relayed
    /// ring's call goes to the relay, not the device.
    func testHeldRingIgnoresEnableAndRelayedRingsCallGoesToTheRelay() throws {
        let device = RecordingDevice()
        let binding = DeviceBinding(device: device, portID: "t", relayMode: .event, migration: MigrationStatsTable(),
                                    testSwitches: TestSwitches(), logger: logger)
        defer { binding.reset() }
        try binding.featuresChanged(VirtioFeature.version1 | VirtioFeature.vhostLogAll, ringsEnabled: [false, false])
        try binding.vringStarted(ring(0, enabled: false))
        XCTAssertEqual(device.take(), ["features", "memory", "start 0 false"], "started disabled, held")
        XCTAssertEqual(binding.mode(ofRing: 0), .held)
        try binding.vringEnableChanged(0, enabled: true)
        XCTAssertEqual(device.take(), [], "a held ring stays disabled")
        try binding.logChanged(try log())
        XCTAssertEqual(device.take(), ["redirect 0 mediated", "enable 0 true"], "relayed, then the enable it was given")
        try binding.vringCallChanged(0, call: SharedFD(try EventFD.make()))
        XCTAssertEqual(device.take(), [], "the relay raises a relayed ring's interrupts")
        XCTAssertEqual(try binding.vringStopping(0), 7)
        XCTAssertEqual(device.take(), ["stop 0", "unmap"])
        XCTAssertEqual(binding.mode(ofRing: 0), .direct)
    }
}
