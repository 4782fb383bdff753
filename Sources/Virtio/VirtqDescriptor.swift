/// A split-ring descriptor (struct virtq_desc): addr le64, len le32, flags le16, next le16.
public struct VirtqDescriptor: Equatable, Sendable {
    /// The flags are computed constants, not stored statics: a stored one is reached through
    /// its module's addressor (a call per use, three per descriptor in a walk).
    public struct Flags: OptionSet, Sendable {
        public let rawValue: UInt16
        @inlinable public init(rawValue: UInt16) { self.rawValue = rawValue }
        /// VIRTQ_DESC_F_NEXT: the chain continues at `next`.
        @inlinable public static var next: Flags { Flags(rawValue: 1) }
        /// VIRTQ_DESC_F_WRITE: the buffer is device-writable.
        @inlinable public static var write: Flags { Flags(rawValue: 2) }
        /// VIRTQ_DESC_F_INDIRECT: the buffer holds a table of descriptors.
        @inlinable public static var indirect: Flags { Flags(rawValue: 4) }
    }

    public var addr: UInt64
    public var len: UInt32
    public var flags: Flags
    public var next: UInt16

    @inlinable
    public init(addr: UInt64, len: UInt32, flags: Flags = [], next: UInt16 = 0) {
        self.addr = addr
        self.len = len
        self.flags = flags
        self.next = next
    }

    /// Copies the 16 bytes at `p` out once (two 8-byte loads, no alignment needed); the fields
    /// are then decoded from the local copy, so a racing writer cannot change them afterwards.
    @inlinable
    public init(copyingFrom p: UnsafeRawPointer) {
        // Safety: the caller guarantees 16 mapped bytes at p; unaligned loads need no alignment.
        let low = UInt64(littleEndian: p.loadUnaligned(as: UInt64.self))
        let high = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        addr = low
        len = UInt32(truncatingIfNeeded: high)
        flags = Flags(rawValue: UInt16(truncatingIfNeeded: high >> 32))
        next = UInt16(truncatingIfNeeded: high >> 48)
    }

    /// Writes the 16-byte little-endian encoding at `p` (no alignment needed).
    @inlinable
    public func store(to p: UnsafeMutableRawPointer) {
        // Safety: the caller guarantees 16 writable bytes at p; raw stores need no alignment.
        let high = UInt64(len) | UInt64(flags.rawValue) << 32 | UInt64(next) << 48
        p.storeBytes(of: addr.littleEndian, as: UInt64.self)
        p.storeBytes(of: high.littleEndian, toByteOffset: 8, as: UInt64.self)
    }
}
