#if canImport(Glibc)
import DeviceFramework
import Glibc
#endif
import Foundation
import Logging
import Platform
import SoftNIC
import VhostVDPA
import VDPA
import VhostUser
import VhostUserFrontend
import Virtio
import XCTest

// A harness that runs the real data path in-process: a `Daemon` whose ports are SoftNICs, and
// test "guests" (TestGuest.swift) that drive them over vhost-user with `VhostUserFrontend` plus
// a `DriverSplitRing` per ring, over memfd guest RAM shared with the daemon.

/// Feature sets the tests negotiate.
enum Features {
    static let base = VirtioFeature.version1 | VirtioFeature.vhostUserProtocolFeatures
    static let mrg = VirtioNetFeature.mrgRxbuf
    static let eventIdx = VirtioFeature.ringEventIdx
    static let indirect = VirtioFeature.ringIndirectDesc
    static let all = base | mrg | eventIdx | indirect
}

/// The virtio-net header length the tests use (VERSION_1 is always negotiated).
let netHeaderLength = 12

/// Polls `condition` until it holds or `timeout` seconds pass. Returns the final value.
@discardableResult
func waitUntil(_ timeout: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while !condition() {
        if Date() >= deadline { return condition() }
        usleep(200)
    }
    return true
}

/// Whether an eventfd is readable now or within `millis`, without draining it.
func eventFDReadable(_ fd: Int32, millis: Int32 = 0) -> Bool {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    return poll(&p, 1, millis) == 1
}

/// A daemon with SoftNIC ports, sockets in a fresh /tmp directory.
final class SoftNICTestDaemon {
    struct PortDef {
        var id: String
        var link: String
        var mac: [UInt8]? = nil
        var queuePairs = 1
        /// Serve the port through the kernel vhost-vdpa driver over a model of the kernel
        /// (`VhostVDPAModel`): nil = the SoftNIC directly; false = a device without SUSPEND
        /// (reset switchover), true = one with SUSPEND and RESUME.
        var kernelModel: Bool? = nil
        /// Serve the port through the vhost-vdpa driver on this real character device (the
        /// VDUSE tests in the vDPA guest); the device's own link replaces `link`.
        var kernelDevice: String? = nil
        /// With `kernelModel`: a device that drops its mappings on a reset unless IOTLB_PERSIST
        /// was acked (VhostVDPAModel.dropsMapOnReset).
        var dropsMapOnReset = false
        var offersPersist = true
        /// The port's `relay=`, `migration=`, `log=` options.
        var migration = MigrationOptions()
    }

    /// The models behind ports served through the vhost-vdpa driver.
    final class Models: @unchecked Sendable { var byPort: [String: VhostVDPAModel] = [:] }
    let models = Models()

    let dir: String
    let daemon: Daemon
    let defs: [PortDef]

    init(_ defs: [PortDef], options: PortOptions = PortOptions()) throws {
        self.defs = defs
        let dir = "/tmp/softnic-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        self.dir = dir
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var logger = Logger(label: "softnic-test")
        let level = ProcessInfo.processInfo.environment["SOFTNIC_TEST_LOG"].flatMap { Logger.Level(rawValue: $0) }
        logger.logLevel = level ?? .critical
        let specs = defs.map {
            PortSpec(id: $0.id, socketPath: "\(dir)/\($0.id).sock", queuePairs: $0.queuePairs, link: $0.link, mac: $0.mac,
                     migration: $0.migration)
        }
        let log = logger
        let models = self.models
        let journal = options.testSwitches.journal
        daemon = try Daemon(specs: specs, controlPath: dir + "/control.sock", logger: logger, options: options) { spec in
            if let path = defs.first(where: { $0.id == spec.id })?.kernelDevice {
                return try VhostVDPADevice(kernel: try VhostVDPAFile(path: path), path: path, logger: log)
            }
            let nic = try SoftNIC(portID: spec.id, queuePairs: spec.queuePairs, link: try LinkSpec.parse(spec.link), guestMAC: spec.mac,
                                   journal: journal, logger: log)
            guard let suspend = defs.first(where: { $0.id == spec.id })?.kernelModel else { return nic }
            let def = defs.first { $0.id == spec.id }
            let model = VhostVDPAModel(nic: nic, offersSuspend: suspend, dropsMapOnReset: def?.dropsMapOnReset ?? false,
                                       offersPersist: def?.offersPersist ?? true)
            models.byPort[spec.id] = model
            return try VhostVDPADevice(kernel: model, path: "model:\(spec.id)", logger: log)
        }
        try daemon.start()
    }

    func socketPath(_ id: String) -> String { "\(dir)/\(id).sock" }

    func device(_ id: String) -> SoftNIC {
        if let m = models.byPort[id] { return m.nic }
        let p = daemon.ports.first { $0.spec.id == id }!
        return p.device as! SoftNIC
    }

    func portStatus(_ id: String) -> PortStatus { daemon.ports.first { $0.spec.id == id }!.status }

    /// One queue's stats as the control socket reports them (`Daemon.stats()`).
    func queue(_ id: String, _ index: Int) -> QueueStats {
        let port = daemon.stats().ports.first { $0.id == id }!
        return port.queues[index]
    }

    /// One queue's counters straight from the device.
    func counters(_ id: String, _ index: Int) -> QueueCounters {
        device(id).counters()[index]
    }

    /// Connects a guest to port `id`.
    func connect(_ id: String, features: UInt64 = Features.all, regions: [(base: UInt64, size: UInt64)] = [(0, 32 << 20)]) throws -> TestGuest {
        try TestGuest(path: socketPath(id), features: features, regions: regions)
    }

    /// Connects a guest to port `id` and starts its first queue pair (RX ring 0, then TX ring 1):
    /// the preamble of most tests.
    func connectAndStart(_ id: String, features: UInt64 = Features.all) throws -> TestGuest {
        let g = try connect(id, features: features)
        try g.startRing(0)
        try g.startRing(1)
        return g
    }

    /// Stops the daemon, but never hangs a test run on a stuck device: if `stop()` does not
    /// return within `timeout` seconds the test fails and the daemon is abandoned.
    func stop(timeout: Double = 10, file: StaticString = #filePath, line: UInt = #line) {
        let done = DispatchSemaphore(value: 0)
        let d = daemon
        Thread.detachNewThread {
            d.stop()
            done.signal()
        }
        if done.wait(timeout: .now() + timeout) == .timedOut {
            XCTFail("Daemon.stop() did not return within \(timeout) s: a DMA engine or port thread is stuck", file: file, line: line)
            return
        }
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// What the SoftNIC test classes share: one daemon per test (`makeDaemon`), stopped after it.
class SoftNICTestCase: XCTestCase {
    var daemon: SoftNICTestDaemon?
    /// How long `tearDown` lets the daemon take to stop before the test fails.
    var stopTimeout: Double { 10 }

    override func tearDown() {
        daemon?.stop(timeout: stopTimeout)
        daemon = nil  // XCTest keeps test cases alive: drop the daemon (threads, fds, mappings) now
    }

    /// Starts a daemon with ports `defs`; it is stopped after the test.
    func makeDaemon(_ defs: [SoftNICTestDaemon.PortDef], options: PortOptions = PortOptions()) throws -> SoftNICTestDaemon {
        let d = try SoftNICTestDaemon(defs, options: options)
        daemon = d
        return d
    }

    /// A daemon with the one port `id` on `link`, and a guest on it with its first queue pair started.
    func startedGuest(_ id: String = "lb0", link: String = "loopback",
                      features: UInt64 = Features.all) throws -> (SoftNICTestDaemon, TestGuest) {
        let d = try makeDaemon([.init(id: id, link: link)])
        return (d, try d.connectAndStart(id, features: features))
    }

    /// Waits until a queue's stats satisfy `condition` (the TX path adds its counters just
    /// after publishing a batch), then returns them.
    @discardableResult
    func stats(_ env: SoftNICTestDaemon, _ id: String, _ q: Int, until condition: (QueueStats) -> Bool = { _ in true },
               file: StaticString = #filePath, line: UInt = #line) -> QueueStats {
        let ok = waitUntil(5) { condition(env.queue(id, q)) }
        let s = env.queue(id, q)
        XCTAssertTrue(ok, "queue \(q) of \(id): stats never got there: \(s)", file: file, line: line)
        return s
    }

    func assertNoDrops(_ s: QueueStats, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(s.drops.values.reduce(0, +), 0, "unexpected drops \(s.drops)", file: file, line: line)
        XCTAssertEqual(s.faults, 0, "unexpected fault: \(s.error ?? "")", file: file, line: line)
        XCTAssertNil(s.error, file: file, line: line)
    }
}


// MARK: frames

enum TestFrames {
    static let dst: [UInt8] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01]
    static let src: [UInt8] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x02]

    /// An Ethernet frame of `length` bytes (>= 14) whose payload is a pattern that depends on `seed`.
    static func make(length: Int, seed: Int, ethertype: UInt16 = 0x88B6) -> [UInt8] {
        var f = dst + src + [UInt8(ethertype >> 8), UInt8(ethertype & 0xff)]
        var x = UInt32(truncatingIfNeeded: seed &* 2_654_435_761 &+ 12345)
        while f.count < length {
            x = x &* 1_103_515_245 &+ 12345
            f.append(UInt8(truncatingIfNeeded: x >> 16))
        }
        // The seed in clear text too, so a mixed-up frame is easy to name.
        f.replaceSubrange(14..<min(18, length), with: withUnsafeBytes(of: UInt32(seed).bigEndian, Array.init).prefix(min(4, length - 14)))
        return Array(f.prefix(length))
    }

    static func macBytes(_ mac: UInt64) -> [UInt8] {
        (0..<6).map { UInt8(truncatingIfNeeded: mac >> (8 * UInt64(5 - $0))) }
    }

    static func be64(_ b: ArraySlice<UInt8>) -> UInt64 { b.reduce(0) { $0 << 8 | UInt64($1) } }
}
