import CVDPAShims
import Glibc
import Platform
import Synchronization

/// The host side of `--mode tap-rx`: writes one frame into a TAP interface as fast as it can,
/// through a send-only packet socket bound to it (`cvdpa_packet_tx_socket`: no qdisc, straight to
/// tun's xmit, which queues the frame for the tap's reader, the device), 64 frames per sendmmsg.
/// The socket's send buffer is left at its default: when the tap's reader falls behind, frames
/// held in tun's queue fill it and the sender waits for the reader instead of spinning on drops
/// (tun drops, as `tx_dropped`, only when its own queue of 500 frames is full).
final class Blaster: @unchecked Sendable {
    // @unchecked Sendable: the buffers and the fd are used only by the blaster thread between
    // init and deinit (the owner joins the thread first); `stop` and `sent` are atomics, and
    // `failure` is read after the join.
    static let vectorLength = 64
    let fd: Int32
    let frame: UnsafeMutableRawBufferPointer
    let iov: UnsafeMutablePointer<iovec>
    let messages: UnsafeMutablePointer<cvdpa_mmsghdr>
    let stop = Atomic<Bool>(false)
    let sent = Atomic<UInt64>(0)
    let calls = Atomic<UInt64>(0)
    var failure: String?

    init(interface: String, frame bytes: [UInt8]) throws(SystemError) {
        let fd = cvdpa_packet_tx_socket(interface)
        guard fd >= 0 else { throw SystemError("packet socket on \(interface)", errno: cvdpa_errno()) }
        // A timeout on a blocked send, so that `stop` is seen even if the reader has stopped.
        var tv = timeval(tv_sec: 0, tv_usec: 100_000)
        guard setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size)) == 0 else {
            let e = cvdpa_errno()
            close(fd)
            throw SystemError("setsockopt(SO_SNDTIMEO) on the packet socket", errno: e)
        }
        self.fd = fd
        frame = .allocate(byteCount: bytes.count, alignment: 64)
        frame.copyBytes(from: bytes)
        // Allocated, not taken from withUnsafe... closures: the kernel reads these pointers at
        // every sendmmsg for the blaster's whole life.
        iov = .allocate(capacity: 1)
        iov.initialize(to: iovec(iov_base: frame.baseAddress, iov_len: bytes.count))
        messages = .allocate(capacity: Self.vectorLength)
        for i in 0..<Self.vectorLength {
            var m = cvdpa_mmsghdr()
            m.msg_hdr.msg_iov = iov
            m.msg_hdr.msg_iovlen = 1
            (messages + i).initialize(to: m)
        }
    }

    deinit {
        close(fd)
        frame.deallocate()
        iov.deallocate()
        messages.deallocate()
    }

    func loop() {
        var total: UInt64 = 0
        var n: UInt64 = 0
        while !stop.load(ordering: .relaxed) {
            let r = cvdpa_sendmmsg(fd, messages, UInt32(Self.vectorLength), 0)
            n &+= 1
            if r > 0 {
                total &+= UInt64(r)
                sent.store(total, ordering: .relaxed)
                calls.store(n, ordering: .relaxed)
                continue
            }
            let e = cvdpa_errno()
            // EAGAIN: the send timeout (the tap's reader is not reading); ENOBUFS: no memory for
            // an skb right now. Both are "try again".
            if r < 0 && (e == EINTR || e == EAGAIN || e == ENOBUFS) { continue }
            failure = "sendmmsg on the packet socket: \(r < 0 ? String(cString: strerror(e)) : "sent nothing")"
            return
        }
    }
}
