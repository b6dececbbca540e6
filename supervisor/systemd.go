package supervisor

import (
	"fmt"
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// notifier speaks systemd's sd_notify protocol for the supervisor. Without
// NOTIFY_SOCKET every call is a no-op.
type notifier struct {
	s        *Supervisor
	enabled  bool          // NOTIFY_SOCKET is set
	watchdog time.Duration // WATCHDOG_USEC/2; 0 when systemd watches nothing
	nextBeat time.Time
	status   string // last STATUS= sent
	statusAt time.Time
}

// statusEvery is how often STATUS= is refreshed while nothing changes, so
// the in-flight count in `systemctl status` stays current.
const statusEvery = 5 * time.Second

func newNotifier(s *Supervisor) *notifier {
	n := &notifier{s: s, enabled: os.Getenv("NOTIFY_SOCKET") != ""}
	if d, err := daemon.SdWatchdogEnabled(false); err == nil && d > 0 {
		n.watchdog = d / 2
		n.nextBeat = s.env.now()
	}
	return n
}

func (n *notifier) send(state string) {
	// A master started by an upgrade says nothing before it is ready: the
	// old master is the service's main process until then, and a STOPPING=1
	// of a new master that failed would stop the service.
	if !n.enabled || n.s.handoff != nil && !n.s.booted {
		return
	}
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.s.log.Debug().Err(err).Msg("sd_notify failed")
	}
}

// ready tells systemd that every worker is serving. A master started by
// an upgrade also says it is the service's main process now (systemd
// accepts that from it with NotifyAccess=all), before the old one exits.
func (n *notifier) ready() {
	if n.s.handoff != nil {
		n.send(fmt.Sprintf("MAINPID=%d\n%s\n%s", os.Getpid(), daemon.SdNotifyReady, n.statusLine()))
		return
	}
	n.send(daemon.SdNotifyReady + "\n" + n.statusLine())
}

// reloading tells systemd a rolling restart started (Type=notify-reload
// wants the monotonic time with it).
func (n *notifier) reloading() {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	n.send(fmt.Sprintf("%s\nMONOTONIC_USEC=%d", daemon.SdNotifyReloading, ts.Nano()/1000))
}

func (n *notifier) stopping() { n.send(daemon.SdNotifyStopping + "\n" + n.statusLine()) }

func (n *notifier) statusLine() string {
	nready, inFlight := 0, int64(0)
	for _, sl := range n.s.slots {
		if sl.current != nil && sl.current.state == ready {
			nready++
			inFlight += sl.current.inFlight
		}
	}
	state := ""
	switch {
	case n.s.stopping:
		state = ", stopping"
	case n.s.rollSlot != nil || len(n.s.rolling) > 0:
		state = ", rolling restart"
	}
	for _, note := range n.s.cfg.StatusNotes {
		state += "; " + note
	}
	return fmt.Sprintf("STATUS=%d/%d workers ready, %d requests in flight%s", nready, len(n.s.slots), inFlight, state)
}

// tick refreshes STATUS= when it changed or went stale and pets the
// watchdog while the workers heartbeat.
func (n *notifier) tick(now time.Time) {
	if !n.enabled {
		return
	}
	if st := n.statusLine(); st != n.status || now.Sub(n.statusAt) >= statusEvery {
		n.status, n.statusAt = st, now
		n.send(st)
	}
	if n.watchdog > 0 && !now.Before(n.nextBeat) {
		n.nextBeat = now.Add(n.watchdog)
		if n.s.serving(now) {
			n.send(daemon.SdNotifyWatchdog)
		} else {
			n.s.log.Warn().Msg("no worker heartbeats: systemd watchdog not notified")
		}
	}
}

// deadline is when tick next has something to do.
func (n *notifier) deadline(now time.Time) time.Time {
	if !n.enabled {
		return now.Add(time.Hour)
	}
	d := n.statusAt.Add(statusEvery)
	if n.watchdog > 0 && n.nextBeat.Before(d) {
		d = n.nextBeat
	}
	return d
}

// serving reports whether the service is doing its job: still starting, or
// at least one ready worker heartbeated within the healthcheck timeout. One
// hung worker is the supervisor's to replace; systemd steps in only when
// nothing serves.
func (s *Supervisor) serving(now time.Time) bool {
	if !s.booted {
		return true
	}
	for _, sl := range s.slots {
		if p := sl.current; p != nil && p.state == ready && now.Sub(p.lastBeat) < s.cfg.HealthcheckTimeout {
			return true
		}
	}
	return false
}
