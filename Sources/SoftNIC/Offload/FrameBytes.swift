/// Bounds-checked big-endian access to a frame's bytes, for the offload code: every access checks
/// that it stays inside `count` bytes and traps otherwise. The parsers check lengths before they
/// read, so these checks are a safety net (a bug becomes a trap, never a read or write outside
/// the frame), not the validation.
struct FrameReader {
    let base: UnsafeRawPointer
    let count: Int

    /// `count` readable bytes at `base`, for as long as the reader is used.
    init(_ base: UnsafeRawPointer, count: Int) {
        precondition(count >= 0, "negative frame length")
        self.base = base
        self.count = count
    }

    @inline(__always)
    func check(_ at: Int, _ n: Int) {
        precondition(at >= 0 && n >= 0 && at <= count &- n, "offload access outside the frame")
    }

    @inline(__always)
    func u8(_ at: Int) -> UInt8 {
        check(at, 1)
        // Safety: check() put byte `at` inside the `count` bytes at base.
        return base.load(fromByteOffset: at, as: UInt8.self)
    }

    @inline(__always)
    func u16(_ at: Int) -> UInt16 {
        check(at, 2)
        // Safety: check() put bytes at..<at+2 inside the `count` bytes at base; the load is unaligned-safe.
        return UInt16(bigEndian: base.loadUnaligned(fromByteOffset: at, as: UInt16.self))
    }

    @inline(__always)
    func u32(_ at: Int) -> UInt32 {
        check(at, 4)
        // Safety: check() put bytes at..<at+4 inside the `count` bytes at base; the load is unaligned-safe.
        return UInt32(bigEndian: base.loadUnaligned(fromByteOffset: at, as: UInt32.self))
    }

    /// The internet checksum sum of bytes at..<at+n added to `initial` (not folded).
    @inline(__always)
    func sum(_ at: Int, _ n: Int, to initial: UInt64 = 0) -> UInt64 {
        check(at, n)
        // Safety: check() put bytes at..<at+n inside the `count` bytes at base.
        return InternetChecksum.add(base + at, count: n, to: initial)
    }
}

/// `FrameReader`'s writing counterpart, over an output buffer or a frame changed in place.
struct FrameWriter {
    let base: UnsafeMutableRawPointer
    let count: Int

    /// `count` writable bytes at `base`, for as long as the writer is used.
    init(_ base: UnsafeMutableRawPointer, count: Int) {
        precondition(count >= 0, "negative buffer length")
        self.base = base
        self.count = count
    }

    var reader: FrameReader { FrameReader(base, count: count) }

    @inline(__always)
    func set8(_ v: UInt8, at: Int) {
        reader.check(at, 1)
        // Safety: check() put byte `at` inside the `count` bytes at base.
        base.storeBytes(of: v, toByteOffset: at, as: UInt8.self)
    }

    @inline(__always)
    func set16(_ v: UInt16, at: Int) {
        reader.check(at, 2)
        // Safety: check() put bytes at..<at+2 inside the `count` bytes at base; raw stores need no alignment.
        base.storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt16.self)
    }

    @inline(__always)
    func set32(_ v: UInt32, at: Int) {
        reader.check(at, 4)
        // Safety: check() put bytes at..<at+4 inside the `count` bytes at base; raw stores need no alignment.
        base.storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt32.self)
    }

    /// Copies `n` bytes from `source` at `from` to this buffer at `to`.
    @inline(__always)
    func copy(_ n: Int, from source: FrameReader, at from: Int, to: Int) {
        source.check(from, n)
        reader.check(to, n)
        // Safety: both ranges were checked inside their buffers; copyMemory is a memmove (overlap is fine).
        (base + to).copyMemory(from: source.base + from, byteCount: n)
    }
}
