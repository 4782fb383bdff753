import XCTest
import Virtio
@testable import VhostVDPA

/// The driver's wire formats, byte for byte as linux/vhost_types.h lays them out.
final class VhostVDPAEncodingTests: XCTestCase {
    /// struct vhost_msg_v2 { u32 type = VHOST_IOTLB_MSG_V2; u32 asid; struct vhost_iotlb_msg
    /// { u64 iova; u64 size; u64 uaddr; u8 perm; u8 type; } padded to 64 }: 72 bytes.
    func testIOTLBUpdateLayout() {
        let b = VhostVDPAFile.encode(.update(iova: 0x1122_3344_5566_7788, size: 0x1000, uaddr: 0x7f00_0000_1000, writable: true))
        XCTAssertEqual(b.count, 72)
        XCTAssertEqual(Array(b[0..<8]), [2, 0, 0, 0, 0, 0, 0, 0], "type MSG_V2, asid 0")
        XCTAssertEqual(Array(b[8..<16]), [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
        XCTAssertEqual(Array(b[16..<24]), [0, 0x10, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(Array(b[24..<32]), [0, 0x10, 0, 0, 0, 0x7f, 0, 0])
        XCTAssertEqual(b[32], 3, "VHOST_ACCESS_RW")
        XCTAssertEqual(b[33], 2, "VHOST_IOTLB_UPDATE")
        XCTAssertTrue(b[34...].allSatisfy { $0 == 0 })
        let ro = VhostVDPAFile.encode(.update(iova: 0, size: 1, uaddr: 0, writable: false))
        XCTAssertEqual(ro[32], 1, "VHOST_ACCESS_RO")
    }

    func testIOTLBOtherMessages() {
        let inv = VhostVDPAFile.encode(.invalidate(iova: 0x4000, size: 0x2000))
        XCTAssertEqual(Array(inv[8..<10]), [0, 0x40]); XCTAssertEqual(Array(inv[16..<18]), [0, 0x20])
        XCTAssertEqual(inv[33], 3, "VHOST_IOTLB_INVALIDATE")
        XCTAssertEqual(VhostVDPAFile.encode(.batchBegin)[33], 5)
        XCTAssertEqual(VhostVDPAFile.encode(.batchEnd)[33], 6)
    }

    /// struct virtio_net_config: mac[6], status u16, max_virtqueue_pairs u16, mtu u16; fields
    /// count only when their feature is offered.
    func testNetConfig() {
        let raw: [UInt8] = [0x52, 0x54, 0, 1, 2, 3, 1, 0, 4, 0, 0xdc, 0x05]
        let all = VhostVDPADevice.parseConfig(raw, features: VirtioNetFeature.mac | VirtioNetFeature.mq | VirtioNetFeature.mtu)
        XCTAssertEqual(all.mac, [0x52, 0x54, 0, 1, 2, 3]); XCTAssertEqual(all.maxQueuePairs, 4); XCTAssertEqual(all.mtu, 1500)
        let none = VhostVDPADevice.parseConfig(raw, features: 0)
        XCTAssertNil(none.mac); XCTAssertEqual(none.maxQueuePairs, 1); XCTAssertNil(none.mtu)
        XCTAssertEqual(VhostVDPADevice.formatMAC([0x52, 0x54, 0, 1, 2, 0xab]), "52:54:00:01:02:ab")
    }

    func testBackendFeatureNames() {
        XCTAssertEqual(VhostBackendFeature.names(VhostBackendFeature.iotlbMsgV2 | VhostBackendFeature.suspend), ["IOTLB_MSG_V2", "SUSPEND"])
        XCTAssertEqual(VhostBackendFeature.suspend, 1 << 4)
        XCTAssertEqual(VhostBackendFeature.resume, 1 << 5)
    }
}
