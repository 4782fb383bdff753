import ArgumentParser
import Foundation
import VDPA

@main
struct Vdpactl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdpactl", abstract: "Query a running vdpad.", subcommands: [Status.self, Stats.self])

    @OptionGroup var options: Options

    struct Options: ParsableArguments {
        @Option(help: "Control socket path.")
        var control: String = "/run/vdpad/control.sock"

        /// Sends one command; prints the raw JSON with `json`, otherwise decodes it as `T`.
        func fetch<T: Decodable>(_ command: String, as: T.Type, json: Bool) throws -> T? {
            let data: Data
            do { data = try ControlClient.request(command, controlPath: control) } catch {
                FileHandle.standardError.write(Data("vdpactl: cannot reach vdpad at \(control): \(error)\n".utf8))
                throw ExitCode(1)
            }
            if json {
                print(String(decoding: data, as: UTF8.self))
                return nil
            }
            do { return try JSONDecoder().decode(T.self, from: data) } catch {
                FileHandle.standardError.write(Data("vdpactl: unexpected reply (\(error)): \(String(decoding: data, as: UTF8.self))\n".utf8))
                throw ExitCode(1)
            }
        }
    }

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show per-queue counters: packets, bytes, drops, faults, mode.")
        @OptionGroup var options: Options
        @Flag(help: "Print the daemon's JSON reply.")
        var json = false

        func run() throws {
            guard let stats = try options.fetch("stats", as: DaemonStats.self, json: json) else { return }
            for p in stats.ports {
                print("\(p.id)  \(p.device)")
                for q in p.queues {
                    let drops = q.drops.filter { $0.value > 0 }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
                    print("  queue \(q.index) \(q.direction) \(q.mode): \(q.packets) packets \(q.bytes) bytes" +
                          (drops.isEmpty ? "" : " drops: \(drops)") + (q.faults > 0 ? " faults \(q.faults): \(q.error ?? "")" : ""))
                }
            }
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show each port: connection, features, memory, queues.")
        @OptionGroup var options: Options
        @Flag(help: "Print the daemon's JSON reply.")
        var json = false

        func run() throws {
            guard let status = try options.fetch("status", as: DaemonStatus.self, json: json) else { return }
            for p in status.ports {
                print("\(p.id)  \(p.role) \(p.socket)  \(p.connection)")
                print("  device: \(p.device)")
                if let d = p.deviceDetails {
                    var line = "  \(d.driver)"
                    if let v = d.path { line += " \(v)" }
                    if let v = d.deviceFeatures { line += " features \(v)" }
                    if let v = d.negotiatedFeatures { line += " negotiated \(v)" }
                    if let v = d.backendFeatures { line += " backend [\(v.joined(separator: " "))]" }
                    if let v = d.switchover { line += " switchover \(v)" }
                    if let v = d.status { line += " status 0x\(String(v, radix: 16))" }
                    print(line)
                    for r in d.rings ?? [] {
                        print("  device ring \(r.index): size \(r.size) base \(r.base) enabled \(r.enabled) used at \(r.usedIOVA)")
                    }
                }
                print("  features: \(p.features.acked) [\(p.features.ackedNames)] of \(p.features.offered)")
                if let names = p.features.offeredNames { print("  features offered: [\(names)]") }
                if let limit = p.features.limit { print("  features limited by: \(limit)") }
                print("  protocol: \(p.protocolFeatures.acked) [\(p.protocolFeatures.ackedNames)] of \(p.protocolFeatures.offered)")
                if let names = p.protocolFeatures.offeredNames { print("  protocol offered: [\(names)]") }
                for r in p.memoryRegions { print("  region gpa \(r.guestPhysAddr) size \(r.size) uva \(r.userAddr)") }
                for q in p.queues where q.ringSize > 0 || q.enabled || q.started {
                    print("  queue \(q.index): size \(q.ringSize) enabled \(q.enabled) started \(q.started) mode \(q.mode)")
                }
                if let e = p.lastError { print("  last error: \(e)") }
            }
        }
    }
}
