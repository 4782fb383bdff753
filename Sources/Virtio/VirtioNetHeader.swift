/// struct virtio_net_hdr (virtio 1.2, 5.1.6): the header in front of every packet.
///
/// 12 bytes (with num_buffers) when VERSION_1 or MRG_RXBUF is negotiated, else 10. Fields are
/// little endian (legacy devices use guest-native order, which is little endian on x86).
public struct VirtioNetHeader: Equatable, Sendable {
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM.
    public static let flagNeedsCsum: UInt8 = 1
    /// VIRTIO_NET_HDR_F_DATA_VALID.
    public static let flagDataValid: UInt8 = 2
    /// VIRTIO_NET_HDR_F_RSC_INFO.
    public static let flagRscInfo: UInt8 = 4

    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    public static let gsoUDP: UInt8 = 3
    public static let gsoTCPv6: UInt8 = 4
    public static let gsoUDPL4: UInt8 = 5
    public static let gsoECN: UInt8 = 0x80

    /// Size without num_buffers.
    public static let legacySize = 10
    /// Size with num_buffers.
    public static let fullSize = 12

    public var flags: UInt8
    public var gsoType: UInt8
    public var hdrLen: UInt16
    public var gsoSize: UInt16
    public var csumStart: UInt16
    public var csumOffset: UInt16
    /// Only present in the 12-byte form; reads as 0 from a 10-byte header.
    public var numBuffers: UInt16

    public init(flags: UInt8 = 0, gsoType: UInt8 = VirtioNetHeader.gsoNone, hdrLen: UInt16 = 0, gsoSize: UInt16 = 0,
                csumStart: UInt16 = 0, csumOffset: UInt16 = 0, numBuffers: UInt16 = 0) {
        self.flags = flags
        self.gsoType = gsoType
        self.hdrLen = hdrLen
        self.gsoSize = gsoSize
        self.csumStart = csumStart
        self.csumOffset = csumOffset
        self.numBuffers = numBuffers
    }

    /// 12 when VERSION_1 or MRG_RXBUF is in `features`, else 10.
    @inlinable
    public static func size(features: UInt64) -> Int {
        features & (VirtioFeature.version1 | VirtioNetFeature.mrgRxbuf) != 0 ? fullSize : legacySize
    }

    /// Reads a header of `size` (10 or 12) bytes at `p` (no alignment needed).
    @inlinable
    public init(from p: UnsafeRawPointer, size: Int) {
        precondition(size == Self.legacySize || size == Self.fullSize, "virtio-net header size must be 10 or 12")
        // Safety: the caller guarantees `size` readable bytes at p; all loads are unaligned-safe.
        flags = p.load(as: UInt8.self)
        gsoType = p.load(fromByteOffset: 1, as: UInt8.self)
        hdrLen = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        gsoSize = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        csumStart = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        csumOffset = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
        numBuffers = size == Self.fullSize ? UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 10, as: UInt16.self)) : 0
    }

    /// Writes the header as `size` (10 or 12) bytes at `p` (no alignment needed).
    @inlinable
    public func write(to p: UnsafeMutableRawPointer, size: Int) {
        precondition(size == Self.legacySize || size == Self.fullSize, "virtio-net header size must be 10 or 12")
        // Safety: the caller guarantees `size` writable bytes at p; raw stores need no alignment.
        p.storeBytes(of: flags, as: UInt8.self)
        p.storeBytes(of: gsoType, toByteOffset: 1, as: UInt8.self)
        p.storeBytes(of: hdrLen.littleEndian, toByteOffset: 2, as: UInt16.self)
        p.storeBytes(of: gsoSize.littleEndian, toByteOffset: 4, as: UInt16.self)
        p.storeBytes(of: csumStart.littleEndian, toByteOffset: 6, as: UInt16.self)
        p.storeBytes(of: csumOffset.littleEndian, toByteOffset: 8, as: UInt16.self)
        if size == Self.fullSize {
            p.storeBytes(of: numBuffers.littleEndian, toByteOffset: 10, as: UInt16.self)
        }
    }
}
