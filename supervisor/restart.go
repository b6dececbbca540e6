package supervisor

import (
	"fmt"
	"net"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/corralhq/corral/supervisor/protocol"
)

// The restart engine; its promise and invariants are in doc.go.

// replace starts a new worker for sl unless one is already starting.
func (s *Supervisor) replace(sl *slot, why string) {
	if sl.next != nil || s.stopping {
		return
	}
	sl.restartAt = time.Time{}
	s.spawn(sl, why)
}

// spawn starts a worker for sl now. A worker that cannot even be executed
// counts as a death of the slot.
func (s *Supervisor) spawn(sl *slot, why string) {
	exe := s.exe
	p, err := s.start(sl, why, s.listenersFor(sl))
	if err != nil {
		s.log.Error().Err(err).Int("worker", sl.n).Str("reason", why).Msg("worker start failed")
		if s.rejectBuild(sl, exe, err.Error()) {
			return
		}
		if !s.booted {
			s.bootFailed(&BootError{Slot: sl.n, Status: err.Error()})
			return
		}
		s.backoff(sl, why, false)
		return
	}
	sl.next = p
	s.procs[p.pid] = p
	if why != "start" && why != "scale_up" {
		sl.restarts++
		sl.lastReason = why
		s.restartsBy[why]++
	}
	s.log.Info().Int("pid", p.pid).Int("worker", sl.n).Int("generation", p.gen).Str("reason", why).Msg("worker started")
}

// listenersFor returns the sockets a worker of sl serves: in reuseport mode
// its own and its neighbour's (the next slot, wrapping), so that connections
// the kernel queues on a dead or stopped worker's socket are still accepted;
// in shared mode the one socket.
func (s *Supervisor) listenersFor(sl *slot) []*os.File {
	if s.shared != nil {
		return s.shared
	}
	lns := []*os.File{sl.sock}
	if len(s.slots) > 1 {
		lns = append(lns, s.slots[sl.n%len(s.slots)].sock)
	}
	return lns
}

func (s *Supervisor) onReady(p *proc) {
	sl := p.slot
	if p != sl.next || p.state != starting {
		return
	}
	if s.cfg.MaxMemory > 0 {
		p.readyRSS = s.env.rss(p.pid)
	}
	now := s.env.now()
	p.state, p.readyAt, p.lastBeat = ready, now, now
	old := sl.current
	sl.current, sl.next = p, nil
	s.log.Info().Int("pid", p.pid).Int("worker", sl.n).Int("generation", p.gen).
		Dur("startup_ms", now.Sub(p.started)).Str("reason", p.why).Msg("worker ready")
	if old != nil && old.state == ready {
		s.stop(old, p.why)
	}
	if sl.removed() {
		s.stop(p, "scale_down")
	}
	if s.reload != nil && s.reload.status.Type != "" {
		p.tell(s.reload.status)
	}
	if s.reload != nil {
		s.reload.proven(p.exe)
		if p.why == "reload" {
			s.log.Info().Int("pid", p.pid).Dur("since_change_ms", now.Sub(s.reload.lastChange)).Msg("reloaded")
		}
	}
	switch {
	case p.exe != s.exe:
		// A newer build landed while this worker was starting.
		s.replace(sl, "reload")
	case !slices.Equal(p.sockets, s.listenersFor(sl)) && !sl.removed():
		// Scaling changed its neighbour while it was starting.
		s.replace(sl, "rewire")
	}
	if !s.booted && s.allReady() {
		s.booted = true
		s.log.Info().Int("workers", len(s.slots)).Msg("Application startup complete")
		s.notify.ready()
		if s.handoff != nil {
			s.handoff.send(protocol.Message{Type: protocol.TypeReady, PID: os.Getpid(), Version: s.cfg.Version})
			s.takeOver()
			s.log.Info().Int("old_pid", s.handoff.ParentPID).Str("old_version", s.handoff.ParentVersion).
				Int("pid", os.Getpid()).Str("version", s.cfg.Version).Msg("upgrade: new master ready")
		}
	}
	if s.rollSlot == sl {
		s.rollSlot = nil
		s.roll()
	}
}

func (s *Supervisor) allReady() bool {
	for _, sl := range s.slots {
		if sl.current == nil {
			return false
		}
	}
	return true
}

func (s *Supervisor) onExit(p *proc, status string) {
	delete(s.procs, p.pid)
	p.lifeline.Close()
	sl := p.slot
	crashed := p.reason == ""
	ev := s.log.Info()
	if crashed {
		ev = s.log.Error()
	}
	reason := p.reason
	if crashed {
		reason = "crashed"
		if p.state == starting {
			reason = "died before ready"
		}
	}
	ev.Int("pid", p.pid).Int("worker", sl.n).Int("generation", p.gen).
		Str("status", status).Str("reason", reason).
		Dur("uptime_ms", s.env.now().Sub(p.started)).Msg("worker exited")
	if s.cfg.OnWorkerExit != nil {
		s.cfg.OnWorkerExit(p.pid, crashed)
	}
	switch p {
	case sl.next:
		sl.next = nil
		if !s.booted && !s.stopping {
			s.bootFailed(&BootError{Slot: sl.n, PID: p.pid, Status: status})
			return
		}
		if p.reason == "" && s.rejectBuild(sl, p.exe, "it exited ("+status+") before it was ready") {
			return
		}
		s.backoff(sl, "restart", false)
	case sl.current:
		sl.current = nil
		if p.state == ready && crashed {
			s.backoff(sl, "crash", s.env.now().Sub(p.readyAt) >= backoffReset)
		}
	}
}

// backoff schedules a replacement for sl after its workers died, unless one
// is starting already: at once after the first death, then after a delay
// that doubles from backoffMin to backoffMax, with jitter.
func (s *Supervisor) backoff(sl *slot, why string, stable bool) {
	if s.stopping || sl.removed() {
		return
	}
	if stable {
		sl.failures = 0
	}
	sl.failures++
	if sl.next != nil {
		return
	}
	var delay time.Duration
	if sl.failures > 1 {
		// The shift stops well before it could overflow: a slot may fail for
		// hours (a database down), and the delay stays at backoffMax.
		delay = min(backoffMin<<min(sl.failures-2, 16), backoffMax)
		delay += time.Duration(s.rng.Int64N(int64(delay)/4+1)) - delay/8
	}
	if delay <= 0 {
		s.spawn(sl, why)
		return
	}
	sl.restartAt, sl.restartWhy = s.env.now().Add(delay), why
	s.log.Warn().Int("worker", sl.n).Int("failures", sl.failures).Dur("delay_ms", delay).Msg("worker restart backed off")
}

// stop asks p to drain; tick kills it if it outlives its budget.
func (s *Supervisor) stop(p *proc, reason string) {
	if p.state == draining || p.state == killing {
		return
	}
	p.reason = reason
	if p.state == starting {
		// Not serving yet: nothing to drain.
		p.state, p.deadline = killing, s.env.now().Add(DefaultKillGrace)
		p.signal(syscall.SIGKILL)
		if p.slot.next == p {
			p.slot.next = nil
		}
		return
	}
	drain, budget := s.cfg.GracefulTimeout, s.cfg.GracefulTimeout+DefaultKillGrace
	if reason == "reload" {
		// A dev reload does not wait for a 60 s chat to finish.
		drain, budget = s.reload.cfg.Drain, s.reload.cfg.Drain
	}
	p.state, p.deadline = draining, s.env.now().Add(budget)
	// The order goes first, so the worker logs this reason and drains
	// within this budget rather than its own default.
	p.tell(protocol.Message{Type: protocol.TypeStop, Reason: reason, BudgetMS: max(drain.Milliseconds(), 1)})
	p.signal(syscall.SIGTERM)
	s.log.Info().Int("pid", p.pid).Int("worker", p.slot.n).Int("generation", p.gen).Str("reason", reason).Dur("budget_ms", drain).Msg("worker draining")
}

// due returns when p next needs the loop: the end of its ready timeout
// while it starts, of its allowed silence while it serves or drains, of its
// drain budget, of its kill grace. This is the one statement of each
// state's deadline; nextDeadline sleeps until the earliest and tick acts
// on those that passed.
func (s *Supervisor) due(p *proc) time.Time {
	switch p.state {
	case starting:
		return p.started.Add(s.cfg.HealthcheckTimeout)
	case ready:
		return p.lastBeat.Add(s.cfg.HealthcheckTimeout)
	case draining:
		// Told to drain while stopped or stuck, its requests would
		// otherwise wait out the whole graceful budget.
		return minTime(p.lastBeat.Add(s.cfg.HealthcheckTimeout), p.deadline)
	}
	return p.deadline
}

// tick acts on every deadline that has passed.
func (s *Supervisor) tick(now time.Time) {
	for _, p := range s.procs {
		if now.Before(s.due(p)) {
			continue
		}
		silent := now.Sub(p.lastBeat)
		switch {
		case p.state == starting:
			s.log.Error().Int("pid", p.pid).Int("worker", p.slot.n).Dur("timeout_ms", s.cfg.HealthcheckTimeout).Str("reason", "ready_timeout").Msg("worker not ready in time")
			if !s.booted && !s.stopping {
				s.bootFailed(&BootError{Slot: p.slot.n, PID: p.pid, Status: fmt.Sprintf("not ready within %s", s.cfg.HealthcheckTimeout)})
				return
			}
			s.stop(p, "ready_timeout")
			if !s.rejectBuild(p.slot, p.exe, fmt.Sprintf("it was not ready within %s", s.cfg.HealthcheckTimeout)) {
				s.backoff(p.slot, "restart", false)
			}
		case p.state == ready:
			s.hung(p, now, "hung")
			s.backoff(p.slot, "hung", false)
		case p.state == draining && silent >= s.cfg.HealthcheckTimeout:
			s.hung(p, now, "hung while draining")
		default: // draining or killing, out of time
			if p.signal(syscall.SIGKILL) {
				s.log.Warn().Int("pid", p.pid).Int("worker", p.slot.n).Str("reason", p.reason).Msg("worker killed")
			}
			p.state, p.deadline = killing, now.Add(afterKill)
		}
	}
	for _, sl := range s.slots {
		if !sl.restartAt.IsZero() && !now.Before(sl.restartAt) {
			sl.restartAt = time.Time{}
			s.replace(sl, sl.restartWhy)
		}
	}
	if !s.drainUntil.IsZero() && !now.Before(s.drainUntil) {
		s.drainUntil = time.Time{}
		s.shutdown("shutdown")
	}
	s.upgradeTick(now)
	s.notify.tick(now)
}

// hung sends SIGQUIT to a silent worker, so that Go prints every
// goroutine's stack to the log, and SIGKILL after the kill grace.
func (s *Supervisor) hung(p *proc, now time.Time, reason string) {
	s.log.Error().Int("pid", p.pid).Int("worker", p.slot.n).Int("generation", p.gen).
		Dur("silent_ms", now.Sub(p.lastBeat)).Str("reason", reason).Msg("worker hung, sending SIGQUIT")
	p.reason, p.state, p.deadline = reason, killing, now.Add(DefaultKillGrace)
	p.signal(syscall.SIGQUIT)
	p.signal(syscall.SIGCONT) // a stopped process dumps and exits too
}

// afterKill is the deadline of a worker sent SIGKILL: nothing is left to
// do but reap it, which its exit event does, so it is far enough away never
// to come. (SIGKILL is sent once.)
const afterKill = time.Hour

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// bootFailed stops the server because a first-generation worker could not
// start: the error is Run's result. Workers still starting are killed;
// those already ready may be serving, and drain as at any stop, running
// their stop hooks (except in an upgrade's new master, which must fail
// the upgrade at once).
func (s *Supervisor) bootFailed(err *BootError) {
	if s.exitErr == nil {
		s.exitErr = err
	}
	s.log.Error().Int("worker", err.Slot).Int("pid", err.PID).Str("status", err.Status).Msg("worker failed to boot, stopping")
	if s.handoff != nil {
		// The new master of an upgrade: the old one still serves and waits
		// for this verdict, which goes out once every worker is reaped.
		s.kill("boot_failed")
		return
	}
	s.shutdown("boot_failed")
}

// roll replaces the next slot of a rolling restart, one at a time.
func (s *Supervisor) roll() {
	for s.rollSlot == nil && len(s.rolling) > 0 && !s.stopping {
		n := s.rolling[0]
		s.rolling = s.rolling[1:]
		if n > len(s.slots) {
			continue
		}
		sl := s.slots[n-1]
		s.rollSlot = sl
		if sl.next != nil {
			// Already being replaced; its readiness continues the roll. A
			// replacement started before the HUP (a crash's, a rewire's)
			// is rolled in its turn once ready, so that every worker
			// serving after the roll started after the signal.
			if sl.next.started.Before(s.rollAfter) {
				s.rolling = append([]int{n}, s.rolling...)
			}
			return
		}
		s.replace(sl, "hup")
	}
	if s.rollSlot == nil && len(s.rolling) == 0 && !s.stopping {
		s.log.Info().Msg("rolling restart done")
		s.notify.ready()
	}
}

// addSlot creates the next slot and, in reuseport mode, its socket.
func (s *Supervisor) addSlot() error {
	sl := &slot{n: len(s.slots) + 1}
	if s.shared == nil {
		f, err := listenSocket(s.addr.(*net.TCPAddr), true, s.cfg.Backlog)
		if err != nil {
			if len(s.slots) == 0 {
				return &AddrError{Addr: s.addr.String(), Err: err}
			}
			return slotSocketError(sl.n, err)
		}
		sl.sock = f
	}
	s.slots = append(s.slots, sl)
	return nil
}

func (s *Supervisor) scaleUp() {
	if s.reload != nil {
		s.log.Warn().Msg("scale up refused: reload mode runs one worker")
		return
	}
	if s.stopping || len(s.slots) >= MaxWorkers {
		s.log.Warn().Int("workers", len(s.slots)).Msg("scale up refused")
		return
	}
	if err := s.addSlot(); err != nil {
		s.log.Error().Err(err).Msg("scale up failed")
		return
	}
	sl := s.slots[len(s.slots)-1]
	s.log.Info().Int("workers", len(s.slots)).Msg("scaling up")
	s.setTitle()
	s.spawn(sl, "scale_up")
	// The previous last slot served slot 1's socket as its neighbour; roll
	// it so the new slot's socket gets a second server too.
	if s.shared == nil && len(s.slots) > 1 {
		s.replace(s.slots[len(s.slots)-2], "rewire")
	}
}

func (s *Supervisor) scaleDown() {
	if s.stopping || len(s.slots) <= 1 {
		s.log.Warn().Int("workers", len(s.slots)).Msg("scale down refused: at least one worker")
		return
	}
	sl := s.slots[len(s.slots)-1]
	s.slots = s.slots[:len(s.slots)-1]
	sl.gone = true
	s.log.Info().Int("workers", len(s.slots)).Msg("scaling down")
	s.setTitle()
	for _, p := range []*proc{sl.next, sl.current} {
		if p != nil {
			s.stop(p, "scale_down")
		}
	}
	sl.restartAt = time.Time{}
	if sl.sock != nil {
		sl.sock.Close()
	}
	if s.rollSlot == sl {
		// Its replacement was stopped and will never be ready: the roll
		// goes on with the next slot.
		s.rollSlot = nil
		defer s.roll()
	}
	// The new last slot served the removed socket as its neighbour.
	if s.shared == nil {
		s.replace(s.slots[len(s.slots)-1], "rewire")
	}
}

// removed reports whether sl was scaled away.
func (sl *slot) removed() bool { return sl.gone }
