import CVDPAShims
import Platform

/// The relay thread's loop: steps every attached ring, applies control operations between steps,
/// and sleeps on the device's interrupt eventfds as its loop mode says.
extension RelayEngine {
    static let hybridIdleNanos: UInt64 = 50_000
    static let wakeToken = UInt64.max
    /// Tokens of guests' kick eventfds (the avail relay): this bit plus the ring index.
    static let guestKickToken: UInt64 = 1 << 32

    /// The relay thread's loop (`ConfinedTarget`; started by init, not to be called otherwise).
    public func run(on worker: ConfinedWorker<RelayEngine>) {
        if mode == .event {
            // The event loop sleeps between batches; real-time priority lets it run as soon as the
            // device's interrupt wakes it, even while busy-polling threads hold every core (the
            // switchover gap is mostly that wake-up). It blocks after every step, so it cannot
            // starve them. Without the privilege it runs at normal priority.
            do throws(SystemError) { try CurrentThread.setRealTimePriority(1) } catch {
                logger.debug("relay: SCHED_FIFO not permitted (\(error)); the event loop runs at normal priority")
            }
        }
        var idleSince: UInt64 = 0
        var idle = false
        while !worker.stopRequested {
            if worker.hasPending { worker.runPending(self); continue }
            let t0 = cvdpa_thread_cpu_ns()
            var moved = 0
            for q in active { moved &+= step(q) }
            if moved > 0 {
                let t1 = cvdpa_thread_cpu_ns()
                busyNanos.wrappingAdd(t1 &- t0, ordering: .relaxed)
                busyElements.wrappingAdd(UInt64(moved), ordering: .relaxed)
                cpuNanos.store(t1, ordering: .relaxed)
                idle = false
                // The event loop goes back to epoll after every step: the device's eventfd keeps
                // count, so a batch completed meanwhile wakes it at once.
                if mode == .event { sleepOnEvents() }
                continue
            }
            if active.isEmpty {
                // Nothing attached (no migration running): sleep whatever the loop mode.
                sleepOnEvents()
                continue
            }
            switch mode {
            case .poll:
                cpuNanos.store(t0, ordering: .relaxed)
                continue
            case .hybrid:
                let now = cvdpa_monotonic_ns()
                if !idle { idle = true; idleSince = now; continue }
                if now &- idleSince < Self.hybridIdleNanos { continue }
                sleepOnEvents()
                idle = false
            case .event:
                sleepOnEvents()
            }
        }
        cpuNanos.store(cvdpa_thread_cpu_ns(), ordering: .relaxed)
    }

    private func sleepOnEvents() {
        do {
            _ = try epoll.wait(timeoutMillis: sleepMillis) { ev in
                if ev.token == Self.wakeToken {
                    EventFD.drain(wake.raw)
                } else if ev.token & Self.guestKickToken != 0 {
                    if let q = queues[Int(ev.token & 0xFFFF_FFFF)], let k = q.avail?.guestKick {
                        // The frontend can make its kick eventfd blocking at any time (the flag
                        // lives in the file it shares with us); a drain of an empty blocking one
                        // would wedge this thread. Checked before every drain; a frontend that
                        // flips it in between is interrupted out of the read (ConfinedWorker) and
                        // quarantined the same way.
                        if EventFD.isNonBlocking(k.raw) { EventFD.drain(k.raw) } else { quarantineBlockingFDs() }
                    }
                } else if let q = queues[Int(ev.token)] {
                    EventFD.drain(q.deviceCall.raw)
                }
            }
        } catch {
            // epoll_wait fails only on a bug (EBADF, EINVAL; EINTR is no error there): say so,
            // and do not spin on it.
            logger.error("relay: \(error)")
            CurrentThread.sleep(milliseconds: 1)
        }
        cpuNanos.store(cvdpa_thread_cpu_ns(), ordering: .relaxed)
    }
}
