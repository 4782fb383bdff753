import Virtio

/// Where the headers of a frame to segment are, found by parsing the frame itself: Ethernet II,
/// at most one 802.1Q tag, IPv4 or IPv6 (no extension headers), then TCP or UDP as the gso type
/// says. `hdr_len` is only a hint (virtio 1.2 5.1.6.2.2) and is not used. Every length field
/// must agree with the frame: a GSO frame comes straight from the driver, never padded.
struct GSOLayout: Equatable {
    enum Transport: Equatable { case tcp, udp }

    /// Offset of the IP header: 14, or 18 after an 802.1Q tag.
    let ipOffset: Int
    let isIPv6: Bool
    /// IPv4: IHL * 4; IPv6: 40.
    let ipHeaderLength: Int
    let transport: Transport
    /// TCP: data offset * 4; UDP: 8.
    let transportHeaderLength: Int
    /// The frame's length.
    let length: Int

    /// Offset of the TCP or UDP header.
    var transportOffset: Int { ipOffset + ipHeaderLength }
    /// Offset of the TCP or UDP payload.
    var payloadOffset: Int { transportOffset + transportHeaderLength }

    static let etherIPv4: UInt16 = 0x0800
    static let etherIPv6: UInt16 = 0x86DD
    static let ether8021Q: UInt16 = 0x8100
    static let protoTCP: UInt8 = 6
    static let protoUDP: UInt8 = 17

    /// The name of a gso type (the ECN bit included), for messages.
    static func name(gsoType: UInt8) -> String {
        let ecn = gsoType & VirtioNetHeader.gsoECN != 0 ? "|ECN" : ""
        switch gsoType & ~VirtioNetHeader.gsoECN {
        case VirtioNetHeader.gsoNone: return "NONE" + ecn
        case VirtioNetHeader.gsoTCPv4: return "TCPV4" + ecn
        case VirtioNetHeader.gsoTCPv6: return "TCPV6" + ecn
        case VirtioNetHeader.gsoUDP: return "UDP" + ecn
        case VirtioNetHeader.gsoUDPL4: return "UDP_L4" + ecn
        default: return "0x" + String(gsoType, radix: 16)
        }
    }

    init(_ f: FrameReader, gsoType: UInt8) throws(OffloadError) {
        // Messages are made only on the way out: the success path allocates nothing.
        func type() -> String { Self.name(gsoType: gsoType) }
        let wantsIPv6: Bool?
        switch gsoType & ~VirtioNetHeader.gsoECN {
        case VirtioNetHeader.gsoTCPv4: (transport, wantsIPv6) = (.tcp, false)
        case VirtioNetHeader.gsoTCPv6: (transport, wantsIPv6) = (.tcp, true)
        case VirtioNetHeader.gsoUDP: (transport, wantsIPv6) = (.udp, nil)
        case VirtioNetHeader.gsoNone: throw OffloadError(text: "gso type \(type()): not a GSO frame")
        default: throw OffloadError(text: "unknown gso type \(type())")
        }
        length = f.count

        // Ethernet II, at most one 802.1Q tag.
        guard length >= 14 else { throw OffloadError(text: "frame of \(length) bytes is shorter than an Ethernet header (14)") }
        let tagged = f.u16(12) == Self.ether8021Q
        if tagged && length < 18 { throw OffloadError(text: "frame of \(length) bytes ends inside its 802.1Q tag") }
        let l3 = tagged ? 18 : 14
        let ethertype = f.u16(l3 - 2)
        ipOffset = l3
        func hex() -> String { "0x" + String(ethertype, radix: 16) }
        switch ethertype {
        case Self.etherIPv4: isIPv6 = false
        case Self.etherIPv6: isIPv6 = true
        case Self.ether8021Q, 0x88A8: throw OffloadError(text: "ethertype \(hex()) is a VLAN tag: only one 802.1Q tag is supported")
        default: throw OffloadError(text: "ethertype \(hex()) is neither IPv4 nor IPv6")
        }
        if let wantsIPv6, wantsIPv6 != isIPv6 {
            throw OffloadError(text: "gso type \(type()) on an \(isIPv6 ? "IPv6" : "IPv4") frame")
        }

        // IPv4 or IPv6, lengths agreeing with the frame.
        let proto: UInt8
        if isIPv6 {
            guard length - l3 >= 40 else { throw OffloadError(text: "frame of \(length) bytes ends inside its IPv6 header (at \(l3), 40 bytes)") }
            let version = f.u8(l3) >> 4
            guard version == 6 else { throw OffloadError(text: "IP version \(version) under the IPv6 ethertype") }
            let payload = Int(f.u16(l3 + 4))
            guard payload == length - l3 - 40 else {
                throw OffloadError(text: "IPv6 payload length \(payload) does not match the frame's \(length - l3 - 40) bytes after the IPv6 header")
            }
            ipHeaderLength = 40
            proto = f.u8(l3 + 6)
            switch proto {
            case 0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254:
                throw OffloadError(text: "IPv6 extension header \(proto) is not supported")
            default: break
            }
        } else {
            guard length - l3 >= 20 else { throw OffloadError(text: "frame of \(length) bytes ends inside its IPv4 header (at \(l3), 20 bytes)") }
            let version = f.u8(l3) >> 4
            guard version == 4 else { throw OffloadError(text: "IP version \(version) under the IPv4 ethertype") }
            let ihl = Int(f.u8(l3) & 0x0F)
            guard ihl >= 5 else { throw OffloadError(text: "IPv4 IHL \(ihl) is below 5") }
            guard ihl * 4 <= length - l3 else { throw OffloadError(text: "IPv4 header of \(ihl * 4) bytes runs past the frame's \(length) bytes") }
            let total = Int(f.u16(l3 + 2))
            guard total == length - l3 else {
                throw OffloadError(text: "IPv4 total length \(total) does not match the frame's \(length - l3) bytes of IP")
            }
            guard f.u16(l3 + 6) & 0x3FFF == 0 else { throw OffloadError(text: "IPv4 packet is already a fragment (MF or fragment offset set)") }
            ipHeaderLength = ihl * 4
            proto = f.u8(l3 + 9)
        }
        let wanted = transport == .tcp ? Self.protoTCP : Self.protoUDP
        guard proto == wanted else { throw OffloadError(text: "IP protocol \(proto) does not match gso type \(type()) (wants \(wanted))") }

        // TCP or UDP header.
        let l4 = l3 + ipHeaderLength
        switch transport {
        case .tcp:
            guard length - l4 >= 20 else { throw OffloadError(text: "frame of \(length) bytes ends inside its TCP header (at \(l4), 20 bytes)") }
            let doff = Int(f.u8(l4 + 12) >> 4)
            guard doff >= 5 else { throw OffloadError(text: "TCP data offset \(doff) is below 5") }
            guard doff * 4 <= length - l4 else { throw OffloadError(text: "TCP header of \(doff * 4) bytes runs past the frame's \(length) bytes") }
            transportHeaderLength = doff * 4
        case .udp:
            guard length - l4 >= 8 else { throw OffloadError(text: "frame of \(length) bytes ends inside its UDP header (at \(l4), 8 bytes)") }
            let udpLength = Int(f.u16(l4 + 4))
            guard udpLength == length - l4 else {
                throw OffloadError(text: "UDP length \(udpLength) does not match the frame's \(length - l4) bytes of datagram")
            }
            transportHeaderLength = 8
        }
    }
}
