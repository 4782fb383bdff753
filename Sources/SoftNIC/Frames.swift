/// Frames the SoftNIC makes itself.
public enum Frames {
    /// The source link's frame layout (documented in docs/SOFTNIC.md): destination = the guest's
    /// MAC (broadcast when not set), source = the port's MAC, ethertype 0x88B5, a 64-bit big-endian
    /// sequence number whose top 16 bits are the generator's epoch, then 0xA5 filler.
    public static let sourceEthertype: UInt16 = 0x88B5
    public static let filler: UInt8 = 0xA5

    /// Writes a source frame of `size` bytes at `p`.
    @inline(__always)
    public static func writeSource(to p: UnsafeMutableRawPointer, size: Int, dst: UInt64, src: UInt64, sequence: UInt64) {
        // Fill first, then the header: one memset and a few stores.
        p.initializeMemory(as: UInt8.self, repeating: filler, count: size)
        storeMAC(dst, at: p)
        storeMAC(src, at: p + 6)
        p.storeBytes(of: sourceEthertype.bigEndian, toByteOffset: 12, as: UInt16.self)
        p.storeBytes(of: sequence.bigEndian, toByteOffset: 14, as: UInt64.self)
    }

    /// A MAC packed in the low 48 bits, first octet most significant.
    @inline(__always)
    static func storeMAC(_ mac: UInt64, at p: UnsafeMutableRawPointer) {
        for i in 0..<6 { p.storeBytes(of: UInt8(truncatingIfNeeded: mac >> (8 * UInt64(5 - i))), toByteOffset: i, as: UInt8.self) }
    }

    public static func pack(_ mac: [UInt8]) -> UInt64 { mac.prefix(6).reduce(0) { ($0 << 8) | UInt64($1) } }

    public static let broadcast: UInt64 = 0xFFFF_FFFF_FFFF

    /// A RARP request announcing `mac` (what QEMU's SEND_RARP asks the backend to send), 60 bytes.
    public static func rarp(mac: [UInt8]) -> [UInt8] {
        var f = [UInt8](repeating: 0xff, count: 6) + mac.prefix(6)
        f += [0x80, 0x35]                 // ethertype RARP
        f += [0x00, 0x01, 0x08, 0x00]     // hardware Ethernet, protocol IPv4
        f += [6, 4, 0x00, 0x03]           // sizes, op = reverse request
        f += mac.prefix(6) + [0, 0, 0, 0] // sender
        f += mac.prefix(6) + [0, 0, 0, 0] // target
        f += [UInt8](repeating: 0, count: 60 - f.count)
        return f
    }

    public static func parseMAC(_ text: String) -> [UInt8]? {
        let parts = text.split(separator: ":")
        guard parts.count == 6 else { return nil }
        var out: [UInt8] = []
        for p in parts {
            guard p.count == 2, let v = UInt8(p, radix: 16) else { return nil }
            out.append(v)
        }
        return out
    }

    public static func format(_ mac: UInt64) -> String {
        (0..<6).map { i in
            let b = UInt8(truncatingIfNeeded: mac >> (8 * UInt64(5 - i)))
            return (b < 16 ? "0" : "") + String(b, radix: 16)
        }.joined(separator: ":")
    }
}
