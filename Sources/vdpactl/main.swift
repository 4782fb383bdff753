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
    }

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show per-queue counters: packets, bytes, drops, faults, mode.")
        @OptionGroup var options: Options
        @Flag(help: "Print the daemon's JSON reply.")
        var json = false

        func run() throws {
            let data: Data
            do { data = try ControlClient.request("stats", controlPath: options.control) } catch {
                FileHandle.standardError.write(Data("vdpactl: cannot reach vdpad at \(options.control): \(error)\n".utf8))
                throw ExitCode(1)
            }
            if json {
                print(String(decoding: data, as: UTF8.self))
                return
            }
            guard let stats = try? JSONDecoder().decode(DaemonStats.self, from: data) else {
                FileHandle.standardError.write(Data("vdpactl: unexpected reply: \(String(decoding: data, as: UTF8.self))\n".utf8))
                throw ExitCode(1)
            }
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
            let data: Data
            do { data = try ControlClient.request("status", controlPath: options.control) } catch {
                FileHandle.standardError.write(Data("vdpactl: cannot reach vdpad at \(options.control): \(error)\n".utf8))
                throw ExitCode(1)
            }
            if json {
                print(String(decoding: data, as: UTF8.self))
                return
            }
            guard let status = try? JSONDecoder().decode(DaemonStatus.self, from: data) else {
                FileHandle.standardError.write(Data("vdpactl: unexpected reply: \(String(decoding: data, as: UTF8.self))\n".utf8))
                throw ExitCode(1)
            }
            for p in status.ports {
                print("\(p.id)  \(p.role) \(p.socket)  \(p.connection)")
                print("  device: \(p.device)")
                print("  features: \(p.features.acked) [\(p.features.ackedNames)] of \(p.features.offered)")
                print("  protocol: \(p.protocolFeatures.acked) [\(p.protocolFeatures.ackedNames)] of \(p.protocolFeatures.offered)")
                for r in p.memoryRegions { print("  region gpa \(r.guestPhysAddr) size \(r.size) uva \(r.userAddr)") }
                for q in p.queues where q.ringSize > 0 || q.enabled || q.started {
                    print("  queue \(q.index): size \(q.ringSize) enabled \(q.enabled) started \(q.started) mode \(q.mode)")
                }
                if let e = p.lastError { print("  last error: \(e)") }
            }
        }
    }
}
