import Virtio

/// The device's software offloads for frames a guest sends (virtio 1.2 5.1.6.2): what a NIC does
/// in hardware when the guest hands it a partial checksum or a large (GSO) frame and the receiver
/// cannot take it as it is. Pure functions over frame bytes; `SoftSegmenter` does segmentation.
enum SoftOffload {
    /// Completes a partial checksum (NEEDS_CSUM): the 16-bit field at start+offset holds the
    /// pseudo-header sum the sender put there (Linux CHECKSUM_PARTIAL); sums frame[start..<length]
    /// including that field, stores the complemented fold at start+offset (big endian). A result of 0 for UDP is stored as 0xFFFF
    /// only when the checksum is a UDP one (pass `udp: true`). Returns false (nothing written)
    /// when start + offset + 2 > length or start >= length.
    static func completeChecksum(_ frame: UnsafeMutableRawPointer, length: Int, start: Int, offset: Int, udp: Bool = false) -> Bool {
        guard start >= 0, offset >= 0, start < length, offset <= length - start - 2 else { return false }
        // Safety: the caller gives `length` writable bytes at `frame`.
        let w = FrameWriter(frame, count: length)
        let c = ~InternetChecksum.fold(w.reader.sum(start, length - start))
        w.set16(udp && c == 0 ? 0xFFFF : c, at: start + offset)
        return true
    }
}

extension SoftOffload {
    /// VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM (virtio 1.4 draft): set only with the UDP tunnel gso
    /// types, which this device never offers.
    static let flagUDPTunnelCsum: UInt8 = 8

    /// nil when the header is acceptable for a frame of `length` bytes (after the header) given
    /// the negotiated `features`; otherwise a short text naming what is wrong. Rules (virtio 1.2
    /// 5.1.6.2): NEEDS_CSUM needs CSUM negotiated, and csum_start + csum_offset + 2 <= length; a
    /// gso type other than NONE needs its HOST_ feature (TCPV4→HOST_TSO4, TCPV6→HOST_TSO6,
    /// UDP→HOST_UFO, the ECN bit→HOST_ECN), NEEDS_CSUM set, gso_size > 0, and hdr_len <= length;
    /// unknown gso types (including UDP_L4=5) are refused; hdr_len > length is refused even
    /// without GSO.
    ///
    /// Flags, as the spec has them: the device "MUST ignore flag bits that it does not
    /// recognize" (5.1.6.2.2), so bits the spec does not define for transmission are ignored;
    /// DATA_VALID (which a driver must not set on transmission) is ignored too, as Linux's tap
    /// does. Refused: RSC_INFO (receive only; it redefines csum_start and csum_offset) and
    /// UDP_TUNNEL_CSUM (only with UDP tunnel GSO, never offered here; the current draft says
    /// the device must not accept it without a tunnel gso type).
    ///
    /// Also refused, as Linux's virtio_net_hdr_to_skb does for TCP: a GSO frame whose
    /// csum_offset is not that of its transport's checksum field (16 for TCP, 6 for UDP); and the
    /// ECN bit with gso type NONE or UDP (it marks TCP segments).
    static func checkTX(_ h: VirtioNetHeader, length: Int, features: UInt64) -> String? {
        if h.flags & VirtioNetHeader.flagRscInfo != 0 { return "flag RSC_INFO set on a transmitted packet" }
        if h.flags & flagUDPTunnelCsum != 0 { return "flag UDP_TUNNEL_CSUM set without UDP tunnel GSO" }
        let needsCsum = h.flags & VirtioNetHeader.flagNeedsCsum != 0
        if needsCsum {
            if features & VirtioNetFeature.csum == 0 { return "NEEDS_CSUM without CSUM negotiated" }
            if Int(h.csumStart) + Int(h.csumOffset) + 2 > length {
                return "csum_start \(h.csumStart) + csum_offset \(h.csumOffset) + 2 is past the frame's \(length) bytes"
            }
        }
        if Int(h.hdrLen) > length { return "hdr_len \(h.hdrLen) is larger than the frame's \(length) bytes" }
        if h.gsoType == VirtioNetHeader.gsoNone { return nil }

        let base = h.gsoType & ~VirtioNetHeader.gsoECN
        let needed: UInt64
        let csumField: UInt16
        switch base {
        case VirtioNetHeader.gsoTCPv4: (needed, csumField) = (VirtioNetFeature.hostTSO4, 16)
        case VirtioNetHeader.gsoTCPv6: (needed, csumField) = (VirtioNetFeature.hostTSO6, 16)
        case VirtioNetHeader.gsoUDP: (needed, csumField) = (VirtioNetFeature.hostUFO, 6)
        case VirtioNetHeader.gsoNone: return "gso ECN bit without a gso type"
        default: return "unknown gso type \(GSOLayout.name(gsoType: h.gsoType))"
        }
        // Messages are made only on the way out: an accepted header allocates nothing.
        func type() -> String { GSOLayout.name(gsoType: base) }
        if features & needed == 0 { return "gso type \(type()) without \(describeFeatures(needed)) negotiated" }
        if h.gsoType & VirtioNetHeader.gsoECN != 0 {
            if base == VirtioNetHeader.gsoUDP { return "gso ECN bit on gso type UDP" }
            if features & VirtioNetFeature.hostECN == 0 { return "gso ECN bit without HOST_ECN negotiated" }
        }
        if !needsCsum { return "gso type \(type()) without NEEDS_CSUM" }
        if h.gsoSize == 0 { return "gso type \(type()) with gso_size 0" }
        if h.csumOffset != csumField { return "gso type \(type()) with csum_offset \(h.csumOffset), not \(csumField)" }
        return nil
    }
}
