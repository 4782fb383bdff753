import Virtio

/// The frames the tap modes move: IPv4 frames from 02:00:00:00:00:01 to 02:00:00:00:00:02, a
/// unicast address that is not the TAP's, so the kernel drops the guest's frames in ip_rcv as
/// PACKET_OTHERHOST (counted as the interface's `otherhost`) before any routing or socket lookup.
enum TapFrames {
    static let dst: [UInt8] = [0x02, 0, 0, 0, 0, 0x02]
    static let src: [UInt8] = [0x02, 0, 0, 0, 0, 0x01]
    static let ipSrc: [UInt8] = [10, 0, 0, 1]
    static let ipDst: [UInt8] = [10, 0, 0, 2]
    /// TSO: 44 segments of 1448 bytes (a 1500-byte MTU's TCP payload with timestamps).
    static let tsoSegment = 1448
    static let tsoSegments = 44
    /// Ethernet, IPv4 and TCP with timestamps: what Linux puts in front of the payload.
    static let tsoHeaders = 14 + 20 + 32
    static let tsoFrameSize = tsoHeaders + tsoSegment * tsoSegments

    /// An Ethernet + IPv4 + UDP frame of `size` bytes (at least 42), UDP checksum 0 (none, as IPv4
    /// allows), and the virtio-net header it is sent with: no offload.
    static func plain(size: Int) -> (frame: [UInt8], header: VirtioNetHeader) {
        precondition(size >= 42 && size <= 65_535 + 14, "frame size \(size)")
        var b = dst + src + [0x08, 0x00]
        b += ipv4(totalLength: size - 14, proto: 17)
        b += be16(5000) + be16(5001) + be16(size - 34) + [0, 0]
        b += pattern(size - b.count)
        return (b, VirtioNetHeader())
    }

    /// A TCP/IPv4 frame of `tsoFrameSize` bytes as Linux hands it to a virtio-net device with TSO:
    /// complete IPv4 header (checksum included), the TCP checksum field holding the folded
    /// pseudo-header sum (CHECKSUM_PARTIAL), and a header with NEEDS_CSUM, gso_type TCPV4,
    /// gso_size 1448, csum_start at the TCP header, csum_offset 16 and hdr_len up to the payload.
    static func tso() -> (frame: [UInt8], header: VirtioNetHeader) {
        let tcpLength = 32 + tsoSegment * tsoSegments
        var b = dst + src + [0x08, 0x00]
        b += ipv4(totalLength: 20 + tcpLength, proto: 6)
        let l4 = b.count
        // Data offset 8 words: NOP, NOP, timestamps. Flags ACK|PSH.
        b += be16(40_000) + be16(5201) + be32(0x1000_0000) + be32(0x0102_0304) + [0x80, 0x18] + be16(0xFFFF) + [0, 0, 0, 0]
        b += [1, 1, 8, 10, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        b += pattern(tsoSegment * tsoSegments)
        let pseudo = ipSrc + ipDst + [0, 6] + be16(tcpLength)
        let partial = sum(pseudo)
        b[l4 + 16] = UInt8(partial >> 8)
        b[l4 + 17] = UInt8(partial & 0xFF)
        let h = VirtioNetHeader(flags: VirtioNetHeader.flagNeedsCsum, gsoType: VirtioNetHeader.gsoTCPv4,
                                hdrLen: UInt16(tsoHeaders), gsoSize: UInt16(tsoSegment),
                                csumStart: UInt16(l4), csumOffset: 16)
        return (b, h)
    }

    /// Completes a partial checksum as a device does (the sum from csum_start to the end, the
    /// field included, complemented into the field) and checks the result the plain way: the
    /// pseudo-header and the whole segment must sum to 0xFFFF. A check of `tso()`.
    static func partialChecksumCompletes(_ frame: [UInt8], header h: VirtioNetHeader) -> Bool {
        var f = frame
        let start = Int(h.csumStart), field = start + Int(h.csumOffset)
        let c = ~sum(f[start...])
        f[field] = UInt8(c >> 8)
        f[field + 1] = UInt8(c & 0xFF)
        let segment = Array(f[start...])
        let pseudo = Array(f[26..<34]) + [0, f[23]] + be16(segment.count)
        return sum(pseudo + segment) == 0xFFFF
    }

    static func ipv4(totalLength: Int, proto: UInt8) -> [UInt8] {
        var h: [UInt8] = [0x45, 0] + be16(totalLength) + be16(0x1234) + [0x40, 0x00, 64, proto, 0, 0] + ipSrc + ipDst
        let c = ~sum(h)
        h[10] = UInt8(c >> 8)
        h[11] = UInt8(c & 0xFF)
        return h
    }

    static func pattern(_ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) } }

    /// The ones'-complement sum of big-endian 16-bit words (an odd last byte padded with zero),
    /// folded, not complemented (RFC 1071).
    static func sum<C: Collection>(_ bytes: C) -> UInt16 where C.Element == UInt8 {
        var total: UInt64 = 0
        var high = true
        for b in bytes {
            total &+= high ? UInt64(b) << 8 : UInt64(b)
            high.toggle()
        }
        while total > 0xFFFF { total = (total & 0xFFFF) + (total >> 16) }
        return UInt16(total)
    }

    static func be16(_ v: Int) -> [UInt8] { [UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
}
