import Foundation
import XCTest
@testable import VDUSE

/// The sysfs binding over a fake /sys/bus/vdpa tree: which attribute files are written with what.
final class VDPABusTests: XCTestCase {
    var root = ""

    override func setUpWithError() throws {
        root = NSTemporaryDirectory() + "vdpa-bus-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fm = FileManager.default
        for d in ["devices/v0", "drivers/virtio_vdpa", "drivers/vhost_vdpa"] {
            try fm.createDirectory(atPath: "\(root)/\(d)", withIntermediateDirectories: true)
        }
        for f in ["virtio_vdpa/bind", "virtio_vdpa/unbind", "vhost_vdpa/bind", "vhost_vdpa/unbind"] {
            XCTAssertTrue(fm.createFile(atPath: "\(root)/drivers/\(f)", contents: Data()))
        }
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(atPath: root) }

    func boundTo(_ driver: String) throws {
        try FileManager.default.createSymbolicLink(atPath: "\(root)/devices/v0/driver", withDestinationPath: "../../drivers/\(driver)")
    }
    func written(_ f: String) -> String { (try? String(contentsOfFile: "\(root)/drivers/\(f)", encoding: .utf8)) ?? "?" }

    func testRebindsWhatAutoprobeChose() throws {
        try boundTo("virtio_vdpa")
        let bus = VDPABus(root: root)
        XCTAssertEqual(try bus.driver(of: "v0"), "virtio_vdpa")
        try bus.bind("v0", to: .vhostVDPA)
        XCTAssertEqual(written("virtio_vdpa/unbind"), "v0")
        XCTAssertEqual(written("vhost_vdpa/bind"), "v0")
        XCTAssertEqual(written("virtio_vdpa/bind"), "")
    }

    func testLeavesTheWantedDriverAlone() throws {
        try boundTo("vhost_vdpa")
        try VDPABus(root: root).bind("v0", to: .vhostVDPA)
        XCTAssertEqual(written("vhost_vdpa/unbind"), "")
        XCTAssertEqual(written("vhost_vdpa/bind"), "")
    }

    func testNoneOnlyUnbinds() throws {
        try boundTo("vhost_vdpa")
        try VDPABus(root: root).bind("v0", to: .none)
        XCTAssertEqual(written("vhost_vdpa/unbind"), "v0")
        XCTAssertEqual(written("virtio_vdpa/bind"), "")
        XCTAssertEqual(written("vhost_vdpa/bind"), "")
    }

    func testUnboundDeviceIsBound() throws {
        XCTAssertNil(try VDPABus(root: root).driver(of: "v0"))
        try VDPABus(root: root).bind("v0", to: .virtioVDPA)
        XCTAssertEqual(written("virtio_vdpa/bind"), "v0")
    }

    func testErrorsNameTheMissingPiece() throws {
        try FileManager.default.removeItem(atPath: "\(root)/drivers/vhost_vdpa")
        XCTAssertThrowsError(try VDPABus(root: root).bind("v0", to: .vhostVDPA)) { e in
            XCTAssertTrue("\(e)".contains("no driver vhost_vdpa on the vDPA bus"), "\(e)")
            XCTAssertTrue("\(e)".contains("load the vhost_vdpa module"), "\(e)")
        }
        XCTAssertThrowsError(try VDPABus(root: root).bind("v9", to: .virtioVDPA)) { e in
            XCTAssertTrue("\(e)".contains("vDPA device v9"), "\(e)")
            XCTAssertTrue("\(e)".contains("not on the vDPA bus"), "\(e)")
        }
    }
}
