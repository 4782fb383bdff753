import Foundation
import Platform
import Synchronization
import VDPA
import VhostUser
import VhostUserFrontend
import Virtio

/// `--mode tap-tx` and `--mode tap-rx`: the bench plays a guest that negotiates VERSION_1,
/// MRG_RXBUF and the offloads (without the GUEST_* ones with `--no-guest-offloads`) against a
/// port on a `tap` link, and measures frames per second.
///
/// - tap-tx: the TX ring is kept full of frames (each one buffer: virtio-net header and frame),
///   completed chains reposted at once. The kernel takes each frame in tun's write and drops it
///   in ip_rcv as PACKET_OTHERHOST (the destination is not the TAP's address), so the figure is
///   the device's TX path plus the tap's write, not a network stack.
/// - tap-rx: the RX ring is kept full of 4 KiB buffers (mergeable: a frame may span several), and
///   a `Blaster` thread writes frames into the TAP from the host side; the device reads them
///   into the ring.
///
/// The TAP is brought up here (IPv6 off first, so the kernel sends nothing of its own; MTU
/// raised for frames above 1514 bytes); run it in a fresh network namespace so it has no
/// addresses and nothing else sees its frames (scripts/bench-tap-zerocopy).
struct TapBench {
    enum Direction: String { case tx = "tap-tx", rx = "tap-rx" }
    let direction: Direction
    let socket: String
    let control: String
    let tap: String
    let frameSize: Int
    let tso: Bool
    let seconds: Double
    let ringSize: UInt16
    let bufferSize: UInt32
    /// Whether the guest takes the GUEST_* offloads too (the HOST_* ones it always asks for).
    let guestOffloads: Bool

    var features: UInt64 {
        VirtioFeature.version1 | VirtioFeature.vhostUserProtocolFeatures | VirtioNetFeature.mrgRxbuf
            | (guestOffloads ? VirtioNetFeature.offloads : VirtioNetFeature.hostOffloads)
    }

    func run() throws -> [String: Any] {
        let (frame, header) = tso ? TapFrames.tso() : TapFrames.plain(size: frameSize)
        if tso && !TapFrames.partialChecksumCompletes(frame, header: header) {
            throw TapBenchError("the TSO frame's partial checksum does not complete to a valid one")
        }
        // A TSO frame is one large frame on the guest's side of a 1500-byte link.
        let mtu = tso ? 1500 : max(1500, frame.count - 14)
        try bringUp(mtu: mtu)

        let hdr = VirtioNetHeader.fullSize
        let slot = direction == .tx ? UInt64(hdr + frame.count + 4095) & ~4095 : UInt64(bufferSize)
        let bufferBase: UInt64 = 16 << 20
        let ramSize = (bufferBase + slot * UInt64(ringSize) + (2 << 20) - 1) & ~((2 << 20) - 1)
        let ram = try GuestRAM(baseGPA: 0, size: ramSize, name: "vdpa-bench-ram")
        let fe = try VhostUserFrontend(connectingTo: socket, timeout: .seconds(5), replyTimeout: .seconds(10))
        fe.ackPolicy = .always
        let negotiated = try fe.negotiate(features: features)
        guard negotiated.ackedFeatures & features == features else {
            throw TapBenchError("the port did not offer \(describeFeatures(features & ~negotiated.ackedFeatures))")
        }
        try fe.setMemTable([ram])
        let placed = try RingPlacement.layout(rings: 2, size: UInt32(ringSize), startGPA: 0, ringAlignment: 4096)
        func host(_ gpa: UInt64, _ n: UInt64) throws -> UnsafeMutableRawPointer { try ram.hostPointer(gpa: gpa, length: n) }
        var rings: [DriverSplitRing] = []
        for p in placed {
            rings.append(try DriverSplitRing(
                size: ringSize, eventIdx: false,
                descriptorTable: host(p.descGPA, RingPlacement.descTableBytes(size: p.size)), descriptorTableGPA: p.descGPA,
                avail: host(p.availGPA, RingPlacement.availRingBytes(size: p.size)), availGPA: p.availGPA,
                used: host(p.usedGPA, RingPlacement.usedRingBytes(size: p.size)), usedGPA: p.usedGPA))
        }
        let buffers = try host(bufferBase, slot * UInt64(ringSize))
        if direction == .tx {
            // Every TX buffer holds its own copy of the frame behind its header, as a guest's
            // distinct socket buffers would (the device reads a different 1.5 or 64 KB each time).
            for i in 0..<Int(ringSize) {
                let b = buffers + i * Int(slot)
                header.write(to: b, size: hdr)
                // Safety: each slot holds hdr + frame.count bytes (slot is rounded up from that).
                frame.withUnsafeBytes { (b + hdr).copyMemory(from: $0.baseAddress!, byteCount: frame.count) }
            }
        }
        for p in placed { _ = try fe.setupVring(p) }
        let ring = direction == .tx ? 1 : 0
        let driver = TapDriver(ring: rings[ring], kick: fe.kickFD(ring: UInt32(ring))!, call: fe.callFD(ring: UInt32(ring))!,
                               buffers: buffers, bufferBase: bufferBase, slot: slot,
                               chainLength: direction == .tx ? UInt32(hdr + frame.count) : bufferSize,
                               rx: direction == .rx, frameLength: frame.count)

        let before = try TapCounters.read(tap)
        let thread = try OSThread(name: "bench-driver") { driver.loop() }
        var blaster: Blaster?
        var blasterThread: OSThread?
        if direction == .rx {
            // Let the driver post its buffers first.
            MonotonicClock.sleep(seconds: 0.05)
            let b = try Blaster(interface: tap, frame: frame)
            blaster = b
            blasterThread = try OSThread(name: "bench-blaster") { b.loop() }
        }
        MonotonicClock.sleep(seconds: seconds)
        // The blaster first (it may wait on the tap's queue, which only the running device drains).
        blaster?.stop.store(true, ordering: .relaxed)
        blasterThread?.join()
        driver.stop.store(true, ordering: .relaxed)
        thread.join()
        let after = try TapCounters.read(tap)
        if let failure = driver.failure { throw TapBenchError("driver: \(failure)") }
        if let failure = blaster?.failure { throw TapBenchError("blaster: \(failure)") }

        var report: [String: Any] = ["mode": direction.rawValue, "frameSize": frame.count, "tso": tso,
                                     "ringSize": Int(ringSize), "seconds": seconds, "tap": tap,
                                     "features": describeFeatures(negotiated.ackedFeatures)]
        report["mtu"] = mtu
        if direction == .rx { report["bufferSize"] = Int(bufferSize) }
        // Per whole second of the run; the first second (start-up, ring fill) is left out of the median.
        let (frames, bytes) = driver.perMillis()
        var perSecond: [[String: Double]] = []
        var s = 0
        while (s + 1) * 1000 <= frames.count {
            let f = frames[(s * 1000)..<((s + 1) * 1000)].reduce(0, +)
            let b = bytes[(s * 1000)..<((s + 1) * 1000)].reduce(0, +)
            perSecond.append(["fps": Double(f), "gbps": Double(b) * 8 / 1e9])
            s += 1
        }
        report["perSecond"] = perSecond
        let steady = perSecond.count > 1 ? Array(perSecond.dropFirst()) : perSecond
        report["fps"] = median(steady.map { $0["fps"]! })
        report["gbps"] = median(steady.map { $0["gbps"]! })
        report["frames"] = frames.reduce(0, +)
        report["bytes"] = bytes.reduce(0, +)
        report["kernel"] = after.minus(before)
        if let b = blaster {
            report["blasterSent"] = b.sent.load(ordering: .relaxed)
            report["blasterCalls"] = b.calls.load(ordering: .relaxed)
        }
        // The device's own counts (packets, drops by reason) for the ring driven.
        do {
            let stats = try JSONDecoder().decode(DaemonStats.self, from: ControlClient.request("stats", controlPath: control))
            if let q = stats.ports.first?.queues.first(where: { $0.index == ring }) {
                report["device"] = ["packets": q.packets, "bytes": q.bytes, "drops": q.drops, "interrupts": q.interrupts,
                                    "doorbells": q.doorbells] as [String: Any]
            }
        } catch {
            FileHandle.standardError.write(Data("vdpa-bench: no statistics from \(control): \(error)\n".utf8))
            report["statsError"] = "\(error)"
        }
        fe.disconnect()
        return report
    }

    /// IPv6 off (no router solicitations or DAD frames of its own), MTU, up.
    func bringUp(mtu: Int) throws {
        let v6 = "/proc/sys/net/ipv6/conf/\(tap)/disable_ipv6"
        if FileManager.default.fileExists(atPath: v6) { try "1\n".write(toFile: v6, atomically: false, encoding: .utf8) }
        try Self.ip(["link", "set", "dev", tap, "mtu", "\(mtu)", "up"])
        let mac = try String(contentsOfFile: "/sys/class/net/\(tap)/address", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let ours = TapFrames.dst.map { String(format: "%02x", $0) }.joined(separator: ":")
        if mac == ours { throw TapBenchError("the TAP's address is the frames' destination \(ours): they would not be dropped early") }
    }

    static func ip(_ args: [String]) throws {
        try Command.run(["/usr/sbin/ip"] + args)
    }

    func median(_ v: [Double]) -> Double {
        guard !v.isEmpty else { return 0 }
        let s = v.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }
}

/// A tap mode's run failed (not a usage error: no usage text with it).
struct TapBenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The TAP's own counters (`ip -s -s -j link`): on the interface, RX is what the device wrote
/// to the tap (the guest's TX) and `otherhost` what ip_rcv dropped as not addressed to it; TX is
/// what the blaster handed to tun, `tx_dropped` what tun dropped with its queue full.
struct TapCounters {
    var values: [String: Int] = [:]

    static func read(_ tap: String) throws -> TapCounters {
        let data = Data(try Command.run(["/usr/sbin/ip", "-s", "-s", "-j", "link", "show", "dev", tap]))
        guard let list = try JSONSerialization.jsonObject(with: data) as? [[String: Any]],
              let stats = list.first?["stats64"] as? [String: Any] else {
            throw TapBenchError("no statistics for \(tap) from ip -j link")
        }
        var c = TapCounters()
        for dir in ["rx", "tx"] {
            for (k, v) in (stats[dir] as? [String: Any]) ?? [:] {
                if let n = v as? Int, ["packets", "bytes", "dropped", "errors", "otherhost"].contains(k) { c.values["\(dir)_\(k)"] = n }
            }
        }
        return c
    }

    func minus(_ o: TapCounters) -> [String: Int] {
        var d: [String: Int] = [:]
        for (k, v) in values { d[k] = v - (o.values[k] ?? 0) }
        return d
    }
}

/// The guest's driver for one ring of the tap modes, on its own thread: reposts every completed
/// chain at once (descriptor i always carries buffer i: a chain of one descriptor is reposted
/// right after it is taken back, so it gets the same descriptor), counts frames and bytes per
/// millisecond, kicks only when the device asks, and when nothing completes for 50 µs waits for
/// an interrupt (as a guest's NAPI does) instead of spinning on a core that the blaster or the
/// device may need.
final class TapDriver: @unchecked Sendable {
    // @unchecked Sendable: the ring and the counters are used only by the driver thread, except
    // `stop` (atomic), and the arrays and `failure`, read after the thread was joined.
    let ring: DriverSplitRing
    let kick: Int32
    let call: Int32
    let buffers: UnsafeMutableRawPointer
    let bufferBase: UInt64
    let slot: UInt64
    let chainLength: UInt32
    let rx: Bool
    let frameLength: Int
    let stop = Atomic<Bool>(false)
    let start = MonotonicClock.nanoseconds
    var failure: String?
    static let maxMillis = 600_000
    static let spinNanos: UInt64 = 50_000
    var frames = [Int](repeating: 0, count: maxMillis)
    var bytes = [Int](repeating: 0, count: maxMillis)
    var lastMillis = 0

    init(ring: DriverSplitRing, kick: Int32, call: Int32, buffers: UnsafeMutableRawPointer, bufferBase: UInt64,
         slot: UInt64, chainLength: UInt32, rx: Bool, frameLength: Int) {
        self.ring = ring
        self.kick = kick
        self.call = call
        self.buffers = buffers
        self.bufferBase = bufferBase
        self.slot = slot
        self.chainLength = chainLength
        self.rx = rx
        self.frameLength = frameLength
    }

    @inline(__always)
    func buffer(_ i: UInt16) -> DriverBuffer {
        DriverBuffer(gpa: bufferBase + UInt64(i) * slot, length: chainLength, isWritable: rx)
    }

    func loop() {
        ring.disableInterrupts()
        for i in 0..<ring.size {
            guard ring.addChain(CollectionOfOne(buffer(i))) == i else { failure = "descriptor \(i) was not the next free one"; return }
        }
        ring.publish()
        EventFD.signal(kick)
        let hdr = VirtioNetHeader.fullSize
        var remaining = 0  // buffers still to come of the current RX frame (num_buffers)
        var idleSince: UInt64 = 0
        while !stop.load(ordering: .relaxed) {
            var n = 0, f = 0, b = 0
            while true {
                let e: UsedElement?
                do { e = try ring.popUsed() } catch { failure = "\(error)"; return }
                guard let e else { break }
                n &+= 1
                let head = UInt16(truncatingIfNeeded: e.id)
                if rx {
                    let len = Int(e.length)
                    if remaining == 0 {
                        // Safety: buffer `head` lies in the mapped buffer area; the device wrote it
                        // before it published the used entry (acquire in popUsed).
                        let nb = Int(UInt16(littleEndian: (buffers + Int(head) * Int(slot))
                            .loadUnaligned(fromByteOffset: 10, as: UInt16.self)))
                        guard nb >= 1, len >= hdr + 14 else { failure = "RX frame in buffer \(head): num_buffers \(nb), length \(len)"; return }
                        remaining = nb
                        f &+= 1
                        b &+= len - hdr
                    } else {
                        b &+= len
                    }
                    remaining -= 1
                } else {
                    f &+= 1
                    b &+= frameLength
                }
                guard ring.addChain(CollectionOfOne(buffer(head))) == head else { failure = "descriptor \(head) was not reposted as itself"; return }
            }
            if n > 0 {
                ring.publish()
                if ring.kickNeeded() { EventFD.signal(kick) }
                let ms = Int((MonotonicClock.nanoseconds - start) / 1_000_000)
                if ms < Self.maxMillis {
                    frames[ms] &+= f
                    bytes[ms] &+= b
                }
                idleSince = 0
                continue
            }
            let now = MonotonicClock.nanoseconds
            if idleSince == 0 { idleSince = now; continue }
            if now - idleSince < Self.spinNanos { continue }
            // Interrupts on, then look again (a completion may have raced in), then sleep.
            if !ring.enableInterrupts() {
                do { _ = try Poll.waitReadable(call, until: Deadline(secondsFromNow: 0.05)) } catch {
                    failure = "poll on the call eventfd: \(error)"
                    return
                }
                _ = EventFD.drain(call)
            }
            ring.disableInterrupts()
            idleSince = 0
        }
        lastMillis = min(Self.maxMillis, Int((MonotonicClock.nanoseconds - start) / 1_000_000))
    }

    func perMillis() -> ([Int], [Int]) { (Array(frames[0..<lastMillis]), Array(bytes[0..<lastMillis])) }
}
