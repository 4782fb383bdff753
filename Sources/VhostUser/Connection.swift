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
    public func read(from socket: borrowing FileDescriptor, fds: inout ReceivedFDs) throws(ReadError) -> VhostUserMessage {
        do {
            try UnixSocket.receiveExactly(socket, into: header, fds: &fds)
        } catch { throw .socket(error) }
        let request: VhostUserRequest
        let h: VhostUserHeader
        do { (request, h) = try VhostUserCodec.decodeHeader(UnsafeRawBufferPointer(header)) } catch { throw .invalid(error) }
        let bodySlice = UnsafeMutableRawBufferPointer(rebasing: body[0..<Int(h.size)])
        if h.size > 0 {
            do { try UnixSocket.receiveExactly(socket, into: bodySlice, fds: &fds) } catch {
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
