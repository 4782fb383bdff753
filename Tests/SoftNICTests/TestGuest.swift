#if canImport(Glibc)
import Glibc
#endif
import Foundation
import VhostUserFrontend
import Virtio
import XCTest

/// One frame as the guest found it in its RX ring.
struct ReceivedFrame {
    /// The 12-byte virtio-net header.
    var header: [UInt8]
    /// The frame after the header (concatenated over all buffers it used).
    var frame: [UInt8]
    /// The used elements the frame took (more than one only with MRG_RXBUF).
    var elements: [UsedElement]
    /// num_buffers as the device wrote it in the header (little endian, bytes 10...11).
    var numBuffers: UInt16 { UInt16(header[10]) | UInt16(header[11]) << 8 }
}

/// How a TX frame is laid out in descriptors.
enum TXLayout {
    /// One readable descriptor: header then frame.
    case single
    /// Two readable descriptors: the header alone, then the frame.
    case split
    /// One INDIRECT descriptor whose table holds the header and the frame as two entries.
    case indirect
}

/// A test guest: memfd RAM, a vhost-user frontend, and driver-side split rings.
final class TestGuest {
    let frontend: VhostUserFrontend
    let ram: [GuestRAM]
    let features: UInt64
    var eventIdx: Bool { features & Features.eventIdx != 0 }
    var mergeable: Bool { features & Features.mrg != 0 }
    private(set) var rings: [UInt32: DriverSplitRing] = [:]
    private(set) var placed: [UInt32: PlacedRing] = [:]
    /// Buffers of each chain in flight, by ring and head.
    private var inFlight: [UInt32: [UInt16: [DriverBuffer]]] = [:]
    /// Bump allocators: the next free GPA of each region.
    private var next: [UInt64]
    /// Per ring: a wrapping arena for buffers (region, start, size, cursor).
    private var arenas: [UInt32: (start: UInt64, size: UInt64, cursor: UInt64)] = [:]
    static let arenaSize: UInt64 = 4 << 20

    init(path: String, features: UInt64, regions: [(base: UInt64, size: UInt64)]) throws {
        frontend = try VhostUserFrontend(connectingTo: path, timeout: .seconds(5), replyTimeout: .seconds(5))
        // Every request waits for the backend's acknowledgement: when a call returns, the port
        // (and through it the device) has applied it.
        frontend.ackPolicy = .always
        // Unique names: tests find the daemon's mappings of this RAM in /proc/self/maps by name.
        let tag = UInt32.random(in: 0...UInt32.max)
        ram = try regions.enumerated().map { i, r in try GuestRAM(baseGPA: r.base, size: r.size, name: "softnic-test-ram\(i)-\(tag)") }
        next = ram.map(\.baseGPA)
        let n = try frontend.negotiate(features: features)
        XCTAssertEqual(n.ackedFeatures, features, "the SoftNIC should accept every feature the test asks for")
        self.features = n.ackedFeatures
        try frontend.setMemTable(ram)
    }

    // MARK: memory

    /// Allocates `bytes` in region `region` (never freed).
    func alloc(_ bytes: UInt64, region: Int = 0, align: UInt64 = 64) -> UInt64 {
        let gpa = (next[region] + align - 1) / align * align
        precondition(gpa + bytes <= ram[region].endGPA, "test guest RAM region \(region) exhausted")
        next[region] = gpa + bytes
        return gpa
    }

    func host(_ gpa: UInt64, _ length: Int) -> UnsafeMutableRawPointer {
        try! ram.region(containing: gpa, length: UInt64(length))!.hostPointer(gpa: gpa, length: UInt64(length))
    }

    func write(_ bytes: [UInt8], at gpa: UInt64) { try! ram.write(bytes, at: gpa) }
    func read(_ gpa: UInt64, _ count: Int) -> [UInt8] { try! ram.read(at: gpa, count: count) }

    /// A buffer from the ring's wrapping arena. In-order completion and at most a ring's worth
    /// of chains in flight keep a slot from being reused while the device may still touch it.
    func arenaBuffer(ring: UInt32, _ bytes: UInt64) -> UInt64 {
        var a = arenas[ring]!
        var gpa = (a.cursor + 63) / 64 * 64
        if gpa + bytes > a.start + a.size { gpa = a.start }
        a.cursor = gpa + bytes
        arenas[ring] = a
        return gpa
    }

    // MARK: rings

    /// Lays out ring `index` in region `region`, zeroes it (used.idx = 0 = base), and sets it up
    /// over vhost-user (NUM, BASE, ADDR, KICK, CALL, ENABLE).
    @discardableResult
    func startRing(_ index: UInt32, size: UInt16 = 256, region: Int = 0, eventIdx: Bool? = nil, enable: Bool = true) throws -> DriverSplitRing {
        let total = RingPlacement.usedRingBytes(size: UInt32(size)) + RingPlacement.descTableBytes(size: UInt32(size))
            + RingPlacement.availRingBytes(size: UInt32(size)) + 64
        let start = alloc(total, region: region, align: 4096)
        let p = try RingPlacement.layout(rings: 1, size: UInt32(size), startGPA: start, firstIndex: index, ringAlignment: 4096)[0]
        if arenas[index] == nil {
            let arena = alloc(Self.arenaSize, region: region, align: 4096)
            arenas[index] = (arena, Self.arenaSize, arena)
        }
        let r = try DriverSplitRing(size: size, eventIdx: eventIdx ?? self.eventIdx,
                                    descriptorTable: host(p.descGPA, Int(RingPlacement.descTableBytes(size: UInt32(size)))),
                                    descriptorTableGPA: p.descGPA,
                                    avail: host(p.availGPA, Int(RingPlacement.availRingBytes(size: UInt32(size)))), availGPA: p.availGPA,
                                    used: host(p.usedGPA, Int(RingPlacement.usedRingBytes(size: UInt32(size)))), usedGPA: p.usedGPA)
        try frontend.setupVring(p, base: 0, enable: enable)
        rings[index] = r
        placed[index] = p
        inFlight[index] = [:]
        return r
    }

    /// GET_VRING_BASE.
    func stopRing(_ index: UInt32) throws -> UInt32 {
        try frontend.getVringBase(index: index)
    }

    func ring(_ index: UInt32) -> DriverSplitRing { rings[index]! }

    func kick(_ index: UInt32) { frontend.kick(ring: index) }

    var callFDs: [UInt32: Int32] { frontend.rings.mapValues(\.callFD) }

    /// Adds a chain, remembering its buffers; publishes but does not kick.
    @discardableResult
    func add(_ buffers: [DriverBuffer], ring index: UInt32) -> UInt16 {
        let head = ring(index).addChain(buffers)!
        inFlight[index]![head] = buffers
        return head
    }

    /// Makes `head` available on ring `index` as it is, bypassing the free list (a hand-made
    /// chain, or an index no chain has), publishes and kicks.
    func offerHead(_ head: UInt16, ring index: UInt32) {
        ring(index).pushAvailHead(head)
        ring(index).publish()
        kick(index)
    }

    // MARK: RX

    /// Posts `count` device-writable buffers of `size` bytes each (one descriptor per chain),
    /// publishes them and kicks. Returns the heads.
    @discardableResult
    func postRX(count: Int, size: UInt32 = 2048, ring index: UInt32 = 0, publish: Bool = true, kick: Bool = true) -> [UInt16] {
        var heads: [UInt16] = []
        for _ in 0..<count {
            let gpa = arenaBuffer(ring: index, UInt64(size))
            host(gpa, Int(size)).initializeMemory(as: UInt8.self, repeating: 0xEE, count: Int(size))
            heads.append(add([DriverBuffer(gpa: gpa, length: size, isWritable: true)], ring: index))
        }
        if publish { ring(index).publish() }
        if publish && kick { self.kick(index) }
        return heads
    }

    /// Pops used elements until `count` were collected or `timeout` passed (then fails).
    func waitUsed(ring index: UInt32, count: Int, timeout: Double = 5, file: StaticString = #filePath,
                  line: UInt = #line) -> [UsedElement] {
        var out: [UsedElement] = []
        let r = ring(index)
        var bad: Error?
        waitUntil(timeout) {
            do {
                while out.count < count, let e = try r.popUsed() { out.append(e) }
            } catch {
                bad = error
                return true
            }
            return out.count >= count
        }
        if let bad { XCTFail("ring \(index): the device returned a bad used element: \(bad)", file: file, line: line) }
        XCTAssertEqual(out.count, count, "ring \(index): timed out waiting for used elements", file: file, line: line)
        return out
    }

    /// The bytes the device wrote into a used chain (`length` bytes over its writable buffers).
    func bytes(of e: UsedElement, ring index: UInt32, consume: Bool = true) -> [UInt8] {
        guard let buffers = inFlight[index]?[UInt16(e.id)] else {
            XCTFail("used id \(e.id) was not in flight on ring \(index)")
            return []
        }
        if consume { inFlight[index]![UInt16(e.id)] = nil }
        var out: [UInt8] = []
        var left = Int(e.length)
        for b in buffers where b.isWritable && left > 0 {
            let n = min(left, Int(b.length))
            out += read(b.gpa, n)
            left -= n
        }
        return out
    }

    /// Collects `count` frames from RX ring `index`. With MRG_RXBUF a frame takes num_buffers
    /// used elements; without it, exactly one.
    func receive(_ count: Int, ring index: UInt32 = 0, timeout: Double = 5, file: StaticString = #filePath,
                 line: UInt = #line) -> [ReceivedFrame] {
        var frames: [ReceivedFrame] = []
        let r = ring(index)
        let deadline = Date().addingTimeInterval(timeout)
        var pending: [UsedElement] = []
        while frames.count < count && Date() < deadline {
            do {
                while let e = try r.popUsed() { pending.append(e) }
            } catch {
                XCTFail("ring \(index): the device returned a bad used element: \(error)", file: file, line: line)
                return frames
            }
            while frames.count < count, let first = pending.first {
                let firstBytes = bytes(of: first, ring: index, consume: false)
                guard firstBytes.count >= netHeaderLength else {
                    XCTFail("RX used element \(first) shorter than the virtio-net header", file: file, line: line)
                    return frames
                }
                let header = Array(firstBytes[0..<netHeaderLength])
                let nb = Int(UInt16(header[10]) | UInt16(header[11]) << 8)
                let need = mergeable ? max(nb, 1) : 1
                if pending.count < need { break }  // the rest of a merged frame is not published yet
                var payload = Array(firstBytes[netHeaderLength...])
                _ = bytes(of: first, ring: index)
                for e in pending[1..<need] { payload += bytes(of: e, ring: index) }
                frames.append(ReceivedFrame(header: header, frame: payload, elements: Array(pending[0..<need])))
                pending.removeFirst(need)
            }
            if frames.count < count { usleep(200) }
        }
        XCTAssertEqual(frames.count, count, "ring \(index): timed out waiting for RX frames", file: file, line: line)
        XCTAssertTrue(pending.isEmpty, "ring \(index): \(pending.count) used element(s) left over", file: file, line: line)
        return frames
    }

    // MARK: TX

    /// Queues frames (each behind a zeroed 12-byte virtio-net header) on TX ring `index`,
    /// publishes and kicks. Returns the heads.
    @discardableResult
    func send(_ frames: [[UInt8]], ring index: UInt32 = 1, layout: TXLayout = .single, kick: Bool = true,
              headers: [[UInt8]]? = nil) -> [UInt16] {
        var heads: [UInt16] = []
        for (i, f) in frames.enumerated() {
            let header = headers?[i] ?? [UInt8](repeating: 0, count: netHeaderLength)
            switch layout {
            case .single:
                let gpa = arenaBuffer(ring: index, UInt64(netHeaderLength + f.count))
                write(header + f, at: gpa)
                heads.append(add([DriverBuffer(gpa: gpa, length: UInt32(netHeaderLength + f.count), isWritable: false)], ring: index))
            case .split:
                let h = arenaBuffer(ring: index, UInt64(netHeaderLength))
                let d = arenaBuffer(ring: index, UInt64(max(f.count, 1)))
                write(header, at: h)
                write(f, at: d)
                heads.append(add([DriverBuffer(gpa: h, length: UInt32(netHeaderLength), isWritable: false),
                                  DriverBuffer(gpa: d, length: UInt32(f.count), isWritable: false)], ring: index))
            case .indirect:
                let h = arenaBuffer(ring: index, UInt64(netHeaderLength))
                let d = arenaBuffer(ring: index, UInt64(max(f.count, 1)))
                let table = arenaBuffer(ring: index, 32)
                write(header, at: h)
                write(f, at: d)
                let bufs = [DriverBuffer(gpa: h, length: UInt32(netHeaderLength), isWritable: false),
                            DriverBuffer(gpa: d, length: UInt32(f.count), isWritable: false)]
                let head = ring(index).addIndirectChain(bufs, table: host(table, 32), tableGPA: table)!
                inFlight[index]![head] = bufs
                heads.append(head)
            }
        }
        ring(index).publish()
        if kick { self.kick(index) }
        return heads
    }

    /// Sends frames and waits until the device has completed all of them.
    func sendAndComplete(_ frames: [[UInt8]], ring index: UInt32 = 1, layout: TXLayout = .single, headers: [[UInt8]]? = nil,
                         file: StaticString = #filePath, line: UInt = #line) {
        send(frames, ring: index, layout: layout, headers: headers)
        let used = waitUsed(ring: index, count: frames.count, file: file, line: line)
        for e in used { _ = inFlight[index]?.removeValue(forKey: UInt16(e.id)) }
    }

    /// used.idx of ring `index` as the device last published it.
    func usedIndex(_ index: UInt32) -> UInt16 { ring(index).loadUsedIndex() }

    /// The whole used area (flags, idx, ring, avail_event) of ring `index`.
    func usedArea(_ index: UInt32) -> [UInt8] {
        let p = placed[index]!
        return read(p.usedGPA, Int(RingPlacement.usedRingBytes(size: p.size)))
    }
}
