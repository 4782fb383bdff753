// vdpa-bench: a fast RX driver for benchmarks of the direct path and the migration relay.
// It plays the guest against a running vdpad port on a `source` link: keeps the RX ring full,
// polls the used ring, and records completions per millisecond and the gaps between them.
// Optionally it turns dirty logging on (as QEMU does when a migration starts) and off again.
// `--mode tap-tx` and `--mode tap-rx` play a guest against a port on a `tap` link instead
// (TapBench.swift).
import ArgumentParser
import Foundation
import Platform
import Synchronization
import VDPA
import VhostUser
import VhostUserFrontend
import Virtio

// Not @main on the type: the target has more files than this one, so main.swift is the entry point.
VdpaBench.main()

struct VdpaBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdpa-bench",
        abstract: "Fast RX driver for a vdpad port on a source link: throughput, relay cost, switchover gap; TX and RX throughput of a port on a tap link.")

    @Option(help: "The port's vhost-user socket.") var socket: String
    @Option(help: "The daemon's control socket (for relay statistics).") var control: String
    @Option(help: "direct | relay | switch (direct, then logging on, then off) | tap-tx | tap-rx (a port on a tap link).") var mode: String = "direct"
    @Option(help: "Seconds per phase.") var seconds: Double = 3
    @Option(help: "Ring size.") var ringSize: UInt16 = 1024
    @Option(help: "Write the per-millisecond completion counts here (CSV: ms,completions,phase).") var timeline: String?
    @Option(help: "tap-tx, tap-rx: the port's TAP interface (brought up here).") var tap: String?
    @Option(help: "tap-tx, tap-rx: frame size in bytes (Ethernet header included, virtio-net header not).") var frameSize: Int = 1500
    @Flag(help: "tap-tx: TCP/IPv4 frames of 63778 bytes with a TSO header (gso_size 1448), instead of --frame-size.") var tso = false
    @Option(help: "tap-rx: bytes per RX buffer (buffers are mergeable).") var bufferSize: UInt32 = 4096
    @Flag(inversion: .prefixedNo, help: "tap-tx, tap-rx: negotiate the GUEST_* offloads (then the tap may hand over 64 KB frames, so the device's zero-copy RX reads span enough posted buffers for one: 17 of 4 KiB; without them 9018 bytes: 3).")
    var guestOffloads = true

    func run() throws {
        if mode == "tap-tx" || mode == "tap-rx" {
            guard let tap else { throw ValidationError("--mode \(mode) needs --tap IFNAME") }
            guard (42...9018).contains(frameSize) else { throw ValidationError("--frame-size must be 42...9018") }
            guard bufferSize >= 64 && bufferSize % 64 == 0 else { throw ValidationError("--buffer-size must be a multiple of 64") }
            if tso && mode != "tap-tx" { throw ValidationError("--tso is for --mode tap-tx") }
            let report = try TapBench(direction: mode == "tap-tx" ? .tx : .rx, socket: socket, control: control, tap: tap,
                                      frameSize: frameSize, tso: tso, seconds: seconds, ringSize: ringSize,
                                      bufferSize: bufferSize, guestOffloads: guestOffloads).run()
            let data = try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        let ramSize: UInt64 = 64 << 20
        let ram = try GuestRAM(baseGPA: 0, size: ramSize, name: "vdpa-bench-ram")
        let fe = try VhostUserFrontend(connectingTo: socket, timeout: .seconds(5), replyTimeout: .seconds(10))
        fe.ackPolicy = .always
        _ = try fe.negotiate(features: VirtioFeature.version1 | VirtioFeature.vhostUserProtocolFeatures)
        try fe.setMemTable([ram])
        let placed = try RingPlacement.layout(rings: 2, size: UInt32(ringSize), startGPA: 0, ringAlignment: 4096)
        func host(_ gpa: UInt64, _ n: UInt64) throws -> UnsafeMutableRawPointer { try ram.hostPointer(gpa: gpa, length: n) }
        let p0 = placed[0]
        let rx = try DriverSplitRing(size: ringSize, eventIdx: false,
                                     descriptorTable: host(p0.descGPA, RingPlacement.descTableBytes(size: p0.size)), descriptorTableGPA: p0.descGPA,
                                     avail: host(p0.availGPA, RingPlacement.availRingBytes(size: p0.size)), availGPA: p0.availGPA,
                                     used: host(p0.usedGPA, RingPlacement.usedRingBytes(size: p0.size)), usedGPA: p0.usedGPA)
        let p1 = placed[1]
        _ = try DriverSplitRing(size: ringSize, eventIdx: false,
                                descriptorTable: host(p1.descGPA, RingPlacement.descTableBytes(size: p1.size)), descriptorTableGPA: p1.descGPA,
                                avail: host(p1.availGPA, RingPlacement.availRingBytes(size: p1.size)), availGPA: p1.availGPA,
                                used: host(p1.usedGPA, RingPlacement.usedRingBytes(size: p1.size)), usedGPA: p1.usedGPA)
        _ = try fe.setupVring(p0)
        _ = try fe.setupVring(p1)
        let kick = fe.kickFD(ring: 0)!
        // One 2 KiB buffer per descriptor, above the rings.
        let bufferBase: UInt64 = 16 << 20
        let driver = Driver(ring: rx, kick: kick, bufferBase: bufferBase, size: ringSize)

        let phases: [(String, Bool?)]
        switch mode {
        case "direct": phases = [("direct", nil)]
        case "relay": phases = [("relay", true)]
        case "switch": phases = [("direct", nil), ("relay", true), ("direct", false)]
        default: throw ValidationError("unknown --mode \(mode)")
        }
        let thread = try OSThread(name: "bench-driver") { driver.loop() }
        var marks: [(String, Int)] = []
        for (name, logging) in phases {
            if let on = logging {
                let t = driver.elapsedMillis()
                if on { _ = try fe.enableLogging(requireU64Reply: true) } else { try fe.disableLogging() }
                marks.append(("\(name)@\(t)ms", t))
            } else {
                marks.append((name, driver.elapsedMillis()))
            }
            MonotonicClock.sleep(seconds: seconds)
        }
        driver.stop.store(true, ordering: .relaxed)
        thread.join()
        if let failure = driver.failure { throw ValidationError("the device returned a bad used element: \(failure)") }

        var report: [String: Any] = [:]
        // Relay statistics are extra figures: without them the run still reports its rates, and says why they are missing.
        var stats: DaemonStats?
        do {
            stats = try JSONDecoder().decode(DaemonStats.self, from: ControlClient.request("stats", controlPath: control))
        } catch {
            FileHandle.standardError.write(Data("vdpa-bench: no relay statistics from \(control): \(error)\n".utf8))
            report["statsError"] = "\(error)"
        }
        let counts = driver.counts()
        // Per phase: median rate over whole milliseconds, skipping the first and last 100 ms.
        var phaseStarts = marks.map(\.1) + [counts.count]
        phaseStarts[0] = 0
        for (i, m) in marks.enumerated() {
            let a = phaseStarts[i] + 100, b = phaseStarts[i + 1] - 100
            guard b > a else { continue }
            let total = counts[a..<b].reduce(0, +)
            let mpps = Double(total) / Double(b - a) / 1000
            report["phase\(i)_\(m.0.split(separator: "@")[0])_mpps"] = mpps
        }
        // Steady interval and the longest gap around each switch (±50 ms).
        let gaps = driver.gapsAround(marks.dropFirst().map(\.1), windowMillis: 50)
        report["steadyIntervalNanos"] = driver.steadyIntervalNanos()
        report["switchGapsMicros"] = gaps.map { Double($0) / 1000 }
        if let s = stats, let q = s.ports.first?.queues.first {
            report["relayed"] = q.relayed
            report["pagesMarked"] = q.pagesMarked
            report["switchovers"] = q.switchovers
            report["lastSwitchoverGapMicros"] = q.lastSwitchoverGapMicros
            if let r = s.ports.first?.relay {
                report["relayLoop"] = r.loop
                report["relayBusyNanosPerElement"] = r.busyNanosPerElement
                report["relayCPUMillis"] = r.cpuMillis
            }
        }
        if let timeline {
            var csv = "ms,completions\n"
            for (i, c) in counts.enumerated() { csv += "\(i),\(c)\n" }
            csv += marks.map { "# \($0.0) at \($0.1) ms" }.joined(separator: "\n") + "\n"
            try csv.write(toFile: timeline, atomically: true, encoding: .utf8)
        }
        let data = try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys])
        print(String(decoding: data, as: UTF8.self))
        fe.disconnect()
    }
}

/// The polling RX driver: reposts every completed buffer at once, kicks only when the device
/// asks (VRING_USED_F_NO_NOTIFY clear), and timestamps completions. Runs on its own thread.
final class Driver: @unchecked Sendable {
    // @unchecked Sendable: the ring and counters are used only by the driver thread, except
    // `stop` (atomic) and the arrays and `failure` read after the thread was joined.
    let ring: DriverSplitRing
    let kick: Int32
    let bufferBase: UInt64
    let size: UInt16
    let stop = Atomic<Bool>(false)
    let start = MonotonicClock.nanoseconds
    /// Why the loop stopped early: the device returned a used element that names no chain in flight.
    var failure: SplitRingError?
    static let maxMillis = 60_000
    var perMillis = [Int](repeating: 0, count: maxMillis)
    /// Completion timestamps (ns since start), one per batch the driver saw, bounded.
    var stamps = [UInt64](repeating: 0, count: 4_000_000)
    var stampCount = 0

    init(ring: DriverSplitRing, kick: Int32, bufferBase: UInt64, size: UInt16) {
        self.ring = ring
        self.kick = kick
        self.bufferBase = bufferBase
        self.size = size
    }

    func elapsedMillis() -> Int { Int((MonotonicClock.nanoseconds - start) / 1_000_000) }

    func loop() {
        var buffers: [DriverBuffer] = [DriverBuffer(gpa: 0, length: 2048, isWritable: true)]
        var slot: UInt64 = 0
        func post() {
            var posted = false
            while ring.freeCount > 0 {
                buffers[0] = DriverBuffer(gpa: bufferBase + (slot % UInt64(size) * 2) * 2048, length: 2048, isWritable: true)
                slot &+= 1
                _ = ring.addChain(buffers)
                posted = true
            }
            if posted {
                ring.publish()
                if ring.kickNeeded() { EventFD.signal(kick) }
            }
        }
        post()
        while !stop.load(ordering: .relaxed) {
            var n = 0
            do {
                while try ring.popUsed() != nil { n += 1 }
            } catch {
                failure = error
                return
            }
            if n > 0 {
                let t = MonotonicClock.nanoseconds - start
                let ms = Int(t / 1_000_000)
                if ms < Self.maxMillis { perMillis[ms] += n }
                if stampCount < stamps.count { stamps[stampCount] = t; stampCount += 1 }
                post()
            }
        }
    }

    func counts() -> [Int] {
        let last = min(Self.maxMillis, elapsedMillis())
        return Array(perMillis[0..<last])
    }

    /// The median interval between completion batches over the whole run.
    func steadyIntervalNanos() -> UInt64 {
        guard stampCount > 2 else { return 0 }
        var d = (1..<stampCount).map { stamps[$0] - stamps[$0 - 1] }
        d.sort()
        return d[d.count / 2]
    }

    /// The longest interval between completion batches within ±window of each switch time.
    func gapsAround(_ switches: [Int], windowMillis: Int) -> [UInt64] {
        switches.map { ms in
            let lo = UInt64(max(0, ms - windowMillis)) * 1_000_000, hi = UInt64(ms + windowMillis) * 1_000_000
            var worst: UInt64 = 0
            var i = 1
            while i < stampCount {
                if stamps[i] >= lo && stamps[i - 1] <= hi { worst = max(worst, stamps[i] - stamps[i - 1]) }
                i += 1
            }
            return worst
        }
    }
}
