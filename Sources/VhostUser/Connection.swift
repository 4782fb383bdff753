import Platform

/// Reads framed vhost-user messages from a connected socket: the 12-byte header first (its fds
/// arrive with it), then exactly `size` body bytes, so fds never cross a message boundary.
public final class MessageReader {
    private let header = UnsafeMutableRawBufferPointer.allocate(byteCount: VhostUserHeader.size, alignment: 8)
    private let body = UnsafeMutableRawBufferPointer.allocate(byteCount: VhostUserHeader.maxPayload, alignment: 8)

    public init() {}
    deinit {
        header.deallocate()
        body.deallocate()
    }

    public enum ReadError: Error, CustomStringConvertible {
        case socket(SocketError)
        case invalid(VhostUserError)
        public var description: String {
            switch self {
            case .socket(let e): "\(e)"
            case .invalid(let e): "\(e)"
            }
        }
    }

    /// Reads and decodes one message; fds that came with it are added to `fds`.
    /// A decode failure leaves the fds in `fds` for the caller to drop (closing them).
    /// With a `deadline`, the whole message (header and body) must arrive by then, however the
    /// bytes trickle in, and `cancel` becoming readable ends the wait; without one, reads block.
    public func read(from socket: borrowing FileDescriptor, fds: inout ReceivedFDs,
                     deadline: Deadline? = nil, cancel: Int32? = nil) throws(ReadError) -> VhostUserMessage {
        func receive(_ into: UnsafeMutableRawBufferPointer, done: Int, total: Int?,
                     fds: inout ReceivedFDs) throws(SocketError) {
            if let deadline {
                try UnixSocket.receiveExactly(socket, into: into, fds: &fds, deadline: deadline, cancel: cancel, done: done, total: total)
            } else {
                try UnixSocket.receiveExactly(socket, into: into, fds: &fds)
            }
        }
        do {
            try receive(header, done: 0, total: nil, fds: &fds)
        } catch { throw .socket(error) }
        let request: VhostUserRequest
        let h: VhostUserHeader
        do { (request, h) = try VhostUserCodec.decodeHeader(UnsafeRawBufferPointer(header)) } catch { throw .invalid(error) }
        let bodySlice = UnsafeMutableRawBufferPointer(rebasing: body[0..<Int(h.size)])
        if h.size > 0 {
            do { try receive(bodySlice, done: VhostUserHeader.size, total: VhostUserHeader.size + Int(h.size), fds: &fds) } catch {
                if case .closed = error {
                    throw .invalid(VhostUserError(.body, request.name, field: "size", "connection closed inside a \(h.size)-byte body"))
                }
                throw .socket(error)
            }
        }
        do {
            let payload = try VhostUserCodec.decodeBody(request, header: h, body: UnsafeRawBufferPointer(bodySlice), fdCount: fds.count)
            return VhostUserMessage(request: request, header: h, payload: payload)
        } catch { throw .invalid(error) }
    }
}
