import Virtio

/// Software GSO: cuts one large frame (Ethernet II, optionally one 802.1Q tag, then IPv4 or IPv6
/// (IPv6 without extension headers is enough; refuse others), then TCP for gso TCPV4/TCPV6, UDP for gso UDP)
/// into frames whose payload is at most header.gsoSize bytes, each with complete headers and
/// correct checksums (IPv4 header checksum, TCP/UDP checksum computed in full, pseudo-header included).
/// Allocates nothing: it parses once in init and writes each segment into the caller's buffer.
///
/// TCP (TSO), as Linux's tcp_gso_segment: every segment is the frame's headers followed by the
/// next gso_size payload bytes; IPv4 total length, id (the frame's id plus the segment's index)
/// and header checksum, IPv6 payload length, the sequence number (advanced by the payload
/// offset), FIN and PSH (last segment only), CWR (first segment only) and the TCP checksum are
/// rewritten. The checksum field's value in the frame (the sender's pseudo-header sum) is not used.
///
/// UDP (UFO), as Linux's udp4_ufo_fragment / udp6_ufo_fragment: the UDP checksum is computed over
/// the whole datagram (a result of 0 is sent as 0xFFFF; on IPv4 a checksum field of 0 stays 0,
/// "no checksum"). gso_size bounds the IP payload (UDP header and data) of each frame: a
/// datagram of at most gso_size bytes leaves as one frame; a larger one is cut into IP fragments
/// of gso_size rounded down to a multiple of 8 payload bytes (the last one shorter), all with
/// the frame's IP headers (IPv4 options are copied into every fragment, as Linux's GSO does).
/// IPv4 fragments keep the frame's id, carry the offset in 8-byte units, MF on all but the last,
/// and DF cleared. IPv6 fragments get a fragment header (next header 44) after the IPv6 header
/// with the identification `fragmentIdentification`: FNV-1a over the source and destination
/// addresses and the datagram's UDP checksum and length, 0 taken as 1. It is fixed for a given
/// datagram (no state, no randomness), differs between the datagrams of a flow as their
/// checksums do, and never 0 (Linux's ipv6_proxy_select_ident uses a random nonzero value).
///
/// Limits (hostile input): at most `maxSegments` segments, and no segment over 65535 bytes of
/// IP length (possible only for IPv6 fragments, whose fragment header adds 8 bytes).
///
/// The frame's bytes must stay readable from init until the last `next`. Offsets and lengths
/// all come from init; a frame changed in between (guest memory) gives wrong bytes, never an
/// access outside the frame or the output buffer.
struct SoftSegmenter {
    static let maxSegments = 1024

    private let frame: FrameReader
    private let layout: GSOLayout
    /// The payload cut into segments: TCP the data after the TCP header; UDP the IP payload
    /// (UDP header and data), of which fragments carry `step` bytes each.
    private let payloadLength: Int
    private let step: Int
    /// UDP: more than one fragment (else the datagram leaves whole).
    private let fragmenting: Bool
    /// The pseudo-header's address words plus the protocol (the length is added per segment).
    private let pseudoSum: UInt64
    /// TCP: the frame's sequence number.
    private let sequence: UInt32
    /// IPv4: the frame's id.
    private let ipID: UInt16
    /// UDP: the datagram's checksum, computed in init; nil when an IPv4 checksum field is 0.
    private let udpChecksum: UInt16?
    /// UDP over IPv6, fragmenting: the fragment header's identification.
    let fragmentIdentification: UInt32

    /// Number of segments it will produce.
    let count: Int
    /// Segments written so far.
    private(set) var written = 0
    /// The longest segment it will write: `next` needs a buffer of at least this many bytes.
    let maxSegmentLength: Int

    init(frame: UnsafeRawPointer, length: Int, header: VirtioNetHeader) throws(OffloadError) {
        // Safety: the caller gives `length` readable bytes at `frame`, kept until the last next().
        let f = FrameReader(frame, count: length)
        let gsoSize = Int(header.gsoSize)
        // The gso type's own errors (unknown, NONE) come first, from the layout.
        let layout = try GSOLayout(f, gsoType: header.gsoType)
        guard gsoSize > 0 else { throw OffloadError(text: "gso_size 0 for gso type \(GSOLayout.name(gsoType: header.gsoType))") }
        self.frame = f
        self.layout = layout
        let l3 = layout.ipOffset, l4 = layout.transportOffset
        let proto = layout.transport == .tcp ? GSOLayout.protoTCP : GSOLayout.protoUDP
        pseudoSum = layout.isIPv6 ? f.sum(l3 + 8, 32, to: UInt64(proto)) : f.sum(l3 + 12, 8, to: UInt64(proto))
        ipID = layout.isIPv6 ? 0 : f.u16(l3 + 4)

        switch layout.transport {
        case .tcp:
            payloadLength = length - layout.payloadOffset
            step = gsoSize
            fragmenting = false
            sequence = f.u32(l4 + 4)
            udpChecksum = nil
            fragmentIdentification = 0
            count = payloadLength == 0 ? 1 : (payloadLength + gsoSize - 1) / gsoSize
            maxSegmentLength = layout.payloadOffset + min(gsoSize, payloadLength)
        case .udp:
            payloadLength = length - l4
            sequence = 0
            if !layout.isIPv6 && f.u16(l4 + 6) == 0 {
                udpChecksum = nil
            } else {
                // The whole datagram but its checksum field, and the pseudo-header.
                var sum = f.sum(l4, 6, to: pseudoSum &+ UInt64(payloadLength))
                sum = f.sum(l4 + 8, payloadLength - 8, to: sum)
                let c = ~InternetChecksum.fold(sum)
                udpChecksum = c == 0 ? 0xFFFF : c
            }
            fragmenting = payloadLength > gsoSize
            if fragmenting {
                step = gsoSize & ~7
                guard step > 0 else { throw OffloadError(text: "gso_size \(gsoSize) is too small for an IP fragment (8 bytes at least)") }
                count = (payloadLength + step - 1) / step
                let fragmentHeader = layout.isIPv6 ? 8 : 0
                maxSegmentLength = l4 + fragmentHeader + step
                fragmentIdentification = layout.isIPv6 ? Self.identification(f, layout, checksum: udpChecksum ?? 0) : 0
            } else {
                step = payloadLength
                count = 1
                maxSegmentLength = length
                fragmentIdentification = 0
            }
        }
        guard count <= Self.maxSegments else {
            throw OffloadError(text: "\(count) segments (payload \(payloadLength) bytes, gso_size \(gsoSize)) is more than \(Self.maxSegments)")
        }
        let ipLength = maxSegmentLength - l3
        guard ipLength <= 65535 else { throw OffloadError(text: "a segment of \(ipLength) bytes of IP would exceed 65535") }
    }

    /// Writes the next segment into `out` (at least `capacity` bytes) and returns its length, nil when all were written.
    /// Also nil, writing nothing and staying at the same segment, when `capacity` is below
    /// `maxSegmentLength` (check that after init).
    /// Passes over the next `k` segments without writing them (segments are cut by index, so
    /// the ones after are the same): a frame part-delivered earlier resumes where it stopped.
    mutating func skip(_ k: Int) { written = min(count, written + max(0, k)) }

    mutating func next(into out: UnsafeMutableRawPointer, capacity: Int) -> Int? {
        guard written < count, capacity >= maxSegmentLength else { return nil }
        // Safety: the caller gives `capacity` writable bytes at `out`.
        let w = FrameWriter(out, count: capacity)
        let n: Int
        switch layout.transport {
        case .tcp: n = writeTCP(written, w)
        case .udp: n = fragmenting ? writeFragment(written, w) : writeWhole(w)
        }
        written += 1
        return n
    }

    // MARK: TCP

    static let fin: UInt8 = 0x01
    static let psh: UInt8 = 0x08
    static let cwr: UInt8 = 0x80

    private func writeTCP(_ i: Int, _ w: FrameWriter) -> Int {
        let l3 = layout.ipOffset, l4 = layout.transportOffset, headers = layout.payloadOffset
        let offset = i * step
        let n = min(step, payloadLength - offset)
        w.copy(headers, from: frame, at: 0, to: 0)
        w.copy(n, from: frame, at: headers + offset, to: headers)
        let tcpLength = layout.transportHeaderLength + n
        if layout.isIPv6 {
            w.set16(UInt16(tcpLength), at: l3 + 4)
        } else {
            w.set16(UInt16(layout.ipHeaderLength + tcpLength), at: l3 + 2)
            w.set16(ipID &+ UInt16(truncatingIfNeeded: i), at: l3 + 4)
            setIPv4Checksum(w)
        }
        w.set32(sequence &+ UInt32(truncatingIfNeeded: offset), at: l4 + 4)
        var flags = w.reader.u8(l4 + 13)
        if i != count - 1 { flags &= ~(Self.fin | Self.psh) }
        if i != 0 { flags &= ~Self.cwr }
        w.set8(flags, at: l4 + 13)
        w.set16(0, at: l4 + 16)
        let sum = w.reader.sum(l4, tcpLength, to: pseudoSum &+ UInt64(tcpLength))
        w.set16(~InternetChecksum.fold(sum), at: l4 + 16)
        return headers + n
    }

    // MARK: UDP

    /// The datagram as it is, with its UDP (and IPv4 header) checksum completed.
    private func writeWhole(_ w: FrameWriter) -> Int {
        w.copy(frame.count, from: frame, at: 0, to: 0)
        if let udpChecksum { w.set16(udpChecksum, at: layout.transportOffset + 6) }
        if !layout.isIPv6 { setIPv4Checksum(w) }
        return frame.count
    }

    /// Fragment `i` of the datagram's IP payload.
    private func writeFragment(_ i: Int, _ w: FrameWriter) -> Int {
        let l3 = layout.ipOffset, l4 = layout.transportOffset
        let offset = i * step
        let n = min(step, payloadLength - offset)
        let more = i != count - 1
        // The L2 and IP headers.
        w.copy(l4, from: frame, at: 0, to: 0)
        let data: Int
        if layout.isIPv6 {
            w.set16(UInt16(8 + n), at: l3 + 4)
            w.set8(Self.nextHeaderFragment, at: l3 + 6)
            w.set8(GSOLayout.protoUDP, at: l4)
            w.set8(0, at: l4 + 1)
            // Offset in 8-byte units in the top 13 bits (`offset` is a multiple of 8), M in bit 0.
            w.set16(UInt16(offset) | (more ? 1 : 0), at: l4 + 2)
            w.set32(fragmentIdentification, at: l4 + 4)
            data = l4 + 8
        } else {
            w.set16(UInt16(layout.ipHeaderLength + n), at: l3 + 2)
            // Offset in 8-byte units, MF; DF and the reserved bit cleared.
            w.set16(UInt16(offset / 8) | (more ? Self.moreFragments : 0), at: l3 + 6)
            setIPv4Checksum(w)
            data = l4
        }
        w.copy(n, from: frame, at: l4 + offset, to: data)
        // The first fragment holds the UDP header (step >= 8).
        if i == 0, let udpChecksum { w.set16(udpChecksum, at: data + 6) }
        return data + n
    }

    static let nextHeaderFragment: UInt8 = 44
    static let moreFragments: UInt16 = 0x2000

    /// FNV-1a (32-bit) over the IPv6 source and destination addresses, then the UDP checksum and
    /// length; 0 becomes 1 (an identification is nonzero by convention).
    static func identification(_ f: FrameReader, _ layout: GSOLayout, checksum: UInt16) -> UInt32 {
        // A plain function, not a closure over `h`: a captured var is a heap box at -Onone.
        func mix(_ h: UInt32, _ byte: UInt8) -> UInt32 { (h ^ UInt32(byte)) &* 0x0100_0193 }
        var h: UInt32 = 0x811C_9DC5
        var i = layout.ipOffset + 8
        while i < layout.ipOffset + 40 {
            h = mix(h, f.u8(i))
            i += 1
        }
        let length = UInt16(truncatingIfNeeded: layout.length - layout.transportOffset)
        h = mix(mix(h, UInt8(checksum >> 8)), UInt8(checksum & 0xFF))
        h = mix(mix(h, UInt8(length >> 8)), UInt8(length & 0xFF))
        return h == 0 ? 1 : h
    }

    // MARK: IPv4

    private func setIPv4Checksum(_ w: FrameWriter) {
        let l3 = layout.ipOffset
        w.set16(0, at: l3 + 10)
        w.set16(~InternetChecksum.fold(w.reader.sum(l3, layout.ipHeaderLength)), at: l3 + 10)
    }
}
