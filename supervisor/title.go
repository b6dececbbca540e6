package supervisor

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// setTitle shows the supervisor's role, worker count and address in ps and
// htop, when Config.SetTitle allows it.
func (s *Supervisor) setTitle() {
	if !s.cfg.SetTitle {
		return
	}
	title := MasterTitle(s.cfg.Name, len(s.slots), s.where())
	switch {
	case s.handedOver:
		title = s.cfg.Name + ": master [draining]"
	case s.upgrading():
		title = fmt.Sprintf("%s: master [upgrading to %d]", s.cfg.Name, s.up.pid)
	}
	if err := writeTitle(title); err != nil {
		s.log.Debug().Err(err).Msg("process title not updated")
	}
}

// MasterTitle is the master's process title: "server: master [4 workers,
// 0.0.0.0:8000]", "server: master [1 worker, ...]". Worker titles carry no
// count ("server: worker 2 [gen 1]"), so they never go stale on scaling.
func MasterTitle(name string, workers int, where string) string {
	unit := "workers"
	if workers == 1 {
		unit = "worker"
	}
	return fmt.Sprintf("%s: master [%d %s, %s]", name, workers, unit, where)
}

// workerTitle is a worker's process title: "server: worker 2 [gen 1]".
func workerTitle(name string, slot, gen int) string {
	return fmt.Sprintf("%s: worker %d [gen %d]", name, slot, gen)
}

// writeTitle overwrites the process's argv area, which is what ps, htop and
// /proc/PID/cmdline show, with title, NUL-padded. The area keeps the size it
// had at exec, so the master re-execs itself with a padded title to leave
// room for longer ones. Go's os.Args[0] shares that memory and changes with
// it; nothing reads it after start.
func writeTitle(title string) error {
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return err
	}
	// Fields after the command name, which may itself hold spaces and ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return fmt.Errorf("parse /proc/self/stat: no command name")
	}
	fields := strings.Fields(string(stat[i+1:]))
	// arg_start and arg_end are fields 48 and 49 of the whole line; the
	// slice starts at field 3.
	if len(fields) < 47 {
		return fmt.Errorf("parse /proc/self/stat: %d fields", len(fields)+2)
	}
	start, err1 := strconv.ParseInt(fields[45], 10, 64)
	end, err2 := strconv.ParseInt(fields[46], 10, 64)
	if err1 != nil || err2 != nil || end <= start {
		return fmt.Errorf("parse /proc/self/stat: bad argv bounds")
	}
	buf := make([]byte, end-start)
	copy(buf[:len(buf)-1], title)
	mem, err := os.OpenFile("/proc/self/mem", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer mem.Close()
	_, err = mem.WriteAt(buf, start)
	return err
}
