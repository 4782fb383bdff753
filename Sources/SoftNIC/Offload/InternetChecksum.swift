/// Internet (ones-complement) checksum arithmetic, RFC 1071.
///
/// A sum is a `UInt64` congruent, modulo 0xFFFF, to the ones-complement sum of big-endian 16-bit
/// words; sums of pieces that each start at an even offset of the covered range can be added
/// together (with `add(_:count:to:)`'s `initial`) and folded once at the end.
enum InternetChecksum {
    /// Adds `count` bytes at `p` (big-endian 16-bit words, an odd last byte padded with zero) to `initial`; not folded.
    ///
    /// Sums 32-bit native-order loads into 64-bit accumulators and byte-swaps the folded result
    /// once (RFC 1071 section 2(B): the sum is independent of byte order up to that swap), so no
    /// load is swapped and none needs alignment.
    static func add(_ p: UnsafeRawPointer, count: Int, to initial: UInt64 = 0) -> UInt64 {
        // Each accumulator takes at most count / 8 terms below 2^32: no overflow below 2^35 bytes.
        precondition(count >= 0 && count < 1 << 35, "checksum over \(count) bytes")
        var a: UInt64 = 0
        var b: UInt64 = 0
        var i = 0
        while i &+ 16 <= count {
            // Safety: bytes i..<i+16 lie in the caller's `count` bytes at p; loads are unaligned-safe.
            a &+= UInt64(p.loadUnaligned(fromByteOffset: i, as: UInt32.self))
            b &+= UInt64(p.loadUnaligned(fromByteOffset: i &+ 4, as: UInt32.self))
            a &+= UInt64(p.loadUnaligned(fromByteOffset: i &+ 8, as: UInt32.self))
            b &+= UInt64(p.loadUnaligned(fromByteOffset: i &+ 12, as: UInt32.self))
            i &+= 16
        }
        while i &+ 4 <= count {
            // Safety: bytes i..<i+4 lie in the caller's `count` bytes at p.
            a &+= UInt64(p.loadUnaligned(fromByteOffset: i, as: UInt32.self))
            i &+= 4
        }
        if i &+ 2 <= count {
            // Safety: bytes i..<i+2 lie in the caller's `count` bytes at p.
            b &+= UInt64(p.loadUnaligned(fromByteOffset: i, as: UInt16.self))
            i &+= 2
        }
        if i < count {
            // Safety: byte i < count lies in the caller's bytes at p.
            let last = UInt64(p.load(fromByteOffset: i, as: UInt8.self))
            // The odd last byte is at an even offset: the first byte of a (zero-padded) word.
            #if _endian(little)
            a &+= last
            #else
            a &+= last << 8
            #endif
        }
        let swapped = UInt64(UInt16(bigEndian: fold(a &+ b)))
        let (sum, carry) = initial.addingReportingOverflow(swapped)
        // End-around carry: 2^64 is 1 modulo 0xFFFF.
        return carry ? sum &+ 1 : sum
    }

    /// Folds a sum to 16 bits (not complemented).
    static func fold(_ sum: UInt64) -> UInt16 {
        var s = (sum & 0xFFFF_FFFF) &+ (sum >> 32)
        while s > 0xFFFF { s = (s & 0xFFFF) &+ (s >> 16) }
        return UInt16(s)
    }
}
