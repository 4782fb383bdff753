import CVDPAShims
import Glibc
import Logging
import Platform
import Virtio

/// The NIC's host side: where the frames the guest sends go, and where the frames it receives
/// come from. It owns the tap device, the wire rings and the traffic generator's state; the
/// engine moves frames between it and the rings (and loops them back itself for `loopback`).
/// Confined to the engine's thread, like the engine.
final class HostLink {
    enum Kind { case sink, source, loopback, tap, wire }
    let spec: LinkSpec
    let portID: String
    let kind: Kind
    let tap: TapDevice?
    /// Frames from the wire's peer, and the peer's inbound ring.
    let wireIn: FrameRing?
    let wireOut: FrameRing?
    var generator: TrafficGenerator
    /// Tap frames go between the guest's buffers and the kernel directly (writev, readv);
    /// false: through the device's buffer.
    var zeroCopy = false
    /// Applies the tap's header size and offloads off the engine's thread (see TapConfigurator).
    var tapConfig: TapConfigurator?

    init(_ spec: LinkSpec, portID: String, macOwn: UInt64, macGuest: UInt64, logger: Logger) throws {
        self.spec = spec
        self.portID = portID
        var tap: TapDevice?
        var wireIn: FrameRing?
        var wireOut: FrameRing?
        var frameSize = 0
        var rate: UInt64 = 0
        switch spec {
        case .sink:
            kind = .sink
        case .source(let size, let r):
            kind = .source
            frameSize = size
            rate = r
        case .loopback:
            kind = .loopback
        case .tap(let name, let z):
            kind = .tap
            zeroCopy = z
            // With a virtio-net header on every frame: the guest's offloads pass through, and the
            // kernel does the work for the other side (see `DMAEngine.applyFeatures`).
            let device = try TapDevice(name: name ?? String("vdpa-\(portID)".prefix(15)), vnetHeader: true)
            tapConfig = try TapConfigurator(tap: device, headerLength: VirtioNetHeader.fullSize, logger: logger)
            logger.info("tap link on interface \(device.name)")
            tap = device
        case .wire(let peer):
            kind = .wire
            wireIn = try WireHub.shared.inbound(for: portID)
            wireOut = try WireHub.shared.inbound(for: peer)
            try WireHub.shared.claim(peer: peer, sender: portID)
        }
        self.tap = tap
        self.wireIn = wireIn
        self.wireOut = wireOut
        generator = TrafficGenerator(frameSize: frameSize, rate: rate, dst: macGuest, src: macOwn)
    }

    deinit {
        if case .wire(let peer) = spec { WireHub.shared.release(peer: peer, sender: portID) }
        tapConfig?.stop()
    }

    /// Whether the link takes TX frames only to count them (sink and source).
    var consumesTX: Bool { kind == .sink || kind == .source }

    /// Hands a frame and its virtio-net header (`headerLength` bytes on the tap) to a tap or
    /// wire link. Returns false when the link refused it (the caller counts a link error); a
    /// wire's peer learns of it at `notifyPeer`.
    @inline(__always)
    func send(_ frame: UnsafeRawPointer, length: Int, header: VirtioNetHeader, headerLength: Int) -> Bool {
        switch kind {
        case .tap:
            guard let tap else { return false }
            var raw: (UInt64, UInt64) = (0, 0)
            return withUnsafeMutableBytes(of: &raw) { h -> Bool in
                // Safety: h is 16 bytes on the stack, headerLength <= 12; the frame has length bytes.
                header.write(to: h.baseAddress!, size: headerLength)
                var iov = (iovec(iov_base: h.baseAddress!, iov_len: headerLength),
                           iovec(iov_base: UnsafeMutableRawPointer(mutating: frame), iov_len: length))
                return withUnsafePointer(to: &iov) { p in
                    p.withMemoryRebound(to: iovec.self, capacity: 2) { tap.send(gathered: $0, count: 2, length: headerLength + length) }
                }
            }
        case .wire: return wireOut?.push(frame, length: length, header: header) ?? false
        case .sink, .source, .loopback: return true
        }
    }

    /// Wakes the wire's peer after a batch of `send`s.
    @inline(__always)
    func notifyPeer() {
        if let out = wireOut { EventFD.signal(out.wake.raw) }
    }

    /// Whether frames wait on the link for RX buffers (the engine then wants RX doorbells).
    var waitsForRXBuffers: Bool {
        switch kind {
        case .source: return true
        case .wire: return !(wireIn?.isEmpty ?? true)
        case .sink, .loopback, .tap: return false
        }
    }
}

/// The `source` link's frame generator: a template frame whose sequence field (epoch << 48 |
/// sequence) counts every frame it produced, and its rate limiter.
struct TrafficGenerator: ~Copyable {
    let frameSize: Int
    /// Frames per second; 0 = as fast as the guest posts buffers.
    let rate: UInt64
    /// Changes at every restart, so numbers never repeat across restarts of the generator.
    var epoch: UInt64 = 0
    var sequence: UInt64 = 0
    /// When the rate-limited generator started (0 = not yet), and frames produced since.
    var startNanos: UInt64 = 0
    var sent: UInt64 = 0
    /// Round-robin over the running RX rings.
    var nextRing = 0
    /// The frame (preallocated once, freed once in deinit: the generator cannot be copied).
    let template: UnsafeMutableRawPointer

    init(frameSize: Int, rate: UInt64, dst: UInt64, src: UInt64) {
        self.frameSize = frameSize
        self.rate = rate
        template = .allocate(byteCount: LinkSpec.maxFrame, alignment: 64)
        if frameSize > 0 { Frames.writeSource(to: template, size: frameSize, dst: dst, src: src, sequence: 0) }
    }

    deinit { template.deallocate() }

    /// A new run (the RX ring started): a new epoch, numbers from 0, the rate from now.
    mutating func restart() {
        epoch = (epoch &+ 1) & 0xFFFF
        sequence = 0
        startNanos = 0
        sent = 0
    }

    /// How many frames are due now (at most `limit`); 0 when the rate says wait.
    @inline(__always)
    mutating func due(limit: Int) -> Int {
        guard rate > 0 else { return limit }
        let now = cvdpa_monotonic_ns()
        if startNanos == 0 { startNanos = now }
        let due = UInt64(Double(now &- startNanos) * Double(rate) / 1e9)
        if due <= sent { return 0 }
        return Int(min(due - sent, UInt64(limit)))
    }

    /// Milliseconds until the next frame is due (at least 1, at most 1000; 1 before the first),
    /// or nil when it is due already; for a rate-limited generator only.
    func millisUntilNextFrame() -> Int32? {
        guard startNanos != 0 else { return 1 }
        let now = cvdpa_monotonic_ns()
        let dueAt = startNanos &+ UInt64(Double(sent &+ 1) * 1e9 / Double(rate))
        if dueAt <= now { return nil }
        return Int32(max(1, min(1000, (dueAt &- now) / 1_000_000)))
    }

    /// The next frame, its sequence field written.
    @inline(__always)
    func frame() -> UnsafeRawPointer {
        let seq = (epoch << 48) | (sequence & 0xFFFF_FFFF_FFFF)
        // Safety: the template holds maxFrame bytes; the field is at bytes 14..<22.
        template.storeBytes(of: seq.bigEndian, toByteOffset: 14, as: UInt64.self)
        return UnsafeRawPointer(template)
    }
}
