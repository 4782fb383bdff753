import CVDPAShims
import Platform
import XCTest
@testable import VDUSE

final class GenericNetlinkTests: XCTestCase {
    /// The constants the encoder uses are the kernel headers' (linux/netlink.h, genetlink.h, vdpa.h).
    func testConstantsAreTheKernelHeaders() {
        XCTAssertEqual(GenericNetlink.headerSize, Int(CVDPA_NLMSGHDR_SIZE))
        XCTAssertEqual(GenericNetlink.genericHeaderSize, Int(CVDPA_GENLMSGHDR_SIZE))
        XCTAssertEqual(GenericNetlink.attributeHeaderSize, Int(CVDPA_NLATTR_SIZE))
        XCTAssertEqual(GenericNetlink.flagRequest, CVDPA_NLM_F_REQUEST)
        XCTAssertEqual(GenericNetlink.flagAck, CVDPA_NLM_F_ACK)
        XCTAssertEqual(GenericNetlink.flagAckTLVs, CVDPA_NLM_F_ACK_TLVS)
        XCTAssertEqual(GenericNetlink.typeError, CVDPA_NLMSG_ERROR)
        XCTAssertEqual(GenericNetlink.typeDone, CVDPA_NLMSG_DONE)
        XCTAssertEqual(GenericNetlink.controllerFamily, CVDPA_GENL_ID_CTRL)
        XCTAssertEqual(GenericNetlink.controllerGetFamily, CVDPA_CTRL_CMD_GETFAMILY)
        XCTAssertEqual(GenericNetlink.controllerAttributeFamilyID, CVDPA_CTRL_ATTR_FAMILY_ID)
        XCTAssertEqual(GenericNetlink.controllerAttributeFamilyName, CVDPA_CTRL_ATTR_FAMILY_NAME)
        XCTAssertEqual(GenericNetlink.errorAttributeMessage, CVDPA_NLMSGERR_ATTR_MSG)
        XCTAssertEqual(VDPANetlink.version, CVDPA_VDPA_GENL_VERSION)
        XCTAssertEqual(VDPANetlink.commandDeviceNew, CVDPA_VDPA_CMD_DEV_NEW)
        XCTAssertEqual(VDPANetlink.commandDeviceDelete, CVDPA_VDPA_CMD_DEV_DEL)
        XCTAssertEqual(VDPANetlink.attributeManagementDeviceName, CVDPA_VDPA_ATTR_MGMTDEV_DEV_NAME)
        XCTAssertEqual(VDPANetlink.attributeDeviceName, CVDPA_VDPA_ATTR_DEV_NAME)
    }

    /// `vdpa dev add name vduse0 mgmtdev vduse`, byte for byte: nlmsghdr (length 44, the family,
    /// REQUEST|ACK, the sequence, port 0), genlmsghdr (DEV_NEW, version 1), then the management
    /// device's name and the device's name as NUL-terminated strings, each attribute padded to 4.
    func testDeviceNewBytes() {
        let m = VDPANetlink.addDeviceRequest(family: 0x1234, name: "vduse0", sequence: 0x0a0b_0c0d)
        let expect: [UInt8] = [
            44, 0, 0, 0, 0x34, 0x12, 5, 0, 0x0d, 0x0c, 0x0b, 0x0a, 0, 0, 0, 0,
            3, 1, 0, 0,
            10, 0, 2, 0, 0x76, 0x64, 0x75, 0x73, 0x65, 0, 0, 0,  // "vduse\0" + 2 bytes of padding
            11, 0, 4, 0, 0x76, 0x64, 0x75, 0x73, 0x65, 0x30, 0, 0,  // "vduse0\0" + 1
        ]
        XCTAssertEqual(m, expect)
        XCTAssertEqual(m.count % 4, 0)
    }

    func testDeviceDeleteAndFamilyBytes() {
        XCTAssertEqual(VDPANetlink.deleteDeviceRequest(family: 0x20, name: "abcd", sequence: 2), [
            32, 0, 0, 0, 0x20, 0, 5, 0, 2, 0, 0, 0, 0, 0, 0, 0,
            4, 1, 0, 0,
            9, 0, 4, 0, 0x61, 0x62, 0x63, 0x64, 0, 0, 0, 0,  // 16 + 4 + (4 + 5 padded to 8) = 32
        ])
        XCTAssertEqual(VDPANetlink.familyRequest(name: "vdpa", sequence: 1), [
            32, 0, 0, 0, 0x10, 0, 5, 0, 1, 0, 0, 0, 0, 0, 0, 0,
            3, 1, 0, 0,
            9, 0, 2, 0, 0x76, 0x64, 0x70, 0x61, 0, 0, 0, 0,
        ])
    }

    func testParsesRepliesAndExtendedAcks() throws {
        // A GETFAMILY reply (family id 0x1b) and then an NLMSG_ERROR with an error and the
        // kernel's text (NLM_F_ACK_TLVS; the request's payload is capped away).
        var reply = GenericNetlink.request(family: 0x10, flags: 0, sequence: 7, command: 1, version: 2,
                                           attributes: [.init(type: 1, payload: [0x1b, 0]), .string(2, "vdpa")])
        var err: [UInt8] = []
        GenericNetlink.appendLE(&err, UInt32(bitPattern: -22))
        err += [UInt8](repeating: 0xaa, count: 16)  // the request's header, echoed
        let text = Array("Fail to find the specified management device".utf8) + [0]
        GenericNetlink.appendLE(&err, UInt16(4 + text.count))
        GenericNetlink.appendLE(&err, UInt16(1))
        err += text + [UInt8](repeating: 0, count: GenericNetlink.padding(text.count))
        var header: [UInt8] = []
        GenericNetlink.appendLE(&header, UInt32(16 + err.count))
        GenericNetlink.appendLE(&header, UInt16(2))
        GenericNetlink.appendLE(&header, UInt16(0x300))  // NLM_F_CAPPED | NLM_F_ACK_TLVS
        GenericNetlink.appendLE(&header, UInt32(7))
        GenericNetlink.appendLE(&header, UInt32(0))
        reply += header + err
        let ms = try GenericNetlink.messages(in: reply)
        XCTAssertEqual(ms.count, 2)
        XCTAssertEqual(GenericNetlink.attributes(ms[0].payload[4...])[1], [0x1b, 0])
        XCTAssertEqual(GenericNetlink.attributes(ms[0].payload[4...])[2], Array("vdpa".utf8) + [0])
        let (code, message) = GenericNetlink.error(in: ms[1])
        XCTAssertEqual(code, 22)
        XCTAssertEqual(message, "Fail to find the specified management device")
        XCTAssertTrue(GenericNetlinkClient.describe(code, message).contains("the kernel says: Fail to find"))
        // A message that claims more bytes than the datagram holds.
        var bad = reply
        bad[0] = 200
        XCTAssertThrowsError(try GenericNetlink.messages(in: bad))
    }

    /// The encoder against a real kernel: the controller resolves its own name ("nlctrl" is
    /// GENL_ID_CTRL), and a family that is not there is named in the error.
    func testResolvesFamiliesWithTheKernel() throws {
        let client = try GenericNetlinkClient(timeoutSeconds: 5)
        XCTAssertEqual(try client.family("nlctrl", purpose: "test"), 0x10)
        XCTAssertThrowsError(try client.family("no-such-family", purpose: "a test")) { e in
            XCTAssertTrue("\(e)".contains("no generic netlink family 'no-such-family' (a test: is its module loaded?)"), "\(e)")
        }
    }
}
