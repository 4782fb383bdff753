#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import Platform
import Virtio
import XCTest
@testable import VDPA

final class PortSpecTests: XCTestCase {
    func testParse() throws {
        XCTAssertEqual(try PortSpec.parse("socket=/a/b.sock", defaultID: "vdpa3"),
                       PortSpec(id: "vdpa3", socketPath: "/a/b.sock", client: false, queuePairs: 1))
        XCTAssertEqual(try PortSpec.parse("socket=/x,id=net0,client,queues=4", defaultID: "vdpa0"),
                       PortSpec(id: "net0", socketPath: "/x", client: true, queuePairs: 4, queuesGiven: true))
        XCTAssertEqual(try PortSpec.parse("socket=/x,device=vhost-vdpa:/dev/vhost-vdpa-0", defaultID: "vdpa0").device,
                       .vhostVDPA(path: "/dev/vhost-vdpa-0"))
        XCTAssertEqual(try PortSpec.parse("socket=/x,device=softnic", defaultID: "vdpa0").device, .softnic)
    }

    /// device= names one of the two drivers; a kernel device takes neither link= nor mac=.
    func testDeviceErrors() {
        for (bad, says) in [("socket=/x,device=mlx5", "not a device"), ("socket=/x,device=vhost-vdpa:", "absolute path"),
                            ("socket=/x,device=vhost-vdpa:dev/x", "absolute path"),
                            ("socket=/x,device=vhost-vdpa:/dev/vhost-vdpa-0,link=sink", "software NIC"),
                            ("socket=/x,device=vhost-vdpa:/dev/vhost-vdpa-0,mac=52:54:00:12:34:56", "software NIC")] {
            XCTAssertThrowsError(try PortSpec.parse(bad, defaultID: "vdpa0"), bad) { XCTAssertTrue("\($0)".contains(says), "\(bad): \($0)") }
        }
    }

    func testErrors() {
        for bad in ["", "id=x", "socket=", "socket=/x,queues=0", "socket=/x,queues=65", "socket=/x,queues=two",
                    "socket=/x,bogus=1", "socket=/a,b", "socket=/x,id=a b", "socket=/x,,client"] {
            XCTAssertThrowsError(try PortSpec.parse(bad, defaultID: "vdpa0"), bad)
        }
        do {
            _ = try PortSpec.parse("socket=/tmp/a,b.sock", defaultID: "vdpa0")
            XCTFail("comma in path accepted")
        } catch {
            XCTAssertTrue("\(error)".contains("','"), "\(error)")
        }
    }

    /// `relay=`, `migration=`, `log=`: defaults, values, and what is refused with a message naming it.
    func testMigrationOptions() throws {
        let d = try PortSpec.parse("socket=/x", defaultID: "vdpa0").migration
        XCTAssertEqual(d, MigrationOptions(relay: .used, method: .relay, log: .exact))
        XCTAssertEqual(try PortSpec.parse("socket=/x,relay=used,migration=relay,log=exact", defaultID: "vdpa0").migration, d)
        for (bad, says) in [("relay=avail", "relay=avail:"), ("relay", "relay=:"), ("migration=iommu", "migration=iommu:"),
                            ("log=pages", "log=pages:"), ("relay=used,relay=avail+used", "relay="),
                            ("migration=iommu-dirty,log=exact", "apply to migration=relay only"),
                            ("migration=iommu-dirty,relay=used", "apply to migration=relay only")] {
            XCTAssertThrowsError(try PortSpec.parse("socket=/x," + bad, defaultID: "vdpa0"), bad) {
                XCTAssertTrue("\($0)".contains(says), "\(bad): \($0)")
            }
        }
        XCTAssertEqual(try PortSpec.parse("socket=/x,migration=iommu-dirty", defaultID: "vdpa0").migration,
                       MigrationOptions(relay: .used, method: .iommuDirty, log: .exact), "migration=iommu-dirty is implemented")
        XCTAssertEqual(try PortSpec.parse("socket=/x,relay=avail+used", defaultID: "vdpa0").migration,
                       MigrationOptions(relay: .availUsed, method: .relay, log: .exact), "the avail relay is implemented")
        XCTAssertEqual(try PortSpec.parse("socket=/x,relay=avail+used,log=page-run", defaultID: "vdpa0").migration,
                       MigrationOptions(relay: .availUsed, method: .relay, log: .pageRun))
    }

    /// `features=` takes names (any case) and hex bits joined by '+'; `offloads=off` withholds the
    /// offloads, alone or with a list. The spec keeps the bits and prints them back as options.
    func testFeatureList() throws {
        func spec(_ options: String) throws -> PortSpec { try PortSpec.parse("socket=/x," + options, defaultID: "vdpa0") }
        let basic = VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf | VirtioFeature.ringEventIdx
        XCTAssertEqual(try spec("features=VERSION_1+MRG_RXBUF+EVENT_IDX").featureLimit, basic)
        XCTAssertEqual(try spec("features=version_1+Mrg_RxBuf+event_idx").featureLimit, basic, "names in any case")
        XCTAssertEqual(try spec("features=0x120008000").featureLimit, basic, "hex bits")
        XCTAssertEqual(try spec("features=0X100000000+mrg_rxbuf+0x20000000").featureLimit, basic, "hex and names together")
        XCTAssertEqual(try spec("features=MQ+MQ+mq").featureLimit, VirtioNetFeature.mq, "a name repeated in the list is that name")
        XCTAssertEqual(try spec("features=0x0").featureLimit, 0)
        XCTAssertEqual(try spec("features=VERSION_1+MRG_RXBUF+EVENT_IDX").featureMask, basic)
        XCTAssertEqual(try spec("features=VERSION_1+MRG_RXBUF+EVENT_IDX").featureLimitDescription,
                       "features=MRG_RXBUF+EVENT_IDX+VERSION_1")

        let plain = try spec("id=p")
        XCTAssertNil(plain.featureLimit)
        XCTAssertTrue(plain.offloads)
        XCTAssertEqual(plain.featureMask, ~0, "no option, no restriction")
        XCTAssertNil(plain.featureLimitDescription)
        XCTAssertEqual(try spec("id=p,offloads=on"), plain, "offloads=on is the default")

        let noOffloads = try spec("offloads=off")
        XCTAssertFalse(noOffloads.offloads)
        XCTAssertEqual(noOffloads.featureMask, ~VirtioNetFeature.offloads)
        XCTAssertEqual(noOffloads.featureLimitDescription, "offloads=off")

        let both = try spec("features=VERSION_1+MRG_RXBUF+CSUM+GUEST_TSO4,offloads=off")
        XCTAssertEqual(both.featureMask, VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf, "offloads=off wins over the list")
        XCTAssertEqual(both.featureLimitDescription, "features=CSUM+GUEST_TSO4+MRG_RXBUF+VERSION_1,offloads=off")
        XCTAssertEqual(try spec("offloads=off,features=VERSION_1+MRG_RXBUF+CSUM+GUEST_TSO4"), both, "in either order")

        // Bits without a name print as hex, and what is printed parses back to the same spec.
        let odd = try spec("features=VERSION_1+0x8000000000000000")
        XCTAssertEqual(odd.featureLimitDescription, "features=VERSION_1+0x8000000000000000")
        for s in [both, odd, noOffloads, try spec("features=0x0")] {
            XCTAssertEqual(try spec(s.featureLimitDescription!), s)
        }
        // The public init still takes what it took (new parameters have defaults).
        XCTAssertEqual(PortSpec(id: "vdpa0", socketPath: "/x", featureLimit: basic, offloads: false),
                       try spec("features=VERSION_1+MRG_RXBUF+EVENT_IDX,offloads=off"))
    }

    /// A bad list is refused with the bad part named; an unknown name lists the known ones.
    func testFeatureListErrors() {
        for (bad, says) in [("features=VERSION_1+NOPE", "unknown feature 'NOPE'"), ("features=mrg-rxbuf", "unknown feature 'mrg-rxbuf'"),
                            ("features=", "empty name"), ("features=MQ++VERSION_1", "empty name"), ("features=MQ+", "empty name"),
                            ("features", "needs a list"), ("features=0x", "'0x' is not a 64-bit hex number"),
                            ("features=0xfg", "'0xfg' is not"), ("features=0x1ffffffffffffffff", "is not a 64-bit hex number"),
                            ("features=0x-1", "is not"), ("features=c\u{17F}um", "unknown feature"),
                            ("features=MQ,features=VERSION_1", "features= given twice"),
                            ("offloads=off,offloads=on", "offloads= given twice"), ("offloads=no", "offloads=on or offloads=off"),
                            ("offloads", "offloads=on or offloads=off"), ("offloads=OFF", "offloads=on or offloads=off")] {
            XCTAssertThrowsError(try PortSpec.parse("socket=/x," + bad, defaultID: "vdpa0"), bad) {
                XCTAssertTrue("\($0)".contains(says), "\(bad): \($0)")
            }
        }
        XCTAssertThrowsError(try PortSpec.parse("socket=/x,features=VERSION_1+BOGUS", defaultID: "vdpa0")) {
            let text = "\($0)"
            for name in ["known: CSUM,", "MRG_RXBUF", "EVENT_IDX", "INDIRECT_DESC", "MQ", "VERSION_1", "GUEST_TSO4", "hex bits"] {
                XCTAssertTrue(text.contains(name), "\(text) should list \(name)")
            }
        }
    }

    /// Whatever the text, the parser returns a spec or throws its error: it never traps. Inputs
    /// are built from the pieces the parser looks for, and random bytes.
    func testParserNeverTraps() {
        let pieces = ["socket=", "/x", ",", "=", "+", "features", "offloads", "on", "off", "0x", "0X", "ffffffffffffffff", "1", "g",
                      "VERSION_1", "mq", "id", "queues", "mac", "device", "client", "link", "vhost-vdpa:", "\u{17F}", "\u{0}", "é", ""]
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20_000 {
            var text = ""
            for _ in 0..<Int.random(in: 0...12, using: &rng) {
                if Int.random(in: 0..<8, using: &rng) == 0 {
                    text += String(decoding: (0..<Int.random(in: 1...4, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) },
                                   as: UTF8.self)
                } else {
                    text += pieces.randomElement(using: &rng)!
                }
            }
            do {
                _ = try PortSpec.parse(text, defaultID: "vdpa0")
            } catch {
                XCTAssertFalse(error.message.isEmpty, text)
            }
        }
        XCTAssertNoThrow(try PortSpec.parse("socket=/x,features=0xffffffffffffffff+mq,offloads=off", defaultID: "vdpa0"))
    }

    func testStaleSocketReplacedLiveOneRefused() throws {
        let dir = "/tmp/vdpa-spec-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/sub/p.sock"
        try prepareSocketPath(path)  // creates the directories
        do {
            let live = try Platform.UnixSocket.listen(path: path)
            XCTAssertThrowsError(try prepareSocketPath(path)) { XCTAssertTrue("\($0)".contains("in use")) }
            _ = consume live
        }
        // The listener is gone; the file is a stale socket now.
        XCTAssertTrue(FileManager.default.fileExists(atPath: path))
        XCTAssertNoThrow(try prepareSocketPath(path))
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))
        FileManager.default.createFile(atPath: path, contents: Data("x".utf8))
        XCTAssertThrowsError(try prepareSocketPath(path)) { XCTAssertTrue("\($0)".contains("not a socket")) }
    }

    func testDuplicatePortsRejected() {
        XCTAssertThrowsError(try Daemon(specs: [PortSpec(id: "a", socketPath: "/tmp/1"), PortSpec(id: "a", socketPath: "/tmp/2")],
                                        controlPath: nil, logger: .init(label: "t")))
        XCTAssertThrowsError(try Daemon(specs: [PortSpec(id: "a", socketPath: "/tmp/1"), PortSpec(id: "b", socketPath: "/tmp/1")],
                                        controlPath: nil, logger: .init(label: "t")))
    }

    func testSocketGroupAndMode() throws {
        let dir = "/tmp/vdpa-own-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var logger = Logger(label: "t")
        logger.logLevel = .critical
        let d = try Daemon(specs: [PortSpec(id: "p", socketPath: dir + "/p.sock")], controlPath: dir + "/c.sock", logger: logger)
        let group = getgid() == 0 ? 1 : getgid()  // a group other than root's when run as root
        try d.start(ownership: SocketOwnership(group: group, mode: 0o660))
        defer { d.stop() }
        var st = stat()
        XCTAssertEqual(stat(dir + "/p.sock", &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o660)
        XCTAssertEqual(st.st_gid, group)
        // The control socket has its own mode (--control-mode, default 0600), not the ports'.
        XCTAssertEqual(stat(dir + "/c.sock", &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
    }
}
