#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import Platform
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
