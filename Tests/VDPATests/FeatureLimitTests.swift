#if canImport(Glibc)
import Glibc
#endif
import DeviceFramework
import Foundation
import Logging
import VhostUser
import VhostUserFrontend
import Virtio
import XCTest
@testable import VDPA

/// `features=` and `offloads=` on a port: what it offers, what a frontend may take, what status
/// and the start-up warnings say.
final class FeatureLimitTests: XCTestCase {
    var logger: Logger {
        var l = Logger(label: "test")
        l.logLevel = .critical
        return l
    }

    /// A device with the migratable set, the offloads, packed rings and the control queue.
    let everything = VirtioNetFeatureSet.migratable | VirtioNetFeature.offloads | VirtioFeature.ringPacked | VirtioNetFeature.ctrlVq

    func offer(_ options: String, device: UInt64) throws -> UInt64 {
        let spec = try PortSpec.parse("socket=/nonexistent/p.sock" + (options.isEmpty ? "" : "," + options), defaultID: "p")
        return try Port(spec: spec, device: RecordingDevice(features: device), logger: logger).config.virtioFeatures
    }

    /// The port offers device ∩ migratable ∩ list (minus the offloads with offloads=off), and
    /// always vhost-user's own bits.
    func testPortOffersTheIntersectionAndAlwaysVhostUsersBits() throws {
        let vhostUser = BackendConfig.vhostUserFeatures
        XCTAssertEqual(try offer("", device: everything), VirtioNetFeatureSet.migratable | vhostUser, "no option: as before")
        XCTAssertEqual(try offer("features=VERSION_1+MRG_RXBUF+RING_PACKED+CTRL_VQ", device: everything),
                       VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | vhostUser, "never more than the migratable set")
        XCTAssertEqual(try offer("features=VERSION_1+MRG_RXBUF+MQ", device: VirtioFeature.version1 | VirtioNetFeature.mq),
                       VirtioFeature.version1 | VirtioNetFeature.mq | vhostUser, "never more than the device has")
        XCTAssertEqual(try offer("features=0x0", device: everything), vhostUser, "an empty list keeps vhost-user's bits")
        XCTAssertEqual(try offer("offloads=off", device: everything),
                       (VirtioNetFeatureSet.migratable & ~VirtioNetFeature.offloads) | vhostUser)
        XCTAssertEqual(try offer("features=VERSION_1+CSUM+GUEST_CSUM", device: everything),
                       VirtioFeature.version1 | (VirtioNetFeatureSet.migratable & (VirtioNetFeature.csum | VirtioNetFeature.guestCsum)) | vhostUser,
                       "offloads on: the list's offloads as far as the port can migrate them")
        XCTAssertEqual(try offer("features=VERSION_1+CSUM+GUEST_CSUM,offloads=off", device: everything),
                       VirtioFeature.version1 | vhostUser)
        XCTAssertEqual(try offer("features=VERSION_1+PROTOCOL_FEATURES", device: everything), VirtioFeature.version1 | vhostUser,
                       "vhost-user's bits in the list change nothing")
    }

    /// A frontend connecting to a restricted port is offered exactly the restricted set, cannot
    /// acknowledge a bit the device has but the list left out, and status names both sets.
    func testFrontendSeesOnlyTheRestrictedSet() throws {
        let dir = "/tmp/vdpa-features-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let spec = try PortSpec.parse("socket=\(dir)/p.sock,id=p,features=version_1+mrg_rxbuf+event_idx+csum+ring_packed,offloads=off",
                                      defaultID: "x")
        let daemon = try Daemon(specs: [spec, PortSpec(id: "q", socketPath: dir + "/q.sock")], controlPath: nil, logger: logger) { _ in
            RecordingDevice(features: self.everything)
        }
        try daemon.start()
        defer { daemon.stop() }
        let port = daemon.ports[0]
        let expected = VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | VirtioFeature.ringEventIdx | BackendConfig.vhostUserFeatures
        let offeredNames = "MRG_RXBUF|LOG_ALL|EVENT_IDX|PROTOCOL_FEATURES|VERSION_1"
        let limit = "features=CSUM+MRG_RXBUF+EVENT_IDX+VERSION_1+RING_PACKED,offloads=off"
        XCTAssertEqual(port.status.features.offered, "0x" + String(expected, radix: 16))
        XCTAssertEqual(port.status.features.offeredNames, offeredNames)
        XCTAssertEqual(port.status.features.limit, limit)

        let frontend = try VhostUserFrontend(connectingTo: spec.socketPath)
        let n = try frontend.negotiate(features: ~VirtioFeature.vhostLogAll)  // takes everything offered but logging
        XCTAssertEqual(n.offeredFeatures, expected, "GET_FEATURES: \(describeFeatures(n.offeredFeatures))")
        waitFor("SET_FEATURES in status") { port.status.features.ackedNames == "MRG_RXBUF|EVENT_IDX|PROTOCOL_FEATURES|VERSION_1" }
        XCTAssertEqual(port.status.features.acked, "0x" + String(expected & ~VirtioFeature.vhostLogAll, radix: 16))

        // The JSON the control socket answers carries the names and the limit; the port without
        // options has no limit key.
        let json = String(decoding: daemon.handleControl(ControlRequest(command: "status")), as: UTF8.self)
        XCTAssertTrue(json.contains("\"offeredNames\":\"\(offeredNames)\""), json)
        XCTAssertTrue(json.contains("\"limit\":\"\(limit)\""), json)
        XCTAssertTrue(json.contains("\"ackedNames\":\"MRG_RXBUF|EVENT_IDX|PROTOCOL_FEATURES|VERSION_1\""), json)
        let decoded = try JSONDecoder().decode(DaemonStatus.self, from: Data(json.utf8))
        XCTAssertNil(decoded.ports[1].features.limit)
        XCTAssertEqual(decoded.ports[1].features.offeredNames, describeFeatures(VirtioNetFeatureSet.migratable | BackendConfig.vhostUserFeatures))
        XCTAssertNotNil(decoded.ports[0].protocolFeatures.offeredNames)
        XCTAssertNil(decoded.ports[0].protocolFeatures.limit)

        // Enforced, not only advertised: INDIRECT_DESC (the device has it, the list leaves it out)
        // is refused and the connection closed.
        do { try frontend.setFeatures(n.ackedFeatures | VirtioFeature.ringIndirectDesc) } catch {}
        XCTAssertTrue(try frontend.backendClosesConnection(within: .seconds(5)))
        waitFor("the refusal") { port.status.lastError?.contains("INDIRECT_DESC") == true }
        waitFor("the disconnect") { port.status.connection == "listening" }
        XCTAssertEqual(port.status.features.offeredNames, offeredNames, "kept after the disconnect")
        XCTAssertEqual(port.status.features.limit, limit, "kept after the disconnect")
        XCTAssertEqual(port.status.features.ackedNames, "")
    }

    /// A reply from a daemon before these keys still decodes (vdpactl against an older vdpad).
    func testOlderStatusWithoutTheNewKeysDecodes() throws {
        let old = #"{"offered":"0x1","acked":"0x0","ackedNames":""}"#
        let f = try JSONDecoder().decode(FeatureStatus.self, from: Data(old.utf8))
        XCTAssertNil(f.offeredNames)
        XCTAssertNil(f.limit)
    }

    /// Start-up warnings name what the list asked for and the port will not offer, and why; the
    /// offloads withheld by offloads=off are not warned about (the operator asked for that).
    func testWarningsNameWhatTheListAskedForAndThePortWillNotOffer() throws {
        let spec = try PortSpec.parse("socket=/x,queues=2,features=VERSION_1+MRG_RXBUF+MQ+CTRL_VQ+CSUM+LOG_ALL,offloads=off", defaultID: "p")
        let device = RecordingDevice(features: VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | VirtioNetFeature.ctrlVq | VirtioNetFeature.csum)
        let config = Port.backendConfig(queuePairs: 2, device: device, featureMask: spec.featureMask)
        XCTAssertEqual(Port.featureWarnings(spec: spec, device: device, config: config), [
            "features=CSUM+MRG_RXBUF+CTRL_VQ+MQ+LOG_ALL+VERSION_1,offloads=off: the port will not offer MQ (missing from the device) "
                + "or CTRL_VQ (outside what the migration relay supports)",
            "features=CSUM+MRG_RXBUF+CTRL_VQ+MQ+LOG_ALL+VERSION_1,offloads=off: the port does not offer MQ: the guest can use only one of its 2 queue pairs",
        ])
        // Everything asked for is offered: no warning; no list: no warning.
        let fine = try PortSpec.parse("socket=/x,features=VERSION_1+MRG_RXBUF", defaultID: "p")
        XCTAssertEqual(Port.featureWarnings(spec: fine, device: device,
                                            config: Port.backendConfig(queuePairs: 1, device: device, featureMask: fine.featureMask)), [])
        let none = try PortSpec.parse("socket=/x,offloads=off", defaultID: "p")
        XCTAssertEqual(Port.featureWarnings(spec: none, device: device,
                                            config: Port.backendConfig(queuePairs: 1, device: device, featureMask: none.featureMask)), [])
    }

    func waitFor(_ what: String, file: StaticString = #filePath, line: UInt = #line, _ condition: () -> Bool) {
        let deadline = Date().addingTimeInterval(5)
        while !condition() && Date() < deadline { usleep(10_000) }
        XCTAssertTrue(condition(), "timed out waiting for \(what)", file: file, line: line)
    }
}
