package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/corralhq/corral/supervisor"
)

// The units shipped in docs/systemd, relative to this package.
const (
	serviceUnit = "../../docs/systemd/server.service"
	socketUnit  = "../../docs/systemd/server.socket"
)

// maxExposure is the systemd-analyze security rating the service must stay
// under (0 is locked down, 10 is unprotected).
const maxExposure = 2.0

// systemdAnalyze returns the path of systemd-analyze, skipping the test when
// it is not installed (Debian: package systemd).
func systemdAnalyze(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (Debian package systemd): unit files not checked")
	}
	return path
}

// installUnits copies the shipped units into a fresh folder, with ExecStart=
// pointing at an executable that exists, since verify checks it. The test
// binary stands in for /usr/local/bin/server, under the same name.
func installUnits(t *testing.T) (service, socket string) {
	t.Helper()
	dir := t.TempDir()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("os.Executable() = %v", err)
	}
	bin := filepath.Join(dir, "server")
	if err := os.Symlink(exe, bin); err != nil {
		t.Fatal(err)
	}
	unit := readFile(t, serviceUnit)
	re := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/server$`)
	if !re.MatchString(unit) {
		t.Fatalf("%s: no line ExecStart=/usr/local/bin/server to point at a test binary", serviceUnit)
	}
	// A % in a unit is a specifier; the temporary path must stay literal.
	unit = re.ReplaceAllLiteralString(unit, "ExecStart="+strings.ReplaceAll(bin, "%", "%%"))
	service = filepath.Join(dir, "server.service")
	socket = filepath.Join(dir, "server.socket")
	writeFile(t, service, unit)
	writeFile(t, socket, readFile(t, socketUnit))
	return service, socket
}

func TestSystemdUnitsVerify(t *testing.T) {
	t.Parallel()
	analyze := systemdAnalyze(t)
	service, socket := installUnits(t)
	cmd := exec.Command(analyze, "verify", "--man=no", service, socket)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	// verify only warns about an unknown directive or a bad value, on stderr,
	// and still exits 0; every such line is a failure here.
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("systemd-analyze verify server.service server.socket: %v\nstderr:\n%s\nstdout:\n%s", err, &stderr, &stdout)
	}
}

func TestSystemdServiceSecurity(t *testing.T) {
	t.Parallel()
	analyze := systemdAnalyze(t)
	service, _ := installUnits(t)
	// --threshold takes tenths and fails above them: 19 fails at 2.0.
	threshold := strconv.Itoa(int(maxExposure*10) - 1)
	cmd := exec.Command(analyze, "security", "--offline=true", "--no-pager", "--threshold="+threshold, service)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	m := regexp.MustCompile(`Overall exposure level for server\.service: (\d+\.\d+)`).FindSubmatch(stdout.Bytes())
	if m == nil {
		t.Fatalf("systemd-analyze security (systemd 250 or later needed for --offline and --threshold): %v, no overall exposure level\nstderr:\n%s\nstdout:\n%s", err, &stderr, &stdout)
	}
	exposure, _ := strconv.ParseFloat(string(m[1]), 64)
	t.Logf("systemd-analyze security: overall exposure level %.1f", exposure)
	if exposure >= maxExposure || err != nil {
		t.Fatalf("systemd-analyze security server.service: exposure %.1f (%v), want under %.1f; the rated settings:\n%s", exposure, err, maxExposure, &stdout)
	}
}

// TestSystemdServiceContract checks the settings the server's behaviour
// depends on, which verify and security would accept either way.
func TestSystemdServiceContract(t *testing.T) {
	t.Parallel()
	unit := unitSettings(t, serviceUnit)
	want := map[string]string{
		"Type":             "notify",
		"NotifyAccess":     "all", // the new master of an upgrade sends MAINPID=
		"ExecReload":       "/bin/kill -HUP $MAINPID",
		"KillMode":         "mixed",
		"StateDirectory":   "corral",
		"RuntimeDirectory": "corral",
		"EnvironmentFile":  "-/etc/corral/server.env",
	}
	for key, v := range want {
		if got := unit[key]; len(got) != 1 || got[0] != v {
			t.Errorf("%s: %s=%q, want %q", serviceUnit, key, got, v)
		}
	}
	// The stop timeout must cover the documented drain delay and the
	// default graceful budget, or systemd SIGKILLs requests the server
	// would have finished.
	const drainDelay = 5 * time.Second
	stop := unit["TimeoutStopSec"]
	if len(stop) != 1 {
		t.Fatalf("%s: TimeoutStopSec=%q, want one value", serviceUnit, stop)
	}
	d, err := time.ParseDuration(stop[0])
	if err != nil {
		t.Fatalf("%s: TimeoutStopSec=%q: %v (write it as Go can parse, e.g. 90s)", serviceUnit, stop[0], err)
	}
	if floor := drainDelay + supervisor.DefaultGracefulTimeout; d <= floor {
		t.Errorf("%s: TimeoutStopSec=%s, want more than drain delay %s + graceful budget %s", serviceUnit, d, drainDelay, supervisor.DefaultGracefulTimeout)
	}
}

// unitSettings returns a unit file's Key=value settings, every value of a
// key in order. Comments and section headers are dropped.
func unitSettings(t *testing.T, path string) map[string][]string {
	t.Helper()
	settings := map[string][]string{}
	sc := bufio.NewScanner(strings.NewReader(readFile(t, path)))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' || line[0] == '[' {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: line %q is not Key=value", path, line)
		}
		settings[key] = append(settings[key], value)
	}
	return settings
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
