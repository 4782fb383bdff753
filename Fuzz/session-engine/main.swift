// libFuzzer target: a BackendSession driving a SoftNIC (through the framework's DeviceBinding,
// relay included) fed a hostile frontend and a hostile guest at once. Built by
// Fuzz/session-engine/build.sh against SwiftPM-built, fuzzer-instrumented modules; never part of
// the package build.
//
// One input is a program: a sequence of operations, each an opcode byte and its operands (bytes
// past the end read as zero). Frontend operations are vhost-user requests, encoded with the codec
// and decoded again as the port does (so the fd-count layer runs too), then handled by the
// session, with memfds of fuzzed size and offset for memory tables and the log, and eventfds for
// kicks and calls. Guest operations write descriptor tables, indirect tables, avail entries and
// raw bytes into the guest memory the session mapped, through the harness's own mapping of the
// same memfds; addresses are mostly "region k + offset" so they land inside guest RAM, sometimes
// raw, sometimes in the relay's mediated-ring IOVA range. A kick signals the ring's kick eventfd
// and then settles the device: `SoftNIC.serviceUntilIdle()` runs the DMA engine's work on its own
// thread until it finds nothing to do, and the relay (if a migration switched a ring to it) is
// stepped until idle the same way, so each input ends in a settled state that depends on the
// input, not on thread timing (the engine thread still runs on its own in between, as it does in
// the daemon).
//
// Checked per input, besides ASan and Swift's traps: every reply carries the reply flag and the
// request it answers; a split ring's GET_VRING_BASE answer fits 16 bits; after teardown (session
// close, device close, relay stop) the process has exactly the fds and threads it had before the
// first input (a leak per iteration would exhaust a daemon that serves reconnecting frontends).
//
// Memfds are sometimes shorter than the region or log announced over them (FUZZ_SHORT_MEMFD=0
// turns that off). Before the fix in Platform's MemoryMapping the backend mapped such a region and
// the device's first access past the end of the file killed the process with SIGBUS
// (findings/short-memfd-sigbus, docs/TESTING.md); now the session must refuse the message.

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

/// precondition's message is dropped in -O builds; the report must say which check failed.
func check(_ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition { fatalError(message()) }
}

// MARK: input

struct Input {
    let p: UnsafePointer<UInt8>
    let n: Int
    var at = 0
    var done: Bool { at >= n }
    mutating func u8() -> UInt8 {
        guard at < n else { at += 1; return 0 }
        defer { at += 1 }
        return p[at]
    }
    mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
}

// MARK: process-wide state

let allowShortMemfd = getenv("FUZZ_SHORT_MEMFD").map { String(cString: $0) != "0" } ?? true
/// Negative control for the leak check: FUZZ_SELFTEST_LEAK=1 leaks one eventfd per input, and
/// the target must then report "fd leak" on its first input (scripts/fuzz runs this once).
let selftestLeak = getenv("FUZZ_SELFTEST_LEAK").map { String(cString: $0) == "1" } ?? false
let verbose = getenv("FUZZ_VERBOSE").map { String(cString: $0) == "1" } ?? false
nonisolated(unsafe) var baseline: (fds: [String], threads: Int)?
nonisolated(unsafe) var iterations = 0

let logger: Logger = {
    var l = Logger(label: "fuzz")
    l.logLevel = verbose ? .trace : .critical
    return l
}()

/// The fds of the kinds the session, the device and the relay open (memfds, eventfds, epoll
/// instances, mappings' files, sockets), by number and target. Other fds are left out: the
/// sanitizer runtime opens pipes to its symbolizer the first time libFuzzer prints a new function.
func ownFDs() -> [String] {
    var out: [String] = []
    guard let d = opendir("/proc/self/fd") else { return ["?"] }
    defer { closedir(d) }
    let ownDir = dirfd(d)
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        guard name != ".", name != "..", Int32(name) != ownDir else { continue }
        var buf = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/\(name)", &buf, 255)
        let target = n > 0 ? String(cString: buf) : "?"
        if target.hasPrefix("anon_inode:") || target.hasPrefix("/memfd:") || target.hasPrefix("socket:") {
            out.append("\(name)=\(target)")
        }
    }
    return out.sorted()
}

/// The names of this process's threads.
func threadNames() -> [String] {
    var out: [String] = []
    guard let d = opendir("/proc/self/task") else { return ["?"] }
    defer { closedir(d) }
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        guard name != ".", name != ".." else { continue }
        var comm = "?"
        if let f = fopen("/proc/self/task/\(name)/comm", "r") {
            var buf = [CChar](repeating: 0, count: 64)
            if fgets(&buf, 64, f) != nil { comm = String(cString: buf).trimmingSuffixNewline }
            fclose(f)
        }
        out.append("\(name):\(comm)")
    }
    return out
}

extension String {
    var trimmingSuffixNewline: String { hasSuffix("\n") ? String(dropLast()) : self }
}

func countEntries(_ path: String) -> Int {
    guard let d = opendir(path) else { return -1 }
    defer { closedir(d) }
    var n = 0
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        if name != "." && name != ".." { n += 1 }
    }
    return n
}

// MARK: guest memory, as the frontend (and the guest in it) sees it

/// One memfd the harness created and mapped for itself. Guest writes go through this mapping.
final class HarnessMemfd {
    let base: UnsafeMutableRawPointer
    let fileSize: Int
    let mappedLength: Int
    init?(size: Int) {
        let fd = try? makeMemfd(name: "fuzz-guest", size: size)
        guard let fd else { return nil }
        // The harness maps at least a page (mmap of 0 bytes fails) but only ever touches the file.
        mappedLength = max(size, 4096)
        let p = mmap(nil, mappedLength, PROT_READ | PROT_WRITE, MAP_SHARED, fd.raw, 0)
        guard let p, p != MAP_FAILED else { return nil }
        base = p
        fileSize = size
        rawFD = fd.take()
    }
    /// Our own fd; a duplicate goes to the session with each message that carries it.
    private(set) var rawFD: Int32
    func dupForSession() -> Int32 { fcntl(rawFD, F_DUPFD_CLOEXEC, 0) }
    deinit {
        munmap(base, mappedLength)
        close(rawFD)
    }
}

struct GuestRegion {
    var desc: MemoryRegionDescription
    var file: HarnessMemfd

    /// Host pointer (harness mapping) for [gpa, gpa+length) if inside this region and backed by the file.
    func host(gpa: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        guard gpa >= desc.guestPhysAddr else { return nil }
        let off = gpa - desc.guestPhysAddr
        guard off <= desc.size, length <= desc.size - off else { return nil }
        let (fileOff, o1) = desc.mmapOffset.addingReportingOverflow(off)
        let (end, o2) = fileOff.addingReportingOverflow(length)
        guard !o1, !o2, end <= UInt64(file.fileSize) else { return nil }
        return file.base + Int(fileOff)
    }
}

// MARK: one run

final class Run {
    let device: SoftNIC
    let binding: DeviceBinding
    let session: BackendSession
    var regions: [GuestRegion] = []
    /// Our duplicate of each ring's kick eventfd, to ring its doorbell.
    var kicks: [Int: Int32] = [:]
    /// Next descriptor slot the "well-formed chain" operation uses, per ring.
    var nextSlot: [Int: UInt16] = [:]
    var alive = true

    init() throws {
        device = try SoftNIC(portID: "fuzz", queuePairs: 1, link: .loopback, guestMAC: nil, logger: logger)
        // What a port offers (Port.init): the device's features plus vhost-user's own bits, guest
        // memory below the daemon's reserved IOVA range.
        let config = BackendConfig(queuePairs: 1, virtioFeatures: device.virtioFeatures | BackendConfig.vhostUserFeatures,
                                   guestPhysLimit: reservedIOVABase)
        session = BackendSession(config: config, logger: logger)
        // The event loop: a relay thread that sleeps when idle (poll and hybrid would spin).
        binding = DeviceBinding(device: device, portID: "fuzz", relayMode: .event, migration: MigrationStatsTable(),
                                testSwitches: TestSwitches(), logger: logger)
        session.hooks = binding
    }

    func teardown() {
        if verbose { for c in device.counters() { print("queue \(c.index): \(c)") } }
        session.close()
        device.close()
        // The relay thread (if a migration started one) stops when the binding goes (its deinit).
        for (_, fd) in kicks { close(fd) }
        kicks.removeAll()
        regions.removeAll()
    }

    var ringCount: Int { session.vrings.count }

    // MARK: frontend side

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

    // MARK: guest side

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

    /// Lets the device and the relay finish what the rings hold now.
    func settle() {
        _ = device.serviceUntilIdle(maxPasses: 64)
        if let relay = binding.relay {
            do {
                try relay.perform { e in
                    for q in e.active {
                        var steps = 0
                        while steps < 64 && e.step(q) > 0 { steps += 1 }
                    }
                }
            } catch {
                // The relay has stopped (the binding's reset did it): nothing left to settle.
            }
            // The relay rings the device's doorbell for buffers the guest posted while it slept.
            _ = device.serviceUntilIdle(maxPasses: 64)
        }
    }

    func kick(_ input: inout Input) {
        let i = Int(input.u8()) % ringCount
        if let fd = kicks[i] { EventFD.signal(fd) }
        settle()
    }

    // MARK: the program

    func execute(_ input: inout Input) {
        var ops = 0
        while !input.done && alive && ops < 96 {
            ops += 1
            let op = input.u8() % 22
            if verbose { print("op \(op) at byte \(input.at - 1)") }
            switch op {
            case 0:
                var f = input.u64()
                if input.u8() & 0x0f != 0 { f &= session.config.virtioFeatures }
                send(.setFeatures, .u64(f))
            case 1:
                var f = input.u64()
                if input.u8() & 0x0f != 0 { f &= session.config.protocolFeatures }
                send(.setProtocolFeatures, .u64(f))
            case 2: setMemTable(&input)
            case 3: addMemReg(&input)
            case 4: remMemReg(&input)
            case 5: setLogBase(&input)
            case 6:
                let index = ringIndex(&input)
                let b = input.u8()
                let num = b & 0x80 != 0 ? input.u32() : UInt32(1) << UInt32(b % 9)
                send(.setVringNum, .vringState(VringState(index: index, num: num)))
            case 7: setVringAddr(&input)
            case 8:
                let index = ringIndex(&input)
                let b = input.u8()
                send(.setVringBase, .vringState(VringState(index: index, num: b & 0x80 != 0 ? input.u32() : UInt32(input.u16()))))
            case 9:
                send(.getVringBase, .vringState(VringState(index: ringIndex(&input), num: 0)))
            case 10: setVringFile(&input, .setVringKick)
            case 11: setVringFile(&input, .setVringCall)
            case 12:
                let index = ringIndex(&input)
                send(.setVringEnable, .vringState(VringState(index: index, num: UInt32(input.u8() % 3))))
            case 13: misc(&input)
            case 14, 15: guestDescriptor(&input)
            case 16: guestIndirectTable(&input)
            case 17, 18: guestAvail(&input)
            case 19: guestRawWrite(&input)
            case 20: guestGoodChain(&input)
            default: kick(&input)
            }
        }
        if alive { settle() }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    if baseline == nil {
        // A first run with no input starts whatever the runtime starts once (Dispatch's
        // semaphores, the SoftNIC's wire hub) before the fds and threads are counted.
        if let warm = try? Run() { warm.settle(); warm.teardown() }
        baseline = (ownFDs(), countEntries("/proc/self/task"))
    }
    do {
        let run = try Run()
        var input = Input(p: data, n: size)
        run.execute(&input)
        run.teardown()
    } catch {
        fatalError("cannot set up the device: \(error)")
    }
    iterations += 1
    if selftestLeak, let fd = try? EventFD.make() { _ = fd.take() }
    let fds = ownFDs()
    var threads = countEntries("/proc/self/task")
    // A joined thread can stay listed for a moment after pthread_join returns (the kernel clears
    // the joiner's futex before it reaps the task): give it up to 100 ms before calling it a leak.
    var waited = 0
    while let b = baseline, threads != b.threads, waited < 100 {
        usleep(1000)
        waited += 1
        threads = countEntries("/proc/self/task")
    }
    if let b = baseline {
        check(fds == b.fds, "fd leak (iteration \(iterations)): open after the input: \(fds); before the first: \(b.fds)")
        check(threads == b.threads, "thread leak: \(threads) threads after the input, \(b.threads) before the first: \(threadNames())")
    }
    return 0
}
