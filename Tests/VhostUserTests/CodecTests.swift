import XCTest
@testable import VhostUser

final class CodecTests: XCTestCase {
    func header(_ request: UInt32, flags: UInt32 = 1, size: UInt32 = 0) -> [UInt8] {
        VhostUserHeader(request: request, flags: flags, size: size).encode()
    }

    func decodeHeader(_ bytes: [UInt8]) throws {
        _ = try bytes.withUnsafeBytes { try VhostUserCodec.decodeHeader($0) }
    }

    func decodeBody(_ r: VhostUserRequest, _ body: [UInt8], fds: Int = 0) throws -> VhostUserPayload {
        let h = VhostUserHeader(request: r.rawValue, flags: 1, size: UInt32(body.count))
        return try body.withUnsafeBytes { try VhostUserCodec.decodeBody(r, header: h, body: $0, fdCount: fds) }
    }

    func testHeaderRoundTrip() throws {
        let bytes = VhostUserCodec.encodeRequest(.setVringNum, needReply: true, payload: .vringState(VringState(index: 1, num: 256)))
        let (r, h) = try bytes.withUnsafeBytes { try VhostUserCodec.decodeHeader($0) }
        XCTAssertEqual(r, .setVringNum)
        XCTAssertTrue(h.needReply)
        XCTAssertEqual(h.size, 8)
        let p = try decodeBody(.setVringNum, Array(bytes[12...]))
        XCTAssertEqual(p, .vringState(VringState(index: 1, num: 256)))
    }

    func testShortHeaderRejected() {
        assertRejected(.header, field: "length") { try decodeHeader([1, 0, 0, 0, 1, 0]) }
    }

    func testWrongVersionRejected() {
        assertRejected(.header, field: "version") { try decodeHeader(header(1, flags: 2)) }
        assertRejected(.header, field: "version") { try decodeHeader(header(1, flags: 0)) }
    }

    func testReplyBitOnRequestRejected() {
        assertRejected(.header, field: "reply") { try decodeHeader(header(1, flags: 1 | 4)) }
    }

    func testReservedFlagsRejected() {
        assertRejected(.header, field: "flags") { try decodeHeader(header(1, flags: 1 | 0x100)) }
    }

    func testOversizeBodyRejected() {
        assertRejected(.header, field: "size") { try decodeHeader(header(2, size: 4097)) }
        XCTAssertNoThrow(try decodeHeader(header(2, size: 4096)))
    }

    func testUnknownRequestRejected() {
        assertRejected(.header, field: "request") { try decodeHeader(header(0)) }
        assertRejected(.header, field: "request") { try decodeHeader(header(999)) }
    }

    func testBodySizePerRequest() {
        assertRejected(.body, field: "size") { _ = try decodeBody(.setFeatures, [0, 0, 0, 0]) }
        assertRejected(.body, field: "size") { _ = try decodeBody(.setVringAddr, [UInt8](repeating: 0, count: 32)) }
        assertRejected(.body, field: "size") { _ = try decodeBody(.setOwner, [0]) }
        assertRejected(.body, field: "size") { _ = try decodeBody(.setLogBase, [UInt8](repeating: 0, count: 8), fds: 1) }
        assertRejected(.body, field: "size") { _ = try decodeBody(.addMemReg, [UInt8](repeating: 0, count: 32), fds: 1) }
        XCTAssertNoThrow(try decodeBody(.getFeatures, []))
        XCTAssertNoThrow(try decodeBody(.getFeatures, [UInt8](repeating: 0, count: 8)))
    }

    func testMemTableRegionCount() {
        var zero: [UInt8] = []
        zero.appendLE(UInt32(0)); zero.appendLE(UInt32(0))
        assertRejected(.body, field: "nregions") { _ = try decodeBody(.setMemTable, zero) }
        var nine: [UInt8] = []
        nine.appendLE(UInt32(9)); nine.appendLE(UInt32(0))
        nine += [UInt8](repeating: 0, count: 9 * 32)
        assertRejected(.body, field: "nregions") { _ = try decodeBody(.setMemTable, nine, fds: 9) }
        var two: [UInt8] = []
        two.appendLE(UInt32(2)); two.appendLE(UInt32(0))
        two += [UInt8](repeating: 0, count: 32)  // claims 2 regions, carries 1
        assertRejected(.body, field: "size") { _ = try decodeBody(.setMemTable, two, fds: 2) }
    }

    func testFDCountPerRequest() {
        let table = Array(VhostUserCodec.encodeRequest(.setMemTable, payload: .memoryTable([region(gpa: 0, size: 4096)]))[12...])
        assertRejected(.fds) { _ = try decodeBody(.setMemTable, table, fds: 0) }
        assertRejected(.fds) { _ = try decodeBody(.setMemTable, table, fds: 2) }
        assertRejected(.fds) { _ = try decodeBody(.setFeatures, [UInt8](repeating: 0, count: 8), fds: 1) }
        assertRejected(.fds) { _ = try decodeBody(.setLogBase, [UInt8](repeating: 0, count: 16), fds: 0) }
        assertRejected(.fds) { _ = try decodeBody(.setLogFD, [], fds: 0) }
        assertRejected(.fds) { _ = try decodeBody(.addMemReg, [UInt8](repeating: 0, count: 40), fds: 0) }
        XCTAssertNoThrow(try decodeBody(.remMemReg, [UInt8](repeating: 0, count: 40), fds: 1))
        XCTAssertNoThrow(try decodeBody(.remMemReg, [UInt8](repeating: 0, count: 40), fds: 0))
    }

    func testVringFileNoFDBit() throws {
        var withFD: [UInt8] = []; withFD.appendLE(UInt64(3))
        XCTAssertEqual(try decodeBody(.setVringKick, withFD, fds: 1), .vringFile(index: 3, hasFD: true))
        assertRejected(.fds) { _ = try decodeBody(.setVringKick, withFD, fds: 0) }
        var noFD: [UInt8] = []; noFD.appendLE(UInt64(3) | 0x100)
        XCTAssertEqual(try decodeBody(.setVringCall, noFD, fds: 0), .vringFile(index: 3, hasFD: false))
        assertRejected(.fds) { _ = try decodeBody(.setVringCall, noFD, fds: 1) }
        var reserved: [UInt8] = []; reserved.appendLE(UInt64(3) | 0x200)
        assertRejected(.body, field: "u64") { _ = try decodeBody(.setVringErr, reserved, fds: 1) }
    }

    func testUnofferedRequestsRejected() {
        assertRejected(.features) { _ = try decodeBody(.getConfig, [UInt8](repeating: 0, count: 12)) }
        assertRejected(.features) { _ = try decodeBody(.iotlbMsg, [UInt8](repeating: 0, count: 64)) }
    }

    func testReplyEncoding() {
        let r = VhostUserCodec.encodeReply(.getFeatures, payload: VhostUserCodec.u64Payload(0x1234))
        XCTAssertEqual(r.count, 20)
        r.withUnsafeBytes { raw in
            let h = VhostUserCodec.decodeReplyHeader(UnsafeRawBufferPointer(raw))
            XCTAssertEqual(h?.request, 1)
            XCTAssertEqual(h?.size, 8)
            XCTAssertEqual(VhostUserCodec.readU64(UnsafeRawBufferPointer(rebasing: raw[12...])), 0x1234)
        }
    }
}
