// The guest's side of a run: descriptor tables, indirect tables, avail entries and raw bytes
// written into the guest memory the session mapped (session-engine fuzz target: see main.swift).

#if canImport(Glibc)
import Glibc
#endif
import DeviceFramework
import Logging
import Platform
@testable import Relay
@testable import SoftNIC
@testable import VDPA
import VhostUser
import Virtio

extension Run {
    func write(_ bytes: UnsafeRawBufferPointer, at gpa: UInt64) {
        for r in regions {
            if let h = r.host(gpa: gpa, length: UInt64(bytes.count)) {
                h.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
                return
            }
        }
    }

    func write<T>(_ value: T, at gpa: UInt64) {
        withUnsafeBytes(of: value) { write($0, at: gpa) }
    }

    func read16(_ gpa: UInt64) -> UInt16 {
        for r in regions {
            if let h = r.host(gpa: gpa, length: 2) { return UInt16(littleEndian: h.loadUnaligned(as: UInt16.self)) }
        }
        return 0
    }

    func writeDescriptor(at gpa: UInt64, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        var d = [UInt8](repeating: 0, count: 16)
        d.withUnsafeMutableBytes { p in
            p.storeBytes(of: addr.littleEndian, toByteOffset: 0, as: UInt64.self)
            p.storeBytes(of: len.littleEndian, toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
            p.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
        }
        d.withUnsafeBytes { write($0, at: gpa) }
    }

    func ringSize(_ i: Int) -> UInt16 { UInt16(truncatingIfNeeded: max(session.vrings[i].size, 1)) }

    func guestDescriptor(_ input: inout Input) {
        let i = Int(input.u8()) % ringCount
        let size = ringSize(i)
        let slot = input.u16() % size
        let addr = guestAddr(&input)
        let lenSel = input.u8()
        let len = lenSel & 0x80 != 0 ? input.u32() : UInt32(input.u16() % 4096)
        let flags = UInt16(input.u8() & 7)
        let next = input.u16() % (size &+ 1)
        writeDescriptor(at: session.vrings[i].descGPA &+ 16 * UInt64(slot), addr: addr, len: len, flags: flags, next: next)
    }

    func guestIndirectTable(_ input: inout Input) {
        let at = guestAddr(&input)
        let count = 1 + Int(input.u8() % 8)
        for k in 0..<count {
            let addr = guestAddr(&input)
            let len = UInt32(input.u16())
            let flags = UInt16(input.u8() & 7)
            let next = UInt16(input.u8() % 9)
            writeDescriptor(at: at &+ 16 * UInt64(k), addr: addr, len: len, flags: flags, next: next)
        }
    }

    func guestAvail(_ input: inout Input) {
        let i = Int(input.u8()) % ringCount
        let size = ringSize(i)
        let v = session.vrings[i]
        let mode = input.u8()
        if mode & 0x80 != 0 {
            // avail.idx straight from the input (a jump past the ring size is a device fault).
            write(input.u16().littleEndian, at: v.availGPA &+ 2)
            return
        }
        let count = 1 + Int(mode % 4)
        for _ in 0..<count {
            let idx = read16(v.availGPA &+ 2)
            let h = input.u16()
            let head = mode & 0x40 != 0 ? h : h % size
            write(head.littleEndian, at: v.availGPA &+ 4 &+ 2 * UInt64(idx % size))
            write((idx &+ 1).littleEndian, at: v.availGPA &+ 2)
        }
    }

    func guestRawWrite(_ input: inout Input) {
        let at = guestAddr(&input)
        let n = 1 + Int(input.u8() % 16)
        var bytes: [UInt8] = []
        for _ in 0..<n { bytes.append(input.u8()) }
        bytes.withUnsafeBytes { write($0, at: at) }
    }

    /// A well-formed chain (so the fuzzer reaches the data path's success paths): on a TX ring a
    /// header and a frame, on an RX ring writable buffers; direct or through an indirect table.
    func guestGoodChain(_ input: inout Input) {
        // Operands first, so that a program parses the same whatever state it meets.
        let i = Int(input.u8()) % ringCount
        let mode = input.u8()
        let bufLen = UInt32(14 + Int(input.u16() % 1600))
        let bufferOffset = UInt64(input.u16())
        guard let region = regions.first?.desc else { return }
        let size = ringSize(i)
        let v = session.vrings[i]
        let bufferGPA = region.guestPhysAddr &+ bufferOffset % region.size
        let slot = (nextSlot[i] ?? 0) % size
        let isTX = i % 2 == 1
        let writable: UInt16 = isTX ? 0 : 2
        if isTX {
            // Header (zeroed) then frame bytes with a broadcast destination.
            var frame = [UInt8](repeating: 0, count: Int(bufLen) + 12)
            for k in 12..<18 { frame[k] = 0xFF }
            frame.withUnsafeBytes { write($0, at: bufferGPA) }
        }
        let total = bufLen + (isTX ? 12 : 0)
        if mode & 1 != 0 {
            // Indirect: a two-entry table right after the buffer.
            let table = (bufferGPA &+ UInt64(total) &+ 15) & ~15
            let half = total / 2
            writeDescriptor(at: table, addr: bufferGPA, len: half, flags: writable | 1, next: 1)
            writeDescriptor(at: table &+ 16, addr: bufferGPA &+ UInt64(half), len: total - half, flags: writable, next: 0)
            writeDescriptor(at: v.descGPA &+ 16 * UInt64(slot), addr: table, len: 32, flags: 4, next: 0)
            nextSlot[i] = slot &+ 1
        } else if mode & 2 != 0 && size >= 2 {
            let slot2 = (slot &+ 1) % size
            let half = total / 2
            writeDescriptor(at: v.descGPA &+ 16 * UInt64(slot), addr: bufferGPA, len: half, flags: writable | 1, next: slot2)
            writeDescriptor(at: v.descGPA &+ 16 * UInt64(slot2), addr: bufferGPA &+ UInt64(half), len: total - half, flags: writable, next: 0)
            nextSlot[i] = slot &+ 2
        } else {
            writeDescriptor(at: v.descGPA &+ 16 * UInt64(slot), addr: bufferGPA, len: total, flags: writable, next: 0)
            nextSlot[i] = slot &+ 1
        }
        let idx = read16(v.availGPA &+ 2)
        write(slot.littleEndian, at: v.availGPA &+ 4 &+ 2 * UInt64(idx % size))
        write((idx &+ 1).littleEndian, at: v.availGPA &+ 2)
    }
}
