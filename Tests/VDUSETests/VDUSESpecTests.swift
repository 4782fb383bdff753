import SoftNIC
import Virtio
import XCTest
@testable import VDUSE

final class VDUSESpecTests: XCTestCase {
    func testFullSpec() throws {
        let s = try VDUSESpec.parse("name=vduse0,link=tap:ifname=t0,mac=52:54:00:12:34:56,queues=2,bind=none")
        XCTAssertEqual(s, VDUSESpec(name: "vduse0", link: "tap:ifname=t0", mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56], queuePairs: 2, bind: .none))
    }

    func testDefaults() throws {
        let s = try VDUSESpec.parse("name=v")
        XCTAssertEqual(s, VDUSESpec(name: "v", link: "loopback", mac: nil, queuePairs: 1, bind: .vhostVDPA))
        XCTAssertEqual(try VDUSESpec.parse("name=v,bind=virtio-vdpa").bind, .virtioVDPA)
        XCTAssertEqual(VDPABusDriver.vhostVDPA.sysfsName, "vhost_vdpa")
        XCTAssertEqual(VDPABusDriver.virtioVDPA.sysfsName, "virtio_vdpa")
        XCTAssertNil(VDPABusDriver.none.sysfsName)
        XCTAssertTrue(s.indirect)
    }

    /// indirect=off: the device leaves INDIRECT_DESC out (QEMU 7.2's x-svq=on refuses it) and
    /// offers everything else as before.
    func testIndirectOff() throws {
        let s = try VDUSESpec.parse("name=v,indirect=off")
        XCTAssertFalse(s.indirect)
        XCTAssertTrue(try VDUSESpec.parse("name=v,indirect=on").indirect)
        XCTAssertThrowsError(try VDUSESpec.parse("name=v,indirect=no")) { e in
            XCTAssertTrue("\(e)".contains("indirect=no: use on or off"), "\(e)")
        }
        let on = VDUSEDeviceConfig(try VDUSESpec.parse("name=v")).features
        let off = VDUSEDeviceConfig(s).features
        XCTAssertEqual(off, on & ~VirtioFeature.ringIndirectDesc)
        XCTAssertNotEqual(on & VirtioFeature.ringIndirectDesc, 0)
    }

    func testErrorsNameWhatWasWrong() {
        let cases: [(String, String)] = [
            ("link=loopback", "name=NAME is required"),
            ("name=", "name '' must be"),
            ("name=a/b", "name 'a/b' must be"),
            ("name=..", "name '..' must be"),
            ("name=control", "/dev/vduse/control"),
            ("name=\(String(repeating: "x", count: 65))", "must be 1-64"),
            ("name=v,queues=0", "queues=0 must be"),
            ("name=v,queues=65", "queues=65 must be"),
            ("name=v,queues=2,bind=virtio-vdpa", "virtio_net driver refuses several queue pairs"),
            ("name=v,bind=vfio", "bind=vfio: use vhost-vdpa, virtio-vdpa or none"),
            ("name=v,mac=01:00:00:00:00:01", "mac=01:00:00:00:00:01 must be a unicast MAC"),
            ("name=v,mac=52:54:00", "must be a unicast MAC"),
            ("name=v,link=warp", "unknown link"),
            ("name=v,colour=red", "unknown option 'colour'"),
            ("name=v,name=w", "name= is given twice"),
            ("name=v,,queues=1", "empty option"),
            ("name=v,client", "option 'client' needs a value"),
        ]
        for (text, expect) in cases {
            XCTAssertThrowsError(try VDUSESpec.parse(text), text) { e in
                let m = "\(e)"
                XCTAssertTrue(m.contains(expect), "\(text): \(m)")
                XCTAssertTrue(m.hasPrefix("--vduse \(text):"), "names the option: \(m)")
            }
        }
    }

    func testConfigMACIsStableUnicastAndLocal() throws {
        let a = try VDUSESpec.parse("name=vduse0").configMAC
        XCTAssertEqual(a, try VDUSESpec.parse("name=vduse0").configMAC)
        XCTAssertNotEqual(a, try VDUSESpec.parse("name=vduse1").configMAC)
        XCTAssertEqual(a.count, 6)
        XCTAssertEqual(a[0] & 0x03, 0x02, "locally administered, unicast")
        XCTAssertEqual(try VDUSESpec.parse("name=v,mac=52:54:00:00:00:09").configMAC, [0x52, 0x54, 0, 0, 0, 9])
    }
}

final class VDUSEDeviceConfigTests: XCTestCase {
    /// VDUSE's rules for a net device (features_is_valid in vduse_dev.c): ACCESS_PLATFORM and
    /// VERSION_1 required, CTRL_VQ refused; and Linux's virtio_net refuses MQ and GUEST_ANNOUNCE
    /// without CTRL_VQ (virtnet_validate_features).
    func testFeatures() {
        let one = VDUSEDeviceConfig(mac: [2, 0, 0, 0, 0, 1], queuePairs: 1).features
        for bit in [VirtioFeature.accessPlatform, VirtioFeature.version1, VirtioNetFeature.mac, VirtioNetFeature.status,
                    VirtioNetFeature.mtu, VirtioNetFeature.mrgRxbuf, VirtioFeature.ringEventIdx, VirtioFeature.ringIndirectDesc] {
            XCTAssertNotEqual(one & bit, 0, describeFeatures(bit))
        }
        for bit in [VirtioNetFeature.ctrlVq, VirtioNetFeature.mq, VirtioNetFeature.guestAnnounce, VirtioFeature.ringPacked] {
            XCTAssertEqual(one & bit, 0, describeFeatures(bit))
        }
        let two = VDUSEDeviceConfig(mac: [2, 0, 0, 0, 0, 1], queuePairs: 2)
        XCTAssertEqual(two.features, one | VirtioNetFeature.mq)
        XCTAssertEqual(two.queueCount, 4, "RX and TX per pair, no control queue")
        // Nothing the SoftNIC does not implement, beyond the config-space bits and ACCESS_PLATFORM.
        let extra = VirtioFeature.accessPlatform | VirtioNetFeature.mac | VirtioNetFeature.status
        XCTAssertEqual(two.features & ~extra & ~SoftNIC.deviceFeatures, 0)
    }

    /// struct virtio_net_config, little-endian: mac[6], status, max_virtqueue_pairs, mtu, then
    /// speed, duplex and the RSS fields (zero): 24 bytes.
    func testConfigSpaceBytes() {
        let c = VDUSEDeviceConfig(mac: [0x52, 0x54, 0, 0xab, 0xcd, 0xef], queuePairs: 3).configSpace
        XCTAssertEqual(c, [0x52, 0x54, 0, 0xab, 0xcd, 0xef, 1, 0, 3, 0, 0xdc, 0x05] + [UInt8](repeating: 0, count: 12))
        XCTAssertEqual(VDUSEDeviceConfig.queueAlignment & (VDUSEDeviceConfig.queueAlignment - 1), 0)
        XCTAssertTrue(SplitRingLayout.isValidQueueSize(VDUSEDeviceConfig.maxQueueSize))
    }
}
