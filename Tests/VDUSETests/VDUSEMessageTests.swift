import CVDPAShims
import XCTest
@testable import VDUSE

/// The message codec against linux/vduse.h as the C compiler lays it out.
final class VDUSEMessageTests: XCTestCase {
    func testSizesAndOffsetsAreTheKernels() {
        XCTAssertEqual(VDUSEMessage.requestSize, Int(CVDPA_VDUSE_REQUEST_SIZE))
        XCTAssertEqual(VDUSEMessage.responseSize, Int(CVDPA_VDUSE_RESPONSE_SIZE))
        // The offsets the codec uses.
        XCTAssertEqual(CVDPA_VDUSE_REQ_OFF_TYPE, 0)
        XCTAssertEqual(CVDPA_VDUSE_REQ_OFF_ID, 4)
        XCTAssertEqual(CVDPA_VDUSE_REQ_OFF_VQ_INDEX, 24)
        XCTAssertEqual(CVDPA_VDUSE_REQ_OFF_STATUS, 24)
        XCTAssertEqual(CVDPA_VDUSE_REQ_OFF_IOVA_START, 24)
        XCTAssertEqual(CVDPA_VDUSE_REQ_OFF_IOVA_LAST, 32)
        XCTAssertEqual(CVDPA_VDUSE_RESP_OFF_ID, 0)
        XCTAssertEqual(CVDPA_VDUSE_RESP_OFF_RESULT, 4)
        XCTAssertEqual(CVDPA_VDUSE_RESP_OFF_VQ_INDEX, 24)
        XCTAssertEqual(CVDPA_VDUSE_RESP_OFF_AVAIL_INDEX, 28)
        XCTAssertEqual(CVDPA_VDUSE_GET_VQ_STATE, 0)
        XCTAssertEqual(CVDPA_VDUSE_SET_STATUS, 1)
        XCTAssertEqual(CVDPA_VDUSE_UPDATE_IOTLB, 2)
        XCTAssertEqual(CVDPA_VDUSE_REQ_RESULT_OK, 0)
        XCTAssertEqual(CVDPA_VDUSE_REQ_RESULT_FAILED, 1)
        XCTAssertEqual(VDUSEMessage.statusDriverOK, 4)
    }

    func decode(_ bytes: [UInt8]) -> VDUSEMessage.Decoded? { bytes.withUnsafeBytes { VDUSEMessage.decode($0) } }

    func testDecodesEachRequest() {
        XCTAssertEqual(decode(FakeVDUSEDevice.request(type: CVDPA_VDUSE_GET_VQ_STATE, id: 7, queue: 3)),
                       .init(id: 7, request: .getQueueState(index: 3)))
        XCTAssertEqual(decode(FakeVDUSEDevice.request(type: CVDPA_VDUSE_SET_STATUS, id: 0xdead_beef, status: 0x0f)),
                       .init(id: 0xdead_beef, request: .setStatus(0x0f)))
        XCTAssertEqual(decode(FakeVDUSEDevice.request(type: CVDPA_VDUSE_UPDATE_IOTLB, id: 1, start: 0x1000, last: .max)),
                       .init(id: 1, request: .updateIOTLB(start: 0x1000, last: .max)))
        XCTAssertEqual(decode(FakeVDUSEDevice.request(type: 9, id: 2)), .init(id: 2, request: .unknown(type: 9)))
        XCTAssertNil(decode([UInt8](repeating: 0, count: 151)), "a short read is no request")
        XCTAssertNil(decode([UInt8](repeating: 0, count: 153)))
    }

    func testEncodesResponses() {
        let r = VDUSEMessage.response(id: 0x0102_0304, ok: true, queue: 5, availIndex: 0xabcd)
        var expect = [UInt8](repeating: 0, count: Int(CVDPA_VDUSE_RESPONSE_SIZE))
        expect[0...3] = [4, 3, 2, 1]
        expect[24] = 5
        expect[28] = 0xcd
        expect[29] = 0xab
        XCTAssertEqual(r, expect)
        let f = VDUSEMessage.response(id: 9, ok: false)
        XCTAssertEqual(Array(f[0..<8]), [9, 0, 0, 0, 1, 0, 0, 0])
        XCTAssertTrue(f[8...].allSatisfy { $0 == 0 }, "reserved words and the union stay zero")
    }
}
