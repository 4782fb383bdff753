import XCTest
@testable import VDPA
import VDPAConfig

/// `vdpad --config`: the daemon's options and one PortSpec per [[port]] table, the same as the
/// `--port` text would give; every error names the file, the line and the key.
final class ConfigFileTests: XCTestCase {
    func testOptionsAndPorts() throws {
        let c = try ConfigFile.parse("""
            control = "/run/x.sock"
            control-max-clients = 4

            [[port]]
            socket = "/a.sock"
            id = "vm1"
            queues = 2
            client = true

            [[port]]
            socket = "/b.sock"
            link = "sink"
            offloads = false
            log = "page-run"
            """, file: "t.toml")
        XCTAssertEqual(c.options, ["control": "/run/x.sock", "control-max-clients": "4"])
        XCTAssertEqual(c.ports.count, 2)
        XCTAssertEqual(c.ports[0], try PortSpec.parse("socket=/a.sock,id=vm1,queues=2,client", defaultID: "vdpa0"))
        XCTAssertEqual(c.ports[1], try PortSpec.parse("socket=/b.sock,link=sink,offloads=off,log=page-run", defaultID: "vdpa1"))
        XCTAssertEqual(c.ports[1].id, "vdpa1", "unnamed ports are numbered in order")
    }

    func testErrorsNameFileLineAndKey() {
        func error(_ text: String) -> ConfigFile.Error? {
            do { _ = try ConfigFile.parse(text, file: "v.toml"); return nil } catch { return error }
        }
        let cases: [(String, Int?, String?, String)] = [
            ("controll = \"/x\"\n", 1, "controll", "unknown option"),
            ("[[port]]\nsocket = \"/x\"\nqueues = 99\n", 3, "queues", "queues=99"),
            ("[[port]]\nsocket = \"/x\"\n\n[[port]]\nsocket = \"/y\"\nmac = \"01:00:00:00:00:01\"\n", 6, "mac", "unicast"),
            ("[[port]]\nsocket = \"/x\"\nbogus = 1\n", 3, "bogus", "unknown port option"),
            ("[[port]]\nsocket = \"/x,y\"\n", 2, "socket", "contains ','"),
            ("[[port]]\nid = \"a\"\n", 1, "port", "socket=PATH is required"),
            ("[[port]]\nsocket = \"/x\"\nmigration = \"iommu-dirty\"\nlog = \"buffer\"\n", 1, "port", "apply to migration=relay only"),
            ("[[port]]\nsocket = \n", 2, nil, "not TOML"),
            ("port = 3\n", 1, "port", "[[port]] tables"),
        ]
        for (text, line, key, says) in cases {
            guard let e = error(text) else { XCTFail("accepted: \(text)"); continue }
            XCTAssertEqual(e.file, "v.toml")
            XCTAssertEqual(e.line, line, "\(text): \(e)")
            XCTAssertEqual(e.key, key, "\(text): \(e)")
            XCTAssertTrue(e.description.contains(says), "\(text): \(e)")
        }
    }
}
