// The frontend's side of a run: vhost-user requests as a hostile frontend sends them, with
// memfds of fuzzed size and offset and eventfds (session-engine fuzz target: see main.swift).

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
    /// Encodes, decodes (as the port's reader does) and handles one request. Returns false when
    /// the session refused it: the port would close the connection, so the run ends.
    @discardableResult
    func send(_ request: VhostUserRequest, _ payload: VhostUserPayload = .none, fds: [Int32] = [], needReply: Bool = false) -> Bool {
        guard alive else {
            for fd in fds where fd >= 0 { close(fd) }
            return false
        }
        var received = ReceivedFDs(owning: fds.filter { $0 >= 0 })
        let fdCount = received.count
        let wire = VhostUserCodec.encodeRequest(request, needReply: needReply, payload: payload)
        let message: VhostUserMessage
        do {
            message = try wire.withUnsafeBytes { raw throws(VhostUserError) -> VhostUserMessage in
                let (req, header) = try VhostUserCodec.decodeHeader(UnsafeRawBufferPointer(rebasing: raw[0..<VhostUserHeader.size]))
                let body = UnsafeRawBufferPointer(rebasing: raw[VhostUserHeader.size...])
                let p = try VhostUserCodec.decodeBody(req, header: header, body: body, fdCount: fdCount)
                return VhostUserMessage(request: req, header: header, payload: p)
            }
        } catch {
            alive = false
            return false
        }
        let reply: [UInt8]?
        do { reply = try session.handle(message, fds: &received) } catch {
            if verbose { print("refused: \(error)") }
            alive = false
            return false
        }
        received.closeAll()
        if let reply {
            check(reply.count >= VhostUserHeader.size, "\(request.name): reply shorter than a header")
            let r = UInt32(reply[0]) | UInt32(reply[1]) << 8 | UInt32(reply[2]) << 16 | UInt32(reply[3]) << 24
            let flags = UInt32(reply[4]) | UInt32(reply[5]) << 8
            check(r == request.rawValue, "\(request.name): reply names request \(r)")
            check(flags & VhostUserHeader.replyFlag != 0, "\(request.name): reply without the reply flag")
            if request == .getVringBase, session.ackedFeatures & VirtioFeature.ringPacked == 0, reply.count >= 20 {
                let num = UInt32(reply[16]) | UInt32(reply[17]) << 8 | UInt32(reply[18]) << 16 | UInt32(reply[19]) << 24
                check(num <= 0xFFFF, "GET_VRING_BASE answered \(num) for a split ring")
            }
        }
        return true
    }

    func ringIndex(_ input: inout Input) -> UInt32 {
        let b = input.u8()
        // Mostly a ring that exists; sometimes one past the end.
        return b & 0x80 != 0 ? UInt32(b & 0x7f) : UInt32(Int(b) % ringCount)
    }

    /// A region description and a memfd for it, from the input.
    func makeRegion(_ input: inout Input) -> (MemoryRegionDescription, HarnessMemfd)? {
        let pages = UInt64(1 + input.u8() % 16)
        let gpaSlot = UInt64(input.u8() % 16)
        let uvaSlot = UInt64(input.u8() % 16)
        let offPages = UInt64(input.u8() % 4)
        let flags = input.u8()
        let size = pages * 4096
        var gpa = gpaSlot * 0x10000
        var uva = 0x7f00_0000_0000 + uvaSlot * 0x10000
        var offset = offPages * 4096
        if flags & 1 != 0 { gpa = input.u64() }
        if flags & 2 != 0 { uva = input.u64() }
        if flags & 4 != 0 { offset += UInt64(input.u16()) }  // not page aligned: DPDK sends such
        var fileSize = Int((offset + size + 4095) & ~4095)
        if allowShortMemfd && flags & 8 != 0 { fileSize = 4096 * Int(input.u8() % 4) }
        guard let file = HarnessMemfd(size: fileSize) else { return nil }
        return (MemoryRegionDescription(guestPhysAddr: gpa, size: size, userAddr: uva, mmapOffset: offset), file)
    }

    func setMemTable(_ input: inout Input) {
        let count = 1 + Int(input.u8() % 3)
        var made: [(MemoryRegionDescription, HarnessMemfd)] = []
        for _ in 0..<count { if let r = makeRegion(&input) { made.append(r) } }
        guard !made.isEmpty else { return }
        // Sometimes one fd too few (the session must refuse, not map garbage).
        let dropLast = input.u8() == 0xFF
        var fds = made.map { $0.1.dupForSession() }
        if dropLast { close(fds.removeLast()) }
        if send(.setMemTable, .memoryTable(made.map(\.0)), fds: fds) {
            regions = made.map { GuestRegion(desc: $0.0, file: $0.1) }
        }
    }

    func addMemReg(_ input: inout Input) {
        guard let (d, file) = makeRegion(&input) else { return }
        if send(.addMemReg, .memoryRegion(d), fds: [file.dupForSession()]) {
            if !regions.contains(where: { $0.desc == d }) { regions.append(GuestRegion(desc: d, file: file)) }
        }
    }

    func remMemReg(_ input: inout Input) {
        let sel = Int(input.u8())
        let grow = input.u8() & 1 != 0
        guard !regions.isEmpty else { return }
        var d = regions[sel % regions.count].desc
        if grow { d.size &+= 4096 }  // no such region: declined
        if send(.remMemReg, .memoryRegion(d)) { regions.removeAll { $0.desc == d } }
    }

    func setLogBase(_ input: inout Input) {
        let needed = DirtyLog.bytesNeeded(guestPhysEnd: session.memory.current().guestPhysEnd)
        let mode = input.u8()
        var size = needed &+ UInt64(mode & 0x0f)
        if mode & 0x10 != 0 { size = UInt64(input.u16()) }
        let offset = UInt64(input.u8()) * 8
        var fileSize = Int(min(offset &+ size, 1 << 20))
        if allowShortMemfd && mode & 0x20 != 0 { fileSize = Int(input.u8()) * 64 }
        guard size <= 1 << 20, let file = HarnessMemfd(size: max(fileSize, 4096)) else { return }
        send(.setLogBase, .log(LogDescription(size: size, offset: offset)), fds: [file.dupForSession()], needReply: true)
    }

    /// A user address: inside a region (mostly), or raw.
    func userAddr(_ input: inout Input, align: UInt64) -> UInt64 {
        let sel = input.u8()
        let off = UInt64(input.u16())
        if sel == 0xFF { return input.u64() }
        guard !regions.isEmpty else { return off }
        let r = regions[Int(sel) % regions.count].desc
        let o = off % r.size
        return r.userAddr &+ (sel & 0x40 != 0 ? o : o & ~(align - 1))
    }

    /// A guest-physical address for a buffer or table: inside a region (mostly), in the relay's
    /// mediated-ring IOVA range, or raw.
    func guestAddr(_ input: inout Input) -> UInt64 {
        let sel = input.u8()
        let off = UInt64(input.u16())
        switch sel {
        case 0xFF: return input.u64()
        case 0xFE: return MediatedUsedRing.iova(forRing: Int(off % 2)) &+ UInt64(input.u8()) * 8
        default:
            guard !regions.isEmpty else { return off }
            let r = regions[Int(sel) % regions.count].desc
            return r.guestPhysAddr &+ off % r.size
        }
    }

    func setVringAddr(_ input: inout Input) {
        let index = ringIndex(&input)
        let mode = input.u8()
        var flags = UInt32(mode & 1)
        if mode & 0x80 != 0 { flags = input.u32() }
        let n = UInt64(max(session.vrings[Int(index) % ringCount].size, 1))
        var desc: UInt64, avail: UInt64, used: UInt64
        if mode & 0x02 == 0 {
            // A well-formed layout at one place: descriptors, avail, used (4-aligned).
            desc = userAddr(&input, align: 16)
            avail = desc &+ 16 * n
            used = (avail &+ 6 &+ 2 * n &+ 3) & ~3
        } else {
            desc = userAddr(&input, align: 16)
            avail = userAddr(&input, align: 2)
            used = userAddr(&input, align: 4)
        }
        var log: UInt64 = 0
        if flags & 1 != 0 {
            // Usually the used ring's own guest address (what QEMU sends), sometimes anywhere.
            log = input.u8() & 1 == 0 ? (session.memory.current().guestPhysAddr(userAddr: used, length: 1) ?? 0) : guestAddr(&input)
        }
        send(.setVringAddr, .vringAddress(VringAddress(index: index, flags: flags, descUserAddr: desc, usedUserAddr: used,
                                                       availUserAddr: avail, logGuestAddr: log)))
    }

    func setVringFile(_ input: inout Input, _ request: VhostUserRequest) {
        let index = ringIndex(&input)
        let hasFD = input.u8() & 7 != 0
        var fds: [Int32] = []
        if hasFD, let fd = try? EventFD.make() {
            let raw = fd.take()
            if request == .setVringKick {
                if let old = kicks.removeValue(forKey: Int(index)) { close(old) }
                kicks[Int(index)] = fcntl(raw, F_DUPFD_CLOEXEC, 0)
            }
            fds = [raw]
        }
        send(request, .vringFile(index: index, hasFD: hasFD), fds: fds)
    }

    func misc(_ input: inout Input) {
        switch input.u8() % 10 {
        case 0: send(.setOwner)
        case 1: send(.resetOwner); regions.removeAll(); nextSlot.removeAll()
        case 2: send(.resetDevice); regions.removeAll(); nextSlot.removeAll()
        case 3: send(.getFeatures)
        case 4: send(.getQueueNum)
        case 5: send(.setStatus, .u64(UInt64(input.u8())))
        case 6: send(.getStatus)
        case 7: send(.sendRARP, .u64(input.u64()))
        case 8: send(.netSetMTU, .u64(UInt64(input.u16())))
        default: send(.getMaxMemSlots)
        }
    }
}
