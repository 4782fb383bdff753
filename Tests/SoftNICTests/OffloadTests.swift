#if canImport(Glibc)
import Glibc
#endif
import CVDPAShims
import Foundation
@testable import SoftNIC
import Virtio
import XCTest

/// The software offloads (Sources/SoftNIC/Offload): checksum completion, TCP segmentation, UDP
/// fragmentation and the TX header check, against frames built here the way Linux sends them
/// (a partial checksum holds the pseudo-header sum) and a reference checksum written out plainly.
final class OffloadTests: XCTestCase {
    // MARK: checksum arithmetic

    func testChecksumMatchesPlainSumAtEveryLengthAndAlignment() {
        let bytes = OffloadPacket.bytes(600, seed: 7) + [UInt8](repeating: 0xFF, count: 64)
        bytes.withUnsafeBytes { raw in
            let p = raw.baseAddress!
            for start in 0..<8 {
                for count in 0...(bytes.count - start) {
                    let plain = PlainChecksum.sum(bytes[start..<start + count])
                    XCTAssertEqual(InternetChecksum.fold(InternetChecksum.add(p + start, count: count)), plain, "start \(start) count \(count)")
                    // Pieces split at even offsets add up to the whole.
                    let split = (count / 3) & ~1
                    let first = InternetChecksum.add(p + start, count: split)
                    XCTAssertEqual(InternetChecksum.fold(InternetChecksum.add(p + start + split, count: count - split, to: first)), plain)
                }
            }
            // The end-around carry when `initial` is near 2^64: UInt64.max - 1 is 0xFFFE (that is, -1) modulo 0xFFFF.
            let plain = PlainChecksum.add(PlainChecksum.sum(bytes), 0xFFFE)
            XCTAssertEqual(InternetChecksum.fold(InternetChecksum.add(p, count: bytes.count, to: UInt64.max - 1)), plain)
        }
        XCTAssertEqual(InternetChecksum.fold(0), 0)
        XCTAssertEqual(InternetChecksum.fold(0xFFFF), 0xFFFF)
        XCTAssertEqual(InternetChecksum.fold(0x1_0000), 1)
        XCTAssertEqual(InternetChecksum.fold(UInt64.max), 0xFFFF)
    }

    // MARK: completing a partial checksum

    func testCompleteChecksumGivesThePlainChecksumForTCPAndUDPOverIPv4AndIPv6() {
        for ipv6 in [false, true] {
            for tcp in [false, true] {
                // An odd payload: the last byte is padded.
                let p = OffloadPacket.make(ipv6: ipv6, tcp: tcp, payload: OffloadPacket.bytes(1001, seed: 3), vlan: ipv6 && tcp)
                let what = "\(ipv6 ? "IPv6" : "IPv4") \(tcp ? "TCP" : "UDP")"
                var frame = p.bytes
                let done = frame.withUnsafeMutableBytes {
                    SoftOffload.completeChecksum($0.baseAddress!, length: $0.count, start: p.l4, offset: p.csumOffset, udp: !tcp)
                }
                XCTAssertTrue(done, what)
                XCTAssertEqual(frame.be16(p.l4 + p.csumOffset), p.expectedChecksum(frame), what)
                XCTAssertEqual(PlainChecksum.checksum(p.pseudoHeader(length: frame.count - p.l4) + frame[p.l4...]), 0, "\(what) verifies")
                XCTAssertEqual(Array(frame[..<(p.l4 + p.csumOffset)]), Array(p.bytes[..<(p.l4 + p.csumOffset)]), "\(what): only the field changes")
                XCTAssertEqual(Array(frame[(p.l4 + p.csumOffset + 2)...]), Array(p.bytes[(p.l4 + p.csumOffset + 2)...]), what)
            }
        }
    }

    func testCompleteChecksumSendsAZeroUDPChecksumAsFFFF() {
        let p = OffloadPacket.zeroChecksumUDP(payload: 100)
        let n = p.bytes.count
        XCTAssertEqual(p.expectedChecksum(p.bytes, udp: false), 0, "the crafted payload")
        for udp in [true, false] {
            var frame = p.bytes
            _ = frame.withUnsafeMutableBytes {
                SoftOffload.completeChecksum($0.baseAddress!, length: $0.count, start: p.l4, offset: 6, udp: udp)
            }
            XCTAssertEqual(frame.be16(p.l4 + 6), udp ? 0xFFFF : 0)
            XCTAssertEqual(PlainChecksum.checksum(p.pseudoHeader(length: n - p.l4) + frame[p.l4...]), 0)
        }
    }

    func testCompleteChecksumRefusesAFieldOutsideTheFrameAndWritesNothing() {
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(40, seed: 1))
        let n = p.bytes.count
        let outside = [(n, 0), (n + 5, 0), (n - 1, 0), (n - 2, 1), (p.l4, n - p.l4 - 1), (-2, 4), (p.l4, -1), (Int.max, 2), (p.l4, Int.max - 8)]
        for (start, offset) in outside {
            var frame = p.bytes
            let done = frame.withUnsafeMutableBytes {
                SoftOffload.completeChecksum($0.baseAddress!, length: $0.count, start: start, offset: offset)
            }
            XCTAssertFalse(done, "start \(start) offset \(offset)")
            XCTAssertEqual(frame, p.bytes, "start \(start) offset \(offset): nothing written")
        }
        // The last two bytes are the highest field that fits: summed alone, complemented.
        var frame = p.bytes
        XCTAssertTrue(frame.withUnsafeMutableBytes { SoftOffload.completeChecksum($0.baseAddress!, length: n, start: n - 2, offset: 0) })
        XCTAssertEqual(frame.be16(n - 2), ~p.bytes.be16(n - 2))
    }

    // MARK: TCP segmentation

    func testTSOOverIPv4CutsAtGSOSizeWithSequenceIDsFlagsAndChecksums() throws {
        // Options in both headers, CWR|ECE|PSH|FIN|ACK, a sequence number and an IP id about to wrap.
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(10_000, seed: 11), ipOptions: 8,
                                flags: OffloadPacket.ack | OffloadPacket.psh | OffloadPacket.fin | OffloadPacket.cwr | OffloadPacket.ece)
        let segments = try cut(p.bytes, p.header(gsoSize: 1448, ecn: true))
        XCTAssertEqual(segments.count, 7)
        checkTCP(p, segments, mss: 1448)
    }

    func testTSOOverIPv6WithAVLANTag() throws {
        let p = OffloadPacket.make(ipv6: true, payload: OffloadPacket.bytes(5000, seed: 12), vlan: true, flags: OffloadPacket.ack | OffloadPacket.psh)
        let segments = try cut(p.bytes, p.header(gsoSize: 1000))
        XCTAssertEqual(segments.count, 5)
        checkTCP(p, segments, mss: 1000)
    }

    func testA64KiBTSOFrameWithGSOSize1448Gives46Segments() throws {
        // IPv4 total length 65535: 20 + 32 bytes of headers, 65483 of payload.
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(65_535 - 52, seed: 13))
        XCTAssertEqual(p.bytes.count - p.l3, 65_535)
        let segments = try cut(p.bytes, p.header(gsoSize: 1448))
        XCTAssertEqual(segments.count, 46)
        XCTAssertEqual(segments.last?.count, p.payloadOffset + 65_483 - 45 * 1448)
        checkTCP(p, segments, mss: 1448)
    }

    func testTSOFrameWithinGSOSizeIsOneSegmentWithItsChecksumCompleted() throws {
        for payload in [0, 1, 999, 1448] {
            for ipv6 in [false, true] {
                let p = OffloadPacket.make(ipv6: ipv6, payload: OffloadPacket.bytes(payload, seed: 14),
                                        flags: OffloadPacket.ack | OffloadPacket.fin | OffloadPacket.psh | OffloadPacket.cwr)
                let segments = try cut(p.bytes, p.header(gsoSize: 1448))
                XCTAssertEqual(segments.count, 1)
                checkTCP(p, segments, mss: 1448)
                // The same bytes as completing the checksum in place.
                var completed = p.bytes
                _ = completed.withUnsafeMutableBytes {
                    SoftOffload.completeChecksum($0.baseAddress!, length: $0.count, start: p.l4, offset: 16)
                }
                XCTAssertEqual(segments.first, completed, "payload \(payload) \(ipv6 ? "IPv6" : "IPv4")")
            }
        }
    }

    func testTSOSegmentCountLimit() throws {
        // 65483 bytes of payload: gso_size 64 gives 1024 segments, 63 gives 1040.
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(65_483, seed: 15))
        XCTAssertEqual(try cut(p.bytes, p.header(gsoSize: 64)).count, 1024)
        assertRefused(p.bytes, p.header(gsoSize: 63), "1040 segments")
        assertRefused(p.bytes, p.header(gsoSize: 1), "65483 segments")
    }

    // MARK: UDP fragmentation

    func testUFOOverIPv4FragmentsAtMultiplesOf8WithOffsetsMFAndTheDatagramChecksum() throws {
        // UDP header + 4000 bytes = 4008 bytes of IP payload.
        let p = OffloadPacket.make(tcp: false, payload: OffloadPacket.bytes(4000, seed: 21), ipOptions: 4)
        let exact = try cut(p.bytes, p.header(gsoSize: 1480))
        XCTAssertEqual(exact.map { $0.count - p.l4 }, [1480, 1480, 1048])
        checkFragments(p, exact, gsoSize: 1480)
        // gso_size 1003: fragments of 1000 (rounded down to a multiple of 8).
        let rounded = try cut(p.bytes, p.header(gsoSize: 1003))
        XCTAssertEqual(rounded.map { $0.count - p.l4 }, [1000, 1000, 1000, 1000, 8])
        checkFragments(p, rounded, gsoSize: 1003)
    }

    func testUFOOverIPv4KeepsAZeroChecksumField() throws {
        let p = OffloadPacket.make(tcp: false, payload: OffloadPacket.bytes(3000, seed: 22), zeroUDPChecksum: true)
        let fragments = try cut(p.bytes, p.header(gsoSize: 1480))
        XCTAssertEqual(fragments.count, 3)
        checkFragments(p, fragments, gsoSize: 1480)
        XCTAssertEqual(fragments[0].be16(p.l4 + 6), 0, "no checksum stays no checksum")
        let whole = try cut(p.bytes, p.header(gsoSize: 4000))
        XCTAssertEqual(whole, [p.bytes])
    }

    func testUFOSendsADatagramChecksumOf0AsFFFF() throws {
        for ipv6 in [false, true] {
            let p = OffloadPacket.zeroChecksumUDP(ipv6: ipv6, payload: 3000)
            XCTAssertEqual(p.expectedChecksum(p.bytes, udp: false), 0, "the crafted payload")
            let fragments = try cut(p.bytes, p.header(gsoSize: 1480))
            XCTAssertEqual(fragments.count, 3)
            XCTAssertEqual(fragments[0].be16(p.l4 + (ipv6 ? 8 : 0) + 6), 0xFFFF)
            checkFragments(p, fragments, gsoSize: 1480)
            let whole = try cut(p.bytes, p.header(gsoSize: 4000))
            XCTAssertEqual(whole.first?.be16(p.l4 + 6), 0xFFFF)
        }
    }

    func testUFOOverIPv6InsertsAFragmentHeader() throws {
        let p = OffloadPacket.make(ipv6: true, tcp: false, payload: OffloadPacket.bytes(3000, seed: 23), vlan: true)
        let fragments = try cut(p.bytes, p.header(gsoSize: 1280))
        XCTAssertEqual(fragments.map { $0.count - p.l4 - 8 }, [1280, 1280, 448])
        checkFragments(p, fragments, gsoSize: 1280)
        // Another datagram of the same flow gets another identification.
        let q = OffloadPacket.make(ipv6: true, tcp: false, payload: OffloadPacket.bytes(3000, seed: 24), vlan: true)
        let other = try cut(q.bytes, q.header(gsoSize: 1280))
        checkFragments(q, other, gsoSize: 1280)
        XCTAssertNotEqual(fragments[0].be32(p.l4 + 4), other[0].be32(q.l4 + 4))
    }

    func testUFODatagramWithinGSOSizeIsOneFrameWithItsChecksumCompleted() throws {
        for ipv6 in [false, true] {
            let p = OffloadPacket.make(ipv6: ipv6, tcp: false, payload: OffloadPacket.bytes(1000, seed: 25))
            var completed = p.bytes
            _ = completed.withUnsafeMutableBytes {
                SoftOffload.completeChecksum($0.baseAddress!, length: $0.count, start: p.l4, offset: 6, udp: true)
            }
            // 1008 bytes of IP payload: gso_size 1008 takes it whole, 1007 fragments it.
            XCTAssertEqual(try cut(p.bytes, p.header(gsoSize: 1008)), [completed])
            XCTAssertEqual(try cut(p.bytes, p.header(gsoSize: 1500)), [completed])
            let fragments = try cut(p.bytes, p.header(gsoSize: 1007))
            XCTAssertEqual(fragments.count, 2)
            checkFragments(p, fragments, gsoSize: 1007)
        }
    }

    func testUFOLimits() {
        // A fragment must hold 8 bytes.
        let p = OffloadPacket.make(tcp: false, payload: OffloadPacket.bytes(100, seed: 26))
        assertRefused(p.bytes, p.header(gsoSize: 7), "too small for an IP fragment")
        // IPv6: a 65535-byte datagram cut at 65528 makes a first fragment of 8 + 65528 bytes of payload.
        let big = OffloadPacket.make(ipv6: true, tcp: false, payload: OffloadPacket.bytes(65_535 - 8, seed: 27))
        assertRefused(big.bytes, big.header(gsoSize: 65_534), "exceed 65535")
        XCTAssertEqual(try cut(big.bytes, big.header(gsoSize: 65_487)).count, 2, "40 + 8 + 65480 bytes of IP")
        // 1024 fragments at most.
        let many = OffloadPacket.make(tcp: false, payload: OffloadPacket.bytes(8 * 1024 - 8, seed: 28))
        XCTAssertEqual(try cut(many.bytes, many.header(gsoSize: 8)).count, 1024)
        let tooMany = OffloadPacket.make(tcp: false, payload: OffloadPacket.bytes(8 * 1024, seed: 28))
        assertRefused(tooMany.bytes, tooMany.header(gsoSize: 8), "1025 segments")
    }

    // MARK: refusals

    func testEveryMalformedFrameIsRefusedWithItsReason() {
        let tcp4 = OffloadPacket.make(payload: OffloadPacket.bytes(3000, seed: 31))
        let tcp6 = OffloadPacket.make(ipv6: true, payload: OffloadPacket.bytes(3000, seed: 32))
        let udp4 = OffloadPacket.make(tcp: false, payload: OffloadPacket.bytes(3000, seed: 33))
        let udp6 = OffloadPacket.make(ipv6: true, tcp: false, payload: OffloadPacket.bytes(3000, seed: 34))
        let h4 = tcp4.header(gsoSize: 1448), h6 = tcp6.header(gsoSize: 1448)

        // Too short for the headers.
        assertRefused(Array(tcp4.bytes[..<10]), h4, "shorter than an Ethernet header")
        assertRefused(Array(tcp4.bytes[..<30]), h4, "ends inside its IPv4 header")
        assertRefused(Array(tcp6.bytes[..<50]), h6, "ends inside its IPv6 header")
        var vlanCut = Array(tcp4.bytes[..<16])
        vlanCut[12] = 0x81
        vlanCut[13] = 0x00
        assertRefused(vlanCut, h4, "ends inside its 802.1Q tag")
        var noTCP = tcp4.bytes
        noTCP.removeSubrange(tcp4.l4...)
        noTCP += [0, 1, 2, 3]
        noTCP.setBE16(UInt16(noTCP.count - tcp4.l3), at: tcp4.l3 + 2)
        assertRefused(noTCP, h4, "ends inside its TCP header")
        var noUDP = Array(udp4.bytes[..<(udp4.l4 + 4)])
        noUDP.setBE16(UInt16(noUDP.count - udp4.l3), at: udp4.l3 + 2)
        assertRefused(noUDP, udp4.header(gsoSize: 1480), "ends inside its UDP header")

        // Ethertypes.
        assertRefused(tcp4.with(0x08, 0x06, at: 12), h4, "ethertype 0x806 is neither IPv4 nor IPv6")
        let qinq = [UInt8](tcp4.bytes[..<12]) + [0x81, 0x00, 0x00, 0x05, 0x81, 0x00, 0x00, 0x06, 0x08, 0x00] + tcp4.bytes[14...]
        assertRefused(qinq, h4, "only one 802.1Q tag")

        // IPv4.
        assertRefused(tcp4.with(0x44, at: tcp4.l3), h4, "IHL 4 is below 5")
        var shortIP = Array(tcp4.bytes[..<(tcp4.l3 + 40)])
        shortIP[tcp4.l3] = 0x4F
        shortIP.setBE16(40, at: tcp4.l3 + 2)
        assertRefused(shortIP, h4, "IPv4 header of 60 bytes runs past")
        assertRefused(tcp4.with(0x65, at: tcp4.l3), h4, "IP version 6 under the IPv4 ethertype")
        let total = tcp4.bytes.be16(tcp4.l3 + 2)
        for wrong in [total - 1, total + 1, 0] {
            assertRefused(tcp4.withBE16(wrong, at: tcp4.l3 + 2), h4, "IPv4 total length \(wrong) does not match")
        }
        assertRefused(tcp4.with(0x20, 0x00, at: tcp4.l3 + 6), h4, "already a fragment")
        assertRefused(udp4.with(0x00, 0x10, at: udp4.l3 + 6), udp4.header(gsoSize: 1480), "already a fragment")
        // A longer frame than its IP packet (trailing bytes) is refused too.
        assertRefused(tcp4.bytes + [0, 0], h4, "IPv4 total length")

        // IPv6.
        let payload6 = tcp6.bytes.be16(tcp6.l3 + 4)
        for wrong in [payload6 - 1, payload6 + 1, 0] {
            assertRefused(tcp6.withBE16(wrong, at: tcp6.l3 + 4), h6, "IPv6 payload length \(wrong) does not match")
        }
        assertRefused(tcp6.with(0x45, at: tcp6.l3), h6, "IP version 4 under the IPv6 ethertype")
        for ext: UInt8 in [0, 43, 44, 60] {
            assertRefused(tcp6.with(ext, at: tcp6.l3 + 6), h6, "IPv6 extension header \(ext) is not supported")
        }

        // The IP protocol against the gso type, the gso type against the IP version.
        assertRefused(udp4.bytes, h4, "IP protocol 17 does not match gso type TCPV4")
        assertRefused(tcp4.bytes, udp4.header(gsoSize: 1480), "IP protocol 6 does not match gso type UDP")
        assertRefused(udp6.bytes, h6, "IP protocol 17 does not match gso type TCPV6")
        assertRefused(tcp6.bytes, tcp6.header(gsoSize: 1448, type: VirtioNetHeader.gsoTCPv4), "gso type TCPV4 on an IPv6 frame")
        assertRefused(tcp4.bytes, tcp4.header(gsoSize: 1448, type: VirtioNetHeader.gsoTCPv6), "gso type TCPV6 on an IPv4 frame")

        // The gso fields.
        assertRefused(tcp4.bytes, tcp4.header(gsoSize: 0), "gso_size 0")
        assertRefused(udp6.bytes, udp6.header(gsoSize: 0), "gso_size 0")
        for type: UInt8 in [2, VirtioNetHeader.gsoUDPL4, 0x20, 0x41] {
            assertRefused(tcp4.bytes, tcp4.header(gsoSize: 1448, type: type), "unknown gso type")
        }
        assertRefused(tcp4.bytes, tcp4.header(gsoSize: 1448, type: VirtioNetHeader.gsoNone), "not a GSO frame")
        assertRefused(tcp4.bytes, tcp4.header(gsoSize: 1448, type: VirtioNetHeader.gsoECN), "not a GSO frame")

        // TCP and UDP headers.
        assertRefused(tcp4.with(0x40, at: tcp4.l4 + 12), h4, "TCP data offset 4 is below 5")
        assertRefused(tcp4.with(0x00, at: tcp4.l4 + 12), h4, "TCP data offset 0 is below 5")
        let empty = OffloadPacket.make(payload: [])
        assertRefused(empty.with(0xF0, at: empty.l4 + 12), empty.header(gsoSize: 1448), "TCP header of 60 bytes runs past")
        let udpLength = udp4.bytes.be16(udp4.l4 + 4)
        for wrong in [udpLength - 1, udpLength + 1, 0] {
            assertRefused(udp4.withBE16(wrong, at: udp4.l4 + 4), udp4.header(gsoSize: 1480), "UDP length \(wrong) does not match")
        }
    }

    /// Every prefix of each frame, placed so that its last byte is the last one before an
    /// inaccessible page (a read past `length` is a crash, not a silent wrong answer), and
    /// segmented into outputs placed the same way (a write past `maxSegmentLength` is a crash).
    /// Each prefix is tried as it is (its length fields then disagree: refused) and with its
    /// IP and UDP length fields rewritten to fit (accepted once its headers are whole, which
    /// segments and fragments shorter payloads).
    func testTruncatedFramesAreRefusedOrSegmentedWithoutReadingPastTheirLength() throws {
        let cases: [(String, OffloadPacket)] = [
            ("TCP/IPv4 with options", OffloadPacket.make(payload: OffloadPacket.bytes(2000, seed: 41), ipOptions: 12)),
            ("TCP/IPv6 with a VLAN tag", OffloadPacket.make(ipv6: true, payload: OffloadPacket.bytes(2000, seed: 42), vlan: true)),
            ("UDP/IPv4", OffloadPacket.make(tcp: false, payload: OffloadPacket.bytes(2000, seed: 43))),
            ("UDP/IPv6", OffloadPacket.make(ipv6: true, tcp: false, payload: OffloadPacket.bytes(2000, seed: 44))),
        ]
        let input = try GuardPageBuffer(capacity: 4096)
        let output = try GuardPageBuffer(capacity: 4096)
        for (name, p) in cases {
            let header = p.header(gsoSize: p.isTCP ? 536 : 600)
            var accepted = 0, acceptedFixed = 0
            for n in 0...p.bytes.count {
                for fixLengths in [false, true] {
                    var bytes = Array(p.bytes[..<n])
                    if fixLengths { p.fitLengths(&bytes) }
                    let frame = input.tail(n)
                    bytes.withUnsafeBytes { if n > 0 { frame.copyMemory(from: $0.baseAddress!, byteCount: n) } }
                    if var s = try? SoftSegmenter(frame: frame, length: n, header: header) {
                        if fixLengths { acceptedFixed += 1 } else { accepted += 1 }
                        let out = output.tail(s.maxSegmentLength)
                        var produced = 0
                        while s.next(into: out, capacity: s.maxSegmentLength) != nil { produced += 1 }
                        XCTAssertEqual(produced, s.count, "\(name), \(n) bytes")
                    }
                    _ = SoftOffload.completeChecksum(frame, length: n, start: Int(header.csumStart), offset: Int(header.csumOffset))
                }
            }
            XCTAssertEqual(accepted, 1, "\(name): only the whole frame, as it is")
            XCTAssertEqual(acceptedFixed, p.bytes.count - p.payloadOffset + 1, "\(name): every prefix with whole headers, lengths fixed")
        }
    }

    func testNextWritesNothingIntoABufferSmallerThanMaxSegmentLength() throws {
        let p = OffloadPacket.make(payload: OffloadPacket.bytes(3000, seed: 51))
        let frame = UnsafeMutableRawPointer.allocate(byteCount: p.bytes.count, alignment: 1)
        defer { frame.deallocate() }
        p.bytes.withUnsafeBytes { frame.copyMemory(from: $0.baseAddress!, byteCount: p.bytes.count) }
        var s = try SoftSegmenter(frame: frame, length: p.bytes.count, header: p.header(gsoSize: 1448))
        XCTAssertEqual(s.maxSegmentLength, p.payloadOffset + 1448)
        var out = [UInt8](repeating: 0xA5, count: s.maxSegmentLength)
        let none = out.withUnsafeMutableBytes { s.next(into: $0.baseAddress!, capacity: $0.count - 1) }
        XCTAssertNil(none)
        XCTAssertEqual(s.written, 0)
        XCTAssertEqual(out, [UInt8](repeating: 0xA5, count: s.maxSegmentLength))
        let n = out.withUnsafeMutableBytes { s.next(into: $0.baseAddress!, capacity: $0.count) }
        XCTAssertEqual(n, s.maxSegmentLength)
        XCTAssertEqual(s.written, 1)
    }

    // MARK: the TX header check

    func testCheckTXAcceptsWhatLinuxSends() {
        let all = VirtioNetFeature.hostOffloads | VirtioFeature.version1
        let accepted: [(String, VirtioNetHeader, Int, UInt64)] = [
            ("a plain frame, nothing negotiated", VirtioNetHeader(), 60, 0),
            ("hdr_len within the frame without GSO", VirtioNetHeader(hdrLen: 60), 60, 0),
            ("TCP/IPv4 partial checksum", VirtioNetHeader(flags: 1, csumStart: 34, csumOffset: 16), 100, VirtioNetFeature.csum),
            ("UDP partial checksum at the frame's end", VirtioNetHeader(flags: 1, csumStart: 34, csumOffset: 6), 42, VirtioNetFeature.csum),
            // Linux's virtio_net_hdr_from_skb puts skb_headlen() in hdr_len: often more than the headers.
            ("TSO4", VirtioNetHeader(flags: 1, gsoType: 1, hdrLen: 1514, gsoSize: 1448, csumStart: 34, csumOffset: 16), 65_000, all),
            ("TSO6 with ECN", VirtioNetHeader(flags: 1, gsoType: 0x84, hdrLen: 86, gsoSize: 1428, csumStart: 54, csumOffset: 16), 30_000, all),
            ("UFO", VirtioNetHeader(flags: 1, gsoType: 3, hdrLen: 42, gsoSize: 1472, csumStart: 34, csumOffset: 6), 8000, all),
            ("DATA_VALID is ignored", VirtioNetHeader(flags: 2), 60, 0),
            ("flag bits the spec does not define are ignored",
             VirtioNetHeader(flags: 0x1 | 0x10 | 0x40 | 0x80, csumStart: 34, csumOffset: 16), 100, all),
        ]
        for (name, h, length, features) in accepted {
            XCTAssertNil(SoftOffload.checkTX(h, length: length, features: features), name)
        }
    }

    func testCheckTXRefusesEachBadHeader() {
        let all = VirtioNetFeature.hostOffloads
        let tso4 = VirtioNetHeader(flags: 1, gsoType: 1, hdrLen: 66, gsoSize: 1448, csumStart: 34, csumOffset: 16)
        func with(_ change: (inout VirtioNetHeader) -> Void, _ base: VirtioNetHeader = tso4) -> VirtioNetHeader {
            var h = base
            change(&h)
            return h
        }
        let refused: [(VirtioNetHeader, Int, UInt64, String)] = [
            (with { $0.gsoSize = 0 }, 10_000, all, "gso_size 0"),
            (with { $0.csumStart = 10_000 }, 10_000, all, "past the frame"),
            (with { $0.csumStart = 9_983; $0.hdrLen = 0 }, 10_000, all, "past the frame"),
            (VirtioNetHeader(flags: 1, csumStart: 98, csumOffset: 1), 100, all, "past the frame"),
            (with { $0.hdrLen = 10_001 }, 10_000, all, "hdr_len 10001 is larger"),
            (VirtioNetHeader(hdrLen: 61), 60, 0, "hdr_len 61 is larger"),
            (tso4, 10_000, all & ~VirtioNetFeature.hostTSO4, "without HOST_TSO4"),
            (with { $0.gsoType = 4; $0.csumStart = 54 }, 10_000, all & ~VirtioNetFeature.hostTSO6, "without HOST_TSO6"),
            (with { $0.gsoType = 3; $0.csumOffset = 6 }, 10_000, all & ~VirtioNetFeature.hostUFO, "without HOST_UFO"),
            (with { $0.gsoType = 0x81 }, 10_000, all & ~VirtioNetFeature.hostECN, "without HOST_ECN"),
            (with { $0.gsoType = 0x83; $0.csumOffset = 6 }, 10_000, all, "ECN bit on gso type UDP"),
            (with { $0.gsoType = 0x80 }, 10_000, all, "ECN bit without a gso type"),
            (tso4, 10_000, all & ~VirtioNetFeature.csum, "NEEDS_CSUM without CSUM"),
            (VirtioNetHeader(flags: 1, csumStart: 34, csumOffset: 16), 100, 0, "NEEDS_CSUM without CSUM"),
            (with { $0.flags = 0 }, 10_000, all, "without NEEDS_CSUM"),
            (with { $0.gsoType = 5; $0.csumOffset = 6 }, 10_000, ~0, "unknown gso type UDP_L4"),
            (with { $0.gsoType = 2 }, 10_000, ~0, "unknown gso type"),
            (with { $0.gsoType = 0x21 }, 10_000, ~0, "unknown gso type"),
            (with { $0.csumOffset = 6 }, 10_000, all, "csum_offset 6, not 16"),
            (with { $0.gsoType = 3; $0.csumOffset = 16 }, 10_000, all, "csum_offset 16, not 6"),
            (with { $0.flags = 1 | 4 }, 10_000, all, "RSC_INFO"),
            (with { $0.flags = 1 | 8 }, 10_000, all, "UDP_TUNNEL_CSUM"),
        ]
        for (h, length, features, expected) in refused {
            let text = SoftOffload.checkTX(h, length: length, features: features)
            XCTAssertNotNil(text, "\(h) should be refused: \(expected)")
            if let text { XCTAssertTrue(text.contains(expected), "'\(text)' does not say '\(expected)'") }
        }
    }

    // MARK: no allocation

    /// The per-packet offload calls (checkTX, completeChecksum, SoftSegmenter's init and next)
    /// make no malloc calls: counted in a child process with the LD_PRELOAD counter of
    /// SoftNICAllocationTests, on the thread that runs them, after one warm-up round.
    func testOffloadCallsMakeNoMallocCalls() throws {
        let me = "OffloadTests/" + ChildProcess.name(#function)
        if ChildProcess.isChild(me) {
            try countInChild()
            return
        }
        let (values, r) = try MallocCounter.runChild(test: me, resultVariable: "OFFLOAD_ALLOC_RESULT")
        XCTAssertTrue(r.succeeded, "\(r.summary); child output:\n\(r.excerpt)")
        guard let segments = values["segments"], let calls = values["calls"] else {
            XCTFail("the child wrote no result; output (tail):\n\(r.output.suffix(4000))")
            return
        }
        print("offload malloc probe: \(segments) segments, \(calls) allocation calls")
        XCTAssertGreaterThan(segments, 10_000)
        XCTAssertEqual(calls, 0, "malloc calls on the offload path; child output:\n\(r.output.suffix(4000))")
    }

    func countInChild() throws {
        guard let resultPath = ProcessInfo.processInfo.environment["OFFLOAD_ALLOC_RESULT"] else {
            throw XCTSkip("runs only as a child of its parent test")
        }
        typealias Track = @convention(c) (Int) -> Void
        typealias Count = @convention(c) () -> UInt
        typealias Samples = @convention(c) () -> Int32
        typealias PrintSample = @convention(c) (Int32, Int32) -> Void
        func sym<T>(_ name: String, _: T.Type) throws -> T {
            guard let p = dlsym(UnsafeMutableRawPointer(bitPattern: 0), name) else { throw XCTSkip("\(name) not found: LD_PRELOAD library missing") }
            return unsafeBitCast(p, to: T.self)
        }
        let track = try sym("softnic_alloc_track", Track.self)
        let count = try sym("softnic_alloc_count", Count.self)
        let samples = try sym("softnic_alloc_samples", Samples.self)
        let printSample = try sym("softnic_alloc_print_sample", PrintSample.self)
        let packets = [
            OffloadPacket.make(payload: OffloadPacket.bytes(65_483, seed: 61)),
            OffloadPacket.make(ipv6: true, payload: OffloadPacket.bytes(20_000, seed: 62), vlan: true),
            OffloadPacket.make(tcp: false, payload: OffloadPacket.bytes(20_000, seed: 63)),
            OffloadPacket.make(ipv6: true, tcp: false, payload: OffloadPacket.bytes(20_000, seed: 64)),
            OffloadPacket.make(ipv6: true, tcp: false, payload: OffloadPacket.bytes(1000, seed: 65)),
        ]
        let headers = packets.map { $0.header(gsoSize: $0.isTCP ? 1448 : 1480) }
        let frames = packets.map { p -> UnsafeMutableRawPointer in
            let f = UnsafeMutableRawPointer.allocate(byteCount: p.bytes.count, alignment: 8)
            p.bytes.withUnsafeBytes { f.copyMemory(from: $0.baseAddress!, byteCount: p.bytes.count) }
            return f
        }
        // completeChecksum changes its copies in place; the segmenter's stay as built.
        let copies = packets.map { p -> UnsafeMutableRawPointer in
            let f = UnsafeMutableRawPointer.allocate(byteCount: p.bytes.count, alignment: 8)
            p.bytes.withUnsafeBytes { f.copyMemory(from: $0.baseAddress!, byteCount: p.bytes.count) }
            return f
        }
        let lengths = packets.map { $0.bytes.count }
        let out = UnsafeMutableRawPointer.allocate(byteCount: 70_000, alignment: 8)
        defer {
            out.deallocate()
            for f in frames + copies { f.deallocate() }
        }
        let name = "offload-alloc"
        cvdpa_set_thread_name(name)
        guard let tid = MallocCounter.threadID(named: name) else { throw XCTSkip("no thread named \(name)") }

        // Index loops only: at -Onone a for-in loop's iterator can malloc (SoftNICAllocationTests).
        func round() -> (segments: Int, failures: Int) {
            var segments = 0, failures = 0
            var k = 0
            while k < frames.count {
                if SoftOffload.checkTX(headers[k], length: lengths[k], features: VirtioNetFeature.hostOffloads) != nil { failures += 1 }
                do {
                    var s = try SoftSegmenter(frame: frames[k], length: lengths[k], header: headers[k])
                    while s.next(into: out, capacity: 70_000) != nil { segments += 1 }
                } catch {
                    failures += 1
                }
                if !SoftOffload.completeChecksum(copies[k], length: lengths[k], start: Int(headers[k].csumStart),
                                                 offset: Int(headers[k].csumOffset), udp: !packets[k].isTCP) {
                    failures += 1
                }
                k += 1
            }
            return (segments, failures)
        }
        _ = round()
        track(tid)
        var segments = 0, failures = 0, i = 0
        while i < 200 {
            let r = round()
            segments += r.segments
            failures += r.failures
            i += 1
        }
        let calls = count()
        track(0)
        XCTAssertEqual(failures, 0)
        for i in 0..<samples() {
            print("--- sample \(i)")
            fflush(nil)
            printSample(i, 1)
        }
        try "segments=\(segments)\ncalls=\(calls)\n".write(toFile: resultPath, atomically: true, encoding: .utf8)
    }

    // MARK: helpers

    /// Runs the segmenter over `bytes`: every segment, checked against `count` and `maxSegmentLength`.
    func cut(_ bytes: [UInt8], _ header: VirtioNetHeader, file: StaticString = #filePath, line: UInt = #line) throws -> [[UInt8]] {
        let frame = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 1)
        defer { frame.deallocate() }
        bytes.withUnsafeBytes { if !bytes.isEmpty { frame.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) } }
        var s = try SoftSegmenter(frame: frame, length: bytes.count, header: header)
        let capacity = 70_000
        let out = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 1)
        defer { out.deallocate() }
        var segments: [[UInt8]] = []
        while let n = s.next(into: out, capacity: capacity) {
            XCTAssertLessThanOrEqual(n, s.maxSegmentLength, file: file, line: line)
            segments.append(Array(UnsafeRawBufferPointer(start: out, count: n)))
        }
        XCTAssertEqual(segments.count, s.count, file: file, line: line)
        XCTAssertEqual(segments.map(\.count).max(), s.maxSegmentLength, "the longest segment is maxSegmentLength", file: file, line: line)
        return segments
    }

    func assertRefused(_ bytes: [UInt8], _ header: VirtioNetHeader, _ expected: String, file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try cut(bytes, header, file: file, line: line)
            XCTFail("accepted; expected a refusal naming '\(expected)'", file: file, line: line)
        } catch let e as OffloadError {
            XCTAssertTrue(e.text.contains(expected), "'\(e.text)' does not say '\(expected)'", file: file, line: line)
        } catch {
            XCTFail("\(error)", file: file, line: line)
        }
    }

    /// TCP segments against their frame: lengths, IP fields and checksums, sequence numbers, flags,
    /// unchanged bytes elsewhere, and the payloads put back together.
    func checkTCP(_ p: OffloadPacket, _ segments: [[UInt8]], mss: Int, file: StaticString = #filePath, line: UInt = #line) {
        let o = p.bytes
        XCTAssertEqual(segments.count, max(1, (p.payload.count + mss - 1) / mss), "segment count", file: file, line: line)
        let seq = o.be32(p.l4 + 4), id = o.be16(p.l3 + 4), flags = o[p.l4 + 13]
        var payload: [UInt8] = []
        for (i, s) in segments.enumerated() {
            let what = "segment \(i)"
            let last = i == segments.count - 1
            let n = last ? p.payload.count - i * mss : mss
            XCTAssertEqual(s.count, p.payloadOffset + n, what, file: file, line: line)
            guard s.count >= p.payloadOffset else { continue }
            XCTAssertEqual(Array(s[..<p.l3]), Array(o[..<p.l3]), "\(what): Ethernet header", file: file, line: line)
            if p.isIPv6 {
                XCTAssertEqual(s.be16(p.l3 + 4), UInt16(s.count - p.l4), "\(what): IPv6 payload length", file: file, line: line)
                XCTAssertEqual(s.except(p.l3 + 4, 2, in: p.l3..<p.l4), o.except(p.l3 + 4, 2, in: p.l3..<p.l4), "\(what): IPv6 header",
                               file: file, line: line)
            } else {
                XCTAssertEqual(s.be16(p.l3 + 2), UInt16(s.count - p.l3), "\(what): IPv4 total length", file: file, line: line)
                XCTAssertEqual(s.be16(p.l3 + 4), id &+ UInt16(i), "\(what): IPv4 id", file: file, line: line)
                XCTAssertEqual(PlainChecksum.checksum(s[p.l3..<p.l4]), 0, "\(what): IPv4 header checksum", file: file, line: line)
                let mask = [(p.l3 + 2, 4), (p.l3 + 10, 2)]
                XCTAssertEqual(s.except(mask, in: p.l3..<p.l4), o.except(mask, in: p.l3..<p.l4), "\(what): IPv4 header", file: file, line: line)
            }
            XCTAssertEqual(s.be32(p.l4 + 4), seq &+ UInt32(i * mss), "\(what): sequence number", file: file, line: line)
            let f = s[p.l4 + 13]
            XCTAssertEqual(f & OffloadPacket.fin != 0, last && flags & OffloadPacket.fin != 0, "\(what): FIN", file: file, line: line)
            XCTAssertEqual(f & OffloadPacket.psh != 0, last && flags & OffloadPacket.psh != 0, "\(what): PSH", file: file, line: line)
            XCTAssertEqual(f & OffloadPacket.cwr != 0, i == 0 && flags & OffloadPacket.cwr != 0, "\(what): CWR", file: file, line: line)
            let others = ~(OffloadPacket.fin | OffloadPacket.psh | OffloadPacket.cwr)
            XCTAssertEqual(f & others, flags & others, "\(what): other flags", file: file, line: line)
            let mask = [(p.l4 + 4, 4), (p.l4 + 13, 1), (p.l4 + 16, 2)]
            XCTAssertEqual(s.except(mask, in: p.l4..<p.payloadOffset), o.except(mask, in: p.l4..<p.payloadOffset), "\(what): TCP header",
                           file: file, line: line)
            XCTAssertEqual(s.be16(p.l4 + 16), p.expectedChecksum(s), "\(what): TCP checksum", file: file, line: line)
            XCTAssertEqual(PlainChecksum.checksum(p.pseudoHeader(length: s.count - p.l4) + s[p.l4...]), 0, "\(what): TCP checksum verifies",
                           file: file, line: line)
            payload += s[p.payloadOffset...]
        }
        XCTAssertEqual(payload, p.payload, "the payloads put back together", file: file, line: line)
    }

    /// IP fragments against their datagram: offsets, MF/M, ids, lengths, header checksums, and the
    /// datagram put back together with its UDP checksum complete.
    func checkFragments(_ p: OffloadPacket, _ fragments: [[UInt8]], gsoSize: Int, file: StaticString = #filePath, line: UInt = #line) {
        let o = p.bytes
        let datagram = Array(o[p.l4...])
        let step = gsoSize & ~7
        XCTAssertEqual(fragments.count, (datagram.count + step - 1) / step, "fragment count", file: file, line: line)
        var whole: [UInt8] = []
        var ids = Set<UInt32>()
        for (i, f) in fragments.enumerated() {
            let what = "fragment \(i)"
            let last = i == fragments.count - 1
            let offset: Int, more: Bool, data: Int
            XCTAssertEqual(Array(f[..<p.l3]), Array(o[..<p.l3]), "\(what): Ethernet header", file: file, line: line)
            if p.isIPv6 {
                data = p.l4 + 8
                guard f.count >= data else { XCTFail(what, file: file, line: line); continue }
                XCTAssertEqual(f.be16(p.l3 + 4), UInt16(f.count - p.l4), "\(what): IPv6 payload length", file: file, line: line)
                XCTAssertEqual(f[p.l3 + 6], 44, "\(what): next header is a fragment header", file: file, line: line)
                let mask = [(p.l3 + 4, 3)]
                XCTAssertEqual(f.except(mask, in: p.l3..<p.l4), o.except(mask, in: p.l3..<p.l4), "\(what): IPv6 header", file: file, line: line)
                XCTAssertEqual(f[p.l4], 17, "\(what): fragment header's next header", file: file, line: line)
                XCTAssertEqual(f[p.l4 + 1], 0, "\(what): reserved", file: file, line: line)
                let field = f.be16(p.l4 + 2)
                XCTAssertEqual(field & 6, 0, "\(what): reserved bits", file: file, line: line)
                offset = Int(field >> 3) * 8
                more = field & 1 != 0
                ids.insert(f.be32(p.l4 + 4))
            } else {
                data = p.l4
                XCTAssertEqual(f.be16(p.l3 + 2), UInt16(f.count - p.l3), "\(what): IPv4 total length", file: file, line: line)
                XCTAssertEqual(f.be16(p.l3 + 4), o.be16(p.l3 + 4), "\(what): the datagram's IPv4 id", file: file, line: line)
                let field = f.be16(p.l3 + 6)
                XCTAssertEqual(field & 0xC000, 0, "\(what): DF and the reserved bit cleared", file: file, line: line)
                offset = Int(field & 0x1FFF) * 8
                more = field & 0x2000 != 0
                XCTAssertEqual(PlainChecksum.checksum(f[p.l3..<p.l4]), 0, "\(what): IPv4 header checksum", file: file, line: line)
                let mask = [(p.l3 + 2, 2), (p.l3 + 6, 2), (p.l3 + 10, 2)]
                XCTAssertEqual(f.except(mask, in: p.l3..<p.l4), o.except(mask, in: p.l3..<p.l4), "\(what): IPv4 header", file: file, line: line)
            }
            let n = f.count - data
            XCTAssertEqual(offset, whole.count, "\(what): offset", file: file, line: line)
            XCTAssertEqual(more, !last, "\(what): more fragments", file: file, line: line)
            XCTAssertLessThanOrEqual(n, gsoSize, "\(what): at most gso_size bytes", file: file, line: line)
            if !last { XCTAssertEqual(n, step, "\(what): gso_size rounded down to 8", file: file, line: line) }
            whole += f[data...]
        }
        if p.isIPv6 {
            XCTAssertEqual(ids.count, 1, "one identification for all fragments", file: file, line: line)
            XCTAssertFalse(ids.contains(0), "a nonzero identification", file: file, line: line)
        }
        XCTAssertEqual(whole.count, datagram.count, "the datagram put back together", file: file, line: line)
        guard whole.count == datagram.count else { return }
        XCTAssertEqual(whole.except([(6, 2)], in: 0..<whole.count), datagram.except([(6, 2)], in: 0..<datagram.count),
                       "the datagram put back together", file: file, line: line)
        if !p.isIPv6 && datagram.be16(6) == 0 {
            XCTAssertEqual(whole.be16(6), 0, "no checksum stays no checksum", file: file, line: line)
        } else {
            XCTAssertEqual(whole.be16(6), p.expectedChecksum(o[..<p.l4] + whole, udp: true), "the datagram's UDP checksum",
                           file: file, line: line)
            XCTAssertEqual(PlainChecksum.checksum(p.pseudoHeader(length: whole.count) + whole), 0, "the datagram's UDP checksum verifies",
                           file: file, line: line)
        }
    }
}

/// RFC 1071 written out plainly, a byte at a time: the reference the library is checked against.
enum PlainChecksum {
    /// The ones'-complement sum of big-endian 16-bit words (an odd last byte is the high byte of
    /// a word padded with zero), folded to 16 bits, not complemented.
    static func sum<C: Collection>(_ bytes: C) -> UInt16 where C.Element == UInt8 {
        var total: UInt32 = 0
        var high = true
        for b in bytes {
            total += high ? UInt32(b) << 8 : UInt32(b)
            high.toggle()
            while total > 0xFFFF { total = (total & 0xFFFF) + (total >> 16) }
        }
        return UInt16(total)
    }

    static func add(_ a: UInt16, _ b: UInt16) -> UInt16 {
        var t = UInt32(a) + UInt32(b)
        while t > 0xFFFF { t = (t & 0xFFFF) + (t >> 16) }
        return UInt16(t)
    }

    static func checksum<C: Collection>(_ bytes: C) -> UInt16 where C.Element == UInt8 { ~sum(bytes) }
}

/// A frame as Linux sends it with CHECKSUM_PARTIAL: complete IP headers (IPv4 header checksum
/// included), the TCP or UDP checksum field holding the folded pseudo-header sum.
struct OffloadPacket {
    static let fin: UInt8 = 0x01, psh: UInt8 = 0x08, ack: UInt8 = 0x10, ece: UInt8 = 0x40, cwr: UInt8 = 0x80

    var bytes: [UInt8]
    let l3: Int
    let l4: Int
    let payloadOffset: Int
    let isIPv6: Bool
    let isTCP: Bool
    let payload: [UInt8]

    var csumOffset: Int { isTCP ? 16 : 6 }

    /// Deterministic bytes.
    static func bytes(_ n: Int, seed: UInt32) -> [UInt8] {
        var x = seed &* 2_654_435_761 | 1
        return (0..<n).map { _ in
            x = x &* 1_103_515_245 &+ 12_345
            return UInt8(truncatingIfNeeded: x >> 16)
        }
    }

    static func make(ipv6: Bool = false, tcp: Bool = true, payload: [UInt8], vlan: Bool = false, ipOptions: Int = 0,
                     seq: UInt32 = 0xFFFF_F000, flags: UInt8 = ack | psh | fin, ipID: UInt16 = 0xFFFE,
                     zeroUDPChecksum: Bool = false) -> OffloadPacket {
        var b: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x52, 0x54, 0x00, 0xAB, 0xCD, 0xEF]
        if vlan { b += [0x81, 0x00, 0x20, 0x64] }
        b += ipv6 ? [0x86, 0xDD] : [0x08, 0x00]
        let l3 = b.count
        let proto: UInt8 = tcp ? 6 : 17
        let l4Header = tcp ? 32 : 8
        let l4Length = l4Header + payload.count
        if ipv6 {
            b += [0x60, 0x0A, 0xBC, 0xDE] + be16(l4Length) + [proto, 64]
            b += [0xFD, 0x00, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0x01]
            b += [0xFD, 0x00, 0, 0, 0, 0, 0, 0, 0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x02]
        } else {
            let ihl = 20 + ipOptions
            b += [UInt8(0x40 | ihl / 4), 0x00] + be16(ihl + l4Length) + be16(Int(ipID)) + [0x40, 0x00, 64, proto, 0, 0]
            b += [10, 0, 0, 1, 192, 168, 7, 200]
            b += [UInt8](repeating: 1, count: ipOptions)  // NOP options
            let c = PlainChecksum.checksum(b[l3...])
            b[l3 + 10] = UInt8(c >> 8)
            b[l3 + 11] = UInt8(c & 0xFF)
        }
        let l4 = b.count
        if tcp {
            // Data offset 8: NOP, NOP, timestamps.
            b += be16(40_000) + be16(5201) + be32(seq) + be32(0x0102_0304) + [0x80, flags] + be16(0xFFFF) + [0, 0, 0, 0]
            b += [1, 1, 8, 10, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        } else {
            b += be16(5353) + be16(9999) + be16(l4Length) + [0, 0]
        }
        b += payload
        var p = OffloadPacket(bytes: b, l3: l3, l4: l4, payloadOffset: l4 + l4Header, isIPv6: ipv6, isTCP: tcp, payload: payload)
        if !(zeroUDPChecksum && !tcp) {
            p.bytes.setBE16(PlainChecksum.sum(p.pseudoHeader(length: l4Length)), at: l4 + p.csumOffset)
        }
        return p
    }

    /// A UDP datagram whose checksum comes out 0: its last word (even `payload`) is chosen so.
    static func zeroChecksumUDP(ipv6: Bool = false, payload: Int) -> OffloadPacket {
        precondition(payload % 2 == 0)
        var p = make(ipv6: ipv6, tcp: false, payload: bytes(payload - 2, seed: 5) + [0, 0])
        let n = p.bytes.count
        var zeroed = p.bytes
        zeroed[p.l4 + 6] = 0
        zeroed[p.l4 + 7] = 0
        let w = 0xFFFF - PlainChecksum.sum(p.pseudoHeader(length: n - p.l4) + zeroed[p.l4...])
        p.bytes[n - 2] = UInt8(w >> 8)
        p.bytes[n - 1] = UInt8(w & 0xFF)
        return OffloadPacket(bytes: p.bytes, l3: p.l3, l4: p.l4, payloadOffset: p.payloadOffset, isIPv6: ipv6, isTCP: false,
                          payload: Array(p.bytes[p.payloadOffset...]))
    }

    /// The TCP or UDP pseudo-header for `length` bytes of segment or datagram.
    func pseudoHeader(length: Int) -> [UInt8] {
        let proto: UInt8 = isTCP ? 6 : 17
        if isIPv6 {
            return Array(bytes[(l3 + 8)..<(l3 + 40)]) + Self.be32(UInt32(length)) + [0, 0, 0, proto]
        }
        return Array(bytes[(l3 + 12)..<(l3 + 20)]) + [0, proto] + Self.be16(length)
    }

    /// The checksum `frame` (this packet's headers, any payload) should carry, computed plainly
    /// over the pseudo-header and the segment with the field taken as zero.
    func expectedChecksum<C: Collection>(_ frame: C, udp: Bool? = nil) -> UInt16 where C.Element == UInt8, C.Index == Int {
        var segment = Array(frame[(frame.startIndex + l4)...])
        segment[csumOffset] = 0
        segment[csumOffset + 1] = 0
        let c = PlainChecksum.checksum(pseudoHeader(length: segment.count) + segment)
        return (udp ?? !isTCP) && c == 0 ? 0xFFFF : c
    }

    /// A Linux-like TX header for this frame.
    func header(gsoSize: UInt16, ecn: Bool = false, type: UInt8? = nil) -> VirtioNetHeader {
        let gso = type ?? (isTCP ? (isIPv6 ? VirtioNetHeader.gsoTCPv6 : VirtioNetHeader.gsoTCPv4) : VirtioNetHeader.gsoUDP)
        return VirtioNetHeader(flags: VirtioNetHeader.flagNeedsCsum, gsoType: gso | (ecn ? VirtioNetHeader.gsoECN : 0),
                               hdrLen: UInt16(payloadOffset), gsoSize: gsoSize, csumStart: UInt16(l4), csumOffset: UInt16(csumOffset))
    }

    /// The frame with bytes replaced from `at`.
    func with(_ values: UInt8..., at: Int) -> [UInt8] {
        var b = bytes
        for (i, v) in values.enumerated() { b[at + i] = v }
        return b
    }

    func withBE16(_ v: UInt16, at: Int) -> [UInt8] {
        var b = bytes
        b.setBE16(v, at: at)
        return b
    }

    /// Rewrites the IP and UDP length fields of a prefix of this frame to its length, where the prefix holds them.
    func fitLengths(_ b: inout [UInt8]) {
        if isIPv6 {
            if b.count >= l3 + 6 { b.setBE16(UInt16(max(0, b.count - l3 - 40)), at: l3 + 4) }
        } else {
            if b.count >= l3 + 4 { b.setBE16(UInt16(b.count - l3), at: l3 + 2) }
        }
        if !isTCP && b.count >= l4 + 6 { b.setBE16(UInt16(b.count - l4), at: l4 + 4) }
    }

    static func be16(_ v: Int) -> [UInt8] { [UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
}

fileprivate extension Array where Element == UInt8 {
    func be16(_ at: Int) -> UInt16 { UInt16(self[at]) << 8 | UInt16(self[at + 1]) }
    func be32(_ at: Int) -> UInt32 { UInt32(be16(at)) << 16 | UInt32(be16(at + 2)) }
    mutating func setBE16(_ v: UInt16, at: Int) {
        self[at] = UInt8(v >> 8)
        self[at + 1] = UInt8(v & 0xFF)
    }

    /// The bytes of `range` with the (offset, count) fields in `mask` zeroed, to compare the rest.
    func except(_ mask: [(Int, Int)], in range: Range<Int>) -> [UInt8] {
        var b = Array(self[range])
        for (at, n) in mask { for i in at..<(at + n) where range.contains(i) { b[i - range.lowerBound] = 0 } }
        return b
    }

    func except(_ at: Int, _ n: Int, in range: Range<Int>) -> [UInt8] { except([(at, n)], in: range) }
}

/// Memory whose end is followed by an inaccessible page: a frame placed with `tail` ends right at
/// it, so touching the byte after the frame is a crash rather than a silent read.
final class GuardPageBuffer {
    let base: UnsafeMutableRawPointer
    let mapped: Int
    let page: Int

    init(capacity: Int) throws {
        page = Int(sysconf(Int32(_SC_PAGESIZE)))
        mapped = ((capacity + page - 1) / page + 1) * page
        guard let p = mmap(nil, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
            throw XCTSkip("mmap failed")
        }
        base = p
        guard mprotect(base + mapped - page, page, PROT_NONE) == 0 else { throw XCTSkip("mprotect failed") }
    }

    deinit { munmap(base, mapped) }

    /// `n` bytes that end where the inaccessible page starts.
    func tail(_ n: Int) -> UnsafeMutableRawPointer {
        precondition(n <= mapped - page)
        return base + (mapped - page - n)
    }
}
